"""sync_node: one habc_msgs/Observation per camera frame set, with the joint state at its time.

Topics: subscribes `joint_states` (sensor_msgs/JointState, JOINT_STATES QoS) and
`camera/<name>/image_raw` (sensor_msgs/Image, SENSOR_DATA QoS) for each name in the
`cameras` parameter; publishes `observation` (habc_msgs/Observation, SENSOR_DATA QoS) and
`sync/diagnostics` (diagnostic_msgs/DiagnosticArray, 1 Hz). The pairing is done by
habc_policy.sync.ObservationSynchronizer with the header stamps of the messages and the
node clock as `now`.
"""

from dataclasses import dataclass

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.context import Context
from rclpy.node import Node
from sensor_msgs.msg import Image, JointState

from habc_common.node_main import spin_node
from habc_common.params import declare_node_parameters, param, param_specs, validate_params
from habc_common.qos import JOINT_STATES, SENSOR_DATA
from habc_msgs.msg import Observation
from habc_policy.sync import Observation as SyncedObservation
from habc_policy.sync import ObservationSynchronizer, SyncParams

# habc_sim.aloha.INSTRUCTIONS['transfer_cube'], copied so that the robot-side package does
# not import the simulator (a test checks that the two stay equal).
DEFAULT_INSTRUCTION = ('pick up the red cube with the right arm and hand it over to the left '
                       'arm')
DIAGNOSTICS_PERIOD_S = 1.0
_SYNC = param_specs(SyncParams)


def _sync_param(name: str):
    # The timing parameters are SyncParams' own (one description and bound per value).
    _hint, default, spec = _SYNC[name]
    return param(default, spec.description, min=spec.min, max=spec.max)


@dataclass(frozen=True)
class SyncNodeParams:
    """Parameters of sync_node."""

    cameras: list[str] = param(
        ['angle'], 'Camera names, in the order of Observation.images; each is read from '
        'camera/<name>/image_raw.', read_only=True)
    instruction: str = param(
        DEFAULT_INSTRUCTION, 'Task instruction put into every observation; can be set at run '
        'time (ros2 param set) when the task changes.')
    slop_s: float = _sync_param('slop_s')
    max_image_skew_s: float = _sync_param('max_image_skew_s')
    joint_buffer_s: float = _sync_param('joint_buffer_s')
    late_after_s: float = _sync_param('late_after_s')

    def __post_init__(self) -> None:
        validate_params(self)
        if not self.cameras:
            raise ValueError('parameter cameras is empty; name at least one camera')
        if len(set(self.cameras)) != len(self.cameras):
            raise ValueError(f'parameter cameras lists a camera twice: {self.cameras}')
        self.sync_params()  # raises ValueError naming a bad combination

    def sync_params(self) -> SyncParams:
        return SyncParams(num_cameras=len(self.cameras), slop_s=self.slop_s,
                          max_image_skew_s=self.max_image_skew_s,
                          joint_buffer_s=self.joint_buffer_s, late_after_s=self.late_after_s)


PARAMS = SyncNodeParams


def _seconds(stamp) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


def _nanoseconds(stamp) -> int:
    return stamp.sec * 1_000_000_000 + stamp.nanosec


class SyncNode:
    """Thin rclpy adapter over ObservationSynchronizer."""

    def __init__(self, namespace: str = '', parameter_overrides: list | None = None,
                 context: Context | None = None) -> None:
        # context: an rclpy Context other than the default one (tests run their own).
        self.node = Node('sync', namespace=namespace, context=context,
                         parameter_overrides=parameter_overrides or [])
        self.params = declare_node_parameters(self.node, SyncNodeParams)
        self.sync = ObservationSynchronizer(self.params.sync_params())
        self.instruction = self.params.instruction
        self._frames_per_camera = [0] * len(self.params.cameras)
        self._joint_states = 0
        self._emitted_at_last_report = 0
        self._last_error = ''
        self.publisher = self.node.create_publisher(Observation, 'observation', SENSOR_DATA)
        self.diagnostics_publisher = self.node.create_publisher(
            DiagnosticArray, 'sync/diagnostics', 10)
        # One (default, mutually exclusive) callback group: the synchronizer is not
        # thread-safe; main() spins it on one thread.
        self.node.create_subscription(JointState, 'joint_states', self.joint_state_callback,
                                      JOINT_STATES)
        for index, name in enumerate(self.params.cameras):
            self.node.create_subscription(
                Image, f'camera/{name}/image_raw',
                lambda msg, index=index: self.image_callback(index, msg), SENSOR_DATA)
        self.node.create_timer(DIAGNOSTICS_PERIOD_S, self.diagnostics_callback)
        self.node.add_post_set_parameters_callback(self.parameters_set_callback)
        self.node.get_logger().info(
            f'ready: {len(self.params.cameras)} camera(s) {self.params.cameras}, slop '
            f'{self.params.slop_s:g} s, late after {self.params.late_after_s:g} s')

    def _now(self) -> float:
        return self.node.get_clock().now().nanoseconds * 1e-9

    def _error_once(self, what: str, exc: Exception) -> None:
        # Log each distinct problem once: a misconfigured publisher would flood the log.
        if str(exc) != self._last_error:
            self.node.get_logger().error(f'{what}: {exc}')
            self._last_error = str(exc)

    def joint_state_callback(self, msg: JointState) -> None:
        self._joint_states += 1
        try:
            self.sync.add_joint_state(_seconds(msg.header.stamp), msg.name, msg.position,
                                      msg.velocity)
        except ValueError as exc:
            self._error_once('joint_states ignored', exc)
            return
        self._publish_ready()

    def image_callback(self, index: int, msg: Image) -> None:
        self._frames_per_camera[index] += 1
        # The Image message itself rides through the synchronizer into the Observation.
        self.sync.add_image(index, _seconds(msg.header.stamp), msg, self._now())
        self._publish_ready()

    def _publish_ready(self) -> None:
        for ready in self.sync.pop_ready(self._now()):
            self.publisher.publish(self.to_message(ready))

    def to_message(self, ready: SyncedObservation) -> Observation:
        """Build the Observation message of one synchronized frame set."""
        msg = Observation()
        # The set's stamp is the mean of the image stamps; in integer nanoseconds it is
        # exact (one camera: the image's own stamp), where float seconds would round.
        images = ready.images
        total, count = sum(_nanoseconds(i.header.stamp) for i in images), len(images)
        mean_ns = (total + count // 2) // count  # integers: floats round at 1e18 ns
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(mean_ns, 1_000_000_000)
        msg.images = list(images)
        msg.joint_state.header.stamp = msg.header.stamp
        msg.joint_state.name = list(ready.joint_names)
        msg.joint_state.position = ready.positions.tolist()
        if ready.velocities is not None:
            msg.joint_state.velocity = ready.velocities.tolist()
        msg.instruction = self.instruction
        return msg

    def parameters_set_callback(self, parameters: list) -> None:
        for parameter in parameters:
            if parameter.name == 'instruction':
                self.instruction = parameter.value
                self.node.get_logger().info(f'instruction: {self.instruction!r}')

    def diagnostics_callback(self) -> None:
        # Also resolves frame sets that waited for joint states in vain (counted as drops).
        self._publish_ready()
        values = self.sync.diagnostics()
        emitted = values['emitted']
        fresh = emitted - self._emitted_at_last_report
        self._emitted_at_last_report = emitted
        status = DiagnosticStatus(name=f'{self.node.get_name()}: observation synchronizer',
                                  hardware_id='')
        if fresh:
            status.level, status.message = DiagnosticStatus.OK, f'{fresh} observation(s)'
        elif not self._joint_states:
            status.level, status.message = DiagnosticStatus.WARN, 'no joint_states received'
        elif not all(self._frames_per_camera):
            missing = [name for name, count in zip(self.params.cameras,
                                                    self._frames_per_camera, strict=True)
                       if not count]
            status.level, status.message = DiagnosticStatus.WARN, f'no frames from {missing}'
        else:
            status.level = DiagnosticStatus.WARN
            status.message = 'no observation in the last period (see the drop counters)'
        values['joint_states_received'] = self._joint_states
        for name, count in zip(self.params.cameras, self._frames_per_camera, strict=True):
            values[f'frames_received/{name}'] = count
        status.values = [KeyValue(key=key, value=_format(value))
                         for key, value in values.items()]
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.node.get_clock().now().to_msg()
        self.diagnostics_publisher.publish(array)


def _format(value) -> str:
    if value is None:
        return ''
    if isinstance(value, float):
        return f'{value:.6g}' if abs(value) < 1e6 else f'{value:.3f}'
    return str(value)


def main(args: list[str] | None = None) -> None:
    """Run sync_node until shutdown."""
    spin_node(SyncNode, args)
