"""The policy interface every model implements (LeRobot-style, no rclpy).

A policy maps one observation to a chunk of H future actions (H, D) and, for training,
returns its own loss per sample so that the weights of Eq. 1 (L = 1/B sum_i w_i l_i) apply.
It also exposes features of the observation for the critic (detached by the learner), a
version string, and save/load as safetensors weights plus a JSON config.

Batches are dicts of tensors with a leading batch dimension:
    observation keys of the model (e.g. 'state' (B, S), 'images' (B, V, H, W, 3) uint8,
        'instruction' list[str]),
    'actions' (B, H, D) target chunk, 'action_mask' (B, H) 1 where the chunk is inside the
        episode, optional 'dim_mask' (B, D) 1 for action dimensions that count (a human who
        drove only one arm).
"""

from abc import ABC, abstractmethod
from dataclasses import asdict, fields
import hashlib
import importlib
import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from safetensors.torch import load_file, save_file
import torch
from torch import nn

WEIGHTS_FILE = 'model.safetensors'
CONFIG_FILE = 'config.json'
# Bounds of a checkpoint that load_policy reads at all (check_weights_file): far above any
# real policy (a 3.5 B parameter pi0 has ~1,000 tensors, a header of ~100 kB), far below
# what would exhaust memory before the weights are even looked at.
MAX_TENSORS = 100_000
MAX_HEADER_BYTES = 16 * 2**20
MAX_CONFIG_BYTES = 16 * 2**20
# How files that are not safetensors begin: a pickle (protocol 2+) and torch.save's zip.
_PICKLE_MAGIC = (b'\x80', b'PK\x03\x04')
_REGISTRY: dict[str, type['Policy']] = {}
# `lerobot:PATH` names a LeRobot policy folder explicitly; load_policy also recognises one by
# its config.json (a LeRobot "type" and no habc "config").
LEROBOT_PREFIX = 'lerobot:'
# LeRobot policy types habc reads, and the class whose from_lerobot reads each.
_LEROBOT_LOADERS = {'act': ('habc_policy.models.lerobot_act', 'LeRobotACT'),
                    # Its VLM's config and tokenizer: the folder's vlm/ subfolder, or
                    # vlm_model_name as a local path (LeRobotSmolVLA.from_lerobot).
                    'smolvla': ('habc_policy.models.lerobot_smolvla', 'LeRobotSmolVLA')}
# Policy types whose module is imported only when a checkpoint names them.
_LAZY_MODULES = {'transformers_vla': 'habc_policy.models.transformers_vla',
                 'lerobot_act': 'habc_policy.models.lerobot_act',
                 'lerobot_smolvla': 'habc_policy.models.lerobot_smolvla'}


def register_policy(cls: type['Policy']) -> type['Policy']:
    """Class decorator: make a policy type loadable by name from its config.json."""
    _REGISTRY[cls.type_name] = cls
    return cls


class Policy(nn.Module, ABC):
    """A chunking policy: observation -> (H, D) actions, with a per-sample training loss."""

    type_name: ClassVar[str]
    # True when the model takes images only at config.image_size: the learner then resizes
    # recorded images to it instead of keeping their size (a CNN takes any size).
    exact_image_size: ClassVar[bool] = False

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.version = 'untrained'

    @property
    def horizon(self) -> int:
        return self.config.horizon

    @property
    def action_dim(self) -> int:
        return self.config.action_dim

    @property
    @abstractmethod
    def feature_dim(self) -> int:
        """Size of the observation features that `encode` returns."""

    @abstractmethod
    def encode(self, batch: dict[str, Any]) -> torch.Tensor:
        """Observation features (B, feature_dim); the critic reads them detached."""

    @abstractmethod
    def per_sample_loss(self, batch: dict[str, Any],
                        features: torch.Tensor | None = None) -> torch.Tensor:
        """Training loss of each sample (B,), before any weighting.

        `features` are this batch's `encode` output when the caller already computed them.
        """

    def features_and_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return `encode(batch)` and `per_sample_loss(batch)` sharing one forward pass."""
        features = self.encode(batch)
        return features, self.per_sample_loss(batch, features=features)

    # --- cacheable features ----------------------------------------------------------------
    # A policy whose features start with columns that are a fixed function of the recorded
    # frame (images and instruction through a frozen backbone, no augmentation, no dropout)
    # says how many: the learner then computes them once per buffer row and reuses them
    # instead of running the backbone again for s_{t+1} at every step.
    @property
    def cacheable_feature_dim(self) -> int:
        """Leading columns of `encode` that never change for one frame (0: none, no cache).

        A policy that returns d > 0 promises that `encode(batch)[:, :d]` (and the same
        columns of `features_and_loss`) depend only on the batch's images and instruction,
        not on trained weights, train/eval mode or random numbers, and implements
        `encode_cacheable` and `encode_with_cached`.
        """
        return 0

    def encode_cacheable(self, batch: dict[str, Any]) -> torch.Tensor:
        """Return the first `cacheable_feature_dim` columns of `encode(batch)`, only those."""
        raise NotImplementedError(f'{type(self).__name__} has no cacheable features '
                                  '(cacheable_feature_dim is 0)')

    def encode_with_cached(self, batch: dict[str, Any], cached: torch.Tensor) -> torch.Tensor:
        """`encode(batch)` given its cacheable columns (B, cacheable_feature_dim) from before."""
        raise NotImplementedError(f'{type(self).__name__} has no cacheable features '
                                  '(cacheable_feature_dim is 0)')

    @abstractmethod
    def sample_chunks(self, batch: dict[str, Any],
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Predicted action chunks (B, H, D) in robot units."""

    def predict_action_chunk(self, observation: dict[str, Any]) -> np.ndarray:
        """Predict the (H, D) chunk for ONE observation (no batch dimension)."""
        was_training = self.training
        if was_training:
            self.eval()
        device = next(self.parameters()).device
        batch = {key: _add_batch_dim(value, device) for key, value in observation.items()}
        with torch.inference_mode():
            chunk = self.sample_chunks(batch)[0].cpu().numpy()
        if was_training:
            self.train()
        return chunk

    def register_normalization(self, state_dim: int, action_dim: int) -> None:
        """Create the mean/std buffers of states and actions (saved with the weights)."""
        self.register_buffer('state_mean', torch.zeros(state_dim))
        self.register_buffer('state_std', torch.ones(state_dim))
        self.register_buffer('actions_mean', torch.zeros(action_dim))
        self.register_buffer('actions_std', torch.ones(action_dim))

    def set_normalization(self, stats: dict[str, np.ndarray]) -> None:
        """Set mean/std buffers from data statistics (keys like 'actions_mean')."""
        for key, value in stats.items():
            buffer = getattr(self, key)
            buffer.copy_(torch.as_tensor(value, dtype=buffer.dtype))

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """Return the tensors a checkpoint stores: the whole state_dict unless overridden.

        A policy on a frozen pretrained backbone returns only what training changes, so that
        checkpoints do not each copy the backbone (it is reloaded from its own folder).
        """
        return self.state_dict()

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]
                              ) -> tuple[list[str], list[str]]:
        """Load `checkpoint_state`'s tensors; return the (missing, unexpected) keys."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        return list(missing), list(unexpected)

    def save(self, directory: Path) -> str:
        """Write model.safetensors + config.json; return the SHA-256 of the weights file."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.checkpoint_state().items()}
        save_file(state, str(directory / WEIGHTS_FILE), metadata={'version': self.version})
        meta = {'type': self.type_name, 'version': self.version, 'config': asdict(self.config)}
        (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + '\n')
        return sha256_file(directory / WEIGHTS_FILE)

    @classmethod
    def from_config(cls, config: Any) -> 'Policy':
        return cls(config)


def _add_batch_dim(value: Any, device: torch.device) -> Any:
    if isinstance(value, str):
        return [value]
    return torch.as_tensor(np.asarray(value), device=device)[None]


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, 'rb') as stream:
        for block in iter(lambda: stream.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def load_policy(directory: Path | str, map_location: str = 'cpu') -> Policy:
    """Load a policy saved with Policy.save, or a LeRobot policy folder.

    A LeRobot folder (as LeRobot's save_pretrained writes it) is recognised by its
    config.json, or named explicitly as `lerobot:PATH`; its weights are mapped into habc's
    in-tree equivalent (docs/pretrained_vla.md). Errors name what is missing or wrong.
    """
    text = str(directory)
    explicit_lerobot = text.startswith(LEROBOT_PREFIX)
    directory = Path(text[len(LEROBOT_PREFIX):] if explicit_lerobot else text).expanduser()
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f'{path} not found: a checkpoint folder holds '
                                    f'{CONFIG_FILE} and {WEIGHTS_FILE}')
    check_weights_file(weights_path)
    meta = _read_config(config_path)
    if explicit_lerobot or not isinstance(meta.get('config'), dict):
        return _load_lerobot(directory, meta, map_location)
    # The built-in models register themselves on import; the ones in _LAZY_MODULES only when
    # a checkpoint names them (the transformers VLA pulls in transformers' VLM code).
    from habc_policy.models import lowdim, vla  # noqa: F401
    if meta.get('type') in _LAZY_MODULES:
        importlib.import_module(_LAZY_MODULES[meta['type']])
    cls = _REGISTRY.get(meta.get('type'))
    if cls is None:
        raise ValueError(f'{config_path}: unknown policy type {meta.get("type")!r}; known: '
                         f'{sorted(_REGISTRY)}')
    config_cls = cls.config_class
    known = {f.name for f in fields(config_cls)}
    unknown = sorted(set(meta['config']) - known)
    if unknown:
        raise ValueError(f'{config_path}: unknown {meta["type"]} config key(s) {unknown}; '
                         f'a checkpoint of another habc version or a hand-edited file? '
                         f'known keys: {sorted(known)}')
    config = config_cls(**meta['config'])
    policy = cls(config)
    state = load_file(str(weights_path), device=map_location)
    missing, unexpected = policy.load_checkpoint_state(state)
    if missing or unexpected:
        raise ValueError(f'{weights_path} does not match {config_path}: missing {missing}, '
                         f'unexpected {unexpected}')
    policy.version = meta.get('version', 'unknown')
    return policy


def check_weights_file(path: Path) -> None:
    """Raise ValueError unless `path` is a safetensors file of sane size.

    Only safetensors are loaded: a pickle (torch.save, pytorch_model.bin) runs code when
    it is read. The header is checked before anything is parsed: a file that declares a
    huge header or tensor count is refused instead of filling memory.
    """
    with open(path, 'rb') as file:
        head = file.read(9)
        size = int.from_bytes(head[:8], 'little')
        # A safetensors file: an 8-byte header length, then the JSON header.
        if len(head) < 9 or head[8:9] != b'{':
            if head.startswith(_PICKLE_MAGIC):
                raise ValueError(
                    f'{path} is a pickle / torch.save file, not safetensors: habc loads '
                    'safetensors only (loading a pickle can run code); convert it with '
                    'safetensors.torch.save_file where you trust it')
            raise ValueError(f'{path}: not a safetensors file (it does not start with a '
                             'header length and a JSON header)')
        if size > MAX_HEADER_BYTES:
            raise ValueError(f'{path}: safetensors header of {size} bytes (more than '
                             f'{MAX_HEADER_BYTES}); a damaged or hostile file')
        header = head[8:] + file.read(size - 1)
    try:
        entries = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f'{path}: not a safetensors file (its header is not JSON: '
                         f'{exc})') from None
    if not isinstance(entries, dict):
        raise ValueError(f'{path}: not a safetensors file (its header is not a JSON object)')
    count = len(entries) - ('__metadata__' in entries)
    if count > MAX_TENSORS:
        raise ValueError(f'{path}: {count} tensors (more than {MAX_TENSORS}); a damaged or '
                         'hostile file')


def _read_config(path: Path) -> dict:
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ValueError(f'{path}: {path.stat().st_size} bytes, more than a config.json holds '
                         f'({MAX_CONFIG_BYTES})')
    try:
        meta = json.loads(path.read_text(encoding='utf-8'))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f'{path}: not valid JSON ({exc})') from None
    if not isinstance(meta, dict):
        raise ValueError(f'{path}: expected a JSON object, got {type(meta).__name__}')
    return meta


def _load_lerobot(directory: Path, meta: Any, map_location: str) -> Policy:
    """Load a LeRobot policy folder through the in-tree class of its type."""
    kind = meta.get('type') if isinstance(meta, dict) else None
    if kind not in _LEROBOT_LOADERS:
        raise ValueError(
            f'{directory / CONFIG_FILE}: neither a habc checkpoint (it has no "config") nor a '
            f'LeRobot policy folder habc reads (type {kind!r}; habc reads LeRobot types '
            f'{sorted(_LEROBOT_LOADERS)}, see docs/pretrained_vla.md)')
    module, name = _LEROBOT_LOADERS[kind]
    cls = getattr(importlib.import_module(module), name)
    return cls.from_lerobot(directory, map_location=map_location)
