"""habc play: schedule, topic filter, names, QoS (no rclpy); a replay a live learner trains on."""

import itertools
import json
import signal
import sys

from episode_bags import SEC, TICK_NS, typestore, write_episode
import pytest
from rosbags.interfaces import (
    Qos,
    QosDurability,
    QosHistory,
    QosLiveliness,
    QosReliability,
    QosTime,
)
from rosbags.rosbag2 import StoragePlugin, Writer

from habc.play import Plan, topic_qos
from habc_common.messages import message_class
from habc_episodes import playback
from habc_episodes.playback import (
    BagTopic,
    output_topic,
    play_offsets,
    playlist,
    select_topics,
    timed_messages,
)

# Unit tests of the plain core ----------------------------------------------------------------


def test_offsets_scale_with_the_rate():
    stamps = [5 * SEC, 5 * SEC + SEC // 2, 7 * SEC]
    assert play_offsets(stamps, 1.0) == [0.0, 0.5, 2.0]
    assert play_offsets(stamps, 2.0) == [0.0, 0.25, 1.0]
    assert play_offsets(stamps, 0.5) == [0.0, 1.0, 4.0]
    for rate in (0.0, -1.0, float('nan'), float('inf')):
        with pytest.raises(ValueError, match='--rate must be a positive number'):
            play_offsets(stamps, rate)


def test_playlist_plays_each_bag_once_or_loops():
    assert list(playlist(['a', 'b'])) == ['a', 'b']
    assert list(itertools.islice(playlist(['a', 'b'], loop=True), 5)) == ['a', 'b', 'a', 'b',
                                                                           'a']
    assert list(playlist([], loop=True)) == []


def test_topic_filter_names_and_remaps():
    available = ['/robot1/observation', '/robot1/executed_action', '/robot2/observation',
                 '/tf']
    assert select_topics(available, None) == sorted(available)
    assert select_topics(available, ['observation']) == ['/robot1/observation',
                                                         '/robot2/observation']
    assert select_topics(available, ['/robot1/observation', 'tf']) == [
        '/robot1/observation', '/tf']
    with pytest.raises(ValueError, match=r"\['action'\] match no topic.*/tf"):
        select_topics(available, ['action'])  # a suffix must start at a namespace boundary
    assert output_topic('/observation', 'robot1') == '/robot1/observation'
    remaps = [playback.parse_remap('/robot1:=/robot2'),
              playback.parse_remap('/tf:=/tf_replayed')]
    assert output_topic('/robot1/policy/chunk', '', remaps) == '/robot2/policy/chunk'
    assert output_topic('/robot10/observation', '', remaps) == '/robot10/observation'
    assert output_topic('/tf', 'sim', remaps) == '/sim/tf_replayed'
    with pytest.raises(ValueError, match='absolute names'):
        playback.parse_remap('robot1:=robot2')


def _offer(reliability, durability, depth=7):
    never = QosTime(0, 0)
    return Qos(QosHistory.KEEP_LAST, depth, reliability, durability, never, never,
               QosLiveliness.AUTOMATIC, never, False)


def test_qos_from_the_bag_else_the_habc_profile_else_the_default():
    # The habc profiles (habc_common.qos) as the plain values the plan logs and publishes with.
    sensor_data = playback.TopicQos(False, False, 5, 'SENSOR_DATA')
    commands = playback.TopicQos(True, False, 50, 'COMMANDS')
    latched_qos = playback.TopicQos(True, True, 1, 'LATCHED')
    assert topic_qos(BagTopic('/robot1/observation', 'habc_msgs/msg/Observation', 1)) == \
        sensor_data
    assert topic_qos(BagTopic('/joint_states', 'sensor_msgs/msg/JointState', 1)) == \
        playback.TopicQos(True, False, 100, 'JOINT_STATES')
    assert topic_qos(BagTopic('/policy/update', 'habc_msgs/msg/PolicyUpdate', 1)) == latched_qos
    assert topic_qos(BagTopic('/r/executed_action', 'habc_msgs/msg/ExecutedAction', 1)) == \
        commands
    assert topic_qos(BagTopic('/cam/image_raw', 'sensor_msgs/msg/Image', 1)) == sensor_data
    assert topic_qos(BagTopic('/chatter', 'std_msgs/msg/String', 1)) == playback.TopicQos()
    latched = _offer(QosReliability.RELIABLE, QosDurability.TRANSIENT_LOCAL, 1)
    assert topic_qos(BagTopic('/map', 'std_msgs/msg/String', 1, offers=(latched,))) == \
        playback.TopicQos(True, True, 1, 'bag')
    mixed = (latched, _offer(QosReliability.BEST_EFFORT, QosDurability.VOLATILE))
    assert topic_qos(BagTopic('/observation', 'x/msg/Y', 1, offers=mixed)) == \
        sensor_data  # offers that disagree fall through


def test_one_pass_streams_raw_bytes_on_time_from_mcap_and_sqlite3(tmp_path):
    from rclpy.serialization import deserialize_message

    from habc_msgs.msg import ExecutedAction

    mcap = playback.bag_info(write_episode(tmp_path / 'ep', [0, 1, 0]))
    assert (mcap.storage, mcap.message_count) == ('mcap', 9)
    assert mcap.custom_data['habc_instruction'] == 'transfer the cube'
    passes = list(timed_messages(mcap, ['/executed_action', '/observation'], rate=2.0))
    assert [topic for _, topic, _ in passes] == ['/observation', '/executed_action'] * 3
    assert [due for due, _, _ in passes] == pytest.approx(
        [(k * TICK_NS + extra) / SEC / 2 for k in range(3) for extra in (0, 1000)])
    action = deserialize_message(passes[3][2], ExecutedAction)
    assert (action.source, action.positions[0]) == (1, pytest.approx(0.02))

    store = typestore()
    path = tmp_path / 'sqlite'
    writer = Writer(path, version=8, storage_plugin=StoragePlugin.SQLITE3)
    with writer:
        conn = writer.add_connection('/chatter', 'std_msgs/msg/String', typestore=store,
                                     offered_qos_profiles=[_offer(QosReliability.RELIABLE,
                                                                  QosDurability.VOLATILE)])
        for k, stamp in enumerate((3 * SEC, 4 * SEC, 6 * SEC)):
            msg = store.types['std_msgs/msg/String'](data=f'm{k}')
            writer.write(conn, stamp, store.serialize_cdr(msg, 'std_msgs/msg/String'))
    db3 = playback.bag_info(path)
    assert (db3.storage, db3.duration_s) == ('sqlite3', 3.0)
    assert topic_qos(db3.topics['/chatter']) == playback.TopicQos(True, False, 7, 'bag')
    assert [due for due, _, _ in timed_messages(db3, ['/chatter'], 0.5)] == [0.0, 2.0, 6.0]


def test_plan_resolves_rclpy_types_and_skips_changed_definitions(tmp_path):
    from rosbags.typesys import get_types_from_msg, get_typestore, Stores
    from std_msgs.msg import String

    assert message_class('std_msgs/msg/String') is String
    assert message_class('std_msgs/String') is String
    with pytest.raises(ValueError, match='not installed'):
        message_class('no_such_pkg/msg/Thing')
    # A bag whose ExecutedAction was recorded with another definition: its bytes would be
    # misread, so that topic is skipped and named.
    store = typestore()
    old = get_types_from_msg('float64 x', 'habc_msgs/msg/ExecutedAction')
    other = get_typestore(Stores.EMPTY)
    other.register({**{k: v for k, v in store.fielddefs.items()
                       if k != 'habc_msgs/msg/ExecutedAction'}, **old})
    writer = Writer(tmp_path / 'old', version=8, storage_plugin=StoragePlugin.MCAP)
    with writer:
        conn = writer.add_connection('/executed_action', 'habc_msgs/msg/ExecutedAction',
                                     typestore=other)
        msg = other.types['habc_msgs/msg/ExecutedAction'](x=1.0)
        writer.write(conn, SEC, other.serialize_cdr(msg, 'habc_msgs/msg/ExecutedAction'))
        conn = writer.add_connection('/chatter', 'std_msgs/msg/String', typestore=store)
        writer.write(conn, SEC, store.serialize_cdr(store.types['std_msgs/msg/String'](
            data='hi'), 'std_msgs/msg/String'))
    bag = playback.bag_info(tmp_path / 'old')
    plan = Plan([bag], sorted(bag.topics), 'ns', [])
    assert list(plan.topics) == ['/chatter'] and plan.outputs == {'/chatter': '/ns/chatter'}
    assert 'recorded with another definition' in plan.skipped['/executed_action']


# A replayed episode feeds a live learner --------------------------------------------------


@pytest.mark.ros
def test_a_replay_recorded_as_an_episode_is_trained_on_by_a_running_learner(ros, tmp_path):
    from ros_helpers import Child
    import torch

    from habc_common.qos import LATCHED
    from habc_episodes.index import EpisodeIndex
    from habc_msgs.msg import PolicyUpdate
    from habc_policy.models.vla import SmallVLA, SmallVLAConfig

    torch.manual_seed(0)
    policy = SmallVLA(SmallVLAConfig(state_dim=14, action_dim=14, horizon=10, num_views=1,
                                     image_size=32, hidden_dim=32, num_layers=1,
                                     cnn_channels=[8, 16], action_head='l2'))
    policy.version = '1'
    policy.save(tmp_path / 'sft')
    bag = write_episode(tmp_path / 'recorded', [0] * 4 + [1] * 4 + [0] * 4)
    storage = tmp_path / 'replays'
    ns = 'replay'

    recorder = Child([str(_console_script('habc_policy', 'episode_recorder_node')),
                      '--ros-args', '-r', f'__ns:=/{ns}', '-p', f'storage_dir:={storage}'])
    params = {'index_path': storage / 'episodes.sqlite', 'work_dir': tmp_path / 'learner',
              'init_checkpoint': tmp_path / 'sft', 'episodes_per_round': 1,
              'steps_per_round': 3, 'batch_size': 4, 'poll_period_s': 0.2,
              'signing_key': tmp_path / 'keys' / 'learner.key'}
    learner = Child([str(_console_script('habc_learner', 'learner_node')), '--ros-args',
                     '-r', f'__ns:=/{ns}',
                     *[a for k, v in params.items() for a in ('-p', f'{k}:={v}')]])
    node = ros.create_node('replay_test', namespace=f'/{ns}')
    updates = []
    node.create_subscription(PolicyUpdate, 'policy/update', updates.append, LATCHED)
    try:
        recorder.wait_for('ready', timeout=60)
        learner.wait_for('ready', timeout=120)
        play = Child([sys.executable, '-m', 'habc.play', str(bag), '--namespace', ns,
                      '--record-episode', '--label', 'success', '--rate', '2'])
        assert play.finish(timeout=120) == 0, play.output
        assert 'steps' in play.output and 'labelled success' in play.output, play.output
        with EpisodeIndex(storage / 'episodes.sqlite') as index:
            (record,) = index.list()
        assert (record.outcome, record.status, record.num_steps, record.num_interventions) \
            == ('success', 'complete', 12, 1), play.output
        assert record.labeler == 'habc play' and record.note == f'replay of {bag}'

        update = ros.wait_for(lambda: next((u for u in updates if u.version == 2), None),
                              'PolicyUpdate version 2', 180, children=[learner])
        metrics = {kv.key: kv.value for kv in update.metrics}
        assert float(metrics['round/episodes']) == 1.0, metrics
        # The learner's log comes through a pipe that another thread reads: wait for it.
        line = learner.wait_for(f'episode {record.episode_id} added')
        assert line.endswith(f'episode {record.episode_id} added (success, 12 steps, '
                             f'1 interventions, robot {record.robot})'), learner.output
        state = json.loads((tmp_path / 'learner' / 'learner_state.json').read_text())
        assert [e['episode_id'] for e in state['episodes']] == [record.episode_id]
        for child in (learner, recorder):
            child.process.send_signal(signal.SIGINT)
            assert child.finish(timeout=30) == 0, child.output
    finally:
        for child in (learner, recorder):
            child.kill()


def _console_script(package: str, name: str):
    from ros_helpers import ROOT

    path = ROOT / 'install' / package / 'lib' / package / name
    if not path.is_file():
        pytest.skip(f'{path} is not built (colcon build)')
    return path
