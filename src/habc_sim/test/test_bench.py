"""`habc bench --quick` runs the whole protocol end to end (structure and sanity only)."""

import json
import math
import subprocess
import sys

import pytest

from habc_sim.bench import EVAL_SEED_BASE, PROFILES, summary_table, wilson_interval


def test_wilson_interval_by_hand():
    # 8 of 10: centre (0.8 + 1.96^2/20) / (1 + 1.96^2/10) = 0.7167, half-width 0.2228
    low, high = wilson_interval(8, 10)
    assert math.isclose(low, 0.4902, abs_tol=1e-3) and math.isclose(high, 0.9433, abs_tol=1e-3)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0


def test_evaluation_seeds_never_overlap_training_seeds():
    from habc_sim import bench
    p = PROFILES['full']
    demo = range(bench.DEMO_SEED_BASE, bench.DEMO_SEED_BASE + 10_000 * p.seeds)
    rollout_end = bench.ROLLOUT_SEED_BASE + 10_000 * p.seeds + 1000 * (p.rounds + 1)
    assert demo.stop <= bench.ROLLOUT_SEED_BASE
    assert rollout_end <= bench.TUNE_SEED_BASE
    # Budgets were tuned on the tuning range; evaluation states lie beyond it.
    assert bench.TUNE_SEED_BASE + 100_000 <= bench.EVAL_SEED_BASE


def test_profiles_give_each_task_its_demo_noise():
    from habc_sim.bench import BenchProfile
    p = BenchProfile(name='x', demo_noise=0.02, demo_noise_by_task=(('insertion', 0.01),))
    assert p.noise_for('insertion') == 0.01 and p.noise_for('transfer_cube') == 0.02
    assert PROFILES['pixels'].tracks == ('pixels',) and PROFILES['pixels'].seeds >= 2


@pytest.mark.timeout(900)  # ~90 s on an idle 2-core machine; minutes when it is loaded
def test_quick_bench_end_to_end(tmp_path):
    out = tmp_path / 'bench'
    result = subprocess.run([sys.executable, '-m', 'habc.cli', 'bench', '--quick',
                             '--out', str(out), '--no-progress'],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    payload = json.loads((out / 'results.json').read_text())
    assert payload['eval_seed_base'] == EVAL_SEED_BASE  # held-out states unless --tuning
    methods = set(PROFILES['quick'].methods)
    rows = payload['results']
    assert {r['method'] for r in rows} == methods
    for row in rows:
        assert 0.0 <= row['ci_low'] <= row['success_rate'] <= row['ci_high'] <= 1.0
        assert row['episodes'] == PROFILES['quick'].eval_episodes
    assert {r['round'] for r in rows if r['method'] == 'habc'} == {0, 1}
    rollouts = [r for r in rows if r['round'] == 1]
    assert all(r['rollouts'] == PROFILES['quick'].rollouts_per_round for r in rollouts)
    assert (out / 'results.md').read_text().count('|') > 10
    assert (out / 'success_vs_round.png').stat().st_size > 1000
    assert (out / 'success_length.png').stat().st_size > 1000
    assert all(r['round_seconds'] > 0 for r in rollouts)
    for method in methods - {'sft'}:
        assert (out / 'transfer_cube-state-seed0' / method / 'round1' /
                'model.safetensors').is_file()
    table = summary_table(rows, sorted(methods))
    assert all(m in table for m in methods)
