"""The dashboard's fleet view offscreen on loopback DDS: two robots of real publishers.

A test node plays two robot stacks in their namespaces (the recorder's latched events, the
policy node's latched status, the arbiter's ticks), and two real episode stores lie under a
fleet root as `habc launch fleet` lays them out (<root>/<robot>/episodes.sqlite). The
dashboard (its own DashboardRos node, polled by its QTimers) finds both robots in the graph,
lists them in its namespace selector and shows a fleet row per robot; clicking a row follows
that robot, and a robot whose publishers are gone leaves the selector and the table. Every
wait is for what the dashboard shows, while the arbiters tick as they do.
"""

import json
import os
from pathlib import Path

from builtin_interfaces.msg import Time
import pytest
from std_msgs.msg import String

from habc_common.qos import COMMANDS, LATCHED
from habc_episodes.index import EpisodeIndex
from habc_episodes.vocabulary import Controller, RecorderEvent
from habc_msgs.msg import EpisodeEvent, InterventionState
from rqt_habc.model import FLEET_COLUMNS

P, H, X = Controller.POLICY, Controller.HUMAN, Controller.HOLD


def write_store(root: Path, robot: str,
                episodes: list[tuple[str, str, str, int]]) -> Path:
    """Write <root>/<robot>/episodes.sqlite with finished (id, version, outcome, takeovers)."""
    path = root / robot / 'episodes.sqlite'
    with EpisodeIndex(path) as index:
        for k, (episode_id, version, outcome, takeovers) in enumerate(episodes):
            started = 1000.0 + 10 * k
            index.create(episode_id, root / robot / 'bags' / episode_id, 'task', version,
                         started_at=started, robot=robot)
            index.finish(episode_id, 100, takeovers, ended_at=started + 5.0)
            index.label(episode_id, outcome, 'seed', '', now=started + 6.0)
    return path


def event(kind: int, episode_id: str, version: str) -> EpisodeEvent:
    msg = EpisodeEvent(event=kind, episode_id=episode_id, policy_version=version)
    msg.header.stamp = Time(sec=1000)
    return msg


@pytest.mark.ros
def test_fleet_view_of_two_live_robots(qapp, ros, tmp_path):
    from python_qt_binding.QtCore import Qt
    from python_qt_binding.QtTest import QTest

    from rqt_habc.ros_adapter import DashboardRos
    from rqt_habc.widget import DashboardWidget

    a, b = f'fleeta{os.getpid()}', f'fleetb{os.getpid()}'  # namespaces = robot labels
    root = tmp_path / 'fleet'
    write_store(root, a, [(f'{a}-1', '1', 'success', 1), (f'{a}-2', '1', 'failure', 3),
                          (f'{a}-3', '2', 'success', 0)])
    write_store(root, b, [(f'{b}-1', '2', 'failure', 2)])
    node = ros.create_node('fleet_test_driver')
    ticks, latched = {}, {}
    for ns in (a, b):
        ticks[ns] = node.create_publisher(InterventionState, f'/{ns}/intervention', COMMANDS)
        latched[ns] = (node.create_publisher(EpisodeEvent, f'/{ns}/recorder/events', LATCHED),
                       node.create_publisher(String, f'/{ns}/policy/status', LATCHED))
    # Before the dashboard starts: robot a records its 4th episode, b has ended its first.
    latched[a][0].publish(event(RecorderEvent.START, f'{a}-4', '2'))
    latched[b][0].publish(event(RecorderEvent.END, f'{b}-1', '2'))
    for ns in (a, b):
        latched[ns][1].publish(String(data=json.dumps({'active_version': '2'})))
    control = {a: (P, 'start', f'{a}-4'), b: (X, 'idle', '')}

    def tick():
        """Publish one arbiter tick per live robot (the arbiters tick all the time)."""
        for ns, (source, reason, episode_id) in control.items():
            ticks[ns].publish(InterventionState(source=source, reason=reason,
                                                episode_id=episode_id, active=source == H))

    dashboard = widget = None
    try:
        dashboard = DashboardRos(namespace=a, context=ros.context)
        widget = DashboardWidget(dashboard, None, fleet_root=root, labeler='tester',
                                 poll_ms=20, refresh_ms=200)
        widget.resize(1000, 700)
        widget.show()
        widget.tabs.setCurrentWidget(widget.fleet_table)

        def table():
            """Return the cells of the fleet table (episode ids as they are, not elided)."""
            t = widget.fleet_table
            rows = [tuple(t.item(r, c).text() for c in range(len(FLEET_COLUMNS)))
                    for r in range(t.rowCount())]
            return [row[:1] + (t.item(r, 1).toolTip(),) + row[2:]
                    for r, row in enumerate(rows)]

        def pump(predicate, what):
            return ros.wait_for(predicate, what, poll=lambda: (tick(), qapp.processEvents()),
                                detail=lambda: f'fleet table: {table()}; '
                                               f'message: {widget.last_message!r}')

        # a, v2 (active): 1 of 1 succeeded, no takeover; v1: 1 of 2, (1 + 3) / 2 takeovers.
        row_a = (a, f'{a}-4 (running)', 'policy (start)', '2',
                 'v2: 100% (1/1), 0/ep; v1: 50% (1/2), 2/ep')
        row_b = (b, f'{b}-1 (ended)', 'idle', '2', 'v2: 0% (0/1), 2/ep')
        pump(lambda: table() == [row_a, row_b], 'a fleet row per robot')
        assert widget.tabs.tabText(widget.tabs.indexOf(widget.fleet_table)) == 'Fleet (2 live)'
        combo = widget.namespace_combo
        assert [combo.itemText(i) for i in range(combo.count())] == [f'/{a}', f'/{b}']
        assert combo.currentText() == f'/{a}'
        assert widget.followed_fleet_row() == 0
        assert widget.fleet_table.item(0, 0).font().bold()
        assert widget.stores_label.text() == '2 stores'
        assert str(root / a / 'episodes.sqlite') in widget.stores_label.toolTip()
        # The followed robot's own table reads its store among the fleet's.
        assert [widget.table.item(r, 0).text() for r in range(widget.table.rowCount())] == [
            f'{a}-3', f'{a}-2', f'{a}-1']

        # A human takes robot b over: its row says so, in the human's colour.
        control[b] = (H, 'engage', f'{b}-2')
        pump(lambda: table()[1][1:3] == (f'{b}-2 (running)', 'human (engage)'),
             'robot b taken over in the fleet table')

        # Clicking b's row follows b: its episodes, its label service, the selector.
        rect = widget.fleet_table.visualItemRect(widget.fleet_table.item(1, 1))
        QTest.mouseClick(widget.fleet_table.viewport(), Qt.LeftButton, pos=rect.center())
        assert dashboard.namespace == f'/{b}' and combo.currentText() == f'/{b}'
        assert widget.followed_fleet_row() == 1
        assert widget.fleet_table.item(1, 0).font().bold()
        assert not widget.fleet_table.item(0, 0).font().bold()
        assert [widget.table.item(r, 0).text() for r in range(widget.table.rowCount())] == [
            f'{b}-1']
        assert widget.last_message == f'following robot namespace /{b}'

        # Robot a stops: it leaves the selector and the table; b's row stays selected.
        del control[a]
        for publisher in (ticks[a], *latched[a]):
            node.destroy_publisher(publisher)
        pump(lambda: [row[0] for row in table()] == [b], 'robot a gone from the fleet table')
        pump(lambda: [combo.itemText(i) for i in range(combo.count())] == [f'/{b}'],
             'robot a gone from the namespace selector')
        assert dashboard.watched_fleet() == [f'/{b}']
        assert widget.followed_fleet_row() == 0
    finally:
        if widget is not None:
            widget.shutdown()
            widget.close()
        if dashboard is not None:
            dashboard.close()

