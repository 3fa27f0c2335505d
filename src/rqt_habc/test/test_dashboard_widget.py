"""The dashboard widget offscreen, against a fake ROS adapter (no rclpy), and its packaging."""

import json
import os
from pathlib import Path
import subprocess
import sys
import time
from types import ModuleType, SimpleNamespace
import xml.etree.ElementTree as ET

from habc_episodes.index import EpisodeIndex
from habc_episodes.vocabulary import Controller, RecorderEvent
from rqt_habc.model import (
    normalize_namespace,
)
from rqt_habc.ros_adapter import LabelResult, Update

PACKAGE = Path(__file__).resolve().parents[1]
P, H = Controller.POLICY, Controller.HUMAN


class FakeRos:
    """Stands in for DashboardRos: updates are queued by the test, labels are recorded."""

    def __init__(self, namespace='/'):
        self.namespace = normalize_namespace(namespace)
        self.queue = []
        self.labels = []
        self.ready = True
        self.live = ['/', '/robot2']
        self.fleet = []

    def poll(self):
        out, self.queue = self.queue, []
        return out

    def set_namespace(self, namespace):
        self.namespace = normalize_namespace(namespace)
        return self.namespace

    def recorder_ready(self):
        return self.ready

    def label(self, episode_id, outcome, note='', labeler=''):
        if not self.ready:
            raise RuntimeError('no episode recorder serves /recorder/label_episode')
        self.labels.append((episode_id, outcome, note, labeler))

    def robot_namespaces(self):
        return ['/', '/robot2']

    def live_robots(self):
        return list(self.live)

    def watch_fleet(self, namespaces):
        added = sorted(set(namespaces) - set(self.fleet))
        removed = sorted(set(self.fleet) - set(namespaces))
        self.fleet = sorted(namespaces)
        return added, removed

    def watch_help(self, namespaces):
        return []

    def now(self):
        return time.time()

    def push(self, kind, namespace='', **fields):
        self.queue.append(Update(kind, SimpleNamespace(**fields), time.monotonic(), namespace))

    def push_help(self, namespace, t, active, reason, p_v=0.2):
        self.push('help', namespace, header=stamp(t), active=active, reason=reason,
                  policy_version='5', viability=p_v, trace_stamps=[], trace_viability=[])


def stamp(t):
    return SimpleNamespace(stamp=SimpleNamespace(sec=int(t), nanosec=int(round(t % 1 * 1e9))))


def make_widget(qapp, ros, index_path):
    from rqt_habc.widget import DashboardWidget
    widget = DashboardWidget(ros, index_path, labeler='tester', poll_ms=20, refresh_ms=200)
    widget.resize(1000, 700)
    widget.show()
    widget.activateWindow()
    from python_qt_binding.QtTest import QTest
    assert QTest.qWaitForWindowActive(widget, 2000)
    return widget


def settle(qapp, widget, rounds=5):
    """Let the timers run a few polls (bags are read a couple per poll)."""
    for _ in range(rounds):
        widget.poll()
        qapp.processEvents()


def test_labels_relabels_and_shows_the_index(qapp, episodes):
    from python_qt_binding.QtCore import Qt
    from python_qt_binding.QtTest import QTest

    episodes('robot-1', [(100.0, P, 0), (100.5, H, 1), (101.0, P, 2)], version='1',
             outcome='failure', takeovers=1)
    episodes('robot-2', [(200.0, P, 0), (200.5, P, 0)], version='2', outcome='success')
    index_path = episodes('robot-3', [(300.0, H, 0), (301.0, H, 0)], version='2',
                          takeovers=1)
    episodes('other-1', [(400.0, P, 0)], robot='other')  # another robot's episode
    ros = FakeRos()
    widget = make_widget(qapp, ros, index_path)
    try:
        settle(qapp, widget)
        ids = [widget.table.item(row, 0).text() for row in range(widget.table.rowCount())]
        assert ids == ['robot-3', 'robot-2', 'robot-1']  # newest first, robot 'robot' only
        assert [(s.version, s.labelled, s.success_rate) for s in widget.plot.stats] == [
            ('1', 1, 0.0), ('2', 1, 1.0)]
        rows = {row.episode_id: row for row in widget.timeline_view.rows}
        assert rows['robot-1'].timeline.sources() == [P, H, P]
        assert rows['robot-3'].timeline.sources() == [H]
        assert widget.target() == ('robot-3', 'newest finished in the index')

        # S with focus in the table labels the newest finished episode.
        widget.table.setFocus()
        QTest.keyClick(widget.table, Qt.Key_S)
        assert ros.labels == [('robot-3', 'success', '', 'tester')]
        # Letters typed into the note field are text, not labels.
        widget.note_edit.setFocus()
        QTest.keyClicks(widget.note_edit, 'sfd')
        assert widget.note_edit.text() == 'sfd' and len(ros.labels) == 1

        # Relabel: select a row (its note is offered for editing), press a button.
        assert widget.select_episode('robot-1')
        assert widget.target() == ('robot-1', 'selected')
        widget.note_edit.setText('gripper slipped')
        QTest.mouseClick(widget.buttons['discarded'], Qt.LeftButton)
        assert ros.labels[-1] == ('robot-1', 'discarded', 'gripper slipped', 'tester')
        assert widget.timeline_view.rows[0].highlighted  # the selected one comes first
        ros.push('label_result', episode_id='robot-1', outcome='discarded', accepted=True,
                 message='episode robot-1 labelled discarded by tester')
        settle(qapp, widget, 1)
        assert widget.last_message.endswith('labelled discarded by tester')
        assert widget.note_edit.text() == ''
        ros.queue.append(Update('label_result', LabelResult('robot-2', 'success', False,
                                                            'label rejected: nope'), 0.0))
        settle(qapp, widget, 1)
        assert widget.last_message == 'recorder refused the label: label rejected: nope'

        # Unticking the robot filter shows every robot's episodes.
        widget.robot_only.setChecked(False)
        assert widget.table.rowCount() == 4
    finally:
        widget.shutdown()
        widget.close()


def test_live_episode_end_makes_it_the_label_target(qapp, episodes):
    index_path = episodes('robot-1', [(100.0, P, 0), (101.0, P, 0)], outcome='success')
    ros = FakeRos()
    widget = make_widget(qapp, ros, index_path)
    try:
        settle(qapp, widget)
        widget.select_episode('robot-1')
        now = time.time()
        ros.push('event', header=stamp(now - 5.0), event=RecorderEvent.START, episode_id='robot-9',
                 num_steps=0, num_interventions=0, policy_version='4')
        for k, source in enumerate((P, P, H, H, P)):
            ros.push('intervention', header=stamp(now - 5.0 + 0.5 * k), source=source,
                     segment_id={P: 0, H: 1}[source] + (2 if k == 4 else 0),
                     episode_id='robot-9', reason='pedal' if source == H else '')
        settle(qapp, widget, 2)
        # A START clears the selection: the next label is for the episode in front of you.
        assert widget.selected_episode() == ''
        assert widget.episode_label.text() == 'robot-9'
        assert widget.controller_label.text() == 'POLICY'
        assert widget.episode_version_label.text() == '4'
        elapsed = widget.elapsed_label.text()
        assert elapsed.startswith('0:0') and 4.5 <= float(elapsed.split(':')[1]) < 30
        live = widget.timeline_view.rows[0]
        assert (live.episode_id, live.timeline.sources()) == ('robot-9', [P, H, P])
        ros.push('event', header=stamp(now), event=RecorderEvent.END, episode_id='robot-9',
                 num_steps=5, num_interventions=1, policy_version='4')
        settle(qapp, widget, 2)
        assert widget.target() == ('robot-9', 'last finished')
        assert widget.episode_label.text() == 'none recording'
        assert widget.last_label.text().startswith('robot-9 (0:05.0, 5 steps, 1 takeovers)')
        ros.push('learner_status', data=json.dumps({'state': 'idle', 'version': 4, 'round': 3,
                                                   'metrics': {'losses/actor': 0.5}}))
        ros.push('policy_status', data=json.dumps({'active_version': '4'}))
        settle(qapp, widget, 1)
        status = {widget.status_table.item(r, 0).text(): widget.status_table.item(r, 1).text()
                  for r in range(widget.status_table.rowCount())}
        assert status['policy'] == 'version 4 active'
        assert status['learner version'] == '4 (round 3)'
        assert widget.metrics_table.item(0, 1).text() == '0.5'
    finally:
        widget.shutdown()
        widget.close()


def test_namespace_selector_and_unreachable_recorder(qapp, tmp_path):
    ros = FakeRos()
    widget = make_widget(qapp, ros, tmp_path / 'none.sqlite')
    try:
        settle(qapp, widget)
        assert 'no episode index at' in widget.last_message
        widget.refresh()
        assert widget.namespace_combo.findText('/robot2') >= 0  # discovered
        assert ros.fleet == ['/', '/robot2']  # the fleet view hears both
        assert widget.set_namespace('robot1/')
        assert ros.namespace == '/robot1' and widget.namespace_combo.currentText() == '/robot1'
        # The selector lists the live robots: a robot gone leaves it, the followed one
        # stays although it is not live, and the selection stays on it.
        ros.live = ['/robot2', '/robot3']
        widget.refresh()
        combo = widget.namespace_combo
        assert [combo.itemText(i) for i in range(combo.count())] == [
            '/robot1', '/robot2', '/robot3']
        assert combo.currentText() == '/robot1' and ros.fleet == ['/robot2', '/robot3']
        # A namespace being typed is not overwritten by a refresh.
        combo.setEditText('/robot')
        ros.live = ['/robot2']
        widget.refresh()
        assert combo.count() == 2 and combo.currentText() == '/robot'
        combo.setEditText('/robot1')
        assert widget.robot_only.text() == "only robot 'robot1'"
        assert not widget.set_namespace('robot 1')
        assert 'not a ROS namespace' in widget.last_message and ros.namespace == '/robot1'
        ros.ready = False
        widget.refresh()
        assert 'no recorder' in widget.connection_label.text()
        ros.push('event', header=stamp(1.0), event=RecorderEvent.END, episode_id='robot1-x',
                 num_steps=1, num_interventions=0, policy_version='')
        settle(qapp, widget, 1)
        assert not widget.label('success')
        assert widget.last_message.startswith('robot1-x not labelled: no episode recorder')
        assert widget.grab().width() == 1000
    finally:
        widget.shutdown()
        widget.close()


def test_help_banner_follows_the_robot_that_asks(qapp, tmp_path):
    from python_qt_binding.QtCore import Qt
    from python_qt_binding.QtTest import QTest

    ros = FakeRos('robot1')
    widget = make_widget(qapp, ros, tmp_path / 'none.sqlite')
    try:
        # Latched history of robot2 at start-up: raised and answered long ago, no alert.
        ros.push_help('/robot2', 10.0, True, 'low')
        ros.push_help('/robot2', 12.0, False, 'answered')
        settle(qapp, widget, 1)
        assert widget.alerts_given == 0 and widget.shown_banner.level == 'cleared'
        assert widget.help_heading.isHidden() and widget.follow_button.isHidden()
        now = time.time()
        ros.push_help('/robot2', now, True, 'stalled', 0.35)
        settle(qapp, widget, 1)
        assert widget.alerts_given == 1
        assert widget.help_label.text().startswith(
            'robot2 asks for help: p_v not rising (0.35), waiting ')
        assert not widget.follow_button.isHidden()
        assert widget.follow_button.text() == 'Follow robot2'
        QTest.mouseClick(widget.follow_button, Qt.LeftButton)
        settle(qapp, widget, 1)
        # Followed now: the banner stays (the request is open), the button has nothing to do.
        assert ros.namespace == '/robot2' and widget.namespace_combo.currentText() == '/robot2'
        assert not widget.help_banner.isHidden() and widget.follow_button.isHidden()
        ros.push_help('/robot2', now + 1.0, False, 'recovered', 0.5)
        settle(qapp, widget, 1)
        assert widget.help_label.text() == ('robot2: help request (p_v not rising) recovered: '
                                            'p_v back up to 0.50')
    finally:
        widget.shutdown()
        widget.close()


def test_fleet_root_without_stores_says_what_was_searched(qapp, tmp_path):
    from rqt_habc.widget import DashboardWidget

    root = tmp_path / 'fleet'
    root.mkdir()
    widget = DashboardWidget(FakeRos('robot1'), '', fleet_root=root, poll_ms=20,
                             refresh_ms=200)
    try:
        assert widget.index_paths() == []
        assert widget.last_message == (
            f'no episode index under the fleet root yet (searched {root}/*/episodes.sqlite); '
            "each robot's recorder creates <storage_root>/<robot>/episodes.sqlite when it "
            'starts')
        # A store that appears later (a robot started) is read on the next refresh.
        with EpisodeIndex(root / 'robot1' / 'episodes.sqlite') as index:
            index.create('robot1-1', root / 'robot1' / 'bags' / 'robot1-1', 'task', '1',
                         started_at=1.0, robot='robot1')
        widget.refresh()
        assert [r.episode_id for r in widget.records] == ['robot1-1']
    finally:
        widget.shutdown()
        widget.close()


# Packaging -------------------------------------------------------------------------------------

def test_plugin_xml_is_installed_and_exported():
    plugin = ET.parse(PACKAGE / 'plugin.xml').getroot()
    cls = plugin.find('class')
    assert cls.get('type') == 'rqt_habc.plugin.HabcDashboard'
    assert cls.get('base_class_type') == 'rqt_gui_py::Plugin'
    export = ET.parse(PACKAGE / 'package.xml').getroot().find('export')
    assert export.find('rqt_gui').get('plugin') == '${prefix}/plugin.xml'
    assert "'plugin.xml'" in (PACKAGE / 'setup.py').read_text()


class _FakeSettings:
    def __init__(self, values=None):
        self.values = dict(values or {})

    def set_value(self, key, value):
        self.values[key] = value

    def value(self, key, default=None):
        return self.values.get(key, default)


class _FakeNode:
    """Enough of an rclpy Node for DashboardRos (rqt owns and spins the real one)."""

    def __init__(self):
        self.subscriptions, self.clients = [], []

    def create_subscription(self, msg_type, topic, callback, qos):
        self.subscriptions.append(topic)
        return topic

    def destroy_subscription(self, subscription):
        self.subscriptions.remove(subscription)

    def create_client(self, srv_type, name):
        self.clients.append(name)
        return SimpleNamespace(service_is_ready=lambda: False, srv_name=name)

    def destroy_client(self, client):
        self.clients.remove(client.srv_name)

    def get_topic_names_and_types(self):
        return [('/robot3/recorder/events', ['habc_msgs/msg/EpisodeEvent']),
                ('/robot4/policy/status', ['std_msgs/msg/String'])]

    def count_publishers(self, topic):
        return 1

    def get_clock(self):
        return SimpleNamespace(now=lambda: SimpleNamespace(nanoseconds=0))


def test_rqt_plugin_wiring_with_a_stand_in_rqt_gui_py(qapp, monkeypatch, tmp_path):
    # rqt_gui_py exists only under full ROS; its Plugin is a QObject taking the context.
    from python_qt_binding.QtCore import QObject

    class Plugin(QObject):
        def __init__(self, context):
            super().__init__()

    fake = ModuleType('rqt_gui_py.plugin')
    fake.Plugin = Plugin
    monkeypatch.setitem(sys.modules, 'rqt_gui_py', ModuleType('rqt_gui_py'))
    monkeypatch.setitem(sys.modules, 'rqt_gui_py.plugin', fake)
    monkeypatch.delitem(sys.modules, 'rqt_habc.plugin', raising=False)
    from rqt_habc.plugin import HabcDashboard

    added = []
    node = _FakeNode()
    context = SimpleNamespace(node=node, argv=lambda: ['--namespace', 'robot1'],
                              serial_number=lambda: 2, add_widget=added.append)
    plugin = HabcDashboard(context)
    widget = added[0]
    assert widget.windowTitle() == 'habc dashboard (2)'
    assert '/robot1/intervention' in node.subscriptions
    assert '/learner/status' in node.subscriptions  # a shared learner at the root
    assert node.clients == ['/robot1/recorder/label_episode']
    widget.refresh()
    # The live robot /robot4 is in the selector and its light topics are heard; /robot3
    # (a recorder only) is heard when it asks for help.
    assert widget.namespace_combo.findText('/robot4') >= 0
    assert {'/robot4/intervention', '/robot4/recorder/events', '/robot4/policy/status',
            '/robot3/help_request', '/robot4/help_request'} <= set(node.subscriptions)
    saved = _FakeSettings()
    plugin.save_settings(_FakeSettings(), saved)
    assert saved.values['namespace'] == '/robot1'
    assert saved.values['fleet_root'] == ''
    # The command line wins over a saved namespace; a saved index path is taken.
    plugin.restore_settings(_FakeSettings(), _FakeSettings({
        'namespace': '/robot7', 'index_path': str(tmp_path / 'x.sqlite')}))
    assert plugin._ros.namespace == '/robot1'
    assert widget.index_path == tmp_path / 'x.sqlite'
    plugin.shutdown_plugin()
    assert node.subscriptions == [] and node.clients == []
    widget.close()

    # A fleet: every store under the root and no single index; a saved one is not mixed in.
    added.clear()
    plugin = HabcDashboard(SimpleNamespace(
        node=_FakeNode(), argv=lambda: ['--fleet-root', str(tmp_path / 'fleet')],
        serial_number=lambda: 1, add_widget=added.append))
    widget = added[0]
    assert (widget.index_path, widget.fleet_root) == (None, tmp_path / 'fleet')
    plugin.restore_settings(_FakeSettings(), _FakeSettings({
        'index_path': str(tmp_path / 'x.sqlite'), 'fleet_root': ''}))
    assert widget.index_path is None
    saved = _FakeSettings()
    plugin.save_settings(_FakeSettings(), saved)
    assert (saved.values['index_path'], saved.values['fleet_root']) == (
        '', str(tmp_path / 'fleet'))
    plugin.shutdown_plugin()
    widget.close()


def test_habc_dashboard_subcommand():
    env = {k: v for k, v in os.environ.items()
           if k not in ('DISPLAY', 'WAYLAND_DISPLAY', 'QT_QPA_PLATFORM')}
    helped = subprocess.run([sys.executable, '-m', 'habc.cli', 'dashboard', '--help'],
                            capture_output=True, text=True, env=env, timeout=120)
    assert helped.returncode == 0 and '--namespace' in helped.stdout
    assert '--index' in helped.stdout and '--fleet-root' in helped.stdout
    headless = subprocess.run([sys.executable, '-m', 'habc.cli', 'dashboard'],
                              capture_output=True, text=True, env=env, timeout=120)
    assert headless.returncode == 2
    assert 'no display' in headless.stderr and 'QT_QPA_PLATFORM=offscreen' in headless.stderr
