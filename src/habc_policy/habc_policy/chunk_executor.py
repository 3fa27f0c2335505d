"""Action-chunk executor (no rclpy): turn policy chunks into one action per control tick.

The policy predicts a chunk of H actions from one observation; inference takes longer than
a control period, so chunks arrive late and overlap. Every action carries a due time:

    due(i) = start_time + i * dt,  start_time = observation stamp + control_period_s

i.e. the chunk's first action is the one for the tick after the observation (the policy was
trained on (observation at t, actions from t + dt) pairs). When a chunk arrives, its actions
for ticks that have passed are never executed (latency compensation, `stale_dropped`).

Modes:
  receding  only the first `execute_steps` (k) actions of each chunk are queued. A new chunk
            replaces the queued remainder of the previous one from its own first due time
            on, so a chunk computed while the previous one is executing takes over at once
            and the robot never waits. At tick `now` the executor returns the newest queued
            action due at or before `now` (older ones are stale), or the next one if it is
            due within stale_after_s (the chunk's time grid and the timer are not in phase);
            a due action older than now - stale_after_s is stale.
  ensemble  ACT's temporal ensembling: for tick `now`, every chunk that covers it (all H
            steps) contributes its action for the step nearest to `now`; the average uses
            weights w_i = exp(-m * i) with i = 0 for the oldest chunk (ACT's convention, so
            with m > 0 older predictions weigh more), normalised to sum to 1.
Inference timing: needs_inference(now) is true when fewer than min_remaining_steps actions lie
ahead, or fewer than the measured delay plus latency_margin_steps (latency_trigger). A policy
executes each chunk for several steps when the next chunk lands in time, rather than
replanning on every tick from ever older observations (measured with
tools/probe_loop_latency.py on 30 tuning states: a two-camera VLA that succeeded on 26 when
synchronous succeeded on 1 at an 80 ms delay when each chunk ran 4 actions, on 23 when each
ran about 10).

When nothing is due the tick returns None; once actions have been executed (since start or
the last clear) such a tick counts as an underrun, and the arbiter holds.

Policy versions (hot swap): every chunk comes from one model call and carries that model's
version, so a chunk never mixes versions; every returned action carries its version and
`current_version` is that of the last action returned. The node loads new weights between
two inferences and then calls `stage_version(new)`: from that chunk boundary on, only chunks
of `new` are accepted, so an inference still running on the old weights cannot bring the old
version back after the swap. In receding mode the new version takes over at its first
chunk's due time; in ensemble mode chunks of different versions are never averaged: only the
version of the newest chunk covering a tick is used.

Handback: when the arbiter asks to reseed the policy (ArbiterOutput.reseed_policy), the node
calls `clear(now)`: the queue is dropped, and chunks computed from observations stamped
before `now` (start_time - control_period_s < now) are rejected, since they plan from the
state before the human moved the arm.

The node calls add_chunk from its inference thread and next_action from the control timer;
an internal lock makes each call atomic. All times are seconds passed in by the caller.
"""

from collections import deque
from dataclasses import dataclass
import math
import threading
from typing import Any

import numpy as np

from habc_common.params import param, validate_params
from habc_episodes.vocabulary import PolicyVersion

# Due times are sums of float periods: one nanosecond of slack keeps a tick at exactly the
# due time (1.0 + 3 * 0.02 vs 1.06) from counting as early or late.
_EPS = 1e-9
# Relative tolerance between a chunk's dt and the control period.
_DT_TOLERANCE = 0.01


@dataclass(frozen=True)
class ChunkExecutorParams:
    """Parameters of the chunk executor in policy_node."""

    control_period_s: float = param(
        0.02, 'Control tick period (s); one action per tick, so chunks must have this dt.',
        min=1e-4, max=1.0)
    execute_steps: int = param(
        10, 'Receding horizon: how many of the H actions of each chunk are executed (k).',
        min=1, max=10000)
    mode: str = param(
        'receding', "'receding' (first k actions, a new chunk replaces the rest) or "
        "'ensemble' (ACT temporal ensembling over all chunks covering a tick).",
        choices=('receding', 'ensemble'))
    ensemble_decay: float = param(
        0.01, "ACT's m in w_i = exp(-m * i), i = 0 for the oldest chunk.", min=0.0, max=100.0)
    stale_after_s: float = param(
        0.015, 'An action may run this much before or after its due time (s); older ones are '
        'dropped as stale. At least half the control period (the chunk grid and the timer '
        'are not in phase); the default adds a quarter period for timer jitter.',
        min=0.0, max=10.0)
    min_remaining_steps: int = param(
        5, 'needs_inference() is true when fewer actions than this remain ahead of now: '
        'about the inference latency in ticks, plus one. In ensemble mode use at least the '
        'horizon H to query continuously, as ACT does.', min=1, max=10000)
    latency_trigger: bool = param(
        True, 'Receding mode: start the next inference early enough for the measured delay, '
        'i.e. when fewer than delay + latency_margin_steps actions remain, if that is more than '
        'min_remaining_steps. The delay of a chunk is how many of its actions were already '
        'past due when it started executing (the robot consumed them during inference); the '
        'estimate is the 75th percentile over the last latency_window chunks, leaving out the '
        'first chunk after a start or clear (cold-start latency).')
    latency_margin_steps: int = param(
        2, 'Latency-aware trigger: actions kept in reserve beyond the measured delay.',
        min=0, max=10000)
    latency_window: int = param(
        20, 'Latency-aware trigger: chunks the delay estimate looks back over.',
        min=1, max=10000)

    def __post_init__(self) -> None:
        validate_params(self)
        if self.stale_after_s < self.control_period_s / 2:
            raise ValueError(f'parameter stale_after_s ({self.stale_after_s}) must be at '
                             f'least half of control_period_s ({self.control_period_s}), '
                             'otherwise actions off the timer phase are all dropped')


@dataclass(frozen=True)
class ScheduledAction:
    """One action for one tick.

    action: the (D,) action; due_time: its due time (s), in ensemble mode that of the newest
    contributing chunk's step; version and chunk_id: the chunk it comes from (the newest
    contributor in ensemble mode); index: its step in that chunk; sources: the chunk ids
    averaged into it (one in receding mode), oldest first.
    """

    action: np.ndarray
    due_time: float
    version: PolicyVersion
    chunk_id: int
    index: int
    sources: tuple[int, ...]


class _Chunk:
    """A chunk kept for ensembling, with the last step used (to count skipped ones)."""

    def __init__(self, actions: np.ndarray, start_time: float, dt: float, version: PolicyVersion,
                 chunk_id: int) -> None:
        self.actions = actions
        self.start_time = start_time
        self.dt = dt
        self.version = version
        self.chunk_id = chunk_id
        self.last_used = -1

    def due(self, i: int) -> float:
        return self.start_time + i * self.dt


class ChunkExecutor:
    """Schedule action chunks onto control ticks (see the module docstring)."""

    def __init__(self, params: ChunkExecutorParams) -> None:
        validate_params(params)
        self.params = params
        self.counters: dict[str, int] = {
            'chunks_accepted': 0, 'rejected_out_of_order': 0, 'rejected_version': 0,
            'rejected_before_clear': 0, 'executed': 0, 'stale_dropped': 0, 'replaced': 0,
            'underruns': 0}
        self.current_version: PolicyVersion | None = None
        self._lock = threading.Lock()
        self._queue: list[ScheduledAction] = []  # receding: due times ascending
        self._chunks: list[_Chunk] = []  # ensemble: oldest first
        self._action_dim: int | None = None
        self._last_chunk_id: int | None = None
        self._staged_version: PolicyVersion | None = None
        self._not_before: float | None = None
        self._running = False
        # Delay samples (actions past due when a chunk started executing), newest last.
        self._delays: deque[int] = deque(maxlen=params.latency_window)
        self._executing_chunk: int | None = None
        # The newest accepted chunk, whole (all H steps): the plan a guided prefix reads.
        self._newest: _Chunk | None = None

    @property
    def staged_version(self) -> PolicyVersion | None:
        """The version that every chunk must carry since the last stage_version call."""
        return self._staged_version

    def add_chunk(self, chunk: Any, start_time: float, dt: float, version: PolicyVersion,
                  chunk_id: int) -> bool:
        """Add an (H, D) chunk whose first action is due at `start_time` (s).

        start_time is the observation stamp plus control_period_s; dt is the step of the
        chunk (equal to control_period_s); chunk_id increases with every inference. Returns
        False when the chunk is rejected and counted (an id not above the previous one, a
        version other than the staged one, an observation from before the last clear).
        Raises ValueError for a malformed chunk (shape, dt, NaN or infinite actions).
        """
        actions = np.array(chunk, dtype=np.float64)  # a copy: the caller may reuse its buffer
        if actions.ndim != 2 or actions.shape[0] == 0 or actions.shape[1] == 0:
            raise ValueError(f'chunk {chunk_id}: expected an (H, D) array of actions, got '
                             f'shape {actions.shape}')
        if not np.all(np.isfinite(actions)):
            raise ValueError(f'chunk {chunk_id}: NaN or infinite actions; a broken model must '
                             'not reach the robot')
        if self._action_dim is not None and actions.shape[1] != self._action_dim:
            raise ValueError(f'chunk {chunk_id}: actions have {actions.shape[1]} dimensions, '
                             f'earlier chunks had {self._action_dim}; check the policy output')
        period = self.params.control_period_s
        if not math.isfinite(dt) or abs(dt - period) > _DT_TOLERANCE * period:
            raise ValueError(f'chunk {chunk_id}: step dt={dt} s differs from control_period_s='
                             f'{period} s; the executor runs one action per control tick, '
                             "so run the control timer at the policy's action rate")
        if not isinstance(version, PolicyVersion):
            raise ValueError(f'chunk {chunk_id}: version must be a PolicyVersion, '
                             f'got {version!r}')
        start_time = float(start_time)
        with self._lock:
            if self._last_chunk_id is not None and chunk_id <= self._last_chunk_id:
                self.counters['rejected_out_of_order'] += 1
                return False
            if (self._not_before is not None
                    and start_time - period < self._not_before - _EPS):
                self.counters['rejected_before_clear'] += 1
                return False
            if self._staged_version is not None and version != self._staged_version:
                self.counters['rejected_version'] += 1
                return False
            self._last_chunk_id = chunk_id
            self._action_dim = actions.shape[1]
            self.counters['chunks_accepted'] += 1
            self._newest = _Chunk(actions, start_time, dt, version, chunk_id)
            if self.params.mode == 'ensemble':
                self._chunks.append(self._newest)
                return True
            # The new chunk takes over from its own first slot; earlier queued actions stay,
            # so the robot keeps moving until the new chunk's first due time.
            takeover = start_time - dt / 2
            kept = [a for a in self._queue if a.due_time < takeover]
            self.counters['replaced'] += len(self._queue) - len(kept)
            steps = min(self.params.execute_steps, actions.shape[0])
            self._queue = kept + [
                ScheduledAction(actions[i], start_time + i * dt, version, chunk_id, i,
                                (chunk_id,))
                for i in range(steps)]
            return True

    def next_action(self, now: float) -> ScheduledAction | None:
        """Return the action for the control tick at `now` (s), or None (hold)."""
        with self._lock:
            if self.params.mode == 'ensemble':
                action = self._next_ensemble(now)
            else:
                action = self._next_receding(now)
            if action is None:
                if self._running:
                    self.counters['underruns'] += 1
                return None
            self._running = True
            self.counters['executed'] += 1
            self.current_version = action.version
            return action

    def planned_actions(self, start_time: float, count: int) -> np.ndarray | None:
        """Return the newest chunk's actions due at start_time + i * dt, i < count.

        The whole chunk, not only the executed steps: what the robot will do while the next
        inference runs, then what the newest plan intended after that (a real-time chunking
        prefix). Fewer than `count` rows when the chunk ends earlier; None when nothing is
        planned for start_time (no chunk, cleared, or start_time outside the chunk).
        """
        with self._lock:
            chunk = self._newest
            if chunk is None:
                return None
            first = round((float(start_time) - chunk.start_time) / chunk.dt)
            if first < 0 or first >= chunk.actions.shape[0]:
                return None
            return chunk.actions[first:first + max(0, int(count))].copy()

    def plan_end(self) -> float | None:
        """Due time (s) of the last queued action (receding mode), None when none is queued."""
        with self._lock:
            if self.params.mode == 'ensemble':
                chunk = self._newest if self._chunks else None
                return None if chunk is None else chunk.due(chunk.actions.shape[0] - 1)
            return self._queue[-1].due_time if self._queue else None

    def past_due(self, start_time: float, horizon: int, now: float) -> int:
        """How many of a chunk's `horizon` actions (first due at start_time) are stale at now."""
        # Action i is stale when start_time + i * dt < now - stale_after_s.
        late = now - self.params.stale_after_s - start_time
        if late <= _EPS:
            return 0
        return min(int(horizon), math.ceil(late / self.params.control_period_s - _EPS))

    def remaining_actions(self, now: float) -> int:
        """Count the actions due after `now` (in ensemble mode: of the newest chunk)."""
        with self._lock:
            if self.params.mode == 'ensemble':
                if not self._chunks:
                    return 0
                newest = self._chunks[-1]
                return sum(1 for i in range(newest.actions.shape[0])
                           if newest.due(i) > now + _EPS)
            return sum(1 for a in self._queue if a.due_time > now + _EPS)

    @property
    def delay_steps(self) -> int | None:
        """The delay estimate in control ticks (75th percentile), None before any sample."""
        with self._lock:
            return self._delay_estimate()

    def _delay_estimate(self) -> int | None:
        if not self._delays:
            return None
        ordered = sorted(self._delays)
        return ordered[math.ceil(0.75 * (len(ordered) - 1))]

    def inference_threshold(self) -> int:
        """How few remaining actions start the next inference (see needs_inference)."""
        threshold = self.params.min_remaining_steps
        delay = self.delay_steps
        if self.params.latency_trigger and self.params.mode == 'receding' and delay is not None:
            threshold = max(threshold, delay + self.params.latency_margin_steps)
        return threshold

    def needs_inference(self, now: float) -> bool:
        """Whether the next inference should start: fewer than inference_threshold() remain."""
        return self.remaining_actions(now) < self.inference_threshold()

    def stage_version(self, version: PolicyVersion) -> None:
        """Accept only chunks of `version` from now on (call it right after a weight swap)."""
        if not isinstance(version, PolicyVersion):
            raise ValueError(f'version must be a PolicyVersion, got {version!r}')
        with self._lock:
            self._staged_version = version

    def clear(self, now: float | None = None) -> None:
        """Drop all queued actions and chunks (handback: re-plan from the current state).

        With `now`, chunks computed from observations stamped before `now` are rejected
        afterwards. Ticks with no action after a clear are not underruns until the next
        action has been executed. Counters, the staged version and current_version stay.
        """
        with self._lock:
            self._queue = []
            self._chunks = []
            self._newest = None
            self._running = False
            self._executing_chunk = None
            if now is not None:
                self._not_before = float(now)

    def diagnostics(self) -> dict[str, Any]:
        """Return the counters plus queue state and underrun/stale ratios."""
        with self._lock:
            c = self.counters
            ticks = c['executed'] + c['underruns']
            planned = c['executed'] + c['stale_dropped']
            return {
                **c,
                'mode': self.params.mode,
                'queued_actions': len(self._queue),
                'chunks_kept': len(self._chunks),
                'current_version': _text(self.current_version),
                'staged_version': _text(self._staged_version),
                'underrun_ratio': c['underruns'] / ticks if ticks else 0.0,
                'delay_steps': self._delay_estimate(),
                'stale_ratio': c['stale_dropped'] / planned if planned else 0.0,
            }

    def _next_receding(self, now: float) -> ScheduledAction | None:
        queue = self._queue
        tolerance = self.params.stale_after_s + _EPS
        stale = 0
        # Once a newer action is due, executing an older one would replay the past.
        while len(queue) >= 2 and queue[1].due_time <= now + _EPS:
            queue.pop(0)
            stale += 1
        if queue and queue[0].due_time < now - tolerance:
            queue.pop(0)  # the plan ran out long ago: nothing is due now
            stale += 1
        self.counters['stale_dropped'] += stale
        if not queue or queue[0].due_time > now + tolerance:
            return None
        action = queue.pop(0)
        if action.chunk_id != self._executing_chunk:
            if self._executing_chunk is not None:  # not the first chunk after a start or clear
                self._delays.append(action.index)
            self._executing_chunk = action.chunk_id
        return action

    def _next_ensemble(self, now: float) -> ScheduledAction | None:
        tolerance = self.params.stale_after_s + _EPS
        self._chunks = [c for c in self._chunks
                        if c.due(c.actions.shape[0] - 1) >= now - tolerance]
        covering = []
        for chunk in self._chunks:
            i = math.floor((now - chunk.start_time) / chunk.dt + 0.5)  # the nearest step
            if 0 <= i < chunk.actions.shape[0]:
                covering.append((chunk, i))
        if not covering:
            return None
        version = covering[-1][0].version
        covering = [(chunk, i) for chunk, i in covering if chunk.version == version]
        weights = np.exp(-self.params.ensemble_decay * np.arange(len(covering)))
        predictions = np.stack([chunk.actions[i] for chunk, i in covering])
        action = weights @ predictions / weights.sum()
        for chunk, i in covering:
            if i > chunk.last_used:
                # Steps passed before the chunk arrived (or during a timer stall).
                self.counters['stale_dropped'] += i - chunk.last_used - 1
                chunk.last_used = i
        newest, index = covering[-1]
        return ScheduledAction(action, newest.due(index), version, newest.chunk_id, index,
                               tuple(chunk.chunk_id for chunk, _ in covering))


def _text(version: PolicyVersion | None) -> str | None:
    return None if version is None else str(version)
