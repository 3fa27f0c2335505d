"""sync_node on real rclpy: frame sets in, Observations with interpolated joints out."""

import signal

from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray
import numpy as np
import pytest
import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.parameter import Parameter
from ros_helpers import Child, ROOT, spin_until
from sensor_msgs.msg import Image, JointState

from habc_common.params import check_parameter_file
from habc_common.qos import JOINT_STATES, SENSOR_DATA
from habc_msgs.msg import Observation
from habc_policy.image_convert import image_to_numpy, numpy_to_image
from habc_policy.sync_node import DEFAULT_INSTRUCTION, SyncNode, SyncNodeParams

MS = 1_000_000


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
    """Publishes joint states around a frame-set time and one frame per camera."""

    def __init__(self, node, namespace: str, cameras: list[str]) -> None:
        self.node = node
        self.joints = node.create_publisher(JointState, f'/{namespace}/joint_states',
                                            JOINT_STATES)
        self.cameras = [node.create_publisher(Image, f'/{namespace}/camera/{name}/image_raw',
                                              SENSOR_DATA)
                        for name in cameras]
        self.observations: list[Observation] = []
        node.create_subscription(Observation, f'/{namespace}/observation',
                                 self.observations.append, SENSOR_DATA)

    def connected(self) -> bool:
        return all(p.get_subscription_count() > 0 for p in [self.joints, *self.cameras])

    def publish(self, executor, t_ns: int, offsets_ns: list[int]) -> None:
        # Joint states 10 ms before and after t: a = 0 -> 1, b = 1 -> 3 over 20 ms.
        for dt, values in ((-10 * MS, [0.0, 1.0]), (10 * MS, [1.0, 3.0])):
            msg = JointState(name=['a', 'b'], position=values, velocity=[0.5, 0.25])
            msg.header.stamp = stamp(t_ns + dt)
            self.joints.publish(msg)
        # Let both arrive first: with only the earlier one, 10 ms (< slop) before the
        # frames, the synchronizer would rightly take that nearest state instead.
        spin_until(executor, lambda: False, timeout=0.1)
        for index, (publisher, offset) in enumerate(zip(self.cameras, offsets_ns,
                                                        strict=True)):
            image = numpy_to_image(np.full((4, 6, 3), 10 * (index + 1), np.uint8))
            image.header.stamp = stamp(t_ns + offset)
            image.header.frame_id = f'camera{index}'
            publisher.publish(image)

    def observe(self, executor, offsets_ns: list[int], done=lambda obs: True,
                timeout: float = 15.0) -> list[tuple[Observation, int]]:
        """Publish a frame set every 0.3 s until `done(observation)`; return (obs, t) pairs."""
        assert spin_until(executor, self.connected, timeout=timeout), 'no subscribers'
        seen = []
        for _ in range(int(timeout / 0.4)):
            t_ns = self.node.get_clock().now().nanoseconds
            count = len(self.observations)
            self.publish(executor, t_ns, offsets_ns)
            if spin_until(executor, lambda n=count: len(self.observations) > n, timeout=0.3):
                seen.append((self.observations[-1], t_ns))
                if done(self.observations[-1]):
                    return seen
        raise AssertionError(f'no acceptable observation among {len(seen)}')


def nanoseconds(msg: Observation) -> int:
    return msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec


@pytest.fixture(scope='module')
def ros():
    rclpy.init()  # root conftest.py forces LOCALHOST discovery
    node = rclpy.create_node('sync_node_test')
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    yield node, executor
    executor.shutdown()
    node.destroy_node()
    rclpy.shutdown()


@pytest.mark.ros
def test_two_cameras_give_one_observation_with_the_interpolated_joint_state(ros):
    node, executor = ros
    sync = SyncNode(namespace='sync_a', parameter_overrides=[
        Parameter('cameras', value=['angle', 'top']), Parameter('instruction', value='do it')])
    executor.add_node(sync.node)
    diagnostics: list[DiagnosticArray] = []
    node.create_subscription(DiagnosticArray, '/sync_a/sync/diagnostics', diagnostics.append,
                             10)
    try:
        feeder = Feeder(node, 'sync_a', ['angle', 'top'])
        ((observation, t_ns),) = feeder.observe(executor, [0, 4 * MS])
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
        assert spin_until(executor, lambda: any(
            kv.key == 'emitted' and int(kv.value) >= 1
            for d in diagnostics for s in d.status for kv in s.values), timeout=5.0)
        values = {kv.key: kv.value for kv in diagnostics[-1].status[0].values}
        assert int(values['frames_received/angle']) >= 1
        assert int(values['frames_received/top']) >= 1
    finally:
        executor.remove_node(sync.node)
        sync.node.destroy_node()


@pytest.mark.ros
def test_console_script_publishes_observations(ros):
    node, executor = ros
    script = ROOT / 'install' / 'habc_policy' / 'lib' / 'habc_policy' / 'sync_node'
    child = Child([str(script), '--ros-args', '-r', '__ns:=/sync_b', '--params-file',
                   str(ROOT / 'config' / 'params' / 'sync.yaml')])
    try:
        child.wait_for('ready: 1 camera', timeout=30)
        feeder = Feeder(node, 'sync_b', ['angle'])
        interpolated = [0.5, 2.0]  # the image is halfway between the two joint states

        def is_interpolated(obs: Observation) -> bool:
            return np.allclose(obs.joint_state.position, interpolated, atol=1e-4)

        seen = feeder.observe(executor, [0], done=is_interpolated)
        for observation, t_ns in seen:
            assert nanoseconds(observation) == t_ns
            assert observation.instruction == DEFAULT_INSTRUCTION
            # A child stalled long enough to take the image together with only the first
            # joint state uses that one (within slop_s): the synchronizer does not wait.
            assert is_interpolated(observation) or np.allclose(
                observation.joint_state.position, [0.0, 1.0])
        child.process.send_signal(signal.SIGINT)
        assert child.finish(timeout=15) == 0, child.output
    finally:
        child.kill()
