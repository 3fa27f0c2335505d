"""The training loop: minibatches, progress bar, TensorBoard scalars, checkpoints, seeds."""

from collections.abc import Callable
import copy
from dataclasses import asdict, dataclass
import json
from pathlib import Path
import random

import numpy as np
from safetensors.torch import save_file
import torch
from tqdm.auto import tqdm

from habc_episodes.vocabulary import PolicyVersion
from habc_learner.data import SampleBuffer
from habc_learner.feature_cache import DEFAULT_MAX_ROWS
from habc_learner.methods import Algorithm, MethodConfig


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by every method."""

    steps: int = 1000
    batch_size: int = 256
    actor_lr: float = 3e-4
    critic_lr: float = 1e-3
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 50
    device: str = 'cpu'
    normalize_from_data: bool = True
    # Frames whose frozen-backbone features are kept for reuse (habc_learner.feature_cache):
    # on the training device, rows x the policy's cacheable width x 4 bytes (100k x 576 =
    # 230 MB); 0 = off. Policies without a frozen backbone cache nothing.
    feature_cache_rows: int = DEFAULT_MAX_ROWS

    def __post_init__(self) -> None:
        for name in ('steps', 'batch_size', 'log_every'):
            if getattr(self, name) < 1:
                raise ValueError(f'TrainConfig.{name} must be >= 1, got {getattr(self, name)}')
        if self.feature_cache_rows < 0:
            raise ValueError('TrainConfig.feature_cache_rows must be >= 0 (0 = off), got '
                             f'{self.feature_cache_rows}')
        for name in ('actor_lr', 'critic_lr', 'grad_clip'):
            if getattr(self, name) <= 0:
                raise ValueError(f'TrainConfig.{name} must be > 0, got {getattr(self, name)}')


def seed_everything(seed: int) -> np.random.Generator:
    """Seed Python, NumPy and torch; return the NumPy generator the trainer samples with."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


class Trainer:
    """Train one policy with one method on a buffer of episodes."""

    def __init__(self, policy, buffer: SampleBuffer, method: MethodConfig,
                 train: TrainConfig = TrainConfig(), log_dir: Path | None = None,
                 progress: bool = True, algorithm: Algorithm | None = None) -> None:
        self.rng = seed_everything(train.seed)
        self.policy = policy.to(train.device)
        self.buffer = buffer
        self.method = method
        self.train_config = train
        self.progress = progress
        if train.normalize_from_data and policy.version == 'untrained':
            self._normalize_from(buffer)
        self.algorithm = algorithm or Algorithm(policy, method, train.actor_lr, train.critic_lr,
                                                train.grad_clip, train.feature_cache_rows)
        self.algorithm.to(train.device)
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(log_dir))

    def branch(self, algorithm: Algorithm, log_dir: Path | None = None) -> 'Trainer':
        """Return a trainer that goes on from this one: step count, sampler, a buffer copy.

        `algorithm` is the branch's own (e.g. `Algorithm.branch_with_intervention_reweighting`).
        """
        other = Trainer(algorithm.policy, self.buffer.copy(), algorithm.config, self.train_config,
                        log_dir, self.progress, algorithm)
        other.step = self.step
        other.rng = copy.deepcopy(self.rng)
        other.history = list(self.history)
        return other

    def _normalize_from(self, buffer: SampleBuffer) -> None:
        stats = {}
        mean, std = buffer.action_stats()
        stats['actions_mean'], stats['actions_std'] = mean, std
        if 'state' in buffer.episodes[0].observations and hasattr(self.policy, 'state_mean'):
            stats['state_mean'], stats['state_std'] = buffer.observation_stats('state')
        self.policy.set_normalization(stats)

    def fit(self, steps: int | None = None, description: str | None = None,
            on_log: Callable[[dict[str, float]], None] | None = None) -> dict[str, float]:
        """Run `steps` gradient steps (default: the config's); return the last metrics mean.

        `on_log` receives each logged summary (every `log_every` steps and after the last
        step), e.g. to report progress where no progress bar is shown.
        """
        steps = steps or self.train_config.steps
        # The torch stream (flow-matching noise, dropout) of these steps depends only on the
        # seed and the step count, not on what ran before in this process.
        torch.manual_seed(self.train_config.seed * 1_000_003 + self.step)
        table = self.buffer.table
        actor_mask = self.algorithm.actor_mask(table)
        critic_mask = self.algorithm.critic_mask(table)
        self.algorithm.prepare(self.buffer, self.rng)
        device = self.train_config.device
        window: list[dict[str, float]] = []
        bar = tqdm(range(steps), desc=description or self.method.method.value,
                   disable=not self.progress, leave=False, dynamic_ncols=True)
        self.policy.train()
        for done, _ in enumerate(bar, 1):
            self.algorithm.refresh(self.buffer, self.step, device)
            indices = self.algorithm.sample_indices(table, self.train_config.batch_size,
                                                    self.rng)
            batch = self.buffer.batch(indices, device)
            batch['masks'] = {'actor': torch.as_tensor(actor_mask[indices], device=device),
                              'critic': torch.as_tensor(critic_mask[indices], device=device)}
            stats = self.algorithm.update(batch, self.step)
            self.step += 1
            window.append(stats)
            # `done`, not self.step: the step count runs on over several fit() calls (rounds).
            if self.step % self.train_config.log_every == 0 or done == steps:
                summary = _mean_stats(window)
                window = []
                summary['step'] = self.step
                self.history.append(summary)
                bar.set_postfix({k.split('/')[-1]: f'{v:.3g}' for k, v in summary.items()
                                 if k in ('losses/actor', 'losses/critic', 'losses/value')})
                if self.writer is not None:
                    for key, value in summary.items():
                        if key != 'step':
                            self.writer.add_scalar(key, value, self.step)
                if on_log is not None:
                    on_log(summary)
        if self.writer is not None:
            self.writer.flush()
        return self.history[-1] if self.history else {}

    def save_checkpoint(self, directory: Path, version: PolicyVersion) -> dict[str, str]:
        """Write policy (safetensors + config), critic weights and metrics; return hashes."""
        directory = Path(directory)
        version = str(PolicyVersion.parse(version))
        self.policy.version = version
        sha = self.policy.save(directory)
        if self.algorithm.critic is not None:
            state = {k: v.detach().cpu().contiguous()
                     for k, v in self.algorithm.critic.state_dict().items()}
            save_file(state, str(directory / 'critic.safetensors'))
        meta = {'version': version, 'step': self.step, 'method': asdict(self.method),
                'train': asdict(self.train_config), 'sha256': sha,
                'metrics': self.history[-1] if self.history else {}}
        (directory / 'metrics.json').write_text(json.dumps(meta, indent=2, default=str) + '\n')
        return {'sha256': sha, 'path': str(directory)}


def _mean_stats(window: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for stats in window for k in stats}
    return {k: float(np.mean([s[k] for s in window if k in s])) for k in sorted(keys)}
