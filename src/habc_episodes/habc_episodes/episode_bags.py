"""Episodes from recorded bags: one training step per executed control tick (no rclpy).

The episode recorder writes one rosbag2 (MCAP) per episode. The learner needs, per control
tick, what the robot was commanded and by whom (`executed_action`, habc_msgs/ExecutedAction)
and what the policy saw at that time (`observation`, habc_msgs/Observation). Each executed
action becomes one step t of an Episode:

    a_t          = the action's positions (after the arbiter's limits: what the robot got)
    controller_t = the action's source (policy / human / hold)
    s_t          = the newest observation whose header stamp is <= the action's stamp
                   (the one a policy could have acted on; never a later one)

Actions stamped before the first observation have no s_t and are skipped. Alignment uses
header stamps (the time of the tick and of the camera frame set), not the bag's receive
times, so a slow recorder does not shift observations against actions.

Bags from elsewhere (`ros2 bag record` of another stack) hold standard topics instead: camera
images (sensor_msgs/Image or CompressedImage), joint states (sensor_msgs/JointState), the
command sent to the robot (std_msgs/Float64MultiArray, sensor_msgs/JointState or
trajectory_msgs/JointTrajectory) and an intervention flag (std_msgs/Bool, True = human, or
habc_msgs/InterventionState). A `TopicMapping` that names a `command` topic says which is
which. Then one step is made per command message, or, with `control_period_s`, per control
tick on a regular grid (the command in force at the tick: a forward controller holds the
last target):

    a_t          = the newest command at or before the tick
    controller_t = the newest flag at or before the tick (policy before the first flag)
    s_t          = the newest joint state (per joint: split publishers are merged) and the
                   newest image of each camera at or before the tick

Ticks before every input has been seen once are skipped. Times are header stamps where a
message has one (and it is not zero), else the bag's receive time; `stamps: receive` uses
receive times throughout (for a robot whose clock is not the recorder's).

A bag is a rosbag2 folder (metadata.yaml + MCAP or sqlite3 files) or a bare .mcap/.db3 file;
a folder without metadata.yaml that holds exactly one .mcap file (written by the mcap tools,
or copied without its metadata) is read from that file. rosbags reads such a file on its own,
so nothing is ever written into an input bag.
"""

from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
import functools
import io
import math
import mmap
from pathlib import Path
from typing import Any

import numpy as np
from rosbags.rosbag2 import Reader

from habc_episodes.bag_format import read_messages
from habc_episodes.episode import Episode
from habc_episodes.help_requests import (
    HELP_REQUEST_TYPE,
    HelpMessage,
    HelpSummary,
    summarize_help,
    takeover_steps,
)
from habc_episodes.vocabulary import Controller, EpisodeKind, Outcome

OBSERVATION_TYPE = 'habc_msgs/msg/Observation'
EXECUTED_ACTION_TYPE = 'habc_msgs/msg/ExecutedAction'
INTERVENTION_STATE_TYPE = 'habc_msgs/msg/InterventionState'
IMAGE_TYPES = ('sensor_msgs/msg/Image', 'sensor_msgs/msg/CompressedImage')
JOINT_STATE_TYPE = 'sensor_msgs/msg/JointState'
FLOAT_ARRAY_TYPE = 'std_msgs/msg/Float64MultiArray'
TRAJECTORY_TYPE = 'trajectory_msgs/msg/JointTrajectory'
COMMAND_TYPES = (FLOAT_ARRAY_TYPE, JOINT_STATE_TYPE, TRAJECTORY_TYPE)
BOOL_TYPE = 'std_msgs/msg/Bool'
FLAG_TYPES = (BOOL_TYPE, INTERVENTION_STATE_TYPE)
STRING_TYPE = 'std_msgs/msg/String'
# Read beside the executed actions of a habc bag, in their namespace, when recorded: the
# robot's help requests and (only then) the arbiter's intervention states, which say who
# engaged each takeover (habc_episodes.help_requests).
HELP_REQUEST_TOPIC = 'help_request'
INTERVENTION_TOPIC = 'intervention'
BAG_FILE_SUFFIXES = ('.mcap', '.db3')
# empty_frames() maps image arrays of at least this many bytes (see there).
_MAPPED_FRAMES_BYTES = 1 << 20
_MAP_POPULATE = getattr(mmap, 'MAP_POPULATE', 0)
_CHANNELS = {'rgb8': (3, (0, 1, 2)), 'bgr8': (3, (2, 1, 0)),
             'rgba8': (4, (0, 1, 2)), 'bgra8': (4, (2, 1, 0)), 'mono8': (1, (0, 0, 0))}


class BagReadError(ValueError):
    """rosbags cannot read a bag's files: truncated, damaged, or an unfinished recording."""


@dataclass(frozen=True)
class TopicMapping:
    """Which bag topics hold the learner's inputs.

    A relative name (no leading '/') matches the topic in any namespace ('observation'
    matches '/observation' and '/robot1/observation'); an absolute name must match exactly.
    The defaults are the habc topics (docs/ros_interfaces.md): `observation` and
    `executed_action`. Naming a `command` topic switches to standard topics (a bag of
    `ros2 bag record` of another stack, see the module docstring); `joint_states` is then
    required and `observation` / `executed_action` are not used.

    Attributes:
        observation: habc_msgs/Observation topic (habc bags).
        executed_action: habc_msgs/ExecutedAction topic (habc bags).
        cameras: image topics (sensor_msgs/Image or CompressedImage), in view order.
        joint_states: sensor_msgs/JointState topic of the robot's state.
        command: the executed command: std_msgs/Float64MultiArray, sensor_msgs/JointState or
            trajectory_msgs/JointTrajectory (its first point).
        intervention: std_msgs/Bool (True = a human is in control) or
            habc_msgs/InterventionState; '' means the policy drove throughout.
        instruction: the task instruction ('' keeps the one recorded in the bag, if any).
        instruction_topic: a std_msgs/String topic holding the instruction.
        control_period_s: resample at this period (s); None makes one step per command.
        joint_names: the joints of the state vector, in this order; () takes every joint
            that the joint-state topic names, in order of appearance.
        stamps: 'header' (header stamps where present) or 'receive' (the bag's times).
    """

    observation: str = 'observation'
    executed_action: str = 'executed_action'
    cameras: tuple[str, ...] = ()
    joint_states: str = ''
    command: str = ''
    intervention: str = ''
    instruction: str = ''
    instruction_topic: str = ''
    control_period_s: float | None = None
    joint_names: tuple[str, ...] = ()
    stamps: str = 'header'

    def __post_init__(self) -> None:
        # Lists (from YAML) become tuples so that the mapping stays hashable and immutable.
        for name in ('cameras', 'joint_names'):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, name, tuple(str(v) for v in value))
        if self.stamps not in ('header', 'receive'):
            raise ValueError(f"TopicMapping.stamps must be 'header' or 'receive', got "
                             f'{self.stamps!r}')
        if self.control_period_s is not None and not (
                math.isfinite(self.control_period_s) and self.control_period_s > 0):
            raise ValueError('TopicMapping.control_period_s must be a positive number of '
                             f'seconds, got {self.control_period_s!r}')
        standard_only = [name for name in ('cameras', 'joint_states', 'intervention',
                                           'instruction_topic', 'control_period_s',
                                           'joint_names')
                         if getattr(self, name) not in ((), '', None)]
        if not self.command and standard_only:
            raise ValueError(f'TopicMapping: {standard_only} describe standard topics, which '
                             'also need `command` (the topic of the executed command)')
        if self.command and not self.joint_states:
            raise ValueError('TopicMapping: standard topics need `joint_states` (a '
                             'sensor_msgs/JointState topic) besides `command`')

    @property
    def standard(self) -> bool:
        """Return True for standard topics (a `command` topic), False for habc bags."""
        return bool(self.command)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> 'TopicMapping':
        """Build a mapping from a dict (a parsed mapping file); errors name the bad key."""
        if not isinstance(data, Mapping):
            raise ValueError(f'a topic mapping is a mapping of keys to values, got '
                             f'{type(data).__name__}')
        known = [f.name for f in fields(cls)]
        unknown = sorted(str(key) for key in data if key not in known)
        if unknown:
            raise ValueError(f'unknown topic mapping key(s) {unknown}; known: {known}')
        values: dict[str, Any] = {}
        for key, value in data.items():
            if value is None:
                continue
            if key in ('cameras', 'joint_names'):
                items = [value] if isinstance(value, str) else value
                if not isinstance(items, list | tuple) or not all(
                        isinstance(item, str) and item for item in items):
                    raise ValueError(f'topic mapping key {key!r} must be a list of names, got '
                                     f'{value!r}')
                values[key] = tuple(items)
            elif key == 'control_period_s':
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ValueError(f'topic mapping key {key!r} must be a number of seconds '
                                     f'(e.g. 0.02 for 50 Hz), got {value!r}')
                values[key] = float(value)
            elif not isinstance(value, str):
                raise ValueError(f'topic mapping key {key!r} must be a string, got {value!r}')
            else:
                values[key] = value
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path) -> 'TopicMapping':
        """Read a mapping file (YAML or JSON); errors name the file."""
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding='utf-8'))
            return cls.from_dict(data or {})
        except (OSError, yaml.YAMLError, ValueError, TypeError) as exc:
            raise ValueError(f'topic mapping {path}: {exc}') from None

    def to_dict(self) -> dict[str, Any]:
        """Return the fields that differ from the defaults (what a mapping file would say)."""
        default = TopicMapping()
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in fields(self) if getattr(self, f.name) != getattr(default, f.name)}


def episode_from_bag(bag_path: str | Path, outcome: str | Outcome, *,
                     cameras: Sequence[int] | None = None, image_size: int | None = None,
                     topics: TopicMapping = TopicMapping(), episode_id: str | None = None,
                     kind: EpisodeKind = EpisodeKind.ROLLOUT,
                     with_images: bool = True,
                     allocate: Callable[[tuple[int, ...]], np.ndarray] | None = None
                     ) -> Episode:
    """Build an Episode from one recorded episode bag.

    Images are decoded and resized straight from the messages' bytes into one array per
    episode, sized from the bag's message counts (no per-frame arrays, no second stack).

    Args:
        bag_path: the bag: a rosbag2 directory, a bare .mcap/.db3 file, or a directory that
            holds one .mcap file and no metadata.yaml.
        outcome: its label ('success', 'failure', ... or an Outcome).
        cameras: indices into Observation.images of the views to keep, in this order;
            None keeps every view (habc bags; standard topics take `topics.cameras`).
        image_size: resize every image to image_size x image_size pixels; None keeps them.
        topics: which topics hold observations and executed actions (or, with a `command`
            topic, the standard topics of another stack).
        episode_id: the id to give the episode; None takes it from the executed actions (or
            the bag's directory or file name when they carry none).
        kind: rollout (default) or demonstration.
        with_images: False leaves images out (and does not decode them), for a policy
            without cameras.
        allocate: makes an uninitialised uint8 array of a shape for the images
            (empty_frames by default; load_bags' worker processes pass shared memory).

    Returns:
        Episode with observations {'state': (T, S) float32 joint positions, 'images':
        (T, V, H, W, 3) uint8}, actions (T, D), controllers, policy versions and header
        timestamps (s) per step; for a habc bag that recorded help requests, the requests
        and its takeovers, requested or spontaneous (Episode.help).

    Raises:
        FileNotFoundError: no bag at `bag_path`.
        BagReadError: rosbags cannot read the bag (truncated, damaged, or the MCAP file of a
            writer that died); the message says what to do.
        ValueError: the bag lacks a needed topic (the message names what is missing and what
            the bag holds), no action follows an observation, or the messages are
            inconsistent (changing joint names, image sizes or view counts).
    """
    path = Path(bag_path)
    source = bag_source(path)
    with _open_bag(path, source) as reader:
        if topics.standard:
            return _episode_from_standard_topics(path, source, reader, outcome, topics,
                                                 image_size, episode_id, kind, with_images,
                                                 allocate)
        return _episode_from_habc_topics(path, source, reader, outcome, cameras, image_size,
                                         topics, episode_id, kind, with_images, allocate)


def _episode_from_habc_topics(path: Path, source: Path, reader: Reader,
                              outcome: str | Outcome, cameras: Sequence[int] | None,
                              image_size: int | None, topics: TopicMapping,
                              episode_id: str | None, kind: EpisodeKind, with_images: bool,
                              allocate: Callable[[tuple[int, ...]], np.ndarray] | None
                              ) -> Episode:
    (observation_topic, action_topic), counts = _resolve_topics(path, topics, source, reader)
    help_topic, state_topic = _help_topics(reader, action_topic)
    where = f'bag {path}'
    # Observations are reduced to what training keeps as they stream in (state, resized
    # images written into `frames`): holding every full message until the end would take the
    # whole bag's size in memory (a long episode with VGA cameras is tens of GB).
    frames = _FrameStore(counts[observation_topic], image_size, allocate)
    observations: list[_Observation] = []
    actions: list[tuple[int, object]] = []
    help_messages: list[HelpMessage] = []
    states: list[tuple[int, int, str]] = []  # (stamp, source, reason) of InterventionState
    wanted = [t for t in (observation_topic, action_topic, help_topic, state_topic) if t]
    for topic, log_time, message in _read_messages(path, source, reader, wanted):
        stamp = _stamp_ns(message.header.stamp)
        if topic == observation_topic:
            observations.append(_Observation.of(message, stamp, cameras, frames,
                                                with_images, where))
        elif topic == action_topic:
            actions.append((stamp, message))
        elif topic == help_topic:
            help_messages.append(HelpMessage.of(message, log_time))
        else:
            states.append((stamp, int(message.source), str(message.reason)))
    # Python's sort is stable: equal stamps keep the order of the bag.
    observations.sort(key=lambda item: item.stamp)
    actions.sort(key=lambda item: item[0])
    obs_stamps = [item.stamp for item in observations]
    # The recorder and the arbiter learn of START and END separately, so the first or last
    # few ticks of a bag may carry the neighbouring episode's id: they are not this
    # episode's steps. Its id is the one given, else the most frequent one.
    ids = Counter(a.episode_id for _, a in actions if a.episode_id)
    own = episode_id if episode_id is not None and episode_id in ids else (
        ids.most_common(1)[0][0] if ids else '')
    if own:
        actions = [(t, a) for t, a in actions if a.episode_id in ('', own)]
    chosen: list[int] = []
    kept: list[object] = []
    stamps: list[int] = []
    for stamp, action in actions:
        newest = bisect_right(obs_stamps, stamp) - 1
        if newest < 0:
            continue  # no observation yet: nothing a policy could have seen
        chosen.append(newest)
        kept.append(action)
        stamps.append(stamp)
    if not kept:
        raise ValueError(f'{where}: no {action_topic} message at or after the first '
                         f'{observation_topic} message ({len(actions)} actions, '
                         f'{len(observations)} observations); nothing to train on')

    # Check the observations in use (one may serve several ticks), then build per step.
    used = [observations[i] for i in sorted(set(chosen))]
    _check_states(used, where)
    state = np.stack([observations[i].position for i in chosen])
    images = (_stack_images([observations[i] for i in chosen], used, cameras, frames, where)
              if with_images else None)
    del frames

    joint_names = list(kept[0].joint_names)
    for action in kept:
        if list(action.joint_names) != joint_names:
            raise ValueError(f'{where}: the executed actions change joint names from '
                             f'{joint_names} to {list(action.joint_names)}')
    try:
        action_array = np.stack([np.asarray(a.positions, dtype=np.float32) for a in kept])
    except ValueError:
        raise ValueError(f'{where}: executed actions have different lengths '
                         f'{sorted({len(a.positions) for a in kept})}') from None
    try:
        controllers = [Controller(int(a.source)) for a in kept]
    except ValueError:
        bad = sorted({int(a.source) for a in kept} - {int(c) for c in Controller})
        raise ValueError(f'{where}: unknown executed_action source values {bad}; expected '
                         f'{[f"{c.value} {c.name.lower()}" for c in Controller]}') from None

    instruction = next((observations[i].instruction for i in chosen
                        if observations[i].instruction), '') or topics.instruction
    if episode_id is None:
        episode_id = next((a.episode_id for a in kept if a.episode_id), bag_name(path))
    observations_out = {'state': state}
    if images is not None:
        observations_out['images'] = images
    help_summary = _episode_help(help_messages, states, controllers, stamps)
    return Episode(observations=observations_out, actions=action_array,
                   controllers=controllers, outcome=Outcome.parse(outcome),
                   instruction=instruction, kind=kind,
                   policy_versions=[str(a.policy_version) for a in kept],
                   timestamps=np.array(stamps, dtype=np.float64) * 1e-9,
                   episode_id=episode_id,
                   camera_shapes=used[0].camera_shapes if images is not None else (),
                   help_requests=help_summary.requests, takeovers=help_summary.takeovers)


def _help_topics(reader: Reader, action_topic: str) -> tuple[str, str]:
    """Return the help_request and intervention topics beside `action_topic` ('' if none).

    Only the executed actions' own namespace counts: a bag of several robots holds one
    help_request per robot. The intervention states (a message per tick) are read only
    when help requests were recorded: they name who answered them, and a bag without any
    has nothing to pair (its takeovers are all spontaneous).
    """
    available = {c.topic: (c.msgtype, c.msgcount) for c in reader.connections}
    namespace = action_topic[:action_topic.rfind('/') + 1]

    def sibling(name: str, msgtype: str) -> str:
        topic = namespace + name
        found = available.get(topic)
        return topic if found is not None and found[0] == msgtype and found[1] > 0 else ''

    help_topic = sibling(HELP_REQUEST_TOPIC, HELP_REQUEST_TYPE)
    state_topic = sibling(INTERVENTION_TOPIC, INTERVENTION_STATE_TYPE) if help_topic else ''
    return help_topic, state_topic


def _episode_help(messages: list[HelpMessage], states: list[tuple[int, int, str]],
                  controllers: Sequence[int], stamps: Sequence[int]) -> HelpSummary:
    """Return the help requests and takeovers of an episode's steps (stamps in ns).

    Without help messages the result is empty and the Episode finds its takeovers itself.
    Who engaged a takeover is the reason of the newest intervention state at or before its
    first step, when that state reports a human (as `habc episodes show` reads segments).
    """
    if not messages:
        return HelpSummary()
    states.sort(key=lambda item: item[0])
    state_stamps = [stamp for stamp, _, _ in states]
    moments = []
    for step in takeover_steps(np.asarray(controllers, dtype=np.int8)):
        stamp = stamps[int(step)]
        k = bisect_right(state_stamps, stamp) - 1
        by = states[k][2] if k >= 0 and states[k][1] == Controller.HUMAN else ''
        moments.append((stamp * 1e-9, by, int(step)))
    return summarize_help(messages, moments, stamps[0] * 1e-9)


def bag_source(bag_path: str | Path) -> Path:
    """Return what rosbags opens for a bag: its directory, or its one .mcap/.db3 file.

    rosbags reads a bare MCAP or sqlite3 file without metadata.yaml, so a directory without
    one that holds a single .mcap file (mcap tools, a copy without its metadata, the bag of
    a writer that died) is read from that file. Nothing is written.

    Raises:
        FileNotFoundError: nothing at `bag_path`, or a directory without metadata.yaml and
            without a single .mcap file.
    """
    path = Path(bag_path)
    if path.is_file():
        if path.suffix in BAG_FILE_SUFFIXES:
            return path
        raise FileNotFoundError(f'{path} is not a bag: expected a rosbag2 directory or a '
                                f'{"/".join(BAG_FILE_SUFFIXES)} file')
    if (path / 'metadata.yaml').is_file():
        return path
    if path.is_dir():
        files = sorted(p for p in path.glob('*.mcap') if p.is_file())
        if len(files) == 1:
            return files[0]
        if len(files) > 1:
            raise FileNotFoundError(
                f'{path} is not a rosbag2 directory (no metadata.yaml) and holds several MCAP '
                f'files {[p.name for p in files]}; `ros2 bag reindex {path}` writes the '
                'metadata.yaml that makes them one bag (or pass the files one by one)')
    raise FileNotFoundError(f'{path} is not a rosbag2 directory (no metadata.yaml); a bag '
                            'of a crashed recorder needs habc_episodes.recovery.recover_bag()')


def bag_name(bag_path: str | Path) -> str:
    """Return a bag's name: its directory name, or its file name without suffix."""
    path = Path(bag_path)
    return path.stem if path.suffix in BAG_FILE_SUFFIXES and not path.is_dir() else path.name


def bag_files(bag_path: str | Path) -> list[Path]:
    """Return the files that make up a bag (what reading it has to go through)."""
    path = Path(bag_path)
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else []


def bag_topics(bag_path: str | Path) -> dict[str, tuple[str, int]]:
    """Return topic -> (message type, message count) of a bag.

    Raises:
        FileNotFoundError: no bag at `bag_path`.
        BagReadError: rosbags cannot open the bag.
    """
    path = Path(bag_path)
    source = bag_source(path)
    with _reading(path, source), Reader(source) as reader:
        return {c.topic: (c.msgtype, c.msgcount) for c in reader.connections}


@contextmanager
def _open_bag(path: Path, source: Path) -> Iterator[Reader]:
    """Open a bag once for all that episode_from_bag reads (errors become BagReadError)."""
    with _reading(path, source):
        reader = Reader(source)
        reader.open()
    try:
        yield reader
    finally:
        reader.close()


@contextmanager
def _reading(path: Path, source: Path) -> Iterator[None]:
    """Turn whatever rosbags raises on a damaged bag into a BagReadError that says what to do.

    Only rosbags calls run inside: our own ValueErrors (inconsistent messages) never pass
    through here.
    """
    try:
        yield
    except BagReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - rosbags, struct, sqlite3, zstd: all mean "damaged"
        raise BagReadError(read_problem(path, source, exc)) from exc


def read_problem(path: Path, source: Path, exc: BaseException) -> str:
    """Say why a bag cannot be read and what to do about it."""
    what = f'{type(exc).__name__}: {exc}'
    files = [source] if source.is_file() else bag_files(source)
    suffixes = {p.suffix for p in files}
    if '.mcap' in suffixes:
        start = ('it has no metadata.yaml and its MCAP file' if source.is_file()
                 and source.parent == path else 'its MCAP file')
        hint = (f'{start} is cut short or damaged: the writer died before closing it, or the '
                'copy is incomplete. habc_episodes.recovery.recover_bag(path) rebuilds the bag '
                'from its complete records (it rewrites the bag in place: run it on a copy to '
                'keep the original), then train again')
    elif '.db3' in suffixes:
        hint = ('its sqlite3 file is damaged or incomplete: restore it from a copy, or salvage '
                'it with `sqlite3 FILE .recover` and `ros2 bag reindex`')
    else:
        hint = 'metadata.yaml names files that are missing or of an unknown storage format'
    return f'bag {path} cannot be read ({what}); {hint}'


def match_topic(name: str, available: Sequence[str]) -> list[str]:
    """Return the topics of `available` that the mapping entry `name` matches."""
    if name.startswith('/'):
        return [topic for topic in available if topic == name]
    return [topic for topic in available
            if topic == name or topic == '/' + name or topic.endswith('/' + name)]


def _resolve_topics(path: Path, mapping: TopicMapping, source: Path, reader: Reader
                    ) -> tuple[tuple[str, str], dict[str, int]]:
    """Return the observation and action topics, and topic -> message count."""
    (observation, action), _, counts = _resolve(path, source, reader, [
        (mapping.observation, (OBSERVATION_TYPE,), True),
        (mapping.executed_action, (EXECUTED_ACTION_TYPE,), True)])
    return (observation, action), counts


def _resolve(path: Path, source: Path, reader: Reader,
             wanted: Sequence[tuple[str, tuple[str, ...], bool]]
             ) -> tuple[list[str], dict[str, str], dict[str, int]]:
    """Return the bag topic of each (mapping name, allowed types, required) entry.

    An optional entry ('' or without messages) resolves to ''. All problems are reported at
    once, with what the bag holds. Also returns topic -> message type and topic -> message
    count (as the bag's index says: a hint for sizing arrays, not a promise) of the bag.
    """
    with _reading(path, source):
        available = {c.topic: (c.msgtype, c.msgcount) for c in reader.connections}
    listing = ', '.join(f'{topic} ({msgtype}, {count})'
                        for topic, (msgtype, count) in sorted(available.items())) or 'nothing'
    resolved, problems = [], []
    for name, msgtypes, required in wanted:
        expected = msgtypes[0] if len(msgtypes) == 1 else f'one of {list(msgtypes)}'
        matches = match_topic(name, list(available)) if name else []
        if not name and not required:
            pass
        elif not matches:
            problems.append(f'no topic {name!r} ({expected})')
        elif len(matches) > 1:
            problems.append(f'{name!r} matches several topics {matches}; give its absolute '
                            'name in the TopicMapping')
        elif available[matches[0]][0] not in msgtypes:
            problems.append(f'topic {matches[0]!r} has type {available[matches[0]][0]}, '
                            f'expected {expected}')
        elif available[matches[0]][1] == 0 and required:
            problems.append(f'topic {matches[0]!r} has no messages')
        elif available[matches[0]][1] > 0:
            resolved.append(matches[0])
            continue
        resolved.append('')
    if problems:
        raise ValueError(f'bag {path} cannot be trained on: {"; ".join(problems)}. '
                         f'It holds: {listing}')
    return (resolved, {topic: msgtype for topic, (msgtype, _) in available.items()},
            {topic: count for topic, (_, count) in available.items()})


# Standard topics (`ros2 bag record` of another stack) -----------------------------------------

def _episode_from_standard_topics(path: Path, source: Path, reader: Reader,
                                  outcome: str | Outcome,
                                  topics: TopicMapping, image_size: int | None,
                                  episode_id: str | None, kind: EpisodeKind,
                                  with_images: bool,
                                  allocate: Callable[[tuple[int, ...]], np.ndarray] | None
                                  ) -> Episode:
    where = f'bag {path}'
    camera_names = topics.cameras if with_images else ()
    resolved, types, counts = _resolve(path, source, reader, [
        *[(name, IMAGE_TYPES, True) for name in camera_names],
        (topics.joint_states, (JOINT_STATE_TYPE,), True),
        (topics.command, COMMAND_TYPES, True),
        (topics.intervention, FLAG_TYPES, False),
        (topics.instruction_topic, (STRING_TYPE,), False)])
    camera_topics = resolved[:len(camera_names)]
    state_topic, command_topic, flag_topic, instruction_topic = resolved[len(camera_names):]
    wanted = {topic for topic in resolved if topic}
    streams: dict[str, list[tuple[int, object]]] = {topic: [] for topic in wanted}
    receive = topics.stamps == 'receive'
    # Raw images are decoded and resized as they stream in, each into its row of its
    # camera's array (the stream keeps the row), so that the messages can be freed (holding
    # them all takes the bag's size in memory); compressed ones are small until decoded, and
    # only the frames that ticks use are decoded.
    # One camera's array is the episode's images as it is (allocated where they go).
    raw_cameras = {topic: _FrameStore(counts[topic], image_size,
                                      allocate if len(camera_topics) == 1 else None)
                   for topic in camera_topics if types[topic] == IMAGE_TYPES[0]}
    # Several raw cameras resized to one size: each writes into its view of one array of
    # the episode's images, which is the result as it is when every tick takes the next
    # frame of every camera (no second copy of the frames).
    combined = None
    if (image_size is not None and len(camera_topics) > 1 and len(raw_cameras) == len(
            camera_topics) == len(set(camera_topics))):
        combined = (allocate or empty_frames)((max(counts[t] for t in camera_topics), len(
            camera_topics), image_size, image_size, 3))
        for view, topic in enumerate(camera_topics):
            raw_cameras[topic].array = raw_cameras[topic].preset = combined[:, view:view + 1]
    recorded_shapes: dict[str, tuple[int, int]] = {}  # (H, W) of each camera, before resize
    for topic, log_time, message in _read_messages(path, source, reader, sorted(wanted)):
        stamp = log_time if receive else _message_stamp(message, log_time)
        store = raw_cameras.get(topic)
        if store is not None:
            recorded_shapes.setdefault(topic, (int(message.height), int(message.width)))
            message = store.add([message], f'{where}: {topic}')  # the frame's row
        streams[topic].append((stamp, message))
    for stream in streams.values():
        stream.sort(key=lambda item: item[0])  # stable: equal stamps keep the bag's order

    command_stamps, commands = _command_rows(streams[command_topic], types[command_topic],
                                             f'{where}: command topic {command_topic}')
    state_stamps, states = _joint_state_rows(streams[state_topic], topics.joint_names,
                                             f'{where}: joint state topic {state_topic}')
    camera_stamps = [np.array([stamp for stamp, _ in streams[topic]], dtype=np.int64)
                     for topic in camera_topics]
    if len(commands) == 0 or len(states) == 0:
        what = 'command' if len(commands) == 0 else 'joint state'
        raise ValueError(f'{where}: no usable {what} message (JointTrajectory commands need '
                         'points; joint states need every joint of the state vector); nothing '
                         'to train on')

    # Every input must have been seen once: a step before that has nothing to observe.
    first_input = max([int(state_stamps[0])] + [int(s[0]) for s in camera_stamps])
    if topics.control_period_s is None:
        keep = np.flatnonzero(command_stamps >= first_input)
        ticks, command_index = command_stamps[keep], keep
    else:
        period = max(1, round(topics.control_period_s * 1e9))
        start = max(first_input, int(command_stamps[0]))
        ticks = np.arange(start, int(command_stamps[-1]) + 1, period, dtype=np.int64)
        command_index = np.searchsorted(command_stamps, ticks, side='right') - 1
    if len(ticks) == 0:
        raise ValueError(f'{where}: no {command_topic} message at or after the first joint state '
                         f'and image ({len(commands)} commands); nothing to train on')

    state_index = np.searchsorted(state_stamps, ticks, side='right') - 1
    observations: dict[str, np.ndarray] = {'state': states[state_index]}
    camera_shapes = ()
    if camera_topics:
        for topic in set(camera_topics) - set(recorded_shapes):  # compressed: decode one
            first = _decode_compressed(streams[topic][0][1], f'{where}: {topic}')
            recorded_shapes[topic] = (int(first.shape[0]), int(first.shape[1]))
        camera_shapes = tuple(recorded_shapes[topic] for topic in camera_topics)
        observations['images'] = _camera_images(
            [(topic, streams[topic], raw_cameras.get(topic),
              np.searchsorted(stamps, ticks, side='right') - 1)
             for topic, stamps in zip(camera_topics, camera_stamps, strict=True)],
            image_size, allocate, where, combined)
        raw_cameras.clear()
        del combined

    controllers = np.full(len(ticks), Controller.POLICY, dtype=np.int8)
    if flag_topic:
        flag_stamps, flags = _flag_rows(streams[flag_topic], types[flag_topic],
                                        f'{where}: intervention topic {flag_topic}')
        flag_index = np.searchsorted(flag_stamps, ticks, side='right') - 1
        seen = flag_index >= 0  # before the first flag the policy drives
        controllers[seen] = flags[flag_index[seen]]

    instruction = topics.instruction
    if instruction_topic and not instruction:
        instruction = next((str(m.data) for _, m in streams[instruction_topic] if m.data), '')
    return Episode(observations=observations, actions=commands[command_index],
                   controllers=controllers, outcome=Outcome.parse(outcome),
                   instruction=instruction, kind=kind, policy_versions=[''] * len(ticks),
                   timestamps=ticks.astype(np.float64) * 1e-9,
                   episode_id=episode_id or bag_name(path), camera_shapes=camera_shapes)


def _camera_images(cameras: list[tuple[str, list, '_FrameStore | None', np.ndarray]],
                   image_size: int | None,
                   allocate: Callable[[tuple[int, ...]], np.ndarray] | None,
                   where: str, combined: np.ndarray | None = None) -> np.ndarray:
    """Return (T, V, H, W, 3) uint8: per camera, the frame of stream entry index[t] per tick.

    Each camera is (topic, its stream of (stamp, row or CompressedImage), its
    _FrameStore for raw images or None for compressed ones, stream entry per tick). Every
    frame is copied once, from its camera's array straight into its place. `combined` is
    the array whose view v each raw camera's _FrameStore started with: it is the result
    when tick t takes frame t of every camera and all of them were written there.
    """
    sources = []
    for topic, stream, store, index in cameras:
        used = np.unique(index)
        if store is not None:
            rows = [stream[int(i)][1] for i in index]
            sources.append((store, rows, {store.shape_of(row) for row in set(rows)}))
        else:  # compressed: decode each frame in use once (one may serve several ticks)
            decoded = {int(i): _resize(_decode_compressed(stream[int(i)][1],
                                                          f'{where}: {topic}'), image_size)
                       for i in used}
            sources.append((decoded, [int(i) for i in index],
                            {frame.shape[:2] for frame in decoded.values()}))
    shapes = set().union(*(shapes for _, _, shapes in sources))
    if len(shapes) != 1:
        raise ValueError(f'{where}: images have different sizes '
                         f'{sorted((*s, 3) for s in shapes)}; pass image_size to resize them '
                         'to one size')
    (shape,) = shapes
    ticks = len(cameras[0][3])
    if combined is not None and ticks == len(combined) and all(
            isinstance(store, _FrameStore) and store.preset is not None
            and store.array is store.preset and not store.odd and store.count >= ticks
            and np.array_equal(index, np.arange(ticks))
            for _, _, store, index in cameras):
        return combined
    if len(sources) == 1 and isinstance(sources[0][0], _FrameStore):
        return sources[0][0].gather(sources[0][1], allocate)
    out = (allocate or empty_frames)((ticks, len(sources), *shape, 3))
    for view, (frames, rows, _) in enumerate(sources):
        if isinstance(frames, _FrameStore):
            frames.fill(rows, out[:, view])
        else:
            for t, row in enumerate(rows):
                out[t, view] = frames[row]
    return out


def _message_stamp(message: object, log_time: int) -> int:
    """Return the header stamp of a message, or its receive time without one (or when zero)."""
    header = getattr(message, 'header', None)
    if header is not None:
        stamp = _stamp_ns(header.stamp)
        if stamp > 0:
            return stamp
    return int(log_time)


def _command_rows(messages: list, msgtype: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Return stamps (N,) and command vectors (N, D) float32; named joints keep one order."""
    stamps, rows = [], []
    names: list[str] | None = None
    for stamp, message in messages:
        if msgtype == FLOAT_ARRAY_TYPE:
            values, message_names = message.data, None
        elif msgtype == JOINT_STATE_TYPE:
            values, message_names = message.position, list(message.name)
        else:
            if not message.points:
                continue  # an empty trajectory commands nothing (it stops the controller)
            values, message_names = message.points[0].positions, list(message.joint_names)
        values = np.asarray(values, dtype=np.float32)
        if message_names is not None:
            if names is None:
                names = message_names
            if message_names != names:
                if sorted(message_names) != sorted(names) or len(values) != len(names):
                    raise ValueError(f'{where}: the commanded joints change from {names} to '
                                     f'{message_names}')
                values = values[[message_names.index(n) for n in names]]
        if rows and len(values) != len(rows[0]):
            raise ValueError(f'{where}: commands have different lengths '
                             f'{sorted({len(rows[0]), len(values)})}')
        stamps.append(stamp)
        rows.append(values)
    if not rows:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
    return np.array(stamps, dtype=np.int64), np.stack(rows)


def _joint_state_rows(messages: list, joint_names: Sequence[str],
                      where: str) -> tuple[np.ndarray, np.ndarray]:
    """Return stamps (N,) and state vectors (N, S) float32, newest value of every joint.

    Drivers often publish arms and grippers as separate JointState messages on one topic;
    each joint keeps its newest position, and a state exists once every joint has one.
    """
    if joint_names:
        names = list(joint_names)
    else:
        names = []
        for _, message in messages:
            names.extend(n for n in message.name if n not in names)
    column = {name: i for i, name in enumerate(names)}
    current = np.full(len(names), np.nan)
    maps: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]] = {}
    stamps, rows = [], []
    complete = False
    for stamp, message in messages:
        key = tuple(message.name)
        if key not in maps:
            pairs = [(j, column[n]) for j, n in enumerate(key) if n in column]
            maps[key] = (np.array([j for j, _ in pairs], dtype=np.int64),
                         np.array([i for _, i in pairs], dtype=np.int64))
        source, target = maps[key]
        position = np.asarray(message.position, dtype=np.float64)
        if len(position) == 0 or len(source) == 0:
            continue  # velocities or efforts only, or none of our joints
        if len(position) != len(key):
            raise ValueError(f'{where}: a message names {len(key)} joints but has '
                             f'{len(position)} positions')
        current[target] = position[source]
        complete = complete or not np.isnan(current).any()
        if complete:
            stamps.append(stamp)
            rows.append(current.astype(np.float32))
    if not rows and names:
        missing = [n for n, v in zip(names, current, strict=True) if np.isnan(v)]
        raise ValueError(f'{where}: never has a position for joint(s) {missing}; the state '
                         f'needs {names}')
    if not rows:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
    return np.array(stamps, dtype=np.int64), np.stack(rows)


def _flag_rows(messages: list, msgtype: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Return stamps (N,) and the Controller (N,) int8 that each flag message announces."""
    if msgtype == BOOL_TYPE:
        values = [Controller.HUMAN if m.data else Controller.POLICY for _, m in messages]
    else:
        values = [int(m.source) for _, m in messages]
        bad = sorted(set(values) - {int(c) for c in Controller})
        if bad:
            raise ValueError(f'{where}: unknown source values {bad}; expected '
                             f'{[f"{c.value} {c.name.lower()}" for c in Controller]}')
    return (np.array([stamp for stamp, _ in messages], dtype=np.int64),
            np.array(values, dtype=np.int8))


def _decode_compressed(image: object, where: str) -> np.ndarray:
    """Return an (H, W, 3) uint8 RGB array of a sensor_msgs/CompressedImage."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(io.BytesIO(np.asarray(image.data, dtype=np.uint8).tobytes())) as decoded:
            return np.asarray(decoded.convert('RGB'))
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f'{where}: a CompressedImage ({image.format!r}) cannot be decoded: '
                         f'{exc}') from None


def empty_frames(shape: tuple[int, ...]) -> np.ndarray:
    """Return a zeroed uint8 array of `shape` (episode_from_bag's default `allocate`).

    Frames of a few MB and more go into an anonymous mapping whose pages are made at once
    (MAP_POPULATE: one system call instead of a page fault per 4 KiB). np.empty asks for
    transparent huge pages at this size, and where free memory is fragmented the kernel
    compacts memory on the first touch of each: measured here, 4 to 43 ms per 16 MB
    episode (the loader's time swung by a third from run to run), against a steady ~6 ms.
    """
    size = math.prod(shape)
    if size < _MAPPED_FRAMES_BYTES:
        return np.zeros(shape, dtype=np.uint8)
    try:
        mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | _MAP_POPULATE)
    except (OSError, ValueError):
        return np.zeros(shape, dtype=np.uint8)
    return np.frombuffer(mapping, dtype=np.uint8, count=size).reshape(shape)


def _stamp_ns(stamp: object) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


@dataclass
class _Observation:
    """What training keeps of one habc_msgs/Observation."""

    stamp: int
    names: list[str]
    position: np.ndarray
    instruction: str
    image_count: int
    # (H, W) of the chosen views as recorded, before the resize.
    camera_shapes: tuple[tuple[int, int], ...]
    # The row of the episode's _FrameStore that holds the chosen views, decoded and resized;
    # None when the chosen camera indices do not fit; the error of a bad image.
    frames: int | None | ValueError

    @classmethod
    def of(cls, message: object, stamp: int, cameras: Sequence[int] | None,
           store: '_FrameStore', with_images: bool, where: str) -> '_Observation':
        images = message.images
        count = len(images)
        frames: int | None | ValueError = None
        views = list(range(count)) if cameras is None else [int(c) for c in cameras]
        shapes: tuple[tuple[int, int], ...] = ()
        if with_images and views and all(0 <= v < count for v in views):
            shapes = tuple((int(images[v].height), int(images[v].width)) for v in views)
            try:
                frames = store.add([images[v] for v in views], where)
            except ValueError as exc:
                frames = exc  # raised only if this observation is used
        joints = message.joint_state
        return cls(stamp, list(joints.name), np.asarray(joints.position, dtype=np.float32),
                   str(message.instruction), count, shapes, frames)


def _read_messages(path: Path, source: Path, reader: Reader,
                   topics: Sequence[str]) -> Iterator[tuple]:
    """Yield bag_format.read_messages(); what rosbags raises becomes a BagReadError.

    Only the reading is guarded: errors of the caller's processing pass unchanged.
    """
    messages = read_messages(reader, topics, lean=True)
    while True:
        try:
            item = next(messages)
        except StopIteration:
            return
        except Exception as exc:  # noqa: BLE001 - rosbags, struct, sqlite3, zstd: "damaged"
            raise BagReadError(read_problem(path, source, exc)) from exc
        yield item


def _check_states(observations: list[_Observation], where: str) -> None:
    names = observations[0].names
    for obs in observations:
        if obs.names != names:
            raise ValueError(f'{where}: observation joint names change from {names} to '
                             f'{obs.names}')
    if len({len(obs.position) for obs in observations}) != 1:
        raise ValueError(f'{where}: observation joint states have different lengths '
                         f'{sorted({len(obs.position) for obs in observations})}')


def _stack_images(steps: list[_Observation], used: list[_Observation],
                  cameras: Sequence[int] | None, store: '_FrameStore',
                  where: str) -> np.ndarray | None:
    """Return (T, V, H, W, 3) uint8 of the chosen views per step, or None without images."""
    counts = {obs.image_count for obs in used}
    if counts == {0}:
        return None
    if len(counts) != 1:
        raise ValueError(f'{where}: observations hold different numbers of images '
                         f'{sorted(counts)}')
    (count,) = counts
    views = list(range(count)) if cameras is None else [int(c) for c in cameras]
    if not views or any(not 0 <= v < count for v in views):
        raise ValueError(f'{where}: camera indices {views} do not fit the {count} images per '
                         f'observation (valid: 0..{count - 1})')
    for obs in used:
        if isinstance(obs.frames, ValueError):
            raise obs.frames
    rows = [obs.frames for obs in steps]
    shapes = {shape for row in set(rows) for shape in store.view_shapes(row)}
    if len(shapes) != 1:
        raise ValueError(f'{where}: images have different sizes '
                         f'{sorted((*s, 3) for s in shapes)}; pass image_size to resize them '
                         'to one size')
    return store.gather(rows)


class _FrameStore:
    """The decoded frames of one episode: row k holds the views of the k-th frame set added.

    Frames are written once, decoded and resized straight from the messages' bytes into a
    (rows, V, H, W, 3) array allocated for the bag's message count (grown if the count was
    wrong). A frame set whose views differ in size from the first one's is kept aside; an
    episode that uses it fails (_stack_images, _camera_images) unless all sizes agree.
    """

    def __init__(self, capacity: int, size: int | None,
                 allocate: Callable[[tuple[int, ...]], np.ndarray] | None = None) -> None:
        self.size = size
        self.capacity = max(1, int(capacity))
        self.allocate = allocate or empty_frames
        self.array: np.ndarray | None = None
        # A view of a bigger array given to write into (see _episode_from_standard_topics).
        self.preset: np.ndarray | None = None
        self.count = 0
        self.odd: dict[int, list[np.ndarray]] = {}

    def add(self, images: Sequence[object], where: str) -> int:
        """Decode sensor_msgs/Image messages (the views of one frame set) into the next row.

        Raises:
            ValueError: an image's encoding is not supported or its data is too short.
        """
        layouts = [_image_layout(image, where) for image in images]
        shapes = [_target_shape(layout[0], layout[1], self.size) for layout in layouts]
        row = self.count
        if self.array is None and len(set(shapes)) == 1:
            self.array = self.allocate((self.capacity, len(shapes), *shapes[0], 3))
        if self.array is None or self.array.shape[1:] != (len(shapes), *shapes[0], 3) or len(
                set(shapes)) != 1:
            self.odd[row] = [_decode(layout, self.size, np.empty((*shape, 3), np.uint8))
                             for layout, shape in zip(layouts, shapes, strict=True)]
        else:
            if row == len(self.array):  # more messages than the bag's index said
                grown = self.allocate((2 * len(self.array), *self.array.shape[1:]))
                grown[:row] = self.array
                self.array = grown
            for view, layout in enumerate(layouts):
                _decode(layout, self.size, self.array[row, view])
        self.count += 1
        return row

    def view_shapes(self, row: int) -> list[tuple[int, int]]:
        """Return the (H, W) of each view of a row."""
        if row in self.odd:
            return [frame.shape[:2] for frame in self.odd[row]]
        return [self.array.shape[2:4]] * self.array.shape[1]

    def shape_of(self, row: int) -> tuple[int, int]:
        """Return the (H, W) of a row of a single-view store."""
        return self.view_shapes(row)[0]

    def gather(self, rows: Sequence[int],
               allocate: Callable[[tuple[int, ...]], np.ndarray] | None = None) -> np.ndarray:
        """Return (len(rows), V, H, W, 3) of these rows (sizes must agree; checked by callers).

        The common case, every row once and in order, is the array itself: no copy.
        """
        if (self.array is not None and not self.odd and len(rows) == len(self.array)
                and self.count == len(self.array) and all(
                    row == k for k, row in enumerate(rows))):
            return self.array
        first = self.odd[rows[0]] if rows[0] in self.odd else self.array[rows[0]]
        out = (allocate or self.allocate)((len(rows), len(first), *first[0].shape))
        self.fill(rows, out)
        return out

    def fill(self, rows: Sequence[int], out: np.ndarray) -> None:
        """Copy rows into out[k] (out: (len(rows), V, H, W, 3), or a view of one camera)."""
        for k, row in enumerate(rows):
            if row in self.odd:
                for view, frame in enumerate(self.odd[row]):
                    out[k, view] = frame
            else:
                out[k] = self.array[row]


def _image_layout(image: object, where: str) -> tuple[int, int, int, str, np.ndarray]:
    """Return (height, width, step, encoding, data) of a sensor_msgs/Image, checked."""
    encoding = str(image.encoding)
    if encoding not in _CHANNELS:
        raise ValueError(f'{where}: image encoding {encoding!r} is not supported; the sync '
                         f'node publishes rgb8 (supported: {sorted(_CHANNELS)})')
    channels = _CHANNELS[encoding][0]
    height, width, step = int(image.height), int(image.width), int(image.step)
    data = image.data
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 1:
        data = np.asarray(data, dtype=np.uint8).reshape(-1)
    if step < width * channels or data.size < height * step:
        raise ValueError(f'{where}: a {width}x{height} {encoding} image has step {step} and '
                         f'{data.size} bytes; expected step >= {width * channels} and '
                         f'{height * step} bytes')
    return height, width, step, encoding, data


def _target_shape(height: int, width: int, size: int | None) -> tuple[int, int]:
    return (height, width) if size is None else (size, size)


def _decode(layout: tuple[int, int, int, str, np.ndarray], size: int | None,
            out: np.ndarray) -> np.ndarray:
    """Write the RGB frame of an image layout, resized as _resize() does, into `out`.

    One pass from the message's bytes to `out`: rows padded to `step`, the channel order of
    the encoding and a nearest-pixel resize are one precomputed index (_pixel_index).
    """
    height, width, step, encoding, data = layout
    index = _pixel_index(height, width, step, encoding, size)
    if index is None:  # rgb8, unpadded, not resized: the bytes are the frame
        out.reshape(-1)[:] = data[:height * step]
    elif isinstance(index, np.ndarray):
        # 'wrap' skips numpy's bounds check: every index is < height * step <= data.size.
        np.take(data, index, out=out.reshape(index.shape), mode='wrap')
    else:  # a whole-number factor: block mean
        out[:] = _resize(_image_array(layout), size)
    return out


@functools.lru_cache(maxsize=32)
def _pixel_index(height: int, width: int, step: int, encoding: str,
                 size: int | None) -> np.ndarray | None | bool:
    """Return the byte offsets (H', W' * 3) of the output frame's bytes in the message data.

    None: the data is the frame as is; False: a block mean (not an index) resizes it.
    """
    channels, order = _CHANNELS[encoding]
    if size is None or (height, width) == (size, size):
        if encoding == 'rgb8' and step == width * 3:
            return None
        rows, xs = np.arange(height), np.arange(width)
    elif height % size == 0 and width % size == 0:
        return False
    else:
        rows, xs = _nearest_rows_columns(height, width, size)
    columns = (xs[:, None] * channels + np.array(order)).ravel()
    return (rows[:, None] * step + columns[None, :]).astype(np.intp)


def _image_array(image: object | tuple, where: str = '') -> np.ndarray:
    """Return an (H, W, 3) uint8 RGB array of a sensor_msgs/Image (or its _image_layout)."""
    height, width, step, encoding, data = (image if isinstance(image, tuple)
                                           else _image_layout(image, where))
    channels, order = _CHANNELS[encoding]
    # Rows may be padded to `step` bytes.
    rows = data[:height * step].reshape(height, step)[:, :width * channels]
    pixels = rows.reshape(height, width, channels)
    if order == (0, 1, 2) and channels == 3:
        return pixels  # rgb8: a view of the message's buffer
    return pixels[:, :, list(order)]


def _resize(image: np.ndarray, size: int | None) -> np.ndarray:
    """Resize to size x size: block mean for whole-number factors, else nearest pixel."""
    if size is None:
        return image
    height, width = image.shape[:2]
    if (height, width) == (size, size):
        return image
    if height % size == 0 and width % size == 0:
        fy, fx = height // size, width // size
        blocks = image.reshape(size, fy, size, fx, 3).astype(np.float32)
        return np.round(blocks.mean(axis=(1, 3))).astype(np.uint8)
    rows, xs = _nearest_rows_columns(height, width, size)
    columns = (xs[:, None] * 3 + np.arange(3)).ravel()
    # Rows, then byte columns of the (H, W * 3) view: ~10x faster than image[ys][:, xs].
    return image.reshape(height, width * 3)[rows][:, columns].reshape(size, size, 3)


def _nearest_rows_columns(height: int, width: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the source row of each output row and the source column of each output column."""
    rows = (np.arange(size) * height / size).astype(int)
    xs = (np.arange(size) * width / size).astype(int)
    return rows, xs
