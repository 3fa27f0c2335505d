"""`habc train`: foreign bags with a topic mapping, damaged and unlabelled bags, label sources."""

import hashlib
import json
from pathlib import Path
import shutil

import numpy as np
import pytest
import yaml

from habc_episodes.bag_format import EpisodeBagWriter
from habc_episodes.dataset import find_bags, Labeller, load_bags
from habc_episodes.episode_bags import BagReadError, episode_from_bag, TopicMapping
from habc_episodes.recovery import recover_bag
from habc_episodes.vocabulary import Controller, Outcome

MS = 1_000_000
T0 = 100_000 * MS  # 100 s
JOINTS = [f'j{i}' for i in range(14)]

# Message definitions as rosbag2 stores them in a bag: the type's .msg text, then each
# dependency after a separator line (what `ros2 bag record` writes into an MCAP schema).
_SEPARATOR = '=' * 80 + '\n'
_HEADER = ('MSG: std_msgs/Header\nbuiltin_interfaces/Time stamp\nstring frame_id\n'
           + _SEPARATOR + 'MSG: builtin_interfaces/Time\nint32 sec\nuint32 nanosec\n')
DEFINITIONS = {
    'sensor_msgs/msg/Image': ('std_msgs/Header header\nuint32 height\nuint32 width\n'
                              'string encoding\nuint8 is_bigendian\nuint32 step\n'
                              'uint8[] data\n' + _SEPARATOR + _HEADER),
    'sensor_msgs/msg/JointState': ('std_msgs/Header header\nstring[] name\n'
                                   'float64[] position\nfloat64[] velocity\n'
                                   'float64[] effort\n' + _SEPARATOR + _HEADER),
    'std_msgs/msg/Float64MultiArray': (
        'std_msgs/MultiArrayLayout layout\nfloat64[] data\n' + _SEPARATOR
        + 'MSG: std_msgs/MultiArrayLayout\nstd_msgs/MultiArrayDimension[] dim\n'
        'uint32 data_offset\n' + _SEPARATOR
        + 'MSG: std_msgs/MultiArrayDimension\nstring label\nuint32 size\nuint32 stride\n'),
    'std_msgs/msg/Bool': 'bool data\n',
}

MAPPING = {
    'cameras': ['/camera/top/image_raw'],
    'joint_states': '/joint_states',
    'command': '/forward_position_controller/commands',
    'intervention': '/teleop/engage',
    'instruction': 'transfer the cube',
    'control_period_s': 0.02,
}


def _stamp(ns: int) -> dict:
    return {'sec': ns // 1_000_000_000, 'nanosec': ns % 1_000_000_000}


def standard_messages(ticks: int = 30, dropped: int = 7, size: int = 32) -> list:
    """Messages of a `ros2 bag record` of a robot at 50 Hz: (topic, type, log ns, fields).

    Times in ms after T0: joint states every 10 ms, split in two messages (left and right
    arm, as separate drivers publish them), value 0.001 * (ms / 10) for every joint; camera
    frames m captured at 5 + 40 m ms (received 3 ms later), pixel value m; commands i at
    10 + 20 i ms (command `dropped` lost), joint j = i + j / 100; the pedal goes down
    (True) with command 10 and up with command 20.
    """
    messages = []
    end = 10 + 20 * ticks
    for ms in range(0, end, 10):
        value = 0.001 * (ms // 10)
        for names in (JOINTS[:7], JOINTS[7:]):
            header = {'stamp': _stamp(T0 + ms * MS), 'frame_id': ''}
            messages.append(('/joint_states', 'sensor_msgs/msg/JointState', T0 + ms * MS,
                             {'header': header, 'name': names, 'position': [value] * 7,
                              'velocity': [], 'effort': []}))
    for m, ms in enumerate(range(5, end, 40)):
        header = {'stamp': _stamp(T0 + ms * MS), 'frame_id': 'top'}
        messages.append(('/camera/top/image_raw', 'sensor_msgs/msg/Image', T0 + (ms + 3) * MS,
                         {'header': header, 'height': size, 'width': size, 'encoding': 'rgb8',
                          'is_bigendian': 0, 'step': size * 3,
                          'data': bytes([m]) * (size * size * 3)}))
    for i in range(ticks):
        if i != dropped:
            messages.append(('/forward_position_controller/commands',
                             'std_msgs/msg/Float64MultiArray', T0 + (10 + 20 * i) * MS,
                             {'layout': {'dim': [], 'data_offset': 0},
                              'data': [i + j / 100 for j in range(14)]}))
    for ms, engaged in ((0, False), (10 + 20 * 10, True), (10 + 20 * 20, False)):
        messages.append(('/teleop/engage', 'std_msgs/msg/Bool', T0 + ms * MS, {'data': engaged}))
    messages.sort(key=lambda item: item[2])
    return messages


def write_mcap_ros2(path: Path, messages: list, definitions: dict | None = None) -> Path:
    """Write with the mcap-ros2-support writer (not ours): a bare MCAP file, no metadata.yaml."""
    from mcap_ros2.writer import Writer

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open('wb') as stream:
        writer = Writer(stream)
        schemas = {}
        for topic, msgtype, log_time, fields in messages:
            if msgtype not in schemas:
                schemas[msgtype] = writer.register_msgdef(
                    msgtype, (definitions or DEFINITIONS)[msgtype])
            writer.write_message(topic, schemas[msgtype], fields, log_time=log_time)
        writer.finish()
    return path


def write_sqlite3(path: Path, messages: list) -> Path:
    """Write the same messages as a rosbag2 sqlite3 bag (rosbags' writer, with metadata)."""
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import get_typestore, Stores

    store = get_typestore(Stores.ROS2_JAZZY)

    def build(msgtype: str, fields: dict):
        t = store.types
        if 'header' in fields:
            stamp = t['builtin_interfaces/msg/Time'](**fields['header']['stamp'])
            fields = {**fields, 'header': t['std_msgs/msg/Header'](
                stamp=stamp, frame_id=fields['header']['frame_id'])}
        if msgtype == 'sensor_msgs/msg/Image':
            fields = {**fields, 'data': np.frombuffer(fields['data'], dtype=np.uint8)}
        if msgtype == 'sensor_msgs/msg/JointState':
            fields = {**fields, **{k: np.asarray(fields[k], dtype=np.float64)
                                   for k in ('position', 'velocity', 'effort')}}
        if msgtype == 'std_msgs/msg/Float64MultiArray':
            fields = {'layout': t['std_msgs/msg/MultiArrayLayout'](dim=[], data_offset=0),
                      'data': np.asarray(fields['data'], dtype=np.float64)}
        return t[msgtype](**fields)

    connections = {}
    with Writer(path, version=8, storage_plugin=StoragePlugin.SQLITE3) as writer:
        for topic, msgtype, log_time, fields in messages:
            if topic not in connections:
                connections[topic] = writer.add_connection(topic, msgtype, typestore=store)
            writer.write(connections[topic], log_time,
                         store.serialize_cdr(build(msgtype, fields), msgtype))
    return path


def fingerprint(root: Path) -> dict[str, str]:
    """Return relative path -> sha256 of every file under root (to prove nothing changed)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob('*')) if p.is_file()}


def train(argv: list[str]) -> int:
    from habc.cli import build_parser

    args = build_parser().parse_args(['train', *argv])
    return args.run(args)


# (1) bags of another writer -------------------------------------------------------------------

def test_rosbags_reads_a_bare_mcap_of_another_writer(tmp_path):
    from rosbags.rosbag2 import Reader

    path = write_mcap_ros2(tmp_path / 'run.mcap', standard_messages())
    with Reader(path) as reader:  # no metadata.yaml needed for a single MCAP file
        counts = {c.topic: (c.msgtype, c.msgcount) for c in reader.connections}
    assert counts['/forward_position_controller/commands'] == (
        'std_msgs/msg/Float64MultiArray', 29)
    assert counts['/joint_states'] == ('sensor_msgs/msg/JointState', 2 * 61)


def expected_episode_checks(episode, resampled: bool = True) -> None:
    """Hand-computed values of standard_messages() at 50 Hz ticks 10 + 20 k ms."""
    ticks = np.arange(30)
    if not resampled:
        ticks = ticks[ticks != 7]  # one step per command: the dropped one has none
    assert len(episode) == len(ticks)
    # The action in force at tick k is command k; at the dropped tick 7 command 6 still holds.
    commanded = np.where(ticks == 7, 6, ticks)
    np.testing.assert_allclose(episode.actions[:, 0], commanded)
    np.testing.assert_allclose(episode.actions[:, 13], commanded + 0.13, rtol=1e-6)
    # Pedal down at command 10, up at command 20 (a flag at the tick's own time counts).
    human = (ticks >= 10) & (ticks < 20)
    assert episode.controllers.tolist() == [Controller.HUMAN if h else Controller.POLICY
                                            for h in human]
    assert episode.num_interventions == 1
    # Both halves of the joint state at 10 + 20 k ms: joint-state message 1 + 2 k.
    state = episode.observations['state']
    assert state.shape == (len(ticks), 14)
    np.testing.assert_allclose(state[:, 0], 0.001 * (1 + 2 * ticks), rtol=1e-6)
    np.testing.assert_allclose(state[:, 13], 0.001 * (1 + 2 * ticks), rtol=1e-6)
    # Camera frame m is stamped 5 + 40 m ms (header, not the later receive time).
    images = episode.observations['images']
    assert images.shape == (len(ticks), 1, 32, 32, 3)
    assert images[:, 0, 0, 0, 0].tolist() == ((5 + 20 * ticks) // 40).tolist()
    np.testing.assert_allclose(episode.timestamps, 100.0 + (10 + 20 * ticks) * 1e-3)
    assert episode.instruction == 'transfer the cube'
    assert set(episode.policy_versions) == {''}


def test_episode_from_a_foreign_mcap_with_a_mapping(tmp_path):
    bag = tmp_path / 'run7'
    write_mcap_ros2(bag / 'run7_0.mcap', standard_messages())
    mapping = TopicMapping.from_dict(MAPPING)
    episode = episode_from_bag(bag, 'success', topics=mapping)
    expected_episode_checks(episode)
    assert episode.episode_id == 'run7' and episode.outcome == Outcome.SUCCESS
    per_command = episode_from_bag(bag, 'failure',
                                   topics=TopicMapping.from_dict({**MAPPING,
                                                                  'control_period_s': None}))
    expected_episode_checks(per_command, resampled=False)
    # The bare file works as well, and no metadata.yaml was written into the folder.
    assert len(episode_from_bag(bag / 'run7_0.mcap', 'success', topics=mapping)) == 30
    assert sorted(p.name for p in bag.iterdir()) == ['run7_0.mcap']


def test_train_on_foreign_mcap_and_sqlite3_bags(tmp_path, init_checkpoint, capsys):
    messages = standard_messages()
    bags = tmp_path / 'recordings'
    write_mcap_ros2(bags / 'run1' / 'run1_0.mcap', messages)
    (bags / 'run1' / 'outcome.yaml').write_text('outcome: success\nnote: clean handover\n')
    write_sqlite3(bags / 'run2', messages)
    (bags / 'run2' / 'label.json').write_text('{"outcome": "failure"}')
    mapping = tmp_path / 'mapping.yaml'
    mapping.write_text(yaml.safe_dump(MAPPING))
    before = fingerprint(bags)
    out = tmp_path / 'out'

    code = train(['--bags', str(bags), '--mapping', str(mapping), '--method', 'habc',
                  '--out', str(out), '--steps', '3', '--batch-size', '8',
                  '--init', str(init_checkpoint), '--quiet'])

    assert code == 0
    assert fingerprint(bags) == before  # nothing written into the input
    for name in ('model.safetensors', 'config.json', 'critic.safetensors', 'metrics.json'):
        assert (out / 'checkpoint' / name).is_file()
    from habc_policy.models.base import load_policy
    assert load_policy(out / 'checkpoint').version == '1:offline'
    assert list((out / 'tensorboard').glob('events.out.tfevents.*'))
    report = json.loads((out / 'report.json').read_text())
    assert report['data']['episodes'] == 2 and report['data']['steps'] == 60
    assert report['data']['outcomes'] == {'success': 1, 'failure': 1}
    assert report['data']['label_sources'] == {'sidecar': 2}
    assert report['data']['human_segments'] == 2 and report['data']['policy_segments'] == 4
    rows = {Path(row['bag']).name: row for row in report['episodes']}
    assert rows['run1']['human_steps'] == 10 and rows['run2']['outcome'] == 'failure'
    credit = report['credit']
    assert credit['human']['windows'] == 20 and credit['policy']['windows'] == 40
    # The failed episode's post-intervention suffix gets weight 0, the successful one's g_t.
    assert credit['policy']['weight_zero'] > 0 and credit['policy']['weight_gate'] > 0
    assert report['history'] and report['history'][-1]['step'] == 3
    assert report['mapping']['command'] == '/forward_position_controller/commands'
    markdown = (out / 'report.md').read_text()
    assert '![losses](plots/losses.png)' in markdown and 'run1' in markdown
    assert (out / 'plots' / 'losses.png').stat().st_size > 0
    assert (out / 'plots' / 'episodes.png').is_file()

    # A second run of the same method from this one's checkpoint goes on from its critic
    # and training state (the init checkpoint above, of another training, gave neither).
    assert 'restored from' not in capsys.readouterr().out
    code = train(['--bags', str(bags), '--mapping', str(mapping), '--method', 'habc',
                  '--out', str(tmp_path / 'again'), '--steps', '3', '--batch-size', '8',
                  '--init', str(out / 'checkpoint'), '--quiet'])
    printed = capsys.readouterr().out
    assert code == 0
    assert f'critic restored from {out / "checkpoint" / "critic.safetensors"}' in printed
    assert 'AdamW moments and target critic restored from ' \
        f'{out / "checkpoint" / "trainer_state.pt"}' in printed


# (2) damaged and unlabelled bags among good ones ----------------------------------------------

def write_crashed_bag(path: Path, typestore, messages: list) -> Path:
    """Write the bag of a writer that died: chunks flushed, no footer, no metadata.yaml."""
    writer = EpisodeBagWriter(path, typestore, flush_interval_s=0.0)
    for topic, log_time, message in messages:
        writer.add_topic(topic, message.__msgtype__)
        writer.write(topic, log_time, message)
    mcap = path / f'{path.name}.mcap'
    on_disk = mcap.read_bytes()  # what a crash at this moment leaves behind
    writer.close()
    mcap.write_bytes(on_disk)
    (path / 'metadata.yaml').unlink()
    return path


def test_damaged_and_unlabelled_bags_are_reported_and_skipped(tmp_path, episode_bag, bags,
                                                              capsys):
    root = tmp_path / 'bags'
    policy, human = 0, 1
    episode_bag('ep-a', [policy] * 12)
    episode_bag('ep-b', [policy] * 4 + [human] * 5 + [policy] * 5)
    truncated = episode_bag('ep-c', [policy] * 12)
    mcap = truncated / 'ep-c.mcap'
    mcap.write_bytes(mcap.read_bytes()[:mcap.stat().st_size // 2])
    crashed = episode_bag('ep-d', [policy] * 12)
    (crashed / 'metadata.yaml').unlink()  # what a writer killed before close() leaves
    mcap = crashed / 'ep-d.mcap'
    mcap.write_bytes(mcap.read_bytes()[:mcap.stat().st_size - 200])
    episode_bag('ep-e', [policy] * 12)  # never labelled
    labels = tmp_path / 'labels.csv'
    labels.write_text('bag,outcome,note\nep-a,success,\nbags/ep-b,failure,dropped it\n'
                      'ep-c,success,\nep-d,success,\nep-x,failure,typo\n')
    before = fingerprint(root)
    out = tmp_path / 'out'

    code = train(['--bags', str(root), '--labels', str(labels), '--method', 'habc',
                  '--out', str(out), '--steps', '3', '--batch-size', '8', '--policy', 'lowdim',
                  '--horizon', '5', '--policy-config', '{"hidden_dim": 32, "feature_dim": 16}',
                  '--quiet'])

    assert code == 0
    assert fingerprint(root) == before
    err = capsys.readouterr().err
    for name in ('ep-c', 'ep-d'):
        line = next(line for line in err.splitlines() if f'{name} (unreadable)' in line)
        assert 'cut short or damaged' in line and 'recover_bag' in line
    assert 'ep-d' in err and 'it has no metadata.yaml' in err
    assert 'ep-e (unlabelled): no outcome label' in err
    assert 'labels.csv:6: ep-x' in err
    report = json.loads((out / 'report.json').read_text())
    assert sorted(Path(r['bag']).name for r in report['episodes']) == ['ep-a', 'ep-b']
    assert {Path(s['bag']).name: s['reason'] for s in report['skipped']} == {
        'ep-c': 'unreadable', 'ep-d': 'unreadable', 'ep-e': 'unlabelled'}
    assert report['data']['label_sources'] == {'labels': 2}
    assert (out / 'checkpoint' / 'model.safetensors').is_file()
    assert 'ep-e' in (out / 'report.md').read_text()


def test_the_advice_for_a_crashed_bag_works(tmp_path, typestore, bags):
    messages = []
    for k in range(20):
        stamp = T0 + 20 * k * MS
        messages.append(('/observation', stamp, bags.observation(stamp, [0.01 * k] * 14, k)))
        messages.append(('/executed_action', stamp + 1000,
                         bags.action(stamp + 1000, 0, [0.01 * k] * 14, episode_id='crash')))
    path = write_crashed_bag(tmp_path / 'crash', typestore, messages)
    assert not (path / 'metadata.yaml').exists()
    with pytest.raises(BagReadError, match=r'recover_bag\(path\) rebuilds'):
        episode_from_bag(path, 'success')
    copy = tmp_path / 'copy'
    shutil.copytree(path, copy)
    assert recover_bag(copy).recovered
    assert len(episode_from_bag(copy, 'success')) >= 19  # the last record may be lost


def test_nothing_usable_is_an_error(tmp_path, episode_bag, capsys):
    episode_bag('ep-a', [0] * 5)
    code = train(['--bags', str(tmp_path / 'bags'), '--method', 'habc', '--out',
                  str(tmp_path / 'out'), '--quiet'])
    assert code == 2
    assert 'no usable episode' in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


# (3) where labels come from -------------------------------------------------------------------

def test_label_precedence_csv_then_index_then_sidecar(tmp_path, episode_bag):
    from habc_episodes.index import EpisodeIndex

    storage = tmp_path / 'storage'  # the recorder's layout: episodes.sqlite + bags/<id>/
    paths = {name: episode_bag(name, [0] * 6) for name in 'ABCDEF'}
    shutil.move(tmp_path / 'bags', storage / 'bags')
    paths = {name: storage / 'bags' / name for name in paths}
    with EpisodeIndex(storage / 'episodes.sqlite') as index:
        for name, outcome in (('A', 'success'), ('B', 'failure'), ('C', None),
                              ('D', 'discarded'), ('F', 'failure')):
            index.create(name, f'bags/{name}', '', '1', started_at=1.0)
            index.finish(name, 6, 0, ended_at=2.0)
            if outcome:
                index.label(name, outcome, 'tester', 'from index', now=3.0)
    (paths['A'] / 'outcome.yaml').write_text('outcome: failure\n')   # loses to the index
    (paths['C'] / 'label.json').write_text('{"outcome": "success"}')  # index says unknown
    (paths['D'] / 'outcome.txt').write_text('success\n')              # loses to the index
    (paths['F'] / 'outcome.yaml').write_text('success\n')             # loses to the CSV
    labels = tmp_path / 'labels.csv'
    labels.write_text(f'bag,outcome\nB,success\n{paths["F"]},discarded\n')
    index_file = storage / 'episodes.sqlite'
    index_bytes = index_file.read_bytes()

    labeller = Labeller(labels)
    found = {path.name: labeller.label(path) for path in find_bags([storage])}
    assert {name: (label.outcome, label.source) if label else None
            for name, label in found.items()} == {
        'A': (Outcome.SUCCESS, 'index'), 'B': (Outcome.SUCCESS, 'labels'),
        'C': (Outcome.SUCCESS, 'sidecar'), 'D': (Outcome.DISCARDED, 'index'),
        'E': None, 'F': (Outcome.DISCARDED, 'labels')}
    assert found['A'].note == 'from index' and found['A'].origin == str(index_file)
    assert index_file.read_bytes() == index_bytes  # read-only, and no -wal/-shm left behind
    assert sorted(p.name for p in storage.iterdir()) == ['bags', 'episodes.sqlite']

    result = load_bags([storage], labeller=Labeller(labels), progress=False)
    assert sorted(item.path.name for item in result.loaded) == ['A', 'B', 'C']
    assert {s.path.name: s.reason for s in result.skipped} == {
        'D': 'discarded', 'E': 'unlabelled', 'F': 'discarded'}
    outcomes = {item.path.name: item.episode.outcome for item in result.loaded}
    assert outcomes == {'A': Outcome.SUCCESS, 'B': Outcome.SUCCESS, 'C': Outcome.SUCCESS}

    # An explicit --index labels bags that were copied elsewhere, by episode id.
    elsewhere = tmp_path / 'copied'
    shutil.copytree(paths['B'], elsewhere / 'B')
    label = Labeller(index_paths=[index_file]).label(elsewhere / 'B')
    assert (label.outcome, label.source) == (Outcome.FAILURE, 'index')


def test_a_bad_labels_file_names_the_line(tmp_path):
    labels = tmp_path / 'labels.csv'
    labels.write_text('bag,outcome\nep-1,success\nep-2,sucess\n')
    with pytest.raises(ValueError, match=r'labels.csv:3: unknown outcome .sucess.'):
        Labeller(labels)


# Mapping files ---------------------------------------------------------------------------------

def test_mapping_files_are_checked(tmp_path):
    assert TopicMapping() == TopicMapping('observation', 'executed_action')
    assert not TopicMapping().standard
    mapping = TopicMapping.from_dict(MAPPING)
    assert mapping.standard and mapping.cameras == ('/camera/top/image_raw',)
    assert TopicMapping.from_dict(mapping.to_dict()) == mapping
    path = tmp_path / 'mapping.yaml'
    path.write_text('command: /cmd\njoint_states: /js\ncamera: /image\n')
    with pytest.raises(ValueError, match=r"mapping.yaml: unknown topic mapping key\(s\) "
                                         r"\['camera'\]"):
        TopicMapping.from_yaml(path)
    with pytest.raises(ValueError, match='also need `command`'):
        TopicMapping.from_dict({'cameras': ['/image']})
    with pytest.raises(ValueError, match='need `joint_states`'):
        TopicMapping.from_dict({'command': '/cmd'})
    with pytest.raises(ValueError, match="'control_period_s' must be a number"):
        TopicMapping.from_dict({**MAPPING, 'control_period_s': '50 Hz'})


def test_a_mapping_that_does_not_fit_the_bag_says_what_the_bag_holds(tmp_path):
    bag = write_mcap_ros2(tmp_path / 'run' / 'run.mcap', standard_messages()).parent
    mapping = TopicMapping.from_dict({**MAPPING, 'command': '/joint_trajectory_controller/'
                                                            'joint_trajectory'})
    with pytest.raises(ValueError) as error:
        episode_from_bag(bag, 'success', topics=mapping)
    assert "no topic '/joint_trajectory_controller/joint_trajectory'" in str(error.value)
    assert '/forward_position_controller/commands (std_msgs/msg/Float64MultiArray, 29)' in \
        str(error.value)


def test_help_lists_the_train_command():
    from habc.cli import build_parser

    parser = build_parser()
    assert 'train' in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(['train', '--bags', 'x'])  # --method and --out are required


def test_nearest_pixel_resize_picks_the_same_pixels_as_plain_indexing():
    from habc_episodes.episode_bags import _resize

    image = np.random.default_rng(0).integers(0, 256, (224, 200, 3), dtype=np.uint8)
    ys = (np.arange(96) * 224 / 96).astype(int)
    xs = (np.arange(96) * 200 / 96).astype(int)
    np.testing.assert_array_equal(_resize(image, 96), image[ys][:, xs])
    bgr = image[:, :, ::-1]  # a non-contiguous view, as bgr8 images give
    np.testing.assert_array_equal(_resize(bgr, 96), bgr[ys][:, xs])


def test_joint_names_choose_and_order_the_state(tmp_path):
    bag = write_mcap_ros2(tmp_path / 'run' / 'run.mcap', standard_messages()).parent
    mapping = TopicMapping.from_dict({**MAPPING, 'joint_names': ['j13', 'j0'],
                                      'cameras': [], 'stamps': 'receive'})
    episode = episode_from_bag(bag, 'success', topics=mapping)
    assert 'images' not in episode.observations
    assert episode.observations['state'].shape == (30, 2)
    with pytest.raises(ValueError, match=r"never has a position for joint\(s\) \['elbow'\]"):
        episode_from_bag(bag, 'success', topics=TopicMapping.from_dict(
            {**MAPPING, 'joint_names': ['j0', 'elbow']}))


def test_trajectory_commands_compressed_images_and_intervention_states(tmp_path):
    import io

    from PIL import Image

    definitions = {
        'trajectory_msgs/msg/JointTrajectory': (
            'std_msgs/Header header\nstring[] joint_names\nJointTrajectoryPoint[] points\n'
            + _SEPARATOR + _HEADER + _SEPARATOR
            + 'MSG: trajectory_msgs/JointTrajectoryPoint\nfloat64[] positions\n'
            'float64[] velocities\nfloat64[] accelerations\nfloat64[] effort\n'
            'builtin_interfaces/Duration time_from_start\n' + _SEPARATOR
            + 'MSG: builtin_interfaces/Duration\nint32 sec\nuint32 nanosec\n'),
        'sensor_msgs/msg/CompressedImage': ('std_msgs/Header header\nstring format\n'
                                            'uint8[] data\n' + _SEPARATOR + _HEADER),
        'habc_msgs/msg/InterventionState': (
            'std_msgs/Header header\nbool active\nuint8 source\nuint32 segment_id\n'
            'string episode_id\nstring reason\n' + _SEPARATOR + _HEADER),
    }
    zero = {'stamp': _stamp(0), 'frame_id': ''}  # a zero stamp means "now": receive time
    messages = [m for m in standard_messages(ticks=6) if m[0] == '/joint_states']
    for k in range(6):
        at = T0 + (10 + 20 * k) * MS
        png = io.BytesIO()
        Image.new('RGB', (8, 8), (k, 2 * k, 3 * k)).save(png, format='PNG')
        messages.append(('/camera/compressed', 'sensor_msgs/msg/CompressedImage', at - MS,
                         {'header': zero, 'format': 'rgb8; png compressed', 'data':
                          png.getvalue()}))
        names = ['b', 'a'] if k % 2 else ['a', 'b']  # the order may change: kept as the first
        point = {'positions': [10.0 * k, float(k)] if k % 2 else [float(k), 10.0 * k],
                 'velocities': [], 'accelerations': [], 'effort': [],
                 'time_from_start': {'sec': 0, 'nanosec': 0}}
        messages.append(('/arm/joint_trajectory', 'trajectory_msgs/msg/JointTrajectory', at,
                         {'header': zero, 'joint_names': names, 'points': [point]}))
        messages.append(('/intervention', 'habc_msgs/msg/InterventionState', at,
                         {'header': zero, 'active': k == 3, 'source': 1 if k == 3 else 0,
                          'segment_id': 0, 'episode_id': '', 'reason': ''}))
    messages.sort(key=lambda item: item[2])
    bag = write_mcap_ros2(tmp_path / 'jtc' / 'jtc.mcap', messages,
                          {**DEFINITIONS, **definitions}).parent
    mapping = TopicMapping.from_dict({'cameras': ['camera/compressed'],
                                      'joint_states': 'joint_states',
                                      'command': 'arm/joint_trajectory',
                                      'intervention': 'intervention'})
    episode = episode_from_bag(bag, 'failure', topics=mapping)
    assert len(episode) == 6
    np.testing.assert_allclose(episode.actions, [[k, 10.0 * k] for k in range(6)])
    assert episode.controllers.tolist() == [0, 0, 0, 1, 0, 0]
    assert episode.observations['images'].shape == (6, 1, 8, 8, 3)
    assert episode.observations['images'][:, 0, 0, 0, 1].tolist() == [0, 2, 4, 6, 8, 10]
    resized = episode_from_bag(bag, 'failure', topics=mapping, image_size=4)
    assert resized.observations['images'].shape == (6, 1, 4, 4, 3)
    assert resized.camera_shapes == ((8, 8),)  # as recorded (decoded), before the resize


# (4) a new policy on a pretrained VLM backbone ---------------------------------------------

# TransformersVLA sizes of a quick test (the backbone fixture is tests/vla_fixtures.py's).
VLA_CONFIG = {'prefix_layers': 1, 'expert_hidden_dim': 32, 'expert_layers': 1,
              'expert_heads': 2, 'num_inference_steps': 2}


def test_backbone_trains_a_transformers_vla_and_init_continues_it_with_habc(
        tmp_path, episode_bag, tiny_backbone, capsys):
    from safetensors.torch import load_file
    import torch

    from habc_policy.models.base import load_policy

    policy, human = 0, 1
    demo = episode_bag('demo-1', [human] * 12)
    rollouts = []
    for name, outcome in (('ep-1', 'success'), ('ep-2', 'failure')):
        bag = episode_bag(name, [policy] * 4 + [human] * 4 + [policy] * 4)
        (bag / 'outcome.yaml').write_text(f'outcome: {outcome}\n')
        rollouts.append(str(bag))
    common = ['--bags', *rollouts, '--steps', '2', '--batch-size', '4', '--quiet']
    sft = tmp_path / 'sft'

    code = train([*common, '--demos', str(demo), '--backbone', str(tiny_backbone),
                  '--method', 'sft', '--out', str(sft), '--horizon', '5', '--image-size', '32',
                  '--policy-config', json.dumps(VLA_CONFIG)])

    assert code == 0, capsys.readouterr().err
    meta = json.loads((sft / 'checkpoint' / 'config.json').read_text())
    assert meta['type'] == 'transformers_vla'
    config = meta['config']
    assert config['backbone_dir'] == str(tiny_backbone.resolve())
    assert len(config['backbone_fingerprint']) == 64
    # --policy-config still sets the config; the bags and flags set the robot's sizes.
    assert (config['prefix_layers'], config['finetune'], config['expert_layers']) == (
        1, 'frozen', 1)
    assert (config['num_views'], config['image_size'], config['horizon']) == (1, 32, 5)
    # The bags' 8 x 8 cameras, which the policy node checks a robot's cameras against.
    assert config['camera_shape'] == [8, 8]
    weights = load_file(str(sft / 'checkpoint' / 'model.safetensors'))
    assert weights and not [k for k in weights if k.startswith('backbone.')]
    assert 'action_out.weight' in weights
    first = load_policy(sft / 'checkpoint')
    assert first.version == '1:offline' and type(first).__name__ == 'TransformersVLA'
    report = json.loads((sft / 'report.json').read_text())
    assert report['training']['policy'] == 'transformers_vla'

    habc = tmp_path / 'habc'
    code = train([*common, '--init', str(sft / 'checkpoint'), '--method', 'habc', '--out',
                  str(habc), '--warmup-steps', '1', '--version', '2'])

    assert code == 0, capsys.readouterr().err
    second = load_policy(habc / 'checkpoint')
    assert second.version == '2' and second.config == first.config
    assert (habc / 'checkpoint' / 'critic.safetensors').is_file()
    before, after = first.checkpoint_state(), second.checkpoint_state()
    assert set(before) == set(after)
    assert any(not torch.equal(before[k], after[k]) for k in before), 'HABC changed nothing'


def test_backbone_flags_that_do_not_fit_are_named(tmp_path, episode_bag, tiny_backbone,
                                                  capsys):
    bag = episode_bag('ep-1', [0] * 12)
    (bag / 'outcome.yaml').write_text('outcome: success\n')
    base = ['--bags', str(bag), '--method', 'habc', '--steps', '1', '--quiet']
    cases = [
        (['--backbone', str(tiny_backbone), '--init', str(tmp_path / 'ckpt')],
         '--backbone builds a new policy and --init starts from a checkpoint'),
        (['--backbone', str(tiny_backbone), '--policy', 'lowdim'],
         'builds a transformers_vla policy, not --policy lowdim'),
        (['--policy', 'transformers_vla'], 'needs a backbone: a local VLM folder'),
        (['--backbone', str(tmp_path / 'no_such_vlm')], "backbone folder '"),
    ]
    for n, (flags, message) in enumerate(cases):
        out = tmp_path / f'out{n}'
        assert train([*base, '--out', str(out), *flags]) == 2, flags
        err = capsys.readouterr().err
        assert message in err, err
        assert not (out / 'checkpoint').exists()
    import argparse

    from habc_learner.train_cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    help_text = ' '.join(parser.format_help().split())
    assert '--backbone VLM_FOLDER new policy on a pretrained vision-language model' in help_text
    assert 'Implies --policy transformers_vla' in help_text
