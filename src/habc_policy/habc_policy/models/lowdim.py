"""Low-dimensional policies over state vectors, for fast benchmarks.

Two action heads over the same state encoder:
    LowDimFlowPolicy   flow matching over the flattened chunk (pi0-style, multimodal)
    LowDimChunkPolicy  L2 regression of the chunk (ACT without its CVAE, unimodal)
Measured on 50 clean TransferCube demonstrations (H = 20, 6000 steps, 2 CPU threads): the
regressor fits the expert (normalised MSE 0.0008; 15/15 closed-loop successes including 10
held-out states), while the flow MLP's velocity loss was still 0.52 after 4000 steps and
its policy failed closed loop. The benchmark's state track therefore uses the regressor;
HABC's weights apply to any per-sample loss (Eq. 1).
"""

from dataclasses import dataclass, fields
from typing import Any

import torch

from habc_policy.models.base import Policy, register_policy
from habc_policy.models.flow_matching import (
    euler_sample,
    flow_matching_loss,
    guided_euler_sample,
    masked_mse,
    mlp,
    sinusoidal_embedding,
)


def _require_positive(config: Any, skip: tuple[str, ...] = ()) -> None:
    """Raise if any size of a config (every field but `skip` is an int size) is below 1."""
    for item in fields(config):
        if item.name not in skip and getattr(config, item.name) < 1:
            raise ValueError(f'{type(config).__name__}.{item.name} must be >= 1, got '
                             f'{getattr(config, item.name)}')


def _normalized_state(policy: Policy, batch: dict[str, Any]) -> torch.Tensor:
    """Return the batch's state vectors, checked against the policy's size, normalised."""
    state = batch['state'].float()
    if state.shape[-1] != policy.config.state_dim:
        raise ValueError(f'state has {state.shape[-1]} values, the policy expects '
                         f'{policy.config.state_dim}')
    return (state - policy.state_mean) / policy.state_std


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
    # Scale of the initial noise at sampling (1: the trained distribution; < 1 samples
    # nearer the mode). Measured (benchmarks/bench_chunking.py's policy, 20 TransferCube
    # tuning states): 0/20 successes at 1.0, 5 at 0.5, 14 at 0.25, 18 at 0.1, 16 at 0.
    noise_scale: float = 1.0

    def __post_init__(self) -> None:
        _require_positive(self, skip=('noise_scale',))
        if not 0.0 <= self.noise_scale <= 10.0:
            raise ValueError(f'LowDimFlowConfig.noise_scale must be in [0, 10], got '
                             f'{self.noise_scale}')


@register_policy
class LowDimFlowPolicy(Policy):
    """State MLP encoder + MLP velocity field over the flattened (H, D) chunk."""

    type_name = 'lowdim_flow'
    config_class = LowDimFlowConfig
    supports_guided_prefix = True

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
        return self.encoder(_normalized_state(self, batch))

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
        return self.sample_chunks_and_features(batch, generator)[0]

    @torch.no_grad()
    def sample_chunks_and_features(self, batch: dict[str, Any],
                                   generator: torch.Generator | None = None
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encode(batch)
        shape = (features.shape[0], self.config.horizon, self.config.action_dim)
        x = euler_sample(self._velocity_fn(features), shape, self.config.num_inference_steps,
                         features.device, generator, self.config.noise_scale)
        return x * self.actions_std + self.actions_mean, features

    @torch.no_grad()
    def sample_guided_chunks(self, batch: dict[str, Any], prefix: torch.Tensor,
                             weights: torch.Tensor, generator: torch.Generator | None = None,
                             max_guidance: float = 5.0) -> torch.Tensor:
        """Chunks (B, H, D) guided towards `prefix` (robot units); see Policy."""
        features = self.encode(batch)
        target = (prefix.float() - self.actions_mean) / self.actions_std
        x = guided_euler_sample(self._velocity_fn(features), target, weights,
                                self.config.num_inference_steps, generator, max_guidance,
                                self.config.noise_scale)
        return x * self.actions_std + self.actions_mean


@dataclass(frozen=True)
class LowDimChunkConfig:
    """Sizes of the L2 chunk regressor."""

    state_dim: int
    action_dim: int
    horizon: int = 20
    feature_dim: int = 256
    hidden_dim: int = 512
    num_layers: int = 2

    def __post_init__(self) -> None:
        _require_positive(self)


@register_policy
class LowDimChunkPolicy(Policy):
    """State MLP encoder + MLP head regressing the (H, D) chunk in normalised units."""

    type_name = 'lowdim_chunk'
    config_class = LowDimChunkConfig

    def __init__(self, config: LowDimChunkConfig) -> None:
        super().__init__(config)
        c = config
        self.encoder = mlp([c.state_dim, c.hidden_dim, c.feature_dim])
        self.head = mlp([c.feature_dim, *[c.hidden_dim] * c.num_layers,
                         c.horizon * c.action_dim])
        self.register_normalization(c.state_dim, c.action_dim)

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    def encode(self, batch: dict[str, Any]) -> torch.Tensor:
        # A nonlinearity between the encoder's last Linear and the head's first one; else
        # the two would collapse into one linear map.
        return torch.nn.functional.gelu(self.encoder(_normalized_state(self, batch)))

    def _predict(self, features: torch.Tensor) -> torch.Tensor:
        c = self.config
        return self.head(features).view(-1, c.horizon, c.action_dim)

    def per_sample_loss(self, batch: dict[str, Any],
                        features: torch.Tensor | None = None) -> torch.Tensor:
        features = self.encode(batch) if features is None else features
        actions = (batch['actions'].float() - self.actions_mean) / self.actions_std
        return masked_mse(self._predict(features), actions, batch['action_mask'],
                          batch.get('dim_mask'))

    @torch.no_grad()
    def sample_chunks(self, batch: dict[str, Any],
                      generator: torch.Generator | None = None) -> torch.Tensor:
        return self.sample_chunks_and_features(batch, generator)[0]

    @torch.no_grad()
    def sample_chunks_and_features(self, batch: dict[str, Any],
                                   generator: torch.Generator | None = None
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
        del generator  # deterministic
        features = self.encode(batch)
        return self._predict(features) * self.actions_std + self.actions_mean, features
