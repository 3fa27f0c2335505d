"""Episode data model and windowing into training samples (no rollout, no rclpy).

An episode is a sequence of control steps t = 0..T-1. Per step: the observation (arrays keyed
by name, or a reference into a bag), the executed action a_t, the controller whose command
was executed (policy / human / hold), the policy version and the timestamp. Per episode: the
outcome (success / failure / unlabelled / discarded), the instruction and the kind (a
demonstration for SFT or a rollout of the policy).

A training sample (a "window") is anchored at step t: the observation s_t and the chunk of
the next H executed actions a_{t:t+H}. Where the chunk runs past the episode end the missing
rows are zero and masked out.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
import enum

import numpy as np


class Controller(enum.IntEnum):
    """Who controlled a step; values match habc_msgs/InterventionState.SOURCE_*."""

    POLICY = 0
    HUMAN = 1
    HOLD = 2

    @classmethod
    def parse(cls, value: 'str | int | Controller') -> 'Controller':
        """Accept 'policy' / 'human' / 'hold' (any case) or the integer source value."""
        if isinstance(value, str):
            try:
                return cls[value.strip().upper()]
            except KeyError:
                raise ValueError(f'unknown controller {value!r}; use policy, human or hold') \
                    from None
        return cls(int(value))


class Outcome(enum.IntEnum):
    """Episode outcome; SUCCESS/FAILURE values match habc_msgs/EpisodeEvent.OUTCOME_*."""

    UNLABELLED = 0
    SUCCESS = 1
    FAILURE = 2
    DISCARDED = 3

    @classmethod
    def parse(cls, value: 'str | int | bool | None | Outcome') -> 'Outcome':
        """Accept 'success' / 'failure' / 'discarded' / None, booleans or enum values."""
        if value is None:
            return cls.UNLABELLED
        if isinstance(value, bool):
            return cls.SUCCESS if value else cls.FAILURE
        if isinstance(value, str):
            aliases = {'unlabelled': 'UNLABELLED', 'unlabeled': 'UNLABELLED',
                       'unknown': 'UNLABELLED', 'null': 'UNLABELLED'}
            key = aliases.get(value.strip().lower(), value.strip().upper())
            try:
                return cls[key]
            except KeyError:
                raise ValueError(f'unknown outcome {value!r}; use success, failure, '
                                 'discarded or null') from None
        return cls(int(value))


class EpisodeKind(enum.IntEnum):
    """Where an episode comes from: D_SFT demonstrations or rollouts of the policy."""

    DEMO = 0
    ROLLOUT = 1


@dataclass
class Episode:
    """One recorded episode, as arrays over its T control steps.

    Attributes:
        observations: name -> array with leading dimension T (state vectors, images
            uint8 (T, V, H, W, 3), ...).
        actions: executed actions a_t, float32 (T, D).
        controllers: Controller per step, int8 (T,).
        outcome: episode outcome.
        instruction: language instruction.
        kind: demonstration or rollout.
        policy_versions: policy version active per step (empty strings for demos).
        timestamps: seconds per step (T,).
        episode_id: identifier (the recorder's id, or anything unique).
    """

    observations: dict[str, np.ndarray]
    actions: np.ndarray
    controllers: np.ndarray
    outcome: Outcome = Outcome.UNLABELLED
    instruction: str = ''
    kind: EpisodeKind = EpisodeKind.ROLLOUT
    policy_versions: list[str] = field(default_factory=list)
    timestamps: np.ndarray | None = None
    episode_id: str = ''

    def __post_init__(self) -> None:
        self.actions = np.asarray(self.actions, dtype=np.float32)
        self.controllers = np.asarray(
            [Controller.parse(c) for c in self.controllers], dtype=np.int8)
        self.outcome = Outcome.parse(self.outcome)
        self.kind = EpisodeKind(self.kind)
        n = len(self.actions)
        where = f'episode {self.episode_id or "(no id)"}'
        if n == 0:
            raise ValueError(f'{where} has no steps')
        if self.actions.ndim != 2:
            raise ValueError(f'{where}: actions must be (T, D), got shape {self.actions.shape}')
        if len(self.controllers) != n:
            raise ValueError(f'{where}: {len(self.controllers)} controller entries for {n} '
                             'actions')
        for name, array in self.observations.items():
            if len(array) != n:
                raise ValueError(f'{where}: observation {name!r} has {len(array)} steps, '
                                 f'actions have {n}')
        if self.timestamps is None:
            self.timestamps = np.arange(n, dtype=np.float64)
        if not self.policy_versions:
            self.policy_versions = [''] * n

    def __len__(self) -> int:
        return len(self.actions)

    @property
    def action_dim(self) -> int:
        return self.actions.shape[1]

    @property
    def num_interventions(self) -> int:
        """Number of takeovers: switches into HUMAN control."""
        human = self.controllers == Controller.HUMAN
        return int(human[0]) + int(np.sum(human[1:] & ~human[:-1]))


def segment_ids(controllers: Sequence[int]) -> np.ndarray:
    """Segment index per step: starts at 0 and increments at every switch of controller.

    Matches habc_msgs/InterventionState.segment_id.
    """
    controllers = np.asarray(controllers)
    if len(controllers) == 0:
        return np.zeros(0, dtype=np.int64)
    switches = np.concatenate([[0], (controllers[1:] != controllers[:-1]).astype(np.int64)])
    return np.cumsum(switches)


def segments(controllers: Sequence[int]) -> list[tuple[int, int, Controller]]:
    """Return (start, end_exclusive, controller) for each maximal run of one controller."""
    controllers = np.asarray(controllers)
    ids = segment_ids(controllers)
    result = []
    for seg in range(int(ids[-1]) + 1 if len(ids) else 0):
        steps = np.flatnonzero(ids == seg)
        result.append((int(steps[0]), int(steps[-1]) + 1, Controller(int(controllers[steps[0]]))))
    return result


def chunk_targets(actions: np.ndarray, t: int, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the chunk a_{t:t+H} (H, D) and its mask (H,), zero-padded past the end."""
    n, dim = actions.shape
    valid = max(0, min(horizon, n - t))
    chunk = np.zeros((horizon, dim), dtype=np.float32)
    chunk[:valid] = actions[t:t + valid]
    mask = np.zeros(horizon, dtype=np.float32)
    mask[:valid] = 1.0
    return chunk, mask


def all_chunk_targets(actions: np.ndarray, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """Return chunks (T, H, D) and masks (T, H) for every anchor step of an episode."""
    n, dim = actions.shape
    padded = np.concatenate([actions, np.zeros((horizon, dim), dtype=actions.dtype)])
    index = np.arange(n)[:, None] + np.arange(horizon)[None, :]
    chunks = padded[index].astype(np.float32)
    masks = (index < n).astype(np.float32)
    return chunks, masks
