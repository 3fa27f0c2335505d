"""sim_robot_node as a real process: state, images, commands, reset (loopback DDS)."""

from collections.abc import Iterator
from contextlib import contextmanager
import json
import signal
import sys

import numpy as np
import pytest
from ros_helpers import Child, ROOT
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Float64MultiArray, String
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from habc_common.params import check_parameter_file
from habc_common.qos import COMMANDS, JOINT_STATES, SENSOR_DATA
from habc_msgs.srv import ResetSim
from habc_sim.joints import ALOHA_JOINT_NAMES
from habc_sim.operator_session import ScriptedOperatorParams
from habc_sim.sim_robot import OverrunCounter, SimRobot, SimRobotParams

pytestmark = pytest.mark.ros
NS = '/simtest'
START_POSE = np.array([0.0, -0.96, 1.16, 0.0, -0.3, 0.0] * 2)   # arm joints at reset


# --- the core, in process -------------------------------------------------------------------
def test_core_holds_until_commanded_and_reports_privileged_state():
    robot = SimRobot(SimRobotParams(cameras=['angle'], image_size=32, seed=3, max_steps=2))
    try:
        start = robot.target.copy()
        first = robot.step()
        assert first.images.shape == (1, 32, 32, 3) and first.images.dtype == np.uint8
        np.testing.assert_allclose(first.positions, start, atol=0.02)   # holds its pose
        json.dumps(first.privileged)   # plain JSON types only
        assert first.privileged['step'] == 1 and not first.privileged['truncated']
        assert robot.step().privileged['truncated']    # reported, but the robot runs on
        assert robot.step().privileged['step'] == 3
        with pytest.raises(ValueError, match='command has 3 values, the robot has 14'):
            robot.command([0.0] * 3)
        with pytest.raises(ValueError, match=r"unknown joints \['elbow'\]"):
            robot.command_by_name(['elbow'], [0.0])
        robot.command_by_name(['right_waist', 'left_waist'], [-0.2, 0.2])
        assert robot.target[[0, 7]].tolist() == [0.2, -0.2] and robot.has_command
        robot.reset(4)
        assert not robot.has_command and robot.reset_count == 1
        np.testing.assert_array_equal(robot.target, start)
        with pytest.raises(ValueError, match='non-negative'):
            robot.reset(-1)
    finally:
        robot.close()


def test_overrun_counter_counts_long_ticks_and_skipped_periods():
    counter = OverrunCounter(0.02)
    counter.started(0.0)
    assert not counter.finished(0.005)
    counter.started(0.021)           # jitter, not a skipped tick
    assert counter.finished(0.075)   # 54 ms: overran, the timer skips the missed periods
    counter.started(0.08)
    assert (counter.overruns, counter.skipped) == (1, 2)


def test_params_reject_bad_cameras():
    with pytest.raises(ValueError, match='cameras must be 0-3'):
        SimRobotParams(cameras=['nose'])
    assert SimRobotParams(cameras=None).cameras == []   # how ROS hands over `cameras: []`


def test_parameter_files_match_the_declarations():
    params = ROOT / 'config' / 'params'
    assert check_parameter_file(SimRobotParams, params / 'sim_robot.yaml')
    assert check_parameter_file(ScriptedOperatorParams, params / 'scripted_operator.yaml')


# --- the node, as its own process -----------------------------------------------------------
@contextmanager
def sim_process(namespace: str, *parameters: str) -> Iterator[Child]:
    """Run sim_robot_node until it logs 'ready:'; stop it with SIGINT, expecting exit 0.

    The waits are hang guards on those two events (a line in its output, its exit).
    """
    overrides = [arg for value in parameters for arg in ('-p', value)]
    child = Child([sys.executable, '-m', 'habc_sim.sim_robot_node', '--ros-args',
                   '--params-file', str(ROOT / 'config' / 'params' / 'sim_robot.yaml'),
                   *overrides, '-r', f'__ns:={namespace}'])
    try:
        child.wait_for('ready:', timeout=60.0)
        yield child
        child.process.send_signal(signal.SIGINT)
        assert child.finish(timeout=20) == 0, child.output
    finally:
        child.kill()


@pytest.fixture(scope='module')
def sim():
    with sim_process(NS, 'image_size:=48', 'seed:=2') as child:
        yield child


class Probe:
    """The test's side: subscriptions to everything the robot publishes, and publishers."""

    def __init__(self, ros, sim: Child) -> None:
        self.ros, self.sim = ros, sim
        self.node = ros.create_node('sim_robot_probe')
        self.joints: list[JointState] = []
        self.images: list[Image] = []
        self.privileged: list[dict] = []
        self.node.create_subscription(JointState, f'{NS}/joint_states', self.joints.append,
                                      JOINT_STATES)
        self.node.create_subscription(Image, f'{NS}/camera/angle/image_raw', self.images.append,
                                      SENSOR_DATA)
        self.node.create_subscription(
            String, f'{NS}/sim/privileged',
            lambda msg: self.privileged.append(json.loads(msg.data)), JOINT_STATES)
        self.commands = self.node.create_publisher(
            Float64MultiArray, f'{NS}/forward_position_controller/commands', COMMANDS)
        self.trajectories = self.node.create_publisher(
            JointTrajectory, f'{NS}/joint_trajectory_controller/joint_trajectory', COMMANDS)
        self.reset = self.node.create_client(ResetSim, f'{NS}/sim/reset')

    def wait_for(self, predicate, what: str, poll=None) -> None:
        """Wait while the robot runs; fail at once, with its output, if it exits."""
        self.ros.wait_for(predicate, what, poll=poll, children=[self.sim],
                          detail=lambda: self.sim.output[-4000:])

    def position(self, name: str) -> float:
        last = self.joints[-1]
        return last.position[list(last.name).index(name)]

    def call_reset(self, seed: int) -> ResetSim.Response:
        return self.ros.call(self.reset, ResetSim.Request(seed=seed), 'sim/reset')


@pytest.fixture(scope='module')
def probe(sim, ros_module):
    return Probe(ros_module, sim)


def test_publishes_joint_states_images_and_privileged_with_one_stamp(sim, probe):
    probe.wait_for(lambda: probe.joints and probe.images and probe.privileged,
                   'joint_states, an image and sim/privileged')
    state = probe.joints[-1]
    assert list(state.name) == list(ALOHA_JOINT_NAMES)
    assert len(state.position) == len(state.velocity) == 14
    image = probe.images[-1]
    assert (image.height, image.width, image.encoding, image.step) == (48, 48, 'rgb8', 144)
    pixels = np.frombuffer(bytes(image.data), np.uint8).reshape(48, 48, 3)
    assert pixels.std() > 5            # a rendered scene, not a blank frame
    assert image.header.frame_id == 'angle'
    privileged = probe.privileged[-1]
    assert {'step', 'stage', 'success', 'failure', 'truncated', 'objects', 'seed',
            'task', 'reset_count', 'stamp_ns'} <= set(privileged)
    assert privileged['task'] == 'transfer_cube' and set(privileged['objects']) == {'box'}
    # Every topic of one tick carries the same stamp.
    def stamp(message) -> int:
        return message.header.stamp.sec * 10**9 + message.header.stamp.nanosec

    def matched() -> bool:
        stamps = {stamp(j) for j in probe.joints}
        return (any(p['stamp_ns'] in stamps for p in probe.privileged)
                and any(stamp(i) in stamps for i in probe.images))

    probe.wait_for(matched, 'a joint state, image and privileged state of one stamp')


def test_follows_forward_commands_and_rejects_bad_ones_once(sim, probe):
    probe.wait_for(lambda: probe.joints, 'joint_states')
    target = [*START_POSE[:6], 0.5, *START_POSE[6:], 0.5]
    target[0] = 0.3                    # left waist
    needle = 'rejected: command has 3 values, the robot has 14 joints'

    def send() -> None:
        probe.commands.publish(Float64MultiArray(data=[0.0, 1.0, 2.0]))
        probe.commands.publish(Float64MultiArray(data=target))

    probe.wait_for(lambda: probe.position('left_waist') > 0.2 and needle in sim.output,
                   'left_waist moved and the bad command rejected', poll=send)
    assert sim.output.count(needle) == 1    # logged once, although sent on every poll


def test_follows_trajectories_by_joint_name(sim, probe):
    trajectory = JointTrajectory(joint_names=['right_waist', 'left_waist'],
                                 points=[JointTrajectoryPoint(positions=[-0.3, 0.0])])

    probe.wait_for(lambda: probe.position('right_waist') < -0.2
                   and probe.position('left_waist') < 0.1, 'both waists at the trajectory',
                   poll=lambda: probe.trajectories.publish(trajectory))


def test_reset_restarts_from_the_seed_and_holds(sim, probe):
    response = probe.call_reset(5)
    assert response.success, response.message
    probe.privileged.clear()
    probe.wait_for(lambda: len(probe.privileged) > 3, 'privileged states after the reset')
    after = [p for p in probe.privileged if p['seed'] == 5]
    assert after and after[0]['reset_count'] == 1 and after[0]['step'] < 100
    # The first tick after the reset starts from the reset pose with the latched command
    # cleared. (Commands of the tests before, sent on every spin, may still arrive later on a
    # loaded machine and then rightly move the arm again: only the first tick is checked.)
    first = min(after, key=lambda p: p['step'])
    probe.wait_for(lambda: any(
        j.header.stamp.sec * 10**9 + j.header.stamp.nanosec == first['stamp_ns']
        for j in probe.joints), 'the joint state of the first tick after the reset')
    stamps = {j.header.stamp.sec * 10**9 + j.header.stamp.nanosec: j for j in probe.joints}
    arms = np.array(stamps[first['stamp_ns']].position)[[0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11,
                                                         12]]
    np.testing.assert_allclose(arms, START_POSE, atol=0.05)
    refused = probe.call_reset(-3)
    assert not refused.success and 'non-negative' in refused.message


def test_with_use_sim_time_it_publishes_the_clock_one_period_per_tick(ros_module):
    from rosgraph_msgs.msg import Clock as ClockMessage

    with sim_process('/simclock', 'use_sim_time:=true', 'cameras:=[]') as child:
        assert 'publishing the simulated time on /clock' in child.output
        node = ros_module.create_node('sim_clock_probe')
        clock, stamps = set(), []
        node.create_subscription(ClockMessage, '/clock', lambda m: clock.add(
            m.clock.sec * 10**9 + m.clock.nanosec), 100)
        node.create_subscription(JointState, '/simclock/joint_states', lambda m: stamps.append(
            m.header.stamp.sec * 10**9 + m.header.stamp.nanosec), JOINT_STATES)
        ros_module.wait_for(lambda: len(stamps) >= 20 and set(stamps[:20]) <= clock,
                            '20 joint states, each stamped with a published /clock time',
                            children=[child], detail=lambda: child.output[-4000:])
        # Exactly one control period (50 Hz) per tick, however late the wall-clock timer ran
        # (best-effort delivery may drop one: then a multiple of it).
        gaps = np.diff(stamps[:20])
        assert np.all(gaps % 20_000_000 == 0) and np.all(gaps > 0), gaps
