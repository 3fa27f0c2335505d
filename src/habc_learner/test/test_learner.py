"""The online learner core: rounds, versions, crash safety, relabels and bad bags."""

import json
import os
from pathlib import Path
import sqlite3

import pytest
from safetensors.torch import load_file
import torch

from habc_common.params import check_parameter_file
from habc_episodes.vocabulary import PolicyVersion
from habc_learner.learner import Learner, LearnerParams, STATE_FILE
from habc_learner.trainer import TRAINER_STATE_FILE
from habc_policy.models.base import load_policy, sha256_file

POLICY, HUMAN, HOLD = 0, 1, 2
STEPS = 12


def make_params(tmp_path, init_checkpoint, **overrides):
    values = {'index_path': str(tmp_path / 'index' / 'episodes.sqlite'),
              'work_dir': str(tmp_path / 'learner'), 'init_checkpoint': str(init_checkpoint),
              'episodes_per_round': 2, 'steps_per_round': 3, 'batch_size': 4,
              'warmup_steps': 1}
    values.update(overrides)
    return LearnerParams(**values)


def add_episode(episode_bag, labelled, name, outcome='success', sources=None):
    sources = sources or [POLICY] * 4 + [HUMAN] * 4 + [POLICY] * 4
    labelled(episode_bag(name, sources), name, outcome, len(sources))


def state_of(tmp_path):
    return json.loads((tmp_path / 'learner' / STATE_FILE).read_text())


def test_a_round_writes_version_2(tmp_path, init_checkpoint, episode_bag, index, labelled):
    add_episode(episode_bag, labelled, 'ep-1', 'success')
    learner = Learner(make_params(tmp_path, init_checkpoint))
    assert learner.version == PolicyVersion(1) and learner.latest() is None and not learner.resumed
    assert learner.sha256 == sha256_file(init_checkpoint / 'model.safetensors')
    assert learner.poll(index) == ['ep-1']
    assert not learner.ready()  # 1 of 2 episodes
    add_episode(episode_bag, labelled, 'ep-2', 'failure', [POLICY] * STEPS)
    assert learner.poll(index) == ['ep-2']
    assert learner.ready()
    progress = []
    result = learner.train_round(on_progress=lambda *args: progress.append(args))
    directory = tmp_path / 'learner' / 'checkpoints' / 'v2'
    assert (result.version, result.round, result.path) == (PolicyVersion(2), 1, directory)
    assert result.sha256 == sha256_file(directory / 'model.safetensors')
    for name in ('model.safetensors', 'config.json', 'metrics.json', 'critic.safetensors'):
        assert (directory / name).is_file(), name
    assert load_policy(directory).version == '2'
    assert progress[-1][:2] == (3, 3) and 'losses/actor' in result.metrics
    assert json.loads((directory / 'metrics.json').read_text())['sha256'] == result.sha256
    state = state_of(tmp_path)
    assert state['version'] == '2' and state['round'] == 1
    assert state['checkpoint'] == 'checkpoints/v2' and state['sha256'] == result.sha256
    assert state['cursors'] == {str(index.path.resolve()): index.last_label_seq()}
    assert [e['episode_id'] for e in state['episodes']] == ['ep-1', 'ep-2']
    assert state['trainer_step'] == 3
    assert not learner.ready() and learner.poll(index) == []
    status = learner.status()
    assert (status['version'], status['episodes'], status['pending']) == ('2', 2, 0)


def test_a_learner_killed_mid_round_loses_nothing_and_counts_nothing_twice(
        tmp_path, init_checkpoint, episode_bag, index, labelled, monkeypatch):
    params = make_params(tmp_path, init_checkpoint)
    add_episode(episode_bag, labelled, 'ep-1')
    add_episode(episode_bag, labelled, 'ep-2')

    # Killed during the first round: nothing of it may survive.
    first = Learner(params)
    first.poll(index)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt('killed')

    monkeypatch.setattr(first, '_write_state', crash)
    with pytest.raises(KeyboardInterrupt):
        first.train_round()
    assert not first.ready()  # a failed round waits for new data before it retries
    assert first.version == PolicyVersion(1)
    assert not (tmp_path / 'learner' / STATE_FILE).exists()
    del first

    second = Learner(params)
    assert not second.resumed
    assert not (tmp_path / 'learner' / 'checkpoints' / 'v2').exists()  # never published
    assert second.poll(index) == ['ep-1', 'ep-2']
    assert second.train_round().version == PolicyVersion(2)

    # Two more episodes, then killed after the checkpoint but before the state file.
    add_episode(episode_bag, labelled, 'ep-3', 'failure')
    assert second.poll(index) == ['ep-3']
    add_episode(episode_bag, labelled, 'ep-4')
    assert second.poll(index) == ['ep-4']
    monkeypatch.setattr(second, '_write_state', crash)
    with pytest.raises(KeyboardInterrupt):
        second.train_round()
    assert state_of(tmp_path)['version'] == '2'
    del second

    third = Learner(params)
    assert third.resumed and third.version == PolicyVersion(2) and third.round == 1
    assert third.trainer is None and third.latest().version == PolicyVersion(2)
    assert third.poll(index) == ['ep-3', 'ep-4']  # re-read, from the saved cursor
    assert third.episode_ids == ['ep-1', 'ep-2', 'ep-3', 'ep-4']
    assert len(third.buffer.episodes) == 4 and len(third.buffer) == 4 * STEPS
    assert third.pending == 2 and third.ready()
    result = third.train_round()
    assert result.version == PolicyVersion(3) and result.round == 2
    assert third.trainer.step == 6  # the step count (warm-up) continues over restarts
    assert [e['episode_id'] for e in state_of(tmp_path)['episodes']] == [
        'ep-1', 'ep-2', 'ep-3', 'ep-4']
    assert result.sha256 == sha256_file(tmp_path / 'learner' / 'checkpoints' / 'v3'
                                        / 'model.safetensors')

    # A clean restart: the same buffer, nothing pending, the next round is version 4.
    fourth = Learner(params)
    assert fourth.poll(index) == [] and fourth.episode_ids == third.episode_ids
    assert not fourth.ready() and fourth.latest().version == PolicyVersion(3)


def trained_once(tmp_path, init_checkpoint, episode_bag, index, labelled):
    """Return (params, learner) after one round on two successful episodes ep-1, ep-2."""
    params = make_params(tmp_path, init_checkpoint)
    add_episode(episode_bag, labelled, 'ep-1')
    add_episode(episode_bag, labelled, 'ep-2')
    learner = Learner(params)
    learner.poll(index)
    learner.train_round()
    return params, learner


def test_a_restarted_learner_goes_on_with_its_adamw_moments_and_target_critic(
        tmp_path, init_checkpoint, episode_bag, index, labelled):
    params, first = trained_once(tmp_path, init_checkpoint, episode_bag, index, labelled)
    lines = []
    restarted = Learner(params, log=lines.append)
    restarted.poll(index)
    trainer = restarted._make_trainer()
    path = tmp_path / 'learner' / 'checkpoints' / 'v2' / TRAINER_STATE_FILE
    assert f'AdamW moments and target critic restored from {path}' in lines
    for name in ('actor_optimizer', 'critic_optimizer'):
        saved = getattr(first.trainer.algorithm, name).state_dict()['state']
        loaded = getattr(trainer.algorithm, name).state_dict()['state']
        assert saved.keys() == loaded.keys() and saved
        for index_ in saved:
            for key, value in saved[index_].items():
                assert torch.equal(value, loaded[index_][key]), (name, index_, key)
    for a, b in zip(first.trainer.algorithm.target_critic.parameters(),
                    trainer.algorithm.target_critic.parameters(), strict=True):
        assert torch.equal(a, b)
    # A learner that starts from an SFT checkpoint starts its optimizers afresh.
    fresh = Learner(make_params(tmp_path / 'other', path.parent))
    fresh.poll(index)
    assert fresh._make_trainer().algorithm.actor_optimizer.state_dict()['state'] == {}


def test_relabels_recredit_or_remove_episodes(tmp_path, init_checkpoint, episode_bag, index,
                                              labelled):
    params, learner = trained_once(tmp_path, init_checkpoint, episode_bag, index, labelled)
    index.label('ep-1', 'discarded', now=2000.0)
    index.label('ep-2', 'failure', now=2001.0)
    assert learner.poll(index) == []
    assert learner.episode_ids == ['ep-2'] and learner.pending == 0
    assert [e.outcome.name for e in learner.buffer.episodes] == ['FAILURE']
    assert len(learner.buffer) == STEPS
    # A discarded episode labelled again comes back as a new one.
    index.label('ep-1', 'success', now=2002.0)
    assert learner.poll(index) == ['ep-1'] and learner.pending == 1


def test_max_episodes_keeps_the_newest_in_the_buffer(tmp_path, init_checkpoint, episode_bag,
                                                    index, labelled):
    learner = Learner(make_params(tmp_path, init_checkpoint, max_episodes=2))
    for name in ('ep-1', 'ep-2', 'ep-3'):
        add_episode(episode_bag, labelled, name)
    assert learner.poll(index) == ['ep-1', 'ep-2', 'ep-3']
    # The oldest left the buffer; all three count as new for the round.
    assert learner.episode_ids == ['ep-2', 'ep-3'] and learner.pending == 3
    assert len(learner.buffer) == 2 * STEPS
    assert learner.status()['evicted'] == 1
    learner.train_round()
    add_episode(episode_bag, labelled, 'ep-4')
    assert learner.poll(index) == ['ep-4'] and learner.episode_ids == ['ep-3', 'ep-4']
    assert len(learner.buffer) == 2 * STEPS and learner.status()['evicted'] == 2


def test_unusable_bags_are_skipped_with_the_reason(tmp_path, init_checkpoint, episode_bag,
                                                   index, labelled, bags):
    obs = bags.observation(bags.SEC, [0.0] * 14, 0)
    broken = bags.write(tmp_path / 'bags' / 'broken', [('/observation', bags.SEC, obs)])
    labelled(broken, 'broken', 'success', 1)
    labelled(episode_bag('two-views', [POLICY] * STEPS, views=2), 'two-views', 'success',
             STEPS)
    labelled(tmp_path / 'bags' / 'gone', 'gone', 'success', 3)
    learner = Learner(make_params(tmp_path, init_checkpoint))
    assert learner.poll(index) == []
    assert "no topic 'executed_action'" in learner.rejected['broken']
    assert '2 camera view(s), the policy needs 1' in learner.rejected['two-views']
    assert 'FileNotFoundError' in learner.rejected['gone']
    assert learner.pending == 0 and not learner.ready()
    # Choosing one camera makes the two-view episode usable once it is labelled again.
    learner = Learner(make_params(tmp_path, init_checkpoint, cameras=[1]))
    index.label('two-views', 'success', now=3000.0)
    assert 'two-views' in learner.poll(index)


def test_relative_bag_paths_resolve_beside_the_index(tmp_path, init_checkpoint, episode_bag,
                                                     index, labelled):
    bag = episode_bag('ep-1', [POLICY] * STEPS)
    relative = os.path.relpath(bag, index.path.parent)
    assert relative.startswith('..')
    labelled(relative, 'ep-1', 'success', STEPS)
    assert Learner(make_params(tmp_path, init_checkpoint)).poll(index) == ['ep-1']


def test_a_first_start_needs_an_init_checkpoint(tmp_path):
    with pytest.raises(ValueError, match='set init_checkpoint'):
        Learner(LearnerParams(work_dir=str(tmp_path / 'learner')))
    with pytest.raises(ValueError, match='cannot start from checkpoint .*model.safetensors'):
        Learner(LearnerParams(work_dir=str(tmp_path / 'learner'),
                              init_checkpoint=str(tmp_path / 'nothing')))


@pytest.mark.parametrize('overrides, message', [
    ({'method': 'ppo'}, 'choose one of'),
    ({'episodes_per_round': 0}, 'below its minimum'),
    ({'cameras': [-1]}, 'indices >= 0'),
])
def test_invalid_parameters_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        LearnerParams(**overrides)


def test_demonstrations_join_every_round(tmp_path, init_checkpoint, episode_bag, index,
                                         labelled):
    demos = tmp_path / 'bags' / 'demos'
    episode_bag('demos/demo-a', [HUMAN] * STEPS)
    (demos / 'notes.txt').write_text('not a bag')
    add_episode(episode_bag, labelled, 'ep-1')
    learner = Learner(make_params(tmp_path, init_checkpoint, demos_dir=str(demos),
                                  episodes_per_round=1))
    assert learner.poll(index) == ['ep-1']
    assert learner.status()['demos'] == 1 and learner.episode_ids == ['ep-1']
    assert learner.buffer.table['is_sft'].sum() == STEPS
    assert learner.train_round().version == PolicyVersion(2)


def test_a_transformers_vla_trains_rounds_and_resumes_after_a_restart(
        tmp_path, transformers_vla_checkpoint, episode_bag, index, labelled):
    import torch

    params = make_params(tmp_path, transformers_vla_checkpoint)
    add_episode(episode_bag, labelled, 'ep-1', 'success')  # 8 px: resized to the policy's 32
    add_episode(episode_bag, labelled, 'ep-2', 'failure')
    first = Learner(params)
    assert first.poll(index) == ['ep-1', 'ep-2'] and not first.rejected
    assert first.buffer.episodes[0].observations['images'].shape[2:4] == (32, 32)
    result = first.train_round()
    assert result.version == PolicyVersion(2)
    weights = load_file(str(result.path / 'model.safetensors'))
    assert not [key for key in weights if key.startswith('backbone.')]
    trained = first.policy.checkpoint_state()
    del first

    # Restarted: the policy comes back from its own v2 checkpoint on the same backbone.
    second = Learner(params)
    assert second.resumed and second.version == PolicyVersion(2)
    assert type(second.policy).__name__ == 'TransformersVLA'
    restored = second.policy.checkpoint_state()
    assert set(restored) == set(trained)
    assert all(torch.equal(restored[k], trained[k]) for k in trained)
    assert second.poll(index) == []
    add_episode(episode_bag, labelled, 'ep-3', 'success')
    add_episode(episode_bag, labelled, 'ep-4', 'failure')
    assert second.poll(index) == ['ep-3', 'ep-4']
    assert second.train_round().version == PolicyVersion(3)
    assert second.trainer.step == 6
    assert load_policy(tmp_path / 'learner' / 'checkpoints' / 'v3').version == '3'


def test_a_lerobot_folder_named_as_lerobot_path_starts_the_learner(
        tmp_path, episode_bag, index, labelled):
    # `lerobot:PATH`, as the policy node's checkpoint parameter takes it: the learner starts
    # from the folder at PATH (it hashed the path with the prefix before, and stopped).
    from habc_policy.models.lerobot_act import (
        LeRobotACT,
        LeRobotACTConfig,
        reproducible_weights,
        write_lerobot_act,
    )

    config = LeRobotACTConfig(
        state_dim=14, action_dim=14, image_size=8, chunk_size=10, n_action_steps=10,
        dim_model=16, n_heads=2, dim_feedforward=32, n_encoder_layers=1, n_decoder_layers=1,
        latent_dim=4, n_vae_encoder_layers=1)
    folder = tmp_path / 'lerobot_act'
    write_lerobot_act(folder, config, reproducible_weights(LeRobotACT(config).model), {})
    add_episode(episode_bag, labelled, 'ep-1', 'success')
    add_episode(episode_bag, labelled, 'ep-2', 'failure')
    learner = Learner(make_params(tmp_path, f'lerobot:{folder}'))
    assert learner.version == PolicyVersion(1, 'lerobot-lerobot_act')
    assert learner.sha256 == sha256_file(folder / 'model.safetensors')
    assert learner.poll(index) == ['ep-1', 'ep-2'] and not learner.rejected
    result = learner.train_round()
    assert result.version == PolicyVersion(2)
    assert json.loads((result.path / 'config.json').read_text())['type'] == 'lerobot_act'
    assert type(load_policy(result.path)).__name__ == 'LeRobotACT'


def test_the_parameter_file_matches_the_declaration():
    root = Path(__file__).resolve().parents[3]
    (params,) = check_parameter_file(LearnerParams, root / 'config' / 'params' / 'learner.yaml')
    assert params.episodes_per_round == 2 and params.torch_threads == 0  # half the CPUs


def fleet_store(tmp_path, robot):
    """Open robot `robot`'s own store <tmp_path>/fleet/<robot>/episodes.sqlite."""
    from habc_episodes.index import EpisodeIndex
    return EpisodeIndex(tmp_path / 'fleet' / robot / 'episodes.sqlite')


def add_robot_episode(store, episode_bag, robot, name, outcome, interventions, now):
    store.create(name, str(episode_bag(name, [POLICY] * STEPS)), 'transfer the cube', '1',
                 started_at=now, robot=robot)
    store.finish(name, STEPS, interventions, ended_at=now + 1.0)
    store.label(name, outcome, 'test', now=now + 2.0)


def test_a_fleet_learner_reads_every_robots_store_once_and_reports_each_robot(
        tmp_path, init_checkpoint, episode_bag):
    stores = {robot: fleet_store(tmp_path, robot) for robot in ('robot1', 'robot2')}
    missing = tmp_path / 'fleet' / 'robot3' / 'episodes.sqlite'  # a robot not up yet
    params = make_params(tmp_path, init_checkpoint, episodes_per_round=3, index_paths=[
        str(store.path) for store in stores.values()] + [str(missing)])
    add_robot_episode(stores['robot1'], episode_bag, 'robot1', 'r1-a', 'success', 1, 1000.0)
    add_robot_episode(stores['robot2'], episode_bag, 'robot2', 'r2-a', 'failure', 2, 1000.0)
    learner = Learner(params)
    assert learner.poll(list(stores.values())) == ['r1-a', 'r2-a']
    assert not learner.ready()  # 2 of 3: robot2 alone moves the round on
    add_robot_episode(stores['robot2'], episode_bag, 'robot2', 'r2-b', 'success', 0, 1010.0)
    # The same label sequence numbers in both stores: each store has its own cursor.
    assert [s.last_label_seq() for s in stores.values()] == [1, 2]
    assert learner.poll(list(stores.values())) == ['r2-b'] and learner.ready()
    result = learner.train_round()
    metrics = result.metrics
    assert metrics['round/episodes'] == 3 and metrics['round/new_episodes'] == 3
    assert metrics['round/robots'] == 2
    assert metrics['robot/robot1/episodes'] == 1 and metrics['robot/robot2/episodes'] == 2
    assert metrics['robot/robot1/success_rate'] == 1.0
    assert metrics['robot/robot2/success_rate'] == 0.5
    # Interventions are counted in the bags, where these robots drove alone.
    assert metrics['robot/robot2/interventions_per_episode'] == 0.0
    assert learner.status()['robots'] == {'robot1': 1, 'robot2': 2}

    # A restart takes nothing twice and, later, only what is new in each store.
    restarted = Learner(params)
    assert restarted.poll(list(stores.values())) == []
    add_robot_episode(stores['robot1'], episode_bag, 'robot1', 'r1-b', 'success', 0, 1020.0)
    assert restarted.poll(list(stores.values())) == ['r1-b']
    assert restarted.episode_ids == ['r1-a', 'r2-a', 'r2-b', 'r1-b']
    state = state_of(tmp_path)
    assert state['cursors'] == {str(stores['robot1'].path.resolve()): 1,
                                str(stores['robot2'].path.resolve()): 2}
    assert {e['episode_id']: e['robot'] for e in state['episodes']} == {
        'r1-a': 'robot1', 'r2-a': 'robot2', 'r2-b': 'robot2'}


def test_an_unreadable_store_is_skipped_and_a_copied_one_counts_nothing_twice(
        tmp_path, init_checkpoint, episode_bag):
    good = fleet_store(tmp_path, 'robot1')
    add_robot_episode(good, episode_bag, 'robot1', 'r1-a', 'success', 0, 1000.0)
    copy_path = tmp_path / 'fleet' / 'copy' / 'episodes.sqlite'
    copy_path.parent.mkdir(parents=True)
    good.close()
    copy_path.write_bytes(good.path.read_bytes())
    from habc_episodes.index import EpisodeIndex
    good, copy = EpisodeIndex(good.path), EpisodeIndex(copy_path)
    learner = Learner(make_params(tmp_path, init_checkpoint,
                                  index_paths=[str(good.path), str(copy_path)]))
    assert learner.poll([good, copy]) == ['r1-a']  # the copy's row is the same episode
    # The copy goes bad (its table dropped behind the learner's back): it is skipped and
    # reported; the good store is read on.
    with sqlite3.connect(copy_path) as db:
        db.execute('DROP TABLE episodes')
    add_robot_episode(good, episode_bag, 'robot1', 'r1-b', 'failure', 0, 1010.0)
    assert learner.poll([copy, good]) == ['r1-b']
    assert 'no such table' in learner.store_problems[str(copy_path.resolve())]
    assert learner.ready()


def test_a_format_1_state_keeps_its_cursor_for_index_path(tmp_path, init_checkpoint,
                                                          episode_bag, index, labelled):
    params, _ = trained_once(tmp_path, init_checkpoint, episode_bag, index, labelled)
    state = state_of(tmp_path)
    state['format'], state['cursor'] = 1, state.pop('cursors')[str(index.path.resolve())]
    (tmp_path / 'learner' / STATE_FILE).write_text(json.dumps(state))
    add_episode(episode_bag, labelled, 'ep-3')
    assert Learner(params).poll(index) == ['ep-3']


def test_the_same_store_twice_is_refused(tmp_path, init_checkpoint):
    with pytest.raises(ValueError, match='more than once'):
        make_params(tmp_path, init_checkpoint, index_paths=['~/a/episodes.sqlite',
                                                            '~/a/../a/episodes.sqlite'])


def test_a_round_trains_in_two_torchrun_processes_and_the_learner_publishes_it(
        tmp_path, init_checkpoint, episode_bag, index, labelled):
    add_episode(episode_bag, labelled, 'ep-1', 'success')
    add_episode(episode_bag, labelled, 'ep-2', 'failure', [POLICY] * STEPS)
    lines = []
    learner = Learner(make_params(tmp_path, init_checkpoint, nproc=2), log=lines.append)
    learner.poll(index)
    progress = []
    result = learner.train_round(on_progress=lambda *args: progress.append(args))
    directory = tmp_path / 'learner' / 'checkpoints' / 'v2'
    assert result.path == directory and result.metrics['round/processes'] == 2
    assert result.sha256 == sha256_file(directory / 'model.safetensors')
    assert load_policy(directory).version == '2' and (directory / 'critic.safetensors').is_file()
    assert progress[-1][:2] == (3, 3) and 'losses/actor' in result.metrics
    assert result.metrics['round/episodes'] == 2
    state = state_of(tmp_path)
    assert state['trainer_step'] == 3 and state['version'] == '2'
    assert not list((tmp_path / 'learner' / 'checkpoints').glob('.*'))  # no scratch left
    assert not any('restored' in line for line in lines)  # the SFT checkpoint's: none
    # The next round's processes go on with the AdamW moments and target critic rank 0 saved.
    add_episode(episode_bag, labelled, 'ep-3', 'success')
    add_episode(episode_bag, labelled, 'ep-4', 'success')
    learner.poll(index)
    assert learner.train_round().version == PolicyVersion(3)
    saved = directory / TRAINER_STATE_FILE
    assert f'AdamW moments and target critic restored from {saved}' in lines, lines[-20:]
