"""The scripted operator's detectors and decisions, on hand-made privileged states."""

import numpy as np
import pytest

from habc_episodes.vocabulary import Controller, Outcome
from habc_sim.operator import Detector, OperatorConfig, ScriptedOperator


def state(box=(0.1, 0.5, 0.05), stage=0, left=(-0.3, 0.5, 0.3), right=(0.3, 0.5, 0.3),
          success=False):
    return {'box_pos': np.array(box, float), 'stage': stage, 'strict_success': success,
            'left_gripper_pos': np.array(left, float), 'right_gripper_pos': np.array(right, float)}


def operator(**overrides):
    config = OperatorConfig(**{'reaction_delay_steps': 3, 'stall_steps': 5, **overrides})
    op = ScriptedOperator(config, np.random.default_rng(0))
    op.reset(state())
    return op


def moving(t):
    return state(right=(0.3 - 0.02 * t, 0.5, 0.3))   # approaching the box


def test_drop_is_detected_after_a_lift():
    op = operator()
    assert op.detect(state(box=(0.1, 0.5, 0.12), stage=2, right=(0.1, 0.5, 0.2))) is None
    assert op.detect(state(box=(0.1, 0.5, 0.03), right=(0.2, 0.5, 0.2))) == Detector.DROP


def test_bad_approach_is_a_pushed_object_before_any_grasp():
    op = operator()
    assert op.detect(state(box=(0.12, 0.5, 0.05))) is None          # 2 cm: fine
    assert op.detect(state(box=(0.15, 0.5, 0.05))) == Detector.BAD_APPROACH


def test_stall_needs_a_full_window_without_motion():
    op = operator()
    for _ in range(4):
        assert op.detect(state()) is None
    assert op.detect(state()) == Detector.STALL
    op = operator()
    assert all(op.detect(moving(t)) is None for t in range(8))


def test_stall_window_counts_control_steps_not_observed_ticks():
    # A watcher that sees every 3rd tick (a ROS operator under load) judges 5 steps too:
    # steps 0 and 3 do not span the window yet, steps 0..6 do.
    op = operator()
    assert op.detect(state(), t=0) is None
    assert op.detect(state(), t=3) is None
    assert op.detect(state(), t=6) == Detector.STALL
    # Steps that span the window but with motion inside it: no stall.
    op = operator()
    assert all(op.detect(moving(t), t=t) is None for t in range(0, 12, 3))


def test_takeover_after_reaction_delay_then_handback():
    op = operator(takeover_probability=1.0, handback_probability=1.0, handback_min_steps=4)
    controllers = []
    for t in range(20):
        if t < 5:
            s = state()                                   # stalls: fires at t = 4
        elif t < 12:
            s = state(right=(0.3 - 0.01 * t, 0.5, 0.3))    # the human works
        else:
            s = state(box=(0.0, 0.5, 0.2), stage=2, right=(0.0, 0.5, 0.25))  # lifted
        controllers.append(op.step(t, s)[0])
    # Back with the policy, the robot stands still again: the stall detector re-arms.
    assert op.fired == [(4, 'stall', True), (17, 'stall', True)]
    assert controllers[:7] == [Controller.POLICY] * 7     # detected at 4, delay 3
    assert controllers[7] == Controller.HUMAN
    assert Controller.HUMAN in controllers and controllers[-1] == Controller.POLICY
    assert op.takeovers == 1


def test_declined_detection_is_not_reconsidered():
    op = operator(takeover_probability=0.0)
    controllers = [op.step(t, state())[0] for t in range(30)]
    assert set(controllers) == {Controller.POLICY}
    assert op.fired == [(4, 'stall', False)]


def test_config_validation_and_labels():
    with pytest.raises(ValueError, match='unknown detector'):
        OperatorConfig(detectors=('boredom',))
    with pytest.raises(ValueError, match='takeover_probability must be in'):
        OperatorConfig(takeover_probability=1.5)
    assert ScriptedOperator.label(True) == Outcome.SUCCESS


def test_on_request_ignores_a_stall_until_asked_then_answers_after_the_reaction_delay():
    op = operator(watch='on_request', takeover_probability=1.0)
    # The robot stalls for 20 steps: a continuous watcher would have taken over at 4 + 3.
    controllers = [op.step(t, state())[0] for t in range(20)]
    assert set(controllers) == {Controller.POLICY} and op.fired == []
    assert op.attention_steps == 0
    # Asked at step 20: the person arrives 3 steps later (the same delay) and takes over.
    answers = [op.step(t, state(), help_requested=True) for t in range(20, 25)]
    assert [took for _, took in answers] == [False, False, False, True, False]
    assert op.causes == ['help_request'] and op.requests_seen == 1
    assert op.attention_steps == 5      # 3 watching the request, then 2 driving


def test_on_request_a_declined_request_is_not_reconsidered_until_a_new_one():
    op = operator(watch='on_request', answer_probability=0.0)
    for t in range(10):
        assert op.step(t, state(), help_requested=True) == (Controller.POLICY, False)
    assert op.takeovers == 0 and op.requests_seen == 1
    op.step(10, state())                       # the request cleared
    op.step(11, state(), help_requested=True)  # a new one
    assert op.requests_seen == 2


def test_on_request_spontaneous_checks_judge_with_the_detectors():
    # Checks at 50 Hz each step (rate * step_s = 1): the operator watches from step 0, so
    # the stall detector fires after its window of watched steps, as the continuous one.
    op = operator(watch='on_request', check_rate_hz=50.0, check_steps=100,
                  takeover_probability=1.0)
    controllers = [op.step(t, state())[0] for t in range(10)]
    assert op.fired == [(4, 'stall', True)] and controllers[7] == Controller.HUMAN
    assert op.causes == ['stall']
    with pytest.raises(ValueError, match='watch must be one of'):
        OperatorConfig(watch='sometimes')


def test_continuous_watching_counts_every_step_as_attention():
    op = operator(takeover_probability=0.0)
    for t in range(12):
        op.step(t, state())
    assert op.attention_steps == 12


def test_on_request_judging_watches_only_while_asked_and_uses_the_detectors():
    op = operator(watch='on_request', answer='judge', takeover_probability=1.0)
    for t in range(20):                       # stalled, but nobody asked: nothing happens
        assert op.step(t, state()) == (Controller.POLICY, False)
    # Asked at 20: the operator watches; the stall needs 5 watched steps (fires at 24), then
    # the reaction delay of 3: the takeover at 27, caused by the request.
    controllers = [op.step(t, state(), help_requested=True)[0] for t in range(20, 30)]
    assert op.fired == [(24, 'stall', True)] and controllers.index(Controller.HUMAN) == 7
    assert op.causes == ['help_request'] and op.attention_steps == 10
    with pytest.raises(ValueError, match='answer must be one of'):
        OperatorConfig(answer='ignore')
