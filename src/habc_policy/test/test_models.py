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
from habc_policy.models.vision import random_shift, SpatialSoftmax
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


def small_vla(views=2, action_head='flow', **changes):
    torch.manual_seed(0)
    return SmallVLA(SmallVLAConfig(**{
        'state_dim': 4, 'action_dim': 3, 'horizon': 5, 'num_views': views, 'image_size': 32,
        'hidden_dim': 32, 'num_layers': 1, 'cnn_channels': [8, 16], 'num_inference_steps': 3,
        'action_head': action_head, **changes}))


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
    assert policy.image_encoder.keypoints.keypoint_maps.weight.grad is not None
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


@pytest.mark.parametrize(('views', 'grid', 'keypoints'),
                         [(1, 3, 8), (2, 2, 0), (2, 0, 16), (3, 8, 4)])
def test_small_vla_image_tokens_per_view_and_fixed_size_features(tmp_path, views, grid,
                                                                   keypoints):
    policy = small_vla(views=views, action_head='l2', token_grid=grid, keypoints=keypoints,
                       keypoint_layer=views % 2 - 1)  # the last layer's map, or the first's
    batch = vla_batch(views=views)
    tokens = policy.context_tokens(batch)
    assert policy.config.tokens_per_view == grid * grid + (keypoints > 0)
    assert tokens.shape == (3, views * policy.config.tokens_per_view + 2, 32)
    # The critic's features keep one size whatever the token layout: 3 x hidden.
    assert policy.encode(batch).shape == (3, policy.feature_dim) == (3, 96)
    policy.save(tmp_path)
    loaded = load_policy(tmp_path)
    assert loaded.config == policy.config
    assert torch.equal(loaded.encode(batch), policy.encode(batch))


def test_small_vla_config_rejects_impossible_token_layouts():
    with pytest.raises(ValueError, match='needs image tokens'):
        SmallVLAConfig(token_grid=0, keypoints=0)
    # 32 px through two stride-2 layers is an 8x8 map: a 9x9 grid cannot be pooled from it.
    with pytest.raises(ValueError, match=r'token_grid 9 is larger than the CNN.s 8x8 map'):
        SmallVLAConfig(image_size=32, cnn_channels=[8, 16], token_grid=9)
    with pytest.raises(ValueError, match='augment_shift_px must be >= 0'):
        SmallVLAConfig(augment_shift_px=-1)
    with pytest.raises(ValueError, match='keypoint_layer 4 is not a layer'):
        SmallVLAConfig(keypoint_layer=4)
    assert SmallVLAConfig(image_size=96).map_size(1) == 24
    assert SmallVLAConfig(image_size=96).feature_map_size == 6
    assert SmallVLAConfig(image_size=33, cnn_channels=[8]).feature_map_size == 17


def test_random_shift_is_a_crop_of_the_edge_padded_image():
    images = torch.randint(0, 255, (16, 10, 12, 3), dtype=torch.uint8)
    shifted = random_shift(images, 2, torch.Generator().manual_seed(0))
    assert shifted.dtype == torch.uint8 and shifted.shape == images.shape
    padded = torch.nn.functional.pad(images.permute(0, 3, 1, 2).float(), (2, 2, 2, 2),
                                     mode='replicate').permute(0, 2, 3, 1)
    offsets = set()
    for image, out in zip(padded, shifted, strict=True):
        crops = [(dy, dx) for dy in range(5) for dx in range(5)
                 if torch.equal(image[dy:dy + 10, dx:dx + 12].to(torch.uint8), out)]
        assert crops, 'not a crop of the padded image'
        offsets.add(crops[0])
    assert len(offsets) > 4  # every image gets its own offset
    assert torch.equal(random_shift(images, 0), images)


def test_small_vla_augments_images_and_state_in_training_only():
    batch = vla_batch()
    policy = small_vla(action_head='l2', augment_shift_px=3)
    policy.train()
    torch.manual_seed(1)
    first = policy.features_and_loss(batch)[1]
    second = policy.features_and_loss(batch)[1]
    assert not torch.equal(first, second)  # a new shift per call
    policy.eval()
    assert torch.equal(policy.features_and_loss(batch)[1], policy.features_and_loss(batch)[1])
    obs = {k: batch[k] for k in ('images', 'state', 'instruction')}
    plain = policy.sample_chunks(obs)
    policy.train()  # inference never shifts, whatever the mode (train mode: unfused layers)
    torch.testing.assert_close(policy.sample_chunks(obs), plain, rtol=1e-5, atol=1e-5)
    assert torch.equal(policy.encode(obs), policy.encode(obs))
    off = small_vla(action_head='l2', augment_shift_px=0).train()
    assert torch.equal(off.features_and_loss(batch)[1], off.features_and_loss(batch)[1])
    noisy = small_vla(action_head='l2', augment_shift_px=0, state_noise_std=0.5).train()
    assert not torch.equal(noisy.features_and_loss(batch)[1], noisy.features_and_loss(batch)[1])
    noisy.eval()
    assert torch.equal(noisy.features_and_loss(batch)[1], noisy.features_and_loss(batch)[1])


def test_spatial_softmax_returns_the_coordinates_of_a_peak():
    head = SpatialSoftmax(channels=2, keypoints=2)
    with torch.no_grad():
        head.keypoint_maps.weight.copy_(torch.eye(2)[:, :, None, None])
        head.keypoint_maps.bias.zero_()
        head.log_temperature.fill_(-3.0)  # sharp: the expectation sits on the peak
    features = torch.zeros(1, 2, 5, 5)
    features[0, 0, 1, 4] = 1.0   # row 1, column 4 -> x = 1, y = -0.5
    features[0, 1, 2, 0] = 1.0   # row 2, column 0 -> x = -1, y = 0
    np.testing.assert_allclose(head(features)[0].detach().numpy(), [1.0, -0.5, -1.0, 0.0],
                               atol=1e-3)


def test_small_vla_learns_where_a_small_square_is():
    """The token grid and keypoints keep position: a 3 px square's place is learnable."""
    generator = torch.Generator().manual_seed(0)
    n = 64
    corners = torch.randint(2, 27, (n, 2), generator=generator)
    images = torch.full((n, 1, 32, 32, 3), 60, dtype=torch.uint8)
    for i, (row, col) in enumerate(corners.tolist()):
        images[i, 0, row:row + 3, col:col + 3] = torch.tensor([220, 30, 30], dtype=torch.uint8)
    target = (corners.float() - 14.0) / 7.0                       # about unit variance
    batch = {'images': images, 'state': torch.zeros(n, 4), 'instruction': ['find it'] * n,
             'actions': target[:, None, [0, 1, 0]].expand(n, 5, 3).contiguous(),
             'action_mask': torch.ones(n, 5)}
    policy = small_vla(views=1, action_head='l2', augment_shift_px=0).train()
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-3)
    for _ in range(150):
        loss = policy.features_and_loss(batch)[1].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05, loss.item()  # of a target variance of about 1


def test_small_vla_rejects_wrong_views_with_a_clear_error():
    policy = small_vla(views=2)
    batch = vla_batch(views=3)
    with pytest.raises(ValueError, match=r'images must be \(B, 2, H, W, 3\) uint8'):
        policy.encode(batch)
    with pytest.raises(ValueError, match='num_views must be 1-3'):
        SmallVLAConfig(num_views=4)


@pytest.mark.parametrize('kind', ['lowdim_flow', 'lowdim_chunk', 'vla_flow', 'vla_l2'])
def test_chunks_and_critic_features_come_from_one_pass_and_match_the_two_calls(kind):
    # The robot's critic reads the features of the observation the chunk was planned from.
    torch.manual_seed(0)
    if kind.startswith('lowdim'):
        config = {'state_dim': 3, 'action_dim': 2, 'horizon': 4, 'hidden_dim': 32,
                  'feature_dim': 16}
        policy = (LowDimFlowPolicy(LowDimFlowConfig(**config)) if kind == 'lowdim_flow'
                  else LowDimChunkPolicy(LowDimChunkConfig(**config)))
        batch = lowdim_batch()
    else:
        policy = small_vla(action_head=kind[4:])
        batch = vla_batch()
    policy.eval()
    chunks, features = policy.sample_chunks_and_features(
        batch, torch.Generator().manual_seed(5))
    expected = policy.sample_chunks(batch, torch.Generator().manual_seed(5))
    assert torch.allclose(chunks, expected) and torch.allclose(features, policy.encode(batch))
