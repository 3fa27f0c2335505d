"""LeRobot ACT checkpoints: loaded without lerobot, checked against LeRobot's own output.

fixtures/lerobot_act_tiny/ is what LeRobot 0.4.4 wrote (make_reference.py there) minus its
45 MB model.safetensors: the weights are `reproducible_weights`, which the test rebuilds and
proves byte-identical to LeRobot's file through the SHA-256 LeRobot's run recorded. The
expected chunks are LeRobot's predict_action_chunk + postprocessor on fixed inputs.
"""

import dataclasses
import hashlib
import json
from pathlib import Path
import shutil

import numpy as np
import pytest
from safetensors.torch import save_file
import torch

from habc_policy.models.base import load_policy
from habc_policy.models.lerobot_act import (
    _mean_std,
    LeRobotACT,
    LeRobotACTConfig,
    LeRobotFormatError,
    read_lerobot_config,
    reproducible_weights,
)
from habc_policy.robot_fit import check_fit, RobotInterface

FIXTURE = Path(__file__).parent / 'fixtures' / 'lerobot_act_tiny'
LEROBOT_FILES = ['config.json', 'model.safetensors', 'policy_postprocessor.json',
                 'policy_postprocessor_step_0_unnormalizer_processor.safetensors',
                 'policy_preprocessor.json',
                 'policy_preprocessor_step_3_normalizer_processor.safetensors']
# LeRobot's chunk and ours came out bit-identical on this machine (max abs diff 0.0). The
# tolerance leaves room for other CPUs and BLAS kernels: float32 rounding (~1e-7 relative)
# accumulated over ResNet-18 and a few attention layers, on chunks of magnitude ~5.
ATOL = 1e-5


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope='module')
def lerobot_folder(tmp_path_factory) -> Path:
    """LeRobot's folder, complete: its small files plus the rebuilt model.safetensors."""
    folder = tmp_path_factory.mktemp('lerobot') / 'act_tiny'
    shutil.copytree(FIXTURE, folder)
    (folder / 'model.safetensors').touch()      # read_lerobot_config checks that it exists
    model = LeRobotACT(read_lerobot_config(folder)).model
    state = {f'model.{k}': v for k, v in reproducible_weights(model, seed=0).items()}
    save_file(state, str(folder / 'model.safetensors'))
    return folder


@pytest.fixture(scope='module')
def expected() -> dict:
    return dict(np.load(FIXTURE / 'expected.npz'))


@pytest.fixture(scope='module')
def policy(lerobot_folder) -> LeRobotACT:
    torch.set_num_threads(1)
    return LeRobotACT.from_lerobot(lerobot_folder)


def test_rebuilt_weights_are_the_file_lerobot_wrote(lerobot_folder):
    manifest = json.loads((FIXTURE / 'lerobot_manifest.json').read_text())
    assert _sha256(lerobot_folder / 'model.safetensors') == manifest['model_safetensors_sha256']


def test_keys_and_shapes_are_lerobots(policy):
    manifest = json.loads((FIXTURE / 'lerobot_manifest.json').read_text())
    ours = {f'model.{k}': list(v.shape) for k, v in policy.model.state_dict().items()}
    assert ours == manifest['keys']
    assert len(ours) == 174


@pytest.mark.parametrize('tag', ['', '_wide'])
def test_chunk_equals_lerobots(policy, expected, tag):
    batch = {'images': torch.from_numpy(expected[f'images{tag}']),
             'state': torch.from_numpy(expected[f'state{tag}'])}
    chunk = policy.sample_chunks(batch).numpy()
    assert chunk.shape == (2, 10, 5)
    np.testing.assert_allclose(chunk, expected[f'chunk{tag}'], rtol=0, atol=ATOL)
    # One observation through the interface the policy node uses.
    single = policy.predict_action_chunk({'images': expected[f'images{tag}'][1],
                                          'state': expected[f'state{tag}'][1]})
    np.testing.assert_allclose(single, expected[f'chunk{tag}'][1], rtol=0, atol=ATOL)


def test_normalisation_comes_from_the_processor_files(policy):
    # The fixture's stats (make_reference.py); the wrist camera has none, so identity.
    np.testing.assert_allclose(policy.state_mean.numpy(), np.linspace(-1, 1, 6), atol=1e-6)
    np.testing.assert_allclose(policy.actions_std.numpy(), np.linspace(3, 1, 5), atol=1e-6)
    np.testing.assert_allclose(policy.image_mean[0].flatten().numpy(), [0.45, 0.4, 0.35],
                               atol=1e-6)
    assert torch.equal(policy.image_mean[1], torch.zeros(3, 1, 1))
    assert torch.equal(policy.image_std[1], torch.ones(3, 1, 1))
    assert policy.config.camera_names == ['observation.images.top', 'observation.images.wrist']
    assert policy.config.normalized_features == ['observation.state', 'action',
                                                 'observation.images.top']


def test_training_loss_equals_lerobots(policy, expected):
    """Same weights, same seed: the VAE sample and every dropout mask line up with LeRobot's."""
    batch = {'images': torch.from_numpy(expected['images']),
             'state': torch.from_numpy(expected['state']),
             'actions': torch.from_numpy(expected['actions']), 'action_mask': torch.ones(2, 10)}
    policy.train()
    try:
        torch.manual_seed(int(expected['train_loss_seed']))
        loss = policy.per_sample_loss(batch)
    finally:
        policy.eval()
    assert loss.shape == (2,)
    # LeRobot averages over the batch; without padding the mean of ours is its loss.
    assert loss.mean().item() == pytest.approx(float(expected['train_loss']), rel=1e-5)


def test_generator_writes_what_lerobot_writes(policy, lerobot_folder, tmp_path):
    """save_lerobot of the same weights and stats gives LeRobot's files, byte for byte."""
    fresh = LeRobotACT(policy.config)
    fresh.model.load_state_dict(reproducible_weights(fresh.model, seed=0))
    fresh.set_lerobot_stats(policy.lerobot_stats())
    fresh.save_lerobot(tmp_path / 'ours')
    assert sorted(p.name for p in (tmp_path / 'ours').iterdir()) == LEROBOT_FILES
    for name in LEROBOT_FILES:
        assert (tmp_path / 'ours' / name).read_bytes() == (lerobot_folder / name).read_bytes(), \
            name


def _batch(policy: LeRobotACT, n: int = 3, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    c = policy.config
    h, w = c.image_shape
    return {'images': torch.randint(0, 256, (n, c.num_views, h, w, 3), generator=g,
                                    dtype=torch.uint8),
            'state': torch.randn(n, c.state_dim, generator=g),
            'actions': torch.randn(n, c.horizon, c.action_dim, generator=g) * 2 + 1,
            'action_mask': torch.ones(n, c.horizon)}


def test_per_sample_loss_masks_steps_and_dimensions(policy):
    batch = _batch(policy)
    loss = policy.per_sample_loss(batch)      # eval mode: the L1 term alone
    assert loss.shape == (3,) and (loss > 0).all()
    # A sample whose chunk lies past the episode end contributes nothing.
    batch['action_mask'][0] = 0
    masked = policy.per_sample_loss(batch)
    assert masked[0] == 0 and torch.allclose(masked[1:], loss[1:])
    # Targets at masked steps and dimensions do not count; the others do.
    batch['action_mask'][1, 5:] = 0
    batch['dim_mask'] = torch.ones(3, 5)
    batch['dim_mask'][1, 0] = 0
    before = policy.per_sample_loss(batch)
    batch['actions'][1, 7] += 100.0
    batch['actions'][1, :, 0] += 100.0
    assert torch.allclose(policy.per_sample_loss(batch), before)
    batch['actions'][1, 2, 1] += 100.0
    assert policy.per_sample_loss(batch)[1] > before[1] + 1.0


def test_vae_adds_the_kl_term_per_sample_in_training(policy):
    batch = _batch(policy)
    no_kl = LeRobotACT(dataclasses.replace(policy.config, kl_weight=0.0))
    no_kl.load_state_dict(policy.state_dict())
    losses = []
    for model in (policy, no_kl):
        model.train()
        torch.manual_seed(0)
        losses.append(model.per_sample_loss(batch).detach())
        model.eval()
    with_kl, without_kl = losses
    assert with_kl.shape == (3,) and (with_kl > without_kl).all()


def test_features_are_deterministic_and_shared(policy):
    batch = _batch(policy)
    policy.train()
    try:
        features, loss = policy.features_and_loss(batch)
        again = policy.encode(batch)
    finally:
        policy.eval()
    assert features.shape == (3, policy.feature_dim) == (3, 64)
    assert loss.shape == (3,) and loss.requires_grad
    # The critic sees the same features in training (dropout, VAE) as at inference.
    assert torch.allclose(features, again) and torch.allclose(features, policy.encode(batch))
    assert not torch.allclose(features[0], features[1])


def test_overfits_a_fixed_batch():
    torch.manual_seed(0)
    config = LeRobotACTConfig(state_dim=3, action_dim=2, camera_names=['observation.images.a'],
                              image_size=32, chunk_size=4, n_action_steps=4, dim_model=32,
                              n_heads=4, dim_feedforward=64, n_encoder_layers=1,
                              n_vae_encoder_layers=1, latent_dim=4, dropout=0.0)
    policy = LeRobotACT(config)
    # The frozen-statistics ResNet dominates the cost; the test is about the ACT heads.
    policy.model.backbone.requires_grad_(False)
    batch = _batch(policy, n=4, seed=1)
    policy.eval()
    start = policy.per_sample_loss(batch).mean().item()
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-3)
    policy.train()
    for _ in range(300):
        loss = policy.per_sample_loss(batch).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    policy.eval()
    end = policy.per_sample_loss(batch).mean().item()
    assert end < 0.2 * start, (start, end)


def test_habc_format_round_trip(policy, expected, tmp_path):
    digest = policy.save(tmp_path / 'habc')
    meta = json.loads((tmp_path / 'habc' / 'config.json').read_text())
    assert meta['type'] == 'lerobot_act' and len(digest) == 64
    loaded = load_policy(tmp_path / 'habc')
    assert isinstance(loaded, LeRobotACT) and loaded.version == policy.version
    assert loaded.config == policy.config
    batch = {'images': torch.from_numpy(expected['images']),
             'state': torch.from_numpy(expected['state'])}
    assert torch.equal(loaded.sample_chunks(batch), policy.sample_chunks(batch))


def test_check_fit_names_both_sides(policy):
    # The fixture's cameras are 64 x 64: a 128 x 128 camera scales to them, 96 x 128 does not.
    check_fit(policy.config, RobotInterface(6, 5, '', ((64, 64), (128, 128))))
    with pytest.raises(ValueError) as error:
        check_fit(policy.config, RobotInterface(14, 14, '', ((96, 128),) * 3),
                  source='lerobot:act_tiny')
    message = str(error.value)
    for part in ('state_dim: the checkpoint has 6, the robot 14',
                 'action_dim: the checkpoint has 5, the robot 14',
                 'num_views: the checkpoint has 2, the robot 3',
                 'trained on 64 x 64 (H/W 1.00), the robot sends 96 x 128 (H/W 0.75)',
                 'lerobot:act_tiny does not fit', 'observation.images.wrist'):
        assert part in message


def test_batch_of_the_wrong_shape_is_refused(policy, expected):
    with pytest.raises(ValueError, match=r'\(B, 2, H, W, 3\)'):
        policy.sample_chunks({'images': torch.from_numpy(expected['images'][:, :1]),
                              'state': torch.from_numpy(expected['state'])})
    with pytest.raises(ValueError, match=r'state must be \(B, 6\)'):
        policy.sample_chunks({'images': torch.from_numpy(expected['images']),
                              'state': torch.zeros(2, 14)})


def _copy(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / 'copy'
    shutil.copytree(folder, target)
    return target


def test_not_a_lerobot_folder_says_what_it_expected(lerobot_folder, policy, tmp_path):
    with pytest.raises(FileNotFoundError, match='is not a folder'):
        LeRobotACT.from_lerobot(tmp_path / 'nowhere')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(LeRobotFormatError, match='config.json not found.*model.safetensors'):
        LeRobotACT.from_lerobot(tmp_path / 'empty')
    policy.save(tmp_path / 'habc')
    with pytest.raises(LeRobotFormatError, match='is a habc checkpoint.*load_policy'):
        LeRobotACT.from_lerobot(tmp_path / 'habc')


def test_other_lerobot_types_and_missing_files(lerobot_folder, tmp_path):
    folder = _copy(lerobot_folder, tmp_path)
    raw = json.loads((folder / 'config.json').read_text())
    (folder / 'config.json').write_text(json.dumps({**raw, 'type': 'smolvla'}))
    with pytest.raises(LeRobotFormatError, match="LeRobot policy type 'smolvla'.*'act'"):
        LeRobotACT.from_lerobot(folder)
    (folder / 'config.json').write_text(json.dumps(raw))
    (folder / 'policy_preprocessor.json').unlink()
    with pytest.raises(LeRobotFormatError, match='policy_preprocessor.json not found'):
        LeRobotACT.from_lerobot(folder)


def test_weights_that_do_not_fit_the_config(lerobot_folder, tmp_path):
    folder = _copy(lerobot_folder, tmp_path)
    raw = json.loads((folder / 'config.json').read_text())
    (folder / 'config.json').write_text(json.dumps({**raw, 'dim_model': 64}))
    with pytest.raises(LeRobotFormatError, match='does not match its config.json'):
        LeRobotACT.from_lerobot(folder)
    (folder / 'config.json').write_text(json.dumps({**raw, 'n_encoder_layers': 1}))
    with pytest.raises(LeRobotFormatError, match=r"unexpected \['model.encoder.layers.1"):
        LeRobotACT.from_lerobot(folder)


def test_min_max_statistics_become_the_same_affine_map():
    x = torch.tensor([-3.0, 0.5, 7.0])
    stats = {'min': torch.tensor([-4.0, 0.0, 2.0]), 'max': torch.tensor([2.0, 0.0, 10.0])}
    mean, std = _mean_std('observation.state', 'MIN_MAX', stats, 1e-8)
    # LeRobot's formula, including its eps for a zero range (the middle dimension).
    span = torch.where(stats['max'] - stats['min'] == 0, torch.tensor(1e-8),
                       stats['max'] - stats['min'])
    lerobot = 2 * (x - stats['min']) / span - 1
    assert torch.allclose((x - mean) / std, lerobot, rtol=1e-6)
    with pytest.raises(LeRobotFormatError, match=r"needs the statistics \['min', 'max'\]"):
        _mean_std('action', 'MIN_MAX', {'mean': x, 'std': x}, 1e-8)


def test_load_policy_reads_a_lerobot_folder_with_or_without_the_prefix(lerobot_folder, policy,
                                                                        expected, tmp_path):
    # What `habc train --init`, the learner and the policy node's checkpoint parameter call.
    batch = {'images': torch.from_numpy(expected['images']),
             'state': torch.from_numpy(expected['state'])}
    for spec in (lerobot_folder, f'lerobot:{lerobot_folder}'):
        loaded = load_policy(spec)
        assert isinstance(loaded, LeRobotACT)
        assert torch.equal(loaded.sample_chunks(batch), policy.sample_chunks(batch))
    folder = _copy(lerobot_folder, tmp_path)
    raw = json.loads((folder / 'config.json').read_text())
    (folder / 'config.json').write_text(json.dumps({**raw, 'type': 'diffusion'}))
    with pytest.raises(ValueError,
                       match=r"type 'diffusion'; habc reads LeRobot types \['act', 'smolvla'\]"):
        load_policy(folder)


def test_the_policy_runtime_resolves_a_lerobot_uri(lerobot_folder):
    from habc_policy.policy_runtime import resolve_checkpoint_dir

    assert resolve_checkpoint_dir(f'lerobot:{lerobot_folder}') == lerobot_folder
