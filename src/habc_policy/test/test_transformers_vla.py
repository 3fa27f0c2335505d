"""TransformersVLA on tiny random VLM folders written with save_pretrained (no downloads)."""

import json
from pathlib import Path
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from safetensors.torch import load_file
import torch

from habc_policy.models.base import load_policy
from habc_policy.models.tiny_backbones import write_tiny_paligemma, write_tiny_smolvlm
from habc_policy.models.transformers_vla import TransformersVLA, TransformersVLAConfig

# With the tiny backbones' defaults: 2 views x 4 (SmolVLM) image tokens + instruction tokens.
SIZES = {'prefix_layers': 2, 'state_dim': 3, 'action_dim': 2, 'horizon': 4, 'num_views': 2,
         'image_size': 24, 'expert_hidden_dim': 32, 'expert_layers': 2, 'expert_heads': 2,
         'actions_per_token': 2, 'num_inference_steps': 3}
TEXT_HIDDEN = 48


@pytest.fixture(scope='module')
def smolvlm_dir(tmp_path_factory) -> Path:
    return write_tiny_smolvlm(tmp_path_factory.mktemp('smolvlm') / 'backbone')


@pytest.fixture(scope='module')
def paligemma_dir(tmp_path_factory) -> Path:
    return write_tiny_paligemma(tmp_path_factory.mktemp('paligemma') / 'backbone')


def make_policy(folder: Path, **overrides) -> TransformersVLA:
    torch.manual_seed(0)
    return TransformersVLA(TransformersVLAConfig(backbone_dir=str(folder),
                                                 **{**SIZES, **overrides}))


def make_batch(n: int = 4, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    instructions = ['pick up the red cube', 'insert the peg into the socket', 'unknown words',
                    '']
    return {'images': torch.randint(0, 256, (n, 2, 24, 24, 3), dtype=torch.uint8,
                                    generator=generator),
            'instruction': [instructions[i % 4] for i in range(n)],
            'state': torch.randn(n, 3, generator=generator),
            'actions': torch.randn(n, 4, 2, generator=generator),
            'action_mask': torch.ones(n, 4)}


def seeded_loss(policy: TransformersVLA, batch: dict, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)  # the same flow-matching noise and times in every call
    with torch.no_grad():
        return policy.per_sample_loss(batch)


def chunks(policy: TransformersVLA, batch: dict, seed: int = 1) -> torch.Tensor:
    return policy.sample_chunks(batch, torch.Generator().manual_seed(seed))


def count_prefix_passes(policy: TransformersVLA) -> list[int]:
    calls = [0]
    policy.backbone.get_decoder().register_forward_hook(
        lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_config_validation_names_the_field(smolvlm_dir):
    for overrides, message in [({'finetune': 'half'}, 'finetune must be one of'),
                               ({'autocast': 'fp16'}, 'autocast must be one of'),
                               ({'prefix_layers': -1}, 'prefix_layers must be >= 0'),
                               ({'expert_heads': 3}, 'divisible by expert_heads 3'),
                               ({'horizon': 0}, 'horizon must be >= 1')]:
        with pytest.raises(ValueError, match=message):
            TransformersVLAConfig(backbone_dir=str(smolvlm_dir), **{**SIZES, **overrides})
    with pytest.raises(ValueError, match='backbone_dir must name a local VLM folder'):
        TransformersVLAConfig()
    with pytest.raises(ValueError, match='prefix_layers 5 > the 3 decoder layers'):
        make_policy(smolvlm_dir, prefix_layers=5)


@pytest.mark.parametrize('backbone', ['smolvlm', 'paligemma'])
def test_shapes_one_prefix_pass_and_dropped_layers(backbone, request):
    policy = make_policy(request.getfixturevalue(f'{backbone}_dir')).eval()
    assert len(policy.backbone.get_decoder().layers) == 2  # layer 2 of 3 is dropped
    assert not hasattr(policy.backbone, 'lm_head')
    passes = count_prefix_passes(policy)
    batch = make_batch()
    features, loss = policy.features_and_loss(batch)
    assert passes[0] == 1
    assert policy.feature_dim == TEXT_HIDDEN + 32
    assert features.shape == (4, TEXT_HIDDEN + 32) and loss.shape == (4,)
    torch.testing.assert_close(policy.encode(batch), features)
    assert passes[0] == 2
    # Three Euler steps, one prefix pass: the expert reuses the prefix's keys and values.
    assert chunks(policy, batch).shape == (4, 4, 2)
    assert passes[0] == 3


def test_loss_is_the_velocity_error_over_valid_steps_and_dimensions(smolvlm_dir):
    policy = make_policy(smolvlm_dir).eval()
    batch = make_batch()
    batch['action_mask'][1, 2:] = 0
    batch['action_mask'][2] = 0
    batch['dim_mask'] = torch.ones(4, 2)
    batch['dim_mask'][3, 1] = 0
    velocities = []
    velocity_fn = policy._velocity_fn

    def recording(*args):
        inner = velocity_fn(*args)

        def velocity(x, tau):
            velocities.append(inner(x, tau))
            return velocities[-1]
        return velocity

    policy._velocity_fn = recording
    loss = seeded_loss(policy, batch, seed=0)
    torch.manual_seed(0)
    eps = torch.randn(4, 4, 2)  # the loss's first draw after the same seed
    # By hand: (v - (a - eps))^2 summed over the cells both masks keep, over their count.
    valid = batch['action_mask'][:, :, None] * batch['dim_mask'][:, None, :]
    error = (velocities[0] - (batch['actions'] - eps)) ** 2
    expected = (error * valid).sum(dim=(1, 2)) / valid.sum(dim=(1, 2)).clamp(min=1.0)
    torch.testing.assert_close(loss, expected)
    assert loss.shape == (4,) and loss[2] == 0.0 and (loss[[0, 1, 3]] > 0).all()
    # Samples do not leak into each other: another target for sample 0 moves only its loss.
    batch['actions'][0, 0] += 10.0
    changed = seeded_loss(policy, batch)
    assert changed[0] > loss[0] + 1.0
    torch.testing.assert_close(changed[1:], loss[1:])


def test_overfits_a_fixed_batch(smolvlm_dir):
    policy = make_policy(smolvlm_dir, num_inference_steps=10).eval()
    batch = make_batch()

    def chunk_error() -> float:
        return (chunks(policy, batch, seed=7) - batch['actions']).abs().mean().item()

    before, error_before = seeded_loss(policy, batch).mean().item(), chunk_error()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    policy.train()
    for _ in range(300):
        loss = policy.per_sample_loss(batch).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    policy.eval()
    after = np.mean([seeded_loss(policy, batch, seed).mean().item() for seed in range(5)])
    # Measured: 3.6 -> 0.23 (16x); sampled chunks 0.2 from the targets, whose mean |a| is 0.8.
    assert after < before / 8, (before, after)
    assert chunk_error() < min(0.3, error_before / 3), (error_before, chunk_error())


def test_sample_chunks_are_in_robot_units(smolvlm_dir):
    policy = make_policy(smolvlm_dir).eval()
    batch = make_batch(2)
    normalised = chunks(policy, batch)
    mean, std = np.array([5.0, -7.0]), np.array([2.0, 0.5])
    policy.set_normalization({'actions_mean': mean, 'actions_std': std})
    torch.testing.assert_close(chunks(policy, batch),
                               normalised * torch.tensor(std, dtype=torch.float32)
                               + torch.tensor(mean, dtype=torch.float32))
    # A state s under mean m and std k normalises to the same input as (s - m) / k before.
    plain = chunks(policy, batch)
    m, k = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([2.0, 4.0, 0.5])
    policy.set_normalization({'state_mean': m.numpy(), 'state_std': k.numpy()})
    shifted = dict(batch, state=batch['state'] * k + m)
    torch.testing.assert_close(chunks(policy, shifted), plain)
    assert not torch.allclose(chunks(policy, batch), plain)  # the state does matter
    single = policy.predict_action_chunk({'images': batch['images'][0].numpy(),
                                          'instruction': batch['instruction'][0],
                                          'state': shifted['state'][0].numpy()})
    assert single.shape == (4, 2)


def test_frozen_backbone_gets_no_gradients_and_is_not_saved(smolvlm_dir, tmp_path):
    policy = make_policy(smolvlm_dir).train()
    assert not policy.backbone.training  # frozen: no dropout whatever train() says
    policy.features_and_loss(make_batch())[1].mean().backward()
    assert all(p.grad is None for p in policy.backbone.parameters())
    assert all(p.grad is not None for n, p in policy.named_parameters()
               if not n.startswith('backbone.'))
    policy.save(tmp_path / 'ckpt')
    saved = load_file(str(tmp_path / 'ckpt' / 'model.safetensors'))
    expected = {k for k in policy.state_dict() if not k.startswith('backbone.')}
    assert set(saved) == expected
    assert {'state_mean', 'actions_std', 'action_out.weight'} <= expected
    backbone = load_file(str(smolvlm_dir / 'model.safetensors'))
    assert sum(v.numel() for v in saved.values()) < sum(v.numel() for v in backbone.values())


def test_frozen_prefix_features_are_cacheable_and_the_state_token_is_not(smolvlm_dir):
    # The learner caches encode's first cacheable_feature_dim columns per frame; this is the
    # policy's half of that contract: the columns are the pooled prefix alone, and the rest
    # is recomputed from the state (which differs between frames with the same images).
    policy = make_policy(smolvlm_dir).train()
    assert policy.cacheable_feature_dim == TEXT_HIDDEN
    batch = make_batch()
    passes = count_prefix_passes(policy)
    features, _ = policy.features_and_loss(batch)
    cached = policy.encode_cacheable(batch)
    assert passes[0] == 2
    # The same code on the same batch: bit for bit.
    assert torch.equal(cached, features[:, :TEXT_HIDDEN].detach())
    assert torch.equal(policy.encode_with_cached(batch, cached), policy.encode(batch))
    assert passes[0] == 3  # encode_with_cached ran no prefix
    other_state = {**batch, 'state': batch['state'] + 1.0}
    moved = policy.encode_with_cached(other_state, cached)
    assert torch.equal(moved[:, :TEXT_HIDDEN], cached)
    assert not torch.equal(moved[:, TEXT_HIDDEN:], features[:, TEXT_HIDDEN:])


@pytest.mark.parametrize('finetune', ['lora', 'full'])
def test_a_trained_backbone_has_no_cacheable_features(smolvlm_dir, finetune):
    policy = make_policy(smolvlm_dir, finetune=finetune)
    assert policy.cacheable_feature_dim == 0
    with pytest.raises(ValueError, match='not cacheable'):
        policy.encode_cacheable(make_batch())


def train_a_little(policy: TransformersVLA, steps: int = 3) -> None:
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = policy.per_sample_loss(make_batch()).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize('finetune', ['frozen', 'lora', 'full'])
def test_save_load_round_trip_gives_identical_chunks(smolvlm_dir, tmp_path, finetune):
    policy = make_policy(smolvlm_dir, finetune=finetune)
    train_a_little(policy)
    policy.set_normalization({'actions_mean': np.array([1.0, -1.0]),
                              'actions_std': np.array([0.5, 2.0])})
    policy.version = '3:test'
    policy.eval().save(tmp_path / 'ckpt')
    meta = json.loads((tmp_path / 'ckpt' / 'config.json').read_text())
    assert meta['type'] == 'transformers_vla'
    assert meta['config']['backbone_dir'] == str(smolvlm_dir)
    assert meta['config']['backbone_fingerprint'] == policy.config.backbone_fingerprint
    assert len(policy.config.backbone_fingerprint) == 64
    loaded = load_policy(tmp_path / 'ckpt')
    assert isinstance(loaded, TransformersVLA) and loaded.version == '3:test'
    batch = make_batch()
    assert torch.equal(chunks(loaded, batch), chunks(policy, batch))


def test_changed_or_missing_backbone_folder_is_a_clear_error(smolvlm_dir, tmp_path):
    backbone = tmp_path / 'backbone'
    shutil.copytree(smolvlm_dir, backbone)
    make_policy(backbone).save(tmp_path / 'ckpt')
    # Same architecture and file sizes, other weights: only the content tells them apart.
    write_tiny_smolvlm(backbone, seed=1)
    with pytest.raises(ValueError, match='changed since this policy was trained'):
        load_policy(tmp_path / 'ckpt')
    shutil.rmtree(backbone)
    with pytest.raises(FileNotFoundError, match=f"backbone folder '{backbone}' not found"):
        load_policy(tmp_path / 'ckpt')


def test_a_folder_that_is_not_a_vlm_says_what_it_expected(smolvlm_dir, tmp_path):
    def build(folder: Path) -> None:
        make_policy(folder)

    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match='config.json not found: a backbone folder'):
        build(empty)
    text_only = tmp_path / 'text_only'
    shutil.copytree(smolvlm_dir, text_only)
    config = json.loads((smolvlm_dir / 'config.json').read_text())
    (text_only / 'config.json').write_text(json.dumps(config['text_config']))
    with pytest.raises(ValueError, match=r"not a vision-language model folder.*'llama'.*"
                                         r"\['vision_config', 'text_config'\]"):
        build(text_only)
    qwen = tmp_path / 'qwen'
    shutil.copytree(smolvlm_dir, qwen)
    (qwen / 'config.json').write_text(json.dumps({**config, 'model_type': 'qwen2_5_vl'}))
    with pytest.raises(ValueError, match='Qwen2.5-VL backbones are not supported'):
        build(qwen)
    no_tokenizer = tmp_path / 'no_tokenizer'
    shutil.copytree(smolvlm_dir, no_tokenizer)
    (no_tokenizer / 'tokenizer.json').unlink()
    with pytest.raises(FileNotFoundError, match='has no tokenizer'):
        build(no_tokenizer)
    no_weights = tmp_path / 'no_weights'
    shutil.copytree(smolvlm_dir, no_weights)
    (no_weights / 'model.safetensors').unlink()
    with pytest.raises(FileNotFoundError, match=r'has no \*.safetensors weights'):
        build(no_weights)


def test_a_hub_name_fails_without_touching_the_network(monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')

    def no_network(*args, **kwargs):
        raise AssertionError('TransformersVLA tried to open a network connection')

    monkeypatch.setattr(socket.socket, 'connect', no_network)
    monkeypatch.setattr(socket, 'create_connection', no_network)
    with pytest.raises(FileNotFoundError, match="backbone folder 'org/model' not found: "
                                                'TransformersVLA loads only from a local'):
        TransformersVLA(TransformersVLAConfig(backbone_dir='org/model', **SIZES))


def test_lora_trains_only_the_adapters_and_the_expert(smolvlm_dir, tmp_path):
    policy = make_policy(smolvlm_dir, finetune='lora', lora_rank=2)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if n.startswith('backbone.')}
    # A and B on q, k, v, o of the 2 kept decoder layers; nothing of the vision tower.
    assert len(lora) == 2 * 4 * 2 and all('lora_' in n and '.layers.' in n for n in lora)
    assert {n for n, _ in policy.named_parameters() if not n.startswith('backbone.')} <= trainable
    policy.features_and_loss(make_batch())[1].mean().backward()
    with_grad = {n for n, p in policy.named_parameters() if p.grad is not None}
    assert with_grad == trainable
    # B starts at zero (the adapter starts as the identity), so B is what gets a gradient.
    assert any(policy.get_parameter(n).grad.abs().sum() > 0 for n in lora if 'lora_B' in n)
    policy.save(tmp_path / 'ckpt')
    saved = set(load_file(str(tmp_path / 'ckpt' / 'model.safetensors')))
    assert {k for k in saved if k.startswith('backbone.')} == lora


def test_full_finetuning_saves_the_truncated_backbone(smolvlm_dir, tmp_path):
    policy = make_policy(smolvlm_dir, finetune='full')
    assert all(p.requires_grad for p in policy.parameters())
    policy.save(tmp_path / 'ckpt')
    saved = set(load_file(str(tmp_path / 'ckpt' / 'model.safetensors')))
    assert saved == set(policy.state_dict())
    assert any('.layers.1.' in k for k in saved) and not any('.layers.2.' in k for k in saved)
    assert not any('lm_head' in k for k in saved)


def test_size_mismatches_name_both_sides(smolvlm_dir):
    policy = make_policy(smolvlm_dir)
    batch = make_batch()
    with pytest.raises(ValueError, match=r'state has 5 values, the policy expects 3'):
        policy.encode(dict(batch, state=torch.zeros(4, 5)))
    with pytest.raises(ValueError, match=r'actions are \(4, 3\) per sample .* expects \(4, 2\)'):
        policy.per_sample_loss(dict(batch, actions=torch.zeros(4, 4, 3)))
    with pytest.raises(ValueError, match=r'images must be \(B, 2, 24, 24, 3\).*got '
                                         r'\(4, 1, 24, 24, 3\)'):
        policy.encode(dict(batch, images=batch['images'][:, :1]))
    with pytest.raises(ValueError, match=r'got \(4, 2, 32, 32, 3\)'):
        policy.encode(dict(batch, images=torch.zeros(4, 2, 32, 32, 3, dtype=torch.uint8)))


def test_importing_the_models_does_not_import_the_vlm_code():
    code = ('import sys; import habc_policy.models.base, habc_policy.models.lowdim, '
            'habc_policy.models.vla; '
            "print(sorted(m for m in sys.modules if m.endswith('transformers_vla') "
            "or m.startswith('transformers.models.smolvlm')))")
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == '[]'
