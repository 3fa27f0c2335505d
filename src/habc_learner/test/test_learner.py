"""The online learner core: rounds, versions, crash safety, relabels and bad bags."""

import json
import os
from pathlib import Path

import pytest
from safetensors.torch import load_file

from habc_common.params import check_parameter_file
from habc_episodes.vocabulary import PolicyVersion
from habc_learner.learner import Learner, LearnerParams, STATE_FILE
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
    assert state['cursor'] == index.last_label_seq()
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


def test_relabels_recredit_or_remove_episodes(tmp_path, init_checkpoint, episode_bag, index,
                                              labelled):
    params = make_params(tmp_path, init_checkpoint)
    add_episode(episode_bag, labelled, 'ep-1')
    add_episode(episode_bag, labelled, 'ep-2')
    learner = Learner(params)
    learner.poll(index)
    learner.train_round()
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
