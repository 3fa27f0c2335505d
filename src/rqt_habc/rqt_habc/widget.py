"""The dashboard widget (python_qt_binding): what rqt embeds and `habc dashboard` shows.

Shows the current episode and who controls the robot, intervention timelines of the current
and recent episodes, the recent episodes of the index (select one to relabel it), the
Success / Failure / Discard buttons (keys S, F, D) with a note, the policy and learner
status, and success rate and takeovers per policy version.

All ROS traffic goes through a DashboardRos (rqt_habc.ros_adapter) that a QTimer polls; the
episode index (SQLite) is read directly, and written only by the recorder, through its
label service, so labels live in one place and survive restarts of the dashboard.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
import math
import os
from pathlib import Path
import sqlite3
import time
from typing import Any

from python_qt_binding.QtCore import QRectF, Qt, QTimer
from python_qt_binding.QtGui import QBrush, QColor, QFont, QKeySequence, QPainter, QPen
from python_qt_binding.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QShortcut,
    QSizePolicy,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from habc_episodes.index import EpisodeIndex, EpisodeRecord
from habc_episodes.stats import version_stats, VersionStats
from habc_episodes.vocabulary import Controller, EpisodeStatus, Outcome, RecorderEvent
from rqt_habc.model import (
    DEFAULT_INDEX,
    filter_robot,
    label_target,
    learner_summary,
    LiveState,
    parse_status,
    policy_summary,
    robot_of_namespace,
    source_name,
    stamp_seconds,
    Timeline,
    timeline_from_bag,
)

SOURCE_COLORS = {Controller.POLICY: '#3a7bd5', Controller.HUMAN: '#f0932b',
                 Controller.HOLD: '#a6a6a6'}
OUTCOME_COLORS = {Outcome.SUCCESS.label: '#2e9d4b', Outcome.FAILURE.label: '#d64541',
                  Outcome.DISCARDED.label: '#8c8c8c', Outcome.UNLABELLED.label: '#d0d0d0'}
TAKEOVER_COLOR = '#f0932b'

TABLE_COLUMNS = ('Episode', 'Outcome', 'Takeovers', 'Version', 'Steps', 'Duration', 'Started',
                 'Status', 'Labeler', 'Note')
TABLE_ROWS = 50
TIMELINE_ROWS = 5
# Bags read per refresh: reading one takes a moment, so the window stays responsive.
BAG_LOADS_PER_REFRESH = 2
LABEL_TIMEOUT_S = 10.0
RECORDING = EpisodeStatus.RECORDING.label


def format_duration(seconds: float | None) -> str:
    """Return '1:02.5' for 62.5 s ('-' for None)."""
    if seconds is None:
        return '-'
    minutes, rest = divmod(max(0.0, seconds), 60.0)
    if minutes >= 60:
        return f'{int(minutes // 60)}:{int(minutes % 60):02d}:{int(rest):02d}'
    return f'{int(minutes)}:{rest:04.1f}'


def expand_index_path(path: str | Path) -> Path:
    """Expand ~ and $VARIABLES, as the recorder does with its storage_dir."""
    return Path(os.path.expandvars(os.path.expanduser(str(path))))


def _nice_step(span: float, target_ticks: int) -> float:
    raw = span / max(1, target_ticks)
    magnitude = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    for factor in (1, 2, 2.5, 5, 10):
        if raw <= factor * magnitude:
            return factor * magnitude
    return 10 * magnitude


# Timeline view -------------------------------------------------------------------------------

@dataclass(frozen=True)
class TimelineRow:
    """One row of the timeline view: an episode's segments, or a note why there are none."""

    episode_id: str
    caption: str
    timeline: Timeline | None
    outcome: str = Outcome.UNLABELLED.label
    note: str = ''
    highlighted: bool = False


class TimelineView(QWidget):
    """Intervention timelines, one row per episode, on a common time axis in seconds."""

    ROW_HEIGHT = 16
    ROW_GAP = 6
    TOP = 20
    BOTTOM = 18

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.rows: list[TimelineRow] = []
        self.setMinimumHeight(self.TOP + self.BOTTOM + TIMELINE_ROWS * (self.ROW_HEIGHT
                                                                        + self.ROW_GAP))
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)

    def set_rows(self, rows: list[TimelineRow]) -> None:
        if rows != self.rows:
            self.rows = rows
            self.update()

    def paintEvent(self, event: Any) -> None:  # noqa: N802 - Qt's name
        painter = QPainter(self)
        painter.setRenderHint(QPainter.Antialiasing, False)
        width, height = self.width(), self.height()
        painter.fillRect(0, 0, width, height, QColor('white'))
        metrics = painter.fontMetrics()
        label_width = min(270, int(width * 0.38))
        left, right = label_width + 8, width - 22
        self._legend(painter, right)
        if not self.rows:
            painter.setPen(QColor('#808080'))
            painter.drawText(QRectF(0, 0, width, height), Qt.AlignCenter,
                             'no episode yet: timelines appear when the arbiter publishes '
                             'intervention ticks or an episode is recorded')
            painter.end()
            return
        span = max([r.timeline.duration for r in self.rows if r.timeline] + [1.0])
        scale = (right - left) / span
        y = self.TOP
        for row in self.rows:
            if row.highlighted:
                painter.fillRect(0, y - 3, width, self.ROW_HEIGHT + 6, QColor('#e8f0fb'))
            painter.fillRect(4, y + 4, 10, 10, QColor(OUTCOME_COLORS.get(row.outcome,
                                                                         '#d0d0d0')))
            painter.setPen(QColor('black'))
            caption = metrics.elidedText(row.caption, Qt.ElideMiddle, label_width - 22)
            painter.drawText(QRectF(20, y, label_width - 20, self.ROW_HEIGHT),
                             Qt.AlignVCenter | Qt.AlignLeft, caption)
            painter.fillRect(QRectF(left, y, right - left, self.ROW_HEIGHT), QColor('#f4f4f4'))
            if row.timeline is not None:
                origin = row.timeline.origin
                for segment in row.timeline.segments:
                    x0 = left + (segment.start - origin) * scale
                    x1 = left + (segment.end - origin) * scale
                    painter.fillRect(QRectF(x0, y, max(1.0, x1 - x0), self.ROW_HEIGHT),
                                     QColor(SOURCE_COLORS.get(segment.source, '#606060')))
            if row.note:
                painter.setPen(QColor('#707070'))
                painter.drawText(QRectF(left + 6, y, right - left - 6, self.ROW_HEIGHT),
                                 Qt.AlignVCenter | Qt.AlignLeft, row.note)
            y += self.ROW_HEIGHT + self.ROW_GAP
        # Time axis under the rows.
        painter.setPen(QColor('#606060'))
        painter.drawLine(left, y, right, y)
        step = _nice_step(span, max(2, (right - left) // 80))
        tick = 0.0
        while tick <= span + 1e-9:
            x = left + tick * scale
            painter.drawLine(int(x), y, int(x), y + 4)
            painter.drawText(QRectF(x - 30, y + 4, 60, 14), Qt.AlignHCenter | Qt.AlignTop,
                             f'{tick:g} s')
            tick += step
        painter.end()

    def _legend(self, painter: QPainter, right: float) -> None:
        x = right
        for source in (Controller.HOLD, Controller.HUMAN, Controller.POLICY):
            text = source_name(source)
            text_width = painter.fontMetrics().horizontalAdvance(text)
            x -= text_width + 22
            painter.fillRect(QRectF(x, 5, 11, 11), QColor(SOURCE_COLORS[source]))
            painter.setPen(QColor('black'))
            painter.drawText(QRectF(x + 15, 2, text_width + 4, 16), Qt.AlignVCenter, text)


# Per-version plot ----------------------------------------------------------------------------

class VersionPlot(QWidget):
    """Success rate (bars, left axis) and takeovers per episode (line, right axis) by version."""

    MAX_VERSIONS = 12

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.stats: list[VersionStats] = []
        self.setMinimumHeight(150)

    def set_stats(self, stats: list[VersionStats]) -> None:
        if stats != self.stats:
            self.stats = stats
            self.update()

    def paintEvent(self, event: Any) -> None:  # noqa: N802 - Qt's name
        painter = QPainter(self)
        painter.setRenderHint(QPainter.Antialiasing, True)
        width, height = self.width(), self.height()
        painter.fillRect(0, 0, width, height, QColor('white'))
        stats = self.stats[-self.MAX_VERSIONS:]
        left, right, top, bottom = 40, width - 36, 38, height - 34
        # Legend.
        fm = painter.fontMetrics()
        first, second = 'success rate', 'takeovers per episode'
        painter.fillRect(QRectF(left, 6, 10, 10), QColor(OUTCOME_COLORS['success']))
        painter.setPen(QColor('black'))
        x = left + 14
        painter.drawText(QRectF(x, 2, fm.horizontalAdvance(first) + 4, 16), Qt.AlignVCenter,
                         first)
        x += fm.horizontalAdvance(first) + 14
        painter.setPen(QPen(QColor(TAKEOVER_COLOR), 2))
        painter.drawLine(int(x), 11, int(x) + 14, 11)
        painter.setPen(QColor('black'))
        painter.drawText(QRectF(x + 18, 2, fm.horizontalAdvance(second) + 4, 16),
                         Qt.AlignVCenter, second)
        if not stats or bottom - top < 20:
            painter.setPen(QColor('#808080'))
            painter.drawText(QRectF(0, top, width, bottom - top), Qt.AlignCenter,
                             'no finished episodes yet')
            painter.end()
            return
        # Four grid steps of a round size on the right axis, as on the left (25 %).
        takeover_max = max([s.takeovers_per_episode or 0.0 for s in stats] + [1.0])
        takeover_top = 4 * _nice_step(takeover_max / 4, 1)
        # Grid and axes.
        for k in range(5):
            y = bottom - (bottom - top) * k / 4
            painter.setPen(QColor('#e4e4e4'))
            painter.drawLine(left, int(y), right, int(y))
            painter.setPen(QColor('#505050'))
            painter.drawText(QRectF(0, y - 8, left - 4, 16), Qt.AlignRight | Qt.AlignVCenter,
                             f'{25 * k}%')
            painter.setPen(QColor(TAKEOVER_COLOR))
            painter.drawText(QRectF(right + 4, y - 8, 32, 16), Qt.AlignLeft | Qt.AlignVCenter,
                             f'{takeover_top * k / 4:g}')
        slot = (right - left) / len(stats)
        points = []
        metrics = painter.fontMetrics()
        for i, stat in enumerate(stats):
            centre = left + slot * (i + 0.5)
            if stat.success_rate is not None:
                bar_height = (bottom - top) * stat.success_rate
                painter.fillRect(QRectF(centre - slot * 0.3, bottom - bar_height, slot * 0.6,
                                        bar_height), QColor(OUTCOME_COLORS['success']))
                painter.setPen(QColor('black'))
                painter.drawText(QRectF(centre - slot / 2, bottom - bar_height - 15, slot, 14),
                                 Qt.AlignCenter, f'{100 * stat.success_rate:.0f}%')
            if stat.takeovers_per_episode is not None:
                points.append((centre, bottom - (bottom - top)
                               * stat.takeovers_per_episode / takeover_top))
            painter.setPen(QColor('black'))
            label = metrics.elidedText(stat.version, Qt.ElideRight, int(slot) - 2)
            painter.drawText(QRectF(centre - slot / 2, bottom + 2, slot, 14), Qt.AlignCenter,
                             label)
            painter.setPen(QColor('#707070'))
            painter.drawText(QRectF(centre - slot / 2, bottom + 16, slot, 14), Qt.AlignCenter,
                             f'n={stat.labelled}')
        painter.setPen(QPen(QColor(TAKEOVER_COLOR), 2))
        for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
            painter.drawLine(int(x0), int(y0), int(x1), int(y1))
        painter.setBrush(QBrush(QColor(TAKEOVER_COLOR)))
        for x, y in points:
            painter.drawEllipse(QRectF(x - 3, y - 3, 6, 6))
        painter.setPen(QColor('#505050'))
        painter.drawLine(left, bottom, right, bottom)
        painter.end()


# The dashboard -------------------------------------------------------------------------------

def _key_value_table(rows: int = 0) -> QTableWidget:
    table = QTableWidget(rows, 2)
    table.horizontalHeader().setVisible(False)
    table.verticalHeader().setVisible(False)
    table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeToContents)
    table.horizontalHeader().setStretchLastSection(True)
    table.verticalHeader().setDefaultSectionSize(table.fontMetrics().height() + 4)
    table.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
    table.setTextElideMode(Qt.ElideRight)
    table.setWordWrap(False)
    table.setEditTriggers(QAbstractItemView.NoEditTriggers)
    table.setSelectionMode(QAbstractItemView.NoSelection)
    table.setFocusPolicy(Qt.NoFocus)
    table.setShowGrid(False)
    return table


def _fill_key_values(table: QTableWidget, rows: list[tuple[str, str]]) -> None:
    table.setRowCount(len(rows))
    for i, (key, value) in enumerate(rows):
        key_item = QTableWidgetItem(key)
        key_item.setForeground(QBrush(QColor('#505050')))
        table.setItem(i, 0, key_item)
        value_item = QTableWidgetItem(value)
        value_item.setToolTip(value)
        table.setItem(i, 1, value_item)


class DashboardWidget(QWidget):
    """The labelling dashboard of one robot namespace (switchable) and one episode index."""

    def __init__(self, ros: Any, index_path: str | Path = DEFAULT_INDEX, *,
                 labeler: str = '', poll_ms: int = 50, refresh_ms: int = 2000,
                 parent: QWidget | None = None) -> None:
        """Show the robot that `ros` (a DashboardRos) follows and the index at `index_path`."""
        super().__init__(parent)
        self.setObjectName('HabcDashboard')
        self.setWindowTitle('habc dashboard')
        self.ros = ros
        self.labeler = labeler
        self.live = LiveState()
        self.index: EpisodeIndex | None = None
        self.index_path = expand_index_path(index_path)
        self.all_records: list[EpisodeRecord] = []
        self.records: list[EpisodeRecord] = []  # shown ones: newest first, robot filter
        self.learner_status: dict[str, Any] = {}
        self.policy_status: dict[str, Any] = {}
        self.bag_timelines: dict[str, Timeline | str] = {}  # str: why there is none
        self.pending_label: tuple[str, str, float] | None = None
        self.last_message = ''
        self._index_problem = ''
        self._index_dirty = True
        self._timelines_pending = False  # bags left to read for the timeline view
        self._shown_controller: tuple[int | None, str] | None = None
        self._shown_records: list[EpisodeRecord] | None = None
        self._drawn_revision = -1
        self._build()
        self.poll_timer = QTimer(self)
        self.poll_timer.timeout.connect(self.poll)
        self.poll_timer.start(poll_ms)
        self.refresh_timer = QTimer(self)
        self.refresh_timer.timeout.connect(self.refresh)
        self.refresh_timer.start(refresh_ms)
        self.refresh()

    # Layout --------------------------------------------------------------------------------

    def _build(self) -> None:
        root = QVBoxLayout(self)
        root.setContentsMargins(8, 8, 8, 6)
        root.setSpacing(6)

        top = QHBoxLayout()
        top.addWidget(QLabel('Robot namespace'))
        self.namespace_combo = QComboBox()
        self.namespace_combo.setEditable(True)
        self.namespace_combo.setInsertPolicy(QComboBox.NoInsert)
        self.namespace_combo.setMinimumWidth(150)
        self.namespace_combo.addItem(self.ros.namespace)
        self.namespace_combo.setToolTip('Namespace of the robot (its recorder, arbiter, '
                                        'policy); type one or pick a discovered one')
        self.namespace_combo.activated.connect(
            lambda *_: self.set_namespace(self.namespace_combo.currentText()))
        top.addWidget(self.namespace_combo)
        self.robot_only = QCheckBox()
        self.robot_only.setChecked(True)
        self.robot_only.toggled.connect(lambda *_: self._reload_index())
        top.addWidget(self.robot_only)
        top.addSpacing(12)
        top.addWidget(QLabel('Index'))
        self.index_edit = QLineEdit(str(self.index_path))
        self.index_edit.setToolTip('The episode index (SQLite) the recorder writes: '
                                   '<storage_dir>/episodes.sqlite')
        self.index_edit.editingFinished.connect(
            lambda: self.set_index_path(self.index_edit.text()))
        top.addWidget(self.index_edit, 1)
        self.connection_label = QLabel()
        top.addWidget(self.connection_label)
        root.addLayout(top)

        upper = QHBoxLayout()
        current = QGroupBox('Current episode')
        grid = QGridLayout(current)
        grid.setVerticalSpacing(3)
        self.episode_label = QLabel('-')
        bold = QFont(self.font())
        bold.setBold(True)
        self.episode_label.setFont(bold)
        self.episode_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.elapsed_label = QLabel('-')
        self.controller_label = QLabel('-')
        self.controller_label.setAlignment(Qt.AlignCenter)
        self.episode_version_label = QLabel('-')
        self.last_label = QLabel('-')
        self.last_label.setWordWrap(True)
        for row, (name, widget) in enumerate((
                ('Episode', self.episode_label), ('Elapsed', self.elapsed_label),
                ('In control', self.controller_label),
                ('Policy version', self.episode_version_label),
                ('Last finished', self.last_label))):
            grid.addWidget(QLabel(name), row, 0, Qt.AlignTop)
            grid.addWidget(widget, row, 1)
        grid.setColumnStretch(1, 1)
        upper.addWidget(current, 1)

        label_box = QGroupBox('Label')
        label_layout = QVBoxLayout(label_box)
        self.target_label = QLabel('-')
        self.target_label.setWordWrap(True)
        label_layout.addWidget(self.target_label)
        self.note_edit = QLineEdit()
        self.note_edit.setPlaceholderText('note (optional), e.g. cube slipped at handover')
        label_layout.addWidget(self.note_edit)
        buttons = QHBoxLayout()
        self.buttons: dict[str, QPushButton] = {}
        for outcome, text, key in (('success', 'Success', 'S'), ('failure', 'Failure', 'F'),
                                   ('discarded', 'Discard', 'D')):
            button = QPushButton(f'{text} ({key})')
            button.setToolTip(f'Label the target episode {outcome} (key {key}, while the '
                              'dashboard has focus and the note field does not)')
            button.setStyleSheet(f'QPushButton {{ background: {OUTCOME_COLORS[outcome]}; '
                                 'color: white; font-weight: bold; padding: 7px 4px; }')
            button.setFocusPolicy(Qt.NoFocus)
            button.clicked.connect(lambda *_, o=outcome: self.label(o))
            # Plain letters, active only while focus is inside the dashboard (rqt hosts
            # other plugins); a focused note field keeps its letters for typing.
            shortcut = QShortcut(QKeySequence(key), self)
            shortcut.setContext(Qt.WidgetWithChildrenShortcut)
            shortcut.activated.connect(lambda o=outcome: self.label(o))
            self.buttons[outcome] = button
            buttons.addWidget(button)
        label_layout.addLayout(buttons)
        label_layout.addStretch(1)
        upper.addWidget(label_box, 1)
        # Left: what the operator works with; right: what the learner made of it.
        columns = QHBoxLayout()
        left = QVBoxLayout()
        right = QVBoxLayout()
        columns.addLayout(left, 62)
        columns.addLayout(right, 38)
        root.addLayout(columns, 1)
        left.addLayout(upper)

        timeline_box = QGroupBox('Interventions (current and recent episodes)')
        timeline_layout = QVBoxLayout(timeline_box)
        timeline_layout.setContentsMargins(6, 2, 6, 2)
        self.timeline_view = TimelineView()
        timeline_layout.addWidget(self.timeline_view)
        left.addWidget(timeline_box)

        episodes_box = QGroupBox('Recent episodes (select one to relabel it)')
        episodes_layout = QVBoxLayout(episodes_box)
        episodes_layout.setContentsMargins(4, 4, 4, 4)
        self.table = QTableWidget(0, len(TABLE_COLUMNS))
        self.table.setHorizontalHeaderLabels(TABLE_COLUMNS)
        self.table.verticalHeader().setVisible(False)
        self.table.verticalHeader().setDefaultSectionSize(self.fontMetrics().height() + 6)
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.itemSelectionChanged.connect(self._selection_changed)
        episodes_layout.addWidget(self.table)
        left.addWidget(episodes_box, 1)

        status = QGroupBox('Policy and learner')
        status_layout = QVBoxLayout(status)
        status_layout.setContentsMargins(4, 4, 4, 4)
        self.status_table = _key_value_table()
        rows_height = 6 * self.status_table.verticalHeader().defaultSectionSize() + 6
        self.status_table.setFixedHeight(rows_height)
        status_layout.addWidget(self.status_table)
        right.addWidget(status)
        plot_box = QGroupBox('Per policy version')
        plot_layout = QVBoxLayout(plot_box)
        plot_layout.setContentsMargins(4, 4, 4, 4)
        self.plot = VersionPlot()
        plot_layout.addWidget(self.plot)
        right.addWidget(plot_box, 3)
        metrics_box = QGroupBox("Learner's last round")
        metrics_layout = QVBoxLayout(metrics_box)
        metrics_layout.setContentsMargins(4, 4, 4, 4)
        self.metrics_table = _key_value_table()
        metrics_layout.addWidget(self.metrics_table)
        right.addWidget(metrics_box, 2)

        self.message_label = QLabel()
        self.message_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        # A long message is cut at the window's edge instead of widening the window.
        self.message_label.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)
        root.addWidget(self.message_label)
        self._update_robot_filter_text()

    # Public actions ------------------------------------------------------------------------

    def set_namespace(self, namespace: str) -> bool:
        """Follow the robot in `namespace`; return False (with a message) if it is invalid."""
        try:
            namespace = self.ros.set_namespace(namespace)
        except ValueError as exc:
            self.show_message(str(exc), error=True)
            self.namespace_combo.setEditText(self.ros.namespace)
            return False
        self.live = LiveState()
        self.learner_status, self.policy_status = {}, {}
        self.pending_label = None
        if self.namespace_combo.findText(namespace) < 0:
            self.namespace_combo.addItem(namespace)
        self.namespace_combo.setCurrentIndex(self.namespace_combo.findText(namespace))
        self._update_robot_filter_text()
        self._show_status()
        self._reload_index()
        self.show_message(f'following robot namespace {namespace}')
        return True

    def set_index_path(self, path: str | Path) -> None:
        """Read the episode index at `path` from now on."""
        path = expand_index_path(path)
        if path == self.index_path and self.index is not None:
            return
        self._close_index()
        self.index_path = path
        self.index_edit.setText(str(path))
        self.bag_timelines.clear()
        self._reload_index()

    def selected_episode(self) -> str:
        """Return the episode id of the selected table row ('' when none is selected)."""
        rows = self.table.selectionModel().selectedRows()
        if not rows:
            return ''
        item = self.table.item(rows[0].row(), 0)
        return '' if item is None else str(item.data(Qt.UserRole))

    def select_episode(self, episode_id: str) -> bool:
        """Select the table row of `episode_id`; return False if it is not shown."""
        for row in range(self.table.rowCount()):
            item = self.table.item(row, 0)
            if item is not None and item.data(Qt.UserRole) == episode_id:
                self.table.selectRow(row)
                return True
        return False

    def target(self) -> tuple[str, str]:
        """Return (episode id, why) of the episode a label button applies to now."""
        selected = self.selected_episode()
        newest = next((r.episode_id for r in self.records if r.status != RECORDING), '')
        episode_id = label_target(selected, self.live.last_finished_id, newest)
        if not episode_id:
            return '', ''
        if episode_id == selected:
            return episode_id, 'selected'
        if episode_id == self.live.last_finished_id:
            return episode_id, 'last finished'
        return episode_id, 'newest finished in the index'

    def label(self, outcome: str) -> bool:
        """Label the target episode through the recorder's service; False if not sent."""
        episode_id, _why = self.target()
        if not episode_id:
            self.show_message('nothing to label: no finished episode yet (select one in the '
                              'table to relabel it)', error=True)
            return False
        try:
            self.ros.label(episode_id, outcome, self.note_edit.text().strip(), self.labeler)
        except (RuntimeError, ValueError) as exc:
            self.show_message(f'{episode_id} not labelled: {exc}', error=True)
            return False
        self.pending_label = (episode_id, outcome, time.monotonic())
        self.show_message(f'labelling {episode_id} {outcome} ...')
        return True

    def show_message(self, text: str, *, error: bool = False) -> None:
        self.last_message = text
        self.message_label.setStyleSheet('color: #b03030;' if error else 'color: #303030;')
        self.message_label.setText(text)

    def shutdown(self) -> None:
        """Stop the timers and close the index (the owner closes the ROS adapter)."""
        self.poll_timer.stop()
        self.refresh_timer.stop()
        self._close_index()

    # Periodic work -------------------------------------------------------------------------

    def poll(self) -> None:
        """Take what arrived over ROS and update the live parts (every poll_ms)."""
        for update in self.ros.poll():
            self._apply(update)
        if self._index_dirty:
            self._reload_index()
        elif self._timelines_pending:
            self._show_timelines(force=True)
        self._show_live()

    def refresh(self) -> None:
        """Reread the index, discover robot namespaces, check the recorder (every refresh_ms)."""
        self._reload_index()
        try:
            for namespace in self.ros.robot_namespaces():
                if self.namespace_combo.findText(namespace) < 0:
                    self.namespace_combo.addItem(namespace)
        except Exception:  # noqa: BLE001 - the graph query is a convenience only
            pass
        if self.ros.recorder_ready():
            self.connection_label.setText('<span style="color:#2e9d4b">&#9679;</span> '
                                          'recorder')
            self.connection_label.setToolTip('the label service of this namespace answers')
        else:
            self.connection_label.setText('<span style="color:#d64541">&#9679;</span> '
                                          'no recorder')
            self.connection_label.setToolTip('no recorder/label_episode service in this '
                                             'namespace: labels cannot be set')
        if self.pending_label is not None:
            episode_id, outcome, sent = self.pending_label
            if time.monotonic() - sent > LABEL_TIMEOUT_S:
                self.pending_label = None
                self.show_message(f'no answer from the recorder for the label of {episode_id}'
                                  f' ({outcome}) within {LABEL_TIMEOUT_S:g} s; try again',
                                  error=True)

    def _apply(self, update: Any) -> None:
        msg = update.payload
        if update.kind == 'intervention':
            stamp = stamp_seconds(msg.header.stamp.sec, msg.header.stamp.nanosec)
            self.live.on_intervention(stamp or self.ros.now(), int(msg.source),
                                      int(msg.segment_id), msg.episode_id, msg.reason,
                                      update.received)
        elif update.kind == 'event':
            stamp = stamp_seconds(msg.header.stamp.sec, msg.header.stamp.nanosec)
            self.live.on_event(int(msg.event), msg.episode_id, stamp or self.ros.now(),
                               num_steps=int(msg.num_steps),
                               num_interventions=int(msg.num_interventions),
                               policy_version=msg.policy_version)
            if msg.event in (RecorderEvent.START, RecorderEvent.END):
                # A label key pressed now means the episode that just ended, not a row
                # selected for relabelling a while ago.
                self.table.clearSelection()
            self._index_dirty = True
        elif update.kind == 'learner_status':
            self.learner_status = parse_status(msg.data)
            self._show_status()
        elif update.kind == 'policy_status':
            self.policy_status = parse_status(msg.data)
            self._show_status()
        elif update.kind == 'label_result':
            if self.pending_label is not None and self.pending_label[0] == msg.episode_id:
                self.pending_label = None
            if msg.accepted:
                self.note_edit.clear()
                self.show_message(msg.message)
            else:
                self.show_message(f'recorder refused the label: {msg.message}', error=True)
            self._index_dirty = True

    # Index ---------------------------------------------------------------------------------

    def _open_index(self) -> EpisodeIndex | None:
        if self.index is None:
            if not self.index_path.is_file():
                self._index_problem = (f'no episode index at {self.index_path} yet (the '
                                       'recorder creates it when it starts)')
                return None
            try:
                self.index = EpisodeIndex(self.index_path, read_only=True)
            except (OSError, sqlite3.Error, RuntimeError, ValueError) as exc:
                self._index_problem = f'cannot open the episode index {self.index_path}: {exc}'
                return None
        self._index_problem = ''
        return self.index

    def _close_index(self) -> None:
        if self.index is not None:
            self.index.close()
            self.index = None

    def _reload_index(self) -> None:
        self._index_dirty = False
        index = self._open_index()
        records: list[EpisodeRecord] = []
        if index is not None:
            try:
                records = index.list()
            except sqlite3.Error as exc:
                self._index_problem = f'cannot read the episode index: {exc}'
                self._close_index()
        robot = robot_of_namespace(self.ros.namespace) if self.robot_only.isChecked() else None
        self.all_records = records
        self.records = filter_robot(records, robot)
        self.plot.set_stats(version_stats(self.records))
        self._fill_table()
        self._show_timelines(force=True)
        if self._index_problem:
            self.show_message(self._index_problem, error=True)
        elif robot is not None and records and not self.records:
            self.show_message(f'the index has {len(records)} episodes, none of robot '
                              f'{robot!r}: untick the robot filter to see them', error=True)

    def _fill_table(self) -> None:
        shown = self.records[:TABLE_ROWS]
        if shown == self._shown_records:
            self._show_target()
            return  # unchanged: keep the rows (and whatever the mouse is doing with them)
        self._shown_records = shown
        selected = self.selected_episode()
        self.table.blockSignals(True)
        self.table.setRowCount(len(shown))
        for row, record in enumerate(shown):
            duration = (None if record.ended_at is None
                        else record.ended_at - record.started_at)
            values = (record.episode_id, record.outcome, str(record.num_interventions),
                      record.policy_version or '-', str(record.num_steps),
                      format_duration(duration),
                      datetime.fromtimestamp(record.started_at).strftime('%H:%M:%S'),
                      record.status, record.labeler, record.note)
            for column, value in enumerate(values):
                item = QTableWidgetItem(value)
                if column == 0:
                    item.setData(Qt.UserRole, record.episode_id)
                    item.setToolTip(f'{record.instruction}\nbag: {record.bag_path}')
                if TABLE_COLUMNS[column] == 'Outcome':
                    item.setForeground(QBrush(QColor(OUTCOME_COLORS.get(record.outcome,
                                                                        '#000000'))))
                    font = item.font()
                    font.setBold(record.outcome != Outcome.UNLABELLED.label)
                    item.setFont(font)
                if TABLE_COLUMNS[column] == 'Note':
                    item.setToolTip(value)
                self.table.setItem(row, column, item)
        self.table.clearSelection()
        if selected:
            self.select_episode(selected)
        self.table.blockSignals(False)
        # Fit the columns to the ids and values, except the last (the note) that stretches.
        for column in range(len(TABLE_COLUMNS) - 1):
            self.table.resizeColumnToContents(column)
        self._show_target()

    def _selection_changed(self) -> None:
        selected = self.selected_episode()
        record = next((r for r in self.records if r.episode_id == selected), None)
        self.note_edit.setText(record.note if record is not None else '')
        self._show_target()
        self._show_timelines(force=True)

    # Views ---------------------------------------------------------------------------------

    def _update_robot_filter_text(self) -> None:
        self.robot_only.setText(f'only robot {robot_of_namespace(self.ros.namespace)!r}')
        self.robot_only.setToolTip("show only the episodes this namespace's recorder "
                                   'records (its default robot label)')

    def _show_target(self) -> None:
        episode_id, why = self.target()
        if not episode_id:
            self.target_label.setText('Target: none yet (no finished episode)')
            return
        record = next((r for r in self.all_records if r.episode_id == episode_id), None)
        outcome = f', now {record.outcome}' if record is not None else ''
        self.target_label.setText(f'Target: <b>{episode_id}</b> ({why}{outcome})')

    def _show_live(self) -> None:
        live = self.live
        now = self.ros.now()
        if live.episode_id:
            self.episode_label.setText(live.episode_id)
            self.elapsed_label.setText(format_duration(live.elapsed(now)))
        else:
            self.episode_label.setText('none recording')
            self.elapsed_label.setText('-')
        source, text = live.controller(time.monotonic())
        if (source, text) != self._shown_controller:
            # Style sheets are costly to apply: only on a change, not on every poll.
            self._shown_controller = (source, text)
            color = SOURCE_COLORS.get(source, '#ffffff') if source is not None else '#eeeeee'
            fore = 'white' if source is not None else '#606060'
            self.controller_label.setText(text)
            self.controller_label.setStyleSheet(f'background: {color}; color: {fore}; '
                                                'font-weight: bold; padding: 2px 8px; '
                                                'border-radius: 3px;')
        version = live.policy_version
        if not version and live.episode_id and self.policy_status.get('active_version'):
            # The recorder had seen no chunk at START; the policy says what runs now.
            version = f'{self.policy_status["active_version"]} (active now)'
        self.episode_version_label.setText(version or '-')
        last = live.last_finished_id or '-'
        if live.last_finished_id and not live.episode_id:
            # The counts of the END event; a START resets them to the new episode's.
            last += (f' ({format_duration(live.last_finished_duration)}, {live.num_steps} '
                     f'steps, {live.num_interventions} takeovers)')
        self.last_label.setText(last)
        self._show_timelines()

    def _show_timelines(self, force: bool = False) -> None:
        if not force and self._drawn_revision == self.live.revision:
            return
        self._drawn_revision = self.live.revision
        rows: list[TimelineRow] = []
        live = self.live.live_timeline()
        selected = self.selected_episode()
        if live is not None and live.episode_id == self.live.episode_id:
            rows.append(TimelineRow(live.episode_id, f'{live.episode_id} (recording)', live,
                                    highlighted=selected == live.episode_id))
        by_id = {r.episode_id: r for r in self.records}
        finished = [r for r in self.records if r.status != RECORDING]
        candidates = ([by_id[selected]] if selected in by_id else []) + finished
        loads = 0
        pending = False
        for record in candidates:
            if len(rows) >= TIMELINE_ROWS:
                break
            if any(row.episode_id == record.episode_id for row in rows):
                continue
            timeline = self.bag_timelines.get(record.episode_id)
            if timeline is None and record.status != RECORDING:
                if loads < BAG_LOADS_PER_REFRESH:
                    loads += 1
                    timeline = self._load_bag_timeline(record)
            note = ''
            if isinstance(timeline, str):
                timeline, note = None, timeline
            if timeline is None and live is not None and live.episode_id == record.episode_id:
                timeline = live  # what this dashboard saw, until the bag is read
            elif timeline is None and record.status == RECORDING:
                note = RECORDING
            elif timeline is None and not note:
                note = 'reading the bag ...'
                pending = True  # read on the next poll
            rows.append(TimelineRow(record.episode_id, record.episode_id, timeline,
                                    record.outcome, note,
                                    highlighted=record.episode_id == selected))
        self._timelines_pending = pending
        self.timeline_view.set_rows(rows)

    def _load_bag_timeline(self, record: EpisodeRecord) -> Timeline | str:
        try:
            timeline: Timeline | str = timeline_from_bag(record.bag_path, record.episode_id)
            if not timeline.segments:
                timeline = 'no control ticks in the bag'
        except Exception as exc:  # noqa: BLE001 - one unreadable bag must not stop the view
            timeline = f'bag not readable: {exc}'
        self.bag_timelines[record.episode_id] = timeline
        return timeline

    def _show_status(self) -> None:
        rows = policy_summary(self.policy_status)
        learner_rows, metric_rows = learner_summary(self.learner_status)
        if not self.policy_status:
            rows = [('policy', 'no policy/status received')]
        if self.learner_status:
            rows += learner_rows
        else:
            rows.append(('learner', 'no learner/status received'))
        _fill_key_values(self.status_table, rows)
        _fill_key_values(self.metrics_table, metric_rows or [('-', 'no round yet')])
