"""The whole loop on loopback: `habc launch bringup` on the simulated robot for a short round.

Seven real processes (sim robot, sync, policy, arbiter, recorder, scripted operator,
learner) over Fast DDS; this test process listens like any other node. It checks what the
issue asks: episodes exist as MCAP bags that rosbags reads back, the intervention segments
in each bag match the arbiter's live flags, the labels are in the index, the learner
published version 2, and the policy's chunks switch to version 2 without a missed control
tick.
"""

import json
from pathlib import Path
import signal
import sys

import numpy as np
import pytest
from rclpy.qos import QoSProfile, ReliabilityPolicy
from ros_helpers import Child
from std_msgs.msg import String
import torch
import yaml

from habc_common.qos import LATCHED
from habc_episodes.bag_format import read_episode_messages
from habc_episodes.index import EpisodeIndex
from habc_msgs.msg import ActionChunk, ExecutedAction, InterventionState, PolicyUpdate
from habc_policy.models.vla import SmallVLA, SmallVLAConfig
from habc_sim.aloha import START_ARM_POSE

pytestmark = pytest.mark.ros
# Deep enough to hold every tick of the short run: the comparison needs every flag.
STREAM = QoSProfile(depth=10_000, reliability=ReliabilityPolicy.RELIABLE)

EPISODES = 3
MAX_STEPS = 120


def tiny_checkpoint(path: Path) -> Path:
    """Save a small VLA whose chunks stay near the start pose (version 1)."""
    torch.manual_seed(0)
    policy = SmallVLA(SmallVLAConfig(state_dim=14, action_dim=14, horizon=10, num_views=1,
                                     image_size=32, hidden_dim=32, num_layers=1,
                                     cnn_channels=[8, 16], action_head='l2'))
    home = np.concatenate([START_ARM_POSE[:6], [0.5], START_ARM_POSE[8:14], [0.5]])
    policy.set_normalization({'actions_mean': home, 'actions_std': np.full(14, 0.01)})
    policy.version = '1'
    policy.save(path)
    return path


def write_params(tmp_path: Path, checkpoint: Path) -> Path:
    storage = tmp_path / 'episodes'
    params = {
        '/**/sim_robot': {'image_size': 32, 'max_steps': MAX_STEPS},
        # Ask for the next chunk as soon as one arrives: the most slack a loaded CI machine
        # can give, so an empty tick at the swap would be the swap's fault.
        '/**/policy': {'checkpoint': str(checkpoint), 'torch_threads': 1,
                       'min_remaining_steps': 9},
        '/**/episode_recorder': {'storage_dir': str(storage)},
        # The swap check below needs a policy that runs on after the operator's last episode
        # (the bringup's default pauses it between episodes; test_teleop_arbiter_node.py and
        # test_arbiter.py test that).
        '/**/teleop_arbiter': {'hold_between_episodes': False},
        # Takes over whenever a detector fires, so episodes mix policy and human segments.
        '/**/scripted_operator': {'episodes': EPISODES, 'max_steps': MAX_STEPS,
                                  'takeover_probability': 1.0, 'handback_probability': 0.5},
        '/**/learner': {'index_path': str(storage / 'episodes.sqlite'),
                        'work_dir': str(tmp_path / 'learner'),
                        'init_checkpoint': str(checkpoint), 'episodes_per_round': 2,
                        'steps_per_round': 3, 'batch_size': 4, 'warmup_steps': 1},
    }
    path = tmp_path / 'params.yaml'
    path.write_text(yaml.safe_dump({k: {'ros__parameters': v} for k, v in params.items()}))
    return path


class Listener:
    """What the loop publishes, as a user's tool would see it (spun by the ros fixture)."""

    def __init__(self, ros) -> None:
        self.ros = ros
        self.node = ros.create_node('e2e_listener')
        self.interventions: list[InterventionState] = []
        self.executed: list[ExecutedAction] = []
        self.chunks: list[ActionChunk] = []
        self.updates: list[PolicyUpdate] = []
        self.statuses: list[dict] = []
        self.node.create_subscription(InterventionState, 'intervention',
                                      self.interventions.append, STREAM)
        self.node.create_subscription(ExecutedAction, 'executed_action', self.executed.append,
                                      STREAM)
        self.node.create_subscription(ActionChunk, 'policy/chunk', self.chunks.append,
                                      STREAM)
        self.node.create_subscription(PolicyUpdate, 'policy/update', self.updates.append,
                                      LATCHED)
        self.node.create_subscription(
            String, 'policy/status', lambda m: self.statuses.append(json.loads(m.data)),
            LATCHED)

    def wait_for(self, predicate, timeout: float, what: str, launcher: Child,
                 log: Path, every: float = 0.02) -> None:
        def full_log() -> str:
            log.write_text(launcher.output)
            return f'full log: {log}; its end:\n{launcher.output[-6000:]}'
        self.ros.wait_for(predicate, what, timeout, children=[launcher], detail=full_log,
                          every=every)


def labelled(index_path: Path) -> list:
    if not index_path.exists():
        return []
    with EpisodeIndex(index_path) as index:
        return [r for r in index.list() if r.outcome in ('success', 'failure')]


def stamp(message) -> int:
    return message.header.stamp.sec * 1_000_000_000 + message.header.stamp.nanosec


def segments(states) -> list[tuple[int, int]]:
    """(segment_id, source) of an intervention stream, in order, without repeats."""
    out: list[tuple[int, int]] = []
    for state in states:
        key = (int(state.segment_id), int(state.source))
        if not out or out[-1] != key:
            out.append(key)
    return out


@pytest.mark.timeout(900)
def test_closed_loop_on_the_simulated_robot(ros, tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / 'sft')
    params = write_params(tmp_path, checkpoint)
    index_path = tmp_path / 'episodes' / 'episodes.sqlite'
    log = tmp_path / 'launch.log'
    # The test checks that every node stops cleanly on SIGINT, not how fast: a grace period
    # long enough for a loaded machine before the launcher escalates to SIGTERM.
    launcher = Child([sys.executable, '-m', 'habc.cli', 'launch', 'bringup', '--grace', '120',
                      f'params_file:={params}'])
    try:
        listener = Listener(ros)
        listener.wait_for(lambda: len(labelled(index_path)) >= EPISODES, 600,
                          f'{EPISODES} labelled episodes', launcher, log,
                          every=0.5)  # it opens the index
        listener.wait_for(lambda: any(u.version == 2 for u in listener.updates), 300,
                          'PolicyUpdate version 2', launcher, log)
        listener.wait_for(
            lambda: any(c.policy_version == '2' for c in listener.chunks)
            and any('2' in s.get('swap_gap_ticks', {}) for s in listener.statuses), 300,
            'chunks of version 2', launcher, log)
        launcher.process.send_signal(signal.SIGINT)
        code = launcher.finish(timeout=90)
    finally:
        launcher.kill()
    assert code == 0, launcher.output[-6000:]

    # Episodes: complete MCAP bags, labelled in the index, readable by rosbags.
    records = labelled(index_path)
    assert len(records) >= EPISODES
    assert any(r.num_interventions > 0 for r in records), 'the operator never took over'
    for record in records:
        assert record.status == 'complete' and record.labeler == 'scripted_operator'
        bag = Path(record.bag_path)
        assert list(bag.glob('*.mcap')) and (bag / 'metadata.yaml').is_file()
        messages = list(read_episode_messages(bag))
        topics = {topic.rsplit('/', 1)[-1] for topic, _, _ in messages}
        assert {'observation', 'executed_action', 'intervention'} <= topics, topics
        steps = [m for t, _, m in messages if t.endswith('executed_action')]
        assert len(steps) == record.num_steps > 0
        if any(step.source == ExecutedAction.SOURCE_POLICY for step in steps):
            assert 'chunk' in topics, f'policy steps but no chunks in {bag}: {topics}'
        # Every step names the weights that acted (the arbiter copies the version of the
        # policy command it executed); the index takes the episode's from its steps.
        policy_steps = [m for m in steps if m.source == ExecutedAction.SOURCE_POLICY]
        published = {'1'} | {str(u.version) for u in listener.updates}
        assert {m.policy_version for m in policy_steps} <= published, published
        if policy_steps:
            assert record.policy_version in published, (record.policy_version, published)
        # The bag holds the arbiter's flags for this episode: every flag the listener saw in
        # the span the bag covers is in the bag, with its segment and source. (The recorder
        # and the arbiter learn of START and END independently, so each stream may hold a
        # few ticks past the other's ends. The listener, a test process on a loaded machine,
        # may itself miss a tick: the arbiter's reliable queue keeps 50, so the check is
        # that the bag lost nothing the listener got, not that the listener got everything.)
        flags = [m for t, _, m in messages if t.endswith('/intervention')
                 and m.episode_id == record.episode_id]
        first, last = stamp(flags[0]), stamp(flags[-1])
        in_bag = segments(flags)
        bag_flags = {stamp(m): (m.segment_id, m.source) for m in flags}
        live_flags = {stamp(s): (s.segment_id, s.source) for s in listener.interventions
                      if s.episode_id == record.episode_id and first <= stamp(s) <= last}
        missing = {t: v for t, v in live_flags.items() if bag_flags.get(t) != v}
        assert in_bag and live_flags and not missing, (record.episode_id, in_bag, missing)
        humans = sum(1 for i, (_, source) in enumerate(in_bag) if source == 1
                     and (i == 0 or in_bag[i - 1][1] != 1))
        assert humans >= record.num_interventions

    # The learner published version 2; the policy swapped to it at a chunk boundary.
    update = next(u for u in listener.updates if u.version == 2)
    assert len(update.sha256) == 64 and update.uri.startswith('file://')
    versions = [c.policy_version for c in listener.chunks]
    first = versions.index('2')
    assert set(versions[:first]) <= {'1'} and '1' in versions[:first]
    assert set(versions[first:]) <= {'2', '3'}, 'an old version came back after the swap'
    gap = next(s['swap_gap_ticks']['2'] for s in listener.statuses
               if '2' in s.get('swap_gap_ticks', {}))
    # The load runs off the control thread, so a swap stalls nothing: a blocking load
    # (hundreds of ms) would leave 10+ ticks empty. On a loaded 2-core CI machine a late
    # inference can leave a tick or two empty at any time, swap or not (a CI run saw 1).
    assert gap <= 2, f'{gap} control tick(s) without an action at the swap to version 2'
