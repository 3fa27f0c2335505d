"""Flow matching over action chunks (pi0-style), shared by the policies (no rclpy).

Convention (rectified flow): x_tau = (1 - tau) * eps + tau * a, eps ~ N(0, I), tau in [0, 1];
the network predicts the velocity v = a - eps. Sampling integrates dx/dtau = v from noise at
tau = 0 to an action chunk at tau = 1 with a few Euler steps.

Real-time chunking (RTC, Black et al. 2025, arXiv 2506.07339) samples the next chunk while
the robot executes the previous one: the actions the robot will have executed before the new
chunk arrives (the first d, committed) and the rest of the previous plan form a target
prefix Y, and each Euler step is guided towards it (inpainting with PiGDM guidance):
`prefix_weights` is the paper's soft mask W (Eq. 5), `guided_euler_sample` its Algorithm 1
(Eq. 1-4). The equations below use the paper's symbols, with its time convention (the same as
this module's: tau = 0 noise, tau = 1 data).

Data-parallel training (habc_learner.distributed) splits each minibatch over processes;
`sharded_noise` makes the training noise of `flow_matching_loss` the same for a sample
whatever the number of processes (see ShardedNoise).
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
import functools
import math

import torch
from torch import nn

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sinusoidal_embedding(tau: torch.Tensor, dim: int) -> torch.Tensor:
    """Embed flow times tau (B,) in [0, 1] as (B, dim) sines and cosines."""
    half = dim // 2
    frequencies = torch.exp(torch.arange(half, device=tau.device, dtype=torch.float32)
                            * (-math.log(1000.0) / max(half - 1, 1)))
    angles = tau.float()[:, None] * 1000.0 * frequencies[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


def masked_mse(predicted: torch.Tensor, target: torch.Tensor, action_mask: torch.Tensor,
               dim_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample MSE (B,) of (B, H, D) chunks over the valid chunk steps and dimensions."""
    error = (predicted - target) ** 2
    weights = action_mask[:, :, None].to(error.dtype)
    if dim_mask is not None:
        weights = weights * dim_mask[:, None, :].to(error.dtype)
    weights = weights.expand_as(error)
    return (error * weights).sum(dim=(1, 2)) / weights.sum(dim=(1, 2)).clamp(min=1.0)


@dataclass(frozen=True)
class ShardedNoise:
    """The training noise of one shard of a minibatch split over `shards` processes.

    Shard r holds the global batch's rows r, r + K, r + 2K, ... (K = shards; the order in
    which torch's DistributedSampler deals samples out). Each shard draws the noise of the
    whole global batch from `generator`, seeded alike on every shard, and keeps its rows:
    every sample gets the noise it gets in a one-process run of the same global batch.
    The cost is K times the (small) noise tensors of one shard.
    """

    generator: torch.Generator
    shard: int = 0
    shards: int = 1

    def randn(self, shape: tuple[int, ...], device: torch.device,
              dtype: torch.dtype) -> torch.Tensor:
        """Return normal noise: this shard's rows of a (shards * shape[0], ...) draw."""
        return self._rows(torch.randn, shape, device, dtype)

    def rand(self, shape: tuple[int, ...], device: torch.device,
             dtype: torch.dtype) -> torch.Tensor:
        """Return uniform [0, 1) noise: this shard's rows of a (shards * shape[0], ...) draw."""
        return self._rows(torch.rand, shape, device, dtype)

    def randint(self, high: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Return integers in [0, high): this shard's rows of a (shards * shape[0], ...) draw."""
        return self._rows(functools.partial(torch.randint, 0, high), shape, device,
                          torch.long)

    def _rows(self, draw, shape, device, dtype) -> torch.Tensor:
        full = (shape[0] * self.shards, *shape[1:])
        return draw(full, generator=self.generator, device=device,
                    dtype=dtype)[self.shard::self.shards]


# Set by the trainer around one data-parallel gradient step; a context variable because the
# noise is drawn deep inside each policy's loss, which knows nothing of shards.
_SHARDED_NOISE: ContextVar[ShardedNoise | None] = ContextVar('habc_sharded_noise',
                                                             default=None)


def active_sharded_noise() -> ShardedNoise | None:
    """Return the ShardedNoise of the enclosing `sharded_noise` block (None outside one).

    Every random draw of a training step that is per sample (flow noise, image shifts,
    state noise) takes its values from it when there is one, so a sample gets the same
    draw whichever process of a data-parallel run holds it.
    """
    return _SHARDED_NOISE.get()


@contextmanager
def sharded_noise(noise: ShardedNoise) -> Iterator[ShardedNoise]:
    """Within the block, `flow_matching_loss` without a generator draws from `noise`."""
    token = _SHARDED_NOISE.set(noise)
    try:
        yield noise
    finally:
        _SHARDED_NOISE.reset(token)


def flow_matching_loss(velocity_fn: VelocityFn, actions: torch.Tensor, action_mask: torch.Tensor,
                       dim_mask: torch.Tensor | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample velocity MSE (B,), averaged over the valid chunk steps and dimensions.

    The noise eps and flow times tau come from `generator`, else from the ShardedNoise of an
    enclosing `sharded_noise` block, else from torch's global stream.
    """
    batch = actions.shape[0]
    shard = _SHARDED_NOISE.get() if generator is None else None
    if shard is not None:
        eps = shard.randn(actions.shape, actions.device, actions.dtype)
        tau = shard.rand((batch,), actions.device, actions.dtype)
    else:
        eps = torch.randn(actions.shape, generator=generator, device=actions.device,
                          dtype=actions.dtype)
        tau = torch.rand((batch,), generator=generator, device=actions.device,
                         dtype=actions.dtype)
    x_tau = (1.0 - tau[:, None, None]) * eps + tau[:, None, None] * actions
    return masked_mse(velocity_fn(x_tau, tau), actions - eps, action_mask, dim_mask)


def euler_sample(velocity_fn: VelocityFn, shape: tuple[int, ...], steps: int,
                 device: torch.device, generator: torch.Generator | None = None,
                 noise_scale: float = 1.0) -> torch.Tensor:
    """Integrate the learned flow from noise (tau = 0) to actions (tau = 1).

    `noise_scale` < 1 starts from scaled-down noise (low-temperature sampling): samples
    closer to the flow's mode; 1 is the trained distribution, 0 deterministic.
    """
    x = torch.randn(shape, generator=generator, device=device)
    if noise_scale != 1.0:
        x = noise_scale * x
    dt = 1.0 / steps
    for i in range(steps):
        tau = torch.full((shape[0],), i * dt, device=device)
        x = x + dt * velocity_fn(x, tau)
    return x


def prefix_weights(horizon: int, delay: int, prefix_len: int) -> torch.Tensor:
    """RTC's soft mask W (H,) over the steps of a new chunk (Eq. 5 of arXiv 2506.07339).

    W_i = 1 for i < d (the committed actions), an exponential decay
    W_i = c_i (e^{c_i} - 1) / (e - 1) with c_i = (P - i) / (P - d + 1) for d <= i < P (the
    rest of the previous plan, trusted less the further out it lies), and 0 for i >= P (no
    previous plan). The paper writes P as H - s (s: the execution horizon).

    Raises:
        ValueError: unless 0 <= delay <= prefix_len <= horizon and horizon >= 1.
    """
    if not 0 <= delay <= prefix_len <= horizon or horizon < 1:
        raise ValueError(f'prefix weights need 0 <= delay <= prefix_len <= horizon, got '
                         f'delay={delay}, prefix_len={prefix_len}, horizon={horizon}')
    i = torch.arange(horizon, dtype=torch.float32)
    c = (prefix_len - i) / (prefix_len - delay + 1)
    decay = c * torch.expm1(c) / math.expm1(1.0)
    weights = torch.where(i < prefix_len, decay, torch.zeros(()))
    return torch.where(i < delay, torch.ones(()), weights)


def guidance_scale(tau: float, max_guidance: float) -> float:
    """PiGDM's guidance weight min(beta, (1 - tau) / (tau r_tau^2)) (Eq. 2 and 4).

    r_tau^2 = (1 - tau)^2 / (tau^2 + (1 - tau)^2) (Eq. 4); the weight is beta at tau = 0
    (where the ratio is infinite) and 0 at tau = 1.
    """
    if tau <= 0.0:
        return max_guidance
    r2 = (1.0 - tau) ** 2 / (tau ** 2 + (1.0 - tau) ** 2)
    if r2 == 0.0:
        return 0.0
    return min(max_guidance, (1.0 - tau) / (tau * r2))


def guided_euler_sample(velocity_fn: VelocityFn, prefix: torch.Tensor, weights: torch.Tensor,
                        steps: int, generator: torch.Generator | None = None,
                        max_guidance: float = 5.0, noise_scale: float = 1.0) -> torch.Tensor:
    """Sample chunks (B, H, D) guided towards `prefix` Y (RTC's Algorithm 1).

    Starts from the same noise as `euler_sample` with the same generator (and
    `noise_scale`). Each Euler step
    (Eq. 1) uses the guided velocity of Eq. 2:
        A1_hat = A_tau + (1 - tau) v(A_tau, tau)                                 (Eq. 3)
        e      = (Y - A1_hat) * W
        g      = e^T dA1_hat/dA_tau        (a vector-Jacobian product through v)
        v_PiGDM = v + min(beta, (1 - tau) / (tau r_tau^2)) g               (Eq. 2, 4)
    `prefix` Y (B, H, D) is in the units the velocity field works in (normalised actions);
    `weights` W is (H,) or (B, H); `max_guidance` is the clip beta (5 in the paper).
    The velocity field must be differentiable in x: call this outside torch.inference_mode
    (under no_grad is fine: the guidance step turns gradients on for itself).
    """
    if prefix.ndim != 3:
        raise ValueError(f'prefix must be (B, H, D), got {tuple(prefix.shape)}')
    # Lower-case names for the paper's Y, W, A^tau and A^1-hat (pep8 locals).
    w = weights.to(prefix.device, prefix.dtype)
    w = (w[None] if w.ndim == 1 else w)[:, :, None]
    y = prefix
    x = noise_scale * torch.randn(prefix.shape, generator=generator, device=prefix.device)
    dt = 1.0 / steps
    for i in range(steps):
        tau = i * dt
        with torch.enable_grad():
            a_tau = x.detach().requires_grad_(True)
            v = velocity_fn(a_tau, torch.full((x.shape[0],), tau, device=x.device))
            a1_hat = a_tau + (1.0 - tau) * v
            e = (y - a1_hat.detach()) * w
            (g,) = torch.autograd.grad(a1_hat, a_tau, grad_outputs=e)
        x = x + dt * (v.detach() + guidance_scale(tau, max_guidance) * g)
    return x


def mlp(sizes: list[int], activation: type[nn.Module] = nn.GELU) -> nn.Sequential:
    """Build a plain MLP with `activation` between layers (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)
