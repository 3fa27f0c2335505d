"""The pip launcher starts and stops the bringup; the launch file uses the same description."""

import importlib.util
import json
import os
from pathlib import Path
import re
import signal
import subprocess
import sys

import launch_stand_in
import pytest
from ros_fixtures import GUARD_S, wait_for
from ros_helpers import Child, ROOT, ros_env
from sensor_msgs.msg import JointState
from std_msgs.msg import String
from vla_fixtures import tiny_sft_checkpoint
import yaml

from habc.bringup import description_path, load_description, resolve, ros_arguments
from habc_common.checkpoints import NO_CHECKPOINT_HINT, SEARCH_VAR
from habc_common.qos import JOINT_STATES, LATCHED

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


def _load_launch_file(monkeypatch, name: str = 'bringup'):
    launch_stand_in.install(monkeypatch)
    spec = importlib.util.spec_from_file_location(f'{name}_launch',
                                                  ROOT / 'launch' / f'{name}.launch.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize('name, overrides, count', [
    ('bringup', {}, 7),
    ('bringup', {'namespace': 'robot1', 'use_learner': 'false', 'use_scripted_operator': 'false',
                 'checkpoint': '/runs/x/sft'}, 5),
    ('fleet', {}, 13),
    ('fleet', {'robots': 'left,right,top', 'use_scripted_operator': 'false',
               'checkpoint': '/runs/x/sft'}, 16)])
def test_launch_file_and_pip_launcher_build_the_same_processes(monkeypatch, name, overrides,
                                                               count):
    launch_file = _load_launch_file(monkeypatch, name)
    entities = launch_file.generate_launch_description().entities
    declared = {e.name: e.kwargs['default_value'] for e in entities
                if isinstance(e, launch_stand_in.DeclareLaunchArgument)}
    env_vars = {e.args[0]: e.args[1] for e in entities
                if isinstance(e, launch_stand_in.SetEnvironmentVariable)}
    assert env_vars['ROS_AUTOMATIC_DISCOVERY_RANGE'] in ('LOCALHOST', os.environ.get(
        'ROS_AUTOMATIC_DISCOVERY_RANGE'))
    (opaque,) = [e for e in entities if isinstance(e, launch_stand_in.OpaqueFunction)]
    context = launch_stand_in.LaunchContext({**declared, **overrides})
    actions = opaque.kwargs['function'](context)
    launch_nodes = [a for a in actions if isinstance(a, launch_stand_in.Node)]
    # The checkpoint line `habc launch` prints (none here when checkpoint:= is given).
    logs = [a.kwargs['msg'] for a in actions if isinstance(a, launch_stand_in.LogInfo)]
    assert len(logs) == (0 if 'checkpoint' in overrides else 1), logs
    from_launch_file = [
        (n.kwargs['name'], n.kwargs['package'], n.kwargs['executable'], n.kwargs['namespace'],
         tuple(n.kwargs['parameters']), tuple(n.kwargs['remappings']),
         n.kwargs['on_exit'] is not None)
        for n in launch_nodes]

    # The pip launcher: what `habc launch <name> --dry-run` would start.
    description = load_description(description_path(name))
    assert Path(declared['description']).samefile(description.path)
    from_pip_launcher = [
        (n.name, n.package, n.executable, n.namespace,
         tuple(str(p) for p in n.parameters)
         + ((dict(n.parameter_values),) if n.parameter_values else ()),
         n.remappings, n.required and not n.group)
        for n in resolve(description, overrides)]
    assert from_launch_file == from_pip_launcher
    assert len(from_pip_launcher) == count
    # A robot's required node stops that robot's stack only, as `habc launch` does.
    handlers = [a.args[0] for a in actions
                if isinstance(a, launch_stand_in.RegisterEventHandler)]
    stacks = {}
    for node in resolve(description, overrides):
        stacks.setdefault(node.group, []).append(node)
    expected = sum(sum(n.required for n in nodes) for group, nodes in stacks.items() if group)
    assert len(handlers) == expected
    for handler in handlers:
        target = handler.kwargs['target_action']
        stopped = [e.kwargs['event'].kwargs['process_matcher'][1]
                   for e in handler.kwargs['on_exit']
                   if isinstance(e, launch_stand_in.EmitEvent)]
        namespace = target.kwargs['namespace']
        assert stopped and all(n.kwargs['namespace'] == namespace and n is not target
                               for n in stopped)
        assert len(stopped) == len([n for n in launch_nodes
                                    if n.kwargs['namespace'] == namespace]) - 1

    # And the command lines the pip launcher runs carry exactly those settings.
    dry_run = subprocess.run(
        [sys.executable, '-m', 'habc.cli', 'launch', name, '--dry-run',
         *[f'{k}:={v}' for k, v in overrides.items()]],
        capture_output=True, text=True, env=ros_env(), check=True).stdout.splitlines()
    assert len(dry_run) == len(from_launch_file)
    for line, node in zip(dry_run, resolve(description, overrides), strict=True):
        exe, *args = line.split(' ')
        assert exe.endswith(f'/lib/{node.package}/{node.executable}')
        assert args == ros_arguments(node)


@pytest.mark.timeout(600)
def test_bringup_without_a_checkpoint_runs_holds_and_starts_once_one_appears(
        ros, tmp_path, monkeypatch):
    # The card's own command with nothing trained yet: no checkpoint anywhere it looks.
    search = tmp_path / 'runs' / 'demo'
    search.mkdir(parents=True)
    monkeypatch.setenv(SEARCH_VAR, str(search))
    storage = tmp_path / 'episodes'
    params = tmp_path / 'params.yaml'  # storage in tmp_path; nothing names a checkpoint
    params.write_text(yaml.safe_dump({k: {'ros__parameters': v} for k, v in {
        '/**/sim_robot': {'image_size': 32},
        '/**/episode_recorder': {'storage_dir': str(storage)},
        # No round during the test: it checks how the learner starts, not how it trains.
        '/**/learner': {'index_path': str(storage / 'episodes.sqlite'),
                        'work_dir': str(tmp_path / 'learner'), 'episodes_per_round': 1000,
                        'poll_period_s': 0.2,
                        'signing_key': str(tmp_path / 'keys' / 'learner.key')},
        '/**/policy': {'torch_threads': 1},
    }.items()}))
    node = ros.create_node('no_checkpoint_test')
    learner: list[dict] = []
    policy: list[dict] = []
    node.create_subscription(String, 'learner/status',
                             lambda m: learner.append(json.loads(m.data)), LATCHED)
    node.create_subscription(String, 'policy/status',
                             lambda m: policy.append(json.loads(m.data)), LATCHED)
    # On SIGINT the launcher waits up to `grace` per escalation (SIGINT, SIGTERM, SIGKILL):
    # this test checks that every node stops cleanly, not how fast.
    grace_s = 60
    launcher = start_launcher('bringup', '--grace', str(grace_s), f'params_file:={params}')
    try:
        ros.wait_for(lambda: learner and learner[-1]['state'] == 'waiting',
                     'learner/status waiting', 180, children=[launcher])
        assert 'no `habc demo` checkpoint is in' in learner[-1]['waiting']
        assert learner[-1]['search'] == [str(search)]
        ros.wait_for(lambda: policy and policy[-1]['waiting'], 'policy/status holding',
                     children=[launcher])
        assert policy[-1]['active_version'] is None
        assert 'no policy checkpoint' in policy[-1]['waiting']
        launcher.wait_for('[learner]')  # its log line (only once: checked below)

        # `habc demo` finishes its SFT checkpoint: the waiting nodes start from it.
        tiny_sft_checkpoint(tmp_path / 'scratch')
        os.replace(tmp_path / 'scratch', search / 'sft')
        ros.wait_for(lambda: learner[-1]['state'] == 'idle' and learner[-1]['version'] == '1',
                     'learner/status idle at version 1', 120, children=[launcher])
        assert learner[-1]['checkpoint'] == str(search / 'sft')
        ros.wait_for(lambda: policy[-1]['active_version'] == '1',
                     'the policy acting with version 1', 120, children=[launcher])
        assert policy[-1]['waiting'] is None
        launcher.process.send_signal(signal.SIGINT)
        # Beyond the launcher's own bound: a timeout here means it hung, not that it was slow.
        code = launcher.finish(timeout=3 * grace_s + GUARD_S)
    finally:
        launcher.kill()
    text = launcher.output
    assert code == 0, text[-6000:]
    # The launcher said what to do, in exactly one line, before the nodes started.
    hints = [line for line in text.splitlines() if NO_CHECKPOINT_HINT in line]
    assert len(hints) == 1 and hints[0].startswith('[launch] '), hints
    assert text.index(hints[0]) < text.index('[launch] started')
    # Nothing died; the learner said why it waited once, not on every poll.
    assert 'died' not in text
    assert text.count('waiting for a checkpoint') == 1, text[-6000:]
    for name in ('sim_robot', 'sync', 'policy', 'teleop_arbiter', 'episode_recorder',
                 'learner'):
        assert f'{name} stopped (exit code 0)' in text, text[-6000:]
