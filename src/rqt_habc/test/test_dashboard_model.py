"""The dashboard's plain model: timelines, live state, per-version stats (no Qt, no rclpy)."""

import json

import numpy as np
import pytest

from habc_episodes.bag_format import EpisodeBagWriter, habc_typestore
from habc_episodes.index import EpisodeRecord
from habc_episodes.stats import version_stats
from habc_episodes.vocabulary import Controller, RecorderEvent
from rqt_habc.model import (
    label_target,
    learner_summary,
    LiveState,
    namespaces_with,
    normalize_namespace,
    parse_status,
    policy_summary,
    qualified,
    robot_of_namespace,
    Segment,
    segments_from_ticks,
    timeline_from_bag,
    TimelineBuilder,
)

P, H, X = Controller.POLICY, Controller.HUMAN, Controller.HOLD


def approx_segments(segments):
    return [(s.source, s.segment_id, pytest.approx(s.start), pytest.approx(s.end), s.ticks)
            for s in segments]


# Timelines ------------------------------------------------------------------------------------

def test_segments_from_a_50_hz_intervention_stream_have_hand_checked_boundaries():
    # policy for 3 ticks, the human takes over for 2, a watchdog hold for 1, policy again.
    ticks = [(10.00, P, 0), (10.02, P, 0), (10.04, P, 0),
             (10.06, H, 1), (10.08, H, 1),
             (10.10, X, 2),
             (10.12, P, 3), (10.14, P, 3)]
    segments = segments_from_ticks(ticks)
    # Each tick covers [its stamp, the next stamp); the last one the median interval 0.02.
    assert approx_segments(segments) == [
        (P, 0, 10.00, 10.06, 3),
        (H, 1, 10.06, 10.10, 2),
        (X, 2, 10.10, 10.12, 1),
        (P, 3, 10.12, 10.16, 2),
    ]
    assert sum(s.duration for s in segments) == pytest.approx(0.16)


def test_segments_split_on_source_or_id_and_never_run_backwards():
    # A source change without a new id (a stream that does not number segments) splits too;
    # so does a new id with the same source (the arbiter switched and back within a tick).
    segments = segments_from_ticks([(1.0, P, 0), (2.0, H, 0), (3.0, H, 1), (4.0, H, 1)])
    assert [(s.source, s.segment_id, s.start, s.end) for s in segments] == [
        (P, 0, 1.0, 2.0), (H, 0, 2.0, 3.0), (H, 1, 3.0, 5.0)]
    # A clock step backwards is clamped to the previous stamp.
    stepped = segments_from_ticks([(5.0, P, 0), (6.0, P, 0), (4.0, H, 1), (7.0, H, 1)])
    assert [(s.start, s.end) for s in stepped] == [(5.0, 6.0), (6.0, 8.0)]
    assert segments_from_ticks([]) == []
    single = TimelineBuilder()
    single.add(3.0, H, 0)
    assert single.segments() == [Segment(H, 0, 3.0, 3.0, 1)]


def _bag_messages(typestore, topic_type, ticks, *, zero_stamps=False):
    cls = typestore.types[topic_type]
    header = typestore.types['std_msgs/msg/Header']
    time_cls = typestore.types['builtin_interfaces/msg/Time']
    out = []
    for stamp, source, segment_id in ticks:
        sec = 0 if zero_stamps else int(stamp)
        nanosec = 0 if zero_stamps else round((stamp - int(stamp)) * 1e9)
        head = header(stamp=time_cls(sec=sec, nanosec=nanosec), frame_id='')
        if topic_type.endswith('InterventionState'):
            out.append(cls(header=head, active=source == H, source=source,
                           segment_id=segment_id, episode_id='e1', reason='test'))
        else:
            out.append(cls(header=head, source=source, segment_id=segment_id, episode_id='e1',
                           policy_version='3', joint_names=['a'],
                           positions=np.zeros(1, dtype=np.float64)))
    return out


TICKS = [(100.0, P, 0), (100.5, P, 0), (101.0, H, 1), (101.5, H, 1), (102.0, P, 2)]


def test_timeline_from_a_recorded_bag(tmp_path):
    typestore = habc_typestore()
    bag = tmp_path / 'e1'
    with EpisodeBagWriter(bag, typestore) as writer:
        writer.add_topic('/robot1/intervention', 'habc_msgs/msg/InterventionState')
        writer.add_topic('/robot1/executed_action', 'habc_msgs/msg/ExecutedAction')
        for k, msg in enumerate(_bag_messages(typestore, 'habc_msgs/msg/InterventionState',
                                              TICKS)):
            writer.write('/robot1/intervention', 5_000_000_000 + k, msg)
        # Executed actions say something else: the intervention topic wins when present.
        for k, msg in enumerate(_bag_messages(typestore, 'habc_msgs/msg/ExecutedAction',
                                              [(100.0, H, 7)])):
            writer.write('/robot1/executed_action', 5_000_000_000 + k, msg)
    timeline = timeline_from_bag(bag, 'e1')
    assert timeline.episode_id == 'e1' and timeline.origin == 100.0
    assert approx_segments(timeline.segments) == [
        (P, 0, 100.0, 101.0, 2), (H, 1, 101.0, 102.0, 2), (P, 2, 102.0, 102.5, 1)]
    assert timeline.duration == pytest.approx(2.5)


def test_timeline_falls_back_to_executed_actions_and_receive_times(tmp_path):
    typestore = habc_typestore()
    bag = tmp_path / 'e2'
    with EpisodeBagWriter(bag, typestore) as writer:
        writer.add_topic('/executed_action', 'habc_msgs/msg/ExecutedAction')
        writer.add_topic('/intervention', 'habc_msgs/msg/InterventionState')  # empty
        for stamp_s, msg in zip((7.0, 7.25, 7.5), _bag_messages(
                typestore, 'habc_msgs/msg/ExecutedAction',
                [(0, P, 0), (0, H, 1), (0, H, 1)], zero_stamps=True), strict=True):
            writer.write('/executed_action', int(stamp_s * 1e9), msg)
    timeline = timeline_from_bag(bag)
    assert timeline.episode_id == 'e2'
    assert approx_segments(timeline.segments) == [(P, 0, 7.0, 7.25, 1), (H, 1, 7.25, 7.75, 2)]
    with pytest.raises(FileNotFoundError):
        timeline_from_bag(tmp_path / 'missing')


# Live state -----------------------------------------------------------------------------------

def test_live_state_follows_events_and_ticks():
    live = LiveState()
    assert live.controller(0.0) == (None, 'no arbiter ticks yet')
    live.on_intervention(99.0, P, 0, '', 'policy', received=1.0)  # between episodes
    assert live.live_timeline() is None and live.episode_id == ''
    live.on_event(RecorderEvent.START, 'r-1', 100.0, policy_version='3')
    live.on_intervention(100.0, P, 0, 'r-1', '', received=1.0)
    live.on_intervention(100.5, H, 1, 'r-1', 'pedal', received=1.5)
    assert live.controller(1.6) == (H, 'HUMAN (pedal)')
    assert live.controller(3.0) == (None, 'no arbiter ticks for 2 s')
    assert live.elapsed(112.5) == pytest.approx(12.5)
    assert live.live_timeline().sources() == [P, H]
    live.on_event(RecorderEvent.END, 'r-1', 110.0, num_steps=500, num_interventions=1,
                  policy_version='3')
    assert (live.episode_id, live.last_finished_id) == ('', 'r-1')
    assert live.last_finished_duration == pytest.approx(10.0)
    assert live.elapsed(120.0) is None
    # The finished episode's timeline stays until the next episode starts.
    live.on_intervention(110.1, P, 0, 'r-1', '', received=2.0)  # a late tick: not resumed
    assert live.episode_id == '' and live.live_timeline().episode_id == 'r-1'
    live.on_event(RecorderEvent.LABELLED, 'r-1', 111.0)
    assert live.last_finished_id == 'r-1'
    live.on_event(RecorderEvent.START, 'r-2', 120.0)
    assert live.live_timeline() is None and live.timeline_episode == 'r-2'


def test_live_state_picks_up_an_episode_whose_start_it_missed():
    live = LiveState()
    live.on_intervention(50.0, H, 4, 'r-9', 'leader_deviation', received=0.0)
    assert (live.episode_id, live.started_at) == ('r-9', 50.0)
    # The latched END of an episode whose START this dashboard never saw.
    live.on_event(RecorderEvent.END, 'r-9', 60.0)
    assert live.last_finished_id == 'r-9'


def test_label_target_prefers_selection_then_last_finished_then_index():
    assert label_target('sel', 'last', 'newest') == 'sel'
    assert label_target('', 'last', 'newest') == 'last'
    assert label_target('', '', 'newest') == 'newest'
    assert label_target('', '', '') == ''


# Per-version stats ----------------------------------------------------------------------------

def record(episode_id, version, outcome, takeovers, started, status='complete', robot='r'):
    return EpisodeRecord(episode_id, f'/bags/{episode_id}', robot, 'task', outcome, '', '',
                         100, takeovers, version, status, started, started + 5.0, None, None)


def test_version_stats_count_outcomes_and_takeovers_in_running_order():
    records = [
        record('a', '2', 'success', 1, 30.0),
        record('b', '2', 'failure', 3, 31.0),
        record('c', '2', 'discarded', 9, 32.0),  # said nothing about the policy
        record('d', '2', 'unlabelled', 2, 33.0),    # not labelled yet: takeovers count
        record('e', 'sft', 'failure', 4, 10.0),
        record('f', 'sft', 'failure', 2, 11.0),
        record('g', '10', 'success', 0, 40.0),
        record('h', '10', 'success', 0, 41.0, status='recording'),  # still running
        record('i', '', 'success', 1, 5.0, status='incomplete'),
    ]
    stats = version_stats(records)
    # 'sft' ran before '2', which ran before '10': the order they ran in, not by name.
    assert [s.version for s in stats] == ['-', 'sft', '2', '10']
    by = {s.version: s for s in stats}
    assert (by['2'].episodes, by['2'].successes, by['2'].failures, by['2'].discarded) == (
        3, 1, 1, 1)
    assert by['2'].success_rate == pytest.approx(0.5)
    assert by['2'].takeovers_per_episode == pytest.approx(2.0)  # (1 + 3 + 2) / 3
    assert by['sft'].success_rate == 0.0 and by['sft'].takeovers_per_episode == 3.0
    assert by['10'].episodes == 1 and by['10'].success_rate == 1.0
    assert by['-'].labelled == 1
    only_unlabelled = version_stats([record('x', '4', 'unlabelled', 1, 1.0)])
    assert only_unlabelled[0].success_rate is None


# Status topics and namespaces -------------------------------------------------------------------

def test_status_summaries_of_the_learner_and_the_policy():
    learner = parse_status(json.dumps({
        'state': 'training', 'version': 3, 'round': 2, 'episodes': 14, 'pending': 1,
        'episodes_per_round': 4, 'method': 'habc', 'progress': {'step': 50, 'steps': 200},
        'metrics': {'zeta': 1, 'losses/actor': 0.123456, 'round/episodes': 14.0}}))
    rows, metrics = learner_summary(learner)
    assert dict(rows) == {'learner': 'training (step 50/200), habc',
                          'learner version': '3 (round 2)',
                          'episodes': '14 trained on, 1 of 4 new'}
    assert metrics == [('round/episodes', '14'), ('losses/actor', '0.1235'), ('zeta', '1')]
    policy = parse_status(json.dumps({
        'active_version': '3', 'staged_version': None,
        'last_update': {'version': '4', 'result': 'rejected', 'reason': 'sha256 mismatch'}}))
    assert policy_summary(policy) == [('policy', 'version 3 active'),
                                      ('last update', '4 rejected: sha256 mismatch')]
    assert policy_summary({}) == [('policy', 'no policy loaded')]
    assert 'not JSON' in parse_status('{oops')['error']
    assert parse_status('[1]') == {'error': 'status is not a JSON object'}


def test_namespaces():
    assert normalize_namespace(' robot1/ ') == '/robot1'
    assert normalize_namespace('/lab/robot_2') == '/lab/robot_2'
    assert normalize_namespace('') == normalize_namespace('/') == '/'
    for bad in ('robot 1', '1robot', 'a//b', 'a-b'):
        with pytest.raises(ValueError, match='not a ROS namespace'):
            normalize_namespace(bad)
    assert qualified('/', 'recorder/events') == '/recorder/events'
    assert qualified('robot1', 'intervention') == '/robot1/intervention'
    assert namespaces_with(['/recorder/events', '/r2/recorder/events', '/r1/intervention',
                            '/lab/r1/recorder/events', '/r3/other/events']) == [
        '/', '/lab/r1', '/r2']


def test_robot_label_of_a_namespace_is_the_recorders_default():
    # The recorder labels its episodes robot_label(robot parameter, namespace).
    for namespace, label in (('/', 'robot'), ('/robot1', 'robot1'),
                             ('/lab/robot1', 'lab_robot1'), ('/a.b', 'a.b')):
        assert robot_of_namespace(namespace) == label
