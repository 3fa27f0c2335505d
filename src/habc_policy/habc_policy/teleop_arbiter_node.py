"""teleop_arbiter_node: executes the policy's or the human's joint command at the control rate.

A thin rclpy adapter over habc_policy.arbiter.TeleopArbiter (docs/ros_interfaces.md).

Subscribes:
    joint_states (sensor_msgs/JointState): the follower's measured positions.
    policy/joint_command (habc_msgs/PolicyCommand): the policy's per-tick target and the
        version of the weights that produced it.
    teleop/joint_command (sensor_msgs/JointState): the human's per-tick target.
    teleop/engage (std_msgs/Bool): True takes over, False hands back (edges act).
    teleop/estop (std_msgs/Bool): True latches the e-stop.
    recorder/events (habc_msgs/EpisodeEvent, latched): START sets the episode id and restarts
        segment ids at 0, END or DISCARDED of that episode clears it.
Publishes on every control tick:
    forward_position_controller/commands (std_msgs/Float64MultiArray) and/or
    joint_trajectory_controller/joint_trajectory (trajectory_msgs/JointTrajectory), after
        the first joint state (parameter command_interface);
    intervention (habc_msgs/InterventionState);
    executed_action (habc_msgs/ExecutedAction), whenever a command was sent, with the
        policy version of the executed policy command (ArbiterOutput.policy_version).
Also publishes arbiter/diagnostics (diagnostic_msgs/DiagnosticArray): control tick period,
jitter and overruns, and rejected inputs. Service: arbiter/reset_estop (std_srvs/Trigger).

Joint order: the robot command follows the `joint_names` parameter, or the order of the
first joint_states message when it is empty. Every JointState is mapped onto that order by
name; one that lacks a joint, names an unknown joint (commands only) or repeats one is
rejected with a logged reason. A command without names is taken as already in that order.
"""

from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
import math
import threading
import time

from builtin_interfaces.msg import Duration
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
import numpy as np
from rclpy.clock import Clock, ClockType
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import JointState
from std_msgs.msg import Bool, Float64MultiArray
from std_srvs.srv import Trigger
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from habc_common.control_loop import ControlThreadParams
from habc_common.node_main import spin_node, start_control_tick
from habc_common.params import declare_node_parameters, param
from habc_common.qos import COMMANDS, JOINT_STATES
from habc_episodes.vocabulary import Controller
from habc_msgs.msg import EpisodeEvent, ExecutedAction, InterventionState, PolicyCommand
from habc_policy.arbiter import ArbiterOutput, ArbiterParams, TeleopArbiter

COMMAND_INTERFACES = ('forward', 'trajectory', 'both')

# recorder/events is latched with depth 1 on the recorder's side; a deeper reader queue
# keeps two events sent back to back (END, then LABELLED or DISCARDED) until the callback
# takes them, and transient_local still delivers the latest event when this node starts.
EVENTS_QOS = QoSProfile(depth=10, history=HistoryPolicy.KEEP_LAST,
                        reliability=ReliabilityPolicy.RELIABLE,
                        durability=DurabilityPolicy.TRANSIENT_LOCAL)


@dataclass(frozen=True)
class TeleopArbiterNodeParams(ArbiterParams, ControlThreadParams):
    """Parameters of teleop_arbiter_node: the arbiter's own plus the adapter's.

    The control rate is 1 / control_period_s (default 50 Hz).
    """

    joint_names: list[str] = param(
        [], 'Joint order of the robot command (set it to the forward controller joints, in '
        'order); empty takes the order of the first joint_states message.')
    command_interface: str = param(
        'forward', 'Where the robot command goes: forward (forward_position_controller/'
        'commands), trajectory (joint_trajectory_controller/joint_trajectory) or both.',
        choices=COMMAND_INTERFACES)
    trajectory_time_from_start_s: float = param(
        0.0, 'time_from_start of the one trajectory point (s); 0 uses one control period.',
        min=0.0, max=10.0)
    diagnostics_period_s: float = param(
        1.0, 'Period of arbiter/diagnostics (s); 0 disables it.', min=0.0, max=3600.0)
    jitter_window: int = param(
        3000, 'Number of recent tick periods the jitter percentiles are computed over.',
        min=10, max=1000000)

    def __post_init__(self) -> None:
        super().__post_init__()
        names = self.joint_names
        if len(set(names)) != len(names) or any(not name for name in names):
            raise ValueError(f'parameter joint_names must hold unique, non-empty names; got '
                             f'{list(names)}')
        n = len(names)
        if n:
            # Checked here so a bad configuration stops the node at start-up instead of
            # making the first joint state fail (the arbiter sizes its limits there).
            for name in ('position_lower', 'position_upper'):
                values = getattr(self, name)
                if values and len(values) != n:
                    raise ValueError(f'parameter {name} has {len(values)} values for {n} '
                                     'joint_names; give one per joint, or leave it empty')
            velocity = self.max_velocity_rad_s
            if len(velocity) not in (0, 1, n):
                raise ValueError(f'parameter max_velocity_rad_s has {len(velocity)} values for '
                                 f'{n} joint_names; give one value, one per joint, or none')


PARAMS = TeleopArbiterNodeParams


class JointOrder:
    """Map JointState messages onto one fixed joint order, by name (no rclpy)."""

    _CACHE_SIZE = 16

    def __init__(self, names: Sequence[str] = ()) -> None:
        """Fix the order to `names`, or leave it to the first joint state when empty."""
        self.names: list[str] | None = None
        self._known: set[str] = set()
        # Index arrays per name tuple: the publishers send the same names every time.
        self._cache: dict[tuple[tuple[str, ...], bool], np.ndarray] = {}
        if names:
            self._fix(names)

    def _fix(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self._known = set(self.names)

    def state(self, names: Sequence[str], positions: Sequence[float]) -> np.ndarray:
        """Return a joint state's positions in the fixed order; extra joints are ignored.

        The first call fixes the order when no joint names were configured.

        Raises:
            ValueError: the message lacks a joint, repeats one, or has no names.
        """
        if not names:
            raise ValueError('joint_states message has no joint names; the arbiter maps '
                             'joints by name')
        if self.names is None:
            if len(set(names)) != len(names):
                raise ValueError(f'joint_states names a joint twice: {list(names)}')
            self._fix(names)
        return self._take(names, positions, 'joint_states', allow_extra=True)

    def command(self, names: Sequence[str], positions: Sequence[float],
                what: str) -> np.ndarray:
        """Return a command's positions in the fixed order.

        Raises:
            ValueError: no joint order yet, or the names are not exactly the robot's joints
                (missing, unknown or repeated); without names, a length that differs.
        """
        if self.names is None:
            raise ValueError(f'{what} arrived before the first joint state fixed the joint '
                             'order; ignored')
        if not names:
            if len(positions) != len(self.names):
                raise ValueError(f'{what} has no joint names and {len(positions)} positions, '
                                 f'the robot has {len(self.names)} joints')
            return np.asarray(positions, dtype=np.float64)
        return self._take(names, positions, what, allow_extra=False)

    def _take(self, names: Sequence[str], positions: Sequence[float], what: str,
              allow_extra: bool) -> np.ndarray:
        if len(names) != len(positions):
            raise ValueError(f'{what} has {len(names)} joint names but {len(positions)} '
                             'positions')
        key = (tuple(names), allow_extra)
        index = self._cache.get(key)
        if index is None:
            index = self._index(names, what, allow_extra)
            if len(self._cache) >= self._CACHE_SIZE:
                self._cache.clear()
            self._cache[key] = index
        return np.asarray(positions, dtype=np.float64)[index]

    def _index(self, names: Sequence[str], what: str, allow_extra: bool) -> np.ndarray:
        lookup: dict[str, int] = {}
        for i, name in enumerate(names):
            if name in lookup:
                raise ValueError(f'{what} names joint {name!r} twice')
            lookup[name] = i
        missing = [name for name in self.names if name not in lookup]
        if missing:
            raise ValueError(f'{what} lacks {len(missing)} of the {len(self.names)} joints '
                             f'({_short(missing)}); it must give every joint')
        if not allow_extra:
            extra = [name for name in names if name not in self._known]
            if extra:
                raise ValueError(f'{what} names unknown joint(s) {_short(extra)}; the robot '
                                 f'has {_short(self.names)}')
        return np.array([lookup[name] for name in self.names], dtype=np.intp)


def _short(names: Sequence[str], count: int = 4) -> str:
    shown = ', '.join(names[:count])
    return shown + (f', ... ({len(names)} in all)' if len(names) > count else '')


class TickStats:
    """Period statistics of a periodic callback, for the control tick's jitter (no rclpy).

    jitter = actual period - nominal period. A tick is late when its period exceeds 1.5
    nominal periods; missed ticks count the whole periods that a late tick skipped.
    """

    def __init__(self, nominal_s: float, window: int = 3000) -> None:
        self.nominal_s = float(nominal_s)
        self.ticks = 0
        self.late_ticks = 0
        self.missed_ticks = 0
        self.max_abs_jitter_s = 0.0
        self.max_busy_s = 0.0
        self._sum_period_s = 0.0
        self._periods: deque[float] = deque(maxlen=window)
        self._busy: deque[float] = deque(maxlen=window)
        self._last: float | None = None

    def tick(self, now_s: float) -> float | None:
        """Record a tick at monotonic time `now_s` (s); return its period (None at first)."""
        self.ticks += 1
        last, self._last = self._last, now_s
        if last is None:
            return None
        period = now_s - last
        self._periods.append(period)
        self._sum_period_s += period
        self.max_abs_jitter_s = max(self.max_abs_jitter_s, abs(period - self.nominal_s))
        if period > 1.5 * self.nominal_s:
            self.late_ticks += 1
            self.missed_ticks += max(0, round(period / self.nominal_s) - 1)
        return period

    def record_busy(self, duration_s: float) -> None:
        """Record how long one tick's work took (s)."""
        self._busy.append(duration_s)
        self.max_busy_s = max(self.max_busy_s, duration_s)

    def snapshot(self) -> 'TickStats':
        """Return a copy to summarise elsewhere (copying is cheap; summarising is not)."""
        copy = TickStats.__new__(TickStats)
        copy.__dict__.update(self.__dict__)
        copy._periods = deque(self._periods, maxlen=self._periods.maxlen)
        copy._busy = deque(self._busy, maxlen=self._busy.maxlen)
        return copy

    def summary(self) -> dict[str, float]:
        """Return the statistics so far; percentiles are over the recent window (ms)."""
        out: dict[str, float] = {
            'ticks': float(self.ticks), 'late_ticks': float(self.late_ticks),
            'missed_ticks': float(self.missed_ticks),
            'nominal_period_ms': self.nominal_s * 1e3,
            'max_abs_jitter_ms': self.max_abs_jitter_s * 1e3,
            'max_busy_ms': self.max_busy_s * 1e3,
        }
        periods = self.ticks - 1
        if periods > 0:
            out['mean_period_ms'] = self._sum_period_s / periods * 1e3
        if self._periods:
            jitter = np.abs(np.asarray(self._periods) - self.nominal_s) * 1e3
            out['jitter_p50_ms'] = float(np.percentile(jitter, 50))
            out['jitter_p99_ms'] = float(np.percentile(jitter, 99))
        if self._busy:
            out['busy_mean_ms'] = float(np.mean(self._busy)) * 1e3
        return out


class TeleopArbiterNode:
    """Thin rclpy adapter over TeleopArbiter: one arbitration per control tick."""

    def __init__(self, **node_options: object) -> None:
        """Create the node; `node_options` go to rclpy's Node (e.g. parameter_overrides)."""
        self.node = Node('teleop_arbiter', **node_options)
        self.params = declare_node_parameters(self.node, TeleopArbiterNodeParams)
        self.arbiter = TeleopArbiter(self.params)
        self.joints = JointOrder(self.params.joint_names)
        self.stats = TickStats(self.params.control_period_s, self.params.jitter_window)
        self.episode_id = ''
        self.rejected: Counter[str] = Counter()
        self.last_output: ArbiterOutput | None = None
        self._last_reject: dict[str, str] = {}
        # The tick runs on its own thread (start_control_tick), the inputs on the executor's:
        # the arbiter core, the joint order and the statistics are used under this lock.
        self._lock = threading.Lock()
        p = self.params
        interface = p.command_interface
        self._forward = None
        self._trajectory = None
        if interface in ('forward', 'both'):
            self._forward = self.node.create_publisher(
                Float64MultiArray, 'forward_position_controller/commands', COMMANDS)
        if interface in ('trajectory', 'both'):
            self._trajectory = self.node.create_publisher(
                JointTrajectory, 'joint_trajectory_controller/joint_trajectory', COMMANDS)
        seconds = p.trajectory_time_from_start_s or p.control_period_s
        self._time_from_start = Duration(sec=int(seconds),
                                         nanosec=int(round(math.fmod(seconds, 1.0) * 1e9)))
        self._intervention = self.node.create_publisher(InterventionState, 'intervention',
                                                        COMMANDS)
        self._executed = self.node.create_publisher(ExecutedAction, 'executed_action', COMMANDS)
        self._diagnostics = self.node.create_publisher(DiagnosticArray, 'arbiter/diagnostics',
                                                       10)
        # The input callbacks share the node's default, mutually exclusive callback group;
        # main() spins it on one thread. The tick takes self._lock against them.
        node = self.node
        node.create_subscription(JointState, 'joint_states', self.joint_state_callback,
                                 JOINT_STATES)
        node.create_subscription(PolicyCommand, 'policy/joint_command', self.policy_callback,
                                 COMMANDS)
        node.create_subscription(JointState, 'teleop/joint_command', self.teleop_callback,
                                 COMMANDS)
        node.create_subscription(Bool, 'teleop/engage', self.engage_callback, COMMANDS)
        node.create_subscription(Bool, 'teleop/estop', self.estop_callback, COMMANDS)
        node.create_subscription(EpisodeEvent, 'recorder/events', self.event_callback,
                                 EVENTS_QOS)
        node.create_service(Trigger, 'arbiter/reset_estop', self.reset_estop_callback)
        # The control tick runs on the steady clock: wall-clock steps (NTP) must not change
        # the control rate; message stamps use the node's ROS clock. With use_sim_time the
        # robot is a simulator that publishes its time: the tick follows that clock, one
        # command per simulated period, however fast the simulation runs.
        self._sim_time = bool(node.get_parameter('use_sim_time').value)
        self._control_clock = (node.get_clock() if self._sim_time
                               else Clock(clock_type=ClockType.STEADY_TIME))
        # Messages of the tick, allocated once; the tick only fills them in.
        self._forward_msg = Float64MultiArray()
        self._trajectory_point = JointTrajectoryPoint(time_from_start=self._time_from_start)
        self._trajectory_msg = JointTrajectory(points=[self._trajectory_point])
        self._action_msg = ExecutedAction()
        self._state_msg = InterventionState()
        if p.diagnostics_period_s > 0.0:
            node.create_timer(p.diagnostics_period_s, self.publish_diagnostics,
                              clock=self._control_clock)
        order = ', '.join(p.joint_names) if p.joint_names else 'from the first joint_states'
        node.get_logger().info(
            f'ready: arbitrating at {1.0 / p.control_period_s:g} Hz, command to {interface}, '
            f'joint order {order}')
        # On the steady clock the tick runs on a thread of its own on absolute deadlines
        # (habc_common.control_loop), not behind the executor's callbacks; on simulated time
        # an rclpy timer follows /clock.
        self.loop = start_control_tick(node, p.control_period_s, self.tick, p,
                                       steady=not self._sim_time)

    def _now(self) -> float:
        # The control timer's clock: arrival times and ticks compare.
        if self._sim_time:
            return self.node.get_clock().now().nanoseconds * 1e-9
        return time.monotonic()

    # Inputs -------------------------------------------------------------------------------

    def _reject(self, topic: str, exc: Exception) -> None:
        self.rejected[topic] += 1
        reason = str(exc)
        # Log each distinct problem once per topic: a misconfigured publisher at 50 Hz would
        # otherwise flood the log; the count is in arbiter/diagnostics.
        if self._last_reject.get(topic) != reason:
            self._last_reject[topic] = reason
            self.node.get_logger().error(f'{topic} rejected: {reason}')

    def joint_state_callback(self, msg: JointState) -> None:
        with self._lock:
            try:
                self.arbiter.on_joint_state(self.joints.state(msg.name, msg.position),
                                            self._now())
            except ValueError as exc:
                self._reject('joint_states', exc)

    def policy_callback(self, msg: PolicyCommand) -> None:
        self._take_command(Controller.POLICY, 'policy/joint_command', msg,
                           lambda positions, now: self.arbiter.on_policy_command(
                               positions, now, msg.policy_version))

    def teleop_callback(self, msg: JointState) -> None:
        self._take_command(Controller.HUMAN, 'teleop/joint_command', msg,
                           self.arbiter.on_teleop_command)

    def _take_command(self, controller: Controller, topic: str, msg: JointState | PolicyCommand,
                      accept: Callable[[np.ndarray, float], None]) -> None:
        # A refused command never moves the robot, and the arbiter holds that side (reason
        # 'rejected') until a good one comes: wrong joints here, NaN / length / limits there.
        with self._lock:
            try:
                positions = self.joints.command(msg.name, msg.position, topic)
            except ValueError as exc:
                self.arbiter.reject(controller)
                self._reject(topic, exc)
                return
            try:
                accept(positions, self._now())
            except ValueError as exc:
                self._reject(topic, exc)

    def engage_callback(self, msg: Bool) -> None:
        with self._lock:
            before = self.arbiter.controller
            switched = self.arbiter.on_engage(msg.data, self._now())
            after = self.arbiter.controller
        if switched:
            self.node.get_logger().info(f'control {before.name} -> {after.name} '
                                        '(teleop/engage)')
        elif msg.data and after != Controller.HUMAN:
            self.node.get_logger().warning(
                'engage refused: no fresh teleop/joint_command (engage_requires_teleop)',
                throttle_duration_sec=2.0)

    def estop_callback(self, msg: Bool) -> None:
        # Only True acts: a False never releases the latch (that takes the reset service).
        with self._lock:
            latched = msg.data and not self.arbiter.estopped
            if latched:
                self.arbiter.estop()
        if latched:
            self.node.get_logger().warning(
                'E-STOP latched: holding the measured position; call arbiter/reset_estop '
                'to release it')

    def reset_estop_callback(self, request: Trigger.Request,
                             response: Trigger.Response) -> Trigger.Response:
        with self._lock:
            released = self.arbiter.estopped
            if released:
                self.arbiter.reset_estop()
            controller = self.arbiter.controller
        if released:
            response.message = (f'e-stop released; {controller.name} resumes once its '
                                'command is fresh')
            self.node.get_logger().info(response.message)
        else:
            response.message = 'e-stop was not latched; nothing to release'
        response.success = True
        return response

    def event_callback(self, msg: EpisodeEvent) -> None:
        with self._lock:
            self._on_event(msg)

    def _on_event(self, msg: EpisodeEvent) -> None:
        if msg.event == EpisodeEvent.EVENT_START:
            if msg.episode_id != self.episode_id:  # the latched START may come again
                self.episode_id = msg.episode_id
                self.arbiter.reset_segment_id()
                self.arbiter.on_episode(True)
                self.node.get_logger().info(f'episode {msg.episode_id} started')
        elif (msg.event in (EpisodeEvent.EVENT_END, EpisodeEvent.EVENT_DISCARDED)
              and msg.episode_id == self.episode_id):
            # DISCARDED too: an abort publishes END then DISCARDED, and a latched depth-1
            # topic may deliver only the last of two events sent back to back.
            self.episode_id = ''
            self.arbiter.on_episode(False)

    # Tick ---------------------------------------------------------------------------------

    def tick(self) -> ArbiterOutput:
        """Arbitrate once and publish the command, the intervention state and the action."""
        started = time.monotonic()  # the tick's own cost, on the steady clock
        with self._lock:
            start = self._now()
            self.stats.tick(start)
            out = self.arbiter.tick(start)
            self.last_output = out
            episode_id = self.episode_id
        stamp = self.node.get_clock().now().to_msg()
        if out.switched:
            self.node.get_logger().info(
                f'executing {out.source.name} ({out.reason}), segment {out.segment_id}')
        if out.command is not None:
            positions = out.command.tolist()
            if self._forward is not None:
                self._forward_msg.data = positions
                self._forward.publish(self._forward_msg)
            if self._trajectory is not None:
                # A zero stamp means "start on receipt" to a joint trajectory controller.
                self._trajectory_msg.joint_names = self.joints.names
                self._trajectory_point.positions = positions
                self._trajectory.publish(self._trajectory_msg)
            action = self._action_msg
            action.header.stamp = stamp
            action.source = int(out.source)
            action.segment_id = out.segment_id
            action.episode_id = episode_id
            action.policy_version = out.policy_version
            action.joint_names = self.joints.names
            action.positions = positions
            self._executed.publish(action)
        state = self._state_msg
        state.header.stamp = stamp
        state.active = out.human_active
        state.source = int(out.source)
        state.segment_id = out.segment_id
        state.episode_id = episode_id
        state.reason = out.reason
        self._intervention.publish(state)
        with self._lock:
            self.stats.record_busy(time.monotonic() - started)
        return out

    def publish_diagnostics(self) -> None:
        with self._lock:
            # Percentiles are computed outside the lock the control tick takes.
            stats = self.stats.snapshot()
            estopped = self.arbiter.estopped
            controller = self.arbiter.controller
            rejected = dict(self.rejected)
            out = self.last_output
            episode_id = self.episode_id
        summary = stats.summary()
        status = DiagnosticStatus(name=f'{self.node.get_name()}: control tick',
                                  hardware_id=self.node.get_fully_qualified_name())
        late = summary['late_ticks']
        status.level = DiagnosticStatus.WARN if late else DiagnosticStatus.OK
        if estopped:
            status.level = DiagnosticStatus.WARN
        p99 = summary.get('jitter_p99_ms', float('nan'))
        status.message = (f'{1.0 / self.params.control_period_s:g} Hz, jitter p99 '
                          f'{p99:.2f} ms, {late:g} late ticks'
                          + (', E-STOP latched' if estopped else ''))
        values = {key: f'{value:.4g}' for key, value in summary.items()}
        values.update({
            'source': out.source.name if out is not None else '',
            'controller': controller.name,
            'estopped': str(estopped),
            'episode_id': episode_id,
            'policy_version': out.policy_version if out is not None else '',
        })
        values.update({f'rejected/{topic}': str(n) for topic, n in sorted(rejected.items())})
        status.values = [KeyValue(key=key, value=value) for key, value in values.items()]
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.node.get_clock().now().to_msg()
        self._diagnostics.publish(array)


def main(args: list[str] | None = None) -> None:
    """Run teleop_arbiter_node until shutdown."""
    spin_node(TeleopArbiterNode, args, realtime_executor=True)
