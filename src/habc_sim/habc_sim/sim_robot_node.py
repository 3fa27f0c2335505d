"""sim_robot_node: the simulated ALOHA robot (MuJoCo) as a ROS robot.

Publishes, every tick and all with the same stamp: `joint_states` (sensor_msgs/JointState,
14 joints), `camera/<name>/image_raw` (sensor_msgs/Image, rgb8) per camera, and
`sim/privileged` (std_msgs/String, JSON: task, seed, reset_count, step, stage, success,
strict_success, failure, physics_error, truncated, objects {name: [x, y, z]}, quats
{name: [w, x, y, z]}, stamp_ns, overruns, skipped) for the scripted operator only.
Subscribes `forward_position_controller/commands` (std_msgs/Float64MultiArray, 14 targets)
and `joint_trajectory_controller/joint_trajectory` (trajectory_msgs/JointTrajectory, first
point, joints by name). Serves `sim/reset` (habc_msgs/srv/ResetSim).

Simulated time: with `use_sim_time:=true` (the bringup's default with use_sim) the node is the
clock of the loop, as a simulator is: every tick advances the simulated time by one control
period, publishes it on /clock (rosgraph_msgs/Clock) and stamps the tick's messages with it;
the other nodes run their timers on it. When a busy machine cannot step the physics and
render the cameras in real time, the whole loop then slows down with it instead of sending
commands faster than the robot moves. The simulated time starts at the wall time of start-up
(stamps and bag times stay readable dates). The tick itself runs on the steady clock.
"""

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
import json
import time
from typing import Any, TypeVar

from rclpy.node import Node
from rclpy.time import Time
from rosgraph_msgs.msg import Clock as ClockMessage
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Float64MultiArray, String
from trajectory_msgs.msg import JointTrajectory

from habc_common.node_main import spin_node, start_control_tick
from habc_common.params import declare_node_parameters
from habc_common.qos import COMMANDS, JOINT_STATES, SENSOR_DATA
from habc_msgs.srv import ResetSim
from habc_sim.sim_robot import OverrunCounter, SimRobot, SimRobotParams

PARAMS = SimRobotParams
# The privileged state is a per-tick state stream like joint_states (the operator pairs the
# two by stamp): the same QoS.
PRIVILEGED = JOINT_STATES
_MAX_LOGGED_ERRORS = 100
T = TypeVar('T')


class SimRobotNode:
    """Thin rclpy adapter over SimRobot."""

    def __init__(self) -> None:
        self.node = Node('sim_robot')
        self.params = declare_node_parameters(self.node, SimRobotParams)
        # A GL context is current on the thread that created it only, and the executor runs
        # callbacks on any of its threads: everything that may render (creating the
        # renderer, step, reset, close) runs on this one thread.
        self._gl_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix='sim_gl')
        self.robot = self._on_gl_thread(SimRobot, self.params)
        self.overruns = OverrunCounter(1.0 / self.params.rate_hz)
        self._logged_errors: set[str] = set()
        self._last_overrun_log = 0.0
        self.joint_publisher = self.node.create_publisher(JointState, 'joint_states',
                                                          JOINT_STATES)
        self.image_publishers = [
            self.node.create_publisher(Image, f'camera/{camera}/image_raw', SENSOR_DATA)
            for camera in self.robot.cameras]
        self.privileged_publisher = self.node.create_publisher(String, 'sim/privileged',
                                                               PRIVILEGED)
        self.node.create_subscription(Float64MultiArray, 'forward_position_controller/commands',
                                      self.command_callback, COMMANDS)
        self.node.create_subscription(JointTrajectory,
                                      'joint_trajectory_controller/joint_trajectory',
                                      self.trajectory_callback, COMMANDS)
        self.node.create_service(ResetSim, 'sim/reset', self.reset_callback)
        self._period_ns = round(1e9 / self.params.rate_hz)
        self._clock_publisher = None
        self._sim_time_ns = time.time_ns()
        if self.node.get_parameter('use_sim_time').value:
            self._clock_publisher = self.node.create_publisher(ClockMessage, '/clock', 10)
            self._publish_clock()  # the others' clocks start before the first tick
        self.node.get_logger().info(
            f'ready: {self.params.task} at {self.params.rate_hz:g} Hz, cameras '
            f'{self.robot.cameras} at {self.params.image_size} px, seed {self.params.seed}, '
            + ('publishing the simulated time on /clock' if self._clock_publisher
               else 'stamped with the wall clock'))
        # The physics tick runs on a thread of its own, on absolute deadlines of the steady
        # clock (with use_sim_time the node's own clock follows the time it publishes). The
        # MuJoCo state is only touched on the GL thread; a command latches a new target array
        # (one reference assignment), which the next step reads.
        self.loop = start_control_tick(self.node, 1.0 / self.params.rate_hz,
                                       self.timer_callback, self.params, steady=True)

    def _publish_clock(self) -> None:
        message = ClockMessage()
        message.clock = Time(nanoseconds=self._sim_time_ns).to_msg()
        self._clock_publisher.publish(message)

    def _on_gl_thread(self, function: Callable[..., T], *args: Any) -> T:
        return self._gl_thread.submit(function, *args).result()

    def _reject(self, what: str, exc: ValueError) -> None:
        # Log each distinct problem once: a bad controller would otherwise flood the log.
        text = f'{what} rejected: {exc}'
        if text not in self._logged_errors and len(self._logged_errors) < _MAX_LOGGED_ERRORS:
            self._logged_errors.add(text)
            self.node.get_logger().error(text)

    def command_callback(self, msg: Float64MultiArray) -> None:
        try:
            self.robot.command(msg.data)
        except ValueError as exc:
            self._reject('forward_position_controller/commands', exc)

    def trajectory_callback(self, msg: JointTrajectory) -> None:
        try:
            if not msg.points:
                raise ValueError('trajectory has no points')
            self.robot.command_by_name(msg.joint_names, msg.points[0].positions)
        except ValueError as exc:
            self._reject('joint_trajectory_controller/joint_trajectory', exc)

    def reset_callback(self, request: ResetSim.Request,
                       response: ResetSim.Response) -> ResetSim.Response:
        try:
            self._on_gl_thread(self.robot.reset, int(request.seed))
        except ValueError as exc:
            response.success, response.message = False, f'reset refused: {exc}'
            self.node.get_logger().error(response.message)
            return response
        response.success = True
        response.message = (f'reset {self.robot.reset_count}: {self.params.task}, seed '
                            f'{request.seed}; holding until the next command')
        self.node.get_logger().info(response.message)
        return response

    def timer_callback(self) -> None:
        self.overruns.started(time.monotonic())
        tick = self._on_gl_thread(self.robot.step)
        if self._clock_publisher is not None:
            self._sim_time_ns += self._period_ns
            self._publish_clock()
            stamp = Time(nanoseconds=self._sim_time_ns)
        else:
            stamp = self.node.get_clock().now()
        header_stamp = stamp.to_msg()
        joints = JointState()
        joints.header.stamp = header_stamp
        joints.name = self.robot.joint_names
        joints.position = tick.positions.tolist()
        joints.velocity = tick.velocities.tolist()
        self.joint_publisher.publish(joints)
        size = self.params.image_size
        for publisher, camera, pixels in zip(self.image_publishers, self.robot.cameras,
                                             tick.images, strict=True):
            image = Image(height=size, width=size, encoding='rgb8', is_bigendian=0,
                          step=3 * size)
            image.header.stamp = header_stamp
            image.header.frame_id = camera
            image.data = pixels.tobytes()  # bytes: assigning the array itself costs ~50 ms
            publisher.publish(image)
        privileged = tick.privileged
        privileged.update(stamp_ns=stamp.nanoseconds, overruns=self.overruns.overruns,
                          skipped=self.overruns.skipped)
        self.privileged_publisher.publish(String(data=json.dumps(privileged)))
        now = time.monotonic()
        if self.overruns.finished(now) and now - self._last_overrun_log > 10.0:
            self._last_overrun_log = now
            self.node.get_logger().warning(
                f'tick took longer than its {1e3 / self.params.rate_hz:.0f} ms period '
                f'({self.overruns.overruns} overruns, {self.overruns.skipped} ticks skipped '
                'so far): the simulation runs slower than real time; '
                + ('the nodes on its /clock slow down with it' if self._clock_publisher
                   else 'use fewer or smaller cameras, a lower rate_hz or use_sim_time'))

    def close(self) -> None:
        self.loop.stop()
        self._on_gl_thread(self.robot.close)
        self._gl_thread.shutdown()


def main(args: list[str] | None = None) -> None:
    """Run sim_robot_node until shutdown."""
    # One callback group (see SimRobotNode): a single thread, without the stalls.
    spin_node(SimRobotNode, args)


if __name__ == '__main__':
    main()
