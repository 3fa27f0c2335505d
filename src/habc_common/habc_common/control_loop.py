"""Periodic control ticks on absolute deadlines, on a thread of their own (no rclpy).

An rclpy timer runs its callback on the executor, behind every other ready callback, and
re-arms relative to when it ran, so a busy executor shows up as jitter on the robot. A
ControlLoop instead sleeps on the monotonic clock to the next period boundary
origin + k * period (never origin + sum of measured periods, so it cannot drift), runs the
tick there, and when a tick ran late it skips the boundaries already passed instead of
running them back to back: one late tick, then on-time ticks, never a burst.

The loop keeps Python's garbage collector out of the tick: start-up objects are frozen
(gc.freeze) and automatic collection is off while the loop runs; the loop collects the
young generations itself right after a tick, when the time left before the next deadline
allows. It can run the tick thread under SCHED_FIFO and pin it to CPUs when the process may
(it reports why not otherwise), and shortens the interpreter's thread switch interval so
that a thread holding the GIL gives it up within a fraction of a period.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
import gc
import math
import os
import sys
import threading
import time

from habc_common.params import param

# How long another thread may keep the GIL once the tick thread asks for it (s). Python's
# default of 5 ms is a quarter of a 50 Hz period.
SWITCH_INTERVAL_S = 0.0005
# Collect the young generation after a tick only with at least this share of a period left.
_GC_SLACK_SHARE = 0.5
# gc.collect(1) every this many ticks, gc.collect(2) every _FULL_GC_TICKS ticks (with slack).
_MIDDLE_GC_TICKS = 50
_FULL_GC_TICKS = 3000
# Young objects (in collector thresholds) after which gen 0 is collected without slack.
_FORCE_GC_FACTOR = 10

# The collector and the switch interval are process-wide: the first running loop changes
# them, the last one to stop restores them (the nodes of one process may each run a loop).
_process_lock = threading.Lock()
_users = {'loops': 0, 'gc': 0}
_saved: dict[str, object] = {}


def _enter_process(manage_gc: bool) -> None:
    with _process_lock:
        if _users['loops'] == 0:
            _saved['switch_interval'] = sys.getswitchinterval()
            sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
        _users['loops'] += 1
        if manage_gc:
            if _users['gc'] == 0:
                # Objects alive after start-up live as long as the node: out of every
                # collection.
                gc.collect()
                gc.freeze()
                _saved['gc_enabled'] = gc.isenabled()
                gc.disable()
            _users['gc'] += 1


def _leave_process(manage_gc: bool) -> None:
    with _process_lock:
        if manage_gc:
            _users['gc'] -= 1
            if _users['gc'] == 0:
                gc.unfreeze()
                if _saved.get('gc_enabled', True):
                    gc.enable()
        _users['loops'] -= 1
        if _users['loops'] == 0:
            sys.setswitchinterval(_saved['switch_interval'])


@dataclass(frozen=True)
class ControlThreadParams:
    """Scheduling of a node's control tick thread (a base of the nodes' parameter classes)."""

    realtime_priority: int = param(
        0, 'SCHED_FIFO priority (1-99) of the control tick thread; 0 leaves normal scheduling. '
        'Applied when the process may (root, CAP_SYS_NICE or an rtprio limit); the log says '
        'when it may not, and the node runs on without it.', min=0, max=99, read_only=True)
    cpu_affinity: list[int] = param(
        [], 'CPUs the control tick thread runs on (e.g. [1] to keep it beside, not behind, '
        'inference); empty: any CPU.', read_only=True)


@dataclass
class DeadlineSchedule:
    """Absolute tick deadlines origin + k * period_s, on an injected clock (no threads).

    next_s is the deadline of the next tick. advance(now) is called after each tick; it moves
    to the first boundary after the previous one that is still ahead of `now`, counting the
    boundaries skipped because a tick ran past them.
    """

    period_s: float
    origin_s: float
    index: int = 1
    missed: int = 0
    late: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.period_s) and self.period_s > 0.0):
            raise ValueError(f'control period must be a positive number of seconds, got '
                             f'{self.period_s}')

    @property
    def next_s(self) -> float:
        """Deadline of the next tick (s)."""
        return self.origin_s + self.index * self.period_s

    def advance(self, now_s: float) -> int:
        """Move past the tick just run at or before `now_s`; return the boundaries skipped."""
        self.index += 1
        skipped = 0
        if now_s >= self.next_s:
            # The tick (or the wake-up before it) overran whole periods: drop them.
            skipped = math.floor((now_s - self.next_s) / self.period_s) + 1
            self.index += skipped
            self.missed += skipped
            self.late += 1
        return skipped


@dataclass
class LoopReport:
    """What a ControlLoop applied at start-up, for the node's log."""

    applied: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    def text(self) -> str:
        parts = list(self.applied) + [f'NOT {item}' for item in self.refused]
        return '; '.join(parts) if parts else 'default scheduling'


def apply_thread_scheduling(realtime_priority: int = 0,
                            cpu_affinity: Sequence[int] = ()) -> LoopReport:
    """Schedule the calling thread; report what held and what did not.

    SCHED_FIFO at `realtime_priority` (1-99; 0 leaves the policy as it is), on the CPUs of
    `cpu_affinity` (empty leaves them). On Linux both calls with pid 0 act on the calling
    thread only, not on the whole process.
    """
    report = LoopReport()
    if realtime_priority:
        if not 1 <= realtime_priority <= 99:
            raise ValueError(f'realtime_priority must be 0 (off) or 1-99, got '
                             f'{realtime_priority}')
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(realtime_priority))
            report.applied.append(f'SCHED_FIFO priority {realtime_priority}')
        except (AttributeError, PermissionError, OSError) as exc:
            report.refused.append(
                f'SCHED_FIFO priority {realtime_priority} ({exc}; grant CAP_SYS_NICE or an '
                'rtprio limit in /etc/security/limits.conf)')
    if cpu_affinity:
        cpus = sorted({int(cpu) for cpu in cpu_affinity})
        try:
            os.sched_setaffinity(0, cpus)
            report.applied.append(f'CPUs {cpus}')
        except (AttributeError, OSError, ValueError) as exc:
            report.refused.append(f'CPU affinity {cpus} ({exc}; this machine has CPUs '
                                  f'{sorted(os.sched_getaffinity(0))})')
    return report


def normal_thread_scheduling() -> None:
    """Put the calling thread back on normal scheduling (SCHED_OTHER).

    A thread inherits the policy of the thread that starts it: a worker pool that a
    real-time callback starts lazily would otherwise run its slow work (loading weights) in
    real time. Use it as the pool's initializer.
    """
    try:
        if os.sched_getscheduler(0) != os.SCHED_OTHER:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux, or not permitted: nothing to undo then
        pass


def compute_threads(requested: int = 0) -> int:
    """Return the torch threads for inference or training.

    `requested`, or when 0 half the CPUs this process may run on (at least one), leaving the
    rest to the robot-side nodes' ticks.
    """
    if requested:
        return int(requested)
    return max(1, len(os.sched_getaffinity(0)) // 2)


class ControlLoop:
    """Run `tick(deadline_s)` at every period boundary on its own thread.

    tick receives the deadline it was scheduled for (on `clock`); exceptions it raises go to
    `on_error` and the loop goes on. clock and sleep are injectable for tests; run_ticks()
    runs the loop body synchronously on the caller's thread.
    """

    def __init__(self, period_s: float, tick: Callable[[float], None], *, name: str = 'control',
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 realtime_priority: int = 0, cpu_affinity: Sequence[int] = (),
                 manage_gc: bool = True,
                 on_error: Callable[[Exception], None] | None = None) -> None:
        if realtime_priority and not 1 <= realtime_priority <= 99:
            raise ValueError(f'realtime_priority must be 0 (off) or 1-99, got '
                             f'{realtime_priority}')
        self.period_s = float(period_s)
        self.schedule = DeadlineSchedule(self.period_s, clock())
        self._tick = tick
        self._clock = clock
        self._sleep = sleep
        self._name = name
        self._realtime_priority = realtime_priority
        self._cpu_affinity = tuple(cpu_affinity)
        self._manage_gc = manage_gc
        self._on_error = on_error
        self._stop = threading.Event()
        self._state_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        # Generation of a collection that is due (-1: none), run when a tick leaves slack.
        self._gc_due = -1
        self.report = LoopReport()
        self.ticks = 0
        self.gc_collections = 0
        self._started = threading.Event()

    # Thread ------------------------------------------------------------------------------

    def start(self) -> LoopReport:
        """Start the tick thread; return what it applied (after it applied it)."""
        with self._state_lock:
            if self._thread is not None:
                raise RuntimeError('the control loop runs already')
            _enter_process(self._manage_gc)
            self.schedule = DeadlineSchedule(self.period_s, self._clock())
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
        self._started.wait()
        return self.report

    def stop(self, timeout: float = 5.0) -> None:
        """Stop after the current tick (safe from any thread, any number of times).

        The tick thread itself restores the collector and the switch interval as it exits,
        so they are never restored under a tick that still runs.
        """
        self._stop.set()
        with self._state_lock:
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        try:
            try:
                self.report = apply_thread_scheduling(self._realtime_priority,
                                                      self._cpu_affinity)
            finally:
                self._started.set()
            while not self._stop.is_set():
                self.run_ticks(1)
        finally:
            _leave_process(self._manage_gc)

    # Loop body (also run synchronously by tests) -----------------------------------------

    def run_ticks(self, count: int) -> None:
        """Sleep to the next deadline and tick, `count` times (or until stopped)."""
        for _ in range(count):
            if self._stop.is_set():
                return
            deadline = self.schedule.next_s
            wait = deadline - self._clock()
            if wait > 0.0:
                self._sleep(wait)
            try:
                self._tick(deadline)
            except Exception as exc:  # a bad tick must not end the control loop
                if self._on_error is None:
                    raise
                self._on_error(exc)
            self.ticks += 1
            self.schedule.advance(self._clock())
            if self._manage_gc:
                self._collect_between_ticks()

    def _collect_between_ticks(self) -> None:
        if self.ticks % _FULL_GC_TICKS == 0:
            self._gc_due = 2
        elif self.ticks % _MIDDLE_GC_TICKS == 0:
            self._gc_due = max(self._gc_due, 1)
        young = gc.get_count()[0]
        threshold = gc.get_threshold()[0]
        if young >= threshold:
            self._gc_due = max(self._gc_due, 0)
        if self._gc_due < 0:
            return
        slack = self.schedule.next_s - self._clock()
        # A tick that keeps overrunning (a simulator rendering cameras) never leaves slack:
        # past _FORCE_GC_FACTOR thresholds the young generation is collected anyway, so the
        # process never stops collecting; a due older generation waits for slack.
        if slack >= _GC_SLACK_SHARE * self.period_s:
            gc.collect(self._gc_due)
            self._gc_due = -1
            self.gc_collections += 1
        elif young >= _FORCE_GC_FACTOR * threshold:
            gc.collect(0)
            self.gc_collections += 1
