"""Teleop arbiter core (no rclpy): choose the policy's or the human's command on each tick.

The arbiter runs at the control rate between the policy, the teleop device (a leader arm)
and the robot. On every tick it decides which source is executed (POLICY, HUMAN, or HOLD)
and returns the command after joint position and velocity limits, with a segment id that
increments at every switch of the executed source: the learner splits episodes there, so
the executed source is the ground truth of who produced each action.

Control (who *should* drive: the policy or the human) changes by events: the engage pedal
or button, an automatic takeover when the leader arm is pulled away from the follower, and
handbacks. What is *executed* can still be HOLD: while the controlling source's command or
the joint state is stale (watchdog), and while the latched e-stop is active.

All times are seconds passed in by the caller (`now`); nothing here reads a clock, so the
tests replay exact timelines and the node adapter decides which clock counts.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from habc_common.params import param, validate_params
from habc_episodes.vocabulary import Controller


@dataclass(frozen=True)
class ArbiterParams:
    """Parameters of teleop_arbiter_node."""

    control_period_s: float = param(
        0.02, 'Control tick period (s); the velocity limit allows max_velocity * period per '
        'tick.', min=1e-4, max=1.0)
    takeover_deviation_rad: float = param(
        0.15, 'Automatic takeover when the leader arm deviates from the measured follower '
        'position by more than this on any joint (rad); 0 disables it.', min=0.0, max=10.0)
    takeover_rearm_ratio: float = param(
        0.5, 'Hysteresis: the automatic takeover arms only once the leader is within this '
        'fraction of takeover_deviation_rad of the follower (at start and after a '
        'handback).', min=0.0, max=1.0)
    handback_ramp_s: float = param(
        0.5, 'Bumpless handback: blend linearly from the last command sent to the policy '
        'command over this time (s); 0 switches at once.', min=0.0, max=10.0)
    policy_stale_after_s: float = param(
        0.2, 'Hold when the newest policy command is older than this (s).',
        min=0.001, max=10.0)
    teleop_stale_after_s: float = param(
        0.2, 'Hold when the newest teleop command is older than this (s).',
        min=0.001, max=10.0)
    joint_state_stale_after_s: float = param(
        0.2, 'Hold when the newest joint state is older than this (s).', min=0.001, max=10.0)
    position_lower: list[float] = param(
        [], 'Lower joint position limits, one per joint; empty means unlimited.')
    position_upper: list[float] = param(
        [], 'Upper joint position limits, one per joint; empty means unlimited.')
    limit_margin_rad: float = param(
        0.1, 'A command beyond a position limit by more than this is rejected, not clipped: '
        'a model or teleop mapping that far off is broken, and the arbiter holds instead of '
        'driving the arm to its limit. Within the margin it is clipped.', min=0.0, max=10.0)
    max_velocity_rad_s: list[float] = param(
        [], 'Joint velocity limits (rad/s, or units/s): one value for every joint or one per '
        'joint; empty means unlimited.')
    engage_requires_teleop: bool = param(
        False, 'Refuse an engage request while the teleop command is missing or stale '
        '(otherwise the engage takes control and the watchdog holds until teleop is fresh).')
    hold_between_episodes: bool = param(
        False, 'The policy drives only during recorded episodes. Before the first episode and '
        "between two, its commands are not forwarded and nothing is sent (reason 'idle'; the "
        'robot keeps the pose it was reset to and the policy node pauses). When an episode '
        'starts, the policy re-plans from the state the reset left, and nothing is sent '
        "until its first new command (not the last episode's last command). A human may "
        'drive at any time. Needs the episode recorder.')

    def __post_init__(self) -> None:
        validate_params(self)
        lower, upper = self.position_lower, self.position_upper
        if lower and upper:
            if len(lower) != len(upper):
                raise ValueError(f'parameters position_lower and position_upper have '
                                 f'{len(lower)} and {len(upper)} values; give one per joint')
            bad = [i for i, (lo, hi) in enumerate(zip(lower, upper, strict=True)) if lo > hi]
            if bad:
                raise ValueError(f'parameter position_lower is above position_upper for '
                                 f'joint(s) {bad}')
        if any(v <= 0.0 for v in self.max_velocity_rad_s):
            raise ValueError(f'parameter max_velocity_rad_s must be positive, got '
                             f'{list(self.max_velocity_rad_s)}; leave it empty for no limit')


@dataclass(frozen=True)
class ArbiterOutput:
    """The result of one control tick.

    command: joint targets after position and velocity limits (None before any joint state).
    source: the executed source (POLICY, HUMAN or HOLD).
    controller: who is in control by arbitration (POLICY or HUMAN); differs from `source`
        while holding.
    segment_id: starts at 0 and increments at every switch of `source`.
    reason: why `source` is executed: 'start' (the policy drives from the start), 'engage',
        'deviation' (automatic takeover), 'handback', 'watchdog' (the controlling source's
        command or the joint state is missing or stale), 'rejected' (the controlling
        source's last command was refused: NaN, length, limits, joints), 'estop', 'idle'
        (the policy has control but no episode runs, with hold_between_episodes; no command
        is sent).
    switched: True when `source` differs from the previous tick's.
    reseed_policy: True on the first tick after a handback to the policy (and after an
        e-stop reset while the policy is in control): the policy node should drop its queued
        actions and re-plan from the current state.
    ramping: True while the command is a handback blend of the last human command and the
        policy command.
    policy_version: the version of the policy's newest command: on a policy step, of the
        executed command; on a human or hold step, of the policy the human corrected (or
        that stopped); '' before any policy command.
    """

    command: np.ndarray | None
    source: Controller
    controller: Controller
    segment_id: int
    reason: str
    switched: bool
    reseed_policy: bool
    ramping: bool
    policy_version: str = ''

    @property
    def human_active(self) -> bool:
        """Whether the human's command is executed (InterventionState.active)."""
        return self.source == Controller.HUMAN


class TeleopArbiter:
    """Arbitrate between policy and teleop commands with limits, watchdog and e-stop.

    Feed it with the on_* methods as messages arrive and call tick(now) once per control
    period. The joint count is fixed by the first joint state; commands of another length
    raise ValueError (and are not stored), so the adapter can log them and carry on.
    """

    def __init__(self, params: ArbiterParams) -> None:
        validate_params(params)
        self.params = params
        self._measured: np.ndarray | None = None
        self._state_time: float | None = None
        self._policy: np.ndarray | None = None
        self._policy_time: float | None = None
        self._policy_version = ''
        self._teleop: np.ndarray | None = None
        self._teleop_time: float | None = None
        self._lower: np.ndarray | None = None
        self._upper: np.ndarray | None = None
        self._max_step: np.ndarray | None = None
        self._last_command: np.ndarray | None = None
        self._controller = Controller.POLICY
        self._control_reason = 'start'
        # Start disarmed: a leader resting away from the follower at start-up must not
        # grab control; it arms once the leader has come close (see takeover_rearm_ratio).
        self._takeover_armed = False
        # The pedal is taken as released until told otherwise, so a stream of False from a
        # released pedal is not an edge (see on_engage).
        self._engage_level = False
        self._ramp_start_time: float | None = None
        self._ramp_from: np.ndarray | None = None
        self._reseed_pending = False
        self._estopped = False
        self._estop_target: np.ndarray | None = None
        self._idle = params.hold_between_episodes  # until the first episode starts
        self._silent_hold = False
        self._source = Controller.HOLD
        self._segment_id = 0
        # Sources whose last command was refused (held until a good one arrives).
        self._rejected: set[Controller] = set()

    # Inputs -------------------------------------------------------------------------------

    @property
    def joint_count(self) -> int | None:
        """Number of joints, fixed by the first joint state (None before it)."""
        return None if self._measured is None else self._measured.size

    @property
    def controller(self) -> Controller:
        """Who is in control by arbitration: Controller.POLICY or Controller.HUMAN."""
        return self._controller

    @property
    def estopped(self) -> bool:
        """Whether the e-stop is latched."""
        return self._estopped

    def on_joint_state(self, positions: Sequence[float], now: float) -> None:
        """Record the follower's measured joint positions received at time `now` (s)."""
        positions = self._as_vector(positions, 'joint state')
        if self._measured is None:
            self._configure_limits(positions.size)
            # Commands that came before the first state could not be checked; drop any
            # whose length does not match the robot.
            if self._policy is not None and self._policy.size != positions.size:
                self._policy = self._policy_time = None
            if self._teleop is not None and self._teleop.size != positions.size:
                self._teleop = self._teleop_time = None
        self._measured = positions
        self._state_time = now

    def on_policy_command(self, positions: Sequence[float], now: float,
                          policy_version: str = '') -> None:
        """Record the policy's per-tick joint command received at time `now` (s).

        `policy_version` names the weights that produced it (PolicyVersion text); every
        executed step carries it on (ArbiterOutput.policy_version). A bad command (see
        _checked) raises ValueError and is never executed: the policy's previous one is
        dropped too, so while the policy drives the arbiter holds (reason 'rejected') until
        a good command comes.
        """
        self._policy = self._accepted(Controller.POLICY, positions, 'policy command')
        self._policy_time = now
        self._policy_version = policy_version

    def on_teleop_command(self, positions: Sequence[float], now: float) -> None:
        """Record the teleop (leader arm) joint positions received at time `now` (s).

        A bad command raises ValueError and holds the human's side as on_policy_command does.
        """
        self._teleop = self._accepted(Controller.HUMAN, positions, 'teleop command')
        self._teleop_time = now

    def reject(self, source: Controller) -> None:
        """Hold `source`'s side: its command was refused.

        The core calls it for what it refuses itself; the adapter for checks only it can
        make (wrong or unknown joint names).
        """
        if source == Controller.POLICY:
            self._policy = self._policy_time = None
        else:
            self._teleop = self._teleop_time = None
        self._rejected.add(source)

    def _accepted(self, source: Controller, positions: Sequence[float],
                  what: str) -> np.ndarray:
        # The checked command of `source`; a refused one holds that side and raises.
        try:
            vector = self._checked(positions, what)
        except ValueError:
            self.reject(source)
            raise
        self._rejected.discard(source)
        return vector

    def on_engage(self, engaged: bool, now: float) -> bool:
        """Handle the engage pedal/button: True takes over, False hands back.

        Only changes of the value act, so a pedal that publishes its state at a fixed rate
        works as well as one that publishes on change, and a released pedal's stream of
        False does not hand back an automatic (deviation) takeover; after one, press and
        release the pedal (or call hand_back) to give control back. Returns whether control
        changed.
        """
        engaged = bool(engaged)
        if engaged == self._engage_level:
            return False
        self._engage_level = engaged
        return self.take_over(now) if engaged else self.hand_back(now)

    def take_over(self, now: float, reason: str = 'engage') -> bool:
        """Give control to the human now; returns whether control changed.

        With engage_requires_teleop, a takeover is refused (returns False) while the teleop
        command is missing or stale.
        """
        if self._controller == Controller.HUMAN:
            return False
        if self.params.engage_requires_teleop and not self._teleop_fresh(now):
            return False
        self._controller = Controller.HUMAN
        self._control_reason = reason
        # Stays disarmed through the handback until the leader is back near the follower:
        # the leader may rest where the human let go (beyond a limit the follower could not
        # reach), and arming at once would undo the handback with an automatic takeover.
        self._takeover_armed = False
        self._ramp_start_time = self._ramp_from = None
        self._reseed_pending = False
        return True

    def hand_back(self, now: float) -> bool:
        """Give control back to the policy, ramped from the last command sent.

        Returns whether control changed (False when the policy already has it).
        """
        if self._controller != Controller.HUMAN:
            return False
        self._controller = Controller.POLICY
        self._control_reason = 'handback'
        self._reseed_pending = True
        start = self._last_command if self._last_command is not None else self._measured
        if self.params.handback_ramp_s > 0.0 and start is not None:
            self._ramp_start_time = now
            self._ramp_from = start.copy()
        return True

    def estop(self) -> None:
        """Latch the e-stop: hold the position measured now until reset_estop()."""
        if self._estopped:
            return
        self._estopped = True
        self._estop_target = None if self._measured is None else self._measured.copy()

    def reset_estop(self) -> None:
        """Release the e-stop; the source in control resumes once its command is fresh."""
        if not self._estopped:
            return
        self._estopped = False
        self._estop_target = None
        # While the robot stood still the policy's queue went on; it must re-plan.
        if self._controller == Controller.POLICY:
            self._reseed_pending = True

    def reset_segment_id(self) -> None:
        """Restart segment_id at 0 (at the start of an episode); control is unchanged."""
        self._segment_id = 0

    def on_episode(self, running: bool) -> None:
        """Note an episode's start (True) or end (False); see hold_between_episodes."""
        if not self.params.hold_between_episodes:
            return
        if running and self._idle:
            # A fresh start: neither the policy's last command (planned before the reset)
            # nor the last episode's last command may move the robot now.
            self._policy = self._policy_time = None
            self._last_command = None
            self._ramp_start_time = self._ramp_from = None
            # Until the policy's first command, send nothing: the robot keeps the pose it was
            # reset to (a hold at the measured pose could still be at the pose before it).
            self._silent_hold = True
            if self._controller == Controller.POLICY:
                self._reseed_pending = True
        self._idle = not running

    # Tick ---------------------------------------------------------------------------------

    def tick(self, now: float) -> ArbiterOutput:
        """Choose the executed source at time `now` (s) and return the limited command."""
        reseed = self._reseed_pending
        self._reseed_pending = False
        ramping = False
        if self._measured is None:
            source, reason, command = Controller.HOLD, 'watchdog', None
        elif self._estopped:
            if self._estop_target is None:  # fired before any joint state
                self._estop_target = self._measured.copy()
            source, reason = Controller.HOLD, 'estop'
            # No velocity limit here: the measured position is where the robot already is,
            # so jumping the command back to it stops the arm instead of letting it run on
            # toward the last command at the velocity limit.
            command = self._clip(self._estop_target)
        elif self._idle and self._controller == Controller.POLICY:
            source, reason, command = Controller.HOLD, 'idle', None
        else:
            self._check_deviation(now)
            target = self._fresh_target(now)
            if target is None:
                rejected = self._controller in self._rejected
                source, reason = Controller.HOLD, 'rejected' if rejected else 'watchdog'
                if not self._silent_hold:
                    target = (self._last_command if self._last_command is not None
                              else self._measured)
            else:
                self._silent_hold = False
                source, reason = self._controller, self._control_reason
                if source == Controller.POLICY:
                    target, ramping = self._ramp(target, now)
            command = None if target is None else self._limit(target)
        if command is not None:
            self._last_command = command
        switched = source != self._source
        if switched:
            self._segment_id += 1
            self._source = source
        return ArbiterOutput(
            command=None if command is None else command.copy(), source=source,
            controller=self._controller, segment_id=self._segment_id, reason=reason,
            switched=switched, reseed_policy=reseed, ramping=ramping,
            policy_version=self._policy_version)

    # Helpers ------------------------------------------------------------------------------

    def _as_vector(self, positions: Sequence[float], what: str) -> np.ndarray:
        vector = np.array(positions, dtype=np.float64).reshape(-1)
        if self._measured is not None and vector.size != self._measured.size:
            raise ValueError(f'{what} has {vector.size} positions, the joint state has '
                             f'{self._measured.size}; ignored')
        if not np.all(np.isfinite(vector)):
            raise ValueError(f'{what} contains NaN or infinite values; ignored')
        return vector

    def _checked(self, positions: Sequence[float], what: str) -> np.ndarray:
        """Return a command as a vector; ValueError when it must never reach the robot.

        Refused: another length than the joint state, NaN or infinite values, and a
        position beyond a limit by more than limit_margin_rad.
        """
        vector = self._as_vector(positions, what)
        margin = self.params.limit_margin_rad
        for bound, side in ((self._lower, 'below'), (self._upper, 'above')):
            if bound is None:
                continue
            beyond = vector < bound - margin if side == 'below' else vector > bound + margin
            if np.any(beyond):
                joints = np.flatnonzero(beyond).tolist()
                raise ValueError(
                    f'{what} is {side} the position limits by more than limit_margin_rad '
                    f'({margin}) at joint(s) {joints}: {vector[joints].round(3).tolist()} vs '
                    f'{bound[joints].round(3).tolist()}; ignored, holding')
        return vector

    def _configure_limits(self, n: int) -> None:
        p = self.params

        def per_joint(values: list[float], name: str, allow_one: bool) -> np.ndarray | None:
            if not values:
                return None
            if allow_one and len(values) == 1:
                return np.full(n, float(values[0]))
            if len(values) != n:
                one = 'one value or ' if allow_one else ''
                raise ValueError(f'parameter {name} has {len(values)} values for {n} joints; '
                                 f'give {one}one per joint, or leave it empty')
            return np.array(values, dtype=np.float64)

        self._lower = per_joint(p.position_lower, 'position_lower', False)
        self._upper = per_joint(p.position_upper, 'position_upper', False)
        velocity = per_joint(p.max_velocity_rad_s, 'max_velocity_rad_s', True)
        self._max_step = None if velocity is None else velocity * p.control_period_s

    def _fresh(self, stamp: float | None, limit: float, now: float) -> bool:
        return stamp is not None and now - stamp <= limit

    def _teleop_fresh(self, now: float) -> bool:
        return (self._teleop is not None
                and self._fresh(self._teleop_time, self.params.teleop_stale_after_s, now))

    def _fresh_target(self, now: float) -> np.ndarray | None:
        """Return the controlling source's command, or None when it or the state is stale."""
        p = self.params
        if not self._fresh(self._state_time, p.joint_state_stale_after_s, now):
            return None
        if self._controller == Controller.HUMAN:
            return self._teleop if self._teleop_fresh(now) else None
        if self._policy is None or not self._fresh(self._policy_time, p.policy_stale_after_s,
                                                   now):
            return None
        return self._policy

    def _check_deviation(self, now: float) -> None:
        threshold = self.params.takeover_deviation_rad
        if (threshold <= 0.0 or self._controller == Controller.HUMAN
                or not self._teleop_fresh(now)
                or not self._fresh(self._state_time, self.params.joint_state_stale_after_s,
                                   now)):
            return
        deviation = float(np.max(np.abs(self._teleop - self._measured)))
        if self._takeover_armed and deviation > threshold:
            self.take_over(now, reason='deviation')
        elif deviation <= self.params.takeover_rearm_ratio * threshold:
            self._takeover_armed = True

    def _ramp(self, policy: np.ndarray, now: float) -> tuple[np.ndarray, bool]:
        if self._ramp_start_time is None:
            return policy, False
        alpha = (now - self._ramp_start_time) / self.params.handback_ramp_s
        if alpha >= 1.0:
            self._ramp_start_time = self._ramp_from = None
            return policy, False
        alpha = max(alpha, 0.0)
        return (1.0 - alpha) * self._ramp_from + alpha * policy, True

    def _clip(self, target: np.ndarray) -> np.ndarray:
        if self._lower is None and self._upper is None:
            return target.copy()
        return np.clip(target, self._lower, self._upper)

    def _limit(self, target: np.ndarray) -> np.ndarray:
        """Clip to the position limits and bound the step from the previous command."""
        command = self._clip(target)
        if self._max_step is not None:
            previous = (self._last_command if self._last_command is not None
                        else self._measured)
            command = previous + np.clip(command - previous, -self._max_step, self._max_step)
            # Position limits win: the previous command can only lie outside them when it
            # was the measured start position.
            command = self._clip(command)
        return command
