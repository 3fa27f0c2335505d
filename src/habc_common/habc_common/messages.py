"""Message classes by type name, for nodes that subscribe or publish types chosen at run time.

The episode recorder subscribes to the topics its parameters list and `habc play` publishes
whatever a bag holds; both know a type only by its name ('sensor_msgs/msg/Image').
"""

import importlib


def message_class(msgtype: str) -> type:
    """Return the generated rclpy class of 'package/msg/Type' (or 'package/Type').

    Raises:
        ValueError: the name is malformed or the package is not installed for Python.
    """
    parts = msgtype.split('/')
    if len(parts) == 2:
        parts = [parts[0], 'msg', parts[1]]
    if len(parts) != 3 or not all(parts):
        raise ValueError(f'message type {msgtype!r} is not "package/msg/Type"')
    try:
        from rosidl_runtime_py.utilities import get_message
    except ImportError:
        pass  # not in the pip environment: import the generated module directly
    else:
        try:
            return get_message('/'.join(parts))
        except (AttributeError, ModuleNotFoundError, ValueError) as exc:
            raise ValueError(f'message type {msgtype} is not installed: {exc}') from None
    package, _, name = parts
    try:
        return getattr(importlib.import_module(f'{package}.msg'), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f'message type {msgtype} is not installed for rclpy ({exc}); install '
                         f'or build {package} and source env.sh') from None
