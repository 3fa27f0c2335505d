"""The teleop arbiter: takeover, bumpless handback, watchdog, e-stop, limits, segment ids.

Time is injected, so every expected value below is computed by hand from the timeline.
"""

import numpy as np
import pytest

from habc_episodes.vocabulary import Controller
from habc_policy.arbiter import ArbiterParams, TeleopArbiter

HOME = [0.0, 0.0]


def make(**overrides) -> TeleopArbiter:
    """Build an arbiter that has seen the follower at HOME at t=0."""
    arbiter = TeleopArbiter(ArbiterParams(**overrides))
    arbiter.on_joint_state(HOME, now=0.0)
    return arbiter


def feed(arbiter: TeleopArbiter, now: float, state=HOME, policy=None, teleop=None) -> None:
    """Deliver fresh messages at `now` (None leaves that stream silent)."""
    if state is not None:
        arbiter.on_joint_state(state, now)
    if policy is not None:
        arbiter.on_policy_command(policy, now)
    if teleop is not None:
        arbiter.on_teleop_command(teleop, now)


def test_holds_without_command_before_any_joint_state():
    arbiter = TeleopArbiter(ArbiterParams())
    arbiter.on_policy_command([0.1, 0.2], now=0.0)
    out = arbiter.tick(0.0)
    assert out.command is None
    assert (out.source, out.segment_id, out.reason, out.switched) == (
        Controller.HOLD, 0, 'watchdog', False)


def test_policy_runs_from_the_start_and_holds_the_measured_position_until_then():
    arbiter = make()
    out = arbiter.tick(0.0)  # joint state, no policy yet: hold where the arm is
    assert out.source == Controller.HOLD and out.segment_id == 0
    np.testing.assert_array_equal(out.command, HOME)
    feed(arbiter, 0.02, policy=[0.1, -0.1])
    out = arbiter.tick(0.02)
    assert (out.source, out.controller, out.segment_id, out.reason, out.switched) == (
        Controller.POLICY, Controller.POLICY, 1, 'start', True)
    np.testing.assert_array_equal(out.command, [0.1, -0.1])
    assert not out.human_active and not out.reseed_policy


def test_every_step_names_the_version_of_the_newest_policy_command():
    arbiter = make(takeover_deviation_rad=0.0)
    assert arbiter.tick(0.0).policy_version == ''  # no policy command yet
    arbiter.on_policy_command([0.1, 0.1], now=0.0, policy_version='1:sft')
    arbiter.on_teleop_command([0.1, 0.1], now=0.0)
    assert arbiter.tick(0.0).policy_version == '1:sft'
    # The swap: the next executed command comes from version 2.
    arbiter.on_policy_command([0.1, 0.1], now=0.02, policy_version='2')
    out = arbiter.tick(0.02)
    assert (out.source, out.policy_version) == (Controller.POLICY, '2')
    # A human step names the policy the human corrected.
    arbiter.on_engage(True, now=0.03)
    arbiter.on_teleop_command([0.2, 0.2], now=0.04)
    out = arbiter.tick(0.04)
    assert (out.source, out.policy_version) == (Controller.HUMAN, '2')
    # A rejected command changes neither the target nor the version.
    with pytest.raises(ValueError):
        arbiter.on_policy_command([0.1], now=0.05, policy_version='3')
    assert arbiter.tick(0.05).policy_version == '2'


def test_engage_takes_over_and_executes_the_teleop_command():
    arbiter = make(takeover_deviation_rad=0.0)
    feed(arbiter, 0.0, policy=[0.1, 0.1], teleop=[0.3, -0.3])
    assert arbiter.tick(0.0).source == Controller.POLICY
    assert arbiter.on_engage(True, now=0.01) is True
    out = arbiter.tick(0.02)
    assert (out.source, out.reason, out.switched, out.segment_id) == (
        Controller.HUMAN, 'engage', True, 2)
    assert out.human_active
    np.testing.assert_array_equal(out.command, [0.3, -0.3])
    # A repeated True (a pedal publishing its state) changes nothing.
    assert arbiter.on_engage(True, now=0.03) is False
    out = arbiter.tick(0.04)
    assert (out.source, out.switched, out.segment_id) == (Controller.HUMAN, False, 2)


def test_engage_requires_teleop_refuses_a_takeover_without_fresh_teleop():
    arbiter = make(engage_requires_teleop=True)
    feed(arbiter, 0.0, policy=[0.1, 0.1])
    assert arbiter.take_over(now=0.0) is False  # no teleop command at all
    feed(arbiter, 0.1, policy=[0.1, 0.1], teleop=[0.0, 0.0])
    assert arbiter.take_over(now=0.35) is False  # teleop is 0.25 s old > 0.2 s
    assert arbiter.controller == Controller.POLICY
    assert arbiter.take_over(now=0.3) is True


def test_engage_without_the_requirement_holds_until_teleop_is_fresh():
    arbiter = make()
    feed(arbiter, 0.0, policy=[0.1, 0.1])
    arbiter.on_engage(True, now=0.0)
    out = arbiter.tick(0.0)
    assert (out.source, out.controller, out.reason) == (
        Controller.HOLD, Controller.HUMAN, 'watchdog')
    np.testing.assert_array_equal(out.command, HOME)


def test_deviation_takes_over_above_the_threshold_only():
    arbiter = make(takeover_deviation_rad=0.15)
    # The leader tracks the follower closely: this arms the automatic takeover.
    feed(arbiter, 0.0, policy=[0.0, 0.0], teleop=[0.05, 0.0])
    assert arbiter.tick(0.0).source == Controller.POLICY
    # 0.14 rad away on one joint: below the threshold, the policy keeps control.
    feed(arbiter, 0.02, policy=[0.0, 0.0], teleop=[0.0, 0.14])
    assert arbiter.tick(0.02).source == Controller.POLICY
    # 0.16 rad: the human grabbed the leader arm.
    feed(arbiter, 0.04, policy=[0.0, 0.0], teleop=[0.0, -0.16])
    out = arbiter.tick(0.04)
    assert (out.source, out.reason, out.switched) == (Controller.HUMAN, 'deviation', True)
    np.testing.assert_array_equal(out.command, [0.0, -0.16])


def test_deviation_disabled_by_zero_threshold():
    arbiter = make(takeover_deviation_rad=0.0)
    feed(arbiter, 0.0, policy=[0.0, 0.0], teleop=[0.0, 0.0])
    arbiter.tick(0.0)
    feed(arbiter, 0.02, policy=[0.0, 0.0], teleop=[3.0, 0.0])
    assert arbiter.tick(0.02).source == Controller.POLICY


def test_deviation_is_not_armed_until_the_leader_came_close():
    arbiter = make(takeover_deviation_rad=0.15, takeover_rearm_ratio=0.5)
    # The leader rests far from the follower at start-up: no takeover.
    feed(arbiter, 0.0, policy=[0.0, 0.0], teleop=[0.5, 0.0])
    assert arbiter.tick(0.0).source == Controller.POLICY
    # Within the threshold but not within the re-arm band (0.075): still not armed.
    feed(arbiter, 0.02, policy=[0.0, 0.0], teleop=[0.1, 0.0])
    arbiter.tick(0.02)
    feed(arbiter, 0.04, policy=[0.0, 0.0], teleop=[0.5, 0.0])
    assert arbiter.tick(0.04).source == Controller.POLICY
    feed(arbiter, 0.06, policy=[0.0, 0.0], teleop=[0.07, 0.0])  # armed now
    arbiter.tick(0.06)
    feed(arbiter, 0.08, policy=[0.0, 0.0], teleop=[0.5, 0.0])
    assert arbiter.tick(0.08).source == Controller.HUMAN


def test_handback_does_not_trigger_an_immediate_automatic_takeover():
    arbiter = make(takeover_deviation_rad=0.15, handback_ramp_s=0.0)
    feed(arbiter, 0.0, policy=[0.0, 0.0], teleop=[0.0, 0.0])
    arbiter.tick(0.0)
    feed(arbiter, 0.02, policy=[0.0, 0.0], teleop=[0.3, 0.0])
    assert arbiter.tick(0.02).reason == 'deviation'
    # The released pedal keeps publishing False: that is no edge and does not hand back.
    assert arbiter.on_engage(False, now=0.03) is False
    assert arbiter.tick(0.04).source == Controller.HUMAN
    # Press and release hands back. The leader still rests 0.3 rad from the follower (say a
    # position limit kept the follower from following it): no immediate re-takeover.
    arbiter.on_engage(True, now=0.05)
    arbiter.on_engage(False, now=0.05)
    for now in (0.06, 0.08):
        feed(arbiter, now, policy=[0.0, 0.0], teleop=[0.3, 0.0])
        out = arbiter.tick(now)
        assert (out.source, out.reason) == (Controller.POLICY, 'handback')
    # Once the leader came back near the follower, a new pull takes over again.
    feed(arbiter, 0.10, policy=[0.0, 0.0], teleop=[0.05, 0.0])
    assert arbiter.tick(0.10).source == Controller.POLICY
    feed(arbiter, 0.12, policy=[0.0, 0.0], teleop=[0.3, 0.0])
    assert arbiter.tick(0.12).reason == 'deviation'


def test_segment_id_increments_exactly_at_switches_of_the_executed_source():
    arbiter = make(takeover_deviation_rad=0.0, handback_ramp_s=0.0)
    timeline = []
    # (time, policy, teleop, event)
    steps = [
        (0.00, None, None, None),             # HOLD (no policy yet)        seg 0
        (0.02, [0.1, 0.0], None, None),       # POLICY                      seg 1
        (0.04, [0.1, 0.0], None, None),       # POLICY
        (0.06, [0.1, 0.0], [0.2, 0.0], True),   # HUMAN (engage)            seg 2
        (0.08, [0.1, 0.0], [0.2, 0.0], None),   # HUMAN
        (0.30, [0.1, 0.0], None, None),       # HOLD (teleop 0.22 s old)    seg 3
        (0.32, [0.1, 0.0], [0.2, 0.0], None),   # HUMAN again               seg 4
        (0.34, [0.1, 0.0], [0.2, 0.0], False),  # POLICY (handback)         seg 5
        (0.36, [0.1, 0.0], None, None),       # POLICY
    ]
    for now, policy, teleop, event in steps:
        feed(arbiter, now, policy=policy, teleop=teleop)
        if event is not None:
            arbiter.on_engage(event, now)
        out = arbiter.tick(now)
        timeline.append((out.source, out.segment_id, out.switched))
    assert timeline == [
        (Controller.HOLD, 0, False), (Controller.POLICY, 1, True), (Controller.POLICY, 1, False),
        (Controller.HUMAN, 2, True), (Controller.HUMAN, 2, False), (Controller.HOLD, 3, True),
        (Controller.HUMAN, 4, True), (Controller.POLICY, 5, True), (Controller.POLICY, 5, False)]
    arbiter.reset_segment_id()
    feed(arbiter, 0.38, policy=[0.1, 0.0])
    assert arbiter.tick(0.38).segment_id == 0


def test_bumpless_handback_ramps_from_the_last_human_command_to_the_policy():
    arbiter = make(takeover_deviation_rad=0.0, handback_ramp_s=0.5)
    arbiter.on_engage(True, now=0.0)
    feed(arbiter, 0.98, policy=[0.0, 0.25], teleop=[0.5, -0.25])
    out = arbiter.tick(0.98)
    assert out.source == Controller.HUMAN
    arbiter.on_engage(False, now=1.0)
    # On the handback tick itself the command is still the last human one: no bump.
    feed(arbiter, 1.0, policy=[0.0, 0.25])
    out = arbiter.tick(1.0)
    assert (out.source, out.reason, out.switched) == (Controller.POLICY, 'handback', True)
    assert out.reseed_policy and out.ramping
    np.testing.assert_allclose(out.command, [0.5, -0.25])
    # A quarter of the way: 0.75 * human + 0.25 * policy, with the policy's new command.
    feed(arbiter, 1.125, policy=[1.0, 0.25])
    out = arbiter.tick(1.125)
    assert not out.reseed_policy  # only on the handback tick
    np.testing.assert_allclose(out.command, [0.625, -0.125])
    # Midpoint (0.25 s of 0.5 s): the average of the last human and the policy command.
    feed(arbiter, 1.25, policy=[0.0, 0.25])
    out = arbiter.tick(1.25)
    np.testing.assert_allclose(out.command, [0.25, 0.0])
    assert out.ramping and not out.switched and out.segment_id == 2
    # The ramp is over: the policy command passes unchanged.
    feed(arbiter, 1.5, policy=[0.0, 0.25])
    out = arbiter.tick(1.5)
    assert not out.ramping
    np.testing.assert_array_equal(out.command, [0.0, 0.25])


def test_zero_ramp_hands_back_at_once():
    arbiter = make(takeover_deviation_rad=0.0, handback_ramp_s=0.0)
    arbiter.on_engage(True, now=0.0)
    feed(arbiter, 0.0, policy=[0.0, 0.25], teleop=[0.5, -0.25])
    arbiter.tick(0.0)
    arbiter.on_engage(False, now=0.01)
    feed(arbiter, 0.02, policy=[0.0, 0.25])
    out = arbiter.tick(0.02)
    assert out.reseed_policy and not out.ramping
    np.testing.assert_array_equal(out.command, [0.0, 0.25])


def test_watchdog_holds_the_last_command_while_the_policy_is_stale_and_recovers():
    arbiter = make(policy_stale_after_s=0.25)  # binary-exact times below
    feed(arbiter, 1.0, policy=[0.3, 0.1])
    np.testing.assert_array_equal(arbiter.tick(1.0).command, [0.3, 0.1])
    feed(arbiter, 1.25)  # joint states keep coming, the policy is silent
    out = arbiter.tick(1.25)  # exactly 0.25 s old: still fresh
    assert out.source == Controller.POLICY
    feed(arbiter, 1.26)
    out = arbiter.tick(1.26)  # 0.26 s old: stale
    assert (out.source, out.controller, out.reason, out.switched, out.segment_id) == (
        Controller.HOLD, Controller.POLICY, 'watchdog', True, 2)
    np.testing.assert_array_equal(out.command, [0.3, 0.1])
    feed(arbiter, 1.3, policy=[0.35, 0.1])
    out = arbiter.tick(1.3)
    assert (out.source, out.reason, out.switched, out.segment_id) == (
        Controller.POLICY, 'start', True, 3)
    assert not out.reseed_policy
    np.testing.assert_array_equal(out.command, [0.35, 0.1])


def test_stale_joint_state_holds_even_with_a_fresh_policy():
    arbiter = make(joint_state_stale_after_s=0.2)
    feed(arbiter, 0.0, policy=[0.2, 0.0])
    arbiter.tick(0.0)
    arbiter.on_policy_command([0.4, 0.0], now=0.3)  # no joint state since t=0
    out = arbiter.tick(0.3)
    assert (out.source, out.reason) == (Controller.HOLD, 'watchdog')
    np.testing.assert_array_equal(out.command, [0.2, 0.0])


def test_stale_teleop_while_the_human_is_in_control_holds():
    arbiter = make(takeover_deviation_rad=0.0, teleop_stale_after_s=0.2)
    arbiter.on_engage(True, now=0.0)
    feed(arbiter, 0.0, policy=[0.0, 0.0], teleop=[0.2, 0.1])
    assert arbiter.tick(0.0).source == Controller.HUMAN
    feed(arbiter, 0.25, policy=[0.0, 0.0])  # a fresh policy does not take control back
    out = arbiter.tick(0.25)
    assert (out.source, out.controller, out.reason) == (
        Controller.HOLD, Controller.HUMAN, 'watchdog')
    np.testing.assert_array_equal(out.command, [0.2, 0.1])
    feed(arbiter, 0.3, teleop=[0.25, 0.1])
    out = arbiter.tick(0.3)
    assert (out.source, out.reason) == (Controller.HUMAN, 'engage')
    np.testing.assert_array_equal(out.command, [0.25, 0.1])


def test_estop_latches_a_hold_at_the_measured_position_until_reset():
    arbiter = make(takeover_deviation_rad=0.0)
    feed(arbiter, 0.0, state=[0.1, 0.0], policy=[0.5, 0.5])
    arbiter.tick(0.0)
    # The arm lags behind the command; the e-stop holds where it is, not where it was sent.
    arbiter.on_joint_state([0.3, 0.2], now=0.01)
    arbiter.estop()
    assert arbiter.estopped
    for now in (0.02, 0.5, 5.0):
        feed(arbiter, now, state=[0.31, 0.2], policy=[0.9, 0.9], teleop=[0.0, 0.0])
        arbiter.on_engage(True, now)
        out = arbiter.tick(now)
        assert (out.source, out.reason) == (Controller.HOLD, 'estop')
        np.testing.assert_array_equal(out.command, [0.3, 0.2])
    assert out.segment_id == 2  # HOLD -> POLICY -> HOLD, one switch into the e-stop
    arbiter.on_engage(False, now=5.0)  # hands back while stopped: the policy resumes
    assert arbiter.tick(5.0).source == Controller.HOLD
    arbiter.reset_estop()
    assert not arbiter.estopped
    feed(arbiter, 5.02, policy=[0.9, 0.9])
    out = arbiter.tick(5.02)
    assert (out.source, out.switched, out.segment_id) == (Controller.POLICY, True, 3)
    assert out.reseed_policy


def test_estop_before_any_joint_state_holds_the_first_measured_position():
    arbiter = TeleopArbiter(ArbiterParams())
    arbiter.estop()
    assert arbiter.tick(0.0).command is None
    arbiter.on_joint_state([0.4, -0.4], now=0.1)
    arbiter.on_policy_command([0.0, 0.0], now=0.1)
    out = arbiter.tick(0.1)
    assert out.reason == 'estop'
    np.testing.assert_array_equal(out.command, [0.4, -0.4])


def test_position_limits_clip_every_command_within_the_margin():
    arbiter = make(position_lower=[-0.5, 0.0], position_upper=[0.5, 1.0], limit_margin_rad=0.5)
    feed(arbiter, 0.0, policy=[0.7, -0.2])
    np.testing.assert_array_equal(arbiter.tick(0.0).command, [0.5, 0.0])
    arbiter.take_over(now=0.0)
    feed(arbiter, 0.02, teleop=[-0.9, 1.5])
    np.testing.assert_array_equal(arbiter.tick(0.02).command, [-0.5, 1.0])


def test_one_sided_position_limit():
    arbiter = make(position_upper=[0.1, 0.1], limit_margin_rad=1.0)
    feed(arbiter, 0.0, policy=[0.7, -9.0])
    np.testing.assert_array_equal(arbiter.tick(0.0).command, [0.1, -9.0])


def test_a_command_far_beyond_a_limit_is_rejected_and_that_side_holds():
    arbiter = make(position_lower=[-0.5, 0.0], position_upper=[0.5, 1.0], limit_margin_rad=0.1)
    feed(arbiter, 0.0, policy=[0.55, 0.5])  # 0.05 beyond: clipped
    np.testing.assert_array_equal(arbiter.tick(0.0).command, [0.5, 0.5])
    with pytest.raises(ValueError, match=r'above the position limits by more than '
                                         r'limit_margin_rad \(0.1\) at joint\(s\) \[0\]'):
        feed(arbiter, 0.02, policy=[0.7, 0.5])
    # The previous good command is not repeated either: the arm holds where it was sent.
    out = arbiter.tick(0.02)
    assert (out.source, out.reason) == (Controller.HOLD, 'rejected')
    np.testing.assert_array_equal(out.command, [0.5, 0.5])
    feed(arbiter, 0.04, policy=[0.4, 0.5])  # a good command: the policy drives again
    out = arbiter.tick(0.04)
    assert (out.source, out.reason) == (Controller.POLICY, 'start')
    # The human's side likewise, and one side's refusal does not hold the other's.
    arbiter.take_over(now=0.06)
    with pytest.raises(ValueError, match='below the position limits'):
        feed(arbiter, 0.06, teleop=[0.0, -0.5])
    assert arbiter.tick(0.06).reason == 'rejected'
    arbiter.hand_back(now=0.08)
    feed(arbiter, 0.08, policy=[0.4, 0.5])
    assert arbiter.tick(0.08).source == Controller.POLICY
    # Refusals the adapter makes (joint names) hold the same way.
    arbiter.reject(Controller.POLICY)
    assert arbiter.tick(0.1).reason == 'rejected'


def test_velocity_limit_bounds_the_step_per_tick():
    # 0.5 rad/s * 0.02 s = 0.01 rad per tick on every joint.
    arbiter = make(control_period_s=0.02, max_velocity_rad_s=[0.5])
    expected = [[0.01, -0.01], [0.02, -0.02], [0.03, -0.03]]
    for i, want in enumerate(expected):
        now = 0.02 * i
        feed(arbiter, now, policy=[1.0, -1.0])
        np.testing.assert_allclose(arbiter.tick(now).command, want, rtol=0, atol=1e-12)
    # A small step passes unchanged.
    feed(arbiter, 0.06, policy=[0.035, -0.03])
    np.testing.assert_allclose(arbiter.tick(0.06).command, [0.035, -0.03], rtol=0,
                               atol=1e-12)


def test_per_joint_velocity_limit_applies_to_takeover_jumps():
    arbiter = make(control_period_s=0.02, max_velocity_rad_s=[0.5, 2.0],
                   takeover_deviation_rad=0.0)
    arbiter.take_over(now=0.0)
    feed(arbiter, 0.0, teleop=[1.0, 1.0])
    np.testing.assert_allclose(arbiter.tick(0.0).command, [0.01, 0.04], rtol=0, atol=1e-12)


def test_parameters_are_validated():
    with pytest.raises(ValueError, match='position_lower and position_upper'):
        ArbiterParams(position_lower=[0.0], position_upper=[1.0, 1.0])
    with pytest.raises(ValueError, match='above position_upper'):
        ArbiterParams(position_lower=[0.0, 2.0], position_upper=[1.0, 1.0])
    with pytest.raises(ValueError, match='must be positive'):
        ArbiterParams(max_velocity_rad_s=[1.0, 0.0])
    with pytest.raises(ValueError, match='handback_ramp_s'):
        ArbiterParams(handback_ramp_s=-1.0)
    arbiter = TeleopArbiter(ArbiterParams(max_velocity_rad_s=[1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match='3 values for 2 joints'):
        arbiter.on_joint_state(HOME, now=0.0)


def test_commands_of_the_wrong_length_or_not_finite_are_rejected():
    arbiter = make()
    with pytest.raises(ValueError, match='3 positions'):
        arbiter.on_policy_command([0.0, 0.0, 0.0], now=0.0)
    with pytest.raises(ValueError, match='NaN'):
        arbiter.on_teleop_command([0.0, float('nan')], now=0.0)
    assert arbiter.tick(0.0).source == Controller.HOLD


def test_hold_between_episodes_forwards_the_policy_only_during_an_episode():
    arbiter = make(hold_between_episodes=True, takeover_deviation_rad=0.0)
    feed(arbiter, 0.0, policy=[0.5, 0.5])
    out = arbiter.tick(0.0)  # before the first episode: nothing is sent
    assert (out.source, out.reason, out.command) == (Controller.HOLD, 'idle', None)
    # The episode starts after a reset: the policy's last command (planned before it) is
    # dropped, nothing is sent until the re-planned one arrives, and the policy re-plans.
    feed(arbiter, 0.02, state=[0.3, 0.3])  # the pose the reset left
    arbiter.on_episode(True)
    out = arbiter.tick(0.04)
    assert (out.source, out.reason, out.command, out.reseed_policy) == (
        Controller.HOLD, 'watchdog', None, True)
    feed(arbiter, 0.06, state=[0.3, 0.3], policy=[0.31, 0.3])
    out = arbiter.tick(0.06)
    assert out.source == Controller.POLICY and not out.reseed_policy
    np.testing.assert_array_equal(out.command, [0.31, 0.3])
    # Stale policy inside an episode: the usual hold at the last command.
    feed(arbiter, 0.4, state=[0.3, 0.3])
    np.testing.assert_array_equal(arbiter.tick(0.4).command, [0.31, 0.3])
    arbiter.on_episode(False)
    feed(arbiter, 0.42, policy=[0.9, 0.9])
    assert arbiter.tick(0.42).reason == 'idle'


def test_a_human_may_drive_between_episodes():
    arbiter = make(hold_between_episodes=True, takeover_deviation_rad=0.0)
    feed(arbiter, 0.0, teleop=[0.2, 0.1])
    assert arbiter.on_engage(True, 0.0)
    out = arbiter.tick(0.0)
    assert out.source == Controller.HUMAN
    np.testing.assert_array_equal(out.command, [0.2, 0.1])


def test_episodes_change_nothing_without_hold_between_episodes():
    arbiter = make()
    arbiter.on_episode(False)
    feed(arbiter, 0.0, policy=[0.5, 0.5])
    out = arbiter.tick(0.0)
    assert out.source == Controller.POLICY
    arbiter.on_episode(True)
    np.testing.assert_array_equal(arbiter.tick(0.02).command, [0.5, 0.5])
