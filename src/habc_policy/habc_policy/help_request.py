"""When the robot should ask a human for help, from its live viability estimate (no rclpy).

The learner's viability head estimates p_v = P(success | state) for the running policy.
Evaluated on the robot at every inference, it lets the robot ask for a human before it
fails instead of after. A request is raised when:

  low       p_v stays below `threshold` for `below_for_s`;
  stalled   p_v has not risen by `min_rise` over the last `stall_window_s` while below
            `stall_below` (the value stops rising: the policy is stuck, after UniIntervene,
            arXiv 2606.12372).

A raised request clears when a human takes over (answered) or when p_v recovers for
`clear_for_s`: a low request above `clear_above` (> threshold: hysteresis, so it does not
chatter), a stalled one above its value at the request plus `min_rise` (or above
`stall_below`). Each event carries the p_v trace of the last `trace_s`. Without a critic
the monitor raises nothing and says why (`HelpMonitor.critic_problem`).

All times are seconds passed in by the caller (the observation stamps); nothing here reads a
clock. Not thread-safe: call it from one thread.
"""

from collections import deque
from dataclasses import dataclass, fields
import math

from habc_common.params import param, validate_params
from habc_episodes.vocabulary import HelpReason

RAISED = 'raised'
CLEARED = 'cleared'
# Reasons of a request, and of its clearing (the vocabulary's HelpReason, as message text).
LOW = HelpReason.LOW.value
STALLED = HelpReason.STALLED.value
ANSWERED = HelpReason.ANSWERED.value
RECOVERED = HelpReason.RECOVERED.value
RESET = HelpReason.RESET.value


@dataclass(frozen=True)
class HelpRequestParams:
    """When to ask for help (part of the policy node's parameters)."""

    help_threshold: float = param(
        0.3, 'Ask for help when the viability p_v stays below this for help_below_for_s.',
        min=0.0, max=1.0)
    help_below_for_s: float = param(
        0.5, 'How long p_v must stay below help_threshold before a request (s).', min=0.0,
        max=60.0)
    help_stall_window_s: float = param(
        2.0, 'Ask for help when p_v has not risen by help_min_rise over this window (s) '
        'while below help_stall_below; 0 turns the stall rule off.', min=0.0, max=600.0)
    help_min_rise: float = param(
        0.02, 'The rise of p_v over help_stall_window_s that counts as progress.', min=0.0,
        max=1.0)
    help_stall_below: float = param(
        0.6, 'The stall rule applies only while p_v is below this.', min=0.0, max=1.0)
    help_clear_above: float = param(
        0.4, 'A request clears when p_v stays above this (above help_threshold: hysteresis) '
        'for help_clear_for_s, or when a human takes over.', min=0.0, max=1.0)
    help_clear_for_s: float = param(
        0.5, 'How long p_v must stay above help_clear_above to clear a request (s).',
        min=0.0, max=60.0)
    help_trace_s: float = param(
        5.0, 'Seconds of p_v history carried with each request event.', min=0.0,
        max=600.0)
    help_use_calibration: bool = param(
        True, 'When the checkpoint carries a calibrated threshold (help_calibration.json, '
        'from habc calibrate), use it and its clear level and time instead of '
        'help_threshold, help_clear_above and help_below_for_s.')

    def __post_init__(self) -> None:
        validate_params(self)
        if self.help_clear_above < self.help_threshold:
            raise ValueError(f'parameter help_clear_above ({self.help_clear_above}) must be at '
                             f'least help_threshold ({self.help_threshold}): a request that '
                             'clears below its own threshold would chatter')


def help_params(params: object) -> HelpRequestParams:
    """Return the HelpRequestParams part of a node's parameters (which extend them)."""
    return HelpRequestParams(**{f.name: getattr(params, f.name)
                                for f in fields(HelpRequestParams)})


@dataclass(frozen=True)
class HelpEvent:
    """A request raised or cleared at `stamp` (s), why, and the p_v trace before it."""

    kind: str                  # RAISED or CLEARED
    reason: str                # LOW or STALLED (raised); ANSWERED, RECOVERED or RESET
    stamp: float
    p_v: float                 # the newest p_v (nan for a clearing without one)
    trace: tuple[tuple[float, float], ...]  # (stamp, p_v), oldest first


class HelpMonitor:
    """Raise and clear help requests from a stream of (stamp, p_v) (module docstring)."""

    def __init__(self, params: HelpRequestParams) -> None:
        self.params = params
        self.request: HelpEvent | None = None  # the open request, if any
        self.critic_problem = ''
        self._trace: deque[tuple[float, float]] = deque()
        self._below_since: float | None = None
        self._above_since: float | None = None
        # The rules look back no further than this (the last clearing: a fresh start).
        self._since = -math.inf
        self._clear_level = params.help_clear_above

    @property
    def requested(self) -> bool:
        return self.request is not None

    def set_critic_problem(self, problem: str) -> HelpEvent | None:
        """Say why there is no usable critic ('' when there is one); clears a request."""
        self.critic_problem = problem
        if problem and self.request is not None:
            return self._clear(RESET, self._trace[-1][0] if self._trace else math.nan)
        return None

    def reset(self, stamp: float = math.nan) -> HelpEvent | None:
        """Forget the history (a new episode, new weights); clears an open request."""
        event = self._clear(RESET, stamp) if self.request is not None else None
        self._trace.clear()
        self._below_since = self._above_since = None
        return event

    def on_takeover(self, stamp: float) -> HelpEvent | None:
        """Record a human takeover: an open request is answered; the history restarts."""
        event = self._clear(ANSWERED, stamp) if self.request is not None else None
        self._trace.clear()
        self._below_since = self._above_since = None
        return event

    def update(self, stamp: float, p_v: float) -> HelpEvent | None:
        """Add the viability of the observation at `stamp`; return an event, if one."""
        if self.critic_problem or not math.isfinite(p_v):
            return None
        if self._trace and stamp <= self._trace[-1][0]:
            return None  # not newer than the last one: nothing new
        p = self.params
        self._trace.append((stamp, float(p_v)))
        keep = max(p.help_trace_s, p.help_stall_window_s)
        while self._trace and self._trace[0][0] < stamp - keep:
            self._trace.popleft()
        if self.request is not None:
            if p_v > self._clear_level:
                if self._above_since is None:
                    self._above_since = stamp
                if stamp - self._above_since >= p.help_clear_for_s:
                    return self._clear(RECOVERED, stamp)
            else:
                self._above_since = None
            return None
        if p_v < p.help_threshold:
            if self._below_since is None:
                self._below_since = stamp
            if stamp - self._below_since >= p.help_below_for_s:
                return self._raise(LOW, stamp, p_v)
        else:
            self._below_since = None
        if self._stalled(stamp, p_v):
            return self._raise(STALLED, stamp, p_v)
        return None

    def _stalled(self, stamp: float, p_v: float) -> bool:
        p = self.params
        if p.help_stall_window_s <= 0.0 or p_v >= p.help_stall_below:
            return False
        start = stamp - p.help_stall_window_s
        if start < self._since:
            return False  # the window reaches back before the last clearing
        window = [value for t, value in self._trace if t >= start]
        # The window must be covered: the oldest kept sample at or before its start.
        covered = self._trace[0][0] <= start + 1e-9
        return covered and max(window) - window[0] < p.help_min_rise

    def _trace_until(self, stamp: float) -> tuple[tuple[float, float], ...]:
        start = stamp - self.params.help_trace_s
        return tuple(item for item in self._trace if item[0] >= start)

    def _raise(self, reason: str, stamp: float, p_v: float) -> HelpEvent:
        self.request = HelpEvent(RAISED, reason, stamp, float(p_v), self._trace_until(stamp))
        self._above_since = None
        p = self.params
        # Recovery: out of what raised it, with the hysteresis above it.
        self._clear_level = (p.help_clear_above if reason == LOW
                             else min(p.help_stall_below, p_v + p.help_min_rise))
        return self.request

    def _clear(self, reason: str, stamp: float) -> HelpEvent:
        p_v = self._trace[-1][1] if self._trace else math.nan
        self.request = None
        self._below_since = self._above_since = None
        if math.isfinite(stamp):
            self._since = stamp
        return HelpEvent(CLEARED, reason, stamp, p_v, self._trace_until(stamp))
