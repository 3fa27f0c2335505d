"""The chunk executor schedules policy chunks onto control ticks by their due times.

Control period 20 ms throughout; ticks are passed in as `now`. Chunk actions encode their
chunk and step (100 * chunk + step) so every executed action can be traced by value.
"""

import math

import numpy as np
import pytest

from habc_episodes.vocabulary import PolicyVersion
from habc_policy.chunk_executor import ChunkExecutor, ChunkExecutorParams

P = 0.02
V1 = PolicyVersion(1)
V2 = PolicyVersion(2)


def _executor(**overrides) -> ChunkExecutor:
    return ChunkExecutor(ChunkExecutorParams(control_period_s=P, **overrides))


def _chunk(base: float, horizon: int = 20) -> np.ndarray:
    """(H, 2) actions whose first column is base + step, the second its negative."""
    steps = base + np.arange(horizon, dtype=np.float64)
    return np.stack([steps, -steps], axis=1)


def _tick(executor: ChunkExecutor, now: float) -> float | None:
    """Execute one tick; return the first action component (the encoded value) or None."""
    scheduled = executor.next_action(now)
    return None if scheduled is None else float(scheduled.action[0])


def _ticks(start: float, count: int) -> list[float]:
    return [start + P * n for n in range(count)]


def test_receding_executes_the_first_k_of_h_actions():
    executor = _executor(execute_steps=10)
    assert executor.add_chunk(_chunk(0.0, horizon=20), 1.0, P, V1, 0)
    executed = []
    for now in _ticks(1.0, 10):
        scheduled = executor.next_action(now)
        assert scheduled.due_time == pytest.approx(now)
        assert scheduled.version == V1 and scheduled.chunk_id == 0
        assert scheduled.sources == (0,)
        executed.append((scheduled.index, scheduled.action.tolist()))
    assert executed == [(i, [float(i), -float(i)]) for i in range(10)]
    assert executor.next_action(1.20) is None  # steps 10..19 are never executed
    assert executor.counters['executed'] == 10
    assert executor.counters['underruns'] == 1
    assert executor.counters['stale_dropped'] == 0


def test_next_chunk_takes_over_at_its_first_due_time_without_gap():
    executor = _executor(execute_steps=10)
    executor.add_chunk(_chunk(0.0), 1.00, P, V1, 0)
    values = [_tick(executor, now) for now in _ticks(1.00, 3)]  # steps 0, 1, 2
    # Computed from the observation at 1.04, ready between two ticks.
    assert executor.add_chunk(_chunk(100.0), 1.06, P, V1, 1)
    values += [_tick(executor, now) for now in _ticks(1.06, 10)]
    assert values == [0.0, 1.0, 2.0] + [100.0 + i for i in range(10)]
    assert executor.counters['replaced'] == 7  # chunk 0's steps 3..9
    assert executor.counters['underruns'] == 0
    assert executor.counters['stale_dropped'] == 0


def test_late_chunk_skips_its_past_actions_and_the_old_one_bridges_the_wait():
    executor = _executor(execute_steps=10)
    executor.add_chunk(_chunk(0.0), 1.00, P, V1, 0)
    values = [_tick(executor, now) for now in _ticks(1.00, 5)]  # 1.00 .. 1.08
    # Chunk 1 was computed from the observation at 1.04 but arrives at 1.09: its steps for
    # 1.06 and 1.08 have passed (chunk 0 covered those ticks).
    executor.add_chunk(_chunk(100.0), 1.06, P, V1, 1)
    values += [_tick(executor, now) for now in _ticks(1.10, 3)]
    assert values == [0.0, 1.0, 2.0, 3.0, 4.0, 102.0, 103.0, 104.0]
    assert executor.counters['stale_dropped'] == 2
    assert executor.counters['replaced'] == 5  # chunk 0's steps 5..9


def test_stale_actions_are_dropped_by_due_time():
    executor = _executor(execute_steps=10, stale_after_s=0.015)
    executor.add_chunk(_chunk(0.0), 1.00, P, V1, 0)
    # First tick at 1.065: steps due 1.00, 1.02, 1.04 have passed; 1.06 is this tick's.
    scheduled = executor.next_action(1.065)
    assert scheduled.index == 3 and scheduled.due_time == pytest.approx(1.06)
    assert executor.counters['stale_dropped'] == 3
    assert _tick(executor, 1.085) == 4.0
    assert executor.counters['stale_dropped'] == 3


def test_the_last_action_runs_late_only_within_tolerance():
    executor = _executor(execute_steps=3, stale_after_s=0.015)
    executor.add_chunk(_chunk(0.0), 1.00, P, V1, 0)
    assert [_tick(executor, now) for now in (1.00, 1.02)] == [0.0, 1.0]
    # The timer stalls; step 2 (due 1.04) is the newest action and 20 ms old: stale.
    assert executor.next_action(1.06) is None
    assert executor.counters['stale_dropped'] == 1
    assert executor.counters['underruns'] == 1

    executor = _executor(execute_steps=3, stale_after_s=0.015)
    executor.add_chunk(_chunk(0.0), 1.00, P, V1, 0)
    assert [_tick(executor, now) for now in (1.00, 1.02, 1.055)] == [0.0, 1.0, 2.0]
    assert executor.counters['stale_dropped'] == 0


def test_timer_out_of_phase_with_jitter_executes_every_step_once():
    executor = _executor(execute_steps=10, stale_after_s=0.015)
    # Due times at 1.01, 1.03, ...: half a period off the timer, which jitters by 0.1 ms.
    executor.add_chunk(_chunk(0.0), 1.01, P, V1, 0)
    ticks = [1.0001, 1.0199, 1.0401, 1.0599, 1.0801, 1.0999]
    assert [_tick(executor, now) for now in ticks] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert executor.counters['stale_dropped'] == 0
    assert executor.counters['underruns'] == 0


def test_action_not_yet_due_waits_and_idle_ticks_are_not_underruns():
    executor = _executor()
    assert executor.next_action(0.9) is None  # no chunk yet: starting up, not an underrun
    executor.add_chunk(_chunk(0.0), 1.05, P, V1, 0)
    assert executor.next_action(1.00) is None  # first step due 50 ms later
    assert _tick(executor, 1.04) == 0.0  # 10 ms early, within tolerance
    assert executor.counters['underruns'] == 0


def test_underruns_count_every_tick_after_the_queue_runs_dry():
    executor = _executor(execute_steps=2)
    executor.add_chunk(_chunk(0.0), 1.00, P, V1, 0)
    assert [_tick(executor, now) for now in _ticks(1.00, 5)] == [0.0, 1.0, None, None, None]
    assert executor.counters['underruns'] == 3
    executor.add_chunk(_chunk(100.0), 1.10, P, V1, 1)
    assert _tick(executor, 1.10) == 100.0
    assert executor.diagnostics()['underrun_ratio'] == pytest.approx(3 / 6)


def test_needs_inference_when_few_actions_remain():
    executor = _executor(execute_steps=10, min_remaining_steps=5)
    assert executor.needs_inference(1.0)  # nothing queued
    executor.add_chunk(_chunk(0.0), 1.00, P, V1, 0)
    for now in _ticks(1.00, 5):
        executor.next_action(now)
    assert executor.remaining_actions(1.08) == 5  # steps 5..9, due 1.10 .. 1.18
    assert not executor.needs_inference(1.08)
    executor.next_action(1.10)
    assert executor.remaining_actions(1.10) == 4
    assert executor.needs_inference(1.10)


def _late_second_chunk(executor: ChunkExecutor) -> None:
    """Chunk 0 on time (steps 0-7 run), chunk 1 planned at 1.06 landing at 1.16: 4 late."""
    executor.add_chunk(_chunk(0.0), 1.00, P, V1, 0)
    assert [_tick(executor, now) for now in _ticks(1.00, 8)] == list(range(8))
    assert executor.delay_steps is None  # the first chunk after a start is not a sample
    executor.add_chunk(_chunk(100.0), 1.08, P, V1, 1)
    assert _tick(executor, 1.16) == 104.0  # steps 0-3 were due while it was computed


def test_latency_trigger_starts_inferences_early_enough_for_the_measured_delay():
    executor = _executor(execute_steps=20, min_remaining_steps=3, latency_margin_steps=2)
    _late_second_chunk(executor)
    assert executor.delay_steps == 4
    assert executor.inference_threshold() == 6  # 4 + 2 > min_remaining_steps
    # Chunk 1's steps 15-19 (due 1.38 .. 1.46) lie ahead at 1.36: 5 < 6.
    assert executor.needs_inference(1.36) and not executor.needs_inference(1.34)
    assert executor.diagnostics()['delay_steps'] == 4
    fixed = _executor(execute_steps=20, min_remaining_steps=3, latency_trigger=False)
    _late_second_chunk(fixed)
    assert fixed.inference_threshold() == 3 and not fixed.needs_inference(1.36)


def test_delay_estimate_is_the_75th_percentile_and_skips_the_chunk_after_a_clear():
    executor = _executor(execute_steps=20, min_remaining_steps=1)
    _late_second_chunk(executor)
    executor.clear(1.20)
    executor.add_chunk(_chunk(200.0), 1.22, P, V1, 2)  # 3 late, but first after the clear
    assert _tick(executor, 1.28) == 203.0
    assert executor.delay_steps == 4  # still the one sample from chunk 1
    for chunk_id, planned in ((3, 1.30), (4, 1.40), (5, 1.50)):
        executor.add_chunk(_chunk(100.0 * chunk_id), planned + P, P, V1, chunk_id)
        _tick(executor, planned + 2 * P)  # one step late: delay 1
    assert sorted(executor._delays) == [1, 1, 1, 4]
    assert executor.delay_steps == 4  # ceil(0.75 * 3) = index 3 of [1, 1, 1, 4]
    executor.add_chunk(_chunk(600.0), 1.62, P, V1, 6)
    _tick(executor, 1.64)
    assert executor.delay_steps == 1  # [1, 1, 1, 1, 4]: index 3


def test_chunk_shorter_than_k_is_executed_entirely():
    executor = _executor(execute_steps=10)
    executor.add_chunk(_chunk(0.0, horizon=3), 1.00, P, V1, 0)
    assert [_tick(executor, now) for now in _ticks(1.00, 4)] == [0.0, 1.0, 2.0, None]


def test_executor_keeps_its_own_copy_of_the_chunk():
    executor = _executor()
    chunk = _chunk(0.0)
    executor.add_chunk(chunk, 1.00, P, V1, 0)
    chunk[:] = 99.0  # the node reuses its output buffer
    assert _tick(executor, 1.00) == 0.0


def test_ensemble_averages_with_act_weights_oldest_first():
    # m = ln 2 gives weights 1, 1/2, 1/4 (oldest first) before normalisation.
    executor = _executor(mode='ensemble', ensemble_decay=math.log(2.0))
    executor.add_chunk(_chunk(0.0, 4) * 10.0, 1.00, P, V1, 0)  # 0, 10, 20, 30
    assert _tick(executor, 1.00) == pytest.approx(0.0)
    executor.add_chunk(_chunk(10.0, 4) * 10.0, 1.02, P, V1, 1)  # 100, 110, 120, 130
    # Chunk 0 step 1 (10) and chunk 1 step 0 (100): (1 * 10 + 0.5 * 100) / 1.5.
    assert _tick(executor, 1.02) == pytest.approx(40.0)
    executor.add_chunk(_chunk(20.0, 4) * 10.0, 1.04, P, V1, 2)  # 200, 210, 220, 230
    scheduled = executor.next_action(1.04)
    # (1 * 20 + 0.5 * 110 + 0.25 * 200) / 1.75 = 500 / 7.
    assert scheduled.action == pytest.approx([500.0 / 7.0, -500.0 / 7.0])
    assert scheduled.sources == (0, 1, 2)
    assert scheduled.chunk_id == 2 and scheduled.index == 0
    assert scheduled.due_time == pytest.approx(1.04)
    # (1 * 30 + 0.5 * 120 + 0.25 * 210) / 1.75 = 570 / 7.
    assert _tick(executor, 1.06) == pytest.approx(570.0 / 7.0)
    # Chunk 0 has ended: chunk 1 is now the oldest and gets weight 1: (130 + 0.5 * 220) / 1.5.
    scheduled = executor.next_action(1.08)
    assert scheduled.action[0] == pytest.approx(160.0)
    assert scheduled.sources == (1, 2)
    assert executor.counters['stale_dropped'] == 0


def test_ensemble_with_act_default_decay():
    executor = _executor(mode='ensemble', ensemble_decay=0.01)
    for chunk_id in range(3):
        executor.add_chunk(_chunk(10.0 * chunk_id, 4) * 10.0, 1.00 + P * chunk_id, P, V1,
                           chunk_id)
    # (20 + 110 e^-0.01 + 200 e^-0.02) / (1 + e^-0.01 + e^-0.02) = 109.40001...
    assert _tick(executor, 1.04) == pytest.approx(109.40001, abs=1e-5)


def test_ensemble_counts_steps_of_a_late_chunk_as_stale():
    executor = _executor(mode='ensemble')
    executor.add_chunk(_chunk(0.0, 8), 1.00, P, V1, 0)
    assert _tick(executor, 1.04) == pytest.approx(2.0)  # the nearest step to the tick
    assert executor.counters['stale_dropped'] == 2
    assert _tick(executor, 1.061) == pytest.approx(3.0)
    assert executor.counters['stale_dropped'] == 2


def test_ensemble_never_averages_two_versions():
    executor = _executor(mode='ensemble', ensemble_decay=0.0)
    executor.add_chunk(_chunk(0.0, 4), 1.00, P, V1, 0)
    assert _tick(executor, 1.00) == 0.0
    assert executor.current_version == V1
    executor.add_chunk(_chunk(100.0, 4), 1.02, P, V2, 1)
    scheduled = executor.next_action(1.02)
    assert scheduled.action[0] == 100.0  # not (1 + 100) / 2
    assert scheduled.version == V2 and scheduled.sources == (1,)
    assert executor.current_version == V2


def test_staged_version_switches_at_a_chunk_boundary_and_never_back():
    executor = _executor(execute_steps=5)
    executor.add_chunk(_chunk(0.0), 1.00, P, V1, 0)
    executed = [executor.next_action(now) for now in (1.00, 1.02)]
    executor.stage_version(V2)  # new weights loaded between two inferences
    # An inference that still ran on the old weights finishes after the swap: rejected.
    assert not executor.add_chunk(_chunk(100.0), 1.02, P, V1, 1)
    assert executor.counters['rejected_version'] == 1
    executed.append(executor.next_action(1.04))  # chunk 0 keeps the robot moving
    assert executor.add_chunk(_chunk(200.0), 1.06, P, V2, 2)
    executed += [executor.next_action(now) for now in _ticks(1.06, 5)]
    assert [a.action[0] for a in executed] == [0.0, 1.0, 2.0, 200.0, 201.0, 202.0, 203.0,
                                                204.0]
    assert [a.version for a in executed] == [V1] * 3 + [V2] * 5
    versions_by_chunk = {}
    for a in executed:
        versions_by_chunk.setdefault(a.chunk_id, set()).add(a.version)
    assert versions_by_chunk == {0: {V1}, 2: {V2}}
    assert executor.current_version == V2
    assert executor.diagnostics()['staged_version'] == '2'


def test_chunk_ids_must_increase():
    executor = _executor()
    assert executor.add_chunk(_chunk(0.0), 1.00, P, V1, 5)
    assert not executor.add_chunk(_chunk(100.0), 1.02, P, V1, 5)
    assert not executor.add_chunk(_chunk(100.0), 1.02, P, V1, 4)
    assert executor.counters['rejected_out_of_order'] == 2
    assert executor.counters['chunks_accepted'] == 1
    assert _tick(executor, 1.02) == 1.0  # chunk 5 still runs


def test_clear_drops_the_queue_and_chunks_planned_before_it():
    executor = _executor()
    executor.add_chunk(_chunk(0.0), 1.00, P, V1, 0)
    assert _tick(executor, 1.00) == 0.0
    executor.clear(now=1.05)  # handback: the human moved the arm
    assert executor.next_action(1.06) is None
    assert executor.counters['underruns'] == 0  # waiting for a fresh plan, not a dry queue
    # Computed from the observation at 1.04, before the handback.
    assert not executor.add_chunk(_chunk(100.0), 1.06, P, V1, 1)
    assert executor.counters['rejected_before_clear'] == 1
    assert executor.add_chunk(_chunk(200.0), 1.08, P, V1, 2)  # observation at 1.06
    assert _tick(executor, 1.08) == 200.0
    assert executor.current_version == V1


def test_malformed_chunks_raise():
    executor = _executor()
    with pytest.raises(ValueError, match=r'expected an \(H, D\) array'):
        executor.add_chunk(np.zeros(5), 1.0, P, V1, 0)
    executor.add_chunk(np.zeros((5, 2)), 1.0, P, V1, 0)
    with pytest.raises(ValueError, match='actions have 3 dimensions, earlier chunks had 2'):
        executor.add_chunk(np.zeros((5, 3)), 1.02, P, V1, 1)
    with pytest.raises(ValueError, match='differs from control_period_s'):
        executor.add_chunk(np.zeros((5, 2)), 1.02, 0.1, V1, 1)
    with pytest.raises(ValueError, match='version must be a PolicyVersion'):
        executor.add_chunk(np.zeros((5, 2)), 1.02, P, '2', 1)
    assert executor.counters['chunks_accepted'] == 1


def test_params_are_validated():
    with pytest.raises(ValueError, match='stale_after_s'):
        ChunkExecutorParams(control_period_s=0.02, stale_after_s=0.005)
    with pytest.raises(ValueError, match="choose one of \\['receding', 'ensemble'\\]"):
        ChunkExecutorParams(mode='temporal')
    with pytest.raises(ValueError, match="parameter 'execute_steps'"):
        ChunkExecutorParams(execute_steps=0)
