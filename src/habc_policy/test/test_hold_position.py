"""The hold-position controller latches the first state and stops on stale states."""

import pytest

from habc_policy.hold_position import HoldPositionController, HoldPositionParams


def test_latches_first_state_and_holds_it():
    controller = HoldPositionController(HoldPositionParams(stale_after_s=0.2))
    assert controller.command(now=0.0) is None
    controller.on_joint_state(['a', 'b'], [0.1, 0.2], now=1.0)
    controller.on_joint_state(['a', 'b'], [0.5, 0.6], now=1.05)  # the arm drifted
    assert controller.command(now=1.1) == [0.1, 0.2]
    assert controller.joint_names == ['a', 'b']


def test_stale_state_stops_commands():
    controller = HoldPositionController(HoldPositionParams(stale_after_s=0.2))
    controller.on_joint_state(['a'], [0.1], now=1.0)
    assert controller.command(now=1.2) == [0.1]
    assert controller.command(now=1.21) is None
    controller.on_joint_state(['a'], [0.3], now=2.0)
    assert controller.command(now=2.0) == [0.1]


def test_mismatched_state_is_rejected():
    controller = HoldPositionController(HoldPositionParams())
    with pytest.raises(ValueError, match='2 names but 1 positions'):
        controller.on_joint_state(['a', 'b'], [0.1], now=0.0)
    assert controller.command(now=0.0) is None
