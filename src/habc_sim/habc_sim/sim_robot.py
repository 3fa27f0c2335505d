"""The simulated robot behind sim_robot_node (no rclpy): AlohaEnv as a position-driven robot.

It behaves like a real robot under a ros2_control forward position controller: on every
control tick it moves toward the latest joint command (14 targets: per arm 6 angles in rad
and a gripper opening 0..1) and reports its joint state and camera images. It holds the pose
it was reset to until the first command arrives, and it never resets itself: the episode
bookkeeping (step, success, failure, time limit) is only reported in the privileged state,
which the scripted operator reads and a policy never sees.
"""

from collections.abc import Sequence
from dataclasses import dataclass
import math

import numpy as np

from habc_common.control_loop import ControlThreadParams
from habc_common.params import param, validate_params
from habc_sim.aloha import AlohaConfig, AlohaEnv, CAMERAS, OFF_TABLE_Z, TASK_OBJECTS
from habc_sim.joints import ALOHA_JOINT_NAMES


@dataclass(frozen=True)
class SimRobotParams(ControlThreadParams):
    """Parameters of sim_robot_node (with the scheduling of its physics tick thread)."""

    task: str = param('transfer_cube', 'Simulated task (scene).',
                      choices=tuple(TASK_OBJECTS))
    cameras: list[str] = param(
        ['angle'], f'Cameras rendered and published on camera/<name>/image_raw: 0-3 of '
        f'{list(CAMERAS)}. Each 96 px camera costs about 5 ms per tick.')
    image_size: int = param(96, 'Width and height of the camera images (px).', min=16, max=480)
    rate_hz: float = param(
        50.0, 'Control rate (Hz). Each tick advances the physics by 20 ms, so 50 runs in real '
        'time; a tick that overruns its period is not caught up.', min=1.0, max=500.0)
    seed: int = param(0, 'Seed of the initial object poses (sim/reset draws new ones).', min=0)
    max_steps: int = param(
        300, 'Ticks after a reset from which sim/privileged reports truncated; the robot '
        'keeps running (it never resets itself).', min=1)

    def __post_init__(self) -> None:
        if self.cameras is None:
            # ROS hands an empty list (`cameras: []`, `-p cameras:=[]`) over untyped, as None.
            object.__setattr__(self, 'cameras', [])
        validate_params(self)
        self.aloha_config()  # the camera list and image size are checked there

    def aloha_config(self) -> AlohaConfig:
        """Return the AlohaEnv settings of these parameters."""
        try:
            return AlohaConfig(task=self.task, cameras=list(self.cameras),
                               image_size=self.image_size, max_steps=self.max_steps)
        except ValueError as exc:
            raise ValueError(f'{type(self).__name__}: {exc}') from exc


@dataclass
class SimTick:
    """What one control tick of the simulated robot produced."""

    positions: np.ndarray      # 14 joint positions in ALOHA_JOINT_NAMES order
    velocities: np.ndarray     # 14 joint velocities (gripper in opening per second)
    images: np.ndarray         # (cameras, size, size, 3) uint8, in the order of `cameras`
    privileged: dict           # the sim/privileged state (JSON-serialisable)


class SimRobot:
    """One simulated ALOHA robot: latch commands, step, report state and privileged state."""

    def __init__(self, params: SimRobotParams) -> None:
        self.params = params
        self.env = AlohaEnv(params.aloha_config())
        self.joint_names = list(ALOHA_JOINT_NAMES)
        self.objects = TASK_OBJECTS[params.task]
        self.reset_count = -1   # the reset at start-up is reset 0
        self.reset(params.seed)

    @property
    def cameras(self) -> list[str]:
        return list(self.params.cameras)

    def reset(self, seed: int) -> None:
        """Start over from the initial state of `seed`; the latched command is cleared."""
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f'seed must be a non-negative integer, got {seed!r}')
        self.env.reset(seed)
        self.reset_count += 1
        # Hold where the reset put the arms until someone commands otherwise.
        self.target = self.env.joint_state().astype(np.float64)
        self.has_command = False
        self.failure = False
        self.physics_error = False

    def command(self, positions: Sequence[float]) -> None:
        """Latch 14 joint targets (ALOHA order); ValueError on a wrong length or non-finite."""
        target = np.asarray(positions, dtype=np.float64).reshape(-1)
        if target.size != len(self.joint_names):
            raise ValueError(f'command has {target.size} values, the robot has '
                             f'{len(self.joint_names)} joints ({", ".join(self.joint_names)})')
        self._latch(target)

    def command_by_name(self, names: Sequence[str], positions: Sequence[float]) -> None:
        """Latch targets given for named joints (a trajectory point); the rest keep theirs."""
        names = list(names)
        if len(names) != len(positions):
            raise ValueError(f'trajectory point has {len(positions)} positions for '
                             f'{len(names)} joint names')
        unknown = [n for n in names if n not in self.joint_names]
        if unknown:
            raise ValueError(f'unknown joints {unknown}; the robot has {self.joint_names}')
        if len(set(names)) != len(names):
            raise ValueError(f'joint names repeat in {names}')
        target = self.target.copy()
        target[[self.joint_names.index(n) for n in names]] = positions
        self._latch(target)

    def _latch(self, target: np.ndarray) -> None:
        if not np.all(np.isfinite(target)):
            raise ValueError('command contains NaN or infinite values; ignored')
        self.target = target
        self.has_command = True

    def step(self) -> SimTick:
        """Advance one control period toward the latched target and report the result."""
        result = self.env.step(self.target)
        observation = result.observation
        state = self.env.privileged()
        objects = {name: state[f'{name}_pos'] for name in self.objects}
        dropped = bool(min(position[2] for position in objects.values()) < OFF_TABLE_Z)
        # Both are beyond recovery within an episode: they stay failed until the next reset.
        self.physics_error = self.physics_error or bool(result.physics_error)
        self.failure = self.failure or self.physics_error or dropped
        privileged = {
            'task': self.params.task,
            'seed': self.env.seed,
            'reset_count': self.reset_count,
            'step': self.env.steps,
            'stage': int(result.stage),
            'success': bool(result.success),
            'strict_success': bool(state['strict_success']),
            'failure': self.failure,
            'physics_error': self.physics_error,
            'truncated': bool(self.env.steps >= self.params.max_steps),
            'objects': {name: _floats(p) for name, p in objects.items()},
            'quats': {name: _floats(state[f'{name}_quat']) for name in self.objects},
        }
        return SimTick(positions=observation['state'], velocities=observation['velocity'],
                       images=observation['images'], privileged=privileged)

    def close(self) -> None:
        self.env.close()


def _floats(values: np.ndarray) -> list[float]:
    return [float(v) for v in values]


class OverrunCounter:
    """Counts control ticks that ran past their period, and periods skipped because of them.

    The timer does not catch up on missed periods (one late tick, not a burst), so the robot
    runs slower than real time while ticks overrun; these counts make that visible.
    """

    def __init__(self, period_s: float) -> None:
        self.period = period_s
        self.overruns = 0
        self.skipped = 0
        self._started: float | None = None

    def started(self, now: float) -> None:
        """Note the start of a tick at `now` (s)."""
        if self._started is not None:
            # Half a period of jitter is scheduling noise, not a skipped tick.
            self.skipped += max(0, math.floor((now - self._started) / self.period + 0.5) - 1)
        self._started = now

    def finished(self, now: float) -> bool:
        """Note the end of the tick at `now` (s); return whether it overran its period."""
        overran = self._started is not None and now - self._started > self.period
        self.overruns += int(overran)
        return overran
