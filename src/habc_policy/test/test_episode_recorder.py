"""EpisodeRecorder core with injected time: start, end, label, relabel, abort, crash recovery."""

from pathlib import Path

import numpy as np
import pytest

from habc_episodes.bag_format import habc_typestore, read_episode_messages
from habc_episodes.episode import make_episode_id, robot_label
from habc_episodes.index import EpisodeIndex
from habc_episodes.vocabulary import Controller, Outcome, RecorderEvent
from habc_msgs.msg import EpisodeEvent
from habc_policy.episode_recorder import (
    count_bag,
    EpisodeCounts,
    EpisodeRecorder,
    EpisodeRecorderParams,
    parse_topics,
)

STORE = habc_typestore()
EXECUTED, INTERVENTION, COMMANDS = ('/r/executed_action', '/r/intervention',
                                    '/r/forward_position_controller/commands')
TOPICS = {EXECUTED: 'habc_msgs/msg/ExecutedAction',
          INTERVENTION: 'habc_msgs/msg/InterventionState',
          COMMANDS: 'std_msgs/msg/Float64MultiArray'}


class Clock:
    """Seconds since the epoch that only move when the test says so."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def cdr(msgtype: str, **fields: object) -> bytes:
    """CDR bytes of a habc message, as a raw rclpy subscription delivers them."""
    cls = STORE.types[msgtype]
    defaults = {'header': STORE.types['std_msgs/msg/Header'](
        stamp=STORE.types['builtin_interfaces/msg/Time'](sec=0, nanosec=0), frame_id='')}
    if msgtype == 'habc_msgs/msg/ExecutedAction':
        defaults.update(source=0, segment_id=0, episode_id='', policy_version='',
                        joint_names=[], positions=np.zeros(0))
    elif msgtype == 'habc_msgs/msg/InterventionState':
        defaults.update(active=False, source=0, segment_id=0, episode_id='', reason='')
    else:
        defaults = {'layout': STORE.types['std_msgs/msg/MultiArrayLayout'](dim=[],
                                                                           data_offset=0),
                    'data': np.zeros(0)}
    defaults.update(fields)
    return bytes(STORE.serialize_cdr(cls(**defaults), msgtype))


def executed(source=Controller.POLICY, version='', k=0) -> bytes:
    return cdr('habc_msgs/msg/ExecutedAction', source=int(source), policy_version=version,
               positions=np.array([float(k)]))


def intervention(source) -> bytes:
    return cdr('habc_msgs/msg/InterventionState', source=int(source),
               active=source == Controller.HUMAN)


@pytest.fixture
def make(tmp_path):
    made = []

    def make_recorder(clock=None, **options):
        events = []
        recorder = EpisodeRecorder(tmp_path / 'episodes', 'r', TOPICS, clock=clock or Clock(),
                                   on_event=lambda event, record: events.append(
                                       (event, record)), **options)
        made.append(recorder)
        return recorder, events
    yield make_recorder
    for recorder in made:
        recorder.close()  # a no-op for one a test closed already


def index_row(tmp_path: Path, episode_id: str):
    with EpisodeIndex(tmp_path / 'episodes' / 'episodes.sqlite', read_only=True) as index:
        return index.get(episode_id)


# Plain helpers -------------------------------------------------------------------------------

def test_episode_ids_and_robot_labels():
    assert make_episode_id('robot1', 0.0, 3) == 'robot1-19700101-000000-3'
    assert robot_label('', '/') == 'robot'
    assert robot_label('', '/lab/robot1') == 'lab_robot1'
    assert robot_label('arm a', '/x') == 'arm_a'


def test_topics_parameter():
    assert parse_topics(['executed_action', 'cam:sensor_msgs/msg/Image']) == [
        ('executed_action', 'habc_msgs/msg/ExecutedAction'), ('cam', 'sensor_msgs/msg/Image')]
    with pytest.raises(ValueError, match='not a known habc topic; give its type'):
        parse_topics(['camera/top/image_raw'])
    with pytest.raises(ValueError, match='twice'):
        parse_topics(['intervention', 'intervention'])
    with pytest.raises(ValueError, match='package/msg/Type'):
        EpisodeRecorderParams(topics=['x:Image'])

    with pytest.raises(ValueError, match='required_topics names policy/chunk, which '
                       'parameter topics does not record'):
        EpisodeRecorderParams(topics=['observation'], required_topics=['policy/chunk'])


def test_start_waits_for_a_message_on_every_required_topic(make, tmp_path):
    recorder, events = make(required_topics=[EXECUTED, INTERVENTION])
    recorder.on_message(EXECUTED, executed(), 1)
    reply = recorder.start()
    assert not reply.accepted and reply.message.startswith(
        f'not ready: no message yet on {INTERVENTION} (is the node that publishes it')
    assert not recorder.recording and not events
    assert not (tmp_path / 'episodes' / 'bags').exists() or not any(
        (tmp_path / 'episodes' / 'bags').iterdir())
    recorder.on_message(INTERVENTION, intervention(Controller.POLICY), 2)
    assert recorder.start().accepted and recorder.recording

def test_takeovers_count_switches_into_human_ignoring_holds():
    counts = EpisodeCounts()
    P, H, D = Controller.POLICY, Controller.HUMAN, Controller.HOLD  # noqa: N806
    for source in (P, H, D, H, H, P, D, H):
        counts.on_intervention_state(source)
    assert counts.interventions == 2
    starts_human = EpisodeCounts()
    starts_human.on_intervention_state(Controller.HUMAN)
    assert starts_human.interventions == 1


def test_finish_can_fill_in_the_policy_version(tmp_path):
    with EpisodeIndex(tmp_path / 'index.sqlite') as index:
        index.create('e1', tmp_path / 'e1', 'task', '', started_at=1.0)
        assert index.finish('e1', 3, 1, ended_at=2.0, policy_version='2').policy_version == '2'
        index.create('e2', tmp_path / 'e2', 'task', '1:sft', started_at=1.0)
        assert index.finish('e2', 3, 1, ended_at=2.0).policy_version == '1:sft'


def test_recorder_events_are_the_message_constants():
    assert [int(e) for e in RecorderEvent] == [
        EpisodeEvent.EVENT_START, EpisodeEvent.EVENT_END, EpisodeEvent.EVENT_LABELLED,
        EpisodeEvent.EVENT_DISCARDED]


# The core ------------------------------------------------------------------------------------

def test_start_record_end_with_injected_time(make, tmp_path):
    clock = Clock(1_700_000_000.0)
    recorder, events = make(clock, instruction='default task')
    # Versions are tracked from executed actions between episodes too.
    assert recorder.on_message(EXECUTED, executed(version='1:sft'), 5) is None
    reply = recorder.start()
    assert reply.accepted and reply.episode_id == make_episode_id('r', clock.now, 1)
    again = recorder.start('other')
    assert (again.accepted, again.episode_id) == (False, reply.episode_id)
    assert 'still recording' in again.message

    sources = (Controller.POLICY, Controller.HUMAN, Controller.HOLD, Controller.HUMAN,
               Controller.POLICY, Controller.HUMAN)
    for k, source in enumerate(sources):
        assert recorder.on_message(INTERVENTION, intervention(source), 1000 + k) is None
        version = '1:sft' if k < 3 else '2'  # swapped mid-episode: the episode keeps its first
        assert recorder.on_message(EXECUTED, executed(source, version, k), 1000 + k) is None
    assert recorder.live_record(recorder.episode).num_steps == 6
    clock.now += 12.5
    ended = recorder.stop()
    assert ended.accepted and '6 steps, 2 interventions' in ended.message
    assert [event for event, _ in events] == [RecorderEvent.START, RecorderEvent.END]
    start_record, end_record = (record for _, record in events)
    assert (start_record.num_steps, start_record.policy_version) == (0, '1:sft')
    assert (end_record.num_steps, end_record.num_interventions) == (6, 2)

    row = index_row(tmp_path, reply.episode_id)
    assert (row.status, row.outcome, row.instruction, row.robot) == (
        'complete', 'unlabelled', 'default task', 'r')
    assert (row.started_at, row.ended_at, row.policy_version) == (
        1_700_000_000.0, 1_700_000_012.5, '1:sft')
    stamps = [stamp for _, stamp, _ in read_episode_messages(row.bag_path)]
    assert stamps == sorted(stamps) and stamps[0] == 1000  # receive stamps, not the clock
    assert count_bag(row.bag_path).counts.steps == 6

    idle = recorder.stop()
    assert not idle.accepted and f'the last episode was {reply.episode_id}' in idle.message
    # Nothing is written between episodes.
    assert recorder.on_message(EXECUTED, executed(version='2'), 2000) is None
    assert count_bag(row.bag_path).counts.steps == 6
    # The next START records the version acting now.
    second = recorder.start()
    assert index_row(tmp_path, second.episode_id).policy_version == '2'


def test_label_relabel_unknown_and_invalid(make, tmp_path):
    clock = Clock()
    recorder, events = make(clock)
    episode_id = recorder.start().episode_id
    recorder.stop()
    clock.now += 3.0
    labelled = recorder.label(episode_id, Outcome.SUCCESS, 'alice', 'clean')
    assert labelled.accepted and labelled.message.endswith('labelled success by alice')
    row = index_row(tmp_path, episode_id)
    assert (row.outcome, row.labeler, row.note, row.labelled_at) == (
        'success', 'alice', 'clean', clock.now)
    first_seq = row.label_seq
    assert recorder.label(episode_id, Outcome.FAILURE, 'bob').accepted
    row = index_row(tmp_path, episode_id)
    assert (row.outcome, row.labeler) == ('failure', 'bob') and row.label_seq > first_seq
    assert [event for event, _ in events][-2:] == [RecorderEvent.LABELLED] * 2

    unknown = recorder.label('nope-1', Outcome.SUCCESS)
    assert not unknown.accepted and "'nope-1' is not in the episode index" in unknown.message
    bad = recorder.label(episode_id, 7)
    assert not bad.accepted and 'invalid outcome 7' in bad.message
    unlabelled = recorder.label(episode_id, Outcome.UNLABELLED)
    assert not unlabelled.accepted and 'invalid outcome 0' in unlabelled.message
    empty = recorder.label('', Outcome.SUCCESS)
    assert not empty.accepted and f'the last episode is {episode_id}' in empty.message
    assert index_row(tmp_path, episode_id).outcome == 'failure'  # refusals changed nothing
    assert len(events) == 4


def test_a_label_before_the_end_is_kept_and_the_end_keeps_it(make, tmp_path):
    recorder, events = make()
    episode_id = recorder.start().episode_id
    recorder.on_message(EXECUTED, executed(version='3'), 10)
    early = recorder.label(episode_id, Outcome.FAILURE, 'carol')
    assert early.accepted
    # The event of the recording episode carries the live counts.
    assert events[-1][0] == RecorderEvent.LABELLED and events[-1][1].num_steps == 1
    assert recorder.stop().accepted
    row = index_row(tmp_path, episode_id)
    assert (row.status, row.outcome, row.labeler, row.num_steps) == (
        'complete', 'failure', 'carol', 1)
    assert row.trainable


def test_abort_discards_and_keeps_the_bag(make, tmp_path):
    recorder, events = make()
    episode_id = recorder.start().episode_id
    for k in range(3):
        recorder.on_message(EXECUTED, executed(k=k), 10 + k)
    aborted = recorder.stop(abort=True)
    assert aborted.accepted and 'aborted: 3 steps' in aborted.message
    assert [event for event, _ in events] == [RecorderEvent.START, RecorderEvent.END,
                                              RecorderEvent.DISCARDED]
    row = index_row(tmp_path, episode_id)
    assert (row.status, row.outcome, row.labeler, row.num_steps) == (
        'complete', 'discarded', 'episode_recorder', 3)
    assert count_bag(row.bag_path).counts.steps == 3


def test_a_full_disk_at_start_is_refused_and_the_recorder_goes_on(make, tmp_path,
                                                                  monkeypatch):
    # Found by tools/fault_matrix.py: with the disk full, the index row failed, then closing
    # the new bag failed too, and that second error ended the recorder process.
    import errno
    import sqlite3

    from habc_episodes.bag_format import EpisodeBagWriter
    from habc_episodes.index import EpisodeIndex

    recorder, _ = make()
    full = OSError(errno.ENOSPC, 'No space left on device')

    def index_full(*args, **kwargs):
        raise sqlite3.OperationalError('database or disk is full')

    def close_full(self):
        raise full

    with monkeypatch.context() as patch:
        patch.setattr(EpisodeIndex, 'create', index_full)
        patch.setattr(EpisodeBagWriter, 'close', close_full)
        reply = recorder.start()
    assert not reply.accepted and 'database or disk is full' in reply.message
    assert not list((tmp_path / 'episodes' / 'bags').glob('*'))  # no half bag left behind
    first = recorder.start()  # space again: recording goes on
    assert first.accepted
    for k in range(3):
        recorder.on_message(EXECUTED, executed(k=k), 10 + k)

    # The disk fills during the episode: neither its bag nor its row can be finished.
    def finish_full(*args, **kwargs):
        raise sqlite3.OperationalError('database or disk is full')

    with monkeypatch.context() as patch:
        patch.setattr(EpisodeIndex, 'finish', finish_full)
        patch.setattr(EpisodeBagWriter, 'close', close_full)
        ended = recorder.stop()
    assert ended.accepted and 'index not updated: database or disk is full' in ended.message
    assert index_row(tmp_path, first.episode_id).status == 'recording'
    # The next start recovers it first, as a restart would: its row is not left recording.
    second = recorder.start()
    assert second.accepted and f'episode {first.episode_id}' in second.message
    assert 'marked incomplete' in second.message  # its bag never got its data: not readable
    assert index_row(tmp_path, first.episode_id).status == 'incomplete'


def test_malformed_data_is_refused_and_the_episode_goes_on(make, tmp_path):
    recorder, _ = make()
    episode_id = recorder.start().episode_id
    error = recorder.on_message(EXECUTED, b'{"json": 1}', 10)
    assert error and 'not CDR' in error and recorder.write_errors == 1
    assert recorder.on_message(EXECUTED, executed(), 11) is None
    recorder.stop()
    assert index_row(tmp_path, episode_id).num_steps == 1


def test_crash_recovery_marks_incomplete_and_keeps_what_was_flushed(make, tmp_path):
    clock = Clock()
    crashed, _ = make(clock, flush_interval_s=None)
    episode_id = crashed.start().episode_id
    for k in range(5):
        crashed.on_message(INTERVENTION, intervention(Controller.HUMAN if k == 2
                                                      else Controller.POLICY), 100 + k)
        crashed.on_message(EXECUTED, executed(version='4', k=k), 100 + k)
    assert crashed.flush() is None
    crashed.on_message(EXECUTED, executed(version='4', k=99), 200)  # never flushed
    # The process dies here: no END, no close; the row stays 'recording'. Its store lock
    # goes with the process (flock), as it goes here with the file.
    crashed._robot_lock.close()
    bag = Path(index_row(tmp_path, episode_id).bag_path)
    assert not (bag / 'metadata.yaml').exists()

    clock.now += 60.0
    restarted, events = make(clock)
    (result,) = restarted.recover()
    assert result.ok and result.episode_id == episode_id and 'recovered' in result.message
    row = index_row(tmp_path, episode_id)
    assert (row.status, row.outcome, row.num_steps, row.num_interventions) == (
        'incomplete', 'unlabelled', 5, 1)
    assert row.policy_version == '4' and not row.trainable
    positions = [msg.positions[0] for topic, _, msg in read_episode_messages(bag)
                 if topic == EXECUTED]
    assert positions == [0.0, 1.0, 2.0, 3.0, 4.0]
    # The end is the bag's (rosbags' end time: the last flushed stamp, exclusive), not the
    # restarted recorder's clock.
    assert 104e-9 <= row.ended_at < 200e-9
    # Nothing left to recover; the restarted recorder is idle and records anew.
    assert restarted.recover() == []
    assert not restarted.stop().accepted
    assert restarted.start().accepted and events[-1][0] == RecorderEvent.START
    # A labelled incomplete episode becomes trainable.
    assert restarted.label(episode_id, Outcome.SUCCESS).accepted
    assert index_row(tmp_path, episode_id).trainable


def test_an_unrecoverable_bag_is_reported_and_the_rest_goes_on(make, tmp_path):
    crashed, _ = make()
    episode_id = crashed.start().episode_id
    bag = Path(index_row(tmp_path, episode_id).bag_path)
    for path in bag.iterdir():
        path.write_bytes(b'garbage')
    crashed._robot_lock.close()  # the process died
    restarted, _ = make()
    (result,) = restarted.recover()
    assert not result.ok and episode_id in result.message and 'marked incomplete' in result.message
    assert index_row(tmp_path, episode_id).status == 'incomplete'
    assert restarted.start().accepted


def test_shutdown_mid_episode_marks_it_incomplete(make, tmp_path):
    recorder, _ = make()
    episode_id = recorder.start().episode_id
    recorder.on_message(EXECUTED, executed(), 1)
    warning = recorder.close()
    assert warning and f'episode {episode_id} marked incomplete' in warning
    row = index_row(tmp_path, episode_id)
    assert (row.status, row.num_steps) == ('incomplete', 1)
    # The bag was closed cleanly: it reads without recovery.
    assert count_bag(row.bag_path).counts.steps == 1


# Help requests (issue 15) --------------------------------------------------------------------

HELP = '/r/help_request'
SEC = 1_000_000_000


def header(stamp_ns: int):
    return STORE.types['std_msgs/msg/Header'](stamp=STORE.types['builtin_interfaces/msg/Time'](
        sec=stamp_ns // SEC, nanosec=stamp_ns % SEC), frame_id='')


def help_request(stamp_ns: int, active: bool, reason: str, p_v: float = 0.25) -> bytes:
    msgtype = 'habc_msgs/msg/HelpRequest'
    return bytes(STORE.serialize_cdr(STORE.types[msgtype](
        header=header(stamp_ns), active=active, reason=reason, policy_version='2',
        viability=p_v, trace_stamps=np.zeros(0), trace_viability=np.zeros(0, np.float32)),
        msgtype))


def tick(recorder, stamp_ns: int, source: Controller, reason: str, episode_id: str) -> None:
    """One control tick: the arbiter's InterventionState and ExecutedAction, received 1 ms on."""
    recorder.on_message(INTERVENTION, cdr('habc_msgs/msg/InterventionState',
                                          header=header(stamp_ns), source=int(source),
                                          active=source == Controller.HUMAN, reason=reason),
                        stamp_ns + 1_000_000)
    recorder.on_message(EXECUTED, cdr('habc_msgs/msg/ExecutedAction', header=header(stamp_ns),
                                      source=int(source), episode_id=episode_id,
                                      policy_version='2', positions=np.zeros(1)),
                        stamp_ns + 1_000_000)


@pytest.fixture
def help_recorder(tmp_path):
    recorder = EpisodeRecorder(tmp_path / 'episodes', 'r',
                               {**TOPICS, HELP: 'habc_msgs/msg/HelpRequest'}, clock=Clock())
    yield recorder
    recorder.close()


def test_help_requests_go_into_the_bag_and_the_index_row(help_recorder, tmp_path):
    recorder = help_recorder
    t0 = 100 * SEC
    ms = 1_000_000
    # Raised between episodes (latched by the policy node): the next episode carries it.
    recorder.on_message(HELP, help_request(t0 - 100 * ms, True, 'low', 0.125), t0 - 99 * ms)
    episode_id = recorder.start().episode_id
    tick(recorder, t0 - 20 * ms, Controller.POLICY, 'start', 'previous-episode')  # not a step
    tick(recorder, t0, Controller.POLICY, 'start', episode_id)
    tick(recorder, t0 + 20 * ms, Controller.HUMAN, 'engage', episode_id)
    recorder.on_message(HELP, help_request(t0 + 20 * ms, False, 'answered'), t0 + 22 * ms)
    tick(recorder, t0 + 40 * ms, Controller.HOLD, 'watchdog', episode_id)
    tick(recorder, t0 + 60 * ms, Controller.HUMAN, 'engage', episode_id)
    tick(recorder, t0 + 80 * ms, Controller.POLICY, 'handback', episode_id)
    recorder.on_message(HELP, help_request(t0 + 80 * ms, True, 'stalled', 0.375), t0 + 81 * ms)
    recorder.on_message(HELP, help_request(t0 + 100 * ms, False, 'recovered'), t0 + 101 * ms)
    tick(recorder, t0 + 120 * ms, Controller.HUMAN, 'deviation', episode_id)
    assert recorder.stop().accepted

    row = index_row(tmp_path, episode_id)
    assert (row.num_interventions, row.num_help_requests, row.num_requested_takeovers,
            row.num_spontaneous_takeovers) == (2, 2, 1, 1)
    first, second = row.help_requests
    assert (first.reason, first.p_v, first.cleared_reason, first.answered_by) == (
        'low', 0.125, 'answered', 'engage')
    # Seconds from the episode's first step (t0), not the neighbouring episode's tick.
    assert first.raised_at == pytest.approx(-0.1) and first.cleared_at == pytest.approx(0.02)
    assert (second.reason, second.raised_at, second.cleared_reason, second.answered_by) == (
        'stalled', pytest.approx(0.08), 'recovered', '')
    # The bag holds the carried raise first, at the time it was received.
    help_messages = [(stamp, msg.active, msg.reason)
                     for _, stamp, msg in read_episode_messages(row.bag_path, [HELP])]
    assert help_messages[0] == (t0 - 99 * ms, True, 'low') and len(help_messages) == 4
    # A bag counted again (as after a crash) gives the same summary.
    summary = count_bag(row.bag_path).help
    assert summary.requests[0].answered_by == 'engage'
    assert (summary.requested_takeovers, summary.spontaneous_takeovers) == (1, 1)

    # The answered request is closed: the next episode starts with none open.
    second_id = recorder.start().episode_id
    tick(recorder, t0 + 500 * ms, Controller.POLICY, 'start', second_id)
    recorder.stop()
    later = index_row(tmp_path, second_id)
    assert (later.num_help_requests, later.num_requested_takeovers,
            later.num_spontaneous_takeovers) == (0, 0, 0)


def test_a_second_recorder_for_the_same_robot_and_store_is_refused(make, tmp_path):
    first, _ = make()
    with pytest.raises(ValueError, match="running recorder for robot 'r'.*own namespace"):
        EpisodeRecorder(tmp_path / 'episodes', 'r', TOPICS, clock=Clock())
    # Another robot may share the store: the robot column tells their episodes apart.
    other = EpisodeRecorder(tmp_path / 'episodes', 'r2', TOPICS, clock=Clock())
    other.close()
    first.close()
    EpisodeRecorder(tmp_path / 'episodes', 'r', TOPICS, clock=Clock()).close()
