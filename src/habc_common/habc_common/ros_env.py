"""The project's ROS environment defaults, applied before any rclpy process starts.

Hard rule of this project: DDS never sends traffic off this machine unless a user opens it
explicitly. env.sh and the pip launcher export these variables; every node's `main()` also
calls `apply_project_defaults()` first, so a node started some other way (`ros2 run`, an IDE,
a test) still defaults to localhost discovery. An explicit export by the user wins.
"""

import os
from pathlib import Path

DISCOVERY_RANGE_VAR = 'ROS_AUTOMATIC_DISCOVERY_RANGE'
DEFAULT_DISCOVERY_RANGE = 'LOCALHOST'
PROFILE_VARS = ('FASTRTPS_DEFAULT_PROFILES_FILE', 'FASTDDS_DEFAULT_PROFILES_FILE')


def project_defaults(root: Path | None = None) -> dict[str, str]:
    """Return the environment variables the project sets by default.

    Args:
        root: workspace root holding config/dds/; when None only variables that need no
            file are returned.
    """
    defaults = {
        DISCOVERY_RANGE_VAR: DEFAULT_DISCOVERY_RANGE,
        'RMW_IMPLEMENTATION': 'rmw_fastrtps_cpp',
        'HF_HUB_OFFLINE': '1',
        'TRANSFORMERS_OFFLINE': '1',
        'MUJOCO_GL': 'egl',
    }
    if root is not None:
        profile = Path(root) / 'config' / 'dds' / 'fastdds_localhost.xml'
        if profile.is_file():
            for var in PROFILE_VARS:
                defaults[var] = str(profile)
    return defaults


def apply_project_defaults(environ: dict | None = None) -> dict[str, str]:
    """Set every project default that is not already set; return what was set.

    Call this before rclpy.init(): the RMW reads the environment at init. os.environ writes
    go through putenv, so the C layer of this process sees them.
    """
    environ = os.environ if environ is None else environ
    root = environ.get('HABC_ROOT')
    applied = {}
    for key, value in project_defaults(Path(root) if root else None).items():
        if not environ.get(key):
            environ[key] = value
            applied[key] = value
    return applied
