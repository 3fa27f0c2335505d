"""A recording stand-in for the `launch` and `launch_ros` Python APIs.

launch and launch_ros are not published as wheels, so the pip environment cannot import
them. To check that launch/bringup.launch.py builds the same processes as `habc launch`, the
test runs the launch file against these classes, which only record their arguments. The real
packages run the same file in the docker image (docker/Dockerfile).
"""

import sys
import types


class _Recorder:
    def __init__(self, *args, **kwargs):
        self.args = args
        self.kwargs = kwargs


class LaunchDescription(_Recorder):
    @property
    def entities(self):
        return self.args[0]


class DeclareLaunchArgument(_Recorder):
    @property
    def name(self):
        return self.args[0]


class OpaqueFunction(_Recorder):
    pass


class SetEnvironmentVariable(_Recorder):
    pass


class Shutdown(_Recorder):
    pass


class LogInfo(_Recorder):
    pass


class Node(_Recorder):
    pass


class EmitEvent(_Recorder):
    pass


class RegisterEventHandler(_Recorder):
    pass


class OnProcessExit(_Recorder):
    pass


class ShutdownProcess(_Recorder):
    pass


def matches_action(action):
    return ('matches', action)


class LaunchContext:
    def __init__(self, launch_configurations):
        self.launch_configurations = dict(launch_configurations)


def install(monkeypatch) -> None:
    """Put the stand-in modules into sys.modules for the duration of one test."""
    launch = types.ModuleType('launch')
    launch.LaunchDescription = LaunchDescription
    actions = types.ModuleType('launch.actions')
    for cls in (DeclareLaunchArgument, EmitEvent, LogInfo, OpaqueFunction,
                RegisterEventHandler, SetEnvironmentVariable, Shutdown):
        setattr(actions, cls.__name__, cls)
    launch.actions = actions
    handlers = types.ModuleType('launch.event_handlers')
    handlers.OnProcessExit = OnProcessExit
    events = types.ModuleType('launch.events')
    events.matches_action = matches_action
    process = types.ModuleType('launch.events.process')
    process.ShutdownProcess = ShutdownProcess
    launch_ros = types.ModuleType('launch_ros')
    ros_actions = types.ModuleType('launch_ros.actions')
    ros_actions.Node = Node
    launch_ros.actions = ros_actions
    for name, module in (('launch', launch), ('launch.actions', actions),
                         ('launch.event_handlers', handlers), ('launch.events', events),
                         ('launch.events.process', process),
                         ('launch_ros', launch_ros), ('launch_ros.actions', ros_actions)):
        monkeypatch.setitem(sys.modules, name, module)
    # habc.ros_launch imports these: load it afresh against the stand-ins.
    monkeypatch.delitem(sys.modules, 'habc.ros_launch', raising=False)
