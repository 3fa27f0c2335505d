"""The dashboard's plain model: timelines, live state, p_v, help alerts, stats (no Qt, rclpy)."""

import json

import numpy as np
import pytest

from habc_episodes.bag_format import EpisodeBagWriter, habc_typestore
from habc_episodes.index import EpisodeRecord
from habc_episodes.stats import version_stats
from habc_episodes.vocabulary import Controller, RecorderEvent
from rqt_habc.model import (
    CLEARED,
    CLEARED_NOTE_S,
    critic_problem,
    decimate,
    fleet_index_paths,
    fleet_root_problem,
    fleet_rows,
    FleetLive,
    help_spans,
    help_threshold,
    HelpAlerts,
    HelpBanner,
    HelpMark,
    HelpSpan,
    index_sources,
    label_target,
    learner_summary,
    live_namespaces,
    live_topic_candidates,
    LiveState,
    merge_records,
    namespaces_with,
    normalize_namespace,
    parse_status,
    policy_summary,
    qualified,
    RAISED,
    robot_name,
    robot_of_namespace,
    Segment,
    segments_from_ticks,
    selector_items,
    STALE_AFTER_S,
    stats_by_robot,
    timeline_from_bag,
    TimelineBuilder,
    version_summary,
    viability_from_bag,
    viability_note,
    ViabilitySeries,
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


# Viability and help requests --------------------------------------------------------------------

def test_viability_series_orders_dedupes_and_caps():
    series = ViabilitySeries(max_points=4)
    assert series.latest() is None and not series.has_estimate()
    assert series.add(10.0, float('nan'))   # no critic: a gap, not an estimate
    assert not series.has_estimate()
    assert series.add(10.2, 0.5) and series.add(10.1, 0.4)  # a trace reaching back
    # The chunk of an observation a trace carried already: its stamp rounded to ns.
    assert not series.add(10.2 + 4e-10, 0.9)
    assert [p for p, _ in series.points()] == [10.0, 10.1, 10.2]
    assert series.latest() == (10.2, 0.5) and series.has_estimate()
    revision = series.revision
    assert series.points() is series.points()  # one copy per revision
    series.add(10.3, 0.6)
    series.add(10.4, 0.7)  # five points: the oldest (the NaN) goes
    assert series.revision == revision + 2
    assert series.points() == ((10.1, 0.4), (10.2, 0.5), (10.3, 0.6), (10.4, 0.7))
    series = ViabilitySeries(max_points=1)
    series.add(1.0, 0.3)
    series.add(2.0, float('nan'))
    assert not series.has_estimate()  # the dropped point was the only estimate


def test_live_viability_belongs_to_the_recording_episode():
    live = LiveState()
    live.on_chunk(99.0, 0.9)  # between episodes: no episode to show it with
    assert len(live.viability) == 0
    live.on_event(RecorderEvent.START, 'r-1', 100.0)
    revision = live.revision
    live.on_chunk(100.1, 0.8)
    live.on_chunk(100.2, 0.7)
    assert live.revision == revision + 2
    # A help request's trace fills in what the dashboard missed, not before the start.
    live.on_help_trace([99.5, 100.0, 100.15, 100.2], [0.1, 0.85, 0.75, 0.7])
    assert live.viability.points() == ((100.0, 0.85), (100.1, 0.8), (100.15, 0.75),
                                       (100.2, 0.7))
    live.on_event(RecorderEvent.END, 'r-1', 101.0)
    live.on_chunk(101.1, 0.2)  # after the end: not this episode's
    assert len(live.viability) == 4
    live.on_event(RecorderEvent.START, 'r-2', 110.0)
    assert len(live.viability) == 0


def _mark(ns, stamp, active, reason, p_v=0.2, received=0.0, version='3'):
    return HelpMark(ns, stamp, active, reason, p_v, version, received)


def test_help_alerts_raise_clear_and_say_why():
    alerts = HelpAlerts()
    assert alerts.banner(0.0, 0.0) == HelpBanner('')
    # A clearing of a request raised before this dashboard's history: nothing to clear.
    assert alerts.on_help(_mark('/robot1', 5.0, False, 'answered')) == ''
    assert alerts.on_help(_mark('/robot1', 10.0, True, 'low', 0.12, received=1.0)) == RAISED
    assert alerts.on_help(_mark('/robot1', 10.0, True, 'low', 0.12, received=1.1)) == ''
    assert alerts.on_help(_mark('/', 12.0, True, 'stalled', 0.41, received=2.0)) == RAISED
    banner = alerts.banner(now=74.5, received_now=3.0)
    assert banner.level == RAISED and banner.namespaces == ('/robot1', '/')
    assert banner.lines == (
        'robot1 asks for help: p_v low (0.12), waiting 1:04 (policy 3)',
        'robot (/) asks for help: p_v not rising (0.41), waiting 1:02 (policy 3)')
    # A raise while one is open continues it: the request started at 10 s.
    assert alerts.on_help(_mark('/robot1', 11.0, True, 'stalled')) == ''
    assert alerts.open['/robot1'].stamp == 10.0
    assert alerts.on_help(_mark('/robot1', 13.0, False, 'answered', received=4.0)) == CLEARED
    assert alerts.banner(80.0, 4.0).namespaces == ('/',)  # open ones hide the cleared
    assert alerts.on_help(_mark('/', 14.0, False, 'recovered', 0.52, received=5.0)) == CLEARED
    banner = alerts.banner(80.0, 4.0 + CLEARED_NOTE_S)
    assert banner.level == CLEARED
    assert banner.lines == ('robot1: help request (p_v low) answered: a human took over',
                            'robot (/): help request (p_v not rising) recovered: p_v back up '
                            'to 0.52')
    assert alerts.banner(80.0, 4.0 + CLEARED_NOTE_S + 0.1).lines == banner.lines[1:]
    assert alerts.banner(80.0, 5.0 + CLEARED_NOTE_S + 0.1) == HelpBanner('')
    assert [m.stamp for m in alerts.events('/robot1')] == [5.0, 10.0, 11.0, 13.0]
    assert help_spans(alerts.events('/robot1')) == [HelpSpan(10.0, 13.0, 'low', 'answered',
                                                             0.12)]
    assert robot_name('/lab/r1') == 'lab_r1 (/lab/r1)'


def test_help_spans_of_raises_and_clearings():
    marks = [_mark('/', 1.0, False, 'reset'), _mark('/', 2.0, True, 'low', 0.1),
             _mark('/', 3.0, False, 'recovered'), _mark('/', 5.0, True, 'stalled', 0.4)]
    assert help_spans(marks) == [HelpSpan(2.0, 3.0, 'low', 'recovered', 0.1),
                                 HelpSpan(5.0, None, 'stalled', '', 0.4)]
    assert help_spans([]) == []


def test_decimate_keeps_the_shape_and_breaks_at_nan():
    nan = float('nan')
    points = [(0.0, 0.5), (0.1, 0.9), (0.2, 0.1), (0.3, 0.4),   # bucket 0 of [0, 4)
              (1.5, 0.6), (2.0, nan), (2.5, 0.3), (3.0, 0.35), (9.0, 1.0)]
    assert decimate(points, 0.0, 4.0, 4, max_gap_s=10.0) == [
        [(0.0, 0.5), (0.1, 0.9), (0.2, 0.1), (0.3, 0.4), (1.5, 0.6)],
        [(2.5, 0.3), (3.0, 0.35)]]
    # 1.2 s without a p_v (a takeover) is a gap too, with the default 1 s.
    assert decimate(points, 0.0, 4.0, 4) == [
        [(0.0, 0.5), (0.1, 0.9), (0.2, 0.1), (0.3, 0.4)], [(1.5, 0.6)],
        [(2.5, 0.3), (3.0, 0.35)]]
    many = [(k * 0.001, (k % 7) / 7) for k in range(10_000)]
    lines = decimate(many, 0.0, 10.0, 100)
    assert len(lines) == 1 and len(lines[0]) <= 400
    assert min(v for _, v in lines[0]) == 0.0 and max(v for _, v in lines[0]) == 6 / 7
    assert decimate(points, 5.0, 8.0, 10) == []


def test_critic_and_threshold_from_policy_status():
    assert critic_problem({}) is None
    assert critic_problem({'critic': 'ok'}) == ''
    assert critic_problem({'critic': None}) == 'no policy loaded'
    assert critic_problem({'critic': 'inline weights carry no critic'}) == (
        'inline weights carry no critic')
    assert critic_problem({'help': {'critic_problem': 'no critic head'}}) == 'no critic head'
    assert help_threshold({'help': {'requested': False}}) is None
    assert help_threshold({'help': {'threshold': 0.3}}) == 0.3
    assert help_threshold({'help_threshold': 0.25}) == 0.25
    assert help_threshold({'help_threshold': True}) is None
    assert help_threshold({'help': {'threshold': 3}}) is None
    assert dict(policy_summary({'active_version': '3', 'critic': 'ok'}))['critic'] == 'ok'
    series = ViabilitySeries()
    assert viability_note(series, None) == 'no p_v yet: no action chunk in this episode'
    series.add(1.0, float('nan'))
    assert viability_note(series, 'no critic head') == 'no critic: no critic head'
    assert viability_note(series, None) == 'no critic (policy/status has not said why yet)'
    series.add(2.0, 0.4)
    assert viability_note(series, 'stale reason') == ''


def _help_msg(typestore, stamp, active, reason, p_v, trace=()):
    types = typestore.types
    head = types['std_msgs/msg/Header'](stamp=types['builtin_interfaces/msg/Time'](
        sec=int(stamp), nanosec=round((stamp % 1) * 1e9)), frame_id='')
    return types['habc_msgs/msg/HelpRequest'](
        header=head, active=active, reason=reason, policy_version='3', viability=p_v,
        trace_stamps=np.array([t for t, _ in trace], dtype=np.float64),
        trace_viability=np.array([v for _, v in trace], dtype=np.float32))


def _chunk_msg(typestore, stamp, p_v):
    types = typestore.types
    head = types['std_msgs/msg/Header'](stamp=types['builtin_interfaces/msg/Time'](
        sec=int(stamp), nanosec=round((stamp % 1) * 1e9)), frame_id='')
    return types['habc_msgs/msg/ActionChunk'](
        header=head, policy_version='3', chunk_id=0, horizon=1, action_dim=1,
        joint_names=['a'], dt=0.02, actions=np.zeros(1, dtype=np.float32), skipped_steps=0,
        late=False, inference_s=0.01, turnaround_s=0.01, viability=p_v,
        efficiency_value=-3.0)


def test_viability_of_a_recorded_bag_from_chunks_and_help_requests(tmp_path):
    typestore = habc_typestore()
    bag = tmp_path / 'e3'
    values = [0.8, 0.5, 0.25, 0.2, 0.15, 0.6]
    with EpisodeBagWriter(bag, typestore) as writer:
        writer.add_topic('/robot1/policy/chunk', 'habc_msgs/msg/ActionChunk')
        writer.add_topic('/robot1/help_request', 'habc_msgs/msg/HelpRequest')
        for k, p_v in enumerate(values):
            stamp = 100.0 + 0.5 * k
            writer.write('/robot1/policy/chunk', int(stamp * 1e9) + 1000,
                         _chunk_msg(typestore, stamp, p_v))
        writer.write('/robot1/help_request', 101_600_000_000, _help_msg(
            typestore, 101.5, True, 'low', 0.2, [(101.0, 0.25), (101.5, 0.2)]))
        writer.write('/robot1/help_request', 102_100_000_000, _help_msg(
            typestore, 102.0, False, 'answered', 0.15))
    trace = viability_from_bag(bag, 'e3')
    assert trace.source == 'habc_msgs/msg/ActionChunk' and trace.note == ''
    assert [t for t, _ in trace.points] == pytest.approx([100.0 + 0.5 * k for k in range(6)])
    assert [v for _, v in trace.points] == pytest.approx(values)
    assert [(m.namespace, m.stamp, m.active, m.reason) for m in trace.help] == [
        ('/robot1', 101.5, True, 'low'), ('/robot1', 102.0, False, 'answered')]
    assert help_spans(trace.help) == [HelpSpan(101.5, 102.0, 'low', 'answered',
                                               pytest.approx(0.2))]


def test_viability_of_a_bag_without_chunks_or_critic(tmp_path):
    typestore = habc_typestore()
    only_help = tmp_path / 'e4'
    with EpisodeBagWriter(only_help, typestore) as writer:
        writer.add_topic('/help_request', 'habc_msgs/msg/HelpRequest')
        writer.write('/help_request', 5, _help_msg(typestore, 50.0, True, 'stalled', 0.4,
                                                   [(48.0, 0.41), (49.0, 0.4), (50.0, 0.4)]))
    trace = viability_from_bag(only_help)
    # The traces are all there is: policy/chunk was not recorded.
    assert trace.source == 'habc_msgs/msg/HelpRequest' and trace.episode_id == 'e4'
    assert [t for t, _ in trace.points] == [48.0, 49.0, 50.0]
    assert trace.help[0].namespace == '/'
    no_critic = tmp_path / 'e5'
    with EpisodeBagWriter(no_critic, typestore) as writer:
        writer.add_topic('/policy/chunk', 'habc_msgs/msg/ActionChunk')
        writer.write('/policy/chunk', 5, _chunk_msg(typestore, 0.0, float('nan')))
    trace = viability_from_bag(no_critic)
    assert trace.note == 'no critic: the recorded chunks carry no p_v'
    assert trace.points[0][0] == pytest.approx(5e-9)  # zero stamp: the receive time
    nothing = tmp_path / 'e6'
    with EpisodeBagWriter(nothing, typestore) as writer:
        writer.add_topic('/intervention', 'habc_msgs/msg/InterventionState')
    assert viability_from_bag(nothing).note == (
        'no p_v in the bag: policy/chunk was not recorded and no help request was raised')
    with pytest.raises(FileNotFoundError):
        viability_from_bag(tmp_path / 'missing')


# Fleet ------------------------------------------------------------------------------------------

def test_live_robots_are_namespaces_whose_policy_or_arbiter_publishes():
    topics = ['/robot1/policy/status', '/robot1/intervention', '/robot2/intervention',
              '/robot3/policy/status', '/policy/update', '/learner/status',
              '/robot1/recorder/events', '/lab/r4/policy/status', '/robot5/policy/chunk']
    assert live_topic_candidates(topics) == [
        '/lab/r4/policy/status', '/robot1/intervention', '/robot1/policy/status',
        '/robot2/intervention', '/robot3/policy/status']
    # /robot3's name is only there for this dashboard's own subscription: no publisher.
    counts = {'/lab/r4/policy/status': 1, '/robot1/intervention': 1,
              '/robot1/policy/status': 1, '/robot2/intervention': 1,
              '/robot3/policy/status': 0}
    assert live_namespaces(counts) == ['/lab/r4', '/robot1', '/robot2']
    # A single robot without a namespace is the root; the fleet learner at the root is not.
    assert live_namespaces({'/intervention': 1, '/policy/update': 1}) == ['/']
    assert selector_items(['/robot2', '/robot1'], '/robot1') == ['/robot1', '/robot2']
    assert selector_items(['/robot2'], '/robot9') == ['/robot2', '/robot9']  # stays listed


def test_fleet_live_keeps_the_newest_state_of_each_robot():
    fleet = FleetLive()
    fleet.on_event('/robot1', RecorderEvent.START, 'robot1-a', '3')
    assert fleet.robots['/robot1'].episode_id == 'robot1-a'
    fleet.on_intervention('/robot1', P, 'robot1-a', 'start', received=10.0)
    revision = fleet.revision
    for k in range(100):  # ticks like the last one: nothing to redraw
        fleet.on_intervention('/robot1', P, 'robot1-a', 'start', received=10.0 + 0.02 * k)
    assert fleet.revision == revision
    fleet.on_intervention('/robot1', H, 'robot1-a', 'engage', received=12.0)
    assert fleet.revision == revision + 1
    # After a silence the next tick redraws even unchanged ('no arbiter ticks' goes).
    fleet.on_intervention('/robot1', H, 'robot1-a', 'engage', received=12.0 + 2 * STALE_AFTER_S)
    assert fleet.revision == revision + 2
    fleet.on_event('/robot1', RecorderEvent.END, 'robot1-a', '3')
    robot1 = fleet.robots['/robot1']
    assert (robot1.episode_id, robot1.last_ended_id) == ('', 'robot1-a')
    # A tick of the ended episode (it was in flight) does not restart it.
    fleet.on_intervention('/robot1', X, 'robot1-a', 'idle', received=13.0)
    assert robot1.episode_id == ''
    # A START missed (latched events keep one): the arbiter's tick names the episode.
    fleet.on_intervention('/robot1', P, 'robot1-b', 'start', received=14.0)
    assert robot1.episode_id == 'robot1-b'
    # A dashboard that starts after a label gets only that latched event.
    fleet.on_event('/robot2', RecorderEvent.LABELLED, 'robot2-x')
    assert fleet.robots['/robot2'].last_ended_id == 'robot2-x'
    fleet.on_event('/robot2', RecorderEvent.START, 'robot2-y', '4')
    fleet.on_event('/robot2', RecorderEvent.LABELLED, 'robot2-x')  # relabel of an old one
    assert fleet.robots['/robot2'].episode_id == 'robot2-y'
    fleet.on_policy_status('/robot2', {'active_version': 4, 'staged_version': None})
    assert fleet.robots['/robot2'].active_version == '4'
    assert fleet.retain(['/robot2']) == ['/robot1'] and list(fleet.robots) == ['/robot2']


def test_fleet_rows_per_robot_with_hand_counted_stats():
    records = [
        record('robot1-1', '1', 'success', 1, 10.0, robot='robot1'),
        record('robot1-2', '1', 'failure', 3, 11.0, robot='robot1'),
        record('robot1-3', '2', 'success', 0, 12.0, robot='robot1'),
        record('robot1-4', '2', 'success', 1, 13.0, robot='robot1'),
        record('robot1-5', '2', 'unlabelled', 2, 14.0, robot='robot1'),
        record('robot2-1', '2', 'failure', 4, 20.0, robot='robot2'),
        record('robot2-2', '2', 'discarded', 9, 21.0, robot='robot2'),
        record('other-1', '2', 'success', 0, 22.0, robot='other'),  # not live: no row
    ]
    stats = stats_by_robot(records)
    fleet = FleetLive()
    fleet.on_event('/robot1', RecorderEvent.START, 'robot1-6', '2')
    fleet.on_intervention('/robot1', H, 'robot1-6', 'engage', received=100.0)
    fleet.on_policy_status('/robot1', {'active_version': '2'})
    fleet.on_event('/robot2', RecorderEvent.END, 'robot2-2', '2')
    fleet.on_intervention('/robot2', X, '', 'idle', received=100.2)
    rows = fleet_rows(['/robot2', '/robot1', '/robot3'], fleet, stats, received_now=100.5)
    assert [r.namespace for r in rows] == ['/robot1', '/robot2', '/robot3']
    robot1, robot2, robot3 = rows
    # robot1, v1: 1 of 2 labelled succeeded, (1 + 3) / 2 takeovers; v2: 2 of 2 labelled,
    # (0 + 1 + 2) / 3 takeovers (the unlabelled episode counts for takeovers). Newest first.
    assert robot1.cells() == (
        'robot1', 'robot1-6 (running)', 'human (engage)', '2',
        'v2: 100% (2/2), 1/ep; v1: 50% (1/2), 2/ep')
    assert robot1.versions_detail == (
        'v2: success 100% (2/2), takeovers/episode 1 (n=3), 0 discarded\n'
        'v1: success 50% (1/2), takeovers/episode 2 (n=2), 0 discarded')
    assert robot1.source == H
    # robot2: no policy/status yet, the version of its last episode; the discarded one
    # says nothing about the policy.
    assert robot2.cells() == (
        'robot2', 'robot2-2 (ended)', 'idle', '2', 'v2: 0% (0/1), 4/ep')
    assert robot2.versions_detail == (
        'v2: success 0% (0/1), takeovers/episode 4 (n=1), 1 discarded')
    assert robot3.cells() == ('robot3', '-', 'no arbiter ticks yet', '-', '-')
    assert robot3.source is None and robot3.versions_detail == 'no finished episode'
    # Silent for longer than STALE_AFTER_S: not known who controls it.
    stale = fleet_rows(['/robot1'], fleet, stats, received_now=100.0 + STALE_AFTER_S + 2.2)
    assert stale[0].controller == 'no arbiter ticks for 3 s' and stale[0].source is None
    # The single-robot store: namespace '/', robot label 'robot'.
    single = fleet_rows(['/'], FleetLive(), stats_by_robot(
        [record('robot-1', '1', 'success', 0, 1.0, robot='robot')]), 0.0)
    assert single[0].robot == 'robot (/)'
    assert single[0].versions == 'v1: 100% (1/1), 0/ep'


def test_version_summary_keeps_the_newest_versions():
    stats = version_stats([record(str(v), str(v), 'success', 0, float(v)) for v in range(1, 6)]
                          + [record('x', '5', 'unlabelled', 3, 9.0)])
    assert version_summary(stats, shown=2) == (
        'v5: 100% (1/1), 1.5/ep; v4: 100% (1/1), 0/ep; +3 older')
    assert version_summary(version_stats([record('y', '7', 'unlabelled', 1, 1.0)])) == (
        'v7: none labelled of 1, 1/ep')
    assert version_summary([]) == '-'


def test_fleet_stores_and_merged_records(tmp_path):
    root = tmp_path / 'fleet'
    assert 'does not exist' in fleet_root_problem(root)
    assert f'searched {root}/*/episodes.sqlite' in fleet_root_problem(root)
    (root / 'robot2').mkdir(parents=True)
    assert fleet_index_paths(root) == []
    assert fleet_root_problem(root).startswith('no episode index under the fleet root yet')
    for robot in ('robot2', 'robot1'):
        (root / robot).mkdir(exist_ok=True)
        (root / robot / 'episodes.sqlite').write_bytes(b'')
    (root / 'notes').mkdir()
    stores = fleet_index_paths(root)
    assert stores == [root / 'robot1' / 'episodes.sqlite', root / 'robot2' / 'episodes.sqlite']
    # The same file named twice (directly and through the root) is read once.
    again = tmp_path / 'fleet' / 'robot1' / '..' / 'robot1' / 'episodes.sqlite'
    assert index_sources([None, again, *stores]) == [again, stores[1]]
    first = [record('robot1-2', '1', 'success', 0, 5.0), record('robot1-1', '1', '', 0, 1.0)]
    second = [record('robot2-1', '1', 'failure', 0, 3.0),
              record('robot1-2', '9', 'failure', 0, 5.0)]  # a copy: the first store's wins
    merged = merge_records([first, second])
    assert [(r.episode_id, r.policy_version) for r in merged] == [
        ('robot1-2', '1'), ('robot2-1', '1'), ('robot1-1', '1')]
