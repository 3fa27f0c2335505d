"""episode_recorder_node on real rclpy: services, raw recording, events, a killed recorder.

The recorder's logic (start, end, labels, recovery) is unit-tested in test_episode_recorder.py.
"""

import itertools
from pathlib import Path
import shutil
import signal
import sys
import time

from builtin_interfaces.msg import Time
import pytest
from rclpy.parameter import Parameter
from ros_fixtures import GUARD_S
from ros_helpers import Child
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Float64MultiArray

from habc_common.qos import COMMANDS, JOINT_STATES, LATCHED, LATCHED_EVENTS, SENSOR_DATA
from habc_episodes.bag_format import read_episode_messages
from habc_episodes.index import EpisodeIndex
from habc_episodes.recovery import recover_bag
from habc_episodes.vocabulary import Controller
from habc_msgs.msg import (
    ActionChunk,
    EpisodeEvent,
    ExecutedAction,
    HelpRequest,
    InterventionState,
    Observation,
)
from habc_msgs.srv import EpisodeControl, LabelEpisode
from habc_policy.episode_recorder import count_bag
from habc_policy.episode_recorder_node import EpisodeRecorderNode

START, END, ABORT = (EpisodeControl.Request.COMMAND_START, EpisodeControl.Request.COMMAND_END,
                     EpisodeControl.Request.COMMAND_ABORT)

# The node on real rclpy ------------------------------------------------------------------------

_namespaces = (f'rec{k}' for k in itertools.count())


class Client:
    """Publishers of the recorded topics and clients of the recorder's services."""

    QOS = {'observation': SENSOR_DATA, 'joint_states': JOINT_STATES,
           'help_request': LATCHED_EVENTS}
    TYPES = {'observation': Observation, 'forward_position_controller/commands':
             Float64MultiArray, 'intervention': InterventionState,
             'executed_action': ExecutedAction, 'policy/chunk': ActionChunk,
             'help_request': HelpRequest, 'joint_states': JointState}

    def __init__(self, ros, ns):
        self.ros = ros
        self.node = ros.create_node(f'{ns}_client')
        self.ns = ns
        self.pubs = {topic: self.node.create_publisher(
            msgtype, f'/{ns}/{topic}', self.QOS.get(topic, COMMANDS))
            for topic, msgtype in self.TYPES.items()}
        self.events = []
        # The event stream: a depth-1 latched reader could drop one of two back-to-back
        # events between two spins.
        self.node.create_subscription(EpisodeEvent, f'/{ns}/recorder/events',
                                      self.events.append, COMMANDS)
        self.control = self.node.create_client(EpisodeControl, f'/{ns}/recorder/episode_control')
        self.labeler = self.node.create_client(LabelEpisode, f'/{ns}/recorder/label_episode')

    def wait_ready(self):
        """Wait for both services and for every recorded topic to be matched."""
        self.ros.wait_for(lambda: (self.control.service_is_ready()
                                   and self.labeler.service_is_ready()
                                   and all(p.get_subscription_count()
                                           for p in self.pubs.values())),
                          f'recorder /{self.ns} serving and subscribed to every topic')

    def call(self, client, request, resend_after_s=None):
        """Call a service; with `resend_after_s`, resend a request left unanswered that long.

        Resending is for a restarted server: the killed one's endpoints stay in discovery
        (service_is_ready() is true) until their lease ends, so a request may go out before
        the new server is matched; it is never answered, and the next one is.
        """
        if resend_after_s is None:
            return self.ros.call(client, request)
        deadline = time.monotonic() + GUARD_S
        while True:
            future = client.call_async(request)
            try:
                self.ros.wait_for(future.done, f'an answer of {client.srv_name}',
                                  resend_after_s)
                return future.result()
            except AssertionError:
                if time.monotonic() > deadline:
                    raise

    def episode(self, command, instruction='', resend_after_s=None):
        return self.call(self.control, EpisodeControl.Request(
            command=command, instruction=instruction), resend_after_s)

    def label(self, episode_id, outcome, labeler='', note=''):
        return self.call(self.labeler, LabelEpisode.Request(
            episode_id=episode_id, outcome=outcome, labeler=labeler, note=note))


def sample_messages() -> list[tuple[str, object]]:
    """Messages of every recorded topic, in publishing order, with distinct values."""
    out = []
    for k in range(3):
        obs = Observation(instruction=f'stack {k}')
        obs.header.stamp = Time(sec=100 + k, nanosec=7)
        obs.images = [Image(height=1, width=2, encoding='rgb8', step=6,
                            data=bytes(range(k, k + 6)))]
        obs.joint_state = JointState(name=['a', 'b'], position=[0.5 * k, -0.25])
        out.append(('observation', obs))
    for k in range(2):
        out.append(('policy/chunk', ActionChunk(policy_version='5', chunk_id=k, horizon=1,
                                                action_dim=2, joint_names=['a', 'b'], dt=0.02,
                                                actions=[0.5 + k, 0.25])))
    # The robot asked for help, and a takeover answered it.
    out.append(('help_request', HelpRequest(active=True, reason='low', policy_version='5',
                                            viability=0.125, trace_stamps=[100.0, 100.5],
                                            trace_viability=[0.25, 0.125])))
    out.append(('help_request', HelpRequest(active=False, reason='answered',
                                            policy_version='5', viability=0.125)))
    sources = (Controller.POLICY, Controller.HUMAN, Controller.HOLD, Controller.HUMAN,
               Controller.POLICY, Controller.HUMAN)
    for k, source in enumerate(sources):
        out.append(('intervention', InterventionState(
            active=source == Controller.HUMAN, source=int(source), segment_id=k, reason='test')))
        out.append(('executed_action', ExecutedAction(
            source=int(source), segment_id=k, policy_version='5', joint_names=['a', 'b'],
            positions=[0.125 * k, -1.5])))
        out.append(('forward_position_controller/commands',
                    Float64MultiArray(data=[0.125 * k, -1.5])))
        out.append(('joint_states', JointState(name=['a', 'b'], position=[0.1 * k, 2.0])))
    return out


def plain(msg) -> object:
    """Nested plain values of an rclpy or rosbags message, for comparisons."""
    if hasattr(msg, 'get_fields_and_field_types'):  # rclpy
        return {name: plain(getattr(msg, name)) for name in msg.get_fields_and_field_types()}
    if hasattr(msg, '__dataclass_fields__'):  # rosbags
        return {name: plain(getattr(msg, name)) for name in msg.__dataclass_fields__
                if not name.startswith('__') and not name.isupper()}  # constants
    if hasattr(msg, 'tolist'):
        msg = msg.tolist()
    if isinstance(msg, (bytes, bytearray)):
        return list(msg)
    if isinstance(msg, (list, tuple)) or type(msg).__name__ == 'array':
        return [plain(item) for item in msg]
    return msg


@pytest.fixture
def recorder(ros, tmp_path):
    made = []

    def make(**params):
        ns = next(_namespaces)
        params.setdefault('storage_dir', str(tmp_path / 'episodes'))
        node = EpisodeRecorderNode(
            namespace=ns, context=ros.context,
            parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
        made.append(node)
        ros.add_node(node.node)
        client = Client(ros, ns)
        client.wait_ready()
        return node, client
    yield make
    for node in made:
        node.close()  # before the session destroys its node


@pytest.mark.ros
def test_start_record_end_label_round_trip(recorder, tmp_path):
    node, client = recorder(instruction='default task', robot='')
    idle_end = client.episode(END)
    assert not idle_end.accepted and 'no episode is recording' in idle_end.message

    started = client.episode(START, 'stack the cubes')
    assert started.accepted, started.message
    episode_id = started.episode_id
    assert episode_id.startswith(f'{client.ns}-')
    again = client.episode(START)
    assert (again.accepted, again.episode_id) == (False, episode_id)
    assert 'still recording' in again.message

    sent = sample_messages()
    for topic, msg in sent:
        client.pubs[topic].publish(msg)
    client.ros.wait_for(lambda: node.recorder.writer.message_count == len(sent),
                        f'{len(sent)} messages recorded')

    ended = client.episode(END)
    assert ended.accepted and ended.episode_id == episode_id, ended.message
    assert '6 steps, 2 interventions' in ended.message
    labelled = client.label(episode_id, LabelEpisode.Request.OUTCOME_SUCCESS, 'alice', 'clean')
    assert labelled.accepted, labelled.message
    client.ros.wait_for(lambda: [e.event for e in client.events] == [
        EpisodeEvent.EVENT_START, EpisodeEvent.EVENT_END, EpisodeEvent.EVENT_LABELLED],
        'events START, END, LABELLED')
    end_event, label_event = client.events[1:]
    assert (end_event.episode_id, end_event.num_steps, end_event.num_interventions) == (
        episode_id, 6, 2)
    assert (label_event.outcome, label_event.policy_version) == (
        EpisodeEvent.OUTCOME_SUCCESS, '5')

    # The bag holds every message with its values; topic names are fully qualified.
    bag = tmp_path / 'episodes' / 'bags' / episode_id
    back = [(topic, plain(msg)) for topic, _, msg in read_episode_messages(bag)]
    expected = [(f'/{client.ns}/{topic}', plain(msg)) for topic, msg in sent]
    by_topic = {}
    for topic, value in back:
        by_topic.setdefault(topic, []).append(value)
    for topic, value in expected:
        assert by_topic[topic].pop(0) == value, topic  # in order within each topic
    assert not any(by_topic.values())

    with EpisodeIndex(tmp_path / 'episodes' / 'episodes.sqlite') as index:
        row = index.get(episode_id)
    assert (row.status, row.outcome, row.labeler, row.note) == (
        'complete', 'success', 'alice', 'clean')
    assert (row.num_steps, row.num_interventions, row.policy_version) == (6, 2, '5')
    assert (row.instruction, row.robot, Path(row.bag_path)) == (
        'stack the cubes', client.ns, bag)

    # A refusal comes back with its reason (the core's tests cover every case).
    unknown = client.label('nope-1', LabelEpisode.Request.OUTCOME_SUCCESS)
    assert not unknown.accepted and "'nope-1' is not in the episode index" in unknown.message


@pytest.mark.ros
def test_abort_discards_the_episode_and_keeps_its_bag(recorder, tmp_path):
    node, client = recorder()
    started = client.episode(START)
    for k in range(3):
        client.pubs['executed_action'].publish(ExecutedAction(positions=[float(k)]))
    client.ros.wait_for(lambda: node.recorder.writer.message_count == 3, '3 messages recorded')
    aborted = client.episode(ABORT)
    assert aborted.accepted and 'aborted: 3 steps' in aborted.message
    client.ros.wait_for(lambda: [e.event for e in client.events] == [
        EpisodeEvent.EVENT_START, EpisodeEvent.EVENT_END, EpisodeEvent.EVENT_DISCARDED],
        'events START, END, DISCARDED')
    # A late subscriber gets the latest event (latched).
    latest = []
    late = client.node.create_subscription(EpisodeEvent, f'/{client.ns}/recorder/events',
                                           latest.append, LATCHED)
    client.ros.wait_for(lambda: latest, 'the latched event')
    client.node.destroy_subscription(late)
    assert (latest[0].event, latest[0].episode_id, latest[0].num_steps) == (
        EpisodeEvent.EVENT_DISCARDED, started.episode_id, 3)
    with EpisodeIndex(tmp_path / 'episodes' / 'episodes.sqlite') as index:
        row = index.get(started.episode_id)
    assert (row.status, row.outcome, row.num_steps) == ('complete', 'discarded', 3)
    assert count_bag(row.bag_path).counts.steps == 3
    # A second episode of the same recorder gets a new id and bag.
    second = client.episode(START)
    assert second.accepted and second.episode_id != started.episode_id
    assert client.episode(END).accepted


@pytest.mark.ros
def test_a_help_request_answered_by_a_takeover_reaches_the_index_and_the_episode(recorder,
                                                                               tmp_path):
    from habc_episodes.episode_bags import episode_from_bag

    node, client = recorder()
    started = client.episode(START)
    assert started.accepted, started.message
    episode_id = started.episode_id

    def stamp(ms: int) -> Time:
        return Time(sec=200 + ms // 1000, nanosec=(ms % 1000) * 1_000_000)

    sent = []
    obs = Observation(instruction='stack')
    obs.header.stamp = stamp(0)
    obs.images = [Image(height=1, width=2, encoding='rgb8', step=6, data=bytes(6))]
    obs.joint_state = JointState(name=['a'], position=[0.0])
    sent.append(('observation', obs))
    # The policy drives, asks for help at 40 ms (p_v low), the pedal takes over at 60 ms and
    # the policy node clears the request with that tick's stamp; then a handback.
    for k, (source, reason) in enumerate([(Controller.POLICY, 'start')] * 3
                                         + [(Controller.HUMAN, 'engage')] * 2
                                         + [(Controller.POLICY, 'handback')]):
        state = InterventionState(active=source == Controller.HUMAN, source=int(source),
                                  segment_id=0, episode_id=episode_id, reason=reason)
        state.header.stamp = stamp(20 * k)
        action = ExecutedAction(source=int(source), episode_id=episode_id, policy_version='4',
                                joint_names=['a'], positions=[0.1 * k])
        action.header.stamp = stamp(20 * k)
        sent += [('intervention', state), ('executed_action', action)]
    raised = HelpRequest(active=True, reason='low', policy_version='4', viability=0.125)
    raised.header.stamp = stamp(40)
    answered = HelpRequest(active=False, reason='answered', policy_version='4',
                           viability=0.125)
    answered.header.stamp = stamp(60)
    sent += [('help_request', raised), ('help_request', answered)]
    for topic, msg in sent:
        client.pubs[topic].publish(msg)
    client.ros.wait_for(lambda: node.recorder.writer.message_count == len(sent),
                        f'{len(sent)} messages recorded')
    ended = client.episode(END)
    assert ended.accepted, ended.message

    with EpisodeIndex(tmp_path / 'episodes' / 'episodes.sqlite', read_only=True) as index:
        row = index.get(episode_id)
    assert (row.num_interventions, row.num_help_requests, row.num_requested_takeovers,
            row.num_spontaneous_takeovers) == (1, 1, 1, 0)
    (record,) = row.help_requests
    assert (record.reason, record.cleared_reason, record.answered_by) == (
        'low', 'answered', 'engage')
    assert record.raised_at == pytest.approx(0.04) and record.cleared_at == pytest.approx(0.06)

    # The learner's reader finds the same in the bag.
    episode = episode_from_bag(row.bag_path, 'success', with_images=False)
    assert episode.help_requests == row.help_requests
    (takeover,) = episode.takeovers
    assert (takeover.step, takeover.by, takeover.requested) == (3, 'engage', True)


def flushed_messages(bag: Path, scratch: Path) -> int:
    """Count the messages a live recorder has flushed to `bag` (recovering a copy)."""
    copy = scratch / 'flushed_copy'
    shutil.rmtree(copy, ignore_errors=True)
    try:
        shutil.copytree(bag, copy)
        return recover_bag(copy).message_count
    except Exception:  # the file is being written: not readable yet
        return 0


def _start_recorder(storage: Path, ns: str) -> Child:
    code = 'from habc_policy.episode_recorder_node import main; main()'
    return Child([sys.executable, '-c', code, '--ros-args', '-r', f'__ns:=/{ns}',
                  '-p', f'storage_dir:={storage}', '-p', 'flush_interval_s:=0.5'])


@pytest.mark.ros
def test_a_killed_recorder_leaves_a_recovered_incomplete_episode(ros, tmp_path):
    storage = tmp_path / 'episodes'
    ns = next(_namespaces)
    child = _start_recorder(storage, ns)
    client = Client(ros, ns)
    try:
        child.wait_for('ready')
        client.wait_ready()
        started = client.episode(START)
        assert started.accepted, started.message
        # Publish only once the recorder's subscription has matched (a loaded machine can
        # take a while): messages sent before that are not the recorder's to lose.
        ros.wait_for(lambda: client.pubs['executed_action'].get_subscription_count(),
                     'the recorder subscribed to executed_action', children=[child])
        bag = storage / 'bags' / started.episode_id
        sent = 40
        for k in range(sent):
            client.pubs['executed_action'].publish(ExecutedAction(positions=[float(k)],
                                                                  policy_version='9'))
        # Kill it once its periodic flush has put every message on disk: what a crash may
        # lose is what was not flushed, and the test must not depend on how fast this
        # machine is. A copy of the live bag is recovered to see what the file holds.
        ros.wait_for(lambda: flushed_messages(bag, tmp_path) >= sent,
                     f'the {sent} messages flushed to the bag', children=[child], every=0.1)
        child.process.send_signal(signal.SIGKILL)
        child.process.wait(timeout=10)
        assert not (bag / 'metadata.yaml').exists()  # a killed writer's bag is unreadable

        child = _start_recorder(storage, ns)
        line = child.wait_for('ready')
        assert '1 episode(s) recovered' in line, child.output
        with EpisodeIndex(storage / 'episodes.sqlite') as index:
            row = index.get(started.episode_id)
        # The version comes from the executed actions.
        assert (row.status, row.outcome, row.policy_version) == ('incomplete', 'unlabelled', '9')
        positions = [msg.positions[0] for _, _, msg in read_episode_messages(bag)]
        # Everything flushed before the kill, in order.
        assert positions == [float(k) for k in range(sent)]
        assert row.num_steps == len(positions)
        # The restarted recorder is idle: END is refused and changes nothing.
        refused = client.episode(END, resend_after_s=1.5)
        assert not refused.accepted and 'no episode is recording' in refused.message
        child.process.send_signal(signal.SIGINT)
        assert child.finish(timeout=15) == 0, child.output
    finally:
        child.kill()
