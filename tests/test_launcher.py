"""The pip launcher starts and stops the bringup; the launch file uses the same description."""

import importlib.util
import os
from pathlib import Path
import re
import signal
import subprocess
import sys

import launch_stand_in
import pytest
from ros_fixtures import wait_for
from ros_helpers import Child, ROOT, ros_env
from sensor_msgs.msg import JointState

from habc.bringup import description_path, load_description, resolve, ros_arguments
from habc_common.qos import JOINT_STATES

pytestmark = pytest.mark.ros


def start_launcher(*args: str) -> Child:
    return Child([sys.executable, '-m', 'habc.cli', 'launch', *args])


def started_pids(output: str) -> dict[str, int]:
    return {m.group(1): int(m.group(2))
            for m in re.finditer(r'\[launch\] started (\w+) \(pid (\d+)', output)}


def pid_alive(pid: int) -> bool:
    stat = Path(f'/proc/{pid}/stat')
    try:
        # A zombie has exited for our purpose even though kill(pid, 0) still succeeds.
        return stat.read_text().split()[2] != 'Z'
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_until_ready(launcher: Child) -> dict[str, int]:
    """Wait for both skeleton nodes of the bringup; return their pids."""
    launcher.wait_for('joints at')
    launcher.wait_for('holding position')
    pids = started_pids(launcher.output)
    assert set(pids) == {'robot_stub', 'hold_position'}
    return pids


def test_bringup_runs_and_stops_cleanly_on_sigint(ros):
    launcher = start_launcher('skeleton')
    try:
        pids = wait_until_ready(launcher)

        node = ros.create_node('launcher_test')
        received = []
        node.create_subscription(JointState, '/joint_states', received.append, JOINT_STATES)
        ros.wait_for(lambda: len(received) >= 5, 'five joint states of the robot stub',
                     children=[launcher])
        assert len(received[-1].name) == 14
        assert received[-1].name[0] == 'left_waist'

        launcher.process.send_signal(signal.SIGINT)
        code = launcher.finish(timeout=30)
    finally:
        launcher.kill()
    text = launcher.output
    assert code == 0, text
    assert 'SIGINT received: stopping 2 node(s)' in text
    assert 'robot_stub stopped (exit code 0)' in text
    assert 'hold_position stopped (exit code 0)' in text
    assert not any(pid_alive(pid) for pid in pids.values())


def test_launcher_exits_nonzero_when_a_required_node_dies():
    launcher = start_launcher('skeleton')
    try:
        pids = wait_until_ready(launcher)
        os.kill(pids['robot_stub'], signal.SIGKILL)
        code = launcher.finish(timeout=30)
    finally:
        launcher.kill()
    text = launcher.output
    assert code == 1, text
    assert 'required node robot_stub died (killed by SIGKILL); stopping the bringup' in text
    assert 'hold_position stopped' in text
    assert not pid_alive(pids['hold_position'])


def test_nodes_stop_when_the_launcher_is_killed():
    launcher = start_launcher('skeleton')
    try:
        pids = wait_until_ready(launcher)
        os.kill(launcher.process.pid, signal.SIGKILL)  # no chance to clean up
        launcher.process.wait(timeout=10)
        wait_for(lambda: not any(pid_alive(p) for p in pids.values()),
                 'the nodes exiting after their launcher was killed')
    finally:
        launcher.kill()


def test_optional_node_with_invalid_parameter_exits_and_bringup_continues(tmp_path):
    params = tmp_path / 'bad_hold.yaml'
    params.write_text('/**:\n  ros__parameters:\n    rate_hz: -5.0\n')
    description = tmp_path / 'custom.yaml'
    description.write_text(f"""
name: custom
nodes:
  - name: robot_stub
    package: habc_sim
    executable: robot_stub_node
    parameters: [{ROOT}/config/params/robot_stub.yaml]
    required: true
  - name: hold_position
    package: habc_policy
    executable: hold_position_node
    parameters: [{params}]
    required: false
""")
    launcher = start_launcher(str(description))
    try:
        launcher.wait_for('node hold_position exited (exit code 2)')
        assert "parameter 'rate_hz'" in launcher.output
        assert 'out of range' in launcher.output
        launcher.wait_for('joints at')
        assert launcher.process.poll() is None, 'an optional node must not stop the bringup'
        launcher.process.send_signal(signal.SIGINT)
        code = launcher.finish(timeout=30)
    finally:
        launcher.kill()
    assert code == 0, launcher.output


def _load_launch_file(monkeypatch):
    launch_stand_in.install(monkeypatch)
    spec = importlib.util.spec_from_file_location('bringup_launch',
                                                  ROOT / 'launch' / 'bringup.launch.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize('overrides', [{}, {'namespace': 'robot1', 'use_learner': 'false',
                                            'use_scripted_operator': 'false'}])
def test_launch_file_and_pip_launcher_build_the_same_processes(monkeypatch, overrides):
    launch_file = _load_launch_file(monkeypatch)
    entities = launch_file.generate_launch_description().entities
    declared = {e.name: e.kwargs['default_value'] for e in entities
                if isinstance(e, launch_stand_in.DeclareLaunchArgument)}
    env_vars = {e.args[0]: e.args[1] for e in entities
                if isinstance(e, launch_stand_in.SetEnvironmentVariable)}
    assert env_vars['ROS_AUTOMATIC_DISCOVERY_RANGE'] in ('LOCALHOST', os.environ.get(
        'ROS_AUTOMATIC_DISCOVERY_RANGE'))
    (opaque,) = [e for e in entities if isinstance(e, launch_stand_in.OpaqueFunction)]
    context = launch_stand_in.LaunchContext({**declared, **overrides})
    launch_nodes = opaque.kwargs['function'](context)
    from_launch_file = [
        (n.kwargs['name'], n.kwargs['package'], n.kwargs['executable'], n.kwargs['namespace'],
         tuple(n.kwargs['parameters']), tuple(n.kwargs['remappings']),
         n.kwargs['on_exit'] is not None)
        for n in launch_nodes]

    # The pip launcher: what `habc launch bringup --dry-run` would start.
    description = load_description(description_path('bringup'))
    assert Path(declared['description']).samefile(description.path)
    from_pip_launcher = [
        (n.name, n.package, n.executable, n.namespace, tuple(str(p) for p in n.parameters),
         n.remappings, n.required)
        for n in resolve(description, overrides)]
    assert from_launch_file == from_pip_launcher
    assert len(from_pip_launcher) == (5 if overrides else 7)

    # And the command lines the pip launcher runs carry exactly those settings.
    dry_run = subprocess.run(
        [sys.executable, '-m', 'habc.cli', 'launch', 'bringup', '--dry-run',
         *[f'{k}:={v}' for k, v in overrides.items()]],
        capture_output=True, text=True, env=ros_env(), check=True).stdout.splitlines()
    assert len(dry_run) == len(from_launch_file)
    for line, node in zip(dry_run, resolve(description, overrides), strict=True):
        exe, *args = line.split(' ')
        assert exe.endswith(f'/lib/{node.package}/{node.executable}')
        assert args == ros_arguments(node)
