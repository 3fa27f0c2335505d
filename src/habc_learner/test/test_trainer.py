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
