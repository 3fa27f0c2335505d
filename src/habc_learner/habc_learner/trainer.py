"""The training loop: minibatches, progress bar, TensorBoard scalars, checkpoints, seeds.

In a process that torchrun started and that joined the process group
(habc_learner.distributed.init_from_env), the trainer trains data-parallel: see
docs/distributed.md.
"""

from collections.abc import Callable
import copy
from dataclasses import asdict, dataclass
import json
from pathlib import Path
import random

import numpy as np
from safetensors.torch import load_file, save_file
import torch
from tqdm.auto import tqdm

from habc_episodes.vocabulary import PolicyVersion
from habc_learner import distributed
from habc_learner.data import SampleBuffer
from habc_learner.feature_cache import DEFAULT_MAX_ROWS
from habc_learner.methods import Algorithm, Method, MethodConfig
from habc_policy.models.critic import CRITIC_FILE
from habc_policy.models.flow_matching import sharded_noise, ShardedNoise


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


# Beside a checkpoint's weights: what a run that goes on from it needs (Algorithm.training_state).
TRAINER_STATE_FILE = 'trainer_state.pt'


def seed_everything(seed: int) -> np.random.Generator:
    """Seed Python, NumPy and torch; return the NumPy generator the trainer samples with."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def _seed(*parts: int) -> int:
    """Return a 63-bit seed mixed from `parts` (seed, step, rank): unrelated streams."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


class Trainer:
    """Train one policy with one method on a buffer of episodes.

    Data-parallel when the process group is up (habc_learner.distributed): every process
    builds the same trainer; each takes batch_size / K of every minibatch through a
    DistributedSampler over the method's sample pool; rank 0 alone logs and writes.
    """

    def __init__(self, policy, buffer: SampleBuffer, method: MethodConfig,
                 train: TrainConfig = TrainConfig(), log_dir: Path | None = None,
                 progress: bool = True, algorithm: Algorithm | None = None) -> None:
        self.rng = seed_everything(train.seed)
        self.distributed = distributed.is_initialized()
        if self.distributed:
            self._check_distributable(method, train)
        self.policy = policy.to(train.device)
        self.buffer = buffer
        self.method = method
        self.train_config = train
        self.progress = progress and distributed.is_main()
        if train.normalize_from_data and policy.version == 'untrained':
            self._normalize_from(buffer)
        self.algorithm = algorithm or Algorithm(policy, method, train.actor_lr, train.critic_lr,
                                                train.grad_clip, train.feature_cache_rows)
        self.algorithm.to(train.device)
        if self.distributed:
            self.algorithm.distribute(train.device)
        self._batches: distributed.ShardedBatches | None = None
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.writer = None
        if log_dir is not None and distributed.is_main():
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(log_dir))

    def branch(self, algorithm: Algorithm, log_dir: Path | None = None) -> 'Trainer':
        """Return a trainer that goes on from this one: step count, sampler, a buffer copy.

        `algorithm` is the branch's own (e.g. `Algorithm.branch_with_intervention_reweighting`).
        """
        if self.distributed:
            raise ValueError('a data-parallel trainer cannot branch: train the branch in its '
                             'own run')
        other = Trainer(algorithm.policy, self.buffer.copy(), algorithm.config, self.train_config,
                        log_dir, self.progress, algorithm)
        other.step = self.step
        other.rng = copy.deepcopy(self.rng)
        other.history = list(self.history)
        return other

    @staticmethod
    def _check_distributable(method: MethodConfig, train: TrainConfig) -> None:
        k = distributed.world_size()
        if train.batch_size % k:
            raise ValueError(f'batch size {train.batch_size} is not a multiple of the {k} '
                             'processes: each takes an equal share of every minibatch')
        if Method(method.method) == Method.IMIT_DAGGER:
            raise ValueError('imit_dagger draws its minibatches 50/50 from two pools, which '
                             'data-parallel training does not shard: train it in one process')

    def _indices(self, table: dict[str, np.ndarray]) -> np.ndarray:
        """Return this process's sample indices of the next minibatch."""
        if not self.distributed:
            return self.algorithm.sample_indices(table, self.train_config.batch_size, self.rng)
        pool = self.algorithm.sample_pool(table)
        if self._batches is None or not np.array_equal(self._batches.pool, pool):
            # A new pool (more episodes, a new round): the passes go on from the same count,
            # so a round never replays the last round's order.
            epoch = self._batches.epoch if self._batches is not None else 0
            self._batches = distributed.ShardedBatches(
                pool, self.train_config.batch_size, self.train_config.seed,
                distributed.rank(), distributed.world_size())
            self._batches.epoch = epoch
        return self._batches.next()

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
        seed = self.train_config.seed
        # The torch stream (flow-matching noise, dropout) of these steps depends only on the
        # seed and the step count, not on what ran before in this process. Data-parallel
        # processes each have their own stream (augmentation, dropout): one shared stream
        # would give every process's k-th sample the same random shift.
        torch.manual_seed(_seed(seed, self.step, distributed.rank()) if self.distributed
                          else seed * 1_000_003 + self.step)
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
            indices = self._indices(table)
            batch = self.buffer.batch(indices, device)
            batch['masks'] = {'actor': torch.as_tensor(actor_mask[indices], device=device),
                              'critic': torch.as_tensor(critic_mask[indices], device=device)}
            if self.distributed:
                # Flow-matching noise of the global batch, seeded by (seed, step) alike on
                # every process, each keeping its rows: the noise a sample gets does not
                # depend on the number of processes.
                generator = torch.Generator(device=device).manual_seed(_seed(seed, self.step))
                noise = ShardedNoise(generator, distributed.rank(), distributed.world_size())
                with sharded_noise(noise):
                    stats = self.algorithm.update(batch, self.step)
            else:
                stats = self.algorithm.update(batch, self.step)
            self.step += 1
            window.append(stats)
            # `done`, not self.step: the step count runs on over several fit() calls (rounds).
            if self.step % self.train_config.log_every == 0 or done == steps:
                # Every process logs at the same steps: the mean over processes is a
                # collective (the global batch's losses; see mean_over_ranks).
                summary = distributed.mean_over_ranks(_mean_stats(window))
                window = []
                summary['step'] = self.step
                self.history.append(summary)
                bar.set_postfix({k.split('/')[-1]: f'{v:.3g}' for k, v in summary.items()
                                 if k in ('losses/actor', 'losses/critic', 'losses/value')})
                if self.writer is not None:
                    for key, value in summary.items():
                        if key != 'step':
                            self.writer.add_scalar(key, value, self.step)
                if on_log is not None and distributed.is_main():
                    on_log(summary)
        if self.writer is not None:
            self.writer.flush()
        return self.history[-1] if self.history else {}

    def save_checkpoint(self, directory: Path, version: PolicyVersion) -> dict[str, str]:
        """Write policy (safetensors + config), critic, training state, metrics; return hashes.

        Data-parallel: rank 0 writes (every process holds the same weights), the others wait
        for it and return its answer.
        """
        directory = Path(directory)
        version = str(PolicyVersion.parse(version))
        self.policy.version = version
        if not self.distributed:
            return self._write_checkpoint(directory, version)
        info = self._write_checkpoint(directory, version) if distributed.is_main() else None
        return distributed.broadcast_object(info)

    def restore_training_state(self, directory: Path) -> bool:
        """Go on from the training state saved beside a checkpoint; False if it has none.

        ValueError (nothing changed) when the state is not this training's: another method,
        other trainable parameters, or a file that cannot be read.
        """
        path = Path(directory) / TRAINER_STATE_FILE
        if not path.is_file():
            return False
        try:
            state = torch.load(path, map_location=self.train_config.device, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same answer
            raise ValueError(f'{path} cannot be read: {type(exc).__name__}: {exc}') from exc
        if not isinstance(state, dict):
            raise ValueError(f'{path} holds no training state')
        self.algorithm.load_training_state(state)
        return True

    def resume_from(self, directory: Path, log: Callable[[str], None]) -> bool:
        """Go on from a checkpoint of this training: its critic, then its training state.

        One that does not fit is left, with a line saying why, and starts afresh. Returns
        whether the training state (AdamW moments, target critic) was restored.
        """
        directory = Path(directory)
        critic_path = directory / CRITIC_FILE
        if self.algorithm.critic is not None and critic_path.is_file():
            try:
                state = load_file(str(critic_path), device=self.train_config.device)
                with torch.no_grad():
                    self.algorithm.critic.load_state_dict(state)
                    self.algorithm.target_critic.load_state_dict(state)
                log(f'critic restored from {critic_path}')
            except (RuntimeError, ValueError) as exc:
                log(f'the critic {critic_path} does not fit ({exc}); it starts afresh')
        path = directory / TRAINER_STATE_FILE
        try:
            restored = self.restore_training_state(directory)
        except ValueError as exc:
            log(f'the training state {path} does not fit ({exc}); AdamW and the target '
                'critic start afresh')
            return False
        if restored:
            log(f'AdamW moments and target critic restored from {path}')
        return restored

    def _write_checkpoint(self, directory: Path, version: str) -> dict[str, str]:
        sha = self.policy.save(directory)
        if self.algorithm.critic is not None:
            state = {k: v.detach().cpu().contiguous()
                     for k, v in self.algorithm.critic.state_dict().items()}
            save_file(state, str(directory / CRITIC_FILE))
        torch.save(self.algorithm.training_state(), directory / TRAINER_STATE_FILE)
        meta = {'version': version, 'step': self.step, 'method': asdict(self.method),
                'train': asdict(self.train_config), 'sha256': sha,
                'metrics': self.history[-1] if self.history else {}}
        (directory / 'metrics.json').write_text(json.dumps(meta, indent=2, default=str) + '\n')
        return {'sha256': sha, 'path': str(directory)}


def _mean_stats(window: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for stats in window for k in stats}
    return {k: float(np.mean([s[k] for s in window if k in s])) for k in sorted(keys)}
