"""The rqt plugin of the habc dashboard (plugin.xml names rqt_habc.plugin.HabcDashboard).

Imports only under full ROS 2, where rqt_gui_py is installed; the widget itself lives in
rqt_habc.widget, which needs only python_qt_binding and also runs standalone
(`habc dashboard`). Options come from rqt's --args, e.g.
`rqt --standalone rqt_habc --args --namespace robot1 --index /data/episodes.sqlite`, or for a
fleet `rqt --standalone rqt_habc --args --fleet-root ~/.habc/fleet`.
"""

import argparse

from rqt_gui_py.plugin import Plugin

from rqt_habc.ros_adapter import DashboardRos
from rqt_habc.standalone import add_arguments, default_labeler, index_options
from rqt_habc.widget import DashboardWidget


def parse_plugin_args(argv: list[str]) -> argparse.Namespace:
    """Parse the plugin's --args (the same options as `habc dashboard`).

    Options not given are None, so that a saved perspective can fill them in.
    """
    parser = argparse.ArgumentParser(prog='rqt_habc', add_help=False)
    add_arguments(parser)
    parser.set_defaults(namespace=None, index=None, fleet_root=None)
    args, _unknown = parser.parse_known_args(argv)
    return args


class HabcDashboard(Plugin):
    """rqt wrapper: the dashboard widget on rqt's node (which rqt spins)."""

    def __init__(self, context: object) -> None:
        super().__init__(context)
        self.setObjectName('HabcDashboard')
        args = parse_plugin_args(list(context.argv()))
        self._explicit = {'namespace': args.namespace is not None,
                          'stores': args.index is not None or args.fleet_root is not None}
        self._ros = DashboardRos(context.node, args.namespace or '/')
        index, extra_indexes = index_options(args.index, args.fleet_root)
        self._widget = DashboardWidget(self._ros, index, extra_indexes=extra_indexes,
                                       fleet_root=args.fleet_root,
                                       labeler=args.labeler or default_labeler())
        if context.serial_number() > 1:
            self._widget.setWindowTitle(
                f'{self._widget.windowTitle()} ({context.serial_number()})')
        context.add_widget(self._widget)

    def shutdown_plugin(self) -> None:
        self._widget.shutdown()
        self._ros.close()

    def save_settings(self, plugin_settings: object, instance_settings: object) -> None:
        instance_settings.set_value('namespace', self._ros.namespace)
        index_path, fleet_root = self._widget.index_path, self._widget.fleet_root
        instance_settings.set_value('index_path', '' if index_path is None else str(index_path))
        instance_settings.set_value('fleet_root', '' if fleet_root is None else str(fleet_root))

    def restore_settings(self, plugin_settings: object, instance_settings: object) -> None:
        # Options given on the command line win over the saved perspective.
        namespace = instance_settings.value('namespace')
        if namespace and not self._explicit['namespace']:
            self._widget.set_namespace(str(namespace))
        if self._explicit['stores']:
            return
        # The saved stores go together: a saved fleet without a single index stays so.
        fleet_root = instance_settings.value('fleet_root')
        if fleet_root:
            self._widget.set_fleet_root(str(fleet_root))
        index_path = instance_settings.value('index_path')
        if index_path or fleet_root:
            self._widget.set_index_path(str(index_path or ''))
