"""The dashboard widget (python_qt_binding): what rqt embeds and `habc dashboard` shows.

Shows the current episode and who controls the robot, intervention timelines of the current
and recent episodes with the viability p_v of one of them under them (the live episode, or
the one selected in the table, read from its bag), the recent episodes of the index (select
one to relabel it), the Success / Failure / Discard buttons (keys S, F, D) with a note, the
policy and learner status, and success rate and takeovers per policy version.

The Fleet tab beside the episode table has a row per live robot (a namespace where a policy
or an arbiter publishes): its current episode, who controls it, its active policy version,
and success rate and takeovers per policy version from its episodes in the index. Several
stores are read at once (an index path, more of them, and every
<fleet root>/*/episodes.sqlite); a robot's episodes are the rows with its `robot` label.
Selecting a robot's row follows it, as the namespace selector (which lists the live robots)
does.

When a robot asks for help (habc_msgs/HelpRequest on its `help_request`), a red banner names
it, the reason and p_v, the window beeps (again every ALERT_REPEAT_S while the request is
open) and asks the desktop for attention, and `notify-send` shows a notification where it is
installed. Every robot the dashboard discovers is heard, not only the followed one. The
banner turns into a note of why the request ended (answered, recovered) when it clears.

All ROS traffic goes through a DashboardRos (rqt_habc.ros_adapter) that a QTimer polls; the
episode index (SQLite) is read directly, and written only by the recorder, through its
label service, so labels live in one place and survive restarts of the dashboard.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
import math
import os
from pathlib import Path
import shutil
import sqlite3
import subprocess
import time
from typing import Any

from python_qt_binding.QtCore import QPointF, QRectF, QSize, Qt, QTimer
from python_qt_binding.QtGui import (
    QBrush,
    QColor,
    QFont,
    QKeySequence,
    QPainter,
    QPen,
    QPolygonF,
)
from python_qt_binding.QtWidgets import (
    QAbstractItemView,
    QApplication,
    QCheckBox,
    QComboBox,
    QFrame,
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
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from habc_episodes.help_requests import HELP_REQUEST_TYPE
from habc_episodes.index import EpisodeIndex, EpisodeRecord
from habc_episodes.stats import version_stats, VersionStats
from habc_episodes.vocabulary import Controller, EpisodeStatus, Outcome, RecorderEvent
from rqt_habc.model import (
    CLEARED,
    critic_problem,
    decimate,
    DEFAULT_INDEX,
    filter_robot,
    FLEET_COLUMNS,
    fleet_index_paths,
    fleet_root_problem,
    fleet_rows,
    FleetLive,
    FleetRow,
    help_spans,
    help_threshold,
    HelpAlerts,
    HelpBanner,
    HelpMark,
    HelpSpan,
    index_sources,
    label_target,
    learner_summary,
    LiveState,
    merge_records,
    parse_status,
    policy_summary,
    RAISED,
    robot_name,
    robot_of_namespace,
    selector_items,
    source_name,
    stamp_seconds,
    stats_by_robot,
    Timeline,
    timeline_from_bag,
    viability_from_bag,
    viability_note,
    ViabilityTrace,
)

SOURCE_COLORS = {Controller.POLICY: '#3a7bd5', Controller.HUMAN: '#f0932b',
                 Controller.HOLD: '#a6a6a6'}
OUTCOME_COLORS = {Outcome.SUCCESS.label: '#2e9d4b', Outcome.FAILURE.label: '#d64541',
                  Outcome.DISCARDED.label: '#8c8c8c', Outcome.UNLABELLED.label: '#d0d0d0'}
TAKEOVER_COLOR = '#f0932b'
VIABILITY_COLOR = '#6c3fb5'   # apart from the sources' blue, orange and grey
HELP_COLOR = '#c0392b'
HELP_SPAN_COLOR = QColor(192, 57, 43, 45)   # see-through: the p_v line stays visible
BANNER_STYLES = {
    RAISED: (f'QFrame#helpBanner {{ background: {HELP_COLOR}; border-radius: 4px; }} '
             'QLabel { color: white; font-weight: bold; }'),
    CLEARED: ('QFrame#helpBanner { background: #e3f1e6; border: 1px solid #9ccfa8; '
              'border-radius: 4px; } QLabel { color: #1e6b34; }'),
}
# While a help request stays open, the beep comes again after this long (s).
ALERT_REPEAT_S = 10.0

TABLE_COLUMNS = ('Episode', 'Outcome', 'Takeovers', 'Version', 'Steps', 'Duration', 'Started',
                 'Status', 'Labeler', 'Note')
TABLE_ROWS = 50
# The fleet table's Episode column (long ids) is cut at this width (the tooltip has it all),
# so the per-version column stays in view.
FLEET_EPISODE_WIDTH = 220
FOLLOWED_COLOR = '#e8f0fb'  # the followed robot's row, as its timeline row
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


def _optional_path(path: str | Path | None) -> Path | None:
    """Return expand_index_path(path), or None for None or an empty text."""
    return None if path is None or not str(path).strip() else expand_index_path(
        str(path).strip())


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


@dataclass(frozen=True)
class ViabilityRow:
    """The p_v strip under the timelines: one episode's p_v and its help requests.

    `origin` is the time the strip starts at: that of the episode's timeline row, so both
    share the time axis (None: the first point's stamp).
    """

    episode_id: str
    caption: str
    points: tuple[tuple[float, float], ...] = ()
    spans: tuple[HelpSpan, ...] = ()
    origin: float | None = None
    threshold: float | None = None
    note: str = ''

    @property
    def start(self) -> float | None:
        if self.origin is not None:
            return self.origin
        return self.points[0][0] if self.points else None


class TimelineView(QWidget):
    """Intervention timelines, one row per episode, and a p_v strip, on one time axis (s)."""

    ROW_HEIGHT = 16
    ROW_GAP = 6
    TOP = 20
    PV_HEIGHT = 50
    PV_GAP = 6

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.rows: list[TimelineRow] = []
        self.viability = ViabilityRow('', 'p_v')
        # Room for TIMELINE_ROWS rows, and fewer when the window has no more (a help banner
        # takes some): the p_v strip and the axis stay whole at the bottom.
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Maximum)

    def _height(self, rows: int) -> int:
        # The axis labels take a line of the font, whatever its size.
        axis = 6 + self.fontMetrics().height() + 2
        return (self.TOP + rows * (self.ROW_HEIGHT + self.ROW_GAP) + self.PV_GAP
                + self.PV_HEIGHT + 4 + axis)

    def sizeHint(self) -> QSize:  # noqa: N802 - Qt's name
        return QSize(600, self._height(TIMELINE_ROWS))

    def minimumSizeHint(self) -> QSize:  # noqa: N802 - Qt's name
        return QSize(300, self._height(2))

    def set_rows(self, rows: list[TimelineRow]) -> None:
        if rows != self.rows:
            self.rows = rows
            self.update()

    def set_viability(self, row: ViabilityRow) -> None:
        if row != self.viability:
            self.viability = row
            self.update()

    def _span(self) -> float:
        durations = [r.timeline.duration for r in self.rows if r.timeline]
        pv, start = self.viability, self.viability.start
        if pv.points and start is not None:
            durations.append(pv.points[-1][0] - start)
            durations += [(s.end if s.end is not None else s.start) - start for s in pv.spans]
        return max(durations + [1.0])

    def paintEvent(self, event: Any) -> None:  # noqa: N802 - Qt's name
        painter = QPainter(self)
        painter.setRenderHint(QPainter.Antialiasing, False)
        width, height = self.width(), self.height()
        painter.fillRect(0, 0, width, height, QColor('white'))
        metrics = painter.fontMetrics()
        label_width = min(270, int(width * 0.38))
        left, right = label_width + 8, width - 22
        self._legend(painter, right)
        span = self._span()
        scale = (right - left) / span
        y = self.TOP
        axis_y = height - (6 + metrics.height() + 2)
        strip_top = axis_y - 4 - self.PV_HEIGHT
        fits = max(1, (strip_top - self.PV_GAP - self.TOP + self.ROW_GAP)
                   // (self.ROW_HEIGHT + self.ROW_GAP))
        if not self.rows:
            painter.setPen(QColor('#808080'))
            painter.drawText(QRectF(0, y, width, strip_top - self.PV_GAP - y), Qt.AlignCenter,
                             'no episode yet: timelines appear when the arbiter publishes '
                             'intervention ticks or an episode is recorded')
        for row in self.rows[:fits]:
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
        self._viability_strip(painter, strip_top, left, right, label_width, scale)
        y = axis_y
        # Time axis under the rows and the strip: it is theirs.
        painter.setPen(QColor('#606060'))
        painter.drawLine(left, y, right, y)
        step = _nice_step(span, max(2, (right - left) // 80))
        tick = 0.0
        while tick <= span + 1e-9:
            x = left + tick * scale
            painter.drawLine(int(x), y, int(x), y + 4)
            painter.drawText(QRectF(x - 30, y + 4, 60, metrics.height()),
                             Qt.AlignHCenter | Qt.AlignTop, f'{tick:g} s')
            tick += step
        painter.end()

    def _viability_strip(self, painter: QPainter, top: int, left: float, right: float,
                         label_width: int, scale: float) -> None:
        pv = self.viability
        height = self.PV_HEIGHT
        bottom = top + height
        metrics = painter.fontMetrics()
        line = metrics.height()
        bold = QFont(painter.font())
        bold.setBold(True)
        painter.setFont(bold)
        painter.setPen(QColor(VIABILITY_COLOR))
        painter.drawText(QRectF(20, top, label_width - 50, line), Qt.AlignLeft | Qt.AlignTop,
                         'viability p_v')
        painter.setFont(self.font())
        painter.setPen(QColor('#505050'))
        caption = metrics.elidedText(pv.caption, Qt.ElideMiddle, label_width - 50)
        painter.drawText(QRectF(20, top + line, label_width - 50, line),
                         Qt.AlignLeft | Qt.AlignTop, caption)
        painter.fillRect(QRectF(left, top, right - left, height), QColor('#f7f5fb'))
        for value in (0.0, 0.5, 1.0):
            y = bottom - value * height
            painter.setPen(QColor('#e2dcef'))
            painter.drawLine(int(left), int(y), int(right), int(y))
            painter.setPen(QColor('#707070'))
            painter.drawText(QRectF(left - 40, y - line / 2, 36, line),
                             Qt.AlignRight | Qt.AlignVCenter, f'{value:g}')
        start = pv.start
        last = pv.points[-1][0] if pv.points else start
        # Annotations in a smaller font: the strip is only a few lines of text high.
        small = QFont(self.font())
        small.setPointSizeF(small.pointSizeF() * 0.85)
        painter.setFont(small)
        small_line = painter.fontMetrics().height()
        if start is not None:
            for span in pv.spans:
                end = span.end if span.end is not None else max(last, span.start)
                x0 = max(left, left + (span.start - start) * scale)
                x1 = min(right, left + (end - start) * scale)
                if x1 < left or x0 > right:
                    continue
                painter.fillRect(QRectF(x0, top, max(2.0, x1 - x0), height), HELP_SPAN_COLOR)
                painter.fillRect(QRectF(x0, top, 2.0, height), QColor(HELP_COLOR))
                text = f'help: {span.reason}'
                if span.cleared_reason:
                    text += f' \u2192 {span.cleared_reason}'
                painter.setPen(QColor(HELP_COLOR))
                painter.drawText(QRectF(x0 + 4, top, max(60.0, right - x0 - 4), small_line),
                                 Qt.AlignLeft | Qt.AlignTop, text)
        if pv.threshold is not None:
            y = bottom - pv.threshold * height
            pen = QPen(QColor(HELP_COLOR), 1, Qt.DashLine)
            painter.setPen(pen)
            painter.drawLine(int(left), int(y), int(right), int(y))
            # Above the line when it is low, below it when high: inside the strip.
            above = pv.threshold < 0.5
            painter.drawText(QRectF(right - 200, y - small_line if above else y + 1, 198,
                                    small_line),
                             Qt.AlignRight | (Qt.AlignBottom if above else Qt.AlignTop),
                             f'help below {pv.threshold:g}')
        painter.setFont(self.font())
        drawn = False
        if start is not None and pv.points:
            painter.setRenderHint(QPainter.Antialiasing, True)
            painter.setPen(QPen(QColor(VIABILITY_COLOR), 1.6))
            end = start + (right - left) / scale
            for run in decimate(pv.points, start, end, int(right - left)):
                points = [QPointF(left + (t - start) * scale,
                                  bottom - min(1.0, max(0.0, v)) * height) for t, v in run]
                if len(points) == 1:
                    painter.drawEllipse(points[0], 1.5, 1.5)
                else:
                    painter.drawPolyline(QPolygonF(points))
                drawn = True
            painter.setRenderHint(QPainter.Antialiasing, False)
        if pv.note:
            painter.setPen(QColor('#707070'))
            # Over the plot when nothing is drawn, else in its corner, out of the line's way.
            area = (QRectF(left + 8, top, right - left - 16, height) if not drawn
                    else QRectF(left + 8, bottom - line - 1, right - left - 16, line))
            align = (Qt.AlignCenter if not drawn else Qt.AlignRight | Qt.AlignBottom)
            painter.drawText(area, align, metrics.elidedText(pv.note, Qt.ElideRight,
                                                             int(area.width())))

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


# Desktop notifications -----------------------------------------------------------------------

class DesktopNotifier:
    """Desktop notifications through `notify-send` where it is installed (Linux desktops).

    Without it (or when it fails to start) notify() returns False and nothing else happens:
    the banner and the beep still tell the operator. The program runs in the background;
    finished ones are reaped on the next call.
    """

    def __init__(self, program: str | None = None) -> None:
        self.program = program if program is not None else shutil.which('notify-send')
        self._running: list[subprocess.Popen] = []

    def notify(self, title: str, body: str, *, urgent: bool = True) -> bool:
        """Show a notification; return False when there is no way to."""
        self._running = [p for p in self._running if p.poll() is None]
        if not self.program:
            return False
        command = [self.program, '-a', 'habc dashboard', '-u',
                   'critical' if urgent else 'normal', title, body]
        try:
            self._running.append(subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True))
        except OSError:
            self.program = None  # gone or not runnable: stop trying
            return False
        return True


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

    def __init__(self, ros: Any, index_path: str | Path | None = DEFAULT_INDEX, *,
                 extra_indexes: Sequence[str | Path] = (),
                 fleet_root: str | Path | None = None, labeler: str = '',
                 poll_ms: int = 50, refresh_ms: int = 2000,
                 parent: QWidget | None = None) -> None:
        """Show the robot that `ros` (a DashboardRos) follows, the fleet, and their episodes.

        Episodes are read from the index at `index_path` (None or '': none), those in
        `extra_indexes` and every <fleet_root>/*/episodes.sqlite, all read-only.
        """
        super().__init__(parent)
        self.setObjectName('HabcDashboard')
        self.setWindowTitle('habc dashboard')
        self.ros = ros
        self.labeler = labeler
        self.live = LiveState()
        self.alerts = HelpAlerts()
        self.notifier = DesktopNotifier()
        self.alerts_given = 0           # help requests the operator was alerted to
        self._last_beep: float | None = None
        self.shown_banner: HelpBanner | None = None
        self.index_path = _optional_path(index_path)
        self.extra_index_paths = [expand_index_path(p) for p in extra_indexes]
        self.fleet_root = _optional_path(fleet_root)
        self.indexes: dict[Path, EpisodeIndex] = {}  # open stores by path
        self.fleet = FleetLive()
        self.live_namespaces: list[str] = []  # robots found running in the graph
        self.fleet_stats: dict[str, list[VersionStats]] = {}  # by the index's robot label
        self.fleet_shown: list[FleetRow] | None = None  # the rows the fleet table shows
        self._fleet_revision = -1
        self.all_records: list[EpisodeRecord] = []
        self.records: list[EpisodeRecord] = []  # shown ones: newest first, robot filter
        self.learner_status: dict[str, Any] = {}
        self.policy_status: dict[str, Any] = {}
        self.bag_timelines: dict[str, Timeline | str] = {}  # str: why there is none
        self.bag_viability: dict[str, ViabilityTrace | str] = {}
        self.pending_label: tuple[str, str, float] | None = None
        self.last_message = ''
        self._index_problem = ''
        self.index_problems: list[str] = []
        self._index_dirty = True
        self._timelines_pending = False  # bags left to read for the timeline view
        self._shown_controller: tuple[int | None, str] | None = None
        self._shown_viability: tuple[str, str] | None = None
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
        self.index_edit = QLineEdit('' if self.index_path is None else str(self.index_path))
        self.index_edit.setToolTip('The episode index (SQLite) the recorder writes: '
                                   '<storage_dir>/episodes.sqlite')
        self.index_edit.setPlaceholderText('no single index: the fleet root only')
        self.index_edit.editingFinished.connect(
            lambda: self.set_index_path(self.index_edit.text()))
        top.addWidget(self.index_edit, 1)
        # The other stores read (more --index paths, the fleet root's); hidden without any.
        self.stores_label = QLabel()
        self.stores_label.hide()
        top.addWidget(self.stores_label)
        self.connection_label = QLabel()
        top.addWidget(self.connection_label)
        root.addLayout(top)

        # Hidden until a robot asks for help; above everything else, so it is not missed.
        self.help_banner = QFrame()
        self.help_banner.setObjectName('helpBanner')
        banner_layout = QHBoxLayout(self.help_banner)
        banner_layout.setContentsMargins(10, 4, 8, 4)
        banner_layout.setSpacing(12)
        self.help_heading = QLabel('HELP')
        heading_font = QFont(self.font())
        heading_font.setPointSizeF(heading_font.pointSizeF() * 1.4)
        heading_font.setBold(True)
        self.help_heading.setFont(heading_font)
        banner_layout.addWidget(self.help_heading)
        self.help_label = QLabel()
        self.help_label.setWordWrap(True)
        self.help_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        bold = QFont(self.font())
        bold.setBold(True)
        self.help_label.setFont(bold)
        banner_layout.addWidget(self.help_label, 1)
        self.follow_button = QPushButton()
        self.follow_button.setFocusPolicy(Qt.NoFocus)
        self.follow_button.setToolTip('Follow the robot that asks for help (its timeline and '
                                      'p_v; labels go to its recorder)')
        self.follow_button.clicked.connect(self._follow_help)
        banner_layout.addWidget(self.follow_button)
        self.help_banner.hide()
        root.addWidget(self.help_banner)

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
        self.viability_label = QLabel('-')
        # A long note (why there is no critic) wraps instead of widening the window.
        self.viability_label.setWordWrap(True)
        self.viability_label.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)
        self.viability_label.setToolTip("The critic's estimate p_v = P(success | state) for "
                                        'the newest action chunk of the running policy')
        self.last_label = QLabel('-')
        self.last_label.setWordWrap(True)
        for row, (name, widget) in enumerate((
                ('Episode', self.episode_label), ('Elapsed', self.elapsed_label),
                ('In control', self.controller_label),
                ('Policy version', self.episode_version_label),
                ('Viability p_v', self.viability_label),
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

        # The followed robot's episodes and the whole fleet share the room under the
        # timelines: both are tables an operator reads one at a time.
        self.tabs = QTabWidget()
        episodes_box = QWidget()
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
        self.tabs.addTab(episodes_box, 'Recent episodes (select one to relabel it)')
        self.fleet_table = QTableWidget(0, len(FLEET_COLUMNS))
        self.fleet_table.setHorizontalHeaderLabels(FLEET_COLUMNS)
        self.fleet_table.verticalHeader().setVisible(False)
        self.fleet_table.verticalHeader().setDefaultSectionSize(
            self.fontMetrics().height() + 6)
        self.fleet_table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.fleet_table.setSelectionMode(QAbstractItemView.SingleSelection)
        self.fleet_table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.fleet_table.horizontalHeader().setStretchLastSection(True)
        self.fleet_table.horizontalHeaderItem(len(FLEET_COLUMNS) - 1).setToolTip(
            'per policy version, newest first: success rate of the labelled episodes '
            '(successes/labelled) and takeovers per finished episode; hover a cell for '
            'every version')
        self.fleet_table.setToolTip('Every live robot; select one to follow it')
        self.fleet_table.itemSelectionChanged.connect(self._fleet_selection_changed)
        self.tabs.addTab(self.fleet_table, 'Fleet')
        left.addWidget(self.tabs, 1)

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
        # The help requests of every robot stay: they are heard whichever one is followed.
        # The banner is redrawn, though: its Follow button offers the robots not followed.
        self.shown_banner = None
        if self.namespace_combo.findText(namespace) < 0:
            self.namespace_combo.addItem(namespace)
        self.namespace_combo.setCurrentIndex(self.namespace_combo.findText(namespace))
        self._update_robot_filter_text()
        self._show_status()
        self._reload_index()
        self._select_fleet_row()
        self.show_message(f'following robot namespace {namespace}')
        return True

    def set_index_path(self, path: str | Path | None) -> None:
        """Read the episode index at `path` from now on (None or '': none but the others)."""
        path = _optional_path(path)
        if path == self.index_path and (path is None or path in self.indexes):
            return
        self.index_path = path
        self.index_edit.setText('' if path is None else str(path))
        self.bag_timelines.clear()
        self.bag_viability.clear()
        self._reload_index()

    def set_fleet_root(self, root: str | Path | None) -> None:
        """Read every <root>/*/episodes.sqlite from now on (None or '': no fleet root)."""
        self.fleet_root = _optional_path(root)
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
        self._close_indexes()

    # Periodic work -------------------------------------------------------------------------

    def poll(self) -> None:
        """Take what arrived over ROS and update the live parts (every poll_ms)."""
        raised: list[str] = []
        for update in self.ros.poll():
            if self._apply(update) == RAISED:
                raised.append(update.namespace)
        # Alert to requests still open after the batch: a latched request that was raised
        # and cleared before this dashboard started arrives with its clearing, and is old.
        for namespace in dict.fromkeys(raised):
            if namespace in self.alerts.open:
                self._alert(self.alerts.open[namespace])
        if self._index_dirty:
            self._reload_index()
        elif self._timelines_pending:
            self._show_timelines(force=True)
        if self.fleet.revision != self._fleet_revision:
            self._fill_fleet()
        self._show_live()

    def refresh(self) -> None:
        """Reread the index, discover robot namespaces, check the recorder (every refresh_ms)."""
        self._reload_index()
        try:
            live: list[str] = self.ros.live_robots()
        except Exception:  # noqa: BLE001 - the graph query is a convenience only
            live = self.live_namespaces  # as last seen: a failed query removes no robot
        self.live_namespaces = live
        self.ros.watch_fleet(live)
        self.fleet.retain(live)
        self._update_selector(live)
        try:
            # Every robot found is heard when it asks for help, also one that only has a
            # recorder or help requests left in the graph.
            self.ros.watch_help(sorted({*live, *self.ros.robot_namespaces()}))
        except Exception:  # noqa: BLE001 - the graph query is a convenience only
            pass
        # Also without news: 'no arbiter ticks for N s' grows while a robot is silent.
        self._fill_fleet()
        if (self.alerts.open and self._last_beep is not None
                and time.monotonic() - self._last_beep >= ALERT_REPEAT_S):
            self._beep()  # still open: nobody has answered yet
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

    def _apply(self, update: Any) -> str:
        """Take one update; return RAISED or CLEARED when it opens or ends a help request."""
        msg = update.payload
        if update.kind == 'help':
            return self._apply_help(update)
        if update.kind.startswith('fleet_'):
            self._apply_fleet(update)
            return ''
        if update.kind == 'chunk':
            stamp = stamp_seconds(msg.header.stamp.sec, msg.header.stamp.nanosec)
            self.live.on_chunk(stamp or self.ros.now(), float(msg.viability))
        elif update.kind == 'intervention':
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
            self._drawn_revision = -1  # the p_v strip shows its critic and threshold
        elif update.kind == 'label_result':
            if self.pending_label is not None and self.pending_label[0] == msg.episode_id:
                self.pending_label = None
            if msg.accepted:
                self.note_edit.clear()
                self.show_message(msg.message)
            else:
                self.show_message(f'recorder refused the label: {msg.message}', error=True)
            self._index_dirty = True
        return ''

    # Fleet ---------------------------------------------------------------------------------

    def _apply_fleet(self, update: Any) -> None:
        msg, namespace = update.payload, update.namespace
        if update.kind == 'fleet_intervention':
            self.fleet.on_intervention(namespace, int(msg.source), msg.episode_id, msg.reason,
                                       update.received)
        elif update.kind == 'fleet_event':
            self.fleet.on_event(namespace, int(msg.event), msg.episode_id, msg.policy_version)
            # An episode ended or was labelled: that robot's success rates change.
            self._index_dirty = True
        elif update.kind == 'fleet_policy_status':
            self.fleet.on_policy_status(namespace, parse_status(msg.data))

    def _update_selector(self, live: list[str]) -> None:
        """List the live robots in the namespace selector, keeping what the user picked."""
        items = selector_items(live, self.ros.namespace)
        combo = self.namespace_combo
        if [combo.itemText(i) for i in range(combo.count())] == items:
            return
        typed = combo.currentText()  # the edit text: a namespace being typed stays
        combo.blockSignals(True)
        combo.clear()
        combo.addItems(items)
        combo.setCurrentIndex(items.index(self.ros.namespace))
        if typed != self.ros.namespace:
            combo.setEditText(typed)
        combo.blockSignals(False)

    def fleet_rows(self) -> list[FleetRow]:
        """Return the fleet table's rows now: one per live robot."""
        return fleet_rows(self.live_namespaces, self.fleet, self.fleet_stats, time.monotonic())

    def _fill_fleet(self) -> None:
        self._fleet_revision = self.fleet.revision
        rows = self.fleet_rows()
        if rows == self.fleet_shown:
            return  # unchanged: keep the rows (and whatever the mouse is doing with them)
        self.fleet_shown = rows
        table = self.fleet_table
        table.blockSignals(True)
        table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            followed = row.namespace == self.ros.namespace
            for column, value in enumerate(row.cells()):
                item = QTableWidgetItem(value)
                item.setToolTip(value)
                if column == 1 and row.episode_id:
                    # Cut in the middle (ids differ at their ends), keeping the state.
                    metrics = table.fontMetrics()
                    state = row.episode_state
                    item.setText(metrics.elidedText(
                        row.episode_id, Qt.ElideMiddle,
                        FLEET_EPISODE_WIDTH - 14 - metrics.horizontalAdvance(state)) + state)
                if followed:
                    item.setBackground(QBrush(QColor(FOLLOWED_COLOR)))
                if column == 0:
                    item.setData(Qt.UserRole, row.namespace)
                    item.setToolTip(f'namespace {row.namespace}: '
                                    + ('followed' if followed else 'select to follow it'))
                    font = item.font()
                    font.setBold(followed)
                    item.setFont(font)
                elif column == 2 and row.source is not None:
                    item.setBackground(QBrush(QColor(SOURCE_COLORS.get(row.source,
                                                                       '#606060'))))
                    item.setForeground(QBrush(QColor('white')))
                elif column == len(FLEET_COLUMNS) - 1:
                    item.setToolTip(row.versions_detail)
                table.setItem(r, column, item)
        # The followed row is marked by its colour, not by a selection: a selection's
        # highlight would hide the colour of who controls that robot.
        table.clearSelection()
        table.blockSignals(False)
        for column in range(len(FLEET_COLUMNS) - 1):
            table.resizeColumnToContents(column)
        table.setColumnWidth(1, min(table.columnWidth(1), FLEET_EPISODE_WIDTH))
        self.tabs.setTabText(self.tabs.indexOf(table), f'Fleet ({len(rows)} live)')

    def followed_fleet_row(self) -> int:
        """Return the fleet table's row of the followed robot (-1 when it is not live)."""
        return next((r for r, row in enumerate(self.fleet_shown or ())
                     if row.namespace == self.ros.namespace), -1)

    def _select_fleet_row(self) -> None:
        """Mark the followed robot's row: redraw the table (a click's selection goes)."""
        self.fleet_shown = None
        self._fill_fleet()

    def _fleet_selection_changed(self) -> None:
        rows = self.fleet_table.selectionModel().selectedRows()
        if not rows:
            return
        item = self.fleet_table.item(rows[0].row(), 0)
        namespace = '' if item is None else str(item.data(Qt.UserRole))
        if namespace and namespace != self.ros.namespace:
            self.set_namespace(namespace)

    # Help requests -------------------------------------------------------------------------

    def _apply_help(self, update: Any) -> str:
        msg = update.payload
        namespace = update.namespace or self.ros.namespace
        stamp = stamp_seconds(msg.header.stamp.sec, msg.header.stamp.nanosec)
        mark = HelpMark(namespace, stamp or self.ros.now(), bool(msg.active), str(msg.reason),
                        float(msg.viability), str(msg.policy_version), update.received)
        change = self.alerts.on_help(mark)
        if namespace == self.ros.namespace:
            if mark.active:
                # Its trace fills in p_v this dashboard did not see (it started late).
                self.live.on_help_trace(list(msg.trace_stamps), list(msg.trace_viability))
            self._drawn_revision = -1  # the strip marks the request
        return change

    def _alert(self, mark: HelpMark) -> None:
        """Make sure the operator notices a new help request: beep, flash, notify."""
        self.alerts_given += 1
        self._beep()
        # Flashes the window's task bar entry (or bounces the dock icon) until it is looked
        # at; rqt's main window when the dashboard is a plugin.
        QApplication.alert(self.window(), 0)
        banner = self.alerts.banner(self.ros.now(), time.monotonic())
        line = next((text for text, ns in zip(banner.lines, banner.namespaces, strict=True)
                     if ns == mark.namespace), '')
        self.notifier.notify(f'{robot_name(mark.namespace)} asks for help', line)

    def _beep(self) -> None:
        self._last_beep = time.monotonic()
        QApplication.beep()

    def _follow_help(self) -> None:
        banner = self.shown_banner
        if banner is not None:
            others = [ns for ns in banner.namespaces if ns != self.ros.namespace]
            if others:
                self.set_namespace(others[0])

    def _show_help(self) -> None:
        banner = self.alerts.banner(self.ros.now(), time.monotonic())
        if banner == self.shown_banner:
            return
        previous, self.shown_banner = self.shown_banner, banner
        if not banner.level:
            self.help_banner.hide()
            return
        if previous is None or previous.level != banner.level:
            # Style sheets are costly to apply: only when the level changes.
            self.help_banner.setStyleSheet(BANNER_STYLES[banner.level])
        self.help_heading.setVisible(banner.level == RAISED)
        self.help_label.setText('\n'.join(banner.lines))
        others = [ns for ns in banner.namespaces if ns != self.ros.namespace]
        self.follow_button.setVisible(banner.level == RAISED and bool(others))
        if others:
            self.follow_button.setText(f'Follow {robot_name(others[0])}')
        self.help_banner.show()

    # Index ---------------------------------------------------------------------------------

    def index_paths(self) -> list[Path]:
        """Return the stores read now: the index, the extra ones and the fleet root's."""
        fleet = fleet_index_paths(self.fleet_root) if self.fleet_root is not None else []
        return index_sources([self.index_path, *self.extra_index_paths, *fleet])

    def _read_indexes(self) -> tuple[list[EpisodeRecord], list[str]]:
        """Return the records of every store, newest first, and what went wrong with any."""
        paths = self.index_paths()
        for path in [p for p in self.indexes if p not in paths]:
            self.indexes.pop(path).close()
        problems, groups = [], []
        for path in paths:
            index = self.indexes.get(path)
            if index is None:
                if not path.is_file():
                    problems.append(f'no episode index at {path} yet (the recorder creates it '
                                    'when it starts)')
                    continue
                try:
                    index = self.indexes[path] = EpisodeIndex(path, read_only=True)
                except (OSError, sqlite3.Error, RuntimeError, ValueError) as exc:
                    problems.append(f'cannot open the episode index {path}: {exc}')
                    continue
            try:
                groups.append(index.list())
            except sqlite3.Error as exc:
                problems.append(f'cannot read the episode index {path}: {exc}')
                self.indexes.pop(path).close()  # opened afresh next time
        if self.fleet_root is not None and not fleet_index_paths(self.fleet_root):
            problems.append(fleet_root_problem(self.fleet_root))
        elif not paths:
            problems.append('no episode index given: pass --index or --fleet-root')
        self._show_stores(paths)
        return merge_records(groups), problems

    def _show_stores(self, paths: list[Path]) -> None:
        others = [p for p in paths if p != self.index_path]
        self.stores_label.setVisible(bool(others) or self.fleet_root is not None)
        # Short: the index field beside it needs the room; the tooltip names them all.
        text = f'+{len(others)}' if self.index_path is not None else f'{len(others)}'
        text += ' store' + ('s' if len(others) != 1 else '')
        self.stores_label.setText(text)
        tip = [f'fleet root {self.fleet_root} (every */episodes.sqlite)'] if (
            self.fleet_root is not None) else []
        self.stores_label.setToolTip('\n'.join(tip + [str(p) for p in others]
                                               or ['no store found yet']))

    def _close_indexes(self) -> None:
        for index in self.indexes.values():
            index.close()
        self.indexes.clear()

    def _reload_index(self) -> None:
        self._index_dirty = False
        records, self.index_problems = self._read_indexes()
        self._index_problem = '; '.join(self.index_problems)
        robot = robot_of_namespace(self.ros.namespace) if self.robot_only.isChecked() else None
        self.all_records = records
        self.records = filter_robot(records, robot)
        self.plot.set_stats(version_stats(self.records))
        self.fleet_stats = stats_by_robot(records)
        self._fleet_revision = -1  # the fleet rows show these stats
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
        self._show_viability_label()
        self._show_help()
        self._show_timelines()

    def _show_viability_label(self) -> None:
        live = self.live
        problem = critic_problem(self.policy_status)
        latest = live.viability.latest()
        color = '#303030'
        tip = ''
        if latest is not None and math.isfinite(latest[1]):
            text = f'{latest[1]:.2f}'
            threshold = help_threshold(self.policy_status)
            if threshold is not None and latest[1] < threshold:
                # Only the colour says it here: the strip shows the threshold, and a longer
                # text would wrap in this narrow column.
                color = HELP_COLOR
                tip = f'below the help threshold {threshold:g}'
        elif live.timeline_episode or problem:
            text = viability_note(live.viability, problem)
            color = '#707070'
        else:
            text = '-'
        if (text, color) != self._shown_viability:
            self._shown_viability = (text, color)
            self.viability_label.setText(text)
            self.viability_label.setToolTip(tip or text)
            self.viability_label.setStyleSheet(f'color: {color};')

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
        self.timeline_view.set_viability(self._viability_row(rows, selected))

    def _viability_row(self, rows: list[TimelineRow], selected: str) -> ViabilityRow:
        """Return the p_v strip of the selected episode, else the live one, else the newest."""
        live_id = self.live.timeline_episode
        episode_id = selected or live_id or (rows[0].episode_id if rows else '')
        if not episode_id:
            problem = critic_problem(self.policy_status)
            return ViabilityRow('', 'no episode yet',
                                note=f'no critic: {problem}' if problem else '')
        origin = next((r.timeline.origin for r in rows
                       if r.episode_id == episode_id and r.timeline is not None), None)
        record = next((r for r in self.records if r.episode_id == episode_id), None)
        finished = record is not None and record.status != RECORDING
        recording = episode_id == self.live.episode_id
        # What this dashboard saw while the episode ran, until a finished one is selected:
        # then its bag, which also has the chunks that arrived before the dashboard did.
        if episode_id == live_id and (recording or not selected or not finished):
            series = self.live.viability
            spans = [s for s in help_spans(self.alerts.events(self.ros.namespace))
                     if origin is None or s.end is None or s.end >= origin]
            return ViabilityRow(episode_id, f'{episode_id} ({"live" if recording else "ended"})',
                                series.points(), tuple(spans), origin,
                                help_threshold(self.policy_status),
                                viability_note(series, critic_problem(self.policy_status)))
        if not finished:
            return ViabilityRow(episode_id, episode_id,
                                note='recording elsewhere: its p_v shows once it has ended')
        trace = self.bag_viability.get(episode_id)
        if trace is None:
            trace = self._load_bag_viability(record)
        if isinstance(trace, str):
            return ViabilityRow(episode_id, f'{episode_id} (recorded)', note=trace)
        if origin is None and isinstance(self.bag_timelines.get(episode_id), Timeline):
            origin = self.bag_timelines[episode_id].origin
        note = trace.note
        if not note and trace.source == HELP_REQUEST_TYPE:
            note = ('p_v only around help requests (from their traces): policy/chunk was '
                    'not recorded')
        return ViabilityRow(episode_id, f'{episode_id} (recorded)', trace.points,
                            tuple(help_spans(trace.help)), origin, None, note)

    def _load_bag_viability(self, record: EpisodeRecord) -> ViabilityTrace | str:
        try:
            trace: ViabilityTrace | str = viability_from_bag(record.bag_path,
                                                             record.episode_id)
        except Exception as exc:  # noqa: BLE001 - one unreadable bag must not stop the view
            trace = f'bag not readable: {exc}'
        self.bag_viability[record.episode_id] = trace
        return trace

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
