"""The episode recorder's core (no rclpy): one bag and one index row per episode.

episode_recorder_node is a thin adapter over EpisodeRecorder: it subscribes to the recorded
topics (raw CDR) and hands each message to `on_message`, answers the start/end/label
services through `start`, `stop` and `label`, flushes on a timer, and publishes what
`on_event` reports as habc_msgs/EpisodeEvent. Time comes from the injected `clock`
(seconds since the epoch: start, end and label times, episode ids) and from each message's
receive stamp (the bag's timestamps), so every path is unit-tested without DDS.

The policy version of an episode is taken from ExecutedAction.policy_version alone (the
arbiter stamps every executed step with the version of the policy command it executed):
a START records the version of the newest executed step, and an episode that started
before any step had a version takes that of its first versioned step.

Help requests (habc_msgs/HelpRequest on `help_request`) are recorded like any topic and
also summarised into the episode's index row with the takeovers (habc_episodes.help_requests:
which were requested, who answered each request). The request is latched by the policy node
and raised at most once until cleared: a request still open when an episode starts was
raised before its bag existed, so START writes that raise into the new bag first (at the
time it was received), and the episode knows it was open.

Crash recovery: rows this robot left 'recording' (a recorder that died mid-episode) are
marked 'incomplete' and their bags made readable (habc_episodes.recovery); such episodes
are never trained on unless someone labels them.
"""

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
import fcntl
import os
from pathlib import Path
import re
import shutil
import socket
import sqlite3
from typing import TextIO

from habc_common.params import param, validate_params
from habc_episodes.bag_format import (
    decode_cdr,
    EpisodeBagWriter,
    habc_typestore,
    read_episode_messages,
    topic_summary,
)
from habc_episodes.episode import make_episode_id
from habc_episodes.help_requests import (
    HELP_REQUEST_TYPE,
    HelpLog,
    HelpMessage,
    HelpSummary,
    TakeoverDetector,
)
from habc_episodes.index import EpisodeIndex, EpisodeRecord
from habc_episodes.recovery import recover_bag
from habc_episodes.vocabulary import (
    EpisodeStatus,
    LABEL_OUTCOMES,
    Outcome,
    RecorderEvent,
)

EXECUTED_ACTION = 'habc_msgs/msg/ExecutedAction'
INTERVENTION_STATE = 'habc_msgs/msg/InterventionState'

# Types of the topics of docs/ros_interfaces.md, so the `topics` parameter can name them
# without a type.
KNOWN_TOPICS = {
    'observation': 'habc_msgs/msg/Observation',
    'forward_position_controller/commands': 'std_msgs/msg/Float64MultiArray',
    'joint_trajectory_controller/joint_trajectory': 'trajectory_msgs/msg/JointTrajectory',
    'intervention': INTERVENTION_STATE,
    'executed_action': EXECUTED_ACTION,
    'policy/chunk': 'habc_msgs/msg/ActionChunk',
    'help_request': 'habc_msgs/msg/HelpRequest',
    'policy/joint_command': 'habc_msgs/msg/PolicyCommand',
    'teleop/joint_command': 'sensor_msgs/msg/JointState',
    'teleop/engage': 'std_msgs/msg/Bool',
    'teleop/estop': 'std_msgs/msg/Bool',
    'joint_states': 'sensor_msgs/msg/JointState',
    'policy/status': 'std_msgs/msg/String',
    'sim/privileged': 'std_msgs/msg/String',
}
DEFAULT_TOPICS = ['observation', 'forward_position_controller/commands', 'intervention',
                  'executed_action', 'policy/chunk', 'help_request', 'joint_states']

ABORT_LABELER = 'episode_recorder'
INDEX_FILE = 'episodes.sqlite'
BAG_DIR = 'bags'


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
    required_topics: list[str] = param(
        [], 'Topics of `topics` that must have delivered a message since the recorder '
        'started before a START is accepted (the bringup requires observation: an episode '
        'recorded before the sync node publishes cannot train a policy). Empty accepts a '
        'START at any time.')
    flush_interval_s: float = param(
        0.5, 'Write buffered messages to the bag file at least this often (s): a recorder '
        'killed mid-episode loses at most about this much.', min=0.05, max=60.0)

    def __post_init__(self) -> None:
        validate_params(self)
        names = {name for name, _ in parse_topics(self.topics)}
        unknown = [name for name in self.required_topics if name not in names]
        if unknown:
            raise ValueError(f'parameter required_topics names {", ".join(unknown)}, which '
                             'parameter topics does not record; add it there or remove it')


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
    """Count the steps and human takeovers of one episode.

    Steps are executed actions. A takeover is a switch of the executed source into HUMAN
    from POLICY, ignoring HOLD in between (habc_episodes.help_requests.TakeoverDetector): a
    watchdog hold while the human drives is not a new takeover. An episode that starts
    under human control counts one.
    """

    def __init__(self) -> None:
        self.steps = 0
        self.interventions = 0
        self._takeovers = TakeoverDetector()

    def on_executed_action(self) -> None:
        """Count one executed action."""
        self.steps += 1

    def on_intervention_state(self, source: int) -> None:
        """Take the executed source of one InterventionState."""
        if self._takeovers.on_source(source):
            self.interventions += 1


@dataclass
class BagSummary:
    """What count_bag() found in a recorded bag."""

    counts: EpisodeCounts
    # Time of the last message (ns), None for an empty bag.
    end_ns: int | None
    # First non-empty ExecutedAction.policy_version.
    policy_version: str
    # Help requests and takeovers, requested or spontaneous.
    help: HelpSummary = HelpSummary()


def count_bag(path: str | Path) -> BagSummary:
    """Count the steps, takeovers and help requests of a recorded bag (e.g. one rescued).

    Only the ExecutedAction, InterventionState and HelpRequest topics are deserialized.
    """
    topics, end_ns = topic_summary(path)
    wanted = [topic for topic, (msgtype, _) in topics.items()
              if msgtype in (EXECUTED_ACTION, INTERVENTION_STATE, HELP_REQUEST_TYPE)]
    counts = EpisodeCounts()
    log = HelpLog()
    version = ''
    if wanted:
        for _topic, receive_ns, message in read_episode_messages(path, wanted):
            if message.__msgtype__ == HELP_REQUEST_TYPE:
                log.on_help(HelpMessage.of(message, receive_ns))
                continue
            stamp = _seconds(message.header.stamp)
            if message.__msgtype__ == EXECUTED_ACTION:
                counts.on_executed_action()
                log.on_step(stamp)
                version = version or message.policy_version
            else:
                counts.on_intervention_state(message.source)
                log.on_source(stamp, message.source, message.reason)
    return BagSummary(counts, end_ns, version, log.summary())


def _seconds(stamp: object) -> float:
    return int(stamp.sec) + int(stamp.nanosec) * 1e-9


@dataclass(frozen=True)
class Reply:
    """The answer to a start, stop or label request (the services' fields)."""

    accepted: bool
    episode_id: str
    message: str


@dataclass(frozen=True)
class Recovered:
    """One episode that a previous recorder left cut short, after recovery."""

    episode_id: str
    ok: bool
    message: str


def claim_robot(storage_dir: Path, robot: str) -> TextIO:
    """Hold the store's lock of robot `robot` while this recorder runs; return the lock file.

    Several robots may record into one store: the index's robot column tells their episodes
    apart, and each recorder recovers only its own robot's rows after a crash. Two recorders
    under one robot label could not be told apart, and each would mark the other's live
    recording incomplete: the second is refused. (flock: released when the process dies.)

    Raises:
        ValueError: another running recorder records into this store as `robot`.
    """
    storage_dir.mkdir(parents=True, exist_ok=True)
    path = storage_dir / f'.recorder-{robot}.lock'
    lock = open(path, 'a+')
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or 'another process'
        lock.close()
        raise ValueError(
            f'{storage_dir} already has a running recorder for robot {robot!r} ({holder}): '
            "two robots cannot record into one store under one robot label (the index's "
            'robot column could not tell their episodes apart). Give this robot its own '
            'namespace or robot parameter, or its own storage_dir') from None
    lock.seek(0)
    lock.truncate()
    lock.write(f'pid {os.getpid()} on {socket.gethostname()}\n')
    lock.flush()
    return lock


class EpisodeRecorder:
    """Start, end, label and recover episodes: bags and index rows (see the module docstring).

    Not thread-safe: the node calls it from one mutually exclusive callback group.
    """

    def __init__(self, storage_dir: Path, robot: str, topics: Mapping[str, str], *,
                 clock: Callable[[], float], instruction: str = '',
                 flush_interval_s: float = 0.5, required_topics: Iterable[str] = (),
                 on_event: Callable[[RecorderEvent, EpisodeRecord], None] | None = None
                 ) -> None:
        """Open (or create) the index in `storage_dir`; nothing is recovered yet.

        Args:
            storage_dir: folder of episodes.sqlite and bags/.
            robot: robot label of the episodes (ids, index rows).
            topics: bag topic name -> message type of every recorded topic.
            clock: seconds since the epoch, now.
            instruction: default task instruction of an episode.
            flush_interval_s: the bag writers' flush interval.
            required_topics: bag topic names that must have delivered a message before a
                START is accepted.
            on_event: called with each event and the episode's record (live counts while
                it records).

        Raises:
            ValueError: the index cannot be opened; the message names the folder.
        """
        self.storage_dir = Path(storage_dir)
        self.bag_dir = self.storage_dir / BAG_DIR
        self.robot = robot
        self.topics = dict(topics)
        self.instruction = instruction
        self.flush_interval_s = flush_interval_s
        self.required_topics = tuple(required_topics)
        unknown = set(self.required_topics) - set(self.topics)
        if unknown:
            raise ValueError(f'required topics {sorted(unknown)} are not recorded topics')
        self._heard: set[str] = set()
        self._clock = clock
        self._on_event = on_event or (lambda event, record: None)
        self.typestore = habc_typestore()
        self._robot_lock = claim_robot(self.storage_dir, robot)
        try:
            self.index = EpisodeIndex(self.storage_dir / INDEX_FILE)
        except (OSError, sqlite3.Error, RuntimeError) as exc:
            self._robot_lock.close()
            raise ValueError(f'cannot open the episode index in {self.storage_dir}: '
                             f'{exc}') from exc
        self.writer: EpisodeBagWriter | None = None
        self.episode: EpisodeRecord | None = None
        self.counts = EpisodeCounts()
        self.help_log = HelpLog()
        # The newest help request if it is open (raised, not cleared), recording or not:
        # (topic, CDR data, receive stamp ns, message); what START carries into a new bag.
        self._open_help: tuple[str, bytes, int, HelpMessage] | None = None
        self.last_episode_id = ''
        # Version of the newest executed step, recording or not: what a START records.
        self.latest_policy_version = ''
        self.episode_policy_version = ''
        self.write_errors = 0
        self._serial = 0
        # Set when an END could not close the bag or update the index (a full disk).
        self._recover_before_start = False

    @property
    def recording(self) -> bool:
        """True while an episode records."""
        return self.writer is not None

    # Recovery -----------------------------------------------------------------------------

    def recover(self) -> list[Recovered]:
        """Mark this robot's rows left 'recording' as incomplete and recover their bags.

        Also retries incomplete rows whose bag was never rebuilt (a recorder killed during a
        recovery). One bad bag never stops the others; each outcome is in the result.
        """
        pending = self.index.mark_incomplete_recordings(robot=self.robot)
        for record in self.index.list(status=EpisodeStatus.INCOMPLETE.label):
            path = Path(record.bag_path)
            if (record.robot == self.robot and record.episode_id not in pending
                    and path.is_dir() and (not (path / 'metadata.yaml').is_file()
                                           or (path / '.recover').exists())):
                pending.append(record.episode_id)
        results = []
        for episode_id in pending:
            record = self.index.get(episode_id)
            summary = BagSummary(EpisodeCounts(), None, '')
            recovered = False
            try:
                report = recover_bag(record.bag_path)
                summary = count_bag(record.bag_path)
                recovered = True
                result = Recovered(episode_id, True, (
                    f'episode {episode_id} was cut short (the recorder stopped mid-episode): '
                    f'bag recovered with {report.message_count} messages '
                    f'({report.dropped_bytes} bytes at the end lost); marked incomplete, not '
                    'trained on unless labelled'))
            except Exception as exc:  # one bad bag must not stop the recorder
                result = Recovered(episode_id, False, (
                    f'episode {episode_id}: bag {record.bag_path} could not be recovered '
                    f'({type(exc).__name__}: {exc}); marked incomplete'))
            ended_at = (summary.end_ns * 1e-9 if summary.end_ns is not None
                        else record.started_at)
            try:
                self.index.finish(episode_id, summary.counts.steps,
                                  summary.counts.interventions, ended_at=ended_at,
                                  complete=False,
                                  policy_version=(None if record.policy_version
                                                  else summary.policy_version or None),
                                  help_summary=summary.help if recovered else None)
            except (KeyError, ValueError) as exc:
                result = Recovered(episode_id, False,
                                   f'{result.message}; index not updated: {exc}')
            results.append(result)
        return results

    # Messages -----------------------------------------------------------------------------

    def on_message(self, topic: str, data: bytes, stamp_ns: int) -> str | None:
        """Record one raw CDR message of `topic` received at `stamp_ns`.

        Returns None, or why the message was not recorded (the caller logs it, rate
        limited). Versions are tracked between episodes too.
        """
        msgtype = self.topics[topic]
        self._heard.add(topic)
        message = None
        if msgtype in (EXECUTED_ACTION, INTERVENTION_STATE, HELP_REQUEST_TYPE):
            try:
                message = decode_cdr(self.typestore, msgtype, data)[0]
            except ValueError:
                message = None  # the writer below reports malformed data
            if message is not None and msgtype == EXECUTED_ACTION and message.policy_version:
                self.latest_policy_version = message.policy_version
        help_message = None
        if message is not None and msgtype == HELP_REQUEST_TYPE:
            help_message = HelpMessage.of(message, stamp_ns)
            self._open_help = ((topic, bytes(data), stamp_ns, help_message)
                               if help_message.active else None)
        if self.writer is None:
            return None
        try:
            self.writer.write(topic, stamp_ns, data)
        except (ValueError, OSError, RuntimeError) as exc:
            self.write_errors += 1
            return f'{topic}: message not recorded: {exc}'
        if msgtype == EXECUTED_ACTION:
            self.counts.on_executed_action()
            if not self.episode_policy_version:
                self.episode_policy_version = self.latest_policy_version
            # The first ticks may still carry the previous episode's id (the arbiter hears
            # of START on its own): not a step of this one (as episode_bags reads it).
            if message is not None and message.episode_id in ('', self.episode.episode_id):
                self.help_log.on_step(_seconds(message.header.stamp))
        elif msgtype == INTERVENTION_STATE:
            self.counts.on_intervention_state(message.source)
            self.help_log.on_source(_seconds(message.header.stamp), message.source,
                                    message.reason)
        elif help_message is not None:
            self.help_log.on_help(help_message)
        return None

    def flush(self) -> str | None:
        """Write buffered messages to the bag; return why not, or None."""
        if self.writer is None:
            return None
        try:
            self.writer.flush()
        except (OSError, RuntimeError) as exc:
            return f'bag flush failed: {exc}'
        return None

    # Episodes -----------------------------------------------------------------------------

    def start(self, instruction: str = '') -> Reply:
        """Start a new episode: a new bag, then its index row."""
        if self.writer is not None:
            episode_id = self.episode.episode_id
            return Reply(False, episode_id, f'episode {episode_id} is still recording; END or '
                         'ABORT it before starting another (nothing was changed)')
        silent = [topic for topic in self.required_topics if topic not in self._heard]
        if silent:
            return Reply(False, '', f'not ready: no message yet on {", ".join(silent)} (is '
                         'the node that publishes it running?); no episode was started')
        recovered = ''
        if self._recover_before_start:
            try:
                results = self.recover()
            except (OSError, sqlite3.Error, ValueError) as exc:
                return Reply(False, '', f'not started: the last episode could not be closed '
                             f'and recovering it failed too ({exc}); free space or fix the '
                             'storage, then START again')
            self._recover_before_start = False
            recovered = ''.join(f' (first: {result.message})' for result in results)
        instruction = instruction or self.instruction
        episode_id = self._new_episode_id()
        path = self.bag_dir / episode_id
        custom = {'habc_episode_id': episode_id, 'habc_robot': self.robot,
                  'habc_instruction': instruction}
        # The bag first, then the index row: a failure in between leaves an empty bag
        # folder that nothing refers to, never an index row without its bag.
        try:
            writer = EpisodeBagWriter(path, self.typestore,
                                      flush_interval_s=self.flush_interval_s,
                                      custom_data=custom)
        except Exception as exc:  # rosbags raises its own error types
            return Reply(False, '', f'cannot create the bag {path}: {exc}')
        help_log = HelpLog()
        try:
            for topic, msgtype in self.topics.items():
                writer.add_topic(topic, msgtype)
            if self._open_help is not None:
                topic, data, stamp_ns, help_message = self._open_help
                writer.write(topic, stamp_ns, data)
                help_log.on_help(help_message)
            self.episode = self.index.create(
                episode_id, path, instruction, self.latest_policy_version,
                started_at=self._clock(), robot=self.robot)
        except (ValueError, OSError, sqlite3.Error) as exc:
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - a full disk fails the close too; the bag goes
                pass
            shutil.rmtree(path, ignore_errors=True)
            return Reply(False, '', f'cannot start episode {episode_id}: {exc}')
        self.writer = writer
        self.counts = EpisodeCounts()
        self.help_log = help_log
        self.episode_policy_version = self.latest_policy_version
        self.last_episode_id = episode_id
        self._emit(RecorderEvent.START, self.episode)
        return Reply(True, episode_id, f'episode {episode_id} recording into {path}{recovered}')

    def stop(self, abort: bool = False) -> Reply:
        """End (or abort: end and label discarded) the running episode."""
        verb = 'ABORT' if abort else 'END'
        if self.writer is None:
            last = (f' (the last episode was {self.last_episode_id})'
                    if self.last_episode_id else '')
            return Reply(False, self.last_episode_id,
                         f'{verb} ignored: no episode is recording{last}; START one first')
        record, error = self._finish(complete=True)
        self._emit(RecorderEvent.END, record)
        message = (f'episode {record.episode_id} {"aborted" if abort else "recorded"}: '
                   f'{record.num_steps} steps, {record.num_interventions} interventions, '
                   f'bag {record.bag_path}')
        if abort:
            try:
                record = self.index.label(record.episode_id, Outcome.DISCARDED, ABORT_LABELER,
                                          'aborted (recorder/episode_control ABORT)',
                                          now=self._clock())
                self._emit(RecorderEvent.DISCARDED, record)
            except (KeyError, ValueError, sqlite3.Error) as exc:
                error = f'{error}; ' if error else ''
                error += f'not labelled discarded: {exc}'
        if error:
            message += f'; WARNING: {error}'
        return Reply(True, record.episode_id, message)

    def label(self, episode_id: str, outcome: int, labeler: str = '',
              note: str = '') -> Reply:
        """Set (or change) the outcome of any recorded episode, the recording one included."""
        if not episode_id:
            last = f'; the last episode is {self.last_episode_id}' if self.last_episode_id else ''
            return Reply(False, '', f'label rejected: episode_id is empty{last}')
        if outcome not in LABEL_OUTCOMES:
            return Reply(False, episode_id, (
                f'label of {episode_id} rejected: invalid outcome {outcome}; use '
                'OUTCOME_SUCCESS (1), OUTCOME_FAILURE (2) or OUTCOME_DISCARDED (3)'))
        name = Outcome(outcome)
        try:
            record = self.index.label(episode_id, name, labeler, note, now=self._clock())
        except KeyError as exc:
            return Reply(False, episode_id, f'label rejected: {exc.args[0]}')
        except (ValueError, sqlite3.Error) as exc:
            return Reply(False, episode_id, f'label of {episode_id} rejected: {exc}')
        self._emit(RecorderEvent.DISCARDED if name == Outcome.DISCARDED
                   else RecorderEvent.LABELLED, record)
        return Reply(True, episode_id, f'episode {episode_id} labelled {name.label}' + (
            f' by {labeler}' if labeler else ''))

    def close(self) -> str | None:
        """Close a running episode as incomplete (shutdown mid-episode), then the index.

        Returns a warning for the log when an episode was cut short, else None.
        """
        warning = None
        if self.writer is not None:
            episode_id = self.episode.episode_id
            # _finish reports a bag or index failure in `error` instead of raising.
            _, error = self._finish(complete=False)
            warning = (f'shut down while recording: episode {episode_id} marked '
                       f'incomplete{"; " + error if error else ""}')
        self.index.close()
        self._robot_lock.close()
        return warning

    # Helpers ------------------------------------------------------------------------------

    def live_record(self, record: EpisodeRecord) -> EpisodeRecord:
        """`record` with the live counts and version when it is the recording episode."""
        if self.writer is None or self.episode.episode_id != record.episode_id:
            return record
        return replace(record, num_steps=self.counts.steps,
                       num_interventions=self.counts.interventions,
                       policy_version=self.episode_policy_version or record.policy_version)

    def _emit(self, event: RecorderEvent, record: EpisodeRecord) -> None:
        self._on_event(event, self.live_record(record))

    def _finish(self, complete: bool) -> tuple[EpisodeRecord, str | None]:
        """Close the bag and write the counts; (record, error text or None)."""
        record = self.episode
        writer, self.writer = self.writer, None
        error = None
        try:
            writer.close()
        except Exception as exc:  # the episode must still be indexed
            error = f'bag {writer.path} not closed cleanly ({exc}); recovered at the next start'
        try:
            record = self.index.finish(
                record.episode_id, self.counts.steps, self.counts.interventions,
                ended_at=self._clock(), complete=complete and error is None,
                policy_version=self.episode_policy_version or None,
                help_summary=self.help_log.summary())
        except (KeyError, ValueError, sqlite3.Error) as exc:
            error = f'{error}; ' if error else ''
            error += f'index not updated: {exc}'
            record = replace(record, num_steps=self.counts.steps,
                             num_interventions=self.counts.interventions)
        if error:
            # A full disk, say: the next START first recovers the bag and marks the row
            # incomplete, as a restart would (the row is not left 'recording').
            self._recover_before_start = True
        return record, error

    def _new_episode_id(self) -> str:
        while True:
            self._serial += 1
            episode_id = make_episode_id(self.robot, self._clock(), self._serial)
            # The serial restarts with the process; a restart within the same second would
            # otherwise reuse an id.
            if not (self.bag_dir / episode_id).exists():
                try:
                    self.index.get(episode_id)
                except KeyError:
                    return episode_id
