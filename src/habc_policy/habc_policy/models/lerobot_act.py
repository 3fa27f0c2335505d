"""LeRobot's ACT, in-tree and weight-compatible: load a LeRobot ACT folder without lerobot.

Why converted and not installed: lerobot 0.4.4 declares torch<2.11 and huggingface-hub<0.36
(our lock pins 2.13.0 and 2.4.0), and even its ACT config module imports torchvision,
datasets, pandas and accelerate; PyPI's torchvision does not import beside the CPU torch
wheel. docs/pretrained_vla.md has the evidence.

A LeRobot (>= 0.4) ACT policy folder, as `ACTPolicy.save_pretrained` and the processor
pipelines' `save_pretrained` write it:

    config.json                   ACTConfig as draccus dumps it, with "type": "act"
    model.safetensors             the ACTPolicy state dict: every key starts with 'model.'
    policy_preprocessor.json      pipeline steps; its 'normalizer_processor' step names ...
    policy_preprocessor_step_3_normalizer_processor.safetensors   ... the stats it applies
                                  ('observation.state.mean', 'action.std', ...)
    policy_postprocessor.json     its 'unnormalizer_processor' step unnormalises the action
    policy_postprocessor_step_0_unnormalizer_processor.safetensors

Weight mapping: the identity. `LeRobotACT.model` is built with LeRobot's module names
(torchvision's for the ResNet), so LeRobot key 'model.X' is habc key 'model.X'. What LeRobot
keeps in the processor files, habc keeps as buffers beside the model: state_mean/std,
actions_mean/std (names shared with habc's other policies) and image_mean/std (V, 3, 1, 1),
all in habc's own checkpoint format (type 'lerobot_act').

Batches are habc's: 'images' (B, V, H, W, 3) uint8 in the checkpoint's camera order,
'state' (B, S), 'actions' (B, H, D) in robot units, 'action_mask' (B, H), 'dim_mask' (B, D).
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
import json
import math
from pathlib import Path
from typing import Any
import zlib

import numpy as np
from safetensors.torch import load_file, save_file
import torch
from torch import nn
import torch.nn.functional as F  # noqa: N812

from habc_policy.models.base import Policy, register_policy

LEROBOT_CONFIG = 'config.json'
LEROBOT_WEIGHTS = 'model.safetensors'
PREPROCESSOR = 'policy_preprocessor'
POSTPROCESSOR = 'policy_postprocessor'
STATE_KEY = 'observation.state'
ACTION_KEY = 'action'
SUPPORTED_TYPES = ('act',)
LEROBOT_FOLDER_EXPECTED = (f'a LeRobot policy folder holds {LEROBOT_CONFIG} (with "type"), '
                           f'{LEROBOT_WEIGHTS}, {PREPROCESSOR}.json and {POSTPROCESSOR}.json, '
                           "as LeRobot's save_pretrained writes them")
# Types LeRobot 0.4.4 registers: named in the error so that a user knows it is a LeRobot
# checkpoint this adapter cannot read yet, not a broken folder.
LEROBOT_TYPES = ('act', 'diffusion', 'groot', 'pi0', 'pi0_fast', 'pi05', 'sac', 'smolvla',
                 'tdmpc', 'vqbet', 'wall_x', 'xvla', 'reward_classifier', 'sarm')
NORM_MODES = ('MEAN_STD', 'MIN_MAX', 'IDENTITY', 'QUANTILES', 'QUANTILE10')

# lerobot/policies/act/configuration_act.py 0.4.4 (and PreTrainedConfig's fields before it),
# in the order draccus writes config.json. Only used to write LeRobot folders.
LEROBOT_ACT_DEFAULTS: dict[str, Any] = {
    'type': 'act',
    'n_obs_steps': 1,
    'input_features': {},
    'output_features': {},
    'device': 'cpu',
    'use_amp': False,
    'use_peft': False,
    'push_to_hub': True,
    'repo_id': None,
    'private': None,
    'tags': None,
    'license': None,
    'pretrained_path': None,
    'chunk_size': 100,
    'n_action_steps': 100,
    'normalization_mapping': {'VISUAL': 'MEAN_STD', 'STATE': 'MEAN_STD', 'ACTION': 'MEAN_STD'},
    'vision_backbone': 'resnet18',
    'pretrained_backbone_weights': 'ResNet18_Weights.IMAGENET1K_V1',
    'replace_final_stride_with_dilation': False,
    'pre_norm': False,
    'dim_model': 512,
    'n_heads': 8,
    'dim_feedforward': 3200,
    'feedforward_activation': 'relu',
    'n_encoder_layers': 4,
    'n_decoder_layers': 1,
    'use_vae': True,
    'latent_dim': 32,
    'n_vae_encoder_layers': 4,
    'temporal_ensemble_coeff': None,
    'dropout': 0.1,
    'kl_weight': 10.0,
    'optimizer_lr': 1e-05,
    'optimizer_weight_decay': 0.0001,
    'optimizer_lr_backbone': 1e-05,
}
# The architecture fields that LeRobotACTConfig mirrors one to one.
_ARCH_FIELDS = ('chunk_size', 'n_action_steps', 'vision_backbone',
                'replace_final_stride_with_dilation', 'pre_norm', 'dim_model', 'n_heads',
                'dim_feedforward', 'feedforward_activation', 'n_encoder_layers',
                'n_decoder_layers', 'use_vae', 'latent_dim', 'n_vae_encoder_layers',
                'temporal_ensemble_coeff', 'dropout', 'kl_weight')
# torchvision's ResNets: (block, blocks per layer).
RESNETS = {'resnet18': ('basic', (2, 2, 2, 2)), 'resnet34': ('basic', (3, 4, 6, 3)),
           'resnet50': ('bottleneck', (3, 4, 6, 3)), 'resnet101': ('bottleneck', (3, 4, 23, 3)),
           'resnet152': ('bottleneck', (3, 8, 36, 3))}


class LeRobotFormatError(ValueError):
    """A folder is not a LeRobot checkpoint this adapter can read; the message says why."""


class LeRobotConfigView:
    """What habc reads off every LeRobot policy config (ACT, SmolVLA): chunk, cameras, size.

    A base of the frozen config dataclasses; they hold chunk_size, camera_names,
    image_size, image_width and normalization_mapping.
    """

    @property
    def horizon(self) -> int:
        return self.chunk_size

    @property
    def num_views(self) -> int:
        return len(self.camera_names)

    @property
    def image_shape(self) -> tuple[int, int]:
        return self.image_size, self.image_width or self.image_size

    def check_normalization_mapping(self) -> None:
        """Raise ValueError for a normalisation mode that habc cannot apply."""
        for kind, mode in self.normalization_mapping.items():
            if mode not in NORM_MODES:
                raise ValueError(f'normalization_mapping[{kind!r}] = {mode!r} is not one of '
                                 f'{NORM_MODES}')


@dataclass(frozen=True)
class LeRobotACTConfig(LeRobotConfigView):
    """LeRobot's ACTConfig architecture fields, plus the robot interface they imply.

    state_dim / action_dim / camera_names / image size come from the LeRobot features
    ('observation.state', 'action', 'observation.images.*' in their order).
    """

    state_dim: int = 14
    action_dim: int = 14
    camera_names: list[str] = field(default_factory=lambda: ['observation.images.top'])
    image_size: int = 96          # height of the images the checkpoint was trained on
    image_width: int = 0          # 0 = square (image_size)
    chunk_size: int = 100
    n_action_steps: int = 100
    vision_backbone: str = 'resnet18'
    replace_final_stride_with_dilation: bool = False
    pre_norm: bool = False
    dim_model: int = 512
    n_heads: int = 8
    dim_feedforward: int = 3200
    feedforward_activation: str = 'relu'
    n_encoder_layers: int = 4
    n_decoder_layers: int = 1
    use_vae: bool = True
    latent_dim: int = 32
    n_vae_encoder_layers: int = 4
    temporal_ensemble_coeff: float | None = None
    dropout: float = 0.1
    kl_weight: float = 10.0
    # FeatureType -> NormalizationMode, and the eps LeRobot's normaliser adds to std.
    normalization_mapping: dict = field(default_factory=lambda: {
        'VISUAL': 'MEAN_STD', 'STATE': 'MEAN_STD', 'ACTION': 'MEAN_STD'})
    norm_eps: float = 1e-8
    # LeRobot feature keys that had statistics (LeRobot leaves the others unnormalised).
    normalized_features: list[str] = field(default_factory=list)
    # The rest of the LeRobot config.json (optimizer presets, repo id, ...), kept for export.
    lerobot_extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ('state_dim', 'action_dim', 'image_size', 'chunk_size', 'n_action_steps',
                     'dim_model', 'n_heads', 'dim_feedforward', 'n_encoder_layers',
                     'n_decoder_layers', 'latent_dim'):
            if getattr(self, name) < 1:
                raise ValueError(f'LeRobotACTConfig.{name} must be >= 1, got '
                                 f'{getattr(self, name)}')
        if not self.camera_names:
            raise ValueError('LeRobotACTConfig.camera_names must name at least one camera: '
                             "habc's robots observe through images")
        if self.vision_backbone not in RESNETS:
            raise ValueError(f'vision_backbone {self.vision_backbone!r} is not one of '
                             f'{sorted(RESNETS)}')
        if (self.replace_final_stride_with_dilation
                and RESNETS[self.vision_backbone][0] == 'basic'):
            raise ValueError(f'replace_final_stride_with_dilation needs a bottleneck ResNet; '
                             f'{self.vision_backbone} has basic blocks (torchvision refuses too)')
        if self.dim_model % self.n_heads:
            raise ValueError(f'dim_model {self.dim_model} must be divisible by n_heads '
                             f'{self.n_heads}')
        if self.feedforward_activation not in ('relu', 'gelu'):
            raise ValueError(f"feedforward_activation must be 'relu' or 'gelu', got "
                             f'{self.feedforward_activation!r}')
        if self.n_action_steps > self.chunk_size:
            raise ValueError(f'n_action_steps {self.n_action_steps} > chunk_size '
                             f'{self.chunk_size}')
        self.check_normalization_mapping()



# ---------------------------------------------------------------------------------------
# The network, with LeRobot's (and torchvision's) module names.


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.FrozenBatchNorm2d: BatchNorm with fixed statistics (DETR, ACT)."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer('weight', torch.ones(channels))
        self.register_buffer('bias', torch.zeros(channels))
        self.register_buffer('running_mean', torch.zeros(channels))
        self.register_buffer('running_var', torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torchvision's arithmetic, step for step, so the results match to the last bit.
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1)
                                                    + self.eps).rsqrt()
        bias = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        return x * scale + bias


def _conv(cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    padding = dilation if kernel == 3 else 0
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation,
                     bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, downsample: nn.Module | None,
                 dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv(cin, planes, 3, stride)
        self.bn1 = FrozenBatchNorm2d(planes)
        self.conv2 = _conv(planes, planes, 3)
        self.bn2 = FrozenBatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    """torchvision's ResNet V1.5 bottleneck: the stride sits on the 3x3 conv."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, downsample: nn.Module | None,
                 dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv(cin, planes, 1)
        self.bn1 = FrozenBatchNorm2d(planes)
        self.conv2 = _conv(planes, planes, 3, stride, dilation)
        self.bn2 = FrozenBatchNorm2d(planes)
        self.conv3 = _conv(planes, planes * 4, 1)
        self.bn3 = FrozenBatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + identity)


class ResNetTrunk(nn.Module):
    """torchvision's ResNet up to layer4 (IntermediateLayerGetter drops avgpool and fc).

    Written here because PyPI's torchvision does not load beside the CPU torch wheel; the
    parameter names are torchvision's, so LeRobot's 'model.backbone.*' keys load unchanged.
    """

    def __init__(self, name: str, dilate_last: bool = False) -> None:
        super().__init__()
        kind, blocks = RESNETS[name]
        block = BasicBlock if kind == 'basic' else Bottleneck
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = FrozenBatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self._cin, self._dilation = 64, 1
        self.layer1 = self._layer(block, 64, blocks[0], 1)
        self.layer2 = self._layer(block, 128, blocks[1], 2)
        self.layer3 = self._layer(block, 256, blocks[2], 2)
        self.layer4 = self._layer(block, 512, blocks[3], 2, dilate=dilate_last)
        self.out_channels = 512 * block.expansion

    def _layer(self, block: type, planes: int, count: int, stride: int,
               dilate: bool = False) -> nn.Sequential:
        previous_dilation = self._dilation
        if dilate:
            self._dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self._cin != planes * block.expansion:
            downsample = nn.Sequential(_conv(self._cin, planes * block.expansion, 1, stride),
                                       FrozenBatchNorm2d(planes * block.expansion))
        layers = [block(self._cin, planes, stride, downsample, previous_dilation)]
        self._cin = planes * block.expansion
        layers += [block(self._cin, planes, 1, None, self._dilation) for _ in range(count - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class EncoderLayer(nn.Module):
    """LeRobot's ACTEncoderLayer (post-norm unless pre_norm), (S, B, D) layout."""

    def __init__(self, c: LeRobotACTConfig) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(c.dim_model, c.n_heads, dropout=c.dropout)
        self.linear1 = nn.Linear(c.dim_model, c.dim_feedforward)
        self.dropout = nn.Dropout(c.dropout)
        self.linear2 = nn.Linear(c.dim_feedforward, c.dim_model)
        self.norm1 = nn.LayerNorm(c.dim_model)
        self.norm2 = nn.LayerNorm(c.dim_model)
        self.dropout1 = nn.Dropout(c.dropout)
        self.dropout2 = nn.Dropout(c.dropout)
        self.activation = F.relu if c.feedforward_activation == 'relu' else F.gelu
        self.pre_norm = c.pre_norm

    def forward(self, x: torch.Tensor, pos_embed: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        skip = x
        if self.pre_norm:
            x = self.norm1(x)
        q = k = x if pos_embed is None else x + pos_embed
        x = self.self_attn(q, k, value=x, key_padding_mask=key_padding_mask)[0]
        x = skip + self.dropout1(x)
        if self.pre_norm:
            skip = x
            x = self.norm2(x)
        else:
            x = self.norm1(x)
            skip = x
        x = self.linear2(self.dropout(self.activation(self.linear1(x))))
        x = skip + self.dropout2(x)
        if not self.pre_norm:
            x = self.norm2(x)
        return x


class Encoder(nn.Module):
    def __init__(self, c: LeRobotACTConfig, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(c) for _ in range(num_layers)])
        self.norm = nn.LayerNorm(c.dim_model) if c.pre_norm else nn.Identity()

    def forward(self, x: torch.Tensor, pos_embed: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, pos_embed=pos_embed, key_padding_mask=key_padding_mask)
        return self.norm(x)


class DecoderLayer(nn.Module):
    """LeRobot's ACTDecoderLayer: self-attention, cross-attention to the encoder, FFN."""

    def __init__(self, c: LeRobotACTConfig) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(c.dim_model, c.n_heads, dropout=c.dropout)
        self.multihead_attn = nn.MultiheadAttention(c.dim_model, c.n_heads, dropout=c.dropout)
        self.linear1 = nn.Linear(c.dim_model, c.dim_feedforward)
        self.dropout = nn.Dropout(c.dropout)
        self.linear2 = nn.Linear(c.dim_feedforward, c.dim_model)
        self.norm1 = nn.LayerNorm(c.dim_model)
        self.norm2 = nn.LayerNorm(c.dim_model)
        self.norm3 = nn.LayerNorm(c.dim_model)
        self.dropout1 = nn.Dropout(c.dropout)
        self.dropout2 = nn.Dropout(c.dropout)
        self.dropout3 = nn.Dropout(c.dropout)
        self.activation = F.relu if c.feedforward_activation == 'relu' else F.gelu
        self.pre_norm = c.pre_norm

    def forward(self, x: torch.Tensor, encoder_out: torch.Tensor,
                decoder_pos_embed: torch.Tensor, encoder_pos_embed: torch.Tensor) -> torch.Tensor:
        skip = x
        if self.pre_norm:
            x = self.norm1(x)
        q = k = x + decoder_pos_embed
        x = self.self_attn(q, k, value=x)[0]
        x = skip + self.dropout1(x)
        if self.pre_norm:
            skip = x
            x = self.norm2(x)
        else:
            x = self.norm1(x)
            skip = x
        x = self.multihead_attn(query=x + decoder_pos_embed,
                                key=encoder_out + encoder_pos_embed, value=encoder_out)[0]
        x = skip + self.dropout2(x)
        if self.pre_norm:
            skip = x
            x = self.norm3(x)
        else:
            x = self.norm2(x)
            skip = x
        x = self.linear2(self.dropout(self.activation(self.linear1(x))))
        x = skip + self.dropout3(x)
        if not self.pre_norm:
            x = self.norm3(x)
        return x


class Decoder(nn.Module):
    def __init__(self, c: LeRobotACTConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([DecoderLayer(c) for _ in range(c.n_decoder_layers)])
        self.norm = nn.LayerNorm(c.dim_model)

    def forward(self, x: torch.Tensor, encoder_out: torch.Tensor,
                decoder_pos_embed: torch.Tensor, encoder_pos_embed: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, encoder_out, decoder_pos_embed, encoder_pos_embed)
        return self.norm(x)


def sinusoidal_table(num_positions: int, dimension: int) -> torch.Tensor:
    """LeRobot's create_sinusoidal_pos_embedding (float64 numpy, then float32), verbatim."""
    table = np.array([[pos / np.power(10000, 2 * (j // 2) / dimension)
                       for j in range(dimension)] for pos in range(num_positions)])
    table[:, 0::2] = np.sin(table[:, 0::2])
    table[:, 1::2] = np.cos(table[:, 1::2])
    return torch.from_numpy(table).float()


def sinusoidal_2d(feature_map: torch.Tensor, dimension: int) -> torch.Tensor:
    """LeRobot's ACTSinusoidalPositionEmbedding2d: (B, C, h, w) map -> (1, 2 dimension, h, w).

    Positions are 1..h and 1..w scaled to (0, 2 pi], as in DETR and the original ACT.
    """
    not_mask = torch.ones_like(feature_map[0, :1])
    y_range = not_mask.cumsum(1, dtype=torch.float32)
    x_range = not_mask.cumsum(2, dtype=torch.float32)
    y_range = y_range / (y_range[:, -1:, :] + 1e-6) * (2 * math.pi)
    x_range = x_range / (x_range[:, :, -1:] + 1e-6) * (2 * math.pi)
    inverse_frequency = 10000 ** (2 * (torch.arange(dimension, dtype=torch.float32,
                                                    device=feature_map.device) // 2) / dimension)
    x_range = x_range.unsqueeze(-1) / inverse_frequency
    y_range = y_range.unsqueeze(-1) / inverse_frequency
    pos_x = torch.stack((x_range[..., 0::2].sin(), x_range[..., 1::2].cos()), dim=-1).flatten(3)
    pos_y = torch.stack((y_range[..., 0::2].sin(), y_range[..., 1::2].cos()), dim=-1).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class ACTModel(nn.Module):
    """LeRobot's `ACT` module: same submodules, same names, same arithmetic.

    Inputs are normalised already: state (B, S), images (B, V, 3, H, W), actions (B, H, D).
    """

    def __init__(self, c: LeRobotACTConfig) -> None:
        super().__init__()
        self.config = c
        d = c.dim_model
        if c.use_vae:
            self.vae_encoder = Encoder(c, c.n_vae_encoder_layers)
            self.vae_encoder_cls_embed = nn.Embedding(1, d)
            self.vae_encoder_robot_state_input_proj = nn.Linear(c.state_dim, d)
            self.vae_encoder_action_input_proj = nn.Linear(c.action_dim, d)
            self.vae_encoder_latent_output_proj = nn.Linear(d, 2 * c.latent_dim)
            self.register_buffer('vae_encoder_pos_enc',
                                 sinusoidal_table(2 + c.chunk_size, d).unsqueeze(0))
        self.backbone = ResNetTrunk(c.vision_backbone, c.replace_final_stride_with_dilation)
        self.encoder = Encoder(c, c.n_encoder_layers)
        self.decoder = Decoder(c)
        self.encoder_robot_state_input_proj = nn.Linear(c.state_dim, d)
        self.encoder_latent_input_proj = nn.Linear(c.latent_dim, d)
        self.encoder_img_feat_input_proj = nn.Conv2d(self.backbone.out_channels, d, 1)
        self.encoder_1d_feature_pos_embed = nn.Embedding(2, d)   # latent, robot state
        self.decoder_pos_embed = nn.Embedding(c.chunk_size, d)
        self.action_head = nn.Linear(d, c.action_dim)
        for p in list(self.encoder.parameters()) + list(self.decoder.parameters()):
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def observation_tokens(self, state: torch.Tensor,
                           images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the observation's encoder tokens (1 + V h w, B, D) and positions (S, 1, D).

        The latent token comes first in the encoder and is not part of these tokens; the
        positions include its slot.
        """
        b, v = images.shape[:2]
        # All views through the backbone at once (LeRobot loops over cameras; the frozen
        # BatchNorm makes each image's features independent of its batch).
        features = self.backbone(images.flatten(0, 1))                 # (B V, C, h, w)
        pos = sinusoidal_2d(features, self.config.dim_model // 2).to(features.dtype)
        tokens = self.encoder_img_feat_input_proj(features)            # (B V, D, h, w)
        hw = tokens.shape[-2] * tokens.shape[-1]
        # (B V, D, h, w) -> (V h w, B, D): camera-major, then row-major pixels, as LeRobot.
        tokens = tokens.reshape(b, v, -1, hw).permute(1, 3, 0, 2).reshape(v * hw, b, -1)
        pos = pos.flatten(2).permute(2, 0, 1).repeat(v, 1, 1)          # (V h w, 1, D)
        state_token = self.encoder_robot_state_input_proj(state)[None]
        positions = torch.cat([self.encoder_1d_feature_pos_embed.weight.unsqueeze(1), pos])
        return torch.cat([state_token, tokens]), positions

    def posterior(self, state: torch.Tensor, actions: torch.Tensor,
                  action_is_pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the VAE encoder's latent mean and 2 log sigma (B, L) for the target chunk."""
        b = state.shape[0]
        cls = self.vae_encoder_cls_embed.weight[None].expand(b, -1, -1)
        inputs = torch.cat([cls, self.vae_encoder_robot_state_input_proj(state)[:, None],
                            self.vae_encoder_action_input_proj(actions)], dim=1)
        pos = self.vae_encoder_pos_enc.clone().detach()
        pad = torch.cat([torch.zeros(b, 2, dtype=torch.bool, device=state.device),
                         action_is_pad], dim=1)
        out = self.vae_encoder(inputs.permute(1, 0, 2), pos_embed=pos.permute(1, 0, 2),
                               key_padding_mask=pad)[0]
        params = self.vae_encoder_latent_output_proj(out)
        return params[:, :self.config.latent_dim], params[:, self.config.latent_dim:]

    def encode_tokens(self, latent: torch.Tensor, obs_tokens: torch.Tensor,
                      positions: torch.Tensor) -> torch.Tensor:
        """Run the transformer encoder (S, B, D) on a latent and the observation tokens."""
        tokens = torch.cat([self.encoder_latent_input_proj(latent)[None], obs_tokens])
        return self.encoder(tokens, pos_embed=positions)

    def decode(self, encoder_out: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Decode the normalised action chunk (B, H, D) from the encoder output."""
        c = self.config
        queries = torch.zeros((c.chunk_size, encoder_out.shape[1], c.dim_model),
                              dtype=positions.dtype, device=positions.device)
        out = self.decoder(queries, encoder_out, self.decoder_pos_embed.weight.unsqueeze(1),
                           positions)
        return self.action_head(out.transpose(0, 1))


# ---------------------------------------------------------------------------------------
# The habc policy.


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


@register_policy
class LeRobotACT(Policy):
    """LeRobot's ACT behind habc's Policy interface; loads and writes LeRobot folders."""

    type_name = 'lerobot_act'
    config_class = LeRobotACTConfig

    def __init__(self, config: LeRobotACTConfig) -> None:
        super().__init__(config)
        self.model = ACTModel(config)
        self.register_normalization(config.state_dim, config.action_dim)
        self.register_buffer('image_mean', torch.zeros(config.num_views, 3, 1, 1))
        self.register_buffer('image_std', torch.ones(config.num_views, 3, 1, 1))

    @property
    def feature_dim(self) -> int:
        return 2 * self.config.dim_model

    # Normalisation, as LeRobot's NormalizerProcessorStep computes it -------------------

    def _eps(self, feature_type: str) -> float:
        mode = self.config.normalization_mapping.get(feature_type, 'IDENTITY')
        return self.config.norm_eps if mode == 'MEAN_STD' else 0.0

    def _inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised state (B, S) and images (B, V, 3, H, W) of a habc batch."""
        c = self.config
        images = torch.as_tensor(batch['images'])
        if images.ndim != 5 or images.shape[1] != c.num_views or images.shape[-1] != 3:
            raise ValueError(f'images must be (B, {c.num_views}, H, W, 3) for the cameras '
                             f'{c.camera_names}, got {tuple(images.shape)}')
        device = self.state_mean.device
        images = images.to(device).permute(0, 1, 4, 2, 3)
        # LeRobot's datasets hand ACT float images in [0, 1]; uint8 is what habc records.
        images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        images = (images - self.image_mean) / (self.image_std + self._eps('VISUAL'))
        state = torch.as_tensor(batch['state']).to(device).float()
        if state.ndim != 2 or state.shape[1] != c.state_dim:
            raise ValueError(f'state must be (B, {c.state_dim}), got {tuple(state.shape)}')
        state = (state - self.state_mean) / (self.state_std + self._eps('STATE'))
        return state, images

    def _target(self, batch: dict[str, Any]) -> torch.Tensor:
        actions = torch.as_tensor(batch['actions']).to(self.actions_mean.device).float()
        expected = (self.config.chunk_size, self.config.action_dim)
        if actions.shape[1:] != expected:
            raise ValueError(f'actions must be (B, {expected[0]}, {expected[1]}) (chunk_size, '
                             f'action_dim of the checkpoint), got {tuple(actions.shape)}')
        return (actions - self.actions_mean) / (self.actions_std + self._eps('ACTION'))

    # Policy interface ------------------------------------------------------------------

    def _features(self, obs_tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Pooled encoder output with the prior's latent (zeros), no dropout, no gradient.

        The critic reads the same features in training and at inference, whatever the VAE
        sampled for the loss: [mean over all encoder tokens, the robot-state token].
        """
        latent = obs_tokens.new_zeros(obs_tokens.shape[1], self.config.latent_dim)
        with torch.no_grad(), _eval_mode(self.model.encoder):
            out = self.model.encode_tokens(latent, obs_tokens.detach(), positions.detach())
        return torch.cat([out.mean(0), out[1]], dim=-1)

    def encode(self, batch: dict[str, Any]) -> torch.Tensor:
        with torch.no_grad():
            state, images = self._inputs(batch)
            return self._features(*self.model.observation_tokens(state, images))

    def _loss(self, batch: dict[str, Any], state: torch.Tensor, obs_tokens: torch.Tensor,
              positions: torch.Tensor) -> torch.Tensor:
        c = self.config
        target = self._target(batch)
        mask = torch.as_tensor(batch['action_mask']).to(target.device).bool()
        if c.use_vae and self.training:
            mu, log_sigma_x2 = self.model.posterior(state, target, ~mask)
            latent = mu + log_sigma_x2.div(2).exp() * torch.randn_like(mu)
        else:
            mu = log_sigma_x2 = None
            latent = state.new_zeros(state.shape[0], c.latent_dim)
        predicted = self.model.decode(self.model.encode_tokens(latent, obs_tokens, positions),
                                      positions)
        # ACT's L1 loss, averaged per sample over the steps inside the episode and the
        # dimensions that count (LeRobot averages over the whole batch, pads included).
        weights = mask[:, :, None].to(predicted.dtype).expand_as(predicted)
        if batch.get('dim_mask') is not None:
            dim_mask = torch.as_tensor(batch['dim_mask']).to(predicted.device)
            weights = weights * dim_mask[:, None, :].to(predicted.dtype)
        error = (predicted - target).abs() * weights
        loss = error.sum(dim=(1, 2)) / weights.sum(dim=(1, 2)).clamp(min=1.0)
        if mu is not None:
            # KL(q(z | a, s) || N(0, I)), summed over the latent: LeRobot's term, per sample.
            kld = (-0.5 * (1 + log_sigma_x2 - mu.pow(2) - log_sigma_x2.exp())).sum(-1)
            loss = loss + c.kl_weight * kld
        return loss

    def per_sample_loss(self, batch: dict[str, Any],
                        features: torch.Tensor | None = None) -> torch.Tensor:
        # Pooled features cannot rebuild the image tokens: features_and_loss shares them.
        state, images = self._inputs(batch)
        obs_tokens, positions = self.model.observation_tokens(state, images)
        return self._loss(batch, state, obs_tokens, positions)

    def features_and_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Critic features and per-sample loss from one backbone pass."""
        state, images = self._inputs(batch)
        obs_tokens, positions = self.model.observation_tokens(state, images)
        loss = self._loss(batch, state, obs_tokens, positions)
        return self._features(obs_tokens, positions), loss

    @torch.no_grad()
    def sample_chunks(self, batch: dict[str, Any],
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """ACT's chunk (B, H, D) in robot units: deterministic, the prior's latent (zeros)."""
        with _eval_mode(self):
            state, images = self._inputs(batch)
            obs_tokens, positions = self.model.observation_tokens(state, images)
            latent = state.new_zeros(state.shape[0], self.config.latent_dim)
            chunk = self.model.decode(self.model.encode_tokens(latent, obs_tokens, positions),
                                      positions)
        return chunk * self.actions_std + self.actions_mean

    # LeRobot folders -------------------------------------------------------------------

    def set_lerobot_stats(self, stats: dict[str, dict[str, torch.Tensor]]) -> None:
        """Set the normalisation buffers from LeRobot's per-feature statistics.

        Every mode becomes (x - mean) / std: MIN_MAX's 2 (x - min) / (max - min) - 1 is
        mean = (min + max) / 2, std = (max - min) / 2, and the quantile modes alike. A
        feature without statistics stays unnormalised, as LeRobot leaves it.
        """
        apply_lerobot_stats(self, stats)

    def lerobot_stats(self) -> dict[str, dict[str, torch.Tensor]]:
        """Return the statistics as LeRobot stores them (MEAN_STD and MIN_MAX modes)."""
        c = self.config
        slots = {STATE_KEY: ('STATE', self.state_mean, self.state_std),
                 ACTION_KEY: ('ACTION', self.actions_mean, self.actions_std)}
        for i, name in enumerate(c.camera_names):
            slots[name] = ('VISUAL', self.image_mean[i], self.image_std[i])
        stats = {}
        for key in c.normalized_features:
            kind, mean, std = slots[key]
            mode = c.normalization_mapping.get(kind, 'IDENTITY')
            mean, std = mean.detach().cpu().clone(), std.detach().cpu().clone()
            if mode == 'MEAN_STD':
                stats[key] = {'mean': mean, 'std': std}
            elif mode == 'MIN_MAX':
                stats[key] = {'min': mean - std, 'max': mean + std}
            elif mode != 'IDENTITY':
                raise NotImplementedError(f'writing {mode} statistics of {key!r} to a LeRobot '
                                          'folder is not supported')
        return stats

    def save_lerobot(self, directory: Path) -> None:
        """Write a LeRobot 0.4 ACT folder that LeRobot's from_pretrained loads."""
        write_lerobot_act(Path(directory), self.config, self.model.state_dict(),
                          self.lerobot_stats())

    @classmethod
    def from_lerobot(cls, path: Path, map_location: str = 'cpu') -> 'LeRobotACT':
        """Load a LeRobot ACT policy folder (local files only; nothing is downloaded)."""
        path = Path(path)
        config = read_lerobot_config(path)
        stats = read_lerobot_stats(path)
        config = _with(config, normalized_features=[
            key for key in [STATE_KEY, ACTION_KEY, *config.camera_names] if key in stats])
        policy = cls(config)
        state = load_file(str(path / LEROBOT_WEIGHTS), device=map_location)
        model_state = {k[len('model.'):]: v for k, v in state.items() if k.startswith('model.')}
        foreign = sorted(k for k in state if not k.startswith('model.'))
        if any(k.startswith(('normalize_inputs.', 'unnormalize_outputs.')) for k in foreign):
            raise LeRobotFormatError(
                f'{path / LEROBOT_WEIGHTS} holds normalisation buffers: it was written by '
                "LeRobot < 0.4. Migrate it with LeRobot's "
                'lerobot/processor/migrate_policy_normalization.py, then load the result')
        try:
            missing, unexpected = policy.model.load_state_dict(model_state, strict=False)
        except RuntimeError as exc:     # a shape that its config.json does not imply
            raise LeRobotFormatError(f'{path / LEROBOT_WEIGHTS} does not match its '
                                     f'{LEROBOT_CONFIG}: {exc}') from exc
        if missing or unexpected or foreign:
            raise LeRobotFormatError(
                f'{path / LEROBOT_WEIGHTS} does not match its {LEROBOT_CONFIG}: missing '
                f'{["model." + k for k in missing]}, unexpected '
                f'{["model." + k for k in unexpected] + foreign}')
        policy.set_lerobot_stats(stats)
        policy.to(map_location)
        policy.version = f'lerobot:{path.resolve().name}'
        return policy


def _with(config: LeRobotACTConfig, **changes: Any) -> LeRobotACTConfig:
    values = {name: getattr(config, name) for name in config.__dataclass_fields__}
    values.update(changes)
    return LeRobotACTConfig(**values)


def _mean_std(key: str, mode: str, stats: dict[str, torch.Tensor],
              eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    names = {'MEAN_STD': ('mean', 'std'), 'MIN_MAX': ('min', 'max'),
             'QUANTILES': ('q01', 'q99'), 'QUANTILE10': ('q10', 'q90')}[mode]
    missing = [name for name in names if name not in stats]
    if missing:
        raise LeRobotFormatError(f'{mode} normalisation of {key!r} needs the statistics '
                                 f'{list(names)}; the checkpoint has {sorted(stats)}')
    low, high = (stats[name].float() for name in names)
    if mode == 'MEAN_STD':
        return low, high
    # LeRobot replaces a zero range by eps; half of it is the std of the same map.
    span = torch.where(high - low == 0, torch.full_like(low, eps), high - low)
    return low + span / 2, span / 2


def apply_lerobot_stats(policy: Policy, stats: dict[str, dict[str, torch.Tensor]]) -> None:
    """Set a LeRobot-derived policy's normalisation buffers from LeRobot's statistics.

    Every mode becomes (x - mean) / std: MIN_MAX's 2 (x - min) / (max - min) - 1 is
    mean = (min + max) / 2, std = (max - min) / 2, and the quantile modes alike. A feature
    without statistics stays unnormalised, as LeRobot leaves it. The policy has
    state_mean/std, actions_mean/std, image_mean/std (V, ...) buffers and a config with
    camera_names, normalization_mapping and norm_eps.
    """
    c = policy.config
    slots = {STATE_KEY: ('STATE', policy.state_mean, policy.state_std),
             ACTION_KEY: ('ACTION', policy.actions_mean, policy.actions_std)}
    for i, name in enumerate(c.camera_names):
        slots[name] = ('VISUAL', policy.image_mean[i], policy.image_std[i])
    for key, (kind, mean_buffer, std_buffer) in slots.items():
        mode = c.normalization_mapping.get(kind, 'IDENTITY')
        if key not in stats or mode == 'IDENTITY':
            mean_buffer.fill_(0.0)
            std_buffer.fill_(1.0)
            continue
        mean, std = _mean_std(key, mode, stats[key], c.norm_eps)
        try:
            mean_buffer.copy_(mean.reshape(mean_buffer.shape))
            std_buffer.copy_(std.reshape(std_buffer.shape))
        except RuntimeError as exc:
            raise LeRobotFormatError(f'statistics of {key!r} have shape '
                                     f'{tuple(mean.shape)}, the feature needs '
                                     f'{tuple(mean_buffer.shape)}') from exc


def read_lerobot_json(path: Path) -> tuple[Any, str | None, Path]:
    """Read a LeRobot folder's config.json: (its content, its "type", its path).

    Raises:
        FileNotFoundError: `path` is not a folder.
        LeRobotFormatError: no config.json, not JSON, or a habc checkpoint given by mistake.
    """
    path = Path(path)
    expected = LEROBOT_FOLDER_EXPECTED
    if not path.is_dir():
        raise FileNotFoundError(f'{path} is not a folder: {expected}')
    config_path = path / LEROBOT_CONFIG
    if not config_path.is_file():
        raise LeRobotFormatError(f'{config_path} not found: {expected}')
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise LeRobotFormatError(f'{config_path} is not JSON ({exc}): {expected}') from exc
    kind = raw.get('type') if isinstance(raw, dict) else None
    if isinstance(raw, dict) and isinstance(raw.get('config'), dict) and 'version' in raw:
        raise LeRobotFormatError(f'{path} is a habc checkpoint (type {kind!r}), not a LeRobot '
                                 'folder: load it with habc_policy.models.base.load_policy')
    return raw, kind, config_path


def read_lerobot_config(path: Path) -> LeRobotACTConfig:
    """LeRobotACTConfig from a LeRobot folder's config.json; a clear error otherwise."""
    path = Path(path)
    raw, kind, config_path = read_lerobot_json(path)
    if kind not in SUPPORTED_TYPES:
        known = f'LeRobot policy type {kind!r}' if kind in LEROBOT_TYPES else \
            f'{config_path} has type {kind!r}, which is no LeRobot policy type'
        raise LeRobotFormatError(f'{known}; habc reads LeRobot types {list(SUPPORTED_TYPES)} '
                                 f'(docs/pretrained_vla.md says what the others need)')
    if not (path / LEROBOT_WEIGHTS).is_file():
        raise LeRobotFormatError(f'{path / LEROBOT_WEIGHTS} not found: '
                                 f'{LEROBOT_FOLDER_EXPECTED}')
    inputs, outputs = raw.get('input_features') or {}, raw.get('output_features') or {}
    cameras = [k for k, f in inputs.items() if f.get('type') == 'VISUAL']
    unsupported = [k for k, f in inputs.items() if f.get('type') not in ('VISUAL', 'STATE')
                   or (f.get('type') == 'STATE' and k != STATE_KEY)]
    if unsupported or STATE_KEY not in inputs or not cameras or ACTION_KEY not in outputs:
        raise LeRobotFormatError(
            f'{config_path}: habc feeds ACT {STATE_KEY!r}, one or more VISUAL '
            f"'observation.images.*' and reads {ACTION_KEY!r}; the checkpoint has inputs "
            f'{ {k: f.get("type") for k, f in inputs.items()} } and outputs {list(outputs)}'
            + (f' ({unsupported} are not supported)' if unsupported else ''))
    shapes = {tuple(inputs[k]['shape']) for k in cameras}
    if len(shapes) != 1:
        raise LeRobotFormatError(f'{config_path}: cameras of different shapes {shapes}; ACT '
                                 'needs one image shape')
    _, height, width = shapes.pop()
    if raw.get('n_obs_steps', 1) != 1:
        raise LeRobotFormatError(f'{config_path}: n_obs_steps {raw["n_obs_steps"]}; ACT '
                                 'takes one observation step')
    arch = {name: raw.get(name, LEROBOT_ACT_DEFAULTS[name]) for name in _ARCH_FIELDS}
    extra = {k: v for k, v in raw.items()
             if k not in _ARCH_FIELDS and k not in ('type', 'input_features', 'output_features',
                                                    'normalization_mapping')}
    return LeRobotACTConfig(
        state_dim=int(inputs[STATE_KEY]['shape'][0]),
        action_dim=int(outputs[ACTION_KEY]['shape'][0]),
        camera_names=cameras, image_size=int(height),
        image_width=0 if width == height else int(width),
        normalization_mapping=dict(raw.get('normalization_mapping')
                                   or LEROBOT_ACT_DEFAULTS['normalization_mapping']),
        lerobot_extra=extra, **arch)


def _processor_step(path: Path, pipeline: str, registry_name: str) -> dict[str, Any]:
    config_path = path / f'{pipeline}.json'
    if not config_path.is_file():
        raise LeRobotFormatError(
            f'{config_path} not found: LeRobot >= 0.4 keeps the normalisation statistics in '
            f'{PREPROCESSOR}.json / {POSTPROCESSOR}.json and their .safetensors state files '
            "(a folder of LeRobot < 0.4 needs LeRobot's migrate_policy_normalization.py)")
    steps = json.loads(config_path.read_text()).get('steps', [])
    for step in steps:
        if step.get('registry_name') == registry_name:
            return step
    raise LeRobotFormatError(f'{config_path} has no {registry_name!r} step; its steps: '
                             f'{[s.get("registry_name", s.get("class")) for s in steps]}')


def read_lerobot_stats(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Read LeRobot's per-feature statistics from the processor state files.

    The state and images from the preprocessor's normaliser, the action from the
    postprocessor's unnormaliser (the one that makes robot units).
    """
    stats: dict[str, dict[str, torch.Tensor]] = {}
    for pipeline, name, keep in ((PREPROCESSOR, 'normalizer_processor', 'observation'),
                                 (POSTPROCESSOR, 'unnormalizer_processor', ACTION_KEY)):
        step = _processor_step(path, pipeline, name)
        if 'state_file' not in step:
            continue        # a pipeline built without statistics normalises nothing
        state_path = path / step['state_file']
        if not state_path.is_file():
            raise LeRobotFormatError(f'{state_path} not found: {pipeline}.json names it')
        for flat_key, tensor in load_file(str(state_path)).items():
            key, stat = flat_key.rsplit('.', 1)
            if key == keep or key.startswith(keep + '.'):
                stats.setdefault(key, {})[stat] = tensor.float()
    return stats


def write_lerobot_act(directory: Path, config: LeRobotACTConfig,
                      model_state: dict[str, torch.Tensor],
                      stats: dict[str, dict[str, torch.Tensor]]) -> None:
    """Write the files LeRobot 0.4.4 writes for an ACT policy and its processors.

    `model_state` is an ACTModel state dict (keys without 'model.'); `stats` LeRobot's
    per-feature statistics. The test suite checks the result against a folder that LeRobot
    itself wrote.
    """
    directory.mkdir(parents=True, exist_ok=True)
    c = config
    height, width = c.image_shape
    inputs = {STATE_KEY: {'type': 'STATE', 'shape': [c.state_dim]}}
    for name in c.camera_names:
        inputs[name] = {'type': 'VISUAL', 'shape': [3, height, width]}
    outputs = {ACTION_KEY: {'type': 'ACTION', 'shape': [c.action_dim]}}
    raw = dict(LEROBOT_ACT_DEFAULTS)
    raw.update({k: v for k, v in c.lerobot_extra.items() if k in raw})
    raw.update({name: getattr(c, name) for name in _ARCH_FIELDS})
    raw.update(input_features=inputs, output_features=outputs,
               normalization_mapping=dict(c.normalization_mapping))
    # Weights are in the folder; LeRobot would otherwise try to fetch ImageNet weights.
    raw['pretrained_backbone_weights'] = None
    (directory / LEROBOT_CONFIG).write_text(json.dumps(raw, indent=4))
    state = {f'model.{k}': v.detach().cpu().contiguous() for k, v in model_state.items()}
    save_file(state, str(directory / LEROBOT_WEIGHTS))
    flat = {f'{key}.{stat}': tensor.float().contiguous()
            for key, sub in stats.items() for stat, tensor in sub.items()}
    norm = {'eps': c.norm_eps, 'norm_map': dict(c.normalization_mapping)}
    device = raw.get('device') or 'cpu'
    pre_state = f'{PREPROCESSOR}_step_3_normalizer_processor.safetensors'
    post_state = f'{POSTPROCESSOR}_step_0_unnormalizer_processor.safetensors'
    pre_steps = [
        {'registry_name': 'rename_observations_processor', 'config': {'rename_map': {}}},
        {'registry_name': 'to_batch_processor', 'config': {}},
        {'registry_name': 'device_processor', 'config': {'device': device, 'float_dtype': None}},
        {'registry_name': 'normalizer_processor',
         'config': {'eps': norm['eps'], 'features': {**inputs, **outputs},
                    'norm_map': norm['norm_map']}}]
    post_steps = [
        {'registry_name': 'unnormalizer_processor',
         'config': {'eps': norm['eps'], 'features': outputs, 'norm_map': norm['norm_map']}},
        {'registry_name': 'device_processor', 'config': {'device': 'cpu', 'float_dtype': None}}]
    if flat:
        # LeRobot's pipelines both save every statistic they were given.
        pre_steps[3]['state_file'] = pre_state
        post_steps[0]['state_file'] = post_state
        save_file(flat, str(directory / pre_state))
        save_file(flat, str(directory / post_state))
    for name, steps in ((PREPROCESSOR, pre_steps), (POSTPROCESSOR, post_steps)):
        (directory / f'{name}.json').write_text(
            json.dumps({'name': name, 'steps': steps}, indent=2))


def reproducible_weights(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights for test fixtures that come out bit-identical on every machine and build.

    Integer hashing and one float multiply per value (IEEE-exact), no RNG whose vectorised
    path could differ: a test can rebuild a 45 MB ResNet checkpoint instead of storing it.
    Fan-in scaled uniform weights; norm scales near 1; positive BatchNorm variances. The
    sinusoidal buffer keeps its computed value, as LeRobot saves it.
    """
    out = {}
    for name, tensor in model.state_dict().items():
        if name.endswith('vae_encoder_pos_enc'):
            out[name] = tensor.clone()
            continue
        n = tensor.numel()
        x = (torch.arange(n, dtype=torch.int64) + zlib.crc32(f'{seed}:{name}'.encode())) % 2**31
        for multiplier in (1103515245, 1664525):
            x = (x * multiplier + 12345) % 2**31
            x = x ^ (x >> 13)
        unit = (x % 2**24).to(torch.float32) * (2.0 / 2**24) - 1.0     # [-1, 1)
        if name.endswith('running_var'):
            values = unit * 0.25 + 1.0
        elif tensor.dim() == 1 and name.endswith('weight'):
            values = unit * 0.1 + 1.0
        elif tensor.dim() == 1:
            values = unit * 0.1
        else:
            fan_in = tensor[0].numel()
            values = unit * float(math.sqrt(3.0 / fan_in))
        out[name] = values.reshape(tensor.shape)
    return out
