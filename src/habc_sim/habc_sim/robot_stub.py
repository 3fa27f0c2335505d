"""A first-order joint model: the robot stub of the workspace foundation (no rclpy).

Each joint follows its commanded position with time constant tau, so commands visibly move
the published state. The MuJoCo robot of the simulation issue replaces it in the bringup.
"""

from collections.abc import Sequence
from dataclasses import dataclass
import math

import numpy as np

from habc_common.params import param, validate_params
from habc_sim.joints import ALOHA_JOINT_NAMES


@dataclass(frozen=True)
class RobotStubParams:
    """Parameters of robot_stub_node."""

    rate_hz: float = param(100.0, 'Joint state publish and integration rate (Hz).',
                           min=1.0, max=2000.0)
    joint_names: list[str] = param(list(ALOHA_JOINT_NAMES), 'Names of the simulated joints.')
    initial_positions: list[float] = param(
        [], 'Start positions (rad, gripper 0..1), one per joint; empty means all zero.')
    time_constant_s: float = param(0.05, 'First-order time constant of the joint response (s).',
                                   min=1e-4, max=10.0)

    def __post_init__(self) -> None:
        validate_params(self)
        if not self.joint_names:
            raise ValueError('parameter joint_names of RobotStubParams must not be empty')
        if self.initial_positions and len(self.initial_positions) != len(self.joint_names):
            raise ValueError(
                f'parameter initial_positions has {len(self.initial_positions)} values for '
                f'{len(self.joint_names)} joints; give one per joint or leave it empty')


class FirstOrderJointModel:
    """Joints that move toward their commanded targets with a first-order lag."""

    def __init__(self, params: RobotStubParams) -> None:
        n = len(params.joint_names)
        self.joint_names = list(params.joint_names)
        self.tau = params.time_constant_s
        self.positions = np.array(params.initial_positions or [0.0] * n, dtype=np.float64)
        self.velocities = np.zeros(n)
        self.targets = self.positions.copy()

    def command(self, targets: Sequence[float]) -> None:
        """Set new position targets; raise ValueError on a wrong length or non-finite value."""
        targets = np.asarray(targets, dtype=np.float64)
        if targets.shape != self.positions.shape:
            raise ValueError(f'command has {targets.size} values, the robot has '
                             f'{self.positions.size} joints ({", ".join(self.joint_names)})')
        if not np.all(np.isfinite(targets)):
            raise ValueError('command contains NaN or infinite values; ignored')
        self.targets = targets

    def step(self, dt: float) -> None:
        """Advance the joints by dt seconds (exact discretisation of the first-order lag)."""
        if dt <= 0.0:
            return
        alpha = 1.0 - math.exp(-dt / self.tau)
        previous = self.positions
        self.positions = previous + alpha * (self.targets - previous)
        self.velocities = (self.positions - previous) / dt
