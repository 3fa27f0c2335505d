"""scripted_operator_node as a real process, against sim_robot_node and test stand-ins.

The test plays the recorder's services and a pass-through arbiter (the real ones are
habc_policy's; the lead's bringup test runs them together).

The robot and the operator run on simulated time, which the test moves on one robot tick at
a time, only when the operator has handled the last tick, has no service call out and the
arbiter stand-in's answer to its engage has reached it (scripted_operator/status). So the
operator sees every tick and the episode goes the same way however slow the machine is: on
wall-clock time an operator held up for 3 s saw no stall before the step limit.
"""

import json
import signal
import sys
import time

from builtin_interfaces.msg import Time
import pytest
from ros_helpers import Child
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import JointState
from std_msgs.msg import Bool, Float64MultiArray, String

from habc_common.qos import COMMANDS, LATCHED
from habc_msgs.msg import InterventionState
from habc_msgs.srv import EpisodeControl, LabelEpisode

pytestmark = pytest.mark.ros
NS = '/optest'
PERIOD_NS = 20_000_000  # one tick of the 50 Hz robot
START_NS = 1_000 * 1_000_000_000
# /clock is best effort: a tick not handled this long (s, wall clock) after it was due is
# announced again, in case the clock message was lost.
RESEND_S = 0.2


def node_process(module: str, *parameters: str) -> Child:
    args = [a for p in parameters for a in ('-p', p)]
    return Child([sys.executable, '-m', f'habc_sim.{module}', '--ros-args', *args,
                  '-r', f'__ns:={NS}'])


class StandIn:
    """The recorder's services and a pass-through arbiter (teleop command while engaged)."""

    def __init__(self, ros) -> None:
        self.node = ros.create_node('operator_stand_in')
        self.calls: list[tuple] = []
        self.engage: list[bool] = []
        self.commands = 0
        self.node.create_service(EpisodeControl, f'{NS}/recorder/episode_control',
                                 self.episode_control)
        self.node.create_service(LabelEpisode, f'{NS}/recorder/label_episode', self.label)
        self.node.create_subscription(Bool, f'{NS}/teleop/engage', self.on_engage, COMMANDS)
        self.node.create_subscription(JointState, f'{NS}/teleop/joint_command', self.on_command,
                                      COMMANDS)
        self.robot = self.node.create_publisher(
            Float64MultiArray, f'{NS}/forward_position_controller/commands', COMMANDS)
        self.intervention = self.node.create_publisher(InterventionState, f'{NS}/intervention',
                                                       COMMANDS)

    def episode_control(self, request, response):
        self.calls.append(('control', request.command))
        response.accepted, response.episode_id = True, 'ep-0042'
        return response

    def label(self, request, response):
        self.calls.append(('label', request.episode_id, request.outcome, request.labeler,
                           request.note))
        response.accepted = True
        return response

    def on_engage(self, msg: Bool) -> None:
        if not self.engage or self.engage[-1] != msg.data:
            self.engage.append(msg.data)
        source = (InterventionState.SOURCE_HUMAN if msg.data
                  else InterventionState.SOURCE_POLICY)
        self.intervention.publish(InterventionState(active=msg.data, source=source))

    def on_command(self, msg: JointState) -> None:
        assert len(msg.position) == 14
        # The operator must not drive the leader arm while the policy is in control.
        assert self.engage and self.engage[-1], 'teleop command while not engaged'
        self.commands += 1
        self.robot.publish(Float64MultiArray(data=list(msg.position)))


class SimClock:
    """Publishes /clock for the robot and the operator: one tick on when the operator is done."""

    def __init__(self, ros) -> None:
        node = ros.create_node('operator_clock')
        self.status: dict | None = None
        node.create_subscription(String, f'{NS}/scripted_operator/status', self.on_status,
                                 LATCHED)
        self.clock = node.create_publisher(Clock, '/clock', 10)
        self.now_ns = START_NS
        self.publish()

    def on_status(self, msg: String) -> None:
        self.status = json.loads(msg.data)

    def publish(self) -> None:
        self.clock.publish(Clock(clock=Time(sec=self.now_ns // 1_000_000_000,
                                            nanosec=self.now_ns % 1_000_000_000)))
        self.sent_at = time.monotonic()

    def advance(self) -> None:
        """Move time one tick on if the operator has handled this one and waits for no one.

        Before the episode (no operator yet, or it waits for services and a first tick)
        time just runs: the robot's timer may start after the first /clock it saw.
        """
        s = self.status
        if s is None or s['phase'] == 'waiting' or (
                s['phase'] == 'running' and s['tick_stamp_ns'] == self.now_ns
                and not s['pending'] and s['in_control'] == s['arbiter_human']):
            self.now_ns += PERIOD_NS
            self.publish()
        elif s['tick_stamp_ns'] < self.now_ns and time.monotonic() - self.sent_at > RESEND_S:
            self.publish()


def test_operator_runs_an_episode_takes_over_ends_and_labels_then_exits(ros):
    stand_in = StandIn(ros)
    clock = SimClock(ros)
    # No cameras: the operator does not look at images. 100 steps: the stall fires at about
    # 50, and the expert that takes over needs more than 200 to hand the cube over.
    sim = node_process('sim_robot_node', 'cameras:=[]', 'seed:=1', 'max_steps:=100',
                       'use_sim_time:=true')
    operator = node_process('scripted_operator_node', 'episodes:=1', 'seed_base:=4',
                            'max_steps:=100', 'takeover_probability:=1.0',
                            'reaction_delay_steps:=0', 'wait_for_services_s:=60.0',
                            'use_sim_time:=true')
    try:
        sim.wait_for('ready:', timeout=60.0)
        # Its "policy" never moves the robot: the stall detector fires after 50 ticks.
        ros.wait_for(lambda: operator.process.poll() is not None,
                     'the operator exiting after its episode', children=[sim],
                     poll=clock.advance,
                     detail=lambda: f'status {clock.status}\n{operator.output}')
        assert operator.finish() == 0, operator.output
        assert stand_in.calls[:2] == [('control', EpisodeControl.Request.COMMAND_START),
                                      ('control', EpisodeControl.Request.COMMAND_END)]
        kind, episode_id, outcome, labeler, note = stand_in.calls[2]
        assert (kind, episode_id, labeler) == ('label', 'ep-0042', 'scripted_operator')
        assert outcome == LabelEpisode.Request.OUTCOME_FAILURE, note   # the time limit
        assert 'seed 4; time limit' in note and 'stall' in note
        # Teleop commands came while engaged (checked on receipt).
        assert stand_in.engage[-2:] == [True, False] and stand_in.commands > 0
        assert 'reset 1: transfer_cube, seed 4' in sim.output
    finally:
        for child in (operator, sim):
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGINT)
                child.finish(timeout=20)
