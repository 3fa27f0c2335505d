"""The deadline scheduler and the control loop, on injected time (no sleeps, no wall clock)."""

import gc
import os
import random
import sys
import threading

import numpy as np
import pytest

from habc_common.control_loop import (
    apply_thread_scheduling,
    ControlLoop,
    DeadlineSchedule,
    normal_thread_scheduling,
    SWITCH_INTERVAL_S,
)

PERIOD = 0.02


class FakeTime:
    """A clock that only moves when the loop sleeps or a tick works."""

    def __init__(self, wake_latency=lambda: 0.0) -> None:
        self.now = 1000.0
        self._wake_latency = wake_latency
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0.0
        self.sleeps.append(seconds)
        self.now += seconds + self._wake_latency()


def run_loop(fake: FakeTime, ticks: int, cost=lambda k: 0.0) -> tuple[ControlLoop, list]:
    """Run `ticks` ticks; each records (deadline, start) and works cost(k) seconds."""
    record: list[tuple[float, float]] = []

    def tick(deadline: float) -> None:
        record.append((deadline, fake.now))
        fake.now += cost(len(record) - 1)

    loop = ControlLoop(PERIOD, tick, clock=fake.clock, sleep=fake.sleep, manage_gc=False)
    loop.run_ticks(ticks)
    return loop, record


def test_no_drift_over_10000_periods_with_jittery_wake_ups_and_tick_costs():
    rng = random.Random(7)
    fake = FakeTime(wake_latency=lambda: rng.uniform(0.0, 0.3 * PERIOD))
    origin = fake.now
    loop, record = run_loop(fake, 10_000, cost=lambda k: rng.uniform(0.0, 0.2 * PERIOD))
    assert len(record) == 10_000
    for k, (deadline, start) in enumerate(record, start=1):
        assert deadline == pytest.approx(origin + k * PERIOD, abs=1e-9)
        # Each tick starts after its deadline by at most one wake-up latency: the error of
        # one period never carries into the next one.
        assert 0.0 <= start - deadline <= 0.3 * PERIOD + 1e-9
    assert loop.schedule.missed == 0 and loop.schedule.late == 0
    # The same wake-ups and costs with a timer that re-arms one period after each tick
    # (relative sleeps) drift by whole periods: the check above is not trivially met.
    rng = random.Random(7)
    naive_now = origin
    for _ in range(10_000):
        naive_now += PERIOD + rng.uniform(0.0, 0.3 * PERIOD)
        naive_now += rng.uniform(0.0, 0.2 * PERIOD)
    assert naive_now - (origin + 10_000 * PERIOD) > 100 * PERIOD


def test_a_late_tick_is_followed_by_on_time_ticks_not_a_burst():
    fake = FakeTime()
    origin = fake.now
    loop, record = run_loop(fake, 10, cost=lambda k: 3.4 * PERIOD if k == 4 else 0.001)
    deadlines = [round((deadline - origin) / PERIOD, 6) for deadline, _ in record]
    # Tick 5 (deadline 5) overran to 8.4 periods: boundaries 6, 7 and 8 are skipped, and the
    # loop resumes on the period grid at 9, without running the missed ticks back to back.
    assert deadlines == [1, 2, 3, 4, 5, 9, 10, 11, 12, 13]
    starts = [start for _, start in record]
    gaps = np.diff(starts)
    assert gaps.min() >= PERIOD - 0.001 - 1e-9
    assert loop.schedule.missed == 3 and loop.schedule.late == 1
    assert loop.ticks == 10


def test_a_tick_that_overruns_less_than_a_period_shifts_nothing():
    fake = FakeTime()
    origin = fake.now
    _, record = run_loop(fake, 4, cost=lambda k: 0.9 * PERIOD if k == 1 else 0.0)
    assert [round((d - origin) / PERIOD, 6) for d, _ in record] == [1, 2, 3, 4]
    # The tick after the long one starts on its own deadline: no wait was left, no sleep.
    assert record[2][1] == pytest.approx(origin + 3 * PERIOD)


def test_schedule_counts_skipped_boundaries_exactly():
    schedule = DeadlineSchedule(PERIOD, 0.0)
    assert schedule.next_s == pytest.approx(PERIOD)
    assert schedule.advance(PERIOD + 0.001) == 0           # on time
    # The tick of boundary 2 ended exactly on boundary 3: 3 is skipped.
    assert schedule.advance(3 * PERIOD) == 1
    assert schedule.next_s == pytest.approx(4 * PERIOD)
    assert schedule.advance(4.5 * PERIOD) == 0
    assert schedule.advance(9.5 * PERIOD) == 4             # boundaries 6..9 skipped
    assert schedule.next_s == pytest.approx(10 * PERIOD)
    assert (schedule.missed, schedule.late) == (5, 2)
    with pytest.raises(ValueError, match='positive'):
        DeadlineSchedule(0.0, 0.0)


def test_a_failing_tick_is_reported_and_the_loop_goes_on():
    fake = FakeTime()
    errors: list[Exception] = []
    calls: list[float] = []

    def tick(deadline: float) -> None:
        calls.append(deadline)
        if len(calls) == 2:
            raise RuntimeError('boom')

    loop = ControlLoop(PERIOD, tick, clock=fake.clock, sleep=fake.sleep, manage_gc=False,
                       on_error=errors.append)
    loop.run_ticks(4)
    assert len(calls) == 4 and [str(e) for e in errors] == ['boom']


def test_the_thread_ticks_and_restores_the_collector_and_switch_interval():
    enabled, interval = gc.isenabled(), sys.getswitchinterval()
    ticks = threading.Semaphore(0)
    threads: list[str] = []

    def tick(deadline: float) -> None:
        threads.append(threading.current_thread().name)
        ticks.release()

    first = ControlLoop(PERIOD, tick, name='first_loop')
    second = ControlLoop(PERIOD, tick, name='second_loop')
    first.start()
    second.start()
    try:
        assert not gc.isenabled()
        assert sys.getswitchinterval() <= SWITCH_INTERVAL_S + 1e-12
        for _ in range(6):
            assert ticks.acquire(timeout=30.0)
        first.stop()
        # The other loop still runs: the process settings stay until the last one stops.
        assert not gc.isenabled()
        assert ticks.acquire(timeout=30.0)
    finally:
        first.stop()
        second.stop()
    assert gc.isenabled() == enabled
    assert sys.getswitchinterval() == interval
    assert {'first_loop', 'second_loop'} <= set(threads)
    with pytest.raises(ValueError, match='realtime_priority'):
        ControlLoop(PERIOD, tick, realtime_priority=120)


def _in_thread(function):
    result: list = []
    thread = threading.Thread(target=lambda: result.append(function()))
    thread.start()
    thread.join()
    return result[0]


def test_thread_scheduling_applies_to_the_calling_thread_or_says_why_not():
    cpus = sorted(os.sched_getaffinity(0))

    def pin_first_cpu():
        report = apply_thread_scheduling(0, [cpus[0]])
        return report, os.sched_getaffinity(0)

    report, affinity = _in_thread(pin_first_cpu)
    assert report.applied == [f'CPUs [{cpus[0]}]'] and affinity == {cpus[0]}
    # The calling thread only: this thread keeps every CPU.
    assert sorted(os.sched_getaffinity(0)) == cpus

    report = _in_thread(lambda: apply_thread_scheduling(0, [4095]))
    assert report.refused and 'CPU affinity [4095]' in report.refused[0]
    assert f'this machine has CPUs {cpus}' in report.refused[0]

    def realtime():
        report = apply_thread_scheduling(1)
        return report, os.sched_getscheduler(0)

    report, policy = _in_thread(realtime)
    if report.applied:
        assert report.applied == ['SCHED_FIFO priority 1'] and policy == os.SCHED_FIFO
    else:
        assert 'CAP_SYS_NICE' in report.refused[0] and policy != os.SCHED_FIFO
    assert os.sched_getscheduler(0) != os.SCHED_FIFO
    with pytest.raises(ValueError, match='1-99'):
        apply_thread_scheduling(100)


def test_a_pool_thread_started_by_a_realtime_thread_returns_to_normal_scheduling():
    def realtime_parent():
        report = apply_thread_scheduling(1)
        observed = []

        def child():
            observed.append(os.sched_getscheduler(0))  # inherited from the parent
            normal_thread_scheduling()
            observed.append(os.sched_getscheduler(0))
        thread = threading.Thread(target=child)
        thread.start()
        thread.join()
        return report, observed

    report, observed = _in_thread(realtime_parent)
    inherited = os.SCHED_FIFO if report.applied else os.SCHED_OTHER
    assert observed == [inherited, os.SCHED_OTHER]


def test_ticks_that_never_leave_slack_still_collect_the_young_generation():
    # A tick that always overruns (a simulator rendering) leaves no slack after it; the
    # loop must not stop collecting in that process.
    fake = FakeTime()
    kept = []

    def tick(deadline: float) -> None:
        for _ in range(200):  # reference cycles: only the collector frees them
            cycle = []
            cycle.append(cycle)
        kept.append(len(cycle))
        fake.now += 1.6 * PERIOD  # ends 0.4 periods before the next boundary

    loop = ControlLoop(PERIOD, tick, clock=fake.clock, sleep=fake.sleep)  # manages gc
    enabled = gc.isenabled()
    gc.disable()  # as start() leaves it; run_ticks() runs the body on this thread
    try:
        gc.collect()
        loop.run_ticks(200)
    finally:
        if enabled:
            gc.enable()
    assert loop.schedule.late == 200
    assert loop.gc_collections > 0
    assert gc.get_count()[0] < 11 * gc.get_threshold()[0]
