"""A fleet on loopback: `habc launch fleet robots:=2`, two simulated robots and one learner.

Thirteen real processes over Fast DDS: per robot a sim robot, sync, policy, arbiter,
recorder and scripted operator in /robot1 and /robot2, each robot recording into its own
store, and one learner reading both. It checks what the issue asks: both robots record
labelled episodes into their own stores; the learner's first round trains on episodes of
both (its metrics name both robots); both policy nodes verify and swap to that one update;
an update for another fleet's policy is refused with a clear reason; killing robot2's stack
mid-episode stops neither the learner nor robot1, and robot2's partial episode is marked
incomplete.
"""

import json
import os
from pathlib import Path
import re
import shutil
import signal
import sys
import time

import pytest
from ros_fixtures import GUARD_S
from ros_helpers import Child
from std_msgs.msg import String
from vla_fixtures import tiny_sft_checkpoint
import yaml

from habc_common.checkpoints import SEARCH_VAR
from habc_common.qos import LATCHED
from habc_episodes.index import EpisodeIndex
from habc_episodes.vocabulary import PolicyVersion
from habc_msgs.msg import EpisodeEvent, PolicyUpdate

pytestmark = pytest.mark.ros

ROBOTS = ('robot1', 'robot2')
MAX_STEPS = 120
IMAGE_SIZE = 32  # the sim's camera images: the size tiny_sft_checkpoint's policy takes
# Each stop signal's grace: this test checks that every node stops cleanly, not how fast.
GRACE_S = 60
# The longest wait for one thing that needs the simulated robots to run episodes (13
# processes share 2 cores): a guard against a hang, not a timing requirement.
EPISODES_S = 600


def write_params(tmp_path: Path, checkpoint: Path) -> Path:
    params = {
        '/**/sim_robot': {'image_size': IMAGE_SIZE, 'max_steps': MAX_STEPS},
        '/**/policy': {'checkpoint': str(checkpoint), 'torch_threads': 1},
        # Takes over whenever a detector fires: episodes mix policy and human segments.
        '/**/scripted_operator': {'episodes': 0, 'max_steps': MAX_STEPS,
                                  'takeover_probability': 1.0, 'handback_probability': 0.5},
        # No init_checkpoint: the learner waits until one appears in the search folder, so
        # the test starts it once both robots have labelled episodes.
        '/**/learner': {'work_dir': str(tmp_path / 'learner'), 'episodes_per_round': 2,
                        'steps_per_round': 3, 'batch_size': 4, 'warmup_steps': 1,
                        'poll_period_s': 0.5,
                        'signing_key': str(tmp_path / 'keys' / 'learner.key')},
    }
    path = tmp_path / 'params.yaml'
    path.write_text(yaml.safe_dump({k: {'ros__parameters': v} for k, v in params.items()}))
    return path


def rows(index_path: Path) -> list:
    try:
        with EpisodeIndex(index_path, read_only=True) as index:
            return index.list()
    except FileNotFoundError:  # not there yet, or its recorder is still creating it
        return []


def labelled(index_path: Path) -> list:
    return [r for r in rows(index_path) if r.outcome in ('success', 'failure')]


def started_pid(output: str, label: str) -> int:
    match = re.search(rf'\[launch\] started {re.escape(label)} \(pid (\d+)', output)
    assert match, f'{label} was not started:\n{output[-3000:]}'
    return int(match.group(1))


@pytest.mark.timeout(1800)
def test_a_fleet_of_two_robots_trains_one_policy_and_survives_losing_a_robot(
        ros, tmp_path, monkeypatch):
    search = tmp_path / 'search'
    search.mkdir()
    monkeypatch.setenv(SEARCH_VAR, str(search))
    checkpoint = tiny_sft_checkpoint(tmp_path / 'sft')
    params = write_params(tmp_path, checkpoint)
    stores = {robot: tmp_path / 'fleet' / robot / 'episodes.sqlite' for robot in ROBOTS}

    node = ros.create_node('fleet_test')
    updates: list[PolicyUpdate] = []
    learner: list[dict] = []
    policy: dict[str, list[dict]] = {robot: [] for robot in ROBOTS}
    events: dict[str, list[EpisodeEvent]] = {robot: [] for robot in ROBOTS}
    node.create_subscription(PolicyUpdate, '/policy/update', updates.append, LATCHED)
    node.create_subscription(String, '/learner/status',
                             lambda m: learner.append(json.loads(m.data)), LATCHED)
    for robot in ROBOTS:
        node.create_subscription(String, f'/{robot}/policy/status',
                                 lambda m, r=robot: policy[r].append(json.loads(m.data)),
                                 LATCHED)
        node.create_subscription(EpisodeEvent, f'/{robot}/recorder/events',
                                 events[robot].append, LATCHED)
    launcher = Child([sys.executable, '-m', 'habc.cli', 'launch', 'fleet', '--grace',
                      str(GRACE_S), 'robots:=2', f'storage_root:={tmp_path / "fleet"}',
                      f'params_file:={params}'])

    reached: list[str] = []  # what the test waited for, and when (for a failure's report)
    began = time.monotonic()

    def wait(predicate, what, timeout=EPISODES_S):
        log = tmp_path / 'launch.log'

        def detail() -> str:
            log.write_text(launcher.output)
            return (f'reached: {reached}; full log: {log}; its end:\n'
                    f'{launcher.output[-6000:]}')
        value = ros.wait_for(predicate, what, timeout, children=[launcher], detail=detail,
                             every=0.5)
        reached.append(f'{what} at {time.monotonic() - began:.0f} s')
        return value

    def active(robot: str) -> int:
        # The number of the version acting now (0: none yet). Rounds follow each other
        # quickly here, so a node may be past the version a check waits for.
        version = policy[robot][-1].get('active_version') if policy[robot] else None
        return PolicyVersion.parse(version).number if version else 0

    try:
        # Both robots record labelled episodes, each into its own store.
        wait(lambda: all(labelled(stores[robot]) for robot in ROBOTS),
             "a labelled episode in each robot's store")
        for robot in ROBOTS:
            assert {r.robot for r in rows(stores[robot])} == {robot}
            assert all(r.episode_id.startswith(f'{robot}-') for r in rows(stores[robot]))
        wait(lambda: learner and learner[-1]['state'] == 'waiting',
             'the learner waiting for its checkpoint')

        # The learner starts (its checkpoint appears) and trains one round on both robots.
        # A copy, renamed into place whole: the policy nodes keep loading from theirs (one
        # may still be starting on a loaded machine).
        shutil.copytree(checkpoint, tmp_path / 'scratch')
        os.replace(tmp_path / 'scratch', search / 'sft')
        # A round takes the episodes that are there when it starts: usually both robots'
        # at once, but a store that cannot be read at that moment (its recorder writing, on
        # a loaded machine) is read at the next poll, so a round may hold one robot's alone.
        def robots_of(update: PolicyUpdate) -> list[str]:
            metrics = {kv.key: kv.value for kv in update.metrics}
            return [robot for robot in ROBOTS
                    if float(metrics.get(f'robot/{robot}/episodes', 0)) >= 1]

        def fleet_round() -> PolicyUpdate | None:
            return next((u for u in updates
                         if u.policy_name == 'habc' and robots_of(u) == list(ROBOTS)), None)
        update = wait(fleet_round, 'a PolicyUpdate trained on both robots')
        before = [u for u in updates if u.version < update.version]
        reached.append('rounds before: ' + ', '.join(f'v{u.version} {robots_of(u)}'
                                                    for u in before))
        if before:  # why a round held one robot alone: the learner says what it took
            reached.extend(line for line in launcher.output.splitlines()
                           if line.startswith('[learner]'))
        metrics = {kv.key: kv.value for kv in update.metrics}
        assert float(metrics['round/robots']) == 2 and update.version >= 2

        # One update, verified and swapped to by both policy nodes.
        wait(lambda: all(active(robot) >= update.version for robot in ROBOTS),
             f'both policy nodes acting with version {update.version} or later')

        # An update for another fleet's policy is refused by both, saying why.
        foreign = PolicyUpdate(version=99, sha256='0' * 64, format='safetensors',
                               uri=update.uri, policy_name='other_fleet')
        node.create_publisher(PolicyUpdate, '/policy/update', LATCHED).publish(foreign)

        def refusal(robot: str) -> str:
            # The learner's next update may follow at once: look through every status.
            for status in policy[robot]:
                last = status.get('last_update') or {}
                if last.get('result') == 'rejected' and 'other_fleet' in last.get('reason'):
                    return last['reason']
            return ''
        wait(lambda: all(refusal(robot) for robot in ROBOTS),
             "the other fleet's update refused by both robots", GUARD_S)
        assert all(active(robot) >= update.version for robot in ROBOTS)
        assert "this node runs 'habc'" in refusal('robot1'), refusal('robot1')

        # robot2 loses its robot mid-episode: its stack stops, the rest goes on.
        events['robot2'].clear()
        started = wait(lambda: next((e for e in events['robot2']
                                     if e.event == EpisodeEvent.EVENT_START), None),
                       'robot2 starting an episode')
        os.kill(started_pid(launcher.output, 'robot2/sim_robot'), signal.SIGKILL)
        launcher.wait_for("stopping robot robot2's stack, the others go on", GUARD_S)
        launcher.wait_for('robot2/episode_recorder stopped (exit code 0)', 3 * GRACE_S + GUARD_S)
        cut = EpisodeIndex(stores['robot2'], read_only=True).get(started.episode_id)
        assert cut.status == 'incomplete' and not cut.trainable, cut

        # robot1 records on, the learner trains on, and robot1 swaps to its next version.
        before = {r.episode_id for r in labelled(stores['robot1'])}
        wait(lambda: len({r.episode_id for r in labelled(stores['robot1'])} - before) >= 2,
             'two more labelled episodes of robot1')
        def newest() -> int:
            # The learner's: the test's own foreign update (version 99) is on the topic too.
            return max(u.version for u in updates if u.policy_name == 'habc')
        latest = newest()
        wait(lambda: newest() > latest, "a newer PolicyUpdate of the fleet's learner")
        wait(lambda: active('robot1') > latest, 'robot1 acting with that newer version')
        assert launcher.process.poll() is None
        launcher.process.send_signal(signal.SIGINT)
        # Beyond the launcher's own bound: a timeout here means it hung, not that it was slow.
        code = launcher.finish(timeout=3 * GRACE_S + GUARD_S)
    finally:
        launcher.kill()
    text = launcher.output
    print('\n'.join(reached))
    assert code == 0, text[-6000:]
    assert 'robot robot2 stopped early: required node robot2/sim_robot died (killed by SIGKILL)' \
        in text, text[-6000:]
    for label in ('robot1/policy', 'robot1/episode_recorder', 'learner'):
        assert f'{label} stopped (exit code 0)' in text, text[-6000:]
