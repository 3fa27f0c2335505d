"""hold_position_node: commands the latched start position at the control rate (skeleton).

Topics: subscribes `joint_states` (sensor_msgs/JointState); publishes `joint_commands`
(std_msgs/Float64MultiArray). The VLA policy node and the teleop arbiter replace it in the
bringup of the closed loop.
"""

from rclpy.node import Node
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64MultiArray

from habc_common.node_main import spin_node
from habc_common.params import declare_node_parameters
from habc_common.qos import COMMANDS, JOINT_STATES
from habc_policy.hold_position import HoldPositionController, HoldPositionParams

PARAMS = HoldPositionParams


class HoldPositionNode:
    """Thin rclpy adapter over HoldPositionController."""

    def __init__(self) -> None:
        self.node = Node('hold_position')
        self.params = declare_node_parameters(self.node, HoldPositionParams)
        self.controller = HoldPositionController(self.params)
        self.publisher = self.node.create_publisher(Float64MultiArray, 'joint_commands',
                                                    COMMANDS)
        self.node.create_subscription(JointState, 'joint_states', self.joint_state_callback,
                                      JOINT_STATES)
        self.node.create_timer(1.0 / self.params.rate_hz, self.timer_callback)
        self.node.get_logger().info(f'ready: holding position at {self.params.rate_hz:g} Hz')

    def _now(self) -> float:
        return self.node.get_clock().now().nanoseconds * 1e-9

    def joint_state_callback(self, msg: JointState) -> None:
        try:
            self.controller.on_joint_state(msg.name, msg.position, self._now())
        except ValueError as exc:
            self.node.get_logger().error(f'joint_states ignored: {exc}',
                                         throttle_duration_sec=5.0)

    def timer_callback(self) -> None:
        target = self.controller.command(self._now())
        if target is not None:
            self.publisher.publish(Float64MultiArray(data=target))


def main(args: list[str] | None = None) -> None:
    """Run hold_position_node until shutdown."""
    spin_node(HoldPositionNode, args)
