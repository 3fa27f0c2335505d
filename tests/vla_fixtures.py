"""Pytest fixtures for a tiny TransformersVLA (a plugin of every test; see conftest.py).

`tiny_backbone`: a random SmolVLM folder written with save_pretrained (2 decoder layers,
32 px vision tower), loaded back from disk like a downloaded one, so nothing is fetched;
`transformers_vla_checkpoint`: a TransformersVLA on it saved as the SFT checkpoint
(version 1). `tiny_transformers_vla(backbone)` builds one for tests that save their own;
`tiny_sft_checkpoint(path)` saves a small VLA of the same fit as the SFT checkpoint.
Sizes fit the simulated robot (14 joints, one 32 px camera) and keep a training step cheap.
"""

from pathlib import Path
from typing import Any

import pytest

# TransformersVLAConfig values: one prefix layer of the two, a one-layer expert.
TINY_VLA = {'state_dim': 14, 'action_dim': 14, 'horizon': 10, 'num_views': 1,
            'image_size': 32, 'prefix_layers': 1, 'expert_hidden_dim': 32, 'expert_layers': 1,
            'expert_heads': 2, 'actions_per_token': 5, 'num_inference_steps': 3}


@pytest.fixture(scope='session')
def tiny_backbone(tmp_path_factory) -> Path:
    """Return a tiny random SmolVLM folder (config.json, model.safetensors, tokenizer)."""
    from habc_policy.models.tiny_backbones import write_tiny_smolvlm

    return write_tiny_smolvlm(tmp_path_factory.mktemp('vlm') / 'smolvlm', text_layers=2,
                              image_size=32)


def tiny_transformers_vla(backbone: Path, seed: int = 0, **overrides: Any) -> Any:
    """Return an untrained TransformersVLA of TINY_VLA's sizes on `backbone`."""
    import torch

    from habc_policy.models.transformers_vla import TransformersVLA, TransformersVLAConfig

    torch.manual_seed(seed)
    return TransformersVLA(TransformersVLAConfig(backbone_dir=str(backbone),
                                                 **{**TINY_VLA, **overrides}))


@pytest.fixture(scope='session')
def transformers_vla_checkpoint(tmp_path_factory, tiny_backbone) -> Path:
    """Return a tiny TransformersVLA saved as the SFT checkpoint (version 1)."""
    policy = tiny_transformers_vla(tiny_backbone)
    policy.version = '1'
    directory = tmp_path_factory.mktemp('vla_sft') / 'checkpoint'
    policy.save(directory)
    return directory


def tiny_sft_checkpoint(path: Path) -> Path:
    """Save a small VLA (version 1) that fits the simulated robot at 32 px, one camera."""
    import torch

    from habc_policy.models.vla import SmallVLA, SmallVLAConfig

    torch.manual_seed(0)
    policy = SmallVLA(SmallVLAConfig(state_dim=14, action_dim=14, horizon=10, num_views=1,
                                     image_size=32, hidden_dim=32, num_layers=1,
                                     cnn_channels=[8, 16], action_head='l2'))
    policy.version = '1'
    policy.save(path)
    return path
