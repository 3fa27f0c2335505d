"""The trainer: repeatable with a seed, TensorBoard scalars, checkpoints that load."""

import json

import numpy as np
import pytest
import torch

from habc_episodes.vocabulary import EpisodeKind, PolicyVersion
from habc_learner.methods import MethodConfig
from habc_learner.synthetic import reach_dataset
from habc_learner.trainer import seed_everything, TrainConfig, Trainer
from habc_policy.models.base import load_policy
from habc_policy.models.lowdim import LowDimFlowConfig, LowDimFlowPolicy


def run(tmp_path=None, seed=3, steps=30):
    method = MethodConfig(method='habc', horizon=4, min_human_steps=1, warmup_steps=10)
    buffer = method.make_buffer()
    for episode in reach_dataset({'fast': 3, 'slow': 3, 'fail': 3, 'rescued': 3}, seed=0):
        buffer.add(episode)
    for episode in reach_dataset({'fast': 3}, seed=1, kind=EpisodeKind.DEMO):
        buffer.add(episode)
    seed_everything(seed)
    policy = LowDimFlowPolicy(LowDimFlowConfig(state_dim=1, action_dim=1, horizon=4,
                                               hidden_dim=32, feature_dim=16))
    trainer = Trainer(policy, buffer, method, TrainConfig(steps=steps, batch_size=32, seed=seed,
                                                          log_every=10),
                      log_dir=tmp_path / 'tb' if tmp_path else None, progress=False)
    trainer.fit()
    return trainer


def test_same_seed_same_run_different_seed_different_run():
    a, b, c = run(seed=3), run(seed=3), run(seed=4)
    assert a.history == b.history
    for pa, pb in zip(a.policy.parameters(), b.policy.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert a.history != c.history


def test_metrics_tensorboard_and_checkpoint(tmp_path):
    trainer = run(tmp_path)
    last = trainer.history[-1]
    assert last['step'] == 30
    for key in ('losses/actor', 'losses/critic', 'losses/viability', 'losses/efficiency',
                'weights/zero_share', 'weights/mean_g_rollout_success', 'critic/brier',
                'critic/p_v_success', 'critic/p_v_failure'):
        assert key in last and np.isfinite(last[key]), key
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / 'tb'))
    events.Reload()
    assert 'losses/actor' in events.Tags()['scalars']
    assert [e.step for e in events.Scalars('losses/actor')] == [10, 20, 30]

    info = trainer.save_checkpoint(tmp_path / 'v1', version=PolicyVersion(3, 'probe'))
    meta = json.loads((tmp_path / 'v1' / 'metrics.json').read_text())
    assert meta['sha256'] == info['sha256'] and meta['method']['method'] == 'habc'
    assert (tmp_path / 'v1' / 'critic.safetensors').is_file()
    loaded = load_policy(tmp_path / 'v1')
    assert loaded.version == '3:probe'
    obs = {'state': torch.tensor([[0.3]])}
    assert torch.equal(trainer.policy.sample_chunks(obs, torch.Generator().manual_seed(0)),
                       loaded.sample_chunks(obs, torch.Generator().manual_seed(0)))
    # The robot loads the critic that was trained with it (habc_policy.models.critic): the
    # same viability as the trainer's critic on the same features.
    from habc_policy.models.critic import load_critic

    robot = load_critic(tmp_path / 'v1', loaded.feature_dim)
    assert robot.problem == ''
    with torch.no_grad():
        features = loaded.encode(obs)
        z_robot, _ = robot.critic(features)
        z_trained, _ = trainer.algorithm.critic.eval()(features)
    assert torch.allclose(z_robot, z_trained)


def test_train_config_validates():
    with pytest.raises(ValueError, match='TrainConfig.batch_size must be >= 1'):
        TrainConfig(batch_size=0)


def reach_trainer(policy=None, method='habc', steps=10, actor_lr=3e-4):
    """Return a trainer on the reach task's episodes (a fresh policy unless one is given)."""
    config = MethodConfig(method=method, horizon=4, min_human_steps=1, warmup_steps=3)
    buffer = config.make_buffer()
    for episode in reach_dataset({'fast': 3, 'slow': 3, 'fail': 3, 'rescued': 3}, seed=0):
        buffer.add(episode)
    if policy is None:
        seed_everything(3)
        policy = LowDimFlowPolicy(LowDimFlowConfig(state_dim=1, action_dim=1, horizon=4,
                                                   hidden_dim=32, feature_dim=16))
    return Trainer(policy, buffer, config, TrainConfig(steps=steps, batch_size=32, seed=3,
                                                       log_every=5, actor_lr=actor_lr),
                   progress=False)


def test_a_run_resumed_from_its_checkpoint_goes_on_as_if_it_never_stopped(tmp_path):
    import copy

    from safetensors.torch import load_file

    from habc_learner.trainer import TRAINER_STATE_FILE

    unbroken = reach_trainer()
    unbroken.fit()
    unbroken.save_checkpoint(tmp_path / 'v2', version=PolicyVersion(2))
    assert (tmp_path / 'v2' / TRAINER_STATE_FILE).is_file()
    rng = copy.deepcopy(unbroken.rng)  # the sampler's state: not part of the checkpoint
    unbroken.fit(5)

    def resumed(with_state: bool) -> Trainer:
        trainer = reach_trainer(load_policy(tmp_path / 'v2'))
        trainer.step, trainer.rng = 10, copy.deepcopy(rng)
        if with_state:
            logged = []
            assert trainer.resume_from(tmp_path / 'v2', logged.append) is True
            assert logged == [f'critic restored from {tmp_path / "v2" / "critic.safetensors"}',
                              f'AdamW moments and target critic restored from '
                              f'{tmp_path / "v2" / TRAINER_STATE_FILE}']
        else:  # the critic alone, as before the training state was saved: AdamW starts afresh
            critic = load_file(str(tmp_path / 'v2' / 'critic.safetensors'))
            trainer.algorithm.critic.load_state_dict(critic)
            trainer.algorithm.target_critic.load_state_dict(critic)
        trainer.fit(5)
        return trainer

    def weights(trainer: Trainer) -> list[torch.Tensor]:
        return [*trainer.policy.parameters(), *trainer.algorithm.critic.parameters(),
                *trainer.algorithm.target_critic.parameters()]

    # Step for step the same arithmetic: equal to the last bit.
    for a, b in zip(weights(unbroken), weights(resumed(True)), strict=True):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(weights(unbroken), weights(resumed(False)),
                                                     strict=True))


def test_a_training_state_of_other_training_is_refused_and_changes_nothing(tmp_path):
    habc = reach_trainer(steps=2)
    habc.fit()
    habc.save_checkpoint(tmp_path / 'habc', version=PolicyVersion(2))
    bc = reach_trainer(steps=2, method='sft')  # no critic (and no demonstrations to fit)
    bc.save_checkpoint(tmp_path / 'bc', version=PolicyVersion(2))

    other = reach_trainer()  # a fresh one: no moments yet, the target critic the online one
    logged = []
    assert other.resume_from(tmp_path / 'bc', logged.append) is False
    assert 'does not fit' in logged[0] and 'critic_optimizer' in logged[0]
    for changed, message in (({'num_layers': 4}, 'the actor optimizer holds'),
                             ({'hidden_dim': 64}, 'exp_avg of parameter 0 has shape')):
        other_policy = reach_trainer(LowDimFlowPolicy(LowDimFlowConfig(
            **{'state_dim': 1, 'action_dim': 1, 'horizon': 4, 'hidden_dim': 32,
               'feature_dim': 16, **changed})))
        with pytest.raises(ValueError, match=message):
            other_policy.restore_training_state(tmp_path / 'habc')
    (tmp_path / 'broken').mkdir()
    (tmp_path / 'broken' / 'trainer_state.pt').write_bytes(b'not a torch file')
    with pytest.raises(ValueError, match='cannot be read'):
        other.restore_training_state(tmp_path / 'broken')
    assert other.restore_training_state(tmp_path / 'nothing') is False
    assert other.algorithm.actor_optimizer.state_dict()['state'] == {}
    assert other.algorithm.critic_optimizer.state_dict()['state'] == {}
    for target, online in zip(other.algorithm.target_critic.state_dict().values(),
                              other.algorithm.critic.state_dict().values(), strict=True):
        assert torch.equal(target, online)


def test_a_resumed_run_keeps_its_own_learning_rate(tmp_path):
    first = reach_trainer(steps=3)
    first.fit()
    first.save_checkpoint(tmp_path / 'v2', version=PolicyVersion(2))
    slower = reach_trainer(load_policy(tmp_path / 'v2'), actor_lr=1e-5)
    assert slower.resume_from(tmp_path / 'v2', lambda line: None)
    group = slower.algorithm.actor_optimizer.param_groups[0]
    assert group['lr'] == 1e-5  # the saved state holds 3e-4: only its moments come back
    moments = slower.algorithm.actor_optimizer.state_dict()['state']
    saved = first.algorithm.actor_optimizer.state_dict()['state']
    assert torch.equal(moments[0]['exp_avg'], saved[0]['exp_avg'])
