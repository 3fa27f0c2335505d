"""The full-ROS 2 launch description of a bringup description (imported by launch/*.py only).

launch/bringup.launch.py and launch/fleet.launch.py build their processes here from
config/<name>.yaml through habc.bringup, the same description and resolution `habc launch`
uses in the pip environment, so both launchers start the same nodes with the same
executables, parameter files, remaps and namespaces. This module imports `launch` and
`launch_ros`, which only a full ROS 2 installation has (docker/Dockerfile).
"""

import os
from pathlib import Path

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import (
    DeclareLaunchArgument,
    EmitEvent,
    LogInfo,
    OpaqueFunction,
    RegisterEventHandler,
    SetEnvironmentVariable,
    Shutdown,
)
from launch.event_handlers import OnProcessExit
from launch.events import matches_action
from launch.events.process import ShutdownProcess
from launch_ros.actions import Node

from habc.bringup import argument_values, checkpoint_notice, load_description, resolve
from habc_common.ros_env import DEFAULT_DISCOVERY_RANGE, DISCOVERY_RANGE_VAR


def shipped_description(name: str) -> Path:
    """Return config/<name>.yaml as installed in share/habc."""
    return Path(get_package_share_directory('habc')) / 'config' / f'{name}.yaml'


def _nodes(context, *_args, **_kwargs):
    description = load_description(Path(context.launch_configurations['description']))
    overrides = {a.name: context.launch_configurations[a.name] for a in description.arguments
                 if a.name in context.launch_configurations}
    nodes = resolve(description, overrides)
    actions = []
    notice = checkpoint_notice(nodes)
    if notice:  # the same line `habc launch` prints
        actions.append(LogInfo(msg=notice))
    started = []
    for node in nodes:
        # Parameters set by launch arguments (checkpoint:=DIR) come after the files.
        values = [dict(node.parameter_values)] if node.parameter_values else []
        action = Node(
            package=node.package, executable=node.executable, name=node.name,
            namespace=node.namespace, parameters=[str(p) for p in node.parameters] + values,
            remappings=list(node.remappings), output='screen', emulate_tty=True,
            # The same niceness `habc launch` gives the process.
            prefix=f'nice -n {node.nice}' if node.nice else None,
            on_exit=Shutdown(reason=f'required node {node.name} exited')
            if node.required and not node.group else None)
        started.append((node, action))
        actions.append(action)
    # In a fleet a robot's required node takes down that robot's stack only, as with
    # `habc launch`: the learner and the other robots go on.
    for node, action in started:
        if node.required and node.group:
            stack = [other for peer, other in started
                     if peer.group == node.group and other is not action]
            actions.append(RegisterEventHandler(OnProcessExit(
                target_action=action,
                on_exit=[LogInfo(msg=f'required node {node.full_name} exited: stopping robot '
                                 f"{node.group}'s stack, the others go on")]
                + [EmitEvent(event=ShutdownProcess(process_matcher=matches_action(other)))
                   for other in stack])))
    return actions


def generate(default_description: Path) -> LaunchDescription:
    """Declare the description's arguments and start its nodes."""
    description = load_description(default_description)
    defaults = argument_values(description)
    actions = [
        # DDS stays on this machine unless the user exported another range on purpose.
        SetEnvironmentVariable(DISCOVERY_RANGE_VAR,
                               os.environ.get(DISCOVERY_RANGE_VAR) or DEFAULT_DISCOVERY_RANGE),
        DeclareLaunchArgument('description', default_value=str(default_description),
                              description='bringup description YAML'),
    ]
    for arg in description.arguments:
        actions.append(DeclareLaunchArgument(arg.name, default_value=defaults[arg.name],
                                             description=arg.description))
    actions.append(OpaqueFunction(function=_nodes))
    return LaunchDescription(actions)
