"""PolicyRuntime and InferenceWorker without ROS: verified loading, hot swap, inference."""

import json
import math
from pathlib import Path
import re
import threading

import numpy as np
import pytest
from safetensors.torch import save as save_safetensors
import torch

from habc_common.update_trust import (
    companions_digest,
    create_key_pair,
    encode_token,
    load_signing_key,
    UpdateClaim,
    UpdateGate,
)
from habc_episodes.vocabulary import PolicyVersion, STARTUP_VERSION
from habc_policy.chunk_executor import ChunkExecutor
from habc_policy.image_convert import numpy_to_image
from habc_policy.models.base import load_policy
from habc_policy.models.vla import SmallVLA, SmallVLAConfig
from habc_policy.policy_runtime import (
    InferenceWorker,
    observation_from_msg,
    PolicyNodeParams,
    PolicyObservation,
    PolicyRuntime,
    resolve_checkpoint_dir,
    WeightsError,
)

PERIOD = 0.02
JOINTS = [f'j{i}' for i in range(14)]


def tiny_config(**changes) -> SmallVLAConfig:
    values = {'state_dim': 14, 'action_dim': 14, 'horizon': 10, 'num_views': 1,
              'image_size': 32, 'hidden_dim': 32, 'num_layers': 1, 'cnn_channels': [8, 16],
              'action_head': 'l2'}
    return SmallVLAConfig(**{**values, **changes})


def make_checkpoint(folder: Path, version: str, seed: int, **changes) -> str:
    """Save a tiny SmallVLA with distinct weights; return the sha256 of its weights."""
    torch.manual_seed(seed)
    policy = SmallVLA(tiny_config(**changes))
    policy.version = version
    return policy.save(folder)


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp('ckpt')
    shas = {name: make_checkpoint(root / name, version, seed)
            for name, version, seed in [('sft', 'sft', 0), ('v2', '2', 1), ('v5', '5', 2)]}
    shas['dim7'] = make_checkpoint(root / 'dim7', '3', 3, action_dim=7)
    return root, shas


def observation(stamp: float, names=JOINTS, views: int = 1, size: int = 32,
                shape: tuple[int, int] | None = None) -> PolicyObservation:
    rng = np.random.default_rng(int(stamp * 1000))
    height, width = shape or (size, size)
    images = [rng.integers(0, 255, (height, width, 3), dtype=np.uint8) for _ in range(views)]
    return PolicyObservation(stamp=stamp, images=images, joint_names=list(names),
                             positions=np.linspace(-1, 1, len(names)), instruction='test')


# The learner's key (trusted) and a stranger's; checkpoints may lie anywhere under the
# session's pytest folder (the roots), which every test's tmp_path is inside.
TRUST: dict = {}


@pytest.fixture(scope='module', autouse=True)
def trust(tmp_path_factory):
    keys = tmp_path_factory.mktemp('keys')
    for name in ('trusted', 'stranger'):
        create_key_pair(keys / name / 'learner.key')
        TRUST[name] = load_signing_key(keys / name / 'learner.key')
    TRUST['dir'] = keys / 'trusted'
    TRUST['roots'] = [str(tmp_path_factory.getbasetemp())]
    yield
    TRUST.clear()


def gate(require_signature: bool = True, roots: list[str] | None = None) -> UpdateGate:
    return UpdateGate.of([str(TRUST['dir'])], TRUST['roots'] if roots is None else roots,
                         'habc', require_signature)


def new_runtime(**kwargs) -> PolicyRuntime:
    kwargs.setdefault('gate', gate())
    return PolicyRuntime(ChunkExecutor(PolicyNodeParams().executor_params()), PERIOD, **kwargs)


def weights_sha(folder: Path) -> str:
    from habc_policy.models.base import sha256_file

    return sha256_file(folder / 'model.safetensors')


def runtime_with(folder: Path, **kwargs) -> PolicyRuntime:
    runtime = new_runtime(**kwargs)
    runtime.load_startup(str(folder))
    return runtime


def offer(runtime: PolicyRuntime, version: int, sha256: str, uri: str = '', *,
          data: bytes = b'', fmt: str = 'safetensors', key: str = 'trusted',
          policy_name: str = 'habc'):
    """Offer a PolicyUpdate signed as the learner signs it (key None: unsigned)."""
    signer = TRUST[key] if key else None
    digest = companions(uri)
    signature = (signer.sign(UpdateClaim(version, sha256, uri, policy_name, digest))
                 if signer else b'')
    return runtime.offer_update(version, sha256, uri, data, fmt, policy_name,
                                signer.key_id if signer else '', signature, digest)


def offer_uri(runtime: PolicyRuntime, uri: str, sha256: str, version: int,
              key: str = 'trusted'):
    """Set weights_uri with the signature token `habc keys sign` prints."""
    signer = TRUST[key]
    digest = companions(uri)
    token = encode_token(version, signer.key_id,
                         signer.sign(UpdateClaim(version, sha256, uri, 'habc', digest)), digest)
    return runtime.offer_weights_uri(uri, sha256, token)


def companions(uri: str) -> str:
    """Return what the learner signs beside the weights ('' for a missing folder)."""
    try:
        return companions_digest(resolve_checkpoint_dir(uri)) if uri else ''
    except WeightsError:
        return ''


def test_uris_resolve_to_checkpoint_folders(checkpoints, tmp_path):
    root, _ = checkpoints
    folder = root / 'v2'
    assert resolve_checkpoint_dir(str(folder)) == folder
    assert resolve_checkpoint_dir(str(folder / 'model.safetensors')) == folder
    assert resolve_checkpoint_dir(f'file://{folder}/model.safetensors') == folder
    spaced = tmp_path / 'with space'
    make_checkpoint(spaced, '2', 0)
    assert resolve_checkpoint_dir(f'file://{str(spaced).replace(" ", "%20")}') == spaced
    with pytest.raises(WeightsError, match='not found'):
        resolve_checkpoint_dir(str(tmp_path / 'nope'))
    with pytest.raises(WeightsError, match="scheme 's3' is not supported"):
        resolve_checkpoint_dir('s3://bucket/ckpt')
    with pytest.raises(WeightsError, match='another host'):
        resolve_checkpoint_dir('file://server/ckpt')
    (tmp_path / 'half').mkdir()
    (tmp_path / 'half' / 'model.safetensors').write_bytes(b'')
    with pytest.raises(WeightsError, match='config.json missing'):
        resolve_checkpoint_dir(str(tmp_path / 'half'))
    with pytest.raises(WeightsError, match='or its model.safetensors'):
        resolve_checkpoint_dir(str(folder / 'config.json'))


def test_startup_versions_of_checkpoints(tmp_path):
    # The SFT checkpoint is STARTUP_VERSION however it was spelled; the learner's keep their
    # number.
    for saved, expected in [('sft', STARTUP_VERSION), ('1:sft', STARTUP_VERSION),
                            ('7', PolicyVersion(7)), ('untrained', PolicyVersion(1, 'untrained'))]:
        make_checkpoint(tmp_path / saved, saved, 0)
        assert runtime_with(tmp_path / saved).active.version == expected


def test_node_parameters_build_the_executor():
    params = PolicyNodeParams(control_rate_hz=25.0, mode='ensemble', min_remaining_steps=10)
    executor = params.executor_params()
    assert executor.control_period_s == pytest.approx(0.04)
    assert executor.stale_after_s == pytest.approx(0.03)  # 0 = 0.75 of the period
    with pytest.raises(ValueError, match='64 hex digits'):
        PolicyNodeParams(expected_sha256='abc')
    with pytest.raises(ValueError, match='stale_after_s'):
        PolicyNodeParams(stale_after_s=0.001)


def test_startup_checkpoint_gets_the_startup_version_or_its_own(checkpoints):
    root, shas = checkpoints
    runtime = runtime_with(root / 'sft')
    assert runtime.active.version == STARTUP_VERSION == PolicyVersion(1, 'sft')
    assert runtime.executor.staged_version == STARTUP_VERSION
    assert runtime.active.sha256 == shas['sft']
    assert runtime_with(root / 'v5').active.version == PolicyVersion(5)
    strict = new_runtime()
    with pytest.raises(WeightsError, match='sha256 mismatch'):
        strict.load_startup(str(root / 'sft'), expected_sha256='0' * 64)
    assert strict.active is None


def test_chunk_starts_one_period_after_the_observation(checkpoints):
    runtime = runtime_with(checkpoints[0] / 'sft')
    result = runtime.infer(observation(100.0))
    assert result.accepted and result.version == STARTUP_VERSION and result.chunk_id == 0
    assert result.actions.shape == (10, 14) and result.joint_names == JOINTS
    assert result.start_time == pytest.approx(100.0 + PERIOD)
    # The first action is due one period after the observation; the next ids increase.
    action = runtime.executor.next_action(100.0 + PERIOD)
    np.testing.assert_allclose(action.action, result.actions[0])
    assert runtime.infer(observation(100.05)).chunk_id == 1


def test_good_update_is_staged_then_swapped_between_inferences(checkpoints):
    root, shas = checkpoints
    runtime = runtime_with(root / 'sft')
    loaded = offer(runtime, 2, shas['v2'], f'file://{root}/v2/model.safetensors')
    assert loaded.version == PolicyVersion(2) and runtime.pending is loaded
    assert runtime.status()['staged_version'] == '2'
    assert runtime.infer(observation(1.0)).version == STARTUP_VERSION  # infer alone never swaps
    assert runtime.swap_if_pending() is loaded
    assert runtime.executor.staged_version == PolicyVersion(2)
    result = runtime.infer(observation(1.1))
    assert result.version == PolicyVersion(2) and result.accepted
    status = runtime.status()
    assert status['active_version'] == '2' and status['last_update']['result'] == 'active'
    # The new weights really act: a different chunk for the same observation.
    reference = runtime_with(root / 'sft').infer(observation(1.1)).actions
    assert not np.allclose(result.actions, reference)


@pytest.mark.parametrize('case', ['wrong_sha', 'corrupt', 'missing', 'action_dim', 'old',
                                  'format', 'truncated_config'])
def test_bad_update_is_rejected_and_the_old_policy_keeps_acting(checkpoints, tmp_path, case):
    root, shas = checkpoints
    runtime = runtime_with(root / 'sft')
    uri, sha, version, fmt = str(root / 'v2'), shas['v2'], 2, 'safetensors'
    expected = {'wrong_sha': 'sha256 mismatch', 'corrupt': 'cannot load',
                'missing': 'not found', 'action_dim': 'action_dim is 7',
                'old': 'not newer', 'format': "format 'onnx'",
                'truncated_config': 'cannot load'}[case]
    if case == 'wrong_sha':
        sha = 'ab' * 32
    elif case in ('corrupt', 'truncated_config'):
        bad = tmp_path / 'bad'
        make_checkpoint(bad, '2', 1)
        if case == 'corrupt':
            data = (bad / 'model.safetensors').read_bytes()
            (bad / 'model.safetensors').write_bytes(data[:len(data) // 2])
        else:
            (bad / 'config.json').write_text('{"type": "small_vla", "conf')
        uri = str(bad)
        from habc_policy.models.base import sha256_file
        sha = sha256_file(bad / 'model.safetensors')  # the hash matches: the content is bad
    elif case == 'missing':
        uri = str(tmp_path / 'gone' / 'model.safetensors')
    elif case == 'action_dim':
        uri, sha = str(root / 'dim7'), shas['dim7']
    elif case == 'old':
        version = 1
    elif case == 'format':
        fmt = 'onnx'
    with pytest.raises(WeightsError, match=expected):
        offer(runtime, version, sha, uri, fmt=fmt)
    status = runtime.status()
    assert status['last_update']['result'] == 'rejected'
    assert expected in status['last_update']['reason']
    assert status['staged_version'] is None and runtime.swap_if_pending() is None
    assert status['counters']['updates_rejected'] == 1
    # The old version goes on producing chunks.
    assert runtime.infer(observation(2.0)).version == STARTUP_VERSION
    assert runtime.executor.staged_version == STARTUP_VERSION


def test_inline_weights_reuse_the_active_architecture(checkpoints):
    root, _ = checkpoints
    runtime = runtime_with(root / 'sft')
    state = load_policy(root / 'v2').state_dict()
    data = save_safetensors({k: v.contiguous() for k, v in state.items()})
    import hashlib
    sha = hashlib.sha256(data).hexdigest()
    with pytest.raises(WeightsError, match='inline weights: sha256 mismatch'):
        offer(runtime, 3, 'cd' * 32, data=data)
    with pytest.raises(WeightsError, match='inline weights: cannot load'):
        broken = save_safetensors({'nonsense': torch.zeros(2)})
        offer(runtime, 3, hashlib.sha256(broken).hexdigest(), data=broken)
    loaded = offer(runtime, 3, sha, data=data)
    assert loaded.version == PolicyVersion(3) and loaded.source == 'inline'
    runtime.swap_if_pending()
    expected = runtime_with(root / 'v2').infer(observation(3.0)).actions
    np.testing.assert_allclose(runtime.infer(observation(3.0)).actions, expected, atol=1e-6)
    with pytest.raises(WeightsError, match='need an active policy'):
        offer(new_runtime(), 2, sha, data=data)


def test_weights_uri_parameter_loads_signed_weights(checkpoints):
    root, shas = checkpoints
    runtime = runtime_with(root / 'sft')
    # An operator loads the SFT weights again (a rollback) as version 2: signed, above 1.
    manual = offer_uri(runtime, str(root / 'sft'), shas['sft'], version=2)
    assert manual.version == PolicyVersion(2, f'manual-{shas["sft"][:12]}')
    runtime.swap_if_pending()
    assert runtime.infer(observation(1.0)).version == manual.version
    # The learner's next update must be newer than that.
    with pytest.raises(WeightsError, match='version 2 is not newer than 2'):
        offer(runtime, 2, shas['v2'], str(root / 'v2'))
    assert offer(runtime, 3, shas['v2'], str(root / 'v2')).version == PolicyVersion(3)
    for token, sha, reason in [
            ('', shas['v5'], 'weights_uri needs a signature'),
            ('5.abc', shas['v5'], 'weights_uri needs a signature'),
            (None, '', 'needs expected_sha256'),
            (None, 'ef' * 32, 'does not match this update')]:  # signed for another hash
        if token is None:
            signer = TRUST['trusted']
            token = encode_token(5, signer.key_id, signer.sign(
                UpdateClaim(5, shas['v5'], str(root / 'v5'), 'habc')))
        with pytest.raises(WeightsError, match=reason):
            runtime.offer_weights_uri(str(root / 'v5'), sha, token)
        assert runtime.status()['staged_version'] == '3'


def test_without_required_signatures_weights_uri_numbers_manual_loads(checkpoints):
    root, shas = checkpoints
    runtime = runtime_with(root / 'sft', gate=gate(require_signature=False))
    # A checkpoint named like the SFT one: a manual version label, the number stays 1.
    manual = runtime.offer_weights_uri(str(root / 'sft'), shas['sft'])
    assert manual.version == PolicyVersion(1, f'manual-{shas["sft"][:12]}')
    runtime.swap_if_pending()
    assert runtime.infer(observation(1.0)).version == manual.version
    # The learner's next update still counts as newer; unsigned is accepted here.
    assert offer(runtime, 2, shas['v2'], str(root / 'v2'), key=None).version == \
        PolicyVersion(2)
    # An integer checkpoint above the active number keeps its number.
    assert runtime.offer_weights_uri(str(root / 'v5')).version == PolicyVersion(5)
    with pytest.raises(WeightsError, match='sha256 mismatch'):
        runtime.offer_weights_uri(str(root / 'v5'), 'ef' * 32)
    # The roots hold all the same, and a signature that is given must verify.
    outside = new_runtime(gate=gate(require_signature=False, roots=[str(root / 'v2')]))
    outside.load_startup(str(root / 'sft'))
    with pytest.raises(WeightsError, match='outside the checkpoint roots'):
        offer(outside, 5, shas['v5'], str(root / 'v5'), key=None)
    with pytest.raises(WeightsError, match='not trusted'):
        offer(outside, 2, shas['v2'], str(root / 'v2'), key='stranger')


@pytest.mark.parametrize('case', ['unsigned', 'unknown_key', 'lower_version', 'outside_roots',
                                  'dotdot', 'symlink_escape', 'other_policy', 'tampered'])
def test_only_signed_updates_from_the_roots_swap_in(checkpoints, tmp_path, case):
    root, shas = checkpoints
    roots = [str(tmp_path / 'learner')]
    (tmp_path / 'learner').mkdir()
    good = tmp_path / 'learner' / 'v2'
    make_checkpoint(good, '2', 1)
    sha = shas['v2']
    runtime = runtime_with(root / 'sft', gate=gate(roots=roots))
    uri, version, key, name = str(good), 2, 'trusted', 'habc'
    expected = {'unsigned': 'unsigned update', 'unknown_key': 'which is not trusted',
                'lower_version': 'version 1 is not newer than 1',
                'outside_roots': 'outside the checkpoint roots',
                'dotdot': '".." in a checkpoint path', 'symlink_escape': 'a link to',
                'other_policy': "update for policy 'other'",
                'tampered': 'does not match this update'}[case]
    if case == 'unsigned':
        key = None
    elif case == 'unknown_key':
        key = 'stranger'
    elif case == 'lower_version':
        version = 1
    elif case == 'outside_roots':
        uri = str(root / 'v2')  # a real checkpoint, elsewhere on disk
    elif case == 'dotdot':
        uri = str(tmp_path / 'learner' / '..' / 'learner' / 'v2')
    elif case == 'symlink_escape':
        (tmp_path / 'learner' / 'v9').symlink_to(root / 'v2', target_is_directory=True)
        uri = str(tmp_path / 'learner' / 'v9')
    elif case == 'other_policy':
        name = 'other'
    if case == 'tampered':  # signed for v2's folder, sent with the URI of another
        signer = TRUST['trusted']
        signature = signer.sign(UpdateClaim(2, sha, uri, 'habc'))
        call = lambda: runtime.offer_update(2, sha, str(root / 'v2'), b'', 'safetensors',  # noqa: E731
                                            'habc', signer.key_id, signature)
    else:
        call = lambda: offer(runtime, version, sha, uri, key=key, policy_name=name)  # noqa: E731
    with pytest.raises(WeightsError, match=expected):
        call()
    status = runtime.status()
    assert status['last_update']['result'] == 'rejected'
    assert expected in status['last_update']['reason'], status['last_update']['reason']
    assert status['staged_version'] is None and runtime.swap_if_pending() is None
    assert runtime.infer(observation(2.0)).version == STARTUP_VERSION  # the old one acts
    # A properly signed update from the root swaps in.
    loaded = offer(runtime, 2, sha, str(good))
    assert runtime.swap_if_pending() is loaded
    assert runtime.infer(observation(3.0)).version == PolicyVersion(2)


def test_model_input_reorders_joints_and_resizes_images(checkpoints):
    root, _ = checkpoints
    runtime = runtime_with(root / 'sft', joint_names=JOINTS)
    shuffled = list(reversed(JOINTS))
    obs = observation(1.0, names=shuffled, size=48)
    inputs = runtime.model_input(runtime.active.policy, obs)
    np.testing.assert_allclose(inputs['state'], obs.positions[::-1].astype(np.float32))
    assert inputs['images'].shape == (1, 32, 32, 3)
    assert runtime.infer(obs).joint_names == JOINTS  # commands follow the parameter
    with pytest.raises(WeightsError, match='num_views: .* has 1, the robot 2 camera images'):
        runtime.infer(observation(2.0, views=2))
    with pytest.raises(ValueError, match='1 camera image'):
        runtime.model_input(runtime.active.policy, observation(2.5, views=2))
    with pytest.raises(ValueError, match=r"lacks joints \['j13'\]"):
        runtime.infer(observation(3.0, names=JOINTS[:13] + ['other']))


def test_observation_message_becomes_model_input():
    from habc_msgs.msg import Observation

    msg = Observation()
    msg.header.stamp.sec, msg.header.stamp.nanosec = 12, 500_000_000
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    msg.images = [numpy_to_image(rgb[:, :, ::-1], 'bgr8')]
    msg.joint_state.name = ['a', 'b']
    msg.joint_state.position = [0.5, -0.5]
    msg.instruction = 'go'
    obs = observation_from_msg(msg)
    assert obs.stamp == 12.5 and obs.joint_names == ['a', 'b'] and obs.instruction == 'go'
    np.testing.assert_array_equal(obs.images[0], rgb)
    np.testing.assert_array_equal(obs.positions, [0.5, -0.5])
    assert obs.header_stamp is msg.header.stamp


def test_worker_swaps_only_between_inferences(checkpoints):
    root, shas = checkpoints
    runtime = runtime_with(root / 'sft')
    events, results = [], []
    inside, release = threading.Event(), threading.Event()
    predict = runtime._predict

    def gated_predict(policy, inputs, **options):
        # Only the worker's inferences wait (the loader's warm-up must not).
        if threading.current_thread().name == 'policy_inference':
            inside.set()
            assert release.wait(10)
        return predict(policy, inputs, **options)

    runtime._predict = gated_predict
    done = threading.Semaphore(0)

    def on_result(result):
        events.append(f'chunk {result.version}')
        results.append(result)
        done.release()

    worker = InferenceWorker(runtime, on_result, lambda exc: events.append(repr(exc)),
                             lambda loaded: events.append(f'swap {loaded.version}'))
    worker.start()
    try:
        worker.offer(observation(1.0))
        assert worker.request()
        assert inside.wait(10)
        assert not worker.request()  # busy: one inference at a time
        offer(runtime, 2, shas['v2'], str(root / 'v2'))
        worker.wake()
        assert runtime.active.version == STARTUP_VERSION  # no swap under a running inference
        release.set()
        assert done.acquire(timeout=10)
        assert not worker.request()  # no observation newer than the one used
        worker.offer(observation(0.5))  # older than the kept one: ignored
        worker.offer(observation(2.0))
        assert not worker.request(not_before=2.5)  # before a handback: not worth running
        deadline = threading.Event()
        while worker.busy and not deadline.wait(0.01):
            pass
        assert worker.request()
        assert done.acquire(timeout=10)
    finally:
        worker.stop()
    assert events == ['chunk 1:sft', 'swap 2', 'chunk 2'], events
    assert [r.observation.stamp for r in results] == [1.0, 2.0]
    assert all(r.accepted for r in results)


def test_worker_reports_errors_and_keeps_running(checkpoints):
    runtime = runtime_with(checkpoints[0] / 'sft')
    errors, results = [], []
    got = threading.Semaphore(0)
    worker = InferenceWorker(runtime, lambda r: (results.append(r), got.release()),
                             lambda exc: (errors.append(exc), got.release()))
    worker.start()
    try:
        worker.offer(observation(1.0, views=3))
        assert worker.request() and got.acquire(timeout=10)
        worker.offer(observation(2.0))
        while not worker.request():
            pass
        assert got.acquire(timeout=10)
    finally:
        worker.stop()
    assert 'camera image' in str(errors[0]) and len(results) == 1
    assert runtime.counters['inference_errors'] == 1


def test_status_is_json_serialisable(checkpoints):
    runtime = runtime_with(checkpoints[0] / 'sft')
    status = json.loads(json.dumps(runtime.status()))
    assert status['active_version'] == '1:sft' and status['active_number'] == 1


def test_without_a_startup_checkpoint_the_first_update_starts_acting(checkpoints):
    root, shas = checkpoints
    runtime = new_runtime()
    assert runtime.infer(observation(1.0)) is None  # nothing to act with yet
    assert runtime.status()['active_version'] is None
    offer(runtime, 2, shas['v2'], str(root / 'v2'))
    assert runtime.swap_if_pending().version == PolicyVersion(2)
    assert runtime.infer(observation(2.0)).version == PolicyVersion(2)


def write_lerobot_act_folder(folder: Path, state_dim: int = 14, action_dim: int = 14,
                             cameras: int = 1) -> Path:
    """Write a small LeRobot ACT folder (LeRobot's file layout) of the given robot interface."""
    from habc_policy.models.lerobot_act import (
        LeRobotACT,
        LeRobotACTConfig,
        reproducible_weights,
        write_lerobot_act,
    )

    config = LeRobotACTConfig(
        state_dim=state_dim, action_dim=action_dim, image_size=32, chunk_size=10,
        n_action_steps=10, camera_names=[f'observation.images.cam{i}' for i in range(cameras)],
        dim_model=16, n_heads=2, dim_feedforward=32, n_encoder_layers=1, n_decoder_layers=1,
        latent_dim=4, n_vae_encoder_layers=1)
    write_lerobot_act(folder, config, reproducible_weights(LeRobotACT(config).model), {})
    return folder


def test_a_lerobot_checkpoint_that_does_not_fit_the_robot_is_refused(checkpoints, tmp_path):
    root, _ = checkpoints
    six_joints = write_lerobot_act_folder(tmp_path / 'six_joints', state_dim=6, action_dim=6)
    two_cameras = write_lerobot_act_folder(tmp_path / 'two_cameras', cameras=2)
    fits = write_lerobot_act_folder(tmp_path / 'fits')
    # At start-up the joint_names parameter is what the robot is: the node stops with this.
    strict = new_runtime(joint_names=JOINTS)
    with pytest.raises(WeightsError) as refused:
        strict.load_startup(f'lerobot:{six_joints}')
    assert 'does not fit the robot' in str(refused.value)
    assert ('state_dim: the checkpoint has 6, the robot 14 joints in parameter joint_names'
            in str(refused.value))
    assert 'action_dim: the checkpoint has 6, the robot 14' in str(refused.value)
    assert strict.active is None
    assert strict.load_startup(f'lerobot:{fits}').policy.config.state_dim == 14

    # Without joint_names, the observations say what the robot is; a hot swap that does not
    # fit them is refused with both sides on the status, and the old version goes on acting.
    runtime = runtime_with(root / 'sft')
    assert runtime.infer(observation(1.0)).version == STARTUP_VERSION
    for folder, expected in [
            (two_cameras, 'num_views: the checkpoint has 2, the robot 1 camera images in its '
                          'observations'),
            (six_joints, 'state_dim: the checkpoint has 6, the robot 14 joints in its '
                         'observations')]:
        with pytest.raises(WeightsError, match='does not fit the robot'):
            offer_uri(runtime, f'lerobot:{folder}', weights_sha(folder), version=2)
        status = runtime.status()
        assert status['last_update']['result'] == 'rejected'
        assert expected in status['last_update']['reason'], status['last_update']['reason']
        assert status['staged_version'] is None
        assert runtime.infer(observation(2.0)).version == STARTUP_VERSION
    # A LeRobot folder that fits is taken, under its own version text.
    loaded = offer_uri(runtime, str(fits), weights_sha(fits), version=2)
    assert runtime.swap_if_pending() is loaded
    assert runtime.infer(observation(3.0)).actions.shape == (10, 14)


def test_images_are_scaled_to_the_checkpoints_camera_and_never_stretched(tmp_path):
    from habc_policy.models.lerobot_act import read_lerobot_config

    folder = write_lerobot_act_folder(tmp_path / 'wide')
    config = json.loads((folder / 'config.json').read_text())
    config['input_features']['observation.images.cam0']['shape'] = [3, 30, 40]
    (folder / 'config.json').write_text(json.dumps(config))
    assert read_lerobot_config(folder).image_shape == (30, 40)
    runtime = runtime_with(folder)
    # The checkpoint saw 4:3 images (30 x 40): a 60 x 80 camera is scaled to that size.
    inputs = runtime.model_input(runtime.active.policy, observation(1.0, shape=(60, 80)))
    assert inputs['images'].shape == (1, 30, 40, 3)
    assert runtime.infer(observation(2.0, shape=(60, 80))).actions.shape == (10, 14)
    assert runtime.status()['mismatch'] is None

    # A square camera would be stretched: the version holds, and the status says why.
    for stamp in (3.0, 4.0):  # checked once, refused on every observation
        with pytest.raises(WeightsError, match='holds'):
            runtime.infer(observation(stamp, size=48))
    mismatch = runtime.status()['mismatch']
    assert ('image size (H, W) of camera 0: the checkpoint was trained on 30 x 40 (H/W 0.75), '
            'the robot sends 48 x 48 (H/W 1.00)') in mismatch, mismatch
    assert runtime.status()['active_version'] == '1:lerobot-wide'
    # The robot's camera back at 4:3: the same version acts again.
    assert runtime.infer(observation(5.0, shape=(30, 40))).actions.shape == (10, 14)
    assert runtime.status()['mismatch'] is None

    # Once the robot's cameras are known, a hot swap that does not fit them is refused.
    square = write_lerobot_act_folder(tmp_path / 'square')
    with pytest.raises(WeightsError, match='trained on 32 x 32'):
        offer_uri(runtime, str(square), weights_sha(square), version=2)
    assert runtime.status()['staged_version'] is None


def test_a_habc_checkpoint_records_its_camera_shape_and_is_checked_by_it(tmp_path):
    # Trained on 4:3 cameras squeezed to 32 x 32; an old checkpoint without it takes any.
    make_checkpoint(tmp_path / 'recorded', 'sft', 0, camera_shape=[480, 640])
    runtime = runtime_with(tmp_path / 'recorded')
    assert runtime.infer(observation(1.0, shape=(240, 320))).actions.shape == (10, 14)
    with pytest.raises(WeightsError, match='trained on 480 x 640'):
        runtime.infer(observation(2.0, size=64))
    make_checkpoint(tmp_path / 'unrecorded', 'sft', 0)
    runtime = runtime_with(tmp_path / 'unrecorded')
    assert runtime.infer(observation(1.0, shape=(240, 320))).actions.shape == (10, 14)
    with pytest.raises(ValueError, match=r'camera_shape must be \[\] or \[height, width\]'):
        tiny_config(camera_shape=[480])


def test_a_version_that_acts_with_nan_goes_back_to_the_previous_one(checkpoints, tmp_path):
    root, _ = checkpoints
    # Finite on the warm-up input (a zero state), NaN on a real one: it passes the load.
    torch.manual_seed(1)
    policy = SmallVLA(tiny_config())
    policy.version = '2'
    with torch.no_grad():
        policy.state_project.weight.fill_(3e38)
    sha = policy.save(tmp_path / 'overflows')
    runtime = runtime_with(root / 'sft')
    assert runtime.infer(observation(1.0)).version == STARTUP_VERSION
    offer(runtime, 2, sha, str(tmp_path / 'overflows'))
    runtime.swap_if_pending()
    with pytest.raises(WeightsError, match=r'version 2 produced non-finite actions \(NaN or '
                                           r'inf\); back to version 1:sft'):
        runtime.infer(observation(2.0))
    status = runtime.status()
    assert status['active_version'] == '1:sft' and status['counters']['chunks_nonfinite'] == 1
    assert status['last_update']['result'] == 'rejected'
    assert runtime.executor.staged_version == STARTUP_VERSION
    assert runtime.infer(observation(3.0)).version == STARTUP_VERSION  # the old one acts
    # The same update again is not taken a second time.
    with pytest.raises(WeightsError, match='version 2 is not newer than 2'):
        offer(runtime, 2, sha, str(tmp_path / 'overflows'))

    # Weights that are NaN on any input are refused at the load, before they act.
    with torch.no_grad():
        policy.state_project.bias.fill_(float('nan'))
    policy.version = '3'
    sha = policy.save(tmp_path / 'nan')
    with pytest.raises(WeightsError, match='warm-up inference gave non-finite actions'):
        offer(runtime, 3, sha, str(tmp_path / 'nan'))

    # Without an earlier version to go back to, the broken one holds: no chunk is queued.
    broken = runtime_with(tmp_path / 'overflows')
    with pytest.raises(WeightsError, match='no earlier version to return to: holding'):
        broken.infer(observation(4.0))
    assert broken.executor.next_action(4.0 + PERIOD) is None


@pytest.mark.parametrize('case', ['pickle', 'torch_zip', 'unknown_key', 'tensor_count',
                                  'huge_header', 'not_json_config', 'config_list'])
def test_checkpoints_are_safetensors_of_sane_size_with_known_keys(checkpoints, tmp_path,
                                                                   case):
    import struct

    root, _ = checkpoints
    folder = tmp_path / 'bad'
    make_checkpoint(folder, '2', 1)
    weights, config = folder / 'model.safetensors', folder / 'config.json'
    expected = {'pickle': 'is a pickle / torch.save file, not safetensors',
                'torch_zip': 'is a pickle / torch.save file, not safetensors',
                'unknown_key': "unknown small_vla config key(s) ['run_me']",
                'tensor_count': '100001 tensors (more than 100000)',
                'huge_header': 'safetensors header of 1099511627776 bytes',
                'not_json_config': 'not valid JSON',
                'config_list': 'expected a JSON object, got list'}[case]
    if case == 'pickle':
        import pickle
        weights.write_bytes(pickle.dumps({'w': [1.0, 2.0]}, protocol=4))
    elif case == 'torch_zip':
        torch.save({'w': torch.zeros(2)}, weights)
    elif case == 'unknown_key':
        meta = json.loads(config.read_text())
        meta['config']['run_me'] = 'os.system'
        config.write_text(json.dumps(meta))
    elif case == 'tensor_count':
        header = json.dumps({f't{i}': {'dtype': 'F32', 'shape': [0], 'data_offsets': [0, 0]}
                             for i in range(100_001)}).encode()
        weights.write_bytes(struct.pack('<Q', len(header)) + header)
    elif case == 'huge_header':
        weights.write_bytes(struct.pack('<Q', 2**40) + b'{}')
    elif case == 'not_json_config':
        config.write_bytes(b'\xff\xfe{')
    else:
        config.write_text('[1, 2]')
    from habc_policy.models.base import sha256_file
    runtime = runtime_with(root / 'sft')
    with pytest.raises(WeightsError, match=re.escape(expected)):
        offer(runtime, 2, sha256_file(weights), str(folder))
    assert expected in runtime.status()['last_update']['reason']
    assert runtime.infer(observation(1.0)).version == STARTUP_VERSION


def test_a_safetensors_header_length_that_starts_like_a_pickle_is_not_a_pickle(tmp_path):
    # 128 = 0x80, a pickle's first byte: found when a LeRobot fixture was refused.
    import struct

    from habc_policy.models.base import check_weights_file

    header = b'{"__metadata__":{"a":"b"}}'
    header += b' ' * (128 - len(header))
    path = tmp_path / 'model.safetensors'
    path.write_bytes(struct.pack('<Q', 128) + header)
    check_weights_file(path)


def test_realtime_chunking_guides_each_chunk_with_the_plan_and_the_measured_delay(tmp_path):
    from habc_policy.models.lowdim import LowDimFlowConfig, LowDimFlowPolicy

    torch.manual_seed(0)
    flow = LowDimFlowPolicy(LowDimFlowConfig(state_dim=14, action_dim=14, horizon=10,
                                             hidden_dim=32, feature_dim=16, num_layers=1))
    flow.version = 'sft'
    flow.save(tmp_path / 'flow')
    runtime = runtime_with(tmp_path / 'flow', gate=gate(), realtime_chunking=True,
                           max_guidance=7.0)
    assert runtime.status()['realtime_chunking'] == 'on'
    calls = []
    policy = runtime.active.policy
    predict = policy.predict_action_chunk

    def recorded(observation, prefix=None, delay=0, **kwargs):
        calls.append((None if prefix is None else prefix.copy(), delay, kwargs))
        return predict(observation, prefix=prefix, delay=delay, **kwargs)
    policy.predict_action_chunk = recorded

    first = runtime.infer(observation(100.0))  # nothing planned yet: sampled freely
    assert calls == [] and runtime.counters['guided_chunks'] == 0
    runtime.executor.next_action(100.0 + PERIOD)  # the robot runs the first action
    second = runtime.infer(observation(100.0 + PERIOD))  # guided, no delay measured yet
    np.testing.assert_allclose(calls[0][0], first.actions[1:])
    assert calls[0][1] == 0
    # The second chunk starts executing 2 ticks after its first due time: delay 2.
    runtime.executor.next_action(100.0 + 4 * PERIOD)
    assert runtime.executor.delay_steps == 2
    result = runtime.infer(observation(100.0 + 4 * PERIOD))
    prefix, delay, kwargs = calls[1]
    # The prefix is the plan from the new chunk's first due time (100.10): the second
    # chunk (first due 100.04) from its step 3 on; the first 2 actions are committed.
    np.testing.assert_allclose(prefix, second.actions[3:])
    assert delay == 2 and kwargs == {'max_guidance': 7.0}
    assert result.accepted and runtime.counters['guided_chunks'] == 2

    # A policy that cannot take a prefix (the L2 VLA) is sampled as before, and says so.
    assert runtime_with(tmp_path / 'flow', gate=gate()).status()['realtime_chunking'] == 'off'
    make_checkpoint(tmp_path / 'vla', 'sft', 0)
    plain = runtime_with(tmp_path / 'vla', gate=gate(), realtime_chunking=True)
    assert plain.status()['realtime_chunking'].startswith('ignored: SmallVLA')
    plain.infer(observation(100.0))
    plain.infer(observation(100.06))
    assert plain.counters['guided_chunks'] == 0
    with pytest.raises(ValueError, match="realtime_chunking needs mode 'receding'"):
        PolicyNodeParams(realtime_chunking=True, mode='ensemble', min_remaining_steps=20)


def test_a_chunk_is_late_only_after_a_tick_without_an_action(checkpoints):
    runtime = runtime_with(checkpoints[0] / 'sft', clock=lambda: clock[0])
    clock = [100.0 + PERIOD]
    first = runtime.infer(observation(100.0))
    assert (first.late, first.skipped) == (False, 0)
    for k in range(1, 11):  # the whole plan of 10 actions runs
        assert runtime.executor.next_action(100.0 + k * PERIOD) is not None
    # The next chunk lands between two ticks, the last queued action already used: no tick
    # went without an action, so it is not late.
    clock[0] = 100.0 + 10.5 * PERIOD
    second = runtime.infer(observation(100.0 + 9 * PERIOD))
    assert second.accepted and not second.late
    assert second.skipped == runtime.executor.past_due(second.start_time, 10, clock[0])
    for k in range(11, 21):
        runtime.executor.next_action(100.0 + k * PERIOD)
    assert runtime.executor.next_action(100.0 + 22 * PERIOD) is None  # a tick without one
    clock[0] = 100.0 + 22.5 * PERIOD
    third = runtime.infer(observation(100.0 + 22 * PERIOD))
    assert third.late and third.skipped == 0


def test_the_critic_trained_with_a_checkpoint_is_loaded_and_estimates_viability(tmp_path):
    from safetensors.torch import save_file

    from habc_policy.models.critic import CRITIC_FILE, DualHeadCritic

    make_checkpoint(tmp_path / 'v', 'sft', 0)
    policy = load_policy(tmp_path / 'v')
    torch.manual_seed(1)
    critic = DualHeadCritic(policy.feature_dim, hidden_dim=16, num_layers=2, value_scale=50.0)
    save_file({k: v.contiguous() for k, v in critic.state_dict().items()},
              str(tmp_path / 'v' / CRITIC_FILE))
    (tmp_path / 'v' / 'metrics.json').write_text(
        json.dumps({'method': {'efficiency_scale': 50.0}}))
    runtime = runtime_with(tmp_path / 'v', gate=gate())
    assert runtime.status()['critic'] == 'ok'
    obs = observation(100.0)
    result = runtime.infer(obs)
    # p_v is the trained critic on the policy's own features, as the learner computes it.
    inputs = runtime.model_input(runtime.active.policy, obs)
    batch = {k: [v] if isinstance(v, str) else torch.as_tensor(np.asarray(v))[None]
             for k, v in inputs.items()}
    with torch.no_grad():
        z_v, v_e = critic(runtime.active.policy.encode(batch))
    assert result.viability == pytest.approx(float(torch.sigmoid(z_v[0])), abs=1e-5)
    assert result.efficiency_value == pytest.approx(float(v_e[0]), abs=1e-3)


@pytest.mark.parametrize('case', ['missing', 'other_shape', 'not_habc', 'damaged'])
def test_a_checkpoint_without_a_usable_critic_acts_and_says_why(tmp_path, case):
    from safetensors.torch import save_file

    from habc_policy.models.critic import CRITIC_FILE, DualHeadCritic

    make_checkpoint(tmp_path / 'v', 'sft', 0)
    path = tmp_path / 'v' / CRITIC_FILE
    if case == 'other_shape':
        save_file(DualHeadCritic(7, 16, 1).state_dict(), str(path))
    elif case == 'not_habc':
        save_file({'trunk.0.weight': torch.zeros(4, 4), 'head.weight': torch.zeros(1, 4)},
                  str(path))
    elif case == 'damaged':
        path.write_bytes(b'\x00' * 20)
    runtime = runtime_with(tmp_path / 'v', gate=gate())
    problem = runtime.status()['critic']
    expected = {'missing': 'no critic.safetensors', 'other_shape': 'features of size 7',
                'not_habc': 'not a HABC dual-head critic', 'damaged': 'unreadable'}[case]
    assert expected in problem
    result = runtime.infer(observation(100.0))
    assert result.accepted and math.isnan(result.viability)


def test_the_signature_covers_the_critic_and_calibration_beside_the_weights(tmp_path):
    from safetensors.torch import save_file

    from habc_policy.help_calibration import CALIBRATION_FILE
    from habc_policy.models.critic import CRITIC_FILE, DualHeadCritic

    make_checkpoint(tmp_path / 'sft', 'sft', 0)
    sha = make_checkpoint(tmp_path / 'v2', '2', 1)
    feature_dim = load_policy(tmp_path / 'v2').feature_dim
    save_file(DualHeadCritic(feature_dim, 8, 1).state_dict(), str(tmp_path / 'v2' / CRITIC_FILE))
    uri = str(tmp_path / 'v2')
    signer = TRUST['trusted']

    def update(digest: str, signed_digest: str | None = None):
        signature = signer.sign(UpdateClaim(2, sha, uri, 'habc', signed_digest
                                            if signed_digest is not None else digest))
        runtime = runtime_with(tmp_path / 'sft')
        return runtime.offer_update(2, sha, uri, b'', 'safetensors', 'habc', signer.key_id,
                                    signature, digest)

    # Signed as the learner signs: weights, critic and all.
    signed = companions_digest(tmp_path / 'v2')
    assert update(signed).critic is not None
    # Signed over the weights alone (an older signer): the actor loads, the critic does not.
    loaded = update('')
    assert loaded.critic is None and 'not the ones the update signed' in loaded.critic_problem
    # Calibrated after it was signed: the weights still act, without help requests.
    (tmp_path / 'v2' / CALIBRATION_FILE).write_text('{}')
    loaded = update(signed)
    assert loaded.critic is None and 'habc keys sign' in loaded.critic_problem
    # A digest other than the signed one is a signature that does not match: refused.
    with pytest.raises(WeightsError, match='does not match'):
        update(companions_digest(tmp_path / 'v2'), signed_digest=signed)
    # Signed again with the calibration: both go live (the calibration here is malformed,
    # which the status reports, and the critic still raises with the parameter threshold).
    loaded = update(companions_digest(tmp_path / 'v2'))
    assert loaded.critic is not None and loaded.help_calibration is None
    assert 'not a help calibration' in loaded.help_calibration_problem
