"""LeRobot's SmolVLA, in-tree and weight-compatible: load a LeRobot SmolVLA folder without lerobot.

Why converted and not installed: see lerobot_act.py and docs/pretrained_vla.md (lerobot 0.4.4
needs torch < 2.11, huggingface-hub < 0.36 and, for SmolVLA, transformers < 5).

A LeRobot (>= 0.4) SmolVLA policy folder, as `SmolVLAPolicy.save_pretrained` and the processor
pipelines' `save_pretrained` write it:

    config.json                   SmolVLAConfig as draccus dumps it, with "type": "smolvla"
    model.safetensors             'model.vlm_with_expert.vlm.model.{vision_model, connector,
                                  text_model}.*', 'model.vlm_with_expert.vlm.lm_head.weight',
                                  'model.vlm_with_expert.lm_expert.{layers, norm}.*',
                                  'model.{state_proj, action_in_proj, action_out_proj,
                                  action_time_mlp_in, action_time_mlp_out}.*'
    policy_preprocessor.json      ... a 'tokenizer_processor' step (max_length, padding) and a
    policy_preprocessor_step_5_normalizer_processor.safetensors   normaliser with its stats
    policy_postprocessor.json     + its unnormaliser's state file

The VLM's config.json and tokenizer are NOT in that folder: LeRobot reads them from
`vlm_model_name` (a hub id such as HuggingFaceTB/SmolVLM2-500M-Video-Instruct) even though
the weights come from model.safetensors. habc reads them from a local folder (`vlm_dir`) and
never from a hub; a missing folder fails before anything reaches transformers.

What is transformers' and what is written here:
- The VLM's modules are transformers 5's SmolVLMModel (vision tower, connector, Llama text
  model), built from the local config with the text model cut to `num_vlm_layers`; the
  expert's layers are transformers' LlamaDecoderLayer / LlamaRMSNorm. Their parameter names
  are those of transformers 4.57, so the weight mapping is the identity on every key except
  'model.vlm_with_expert.vlm.lm_head.weight', which SmolVLA never uses and habc drops.
- Written here (SmolVLA's own arithmetic, in LeRobot's operation order so that float32
  results match LeRobot's to rounding): the layer loop that interleaves the VLM and the
  expert (self-attention layers over [prefix, suffix], cross-attention layers where the
  expert reads the VLM's keys and values), LeRobot's rotary embedding (wavelength 10 000,
  whatever rope_theta the text config names) and eager attention, the prefix/suffix
  masks and positions, the image resize-with-padding, the time embedding, the Euler loop.
- The vision tower's patch positions: transformers 4.57 numbers an unpadded n x n patch grid
  0, 0, 1, ..., n - 2 along each axis (its bucketize of i / n * (1 - 1e-6)), transformers
  5 numbers it 0, 1, ..., n - 1. SmolVLA ran (and was trained) with 4.57's, so habc
  computes 4.57's positions and runs transformers 5's encoder on those embeddings.

Batches are habc's: 'images' (B, V, H, W, 3) uint8 in the checkpoint's camera order,
'instruction' list[str], 'state' (B, S), 'actions' (B, H, D) in robot units, 'action_mask'
(B, H), 'dim_mask' (B, D).
"""

from dataclasses import dataclass, field, replace
import hashlib
import json
import math
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
import torch
from torch import nn
import torch.nn.functional as F  # noqa: N812

from habc_policy.models.base import Policy, register_policy
from habc_policy.models.lerobot_act import (
    ACTION_KEY,
    apply_lerobot_stats,
    LEROBOT_CONFIG,
    LEROBOT_FOLDER_EXPECTED,
    LEROBOT_TYPES,
    LEROBOT_WEIGHTS,
    LeRobotConfigView,
    LeRobotFormatError,
    PREPROCESSOR,
    read_lerobot_json,
    read_lerobot_stats,
    STATE_KEY,
)

EMPTY_CAMERA_PREFIX = 'observation.images.empty_camera_'
UNUSED_LEROBOT_KEYS = ('model.vlm_with_expert.vlm.lm_head.weight',)
# The files of a VLM folder that SmolVLA reads (config and tokenizer); its weights, if any,
# are not read: they come from the LeRobot checkpoint.
_VLM_FILES = ('config.json', 'tokenizer.json', 'tokenizer_config.json',
              'special_tokens_map.json', 'tokenizer.model', 'vocab.json', 'merges.txt',
              'added_tokens.json')
_TOKENIZER_FILES = ('tokenizer.json', 'tokenizer.model', 'vocab.json')
DEFAULT_VLM = 'HuggingFaceTB/SmolVLM2-500M-Video-Instruct'

# lerobot/policies/smolvla/configuration_smolvla.py 0.4.4: the fields LeRobotSmolVLAConfig
# mirrors one to one, with LeRobot's defaults.
LEROBOT_SMOLVLA_DEFAULTS: dict[str, Any] = {
    'chunk_size': 50, 'n_action_steps': 50, 'max_state_dim': 32, 'max_action_dim': 32,
    'resize_imgs_with_padding': [512, 512], 'empty_cameras': 0, 'adapt_to_pi_aloha': False,
    'tokenizer_max_length': 48, 'pad_language_to': 'longest', 'num_steps': 10,
    'freeze_vision_encoder': True, 'train_expert_only': True, 'train_state_proj': True,
    'vlm_model_name': DEFAULT_VLM, 'add_image_special_tokens': False,
    'attention_mode': 'cross_attn', 'prefix_length': -1, 'num_expert_layers': -1,
    'num_vlm_layers': 16, 'self_attn_every_n_layers': 2, 'expert_width_multiplier': 0.75,
    'min_period': 4e-3, 'max_period': 4.0,
}
_ARCH_FIELDS = tuple(LEROBOT_SMOLVLA_DEFAULTS)


@dataclass(frozen=True)
class LeRobotSmolVLAConfig(LeRobotConfigView):
    """LeRobot's SmolVLAConfig fields, the robot interface they imply, and the VLM folder.

    state_dim / action_dim / camera_names / image size come from the LeRobot features
    ('observation.state', 'action', 'observation.images.*' in their order, without the
    'empty_camera_*' ones that `empty_cameras` adds).
    """

    vlm_dir: str = ''
    # SHA-256 of the VLM folder's config and tokenizer files ('' = do not check).
    vlm_fingerprint: str = ''
    state_dim: int = 6
    action_dim: int = 6
    camera_names: list[str] = field(default_factory=lambda: ['observation.images.top'])
    image_size: int = 480       # height of the checkpoint's camera images
    image_width: int = 0        # 0 = square (image_size)
    chunk_size: int = 50
    n_action_steps: int = 50
    max_state_dim: int = 32
    max_action_dim: int = 32
    resize_imgs_with_padding: list[int] = field(default_factory=lambda: [512, 512])
    empty_cameras: int = 0
    adapt_to_pi_aloha: bool = False
    tokenizer_max_length: int = 48
    pad_language_to: str = 'longest'
    num_steps: int = 10
    freeze_vision_encoder: bool = True
    train_expert_only: bool = True
    train_state_proj: bool = True
    vlm_model_name: str = DEFAULT_VLM
    add_image_special_tokens: bool = False
    attention_mode: str = 'cross_attn'
    prefix_length: int = -1
    num_expert_layers: int = -1
    num_vlm_layers: int = 16
    self_attn_every_n_layers: int = 2
    expert_width_multiplier: float = 0.75
    min_period: float = 4e-3
    max_period: float = 4.0
    normalization_mapping: dict = field(default_factory=lambda: {
        'VISUAL': 'IDENTITY', 'STATE': 'MEAN_STD', 'ACTION': 'MEAN_STD'})
    norm_eps: float = 1e-8
    # LeRobot feature keys that had statistics (LeRobot leaves the others unnormalised).
    normalized_features: list[str] = field(default_factory=list)
    # The rest of the LeRobot config.json (optimizer presets, rtc_config, ...), kept as read.
    lerobot_extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        name = type(self).__name__
        if not self.vlm_dir:
            raise ValueError(f'{name}.vlm_dir must name a local SmolVLM folder (its config.json '
                             'and tokenizer)')
        for key in ('state_dim', 'action_dim', 'image_size', 'chunk_size', 'n_action_steps',
                    'max_state_dim', 'max_action_dim', 'tokenizer_max_length', 'num_steps'):
            if getattr(self, key) < 1:
                raise ValueError(f'{name}.{key} must be >= 1, got {getattr(self, key)}')
        if not self.camera_names:
            raise ValueError(f'{name}.camera_names must name at least one camera')
        if self.state_dim > self.max_state_dim or self.action_dim > self.max_action_dim:
            raise ValueError(f'{name}: state_dim {self.state_dim} / action_dim '
                             f'{self.action_dim} exceed max_state_dim {self.max_state_dim} / '
                             f'max_action_dim {self.max_action_dim} (SmolVLA zero-pads to them)')
        if self.n_action_steps > self.chunk_size:
            raise ValueError(f'{name}: n_action_steps {self.n_action_steps} > chunk_size '
                             f'{self.chunk_size}')
        if len(self.resize_imgs_with_padding) != 2:
            raise ValueError(f'{name}.resize_imgs_with_padding must be (width, height), got '
                             f'{self.resize_imgs_with_padding}')
        if self.pad_language_to not in ('longest', 'max_length'):
            raise ValueError(f"{name}.pad_language_to must be 'longest' or 'max_length', got "
                             f'{self.pad_language_to!r}')
        if self.attention_mode not in ('cross_attn', 'self_attn'):
            raise ValueError(f"{name}.attention_mode must be 'cross_attn' or 'self_attn', got "
                             f'{self.attention_mode!r}')
        if self.adapt_to_pi_aloha:
            raise ValueError(f'{name}.adapt_to_pi_aloha is not supported: it converts ALOHA '
                             "gripper units inside the policy; convert them in the robot's "
                             'driver instead and set it to false')
        self.check_normalization_mapping()



# ---------------------------------------------------------------------------------------
# The VLM folder.


def check_vlm_dir(folder: str | Path) -> Path:
    """Return the local SmolVLM folder as an absolute path; a clear error if it is not one.

    Runs before anything reaches transformers, so a hub id fails here without network.
    """
    path = Path(folder).expanduser()
    expected = ('a local SmolVLM / SmolVLM2 folder holding config.json (model_type '
                "'smolvlm') and its tokenizer (tokenizer.json, tokenizer_config.json), e.g. "
                f'`hf download {DEFAULT_VLM} --local-dir DIR` run beforehand; nothing is '
                'downloaded at run time')
    if not path.is_dir():
        raise FileNotFoundError(f'VLM folder {str(folder)!r} not found: SmolVLA needs {expected}')
    config_path = path / 'config.json'
    if not config_path.is_file():
        raise FileNotFoundError(f'{config_path} not found: the VLM folder must be {expected}')
    try:
        model_type = json.loads(config_path.read_text()).get('model_type')
    except ValueError as exc:
        raise ValueError(f'{config_path} is not readable JSON: {exc}') from exc
    if model_type != 'smolvlm':
        raise ValueError(f'{path}: SmolVLA is built on a SmolVLM; its config.json has '
                         f'model_type {model_type!r}')
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(f'{path} has no tokenizer ({" or ".join(_TOKENIZER_FILES)}): '
                                f'the VLM folder must be {expected}')
    return path.absolute()


def vlm_fingerprint(folder: Path) -> str:
    """SHA-256 over the VLM folder's config and tokenizer files (not its weights)."""
    digest = hashlib.sha256()
    for name in _VLM_FILES:
        if (folder / name).is_file():
            digest.update(f'{name}\0{hashlib.sha256((folder / name).read_bytes()).hexdigest()}\n'
                          .encode())
    return digest.hexdigest()


def find_vlm_dir(path: Path, vlm_model_name: str, vlm_dir: str | Path | None) -> Path:
    """Return the VLM folder of a LeRobot checkpoint: `vlm_dir`, else one found beside it.

    Without `vlm_dir`: the checkpoint's 'vlm' subfolder, then `vlm_model_name` if it names a
    folder (absolute, or relative to the checkpoint). Nothing is looked up on a hub.
    """
    if vlm_dir is not None:
        return check_vlm_dir(vlm_dir)
    candidates = [path / 'vlm']
    if vlm_model_name:
        name = Path(vlm_model_name).expanduser()
        candidates.append(name if name.is_absolute() else path / name)
    for candidate in candidates:
        if (candidate / 'config.json').is_file():
            return check_vlm_dir(candidate)
    raise FileNotFoundError(
        f'no local VLM folder for the SmolVLA checkpoint {path}: its config names '
        f'vlm_model_name {vlm_model_name!r}, whose config and tokenizer SmolVLA needs, and '
        f'habc never downloads it. Tried {[str(c) for c in candidates]}. Pass vlm_dir= a '
        f'local copy (e.g. `hf download {vlm_model_name} --local-dir DIR`, run beforehand)')


# ---------------------------------------------------------------------------------------
# SmolVLA's arithmetic.


def rope(x: torch.Tensor, positions: torch.Tensor, max_wavelength: float = 10_000) -> torch.Tensor:
    """Rotary embedding of x (B, L, heads, head_dim) at positions (B, L), SmolVLA's variant.

    Halves (not interleaved pairs) rotate, frequencies max_wavelength ** (-2 i / head_dim),
    computed in float32 in the order SmolVLA computes them.
    """
    half = x.shape[-1] // 2
    dtype = x.dtype
    x = x.float()
    exponents = (2.0 / x.shape[-1]) * torch.arange(half, dtype=torch.float32, device=x.device)
    angles = positions[..., None].float() / (max_wavelength ** exponents)[None, None]
    angles = angles[..., None, :]
    sin, cos = angles.sin(), angles.cos()
    first, second = x[..., :half], x[..., half:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1).to(dtype)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
           head_dim: int) -> torch.Tensor:
    """Eager grouped-query attention, (B, Lq, heads, d) x (B, Lk, kv_heads, d) -> (B, Lq, heads d).

    `mask` (B, Lq, Lk) is True where a query may attend. Scores are float32 and masked with
    float32's lowest value (not -inf), so a fully masked row (a padding query) gives a uniform
    average instead of NaN; padding queries are never read.
    """
    b, lk, kv_heads, d = k.shape
    groups = q.shape[2] // kv_heads
    # Key/value head h // groups serves query head h.
    k = k[:, :, :, None].expand(b, lk, kv_heads, groups, d).reshape(b, lk, kv_heads * groups, d)
    v = v[:, :, :, None].expand(b, lk, kv_heads, groups, d).reshape(b, lk, kv_heads * groups, d)
    scores = torch.matmul(q.float().transpose(1, 2), k.float().transpose(1, 2).transpose(2, 3))
    scores = scores * head_dim ** -0.5
    scores = torch.where(mask[:, None], scores, torch.finfo(torch.float32).min)
    probs = scores.softmax(dim=-1).to(v.dtype)
    out = torch.matmul(probs, v.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)
    return out.reshape(b, out.shape[1], -1)


def attention_mask_2d(pad: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """(B, N, N) mask from pad (B, N) and block starts (B, N) (big_vision's mask_ar).

    A token sees the valid tokens whose running count of block starts is <= its own: 0s share
    the previous token's block (bidirectional), a 1 starts a block that earlier ones cannot
    see. SmolVLA: images + language = 0 (one bidirectional block), state = 1, each action = 1
    (so actions attend causally among themselves).
    """
    count = torch.cumsum(blocks.long(), dim=1)
    return (count[:, None, :] <= count[:, :, None]) & (pad[:, None, :] & pad[:, :, None])


def time_embedding(t: torch.Tensor, dim: int, min_period: float,
                   max_period: float) -> torch.Tensor:
    """Sine-cosine embedding (B, dim) of flow times t (B,), periods log-spaced, in float64."""
    dtype = torch.float32 if t.device.type == 'mps' else torch.float64
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=dtype, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    angles = (1.0 / period * 2 * math.pi)[None, :] * t[:, None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def resize_with_pad(images: torch.Tensor, width: int, height: int,
                    pad_value: float = 0.0) -> torch.Tensor:
    """Resize (N, 3, h, w) to fit width x height keeping the aspect ratio; pad left and top."""
    h, w = images.shape[2:]
    ratio = max(w / width, h / height)
    new_h, new_w = int(h / ratio), int(w / ratio)
    images = F.interpolate(images, size=(new_h, new_w), mode='bilinear', align_corners=False)
    return F.pad(images, (max(0, width - new_w), 0, max(0, height - new_h), 0), value=pad_value)


def expert_intermediate_size(hidden: int, multiplier: int = 4, multiple_of: int = 256) -> int:
    """SmolVLA's expert MLP width: 4 x (2/3 hidden), rounded up to a multiple of 256."""
    size = int(multiplier * int(2 * hidden / 3))
    return multiple_of * ((size + multiple_of - 1) // multiple_of)


def patch_positions_457(rows: int, cols: int, per_side: int,
                        device: torch.device | None = None) -> torch.Tensor:
    """Position ids (rows cols,) transformers 4.57 gives an unpadded patch grid.

    Fractional coordinates i / n * (1 - 1e-6) bucketized at k / per_side: the first two rows
    (and columns) share bucket 0 and the last bucket is never used. Transformers 5 fixed
    this; SmolVLA's weights expect 4.57's.
    """
    boundaries = torch.arange(1 / per_side, 1.0, 1 / per_side, device=device)
    h = torch.arange(rows, dtype=torch.float32, device=device)
    w = torch.arange(cols, dtype=torch.float32, device=device)
    bucket_h = torch.bucketize(h / rows * (1 - 1e-6), boundaries, right=True)
    bucket_w = torch.bucketize(w / cols * (1 - 1e-6), boundaries, right=True)
    return (bucket_h[:, None] * per_side + bucket_w).flatten()


class _VLMWrapper(nn.Module):
    """Holds SmolVLMModel as `.model`: LeRobot's 'vlm.model.*' names, without the LM head."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


class _Expert(nn.Module):
    """The action expert: Llama decoder layers and a final norm ('layers.N.*', 'norm.*')."""

    def __init__(self, layers: nn.ModuleList, norm: nn.Module) -> None:
        super().__init__()
        self.layers = layers
        self.norm = norm


class VLMWithExpert(nn.Module):
    """LeRobot's SmolVLMWithExpertModel: the VLM's layers and the expert's, interleaved."""

    def __init__(self, c: LeRobotSmolVLAConfig, vlm_config: Any) -> None:
        super().__init__()
        import copy

        from transformers import SmolVLMModel
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm

        vlm_config = copy.deepcopy(vlm_config)
        text = vlm_config.text_config
        if c.num_vlm_layers > 0:
            if c.num_vlm_layers > text.num_hidden_layers:
                raise LeRobotFormatError(f'num_vlm_layers {c.num_vlm_layers} > the '
                                         f'{text.num_hidden_layers} text layers of the VLM')
            # LeRobot builds every layer, then keeps the first num_vlm_layers.
            text.num_hidden_layers = c.num_vlm_layers
        self.vlm = _VLMWrapper(SmolVLMModel(vlm_config))
        self.num_vlm_layers = text.num_hidden_layers
        self.head_dim = int(getattr(text, 'head_dim', None)
                            or text.hidden_size // text.num_attention_heads)
        expert_config = copy.deepcopy(text)
        expert_config.hidden_size = int(text.hidden_size * c.expert_width_multiplier)
        expert_config.intermediate_size = expert_intermediate_size(expert_config.hidden_size)
        # The expert keeps the VLM's heads and head_dim (LeRobot deep-copies the text config
        # and changes only the widths), so both streams concatenate head by head.
        expert_config.head_dim = self.head_dim
        count = self.num_vlm_layers
        if c.num_expert_layers > 0:
            if count % c.num_expert_layers:
                raise LeRobotFormatError(f'num_vlm_layers {count} is not a multiple of '
                                         f'num_expert_layers {c.num_expert_layers}')
            count = c.num_expert_layers
        expert_config.num_hidden_layers = count
        layers = nn.ModuleList(LlamaDecoderLayer(expert_config, i) for i in range(count))
        self.cross = 'cross' in c.attention_mode
        self.every = c.self_attn_every_n_layers
        kv_width = text.num_key_value_heads * self.head_dim
        if self.cross:
            # Cross-attention layers project the VLM's keys and values (VLM kv width), not the
            # expert's hidden states. LeRobot picks them by the EXPERT layer's index.
            for i, layer in enumerate(layers):
                if self.every > 0 and i % self.every == 0:
                    continue
                bias = bool(getattr(expert_config, 'attention_bias', False))
                layer.self_attn.k_proj = nn.Linear(kv_width, kv_width, bias=bias)
                layer.self_attn.v_proj = nn.Linear(kv_width, kv_width, bias=bias)
        self.lm_expert = _Expert(layers, LlamaRMSNorm(expert_config.hidden_size,
                                                      eps=expert_config.rms_norm_eps))
        self.expert_hidden_size = expert_config.hidden_size
        self.num_heads = text.num_attention_heads
        self.num_kv_heads = text.num_key_value_heads
        self.stride = self.num_vlm_layers // count   # VLM layers per expert layer

    @property
    def text_model(self) -> nn.Module:
        return self.vlm.model.text_model

    def expert_layer(self, i: int) -> nn.Module | None:
        """Return the expert layer paired with VLM layer i (None between them if fewer)."""
        if self.stride > 0 and i > 0 and i % self.stride:
            return None
        return self.lm_expert.layers[i // self.stride if self.stride > 0 else i]

    def is_cross_layer(self, i: int, filling_cache: bool) -> bool:
        return self.cross and not filling_cache and not (self.every > 0 and i % self.every == 0)

    # Pieces of a layer -------------------------------------------------------------------

    def _qkv(self, layer: nn.Module, hidden: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = layer.input_layernorm(hidden)
        shape = (*x.shape[:-1], -1, self.head_dim)
        attn = layer.self_attn
        return attn.q_proj(x).view(shape), attn.k_proj(x).view(shape), attn.v_proj(x).view(shape)

    @staticmethod
    def _finish(layer: nn.Module, hidden: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        hidden = layer.self_attn.o_proj(attended) + hidden
        return layer.mlp(layer.post_attention_layernorm(hidden)) + hidden

    def embed_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) in [-1, 1] -> (N, tokens, text hidden): vision tower + connector."""
        vision = self.vlm.model.vision_model
        embeddings = vision.embeddings
        patches = embeddings.patch_embedding(pixels)
        rows, cols = patches.shape[-2:]
        positions = patch_positions_457(rows, cols, embeddings.num_patches_per_side,
                                        pixels.device)
        hidden = patches.flatten(2).transpose(1, 2) + embeddings.position_embedding(positions)
        hidden = vision.encoder(inputs_embeds=hidden, attention_mask=None).last_hidden_state
        return self.vlm.model.connector(vision.post_layernorm(hidden))

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text_model.get_input_embeddings()(ids)

    # The layer loop ------------------------------------------------------------------------

    def forward(self, prefix: torch.Tensor | None, suffix: torch.Tensor | None,
                mask: torch.Tensor, positions: torch.Tensor,
                cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                fill_cache: bool = False
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Run all layers on the prefix and/or the suffix (expert tokens).

        Three uses: the prefix alone with fill_cache (keeps each layer's rotated keys and
        values in `cache`, a list), the suffix alone against that cache (a denoising step),
        or both at once (training). `mask` (B, queries, keys) and `positions` (B, queries)
        cover the tokens given, [prefix, suffix] in that order; with a cache the keys are
        [cached prefix, suffix]. Returns both streams after their final norms.
        """
        for i in range(self.num_vlm_layers):
            streams = [(prefix, self.text_model.layers[i]), (suffix, self.expert_layer(i))]
            if self.is_cross_layer(i, fill_cache):
                outputs = self._cross_layer(i, streams, mask, positions, cache)
            else:
                outputs = self._self_layer(i, streams, mask, positions, cache, fill_cache)
            prefix, suffix = (h if h is None or layer is None else self._finish(layer, h, out)
                              for (h, layer), out in zip(streams, outputs, strict=True))
        prefix = None if prefix is None else self.text_model.norm(prefix)
        suffix = None if suffix is None else self.lm_expert.norm(suffix)
        return prefix, suffix

    def _self_layer(self, i: int, streams: list, mask: torch.Tensor, positions: torch.Tensor,
                    cache: list | None, fill_cache: bool) -> list[torch.Tensor | None]:
        """Joint self-attention over the streams that have a layer here, in sequence order."""
        active = [(h, layer) for h, layer in streams if h is not None and layer is not None]
        parts = [self._qkv(layer, h) for h, layer in active]
        q, k, v = (torch.cat([p[j] for p in parts], dim=1) for j in range(3))
        n = q.shape[1]
        # A stream without a layer here is skipped: the queries are then a prefix of the
        # sequence, and so are their positions and mask.
        q, k = rope(q, positions[:, :n]), rope(k, positions[:, :n])
        layer_mask = mask[:, :n, :n] if n < positions.shape[1] else mask
        if fill_cache:
            cache.append((k, v))
        elif cache is not None:
            k = torch.cat([cache[i][0], k], dim=1)
            v = torch.cat([cache[i][1], v], dim=1)
        out = attend(q, k, v, layer_mask, self.head_dim)
        outputs, start = [], 0
        for h, layer in streams:
            if h is None or layer is None:
                outputs.append(None)
                continue
            outputs.append(out[:, start:start + h.shape[1]])
            start += h.shape[1]
        return outputs

    def _cross_layer(self, i: int, streams: list, mask: torch.Tensor, positions: torch.Tensor,
                     cache: list | None) -> list[torch.Tensor | None]:
        """Attend the prefix to itself and the expert's queries to the prefix's K/V."""
        (prefix, vlm_layer), (suffix, expert_layer) = streams
        prefix_out = None
        if prefix is not None and not cache:
            p = prefix.shape[1]
            q, k, v = self._qkv(vlm_layer, prefix)
            k = rope(k, positions[:, :p])
            prefix_out = attend(rope(q, positions[:, :p]), k, v, mask[:, :p, :p], self.head_dim)
            suffix_positions = positions[:, p:]
        else:
            k, v = cache[i]
            suffix_positions = positions
        if expert_layer is None or suffix is None:
            return [prefix_out, None]
        attn = expert_layer.self_attn
        x = expert_layer.input_layernorm(suffix)
        q = attn.q_proj(x).view(*x.shape[:-1], -1, self.head_dim)
        # The expert's own positions start at 0 in cross-attention layers.
        q = rope(q, suffix_positions - suffix_positions.min(dim=1, keepdim=True).values)
        b, p = k.shape[:2]
        expert_k = attn.k_proj(k.reshape(b, p, -1)).view(b, p, -1, self.head_dim)
        expert_v = attn.v_proj(v.reshape(b, p, -1)).view(b, p, -1, self.head_dim)
        suffix_mask = mask[:, -suffix.shape[1]:, :p]
        return [prefix_out, attend(q, expert_k, expert_v, suffix_mask, self.head_dim)]


class SmolVLAModel(nn.Module):
    """LeRobot's VLAFlowMatching: names and arithmetic. Inputs are normalised and padded."""

    def __init__(self, c: LeRobotSmolVLAConfig, vlm_config: Any) -> None:
        super().__init__()
        self.config = c
        self.vlm_with_expert = VLMWithExpert(c, vlm_config)
        hidden = vlm_config.text_config.hidden_size
        expert = self.vlm_with_expert.expert_hidden_size
        self.state_proj = nn.Linear(c.max_state_dim, hidden)
        self.action_in_proj = nn.Linear(c.max_action_dim, expert)
        self.action_out_proj = nn.Linear(expert, c.max_action_dim)
        self.action_time_mlp_in = nn.Linear(2 * expert, expert)
        self.action_time_mlp_out = nn.Linear(expert, expert)

    def embed_prefix(self, images: list[torch.Tensor], image_masks: list[torch.Tensor],
                     tokens: torch.Tensor, token_mask: torch.Tensor, state: torch.Tensor,
                     special_ids: tuple[int, int, int] | None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prefix embeddings (B, P, hidden), pad mask (B, P) and block starts (B, P).

        [per camera: (fake, global tokens), image tokens, (fake token)], language, state.
        Image and language embeddings are scaled by sqrt(hidden), as SmolVLA does.
        """
        vwe = self.vlm_with_expert
        b = state.shape[0]
        embeddings, pads, blocks = [], [], []

        def add(tokens_: torch.Tensor, pad: torch.Tensor, block: int) -> None:
            embeddings.append(tokens_)
            pads.append(pad)
            blocks.extend([block] * tokens_.shape[1])

        for image, valid in zip(images, image_masks, strict=True):
            if special_ids is not None:
                start = vwe.embed_tokens(torch.tensor(special_ids[:2], device=state.device))
                add(start[None].expand(b, -1, -1),
                    torch.ones(b, 2, dtype=torch.bool, device=state.device), 0)
            tokens_ = vwe.embed_image(image)
            scale = torch.tensor(tokens_.shape[-1] ** 0.5, dtype=tokens_.dtype,
                                 device=tokens_.device)
            add(tokens_ * scale, valid[:, None].expand(b, tokens_.shape[1]), 0)
            if special_ids is not None:
                end = vwe.embed_tokens(torch.tensor(special_ids[2:], device=state.device))
                add(end[None].expand(b, -1, -1),
                    torch.ones(b, 1, dtype=torch.bool, device=state.device), 0)
        language = vwe.embed_tokens(tokens)
        add(language * math.sqrt(language.shape[-1]), token_mask, 0)
        add(self.state_proj(state)[:, None], torch.ones(b, 1, dtype=torch.bool,
                                                        device=state.device), 1)
        embedded, pad = torch.cat(embeddings, dim=1), torch.cat(pads, dim=1)
        block = torch.tensor(blocks, dtype=torch.bool, device=pad.device)[None].expand(b, -1)
        missing = self.config.prefix_length - embedded.shape[1]
        if missing > 0:
            embedded = F.pad(embedded, (0, 0, 0, missing))
            pad = F.pad(pad, (0, missing), value=False)
            block = F.pad(block, (0, missing), value=False)
        return embedded, pad, block

    def embed_suffix(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Embed noisy actions and flow time as action tokens (B, H, expert) with an MLP."""
        actions = self.action_in_proj(x_t)
        time = time_embedding(t, actions.shape[-1], self.config.min_period,
                              self.config.max_period).to(actions.dtype)
        fused = torch.cat([actions, time[:, None].expand_as(actions)], dim=2)
        return self.action_time_mlp_out(F.silu(self.action_time_mlp_in(fused)))

    def losses(self, prefix: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
               actions: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared velocity error per element (B, H, max_action_dim) and the prefix output.

        x_t = t noise + (1 - t) actions, target u = noise - actions: SmolVLA's flow runs from
        actions at t = 0 to noise at t = 1.
        """
        embedded, pad, block = prefix
        x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * actions
        u_t = noise - actions
        suffix = self.embed_suffix(x_t, t)
        suffix_pad = torch.ones(suffix.shape[:2], dtype=torch.bool, device=suffix.device)
        pads = torch.cat([pad, suffix_pad], dim=1)
        mask = attention_mask_2d(pads, torch.cat([block, suffix_pad], dim=1))
        positions = torch.cumsum(pads, dim=1) - 1
        prefix_out, suffix_out = self.vlm_with_expert(embedded, suffix, mask, positions)
        v_t = self.action_out_proj(suffix_out[:, -self.config.chunk_size:].float())
        return F.mse_loss(u_t, v_t, reduction='none'), prefix_out

    def prefix_cache(self, prefix: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
                     ) -> tuple[list, torch.Tensor]:
        """Run the VLM on the prefix once: per-layer (keys, values) and the prefix output."""
        embedded, pad, block = prefix
        cache: list = []
        out, _ = self.vlm_with_expert(embedded, None, attention_mask_2d(pad, block),
                                      torch.cumsum(pad, dim=1) - 1, cache, fill_cache=True)
        return cache, out

    def velocity(self, cache: list, pad: torch.Tensor, x_t: torch.Tensor,
                 t: torch.Tensor) -> torch.Tensor:
        """One denoising step's velocity (B, H, max_action_dim) against the prefix cache."""
        suffix = self.embed_suffix(x_t, t)
        b, n = suffix.shape[:2]
        suffix_pad = torch.ones(b, n, dtype=torch.bool, device=suffix.device)
        mask = torch.cat([pad[:, None, :].expand(b, n, pad.shape[1]),
                          attention_mask_2d(suffix_pad, suffix_pad)], dim=2)
        positions = pad.sum(dim=-1)[:, None] + torch.cumsum(suffix_pad, dim=1) - 1
        _, out = self.vlm_with_expert(None, suffix, mask, positions, cache)
        return self.action_out_proj(out[:, -self.config.chunk_size:].float())

    def sample(self, prefix: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
               noise: torch.Tensor) -> torch.Tensor:
        """Euler steps from noise at t = 1 to actions at t = 0 (dt = -1 / num_steps)."""
        cache, _ = self.prefix_cache(prefix)
        steps = self.config.num_steps
        dt = -1.0 / steps
        x_t = noise
        for step in range(steps):
            t = torch.tensor(1.0 + step * dt, dtype=torch.float32,
                             device=noise.device).expand(noise.shape[0])
            x_t = x_t + dt * self.velocity(cache, prefix[1], x_t, t)
        return x_t


# ---------------------------------------------------------------------------------------
# The habc policy.


@register_policy
class LeRobotSmolVLA(Policy):
    """LeRobot's SmolVLA behind habc's Policy interface; loads LeRobot SmolVLA folders."""

    type_name = 'lerobot_smolvla'
    config_class = LeRobotSmolVLAConfig

    def __init__(self, config: LeRobotSmolVLAConfig) -> None:
        from transformers import AutoConfig, AutoTokenizer

        folder = check_vlm_dir(config.vlm_dir)
        fingerprint = vlm_fingerprint(folder)
        if config.vlm_fingerprint and config.vlm_fingerprint != fingerprint:
            raise ValueError(
                f'VLM folder {folder} is not the one this policy was saved with: the '
                f'fingerprint of its config and tokenizer is {fingerprint[:16]}, the checkpoint '
                f'recorded {config.vlm_fingerprint[:16]}; restore that folder (a different '
                'tokenizer would feed the policy different token ids)')
        super().__init__(replace(config, vlm_dir=str(folder), vlm_fingerprint=fingerprint))
        c = self.config
        vlm_config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        self.model = SmolVLAModel(c, vlm_config)
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self._special_ids = self._image_special_ids() if c.add_image_special_tokens else None
        self.register_normalization(c.state_dim, c.action_dim)
        self.register_buffer('image_mean', torch.zeros(c.num_views, 3, 1, 1))
        self.register_buffer('image_std', torch.ones(c.num_views, 3, 1, 1))
        self._set_requires_grad()

    def _image_special_ids(self) -> tuple[int, int, int]:
        """Ids of SmolVLM's <fake_token_around_image>, <global-img>, <fake_token_around_image>."""
        names = (getattr(self.tokenizer, 'fake_image_token', None) or '<fake_token_around_image>',
                 getattr(self.tokenizer, 'global_image_token', None) or '<global-img>')
        ids = [self.tokenizer.convert_tokens_to_ids(name) for name in names]
        if any(i is None or i == self.tokenizer.unk_token_id for i in ids):
            raise LeRobotFormatError(f'add_image_special_tokens needs the tokens {names} in the '
                                     f'tokenizer of {self.config.vlm_dir}')
        return ids[0], ids[1], ids[0]

    def _set_requires_grad(self) -> None:
        """LeRobot's trainable set: the expert and projections; the VLM per the config flags."""
        c = self.config
        vlm = self.model.vlm_with_expert.vlm
        vlm.requires_grad_(not c.train_expert_only)
        if c.freeze_vision_encoder:
            vlm.model.vision_model.requires_grad_(False)
        self.model.state_proj.requires_grad_(c.train_state_proj)

    @property
    def feature_dim(self) -> int:
        return 2 * self.model.state_proj.out_features

    # Inputs, as LeRobot's preprocessor and SmolVLAPolicy prepare them ---------------------

    def _eps(self, kind: str) -> float:
        mode = self.config.normalization_mapping.get(kind, 'IDENTITY')
        return self.config.norm_eps if mode == 'MEAN_STD' else 0.0

    def _prefix(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prefix embeddings, pad mask and block starts of a habc batch."""
        c = self.config
        device = self.state_mean.device
        images = torch.as_tensor(batch['images'])
        if images.ndim != 5 or images.shape[1] != c.num_views or images.shape[-1] != 3:
            raise ValueError(f'images must be (B, {c.num_views}, H, W, 3) for the cameras '
                             f'{c.camera_names}, got {tuple(images.shape)}')
        images = images.to(device).permute(0, 1, 4, 2, 3)
        # LeRobot's datasets give float images in [0, 1]; uint8 is what habc records.
        images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        images = (images - self.image_mean) / (self.image_std + self._eps('VISUAL'))
        width, height = c.resize_imgs_with_padding
        pixels = [resize_with_pad(images[:, v], width, height) * 2.0 - 1.0
                  for v in range(c.num_views)]
        b = images.shape[0]
        masks = [torch.ones(b, dtype=torch.bool, device=device)] * c.num_views
        # LeRobot's placeholder cameras: all -1 and masked out.
        pixels += [torch.full_like(pixels[0], -1.0)] * c.empty_cameras
        masks += [torch.zeros(b, dtype=torch.bool, device=device)] * c.empty_cameras
        tokens, token_mask = self._tokens(batch, b, device)
        state = torch.as_tensor(batch['state']).to(device).float()
        if state.ndim != 2 or state.shape[1] != c.state_dim:
            raise ValueError(f'state must be (B, {c.state_dim}), got {tuple(state.shape)}')
        state = (state - self.state_mean) / (self.state_std + self._eps('STATE'))
        state = F.pad(state, (0, c.max_state_dim - c.state_dim))
        return self.model.embed_prefix(pixels, masks, tokens, token_mask, state,
                                       self._special_ids)

    def _tokens(self, batch: dict[str, Any], b: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """LeRobot's tokenizer step: a newline appended, right padding, truncation."""
        if 'instruction' not in batch:
            raise ValueError("SmolVLA needs the task: the batch has no 'instruction' (list of "
                             'str, one per sample)')
        texts = list(batch['instruction'])
        if len(texts) != b:
            raise ValueError(f'{len(texts)} instructions for a batch of {b} observations')
        texts = [t if t.endswith('\n') else t + '\n' for t in texts]
        encoded = self.tokenizer(texts, max_length=self.config.tokenizer_max_length,
                                 truncation=True, padding=self.config.pad_language_to,
                                 padding_side='right', return_tensors='pt')
        return encoded['input_ids'].to(device), encoded['attention_mask'].to(device).bool()

    def _target(self, batch: dict[str, Any]) -> torch.Tensor:
        """Normalised target chunk, zero-padded to (B, H, max_action_dim)."""
        c = self.config
        actions = torch.as_tensor(batch['actions']).to(self.actions_mean.device).float()
        if actions.shape[1:] != (c.chunk_size, c.action_dim):
            raise ValueError(f'actions must be (B, {c.chunk_size}, {c.action_dim}) (chunk_size, '
                             f'action_dim of the checkpoint), got {tuple(actions.shape)}')
        actions = (actions - self.actions_mean) / (self.actions_std + self._eps('ACTION'))
        return F.pad(actions, (0, c.max_action_dim - c.action_dim))

    def _features(self, prefix_out: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """[mean of the valid image and language outputs, the state token's output], detached.

        The state token is the prefix's last valid token (it sees every other one).
        """
        prefix_out, pad = prefix_out.detach().float(), pad.clone()
        last = pad.long().cumsum(1).argmax(1)
        state = prefix_out[torch.arange(pad.shape[0], device=pad.device), last]
        pad[torch.arange(pad.shape[0], device=pad.device), last] = False
        weights = pad[..., None].float()
        pooled = (prefix_out * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return torch.cat([pooled, state], dim=-1)

    # Policy interface ----------------------------------------------------------------------

    def encode(self, batch: dict[str, Any]) -> torch.Tensor:
        with torch.no_grad():
            prefix = self._prefix(batch)
            _, out = self.model.prefix_cache(prefix)
            return self._features(out, prefix[1])

    def lerobot_losses(self, batch: dict[str, Any], noise: torch.Tensor | None = None,
                       time: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """SmolVLA's elementwise loss (B, H, max_action_dim) and (prefix output, pad mask).

        Noise and time are drawn as LeRobot draws them (normal, then Beta(1.5, 1) scaled to
        [0.001, 1]), from the global generator, so a seed gives LeRobot's draws.
        """
        prefix = self._prefix(batch)
        actions = self._target(batch)
        if noise is None:
            noise = torch.normal(0.0, 1.0, size=actions.shape, dtype=torch.float32,
                                 device=actions.device)
        if time is None:
            beta = torch.distributions.Beta(concentration1=1.5, concentration0=1.0)
            time = beta.sample((actions.shape[0],)).to(actions.device, torch.float32)
            time = time * 0.999 + 0.001
        losses, prefix_out = self.model.losses(prefix, actions, noise.to(actions.device),
                                               time.to(actions.device))
        return losses, (prefix_out, prefix[1])

    def _reduce(self, batch: dict[str, Any], losses: torch.Tensor) -> torch.Tensor:
        """Per-sample mean over the valid steps and the dimensions that count.

        The zero-padded dimensions (action_dim .. max_action_dim) count, as in LeRobot's
        loss (their target is 0); without masks this is LeRobot's reduction='none' loss.
        """
        c = self.config
        mask = torch.as_tensor(batch['action_mask']).to(losses.device).to(losses.dtype)
        dims = torch.ones(losses.shape[0], c.max_action_dim, device=losses.device)
        if batch.get('dim_mask') is not None:
            dims[:, :c.action_dim] = torch.as_tensor(batch['dim_mask']).to(losses.device)
        weights = mask[:, :, None] * dims[:, None, :]
        return (losses * weights).sum(dim=(1, 2)) / weights.sum(dim=(1, 2)).clamp(min=1.0)

    def per_sample_loss(self, batch: dict[str, Any],
                        features: torch.Tensor | None = None) -> torch.Tensor:
        # Pooled features cannot rebuild the prefix: features_and_loss shares one pass.
        losses, _ = self.lerobot_losses(batch)
        return self._reduce(batch, losses)

    def features_and_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Critic features and per-sample loss from one pass (the prefix stream's output)."""
        losses, (prefix_out, pad) = self.lerobot_losses(batch)
        return self._features(prefix_out, pad), self._reduce(batch, losses)

    @torch.no_grad()
    def sample_actions(self, batch: dict[str, Any], noise: torch.Tensor) -> torch.Tensor:
        """LeRobot's predict_action_chunk + postprocessor for a given noise (B, H, max_D)."""
        c = self.config
        chunk = self.model.sample(self._prefix(batch), noise.to(self.state_mean.device).float())
        return chunk[:, :, :c.action_dim] * self.actions_std + self.actions_mean

    @torch.no_grad()
    def sample_chunks(self, batch: dict[str, Any],
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample chunks (B, H, D) in robot units from N(0, I) noise drawn with `generator`."""
        c = self.config
        b = len(batch['state'])
        noise = torch.randn((b, c.chunk_size, c.max_action_dim), generator=generator,
                            device=self.state_mean.device if generator is None
                            else generator.device)
        return self.sample_actions(batch, noise)

    # LeRobot folders -------------------------------------------------------------------------

    def set_lerobot_stats(self, stats: dict[str, dict[str, torch.Tensor]]) -> None:
        """Set the normalisation buffers from LeRobot's per-feature statistics."""
        apply_lerobot_stats(self, stats)

    @classmethod
    def from_lerobot(cls, path: Path, vlm_dir: str | Path | None = None,
                     map_location: str = 'cpu') -> 'LeRobotSmolVLA':
        """Load a LeRobot SmolVLA folder; the VLM's config and tokenizer from `vlm_dir`.

        Only local files are read. Without `vlm_dir`, the folder is looked for beside the
        checkpoint (find_vlm_dir); a missing one is an error that says what to fetch.
        """
        path = Path(path)
        config = read_lerobot_smolvla_config(path, vlm_dir)
        stats = read_lerobot_stats(path)
        config = replace(config, normalized_features=[
            key for key in [STATE_KEY, ACTION_KEY, *config.camera_names] if key in stats])
        _check_tokenizer_step(path, config)
        policy = cls(config)
        state = load_file(str(path / LEROBOT_WEIGHTS), device=map_location)
        model_state = {k[len('model.'):]: v for k, v in state.items()
                       if k.startswith('model.') and k not in UNUSED_LEROBOT_KEYS}
        foreign = sorted(k for k in state if not k.startswith('model.'))
        if any(k.startswith(('normalize_inputs.', 'unnormalize_outputs.')) for k in foreign):
            raise LeRobotFormatError(
                f'{path / LEROBOT_WEIGHTS} holds normalisation buffers: it was written by '
                "LeRobot < 0.4. Migrate it with LeRobot's "
                'lerobot/processor/migrate_policy_normalization.py, then load the result')
        try:
            missing, unexpected = policy.model.load_state_dict(model_state, strict=False)
        except RuntimeError as exc:
            raise LeRobotFormatError(f'{path / LEROBOT_WEIGHTS} does not match its '
                                     f'{LEROBOT_CONFIG} and the VLM config in '
                                     f'{config.vlm_dir}: {exc}') from exc
        if missing or unexpected or foreign:
            raise LeRobotFormatError(
                f'{path / LEROBOT_WEIGHTS} does not match its {LEROBOT_CONFIG} and the VLM '
                f'config in {config.vlm_dir}: missing {["model." + k for k in missing]}, '
                f'unexpected {["model." + k for k in unexpected] + foreign}')
        policy.set_lerobot_stats(stats)
        policy.to(map_location)
        policy.version = f'lerobot:{path.resolve().name}'
        return policy


def _check_tokenizer_step(path: Path, config: LeRobotSmolVLAConfig) -> None:
    """Refuse a preprocessor whose tokenizer settings are not the ones habc applies."""
    steps = json.loads((path / f'{PREPROCESSOR}.json').read_text()).get('steps', [])
    for step in steps:
        if step.get('registry_name') != 'tokenizer_processor':
            continue
        settings = step.get('config', {})
        expected = {'max_length': config.tokenizer_max_length,
                    'padding': config.pad_language_to, 'padding_side': 'right',
                    'truncation': True, 'task_key': 'task'}
        differ = {k: (settings[k], v) for k, v in expected.items()
                  if k in settings and settings[k] != v}
        if differ:
            raise LeRobotFormatError(f'{path / PREPROCESSOR}.json: its tokenizer step differs '
                                     f'from what habc applies (step, habc): {differ}')


def read_lerobot_smolvla_config(path: Path,
                                vlm_dir: str | Path | None = None) -> LeRobotSmolVLAConfig:
    """LeRobotSmolVLAConfig from a LeRobot folder's config.json; a clear error otherwise."""
    path = Path(path)
    raw, kind, config_path = read_lerobot_json(path)
    if kind != 'smolvla':
        known = f'LeRobot policy type {kind!r}' if kind in LEROBOT_TYPES else \
            f'{config_path} has type {kind!r}, which is no LeRobot policy type'
        raise LeRobotFormatError(f"{known}; LeRobotSmolVLA reads LeRobot type 'smolvla' "
                                 '(LeRobotACT reads act; docs/pretrained_vla.md)')
    if not (path / LEROBOT_WEIGHTS).is_file():
        raise LeRobotFormatError(f'{path / LEROBOT_WEIGHTS} not found: '
                                 f'{LEROBOT_FOLDER_EXPECTED}')
    arch = {name: raw.get(name, LEROBOT_SMOLVLA_DEFAULTS[name]) for name in _ARCH_FIELDS}
    arch['resize_imgs_with_padding'] = list(arch['resize_imgs_with_padding'])
    inputs, outputs = raw.get('input_features') or {}, raw.get('output_features') or {}
    empty = {f'{EMPTY_CAMERA_PREFIX}{i}' for i in range(arch['empty_cameras'])}
    cameras = [k for k, f in inputs.items() if f.get('type') == 'VISUAL' and k not in empty]
    unsupported = [k for k, f in inputs.items() if f.get('type') not in ('VISUAL', 'STATE')
                   or (f.get('type') == 'STATE' and k != STATE_KEY)]
    if unsupported or STATE_KEY not in inputs or not cameras or ACTION_KEY not in outputs:
        raise LeRobotFormatError(
            f'{config_path}: habc feeds SmolVLA {STATE_KEY!r}, one or more VISUAL '
            f"'observation.images.*' and reads {ACTION_KEY!r}; the checkpoint has inputs "
            f'{ {k: f.get("type") for k, f in inputs.items()} } and outputs {list(outputs)}'
            + (f' ({unsupported} are not supported)' if unsupported else ''))
    if raw.get('n_obs_steps', 1) != 1:
        raise LeRobotFormatError(f'{config_path}: n_obs_steps {raw["n_obs_steps"]}; SmolVLA '
                                 'takes one observation step')
    # habc stacks the views in one tensor, so they share a size; the first camera's is the
    # one robot_fit compares with the robot's cameras (scaled, never stretched).
    _, height, width = inputs[cameras[0]]['shape']
    folder = find_vlm_dir(path, arch['vlm_model_name'], vlm_dir)
    extra = {k: v for k, v in raw.items()
             if k not in _ARCH_FIELDS and k not in ('type', 'input_features', 'output_features',
                                                    'normalization_mapping')}
    try:
        return LeRobotSmolVLAConfig(
            vlm_dir=str(folder), state_dim=int(inputs[STATE_KEY]['shape'][0]),
            action_dim=int(outputs[ACTION_KEY]['shape'][0]), camera_names=cameras,
            image_size=int(height), image_width=0 if width == height else int(width),
            normalization_mapping=dict(raw.get('normalization_mapping') or {
                'VISUAL': 'IDENTITY', 'STATE': 'MEAN_STD', 'ACTION': 'MEAN_STD'}),
            lerobot_extra=extra, **arch)
    except ValueError as exc:
        raise LeRobotFormatError(f'{config_path}: {exc}') from exc
