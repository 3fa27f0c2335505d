"""Two real rclpy processes exchange every habc_msgs message and call every service."""

import signal

from diagnostic_msgs.msg import KeyValue
import pytest
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from ros_helpers import ROOT, start_python
from sensor_msgs.msg import Image

from habc_msgs import msg, srv

pytestmark = pytest.mark.ros
QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE,
                 durability=DurabilityPolicy.TRANSIENT_LOCAL)


def sample_messages() -> dict:
    """One message of every type, with non-default values in every field."""
    chunk = msg.ActionChunk()
    chunk.header.stamp.sec, chunk.header.stamp.nanosec = 12, 345
    chunk.policy_version, chunk.chunk_id, chunk.horizon, chunk.action_dim = 'v7', 42, 3, 2
    chunk.joint_names, chunk.dt = ['left_waist', 'left_gripper'], 0.02
    chunk.actions = [0.5, -1.0, 0.25, 0.125, 2.0, -0.0625]
    chunk.skipped_steps, chunk.late, chunk.inference_s = 2, True, 0.03125
    chunk.viability, chunk.efficiency_value = 0.75, -42.5

    help_request = msg.HelpRequest(active=True, reason='stalled', policy_version='3',
                                   viability=0.25, trace_stamps=[1.5, 1.625],
                                   trace_viability=[0.5, 0.25])
    help_request.header.stamp.sec = 97

    intervention = msg.InterventionState()
    intervention.header.frame_id = 'tick'
    intervention.active, intervention.source = True, msg.InterventionState.SOURCE_HUMAN
    intervention.segment_id, intervention.episode_id = 3, 'ep-0001'
    intervention.reason = 'pedal'

    executed = msg.ExecutedAction()
    executed.source, executed.segment_id = msg.ExecutedAction.SOURCE_HOLD, 5
    executed.episode_id, executed.policy_version = 'ep-0001', 'v7'
    executed.joint_names, executed.positions = ['a', 'b', 'c'], [0.1, 0.2, -0.3]

    event = msg.EpisodeEvent()
    event.episode_id, event.event = 'ep-0001', msg.EpisodeEvent.EVENT_LABELLED
    event.outcome, event.num_steps = msg.EpisodeEvent.OUTCOME_FAILURE, 300
    event.num_interventions, event.policy_version = 2, 'v7'

    update = msg.PolicyUpdate()
    update.version, update.sha256, update.format = 8, 'ab' * 32, 'safetensors'
    update.uri, update.data = 'file:///tmp/ckpt/v8/model.safetensors', bytes(range(256)) * 4
    update.metrics = [KeyValue(key='losses/actor', value='0.125'),
                      KeyValue(key='weights/mean_g', value='1.03')]

    command = msg.PolicyCommand(policy_version='1:sft', chunk_id=2**40 + 3,
                                name=['left_waist', 'right_waist'], position=[0.25, -0.75])
    command.header.stamp.sec = 98

    observation = msg.Observation()
    observation.header.stamp.sec = 99
    images = []
    for index in range(2):
        image = Image(height=4, width=6, encoding='rgb8', step=18)
        image.header.frame_id = f'camera_{index}'
        image.data = bytes((index * 7 + k) % 256 for k in range(4 * 18))
        images.append(image)
    observation.images = images
    observation.joint_state.name = ['left_waist', 'right_waist']
    observation.joint_state.position = [0.5, -0.5]
    observation.joint_state.velocity = [0.01, 0.02]
    observation.instruction = 'transfer the cube to the left arm'

    return {'ActionChunk': chunk, 'InterventionState': intervention,
            'ExecutedAction': executed, 'EpisodeEvent': event, 'PolicyUpdate': update,
            'PolicyCommand': command, 'Observation': observation, 'HelpRequest': help_request}


@pytest.fixture(scope='module')
def peer():
    child = start_python(ROOT / 'tests' / 'peers' / 'interface_peer.py')
    try:
        child.wait_for('interface peer ready')
        yield child
        child.process.send_signal(signal.SIGINT)
        assert child.finish(timeout=15) == 0, child.output
    finally:
        child.kill()


@pytest.fixture(scope='module')
def node(ros_module):
    return ros_module.create_node('interface_test')


def test_every_message_type_round_trips_through_another_process(peer, node, ros_module):
    test_node = node
    sent = sample_messages()
    assert set(sent) == {'ActionChunk', 'EpisodeEvent', 'ExecutedAction', 'HelpRequest',
                         'InterventionState', 'Observation', 'PolicyCommand', 'PolicyUpdate'}
    received = {}
    publishers = []
    for name, message in sent.items():
        test_node.create_subscription(type(message), f'habc_test/out/{name}',
                                      lambda m, n=name: received.setdefault(n, m), QOS)
        publisher = test_node.create_publisher(type(message), f'habc_test/in/{name}', QOS)
        publishers.append((publisher, message))
    # Publish until every echo has come back (discovery may take a moment on loopback).
    for publisher, message in publishers:
        publisher.publish(message)
    ros_module.wait_for(lambda: len(received) == len(sent), 'an echo of every message',
                        children=[peer],
                        detail=lambda: f'echoes missing for {sorted(set(sent) - set(received))}')

    for name, message in sent.items():
        assert received[name] == message, f'{name} changed on its way through the peer'
    # Spot checks of values the generated __eq__ covers, stated explicitly.
    assert list(received['ActionChunk'].actions) == [0.5, -1.0, 0.25, 0.125, 2.0, -0.0625]
    assert received['ActionChunk'].header.stamp.nanosec == 345
    assert received['InterventionState'].source == msg.InterventionState.SOURCE_HUMAN
    assert bytes(received['PolicyUpdate'].data) == bytes(range(256)) * 4
    assert received['PolicyUpdate'].metrics[1].value == '1.03'
    assert received['Observation'].images[1].header.frame_id == 'camera_1'
    assert bytes(received['Observation'].images[1].data)[:3] == bytes([7, 8, 9])
    assert received['EpisodeEvent'].outcome == msg.EpisodeEvent.OUTCOME_FAILURE
    assert received['PolicyCommand'].chunk_id == 2**40 + 3


def _call(ros, test_node, srv_type, name, request):
    return ros.call(test_node.create_client(srv_type, name), request, name)


def test_label_episode_service_across_processes(peer, node, ros_module):
    request = srv.LabelEpisode.Request(episode_id='ep-0001',
                                       outcome=srv.LabelEpisode.Request.OUTCOME_SUCCESS,
                                       note='clean handover', labeler='alice')
    response = _call(ros_module, node, srv.LabelEpisode, 'habc_test/label_episode', request)
    assert response.accepted
    assert response.message == 'ep-0001|1|alice|clean handover'

    request.episode_id = 'ep-9999'
    response = _call(ros_module, node, srv.LabelEpisode, 'habc_test/label_episode', request)
    assert not response.accepted


def test_episode_control_service_across_processes(peer, node, ros_module):
    start = srv.EpisodeControl.Request(command=srv.EpisodeControl.Request.COMMAND_START,
                                       instruction='insert the peg')
    first = _call(ros_module, node, srv.EpisodeControl, 'habc_test/episode_control', start)
    second = _call(ros_module, node, srv.EpisodeControl, 'habc_test/episode_control', start)
    assert (first.accepted, first.episode_id) == (True, 'ep-0001')
    assert second.episode_id == 'ep-0002'
    assert first.message == '0|insert the peg'
    end = srv.EpisodeControl.Request(command=srv.EpisodeControl.Request.COMMAND_END)
    response = _call(ros_module, node, srv.EpisodeControl, 'habc_test/episode_control', end)
    assert (response.accepted, response.episode_id, response.message) == \
        (True, 'ep-0002', '1|')
