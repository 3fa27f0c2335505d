"""learner_node as its own process: a round from labelled bags, latched updates, restarts."""

from dataclasses import replace
import json
from pathlib import Path
import signal
import sys

import pytest
from ros_fixtures import GUARD_S
from ros_helpers import Child
from std_msgs.msg import String

from habc_common.qos import LATCHED
from habc_common.update_trust import (
    companions_digest,
    TrustList,
    UntrustedUpdateError,
    UpdateClaim,
)
from habc_msgs.msg import PolicyUpdate
from habc_policy.models.base import sha256_file
from habc_policy.policy_runtime import resolve_checkpoint_dir

pytestmark = pytest.mark.ros
STEPS = 12


def start_learner(tmp_path, init_checkpoint) -> Child:
    params = {'index_path': str(tmp_path / 'index' / 'episodes.sqlite'),
              'work_dir': str(tmp_path / 'learner'), 'init_checkpoint': str(init_checkpoint),
              'episodes_per_round': '2', 'steps_per_round': '3', 'batch_size': '4',
              'poll_period_s': '0.2', 'signing_key': str(tmp_path / 'keys' / 'learner.key')}
    args = [arg for key, value in params.items() for arg in ('-p', f'{key}:={value}')]
    return Child([sys.executable, '-m', 'habc_learner.learner_node', '--ros-args', *args])


class Listener:
    """A test node holding what arrived on policy/update and learner/status."""

    def __init__(self, ros) -> None:
        self.ros = ros
        self.node = ros.create_node('learner_test')
        self.updates: list[PolicyUpdate] = []
        self.statuses: list[dict] = []
        self.node.create_subscription(PolicyUpdate, 'policy/update', self.updates.append,
                                      LATCHED)
        self.node.create_subscription(String, 'learner/status',
                                      lambda m: self.statuses.append(json.loads(m.data)),
                                      LATCHED)

    def wait(self, predicate, what: str, timeout: float, child: Child) -> None:
        self.ros.wait_for(predicate, what, timeout, children=[child])

    def close(self) -> None:
        self.ros.remove_node(self.node)


def test_learner_node_publishes_version_2_and_republishes_it_after_a_restart(
        ros, tmp_path, init_checkpoint, episode_bag, labelled):
    for name, outcome in (('ep-1', 'success'), ('ep-2', 'failure')):
        labelled(episode_bag(name, [0] * 6 + [1] * 6), name, outcome, STEPS)
    checkpoint = tmp_path / 'learner' / 'checkpoints' / 'v2'

    child = start_learner(tmp_path, init_checkpoint)
    listener = Listener(ros)
    try:
        listener.wait(lambda: listener.updates, 'a PolicyUpdate', 120.0, child)
        update = listener.updates[-1]
        assert update.version == 2
        assert update.sha256 == sha256_file(checkpoint / 'model.safetensors')
        assert update.format == 'safetensors'
        assert update.uri == f'file://{checkpoint}'
        assert len(update.data) == 0
        # Signed with the key pair it created on its first start (mode 600), for its policy.
        key_file = tmp_path / 'keys' / 'learner.key'
        assert key_file.stat().st_mode & 0o777 == 0o600
        child.wait_for('created the signing key pair')
        trust = TrustList([str(tmp_path / 'keys')])
        assert update.policy_name == 'habc'
        # Over the weights and the critic beside them (companions_digest), carried along.
        folder = resolve_checkpoint_dir(update.uri)
        assert (folder / 'critic.safetensors').is_file()
        assert update.companions_sha256 == companions_digest(folder)
        claim = UpdateClaim(update.version, update.sha256, update.uri, update.policy_name,
                            update.companions_sha256)
        assert trust.verify(claim, update.key_id, bytes(update.signature)) == update.key_id
        with pytest.raises(UntrustedUpdateError, match='does not match'):
            trust.verify(replace(claim, version=3), update.key_id, bytes(update.signature))
        metrics = {kv.key: kv.value for kv in update.metrics}
        assert 'losses/actor' in metrics and float(metrics['round/episodes']) == 2.0
        listener.wait(lambda: listener.statuses and listener.statuses[-1]['version'] == '2'
                      and listener.statuses[-1]['state'] == 'idle',
                      'learner/status idle at version 2', 60.0, child)
        assert any(s['state'] == 'training' for s in listener.statuses) or \
            listener.statuses[-1]['round'] == 1  # a late subscriber only sees the last one
        child.process.send_signal(signal.SIGINT)
        assert child.finish(timeout=GUARD_S) == 0, child.output
    finally:
        child.kill()
        listener.close()

    # Restarted (the policy node may have restarted too): version 2 comes again, latched.
    child = start_learner(tmp_path, init_checkpoint)
    listener = Listener(ros)
    try:
        listener.wait(lambda: listener.updates, 'the PolicyUpdate after the restart', 60.0,
                      child)
        assert listener.updates[-1].version == 2
        assert listener.updates[-1].sha256 == update.sha256
        assert listener.updates[-1].key_id == update.key_id  # the same key, not a new one
        child.wait_for('republished version 2')
        child.process.send_signal(signal.SIGINT)
        assert child.finish(timeout=GUARD_S) == 0, child.output
    finally:
        child.kill()
        listener.close()


def set_parameter(ros, node, name: str, value: str):
    """Set a string parameter of /learner through its service; return the result."""
    from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
    from rcl_interfaces.srv import SetParameters

    client = node.create_client(SetParameters, '/learner/set_parameters')
    request = SetParameters.Request(parameters=[Parameter(name=name, value=ParameterValue(
        type=ParameterType.PARAMETER_STRING, string_value=value))])
    response = ros.call(client, request)
    assert response is not None
    return response.results[0]


def test_a_first_start_without_a_checkpoint_waits_and_starts_once_one_is_set(
        ros, tmp_path, init_checkpoint, monkeypatch):
    # No init_checkpoint and no `habc demo` checkpoint where the node looks.
    monkeypatch.setenv('HABC_CHECKPOINT_SEARCH', str(tmp_path / 'runs' / 'demo'))
    root = Path(__file__).resolve().parents[3]
    child = Child([sys.executable, '-m', 'habc_learner.learner_node', '--ros-args',
                   '--params-file', str(root / 'config' / 'params' / 'learner.yaml'),
                   '-p', f'work_dir:={tmp_path / "learner"}', '-p', 'poll_period_s:=0.2',
                   '-p', f'index_path:={tmp_path / "episodes.sqlite"}',
                   '-p', f'signing_key:={tmp_path / "keys" / "learner.key"}'])
    listener = Listener(ros)
    try:
        listener.wait(lambda: listener.statuses, 'learner/status', 60.0, child)
        status = listener.statuses[-1]
        assert status['state'] == 'waiting' and status['version'] is None
        assert 'init_checkpoint is empty' in status['waiting']
        assert 'no `habc demo` checkpoint is in' in status['waiting']
        assert status['search'] == [str(tmp_path / 'runs' / 'demo')]
        child.wait_for('waiting for a checkpoint')

        refused = set_parameter(ros, listener.node, 'init_checkpoint', str(tmp_path))
        assert not refused.successful and 'not a checkpoint folder' in refused.reason
        accepted = set_parameter(ros, listener.node, 'init_checkpoint', str(init_checkpoint))
        assert accepted.successful, accepted.reason
        listener.wait(lambda: listener.statuses[-1]['state'] == 'idle',
                      'learner/status idle after init_checkpoint was set', 60.0, child)
        assert listener.statuses[-1]['version'] == '1'
        assert listener.statuses[-1]['checkpoint'] == str(init_checkpoint)
        again = set_parameter(ros, listener.node, 'init_checkpoint', str(init_checkpoint))
        assert not again.successful and 'already runs' in again.reason
        child.process.send_signal(signal.SIGINT)
        assert child.finish(timeout=GUARD_S) == 0, child.output
    finally:
        child.kill()
        listener.close()
    # Said once, not on every poll (about 5 a second here); no traceback.
    assert child.output.count('waiting for a checkpoint') == 1, child.output
    assert 'Traceback' not in child.output
