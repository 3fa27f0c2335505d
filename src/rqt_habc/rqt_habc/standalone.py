"""`habc dashboard`: the labelling dashboard in its own window, without rqt.

Shows the robot in --namespace (switchable in the window) and the episode index the
recorder writes (--index, <storage_dir>/episodes.sqlite). Labels go through the recorder's
`recorder/label_episode` service, so a recorder must run in that namespace to label.
Fleet (`habc launch fleet robots:=N`): --fleet-root ~/.habc/fleet reads every robot's store
(<root>/<robot>/episodes.sqlite); the Fleet tab shows each live robot (its episode, who
controls it, its policy version, success and takeovers per version); select one to follow
it. --index may be given several times.
Keys: S success, F failure, D discard (the selected episode, else the one that ended last).
Under full ROS the same widget runs inside rqt: `rqt --standalone rqt_habc` (Plugins >
Robot Tools > HABC Dashboard), or `ros2 run rqt_habc dashboard`.
"""

from __future__ import annotations

import argparse
import getpass
import os
import signal
import sys

from rqt_habc.model import DEFAULT_FLEET_ROOT, DEFAULT_INDEX

HELP = __doc__


def default_labeler() -> str:
    """Return the name stored as labeler: the login name, or 'operator'."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return 'operator'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the dashboard's options (shared by `habc dashboard` and the rqt plugin)."""
    parser.add_argument('--namespace', '-n', default='/',
                        help="robot namespace to follow, e.g. robot1 (default '/')")
    parser.add_argument('--index', action='append', default=None, metavar='PATH',
                        help='episode index of a recorder; give it again to read several '
                             f'(default {DEFAULT_INDEX}, none with --fleet-root)')
    parser.add_argument('--fleet-root', default=None, metavar='DIR',
                        help='storage root of a fleet: reads every DIR/*/episodes.sqlite, '
                             f'also those created later (`habc launch fleet`: '
                             f'{DEFAULT_FLEET_ROOT})')
    parser.add_argument('--labeler', default=None,
                        help='name stored with each label (default: the login name)')


def index_options(index: list[str] | None,
                  fleet_root: str | None) -> tuple[str | None, list[str]]:
    """Return (the index shown in the window, the other indexes) of the --index options.

    Without --index: the recorder's default index, or none when a fleet root is given (a
    fleet's stores are under it).
    """
    if not index:
        return (None if fleet_root else DEFAULT_INDEX), []
    return index[0], list(index[1:])


def _display_problem() -> str | None:
    """Say why Qt could not open a window here (Qt itself would abort the process)."""
    if sys.platform.startswith('linux') and not any(
            os.environ.get(var) for var in ('DISPLAY', 'WAYLAND_DISPLAY', 'QT_QPA_PLATFORM')):
        return ('no display: set DISPLAY (X11 or ssh -X), or QT_QPA_PLATFORM=offscreen for a '
                'window nobody sees')
    return None


def run(args: argparse.Namespace, ros_args: list[str] | None = None) -> int:
    """Open the dashboard window and run until it is closed or Ctrl-C."""
    problem = _display_problem()
    if problem:
        print(f'habc dashboard: {problem}', file=sys.stderr)
        return 2
    from habc_common.ros_env import apply_project_defaults
    apply_project_defaults()  # before rclpy.init: the RMW reads the environment there
    from python_qt_binding.QtWidgets import QApplication
    import rclpy

    from rqt_habc.model import normalize_namespace
    from rqt_habc.ros_adapter import DashboardRos
    from rqt_habc.widget import DashboardWidget

    try:
        namespace = normalize_namespace(args.namespace)
    except ValueError as exc:
        print(f'habc dashboard: --namespace: {exc}', file=sys.stderr)
        return 2
    index, extra_indexes = index_options(args.index, args.fleet_root)
    if args.fleet_root:
        from rqt_habc.model import fleet_index_paths, fleet_root_problem
        from rqt_habc.widget import expand_index_path
        root = expand_index_path(args.fleet_root)
        if not fleet_index_paths(root):
            # Not fatal: the robots may not have started yet; the window says it too, until
            # their recorders have created their stores.
            print(f'habc dashboard: --fleet-root: {fleet_root_problem(root)}', file=sys.stderr)
    app = QApplication.instance() or QApplication([sys.argv[0]])
    rclpy.init(args=['habc_dashboard', *(ros_args or [])])
    ros = widget = None
    try:
        ros = DashboardRos(namespace=namespace)
        widget = DashboardWidget(ros, index, extra_indexes=extra_indexes,
                                 fleet_root=args.fleet_root,
                                 labeler=args.labeler or default_labeler())
        widget.resize(1000, 700)
        widget.show()
        # Qt's loop runs C++; the poll timer brings Python back often enough to see Ctrl-C.
        signal.signal(signal.SIGINT, lambda *_: app.quit())
        return int(app.exec_())
    finally:
        if widget is not None:
            widget.shutdown()
        if ros is not None:
            ros.close()
        rclpy.try_shutdown()


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `dashboard` console script (`ros2 run rqt_habc dashboard`)."""
    parser = argparse.ArgumentParser(prog='dashboard', description=HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args, ros_args = parser.parse_known_args(argv)
    sys.exit(run(args, ros_args))


if __name__ == '__main__':
    main()
