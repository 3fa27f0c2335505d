"""Episode bags: habc types with rosidl's hashes, round trips, raw CDR, crash recovery."""

import dataclasses
import json
from pathlib import Path
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from rosbags.rosbag2 import Reader, WriterError
from rosbags.typesys import get_types_from_msg

from habc_episodes.bag_format import (
    EpisodeBagWriter,
    habc_msg_dir,
    habc_typestore,
    read_episode_messages,
)
from habc_episodes.recovery import recover_bag

HABC_TYPES = ('ActionChunk', 'EpisodeEvent', 'ExecutedAction', 'HelpRequest',
              'InterventionState', 'Observation', 'PolicyCommand', 'PolicyUpdate')


@pytest.fixture(scope='module')
def store():
    return habc_typestore()


def plain(value):
    """Turn a rosbags or rclpy message into nested dicts and lists, for comparisons."""
    if dataclasses.is_dataclass(value):  # rosbags message
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.name != '__msgtype__' and not f.name.isupper()}
    if hasattr(value, 'get_fields_and_field_types'):  # rclpy message
        return {name: plain(getattr(value, name)) for name in value.get_fields_and_field_types()}
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)) or type(value).__name__ == 'array':
        return [plain(item) for item in value]
    if isinstance(value, (bytes, bytearray)):
        return list(value)
    return value


def stamp(store, sec, nanosec=0, frame_id=''):
    time_type = store.types['builtin_interfaces/msg/Time']
    return store.types['std_msgs/msg/Header'](stamp=time_type(sec=sec, nanosec=nanosec),
                                              frame_id=frame_id)


def sample_messages(store, k=0):
    """One rosbags message per recorded type, with non-default values that depend on k."""
    t = store.types
    image = [t['sensor_msgs/msg/Image'](
        header=stamp(store, 10 + k, 5, f'camera_{c}'), height=2, width=3, encoding='rgb8',
        is_bigendian=0, step=9, data=np.arange(18, dtype=np.uint8) + c + k) for c in range(2)]
    joints = t['sensor_msgs/msg/JointState'](
        header=stamp(store, 10 + k, 6), name=['left_waist', 'left_gripper'],
        position=np.array([0.5 + k, -0.25]), velocity=np.array([0.01, 0.02]),
        effort=np.array([], dtype=np.float64))
    return {
        '/habc/intervention': t['habc_msgs/msg/InterventionState'](
            header=stamp(store, k, 1, 'tick'), active=bool(k % 2), source=k % 3,
            segment_id=k, episode_id='ep-0001', reason='pedal'),
        '/habc/executed_action': t['habc_msgs/msg/ExecutedAction'](
            header=stamp(store, k, 2), source=1, segment_id=k, episode_id='ep-0001',
            policy_version='v7', joint_names=['a', 'b'], positions=np.array([0.1 * k, -0.3])),
        '/habc/action_chunk': t['habc_msgs/msg/ActionChunk'](
            header=stamp(store, k, 3), policy_version='v7', chunk_id=2**40 + k, horizon=2,
            action_dim=2, joint_names=['a', 'b'], dt=0.02,
            actions=np.array([0.5, -1.0, 0.25, 0.125 * k], dtype=np.float32),
            skipped_steps=k, late=bool(k % 2), inference_s=0.03125 * k, turnaround_s=0.0625,
            viability=0.5, efficiency_value=-3.0 * k),
        '/habc/observation': t['habc_msgs/msg/Observation'](
            header=stamp(store, 10 + k, 5), images=image, joint_state=joints,
            instruction='transfer the cube'),
        '/joint_states': joints,
    }


def write_samples(writer, store, count, start_ns=1_000_000_000):
    """Add the sample topics (once) and write `count` rounds; return what was written."""
    written = []
    for k in range(count):
        for topic, message in sample_messages(store, k).items():
            if topic not in writer.topics:
                writer.add_topic(topic, message.__msgtype__)
            timestamp = start_ns + 1000 * k
            writer.write(topic, timestamp, message)
            written.append((topic, timestamp, plain(message)))
    return written


def read_plain(path, topics=None):
    return [(topic, ts, plain(msg)) for topic, ts, msg in read_episode_messages(path, topics)]


def test_typestore_has_every_habc_message(store):
    names = {p.stem for p in habc_msg_dir().glob('*.msg')}
    assert names == set(HABC_TYPES)
    for name in HABC_TYPES:
        assert f'habc_msgs/msg/{name}' in store.fielddefs
    assert 'sensor_msgs/msg/Image' in store.fielddefs  # the Jazzy types are there too


def test_type_hashes_match_the_rosidl_build(store):
    """The hashes equal those rosidl wrote into <share>/msg/<Type>.json at build time."""
    share = pytest.importorskip('ament_index_python.packages')
    try:
        msg_dir = Path(share.get_package_share_directory('habc_msgs')) / 'msg'
    except LookupError:
        pytest.skip('habc_msgs is not built and sourced (. env.sh): no rosidl hashes to check')
    for name in HABC_TYPES:
        description = json.loads((msg_dir / f'{name}.json').read_text())
        hashes = {h['type_name']: h['hash_string'] for h in description['type_hashes']}
        for type_name, expected in hashes.items():  # the type and every type it uses
            assert store.hash_rihs01(type_name) == expected, type_name


def test_type_hashes_match_rclpy_at_run_time(store, ros):
    """The hash the compiled type support hands to the middleware equals the typestore's."""
    from habc_msgs import msg

    node = ros.create_node('bag_io_hash_probe')
    for name in HABC_TYPES:
        node.create_publisher(getattr(msg, name), f'hash_probe/{name}', 1)
        infos = node.get_publishers_info_by_topic(f'hash_probe/{name}')
        assert len(infos) == 1
        assert str(infos[0].topic_type_hash) == store.hash_rihs01(f'habc_msgs/msg/{name}')


def test_messages_round_trip_through_rosbags_reader(tmp_path, store):
    bag = tmp_path / 'episode'
    with EpisodeBagWriter(bag, store, custom_data={'episode_id': 'ep-0001'}) as writer:
        written = write_samples(writer, store, 3)
        assert writer.message_count == 15
    assert (bag / 'metadata.yaml').is_file() and (bag / 'episode.mcap').is_file()

    # Read with the plain rosbags Reader, as any other tool would.
    with Reader(bag) as reader:
        assert reader.message_count == 15
        assert reader.storage.metadata.custom == {'episode_id': 'ep-0001'}
        types = {c.topic: c.msgtype for c in reader.connections}
        assert types['/habc/observation'] == 'habc_msgs/msg/Observation'
        assert types['/joint_states'] == 'sensor_msgs/msg/JointState'
        for conn in reader.connections:
            assert conn.digest == store.hash_rihs01(conn.msgtype)
        raw = [(c.topic, ts, plain(store.deserialize_cdr(data, c.msgtype)))
               for c, ts, data in reader.messages()]
    assert sorted(raw, key=lambda x: (x[1], x[0])) == sorted(written, key=lambda x: (x[1], x[0]))

    back = read_plain(bag)
    assert sorted(back, key=lambda x: (x[1], x[0])) == \
        sorted(written, key=lambda x: (x[1], x[0]))
    observation = next(m for t, _, m in back if t == '/habc/observation')
    assert observation['images'][1]['data'][:3] == [1, 2, 3]
    assert observation['joint_state']['position'] == [0.5, -0.25]
    assert [t for t, _, _ in read_plain(bag, ['/joint_states'])] == ['/joint_states'] * 3
    assert read_plain(bag, ['/not/recorded']) == []


def test_raw_cdr_from_rclpy_deserializes_to_the_same_values(tmp_path, store):
    """What the recorder node does: store the bytes of a raw=True subscription unchanged."""
    pytest.importorskip('rclpy')
    from rclpy.serialization import serialize_message
    from sensor_msgs.msg import Image, JointState

    from habc_msgs import msg
    chunk = msg.ActionChunk(policy_version='v9', chunk_id=7, horizon=2, action_dim=1,
                            joint_names=['x'], dt=0.02, actions=[0.5, -0.125])
    chunk.header.stamp.sec, chunk.header.stamp.nanosec = 12, 345
    intervention = msg.InterventionState(active=True, source=msg.InterventionState.SOURCE_HUMAN,
                                         segment_id=4, episode_id='ep-7', reason='pedal')
    observation = msg.Observation(instruction='insert the peg')
    observation.images = [Image(height=1, width=2, encoding='rgb8', step=6,
                                data=bytes([1, 2, 3, 4, 5, 250]))]
    observation.joint_state = JointState(name=['x', 'y'], position=[0.5, -0.5],
                                         velocity=[0.0, 1.5])
    update = msg.PolicyUpdate(version=3, sha256='ab' * 32, format='safetensors',
                              data=bytes(range(256)))
    # serialize_message pads some messages with junk bytes (JointState(): 44 bytes for 36 of
    # message); the writer must store only the message or rosbags cannot read it back.
    sent = {'/chunk': chunk, '/intervention': intervention, '/observation': observation,
            '/update': update, '/joint_states': JointState()}

    bag = tmp_path / 'raw'
    with EpisodeBagWriter(bag, store) as writer:
        for k, (topic, message) in enumerate(sent.items()):
            package = type(message).__module__.split('.')[0]
            writer.add_topic(topic, f'{package}/msg/{type(message).__name__}')
            writer.write(topic, 100 + k, serialize_message(message))
    with Reader(bag) as reader:  # stored exactly as long as rosbags would serialize it
        for conn, _, data in reader.messages():
            message = store.deserialize_cdr(data, conn.msgtype)
            assert len(data) == len(store.serialize_cdr(message, conn.msgtype)), conn.topic
    back = {topic: value for topic, _, value in read_plain(bag)}
    assert back == {topic: plain(message) for topic, message in sent.items()}
    assert back['/chunk']['header']['stamp'] == {'sec': 12, 'nanosec': 345}
    assert back['/observation']['images'][0]['data'][-1] == 250


def test_writer_rejects_wrong_input(tmp_path, store):
    with EpisodeBagWriter(tmp_path / 'bag', store) as writer:
        writer.add_topic('/iv', 'habc_msgs/msg/InterventionState')
        writer.add_topic('/iv', 'habc_msgs/msg/InterventionState')  # repeating is harmless
        with pytest.raises(ValueError, match='already added with type'):
            writer.add_topic('/iv', 'habc_msgs/msg/ExecutedAction')
        with pytest.raises(ValueError, match='not in the typestore'):
            writer.add_topic('/x', 'habc_msgs/msg/NoSuchType')
        with pytest.raises(KeyError, match='call add_topic'):
            writer.write('/other', 1, b'\x00\x01\x00\x00')
        with pytest.raises(ValueError, match='not CDR'):
            writer.write('/iv', 1, b'{"json": 1}')
        with pytest.raises(ValueError, match='not a habc_msgs/msg/InterventionState'):
            writer.write('/iv', 1, b'\x00\x01\x00\x00\x05')
        with pytest.raises(TypeError, match='has type habc_msgs/msg/InterventionState'):
            writer.write('/iv', 1, sample_messages(store)['/habc/executed_action'])
        with pytest.raises(TypeError, match='serialize_message'):
            writer.write('/iv', 1, {'active': True})
        with pytest.raises(ValueError, match='negative'):
            writer.write('/iv', -1, sample_messages(store)['/habc/intervention'])
        assert writer.message_count == 0
    with pytest.raises(RuntimeError, match='is closed'):
        writer.write('/iv', 1, sample_messages(store)['/habc/intervention'])
    with pytest.raises(WriterError, match='exists already'):
        EpisodeBagWriter(tmp_path / 'bag', store)


_KILLED_WRITER = """
import sys, time
from habc_episodes.bag_format import EpisodeBagWriter, habc_typestore
sys.path.insert(0, sys.argv[1])
from test_bag_format import write_samples
store = habc_typestore()
interval = None if sys.argv[3] == 'none' else float(sys.argv[3])
writer = EpisodeBagWriter(sys.argv[2], store, flush_interval_s=interval)
write_samples(writer, store, 8)
if interval is None:
    writer.flush()
# Written but not flushed (unless the writer flushes on every write).
write_samples(writer, store, 4, start_ns=2_000_000_000)
print('written', flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize('flush_interval', ['none', '0'])
def test_bag_of_a_killed_writer_is_recovered(tmp_path, store, flush_interval):
    bag = tmp_path / 'killed'
    child = subprocess.Popen(
        [sys.executable, '-c', _KILLED_WRITER, str(Path(__file__).parent), str(bag),
         flush_interval], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == 'written'
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        child.kill()
        child.stdout.close()

    # What the crash leaves: an MCAP file without summary or footer and no metadata.yaml.
    assert not (bag / 'metadata.yaml').exists()
    assert (bag / 'killed.mcap').read_bytes()[-8:] != b'\x89MCAP0\r\n'
    with pytest.raises(FileNotFoundError):
        Reader(bag).open()

    report = recover_bag(bag)
    assert report.recovered
    assert report.skipped_topics == () and report.skipped_messages == 0
    back = read_plain(bag)
    assert report.message_count == len(back) == sum(report.topics.values())
    flushed = write_samples(_NullWriter(), store, 8)
    later = write_samples(_NullWriter(), store, 4, start_ns=2_000_000_000)
    if flush_interval == '0':
        assert back == flushed + later  # every write was flushed: nothing is lost
    else:
        assert back[:len(flushed)] == flushed  # at least everything before flush() came back
        assert back[len(flushed):] == later[:len(back) - len(flushed)]
    for topic in ('/habc/intervention', '/habc/observation', '/joint_states'):
        assert report.topics[topic] >= 8
    with Reader(bag) as reader:  # hashes recomputed from the stored schemas equal rosidl's
        assert {c.digest for c in reader.connections} == \
            {store.hash_rihs01(c.msgtype) for c in reader.connections}
    again = recover_bag(bag)  # an intact bag is left alone
    assert not again.recovered and again.message_count == len(back)


class _NullWriter:
    """Stands in for EpisodeBagWriter to compute what write_samples() would write."""

    topics: dict = {}

    def add_topic(self, *_args):
        pass

    def write(self, *_args):
        pass


def _partial_bag(tmp_path, store, name='partial'):
    """Return a bag whose writer flushed after every message and stopped without close()."""
    bag = tmp_path / name
    writer = EpisodeBagWriter(bag, store, flush_interval_s=0.0)
    written = write_samples(writer, store, 4)
    shutil.copytree(bag, tmp_path / f'{name}-copy')  # the state a SIGKILL would leave
    writer.close()
    shutil.rmtree(bag)
    (tmp_path / f'{name}-copy').rename(bag)
    return bag, written


def test_recovery_tolerates_a_file_cut_anywhere(tmp_path, store):
    bag, written = _partial_bag(tmp_path, store)
    data = (bag / 'partial.mcap').read_bytes()
    previous = 0
    for cut in [*range(0, len(data), max(1, len(data) // 60)), len(data)]:
        trial = tmp_path / f'cut{cut}'
        trial.mkdir()
        (trial / f'cut{cut}.mcap').write_bytes(data[:cut])
        if cut < 8:  # not even the magic bytes: not an MCAP file
            with pytest.raises(ValueError, match='not an MCAP file'):
                recover_bag(trial)
            continue
        report = recover_bag(trial)
        back = read_plain(trial)
        assert back == written[:len(back)], f'cut at {cut}: not a prefix of what was written'
        assert len(back) >= previous
        assert 0 <= report.dropped_bytes <= cut - 8
        previous = len(back)
    assert previous == len(written) and report.dropped_bytes == 0

    # A zero-filled tail (a file system may leave one after a power cut) is data loss, not
    # an error.
    zeros = tmp_path / 'zeros'
    zeros.mkdir()
    (zeros / 'zeros.mcap').write_bytes(data + bytes(4096))
    report = recover_bag(zeros)
    assert read_plain(zeros) == written and report.dropped_bytes == 4096


def test_keep_partial_and_a_foreign_file_name(tmp_path, store):
    bag, written = _partial_bag(tmp_path, store)
    (bag / 'partial.mcap').rename(bag / 'partial_0.mcap')  # as rosbag2 names its files
    original = (bag / 'partial_0.mcap').read_bytes()
    report = recover_bag(bag, keep_partial=True)
    assert report.recovered and report.dropped_bytes == 0
    assert (bag / 'partial_0.mcap.partial').read_bytes() == original
    assert sorted(p.name for p in bag.iterdir()) == \
        ['metadata.yaml', 'partial.mcap', 'partial_0.mcap.partial']
    assert read_plain(bag) == written


def test_recovered_bag_is_readable_by_the_mcap_library(tmp_path, store):
    mcap_reader = pytest.importorskip('mcap.reader')
    bag, written = _partial_bag(tmp_path, store)
    recover_bag(bag)
    with (bag / 'partial.mcap').open('rb') as stream:
        reader = mcap_reader.make_reader(stream)
        summary = reader.get_summary()
        assert summary is not None and summary.statistics.message_count == len(written)
        topics = [channel.topic for _, channel, _ in reader.iter_messages(log_time_order=True)]
    assert sorted(topics) == sorted(topic for topic, _, _ in written)


def test_reader_falls_back_to_the_definition_stored_in_the_bag(tmp_path, store):
    """A type unknown to the reading typestore (or changed since) is read with the bag's."""
    custom = habc_typestore()
    custom.register(get_types_from_msg('string name\nfloat64[] values\n',
                                       'habc_test/msg/Sample'))
    sample_type = custom.types['habc_test/msg/Sample']
    bag = tmp_path / 'custom'
    with EpisodeBagWriter(bag, custom) as writer:
        writer.add_topic('/sample', 'habc_test/msg/Sample')
        writer.write('/sample', 5, sample_type(name='one', values=np.array([1.5, 2.5])))
    assert 'habc_test/msg/Sample' not in store.fielddefs
    assert read_plain(bag) == [('/sample', 5, {'name': 'one', 'values': [1.5, 2.5]})]
