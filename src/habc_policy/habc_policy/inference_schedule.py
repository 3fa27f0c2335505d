"""When to start the next inference so that its chunk lands just in time (no rclpy).

A chunk planned from an older observation is a plan for an older world; a chunk that lands
after the queued plan has run out leaves the robot without a command. So the next inference
should start as late as possible, from the newest observation, and still land before the
plan ends:

    start deadline = plan_end - L - margin

plan_end is the due time of the last queued action, L the inference turnaround (request to
chunk accepted, measured: a high quantile of the recent ones, cold starts left out, since
the first call of new weights or of a fresh process is slower and says nothing about the
next one) and margin a reserve for the spread L does not capture. Observations arrive every
T_obs; an inference is started on the observation that has just arrived when the next one
would come after the deadline (now + T_obs > deadline), so it plans from the freshest
observation that still lands in time. When the deadline passes without a new observation
(a dropped frame), the control tick starts it on the newest one it has.

Under simulated time the turnaround, measured on the monotonic clock, is compared with
simulated due times: the simulation never runs faster than real time here, so that errs on
the early side.

The actions of the new chunk that fall due during the inference are skipped by the executor
(its first action is due one period after the observation); the node reports how many per
chunk (ActionChunk.skipped_steps).
"""

from collections import deque
from dataclasses import dataclass
import math

import numpy as np


@dataclass(frozen=True)
class ScheduleDecision:
    """Whether to start now, and the deadline and latency estimate it was based on (s)."""

    start: bool
    deadline: float | None
    latency_s: float | None


class InferenceScheduler:
    """Decide when to start inferences from measured turnarounds (see the module docstring).

    Not thread-safe: the node calls it under its own lock or from one thread.
    """

    def __init__(self, margin_s: float = 0.01, window: int = 20, quantile: float = 0.9,
                 initial_latency_s: float = 0.1) -> None:
        if margin_s < 0.0 or window < 1 or not 0.0 < quantile <= 1.0:
            raise ValueError(f'inference schedule: margin_s >= 0, window >= 1 and quantile in '
                             f'(0, 1] needed; got {margin_s}, {window}, {quantile}')
        self.margin_s = float(margin_s)
        self.quantile = float(quantile)
        # Used until the first warm turnaround is measured: early rather than late.
        self.initial_latency_s = float(initial_latency_s)
        self._latencies: deque[float] = deque(maxlen=window)
        self._last_stamp: float | None = None
        self._intervals: deque[float] = deque(maxlen=window)

    def record_latency(self, seconds: float, cold: bool = False) -> None:
        """Record one inference turnaround (request to chunk accepted); cold ones are left out."""
        if not cold and math.isfinite(seconds) and seconds >= 0.0:
            self._latencies.append(float(seconds))

    def record_observation(self, stamp: float) -> None:
        """Record the stamp of an arriving observation (for the observation period)."""
        if self._last_stamp is not None and stamp > self._last_stamp:
            self._intervals.append(stamp - self._last_stamp)
        self._last_stamp = stamp

    @property
    def latency_s(self) -> float | None:
        """The turnaround estimate (s), None before the first warm measurement."""
        return self.latency_quantile(self.quantile)

    def latency_quantile(self, quantile: float) -> float | None:
        """Return a quantile of the recent warm turnarounds (s), None before the first."""
        if not self._latencies:
            return None
        return float(np.quantile(np.asarray(self._latencies), quantile))

    @property
    def observation_period_s(self) -> float:
        """Median spacing of the observations seen (s); 0 before two have arrived."""
        if not self._intervals:
            return 0.0
        return float(np.median(np.asarray(self._intervals)))

    def deadline(self, plan_end: float | None) -> float | None:
        """Latest start (s) that lands before plan_end, None when nothing is planned."""
        if plan_end is None:
            return None
        latency = self.latency_s
        return plan_end - (self.initial_latency_s if latency is None else latency) - \
            self.margin_s

    def on_observation(self, now: float, plan_end: float | None) -> ScheduleDecision:
        """Decide on an observation that arrived at `now`: start when the next is too late."""
        deadline = self.deadline(plan_end)
        start = deadline is None or now + self.observation_period_s >= deadline
        return ScheduleDecision(start, deadline, self.latency_s)

    def on_tick(self, now: float, plan_end: float | None) -> ScheduleDecision:
        """Decide on a control tick at `now`: start on the newest observation past the deadline."""
        deadline = self.deadline(plan_end)
        return ScheduleDecision(deadline is None or now >= deadline, deadline, self.latency_s)


# How many inferences staged weights may wait for a longer plan before they swap anyway.
MAX_SWAP_DEFERRALS = 2


def swap_now(plan_left_s: float | None, first_inference_s: float, margin_s: float,
             deferrals: int, max_deferrals: int = MAX_SWAP_DEFERRALS) -> bool:
    """Decide whether staged weights swap in before the next inference.

    They do when the queued plan still runs plan_left_s (None: nothing queued, nothing to
    protect) at least as long as their first inference takes plus the margin; otherwise the
    old weights infer once more and refill the queue, and the swap comes with the next
    inference. After max_deferrals such waits they swap anyway: weights whose first
    inference is longer than any plan must not wait forever.
    """
    if plan_left_s is None or deferrals >= max_deferrals:
        return True
    return plan_left_s >= first_inference_s + margin_s
