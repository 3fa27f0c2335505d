"""The loader's lean MCAP reader and fast CDR parser give what rosbags gives.

mcap_lean.chunk_messages() against rosbags' Reader.messages() (same topics, log times and
bytes, in the same order) on our bags and on `ros2 bag record`-like bags with several chunk
sizes, out-of-order and equal log times; what it leaves to rosbags (compressed chunks,
unindexed files) and how damaged files fail. cdr_fast.FastParser against rosbags'
deserializer on the message types it parses, and what it refuses.
"""

from pathlib import Path
import random

from message_compare import same_message
import numpy as np
import pytest
from rosbags.rosbag2 import Reader, ReaderError

from habc_episodes.bag_format import deserialize_view, read_messages
from habc_episodes.cdr_fast import FastParser
from habc_episodes.episode_bags import BagReadError, episode_from_bag, TopicMapping
from habc_episodes.mcap_lean import chunk_messages, COPY_BELOW

SEC = 1_000_000_000
MAPPING = TopicMapping(cameras=('/cam/image',), joint_states='/joint_states',
                       command='/commands')


def image(typestore, height: int, width: int, pad: int):
    step = width * 3 + pad
    t = typestore.types
    return t['sensor_msgs/msg/Image'](
        header=t['std_msgs/msg/Header'](
            stamp=t['builtin_interfaces/msg/Time'](sec=3, nanosec=7), frame_id='cam'),
        height=height, width=width, encoding='bgr8', is_bigendian=0, step=step,
        data=np.random.default_rng(height).integers(0, 256, height * step, dtype=np.uint8))


def write_foreign(path: Path, typestore, *, chunk_size: int = 1 << 20,
                  compression: str = 'none', chunking: bool = True, steps: int = 40,
                  shuffle: bool = False, size: int = 150, cameras: int = 1,
                  changing_names: bool = True) -> Path:
    """Write a standard-topics MCAP as the mcap tools do (no metadata.yaml); return it."""
    from mcap.writer import CompressionType, Writer

    t = typestore.types
    items = []
    for k in range(steps):
        stamp = SEC + k * SEC // 50
        header = t['std_msgs/msg/Header'](stamp=t['builtin_interfaces/msg/Time'](
            sec=stamp // SEC, nanosec=stamp % SEC), frame_id='f')
        for half in range(2):
            # The names change: the state is complete from the second tick on.
            names = [f'joint{i}' for i in range(7 if k % 5 or not changing_names else 6)]
            items.append(('/joint_states', t['sensor_msgs/msg/JointState'](
                header=header, name=names, position=np.full(len(names), 0.1 * k + half),
                velocity=np.zeros(0), effort=np.full(k % 3, 0.5)), stamp + half * 1000))
        for camera in range(cameras):
            data = (np.arange(size * size * 3) * (camera + 1) + k).astype(np.uint8)
            items.append((f'/cam{camera or ""}/image', t['sensor_msgs/msg/Image'](
                header=header, height=size, width=size, encoding='rgb8', is_bigendian=0,
                step=size * 3, data=data), stamp + 2000))
        # Commands share their log time with the joint state before them.
        items.append(('/commands', t['std_msgs/msg/Float64MultiArray'](
            layout=t['std_msgs/msg/MultiArrayLayout'](dim=[], data_offset=0),
            data=np.full(7, 0.01 * k)), stamp))
    if shuffle:  # out of time order in the file: chunks overlap in time
        random.Random(7).shuffle(items)
    if not chunking:  # rosbags reads unindexed messages only in time order
        items.sort(key=lambda item: item[2])
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open('wb') as stream:
        writer = Writer(stream, chunk_size=chunk_size, use_chunking=chunking,
                        compression=getattr(CompressionType, compression.upper()))
        writer.start(profile='ros2', library='test')
        channels = {}
        for topic, message, _ in items:
            if topic not in channels:
                definition, _ = typestore.generate_msgdef(message.__msgtype__, ros_version=2)
                schema = writer.register_schema(message.__msgtype__, 'ros2msg',
                                                definition.encode())
                channels[topic] = writer.register_channel(topic, 'cdr', schema)
        for topic, message, log_time in items:
            writer.add_message(channels[topic], log_time, bytes(typestore.serialize_cdr(
                message, message.__msgtype__)), log_time)
        writer.finish()
    return path


def rosbags_messages(path: Path) -> list[tuple[str, int, bytes]]:
    with Reader(path) as reader:
        return [(c.topic, t, bytes(d)) for c, t, d in reader.messages()]


def lean_messages(path: Path) -> list[tuple[str, int, bytes]] | None:
    with Reader(path) as reader:
        messages = chunk_messages(reader, reader.connections)
        if messages is None:
            return None
        return [(c.topic, t, bytes(d)) for c, t, d in messages]


def write_ours(path: Path, bags, steps: int = 12, flush_every: int = 0) -> Path:
    messages = []
    for k in range(steps):
        stamp = bags.SEC + 20_000_000 * k
        messages.append(('/observation', stamp, bags.observation(
            stamp, [0.1 * k] * 14, k, views=2, size=60 if k % 2 else 8, pad=k % 3)))
        messages.append(('/executed_action', stamp + 1000, bags.action(
            stamp + 1000, k % 3, [0.2 * k] * 14, episode_id='ep')))
    return bags.write(path, messages)


def test_our_bags_read_the_same(tmp_path, bags):
    path = write_ours(tmp_path / 'ours', bags)
    lean = lean_messages(path)
    assert lean is not None and len(lean) == 24
    assert lean == rosbags_messages(path)


def test_our_flushed_bags_read_the_same(tmp_path, typestore, bags):
    # flush() closes a chunk per call: many small chunks, as a recorder that flushes often.
    from habc_episodes.bag_format import EpisodeBagWriter
    path = tmp_path / 'flushed'
    with EpisodeBagWriter(path, typestore, flush_interval_s=None) as writer:
        writer.add_topic('/observation', 'habc_msgs/msg/Observation')
        writer.add_topic('/executed_action', 'habc_msgs/msg/ExecutedAction')
        for k in range(9):
            stamp = SEC + 20_000_000 * k
            writer.write('/executed_action', stamp + 1000,
                         bags.action(stamp + 1000, 0, [float(k)] * 3))
            writer.write('/observation', stamp, bags.observation(stamp, [0.0] * 3, k))
            if k % 2:
                writer.flush()
    lean = lean_messages(path)
    assert lean is not None and len(lean) == 18
    assert lean == rosbags_messages(path)


@pytest.mark.parametrize('chunk_size', [1, 4000, 200_000, 1 << 20])
@pytest.mark.parametrize('shuffle', [False, True])
def test_foreign_bags_read_the_same(tmp_path, typestore, chunk_size, shuffle):
    path = write_foreign(tmp_path / 'foreign.mcap', typestore, chunk_size=chunk_size,
                         shuffle=shuffle)
    lean = lean_messages(path)
    assert lean is not None and len(lean) == 160
    assert lean == rosbags_messages(path)
    times = [t for _, t, _ in lean]
    assert times == sorted(times)


def test_small_messages_are_copied_and_big_ones_are_views(tmp_path, typestore):
    path = write_foreign(tmp_path / 'foreign.mcap', typestore, size=150)
    with Reader(path) as reader:
        kinds = {(c.topic, type(d)) for c, _, d in chunk_messages(reader, reader.connections)}
    assert 150 * 150 * 3 >= COPY_BELOW
    assert kinds == {('/joint_states', bytes), ('/commands', bytes),
                     ('/cam/image', memoryview)}


def test_a_subset_of_topics_reads_the_same(tmp_path, typestore):
    path = write_foreign(tmp_path / 'foreign.mcap', typestore, chunk_size=4000, shuffle=True)
    with Reader(path) as reader:
        wanted = [c for c in reader.connections if c.topic != '/cam/image']
        lean = [(c.topic, t, bytes(d)) for c, t, d in chunk_messages(reader, wanted)]
        plain = [(c.topic, t, bytes(d)) for c, t, d in reader.messages(connections=wanted)]
    assert lean == plain and len(lean) == 120


@pytest.mark.parametrize('compression', ['zstd', 'lz4'])
def test_compressed_chunks_are_left_to_rosbags(tmp_path, typestore, compression):
    path = write_foreign(tmp_path / 'foreign.mcap', typestore, chunk_size=4000,
                         compression=compression)
    assert lean_messages(path) is None
    # read_messages falls back to rosbags and still gives every message.
    with Reader(path) as reader:
        lean = [(t, s) for t, s, _ in read_messages(reader, lean=True)]
    with Reader(path) as reader:
        plain = [(t, s) for t, s, _ in read_messages(reader)]
    assert lean == plain and len(lean) == 160


def test_unindexed_files_are_left_to_rosbags(tmp_path, typestore):
    path = write_foreign(tmp_path / 'foreign.mcap', typestore, chunking=False)
    assert lean_messages(path) is None
    assert len(rosbags_messages(path)) == 160


def test_read_messages_lean_equals_plain(tmp_path, typestore, bags):
    for path in (write_ours(tmp_path / 'ours', bags),
                 write_foreign(tmp_path / 'foreign.mcap', typestore, chunk_size=4000,
                               shuffle=True)):
        with Reader(path) as reader:
            plain = list(read_messages(reader))
        with Reader(path) as reader:
            lean = list(read_messages(reader, lean=True))
        assert [(t, s) for t, s, _ in lean] == [(t, s) for t, s, _ in plain]
        for (_, _, a), (_, _, b) in zip(lean, plain, strict=True):
            same_message(a, b)


def test_episodes_from_lean_reads_equal_the_rosbags_path(tmp_path, typestore, bags, monkeypatch):
    import habc_episodes.episode_bags as episode_bags
    ours = write_ours(tmp_path / 'ours', bags)
    foreign = write_foreign(tmp_path / 'foreign.mcap', typestore, chunk_size=4000, shuffle=True)
    lean = [episode_from_bag(ours, 'success', image_size=8),
            episode_from_bag(foreign, 'success', image_size=16, topics=MAPPING)]

    def plain(reader, topics, typestore=None, *, lean=False):
        return read_messages(reader, topics, typestore)
    monkeypatch.setattr(episode_bags, 'read_messages', plain)
    expected = [episode_from_bag(ours, 'success', image_size=8),
                episode_from_bag(foreign, 'success', image_size=16, topics=MAPPING)]
    for a, b in zip(lean, expected, strict=True):
        assert a.observations.keys() == b.observations.keys()
        for key in a.observations:
            np.testing.assert_array_equal(a.observations[key], b.observations[key])
        np.testing.assert_array_equal(a.actions, b.actions)
        np.testing.assert_array_equal(a.timestamps, b.timestamps)
        np.testing.assert_array_equal(np.asarray(a.controllers), np.asarray(b.controllers))


def test_a_truncated_bag_gives_the_same_error(tmp_path, bags):
    path = write_ours(tmp_path / 'ours', bags)
    mcap = next(path.glob('*.mcap'))
    data = mcap.read_bytes()
    mcap.write_bytes(data[:len(data) // 2])
    with pytest.raises(BagReadError, match='cut short or damaged') as lean:
        episode_from_bag(path, 'success')
    with pytest.raises(ReaderError) as plain, Reader(path) as reader:
        list(reader.messages())
    assert str(plain.value) in str(lean.value)


def test_a_damaged_chunk_fails_as_in_rosbags(tmp_path, typestore):
    path = write_foreign(tmp_path / 'foreign.mcap', typestore, chunk_size=4000)
    data = bytearray(path.read_bytes())
    # Flip a byte of a message's data in the middle of the file: the chunk's CRC fails.
    index = data.index(b'joint3', len(data) // 2)
    data[index] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ReaderError) as plain:
        rosbags_messages(path)
    with pytest.raises(ReaderError) as lean:
        lean_messages(path)
    assert str(lean.value) == str(plain.value) == 'Chunk checksum mismatch.'
    with pytest.raises(BagReadError, match='Chunk checksum mismatch'):
        episode_from_bag(path, 'success', topics=MAPPING)


# cdr_fast ------------------------------------------------------------------------------------

def fast_equals_rosbags(typestore, parser, message) -> None:
    msgtype = message.__msgtype__
    raw = bytes(typestore.serialize_cdr(message, msgtype))
    fast = parser.parse(raw, msgtype)
    assert fast is not None, msgtype
    same_message(fast, deserialize_view(typestore, raw, msgtype))
    big = bytes(typestore.serialize_cdr(message, msgtype, little_endian=False))
    assert parser.parse(big, msgtype) is None  # big endian: left to rosbags


def joint_state(typestore, names, position, velocity=(), effort=(), frame_id=''):
    t = typestore.types
    return t['sensor_msgs/msg/JointState'](
        header=t['std_msgs/msg/Header'](stamp=t['builtin_interfaces/msg/Time'](
            sec=-3, nanosec=999_999_999), frame_id=frame_id),
        name=list(names), position=np.asarray(position, dtype=np.float64),
        velocity=np.asarray(velocity, dtype=np.float64),
        effort=np.asarray(effort, dtype=np.float64))


def test_fast_parser_equals_rosbags(typestore, bags):
    parser = FastParser(typestore, typestore)
    # Joint names of several lengths (alignment), unicode, empty arrays, repeated and
    # changing name blocks (one of the same length with other bytes).
    for names, frame_id in [(['a', 'bb', 'ccc', 'dddd'], 'x'), (['a', 'bb', 'ccc', 'dddd'], 'xy'),
                            (['a', 'bb', 'ccc', 'dddE'], 'xyz'), ([], ''), (['é'], 'base'),
                            (['a', 'bb', 'ccc', 'dddd'], '')]:
        for arrays in [((), (), ()), ((1.5,) * len(names), (), (2.0,)),
                       ((0.0,) * len(names), (1.0,) * len(names), (3.0,) * len(names))]:
            fast_equals_rosbags(typestore, parser, joint_state(
                typestore, names, *arrays, frame_id=frame_id))
    for k in range(4):
        fast_equals_rosbags(typestore, parser, bags.observation(
            SEC + k, [0.5 * k] * (14 - k), k, views=k, size=3 + k, pad=k % 2,
            instruction='x' * k))
        fast_equals_rosbags(typestore, parser, bags.action(
            SEC + k, k % 3, [0.1] * (5 + k), episode_id='e' * k, policy_version='v' * (k + 1)))
        fast_equals_rosbags(typestore, parser, image(typestore, 3 + k, 5, pad=k))


def test_fast_parser_refuses_what_rosbags_refuses(typestore, bags):
    parser = FastParser(typestore, typestore)
    message = joint_state(typestore, ['a', 'bb'], [1.0, 2.0])
    raw = bytes(typestore.serialize_cdr(message, 'sensor_msgs/msg/JointState'))
    assert parser.parse(raw, 'sensor_msgs/msg/JointState') is not None  # names now known
    end = raw.index(b'bb\x00') + 2
    for bad in (raw[:30], raw[:-8], raw + bytes(16), b'\x01\x02' + raw[2:],
                raw[:end] + b'\x01' + raw[end + 1:]):  # a string without its terminator
        assert parser.parse(bad, 'sensor_msgs/msg/JointState') is None
    assert parser.parse(raw, 'std_msgs/msg/String') is None  # not a type it parses


def test_fast_parser_leaves_other_definitions_to_rosbags(typestore):
    from habc_episodes.bag_format import typestore_from_definition
    other = typestore_from_definition(
        'sensor_msgs/msg/JointState', 'ros2msg',
        'string[] name\nfloat64[] position\n')
    assert FastParser(other, typestore).types == {}


@pytest.mark.parametrize('changing_names', [False, True])
def test_several_cameras_written_into_one_array_equal_each_resized(tmp_path, typestore,
                                                                   changing_names):
    # Every tick takes the next frame of each camera (the array is the result), or the
    # first frames are not used (they are copied out).
    from habc_episodes.episode_bags import _resize
    path = write_foreign(tmp_path / 'foreign.mcap', typestore, cameras=2, size=40,
                         changing_names=changing_names)
    mapping = TopicMapping(cameras=('/cam/image', '/cam1/image'),
                           joint_states='/joint_states', command='/commands')
    resized = episode_from_bag(path, 'success', image_size=16, topics=mapping)
    full = episode_from_bag(path, 'success', topics=mapping)
    images = full.observations['images']
    assert resized.observations['images'].shape == (39 if changing_names else 40, 2, 16, 16, 3)
    for t in range(len(images)):
        for view in range(2):
            np.testing.assert_array_equal(resized.observations['images'][t, view],
                                          _resize(images[t, view], 16))
    assert not np.array_equal(images[:, 0], images[:, 1])
