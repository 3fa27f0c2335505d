"""The dashboard's plain model (no Qt, no rclpy): timelines, live state, status summaries.

Everything the dashboard shows is computed here from plain values, so it is unit-tested
without a display or a ROS graph:
  - intervention timelines: segments of one controller, from (stamp, source, segment_id)
    ticks as the teleop arbiter publishes them on `intervention` and as the episode recorder
    stores them in each episode's bag;
  - the live state of the robot: the current episode, its elapsed time and who controls it,
    from `intervention` and `recorder/events`;
  - the summaries of the JSON status topics of the learner and the policy node;
  - the viability p_v = P(success | state) of the running policy over an episode, from the
    ActionChunks on `policy/chunk` (or the traces of help requests), and the help requests
    of every watched robot (`help_request`): which are open, and how the last ones ended.
The statistics per policy version (success rate, takeovers) are habc_episodes.stats', shared
with `habc demo`.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
import json
import math
from pathlib import Path
import re
import statistics
from typing import Any

from habc_episodes.episode import robot_label
from habc_episodes.help_requests import HELP_REQUEST_TYPE, HelpMessage
from habc_episodes.stats import version_stats, VersionStats
from habc_episodes.vocabulary import Controller, RecorderEvent

INTERVENTION_TYPE = 'habc_msgs/msg/InterventionState'
EXECUTED_ACTION_TYPE = 'habc_msgs/msg/ExecutedAction'
CHUNK_TYPE = 'habc_msgs/msg/ActionChunk'

# Where the recorder's default storage_dir puts its episode index.
DEFAULT_INDEX = '~/.habc/episodes/episodes.sqlite'

# Without a tick for this long the arbiter is considered gone (it publishes every tick).
STALE_AFTER_S = 1.0


def source_name(source: int) -> str:
    """Return 'policy', 'human', 'hold', or 'source N' for a value this code does not know."""
    try:
        return Controller(source).label
    except ValueError:
        return f'source {source}'


# Timelines -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Segment:
    """A stretch of control ticks with one source and one segment id; times in seconds."""

    source: int
    segment_id: int
    start: float
    end: float
    ticks: int

    @property
    def duration(self) -> float:
        return self.end - self.start


class TimelineBuilder:
    """Collect control ticks and cut them into segments.

    A segment starts at every tick whose segment_id or source differs from the previous
    tick's (the arbiter increments segment_id at every switch of source; comparing both also
    splits a stream that does not number its segments). Each tick covers the time from its
    stamp to the next tick's stamp, and the last tick the median tick interval, so segments
    touch and a one-tick segment is still visible. A stamp earlier than the previous one
    (a clock step) is taken as the previous one: time never runs backwards in a timeline.
    """

    def __init__(self) -> None:
        self._closed: list[Segment] = []
        self._source: int | None = None
        self._segment_id = 0
        self._start = 0.0
        self._ticks = 0
        self._last = 0.0
        self._intervals: list[float] = []
        self.origin: float | None = None
        self.count = 0

    def add(self, stamp: float, source: int, segment_id: int) -> None:
        """Add one tick at `stamp` (seconds)."""
        if self.origin is None:
            self.origin = stamp
        else:
            stamp = max(stamp, self._last)
            # Enough intervals for a stable median; older ones say nothing more.
            if len(self._intervals) < 1000:
                self._intervals.append(stamp - self._last)
        if self._source is None or source != self._source or segment_id != self._segment_id:
            if self._source is not None:
                self._closed.append(Segment(self._source, self._segment_id, self._start, stamp,
                                            self._ticks))
            self._source, self._segment_id, self._start, self._ticks = (
                source, segment_id, stamp, 0)
        self._ticks += 1
        self._last = stamp
        self.count += 1

    def tick_interval(self) -> float:
        """Return the median interval between ticks (0 with fewer than two ticks)."""
        return statistics.median(self._intervals) if self._intervals else 0.0

    def segments(self) -> list[Segment]:
        """Return the segments so far, the last one ending one tick interval after its tick."""
        if self._source is None:
            return []
        last = Segment(self._source, self._segment_id, self._start,
                       self._last + self.tick_interval(), self._ticks)
        return [*self._closed, last]


def segments_from_ticks(ticks: Iterable[tuple[float, int, int]]) -> list[Segment]:
    """Return the segments of (stamp_s, source, segment_id) ticks given in time order."""
    builder = TimelineBuilder()
    for stamp, source, segment_id in ticks:
        builder.add(stamp, source, segment_id)
    return builder.segments()


@dataclass(frozen=True)
class Timeline:
    """The segments of one episode; `origin` is the time its row starts at (seconds)."""

    episode_id: str
    segments: tuple[Segment, ...]
    origin: float

    @property
    def duration(self) -> float:
        return self.segments[-1].end - self.origin if self.segments else 0.0

    def sources(self) -> list[int]:
        return [segment.source for segment in self.segments]


def stamp_seconds(sec: int, nanosec: int) -> float:
    """Return a builtin_interfaces/Time as float seconds."""
    return sec + nanosec * 1e-9


def timeline_from_bag(path: str | Path, episode_id: str = '') -> Timeline:
    """Return the intervention timeline of a recorded episode bag.

    Uses the InterventionState topic (found by type, so any namespace works); a bag without
    one falls back to the ExecutedAction topic, whose ticks carry the same source and
    segment id. Times are the messages' header stamps (the control tick times); a message
    with a zero stamp takes the time the recorder received it.

    Raises:
        FileNotFoundError: no bag at `path`.
        ValueError: the bag has neither topic.
    """
    # Imported here: rosbags is only needed once a past episode is shown.
    from habc_episodes.bag_format import read_episode_messages

    path = Path(path)
    by_type = _topics_by_type(path)
    topics = by_type.get(INTERVENTION_TYPE) or by_type.get(EXECUTED_ACTION_TYPE)
    if not topics:
        raise ValueError(f'bag {path} has no {INTERVENTION_TYPE} or {EXECUTED_ACTION_TYPE} '
                         'messages: no timeline to show')
    ticks = []
    for _topic, log_time, msg in read_episode_messages(path, topics[:1]):
        stamp = stamp_seconds(msg.header.stamp.sec, msg.header.stamp.nanosec)
        ticks.append((stamp if stamp > 0 else log_time * 1e-9, int(msg.source),
                      int(msg.segment_id)))
    segments = segments_from_ticks(ticks)
    return Timeline(episode_id or path.name, tuple(segments),
                    segments[0].start if segments else 0.0)


# Viability and help requests ------------------------------------------------------------------

# p_v points kept per live episode: chunks at 10 Hz for more than an hour.
MAX_VIABILITY_POINTS = 50_000
# Longer than this without a p_v (a takeover, a hold) is drawn as a gap, not a line across
# it: chunks come several times a second while the policy drives.
MAX_VIABILITY_GAP_S = 1.0
# A help request's trace point and the chunk of the same observation differ by the rounding
# of the chunk's header stamp to nanoseconds; this close, two points are one.
_SAME_STAMP_S = 1e-6
# How long the note of a cleared request stays in the banner (s of time.monotonic()).
CLEARED_NOTE_S = 15.0
# Help events kept per robot, for the marks on its p_v trace.
HELP_HISTORY = 200

RAISED = 'raised'
CLEARED = 'cleared'
# What the reasons of habc_msgs/HelpRequest mean to an operator.
RAISE_REASONS = {'low': 'p_v low', 'stalled': 'p_v not rising'}
CLEAR_REASONS = {'answered': 'answered: a human took over',
                 'recovered': 'recovered: p_v back up',
                 'reset': 'withdrawn: new weights or no critic'}


class ViabilitySeries:
    """p_v over time: (stamp_s, p_v) points in stamp order; a NaN p_v (no critic) is a gap.

    Points may come in any order (a help request's trace reaches back before the newest
    chunk); a point at the stamp of one already there is the same observation and is
    dropped. `revision` grows on every change, so a view copies the points only then.
    """

    def __init__(self, max_points: int = MAX_VIABILITY_POINTS) -> None:
        self.max_points = max_points
        self.revision = 0
        self._stamps: list[float] = []
        self._values: list[float] = []
        self._estimates = 0  # finite values among them
        self._snapshot: tuple[int, tuple[tuple[float, float], ...]] = (-1, ())

    def __len__(self) -> int:
        return len(self._stamps)

    def add(self, stamp: float, p_v: float) -> bool:
        """Add p_v at `stamp` (s); return False if a point at that stamp is there already."""
        i = bisect.bisect_left(self._stamps, stamp - _SAME_STAMP_S)
        if i < len(self._stamps) and self._stamps[i] <= stamp + _SAME_STAMP_S:
            return False
        self._stamps.insert(i, stamp)
        self._values.insert(i, float(p_v))
        self._estimates += math.isfinite(p_v)
        if len(self._stamps) > self.max_points:
            # The oldest go: the operator looks at the newest.
            drop = len(self._stamps) - self.max_points
            self._estimates -= sum(math.isfinite(v) for v in self._values[:drop])
            del self._stamps[:drop], self._values[:drop]
        self.revision += 1
        return True

    def points(self) -> tuple[tuple[float, float], ...]:
        """Return the points, oldest first (one copy per revision)."""
        if self._snapshot[0] != self.revision:
            self._snapshot = (self.revision, tuple(zip(self._stamps, self._values,
                                                       strict=True)))
        return self._snapshot[1]

    def latest(self) -> tuple[float, float] | None:
        """Return the newest point (None while empty)."""
        return (self._stamps[-1], self._values[-1]) if self._stamps else None

    def has_estimate(self) -> bool:
        """Return True when at least one point has a p_v (not NaN)."""
        return self._estimates > 0


@dataclass(frozen=True)
class HelpMark:
    """One habc_msgs/HelpRequest of the robot in `namespace`: a request raised or cleared."""

    namespace: str
    stamp: float               # the observation it was decided on (s)
    active: bool               # True: raised; False: cleared
    reason: str                # low | stalled; answered | recovered | reset
    p_v: float
    policy_version: str = ''
    received: float = math.nan  # time.monotonic() at arrival (NaN: read from a bag)


@dataclass(frozen=True)
class HelpSpan:
    """The time a help request was open: from `start` to `end` (None: still open)."""

    start: float
    end: float | None
    reason: str
    cleared_reason: str = ''
    p_v: float = math.nan


def help_spans(marks: Iterable[HelpMark]) -> list[HelpSpan]:
    """Return the spans of the requests in `marks` (one robot's, in time order).

    A second raise before a clearing continues the open request (a clearing was lost); a
    clearing without an open request (it was raised before the first mark) is skipped.
    """
    spans = []
    raised: HelpMark | None = None
    for mark in marks:
        if mark.active:
            raised = raised or mark
        elif raised is not None:
            spans.append(HelpSpan(raised.stamp, max(mark.stamp, raised.stamp), raised.reason,
                                  mark.reason, raised.p_v))
            raised = None
    if raised is not None:
        spans.append(HelpSpan(raised.stamp, None, raised.reason, '', raised.p_v))
    return spans


def robot_name(namespace: str) -> str:
    """Return how the banner names the robot in `namespace`: 'robot1', or 'robot (/)'."""
    label = robot_of_namespace(namespace)
    return label if '/' + label == namespace else f'{label} ({namespace})'


def _minutes(seconds: float) -> str:
    seconds = max(0.0, seconds)
    return f'{int(seconds // 60)}:{int(seconds % 60):02d}'


def _p_v(value: float) -> str:
    return f'{value:.2f}' if math.isfinite(value) else 'unknown'


@dataclass(frozen=True)
class HelpBanner:
    """What the help banner shows: `level` 'help' (requests open), 'cleared' or '' (hidden)."""

    level: str
    lines: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()  # the robot of each line


class HelpAlerts:
    """The open help requests of every watched robot, and how the last ones ended.

    Fed with the HelpRequest messages of each robot in their order (the policy publishes
    one on every change, latched: a dashboard that starts later gets the last ten).
    """

    def __init__(self, history: int = HELP_HISTORY) -> None:
        self.open: dict[str, HelpMark] = {}
        self.cleared: dict[str, tuple[HelpMark, HelpMark]] = {}  # (raise, clearing)
        self._history: dict[str, deque[HelpMark]] = {}
        self._size = history
        self.revision = 0

    def on_help(self, mark: HelpMark) -> str:
        """Take one message; return RAISED or CLEARED when it opens or ends a request, else ''.

        A raise while one is open continues it (its start stays); a clearing without an
        open request (raised before this dashboard's history) changes nothing.
        """
        history = self._history.setdefault(mark.namespace, deque(maxlen=self._size))
        if history and (history[-1].stamp, history[-1].active, history[-1].reason) == (
                mark.stamp, mark.active, mark.reason):
            return ''  # the same event again
        history.append(mark)
        self.revision += 1
        if mark.active:
            if mark.namespace in self.open:
                return ''
            self.open[mark.namespace] = mark
            self.cleared.pop(mark.namespace, None)
            return RAISED
        raised = self.open.pop(mark.namespace, None)
        if raised is None:
            return ''
        self.cleared[mark.namespace] = (raised, mark)
        return CLEARED

    def events(self, namespace: str) -> list[HelpMark]:
        """Return the help events of the robot in `namespace`, oldest first."""
        return list(self._history.get(namespace, ()))

    def banner(self, now: float, received_now: float) -> HelpBanner:
        """Return the banner at ROS time `now` and monotonic time `received_now`.

        Open requests, oldest first, with how long they wait; else the requests that
        cleared within CLEARED_NOTE_S, with why.
        """
        if self.open:
            marks = sorted(self.open.values(), key=lambda m: m.stamp)
            return HelpBanner(RAISED, tuple(
                f'{robot_name(m.namespace)} asks for help: '
                f'{RAISE_REASONS.get(m.reason, m.reason or "no reason given")} '
                f'({_p_v(m.p_v)}), waiting {_minutes(now - m.stamp)}'
                + (f' (policy {m.policy_version})' if m.policy_version else '')
                for m in marks), tuple(m.namespace for m in marks))
        recent = sorted((pair for pair in self.cleared.values()
                         if received_now - pair[1].received <= CLEARED_NOTE_S),
                        key=lambda pair: pair[1].stamp)
        if not recent:
            return HelpBanner('')
        lines = []
        for raised, clearing in recent:
            why = CLEAR_REASONS.get(clearing.reason, clearing.reason or 'cleared')
            if clearing.reason == 'recovered' and math.isfinite(clearing.p_v):
                why += f' to {clearing.p_v:.2f}'
            lines.append(f'{robot_name(raised.namespace)}: help request '
                         f'({RAISE_REASONS.get(raised.reason, raised.reason)}) {why}')
        return HelpBanner(CLEARED, tuple(lines), tuple(r.namespace for r, _ in recent))


def decimate(points: Sequence[tuple[float, float]], start: float, end: float,
             buckets: int, max_gap_s: float = MAX_VIABILITY_GAP_S
             ) -> list[list[tuple[float, float]]]:
    """Return the runs of finite points with `start` <= stamp <= `end`, for drawing.

    A NaN p_v ends a run (no estimate: a gap in the line), and so does a gap of more than
    `max_gap_s` between two points (no inference: a human drove, or the robot held). Of the
    points that fall into one of `buckets` equal slices of the time range (a pixel column),
    the first, lowest, highest and last are kept: an hour of chunks draws as fast as a
    minute and looks the same.
    """
    width = (end - start) / max(1, buckets) if end > start else 1.0
    runs: list[list[list[tuple[float, float]]]] = []
    groups: list[list[tuple[float, float]]] = []
    bucket = None
    previous = None
    for stamp, value in points:
        if stamp < start or stamp > end:
            continue
        if not math.isfinite(value) or (previous is not None
                                        and stamp - previous > max_gap_s):
            if groups:
                runs.append(groups)
                groups = []
            bucket = None
        previous = stamp if math.isfinite(value) else None
        if not math.isfinite(value):
            continue
        slot = int((stamp - start) / width)
        if slot != bucket:
            groups.append([])
            bucket = slot
        groups[-1].append((stamp, value))
    if groups:
        runs.append(groups)
    lines = []
    for run in runs:
        line: list[tuple[float, float]] = []
        for group in run:
            low = min(group, key=lambda p: p[1])
            high = max(group, key=lambda p: p[1])
            line.extend(sorted({group[0], low, high, group[-1]}))
        lines.append(line)
    return lines


def critic_problem(status: dict[str, Any]) -> str | None:
    """Return why the policy has no usable critic: '' when it has one, None when unknown.

    From policy/status's 'critic' ('ok', or why not; null without a policy), else its
    help.critic_problem.
    """
    if 'critic' in status:
        critic = status['critic']
        if critic == 'ok':
            return ''
        return 'no policy loaded' if critic is None else str(critic)
    help_status = status.get('help')
    if isinstance(help_status, dict) and help_status.get('critic_problem'):
        return str(help_status['critic_problem'])
    return None


def help_threshold(status: dict[str, Any]) -> float | None:
    """Return the p_v below which the policy asks for help, if policy/status says it.

    Looked up as help.threshold, then help_threshold (the policy node's parameter name).
    """
    help_status = status.get('help')
    candidates = [help_status.get('threshold') if isinstance(help_status, dict) else None,
                  status.get('help_threshold')]
    for value in candidates:
        if (isinstance(value, int | float) and not isinstance(value, bool)
                and 0.0 <= value <= 1.0):
            return float(value)
    return None


def viability_note(series: ViabilitySeries, problem: str | None) -> str:
    """Return why the newest p_v of a live series is missing ('' when it is there).

    `problem` is critic_problem() of policy/status.
    """
    latest = series.latest()
    if latest is not None and math.isfinite(latest[1]):
        return ''
    if problem:
        return f'no critic: {problem}'
    if latest is None:
        return 'no p_v yet: no action chunk in this episode'
    if problem is None:
        return 'no critic (policy/status has not said why yet)'
    return 'no critic: the chunks carry no p_v'


@dataclass(frozen=True)
class ViabilityTrace:
    """The p_v of one recorded episode and its help requests, read from its bag."""

    episode_id: str
    points: tuple[tuple[float, float], ...]
    help: tuple[HelpMark, ...]
    source: str       # where the points come from: CHUNK_TYPE, HELP_REQUEST_TYPE or ''
    note: str = ''    # why nothing is drawn ('' when some p_v is)


def viability_from_bag(path: str | Path, episode_id: str = '') -> ViabilityTrace:
    """Return the p_v trace and the help requests of a recorded episode bag.

    p_v comes from the ActionChunk topic (`policy/chunk` is one of the recorder's default
    topics): one point per chunk, at the stamp of the observation it was planned from. A bag
    without chunks (a recorder whose `topics` leave policy/chunk out) falls back to the
    traces the help requests carry, which cover only the help_trace_s before each event.
    Topics are found by type, so any namespace works; a message with a zero stamp takes the
    time the recorder received it.

    Raises:
        FileNotFoundError: no bag at `path`.
    """
    from habc_episodes.bag_format import read_episode_messages

    path = Path(path)
    by_type = _topics_by_type(path)
    chunk_topics = by_type.get(CHUNK_TYPE, [])[:1]
    help_topics = by_type.get(HELP_REQUEST_TYPE, [])[:1]
    chunks = ViabilitySeries(max_points=2**62)
    traces = ViabilitySeries(max_points=2**62)
    marks = []
    unversioned = False  # chunks recorded before ActionChunk carried p_v
    for topic, log_time, msg in read_episode_messages(path, chunk_topics + help_topics):
        stamp = stamp_seconds(msg.header.stamp.sec, msg.header.stamp.nanosec) or log_time * 1e-9
        if topic in chunk_topics:
            p_v = getattr(msg, 'viability', None)
            unversioned |= p_v is None
            chunks.add(stamp, math.nan if p_v is None else float(p_v))
            continue
        namespace = topic[:-len('/help_request')] if topic.endswith('/help_request') else ''
        request = HelpMessage.of(msg, log_time)
        marks.append(HelpMark(namespace or '/', request.stamp, request.active, request.reason,
                              request.p_v, request.policy_version))
        for t, v in zip(msg.trace_stamps, msg.trace_viability, strict=False):
            traces.add(float(t), float(v))
    episode_id = episode_id or path.name
    if len(chunks):
        note = ''
        if unversioned:
            note = 'no p_v: the chunks were recorded before ActionChunk carried it'
        elif not chunks.has_estimate():
            note = 'no critic: the recorded chunks carry no p_v'
        return ViabilityTrace(episode_id, chunks.points(), tuple(marks), CHUNK_TYPE, note)
    if len(traces):
        return ViabilityTrace(episode_id, traces.points(), tuple(marks), HELP_REQUEST_TYPE)
    return ViabilityTrace(episode_id, (), tuple(marks), '',
                          'no p_v in the bag: policy/chunk was not recorded'
                          + (' and no help request was raised' if not marks else ''))


# Live state ----------------------------------------------------------------------------------

class LiveState:
    """What the robot does now, from InterventionState ticks and EpisodeEvents.

    Times: `stamp` arguments are ROS times of the messages (seconds), `now` the ROS time of
    the dashboard's clock, and `received` a monotonic time of arrival (for staleness).
    """

    def __init__(self) -> None:
        self.episode_id = ''          # the recording episode ('' between episodes)
        self.started_at: float | None = None
        self.last_finished_id = ''    # the episode an unaimed label goes to
        self.last_finished_duration: float | None = None
        self.policy_version = ''
        self.num_steps = 0
        self.num_interventions = 0
        self.source: int | None = None
        self.reason = ''
        self.last_tick_received: float | None = None
        self.timeline = TimelineBuilder()
        self.timeline_episode = ''    # the episode whose ticks `timeline` holds
        self.viability = ViabilitySeries()  # p_v of that episode
        self.revision = 0             # grows on every change: views redraw only then

    def on_event(self, event: int, episode_id: str, stamp: float, *, num_steps: int = 0,
                 num_interventions: int = 0, policy_version: str = '') -> None:
        """Take one EpisodeEvent."""
        self.revision += 1
        if event == RecorderEvent.START:
            self.episode_id, self.started_at = episode_id, stamp
            self.policy_version = policy_version
            self.num_steps, self.num_interventions = num_steps, num_interventions
            if self.timeline_episode != episode_id:
                self._new_timeline(episode_id)
        elif event == RecorderEvent.END:
            if episode_id == self.episode_id:
                if self.started_at is not None:
                    self.last_finished_duration = max(0.0, stamp - self.started_at)
                self.episode_id, self.started_at = '', None
            elif episode_id != self.last_finished_id:
                self.last_finished_duration = None  # its start was before this dashboard
            self.last_finished_id = episode_id
            self.num_steps, self.num_interventions = num_steps, num_interventions
            self.policy_version = policy_version or self.policy_version

    def on_intervention(self, stamp: float, source: int, segment_id: int, episode_id: str,
                        reason: str, received: float) -> None:
        """Take one InterventionState tick."""
        self.revision += 1
        self.source, self.reason, self.last_tick_received = source, reason, received
        if not episode_id:
            return  # between episodes: nothing to add to a timeline
        if not self.episode_id and episode_id != self.last_finished_id:
            # The START event was missed (this dashboard started mid-episode, or the
            # recorder's latched event was replaced already): the arbiter knows the episode.
            self.episode_id, self.started_at = episode_id, stamp
        if episode_id != self.timeline_episode:
            self._new_timeline(episode_id)
        self.timeline.add(stamp, source, segment_id)

    def on_chunk(self, stamp: float, p_v: float) -> None:
        """Take the p_v of one ActionChunk (NaN: no critic), while an episode records."""
        if not self.episode_id:
            return  # between episodes the policy is paused or its p_v belongs to no episode
        if self.timeline_episode != self.episode_id:
            self._new_timeline(self.episode_id)
        if self.viability.add(stamp, p_v):
            self.revision += 1

    def on_help_trace(self, stamps: Sequence[float], values: Sequence[float]) -> None:
        """Add the p_v trace of a help request (this dashboard may have missed those chunks).

        Points from before the current episode started are left out.
        """
        if not self.episode_id:
            return
        if self.timeline_episode != self.episode_id:
            self._new_timeline(self.episode_id)
        start = -math.inf if self.started_at is None else self.started_at
        added = [self.viability.add(float(t), float(v))
                 for t, v in zip(stamps, values, strict=False) if t >= start]
        if any(added):
            self.revision += 1

    def _new_timeline(self, episode_id: str) -> None:
        self.timeline = TimelineBuilder()
        self.timeline_episode = episode_id
        self.viability = ViabilitySeries()

    def elapsed(self, now: float) -> float | None:
        """Return the seconds since the current episode started (None between episodes)."""
        if not self.episode_id or self.started_at is None:
            return None
        return max(0.0, now - self.started_at)

    def controller(self, received_now: float) -> tuple[int | None, str]:
        """Return (source or None, a description) of who controls the robot now."""
        if self.source is None or self.last_tick_received is None:
            return None, 'no arbiter ticks yet'
        age = received_now - self.last_tick_received
        if age > STALE_AFTER_S:
            return None, f'no arbiter ticks for {age:.0f} s'
        text = source_name(self.source).upper()
        return self.source, f'{text} ({self.reason})' if self.reason else text

    def live_timeline(self) -> Timeline | None:
        """Return the timeline of the current (or just finished) episode, if it has ticks."""
        segments = self.timeline.segments()
        if not segments:
            return None
        return Timeline(self.timeline_episode, tuple(segments), segments[0].start)


def label_target(selected: str, last_finished: str, newest_finished: str) -> str:
    """Return the episode a label button applies to ('' when there is none).

    A row selected in the table wins (relabelling), then the episode that ended last while
    the dashboard watched, then the newest finished episode of the index.
    """
    return selected or last_finished or newest_finished


# Status topics -----------------------------------------------------------------------------

def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f'{value:.4g}'
    return '-' if value is None or value == '' else str(value)


def parse_status(text: str) -> dict[str, Any]:
    """Parse a JSON status string; a malformed one gives {'error': why}."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        return {'error': f'status is not JSON: {exc}'}
    return data if isinstance(data, dict) else {'error': 'status is not a JSON object'}


def policy_summary(status: dict[str, Any]) -> list[tuple[str, str]]:
    """Return (name, value) rows of policy/status (habc_policy.policy_runtime's status)."""
    active, staged = status.get('active_version'), status.get('staged_version')
    text = 'no policy loaded' if active is None else f'version {_fmt(active)} active'
    if staged is not None:
        text += f', {_fmt(staged)} staged'
    rows = [('policy', text)]
    update = status.get('last_update')
    if isinstance(update, dict):
        text = f'{_fmt(update.get("version"))} {_fmt(update.get("result"))}'
        if update.get('reason'):
            text += f': {update["reason"]}'
        rows.append(('last update', text))
    problem = critic_problem(status)
    if problem is not None:
        rows.append(('critic', 'ok' if not problem else f'none: {problem}'))
    if 'error' in status:
        rows.append(('policy error', _fmt(status['error'])))
    return rows


# Metrics of a learner round worth a glance, in this order; the others follow by name.
_KEY_METRICS = ('round/episodes', 'round/samples', 'round/seconds', 'losses/actor',
                'losses/critic')


def learner_summary(status: dict[str, Any]) -> tuple[list[tuple[str, str]],
                                                      list[tuple[str, str]]]:
    """Return (state rows, metric rows) of learner/status (habc_learner.learner's status)."""
    state = _fmt(status.get('state'))
    progress = status.get('progress')
    if isinstance(progress, dict) and progress.get('steps'):
        state += f' (step {progress.get("step", 0)}/{progress["steps"]})'
    if status.get('method'):
        state += f', {status["method"]}'
    rows = [('learner', state),
            ('learner version', f'{_fmt(status.get("version"))} (round '
                                f'{_fmt(status.get("round"))})')]
    episodes = f'{_fmt(status.get("episodes"))} trained on'
    if status.get('pending') is not None:
        episodes += f', {status["pending"]}'
        if status.get('episodes_per_round') is not None:
            episodes += f' of {status["episodes_per_round"]}'
        episodes += ' new'
    rows.append(('episodes', episodes))
    if status.get('error'):
        rows.append(('learner error', _fmt(status['error'])))
    metrics = status.get('metrics')
    metric_rows = []
    if isinstance(metrics, dict):
        names = [k for k in _KEY_METRICS if k in metrics]
        names += sorted(k for k in metrics if k not in _KEY_METRICS)
        metric_rows = [(name, _fmt(metrics[name])) for name in names]
    return rows, metric_rows


# Namespaces ----------------------------------------------------------------------------------

_NAMESPACE = re.compile(r'[A-Za-z_][A-Za-z0-9_]*(/[A-Za-z_][A-Za-z0-9_]*)*')


def normalize_namespace(text: str) -> str:
    """Return '/robot1' for 'robot1', '/robot1/' or ' /robot1 ', and '/' for ''.

    Raises:
        ValueError: not a valid ROS namespace.
    """
    inner = text.strip().strip('/')
    if not inner:
        return '/'
    if not _NAMESPACE.fullmatch(inner):
        raise ValueError(f'{text!r} is not a ROS namespace (letters, digits and _, separated '
                         'by /, each part starting with a letter or _)')
    return '/' + inner


def qualified(namespace: str, name: str) -> str:
    """Return the fully qualified name of relative topic `name` in `namespace`."""
    namespace = normalize_namespace(namespace)
    return f'/{name}' if namespace == '/' else f'{namespace}/{name}'


def namespaces_with(topic_names: Iterable[str], suffix: str = 'recorder/events') -> list[str]:
    """Return the namespaces of the topics named `<namespace>/<suffix>`, sorted."""
    found = set()
    for topic in topic_names:
        if topic == f'/{suffix}':
            found.add('/')
        elif topic.endswith(f'/{suffix}'):
            found.add(topic[:-len(suffix) - 1])
    return sorted(found)


def robot_of_namespace(namespace: str) -> str:
    """Return the robot label the episode recorder uses by default in `namespace`."""
    return robot_label('', namespace)


def filter_robot(records: Sequence[Any], robot: str | None) -> list[Any]:
    """Return the records of `robot` (all of them for None)."""
    return [r for r in records if robot is None or r.robot == robot]


def _topics_by_type(path: Path) -> dict[str, list[str]]:
    """Return the bag's topics that hold messages, by message type.

    Raises:
        FileNotFoundError: no bag at `path`.
    """
    # Imported here: rosbags is only needed once a past episode is shown.
    from habc_episodes.bag_format import topic_summary

    if not path.is_dir():
        raise FileNotFoundError(f'episode bag {path} does not exist')
    by_type: dict[str, list[str]] = {}
    for topic, (msgtype, count) in topic_summary(path)[0].items():
        if count:
            by_type.setdefault(msgtype, []).append(topic)
    return by_type


# Fleet ---------------------------------------------------------------------------------------

# Relative topics whose publisher shows that a robot stack runs in a namespace: the policy
# node's status and the arbiter's ticks. Live means a publisher, not a name: a topic's name
# stays in the graph while any endpoint has it, this dashboard's own subscriptions included.
LIVE_TOPICS = ('policy/status', 'intervention')
# Where `habc launch fleet` keeps each robot's store: <storage_root>/<robot>/episodes.sqlite.
DEFAULT_FLEET_ROOT = '~/.habc/fleet'
INDEX_NAME = 'episodes.sqlite'
# Per-version cells of the fleet table show the newest few versions; the tooltip all.
FLEET_VERSIONS_SHOWN = 3
FLEET_COLUMNS = ('Robot', 'Episode', 'In control', 'Policy',
                 'Per version (newest first)')


def live_topic_candidates(topic_names: Iterable[str]) -> list[str]:
    """Return the names among `topic_names` that are a LIVE_TOPICS topic of some namespace."""
    return sorted(name for name in set(topic_names)
                  if any(name == f'/{t}' or name.endswith(f'/{t}') for t in LIVE_TOPICS))


def live_namespaces(publisher_counts: Mapping[str, int]) -> list[str]:
    """Return the namespaces whose LIVE_TOPICS topics have a publisher, sorted.

    `publisher_counts` maps fully qualified topic names to their number of publishers.
    """
    published = [name for name, count in publisher_counts.items() if count > 0]
    found: set[str] = set()
    for topic in LIVE_TOPICS:
        found.update(namespaces_with(published, topic))
    return sorted(found)


def selector_items(live: Iterable[str], followed: str) -> list[str]:
    """Return the namespace selector's entries: the live robots and the followed one, sorted.

    The followed namespace stays listed when its robot is gone, so that the selection does
    not jump to another robot by itself.
    """
    return sorted({*live, followed})


@dataclass
class RobotLive:
    """The newest state of one robot of the fleet: a few values, however long it runs."""

    episode_id: str = ''        # recording now ('' between episodes)
    last_ended_id: str = ''
    episode_version: str = ''   # the policy version the recorder named at START
    source: int | None = None
    reason: str = ''
    tick_received: float | None = None  # time.monotonic() of the newest arbiter tick
    active_version: str = ''    # policy/status active_version ('' before it said)
    status_error: str = ''


class FleetLive:
    """The live state of every robot the dashboard watches, from their light topics.

    Fed with each robot's recorder/events, intervention ticks and policy/status; keeps only
    the newest state per robot (RobotLive), so memory stays flat however long robots run.
    """

    def __init__(self) -> None:
        self.robots: dict[str, RobotLive] = {}
        self.revision = 0  # grows on every change that shows in the fleet table

    def robot(self, namespace: str) -> RobotLive:
        """Return the state of the robot in `namespace` (a new, empty one at first)."""
        return self.robots.setdefault(namespace, RobotLive())

    def on_event(self, namespace: str, event: int, episode_id: str,
                 policy_version: str = '') -> None:
        """Take one EpisodeEvent of the robot in `namespace`."""
        robot = self.robot(namespace)
        if event == RecorderEvent.START:
            robot.episode_id, robot.episode_version = episode_id, policy_version
        elif event == RecorderEvent.END:
            if episode_id == robot.episode_id:
                robot.episode_id = ''
            robot.last_ended_id = episode_id
            robot.episode_version = policy_version or robot.episode_version
        elif not robot.episode_id and not robot.last_ended_id:
            # A label or discard as the latched event of a recorder that ran before this
            # dashboard: the episode it names has ended, and it is the newest one known.
            robot.last_ended_id = episode_id
        else:
            return
        self.revision += 1

    def on_intervention(self, namespace: str, source: int, episode_id: str, reason: str,
                        received: float) -> None:
        """Take one InterventionState tick of the robot in `namespace` (received: monotonic)."""
        robot = self.robot(namespace)
        stale = (robot.tick_received is None
                 or received - robot.tick_received > STALE_AFTER_S)
        if (source, reason) != (robot.source, robot.reason) or stale:
            self.revision += 1  # the table shows it; a tick like the last one changes nothing
        robot.source, robot.reason, robot.tick_received = source, reason, received
        if episode_id and not robot.episode_id and episode_id != robot.last_ended_id:
            # START was missed (latched events hold only the newest): the arbiter knows it.
            robot.episode_id = episode_id
            self.revision += 1

    def on_policy_status(self, namespace: str, status: dict[str, Any]) -> None:
        """Take the parsed policy/status of the robot in `namespace`."""
        robot = self.robot(namespace)
        active = status.get('active_version')
        robot.active_version = '' if active is None else str(active)
        robot.status_error = str(status.get('error') or '')
        self.revision += 1

    def retain(self, namespaces: Iterable[str]) -> list[str]:
        """Forget the robots not in `namespaces` (gone from the graph); return them."""
        keep = set(namespaces)
        gone = [ns for ns in self.robots if ns not in keep]
        for namespace in gone:
            del self.robots[namespace]
        self.revision += bool(gone)
        return gone


def robot_controller(robot: RobotLive, received_now: float) -> tuple[int | None, str]:
    """Return (source or None, text) of who controls the robot now.

    The text is 'policy', 'human (engage)' (the arbiter's reason), 'idle' (held between
    episodes), or why it is not known (source None then); `received_now` is
    time.monotonic().
    """
    if robot.source is None or robot.tick_received is None:
        return None, 'no arbiter ticks yet'
    age = received_now - robot.tick_received
    if age > STALE_AFTER_S:
        return None, f'no arbiter ticks for {age:.0f} s'
    if robot.source == Controller.HOLD and robot.reason == 'idle':
        return robot.source, 'idle'  # the arbiter holds between episodes
    name = source_name(robot.source)
    return robot.source, f'{name} ({robot.reason})' if robot.reason else name


def _rate(stat: VersionStats) -> str:
    if stat.success_rate is None:
        return f'none labelled of {stat.episodes}'
    return f'{100 * stat.success_rate:.0f}% ({stat.successes}/{stat.labelled})'


def _takeovers(stat: VersionStats) -> str:
    per = stat.takeovers_per_episode
    return '-' if per is None else f'{per:.2g} (n={stat.episodes})'


def version_summary(stats: Sequence[VersionStats],
                    shown: int | None = FLEET_VERSIONS_SHOWN) -> str:
    """Return 'v4: 80% (4/5), 0.4/ep; v3: ...' for the newest `shown` versions.

    `stats` in the order the versions ran (version_stats' order). Newest first: a cell too
    narrow for all cuts the oldest; those left out are counted at the end. '-' without
    any finished episode.
    """
    if not stats:
        return '-'
    newest = list(stats)[::-1] if shown is None else list(stats)[::-1][:shown]
    parts = [f'v{s.version}: {_rate(s)}, '
             + ('-' if s.takeovers_per_episode is None
                else f'{s.takeovers_per_episode:.2g}/ep') for s in newest]
    older = len(stats) - len(newest)
    return '; '.join(parts) + (f'; +{older} older' if older else '')


@dataclass(frozen=True)
class FleetRow:
    """One row of the fleet table: a live robot, what it does, and its stats per version."""

    namespace: str
    robot: str                # as the banner names it ('robot1')
    episode_id: str           # the running episode, else the last that ended ('': none)
    running: bool
    controller: str
    source: int | None        # Controller of `controller` (None: unknown or stale)
    version: str              # the active policy version ('-' unknown)
    versions: str             # the newest versions
    versions_detail: str      # every version, one per line

    def cells(self) -> tuple[str, ...]:
        """Return the texts of the row's cells, in FLEET_COLUMNS order."""
        return (self.robot, self.episode, self.controller, self.version, self.versions)

    @property
    def episode_state(self) -> str:
        """Return ' (running)', ' (ended)' or '' (no episode known)."""
        return '' if not self.episode_id else ' (running)' if self.running else ' (ended)'

    @property
    def episode(self) -> str:
        """Return 'id (running)', 'id (ended)' or '-'."""
        return f'{self.episode_id}{self.episode_state}' if self.episode_id else '-'


def records_by_robot(records: Iterable[Any]) -> dict[str, list[Any]]:
    """Return index records grouped by their `robot` column, each group in the given order."""
    groups: dict[str, list[Any]] = {}
    for record in records:
        groups.setdefault(record.robot, []).append(record)
    return groups


def stats_by_robot(records: Iterable[Any]) -> dict[str, list[VersionStats]]:
    """Return version_stats() of index records per value of their `robot` column."""
    return {robot: version_stats(group) for robot, group in records_by_robot(records).items()}


def fleet_rows(namespaces: Iterable[str], fleet: FleetLive,
               stats: Mapping[str, Sequence[VersionStats]],
               received_now: float) -> list[FleetRow]:
    """Return a fleet table row per robot namespace, sorted by namespace.

    `stats` is stats_by_robot() of the index records: a robot's episodes are the rows whose
    `robot` column is its recorder's default label (robot_of_namespace). The policy column
    is the version policy/status names active, else the version the running (or last)
    episode started with. `received_now` is time.monotonic().
    """
    rows = []
    for namespace in sorted(set(namespaces)):
        robot = fleet.robots.get(namespace, RobotLive())
        versions = stats.get(robot_of_namespace(namespace), ())
        version = robot.active_version or robot.episode_version
        source, text = robot_controller(robot, received_now)
        rows.append(FleetRow(
            namespace, robot_name(namespace), robot.episode_id or robot.last_ended_id,
            bool(robot.episode_id), text, source,
            (version or '-') + (f' ({robot.status_error})' if robot.status_error else ''),
            version_summary(versions), '\n'.join(
                f'v{s.version}: success {_rate(s)}, takeovers/episode {_takeovers(s)}, '
                f'{s.discarded} discarded' for s in versions[::-1]) or 'no finished episode'))
    return rows


# Several stores ------------------------------------------------------------------------------

def fleet_index_paths(root: Path) -> list[Path]:
    """Return the stores under a fleet storage root: <root>/*/episodes.sqlite, sorted."""
    return sorted(p for p in root.glob(f'*/{INDEX_NAME}') if p.is_file())


def fleet_root_problem(root: Path) -> str:
    """Say why a fleet root gave no store, naming what was searched (for the message line)."""
    where = f'{root}/*/{INDEX_NAME}'
    if not root.is_dir():
        return (f'fleet root {root} does not exist (searched {where}); give the storage_root '
                'of `habc launch fleet` (default ~/.habc/fleet)')
    return (f"no episode index under the fleet root yet (searched {where}); each robot's "
            'recorder creates <storage_root>/<robot>/episodes.sqlite when it starts')


def index_sources(paths: Iterable[Path | None]) -> list[Path]:
    """Return `paths` without None and without repeats of one file (first wins), in order."""
    seen: set[Path] = set()
    sources = []
    for path in paths:
        if path is None:
            continue
        key = path.resolve() if path.exists() else path
        if key not in seen:
            seen.add(key)
            sources.append(path)
    return sources


def merge_records(groups: Iterable[Sequence[Any]]) -> list[Any]:
    """Return the records of several indexes as one list, newest first (as EpisodeIndex.list).

    An episode id found in more than one index is kept once (the first index's row): the
    same store given twice, or a store copied beside the live one, must not count twice.
    """
    merged: dict[str, Any] = {}
    for records in groups:
        for record in records:
            merged.setdefault(record.episode_id, record)
    return sorted(merged.values(), key=lambda r: (r.started_at, r.episode_id), reverse=True)
