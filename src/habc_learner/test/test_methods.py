"""Method-level weights by hand: the gate inside the algorithm, warm-up, IR, Recap, AWR.

The critics here are read-outs of the state (z_v = state[0], V_e = state[1]), so each
sample's critic values are chosen by the test and every weight can be worked out by hand.
"""

from dataclasses import dataclass
import math

import numpy as np
import pytest
import torch
from torch import nn

from habc_episodes.episode import Episode
from habc_episodes.vocabulary import EpisodeKind
from habc_learner.methods import Algorithm, MethodConfig
from habc_policy.models.base import Policy


@dataclass(frozen=True)
class ReadoutConfig:
    horizon: int = 1
    action_dim: int = 1


class StatePolicy(Policy):
    """Features = the state itself; a trivial loss (its parameters only exist to optimise)."""

    type_name = 'test_state'

    def __init__(self) -> None:
        super().__init__(ReadoutConfig())
        self.scale = nn.Parameter(torch.ones(()))

    @property
    def feature_dim(self) -> int:
        return 2

    def encode(self, batch):
        return batch['state'].float()

    def per_sample_loss(self, batch, features=None):
        return (self.scale * batch['actions'].float()).pow(2).sum(dim=(1, 2))

    def sample_chunks(self, batch, generator=None):
        return torch.zeros(len(batch['state']), 1, 1)


class Readout(nn.Module):
    """z_v = state[0], V_e = state[1] (dual head) or V = state[1] (value heads)."""

    def __init__(self, dual: bool) -> None:
        super().__init__()
        self.dual = dual

    def forward(self, features):
        return (features[:, 0], features[:, 1]) if self.dual else features[:, 1]

    def expected_value(self, logits):
        return logits

    def loss(self, logits, target):
        return (logits - target) ** 2


def episode(states, controllers, outcome, kind=EpisodeKind.ROLLOUT):
    n = len(states)
    return Episode(observations={'state': np.asarray(states, dtype=np.float32)},
                   actions=np.ones((n, 1), dtype=np.float32), controllers=controllers,
                   outcome=outcome, kind=kind)


def weights(method, episodes, step, **config):
    config = MethodConfig(method=method, horizon=1, min_human_steps=1, **config)
    buffer = config.make_buffer()
    for e in episodes:
        buffer.add(e)
    algorithm = Algorithm(StatePolicy(), config)
    dual = method.startswith('habc')
    algorithm.critic = algorithm.target_critic = Readout(dual)
    table = buffer.table
    batch = buffer.batch(np.arange(len(buffer)))
    batch['masks'] = {'actor': torch.as_tensor(algorithm.actor_mask(table)),
                      'critic': torch.as_tensor(algorithm.critic_mask(table))}
    stats = {}
    w, _ = algorithm.compute_weights(batch, algorithm.policy.encode(batch['obs']), step, stats)
    return w.tolist(), algorithm, stats


LN3 = math.log(3.0)
# z_v: 0 -> ln 3 -> ln 3 ; V_e: -3 -> -2 -> -1 ; success at the last step.
SUCCESS = episode([[0.0, -3.0], [LN3, -2.0], [LN3, -1.0]], ['policy'] * 3, 'success')


def test_habc_gate_inside_the_algorithm_by_hand():
    # t0: A_v = ln 3, A_e = -1 + (-2) - (-3) = 0, p_v = 0.5 -> g = 1 + tanh(ln(3)/2) = 1.5
    # t1: A_v = 0, A_e = -1 + (-1) - (-2) = 0 -> g = 1
    # t2: last step of a success: A_v = 0, V_e(next) = 0 -> A_e = -1 + 0 + 1 = 0 -> g = 1
    # Eq. 8: mean 3.5/3 -> w = g * 3/3.5
    w, _, stats = weights('habc', [SUCCESS], step=1000, warmup_steps=10)
    assert w == pytest.approx([1.5 * 3 / 3.5, 3 / 3.5, 3 / 3.5])
    assert stats['weights/mean_g_rollout_success'] == pytest.approx(3.5 / 3)


def test_warmup_keeps_gate_at_one():
    w, _, _ = weights('habc', [SUCCESS], step=9, warmup_steps=10)
    assert w == pytest.approx([1.0, 1.0, 1.0])


def test_failures_get_zero_and_shift_the_mean():
    failure = episode([[0.0, -5.0], [0.0, -5.0]], ['policy'] * 2, 'failure')
    w, _, _ = weights('habc', [SUCCESS, failure], step=1000, warmup_steps=0)
    # successes 1.5, 1, 1 and failures 0, 0: c = 3.5 / 5
    assert w == pytest.approx([1.5 / 0.7, 1 / 0.7, 1 / 0.7, 0.0, 0.0])


def test_habc_v_drops_the_efficiency_advantage():
    # Same data; with A_e := 0 the weights only change where A_v does (t0 unchanged here).
    ep = episode([[0.0, -3.0], [0.0, -9.0], [0.0, -1.0]], ['policy'] * 3, 'success')
    w_v, _, _ = weights('habc_v', [ep], step=1000, warmup_steps=0)
    assert w_v == pytest.approx([1.0, 1.0, 1.0])
    w, _, _ = weights('habc', [ep], step=1000, warmup_steps=0)
    assert w[0] < w[1]  # A_e(t0) = -1 - 9 + 3 = -7, A_e(t1) = -1 - 1 + 9 = 7


def test_ir_switch_weights_human_windows_with_the_gate():
    # P H H P, success. Human windows t1, t2; t3 is the labelled suffix; t0 excluded.
    states = [[0.0, -4.0], [0.0, -3.0], [LN3 * 2, -2.0], [LN3 * 2, -1.0]]
    ep = episode(states, ['policy', 'human', 'human', 'policy'], 'success')
    before, _, _ = weights('habc_ir', [ep], step=50, warmup_steps=0, ir_start_step=100)
    after, _, _ = weights('habc_ir', [ep], step=100, warmup_steps=0, ir_start_step=100)
    plain, _, _ = weights('habc', [ep], step=100, warmup_steps=0)
    assert before == plain
    # before IR: human windows weight 1; t3 (last step of success): g = 1 -> all 1
    assert before == pytest.approx([0.0, 1.0, 1.0, 1.0])
    # after IR, t1: A_v = 2 ln 3, A_e = 0, p_v = 0.5 -> g = 1 + tanh(ln 3) = 1.8;
    # t2: A_v = 0, A_e = -1 + (-1) - (-2) = 0 -> g = 1; t3: 1. Mean 3.8/3.
    assert after == pytest.approx([0.0, 1.8 * 3 / 3.8, 3 / 3.8, 3 / 3.8])


def test_naive_credit_gates_human_windows_of_a_success_and_zeroes_those_of_a_failure():
    ep = episode([[0.0, -2.0], [0.0, -1.0]], ['human', 'policy'], 'failure')
    w, _, _ = weights('habc_naive', [ep, SUCCESS], step=1000, warmup_steps=0)
    assert w[:2] == [0.0, 0.0]
    w_aware, _, _ = weights('habc', [ep, SUCCESS], step=1000, warmup_steps=0)
    assert w_aware[0] > 0.0  # intervention-aware: the human window is imitation data


def test_awr_weights_by_hand():
    # rewards -1 per step, gamma 0.99, V = -3, -2, -1:
    # A0 = -1 + 0.99 * (-2) + 3 = 0.02 ; A1 = -1 + 0.99 * (-1) + 2 = 0.01 ; A2 = -1 + 1 = 0
    w, _, _ = weights('awr', [SUCCESS], step=1000, warmup_steps=0, awr_beta=0.01,
                      awr_max_weight=5.0)
    # exp(A / beta) = e^2 (clipped to 5), e^1, e^0
    raw = [5.0, math.exp(1.0), 1.0]
    mean = sum(raw) / 3
    assert w == pytest.approx([r / mean for r in raw])


def test_recap_hard_threshold_on_the_td_residual():
    _, algorithm, _ = weights('imit_recap', [SUCCESS], step=1000, warmup_steps=0)
    algorithm.recap_threshold = 0.015  # residuals 0.02, 0.01, 0 -> keep t0 only
    buffer = algorithm.config.make_buffer()
    buffer.add(SUCCESS)
    batch = buffer.batch(np.arange(3))
    batch['masks'] = {'actor': torch.ones(3, dtype=torch.bool),
                      'critic': torch.ones(3, dtype=torch.bool)}
    w, _ = algorithm.compute_weights(batch, batch['obs']['state'].float(), 1000, {})
    assert w.tolist() == pytest.approx([3.0, 0.0, 0.0])


def test_recap_threshold_is_a_quantile_of_held_out_residuals():
    episodes = [episode([[0.0, -float(k)], [0.0, -1.0 * k + 0.5 * i], [0.0, 0.0]],
                        ['policy'] * 3, 'success') for i, k in enumerate(range(2, 8))]
    _, algorithm, _ = weights('imit_recap', episodes, step=0, recap_holdout_fraction=0.5,
                              recap_keep_fraction=0.75, recap_threshold_every=1)
    buffer = algorithm.config.make_buffer()
    for e in episodes:
        buffer.add(e)
    algorithm.prepare(buffer, np.random.default_rng(0))
    assert len(algorithm._holdout_episodes) == 3
    algorithm.refresh(buffer, step=0)
    table = buffer.table
    held = np.isin(table['episode'], list(algorithm._holdout_episodes))
    v = buffer.batch(np.arange(len(buffer)))['obs']['state'][:, 1].numpy()
    next_v = v[table['next_index']]
    residual = table['reward'] + 0.99 * (~table['is_last']) * next_v - v
    assert algorithm.recap_threshold == pytest.approx(np.quantile(residual[held], 0.25),
                                                      rel=1e-5)
    # Held-out episodes never train the value head.
    assert not (algorithm.critic_mask(table) & held).any()


def test_method_config_validates_itself():
    with pytest.raises(ValueError, match="unknown method 'habc2'"):
        MethodConfig(method='habc2')
    with pytest.raises(ValueError, match='gamma must be in'):
        MethodConfig(gamma=0.0)
    with pytest.raises(ValueError, match='min_human_steps must be in'):
        MethodConfig(horizon=4, min_human_steps=5)
    assert MethodConfig(method='habc_naive').credit_config().naive


class ShiftedReadout(Readout):
    """A lagging copy: its z_v is the readout's minus `lag` (V_e unchanged)."""

    def __init__(self, lag: float) -> None:
        super().__init__(dual=True)
        self.lag = lag

    def forward(self, features):
        z_v, v_e = super().forward(features)
        return z_v - self.lag, v_e


def _gates(network, lag):
    config = MethodConfig(method='habc', horizon=1, min_human_steps=1, warmup_steps=0,
                          advantage_network=network)
    buffer = config.make_buffer()
    buffer.add(SUCCESS)
    algorithm = Algorithm(StatePolicy(), config)
    algorithm.critic, algorithm.target_critic = Readout(True), ShiftedReadout(lag)
    return algorithm.gate_report(buffer, np.random.default_rng(0))['rollout_success']


def test_both_terms_of_an_advantage_come_from_one_network():
    # Online z_v: 0, ln 3, ln 3; the target lags by ln 3. V_e gives A_e = 0 everywhere.
    # One network (either): A_v(t0) = ln 3, so g_t0 = 1 + tanh((1 - p_v) ln 3) with p_v its
    # own z_v(s_0): online 0.5 -> 1.5; target sigmoid(-ln 3) = 0.25 -> 1 + tanh(0.75 ln 3).
    online = _gates('online', LN3)
    target = _gates('target', LN3)
    assert online == pytest.approx([1.5, 1.0, 1.0])
    assert target == pytest.approx([1 + math.tanh(0.75 * LN3), 1.0, 1.0])
    # Mixed (online at s_t, target at s_t+1) sees the lag as a fall of viability at t1:
    # A_v(t1) = (ln 3 - ln 3) - ln 3 = -ln 3, p_v = 0.75 -> g = 1 - tanh(0.25 ln 3).
    mixed = _gates('mixed', LN3)
    assert mixed == pytest.approx([1.0, 1 - math.tanh(0.25 * LN3), 1.0])


def test_gate_report_covers_each_data_source():
    failure = episode([[0.0, -5.0], [0.0, -5.0]], ['policy'] * 2, 'failure')
    demo = episode([[0.0, -1.0]], ['human'], 'success', kind=EpisodeKind.DEMO)
    config = MethodConfig(method='habc', horizon=1, min_human_steps=1, warmup_steps=0)
    buffer = config.make_buffer()
    for e in (SUCCESS, failure, demo):
        buffer.add(e)
    algorithm = Algorithm(StatePolicy(), config)
    algorithm.critic = algorithm.target_critic = Readout(True)
    report = algorithm.gate_report(buffer, np.random.default_rng(0))
    assert {k: len(v) for k, v in report.items()} == {
        'rollout_success': 3, 'rollout_failure': 2, 'human': 0, 'demo': 1}
    assert report['rollout_success'] == pytest.approx([1.5, 1.0, 1.0])
    assert Algorithm(StatePolicy(), MethodConfig(method='awr', horizon=1)).gate_report(
        buffer, np.random.default_rng(0)) == {}


def test_to_moves_the_critic_and_its_target_copy():
    # A learner on a GPU evaluates s_t+1 with the target copy: left on the CPU, every
    # advantage would fail with a device mismatch. 'meta' stands in for another device.
    algorithm = Algorithm(StatePolicy(), MethodConfig(method='habc', horizon=1))
    assert algorithm.to('meta') is algorithm
    for critic in (algorithm.critic, algorithm.target_critic):
        assert {p.device.type for p in critic.parameters()} == {'meta'}
