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
    # True when predict_action_chunk takes a `prefix` (real-time chunking: the sampler is
    # guided towards the actions already planned; see sample_guided_chunks). A flow policy
    # may decide per instance (a property): read it on the policy, not on its class.
    supports_guided_prefix: ClassVar[bool] = False

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

    def sample_chunks_and_features(self, batch: dict[str, Any],
                                   generator: torch.Generator | None = None
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return `sample_chunks(batch, generator)` and `encode(batch)` (eval mode).

        The robot's critic reads the features of the observation it acts on. A model whose
        chunks come from the same encoder pass overrides this to share it; the default runs
        the encoder twice.
        """
        return self.sample_chunks(batch, generator), self.encode(batch)

    def sample_guided_chunks(self, batch: dict[str, Any], prefix: torch.Tensor,
                             weights: torch.Tensor, generator: torch.Generator | None = None,
                             max_guidance: float = 5.0) -> torch.Tensor:
        """Chunks (B, H, D) in robot units, sampled with real-time chunking's guidance.

        `prefix` (B, H, D) in robot units holds the actions the new chunk should start with;
        `weights` (H,) how much each step counts (models.flow_matching.prefix_weights);
        `max_guidance` is the clip beta of models.flow_matching.guided_euler_sample.
        Implemented by the policies whose `supports_guided_prefix` is True.
        """
        raise NotImplementedError(f'{type(self).__name__} does not sample with a guided '
                                  'prefix (supports_guided_prefix is False)')

    def predict_action_chunk(self, observation: dict[str, Any],
                             prefix: np.ndarray | None = None, delay: int = 0,
                             generator: torch.Generator | None = None,
                             max_guidance: float = 5.0) -> np.ndarray:
        """Predict the (H, D) chunk for ONE observation (no batch dimension).

        Real-time chunking: `prefix` (P, D), P <= H, in robot units, holds the actions planned
        for the new chunk's steps 0..P-1: its first `delay` are already committed to the
        robot (they will have run before the chunk arrives), the rest are the previous
        chunk's plan. The chunk is then sampled guided towards them (weights 1 for the first
        `delay`, decaying to 0 at P; models.flow_matching.prefix_weights), so it continues
        what the robot does instead of jumping to another mode. `max_guidance` is the
        guidance clip beta (5 in the paper): the guidance moves a sample along what the model
        can produce from it, so with few flow steps it corrects a sample within its mode but
        rarely turns one that took another mode; a larger beta (with more
        num_inference_steps) does (test_realtime_chunking.py). Without a prefix the chunk
        is sampled as before (the same random numbers for the same `generator`).

        Raises:
            ValueError: a prefix for a policy that cannot take one, or a malformed prefix
                (shape, length above H, delay outside 0..P, NaN or infinite values).
        """
        was_training = self.training
        if was_training:
            self.eval()
        batch = self.observation_batch(observation)
        try:
            if prefix is None:
                with torch.inference_mode():
                    chunk = self.sample_chunks(batch, generator)
            else:
                target, weights = self._guided_prefix(prefix, delay,
                                                      next(self.parameters()).device)
                # Not inference_mode: the guidance differentiates the velocity field, and
                # inference tensors cannot enter autograd. no_grad still skips the graph of
                # the observation encoder; the guidance step turns gradients on for itself.
                with torch.no_grad():
                    chunk = self.sample_guided_chunks(batch, target[None], weights, generator,
                                                      max_guidance)
        finally:
            if was_training:
                self.train()
        return chunk[0].cpu().numpy()

    def observation_batch(self, observation: dict[str, Any]) -> dict[str, Any]:
        """Return ONE observation as a batch of one, on the policy's device."""
        device = next(self.parameters()).device
        return {key: _add_batch_dim(value, device) for key, value in observation.items()}

    def _guided_prefix(self, prefix: Any, delay: int, device: torch.device
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Check a prefix (P, D); return it held-last padded to (H, D) and its weights (H,)."""
        from habc_policy.models.flow_matching import prefix_weights

        if not self.supports_guided_prefix:
            raise ValueError(f'{type(self).__name__} cannot take a prefix (real-time chunking '
                             'needs a flow-matching policy whose supports_guided_prefix is '
                             'True); call predict_action_chunk without prefix')
        actions = np.asarray(prefix, dtype=np.float32)
        h, d = self.horizon, self.action_dim
        if actions.ndim != 2 or actions.shape[1] != d or not 1 <= actions.shape[0] <= h:
            raise ValueError(f'prefix must be (P, {d}) actions with 1 <= P <= {h} (the '
                             f'horizon), got shape {actions.shape}')
        if not np.all(np.isfinite(actions)):
            raise ValueError('prefix has NaN or infinite actions')
        length = actions.shape[0]
        if not 0 <= delay <= length:
            raise ValueError(f'delay must be in 0..{length} (the prefix length), got {delay}')
        # Held-last padding: padding with zeros would be a far-off target in robot units (and
        # the dataset mean once normalised); its weights are 0 anyway.
        padded = np.concatenate([actions, np.repeat(actions[-1:], h - length, axis=0)])
        return (torch.as_tensor(padded, device=device),
                prefix_weights(h, delay, length).to(device))

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
