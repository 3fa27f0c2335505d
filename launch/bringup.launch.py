"""Full ROS 2 bringup: `ros2 launch habc bringup.launch.py [arg:=value ...]`.

Built from config/bringup.yaml through habc.bringup, the same description and resolution
that `habc launch bringup` uses in the pip environment, so both start the same nodes with the
same executables, parameter files, remaps and namespaces. Pass `description:=/path.yaml` to
launch another description.
"""

import os
from pathlib import Path

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import (
    DeclareLaunchArgument,
    LogInfo,
    OpaqueFunction,
    SetEnvironmentVariable,
    Shutdown,
)
from launch_ros.actions import Node

from habc.bringup import argument_values, checkpoint_notice, load_description, resolve
from habc_common.ros_env import DEFAULT_DISCOVERY_RANGE, DISCOVERY_RANGE_VAR

DEFAULT_DESCRIPTION = Path(get_package_share_directory('habc')) / 'config' / 'bringup.yaml'


def _nodes(context, *_args, **_kwargs):
    description = load_description(Path(context.launch_configurations['description']))
    overrides = {a.name: context.launch_configurations[a.name] for a in description.arguments
                 if a.name in context.launch_configurations}
    nodes = resolve(description, overrides)
    actions = []
    notice = checkpoint_notice(nodes)
    if notice:  # the same line `habc launch` prints
        actions.append(LogInfo(msg=notice))
    for node in nodes:
        # Parameters set by launch arguments (checkpoint:=DIR) come after the files.
        values = [dict(node.parameter_values)] if node.parameter_values else []
        actions.append(Node(
            package=node.package, executable=node.executable, name=node.name,
            namespace=node.namespace, parameters=[str(p) for p in node.parameters] + values,
            remappings=list(node.remappings), output='screen', emulate_tty=True,
            # The same niceness `habc launch` gives the process.
            prefix=f'nice -n {node.nice}' if node.nice else None,
            on_exit=Shutdown(reason=f'required node {node.name} exited') if node.required
            else None))
    return actions


def generate_launch_description() -> LaunchDescription:
    """Declare the description's arguments and start its nodes."""
    description = load_description(DEFAULT_DESCRIPTION)
    defaults = argument_values(description)
    actions = [
        # DDS stays on this machine unless the user exported another range on purpose.
        SetEnvironmentVariable(DISCOVERY_RANGE_VAR,
                               os.environ.get(DISCOVERY_RANGE_VAR) or DEFAULT_DISCOVERY_RANGE),
        DeclareLaunchArgument('description', default_value=str(DEFAULT_DESCRIPTION),
                              description='bringup description YAML'),
    ]
    for arg in description.arguments:
        actions.append(DeclareLaunchArgument(arg.name, default_value=defaults[arg.name],
                                             description=arg.description))
    actions.append(OpaqueFunction(function=_nodes))
    return LaunchDescription(actions)
