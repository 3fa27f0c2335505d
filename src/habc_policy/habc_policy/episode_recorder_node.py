"""episode_recorder_node: records each episode into one MCAP bag and the SQLite episode index.

A thin rclpy adapter over habc_episodes (EpisodeBagWriter, recover_bag) and
habc_episodes.index (EpisodeIndex); see docs/ros_interfaces.md.

Services:
    recorder/episode_control (habc_msgs/EpisodeControl): START opens a new bag and index row,
        END closes and indexes it, ABORT closes it and labels it discarded.
    recorder/label_episode (habc_msgs/LabelEpisode): sets or changes the outcome of any
        recorded episode (relabelling included).
Publishes recorder/events (habc_msgs/EpisodeEvent, latched depth 1): START, END, LABELLED,
DISCARDED (an ABORT publishes END, then DISCARDED).
Subscribes (raw CDR, written unchanged) to the `topics` parameter: by default observation,
forward_position_controller/commands, intervention, executed_action, policy/chunk and
joint_states.

Storage: `<storage_dir>/episodes.sqlite` and `<storage_dir>/bags/<episode_id>/`. Topic names
in the bags are fully qualified, as `ros2 bag record` writes them (`/robot1/observation` in
namespace robot1). At start-up, rows this robot left 'recording' (a recorder that died
mid-episode) are marked 'incomplete' and their bags recovered; such episodes are never
trained on unless someone labels them.
"""

from collections.abc import Iterable
from dataclasses import dataclass
import importlib
import os
from pathlib import Path
import re
import shutil
import sqlite3
import time

from rclpy.node import Node
from rclpy.qos import QoSProfile
from rclpy.serialization import deserialize_message

from habc_common.node_main import spin_node
from habc_common.params import declare_node_parameters, param, validate_params
from habc_common.qos import COMMANDS, JOINT_STATES, LATCHED, SENSOR_DATA
from habc_episodes.bag_format import (
    EpisodeBagWriter,
    habc_typestore,
    read_episode_messages,
    topic_summary,
)
from habc_episodes.episode import make_episode_id, robot_label
from habc_episodes.index import EpisodeIndex, EpisodeRecord
from habc_episodes.recovery import recover_bag
from habc_episodes.vocabulary import Controller, LABEL_OUTCOMES, Outcome
from habc_msgs.msg import ActionChunk, EpisodeEvent, ExecutedAction, InterventionState
from habc_msgs.srv import EpisodeControl, LabelEpisode

EXECUTED_ACTION = 'habc_msgs/msg/ExecutedAction'
INTERVENTION_STATE = 'habc_msgs/msg/InterventionState'
ACTION_CHUNK = 'habc_msgs/msg/ActionChunk'

# Types of the topics of docs/ros_interfaces.md, so the `topics` parameter can name them
# without a type.
KNOWN_TOPICS = {
    'observation': 'habc_msgs/msg/Observation',
    'forward_position_controller/commands': 'std_msgs/msg/Float64MultiArray',
    'joint_trajectory_controller/joint_trajectory': 'trajectory_msgs/msg/JointTrajectory',
    'intervention': INTERVENTION_STATE,
    'executed_action': EXECUTED_ACTION,
    'policy/chunk': ACTION_CHUNK,
    'policy/joint_command': 'sensor_msgs/msg/JointState',
    'teleop/joint_command': 'sensor_msgs/msg/JointState',
    'teleop/engage': 'std_msgs/msg/Bool',
    'teleop/estop': 'std_msgs/msg/Bool',
    'joint_states': 'sensor_msgs/msg/JointState',
    'policy/status': 'std_msgs/msg/String',
    'sim/privileged': 'std_msgs/msg/String',
}
DEFAULT_TOPICS = ['observation', 'forward_position_controller/commands', 'intervention',
                  'executed_action', 'policy/chunk', 'joint_states']

ABORT_LABELER = 'episode_recorder'


@dataclass(frozen=True)
class EpisodeRecorderParams:
    """Parameters of episode_recorder_node."""

    storage_dir: str = param(
        '~/.habc/episodes', 'Folder of the episode index (episodes.sqlite) and the bags '
        '(bags/<episode_id>/); ~ and $VARIABLES are expanded. Keep it on a local disk: the '
        'index uses SQLite WAL, which network file systems do not support.')
    robot: str = param(
        '', 'Robot label stored with each episode and used in episode ids; empty takes the '
        'node namespace (robot1 for /robot1), or "robot" without one.')
    instruction: str = param(
        '', 'Default task instruction of an episode (a non-empty EpisodeControl.instruction '
        'replaces it).')
    topics: list[str] = param(
        DEFAULT_TOPICS, 'Recorded topics, relative to the node namespace: a topic of '
        'docs/ros_interfaces.md, or "name:package/msg/Type" for any other.')
    flush_interval_s: float = param(
        0.5, 'Write buffered messages to the bag file at least this often (s): a recorder '
        'killed mid-episode loses at most about this much.', min=0.05, max=60.0)

    def __post_init__(self) -> None:
        validate_params(self)
        parse_topics(self.topics)


PARAMS = EpisodeRecorderParams


# Plain helpers (no rclpy) ---------------------------------------------------------------------

def parse_topics(entries: Iterable[str]) -> list[tuple[str, str]]:
    """Return (relative topic name, message type) for each `topics` entry.

    Raises:
        ValueError: an empty, duplicate or unknown topic without a type, or a malformed type.
    """
    topics: list[tuple[str, str]] = []
    seen: set[str] = set()
    for entry in entries:
        name, _, msgtype = entry.partition(':')
        name, msgtype = name.strip(), msgtype.strip()
        if not name:
            raise ValueError(f'parameter topics has an empty entry {entry!r}')
        if not msgtype:
            msgtype = KNOWN_TOPICS.get(name.lstrip('/'), '')
            if not msgtype:
                raise ValueError(f'parameter topics: {name!r} is not a known habc topic; give '
                                 f'its type as "{name}:package/msg/Type"')
        if not re.fullmatch(r'\w+/msg/\w+', msgtype):
            raise ValueError(f'parameter topics: type {msgtype!r} of {name!r} is not '
                             '"package/msg/Type"')
        if name in seen:
            raise ValueError(f'parameter topics names {name!r} twice')
        seen.add(name)
        topics.append((name, msgtype))
    return topics


def storage_path(storage_dir: str) -> Path:
    """Expand ~ and $VARIABLES of the storage_dir parameter."""
    return Path(os.path.expandvars(os.path.expanduser(storage_dir)))


class EpisodeCounts:
    """Count the steps and human takeovers of one episode (no rclpy).

    Steps are executed actions. A takeover is a switch of the executed source into HUMAN
    from POLICY, ignoring HOLD in between: a watchdog hold while the human drives is not a
    new takeover. An episode that starts under human control counts one.
    """

    def __init__(self) -> None:
        self.steps = 0
        self.interventions = 0
        self._driver: int | None = None  # last executed source other than HOLD

    def on_executed_action(self) -> None:
        """Count one executed action."""
        self.steps += 1

    def on_intervention_state(self, source: int) -> None:
        """Take the executed source of one InterventionState."""
        if source == Controller.HOLD:
            return
        if source == Controller.HUMAN and self._driver != Controller.HUMAN:
            self.interventions += 1
        self._driver = source


@dataclass
class BagSummary:
    """What count_bag() found in a recorded bag."""

    counts: EpisodeCounts
    # Time of the last message (ns), None for an empty bag.
    end_ns: int | None
    # First non-empty ExecutedAction.policy_version.
    policy_version: str


def count_bag(path: str | Path) -> BagSummary:
    """Count the steps and takeovers of a recorded bag (e.g. one rescued after a crash).

    Only the ExecutedAction and InterventionState topics are deserialized.
    """
    topics, end_ns = topic_summary(path)
    wanted = [topic for topic, (msgtype, _) in topics.items()
              if msgtype in (EXECUTED_ACTION, INTERVENTION_STATE)]
    counts = EpisodeCounts()
    version = ''
    if wanted:
        for _topic, _stamp, message in read_episode_messages(path, wanted):
            if message.__msgtype__ == EXECUTED_ACTION:
                counts.on_executed_action()
                version = version or message.policy_version
            else:
                counts.on_intervention_state(message.source)
    return BagSummary(counts, end_ns, version)


def _message_class(msgtype: str) -> type:
    package, _, name = msgtype.split('/')
    try:
        return getattr(importlib.import_module(f'{package}.msg'), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f'message type {msgtype} is not installed for rclpy: {exc}') from None


def _qos_for(name: str, msgtype: str) -> QoSProfile:
    # Match the publishers' QoS (habc_common.qos): a reliable subscription would not match
    # the best-effort observation and image publishers at all.
    if name.lstrip('/') == 'observation' or msgtype == 'sensor_msgs/msg/Image':
        return SENSOR_DATA
    if msgtype == 'sensor_msgs/msg/JointState' and name.lstrip('/') == 'joint_states':
        return JOINT_STATES
    return COMMANDS


# Node ----------------------------------------------------------------------------------------

class EpisodeRecorderNode:
    """Thin rclpy adapter over EpisodeBagWriter and EpisodeIndex."""

    def __init__(self, **node_options: object) -> None:
        """Create the node; `node_options` go to rclpy's Node (e.g. parameter_overrides)."""
        self.node = Node('episode_recorder', **node_options)
        self.params = declare_node_parameters(self.node, EpisodeRecorderParams)
        p = self.params
        self.log = self.node.get_logger()
        self.storage_dir = storage_path(p.storage_dir)
        self.bag_dir = self.storage_dir / 'bags'
        self.robot = robot_label(p.robot, self.node.get_namespace())
        self.typestore = habc_typestore()
        try:
            self.index = EpisodeIndex(self.storage_dir / 'episodes.sqlite')
        except (OSError, sqlite3.Error, RuntimeError) as exc:
            raise ValueError(f'cannot open the episode index in {self.storage_dir}: '
                             f'{exc}') from exc
        self.writer: EpisodeBagWriter | None = None
        self.episode: EpisodeRecord | None = None
        self.counts = EpisodeCounts()
        self.last_episode_id = ''
        self.latest_policy_version = ''
        self.episode_policy_version = ''
        self.write_errors = 0
        self._serial = 0
        self.events = self.node.create_publisher(EpisodeEvent, 'recorder/events', LATCHED)
        self.recovered = self.recover()
        # Every callback is in the node's default, mutually exclusive callback group: the
        # bag writer is not thread-safe and spin_node uses a multi-threaded executor.
        # Relative name -> (fully qualified name, as rosbag2 stores it; message type).
        self.topics: dict[str, tuple[str, str]] = {}
        for name, msgtype in parse_topics(p.topics):
            subscription = self.node.create_subscription(
                _message_class(msgtype), name,
                lambda data, name=name: self.message_callback(name, data),
                _qos_for(name, msgtype), raw=True)
            self.topics[name] = (subscription.topic_name, msgtype)
        self.node.create_service(EpisodeControl, 'recorder/episode_control',
                                 self.episode_control_callback)
        self.node.create_service(LabelEpisode, 'recorder/label_episode',
                                 self.label_callback)
        # The writer flushes on write once flush_interval_s has passed; this timer covers
        # quiet stretches, when no write comes to trigger it.
        self.node.create_timer(p.flush_interval_s / 2.0, self.flush_callback)
        self.log.info(f'ready: robot {self.robot}, {len(self.topics)} topics, storage '
                      f'{self.storage_dir}, {len(self.recovered)} episode(s) recovered')

    # Recovery -----------------------------------------------------------------------------

    def recover(self) -> list[str]:
        """Mark this robot's rows left 'recording' as incomplete and recover their bags.

        Also retries incomplete rows whose bag was never rebuilt (a recorder killed during a
        recovery). Returns the ids of the episodes whose bag was handled.
        """
        pending = self.index.mark_incomplete_recordings(robot=self.robot)
        for record in self.index.list(status='incomplete'):
            path = Path(record.bag_path)
            if (record.robot == self.robot and record.episode_id not in pending
                    and path.is_dir() and (not (path / 'metadata.yaml').is_file()
                                           or (path / '.recover').exists())):
                pending.append(record.episode_id)
        for episode_id in pending:
            record = self.index.get(episode_id)
            summary = BagSummary(EpisodeCounts(), None, '')
            try:
                report = recover_bag(record.bag_path)
                summary = count_bag(record.bag_path)
                self.log.warning(
                    f'episode {episode_id} was cut short (the recorder stopped mid-episode): '
                    f'bag recovered with {report.message_count} messages '
                    f'({report.dropped_bytes} bytes at the end lost); marked incomplete, not '
                    'trained on unless labelled')
            except Exception as exc:  # one bad bag must not stop the recorder
                self.log.error(f'episode {episode_id}: bag {record.bag_path} could not be '
                               f'recovered ({type(exc).__name__}: {exc}); marked incomplete')
            ended_at = (summary.end_ns * 1e-9 if summary.end_ns is not None
                        else record.started_at)
            try:
                self.index.finish(episode_id, summary.counts.steps,
                                  summary.counts.interventions, ended_at=ended_at,
                                  complete=False,
                                  policy_version=(None if record.policy_version
                                                  else summary.policy_version or None))
            except (KeyError, ValueError) as exc:
                self.log.error(f'episode {episode_id}: index not updated: {exc}')
        return pending

    # Messages -----------------------------------------------------------------------------

    def message_callback(self, name: str, data: bytes) -> None:
        bag_name, msgtype = self.topics[name]
        if msgtype == ACTION_CHUNK:
            # Track the version even between episodes: it is the one a START records.
            try:
                version = deserialize_message(data, ActionChunk).policy_version
            except Exception:  # the writer below reports malformed data
                version = None
            if version is not None:
                self.latest_policy_version = version
                if self.writer is not None and not self.episode_policy_version:
                    self.episode_policy_version = version
        if self.writer is None:
            return
        try:
            self.writer.write(bag_name, self.node.get_clock().now().nanoseconds, data)
        except (ValueError, OSError, RuntimeError) as exc:
            self.write_errors += 1
            self.log.error(f'{name}: message not recorded: {exc}', throttle_duration_sec=5.0)
            return
        if msgtype == EXECUTED_ACTION:
            self.counts.on_executed_action()
            if not self.episode_policy_version:  # no chunk seen yet: the arbiter knows it
                self.episode_policy_version = deserialize_message(
                    data, ExecutedAction).policy_version
        elif msgtype == INTERVENTION_STATE:
            self.counts.on_intervention_state(deserialize_message(data,
                                                                  InterventionState).source)

    def flush_callback(self) -> None:
        if self.writer is None:
            return
        try:
            self.writer.flush()
        except (OSError, RuntimeError) as exc:
            self.log.error(f'bag flush failed: {exc}', throttle_duration_sec=5.0)

    # Services -----------------------------------------------------------------------------

    def episode_control_callback(self, request: EpisodeControl.Request,
                                 response: EpisodeControl.Response) -> EpisodeControl.Response:
        command = request.command
        if command == EpisodeControl.Request.COMMAND_START:
            accepted, episode_id, message = self.start(request.instruction)
        elif command in (EpisodeControl.Request.COMMAND_END,
                         EpisodeControl.Request.COMMAND_ABORT):
            accepted, episode_id, message = self.stop(
                abort=command == EpisodeControl.Request.COMMAND_ABORT)
        else:
            accepted, episode_id = False, self.last_episode_id
            message = (f'unknown command {command}; use COMMAND_START (0), COMMAND_END (1) or '
                       'COMMAND_ABORT (2)')
        response.accepted, response.episode_id, response.message = accepted, episode_id, message
        self._log_result(accepted, message)
        return response

    def start(self, instruction: str = '') -> tuple[bool, str, str]:
        """Start a new episode; return (accepted, episode id, message)."""
        if self.writer is not None:
            episode_id = self.episode.episode_id
            return False, episode_id, (f'episode {episode_id} is still recording; END or ABORT '
                                       'it before starting another (nothing was changed)')
        instruction = instruction or self.params.instruction
        episode_id = self._new_episode_id()
        path = self.bag_dir / episode_id
        custom = {'habc_episode_id': episode_id, 'habc_robot': self.robot,
                  'habc_instruction': instruction}
        # The bag first, then the index row: a failure in between leaves an empty bag
        # folder that nothing refers to, never an index row without its bag.
        try:
            writer = EpisodeBagWriter(path, self.typestore,
                                      flush_interval_s=self.params.flush_interval_s,
                                      custom_data=custom)
        except Exception as exc:  # rosbags raises its own error types
            return False, '', f'cannot create the bag {path}: {exc}'
        try:
            for bag_name, msgtype in self.topics.values():
                writer.add_topic(bag_name, msgtype)
            self.episode = self.index.create(
                episode_id, path, instruction, self.latest_policy_version,
                started_at=time.time(), robot=self.robot)
        except (ValueError, OSError, sqlite3.Error) as exc:
            writer.close()
            shutil.rmtree(path, ignore_errors=True)
            return False, '', f'cannot start episode {episode_id}: {exc}'
        self.writer = writer
        self.counts = EpisodeCounts()
        self.episode_policy_version = self.latest_policy_version
        self.last_episode_id = episode_id
        self.publish_event(EpisodeEvent.EVENT_START, self.episode)
        return True, episode_id, f'episode {episode_id} recording into {path}'

    def stop(self, abort: bool = False) -> tuple[bool, str, str]:
        """End (or abort) the running episode; return (accepted, episode id, message)."""
        verb = 'ABORT' if abort else 'END'
        if self.writer is None:
            last = (f' (the last episode was {self.last_episode_id})'
                    if self.last_episode_id else '')
            return False, self.last_episode_id, (f'{verb} ignored: no episode is recording'
                                                 f'{last}; START one first')
        record = self.episode
        error = self._close_writer()
        try:
            record = self.index.finish(
                record.episode_id, self.counts.steps, self.counts.interventions,
                ended_at=time.time(), complete=error is None,
                policy_version=self.episode_policy_version or None)
        except (KeyError, ValueError, sqlite3.Error) as exc:
            error = f'{error}; ' if error else ''
            error += f'index not updated: {exc}'
        self.publish_event(EpisodeEvent.EVENT_END, record)
        message = (f'episode {record.episode_id} {"aborted" if abort else "recorded"}: '
                   f'{self.counts.steps} steps, {self.counts.interventions} interventions, '
                   f'bag {record.bag_path}')
        if abort:
            try:
                record = self.index.label(record.episode_id, 'discarded', ABORT_LABELER,
                                          'aborted (recorder/episode_control ABORT)',
                                          now=time.time())
                self.publish_event(EpisodeEvent.EVENT_DISCARDED, record)
            except (KeyError, ValueError, sqlite3.Error) as exc:
                error = f'{error}; ' if error else ''
                error += f'not labelled discarded: {exc}'
        if error:
            message += f'; WARNING: {error}'
        return True, record.episode_id, message

    def label_callback(self, request: LabelEpisode.Request,
                       response: LabelEpisode.Response) -> LabelEpisode.Response:
        response.accepted, response.message = self.label(
            request.episode_id, request.outcome, request.labeler, request.note)
        self._log_result(response.accepted, response.message)
        return response

    def label(self, episode_id: str, outcome: int, labeler: str = '',
              note: str = '') -> tuple[bool, str]:
        """Set the outcome of a recorded episode; return (accepted, message)."""
        name = Outcome(outcome).label if outcome in LABEL_OUTCOMES else None
        if not episode_id:
            last = f'; the last episode is {self.last_episode_id}' if self.last_episode_id else ''
            return False, f'label rejected: episode_id is empty{last}'
        if name is None:
            return False, (f'label of {episode_id} rejected: invalid outcome {outcome}; use '
                           'OUTCOME_SUCCESS (1), OUTCOME_FAILURE (2) or OUTCOME_DISCARDED (3)')
        try:
            record = self.index.label(episode_id, name, labeler, note, now=time.time())
        except KeyError as exc:
            return False, f'label rejected: {exc.args[0]}'
        except (ValueError, sqlite3.Error) as exc:
            return False, f'label of {episode_id} rejected: {exc}'
        event = (EpisodeEvent.EVENT_DISCARDED if name == 'discarded'
                 else EpisodeEvent.EVENT_LABELLED)
        self.publish_event(event, record)
        return True, f'episode {episode_id} labelled {name}' + (
            f' by {labeler}' if labeler else '')

    # Helpers ------------------------------------------------------------------------------

    def _log_result(self, accepted: bool, message: str) -> None:
        # Two call sites: rclpy's logger refuses another severity from the same line.
        if accepted:
            self.log.info(message)
        else:
            self.log.warning(message)

    def _new_episode_id(self) -> str:
        while True:
            self._serial += 1
            episode_id = make_episode_id(self.robot, time.time(), self._serial)
            # The serial restarts with the process; a restart within the same second would
            # otherwise reuse an id.
            if not (self.bag_dir / episode_id).exists():
                try:
                    self.index.get(episode_id)
                except KeyError:
                    return episode_id

    def _close_writer(self) -> str | None:
        writer, self.writer = self.writer, None
        try:
            writer.close()
        except Exception as exc:  # the episode must still be indexed
            self.log.error(f'closing bag {writer.path} failed: {exc}; it is recovered at the '
                           'next start')
            return f'bag not closed cleanly: {exc}'
        return None

    def publish_event(self, event: int, record: EpisodeRecord) -> None:
        """Publish an EpisodeEvent for `record` (live counts while it is recording)."""
        msg = EpisodeEvent(episode_id=record.episode_id, event=event,
                           outcome=int(Outcome.parse(record.outcome)),
                           policy_version=record.policy_version)
        live = self.writer is not None and self.episode.episode_id == record.episode_id
        msg.num_steps = self.counts.steps if live else record.num_steps
        msg.num_interventions = self.counts.interventions if live else record.num_interventions
        msg.header.stamp = self.node.get_clock().now().to_msg()
        self.events.publish(msg)

    def close(self) -> None:
        """Close a running episode as incomplete (shutdown mid-episode) and the index."""
        if self.writer is not None:
            record = self.episode
            error = self._close_writer()
            try:
                self.index.finish(record.episode_id, self.counts.steps,
                                  self.counts.interventions, ended_at=time.time(),
                                  complete=False,
                                  policy_version=self.episode_policy_version or None)
                self.log.warning(f'shut down while recording: episode {record.episode_id} '
                                 f'marked incomplete{"; " + error if error else ""}')
            except (KeyError, ValueError, sqlite3.Error) as exc:
                self.log.error(f'episode {record.episode_id}: index not updated: {exc}')
        self.index.close()


def main(args: list[str] | None = None) -> None:
    """Run episode_recorder_node until shutdown."""
    spin_node(EpisodeRecorderNode, args)
