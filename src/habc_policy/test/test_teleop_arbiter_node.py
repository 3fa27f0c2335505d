"""teleop_arbiter_node: joint mapping, tick statistics, and the node on real rclpy."""

import itertools

from diagnostic_msgs.msg import DiagnosticArray
import numpy as np
import pytest
from rclpy.parameter import Parameter
from sensor_msgs.msg import JointState
from std_msgs.msg import Bool, Float64MultiArray
from std_srvs.srv import Trigger
from trajectory_msgs.msg import JointTrajectory

from habc_common.qos import COMMANDS, JOINT_STATES, LATCHED
from habc_episodes.vocabulary import Controller
from habc_msgs.msg import EpisodeEvent, ExecutedAction, InterventionState, PolicyCommand
from habc_policy.teleop_arbiter_node import (
    JointOrder,
    TeleopArbiterNode,
    TeleopArbiterNodeParams,
    TickStats,
)

# Unit tests of the plain helpers ---------------------------------------------------------------


def test_joint_order_from_the_first_joint_state_maps_commands_by_name():
    order = JointOrder()
    with pytest.raises(ValueError, match='before the first joint state'):
        order.command(['a'], [1.0], 'policy/joint_command')
    np.testing.assert_array_equal(order.state(['a', 'b', 'c'], [1.0, 2.0, 3.0]), [1, 2, 3])
    assert order.names == ['a', 'b', 'c']
    # Another order, and a state with an extra joint: mapped by name.
    np.testing.assert_array_equal(order.state(['x', 'c', 'b', 'a'], [9, 3, 2, 1]), [1, 2, 3])
    np.testing.assert_array_equal(
        order.command(['c', 'a', 'b'], [0.3, 0.1, 0.2], 'policy/joint_command'), [0.1, 0.2, 0.3])
    np.testing.assert_array_equal(order.command([], [4, 5, 6], 'teleop/joint_command'),
                                  [4, 5, 6])


@pytest.mark.parametrize(('names', 'positions', 'match'), [
    (['a', 'b'], [0.0, 0.0], r'lacks 1 of the 3 joints \(c\)'),
    (['a', 'b', 'c', 'd'], [0.0] * 4, r'unknown joint\(s\) d'),
    (['a', 'b', 'b', 'c'], [0.0] * 4, "names joint 'b' twice"),
    (['a', 'b', 'c'], [0.0, 0.0], '3 joint names but 2 positions'),
    ([], [0.0, 0.0], 'no joint names and 2 positions'),
])
def test_joint_order_rejects_commands_that_do_not_name_every_joint(names, positions, match):
    order = JointOrder(['a', 'b', 'c'])
    with pytest.raises(ValueError, match=match):
        order.command(names, positions, 'policy/joint_command')


def test_joint_order_rejects_a_state_without_every_configured_joint():
    order = JointOrder(['a', 'b'])
    with pytest.raises(ValueError, match=r'joint_states lacks 1 of the 2 joints \(b\)'):
        order.state(['a', 'x'], [0.0, 0.0])
    with pytest.raises(ValueError, match='no joint names'):
        JointOrder().state([], [0.0])


def test_tick_stats_measure_period_jitter_and_overruns():
    stats = TickStats(0.02, window=100)
    for now in (0.0, 0.02, 0.041, 0.060, 0.120, 0.140):  # one 60 ms gap: 2 ticks missed
        stats.tick(now)
    stats.record_busy(0.001)
    summary = stats.summary()
    assert summary['ticks'] == 6 and summary['late_ticks'] == 1
    assert summary['missed_ticks'] == 2
    assert summary['mean_period_ms'] == pytest.approx(28.0)
    assert summary['max_abs_jitter_ms'] == pytest.approx(40.0)
    assert summary['jitter_p50_ms'] == pytest.approx(1.0)
    assert summary['busy_mean_ms'] == pytest.approx(1.0)
    # A snapshot summarises the same, and later ticks do not change it.
    snapshot = stats.snapshot()
    stats.tick(0.5)
    assert snapshot.summary() == summary
    assert stats.summary()['ticks'] == 7


def test_node_parameters_are_checked_against_joint_names():
    assert TeleopArbiterNodeParams().command_interface == 'forward'
    with pytest.raises(ValueError, match='position_lower has 1 values for 2 joint_names'):
        TeleopArbiterNodeParams(joint_names=['a', 'b'], position_lower=[0.0],
                                position_upper=[1.0])
    with pytest.raises(ValueError, match='unique'):
        TeleopArbiterNodeParams(joint_names=['a', 'a'])
    with pytest.raises(ValueError, match='choose one of'):
        TeleopArbiterNodeParams(command_interface='serial')


# The node on real rclpy ------------------------------------------------------------------------

_namespaces = (f'arb{k}' for k in itertools.count())


class Harness:
    """The arbiter node in its own namespace, fed by a 100 Hz robot/policy/teleop stand-in."""

    def __init__(self, ros, **params):
        self.ros = ros
        ns = next(_namespaces)
        self.arbiter = TeleopArbiterNode(
            namespace=ns, context=ros.context,
            parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
        ros.add_node(self.arbiter.node)
        node = self.test_node = ros.create_node('arbiter_node_test')
        self.names = ['a', 'b', 'c']
        self.state = [0.0, 0.0, 0.0]
        self.policy: tuple[list[str], list[float]] | None = None
        self.policy_version = '1:sft'
        self.teleop: tuple[list[str], list[float]] | None = None
        self.forward, self.trajectory, self.intervention, self.executed = [], [], [], []
        self._pubs = {
            'joint_states': node.create_publisher(JointState, f'/{ns}/joint_states',
                                                  JOINT_STATES),
            'policy': node.create_publisher(PolicyCommand, f'/{ns}/policy/joint_command',
                                            COMMANDS),
            'teleop': node.create_publisher(JointState, f'/{ns}/teleop/joint_command', COMMANDS),
            'engage': node.create_publisher(Bool, f'/{ns}/teleop/engage', COMMANDS),
            'estop': node.create_publisher(Bool, f'/{ns}/teleop/estop', COMMANDS),
            'events': node.create_publisher(EpisodeEvent, f'/{ns}/recorder/events', LATCHED),
        }
        self.subscriptions = [
            node.create_subscription(Float64MultiArray,
                                     f'/{ns}/forward_position_controller/commands',
                                     self.forward.append, COMMANDS),
            node.create_subscription(JointTrajectory,
                                     f'/{ns}/joint_trajectory_controller/joint_trajectory',
                                     self.trajectory.append, COMMANDS),
            node.create_subscription(InterventionState, f'/{ns}/intervention',
                                     self.intervention.append, COMMANDS),
            node.create_subscription(ExecutedAction, f'/{ns}/executed_action',
                                     self.executed.append, COMMANDS),
        ]
        node.create_timer(0.01, self._feed)
        self.ns = ns

    def _feed(self):
        self._pubs['joint_states'].publish(JointState(name=self.names, position=self.state))
        if self.policy is not None:
            self._pubs['policy'].publish(PolicyCommand(
                name=self.policy[0], position=self.policy[1], policy_version=self.policy_version))
        if self.teleop is not None:
            self._pubs['teleop'].publish(JointState(name=self.teleop[0],
                                                    position=self.teleop[1]))

    def publish(self, key, msg):
        self._pubs[key].publish(msg)

    def wait_for(self, predicate, what):
        return self.ros.wait_for(predicate, what,
                                 detail=lambda: f'last intervention: {self.intervention[-1:]}')

    def wait_source(self, source, reason=None):
        """Wait until the newest InterventionState has `source` (and `reason`); return it."""
        def ok():
            if not self.intervention:
                return False
            last = self.intervention[-1]
            return last.source == source and (reason is None or last.reason == reason)
        self.wait_for(ok, f'intervention source {source}' + (f' ({reason})' if reason else ''))
        return self.intervention[-1]


@pytest.fixture
def harness(ros):
    """Return make(**params) -> Harness; the nodes go with the test's `ros` session."""
    return lambda **params: Harness(ros, **params)


@pytest.mark.ros
def test_maps_joint_names_and_publishes_every_tick(harness):
    h = harness(command_interface='both', diagnostics_period_s=0.2)
    diagnostics = []
    h.subscriptions.append(h.test_node.create_subscription(
        DiagnosticArray, f'/{h.ns}/arbiter/diagnostics', diagnostics.append, 10))
    h.policy = (['c', 'a', 'b'], [0.3, 0.1, 0.2])  # another order than joint_states
    state = h.wait_source(Controller.POLICY, 'start')
    assert (state.active, state.segment_id, state.episode_id) == (False, 1, '')
    # Every stream, once discovery has matched it (the subscriptions match one by one).
    h.wait_for(lambda: h.forward and list(h.forward[-1].data) == [0.1, 0.2, 0.3]
               and h.trajectory and h.executed, 'forward, trajectory and executed streams')
    assert list(h.trajectory[-1].joint_names) == ['a', 'b', 'c']
    assert list(h.trajectory[-1].points[0].positions) == [0.1, 0.2, 0.3]
    action = h.executed[-1]
    assert (action.source, list(action.joint_names), list(action.positions)) == (
        Controller.POLICY, ['a', 'b', 'c'], [0.1, 0.2, 0.3])
    assert action.policy_version == '1:sft'  # from the executed policy command

    # One InterventionState per tick (no assertion on the rate: that is wall-clock timing,
    # measured by benchmarks/bench_loop.py, not tested).
    ticks_before, states_before = h.arbiter.stats.ticks, len(h.intervention)
    h.ros.spin_for(0.5)
    ticks = h.arbiter.stats.ticks - ticks_before
    assert ticks > 0
    h.wait_for(lambda: len(h.intervention) - states_before >= ticks,
               f'{ticks} InterventionStates, one per tick')

    # Episode id from recorder/events (segment ids restart); the version of every executed
    # step is that of the policy command it executed.
    h.policy_version = '3'
    h.publish('events', EpisodeEvent(episode_id='ep-1', event=EpisodeEvent.EVENT_START))
    h.wait_for(lambda: h.executed[-1].episode_id == 'ep-1'
               and h.executed[-1].policy_version == '3'
               and h.intervention[-1].episode_id == 'ep-1', 'episode ep-1 on every stream')
    assert h.intervention[-1].segment_id == 0 and h.executed[-1].segment_id == 0
    h.publish('events', EpisodeEvent(episode_id='ep-0', event=EpisodeEvent.EVENT_END))
    h.ros.spin_for(0.2)
    assert h.executed[-1].episode_id == 'ep-1'  # the END of another episode changes nothing
    h.publish('events', EpisodeEvent(episode_id='ep-1', event=EpisodeEvent.EVENT_END))
    h.wait_for(lambda: h.executed[-1].episode_id == '', 'the end of episode ep-1')

    # A command that lacks a joint is rejected, and the arm holds at once (reason
    # 'rejected'), not only once the last good command went stale.
    h.policy = (['a', 'b'], [0.5, 0.5])
    state = h.wait_source(Controller.HOLD, 'rejected')
    assert state.segment_id == 1
    assert h.arbiter.rejected['policy/joint_command'] > 0
    assert list(h.forward[-1].data) == [0.1, 0.2, 0.3]  # the last command, held

    def rejections_reported() -> dict | None:
        values = diagnostics and {kv.key: kv.value for kv in diagnostics[-1].status[0].values}
        return values if values and 'rejected/policy/joint_command' in values else None

    values = h.wait_for(rejections_reported, 'arbiter/diagnostics with the rejections')
    assert float(values['ticks']) > 0 and 'jitter_p99_ms' in values
    assert int(values['rejected/policy/joint_command']) > 0
    assert h.arbiter.stats.summary()['mean_period_ms'] > 0


@pytest.mark.ros
def test_engage_hands_control_to_the_human_and_back(harness):
    h = harness(handback_ramp_s=0.0)
    h.policy = (['a', 'b', 'c'], [0.1, 0.1, 0.1])
    h.teleop = (['a', 'b', 'c'], [0.05, -0.05, 0.0])  # close to the follower: no auto takeover
    policy = h.wait_source(Controller.POLICY)
    h.publish('engage', Bool(data=True))
    human = h.wait_source(Controller.HUMAN, 'engage')
    assert human.active and human.segment_id == policy.segment_id + 1
    h.wait_for(lambda: list(h.forward[-1].data) == [0.05, -0.05, 0.0]
               and h.executed[-1].source == Controller.HUMAN
               and list(h.executed[-1].positions) == [0.05, -0.05, 0.0], 'the human command')
    # A human step names the policy the human corrected.
    assert h.executed[-1].policy_version == '1:sft'
    h.publish('engage', Bool(data=False))
    back = h.wait_source(Controller.POLICY, 'handback')
    assert not back.active and back.segment_id == human.segment_id + 1
    h.wait_for(lambda: list(h.forward[-1].data) == [0.1, 0.1, 0.1], 'the policy command')


@pytest.mark.ros
def test_estop_latches_until_the_reset_service(harness):
    h = harness()
    h.state = [0.2, 0.2, 0.2]
    h.policy = (['a', 'b', 'c'], [0.25, 0.25, 0.25])
    h.wait_source(Controller.POLICY)
    h.publish('estop', Bool(data=True))
    stopped = h.wait_source(Controller.HOLD, 'estop')
    h.wait_for(lambda: list(h.forward[-1].data) == [0.2, 0.2, 0.2],
               'the measured position held')
    h.publish('estop', Bool(data=False))  # False never releases the latch
    h.ros.spin_for(0.3)
    assert h.intervention[-1].reason == 'estop'
    assert h.intervention[-1].segment_id == stopped.segment_id

    client = h.test_node.create_client(Trigger, f'/{h.ns}/arbiter/reset_estop')
    result = h.ros.call(client, Trigger.Request())
    assert result.success and 'released' in result.message
    resumed = h.wait_source(Controller.POLICY)
    assert resumed.segment_id == stopped.segment_id + 1
    h.wait_for(lambda: list(h.forward[-1].data) == [0.25, 0.25, 0.25],
               'the policy command after the reset')
    assert 'not latched' in h.ros.call(client, Trigger.Request()).message


@pytest.mark.ros
def test_hold_between_episodes_sends_nothing_outside_an_episode(harness):
    h = harness(hold_between_episodes=True)
    h.policy = (['a', 'b', 'c'], [0.1, 0.1, 0.1])
    h.wait_source(Controller.HOLD, 'idle')
    h.ros.spin_for(0.2)
    assert not h.forward and not h.executed  # nothing reaches the robot
    h.publish('events', EpisodeEvent(episode_id='ep-1', event=EpisodeEvent.EVENT_START))
    h.wait_source(Controller.POLICY)
    h.wait_for(lambda: h.forward and list(h.forward[-1].data) == [0.1, 0.1, 0.1]
               and h.executed and h.executed[-1].episode_id == 'ep-1', 'the policy command')
    h.publish('events', EpisodeEvent(episode_id='ep-1', event=EpisodeEvent.EVENT_END))
    h.wait_source(Controller.HOLD, 'idle')
    sent = len(h.forward)
    h.ros.spin_for(0.2)
    assert len(h.forward) <= sent + 1  # at most a tick in flight when the END arrived
