"""Policy models: the interface, save/load, the frozen MiniLM text encoder, the small VLA."""

import json

import numpy as np
import pytest
import torch

from habc_policy.models.base import load_policy
from habc_policy.models.lowdim import (
    LowDimChunkConfig,
    LowDimChunkPolicy,
    LowDimFlowConfig,
    LowDimFlowPolicy,
)
from habc_policy.models.text_encoder import shared_text_encoder
from habc_policy.models.vla import SmallVLA, SmallVLAConfig


def lowdim_batch(n=8, horizon=4, state_dim=3, action_dim=2):
    return {'state': torch.randn(n, state_dim), 'actions': torch.randn(n, horizon, action_dim),
            'action_mask': torch.ones(n, horizon)}


def test_lowdim_shapes_and_per_sample_loss():
    torch.manual_seed(0)
    policy = LowDimFlowPolicy(LowDimFlowConfig(state_dim=3, action_dim=2, horizon=4,
                                               hidden_dim=32, feature_dim=16))
    batch = lowdim_batch()
    features, loss = policy.features_and_loss(batch)
    assert features.shape == (8, 16) and loss.shape == (8,)
    chunk = policy.predict_action_chunk({'state': np.zeros(3, dtype=np.float32)})
    assert chunk.shape == (4, 2)
    # A sample whose chunk is entirely past the episode end contributes nothing.
    batch['action_mask'][0] = 0
    loss = policy.per_sample_loss(batch)
    assert loss[0] == 0.0 and (loss[1:] > 0).all()


def test_lowdim_learns_a_state_to_chunk_mapping():
    torch.manual_seed(0)
    policy = LowDimFlowPolicy(LowDimFlowConfig(state_dim=1, action_dim=1, horizon=2,
                                               hidden_dim=64, feature_dim=32))
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-3)
    state = torch.rand(256, 1) * 2 - 1
    batch = {'state': state, 'actions': torch.stack([state, -state], dim=1),
             'action_mask': torch.ones(256, 2)}
    for _ in range(400):
        loss = policy.per_sample_loss(batch).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    predicted = policy.sample_chunks({'state': torch.tensor([[0.5], [-0.5]])},
                                     torch.Generator().manual_seed(0))
    np.testing.assert_allclose(predicted[:, :, 0].numpy(), [[0.5, -0.5], [-0.5, 0.5]],
                               atol=0.15)


def test_chunk_regressor_loss_is_the_masked_mse_in_normalised_units():
    policy = LowDimChunkPolicy(LowDimChunkConfig(state_dim=3, action_dim=2, horizon=4,
                                                 hidden_dim=16, feature_dim=8))
    policy.set_normalization({'actions_mean': np.array([1.0, -1.0]),
                              'actions_std': np.array([2.0, 0.5])})
    batch = lowdim_batch(n=2)
    batch['action_mask'][1, 2:] = 0
    with torch.no_grad():
        predicted = policy.sample_chunks(batch)
        # Targets = prediction + 1 std on dim 0 of the first two steps only:
        batch['actions'] = predicted.clone()
        batch['actions'][:, :2, 0] += 2.0
        loss = policy.per_sample_loss(batch)
    # sample 0: 2 of 8 (step, dim) cells off by 1 normalised unit -> 2/8; sample 1: 2 of 4.
    np.testing.assert_allclose(loss.numpy(), [2 / 8, 2 / 4], rtol=1e-5)


def test_chunk_regressor_learns_a_state_to_chunk_mapping_and_round_trips(tmp_path):
    torch.manual_seed(0)
    policy = LowDimChunkPolicy(LowDimChunkConfig(state_dim=1, action_dim=1, horizon=2,
                                                 hidden_dim=64, feature_dim=32))
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-3)
    state = torch.rand(256, 1) * 2 - 1
    batch = {'state': state, 'actions': torch.stack([state, -state], dim=1),
             'action_mask': torch.ones(256, 2)}
    for _ in range(300):
        loss = policy.per_sample_loss(batch).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    predicted = policy.predict_action_chunk({'state': np.array([0.5], dtype=np.float32)})
    np.testing.assert_allclose(predicted[:, 0], [0.5, -0.5], atol=0.05)
    policy.version = 'r1'
    policy.save(tmp_path / 'ckpt')
    loaded = load_policy(tmp_path / 'ckpt')
    assert isinstance(loaded, LowDimChunkPolicy) and loaded.version == 'r1'
    np.testing.assert_allclose(
        loaded.predict_action_chunk({'state': np.array([0.5], dtype=np.float32)}), predicted)


def test_save_load_round_trip_and_errors(tmp_path):
    torch.manual_seed(0)
    policy = LowDimFlowPolicy(LowDimFlowConfig(state_dim=3, action_dim=2, horizon=4,
                                               hidden_dim=32, feature_dim=16))
    policy.set_normalization({'actions_mean': np.array([1.0, 2.0]),
                              'actions_std': np.array([0.5, 0.5])})
    policy.version = 'v3'
    sha = policy.save(tmp_path / 'ckpt')
    assert len(sha) == 64
    loaded = load_policy(tmp_path / 'ckpt')
    assert loaded.version == 'v3' and isinstance(loaded, LowDimFlowPolicy)
    obs = {'state': torch.randn(2, 3)}
    a = policy.sample_chunks(obs, torch.Generator().manual_seed(5))
    b = loaded.sample_chunks(obs, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)

    with pytest.raises(FileNotFoundError, match='config.json not found: a checkpoint'):
        load_policy(tmp_path)
    meta = json.loads((tmp_path / 'ckpt' / 'config.json').read_text())
    meta['type'] = 'nope'
    (tmp_path / 'ckpt' / 'config.json').write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="unknown policy type 'nope'"):
        load_policy(tmp_path / 'ckpt')
    meta['type'] = 'lowdim_flow'
    meta['config']['hidden_dim'] = 64
    (tmp_path / 'ckpt' / 'config.json').write_text(json.dumps(meta))
    with pytest.raises(RuntimeError, match='size mismatch'):
        load_policy(tmp_path / 'ckpt')


def test_minilm_is_real_and_cached():
    encoder = shared_text_encoder()
    calls = encoder.encoder_calls
    e = encoder.embed(['pick up the red cube', 'grasp the red block',
                       'the weather is sunny today'])
    assert e.shape == (3, 384)
    assert torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert (e[0] @ e[1]) > (e[0] @ e[2]) + 0.2
    encoder.embed(['pick up the red cube'] * 5)
    assert encoder.encoder_calls == calls + 1  # the repeat came from the cache
    assert shared_text_encoder() is encoder


def small_vla(views=2, action_head='flow'):
    torch.manual_seed(0)
    return SmallVLA(SmallVLAConfig(state_dim=4, action_dim=3, horizon=5, num_views=views,
                                   image_size=32, hidden_dim=32, num_layers=1,
                                   cnn_channels=[8, 16], num_inference_steps=3,
                                   action_head=action_head))


def vla_batch(n=3, views=2):
    return {'images': torch.randint(0, 255, (n, views, 32, 32, 3), dtype=torch.uint8),
            'state': torch.randn(n, 4), 'instruction': ['transfer the cube'] * n,
            'actions': torch.randn(n, 5, 3), 'action_mask': torch.ones(n, 5)}


def test_small_vla_shapes_loss_and_round_trip(tmp_path):
    policy = small_vla()
    batch = vla_batch()
    features, loss = policy.features_and_loss(batch)
    assert features.shape == (3, policy.feature_dim) and loss.shape == (3,)
    loss.mean().backward()
    assert policy.image_encoder.project.weight.grad is not None
    chunk = policy.predict_action_chunk({'images': batch['images'][0].numpy(),
                                         'state': batch['state'][0].numpy(),
                                         'instruction': 'transfer the cube'})
    assert chunk.shape == (5, 3)
    # The frozen text encoder is not part of the checkpoint.
    assert not any(k.startswith('_text') for k in policy.state_dict())
    policy.save(tmp_path)
    loaded = load_policy(tmp_path)
    obs = {k: batch[k] for k in ('images', 'state', 'instruction')}
    assert torch.equal(policy.sample_chunks(obs, torch.Generator().manual_seed(1)),
                       loaded.sample_chunks(obs, torch.Generator().manual_seed(1)))


def test_small_vla_l2_head_regresses_the_chunk_deterministically(tmp_path):
    policy = small_vla(action_head='l2')
    policy.set_normalization({'actions_mean': np.array([1.0, 0.0, -1.0]),
                              'actions_std': np.array([2.0, 1.0, 0.5])})
    batch = vla_batch()
    obs = {k: batch[k] for k in ('images', 'state', 'instruction')}
    with torch.no_grad():
        first = policy.sample_chunks(obs, torch.Generator().manual_seed(1))
        assert torch.equal(first, policy.sample_chunks(obs, torch.Generator().manual_seed(2)))
        # Targets 1 std above the prediction on the last dimension of every step: the MSE in
        # normalised units is 1/3 (one of three dimensions is off by one).
        batch['actions'] = first.clone()
        batch['actions'][:, :, 2] += 0.5
        np.testing.assert_allclose(policy.per_sample_loss(batch).numpy(), [1 / 3] * 3,
                                   rtol=1e-4)
    policy.save(tmp_path)
    assert torch.equal(load_policy(tmp_path).sample_chunks(obs), first)
    with pytest.raises(ValueError, match="action_head must be 'flow' or 'l2'"):
        SmallVLAConfig(action_head='diffusion')


def test_small_vla_rejects_wrong_views_with_a_clear_error():
    policy = small_vla(views=2)
    batch = vla_batch(views=3)
    with pytest.raises(ValueError, match=r'images must be \(B, 2, H, W, 3\) uint8'):
        policy.encode(batch)
    with pytest.raises(ValueError, match='num_views must be 1-3'):
        SmallVLAConfig(num_views=4)
