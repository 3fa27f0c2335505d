"""sync_node on real rclpy: frame sets in, Observations with interpolated joints out.

The sync node runs on simulated time that the test sets (/clock) to each frame set's stamp:
a frame set is then never late (late_after_s) however long its delivery takes on a loaded
machine, so every frame set gives one observation, and the test waits for it as an event.
"""

import signal

from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray
import numpy as np
import pytest
from rclpy.parameter import Parameter
from ros_helpers import Child, ROOT
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import Image, JointState

from habc_common.params import check_parameter_file
from habc_common.qos import JOINT_STATES, SENSOR_DATA
from habc_msgs.msg import Observation
from habc_policy.image_convert import image_to_numpy, numpy_to_image
from habc_policy.sync_node import DEFAULT_INSTRUCTION, SyncNode, SyncNodeParams

MS = 1_000_000
START_NS = 1_000 * 1_000_000_000  # simulated time of the first frame set


def stamp(ns: int) -> Time:
    return Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


def test_default_instruction_is_the_simulated_task():
    aloha = pytest.importorskip('habc_sim.aloha')
    assert DEFAULT_INSTRUCTION == aloha.INSTRUCTIONS['transfer_cube']


def test_parameters_and_parameter_file():
    params = SyncNodeParams(cameras=['angle', 'top'], slop_s=0.05)
    assert params.sync_params().num_cameras == 2 and params.sync_params().slop_s == 0.05
    with pytest.raises(ValueError, match='twice'):
        SyncNodeParams(cameras=['angle', 'angle'])
    with pytest.raises(ValueError, match='empty'):
        SyncNodeParams(cameras=[])
    with pytest.raises(ValueError, match='joint_buffer_s'):
        SyncNodeParams(joint_buffer_s=0.1)
    assert check_parameter_file(SyncNodeParams, ROOT / 'config' / 'params' / 'sync.yaml')


class Feeder:
    """Publishes joint states around a frame-set time and one frame per camera.

    joints_received: how many joint states the sync node took so far (None for a node in
    another process: its observation may then be matched with one joint state only).
    """

    def __init__(self, ros, namespace: str, cameras: list[str],
                 joints_received=None) -> None:
        self.ros = ros
        node = self.node = ros.create_node('sync_node_test')
        self.joints_received = joints_received
        self.now_ns = START_NS
        self.clock = node.create_publisher(Clock, '/clock', 10)
        self.joints = node.create_publisher(JointState, f'/{namespace}/joint_states',
                                            JOINT_STATES)
        self.cameras = [node.create_publisher(Image, f'/{namespace}/camera/{name}/image_raw',
                                              SENSOR_DATA)
                        for name in cameras]
        self.observations: list[Observation] = []
        node.create_subscription(Observation, f'/{namespace}/observation',
                                 self.observations.append, SENSOR_DATA)

    def connected(self) -> bool:
        return all(p.get_subscription_count() > 0
                   for p in [self.clock, self.joints, *self.cameras])

    def advance(self, seconds: float) -> None:
        """Move the simulated clock on by `seconds`."""
        self.now_ns += round(seconds * 1e9)
        self.clock.publish(Clock(clock=stamp(self.now_ns)))

    def publish_joints(self) -> int:
        """Publish joint states around the next instant t, with the clock at t; return t (ns).

        a = 0 -> 1 and b = 1 -> 3 from t - 10 ms to t + 10 ms.
        """
        self.now_ns += 100 * MS
        t_ns = self.now_ns
        self.clock.publish(Clock(clock=stamp(t_ns)))
        received = self.joints_received() if self.joints_received else 0
        for dt, values in ((-10 * MS, [0.0, 1.0]), (10 * MS, [1.0, 3.0])):
            msg = JointState(name=['a', 'b'], position=values, velocity=[0.5, 0.25])
            msg.header.stamp = stamp(t_ns + dt)
            self.joints.publish(msg)
        if self.joints_received:
            # Both before the frames: with only the earlier one, 10 ms (< slop) before them,
            # the synchronizer would rightly take that nearest state instead.
            self.ros.wait_for(lambda: self.joints_received() >= received + 2,
                              'both joint states at the sync node')
        return t_ns

    def publish_frames(self, t_ns: int, offsets_ns: list[int]) -> None:
        for index, (publisher, offset) in enumerate(zip(self.cameras, offsets_ns,
                                                        strict=True)):
            image = numpy_to_image(np.full((4, 6, 3), 10 * (index + 1), np.uint8))
            image.header.stamp = stamp(t_ns + offset)
            image.header.frame_id = f'camera{index}'
            publisher.publish(image)

    def observe(self, offsets_ns: list[int], done=lambda obs: True,
                attempts: int = 10) -> list[tuple[Observation, int]]:
        """Publish frame sets until `done(observation)`; return the (obs, t) pairs seen.

        One pair of joint states around t, then frame sets at t, t + 1 ms, ... (all between
        the two): each gives one observation (never late on the simulated clock), awaited
        before the next set is published, so the n-th observation is the n-th set's.
        Without joints_received a sync node may take the first frames before the second
        joint state (rclpy takes one message per subscription and wait), the later ones not.
        """
        self.ros.wait_for(self.connected, 'the sync node subscribed to the feeder')
        joints_ns = self.publish_joints()
        seen = []
        for attempt in range(attempts):
            count = len(self.observations)
            t_ns = joints_ns + attempt * MS
            self.publish_frames(t_ns, offsets_ns)
            self.ros.wait_for(lambda n=count: len(self.observations) > n,
                              f'the observation of the frame set at {t_ns} ns')
            seen.append((self.observations[count], t_ns))
            if done(seen[-1][0]):
                return seen
        positions = [list(o.joint_state.position) for o, _ in seen]
        raise AssertionError(f'no acceptable observation among {positions}')


def nanoseconds(msg: Observation) -> int:
    return msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec


@pytest.mark.ros
def test_two_cameras_give_one_observation_with_the_interpolated_joint_state(ros):
    sync = SyncNode(namespace='sync_a', context=ros.context, parameter_overrides=[
        Parameter('cameras', value=['angle', 'top']), Parameter('instruction', value='do it'),
        Parameter('use_sim_time', value=True)])
    ros.add_node(sync.node)
    feeder = Feeder(ros, 'sync_a', ['angle', 'top'], joints_received=lambda: sync._joint_states)
    diagnostics: list[DiagnosticArray] = []
    feeder.node.create_subscription(DiagnosticArray, '/sync_a/sync/diagnostics',
                                    diagnostics.append, 10)
    ((observation, t_ns),) = feeder.observe([0, 4 * MS])
    # The set's stamp is the mean of the image stamps, exact in nanoseconds.
    assert nanoseconds(observation) == t_ns + 2 * MS
    assert observation.joint_state.header.stamp == observation.header.stamp
    assert [i.header.frame_id for i in observation.images] == ['camera0', 'camera1']
    assert image_to_numpy(observation.images[1])[0, 0, 0] == 20
    assert list(observation.joint_state.name) == ['a', 'b']
    # 12 ms into the 20 ms between the joint states: 60 % of the way (the synchronizer's
    # float seconds resolve 0.2 us at today's epoch, hence the tolerance).
    np.testing.assert_allclose(observation.joint_state.position, [0.6, 2.2], atol=1e-4)
    np.testing.assert_allclose(observation.joint_state.velocity, [0.5, 0.25])
    assert observation.instruction == 'do it'
    # Diagnostics come once a second of the node's (simulated) time: move it on meanwhile.
    ros.wait_for(lambda: any(kv.key == 'emitted' and int(kv.value) >= 1
                             for d in diagnostics for s in d.status for kv in s.values),
                 'diagnostics counting the observation', poll=lambda: feeder.advance(1.0))
    values = {kv.key: kv.value for kv in diagnostics[-1].status[0].values}
    assert int(values['frames_received/angle']) >= 1
    assert int(values['frames_received/top']) >= 1


@pytest.mark.ros
def test_console_script_publishes_observations(ros):
    script = ROOT / 'install' / 'habc_policy' / 'lib' / 'habc_policy' / 'sync_node'
    child = Child([str(script), '--ros-args', '-r', '__ns:=/sync_b', '--params-file',
                   str(ROOT / 'config' / 'params' / 'sync.yaml'), '-p', 'use_sim_time:=true'])
    try:
        child.wait_for('ready: 1 camera', timeout=30)
        feeder = Feeder(ros, 'sync_b', ['angle'])

        def is_interpolated(obs: Observation) -> bool:
            # a = 0 -> 1 over the 20 ms around the joint states' middle, b = 1 + 2 a.
            a = (nanoseconds(obs) - feeder.now_ns + 10 * MS) / (20 * MS)
            return np.allclose(obs.joint_state.position, [a, 1 + 2 * a], atol=1e-4)

        seen = feeder.observe([0], done=is_interpolated)
        for observation, t_ns in seen:
            assert nanoseconds(observation) == t_ns
            assert observation.instruction == DEFAULT_INSTRUCTION
            # A child that took the image before the second joint state uses the first one
            # (within slop_s): the synchronizer does not wait. The next frame set tries again.
            assert is_interpolated(observation) or np.allclose(
                observation.joint_state.position, [0.0, 1.0])
        child.process.send_signal(signal.SIGINT)
        assert child.finish(timeout=15) == 0, child.output
    finally:
        child.kill()
