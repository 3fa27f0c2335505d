"""A pi0 / SmolVLA-shaped policy on a pretrained transformers vision-language backbone.

    images (B, V, H, W, 3) uint8 -> resize to the vision tower's size -> normalise with the
        folder's preprocessor_config.json (else mean = std = 0.5) -> the VLM's own
        get_image_features (vision tower + connector / projector) -> T tokens per view
    instruction -> the folder's tokenizer (cached per string) -> the VLM's input embeddings
    [view 1 tokens, ..., view V tokens, text tokens] as inputs_embeds -> the first
        `prefix_layers` decoder layers of the VLM's language model (+ its final norm)
        = the prefix (B, P, vlm_hidden)
    state (B, S) -> normalise -> linear -> 1 expert token
    noisy chunk x_tau (B, H, D) -> groups of k steps -> linear + position + flow-time
        embedding -> ceil(H / k) expert tokens
    expert: layers that self-attend over [state, action tokens] and cross-attend to the
        prefix (projected to the expert width) -> velocity of the H actions

The prefix attends bidirectionally (every prefix token sees every other, padding excluded),
as the prefix of pi0 and PaliGemma does; a VLM trained causally still works because only
its first layers are used and the expert is trained on top of them.

Prefix KV cache: the prefix depends only on the observation, so it is computed ONCE per
observation, and each expert layer projects it to its cross-attention keys and values once;
every Euler step of `sample_chunks` (and the training loss) reuses them and only runs the
small expert. The VLM therefore costs one pass per observation whatever
num_inference_steps is.

Only layers 0..prefix_layers-1 of the language model are kept after loading (the rest and the
LM head are dropped). The critic reads `encode`: the masked mean of the prefix hidden states
and the state token, so HABC's critic costs one small MLP over features the actor already
computed. With a frozen backbone the pooled prefix is `cacheable_feature_dim` wide: it is a
fixed function of the frame, so the learner computes it once per buffer row
(habc_learner.feature_cache) instead of a second prefix pass for s_{t+1} at every step.

Fine-tuning modes: 'frozen' (the backbone is never trained: no gradients, prefix under
no_grad, kept in eval mode), 'lora' (peft LoRA adapters on the decoder layers' q/k/v/o
projections; the vision tower stays frozen), 'full' (every backbone weight trains).
A checkpoint stores only what training changes (Policy.checkpoint_state): the expert,
projections and normalisation, plus the LoRA weights ('lora') or the truncated backbone
('full'). The backbone itself is reloaded from `backbone_dir`, whose fingerprint (SHA-256
of its config, weights, tokenizer and preprocessor files) the checkpoint records and loading
checks.

Supported backbones: SmolVLM / SmolVLM2 (model_type 'smolvlm') and PaliGemma / PaliGemma 2
('paligemma'). Qwen2-VL / Qwen2.5-VL are not: their vision tower takes variable-resolution
flattened patches with a grid (image_grid_thw) and multimodal rotary positions.
"""

from contextlib import nullcontext
from dataclasses import dataclass, field, replace
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
import torch.nn.functional as F  # noqa: N812

from habc_policy.models.base import Policy, register_policy
from habc_policy.models.flow_matching import (
    euler_sample,
    flow_matching_loss,
    guided_euler_sample,
    sinusoidal_embedding,
)
from habc_policy.robot_fit import check_camera_shape

FINETUNE_MODES = ('frozen', 'lora', 'full')
AUTOCAST_MODES = ('auto', 'off')
# model_type -> whether its get_image_features takes the images per sample, (B, V, 3, H, W)
# (Idefics3 style), or flat, (N, 3, H, W).
SUPPORTED_BACKBONES = {'smolvlm': True, 'paligemma': False}
_UNSUPPORTED = {
    'qwen2_vl': 'Qwen2-VL', 'qwen2_5_vl': 'Qwen2.5-VL', 'qwen3_vl': 'Qwen3-VL',
}
_LORA_TARGETS = ['q_proj', 'k_proj', 'v_proj', 'o_proj']
# The files whose content defines the backbone; other files (README, .gitattributes) may
# change without invalidating checkpoints.
_FINGERPRINT_FILES = ('config.json', 'preprocessor_config.json', 'tokenizer.json',
                      'tokenizer_config.json', 'tokenizer.model', 'special_tokens_map.json')
_TOKENIZER_FILES = ('tokenizer.json', 'tokenizer.model', 'vocab.json')
_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}
_TOKEN_CACHE_LIMIT = 4096


@dataclass(frozen=True)
class TransformersVLAConfig:
    """Sizes and modes of the transformers-backed VLA (all config values, so it scales)."""

    backbone_dir: str = ''
    # First N decoder layers of the VLM's language model form the prefix (0 = all of them).
    prefix_layers: int = 0
    state_dim: int = 14
    action_dim: int = 14
    horizon: int = 50
    num_views: int = 2
    # The robot's images (image_size x image_size); they are resized to the vision tower's.
    image_size: int = 96
    max_instruction_tokens: int = 48
    expert_hidden_dim: int = 256
    expert_layers: int = 4
    expert_heads: int = 4
    num_inference_steps: int = 10
    actions_per_token: int = 5
    finetune: str = 'frozen'
    lora_rank: int = 8
    lora_alpha: float = 16.0
    # 'auto': bf16 autocast when the policy runs on CUDA (never on CPU); 'off': float32.
    autocast: str = 'auto'
    # Filled in when the policy is built: the backbone folder's fingerprint, which loading a
    # checkpoint checks ('' = do not check, e.g. a new policy).
    backbone_fingerprint: str = ''
    # [H, W] of the robot camera images it was trained on ([] = not recorded), as SmallVLA's.
    camera_shape: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_camera_shape(self.camera_shape, name)
        if not self.backbone_dir:
            raise ValueError(f'{name}.backbone_dir must name a local VLM folder')
        if self.finetune not in FINETUNE_MODES:
            raise ValueError(f'{name}.finetune must be one of {list(FINETUNE_MODES)}, got '
                             f'{self.finetune!r}')
        if self.autocast not in AUTOCAST_MODES:
            raise ValueError(f'{name}.autocast must be one of {list(AUTOCAST_MODES)}, got '
                             f'{self.autocast!r}')
        for field_name in ('state_dim', 'action_dim', 'horizon', 'num_views', 'image_size',
                           'max_instruction_tokens', 'expert_hidden_dim', 'expert_layers',
                           'expert_heads', 'num_inference_steps', 'actions_per_token',
                           'lora_rank'):
            if getattr(self, field_name) < 1:
                raise ValueError(f'{name}.{field_name} must be >= 1, got '
                                 f'{getattr(self, field_name)}')
        if self.prefix_layers < 0:
            raise ValueError(f'{name}.prefix_layers must be >= 0 (0 = all layers), got '
                             f'{self.prefix_layers}')
        if self.lora_alpha <= 0:
            raise ValueError(f'{name}.lora_alpha must be > 0, got {self.lora_alpha}')
        if self.expert_hidden_dim % self.expert_heads:
            raise ValueError(f'{name}.expert_hidden_dim {self.expert_hidden_dim} must be '
                             f'divisible by expert_heads {self.expert_heads}')


# --- the backbone folder ---------------------------------------------------------------
def check_backbone_dir(folder: str | Path) -> dict[str, Any]:
    """Check that `folder` is a local VLM folder we support; return its config.json.

    Runs before anything reaches transformers, so a hub name such as 'org/model' fails here
    without any network access.

    Raises:
        FileNotFoundError: the folder, its config.json, tokenizer or weights are missing.
        ValueError: config.json is not a vision-language model's, or not a supported one.
    """
    path = Path(folder).expanduser()
    expected = ('a local folder holding config.json (with a vision_config and a text_config), '
                'the weights as *.safetensors and a tokenizer (tokenizer.json or '
                'tokenizer.model), as save_pretrained writes them')
    if not path.is_dir():
        raise FileNotFoundError(f'backbone folder {str(folder)!r} not found: TransformersVLA '
                                f'loads only from {expected}; nothing is downloaded (fetch it '
                                'beforehand, e.g. `hf download ORG/MODEL --local-dir DIR`)')
    config_path = path / 'config.json'
    if not config_path.is_file():
        raise FileNotFoundError(f'{config_path} not found: a backbone folder is {expected}')
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f'{config_path} is not readable JSON: {exc}') from exc
    missing = [key for key in ('vision_config', 'text_config') if key not in config]
    if missing:
        raise ValueError(f'{path} is not a vision-language model folder: its config.json '
                         f'(model_type {config.get("model_type")!r}) has no {missing}; '
                         f'expected {expected}')
    model_type = config.get('model_type')
    if model_type in _UNSUPPORTED:
        raise ValueError(f'{path}: {_UNSUPPORTED[model_type]} backbones are not supported '
                         'yet (their vision tower takes variable-resolution patches with '
                         'image_grid_thw); supported model types: '
                         f'{sorted(SUPPORTED_BACKBONES)}')
    if model_type not in SUPPORTED_BACKBONES:
        raise ValueError(f'{path}: backbone model_type {model_type!r} is not supported; '
                         f'supported: {sorted(SUPPORTED_BACKBONES)}')
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(f'{path} has no tokenizer ({" or ".join(_TOKENIZER_FILES)}): '
                                f'a backbone folder is {expected}')
    if not any(path.glob('*.safetensors')):
        raise FileNotFoundError(f'{path} has no *.safetensors weights: a backbone folder is '
                                f'{expected}')
    return config


def _file_digest(path: Path) -> str:
    # Cached per (path, size, mtime): a policy node that hot-swaps checkpoints on the same
    # backbone hashes its gigabytes once per process, not once per load.
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        digest = hashlib.sha256()
        with open(path, 'rb') as stream:
            for block in iter(lambda: stream.read(1 << 22), b''):
                digest.update(block)
        _FILE_DIGESTS[key] = digest.hexdigest()
    return _FILE_DIGESTS[key]


def backbone_fingerprint(folder: str | Path) -> str:
    """SHA-256 over the backbone folder's config, weights, tokenizer and preprocessor files."""
    path = Path(folder).expanduser()
    names = sorted({*(n for n in _FINGERPRINT_FILES if (path / n).is_file()),
                    *(p.name for p in path.glob('*.safetensors'))})
    digest = hashlib.sha256()
    for name in names:
        digest.update(f'{name}\0{_file_digest(path / name)}\n'.encode())
    return digest.hexdigest()


def _load_vlm(folder: Path, architectures: list[str]) -> nn.Module:
    """Load the VLM with its auto class, or with the class its config.json names."""
    import transformers

    kwargs = {'local_files_only': True, 'dtype': torch.float32}
    try:
        return transformers.AutoModelForImageTextToText.from_pretrained(str(folder), **kwargs)
    except ValueError as auto_error:
        # AutoModelForImageTextToText does not map every VLM config; the architecture named in
        # config.json is the backbone's own class.
        for name in architectures:
            cls = getattr(transformers, name, None)
            if cls is not None:
                return cls.from_pretrained(str(folder), **kwargs)
        raise ValueError(f'{folder}: cannot load the VLM with AutoModelForImageTextToText '
                         f'({auto_error}) nor with its architectures {architectures}') from None


def _image_normalization(folder: Path) -> tuple[list[float], list[float]]:
    path = folder / 'preprocessor_config.json'
    if path.is_file():
        processor = json.loads(path.read_text())
        mean, std = processor.get('image_mean'), processor.get('image_std')
        if mean is not None and std is not None:
            return [float(v) for v in mean], [float(v) for v in std]
    return [0.5] * 3, [0.5] * 3


# --- the action expert -----------------------------------------------------------------
class ExpertLayer(nn.Module):
    """Pre-norm block: self-attention over the expert tokens, cross-attention to the prefix.

    `prefix_kv` projects the prefix to this layer's keys and values once per observation; the
    forward pass only takes them (the prefix KV cache), so an Euler step never touches the
    prefix again.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.self_norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.self_out = nn.Linear(dim, dim)
        self.cross_norm = nn.LayerNorm(dim)
        self.cross_q = nn.Linear(dim, dim)
        self.cross_kv = nn.Linear(dim, 2 * dim)
        self.cross_out = nn.Linear(dim, dim)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    @staticmethod
    def _merge(x: torch.Tensor) -> torch.Tensor:
        b, h, n, d = x.shape
        return x.transpose(1, 2).reshape(b, n, h * d)

    def prefix_kv(self, prefix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys and values (B, heads, P, head_dim) of the projected prefix."""
        key, value = self.cross_kv(prefix).chunk(2, dim=-1)
        return self._heads(key), self._heads(value)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                prefix_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = (self._heads(t) for t in self.qkv(self.self_norm(x)).chunk(3, dim=-1))
        x = x + self.self_out(self._merge(F.scaled_dot_product_attention(q, k, v)))
        q = self._heads(self.cross_q(self.cross_norm(x)))
        attended = F.scaled_dot_product_attention(q, *kv, attn_mask=prefix_mask[:, None, None])
        x = x + self.cross_out(self._merge(attended))
        return x + self.mlp(self.mlp_norm(x))


@register_policy
class TransformersVLA(Policy):
    """Images + instruction through a pretrained VLM prefix, flow-matching action expert."""

    type_name = 'transformers_vla'
    config_class = TransformersVLAConfig
    exact_image_size = True
    supports_guided_prefix = True

    def __init__(self, config: TransformersVLAConfig) -> None:
        vlm_config = check_backbone_dir(config.backbone_dir)
        # Absolute, so that a checkpoint loads from any working directory.
        folder = Path(config.backbone_dir).expanduser().absolute()
        fingerprint = backbone_fingerprint(folder)
        if config.backbone_fingerprint and config.backbone_fingerprint != fingerprint:
            raise ValueError(
                f'backbone folder {folder} changed since this policy was trained: its '
                f'fingerprint is {fingerprint[:16]}, the checkpoint recorded '
                f'{config.backbone_fingerprint[:16]}; the checkpoint stores only the weights '
                'trained on top of the backbone, so restore the backbone it was trained on')
        super().__init__(replace(config, backbone_dir=str(folder),
                                 backbone_fingerprint=fingerprint))
        c = self.config
        self.model_type = vlm_config['model_type']
        self._images_per_sample = SUPPORTED_BACKBONES[self.model_type]

        from transformers import AutoTokenizer

        vlm = _load_vlm(folder, vlm_config.get('architectures') or [])
        # The inner model holds vision tower, connector and language model; dropping the
        # wrapper drops the LM head, which the policy never uses.
        self.backbone = getattr(vlm, 'model', vlm)
        del vlm
        decoder = self.backbone.get_decoder()
        total = len(decoder.layers)
        if c.prefix_layers > total:
            raise ValueError(f'prefix_layers {c.prefix_layers} > the {total} decoder layers '
                             f'of the backbone in {folder}')
        keep = c.prefix_layers or total
        decoder.layers = nn.ModuleList(list(decoder.layers)[:keep])
        decoder.config.num_hidden_layers = keep
        if getattr(decoder.config, 'layer_types', None):
            decoder.config.layer_types = list(decoder.config.layer_types)[:keep]
        self.vlm_hidden_dim = int(decoder.config.hidden_size)
        vision_size = self.backbone.config.vision_config.image_size
        self.vision_image_size = int(vision_size if isinstance(vision_size, int)
                                     else vision_size[0])
        mean, std = _image_normalization(folder)
        self.register_buffer('image_mean', torch.tensor(mean).expand(3).reshape(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer('image_std', torch.tensor(std).expand(3).reshape(1, 3, 1, 1),
                             persistent=False)
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self._pad_id = self.tokenizer.pad_token_id or 0
        self._token_cache: dict[str, list[int]] = {}
        self._setup_finetune()

        d = c.expert_hidden_dim
        self.prefix_project = nn.Sequential(nn.LayerNorm(self.vlm_hidden_dim),
                                            nn.Linear(self.vlm_hidden_dim, d))
        self.state_project = nn.Linear(c.state_dim, d)
        k = c.actions_per_token
        self.num_action_tokens = -(-c.horizon // k)  # ceil: the last token may be padded
        self.action_in = nn.Linear(c.action_dim * k, d)
        self.action_position = nn.Parameter(torch.zeros(self.num_action_tokens, d))
        nn.init.normal_(self.action_position, std=0.02)
        self.time_mlp = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
        self.expert = nn.ModuleList(ExpertLayer(d, c.expert_heads)
                                    for _ in range(c.expert_layers))
        self.expert_norm = nn.LayerNorm(d)
        self.action_out = nn.Linear(d, c.action_dim * k)
        self.register_normalization(c.state_dim, c.action_dim)

    def _setup_finetune(self) -> None:
        c = self.config
        self.backbone.requires_grad_(c.finetune == 'full')
        if c.finetune == 'lora':
            try:
                from peft import inject_adapter_in_model, LoraConfig
            except ImportError as exc:
                raise ImportError("finetune='lora' needs the peft package (pip install "
                                  'peft); or use finetune frozen or full') from exc
            lora = LoraConfig(r=c.lora_rank, lora_alpha=c.lora_alpha, lora_dropout=0.0,
                              target_modules=_LORA_TARGETS, bias='none')
            # Only the language model's decoder layers: the vision tower's attention uses the
            # same projection names and stays frozen.
            inject_adapter_in_model(lora, self.backbone.get_decoder())
            for name, parameter in self.backbone.named_parameters():
                parameter.requires_grad_('lora_' in name)
        if c.finetune == 'frozen':
            self.backbone.eval()

    def train(self, mode: bool = True) -> 'TransformersVLA':
        """Set train/eval mode; a frozen backbone stays in eval mode (no dropout, ever)."""
        super().train(mode)
        if self.config.finetune == 'frozen':
            self.backbone.eval()
        return self

    # --- checkpoints: only what training changes -------------------------------------
    def _is_saved(self, key: str) -> bool:
        if not key.startswith('backbone.'):
            return True
        return self.config.finetune == 'full' or (self.config.finetune == 'lora'
                                                  and 'lora_' in key)

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """Expert, projections, normalisation, and LoRA weights or the truncated backbone.

        A frozen backbone is reloaded from backbone_dir (checked by its fingerprint), so it
        is not copied into every checkpoint.
        """
        return {k: v for k, v in self.state_dict().items() if self._is_saved(k)}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]
                              ) -> tuple[list[str], list[str]]:
        """Load `checkpoint_state`'s tensors; backbone keys a checkpoint omits are not missing."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        return [k for k in missing if self._is_saved(k)], list(unexpected)

    # --- inputs ----------------------------------------------------------------------
    @property
    def feature_dim(self) -> int:
        return self.vlm_hidden_dim + self.config.expert_hidden_dim

    def _autocast(self, device: torch.device):
        if self.config.autocast == 'auto' and device.type == 'cuda':
            return torch.autocast('cuda', dtype=torch.bfloat16)
        return nullcontext()

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        """(B, V, H, W, 3) robot images -> (B, V, 3, S, S) normalised for the vision tower."""
        c = self.config
        if (images.ndim != 5 or images.shape[1] != c.num_views or images.shape[-1] != 3
                or tuple(images.shape[2:4]) != (c.image_size, c.image_size)):
            raise ValueError(f'images must be (B, {c.num_views}, {c.image_size}, '
                             f"{c.image_size}, 3) (the policy's num_views and image_size), "
                             f'got {tuple(images.shape)}')
        b, v = images.shape[:2]
        pixels = images.reshape(b * v, *images.shape[2:]).permute(0, 3, 1, 2).float()
        if images.dtype == torch.uint8:
            pixels = pixels / 255.0
        size = self.vision_image_size
        if pixels.shape[-1] != size:
            pixels = F.interpolate(pixels, size=(size, size), mode='bilinear',
                                   align_corners=False, antialias=True)
        pixels = (pixels - self.image_mean) / self.image_std
        return pixels.view(b, v, 3, size, size)

    def _image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, V, 3, S, S) -> (B, V * T, vlm_hidden) through the VLM's get_image_features."""
        b, v = pixels.shape[:2]
        if self._images_per_sample:
            # Idefics3-style towers drop all-zero images as padding, which would shift every
            # later token; with the usual mean of 0.5 no uint8 frame normalises to all zeros.
            if (pixels.flatten(2) == 0).all(-1).any():
                raise ValueError('an image normalises to all zeros, which the vision tower '
                                 'takes for padding; check the camera images and the '
                                 "backbone's preprocessor_config.json image_mean")
            features = self.backbone.get_image_features(pixel_values=pixels).pooler_output
            return torch.stack(list(features))
        features = self.backbone.get_image_features(pixel_values=pixels.flatten(0, 1))
        features = getattr(features, 'pooler_output', features)
        return features.reshape(b, -1, features.shape[-1])

    def _text_ids(self, instructions: list[str], device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, L) of the instructions, right-padded, and their mask (B, L)."""
        missing = [t for t in dict.fromkeys(instructions) if t not in self._token_cache]
        if missing:
            if len(self._token_cache) + len(missing) > _TOKEN_CACHE_LIMIT:
                self._token_cache.clear()
            encoded = self.tokenizer(missing, truncation=True,
                                     max_length=self.config.max_instruction_tokens)
            self._token_cache.update(zip(missing, encoded['input_ids'], strict=True))
        rows = [self._token_cache[t] for t in instructions]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.bool)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, :len(row)] = True
        return ids.to(device), mask.to(device)

    def _run_prefix(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        from transformers.masking_utils import create_bidirectional_mask

        pixels = self._pixels(batch['images'].to(self.image_mean.device))
        device = pixels.device
        train_vision = self.config.finetune == 'full' and torch.is_grad_enabled()
        with torch.set_grad_enabled(train_vision):
            image_tokens = self._image_tokens(pixels)
        instructions = list(batch['instruction'])
        if len(instructions) != image_tokens.shape[0]:
            raise ValueError(f'{len(instructions)} instructions for a batch of '
                             f'{image_tokens.shape[0]} observations')
        ids, text_mask = self._text_ids(instructions, device)
        text_tokens = self.backbone.get_input_embeddings()(ids)
        embeds = torch.cat([image_tokens.to(text_tokens.dtype), text_tokens], dim=1)
        mask = torch.cat([torch.ones(image_tokens.shape[:2], dtype=torch.bool, device=device),
                          text_mask], dim=1)
        decoder = self.backbone.get_decoder()
        attention = create_bidirectional_mask(config=decoder.config, inputs_embeds=embeds,
                                              attention_mask=mask,
                                              allow_is_bidirectional_skip=False)
        positions = torch.arange(embeds.shape[1], device=device)[None]
        hidden = decoder(inputs_embeds=embeds, attention_mask=attention, position_ids=positions,
                         use_cache=False).last_hidden_state
        return hidden, mask

    def prefix(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix hidden states (B, P, vlm_hidden) and their mask (B, P), True = a token.

        Under no_grad for a frozen backbone: nothing in it trains, and activations for
        backward would cost the memory of a full VLM pass.
        """
        frozen = self.config.finetune == 'frozen'
        with torch.no_grad() if frozen else nullcontext():
            with self._autocast(self.image_mean.device):
                return self._run_prefix(batch)

    def _state_token(self, batch: dict[str, Any]) -> torch.Tensor:
        state = batch['state'].to(self.state_mean.device).float()
        if state.ndim != 2 or state.shape[-1] != self.config.state_dim:
            raise ValueError(f'state has {state.shape[-1]} values, the policy expects '
                             f'{self.config.state_dim} (state_dim)')
        return self.state_project((state - self.state_mean) / self.state_std)

    @staticmethod
    def _pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights = mask[..., None].to(torch.float32)
        return (hidden.float() * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    # --- the policy interface ----------------------------------------------------------
    def encode(self, batch: dict[str, Any]) -> torch.Tensor:
        """Critic features (B, vlm_hidden + expert_hidden): pooled prefix and state token."""
        hidden, mask = self.prefix(batch)
        return self.encode_with_cached(batch, self._pool(hidden, mask))

    @property
    def cacheable_feature_dim(self) -> int:
        """The pooled prefix when the backbone is frozen, else 0 (LoRA and full train it).

        A frozen backbone stays in eval mode and sees the images without augmentation, so
        the pooled prefix of a frame never changes; the state token behind it trains.
        """
        return self.vlm_hidden_dim if self.config.finetune == 'frozen' else 0

    def encode_cacheable(self, batch: dict[str, Any]) -> torch.Tensor:
        """Return the pooled prefix (B, vlm_hidden) alone: the first columns of `encode`."""
        if not self.cacheable_feature_dim:
            raise ValueError(f'finetune={self.config.finetune!r} trains the backbone: its '
                             'prefix features change with every step and are not cacheable')
        hidden, mask = self.prefix(batch)
        return self._pool(hidden, mask)

    def encode_with_cached(self, batch: dict[str, Any], cached: torch.Tensor) -> torch.Tensor:
        """`encode` from a pooled prefix computed before: only the state token is computed."""
        return torch.cat([cached, self._state_token(batch)], dim=-1)

    def _velocity_fn(self, hidden: torch.Tensor, mask: torch.Tensor, state: torch.Tensor):
        """Return the expert's velocity field over a prefix computed once (its KV cache)."""
        c = self.config
        tokens = self.num_action_tokens
        padding = tokens * c.actions_per_token - c.horizon
        with self._autocast(hidden.device):
            projected = self.prefix_project(hidden)
            cache = [layer.prefix_kv(projected) for layer in self.expert]

        def velocity(x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
            batch = x.shape[0]
            if padding:
                x = F.pad(x, (0, 0, 0, padding))
            grouped = x.reshape(batch, tokens, c.actions_per_token * c.action_dim)
            with self._autocast(hidden.device):
                time = self.time_mlp(sinusoidal_embedding(tau, c.expert_hidden_dim))
                actions = self.action_in(grouped) + self.action_position + time[:, None]
                sequence = torch.cat([state[:, None].to(actions.dtype), actions], dim=1)
                for layer, kv in zip(self.expert, cache, strict=True):
                    sequence = layer(sequence, kv, mask)
                out = self.action_out(self.expert_norm(sequence[:, 1:]))
            out = out.float().reshape(batch, tokens * c.actions_per_token, c.action_dim)
            return out[:, :c.horizon]
        return velocity

    def _loss(self, batch: dict[str, Any], hidden: torch.Tensor, mask: torch.Tensor,
              state: torch.Tensor) -> torch.Tensor:
        actions = batch['actions'].to(self.actions_mean.device).float()
        if actions.shape[1:] != (self.config.horizon, self.config.action_dim):
            raise ValueError(f'actions are {tuple(actions.shape[1:])} per sample (steps, '
                             f'values), the policy expects ({self.config.horizon}, '
                             f'{self.config.action_dim}) (horizon, action_dim)')
        actions = (actions - self.actions_mean) / self.actions_std
        action_mask = batch['action_mask'].to(actions.device)
        dim_mask = batch.get('dim_mask')
        return flow_matching_loss(self._velocity_fn(hidden, mask, state), actions, action_mask,
                                  None if dim_mask is None else dim_mask.to(actions.device))

    def per_sample_loss(self, batch: dict[str, Any],
                        features: torch.Tensor | None = None) -> torch.Tensor:
        # Pooled features cannot rebuild the prefix: features_and_loss shares one prefix
        # pass between the critic features and the loss.
        hidden, mask = self.prefix(batch)
        return self._loss(batch, hidden, mask, self._state_token(batch))

    def features_and_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Critic features and per-sample loss from ONE prefix pass."""
        hidden, mask = self.prefix(batch)
        state = self._state_token(batch)
        features = torch.cat([self._pool(hidden, mask), state], dim=-1)
        return features, self._loss(batch, hidden, mask, state)

    @torch.no_grad()
    def sample_chunks(self, batch: dict[str, Any],
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample chunks (B, H, D) in robot units: one prefix pass, then the Euler steps."""
        hidden, mask = self.prefix(batch)
        state = self._state_token(batch)
        shape = (hidden.shape[0], self.config.horizon, self.config.action_dim)
        x = euler_sample(self._velocity_fn(hidden, mask, state), shape,
                         self.config.num_inference_steps, hidden.device, generator)
        return x * self.actions_std + self.actions_mean

    @torch.no_grad()
    def sample_guided_chunks(self, batch: dict[str, Any], prefix: torch.Tensor,
                             weights: torch.Tensor, generator: torch.Generator | None = None,
                             max_guidance: float = 5.0) -> torch.Tensor:
        """Chunks (B, H, D) guided towards the action `prefix` (robot units).

        One pass of the VLM's token prefix (self.prefix: not the action prefix), then the
        guided Euler steps through the expert.
        """
        hidden, mask = self.prefix(batch)
        state = self._state_token(batch)
        mean, std = self.actions_mean, self.actions_std
        target = (prefix.to(mean.device).float() - mean) / std
        x = guided_euler_sample(self._velocity_fn(hidden, mask, state), target, weights,
                                self.config.num_inference_steps, generator, max_guidance)
        return x * self.actions_std + self.actions_mean
