"""`habc bench`: statistics by hand, the schedule, method specs, and `--quick` end to end.

The end-to-end runs check structure, not success: a quick run's budgets are far too small
for a policy to learn. Two runs of one command must give the same numbers.
"""

import json
import math
import subprocess
import sys

import pytest

from habc_episodes.stats import wilson_interval
from habc_sim.bench import (
    BenchProfile,
    EVAL_SEED_BASE,
    parse_method,
    PROFILES,
    seed_interval,
    summary_table,
)


def test_wilson_interval_by_hand():
    # 8 of 10: centre (0.8 + 1.96^2/20) / (1 + 1.96^2/10) = 0.7167, half-width 0.2228
    low, high = wilson_interval(8, 10)
    assert math.isclose(low, 0.4902, abs_tol=1e-3) and math.isclose(high, 0.9433, abs_tol=1e-3)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0
    # 6 of 6 rounded to 0.9999999999999999 and broke `habc demo`'s error bars.
    assert all(wilson_interval(n, n)[1] == 1.0 and wilson_interval(0, n)[0] == 0.0
               for n in range(1, 200))


def test_seed_interval_by_hand():
    # Seeds 0.4, 0.6, 0.8: mean 0.6, sd 0.2, t(0.975, 2) = 4.3027 -> half 0.4968
    mean, low, high = seed_interval([0.4, 0.6, 0.8])
    assert math.isclose(mean, 0.6) and math.isclose(low, 0.6 - 0.4968, abs_tol=1e-3)
    assert high == 1.0  # clipped
    assert seed_interval([0.3]) == (0.3, 0.0, 1.0)


def test_schedule_evaluates_sft_and_each_stage_end():
    p = BenchProfile(name='x', stage1_rounds=5, stage2_rounds=2)
    assert p.rounds == 7 and p.eval_rounds() == [0, 5, 7]
    assert BenchProfile(name='x', stage1_rounds=4, stage2_rounds=2,
                        eval_every=2).eval_rounds() == [0, 2, 4, 6]
    full = PROFILES['full']
    assert full.stage1_rounds >= 5 and full.rollouts_per_round >= 40
    assert full.stage2_rounds >= 2 and full.warmup_steps == 500


def test_method_specs_carry_ablation_overrides():
    p = PROFILES['full']
    name, q = parse_method('habc@advantage_network=mixed,advantage_stride=10', p)
    assert name == 'habc' and q.advantage_network == 'mixed' and q.advantage_stride == 10
    _, clean = parse_method('habc@operator=clean', p)
    assert clean.operator_noise == 0.0 and clean.operator_slowdown == 1.0
    assert 0.0 < p.operator_noise_for('insertion') <= p.noise_for('insertion')
    assert p.operator_slowdown > 1.0  # slower than the policy
    with pytest.raises(ValueError, match='unknown method'):
        parse_method('habc2', p)
    with pytest.raises(ValueError, match='expected key=value'):
        parse_method('habc@horizon=3', p)
    with pytest.raises(ValueError, match='bad value'):
        parse_method('habc@advantage_stride=two', p)
    assert PROFILES['pixels'].online_actor_lr == 1e-4
    assert parse_method('habc@online_actor_lr=1e-3', PROFILES['pixels'])[1].online_actor_lr \
        == 1e-3


def test_evaluation_seeds_never_overlap_training_seeds():
    from habc_sim import bench
    p = PROFILES['full']
    demo = range(bench.DEMO_SEED_BASE, bench.DEMO_SEED_BASE + 10_000 * p.seeds)
    rollout_end = bench.ROLLOUT_SEED_BASE + 10_000 * p.seeds + 1000 * (bench.MAX_ROUNDS + 1)
    assert demo.stop <= bench.ROLLOUT_SEED_BASE
    assert rollout_end <= bench.TUNE_SEED_BASE
    # Budgets were tuned on the tuning range; evaluation states lie beyond it.
    assert bench.TUNE_SEED_BASE + 100_000 <= bench.EVAL_SEED_BASE


def test_profiles_give_each_task_its_demo_noise():
    from habc_sim.bench import BenchProfile
    p = BenchProfile(name='x', demo_noise=0.02, demo_noise_by_task=(('insertion', 0.01),))
    assert p.noise_for('insertion') == 0.01 and p.noise_for('transfer_cube') == 0.02
    assert PROFILES['pixels'].tracks == ('pixels',) and PROFILES['pixels'].seeds >= 2


def _quick_bench(out, *extra):
    result = subprocess.run([sys.executable, '-m', 'habc.cli', 'bench', '--quick',
                             '--out', str(out), '--no-progress', *extra],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    name = 'help_requests.json' if '--help-requests' in extra else 'results.json'
    return json.loads((out / name).read_text())


@pytest.mark.timeout(900)  # ~20 s on an idle 2-core machine; minutes when it is loaded
def test_quick_bench_end_to_end(tmp_path):
    out = tmp_path / 'bench'
    payload = _quick_bench(out)
    quick = PROFILES['quick']
    assert payload['eval_seed_base'] == EVAL_SEED_BASE  # held-out states unless --tuning
    assert payload['schedule']['eval_rounds'] == [0, 1, 2]
    rows = payload['results']
    assert {r['method'] for r in rows} == set(quick.methods)
    for row in rows:
        if 'success_rate' in row:
            assert 0.0 <= row['ci_low'] <= row['success_rate'] <= row['ci_high'] <= 1.0
            assert row['episodes'] == quick.eval_episodes
    rounds = {m: sorted(r['round'] for r in rows if r['method'] == m) for m in quick.methods}
    # HABC+IR has no stage 1 of its own: it branches from HABC after round 1.
    assert rounds == {'sft': [0], 'imit_dagger': [0, 1, 2], 'habc': [0, 1, 2],
                      'habc_ir': [0, 2]}
    online = [r for r in rows if r['round'] > 0]
    assert all(r['rollouts'] == quick.rollouts_per_round for r in online)
    # Round 1 comes from the shared SFT checkpoint: the same rollouts for every method.
    first = [(r['interventions'], r['human_steps']) for r in online if r['round'] == 1]
    assert len(set(first)) == 1
    # HABC and HABC+IR start round 2 from the same checkpoint: the same rollouts too.
    second = {r['method']: (r['interventions'], r['human_steps']) for r in online
              if r['round'] == 2}
    assert second['habc'] == second['habc_ir']
    habc = [r for r in online if r['method'] == 'habc']
    assert all(r['g_mean_demo'] is not None for r in habc)
    assert {h['source'] for h in payload['gate_histograms']} >= {'demo'}
    for phase in ('demos_and_sft_s', 'rollouts_s', 'train_s', 'eval_s', 'total_s'):
        assert payload['timing_s'][phase] > 0
    assert (out / 'results.md').read_text().count('|') > 10
    for plot in ('success_vs_round.png', 'success_length.png', 'gate_histograms.png'):
        assert (out / plot).stat().st_size > 1000
    cell = out / 'transfer_cube-state-seed0'
    for method in ('imit_dagger', 'habc'):
        assert (cell / method / 'round1' / 'model.safetensors').is_file()
        # SFT at actor_lr, the online rounds at online_actor_lr.
        train = json.loads((cell / method / 'round1' / 'metrics.json').read_text())['train']
        assert train['actor_lr'] == quick.online_actor_lr != quick.actor_lr
    sft_train = json.loads((cell / 'sft' / 'round0' / 'metrics.json').read_text())['train']
    assert sft_train['actor_lr'] == quick.actor_lr
    assert (out / 'transfer_cube-state-seed0' / 'habc_ir' / 'round2' /
            'model.safetensors').is_file()
    table = summary_table(rows, list(quick.methods))
    assert all(m in table for m in quick.methods)


@pytest.mark.timeout(900)
def test_quick_bench_on_the_pixel_track_fits_a_locator_into_the_policy(tmp_path):
    from habc_policy.models.base import load_policy
    out = tmp_path / 'bench'
    payload = _quick_bench(out, '--tracks', 'pixels', '--methods', 'sft', 'habc',
                           '--rollouts', '2', '--eval-episodes', '2')
    rows = payload['results']
    assert {r['method'] for r in rows} == {'sft', 'habc'}
    # One error per object (the cube), measured on demonstrations the locator never saw.
    assert all(len(r['locator_heldout_error_cm']) == 1 for r in rows)
    policy = load_policy(out / 'transfer_cube-pixels-seed0' / 'habc' / 'round1')
    assert policy.locator.config.outputs == 3 and policy.config.visual_tokens == 1

@pytest.mark.timeout(900)
def test_the_same_command_gives_the_same_numbers(tmp_path):
    # Episode seeds, operator streams, policy sampling and training are seeded from the
    # command alone: seed 1 run on its own, with the methods in another order and one
    # worker instead of two, gives the numbers it had in a run of seeds 0 and 1.
    extra = ['--rollouts', '2', '--eval-episodes', '2']
    both = _quick_bench(tmp_path / 'a', '--methods', 'habc', 'sft', '--seeds', '2', *extra)
    alone = _quick_bench(tmp_path / 'b', '--methods', 'sft', 'habc', '--first-seed', '1',
                         '--seeds', '1', '--workers', '1', *extra)

    def numbers(payload, seed):
        rows = [{k: v for k, v in r.items() if k != 'round_seconds'}
                for r in payload['results'] if r['seed'] == seed]
        return (sorted(rows, key=lambda r: (r['method'], r['round'])),
                [h for h in payload['gate_histograms'] if h['seed'] == seed])

    assert numbers(both, 1) == numbers(alone, 1)
    assert numbers(both, 0) != numbers(alone, 1)  # the seeds are different experiments


@pytest.mark.timeout(900)
def test_quick_help_request_bench_end_to_end(tmp_path):
    # A quick run's policy never succeeds, so nothing can be calibrated: the run says so and
    # compares the modes it can (nobody watching, continuous watching) on the same states.
    out, again = tmp_path / 'help', tmp_path / 'again'
    _quick_bench(out, '--help-requests')
    payload = json.loads((out / 'help_requests.json').read_text())
    assert payload['command'].startswith('habc bench --quick')
    cell, = payload['cells']
    assert list(cell['modes']) == ['unwatched', 'continuous']
    assert all('no successful episode' in problem for problem in cell['problems'])
    unwatched, continuous = cell['modes']['unwatched'], cell['modes']['continuous']
    assert [r['seed'] for r in unwatched] == [r['seed'] for r in continuous]
    assert all(r['attention_steps'] == 0 for r in unwatched)
    assert all(r['attention_steps'] == r['steps'] for r in continuous)
    assert 0.0 <= cell['reliability']['brier'] <= 1.0
    assert 'not calibrated' in (out / 'help_requests.md').read_text()
    assert (out / 'help_requests.png').stat().st_size > 1000
    # The same checkpoints again, without training: the same episodes.
    _quick_bench(again, '--help-requests', '--train-from', str(out))
    assert not (again / 'transfer_cube-state-seed0').exists()
    repeat = json.loads((again / 'help_requests.json').read_text())['cells'][0]
    assert repeat['modes'] == cell['modes']
    (out / 'help_requests.md').unlink()
    result = subprocess.run([sys.executable, '-m', 'habc.cli', 'bench', '--help-requests',
                             '--report-only', '--out', str(out)], capture_output=True, text=True)
    assert result.returncode == 0 and (out / 'help_requests.md').is_file()


def _rows(successes, human_steps, attention=0, requests=0):
    return [{'seed': i, 'success': bool(s), 'steps': 100, 'interventions': int(h > 0),
             'human_steps': h, 'attention_steps': attention, 'help_requests': requests,
             'requested_takeovers': 0, 'spontaneous_takeovers': int(h > 0)}
            for i, (s, h) in enumerate(zip(successes, human_steps, strict=True))]


def test_help_bench_pools_a_mode_and_compares_it_pairwise_by_hand():
    from habc_sim.help_bench import mode_summary, paired_difference, verdict

    # Continuous: 3 of 4 succeed, 90 human steps -> 30 per success; attention every step.
    continuous = _rows([1, 1, 1, 0], [30, 0, 60, 0], attention=100)
    summary = mode_summary(continuous)
    assert (summary['successes'], summary['intervention_steps_per_success']) == (3, 30.0)
    assert summary['attention_s_per_episode'] == pytest.approx(2.0)   # 100 steps at 50 Hz
    assert summary['attention_share'] == 1.0 and summary['interventions_per_episode'] == 0.5
    # On request: the same 3 successes with 30 human steps -> 10 per success (-67%).
    halved = _rows([1, 1, 1, 0], [0, 0, 30, 0], attention=20)
    difference = paired_difference(halved, continuous)
    assert difference[:1] == (0.0,) and difference[1] == difference[2] == 0.0
    assert verdict(mode_summary(halved), summary, difference).startswith(
        'yes: intervention steps per success -67%, equal or better success')
    # One success fewer, on a state the continuous watcher saved: d = (0, 0, -1, 0),
    # mean -0.25, sd 0.5, half-width 1.96 * 0.5 / 2 = 0.49: the interval includes 0.
    worse = _rows([1, 1, 0, 0], [0, 0, 0, 0])
    difference = paired_difference(worse, continuous)
    assert difference == pytest.approx((-0.25, -0.74, 0.24))
    assert verdict(mode_summary(worse), summary, difference).startswith(
        'no: intervention steps per success -100%, success -25 points, paired interval')
    assert verdict(mode_summary(_rows([0, 0], [5, 5])), summary, difference) == \
        'no successes to compare'
