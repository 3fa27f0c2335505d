"""Tiny LeRobot policy folders (ACT, SmolVLA) that fit the simulated robot (imported by tests).

A team brings its policy as the folder LeRobot's save_pretrained wrote; these writers make
one without LeRobot and without a download: the architecture from a config in code, random
but reproducible weights (`reproducible_weights`), statistics that keep the arms near their
start pose, and the files in LeRobot 0.4's layout (config.json, model.safetensors, the
processor pipelines and their statistics). The folders fit the bringup: 14 joints in and
out, one LeRobot camera per name in config/params/sync.yaml (in that order), square images
of `image_size` (sim_robot.yaml's unless a test renders another size), and chunks of
CHUNK_SIZE actions, the policy node's execute_steps (policy.yaml).

SmolVLA's folder also holds `vlm/`: a tiny SmolVLM's config and tokenizer (LeRobot reads
them from `vlm_model_name`, a hub id; habc reads the checkpoint's vlm/ subfolder), while the
VLM's weights are the checkpoint's own, as in a real SmolVLA folder.
"""

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from ros_helpers import ROOT
from safetensors.torch import save_file
import torch
import yaml

from habc_policy.models.lerobot_act import (
    LeRobotACT,
    LeRobotACTConfig,
    reproducible_weights,
    write_lerobot_act,
)
from habc_sim.aloha import START_ARM_POSE

PARAMS = ROOT / 'config' / 'params'


def bringup_parameter(node_file: str, name: str) -> Any:
    """Return a parameter of the bringup's config/params/<node_file>.yaml."""
    return yaml.safe_load((PARAMS / node_file).read_text())['/**']['ros__parameters'][name]


JOINTS = 14
# The policy node executes this many actions of each chunk (20 in the bringup): a chunk of
# that size is not used up before the next one comes.
CHUNK_SIZE = bringup_parameter('policy.yaml', 'execute_steps')
# The sim's start pose with the grippers half open, as the LeRobot action/state means: with
# a small action std the random weights keep the arms within ~0.02 rad of it.
HOME = np.concatenate([START_ARM_POSE[:6], [0.5], START_ARM_POSE[8:14], [0.5]])
ACTION_STD = 0.01


def bringup_cameras() -> list[str]:
    """Return the LeRobot feature names of the sync node's cameras, in the bringup's order."""
    return [f'observation.images.{name}' for name in bringup_parameter('sync.yaml', 'cameras')]


def bringup_image_size() -> int:
    """Return the size (px) of the sim's square camera images, as the sync node passes them."""
    return int(bringup_parameter('sim_robot.yaml', 'image_size'))


def _stats(cameras: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """LeRobot's per-feature statistics: actions near HOME, ImageNet-like image statistics."""
    stats = {'observation.state': {'mean': torch.tensor(HOME, dtype=torch.float32),
                                   'std': torch.ones(JOINTS)},
             'action': {'mean': torch.tensor(HOME, dtype=torch.float32),
                        'std': torch.full((JOINTS,), ACTION_STD)}}
    for name in cameras:
        stats[name] = {'mean': torch.tensor([0.485, 0.456, 0.406]).reshape(3, 1, 1),
                       'std': torch.tensor([0.229, 0.224, 0.225]).reshape(3, 1, 1)}
    return stats


# ---------------------------------------------------------------------------------------
# ACT


def tiny_act_config(image_size: int | None = None, cameras: list[str] | None = None,
                    **overrides: Any) -> LeRobotACTConfig:
    """Return a small LeRobot ACT config for the robot (ResNet-18, ACT's smallest backbone)."""
    values: dict[str, Any] = {
        'state_dim': JOINTS, 'action_dim': JOINTS,
        'camera_names': cameras or bringup_cameras(),
        'image_size': image_size or bringup_image_size(),
        'chunk_size': CHUNK_SIZE, 'n_action_steps': CHUNK_SIZE, 'dim_model': 32, 'n_heads': 2,
        'dim_feedforward': 64, 'n_encoder_layers': 1, 'n_decoder_layers': 1, 'use_vae': True,
        'latent_dim': 8, 'n_vae_encoder_layers': 1}
    values.update(overrides)
    return LeRobotACTConfig(**values)


def write_tiny_lerobot_act(folder: Path, image_size: int | None = None, seed: int = 0,
                           **overrides: Any) -> Path:
    """Write a tiny LeRobot ACT folder (what ACTPolicy.save_pretrained writes); return it.

    `image_size` defaults to the bringup's; the e2e tests pass the size their sim renders.
    """
    config = tiny_act_config(image_size, **overrides)
    model = LeRobotACT(config).model
    write_lerobot_act(Path(folder), config, reproducible_weights(model, seed=seed),
                      _stats(config.camera_names))
    return Path(folder)


# ---------------------------------------------------------------------------------------
# SmolVLA

# LeRobot 0.4.4's SmolVLAConfig fields that LeRobotSmolVLAConfig does not mirror, as
# draccus writes them (the fixture LeRobot itself wrote, under src/habc_policy/test).
_SMOLVLA_OTHER_FIELDS: dict[str, Any] = {
    'device': 'cpu', 'use_amp': False, 'use_peft': False, 'push_to_hub': False,
    'repo_id': None, 'private': None, 'tags': None, 'license': None, 'pretrained_path': None,
    'use_delta_joint_actions_aloha': False, 'use_cache': True, 'optimizer_lr': 1e-4,
    'optimizer_betas': [0.9, 0.95], 'optimizer_eps': 1e-8, 'optimizer_weight_decay': 1e-10,
    'optimizer_grad_clip_norm': 10, 'scheduler_warmup_steps': 1000,
    'scheduler_decay_steps': 30000, 'scheduler_decay_lr': 2.5e-6, 'load_vlm_weights': False,
    'rtc_config': None, 'compile_model': False, 'compile_mode': 'max-autotune',
}
_NORM_MAP = {'VISUAL': 'IDENTITY', 'STATE': 'MEAN_STD', 'ACTION': 'MEAN_STD'}


def tiny_smolvla_fields(image_size: int) -> dict[str, Any]:
    """SmolVLAConfig architecture fields of a tiny SmolVLA on write_tiny_smolvlm's VLM."""
    return {'chunk_size': CHUNK_SIZE, 'n_action_steps': CHUNK_SIZE, 'max_state_dim': 16,
            'max_action_dim': 16, 'resize_imgs_with_padding': [image_size, image_size],
            'empty_cameras': 0, 'adapt_to_pi_aloha': False, 'tokenizer_max_length': 16,
            'pad_language_to': 'longest', 'num_steps': 3, 'freeze_vision_encoder': True,
            'train_expert_only': True, 'train_state_proj': True,
            # A hub id, as a real checkpoint names it: habc reads the vlm/ subfolder instead.
            'vlm_model_name': 'HuggingFaceTB/SmolVLM2-500M-Video-Instruct',
            'add_image_special_tokens': False, 'attention_mode': 'cross_attn',
            'prefix_length': -1, 'num_expert_layers': -1, 'num_vlm_layers': 2,
            'self_attn_every_n_layers': 2, 'expert_width_multiplier': 0.75,
            'min_period': 4e-3, 'max_period': 4.0}


def write_tiny_lerobot_smolvla(folder: Path, image_size: int | None = None, seed: int = 0,
                               cameras: list[str] | None = None) -> Path:
    """Write a tiny LeRobot SmolVLA folder with its vlm/ subfolder; return the folder.

    The files are those SmolVLAPolicy.save_pretrained and make_smolvla_pre_post_processors'
    pipelines write (the tokenizer step included); the weights are `reproducible_weights`
    of LeRobotSmolVLA's module tree, which has LeRobot's key names (plus the unused LM head
    LeRobot also saves).
    """
    from habc_policy.models.lerobot_smolvla import (
        LeRobotSmolVLA,
        LeRobotSmolVLAConfig,
        UNUSED_LEROBOT_KEYS,
    )
    from habc_policy.models.tiny_backbones import write_tiny_smolvlm

    folder = Path(folder)
    cameras = cameras or bringup_cameras()
    image_size = image_size or bringup_image_size()
    vlm = write_tiny_smolvlm(folder / 'vlm', text_layers=2, image_size=image_size, seed=seed)
    # The VLM's weights are not SmolVLA's: LeRobot reads only its config and tokenizer.
    (vlm / 'model.safetensors').unlink()
    arch = tiny_smolvla_fields(image_size)
    config = LeRobotSmolVLAConfig(vlm_dir=str(vlm), state_dim=JOINTS, action_dim=JOINTS,
                                  camera_names=cameras, image_size=image_size,
                                  normalization_mapping=dict(_NORM_MAP), **arch)
    model = LeRobotSmolVLA(config).model
    shapes = {f'model.{k}': v for k, v in model.state_dict().items()}
    text = model.vlm_with_expert.text_model
    shapes[UNUSED_LEROBOT_KEYS[0]] = torch.empty(text.embed_tokens.weight.shape)
    weights = reproducible_weights(SimpleNamespace(state_dict=lambda: shapes), seed=seed)
    save_file(weights, str(folder / 'model.safetensors'))

    inputs = {'observation.state': {'type': 'STATE', 'shape': [JOINTS]}}
    for name in cameras:
        inputs[name] = {'type': 'VISUAL', 'shape': [3, image_size, image_size]}
    outputs = {'action': {'type': 'ACTION', 'shape': [JOINTS]}}
    raw = {'type': 'smolvla', 'n_obs_steps': 1, 'input_features': inputs,
           'output_features': outputs, **_SMOLVLA_OTHER_FIELDS, **arch,
           'normalization_mapping': dict(_NORM_MAP)}
    (folder / 'config.json').write_text(json.dumps(raw, indent=4))

    stats = {f'{key}.{stat}': tensor.float().contiguous()
             for key, sub in _stats(cameras).items() for stat, tensor in sub.items()}
    pre_state = 'policy_preprocessor_step_5_normalizer_processor.safetensors'
    post_state = 'policy_postprocessor_step_0_unnormalizer_processor.safetensors'
    save_file(stats, str(folder / pre_state))
    save_file(stats, str(folder / post_state))
    norm = {'eps': 1e-8, 'norm_map': dict(_NORM_MAP)}
    pre_steps = [
        {'registry_name': 'rename_observations_processor', 'config': {'rename_map': {}}},
        {'registry_name': 'to_batch_processor', 'config': {}},
        {'registry_name': 'smolvla_new_line_processor', 'config': {}},
        {'registry_name': 'tokenizer_processor',
         'config': {'max_length': arch['tokenizer_max_length'], 'task_key': 'task',
                    'padding_side': 'right', 'padding': arch['pad_language_to'],
                    'truncation': True, 'tokenizer_name': arch['vlm_model_name']}},
        {'registry_name': 'device_processor', 'config': {'device': 'cpu', 'float_dtype': None}},
        {'registry_name': 'normalizer_processor',
         'config': {**norm, 'features': {**inputs, **outputs}}, 'state_file': pre_state}]
    post_steps = [
        {'registry_name': 'unnormalizer_processor', 'config': {**norm, 'features': outputs},
         'state_file': post_state},
        {'registry_name': 'device_processor', 'config': {'device': 'cpu', 'float_dtype': None}}]
    for name, steps in (('policy_preprocessor', pre_steps),
                        ('policy_postprocessor', post_steps)):
        (folder / f'{name}.json').write_text(json.dumps({'name': name, 'steps': steps},
                                                        indent=2))
    return folder


WRITERS = {'act': write_tiny_lerobot_act, 'smolvla': write_tiny_lerobot_smolvla}
