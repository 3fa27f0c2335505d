"""scripted_operator_node: the human stand-in of the simulated loop.

It drives only what a person would. Calls `sim/reset` (habc_msgs/srv/ResetSim), then
`recorder/episode_control` (START); watches `joint_states`, `sim/privileged` and
`intervention` (habc_msgs/InterventionState) and `help_request` (habc_msgs/HelpRequest,
which it acts on with `watch` 'on_request'); while it is in control publishes
`teleop/engage` (std_msgs/Bool) True and `teleop/joint_command` (sensor_msgs/JointState,
the scripted expert's targets), and hands back with `teleop/engage` False; at the end of the
episode calls `recorder/episode_control` (END) and `recorder/label_episode` (labeler
'scripted_operator'), then starts the next one. The logic is OperatorSession's.

It publishes `scripted_operator/status` (std_msgs/String JSON, LATCHED) whenever its state
changes: phase, episode, episode_id, pending (a service call is out), in_control,
arbiter_human (the arbiter's last InterventionState named the human), help_requested (the
robot asks for help in this episode), and the stamp and step of the last robot tick it
handled. Service answers are polled on the steady clock, so the node also works on
simulated time (use_sim_time) while that clock stands still.

With `episodes` > 0 the node exits (code 0) after the last episode; it exits with code 1
when what it needs does not appear within wait_for_services_s or a reset fails.
"""

import json
import sys
import time

import numpy as np
from rclpy.client import Client
from rclpy.clock import Clock, ClockType
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import JointState
from std_msgs.msg import Bool, String

from habc_common.node_main import spin_node
from habc_common.params import declare_node_parameters
from habc_common.qos import COMMANDS, LATCHED, LATCHED_EVENTS
from habc_msgs.msg import HelpRequest, InterventionState
from habc_msgs.srv import EpisodeControl, LabelEpisode, ResetSim
from habc_sim.joints import ALOHA_JOINT_NAMES, order_positions
from habc_sim.operator_session import (
    Call,
    LABELER,
    OperatorSession,
    ScriptedOperatorParams,
    Service,
    StampPairer,
    Tick,
)

PARAMS = ScriptedOperatorParams
# A person acts on what the robot does now: when this node falls behind, it skips to the
# newest tick instead of working through a backlog of old ones (with the deep JOINT_STATES
# queue a backlog that formed under load never drained, and the expert drove from states
# up to a second old). Reliable, as the publishers are.
LATEST_TICK = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST,
                         reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.VOLATILE)
LAG_WARNING_S = 0.1
CALL_TIMEOUT_S = 10.0
POLL_PERIOD_S = 0.05


class ScriptedOperatorNode:
    """Thin rclpy adapter over OperatorSession."""

    def __init__(self) -> None:
        self.node = Node('scripted_operator')
        self.params = declare_node_parameters(self.node, ScriptedOperatorParams)
        self.session = OperatorSession(self.params, log=self._log)
        self.pairer = StampPairer()
        self.exit_code = 0
        self._logged_errors: set[str] = set()
        self._pending: tuple[Call, object, float] | None = None
        self._arbiter_human = False
        self._tick: tuple[int, int] = (0, -1)  # stamp (ns) and step of the last tick handled
        self._status: dict | None = None
        self.engage_publisher = self.node.create_publisher(Bool, 'teleop/engage', COMMANDS)
        self.status_publisher = self.node.create_publisher(String, 'scripted_operator/status',
                                                           LATCHED)
        self.command_publisher = self.node.create_publisher(JointState, 'teleop/joint_command',
                                                            COMMANDS)
        self.node.create_subscription(JointState, 'joint_states', self.joint_state_callback,
                                      LATEST_TICK)
        self.node.create_subscription(String, 'sim/privileged', self.privileged_callback,
                                      LATEST_TICK)
        self.node.create_subscription(InterventionState, 'intervention',
                                      self.intervention_callback, LATEST_TICK)
        # As the policy publishes it: latched, so a request open before this node started
        # still arrives, and every change (a request raised and answered back to back) too.
        self.node.create_subscription(HelpRequest, 'help_request', self.help_request_callback,
                                      LATCHED_EVENTS)
        self.clients: dict[Service, Client] = {
            Service.RESET: self.node.create_client(ResetSim, 'sim/reset'),
            Service.START: self.node.create_client(EpisodeControl, 'recorder/episode_control'),
            Service.LABEL: self.node.create_client(LabelEpisode, 'recorder/label_episode'),
        }
        self.clients[Service.END] = self.clients[Service.ABORT] = self.clients[Service.START]
        # Every callback (subscriptions, this timer) is in the node's default mutually
        # exclusive group, so the session is never entered twice at once. Service answers
        # are polled here instead of handled in done-callbacks, which run outside that group.
        # On the steady clock: calls and their timeouts are wall-clock matters, and on
        # simulated time a clock that stands still must not stop them.
        self.node.create_timer(POLL_PERIOD_S, self.poll,
                               clock=Clock(clock_type=ClockType.STEADY_TIME))
        p = self.params
        self.node.get_logger().info(
            f'ready: {p.episodes or "endless"} episodes from seed {p.seed_base}, max '
            f'{p.max_steps} steps, watching {p.watch}'
            + (f' (answer p={p.answer_probability:g}, checks {p.check_rate_hz:g}/s of '
               f'{p.check_steps} ticks)' if p.watch == 'on_request' else '')
            + f', takeover p={p.takeover_probability:g} after {p.reaction_delay_steps} '
            f'ticks, handback p={p.handback_probability:g}')

    # --- logging ---------------------------------------------------------------------------
    def _log(self, level: str, text: str) -> None:
        # One call site per severity: rclpy refuses a second severity from the same line.
        logger = self.node.get_logger()
        if level == 'error':
            logger.error(text)
        elif level == 'warn':
            logger.warning(text)
        else:
            logger.info(text)

    def _log_once(self, text: str) -> None:
        if text not in self._logged_errors and len(self._logged_errors) < 100:
            self._logged_errors.add(text)
            self.node.get_logger().error(text)

    # --- robot ticks -----------------------------------------------------------------------
    def joint_state_callback(self, msg: JointState) -> None:
        try:
            joints = np.array(order_positions(msg.name, msg.position, ALOHA_JOINT_NAMES))
        except ValueError as exc:
            self._log_once(f'joint_states ignored: {exc}')
            return
        self._on_tick(self.pairer.add_joints(_stamp_ns(msg.header.stamp), joints))

    def privileged_callback(self, msg: String) -> None:
        try:
            privileged = json.loads(msg.data)
            stamp = int(privileged['stamp_ns'])
        except (ValueError, KeyError, TypeError) as exc:
            self._log_once(f'sim/privileged ignored: not the JSON of sim_robot_node ({exc})')
            return
        self._on_tick(self.pairer.add_privileged(stamp, privileged))

    def intervention_callback(self, msg: InterventionState) -> None:
        self._arbiter_human = msg.source == InterventionState.SOURCE_HUMAN
        self.session.on_intervention(self._arbiter_human)
        self._publish_status()

    def help_request_callback(self, msg: HelpRequest) -> None:
        self.session.on_help_request(msg.active, _stamp_ns(msg.header.stamp))
        self._publish_status()

    def _on_tick(self, tick: Tick | None) -> None:
        if tick is None or self.session.done:
            return
        now = self.node.get_clock().now().nanoseconds
        lag = (now - int(tick.privileged['stamp_ns'])) * 1e-9
        if lag > LAG_WARNING_S and self.session.in_control:
            self.node.get_logger().warning(
                f'driving from a robot tick {lag * 1e3:.0f} ms old: this machine is too busy '
                'for the expert to keep up', throttle_duration_sec=10.0)
        self._tick = (int(tick.privileged['stamp_ns']), int(tick.privileged.get('step', -1)))
        try:
            output = self.session.on_tick(tick)
        except (ValueError, KeyError, TypeError) as exc:
            self._log_once(f'robot tick ignored: {exc!r}')
            self._publish_status()
            return
        for engaged in output.engage:
            self.engage_publisher.publish(Bool(data=engaged))
        if output.command is not None:
            command = JointState()
            command.header.stamp = self.node.get_clock().now().to_msg()
            command.name = list(ALOHA_JOINT_NAMES)
            command.position = output.command.tolist()
            self.command_publisher.publish(command)
        self._publish_status()
        self._check_done()

    # --- services --------------------------------------------------------------------------
    def poll(self) -> None:
        now = time.monotonic()
        if self.session.done:
            self._check_done()
            return
        missing = [f'service {client.srv_name}' for service, client in self.clients.items()
                   if service != Service.END and not client.service_is_ready()]
        if not self.session.wait(missing, now):
            self._check_done()
            return
        if self._pending is not None:
            call, future, sent = self._pending
            if future.done():
                self._pending = None
                self._answer(call, future.result(), now)
            elif now - sent > CALL_TIMEOUT_S:
                self._pending = None
                self.session.on_response(
                    call, False, f'no answer from {self.clients[call.service].srv_name} '
                    f'within {CALL_TIMEOUT_S:g} s', now=now)
        else:
            call = self.session.next_call(now)
            if call is not None:
                self._pending = (call, self.clients[call.service].call_async(_request(call)),
                                 now)
        self._publish_status()
        self._check_done()

    def _answer(self, call: Call, response: object, now: float) -> None:
        if response is None:
            self.session.on_response(call, False, 'the call failed', now=now)
        elif call.service == Service.RESET:
            self.session.on_response(call, response.success, response.message, now=now)
        elif call.service in (Service.START, Service.END, Service.ABORT):
            self.session.on_response(call, response.accepted, response.message,
                                     response.episode_id, now=now)
        else:
            self.session.on_response(call, response.accepted, response.message, now=now)

    def _publish_status(self) -> None:
        session = self.session
        status = {'phase': str(session.phase), 'episode': session.episode,
                  'episode_id': session.record.episode_id if session.record else '',
                  'pending': self._pending is not None, 'in_control': session.in_control,
                  'arbiter_human': self._arbiter_human,
                  'help_requested': session.help_requested, 'tick_stamp_ns': self._tick[0],
                  'step': self._tick[1]}
        if status != self._status:  # on every change only: a tick is one
            self._status = status
            self.status_publisher.publish(String(data=json.dumps(status)))

    def _check_done(self) -> None:
        if self.session.done and self.node.context.ok():
            self.exit_code = 1 if self.session.fatal else 0
            # Ends executor.spin(); spin_node then destroys the node.
            self.node.context.try_shutdown()


def _stamp_ns(stamp: object) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def _request(call: Call) -> object:
    if call.service == Service.RESET:
        return ResetSim.Request(seed=call.seed)
    if call.service == Service.START:
        return EpisodeControl.Request(command=EpisodeControl.Request.COMMAND_START)
    if call.service == Service.END:
        return EpisodeControl.Request(command=EpisodeControl.Request.COMMAND_END)
    if call.service == Service.ABORT:
        return EpisodeControl.Request(command=EpisodeControl.Request.COMMAND_ABORT)
    return LabelEpisode.Request(episode_id=call.episode_id, outcome=int(call.outcome),
                                note=call.note, labeler=LABELER)


def main(args: list[str] | None = None) -> None:
    """Run scripted_operator_node until its episodes are done or shutdown."""
    nodes: list[ScriptedOperatorNode] = []

    def scripted_operator_node() -> ScriptedOperatorNode:
        nodes.append(ScriptedOperatorNode())
        return nodes[-1]

    # One callback group (see ScriptedOperatorNode): a single thread, without the stalls.
    spin_node(scripted_operator_node, args)
    if nodes and nodes[-1].exit_code:
        sys.exit(nodes[-1].exit_code)


if __name__ == '__main__':
    main()
