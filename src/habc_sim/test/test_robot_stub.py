"""The first-order joint model of the robot stub."""

import math

import numpy as np
import pytest

from habc_sim.joints import ALOHA_JOINT_NAMES
from habc_sim.robot_stub import FirstOrderJointModel, RobotStubParams


def test_aloha_joint_names():
    assert len(ALOHA_JOINT_NAMES) == 14
    assert ALOHA_JOINT_NAMES[6] == 'left_gripper' and ALOHA_JOINT_NAMES[7] == 'right_waist'


def test_joint_follows_command_with_first_order_lag():
    params = RobotStubParams(joint_names=['a', 'b'], initial_positions=[0.0, 1.0],
                             time_constant_s=0.1)
    model = FirstOrderJointModel(params)
    model.command([1.0, 1.0])
    model.step(0.1)  # one time constant: 1 - e^-1 of the way
    assert model.positions[0] == pytest.approx(1.0 - math.exp(-1.0))
    assert model.positions[1] == pytest.approx(1.0)
    assert model.velocities[0] == pytest.approx((1.0 - math.exp(-1.0)) / 0.1)
    for _ in range(100):
        model.step(0.01)
    np.testing.assert_allclose(model.positions, [1.0, 1.0], atol=1e-4)


def test_step_is_exact_regardless_of_dt_split():
    params = RobotStubParams(joint_names=['a'], time_constant_s=0.05)
    coarse, fine = FirstOrderJointModel(params), FirstOrderJointModel(params)
    coarse.command([2.0])
    fine.command([2.0])
    coarse.step(0.04)
    for _ in range(4):
        fine.step(0.01)
    assert coarse.positions[0] == pytest.approx(fine.positions[0])


def test_bad_commands_are_rejected_and_state_kept():
    model = FirstOrderJointModel(RobotStubParams(joint_names=['a', 'b']))
    with pytest.raises(ValueError, match=r'command has 3 values, the robot has 2 joints \(a, b\)'):
        model.command([0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match='NaN'):
        model.command([0.0, float('nan')])
    np.testing.assert_array_equal(model.targets, [0.0, 0.0])


def test_params_validation():
    with pytest.raises(ValueError, match='initial_positions has 1 values for 2 joints'):
        RobotStubParams(joint_names=['a', 'b'], initial_positions=[0.0])
    with pytest.raises(ValueError, match='below its minimum'):
        RobotStubParams(rate_hz=0.0)
