"""The loader's fast paths give what the plain ones give.

Zero-copy deserialisation, one-pass image decoding, and loading in worker processes (same
episodes, same order, same skips).
"""

from pathlib import Path

from message_compare import same_message
import numpy as np
import pytest
from rosbags.serde import SerdeError

from habc_episodes.bag_format import deserialize_view
from habc_episodes.dataset import Labeller, load_bags
from habc_episodes.episode_bags import _decode, _image_array, _image_layout, _resize
from habc_episodes.loading import default_workers, SHM_ROOT

ENCODINGS = {'rgb8': 3, 'bgr8': 3, 'rgba8': 4, 'bgra8': 4, 'mono8': 1}


def image(store, height: int, width: int, encoding: str, pad: int = 0, seed: int = 0):
    channels = ENCODINGS[encoding]
    step = width * channels + pad
    data = np.random.default_rng(seed).integers(0, 256, height * step, dtype=np.uint8)
    t = store.types
    return t['sensor_msgs/msg/Image'](
        header=t['std_msgs/msg/Header'](
            stamp=t['builtin_interfaces/msg/Time'](sec=3, nanosec=7), frame_id='cam'),
        height=height, width=width, encoding=encoding, is_bigendian=0, step=step, data=data)


@pytest.mark.parametrize('height,width,encoding,pad', [
    (1, 1, 'rgb8', 0), (5, 7, 'rgb8', 0), (5, 7, 'rgb8', 3), (9, 13, 'bgr8', 1),
    (4, 3, 'rgba8', 0), (6, 5, 'bgra8', 2), (3, 11, 'mono8', 1), (224, 224, 'rgb8', 0)])
def test_zero_copy_deserialisation_equals_rosbags(typestore, height, width, encoding, pad):
    message = image(typestore, height, width, encoding, pad)
    raw = bytes(typestore.serialize_cdr(message, 'sensor_msgs/msg/Image'))
    view = deserialize_view(typestore, raw, 'sensor_msgs/msg/Image')
    same_message(view, typestore.deserialize_cdr(raw, 'sensor_msgs/msg/Image'))
    # The pixels are a view into the message's bytes, not a copy.
    assert np.shares_memory(view.data, np.frombuffer(raw, dtype=np.uint8))
    # Big-endian CDR takes rosbags' other deserializer, with the same result.
    big = bytes(typestore.serialize_cdr(message, 'sensor_msgs/msg/Image', little_endian=False))
    same_message(deserialize_view(typestore, big, 'sensor_msgs/msg/Image'), message)


def test_zero_copy_deserialisation_of_observations_and_compressed_images(typestore, bags):
    observation = bags.observation(bags.SEC, [0.5] * 14, 3, views=2, size=5, pad=1)
    raw = bytes(typestore.serialize_cdr(observation, 'habc_msgs/msg/Observation'))
    same_message(deserialize_view(typestore, raw, 'habc_msgs/msg/Observation'),
                 typestore.deserialize_cdr(raw, 'habc_msgs/msg/Observation'))
    t = typestore.types
    compressed = t['sensor_msgs/msg/CompressedImage'](
        header=t['std_msgs/msg/Header'](stamp=t['builtin_interfaces/msg/Time'](sec=1, nanosec=2),
                                        frame_id=''),
        format='jpeg', data=np.arange(37, dtype=np.uint8))
    raw = bytes(typestore.serialize_cdr(compressed, 'sensor_msgs/msg/CompressedImage'))
    same_message(deserialize_view(typestore, raw, 'sensor_msgs/msg/CompressedImage'),
                 typestore.deserialize_cdr(raw, 'sensor_msgs/msg/CompressedImage'))


def test_zero_copy_deserialisation_refuses_what_rosbags_refuses(typestore):
    raw = bytes(typestore.serialize_cdr(image(typestore, 4, 4, 'rgb8'), 'sensor_msgs/msg/Image'))
    for bad in (raw[:40], b'\x01\x02' + raw[2:], raw + bytes(16)):
        with pytest.raises(SerdeError):
            typestore.deserialize_cdr(bad, 'sensor_msgs/msg/Image')
        with pytest.raises(SerdeError):
            deserialize_view(typestore, bad, 'sensor_msgs/msg/Image')


@pytest.mark.parametrize('encoding', sorted(ENCODINGS))
@pytest.mark.parametrize('height,width,pad', [(8, 8, 0), (7, 13, 2), (224, 224, 0),
                                              (12, 6, 1), (1, 1, 0)])
@pytest.mark.parametrize('size', [None, 1, 3, 4, 6, 96])
def test_one_pass_decoding_equals_decode_then_resize(typestore, encoding, height, width, pad,
                                                     size):
    message = image(typestore, height, width, encoding, pad, seed=height * width)
    expected = _resize(_image_array(message, 'here'), size)
    out = np.full(expected.shape, 77, dtype=np.uint8)
    _decode(_image_layout(message, 'here'), size, out)
    np.testing.assert_array_equal(out, expected)


def test_a_short_image_is_refused_before_anything_is_written(typestore):
    message = image(typestore, 6, 6, 'rgb8')
    message.data = message.data[:-1]
    with pytest.raises(ValueError, match='a 6x6 rgb8 image has step 18 and 107 bytes'):
        _image_layout(message, 'bag x')


def write_bags(root: Path, bags, count: int) -> list[Path]:
    sec, ms = bags.SEC, bags.SEC // 1000
    paths = []
    for i in range(count):
        messages = []
        for k in range(6 + i):
            stamp = sec + 20 * ms * k
            messages.append(('/observation', stamp, bags.observation(
                stamp, [float(i)] * 14, 10 * i + k, views=2, size=8 + i % 2)))
            messages.append(('/executed_action', stamp + 1000, bags.action(
                stamp + 1000, k % 3, [float(i + k)] * 14, episode_id=f'ep{i}')))
        paths.append(bags.write(root / f'ep{i}', messages))
        (root / f'ep{i}' / 'outcome.yaml').write_text('success\n' if i % 2 else 'failure\n')
    return paths


def shm_folders() -> set[str]:
    return {p.name for p in SHM_ROOT.glob('habc-load-*')} if SHM_ROOT.is_dir() else set()


def test_worker_processes_load_the_same_episodes_in_the_same_order(tmp_path, bags):
    paths = write_bags(tmp_path / 'bags', bags, 6)
    # A damaged bag in the middle, and one that cannot be trained on (no actions).
    mcap = next((paths[2]).glob('*.mcap'))
    mcap.write_bytes(mcap.read_bytes()[:-200])
    bags.write(tmp_path / 'bags' / 'ep3b', [('/observation', bags.SEC, bags.observation(
        bags.SEC, [0.0] * 14, 0))])
    (tmp_path / 'bags' / 'ep3b' / 'outcome.yaml').write_text('success\n')
    before = shm_folders()
    results = {workers: load_bags([tmp_path / 'bags'], labeller=Labeller(), image_size=4,
                                  progress=False, workers=workers) for workers in (1, 2, 3)}
    assert shm_folders() <= before  # every shared file and folder was removed
    one = results[1]
    assert [item.path.name for item in one.loaded] == ['ep0', 'ep1', 'ep3', 'ep4', 'ep5']
    assert [(s.path.name, s.reason) for s in one.skipped] == [('ep2', 'unreadable'),
                                                             ('ep3b', 'unusable')]
    assert 'recover_bag' in one.skipped[0].message
    assert [results[w].workers for w in (1, 2, 3)] == [1, 2, 3]
    for workers in (2, 3):
        other = results[workers]
        assert [s.__dict__ for s in other.skipped] == [s.__dict__ for s in one.skipped]
        assert [item.path for item in other.loaded] == [item.path for item in one.loaded]
        for a, b in zip(one.loaded, other.loaded, strict=True):
            assert a.label == b.label and a.size_bytes == b.size_bytes
            x, y = a.episode, b.episode
            assert (x.episode_id, x.outcome, x.kind, x.instruction, x.policy_versions,
                    x.camera_shapes) == (y.episode_id, y.outcome, y.kind, y.instruction,
                                         y.policy_versions, y.camera_shapes)
            for name in ('actions', 'controllers', 'timestamps'):
                np.testing.assert_array_equal(getattr(x, name), getattr(y, name))
            assert x.observations.keys() == y.observations.keys()
            for name, array in x.observations.items():
                other_array = y.observations[name]
                assert array.dtype == other_array.dtype
                np.testing.assert_array_equal(array, other_array)
    # Images that came through shared memory are ordinary writable arrays of this process.
    images = results[2].loaded[0].episode.observations['images']
    assert images.shape == (6, 2, 4, 4, 3) and images.flags.writeable
    images[0, 0, 0, 0, 0] = 1


def test_the_default_number_of_workers():
    assert default_workers(1) == 1
    assert default_workers(100, size_bytes=10 << 20) == 1  # small: not worth a process
    assert 1 <= default_workers(100) <= 8
    with pytest.raises(ValueError, match='workers must be >= 1'):
        load_bags([], workers=0)
