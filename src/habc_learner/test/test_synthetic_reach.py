"""What the paper claims, on a task small enough to check: HABC prefers fast successes."""

import functools

import numpy as np
import pytest
import torch

from habc_episodes.vocabulary import EpisodeKind
from habc_learner.data import WeightCode
from habc_learner.methods import MethodConfig
from habc_learner.synthetic import reach_dataset
from habc_learner.trainer import seed_everything, TrainConfig, Trainer
from habc_policy.models.lowdim import LowDimFlowConfig, LowDimFlowPolicy


def train(method: str, episodes, steps: int, seed: int = 1):
    config = MethodConfig(method=method, horizon=4, min_human_steps=1, warmup_steps=50)
    buffer = config.make_buffer()
    for episode in episodes:
        buffer.add(episode)
    seed_everything(seed)  # the policy's initial weights, too, come from the seed
    policy = LowDimFlowPolicy(LowDimFlowConfig(state_dim=1, action_dim=1, horizon=4,
                                               feature_dim=32, hidden_dim=64, num_layers=2))
    trainer = Trainer(policy, buffer, config, TrainConfig(steps=steps, batch_size=128, seed=seed),
                      progress=False)
    trainer.fit()
    return trainer


@functools.cache
def reach_weights(method: str, seed: int) -> dict[str, float]:
    """Train `method` for 800 steps on the reach data of `seed`; weights per strategy."""
    episodes = reach_dataset({'fast': 15, 'slow': 15, 'fail': 15}, seed=seed)
    return weights_by_strategy(train(method, episodes, steps=800, seed=seed))


def weights_by_strategy(trainer) -> dict[str, float]:
    buffer, algorithm = trainer.buffer, trainer.algorithm
    table = buffer.table
    indices = np.arange(len(buffer))
    batch = buffer.batch(indices)
    batch['masks'] = {'actor': torch.as_tensor(algorithm.actor_mask(table)),
                      'critic': torch.as_tensor(algorithm.critic_mask(table))}
    with torch.no_grad():
        features = algorithm.policy.encode(batch['obs'])
        w, _ = algorithm.compute_weights(batch, features, step=10_000, stats={})
    strategy = np.array([buffer.episodes[e].episode_id.split('-')[0]
                         for e in table['episode']])
    # Compare transitions away from the goal and the time limit, where both strategies act.
    early = table['step'] < 8
    return {name: float(w.numpy()[(strategy == name) & early].mean())
            for name in ('fast', 'slow', 'fail')}


# Over seeds 0-4 the fast/slow weight ratio ranged 1.16-2.78 for HABC (1.04-1.53 for
# HABC-V); the test checks the direction with a margin, on two seeds.
@pytest.mark.parametrize('seed', [0, 1])
def test_habc_weights_fast_above_slow_and_failures_zero_sft_uniform(seed):
    habc = reach_weights('habc', seed)
    assert habc['fail'] == 0.0
    assert habc['fast'] > 1.1 * habc['slow'], habc

    demos = reach_dataset({'fast': 15, 'slow': 15, 'fail': 15}, seed=0,
                          kind=EpisodeKind.DEMO)
    sft = weights_by_strategy(train('sft', demos, steps=5))
    assert sft == {'fast': 1.0, 'slow': 1.0, 'fail': 1.0}


def test_habc_v_cannot_tell_fast_from_slow_as_well_as_habc():
    habc_v = reach_weights('habc_v', 0)
    habc = reach_weights('habc', 0)
    assert habc_v['fail'] == 0.0
    ratio_v = habc_v['fast'] / habc_v['slow']
    ratio = habc['fast'] / habc['slow']
    print(f'habc {habc}\nhabc_v {habc_v}')
    assert ratio > ratio_v, (habc, habc_v)


def test_every_method_trains_on_mixed_data():
    episodes = reach_dataset({'fast': 4, 'slow': 4, 'fail': 4, 'rescued': 4}, seed=3)
    episodes += reach_dataset({'fast': 4}, seed=4, kind=EpisodeKind.DEMO)
    for method in ('sft', 'imit_dagger', 'imit_recap', 'habc_v', 'habc', 'habc_ir',
                   'habc_naive', 'awr'):
        trainer = train(method, episodes, steps=20)
        last = trainer.history[-1]
        assert np.isfinite(last['losses/actor']), method
        table = trainer.buffer.table
        mask = trainer.algorithm.actor_mask(table)
        if method == 'sft':
            assert mask.sum() == table['is_sft'].sum()
        if method == 'imit_dagger':
            assert not (mask & ~table['is_sft'] & ~table['is_human']).any()
        if method in ('habc', 'habc_ir'):
            assert not (mask & (table['weight_code'] == WeightCode.EXCLUDED)
                        & ~table['is_sft']).any()
