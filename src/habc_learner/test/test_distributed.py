"""Data-parallel training: the global-batch normalisers by hand, and K=2 against K=1.

(a) pure tests of the HABC normalisers with a fake two-shard sum, of the shard sampler and
    of the sharded flow-matching noise;
(b) short rounds under torchrun (real gloo processes) with 1 and 2 processes: the
    checkpoints load and hold the same weights up to float32 reduction order;
(c) `habc train --nproc 2` on real bags.
"""

import json
from pathlib import Path

from bag_fixtures import write_episode
import numpy as np
import pytest
from safetensors.torch import load_file
import torch

from habc_learner.distributed import ShardedBatches
from habc_learner.habc import (
    masked_mean,
    normalize_weights,
    ONE_SHARD,
    ShardSum,
    weighted_bc_loss,
)
from habc_learner.round_worker import run_round
from habc_policy.models.base import load_policy
from habc_policy.models.flow_matching import flow_matching_loss, sharded_noise, ShardedNoise

# Guards against a hung process group, not timing checks: a round here takes seconds.
ROUND_TIMEOUT_S = 240
# K=2 against K=1: the runs differ only in the order of float32 sums (two shard sums, then
# their sum; gradients averaged over two processes) and in batch-size-dependent kernel
# blocking, ~1e-7 relative. Adam passes such errors on at their relative size, except for
# parameters whose gradient is analytically zero and numerically rounding noise (a
# keypoint map's bias under its spatial softmax, attention's key bias): Adam normalises the
# noise into steps. Measured after 8 steps: max |dW| / max |W| 2e-5 (small VLA, those
# biases), 5e-8 (low-dim); 1e-4 leaves a margin. Shard-local normalisers or noise, or other
# batches, move the weights by ~lr = 3e-4 per step after warm-up: above the bound.
RELATIVE_TOLERANCE = 1e-4


# (a) the normalisers by hand ----------------------------------------------------------------

class TwoShards(ShardSum):
    """A fake sum over two shards: this shard's statistic plus the other's, given in order."""

    shards = 2

    def __init__(self, other: list[torch.Tensor] | None = None) -> None:
        self.other = list(other or [])
        self.seen: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return x + self.other.pop(0) if self.other else x


def on_two_shards(fn, first: tuple, second: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Run fn(*args, reduce) on both shards, each seeing the other's statistics."""
    record_a, record_b = TwoShards(), TwoShards()
    fn(*first, record_a)
    fn(*second, record_b)
    return fn(*first, TwoShards(record_b.seen)), fn(*second, TwoShards(record_a.seen))


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values)


def test_eq8_c_is_the_global_mean_over_valid_rollout_samples():
    # Shard A: rollout 1, 2 and an SFT sample; shard B: rollout 3, an invalid 100.
    # c = mean(1, 2, 3) = 2 over both shards (shard A alone would have c = 1.5).
    a = (t(1.0, 2.0, 7.0), torch.tensor([False, False, True]), torch.tensor([True] * 3), 1e-6)
    b = (t(3.0, 100.0), torch.tensor([False, False]), torch.tensor([True, False]), 1e-6)
    w_a, w_b = on_two_shards(normalize_weights, a, b)
    assert w_a.tolist() == pytest.approx([0.5, 1.0, 1.0])
    assert w_b.tolist() == pytest.approx([1.5, 0.0])
    # A shard without rollout samples still divides by the global c (and takes part).
    a = (t(5.0), torch.tensor([True]), torch.tensor([True]), 1e-6)
    b = (t(4.0, 2.0), torch.tensor([False, False]), torch.tensor([True, True]), 1e-6)
    w_a, w_b = on_two_shards(normalize_weights, a, b)
    assert w_a.tolist() == [1.0] and w_b.tolist() == pytest.approx([4 / 3, 2 / 3])


def test_eq8_without_rollout_samples_anywhere_keeps_c_1():
    a = (t(5.0), torch.tensor([True]), torch.tensor([True]), 1e-6)
    b = (t(4.0), torch.tensor([False]), torch.tensor([False]), 1e-6)
    w_a, w_b = on_two_shards(normalize_weights, a, b)
    assert w_a.tolist() == [1.0] and w_b.tolist() == [0.0]


def test_eq1_shard_losses_average_to_the_global_batch_loss_and_gradient():
    # Global batch: l = (1, 2, 3, 4), w = (0, 1, 2, 1): L = (0 + 2 + 6 + 4) / 4 = 3.
    l_a = t(1.0, 2.0).requires_grad_()
    l_b = t(3.0, 4.0).requires_grad_()
    loss_a, loss_b = on_two_shards(weighted_bc_loss, (l_a, t(0.0, 1.0)), (l_b, t(2.0, 1.0)))
    # Each shard: 2 * (its sum) / 4; DDP averages the shards' gradients (divides by 2).
    assert loss_a.item() == pytest.approx(2 * 2 / 4) and loss_b.item() == pytest.approx(2 * 10 / 4)
    assert (loss_a.item() + loss_b.item()) / 2 == pytest.approx(3.0)
    ((loss_a + loss_b) / 2).backward()
    # dL/dl_i = w_i / B of the global batch.
    assert l_a.grad.tolist() + l_b.grad.tolist() == pytest.approx([0.0, 0.25, 0.5, 0.25])
    one = weighted_bc_loss(t(1.0, 2.0, 3.0, 4.0), t(0.0, 1.0, 2.0, 1.0), ONE_SHARD)
    assert one.item() == pytest.approx(3.0)


def test_masked_mean_divides_by_the_global_count():
    # Values where the mask is true: 2 on shard A; 4, 6 on shard B -> mean 4.
    v_a = t(2.0, 9.0).requires_grad_()
    v_b = t(4.0, 6.0).requires_grad_()
    mask_a, mask_b = torch.tensor([True, False]), torch.tensor([True, True])
    m_a, m_b = on_two_shards(masked_mean, (v_a, mask_a), (v_b, mask_b))
    assert (m_a.item() + m_b.item()) / 2 == pytest.approx(4.0)
    ((m_a + m_b) / 2).backward()
    assert v_a.grad.tolist() + v_b.grad.tolist() == pytest.approx([1 / 3, 0.0, 1 / 3, 1 / 3])
    # An empty mask everywhere: 0, with a gradient path.
    e_a, e_b = on_two_shards(masked_mean, (t(1.0), torch.tensor([False])),
                             (t(2.0), torch.tensor([False])))
    assert e_a.item() == 0.0 and e_b.item() == 0.0


def test_shards_of_each_batch_are_the_one_process_batch():
    pool = np.arange(100, 137)  # 37 samples: a pass holds 4 batches of 8, 5 left over
    one = ShardedBatches(pool, 8, seed=3)
    shards = [ShardedBatches(pool, 8, seed=3, rank=r, world_size=2) for r in range(2)]
    seen = []
    for _ in range(9):  # over two passes
        batch = one.next()
        parts = [s.next() for s in shards]
        assert [len(p) for p in parts] == [4, 4]
        # Shard r holds the one-process batch's rows r, r + 2, ...
        assert batch[0::2].tolist() == parts[0].tolist()
        assert batch[1::2].tolist() == parts[1].tolist()
        seen.append(batch)
    first_pass = np.concatenate(seen[:4])
    assert len(set(first_pass.tolist())) == 32  # no repeats within a pass
    assert seen[4].tolist() != seen[0].tolist()  # the next pass reshuffles
    with pytest.raises(ValueError, match='multiple of the number of processes'):
        ShardedBatches(pool, 9, seed=0, rank=0, world_size=2)
    # A pool smaller than the batch is repeated (3 x 3 = 9 items, one batch of 8 a pass).
    small = ShardedBatches(np.arange(3), 8, seed=0)
    counts = np.bincount(small.next(), minlength=3)
    assert counts.sum() == 8 and counts.min() >= 2


def test_sharded_flow_noise_is_the_one_process_noise_of_each_sample():
    actions = torch.randn(6, 3, 2)
    mask = torch.ones(6, 3, dtype=torch.bool)

    def velocity(x, tau):
        return x * tau[:, None, None]

    def loss(rows, shard, shards):
        generator = torch.Generator().manual_seed(11)
        with sharded_noise(ShardedNoise(generator, shard, shards)):
            return flow_matching_loss(velocity, actions[rows], mask[rows])

    whole = loss(slice(None), 0, 1)
    halves = [loss(slice(r, None, 2), r, 2) for r in range(2)]
    torch.testing.assert_close(halves[0], whole[0::2])
    torch.testing.assert_close(halves[1], whole[1::2])
    # Outside the block the global stream is used as before.
    torch.manual_seed(0)
    plain = flow_matching_loss(velocity, actions, mask)
    torch.manual_seed(0)
    torch.testing.assert_close(flow_matching_loss(velocity, actions, mask), plain)


# (b) K = 2 against K = 1 under torchrun -----------------------------------------------------

POLICY, HUMAN = 0, 1


@pytest.fixture(scope='module')
def round_data(tmp_path_factory):
    """Bags of three episodes (one rescued by a human), one demonstration, two checkpoints."""
    from habc_episodes.bag_format import habc_typestore
    from habc_policy.models.lowdim import LowDimFlowConfig, LowDimFlowPolicy
    from habc_policy.models.vla import SmallVLA, SmallVLAConfig

    root = tmp_path_factory.mktemp('round')
    store = habc_typestore()
    sources = {'ok': [POLICY] * 24, 'rescued': [POLICY] * 8 + [HUMAN] * 10 + [POLICY] * 6,
               'failed': [POLICY] * 20}
    outcomes = {'ok': 'success', 'rescued': 'success', 'failed': 'failure'}
    episodes = []
    for name, steps in sources.items():
        bag = write_episode(root / 'bags' / name, store, steps, episode_id=name)
        episodes.append({'bag_path': str(bag), 'outcome': outcomes[name], 'episode_id': name,
                         'instruction': 'transfer the cube'})
    write_episode(root / 'demos' / 'demo1', store, [HUMAN] * 16, episode_id='demo1')
    torch.manual_seed(0)
    # With the random image shift and state noise on: each sample gets the same draws in
    # either run (flow_matching.ShardedNoise), as it gets the same flow noise.
    vla = SmallVLA(SmallVLAConfig(state_dim=14, action_dim=14, horizon=10, num_views=1,
                                  image_size=8, hidden_dim=32, num_layers=1,
                                  cnn_channels=[16, 32], token_grid=2, keypoints=4,
                                  augment_shift_px=2, state_noise_std=0.05,
                                  action_head='flow'))
    lowdim = LowDimFlowPolicy(LowDimFlowConfig(state_dim=14, action_dim=14, horizon=10,
                                               feature_dim=16, hidden_dim=32, num_layers=2))
    checkpoints = {}
    for name, policy in (('small_vla', vla), ('lowdim_flow', lowdim)):
        policy.version = '1'
        policy.save(root / 'init' / name)
        checkpoints[name] = root / 'init' / name
    return {'root': root, 'episodes': episodes, 'demos': str(root / 'demos'),
            'checkpoints': checkpoints}


def round_spec(data: dict, policy: str, output: Path, **train) -> dict:
    return {'init_checkpoint': str(data['checkpoints'][policy]), 'episodes': data['episodes'],
            'demos_dir': data['demos'], 'cameras': [], 'image_size': 0,
            'method': {'method': 'habc', 'horizon': 10, 'warmup_steps': 3},
            'train': {'steps': 8, 'batch_size': 16, 'seed': 5, 'log_every': 1,
                      'normalize_from_data': False, **train},
            'start_step': 0, 'output': str(output), 'version': '2'}


def max_relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    scale = max(float(v.abs().max()) for v in a.values() if v.numel())
    return max(float((a[k] - b[k]).abs().max()) for k in a if a[k].numel()) / scale


@pytest.mark.parametrize('policy', ['small_vla', 'lowdim_flow'])
def test_two_processes_train_what_one_does(round_data, tmp_path, policy):
    lines: list[str] = []
    results, weights, critics = {}, {}, {}
    for k in (1, 2):
        out = tmp_path / f'k{k}' / 'checkpoint'
        results[k] = run_round(round_spec(round_data, policy, out), k, tmp_path / f'k{k}',
                               lines.append)
        loaded = load_policy(out)
        assert loaded.version == '2' and loaded.type_name == policy
        weights[k] = {name: p.detach() for name, p in loaded.state_dict().items()}
        critics[k] = load_file(str(out / 'critic.safetensors'))
    assert results[2]['world_size'] == 2 and results[1]['world_size'] == 1
    assert results[1]['step'] == results[2]['step'] == 8
    assert results[1]['samples'] == results[2]['samples'] == 24 + 24 + 20 + 16
    drift = {'policy': max_relative_difference(weights[1], weights[2]),
             'critic': max_relative_difference(critics[1], critics[2])}
    print(f'{policy}: K=1 vs K=2 max relative weight difference {drift}')
    assert drift['policy'] < RELATIVE_TOLERANCE and drift['critic'] < RELATIVE_TOLERANCE
    # The losses logged at every step are the global batch's: the same trajectory.
    assert len(results[1]['history']) == len(results[2]['history']) == 8
    for one, two in zip(results[1]['history'], results[2]['history'], strict=True):
        for key in ('losses/actor', 'losses/viability', 'losses/efficiency'):
            assert two[key] == pytest.approx(one[key], rel=1e-5), (one['step'], key)
    # And the training did something: the weights moved from the start.
    start = {n: p.detach() for n, p in load_policy(
        round_data['checkpoints'][policy]).state_dict().items()}
    assert max_relative_difference(start, weights[1]) > 10 * RELATIVE_TOLERANCE


def test_a_failed_round_raises_with_its_last_output(round_data, tmp_path):
    spec = round_spec(round_data, 'lowdim_flow', tmp_path / 'out', batch_size=15)
    with pytest.raises(RuntimeError, match='multiple of the 2 processes'):
        run_round(spec, 2, tmp_path / 'work', lambda line: None)
    with pytest.raises(ValueError, match='unknown fields'):
        run_round({**spec, 'train': {'stepz': 3}}, 2, tmp_path / 'work', lambda line: None)
    assert json.loads((tmp_path / 'work' / 'round_spec.json').read_text())['version'] == '2'


# (c) habc train --nproc 2 --------------------------------------------------------------------

def parse_train(argv: list[str]):
    from habc.cli import build_parser
    return build_parser().parse_args(['train', *argv])


def test_the_relaunched_command_has_the_same_arguments(tmp_path):
    from habc_learner.train_cli import _arguments

    args = parse_train(['--bags', 'a', 'b', '--method', 'habc', '--out', str(tmp_path),
                        '--nproc', '2', '--warmup-steps', '0', '--index', 'x.sqlite',
                        '--index', 'y.sqlite', '--policy-config', '{"hidden_dim": 64}',
                        '--quiet', '--version', '4:offline'])
    again = parse_train(_arguments(args))
    # All but --nproc, which torchrun's processes need not (and its parser cannot) see.
    assert again.nproc == 1
    assert {k: v for k, v in vars(again).items() if k not in ('run', 'nproc')} == {
        k: v for k, v in vars(args).items() if k not in ('run', 'nproc')}
    assert again.warmup_steps == 0 and again.index == ['x.sqlite', 'y.sqlite']


def test_habc_train_nproc_2_writes_a_loadable_checkpoint(tmp_path, typestore, init_checkpoint,
                                                         capfd):
    bags = tmp_path / 'bags'
    for name, sources, outcome in (('ok', [POLICY] * 20, 'success'),
                                   ('rescued', [POLICY] * 6 + [HUMAN] * 8 + [POLICY] * 6,
                                    'success'),
                                   ('failed', [POLICY] * 16, 'failure')):
        write_episode(bags / name, typestore, sources, episode_id=name)
        (bags / name / 'outcome.yaml').write_text(f'outcome: {outcome}\n')
    out = tmp_path / 'out'
    argv = ['--bags', str(bags), '--method', 'habc', '--out', str(out), '--steps', '4',
            '--batch-size', '8', '--init', str(init_checkpoint), '--quiet', '--nproc', '2',
            '--device', 'cpu', '--load-workers', '1']
    args = parse_train(argv)
    assert args.run(args) == 0
    loaded = load_policy(out / 'checkpoint')
    assert loaded.version == '1:offline'
    assert (out / 'checkpoint' / 'critic.safetensors').is_file()
    report = json.loads((out / 'report.json').read_text())
    assert report['training']['processes'] == 2 and report['history'][-1]['step'] == 4
    printed = capfd.readouterr().out
    assert printed.count('checkpoint: ') == 1  # rank 0 alone reports
    # A batch the processes cannot share equally is refused before anything starts.
    odd = parse_train([*argv[:-6], '--batch-size', '7', '--nproc', '2', '--force'])
    assert odd.run(odd) == 2
