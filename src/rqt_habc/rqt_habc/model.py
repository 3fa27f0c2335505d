"""The dashboard's plain model (no Qt, no rclpy): timelines, live state, status summaries.

Everything the dashboard shows is computed here from plain values, so it is unit-tested
without a display or a ROS graph:
  - intervention timelines: segments of one controller, from (stamp, source, segment_id)
    ticks as the teleop arbiter publishes them on `intervention` and as the episode recorder
    stores them in each episode's bag;
  - the live state of the robot: the current episode, its elapsed time and who controls it,
    from `intervention` and `recorder/events`;
  - the summaries of the JSON status topics of the learner and the policy node.
The statistics per policy version (success rate, takeovers) are habc_episodes.stats', shared
with `habc demo`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
import json
from pathlib import Path
import re
import statistics
from typing import Any

from habc_episodes.episode import robot_label
from habc_episodes.vocabulary import Controller, RecorderEvent

INTERVENTION_TYPE = 'habc_msgs/msg/InterventionState'
EXECUTED_ACTION_TYPE = 'habc_msgs/msg/ExecutedAction'

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
    from habc_episodes.bag_format import read_episode_messages, topic_summary

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f'episode bag {path} does not exist')
    by_type: dict[str, list[str]] = {}
    for topic, (msgtype, count) in topic_summary(path)[0].items():
        if count:
            by_type.setdefault(msgtype, []).append(topic)
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

    def _new_timeline(self, episode_id: str) -> None:
        self.timeline = TimelineBuilder()
        self.timeline_episode = episode_id

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
