"""Supervised training of the object locator (habc_policy.models.vision.ObjectLocator).

Frames rendered in simulation come with the objects' true positions; the locator learns to
regress them from the camera views (mean squared error on normalised positions). Frames are
split by episode, so the held-out error measures positions the locator never saw in any
neighbouring frame.
"""

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from habc_policy.models.vision import LocatorConfig, ObjectLocator


@dataclass(frozen=True)
class LocatorTraining:
    """Budget of one locator fit."""

    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    heldout_fraction: float = 0.1   # of the episodes, for the reported held-out error
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError('LocatorTraining needs steps >= 1 and batch_size >= 1')
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f'heldout_fraction must be in [0, 1), got {self.heldout_fraction}')


def position_errors_cm(predicted: np.ndarray, targets: np.ndarray) -> list[float]:
    """Mean Euclidean error (cm) per object, positions given as (N, 3 * objects) metres."""
    difference = (predicted - targets).reshape(len(targets), -1, 3)
    return [float(e) for e in 100.0 * np.linalg.norm(difference, axis=-1).mean(0)]


@torch.no_grad()
def locate_all(locator: ObjectLocator, images: np.ndarray, batch_size: int = 256
               ) -> np.ndarray:
    """Positions (m) the locator estimates for every frame of `images` (N, V, H, W, 3)."""
    locator.eval()
    return np.concatenate([locator.locate(torch.from_numpy(images[i:i + batch_size])).numpy()
                           for i in range(0, len(images), batch_size)])


def fit_locator(images: np.ndarray, targets: np.ndarray, episodes: np.ndarray,
                config: LocatorConfig, training: LocatorTraining = LocatorTraining(),
                progress: bool = True) -> tuple[ObjectLocator, dict]:
    """Train a locator on labelled frames; return it (eval mode) and its errors.

    Args:
        images: (N, V, H, W, 3) uint8 frames.
        targets: (N, outputs) true positions (m), 3 per object.
        episodes: (N,) the episode of each frame (the held-out split is by episode).

    Returns:
        The locator and {'frames', 'train_error_cm', 'heldout_error_cm', 'loss'}, errors
        per object (heldout_error_cm is empty with heldout_fraction 0 or one episode; else
        at least one episode is held out).

    Raises:
        ValueError: shapes that do not agree with each other or with `config`.
    """
    n = len(images)
    if images.ndim != 5 or images.dtype != np.uint8 or images.shape[1] != config.num_views:
        raise ValueError(f'images must be (N, {config.num_views}, H, W, 3) uint8, got '
                         f'{images.shape} {images.dtype}')
    if targets.shape != (n, config.outputs) or episodes.shape != (n,):
        raise ValueError(f'targets must be ({n}, {config.outputs}) and episodes ({n},), got '
                         f'{targets.shape} and {episodes.shape}')
    rng = np.random.default_rng(training.seed)
    names = np.unique(episodes)
    # At least one held-out episode whenever there are two (a small run still reports it).
    count = (max(1, int(len(names) * training.heldout_fraction))
             if training.heldout_fraction and len(names) > 1 else 0)
    heldout_names = rng.choice(names, count, replace=False)
    heldout = np.isin(episodes, heldout_names)
    train = np.flatnonzero(~heldout)
    torch.manual_seed(training.seed)
    locator = ObjectLocator(config)
    mean = targets[train].mean(0)
    std = np.maximum(targets[train].std(0), 1e-3)   # z of a cube on the table barely moves
    locator.target_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
    locator.target_std.copy_(torch.as_tensor(std, dtype=torch.float32))
    normalised = torch.as_tensor((targets - mean) / std, dtype=torch.float32)
    optimizer = torch.optim.AdamW(locator.parameters(), lr=training.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, training.steps)
    locator.train()
    bar = tqdm(range(training.steps), desc='locator', disable=not progress,
               dynamic_ncols=True)
    loss = torch.zeros(())
    for _ in bar:
        batch = rng.choice(train, training.batch_size)
        loss = torch.nn.functional.mse_loss(locator(torch.from_numpy(images[batch])),
                                            normalised[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f'{loss.item():.4f}', refresh=False)
    sample = rng.choice(train, min(len(train), 2000), replace=False)
    metrics = {'frames': n, 'loss': float(loss.item()),
               'train_error_cm': position_errors_cm(locate_all(locator, images[sample]),
                                                    targets[sample]),
               'heldout_error_cm': (position_errors_cm(locate_all(locator, images[heldout]),
                                                       targets[heldout])
                                    if heldout.any() else [])}
    return locator.eval(), metrics
