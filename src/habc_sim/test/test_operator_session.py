"""The scripted operator's episode loop with injected ticks and service answers (no DDS)."""

import numpy as np
import pytest

from habc_episodes.vocabulary import Outcome
from habc_sim.operator_session import (
    NOTHING,
    OperatorSession,
    Phase,
    ScriptedOperatorParams,
    Service,
    StampPairer,
    Tick,
)
from habc_sim.sim_robot import SimRobot, SimRobotParams

pytestmark = pytest.mark.ros  # the core of scripted_operator_node (no DDS needed)

START_JOINTS = np.array([0.0, -0.96, 1.16, 0.0, -0.3, 0.0, 0.1] * 2)


def privileged(step=1, seed=0, reset_count=0, box=(0.1, 0.5, 0.02), **flags):
    state = {'task': 'transfer_cube', 'seed': seed, 'reset_count': reset_count, 'step': step,
             'stage': 0, 'success': False, 'strict_success': False, 'failure': False,
             'physics_error': False, 'truncated': False, 'objects': {'box': list(box)}}
    state.update(flags)
    return Tick(START_JOINTS, state)


class FakeExpert:
    def __init__(self, mirror, seed):
        self.replans = 0

    def replan(self):
        self.replans += 1

    def act(self):
        return np.full(14, 0.5)


def session(**overrides):
    params = ScriptedOperatorParams(**{'episodes': 1, 'takeover_probability': 1.0,
                                       'handback_probability': 0.0,
                                       'reaction_delay_steps': 2, **overrides})
    logs = []
    s = OperatorSession(params, log=lambda level, text: logs.append((level, text)),
                        expert_factory=FakeExpert)
    s.logs = logs
    return s


def answer(s, service, ok=True, message='', episode_id='', now=0.0):
    call = s.next_call(now)
    assert call is not None and call.service == service, call
    s.on_response(call, ok, message, episode_id, now=now)
    return call


def running(s, seed=0):
    """Bring a session through waiting, reset and start (the sim had reset 0 before)."""
    s.on_tick(privileged(step=500, seed=0, reset_count=0))
    assert s.wait([], 0.0)
    assert answer(s, Service.RESET).seed == seed
    answer(s, Service.START, episode_id='ep-0001')
    assert s.phase == Phase.RUNNING


def test_stamp_pairer_matches_either_order_and_drops_unmatched():
    pairer = StampPairer()
    assert pairer.add_joints(1, np.zeros(14)) is None
    tick = pairer.add_privileged(1, {'step': 1})
    assert tick.privileged == {'step': 1} and tick.joints.shape == (14,)
    assert pairer.add_privileged(2, {'step': 2}) is None
    assert pairer.add_privileged(3, {'step': 3}) is None
    assert pairer.add_joints(3, np.ones(14)).privileged == {'step': 3}
    assert pairer.dropped == 1          # privileged 2 never got its joint state
    assert pairer.add_joints(2, np.ones(14)) is None   # late: kept until pushed out


def test_waits_for_services_and_a_tick_then_gives_up():
    s = session(wait_for_services_s=5.0)
    assert not s.wait(['service /sim/reset'], 0.0)
    assert 'service /sim/reset' in s.logs[-1][1] and 'a robot tick' in s.logs[-1][1]
    assert not s.wait(['service /sim/reset'], 1.0)
    assert len(s.logs) == 1             # unchanged: not logged again within 10 s
    assert not s.wait(['service /sim/reset'], 6.0)
    assert s.done and 'gave up after 5 s' in s.fatal and s.logs[-1][0] == 'error'


def test_ticks_before_the_reset_are_ignored():
    s = session()
    running(s)
    # Still in flight from before the reset: the old reset count (and the old step).
    assert s.on_tick(privileged(step=501, reset_count=0)) == NOTHING
    assert s.operator is None
    assert s.on_tick(privileged(step=1, reset_count=1)) == NOTHING   # the policy drives
    assert s.operator is not None


def test_takeover_drives_then_hands_back_at_the_end_and_labels():
    s = session(episodes=2, seed_base=7)
    running(s, seed=7)
    s.on_tick(privileged(step=1, seed=7, reset_count=1))
    # The box pushed 5 cm before any grasp: the bad-approach detector fires at step 2.
    pushed = (0.15, 0.5, 0.02)
    assert s.on_tick(privileged(step=2, seed=7, reset_count=1, box=pushed)).command is None
    assert s.on_tick(privileged(step=3, seed=7, reset_count=1, box=pushed)).command is None
    out = s.on_tick(privileged(step=4, seed=7, reset_count=1, box=pushed))
    assert out.engage == (True,) and np.allclose(out.command, 0.5)
    assert s.in_control and s.expert.replans == 1
    out = s.on_tick(privileged(step=5, seed=7, reset_count=1, box=pushed, success=True))
    assert out.engage == (False,) and out.command is None and s.phase == Phase.END
    answer(s, Service.END, episode_id='ep-0001')
    label = answer(s, Service.LABEL)
    assert (label.episode_id, label.outcome) == ('ep-0001', Outcome.SUCCESS)
    assert 'seed 7; success at step 5; 1 takeover(s): bad_approach at 2' == label.note
    record = s.records[0]
    assert (record.success, record.takeovers, record.human_ticks) == (True, 1, 1)
    # The next episode: the next seed, and ticks of the previous reset are not its own.
    assert s.phase == Phase.RESET
    assert answer(s, Service.RESET).seed == 8


def test_a_restarted_simulator_discards_the_episode_and_the_next_one_runs():
    s = session(episodes=2, seed_base=3)
    running(s, seed=3)
    s.on_tick(privileged(step=1, seed=3, reset_count=1))
    s.on_tick(privileged(step=2, seed=3, reset_count=1))
    # The simulator crashed and came back: its reset count starts again at 0, and its
    # ticks would never be this episode's (it was stuck waiting for them before).
    s.on_tick(privileged(step=1, seed=-1, reset_count=0))
    assert s.phase == Phase.END and s.record.end_reason == 'the simulator restarted'
    answer(s, Service.END, episode_id='ep-0001')
    label = answer(s, Service.LABEL)
    assert label.outcome == Outcome.DISCARDED and 'the simulator restarted' in label.note
    # The next episode resets the new simulator and runs on its ticks.
    assert answer(s, Service.RESET).seed == 4
    answer(s, Service.START, episode_id='ep-0002')
    assert s.on_tick(privileged(step=1, seed=4, reset_count=0)) == NOTHING  # before the reset
    assert s.operator is None
    s.on_tick(privileged(step=1, seed=4, reset_count=1))
    assert s.operator is not None and s.phase == Phase.RUNNING


def test_a_recording_left_by_a_crashed_operator_is_aborted_before_starting():
    s = session()
    s.on_tick(privileged(step=500, seed=0, reset_count=0))
    assert s.wait([], 0.0)
    answer(s, Service.RESET)
    # The recorder still records the episode of the operator that crashed before this one.
    answer(s, Service.START, ok=False, episode_id='robot-old-3',
           message='episode robot-old-3 is still recording; END or ABORT it before starting '
           'another (nothing was changed)')
    abort = answer(s, Service.ABORT)
    assert abort.episode_id == 'robot-old-3'
    answer(s, Service.START, episode_id='ep-0001')
    assert s.phase == Phase.RUNNING and s.record.episode_id == 'ep-0001'
    assert any('aborting it (discarded)' in text for _, text in s.logs)


def test_failure_and_time_limit_end_the_episode_as_failures():
    for flags, reason in (({'failure': True}, 'failure'),
                          ({'truncated': True}, 'time limit'),
                          ({'step': 300}, 'time limit')):
        s = session()
        running(s)
        s.on_tick(privileged(reset_count=1, **flags))
        assert s.phase == Phase.END and s.record.end_reason == reason
        answer(s, Service.END, episode_id='ep-0001')
        assert answer(s, Service.LABEL).outcome == Outcome.FAILURE
        assert s.done and not s.fatal


def test_engage_is_pressed_again_when_the_arbiter_does_not_switch():
    s = session(confirm_takeover_ticks=3, reaction_delay_steps=0)
    running(s)
    s.on_tick(privileged(step=1, reset_count=1))
    s.on_intervention(False)
    pushed = (0.15, 0.5, 0.02)
    engages = [s.on_tick(privileged(step=t, reset_count=1, box=pushed)).engage
               for t in range(2, 8)]
    assert engages == [(), (True,), (True,), (True,), (False, True), (True,)]
    s.on_intervention(True)
    assert s.on_tick(privileged(step=9, reset_count=1, box=pushed)).engage == (True,)


def test_start_refusals_are_retried_for_wait_for_services_s_then_fatal():
    s = session(wait_for_services_s=5.0)
    s.on_tick(privileged())
    s.wait([], 0.0)
    answer(s, Service.RESET)
    answer(s, Service.START, ok=False, message='not ready', now=10.0)
    assert s.next_call(10.5) is None                 # retried after 1 s
    for now in (11.0, 12.0, 15.0):
        answer(s, Service.START, ok=False, message='not ready', now=now)
        assert not s.done
    answer(s, Service.START, ok=True, episode_id='ep-0000', now=16.0)
    assert s.phase == Phase.RUNNING                  # a success resets the refusal clock
    s = session(wait_for_services_s=5.0)
    s.on_tick(privileged())
    s.wait([], 0.0)
    answer(s, Service.RESET)
    for now in (10.0, 11.0, 15.0):
        answer(s, Service.START, ok=False, message='busy', now=now)
    assert not s.done
    answer(s, Service.START, ok=False, message='busy', now=16.0)
    assert s.done and 'refused to start an episode for 5 s: busy' in s.fatal


def test_a_failed_reset_is_fatal():
    s = session()
    s.on_tick(privileged())
    s.wait([], 0.0)
    answer(s, Service.RESET, ok=False, message='no')
    assert s.done and 'sim/reset with seed 0 failed: no' in s.fatal


def test_operator_rescues_a_frozen_policy_on_the_simulated_robot():
    """The whole session on SimRobot with a one-tick command delay, as across ROS.

    The "policy" never moves, so the stall detector fires; the operator takes over and its
    expert (on the mirror) transfers the cube.
    """
    robot = SimRobot(SimRobotParams(cameras=[], seed=3, max_steps=400))
    s = OperatorSession(ScriptedOperatorParams(
        episodes=1, seed_base=11, max_steps=400, takeover_probability=1.0,
        handback_probability=0.0))

    def tick():
        result = robot.step()
        return s.on_tick(Tick(result.positions.astype(np.float64), result.privileged))

    tick()
    assert s.wait([], 0.0)
    call = s.next_call(0.0)
    assert (call.service, call.seed) == (Service.RESET, 11)
    robot.reset(call.seed)
    s.on_response(call, True)
    answer(s, Service.START, episode_id='ep-7')
    engaged = False
    for _ in range(400):
        out = tick()
        for value in out.engage:
            engaged = value
        if engaged and out.command is not None:
            robot.command(out.command)   # the arbiter passes the teleop command on
        if s.phase != Phase.RUNNING:
            break
    robot.close()
    record = s.record
    assert record.success, record
    assert record.takeovers == 1 and record.detections[0][1] == 'stall'
    assert not engaged                    # handed back at the end


# --- watching on request (help_request) ----------------------------------------------------
PUSHED = (0.15, 0.5, 0.02)   # the box pushed 5 cm before any grasp: bad approach
TICK_NS = 20_000_000
START_NS = 1_000 * 1_000_000_000


def at(step, **flags):
    """Return a tick of the running episode (reset 1) at `step`, one period per step."""
    return privileged(step=step, reset_count=1, stamp_ns=START_NS + step * TICK_NS, **flags)


def test_on_request_ignores_a_failing_robot_that_does_not_ask():
    s = session(watch='on_request')
    running(s)
    outputs = [s.on_tick(at(t, box=PUSHED)) for t in range(1, 60)]
    assert all(out == NOTHING for out in outputs)       # never engaged
    assert s.operator.takeovers == 0 and s.operator.fired == []
    assert s.operator.attention_steps == 0               # it never looked


def test_on_request_takes_over_reaction_delay_steps_after_a_request_opens():
    s = session(watch='on_request', reaction_delay_steps=3, episodes=1)
    running(s)
    for t in range(1, 10):
        assert s.on_tick(at(t)) == NOTHING
    # The policy's request, stamped at the observation of step 9; the next tick sees it.
    s.on_help_request(True, START_NS + 9 * TICK_NS)
    assert s.help_requested
    engaged_at = None
    for t in range(10, 20):
        out = s.on_tick(at(t))
        if out.engage == (True,):
            engaged_at = t
            break
        assert out == NOTHING
    assert engaged_at == 10 + 3
    assert s.in_control and s.operator.causes == ['help_request']
    assert s.operator.requests_seen == 1
    assert ('info', 'step 13: taking over (help_request)') in s.logs
    # Answered: the policy clears the request; the operator keeps driving.
    s.on_help_request(False, START_NS + 13 * TICK_NS)
    assert s.on_tick(at(14)).command is not None
    out = s.on_tick(at(15, success=True))
    assert out.engage == (False,) and s.phase == Phase.END
    answer(s, Service.END, episode_id='ep-0001')
    label = answer(s, Service.LABEL)
    assert label.note == 'seed 0; success at step 15; 1 takeover(s): help_request at 13'
    record = s.records[0]
    assert (record.answered, record.requests_seen) == ([13], 1)
    assert any('1 help request(s) seen, 1 answered' in text for _, text in s.logs)


def test_on_request_ignores_a_request_from_before_the_episode():
    s = session(watch='on_request', reaction_delay_steps=0)
    running(s)
    # Latched from the last episode (or an earlier run): stamped before this one began.
    s.on_help_request(True, START_NS - TICK_NS)
    assert not s.help_requested     # no episode yet
    for t in range(1, 20):
        assert s.on_tick(at(t)) == NOTHING
    assert not s.help_requested and s.operator.requests_seen == 0


def test_on_request_declines_with_answer_probability_zero():
    s = session(watch='on_request', answer_probability=0.0, reaction_delay_steps=5)
    running(s)
    s.on_tick(at(1))
    s.on_help_request(True, START_NS + TICK_NS)
    # It comes over (the reaction delay counts as attention), decides once, declines ...
    assert all(s.on_tick(at(t)) == NOTHING for t in range(2, 20))
    assert s.operator.requests_seen == 1 and s.operator.takeovers == 0
    assert s.operator.attention_steps == 5
    # ... and leaves that request alone, even when the robot then goes wrong.
    assert all(s.on_tick(at(t, box=PUSHED)) == NOTHING for t in range(20, 40))
    assert s.operator.takeovers == 0 and s.operator.attention_steps == 5


def test_continuous_watch_is_unchanged_by_help_requests():
    # A request on a robot doing fine does not move a continuous watcher; its detectors do.
    s = session(reaction_delay_steps=2)
    running(s)
    s.on_tick(at(1))
    s.on_help_request(True, START_NS + TICK_NS)
    assert all(s.on_tick(at(t)) == NOTHING for t in range(2, 20))
    assert s.operator.takeovers == 0 and s.operator.requests_seen == 0
    assert s.on_tick(at(20, box=PUSHED)) == NOTHING      # the detector fires at 20
    assert s.on_tick(at(21, box=PUSHED)) == NOTHING
    assert s.on_tick(at(22, box=PUSHED)).engage == (True,)
    assert s.operator.causes == ['bad_approach']
    assert ('info', 'step 22: taking over (bad_approach)') in s.logs


def test_operator_params_check_watch():
    assert ScriptedOperatorParams().watch == 'continuous'
    with pytest.raises(ValueError, match='watch'):
        ScriptedOperatorParams(watch='sometimes')
