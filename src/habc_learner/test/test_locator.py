"""The object locator: learns where a small square is, saves, loads, and sits frozen in a VLA.

The policy's loss never moves the locator's weights.
"""

from dataclasses import asdict

import numpy as np
import pytest
import torch

from habc_learner.locator import fit_locator, LocatorTraining, position_errors_cm
from habc_policy.models.base import load_policy
from habc_policy.models.vision import LocatorConfig, ObjectLocator
from habc_policy.models.vla import SmallVLA, SmallVLAConfig

CONFIG = LocatorConfig(num_views=1, image_size=32, outputs=3, cnn_channels=[8, 16],
                       keypoints=8, hidden_dim=64)


def squares(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Grey 32 px images, each with a red 3 px square; targets: its place in 'metres'."""
    rng = np.random.default_rng(seed)
    corners = rng.integers(2, 27, (n, 2))
    images = np.full((n, 1, 32, 32, 3), 60, dtype=np.uint8)
    for i, (row, col) in enumerate(corners):
        images[i, 0, row:row + 3, col:col + 3] = (220, 30, 30)
    # 1 px = 1 cm; the third coordinate is constant (a cube on the table).
    targets = np.column_stack([corners[:, 1] * 0.01, corners[:, 0] * 0.01,
                               np.full(n, 0.05)]).astype(np.float32)
    return images, targets


def test_position_errors_are_per_object_euclidean_cm():
    predicted = np.array([[0.03, 0.04, 0.0, 1.0, 1.0, 1.0]])
    truth = np.array([[0.0, 0.0, 0.0, 1.0, 1.0, 1.01]])
    np.testing.assert_allclose(position_errors_cm(predicted, truth), [5.0, 1.0], rtol=1e-6)


def test_locator_learns_where_a_small_square_is_on_held_out_episodes(tmp_path):
    images, targets = squares(400, seed=0)
    episodes = np.arange(400) // 10              # 40 'episodes' of 10 frames
    locator, metrics = fit_locator(images, targets, episodes, CONFIG,
                                   LocatorTraining(steps=400, batch_size=32, lr=3e-3,
                                                   heldout_fraction=0.2), progress=False)
    assert metrics['frames'] == 400 and len(metrics['heldout_error_cm']) == 1
    # The square's place is uniform over 25 px (an SD of about 10 cm in each axis); a
    # locator that ignored the image would be off by about 10 cm on average.
    assert metrics['heldout_error_cm'][0] < 2.0, metrics
    locator.save(tmp_path / 'locator')
    loaded = ObjectLocator.load(tmp_path / 'locator')
    frames = torch.from_numpy(images[:5])
    torch.testing.assert_close(loaded.locate(frames), locator.locate(frames))
    with pytest.raises(FileNotFoundError, match='a locator folder holds locator.json'):
        ObjectLocator.load(tmp_path)


def test_fit_locator_rejects_mismatched_shapes():
    images, targets = squares(10, seed=1)
    with pytest.raises(ValueError, match=r'targets must be \(10, 3\)'):
        fit_locator(images, targets[:, :2], np.zeros(10), CONFIG, progress=False)
    with pytest.raises(ValueError, match=r'images must be \(N, 1, H, W, 3\) uint8'):
        fit_locator(images.astype(np.float32), targets, np.zeros(10), CONFIG, progress=False)


def test_the_vla_reads_a_frozen_locator_and_saves_it_with_its_weights(tmp_path):
    torch.manual_seed(0)
    locator = ObjectLocator(CONFIG)
    policy = SmallVLA(SmallVLAConfig(
        state_dim=4, action_dim=3, horizon=5, num_views=1, image_size=32, hidden_dim=32,
        num_layers=1, cnn_channels=[8, 16], action_head='l2', token_grid=0, keypoints=0,
        locator=asdict(CONFIG)))
    policy.locator.load_state_dict(locator.state_dict())
    assert policy.image_encoder is None and policy.config.visual_tokens == 1
    images, _ = squares(6, seed=2)
    batch = {'images': torch.from_numpy(images), 'state': torch.randn(6, 4),
             'instruction': ['find it'] * 6, 'actions': torch.randn(6, 5, 3),
             'action_mask': torch.ones(6, 5)}
    before = {k: v.clone() for k, v in policy.locator.state_dict().items()}
    optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    policy.train()
    for _ in range(3):
        features, loss = policy.features_and_loss(batch)
        optimizer.zero_grad()
        loss.mean().backward()
        optimizer.step()
    assert features.shape == (6, policy.feature_dim)
    for key, value in policy.locator.state_dict().items():
        assert torch.equal(value, before[key]), f'the policy loss moved the locator: {key}'
    assert policy.locator_project.weight.grad is not None
    policy.save(tmp_path / 'vla')
    loaded = load_policy(tmp_path / 'vla').eval()
    policy.eval()
    torch.testing.assert_close(loaded.sample_chunks(batch), policy.sample_chunks(batch))
    with pytest.raises(ValueError, match='the locator reads 1 views, the policy 2'):
        SmallVLAConfig(num_views=2, locator=asdict(CONFIG))
