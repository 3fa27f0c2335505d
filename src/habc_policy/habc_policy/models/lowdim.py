"""A low-dimensional flow-matching policy over state vectors, for fast benchmarks."""

from dataclasses import dataclass
from typing import Any

import torch

from habc_policy.models.base import Policy, register_policy
from habc_policy.models.flow_matching import (
    euler_sample,
    flow_matching_loss,
    mlp,
    sinusoidal_embedding,
)


@dataclass(frozen=True)
class LowDimFlowConfig:
    """Sizes of the low-dimensional policy (all config values, so it scales)."""

    state_dim: int
    action_dim: int
    horizon: int = 50
    feature_dim: int = 128
    hidden_dim: int = 256
    num_layers: int = 3
    time_embed_dim: int = 32
    num_inference_steps: int = 10

    def __post_init__(self) -> None:
        for name in ('state_dim', 'action_dim', 'horizon', 'feature_dim', 'hidden_dim',
                     'num_layers', 'time_embed_dim', 'num_inference_steps'):
            if getattr(self, name) < 1:
                raise ValueError(f'LowDimFlowConfig.{name} must be >= 1, got '
                                 f'{getattr(self, name)}')


@register_policy
class LowDimFlowPolicy(Policy):
    """State MLP encoder + MLP velocity field over the flattened (H, D) chunk."""

    type_name = 'lowdim_flow'
    config_class = LowDimFlowConfig

    def __init__(self, config: LowDimFlowConfig) -> None:
        super().__init__(config)
        c = config
        self.encoder = mlp([c.state_dim, c.hidden_dim, c.feature_dim])
        flat = c.horizon * c.action_dim
        hidden = [c.hidden_dim] * c.num_layers
        self.velocity = mlp([c.feature_dim + flat + c.time_embed_dim, *hidden, flat])
        self.register_normalization(c.state_dim, c.action_dim)

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    def encode(self, batch: dict[str, Any]) -> torch.Tensor:
        state = batch['state'].float()
        if state.shape[-1] != self.config.state_dim:
            raise ValueError(f'state has {state.shape[-1]} values, the policy expects '
                             f'{self.config.state_dim}')
        return self.encoder((state - self.state_mean) / self.state_std)

    def _velocity_fn(self, features: torch.Tensor):
        c = self.config

        def velocity(x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
            inputs = torch.cat([features, x.flatten(1),
                                sinusoidal_embedding(tau, c.time_embed_dim)], dim=-1)
            return self.velocity(inputs).view(-1, c.horizon, c.action_dim)
        return velocity

    def per_sample_loss(self, batch: dict[str, Any],
                        features: torch.Tensor | None = None) -> torch.Tensor:
        features = self.encode(batch) if features is None else features
        actions = (batch['actions'].float() - self.actions_mean) / self.actions_std
        return flow_matching_loss(self._velocity_fn(features), actions,
                                  batch['action_mask'], batch.get('dim_mask'))

    @torch.no_grad()
    def sample_chunks(self, batch: dict[str, Any],
                      generator: torch.Generator | None = None) -> torch.Tensor:
        features = self.encode(batch)
        shape = (features.shape[0], self.config.horizon, self.config.action_dim)
        x = euler_sample(self._velocity_fn(features), shape, self.config.num_inference_steps,
                         features.device, generator)
        return x * self.actions_std + self.actions_mean
