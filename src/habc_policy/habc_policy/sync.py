"""Observation synchronizer (no rclpy): one observation per camera frame set.

Cameras (15-60 Hz) and joint states (100-1000 Hz) arrive on separate topics, each with its
own stamps and latency. The synchronizer groups the N cameras' frames into frame sets (one
frame per camera, stamps within `max_image_skew_s`) and pairs each set with the joint state
linearly interpolated at the set's stamp, so the policy sees the arm where it was when the
pictures were taken, not where it is when they arrive.

Stamp of a frame set: the mean of its image stamps. Any choice is within the skew of every
camera; the mean halves the worst-case distance to a camera's exposure time, which bounds
the joint error of the pairing (skew/2 times the joint speed).

Joint state at stamp t (from a buffer of the last `joint_buffer_s` of joint states):
  - joint states at t0 <= t <= t1, both within slop_s of t: linear interpolation;
  - otherwise the nearest joint state if it is within slop_s of t (t just outside the
    coverage, or a hole in the joint stream on one side of t);
  - t after the newest joint state by more than slop_s: the set waits, since the joint
    states of that instant may still be on their way; it is resolved by a later joint
    state, or dropped (dropped_no_joint_state) once it is late (now - t > late_after_s);
  - t before the buffer, or in a hole wider than slop_s on both sides: dropped at once
    (dropped_no_joint_state), since waiting cannot help.

Drops are counted per reason in `counters` (frames or frame sets as noted):
  emitted                 frame sets returned as observations;
  dropped_late            frame sets complete only after late_after_s past their stamp;
  dropped_no_joint_state  frame sets with no joint state within slop (see above);
  dropped_unmatched       frames with no partner within max_image_skew_s on every camera
                          (superseded by a newer frame, or expired waiting for partners);
  dropped_out_of_order    frames not newer than their camera's previous frame or than the
                          last emitted observation.

Usage in a node: call add_joint_state / add_image from the callbacks, then pop_ready(now)
and publish what it returns. All times are seconds; `now` is passed in by the caller (the
node's clock), nothing here reads a clock. Not thread-safe: call it from one callback group.
"""

import bisect
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
import math
from typing import Any

import numpy as np

from habc_common.params import param, validate_params

# Stamps come from integer nanoseconds: one nanosecond of slack keeps comparisons such as
# 1.01 - 1.00 <= 0.01 from failing on float rounding.
_EPS = 1e-9


@dataclass(frozen=True)
class SyncParams:
    """Parameters of sync_node."""

    num_cameras: int = param(1, 'Number of cameras in one frame set.', min=1, max=16)
    slop_s: float = param(
        0.02, 'Max distance (s) between a frame-set stamp and the joint states used for it, '
        'for interpolation and for the nearest state outside the joint coverage.',
        min=0.0, max=1.0)
    max_image_skew_s: float = param(
        0.01, 'Max spread (s) of the image stamps of one frame set across the cameras; keep '
        'it below half a camera period.', min=0.0, max=1.0)
    joint_buffer_s: float = param(
        1.0, 'Joint state history kept for interpolation (s); at least late_after_s + '
        'slop_s.', min=0.001, max=60.0)
    late_after_s: float = param(
        0.2, 'A frame set is dropped when it completes (or still waits for joint states) more '
        'than this long after its stamp (s).', min=0.001, max=10.0)

    def __post_init__(self) -> None:
        validate_params(self)
        # An on-time frame set may be this old; its joint states must still be buffered.
        if self.joint_buffer_s < self.late_after_s + self.slop_s:
            raise ValueError(f'parameter joint_buffer_s ({self.joint_buffer_s}) must be at '
                             f'least late_after_s + slop_s ({self.late_after_s} + '
                             f'{self.slop_s}); raise joint_buffer_s')


@dataclass(frozen=True)
class Observation:
    """One synchronized observation: a camera frame set and the joint state at its stamp.

    images and image_stamps are indexed by camera; positions (and velocities, None when the
    joint states carry none) follow joint_names, the order of the first joint state.
    joint_match is 'interpolated' or 'nearest'.
    """

    stamp: float
    images: list[Any]
    image_stamps: list[float]
    joint_names: list[str]
    positions: np.ndarray
    velocities: np.ndarray | None
    joint_match: str


@dataclass(frozen=True)
class _Frame:
    stamp: float
    image: Any


@dataclass(frozen=True)
class _FrameSet:
    stamp: float
    frames: list[_Frame]


# Results of a joint-state lookup besides a match.
_WAIT = 'wait'
_NONE = 'none'


class ObservationSynchronizer:
    """Pair camera frame sets with interpolated joint states (see the module docstring)."""

    def __init__(self, params: SyncParams) -> None:
        validate_params(params)
        self.params = params
        self.counters: dict[str, int] = {
            'emitted': 0, 'dropped_late': 0, 'dropped_unmatched': 0,
            'dropped_no_joint_state': 0, 'dropped_out_of_order': 0}
        self.frames_received = 0
        self._joint_names: list[str] | None = None
        self._joint_index: dict[str, int] = {}
        self._joint_stamps: list[float] = []
        self._joint_positions: list[np.ndarray] = []
        self._joint_velocities: list[np.ndarray | None] = []
        self._pending: list[deque[_Frame]] = [deque() for _ in range(params.num_cameras)]
        self._last_camera_stamp: list[float | None] = [None] * params.num_cameras
        self._waiting: deque[_FrameSet] = deque()
        self._last_emitted: float | None = None

    @property
    def joint_names(self) -> list[str] | None:
        """Joint order of every observation: that of the first joint state (None before)."""
        return None if self._joint_names is None else list(self._joint_names)

    def add_joint_state(self, stamp: float, names: Sequence[str], positions: Sequence[float],
                        velocities: Sequence[float] | None = None) -> None:
        """Buffer a joint state stamped `stamp` (s); empty velocities count as none.

        The first joint state fixes the joint order. Later states may list the same joints in
        another order (they are reordered); other joint names raise ValueError.
        """
        names = list(names)
        pos = np.asarray(positions, dtype=np.float64)
        if pos.shape != (len(names),):
            raise ValueError(f'joint state at {stamp}: {len(names)} names but '
                             f'{pos.size} positions')
        if not np.all(np.isfinite(pos)):
            raise ValueError(f'joint state at {stamp}: NaN or infinite positions')
        if not math.isfinite(float(stamp)):
            raise ValueError(f'joint state stamp {stamp} is not finite')
        vel = None
        if velocities is not None and len(velocities) > 0:
            vel = np.asarray(velocities, dtype=np.float64)
            if vel.shape != (len(names),):
                raise ValueError(f'joint state at {stamp}: {len(names)} names but '
                                 f'{vel.size} velocities')
        if self._joint_names is None:
            if len(set(names)) != len(names):
                raise ValueError(f'joint state at {stamp}: duplicate joint names {names}')
            self._joint_names = names
            self._joint_index = {name: i for i, name in enumerate(names)}
        elif names != self._joint_names:
            if sorted(names) != sorted(self._joint_names):
                raise ValueError(
                    f'joint state at {stamp} has joints {names}, but the first joint state '
                    f'had {self._joint_names}; observations keep one joint set, so merge the '
                    'joint state publishers (or remap the topic) and restart the node')
            order = [names.index(name) for name in self._joint_names]
            pos = pos[order]
            vel = None if vel is None else vel[order]
        self._insert_joint_state(float(stamp), pos, vel)

    def add_image(self, camera_index: int, stamp: float, image: Any, now: float) -> None:
        """Add camera `camera_index`'s frame stamped `stamp` (s), received at `now` (s).

        `image` is passed through untouched (a numpy array in the node). Complete frame sets
        are held until pop_ready resolves their joint state.
        """
        if not 0 <= camera_index < self.params.num_cameras:
            raise ValueError(f'camera index {camera_index} out of range: num_cameras is '
                             f'{self.params.num_cameras}')
        self.frames_received += 1
        stamp = float(stamp)
        last = self._last_camera_stamp[camera_index]
        if ((last is not None and stamp <= last)
                or (self._last_emitted is not None and stamp <= self._last_emitted)):
            self.counters['dropped_out_of_order'] += 1
            return
        self._last_camera_stamp[camera_index] = stamp
        self._pending[camera_index].append(_Frame(stamp, image))
        self._match_frames(now)
        self._expire_frames(now)

    def pop_ready(self, now: float) -> list[Observation]:
        """Return the observations whose joint state is resolved, oldest first.

        Also drops frame sets that waited for joint states past late_after_s, and frames that
        waited for their partners so long that any set with them would be late.
        """
        self._expire_frames(now)
        ready = []
        while self._waiting:
            frame_set = self._waiting[0]
            match = self._joint_state_at(frame_set.stamp)
            if match == _WAIT:
                if now - frame_set.stamp <= self.params.late_after_s + _EPS:
                    break  # later sets have later stamps and wait too
                self._waiting.popleft()
                self.counters['dropped_no_joint_state'] += 1
                continue
            self._waiting.popleft()
            if match == _NONE:
                self.counters['dropped_no_joint_state'] += 1
                continue
            positions, velocities, how = match
            ready.append(Observation(
                stamp=frame_set.stamp, images=[f.image for f in frame_set.frames],
                image_stamps=[f.stamp for f in frame_set.frames],
                joint_names=list(self._joint_names), positions=positions,
                velocities=velocities, joint_match=how))
            self.counters['emitted'] += 1
            self._last_emitted = frame_set.stamp
        return ready

    def diagnostics(self) -> dict[str, Any]:
        """Return the counters plus buffer sizes and drop ratios (0.0 before any input)."""
        c = self.counters
        sets = c['emitted'] + c['dropped_late'] + c['dropped_no_joint_state']
        frames_dropped = c['dropped_unmatched'] + c['dropped_out_of_order']
        coverage = (self._joint_stamps[-1] - self._joint_stamps[0]
                    if self._joint_stamps else 0.0)
        return {
            **c,
            'frames_received': self.frames_received,
            'pending_frames': sum(len(q) for q in self._pending),
            'waiting_sets': len(self._waiting),
            'joint_states_buffered': len(self._joint_stamps),
            'joint_coverage_s': coverage,
            'set_drop_ratio': (sets - c['emitted']) / sets if sets else 0.0,
            'frame_drop_ratio': (frames_dropped / self.frames_received
                                 if self.frames_received else 0.0),
            'last_emitted_stamp': self._last_emitted,
        }

    def _insert_joint_state(self, stamp: float, pos: np.ndarray,
                            vel: np.ndarray | None) -> None:
        stamps = self._joint_stamps
        if not stamps or stamp > stamps[-1]:
            i = len(stamps)
        else:
            # Several publishers or a reordering transport: keep the buffer sorted.
            i = bisect.bisect_left(stamps, stamp)
            if stamps[i] == stamp:
                self._joint_positions[i] = pos
                self._joint_velocities[i] = vel
                return
        stamps.insert(i, stamp)
        self._joint_positions.insert(i, pos)
        self._joint_velocities.insert(i, vel)
        # Keep one state at or before the horizon so a stamp right at it still interpolates.
        horizon = stamps[-1] - self.params.joint_buffer_s
        cut = bisect.bisect_right(stamps, horizon) - 1
        if cut > 0:
            del stamps[:cut], self._joint_positions[:cut], self._joint_velocities[:cut]

    def _joint_state_at(self, t: float) -> tuple[np.ndarray, np.ndarray | None, str] | str:
        stamps = self._joint_stamps
        slop = self.params.slop_s + _EPS
        if not stamps or t - stamps[-1] > slop:
            return _WAIT
        if t >= stamps[-1]:
            return self._nearest(len(stamps) - 1)
        if t <= stamps[0]:
            return self._nearest(0) if stamps[0] - t <= slop else _NONE
        i1 = bisect.bisect_left(stamps, t)
        i0 = i1 - 1
        t0, t1 = stamps[i0], stamps[i1]
        if t - t0 <= slop and t1 - t <= slop:
            alpha = (t - t0) / (t1 - t0)
            p0, p1 = self._joint_positions[i0], self._joint_positions[i1]
            v0, v1 = self._joint_velocities[i0], self._joint_velocities[i1]
            vel = None if v0 is None or v1 is None else v0 + alpha * (v1 - v0)
            return p0 + alpha * (p1 - p0), vel, 'interpolated'
        # A hole in the joint stream: interpolating across it would invent a trajectory.
        nearest = i0 if t - t0 <= t1 - t else i1
        return self._nearest(nearest) if abs(stamps[nearest] - t) <= slop else _NONE

    def _nearest(self, i: int) -> tuple[np.ndarray, np.ndarray | None, str]:
        vel = self._joint_velocities[i]
        return (self._joint_positions[i].copy(), None if vel is None else vel.copy(),
                'nearest')

    def _match_frames(self, now: float) -> None:
        # Frames of one camera arrive in stamp order, so the oldest head can only match the
        # other cameras' heads: if it is too far from the newest head it never will.
        skew = self.params.max_image_skew_s + _EPS
        while all(self._pending):
            heads = [queue[0].stamp for queue in self._pending]
            oldest, newest = min(heads), max(heads)
            if newest - oldest > skew:
                self._pending[heads.index(oldest)].popleft()
                self.counters['dropped_unmatched'] += 1
                continue
            frames = [queue.popleft() for queue in self._pending]
            stamp = float(np.mean(heads))
            if now - stamp > self.params.late_after_s + _EPS:
                self.counters['dropped_late'] += 1
                continue
            self._waiting.append(_FrameSet(stamp, frames))

    def _expire_frames(self, now: float) -> None:
        # A set containing this frame would have a stamp at most the skew later, so it
        # would be late on completion: stop waiting for the other cameras.
        limit = self.params.late_after_s + self.params.max_image_skew_s + _EPS
        for queue in self._pending:
            while queue and now - queue[0].stamp > limit:
                queue.popleft()
                self.counters['dropped_unmatched'] += 1
