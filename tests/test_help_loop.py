"""The help-request loop on the simulated robot (issue 15): ask, come over, take over.

The robot side of the bringup runs as real processes (sim robot, sync, policy, arbiter,
recorder, and the scripted operator watching on request; no learner) with a policy that
stalls: a small LowDimChunkPolicy trained to drive both arms to one pose away from the start
and hold it there, next to a HABC critic (critic.safetensors, the learner's format) trained
on the policy's features to find success likely near the start pose and unlikely at the
stall pose. As the arms reach the stall, the live viability p_v falls; the policy asks for
help within help_below_for_s plus one inference period (on the observation stamps, not the
wall clock); the operator, who looks only when asked, comes over after its reaction delay
and takes over; the policy clears the request as answered; and the episode's bag, read back
with habc_episodes, holds the request raised and then answered.
"""

from pathlib import Path
import signal
import sys

import numpy as np
import pytest
from rclpy.qos import QoSProfile, ReliabilityPolicy
from ros_fixtures import GUARD_S
from ros_helpers import Child
from safetensors.torch import save_file
import torch
import yaml

from habc_common.qos import LATCHED_EVENTS
from habc_episodes.bag_format import read_episode_messages
from habc_episodes.index import EpisodeIndex
from habc_episodes.vocabulary import Outcome, RecorderEvent
from habc_msgs.msg import EpisodeEvent, HelpRequest, InterventionState
from habc_policy.models.critic import CRITIC_FILE, DualHeadCritic
from habc_policy.models.lowdim import LowDimChunkConfig, LowDimChunkPolicy
from habc_sim.aloha import START_ARM_POSE

pytestmark = pytest.mark.ros
# Each node's time to stop cleanly after SIGINT (the launcher's --grace): the test asserts a
# clean exit, and a node niced under load needs seconds to get there.
GRACE_S = 60
# Deep enough to hold every chunk and flag of the short run: the timing check needs them all.
STREAM = QoSProfile(depth=10_000, reliability=ReliabilityPolicy.RELIABLE)

# Long enough for the stall, the request and the takeover (about 70 ticks, more when the
# policy lags the simulated clock on a loaded machine), short enough to keep the test quick.
MAX_STEPS = 250
REACTION_DELAY_STEPS = 10
HELP_THRESHOLD = 0.3
HELP_BELOW_FOR_S = 0.5
# Joint positions (ALOHA order, grippers as a 0..1 opening): the start pose, and the pose the
# stalling policy drives to (shoulders forward, elbows in; clear of the table and the cube).
HOME = np.concatenate([START_ARM_POSE[:6], [0.1], START_ARM_POSE[8:14], [0.1]])
STALL = HOME + np.array([0.0, 0.4, -0.4, 0.0, 0.0, 0.0, 0.1] * 2)


def _states(rng: np.random.Generator, centre: np.ndarray, n: int,
            spread: float = 0.03) -> np.ndarray:
    """Sample joint states around `centre`, grippers anywhere (the critic must ignore them)."""
    states = centre + rng.normal(0.0, spread, (n, 14))
    states[:, [6, 13]] = rng.uniform(0.0, 1.0, (n, 2))
    return states.astype(np.float32)


def stalling_checkpoint(folder: Path, steps: int = 300) -> Path:
    """Train and save a policy that drives to STALL and stays, with its HABC critic.

    The policy learns to output STALL for every state on the way from HOME to STALL; the
    critic learns p_v ~ 1 near HOME and ~ 0 at STALL on the policy's features, as the
    learner's critic would after episodes of this policy failing. Both are saved the way the
    learner saves a checkpoint (habc_learner.trainer.save_checkpoint).
    """
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    config = LowDimChunkConfig(state_dim=14, action_dim=14, horizon=20, feature_dim=32,
                               hidden_dim=64, num_layers=1)
    policy = LowDimChunkPolicy(config)
    policy.set_normalization({'state_mean': (HOME + STALL) / 2,
                              'state_std': np.full(14, 0.2),
                              'actions_mean': (HOME + STALL) / 2,
                              'actions_std': np.full(14, 0.2)})
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-3)
    for _ in range(steps):
        way = rng.uniform(0.0, 1.0, (64, 1))
        batch = {'state': torch.from_numpy(_states(rng, HOME + way * (STALL - HOME), 64)),
                 'actions': torch.from_numpy(np.tile(STALL, (64, config.horizon, 1))),
                 'action_mask': torch.ones(64, config.horizon, dtype=torch.bool)}
        loss = policy.per_sample_loss(batch).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    policy.eval()
    with torch.no_grad():
        chunk = policy.sample_chunks({'state': torch.from_numpy(_states(rng, HOME, 8))})
    assert float((chunk - torch.from_numpy(STALL).float()).abs().max()) < 0.05, \
        'the stalling policy did not learn its pose'

    critic = DualHeadCritic(policy.feature_dim, hidden_dim=32, num_layers=1)
    optimizer = torch.optim.Adam(critic.parameters(), lr=1e-2)
    labels = torch.cat([torch.ones(64), torch.zeros(64)])
    for _ in range(steps):
        states = np.concatenate([_states(rng, HOME, 64), _states(rng, STALL, 64)])
        with torch.no_grad():
            features = policy.encode({'state': torch.from_numpy(states)})
        z_v, _ = critic(features)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z_v, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    critic.eval()
    with torch.no_grad():
        p_v = torch.sigmoid(critic(policy.encode({'state': torch.from_numpy(
            np.stack([HOME, STALL]).astype(np.float32))}))[0])
    assert p_v[0] > 0.9 and p_v[1] < 0.1, f'the critic did not learn: p_v {p_v.tolist()}'

    policy.version = '1'
    policy.save(folder)
    save_file({k: v.detach().contiguous() for k, v in critic.state_dict().items()},
              str(folder / CRITIC_FILE))
    return folder


def write_params(tmp_path: Path, checkpoint: Path) -> Path:
    params = {
        '/**/sim_robot': {'image_size': 32, 'max_steps': MAX_STEPS},
        # The low rule alone (the stall rule off), so the request's timing is exactly
        # help_below_for_s after p_v first went below help_threshold.
        '/**/policy': {'checkpoint': str(checkpoint), 'torch_threads': 1,
                       'help_threshold': HELP_THRESHOLD, 'help_below_for_s': HELP_BELOW_FOR_S,
                       'help_stall_window_s': 0.0},
        '/**/episode_recorder': {'storage_dir': str(tmp_path / 'episodes')},
        # Looks only when asked (no spontaneous checks): a takeover here answers a request.
        '/**/scripted_operator': {'episodes': 1, 'max_steps': MAX_STEPS,
                                  'watch': 'on_request', 'answer_probability': 1.0,
                                  'check_rate_hz': 0.0,
                                  'reaction_delay_steps': REACTION_DELAY_STEPS,
                                  'handback_probability': 0.0},
    }
    path = tmp_path / 'params.yaml'
    path.write_text(yaml.safe_dump({k: {'ros__parameters': v} for k, v in params.items()}))
    return path


def seconds(message) -> float:
    return message.header.stamp.sec + message.header.stamp.nanosec * 1e-9


@pytest.mark.timeout(600)
def test_a_stalling_policy_asks_for_help_and_the_operator_answers(ros, tmp_path):
    checkpoint = stalling_checkpoint(tmp_path / 'stall')
    params = write_params(tmp_path, checkpoint)
    node = ros.create_node('help_loop_listener')
    requests: list[HelpRequest] = []
    events: list[EpisodeEvent] = []
    node.create_subscription(HelpRequest, 'help_request', requests.append, LATCHED_EVENTS)
    node.create_subscription(EpisodeEvent, 'recorder/events', events.append, STREAM)
    launcher = Child([sys.executable, '-m', 'habc.cli', 'launch', 'bringup', '--grace',
                      str(GRACE_S), f'params_file:={params}', 'use_learner:=false'])
    log = tmp_path / 'launch.log'

    def full_log() -> str:
        log.write_text(launcher.output)
        return f'full log: {log}; its end:\n{launcher.output[-6000:]}'

    def wait_for(predicate, what: str) -> object:
        # Guards against a hang only: the start-up (torch and MuJoCo in several processes)
        # takes most of it on a loaded 2-core machine.
        return ros.wait_for(predicate, what, 300, children=[launcher], detail=full_log)

    try:
        wait_for(lambda: any(r.active for r in requests), 'a help request raised')
        # The operator's episode ends at MAX_STEPS (or in success after its takeover) and
        # it labels it; what happened in between is checked below, on what was published.
        labelled = wait_for(lambda: next((e for e in events
                                          if e.event == RecorderEvent.LABELLED), None),
                            'the episode labelled')
        launcher.process.send_signal(signal.SIGINT)
        # Beyond the launcher's own bound (SIGINT, SIGTERM, SIGKILL, GRACE_S each): a
        # timeout here means it hung, not that it was slow.
        code = launcher.finish(timeout=3 * GRACE_S + GUARD_S)
    finally:
        launcher.kill()
    assert code == 0, launcher.output[-6000:]

    # p_v fell. The request carries the p_v the policy saw (one per chunk, on the
    # observation stamps) up to it: first near the start pose, then at the stall.
    raised = next(r for r in requests if r.active)
    assert raised.reason == 'low' and raised.policy_version == '1', raised
    assert raised.viability < HELP_THRESHOLD
    trace = list(zip(raised.trace_stamps, raised.trace_viability, strict=True))
    assert trace and trace[0][1] > 0.8 and trace[-1][0] == pytest.approx(seconds(raised)), \
        trace

    # Raised help_below_for_s after p_v first went below the threshold, within one inference
    # period (the monitor sees p_v once per chunk).
    run = []
    for t, p_v in reversed(trace):
        if p_v >= HELP_THRESHOLD:
            break
        run.insert(0, t)
    period = max(np.diff(run), default=0.0)
    waited = run[-1] - run[0]
    assert HELP_BELOW_FOR_S - 1e-6 <= waited <= HELP_BELOW_FOR_S + period + 1e-6, \
        (waited, period, trace)

    cleared = [r for r in requests if not r.active and seconds(r) >= seconds(raised)]
    assert cleared and cleared[0].reason == 'answered', [(r.active, r.reason) for r in requests]

    # The episode's bag holds the request raised and then answered; the operator's label
    # names the request as the takeover's cause.
    with EpisodeIndex(tmp_path / 'episodes' / 'episodes.sqlite', read_only=True) as index:
        record = index.get(labelled.episode_id)
    assert record.outcome in (Outcome.SUCCESS.name.lower(), Outcome.FAILURE.name.lower())
    assert record.num_interventions >= 1
    assert 'help_request at' in record.note, record.note
    in_bag = [m for t, _, m in read_episode_messages(Path(record.bag_path))
              if t.endswith('/help_request')]
    assert [(m.active, m.reason) for m in in_bag][:2] == [(True, 'low'), (False, 'answered')], \
        [(m.active, m.reason) for m in in_bag]
    assert seconds(in_bag[0]) == pytest.approx(seconds(raised))
    # The operator came when asked: the human took over after the request opened (after its
    # reaction delay, in ticks of 20 ms). From the bag, which holds every tick's
    # InterventionState (this test's listener may still be discovering the arbiter then).
    human = InterventionState.SOURCE_HUMAN
    takeover = next((m for t, _, m in read_episode_messages(Path(record.bag_path))
                     if t.endswith('/intervention') and m.source == human), None)
    assert takeover is not None, 'the operator never took over'
    assert seconds(takeover) >= seconds(raised) + REACTION_DELAY_STEPS * 0.02 - 1e-6
    # The trace's values are the viabilities the policy published with its chunks: every
    # chunk of the episode is in its bag (this test's listener may have missed the first
    # few, published while it was still discovering the policy).
    chunks_in_bag = [m for t, _, m in read_episode_messages(Path(record.bag_path))
                     if t.endswith('/policy/chunk')]
    # Stamps as float seconds: equal to well within a microsecond.
    matched = [(p_v, c.viability) for t, p_v in trace for c in chunks_in_bag
               if abs(seconds(c) - t) < 1e-5]
    assert len(matched) == len(trace), (trace, [seconds(c) for c in chunks_in_bag])
    assert all(a == pytest.approx(b) for a, b in matched), matched
    # The index keeps the request (when raised, when answered, by whom) and tells the
    # requested takeover from a spontaneous one.
    assert record.num_help_requests >= 1 and record.num_requested_takeovers >= 1
    first = record.help_requests[0]
    assert (first.reason, first.cleared_reason, first.answered_by) == ('low', 'answered',
                                                                       'engage'), first
    assert first.raised_at is not None and first.cleared_at >= first.raised_at
