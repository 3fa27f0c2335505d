"""robot_stub_node: publishes joint_states and follows joint_commands (skeleton robot).

Topics: publishes `joint_states` (sensor_msgs/JointState); subscribes `joint_commands`
(std_msgs/Float64MultiArray, one position target per joint, as a ros2_control forward
position controller takes them).
"""

from rclpy.node import Node
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64MultiArray

from habc_common.node_main import spin_node
from habc_common.params import declare_node_parameters
from habc_common.qos import COMMANDS, JOINT_STATES
from habc_sim.robot_stub import FirstOrderJointModel, RobotStubParams

PARAMS = RobotStubParams


class RobotStubNode:
    """Thin rclpy adapter over FirstOrderJointModel."""

    def __init__(self) -> None:
        self.node = Node('robot_stub')
        self.params = declare_node_parameters(self.node, RobotStubParams)
        self.model = FirstOrderJointModel(self.params)
        self._last_error = ''
        self.publisher = self.node.create_publisher(JointState, 'joint_states', JOINT_STATES)
        self.node.create_subscription(Float64MultiArray, 'joint_commands',
                                      self.command_callback, COMMANDS)
        self._last_tick = self.node.get_clock().now()
        self.node.create_timer(1.0 / self.params.rate_hz, self.timer_callback)
        self.node.get_logger().info(
            f'ready: {len(self.model.joint_names)} joints at {self.params.rate_hz:g} Hz')

    def command_callback(self, msg: Float64MultiArray) -> None:
        try:
            self.model.command(msg.data)
        except ValueError as exc:
            # Log each distinct problem once: a bad controller would otherwise flood the log.
            if str(exc) != self._last_error:
                self.node.get_logger().error(f'joint_commands rejected: {exc}')
                self._last_error = str(exc)

    def timer_callback(self) -> None:
        now = self.node.get_clock().now()
        self.model.step((now - self._last_tick).nanoseconds * 1e-9)
        self._last_tick = now
        msg = JointState()
        msg.header.stamp = now.to_msg()
        msg.name = self.model.joint_names
        msg.position = self.model.positions.tolist()
        msg.velocity = self.model.velocities.tolist()
        self.publisher.publish(msg)


def main(args: list[str] | None = None) -> None:
    """Run robot_stub_node until shutdown."""
    spin_node(RobotStubNode, args)
