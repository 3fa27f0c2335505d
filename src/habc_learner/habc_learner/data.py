"""The training buffer: every anchor step of every episode, with its credit (no rclpy).

Episodes are flattened into one table of samples (a window anchored at step t). Per sample
the table holds where it comes from, its credit (spec/habc.md) and the numbers the
baselines need (rewards, Monte-Carlo returns). `batch(indices)` gathers observations at t
and at the next states, the chunk targets a_{t:t+H} with their masks, and the credit fields
as tensors.

Frame rows: every observation (one control step of one episode) has a row id, its place in
the concatenated observation arrays. Episodes are only ever appended, so a row keeps its id
and its frame for the buffer's life; `frame_token` names that numbering (a new buffer or a
copy that may grow apart gets a new one). Each gathered observation dict carries its
'frame_rows' and 'frame_token', so the learner can reuse per-frame features
(habc_learner.feature_cache) without comparing images.
"""

from dataclasses import dataclass
import enum
import itertools

import numpy as np
import torch

from habc_episodes.episode import Episode
from habc_episodes.vocabulary import Controller, EpisodeKind, Outcome
from habc_learner.credit import ActorWeight, assign_credit, CreditConfig, Role


class WeightCode(enum.IntEnum):
    """ActorWeight as integers, for arrays."""

    EXCLUDED = 0
    GATE = 1
    ZERO = 2
    ONE = 3


_WEIGHT_CODES = {ActorWeight.EXCLUDED: WeightCode.EXCLUDED, ActorWeight.GATE: WeightCode.GATE,
                 ActorWeight.ZERO: WeightCode.ZERO, ActorWeight.ONE: WeightCode.ONE}
# Frame tokens are unique within the process (caches keyed by them live in it too).
_FRAME_TOKENS = itertools.count(1)


@dataclass(frozen=True)
class RewardConfig:
    """Rewards of the value-based baselines (Imit-Recap, AWR); HABC does not use them.

    The paper gives -C = -100 on failed episodes and gamma 0.99; the per-step reward is our
    default (a time penalty, so faster successes have higher value), a config value.
    """

    failure_cost: float = 100.0
    step_reward: float = -1.0
    gamma: float = 0.99


class HumanWindowTargets(enum.StrEnum):
    """Which steps of a human window's chunk the actor imitates."""

    HUMAN_STEPS = 'human_steps'  # spec: only the steps the human controlled
    FULL_CHUNK = 'full_chunk'    # the whole chunk, the policy's own steps before a takeover
                                 # included (the first implementation; for ablations)


class SampleBuffer:
    """All samples of a set of episodes, with credit, ready to be batched."""

    def __init__(self, credit: CreditConfig, rewards: RewardConfig = RewardConfig(),
                 next_stride: int = 1, efficiency_uses_demos: bool = True,
                 human_window_targets: str = HumanWindowTargets.HUMAN_STEPS) -> None:
        if next_stride < 1:
            raise ValueError(f'next_stride must be >= 1, got {next_stride}')
        try:
            self.human_window_targets = HumanWindowTargets(human_window_targets)
        except ValueError:
            raise ValueError(f'human_window_targets must be one of '
                             f'{[t.value for t in HumanWindowTargets]}, got '
                             f'{human_window_targets!r}') from None
        self.credit = credit
        self.rewards = rewards
        self.next_stride = next_stride
        self.efficiency_uses_demos = efficiency_uses_demos
        self.episodes: list[Episode] = []
        self._columns: dict[str, list[np.ndarray]] = {}
        self._observations: dict[str, list[np.ndarray]] = {}
        self._instructions: list[str] = []
        self._frozen: dict[str, np.ndarray] | None = None
        self._frozen_obs: dict[str, np.ndarray] | None = None
        self._frame_token = next(_FRAME_TOKENS)

    @property
    def frame_token(self) -> int:
        """Names the meaning of frame row ids: the same token, the same frame at each row.

        add() appends rows and keeps it (old rows keep their ids and frames); it differs
        between buffers, and a copy() gets its own, since two copies append different frames
        at the same new row ids.
        """
        return self._frame_token

    def __len__(self) -> int:
        return int(sum(len(e) for e in self.episodes))

    def add(self, episode: Episode) -> None:
        """Add one episode (its credit is computed now)."""
        if self.episodes:
            first = self.episodes[0]
            if episode.action_dim != first.action_dim:
                raise ValueError(f'episode {episode.episode_id!r} has action dim '
                                 f'{episode.action_dim}, the buffer holds {first.action_dim}')
            if set(episode.observations) != set(first.observations):
                raise ValueError(f'episode {episode.episode_id!r} observes '
                                 f'{sorted(episode.observations)}, the buffer holds '
                                 f'{sorted(first.observations)}')
        n = len(episode)
        offset = len(self)
        steps = np.arange(n)
        is_demo = episode.kind == EpisodeKind.DEMO
        if is_demo:
            success = episode.outcome != Outcome.FAILURE
            role = np.full(n, Role.HUMAN, dtype=object)
            label = np.full(n, np.nan)
            trains_v = np.zeros(n, dtype=bool)
            trains_e = np.full(n, self.efficiency_uses_demos and success)
            weight = np.full(n, WeightCode.ONE)
            terminal = np.zeros(n, dtype=bool)
            terminal[-1] = success
        else:
            credit = assign_credit(episode.controllers, episode.outcome, self.credit)
            role, label = credit.role, credit.label
            trains_v, trains_e = credit.trains_viability, credit.trains_efficiency
            weight = np.array([_WEIGHT_CODES[w] for w in credit.actor_weight])
            terminal = credit.terminal_success
        rewards, returns = self._rewards(episode)
        labelled = episode.outcome in (Outcome.SUCCESS, Outcome.FAILURE) or is_demo
        columns = {
            'episode': np.full(n, len(self.episodes)),
            'step': steps,
            'index': offset + steps,
            'next_index': offset + np.minimum(steps + 1, n - 1),
            'adv_index': offset + np.minimum(steps + self.next_stride, n - 1),
            'adv_steps': np.minimum(steps + self.next_stride, n - 1) - steps,
            'is_sft': np.full(n, is_demo),
            'is_human': role == Role.HUMAN,
            'is_hold': role == Role.HOLD,
            'label': label.astype(np.float32),
            'trains_viability': trains_v.astype(bool),
            'trains_efficiency': trains_e.astype(bool),
            'weight_code': weight.astype(np.int64),
            'terminal_success': terminal.astype(bool),
            'is_last': steps == n - 1,
            'reward': rewards,
            'mc_return': returns,
            # Rollout windows of labelled episodes, for the baselines that ignore who drove.
            'is_rollout_labelled': np.full(n, (not is_demo) and labelled
                                           and episode.outcome != Outcome.DISCARDED)
            & (role != Role.HOLD),
        }
        chunks, masks = all_chunk_targets(episode.actions, self.credit.horizon)
        if not is_demo and self.human_window_targets == HumanWindowTargets.HUMAN_STEPS:
            # A human window imitates the human: a window anchored just before a takeover
            # must not teach the failing policy's own actions (spec/habc.md).
            human_step = (episode.controllers == Controller.HUMAN).astype(np.float32)
            by_step, _ = all_chunk_targets(human_step[:, None], self.credit.horizon)
            windows = role == Role.HUMAN
            masks[windows] *= by_step[windows, :, 0]
        columns['actions'] = chunks
        columns['action_mask'] = masks
        for key, value in columns.items():
            self._columns.setdefault(key, []).append(value)
        for key, value in episode.observations.items():
            self._observations.setdefault(key, []).append(np.asarray(value))
        self._instructions.extend([episode.instruction] * n)
        self.episodes.append(episode)
        self._frozen = None
        self._frozen_obs = None

    def copy(self) -> 'SampleBuffer':
        """Return a buffer with the same samples that can grow on its own (arrays shared)."""
        other = SampleBuffer(self.credit, self.rewards, self.next_stride,
                             self.efficiency_uses_demos, self.human_window_targets)
        other.episodes = list(self.episodes)
        other._columns = {k: list(v) for k, v in self._columns.items()}
        other._observations = {k: list(v) for k, v in self._observations.items()}
        other._instructions = list(self._instructions)
        other._frozen, other._frozen_obs = self._frozen, self._frozen_obs
        # other._frame_token is its own: rows appended to either buffer from now on differ.
        return other

    def _rewards(self, episode: Episode) -> tuple[np.ndarray, np.ndarray]:
        n = len(episode)
        rewards = np.full(n, self.rewards.step_reward, dtype=np.float32)
        if episode.outcome == Outcome.FAILURE:
            rewards[-1] -= self.rewards.failure_cost
        returns = np.zeros(n, dtype=np.float32)
        running = 0.0
        for t in range(n - 1, -1, -1):
            running = rewards[t] + self.rewards.gamma * running
            returns[t] = running
        return rewards, returns

    @property
    def table(self) -> dict[str, np.ndarray]:
        """The per-sample columns, concatenated over episodes."""
        if self._frozen is None:
            self._frozen = {k: np.concatenate(v) for k, v in self._columns.items()}
            self._frozen_obs = {k: np.concatenate(v) for k, v in self._observations.items()}
        return self._frozen

    def observation_stats(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std (floored) of an observation over all steps, for normalisation."""
        _ = self.table
        values = self._frozen_obs[key].astype(np.float64)
        return values.mean(axis=0), np.maximum(values.std(axis=0), 1e-3)

    def action_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std (floored) of the executed actions."""
        actions = np.concatenate([e.actions for e in self.episodes]).astype(np.float64)
        return actions.mean(axis=0), np.maximum(actions.std(axis=0), 1e-3)

    def frames(self, rows: np.ndarray, device: torch.device | str = 'cpu') -> dict:
        """Observations of frame rows: the model's keys, 'instruction', and the row identity.

        'frame_rows' (B,) int64 are the rows and 'frame_token' the buffer's `frame_token`.
        """
        _ = self.table
        device = torch.device(device)
        rows = np.asarray(rows, dtype=np.int64)
        obs = {k: _to_device(v[rows], device) for k, v in self._frozen_obs.items()}
        obs['instruction'] = [self._instructions[i] for i in rows]
        obs['frame_rows'] = _to_device(rows, device)
        obs['frame_token'] = self._frame_token
        return obs

    def batch(self, indices: np.ndarray, device: torch.device | str = 'cpu') -> dict:
        """Gather samples: observations at t ('obs'), t+1 ('next_obs'), t+stride ('adv_obs')."""
        table = self.table
        device = torch.device(device)
        batch = {key: _to_device(value[indices], device)
                 for key, value in table.items()
                 if key not in ('episode', 'step', 'index', 'next_index', 'adv_index')}
        batch['obs'] = self.frames(table['index'][indices], device)
        batch['next_obs'] = self.frames(table['next_index'][indices], device)
        batch['adv_obs'] = (batch['next_obs'] if self.next_stride == 1
                            else self.frames(table['adv_index'][indices], device))
        batch['obs']['actions'] = batch['actions']
        batch['obs']['action_mask'] = batch['action_mask']
        return batch


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """Return a gathered array as a tensor on `device`, to a GPU through pinned memory.

    Pinned (page-locked) host memory lets the copy run asynchronously (non_blocking): the
    host goes on gathering the rest of the batch while the earlier arrays are copied.
    """
    tensor = torch.as_tensor(array)
    if device.type != 'cuda':
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


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
