"""Hold-position controller (no rclpy): command the first measured joint positions.

This is the skeleton controller of the workspace foundation and, later, the HOLD source of
the teleop arbiter: it latches the joint positions seen when it starts holding and keeps
commanding them while joint states stay fresh.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from habc_common.params import param, validate_params


@dataclass(frozen=True)
class HoldPositionParams:
    """Parameters of hold_position_node."""

    rate_hz: float = param(50.0, 'Command rate (Hz), the control rate.', min=1.0, max=1000.0)
    stale_after_s: float = param(
        0.2, 'Stop commanding when the newest joint state is older than this (s).',
        min=0.001, max=10.0)


class HoldPositionController:
    """Latch the first joint state and return it as the command while states are fresh."""

    def __init__(self, params: HoldPositionParams) -> None:
        validate_params(params)
        self.params = params
        self.joint_names: list[str] = []
        self.target: list[float] | None = None
        self._last_state_time: float | None = None

    def on_joint_state(self, names: Sequence[str], positions: Sequence[float],
                       now: float) -> None:
        """Record a joint state received at time `now` (seconds)."""
        if len(names) != len(positions):
            raise ValueError(f'joint state has {len(names)} names but {len(positions)} '
                             'positions')
        if self.target is None:
            self.joint_names = list(names)
            self.target = [float(p) for p in positions]
        self._last_state_time = now

    def command(self, now: float) -> list[float] | None:
        """Return the hold target, or None when no fresh joint state was seen."""
        if self.target is None or self._last_state_time is None:
            return None
        if now - self._last_state_time > self.params.stale_after_s:
            return None
        return list(self.target)
