"""The dashboard offscreen against a real episode_recorder_node process on loopback DDS.

One short episode (policy -> human -> policy) goes through EpisodeControl START/END; the
dashboard shows it live, its Success button labels it through the recorder's real service
(the label lands in the SQLite index), its F key relabels it, and the timeline of the
recorded bag has the three segments. The policy's chunks carry a falling p_v and a help
request is raised before the takeover and answered by it: the recorder keeps both in the
bag, and the dashboard shows the episode's p_v trace with the request marked.
"""

import os
import signal
import time

from builtin_interfaces.msg import Time
import pytest
from rclpy.duration import Duration
from ros_helpers import Child, ROOT

from habc_common.qos import COMMANDS, LATCHED_EVENTS
from habc_episodes.index import EpisodeIndex
from habc_episodes.vocabulary import Controller
from habc_msgs.msg import ActionChunk, ExecutedAction, HelpRequest, InterventionState
from habc_msgs.srv import EpisodeControl
from rqt_habc.model import help_spans, HelpSpan, timeline_from_bag, viability_from_bag

RECORDER = ROOT / 'install' / 'habc_policy' / 'lib' / 'habc_policy' / 'episode_recorder_node'
P, H = Controller.POLICY, Controller.HUMAN
# 5 ticks each of policy, human, policy at 50 Hz: segment boundaries at +0.1 s and +0.2 s.
SCRIPT = [(P, 0)] * 5 + [(H, 1)] * 5 + [(P, 2)] * 5
DT = 0.02
# p_v of the chunk planned at each tick; help is asked at tick 3 and answered at tick 5.
P_V = [0.9 - 0.05 * k for k in range(len(SCRIPT))]
RAISE_AT, ANSWER_AT = 3, 5


@pytest.mark.ros
def test_dashboard_labels_a_real_recorded_episode(qapp, ros, tmp_path):
    from python_qt_binding.QtCore import Qt
    from python_qt_binding.QtTest import QTest

    from rqt_habc.ros_adapter import DashboardRos
    from rqt_habc.widget import DashboardWidget

    assert RECORDER.is_file(), f'{RECORDER} missing: build the workspace (make setup)'
    ns = f'dash{os.getpid()}'
    storage = tmp_path / 'episodes'
    recorder = Child([str(RECORDER), '--ros-args', '-r', f'__ns:=/{ns}',
                      '-p', f'storage_dir:={storage}'])
    node = ros.create_node('dashboard_test_driver')

    def pump(predicate, what, detail=None):
        """Wait while Qt's event loop runs (the dashboard's QTimer spins its own node)."""
        ros.wait_for(predicate, what, poll=qapp.processEvents, children=[recorder],
                     detail=detail)

    def call(request):
        return ros.call(control, request, poll=qapp.processEvents)

    dashboard = widget = None
    try:
        recorder.wait_for('ready')
        intervention = node.create_publisher(InterventionState, f'/{ns}/intervention',
                                             COMMANDS)
        executed = node.create_publisher(ExecutedAction, f'/{ns}/executed_action', COMMANDS)
        chunks = node.create_publisher(ActionChunk, f'/{ns}/policy/chunk', COMMANDS)
        helps = node.create_publisher(HelpRequest, f'/{ns}/help_request', LATCHED_EVENTS)
        control = node.create_client(EpisodeControl, f'/{ns}/recorder/episode_control')

        dashboard = DashboardRos(namespace=ns, context=ros.context)
        widget = DashboardWidget(dashboard, storage / 'episodes.sqlite', labeler='tester',
                                 poll_ms=20, refresh_ms=300)
        widget.resize(1000, 700)
        widget.show()
        widget.activateWindow()
        assert QTest.qWaitForWindowActive(widget, 2000)
        # Recorder and dashboard both listen to `intervention`, `policy/chunk` and
        # `help_request`; the recorder to the rest.
        pump(lambda: (dashboard.recorder_ready() and control.service_is_ready()
                      and intervention.get_subscription_count() >= 2
                      and chunks.get_subscription_count() >= 2
                      and helps.get_subscription_count() >= 2
                      and executed.get_subscription_count() >= 1),
             'the recorder and the dashboard matched')

        started = call(EpisodeControl.Request(command=EpisodeControl.Request.COMMAND_START))
        assert started.accepted, started.message
        episode_id = started.episode_id
        pump(lambda: widget.live.episode_id == episode_id, 'the live episode on the dashboard')
        assert widget.episode_label.text() == episode_id

        t0 = time.time()
        saw_human = False
        for k, (source, segment) in enumerate(SCRIPT):
            stamp_s = t0 + k * DT
            stamp = Time(sec=int(stamp_s), nanosec=int(round(stamp_s % 1 * 1e9)) % 10**9)
            msg = InterventionState(active=source == H, source=source, segment_id=segment,
                                    episode_id=episode_id, reason='pedal' if source == H
                                    else 'policy')
            msg.header.stamp = stamp
            intervention.publish(msg)
            action = ExecutedAction(source=source, segment_id=segment, episode_id=episode_id,
                                    policy_version='7', joint_names=['a'], positions=[0.1 * k])
            action.header.stamp = stamp
            executed.publish(action)
            chunk = ActionChunk(policy_version='7', chunk_id=k, viability=P_V[k],
                                efficiency_value=-float(len(SCRIPT) - k))
            chunk.header.stamp = stamp
            chunks.publish(chunk)
            if k in (RAISE_AT, ANSWER_AT):
                help_msg = HelpRequest(active=k == RAISE_AT,
                                       reason='low' if k == RAISE_AT else 'answered',
                                       policy_version='7', viability=P_V[k])
                help_msg.header.stamp = stamp
                helps.publish(help_msg)
            if k == 7:  # mid-takeover: the dashboard says the human drives
                pump(lambda: widget.controller_label.text() == 'HUMAN (pedal)',
                     'HUMAN (pedal) on the dashboard')
                saw_human = True
            qapp.processEvents()
        assert saw_human
        pump(lambda: widget.live.timeline.count == len(SCRIPT), 'every tick on the dashboard')
        live = widget.live.live_timeline()
        assert [(s.source, s.segment_id, s.ticks) for s in live.segments] == [
            (P, 0, 5), (H, 1, 5), (P, 2, 5)]
        # Every tick has reached the recorder (another process) before END: it has no live
        # step count to wait on, and a CI run once saw it handle END before 10 queued ticks
        # (after a fixed 0.5 s). Acknowledged means in its reader's queue; its executor
        # takes queued messages before a service request that comes after them.
        for publisher in (intervention, executed, chunks, helps):
            ros.wait_for(lambda p=publisher: p.wait_for_all_acked(Duration(seconds=1)),
                         f'acknowledgement of every tick on {publisher.topic_name}')

        ended = call(EpisodeControl.Request(command=EpisodeControl.Request.COMMAND_END))
        assert ended.accepted, ended.message
        assert f'{len(SCRIPT)} steps, 1 interventions' in ended.message
        pump(lambda: widget.live.last_finished_id == episode_id
             and widget.table.rowCount() == 1, 'the finished episode in the table')
        assert widget.table.item(0, 0).text() == episode_id
        assert widget.target() == (episode_id, 'last finished')

        # Success, clicked: the label goes through recorder/label_episode into the index.
        widget.note_edit.setText('clean handover')
        QTest.mouseClick(widget.buttons['success'], Qt.LeftButton)
        pump(lambda: widget.pending_label is None, 'the answer to the label request')
        assert widget.last_message == f'episode {episode_id} labelled success by tester'
        with EpisodeIndex(storage / 'episodes.sqlite') as index:
            row = index.get(episode_id)
        assert (row.outcome, row.labeler, row.note, row.num_steps, row.num_interventions,
                row.policy_version) == ('success', 'tester', 'clean handover', 15, 1, '7')

        # Relabel: select the row, press F.
        pump(lambda: widget.table.item(0, 1).text() == 'success', 'success in the table')
        assert widget.select_episode(episode_id)
        widget.table.setFocus()
        QTest.keyClick(widget.table, Qt.Key_F)
        pump(lambda: widget.table.item(0, 1).text() == 'failure', 'failure in the table',
             detail=lambda: widget.last_message)
        with EpisodeIndex(storage / 'episodes.sqlite') as index:
            assert index.get(episode_id).outcome == 'failure'

        # The recorded bag's timeline: policy, human, policy with the published boundaries.
        timeline = timeline_from_bag(row.bag_path, episode_id)
        assert [(s.source, s.segment_id, s.ticks) for s in timeline.segments] == [
            (P, 0, 5), (H, 1, 5), (P, 2, 5)]
        starts = [s.start - timeline.origin for s in timeline.segments]
        assert starts == pytest.approx([0.0, 5 * DT, 10 * DT], abs=1e-6)
        assert timeline.duration == pytest.approx(15 * DT, abs=1e-6)
        shown = {r.episode_id: r for r in widget.timeline_view.rows}[episode_id]
        assert shown.timeline.segments == timeline.segments and shown.outcome == 'failure'

        # The bag's p_v: one point per chunk at its tick, the request from tick 3 to 5.
        trace = viability_from_bag(row.bag_path, episode_id)
        assert trace.source == 'habc_msgs/msg/ActionChunk' and trace.note == ''
        assert [t - timeline.origin for t, _ in trace.points] == pytest.approx(
            [k * DT for k in range(len(SCRIPT))], abs=1e-6)
        assert [v for _, v in trace.points] == pytest.approx(P_V, abs=1e-6)
        spans = help_spans(trace.help)
        assert spans == [HelpSpan(pytest.approx(t0 + RAISE_AT * DT, abs=1e-6),
                                  pytest.approx(t0 + ANSWER_AT * DT, abs=1e-6), 'low',
                                  'answered', pytest.approx(P_V[RAISE_AT], abs=1e-6))]
        # The selected finished episode shows its recorded p_v, on its timeline's axis.
        strip = widget.timeline_view.viability
        assert (strip.episode_id, strip.caption) == (episode_id, f'{episode_id} (recorded)')
        assert strip.points == trace.points and list(strip.spans) == spans
        assert strip.origin == timeline.origin
        assert not widget.grab().isNull()
    finally:
        if widget is not None:
            widget.shutdown()
            widget.close()
        if dashboard is not None:
            dashboard.close()
        if recorder.process.poll() is None:
            recorder.process.send_signal(signal.SIGINT)
            try:
                recorder.finish(timeout=15)
            finally:
                recorder.kill()
