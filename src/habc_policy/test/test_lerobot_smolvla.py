"""LeRobot SmolVLA checkpoints: loaded without lerobot, checked against LeRobot's own output.

fixtures/lerobot_smolvla_tiny/ is what LeRobot 0.4.4 (transformers 4.57.6) wrote, see its
make_reference.py: a tiny SmolVLM2 folder (vlm/: config and tokenizer, no weights) and three
SmolVLA checkpoints on it (cross_attn: SmolVLA's defaults; self_attn: image special tokens, a
placeholder camera, max_length language padding, a padded prefix; sparse_expert: half as
many expert layers as VLM layers), each without its model.safetensors. Those weights are
`reproducible_weights`, rebuilt here and proved byte-identical to LeRobot's file through the
SHA-256 LeRobot's run recorded. The expected chunks are LeRobot's predict_action_chunk +
postprocessor for a fixed noise; the losses are LeRobot's forward for a fixed noise and time,
and for seed 123.
"""

import hashlib
import json
from pathlib import Path
import shutil
import socket
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.torch import save_file
import torch

from habc_policy.models.base import load_policy
from habc_policy.models.lerobot_act import LeRobotFormatError, reproducible_weights
from habc_policy.models.lerobot_smolvla import (
    LeRobotSmolVLA,
    patch_positions_457,
    UNUSED_LEROBOT_KEYS,
)
from habc_policy.robot_fit import check_fit, RobotInterface

FIXTURE = Path(__file__).parent / 'fixtures' / 'lerobot_smolvla_tiny'
VARIANTS = ('cross_attn', 'self_attn', 'sparse_expert')
# LeRobot's outputs and ours came out bit-identical on this machine (max abs diff 0.0 for
# the chunks and the losses of all three variants). The tolerance leaves room for other CPUs
# and BLAS kernels: float32 rounding over a few small layers and four Euler steps.
ATOL = 1e-5


def _manifest(variant: str) -> dict:
    return json.loads((FIXTURE / variant / 'lerobot_manifest.json').read_text())


def _rebuild(folder: Path, variant: str) -> None:
    """Write the model.safetensors LeRobot wrote, from the key list and reproducible_weights."""
    shapes = {k: torch.empty(v) for k, v in _manifest(variant)['keys'].items()}
    weights = reproducible_weights(SimpleNamespace(state_dict=lambda: shapes), seed=0)
    save_file(weights, str(folder / 'model.safetensors'))


@pytest.fixture(scope='module')
def folders(tmp_path_factory) -> dict[str, Path]:
    """Each LeRobot folder, complete, and the VLM folder under 'vlm'."""
    root = tmp_path_factory.mktemp('lerobot_smolvla')
    shutil.copytree(FIXTURE / 'vlm', root / 'vlm')
    out = {'vlm': root / 'vlm'}
    for variant in VARIANTS:
        shutil.copytree(FIXTURE / variant, root / variant)
        _rebuild(root / variant, variant)
        out[variant] = root / variant
    return out


@pytest.fixture(scope='module')
def policies(folders) -> dict[str, LeRobotSmolVLA]:
    torch.set_num_threads(1)
    return {v: LeRobotSmolVLA.from_lerobot(folders[v], vlm_dir=folders['vlm']).eval()
            for v in VARIANTS}


def _expected(variant: str) -> dict:
    return dict(np.load(FIXTURE / variant / 'expected.npz'))


def _batch(variant: str) -> dict:
    e = _expected(variant)
    return {'images': torch.from_numpy(e['images']), 'state': torch.from_numpy(e['state']),
            'instruction': _manifest(variant)['instructions'],
            'actions': torch.from_numpy(e['actions']), 'action_mask': torch.ones(2, 6)}


@pytest.mark.parametrize('variant', VARIANTS)
def test_rebuilt_weights_are_the_file_lerobot_wrote(folders, variant):
    digest = hashlib.sha256((folders[variant] / 'model.safetensors').read_bytes()).hexdigest()
    assert digest == _manifest(variant)['model_safetensors_sha256']


@pytest.mark.parametrize('variant', VARIANTS)
def test_keys_and_shapes_are_lerobots(policies, variant):
    ours = {f'model.{k}': list(v.shape) for k, v in policies[variant].model.state_dict().items()}
    theirs = _manifest(variant)['keys']
    # The LM head is the one LeRobot key habc drops: SmolVLA never uses it.
    assert ours == {k: v for k, v in theirs.items() if k not in UNUSED_LEROBOT_KEYS}
    assert set(theirs) - set(ours) == set(UNUSED_LEROBOT_KEYS)


@pytest.mark.parametrize('variant', VARIANTS)
def test_tokens_are_lerobots(policies, variant):
    e = _expected(variant)
    ids, mask = policies[variant]._tokens(_batch(variant), 2, torch.device('cpu'))
    assert np.array_equal(ids.numpy(), e['lang_tokens'])
    assert np.array_equal(mask.numpy(), e['lang_mask'])


@pytest.mark.parametrize('variant', VARIANTS)
def test_chunk_equals_lerobots(policies, variant):
    e = _expected(variant)
    chunk = policies[variant].sample_actions(_batch(variant), torch.from_numpy(e['noise']))
    assert chunk.shape == (2, 6, 4)
    np.testing.assert_allclose(chunk.numpy(), e['chunk'], rtol=0, atol=ATOL)


@pytest.mark.parametrize('variant', VARIANTS)
def test_losses_equal_lerobots(policies, variant):
    e = _expected(variant)
    policy, batch = policies[variant], _batch(variant)
    losses, _ = policy.lerobot_losses(batch, torch.from_numpy(e['noise']),
                                      torch.from_numpy(e['time']))
    assert losses.shape == (2, 6, 8)        # (B, H, max_action_dim)
    per_sample = policy._reduce(batch, losses).detach().numpy()
    np.testing.assert_allclose(per_sample, e['loss_per_sample'], rtol=1e-6, atol=0)
    assert per_sample.mean() == pytest.approx(float(e['loss_mean']), rel=1e-6)
    # LeRobot's own draws of noise and time: same seed, same draws, same loss.
    torch.manual_seed(int(e['seed']))
    seeded = policy.per_sample_loss(batch).detach().numpy()
    np.testing.assert_allclose(seeded, e['seeded_loss_per_sample'], rtol=1e-6, atol=0)


def test_sample_chunks_draws_the_noise_from_the_generator(policies):
    policy, batch = policies['cross_attn'], _batch('cross_attn')
    chunk = policy.sample_chunks(batch, generator=torch.Generator().manual_seed(5))
    noise = torch.randn((2, 6, 8), generator=torch.Generator().manual_seed(5))
    assert torch.equal(chunk, policy.sample_actions(batch, noise))
    single = policy.predict_action_chunk({'images': batch['images'][0].numpy(),
                                          'state': batch['state'][0].numpy(),
                                          'instruction': batch['instruction'][0]})
    assert single.shape == (6, 4) and np.isfinite(single).all()


def test_vision_positions_are_transformers_457s():
    # 4.57 bucketizes i / n * (1 - 1e-6): rows 0 and 1 share bucket 0 (what SmolVLA ran on).
    assert patch_positions_457(4, 4, 4).tolist() == [0, 0, 1, 2, 0, 0, 1, 2,
                                                     4, 4, 5, 6, 8, 8, 9, 10]


def test_per_sample_loss_masks_steps_and_dimensions(policies):
    policy, batch = policies['cross_attn'], _batch('cross_attn')
    batch['action_mask'][1, 3:] = 0
    batch['dim_mask'] = torch.ones(2, 4)
    batch['dim_mask'][1, 0] = 0
    torch.manual_seed(0)
    losses, _ = policy.lerobot_losses(batch)
    torch.manual_seed(0)            # the same noise and time
    loss = policy.per_sample_loss(batch)
    assert loss.shape == (2,)
    # By hand: sample 0 is LeRobot's mean over (H, max_action_dim), padded dimensions
    # included; sample 1 averages its first 3 steps over dimensions 1..7 (the padding counts,
    # as in LeRobot; dimension 0 does not).
    assert loss[0].item() == pytest.approx(losses[0].mean().item(), rel=1e-6)
    assert loss[1].item() == pytest.approx(losses[1, :3, 1:].mean().item(), rel=1e-6)
    batch['action_mask'][0] = 0
    torch.manual_seed(0)
    assert policy.per_sample_loss(batch)[0].item() == 0.0


def test_features_are_shared_and_detached(policies):
    policy, batch = policies['cross_attn'], _batch('cross_attn')
    features = policy.encode(batch)
    assert features.shape == (2, policy.feature_dim) == (2, 128)
    torch.manual_seed(0)
    shared, loss = policy.features_and_loss(batch)
    assert loss.shape == (2,) and loss.requires_grad and not shared.requires_grad
    # The prefix never attends to the action tokens: the training pass gives the critic the
    # features of the inference pass.
    torch.testing.assert_close(shared, features, rtol=0, atol=1e-5)
    assert not torch.allclose(features[0], features[1])


def test_trainable_set_is_lerobots(policies):
    policy = policies['cross_attn']
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    # train_expert_only, freeze_vision_encoder, train_state_proj: LeRobot's defaults.
    assert not any(n.startswith('model.vlm_with_expert.vlm.') for n in trainable)
    assert any(n.startswith('model.vlm_with_expert.lm_expert.') for n in trainable)
    assert {'model.state_proj.weight', 'model.action_in_proj.weight'} <= trainable


def test_overfits_a_fixed_batch(folders):
    torch.manual_seed(0)
    policy = LeRobotSmolVLA.from_lerobot(folders['cross_attn'], vlm_dir=folders['vlm'])
    batch = _batch('cross_attn')
    noise, time = torch.randn(2, 6, 8), torch.tensor([0.25, 0.75])

    def fixed_loss() -> float:
        with torch.no_grad():
            return policy._reduce(batch, policy.lerobot_losses(batch, noise, time)[0]).mean()

    start = fixed_loss().item()
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=3e-3)
    policy.train()
    for _ in range(150):
        loss = policy.per_sample_loss(batch).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    policy.eval()
    end = fixed_loss().item()
    assert end < 0.3 * start, (start, end)


def test_habc_format_round_trip(policies, tmp_path):
    policy, batch = policies['self_attn'], _batch('self_attn')
    digest = policy.save(tmp_path / 'habc')
    meta = json.loads((tmp_path / 'habc' / 'config.json').read_text())
    assert meta['type'] == 'lerobot_smolvla' and len(digest) == 64
    loaded = load_policy(tmp_path / 'habc')
    assert isinstance(loaded, LeRobotSmolVLA) and loaded.version == policy.version
    assert loaded.config == policy.config
    noise = torch.from_numpy(_expected('self_attn')['noise'])
    assert torch.equal(loaded.sample_actions(batch, noise), policy.sample_actions(batch, noise))


def test_changed_vlm_folder_is_refused_on_load(policies, folders, tmp_path):
    vlm = tmp_path / 'vlm'
    shutil.copytree(folders['vlm'], vlm)
    policy = LeRobotSmolVLA.from_lerobot(folders['cross_attn'], vlm_dir=vlm)
    policy.save(tmp_path / 'habc')
    tokenizer = json.loads((vlm / 'tokenizer.json').read_text())
    tokenizer['model']['vocab']['extra'] = len(tokenizer['model']['vocab'])
    (vlm / 'tokenizer.json').write_text(json.dumps(tokenizer))
    with pytest.raises(ValueError, match='is not the one this policy was saved with'):
        load_policy(tmp_path / 'habc')


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError('network access attempted')

    monkeypatch.setattr(socket.socket, 'connect', refuse)
    monkeypatch.setattr(socket, 'create_connection', refuse)


def test_missing_vlm_folder_fails_fast_without_network(folders, tmp_path, no_network):
    folder = tmp_path / 'ckpt'
    shutil.copytree(folders['cross_attn'], folder)
    raw = json.loads((folder / 'config.json').read_text())
    raw['vlm_model_name'] = 'HuggingFaceTB/SmolVLM2-500M-Video-Instruct'
    (folder / 'config.json').write_text(json.dumps(raw))
    with pytest.raises(FileNotFoundError,
                       match=r"no local VLM folder .*'HuggingFaceTB/SmolVLM2-500M-Video-"
                             r"Instruct'.*Pass vlm_dir="):
        LeRobotSmolVLA.from_lerobot(folder)
    with pytest.raises(FileNotFoundError, match="VLM folder 'org/model' not found"):
        LeRobotSmolVLA.from_lerobot(folder, vlm_dir='org/model')
    (tmp_path / 'no_tokenizer').mkdir()
    shutil.copy(folders['vlm'] / 'config.json', tmp_path / 'no_tokenizer')
    with pytest.raises(FileNotFoundError, match='has no tokenizer'):
        LeRobotSmolVLA.from_lerobot(folder, vlm_dir=tmp_path / 'no_tokenizer')
    # A 'vlm' folder beside the weights is found without vlm_dir.
    shutil.copytree(folders['vlm'], folder / 'vlm')
    assert LeRobotSmolVLA.from_lerobot(folder).config.vlm_dir == str((folder / 'vlm').absolute())


def test_check_fit_names_both_sides(policies):
    policy = policies['cross_attn']
    # Trained on 24 x 40 cameras: 48 x 80 scales to them, 96 x 96 would be stretched.
    check_fit(policy.config, RobotInterface(5, 4, '', ((24, 40), (48, 80))))
    with pytest.raises(ValueError) as error:
        check_fit(policy.config, RobotInterface(14, 14, '', ((96, 96),) * 3),
                  source='lerobot:smolvla_tiny')
    message = str(error.value)
    for part in ('state_dim: the checkpoint has 5, the robot 14',
                 'action_dim: the checkpoint has 4, the robot 14',
                 'num_views: the checkpoint has 2, the robot 3',
                 'trained on 24 x 40 (H/W 0.60), the robot sends 96 x 96 (H/W 1.00)',
                 'lerobot:smolvla_tiny does not fit', 'observation.images.wrist'):
        assert part in message


def test_batch_of_the_wrong_shape_is_refused(policies):
    policy, batch = policies['cross_attn'], _batch('cross_attn')
    with pytest.raises(ValueError, match=r'\(B, 2, H, W, 3\)'):
        policy.sample_chunks({**batch, 'images': batch['images'][:, :1]})
    with pytest.raises(ValueError, match=r'state must be \(B, 5\)'):
        policy.sample_chunks({**batch, 'state': torch.zeros(2, 14)})
    with pytest.raises(ValueError, match=r'actions must be \(B, 6, 4\)'):
        policy.per_sample_loss({**batch, 'actions': torch.zeros(2, 6, 14)})
    with pytest.raises(ValueError, match="no 'instruction'"):
        policy.sample_chunks({k: v for k, v in batch.items() if k != 'instruction'})


def test_other_types_and_mismatched_weights(folders, tmp_path):
    folder = tmp_path / 'ckpt'
    shutil.copytree(folders['cross_attn'], folder)
    raw = json.loads((folder / 'config.json').read_text())
    (folder / 'config.json').write_text(json.dumps({**raw, 'type': 'act'}))
    with pytest.raises(LeRobotFormatError, match="LeRobot policy type 'act'.*'smolvla'"):
        LeRobotSmolVLA.from_lerobot(folder, vlm_dir=folders['vlm'])
    (folder / 'config.json').write_text(json.dumps({**raw, 'num_vlm_layers': 3}))
    with pytest.raises(LeRobotFormatError, match=r'unexpected .*text_model.layers.3'):
        LeRobotSmolVLA.from_lerobot(folder, vlm_dir=folders['vlm'])
    (folder / 'config.json').write_text(json.dumps({**raw, 'max_action_dim': 16}))
    with pytest.raises(LeRobotFormatError, match='does not match its config.json'):
        LeRobotSmolVLA.from_lerobot(folder, vlm_dir=folders['vlm'])


def test_load_policy_reads_a_smolvla_folder_with_its_vlm_subfolder(folders, policies, tmp_path):
    # The path `habc train --init` and the policy node take: no vlm_dir argument, so the
    # VLM's config and tokenizer come from the checkpoint's vlm/ subfolder.
    from habc_policy.models.base import load_policy

    folder = tmp_path / 'smolvla'
    shutil.copytree(folders['cross_attn'], folder)
    shutil.copytree(folders['vlm'], folder / 'vlm')
    e = _expected('cross_attn')
    loaded = load_policy(f'lerobot:{folder}')
    assert isinstance(loaded, LeRobotSmolVLA)
    noise = torch.from_numpy(e['noise'])
    assert torch.equal(loaded.eval().sample_actions(_batch('cross_attn'), noise),
                       policies['cross_attn'].sample_actions(_batch('cross_attn'), noise))
