"""Flow matching over action chunks (pi0-style), shared by the policies (no rclpy).

Convention (rectified flow): x_tau = (1 - tau) * eps + tau * a, eps ~ N(0, I), tau in [0, 1];
the network predicts the velocity v = a - eps. Sampling integrates dx/dtau = v from noise at
tau = 0 to an action chunk at tau = 1 with a few Euler steps.
"""

from collections.abc import Callable
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


def flow_matching_loss(velocity_fn: VelocityFn, actions: torch.Tensor, action_mask: torch.Tensor,
                       dim_mask: torch.Tensor | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample velocity MSE (B,), averaged over the valid chunk steps and dimensions."""
    batch = actions.shape[0]
    eps = torch.randn(actions.shape, generator=generator, device=actions.device,
                      dtype=actions.dtype)
    tau = torch.rand((batch,), generator=generator, device=actions.device, dtype=actions.dtype)
    x_tau = (1.0 - tau[:, None, None]) * eps + tau[:, None, None] * actions
    return masked_mse(velocity_fn(x_tau, tau), actions - eps, action_mask, dim_mask)


def euler_sample(velocity_fn: VelocityFn, shape: tuple[int, ...], steps: int,
                 device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """Integrate the learned flow from noise (tau = 0) to actions (tau = 1)."""
    x = torch.randn(shape, generator=generator, device=device)
    dt = 1.0 / steps
    for i in range(steps):
        tau = torch.full((shape[0],), i * dt, device=device)
        x = x + dt * velocity_fn(x, tau)
    return x


def mlp(sizes: list[int], activation: type[nn.Module] = nn.GELU) -> nn.Sequential:
    """Build a plain MLP with `activation` between layers (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)
