"""The dashboard offscreen on loopback DDS: live p_v and help requests of real publishers.

A test node plays the robot side: the recorder's START event, the arbiter's ticks, the policy
node's chunks (with p_v), its status and its latched help requests, in the robot's namespace;
a second robot raises a help request of its own. The dashboard (its own DashboardRos node,
polled by its QTimer) shows the p_v line, the alert banner naming each robot, and why each
request ended. Nothing here waits on a clock: every wait is for what the dashboard shows.
"""

import json
import os
from pathlib import Path
import stat
import time

from builtin_interfaces.msg import Time
import pytest
from std_msgs.msg import String

from habc_common.qos import COMMANDS, LATCHED, LATCHED_EVENTS
from habc_episodes.vocabulary import Controller, RecorderEvent
from habc_msgs.msg import ActionChunk, EpisodeEvent, HelpRequest, InterventionState
from rqt_habc.model import CLEARED, HelpSpan, RAISED

P_V = [0.8, 0.6, 0.4, 0.25, 0.2, 0.15]


def ros_time(seconds: float) -> Time:
    return Time(sec=int(seconds), nanosec=int(round(seconds % 1 * 1e9)) % 10**9)


def help_request(stamp: float, active: bool, reason: str, p_v: float,
                 trace: list[tuple[float, float]] = ()) -> HelpRequest:
    msg = HelpRequest(active=active, reason=reason, policy_version='3', viability=p_v,
                      trace_stamps=[t for t, _ in trace],
                      trace_viability=[v for _, v in trace])
    msg.header.stamp = ros_time(stamp)
    return msg


def stand_in_notify_send(folder: Path) -> Path:
    """Write a program that takes notify-send's arguments and keeps them in a file."""
    program = folder / 'notify-send'
    program.write_text('#!/bin/sh\nprintf \'%s\\n\' "$@" > "$0.args.tmp" && '
                       'mv "$0.args.tmp" "$0.args"\n')
    program.chmod(program.stat().st_mode | stat.S_IXUSR)
    return program


@pytest.mark.ros
def test_help_request_banner_and_live_viability(qapp, ros, tmp_path):
    from rqt_habc.ros_adapter import DashboardRos
    from rqt_habc.widget import DashboardWidget, DesktopNotifier

    ns, other = f'helper{os.getpid()}', f'other{os.getpid()}'
    node = ros.create_node('help_test_driver')
    publish = {
        'event': node.create_publisher(EpisodeEvent, f'/{ns}/recorder/events', LATCHED),
        'status': node.create_publisher(String, f'/{ns}/policy/status', LATCHED),
        'tick': node.create_publisher(InterventionState, f'/{ns}/intervention', COMMANDS),
        'chunk': node.create_publisher(ActionChunk, f'/{ns}/policy/chunk', COMMANDS),
        'help': node.create_publisher(HelpRequest, f'/{ns}/help_request', LATCHED_EVENTS),
    }
    other_help = node.create_publisher(HelpRequest, f'/{other}/help_request', LATCHED_EVENTS)
    dashboard = widget = None
    try:
        dashboard = DashboardRos(namespace=ns, context=ros.context)
        widget = DashboardWidget(dashboard, tmp_path / 'none.sqlite', labeler='tester',
                                 poll_ms=20, refresh_ms=200)
        program = stand_in_notify_send(tmp_path)
        widget.notifier = DesktopNotifier(str(program))
        widget.resize(1000, 700)
        widget.show()

        def pump(predicate, what):
            """Wait while Qt's event loop runs (the dashboard's QTimers spin its node)."""
            return ros.wait_for(predicate, what, poll=qapp.processEvents,
                                detail=lambda: f'banner: {widget.help_label.text()!r}')

        pump(lambda: all(p.get_subscription_count() >= 1 for p in publish.values()),
             'the dashboard subscribed in the robot namespace')

        # An episode starts; the policy has a critic and asks for help below 0.3.
        t0 = time.time()
        start = EpisodeEvent(event=RecorderEvent.START, episode_id='ep-1', policy_version='3')
        start.header.stamp = ros_time(t0)
        publish['event'].publish(start)
        publish['status'].publish(String(data=json.dumps({
            'active_version': '3', 'critic': 'ok',
            'help': {'requested': False, 'threshold': 0.3}})))
        pump(lambda: widget.live.episode_id == 'ep-1'
             and widget.policy_status.get('critic') == 'ok', 'the episode and policy status')
        for k, p_v in enumerate(P_V):
            stamp = t0 + 0.1 * k
            tick = InterventionState(source=Controller.POLICY, segment_id=0, episode_id='ep-1')
            tick.header.stamp = ros_time(stamp)
            publish['tick'].publish(tick)
            chunk = ActionChunk(policy_version='3', viability=p_v, efficiency_value=-5.0)
            chunk.header.stamp = ros_time(stamp)
            publish['chunk'].publish(chunk)
        pump(lambda: len(widget.live.viability) == widget.live.timeline.count == len(P_V),
             'every chunk and tick on the dashboard')
        shown = widget.timeline_view.viability
        assert [v for _, v in shown.points] == pytest.approx(P_V)
        assert (shown.episode_id, shown.threshold, shown.note) == ('ep-1', 0.3, '')
        assert shown.origin == pytest.approx(t0, abs=1e-6)  # the live timeline row's start
        assert widget.viability_label.text() == '0.15'
        assert widget.viability_label.toolTip() == 'below the help threshold 0.3'
        assert widget.help_banner.isHidden()

        # The robot asks for help: red banner with its name, reason and p_v; one alert.
        publish['help'].publish(help_request(t0 + 0.5, True, 'low', 0.15,
                                             [(t0 + 0.3, 0.25), (t0 + 0.5, 0.15)]))
        pump(lambda: ns in widget.help_label.text(), f'the help banner naming {ns}')
        assert not widget.help_banner.isHidden() and not widget.help_heading.isHidden()
        assert widget.help_label.text().startswith(f'{ns} asks for help: p_v low (0.15)')
        assert widget.shown_banner.level == RAISED
        assert widget.alerts_given == 1 and widget.follow_button.isHidden()
        assert widget.timeline_view.viability.spans == (
            HelpSpan(pytest.approx(t0 + 0.5), None, 'low', '', pytest.approx(0.15)),)
        args = Path(f'{program}.args')
        pump(args.exists, 'the desktop notification')
        title, body = args.read_text().splitlines()[-2:]
        assert title == f'{ns} asks for help'
        assert body.startswith(f'{ns} asks for help: p_v low (0.15), waiting ')
        assert widget.grab().save(str(tmp_path / 'help_banner.png'))

        # A second robot asks too: found in the graph, heard although not followed.
        other_help.publish(help_request(t0 + 0.6, True, 'stalled', 0.41))
        pump(lambda: other in widget.help_label.text(), f'the help banner naming {other}')
        assert widget.shown_banner.namespaces == (f'/{ns}', f'/{other}')
        assert widget.alerts_given == 2
        assert widget.follow_button.text() == f'Follow {other}'

        # Answered (a human took over): this robot's line goes, the other's stays.
        publish['help'].publish(help_request(t0 + 0.7, False, 'answered', 0.15))
        pump(lambda: widget.shown_banner.namespaces == (f'/{other}',),
             f'the help request of {ns} gone from the banner')
        assert not widget.help_label.text().startswith(ns)
        assert widget.timeline_view.viability.spans[0].cleared_reason == 'answered'
        other_help.publish(help_request(t0 + 0.8, False, 'recovered', 0.52))
        pump(lambda: widget.shown_banner.level == CLEARED, 'the banner saying why it ended')
        text = widget.help_label.text()
        assert f'{ns}: help request (p_v low) answered: a human took over' in text
        assert f'{other}: help request (p_v not rising) recovered: p_v back up to 0.52' in text
        assert widget.help_heading.isHidden() and widget.follow_button.isHidden()
        assert widget.alerts_given == 2

        # New weights without a critic: p_v is NaN, and the dashboard says why.
        publish['status'].publish(String(data=json.dumps({
            'active_version': '4', 'critic': 'inline weights carry no critic'})))
        chunk = ActionChunk(policy_version='4', viability=float('nan'))
        chunk.header.stamp = ros_time(t0 + 0.9)
        publish['chunk'].publish(chunk)
        pump(lambda: widget.viability_label.text().startswith('no critic'),
             'no critic on the dashboard')
        assert widget.viability_label.text() == 'no critic: inline weights carry no critic'
        assert widget.timeline_view.viability.note == widget.viability_label.text()
    finally:
        if widget is not None:
            widget.shutdown()
            widget.close()
        if dashboard is not None:
            dashboard.close()


def test_desktop_notifier_without_notify_send(tmp_path):
    from rqt_habc.widget import DesktopNotifier

    assert not DesktopNotifier('').notify('title', 'body')  # none on this machine: no error
    missing = DesktopNotifier(str(tmp_path / 'no-such-program'))
    assert not missing.notify('title', 'body') and missing.program is None
