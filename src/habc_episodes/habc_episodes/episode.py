"""The Episode data model: one recorded episode as arrays over its control steps.

An episode is a sequence of control steps t = 0..T-1. Per step: the observation (arrays keyed
by name, or a reference into a bag), the executed action a_t, the controller whose command
was executed (policy / human / hold), the policy version and the timestamp. Per episode: the
outcome (success / failure / unlabelled / discarded), the instruction and the kind (a
demonstration for SFT or a rollout of the policy).
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, UTC
import re

import numpy as np

from habc_episodes.help_requests import (
    HelpRequestRecord,
    HelpSummary,
    mark_requested,
    Takeover,
    takeover_steps,
)
from habc_episodes.vocabulary import Controller, EpisodeKind, Outcome

# Episode ids: <robot>-<UTC time>-<serial>, the robot label taken from the recorder's robot
# parameter or its namespace (the dashboard derives the same label from a namespace).

def robot_label(robot: str, namespace: str) -> str:
    """Return the robot label: `robot`, else the namespace, else 'robot'; safe in file names."""
    label = robot or namespace.strip('/').replace('/', '_') or 'robot'
    return re.sub(r'[^A-Za-z0-9_.-]', '_', label)


def make_episode_id(robot: str, when: float, n: int) -> str:
    """Return `<robot>-<yyyymmdd-hhmmss>-<n>` for unix time `when`, in UTC."""
    stamp = datetime.fromtimestamp(when, tz=UTC).strftime('%Y%m%d-%H%M%S')
    return f'{robot}-{stamp}-{n}'


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
        camera_shapes: (H, W) of each view's images as the cameras recorded them, before
            any resize for training (empty when not known); a policy trained on them
            records them (robot_fit).
        help_requests: the robot's help requests (habc_episodes.help_requests; times in s
            from the first step); empty when none were recorded (old or foreign bags).
        takeovers: each takeover, requested or spontaneous; left empty, they are found in
            `controllers` (who engaged them unknown) and marked against `help_requests`.
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
    camera_shapes: tuple[tuple[int, int], ...] = ()
    help_requests: tuple[HelpRequestRecord, ...] = ()
    takeovers: tuple[Takeover, ...] = ()

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
        self.help_requests = tuple(self.help_requests)
        self.takeovers = tuple(self.takeovers)
        if not self.takeovers:
            start = float(self.timestamps[0])
            self.takeovers = mark_requested(self.help_requests, [
                (float(self.timestamps[t]) - start, '', int(t))
                for t in takeover_steps(self.controllers)])

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

    @property
    def help(self) -> HelpSummary:
        """The help requests and the takeovers, requested or spontaneous.

        Takeovers follow the recorder's rule (a HOLD inside a human run is not a new one),
        so their count can be below num_interventions, which counts every entry into HUMAN.
        """
        return HelpSummary(self.help_requests, self.takeovers)


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
