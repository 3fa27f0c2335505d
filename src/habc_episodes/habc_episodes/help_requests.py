"""An episode's help requests, and which takeovers were asked for (no rclpy).

The policy node asks for a human on `help_request` (habc_msgs/HelpRequest, recorded in each
episode's bag): a message with `active` True raises a request (reason low or stalled), one
with `active` False clears it (answered: a human took over; recovered; reset). The arbiter's
InterventionState says on every tick who drives and why: its `reason` on the first human
tick of a takeover is who engaged it ('engage': a press on teleop/engage, by the pedal, a
button or the scripted operator; 'deviation': the leader arm pulled away from the follower).

From both, an episode's requests become records (when raised, when cleared and why, by whom
answered) and each takeover is marked requested (a request was open when it started, or it
answered one) or spontaneous. The episode reader (episode_bags) and the recorder (for the
episode index) both build them here, so the bag and the index count alike.

Times are seconds from the episode's first step (its first executed action), on the clock of
the messages' header stamps; a request raised before that step has a negative raised_at.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
import math
from typing import Any

import numpy as np

from habc_episodes.vocabulary import Controller, HelpReason

HELP_REQUEST_TYPE = 'habc_msgs/msg/HelpRequest'
# How a request ended, for counting: answered by a takeover, recovered without one, or
# neither (reset, or still open when the episode ended).
ANSWERED = HelpReason.ANSWERED.label
RECOVERED = HelpReason.RECOVERED.label
UNANSWERED = 'unanswered'
HELP_OUTCOMES = (ANSWERED, RECOVERED, UNANSWERED)
# The answered clearing carries the stamp of the takeover's first human tick after a round
# trip through float seconds (~0.2 us off at today's epoch); well below a control period.
TIME_TOLERANCE_S = 1e-3


@dataclass(frozen=True)
class HelpMessage:
    """One recorded habc_msgs/HelpRequest: raised (`active`) or cleared at `stamp` (s)."""

    stamp: float
    active: bool
    reason: str
    p_v: float
    policy_version: str = ''

    @classmethod
    def of(cls, message: Any, receive_ns: int) -> HelpMessage:
        """Read a HelpRequest message (rclpy or rosbags) received at `receive_ns`.

        A clearing without a known time has a zero header stamp: the receive time stands in.
        """
        stamp = message.header.stamp
        stamp_ns = int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)
        return cls((stamp_ns if stamp_ns > 0 else int(receive_ns)) * 1e-9,
                   bool(message.active), str(message.reason), float(message.viability),
                   str(message.policy_version))


@dataclass(frozen=True)
class HelpRequestRecord:
    """One help request of an episode (times in s from the episode's first step).

    Attributes:
        raised_at: when it was raised; None when the raise is not in the recording (it was
            raised before the bag began).
        reason: why it was raised (low, stalled); '' when the raise is not recorded.
        p_v: the viability at the raise (None when unknown).
        cleared_at: when it was cleared; None while it was still open at the end.
        cleared_reason: answered, recovered or reset; '' while open.
        answered_by: for an answered request, who engaged the takeover that answered it
            (InterventionState.reason: 'engage', 'deviation'); '' otherwise, or when the
            recording does not say.
        policy_version: the weights whose critic asked.
    """

    raised_at: float | None
    reason: str
    p_v: float | None
    cleared_at: float | None
    cleared_reason: str
    answered_by: str = ''
    policy_version: str = ''

    @property
    def outcome(self) -> str:
        """Return answered, recovered or unanswered (reset, or open at the end)."""
        if self.cleared_reason in (ANSWERED, RECOVERED):
            return self.cleared_reason
        return UNANSWERED

    def to_dict(self) -> dict[str, Any]:
        """Return the record as JSON-ready values (the episode index stores them so)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HelpRequestRecord:
        """Read to_dict()'s values back; unknown keys are ignored, missing ones default."""
        def number(key: str) -> float | None:
            value = data.get(key)
            return None if value is None else float(value)
        return cls(raised_at=number('raised_at'), reason=str(data.get('reason', '')),
                   p_v=number('p_v'), cleared_at=number('cleared_at'),
                   cleared_reason=str(data.get('cleared_reason', '')),
                   answered_by=str(data.get('answered_by', '')),
                   policy_version=str(data.get('policy_version', '')))


@dataclass(frozen=True)
class Takeover:
    """One takeover by a human: when (s from the episode's first step), by whom, and why.

    `requested`: a help request was open when it started, or it answered one; else the
    human took over on their own (spontaneous). `step`: the episode step where it starts
    (None where steps are not counted, as in the recorder).
    """

    at: float
    by: str
    requested: bool
    step: int | None = None


@dataclass(frozen=True)
class HelpSummary:
    """An episode's help requests and takeovers."""

    requests: tuple[HelpRequestRecord, ...] = ()
    takeovers: tuple[Takeover, ...] = ()

    @property
    def requested_takeovers(self) -> int:
        return sum(takeover.requested for takeover in self.takeovers)

    @property
    def spontaneous_takeovers(self) -> int:
        return len(self.takeovers) - self.requested_takeovers

    def count(self, outcome: str) -> int:
        """Return how many requests ended so (one of HELP_OUTCOMES)."""
        return sum(record.outcome == outcome for record in self.requests)


class TakeoverDetector:
    """Find takeovers in a stream of executed sources: switches into HUMAN from POLICY.

    HOLD in between is ignored: a watchdog hold while the human drives is not a new
    takeover. An episode that starts under human control has one at its start.
    """

    def __init__(self) -> None:
        self._driver: int | None = None  # the last executed source other than HOLD

    def on_source(self, source: int) -> bool:
        """Take the executed source of one tick; return True when a takeover starts."""
        if source == Controller.HOLD:
            return False
        started = source == Controller.HUMAN and self._driver != Controller.HUMAN
        self._driver = int(source)
        return started


def takeover_steps(controllers: Sequence[int] | np.ndarray) -> np.ndarray:
    """Return the steps where takeovers start (TakeoverDetector's rule over a whole array)."""
    controllers = np.asarray(controllers)
    driving = np.flatnonzero(controllers != Controller.HOLD)
    human = controllers[driving] == Controller.HUMAN
    after_other = np.concatenate([[True], ~human[:-1]]) if len(human) else human
    return driving[human & after_other]


def summarize_help(messages: Iterable[HelpMessage],
                   takeovers: Iterable[tuple[float, str, int | None]],
                   start: float) -> HelpSummary:
    """Pair raises with clearings and mark the takeovers that help was asked for.

    Args:
        messages: the episode's HelpRequest messages (any order; stamps in s).
        takeovers: (stamp s, who engaged it, step or None) of each takeover's first human
            tick.
        start: stamp (s) of the episode's first step; the result counts from it.
    """
    ordered: list[HelpMessage] = []
    for message in sorted(messages, key=lambda m: m.stamp):
        if ordered and (ordered[-1].stamp, ordered[-1].active, ordered[-1].reason) == (
                message.stamp, message.active, message.reason):
            continue  # a latched message delivered twice (a recorder that resubscribed)
        ordered.append(message)
    # (raise or None, clearing or None, end of the time it was open) per request.
    spans: list[tuple[HelpMessage | None, HelpMessage | None, float]] = []
    raised: HelpMessage | None = None
    for message in ordered:
        if message.active:
            if raised is not None:  # its clearing was lost: it ended where this one began
                spans.append((raised, None, message.stamp))
            raised = message
        else:
            spans.append((raised, message, message.stamp))
            raised = None
    if raised is not None:
        spans.append((raised, None, math.inf))

    moments = sorted(takeovers, key=lambda item: item[0])
    requested = [False] * len(moments)
    answered_by = [''] * len(spans)
    for k, (raise_message, clearing, end) in enumerate(spans):
        begin = raise_message.stamp if raise_message is not None else -math.inf
        for j, (stamp, _, _) in enumerate(moments):
            if begin - TIME_TOLERANCE_S <= stamp <= end + TIME_TOLERANCE_S:
                requested[j] = True
        if clearing is not None and clearing.reason == ANSWERED:
            # The takeover that answered it: the newest one at the clearing.
            answering = [j for j, (stamp, _, _) in enumerate(moments)
                         if begin - TIME_TOLERANCE_S <= stamp
                         <= clearing.stamp + TIME_TOLERANCE_S]
            if answering:
                answered_by[k] = moments[answering[-1]][1]
                requested[answering[-1]] = True

    def since(stamp: float | None) -> float | None:
        return None if stamp is None or not math.isfinite(stamp) else stamp - start

    records = []
    for (raise_message, clearing, _), by in zip(spans, answered_by, strict=True):
        p_v = raise_message.p_v if raise_message is not None else math.nan
        version = (raise_message or clearing).policy_version
        records.append(HelpRequestRecord(
            raised_at=since(raise_message.stamp if raise_message else None),
            reason=raise_message.reason if raise_message else '',
            p_v=float(p_v) if math.isfinite(p_v) else None,
            cleared_at=since(clearing.stamp if clearing else None),
            cleared_reason=clearing.reason if clearing else '',
            answered_by=by, policy_version=version))
    return HelpSummary(tuple(records), tuple(
        Takeover(at=stamp - start, by=by, requested=flag, step=step)
        for (stamp, by, step), flag in zip(moments, requested, strict=True)))


def mark_requested(requests: Sequence[HelpRequestRecord],
                   takeovers: Iterable[tuple[float, str, int | None]]) -> tuple[Takeover, ...]:
    """Return the takeovers (at s from the first step, by, step) marked against `requests`.

    For an episode whose requests are known as records only (no messages): a takeover is
    requested when it falls in the time a request was open.
    """
    result = []
    for at, by, step in sorted(takeovers, key=lambda item: item[0]):
        flag = any(
            (-math.inf if r.raised_at is None else r.raised_at) - TIME_TOLERANCE_S <= at
            <= (math.inf if r.cleared_at is None else r.cleared_at) + TIME_TOLERANCE_S
            for r in requests)
        result.append(Takeover(at=at, by=by, requested=flag, step=step))
    return tuple(result)


class HelpLog:
    """Collect one episode's help requests and takeovers as its messages arrive.

    The recorder feeds it while it records (executed actions, intervention states, help
    requests, in any order between topics) and asks for the summary at the end.
    """

    def __init__(self) -> None:
        self.messages: list[HelpMessage] = []
        self.takeovers: list[tuple[float, str, int | None]] = []
        self.first_step: float | None = None
        self._detector = TakeoverDetector()

    def on_step(self, stamp: float) -> None:
        """Take the stamp (s) of an executed action of the episode."""
        if self.first_step is None or stamp < self.first_step:
            self.first_step = stamp

    def on_source(self, stamp: float, source: int, reason: str) -> None:
        """Take one InterventionState: its stamp (s), executed source and reason."""
        if self._detector.on_source(source):
            self.takeovers.append((stamp, reason, None))

    def on_help(self, message: HelpMessage) -> None:
        """Take one HelpRequest."""
        self.messages.append(message)

    def summary(self) -> HelpSummary:
        """Return the episode's requests and takeovers (times from its first step)."""
        start = self.first_step
        if start is None:  # no step recorded: count from the first thing that was
            stamps = [m.stamp for m in self.messages] + [t[0] for t in self.takeovers]
            start = min(stamps, default=0.0)
        return summarize_help(self.messages, self.takeovers, start)
