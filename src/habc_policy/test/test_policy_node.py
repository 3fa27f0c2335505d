"""policy_node on real rclpy: commands at the control rate, verified hot swap, handback."""

from collections import Counter
import json
from pathlib import Path
import threading
import time

from builtin_interfaces.msg import Time
import numpy as np
import pytest
from rclpy.parameter import Parameter
from ros_fixtures import GUARD_S
from ros_helpers import Child, ROOT
from rosgraph_msgs.msg import Clock
from std_msgs.msg import String
import torch

from habc_common.params import check_parameter_file
from habc_common.qos import COMMANDS, LATCHED, LATCHED_EVENTS, SENSOR_DATA
from habc_common.update_trust import (
    companions_digest,
    create_key_pair,
    encode_token,
    load_signing_key,
    UpdateClaim,
)
from habc_episodes.vocabulary import PolicyVersion
from habc_msgs.msg import (
    ActionChunk,
    HelpRequest,
    InterventionState,
    Observation,
    PolicyCommand,
    PolicyUpdate,
)
from habc_policy.help_calibration import HelpCalibration
from habc_policy.image_convert import numpy_to_image
from habc_policy.models.vla import SmallVLA, SmallVLAConfig
from habc_policy.policy_node import PolicyNode
from habc_policy.policy_runtime import PolicyNodeParams

NS = 'policy_test'
JOINTS = [f'{side}_{joint}' for side in ('left', 'right')
          for joint in ('waist', 'shoulder', 'elbow', 'forearm_roll', 'wrist_angle',
                        'wrist_rotate', 'gripper')]


def make_checkpoint(folder: Path, version: str, seed: int, **changes) -> str:
    torch.manual_seed(seed)
    policy = SmallVLA(SmallVLAConfig(**{
        'state_dim': 14, 'action_dim': 14, 'horizon': 10, 'num_views': 1, 'image_size': 32,
        'hidden_dim': 32, 'num_layers': 1, 'cnn_channels': [8, 16], 'action_head': 'l2',
        **changes}))
    policy.version = version
    return policy.save(folder)


def write_pessimistic_critic(folder: Path) -> None:
    """Save a HABC critic whose viability is ~0 for any observation (p_v = sigmoid(-20))."""
    from safetensors.torch import save_file

    from habc_policy.models.base import load_policy
    from habc_policy.models.critic import CRITIC_FILE, DualHeadCritic

    critic = DualHeadCritic(load_policy(folder).feature_dim, hidden_dim=8, num_layers=1)
    with torch.no_grad():
        critic.f_v.weight.zero_()
        critic.f_v.bias.fill_(-20.0)
    save_file({k: v.contiguous() for k, v in critic.state_dict().items()},
              str(folder / CRITIC_FILE))


def test_parameter_file_matches_the_declaration():
    (params,) = check_parameter_file(PolicyNodeParams, ROOT / 'config' / 'params' /
                                     'policy.yaml')
    assert params.control_rate_hz == 50.0 and params.mode == 'receding'


# The policy runs on simulated time that the test advances (see Harness.advance).
PERIOD_NS = 20_000_000  # its 50 Hz control period
START_NS = 1_000 * 1_000_000_000  # not 0: a zero stamp means "now" to the node
# /clock and observations are best effort: what the policy has not handled after this long
# (s, wall clock) is sent again, in case it was lost.
RESEND_S = 0.2
# Actions queued when an update swaps in: enough for the several ticks v2's first inference
# is held back while the old plan carries the robot.
MIN_QUEUED = 6


def to_time(ns: int) -> Time:
    return Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


class _Counted:
    """A publisher that counts what it sent, so the test knows what is still in flight."""

    def __init__(self, publisher, sent: Counter, key: str) -> None:
        self._publisher, self._sent, self._key = publisher, sent, key

    def publish(self, msg) -> None:
        self._publisher.publish(msg)
        self._sent[self._key] += 1


class SteppedPolicyNode(PolicyNode):
    """PolicyNode that tells the test which control tick and observation it has handled."""

    def __init__(self, **kwargs) -> None:
        self.ticked_ns = 0  # sim time of the last control tick handled to the end
        self.observed_ns = 0  # stamp of the last observation handled to the end
        self.sent: Counter[str] = Counter()
        super().__init__(**kwargs)
        self.command_publisher = _Counted(self.command_publisher, self.sent, 'commands')
        self.chunk_publisher = _Counted(self.chunk_publisher, self.sent, 'chunks')

    def control_callback(self) -> None:
        now = self.node.get_clock().now().nanoseconds
        super().control_callback()
        self.ticked_ns = now

    def observation_callback(self, msg: Observation) -> None:
        super().observation_callback(msg)
        self.observed_ns = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec


class Harness:
    """The policy node on simulated time, and a stand-in for sync, arbiter and learner.

    Time moves only while the test waits (Harness.wait_for), one control period at a step,
    and only once the policy is done with the present instant: its control tick ran, it
    took the newest camera frame, and no inference is running. So the chunks always arrive
    in time however slow the machine is, and each test waits for events, not for speed.
    """

    def __init__(self, ros, checkpoints: Path) -> None:
        self.ros = ros
        self.checkpoints = checkpoints
        self.shas = {name: make_checkpoint(checkpoints / name, version, seed)
                     for name, version, seed in [('sft', 'sft', 0), ('v2', '2', 1),
                                                 ('v5', '5', 2)]}
        for name in self.shas:  # each with a critic that finds success unlikely everywhere
            write_pessimistic_critic(checkpoints / name)
        # v2 comes calibrated (habc calibrate): its threshold replaces the parameter's.
        HelpCalibration(help_threshold=0.25, help_clear_above=0.35, help_below_for_s=1.0,
                        target_false_alarm_rate=0.1, false_alarm_bound=0.09,
                        calibration_successes=10, calibration_false_alarms=0.0, failures=3,
                        detection_rate=1.0, median_lead_s=2.0).save(checkpoints / 'v2')
        # The learner's key pair, which the node trusts; checkpoints only from their folder.
        self.key = load_signing_key(create_key_pair(checkpoints / 'keys' / 'learner.key'))
        self.node = ros.create_node('policy_node_test')
        self.policy = SteppedPolicyNode(namespace=NS, context=ros.context, parameter_overrides=[
            Parameter('checkpoint', value=str(checkpoints / 'sft')),
            Parameter('trusted_keys', value=[str(checkpoints / 'keys')]),
            Parameter('checkpoint_roots', value=[str(checkpoints)]),
            Parameter('use_sim_time', value=True)])
        self.commands: list[PolicyCommand] = []
        self.chunks: list[ActionChunk] = []
        self.statuses: list[dict] = []
        self.help_requests: list[HelpRequest] = []
        self.observation_stamps: set[tuple[int, int]] = set()
        node = self.node
        node.create_subscription(PolicyCommand, f'/{NS}/policy/joint_command',
                                 self.commands.append, COMMANDS)
        node.create_subscription(ActionChunk, f'/{NS}/policy/chunk', self.chunks.append,
                                 COMMANDS)
        node.create_subscription(HelpRequest, f'/{NS}/help_request', self.help_requests.append,
                                 LATCHED_EVENTS)
        node.create_subscription(String, f'/{NS}/policy/status',
                                 lambda m: self.statuses.append(json.loads(m.data)), LATCHED)
        self.observations = node.create_publisher(Observation, f'/{NS}/observation',
                                                  SENSOR_DATA)
        self.updates = node.create_publisher(PolicyUpdate, f'/{NS}/policy/update', LATCHED)
        self.interventions = node.create_publisher(InterventionState, f'/{NS}/intervention',
                                                   COMMANDS)
        self.image = numpy_to_image(np.random.default_rng(0).integers(
            0, 255, (32, 32, 3), dtype=np.uint8))
        self.clock = node.create_publisher(Clock, '/clock', 10)
        self.now_ns = START_NS
        self.ticks = 0
        self.observing = True  # False: the cameras (or the synchronizer) are gone
        self.holding = False  # True: time stands still
        self.lagging = False  # True: time moves on while an inference runs
        self.observed_ns = 0
        self.observation: Observation | None = None
        ros.add_node(self.policy.node)
        self.publish_clock()

    @property
    def now(self) -> float:
        """The simulated time (s)."""
        return self.now_ns * 1e-9

    def advance(self) -> None:
        """Move time one control period on if the policy is done with the present."""
        policy = self.policy
        if self.holding:
            return
        if (policy.ticked_ns < self.now_ns or policy.observed_ns < self.observed_ns
                or (policy.worker.busy and not self.lagging)):
            if time.monotonic() - self.sent_at > RESEND_S:
                if policy.observed_ns < self.observed_ns:
                    self.observations.publish(self.observation)
                self.publish_clock()
            return
        self.now_ns += PERIOD_NS
        self.ticks += 1
        if self.ticks % 2 == 0 and self.observing:
            self.publish_observation()  # a 25 Hz camera
        self.publish_clock()

    def publish_clock(self) -> None:
        self.clock.publish(Clock(clock=to_time(self.now_ns)))
        self.sent_at = time.monotonic()

    @property
    def status(self) -> dict:
        """Return the newest policy/status, or {} before the first.

        The latched status topic may match after the command and chunk topics did.
        """
        return self.statuses[-1] if self.statuses else {}

    def wait_for(self, predicate, what: str) -> None:
        """Wait for `predicate` while time moves on (the fixture's guard timeout)."""
        self.ros.wait_for(predicate, what, poll=self.advance)

    def run(self, ticks: int) -> None:
        """Let `ticks` control periods pass (each handled by the policy)."""
        target = self.ticks + ticks
        self.wait_for(lambda: self.ticks >= target and self.policy.ticked_ns == self.now_ns,
                      f'{ticks} control ticks')

    def settled(self) -> bool:
        """Nothing in flight: the tick of now ran, no inference runs, all sent has arrived."""
        sent = self.policy.sent
        return (self.policy.ticked_ns == self.now_ns and not self.policy.worker.busy
                and sent['commands'] == len(self.commands)
                and sent['chunks'] == len(self.chunks))

    def publish_observation(self) -> None:
        msg = Observation()
        msg.header.stamp = to_time(self.now_ns)
        self.observed_ns = self.now_ns
        self.observation_stamps.add((msg.header.stamp.sec, msg.header.stamp.nanosec))
        msg.images = [self.image]
        msg.joint_state.header.stamp = msg.header.stamp
        msg.joint_state.name = JOINTS
        msg.joint_state.position = [0.1 * i for i in range(14)]
        msg.instruction = 'hand over the cube'
        self.observation = msg
        self.observations.publish(msg)

    def publish_intervention(self, source: int, reason: str) -> float:
        msg = InterventionState(source=source, reason=reason,
                                active=source == InterventionState.SOURCE_HUMAN)
        msg.header.stamp = to_time(self.now_ns)
        self.interventions.publish(msg)
        return self.now

    def update(self, version: int, name: str, sha256: str, signed: bool = True) -> None:
        msg = PolicyUpdate(version=version, sha256=sha256, format='safetensors',
                           uri=f'file://{self.checkpoints / name}/model.safetensors',
                           policy_name='habc')
        if signed:  # as the learner signs it
            msg.key_id = self.key.key_id
            msg.companions_sha256 = companions_digest(self.checkpoints / name)
            msg.signature = list(self.key.sign(UpdateClaim(version, sha256, msg.uri, 'habc',
                                                           msg.companions_sha256)))
        msg.header.stamp = self.node.get_clock().now().to_msg()
        self.updates.publish(msg)

    def close(self) -> None:
        self.policy.close()
        self.ros.remove_node(self.policy.node)


@pytest.fixture(scope='module')
def harness(ros_module, tmp_path_factory):
    harness = Harness(ros_module, tmp_path_factory.mktemp('policy_ckpt'))
    yield harness
    harness.close()


@pytest.mark.ros
def test_commands_at_the_control_rate_from_observations(harness):
    harness.wait_for(lambda: len(harness.commands) >= 5, 'first joint commands')
    start = len(harness.commands)
    harness.wait_for(lambda: len(harness.commands) >= start + 10, 'ten more joint commands')
    # The chunks of these commands have arrived too (another topic: no order across the two).
    harness.wait_for(harness.settled, 'the commands and chunks in flight')
    window = harness.commands[start:]
    stamps = np.array([c.header.stamp.sec + c.header.stamp.nanosec * 1e-9 for c in window])
    # One command per control tick, in order. The rate is wall-clock timing: measured by
    # benchmarks/bench_loop.py, not asserted here.
    assert (np.diff(stamps) > 0).all()
    command = harness.commands[-1]
    assert list(command.name) == JOINTS and len(command.position) == 14
    # Each command names the weights and the chunk it comes from.
    assert command.policy_version == '1:sft'
    assert command.chunk_id in {c.chunk_id for c in harness.chunks}

    chunks = list(harness.chunks)
    assert chunks and {c.policy_version for c in chunks} == {'1:sft'}
    chunk = chunks[-1]
    assert (chunk.horizon, chunk.action_dim, len(chunk.actions)) == (10, 14, 140)
    assert chunk.dt == pytest.approx(0.02) and list(chunk.joint_names) == JOINTS
    # Stamped with the observation it was computed from, not with the inference time.
    assert (chunk.header.stamp.sec, chunk.header.stamp.nanosec) in harness.observation_stamps
    ids = [c.chunk_id for c in chunks]
    assert ids == sorted(set(ids))
    harness.wait_for(lambda: harness.status.get('active_version') == '1:sft',
                     'a status of version 1:sft')


@pytest.mark.ros
def test_bad_update_is_rejected_and_a_good_one_is_swapped_in(harness):
    harness.wait_for(lambda: harness.chunks, 'first chunk')
    # Unsigned (anyone on the DDS domain could send it), then signed with a wrong hash.
    for signed, reason, rejections in ((False, 'unsigned update', 1),
                                       (True, 'sha256 mismatch', 2)):
        harness.update(2, 'v2', 'ab' * 32 if signed else harness.shas['v2'], signed=signed)
        harness.wait_for(lambda n=rejections: harness.status.get('counters', {}).get(
            'updates_rejected') == n, f'rejection {rejections} on the status')
        status = harness.status
        assert reason in status['last_update']['reason'], status['last_update']
        assert status['active_version'] == '1:sft'
        count = len(harness.chunks)
        harness.wait_for(lambda c=count: len(harness.chunks) >= c + 3,
                         'chunks after the rejection')
        assert {c.policy_version for c in harness.chunks[count:]} == {'1:sft'}

    # The swap, with the first inference of v2 held back for several ticks (as a slow cold
    # start would be): the old plan must carry the robot until v2's first chunk.
    runtime, executor = harness.policy.runtime, harness.policy.executor
    lead_s = harness.policy.params.command_lead_s

    def queued_now() -> int:
        return executor.remaining_actions(harness.now + lead_s)

    # Time moves on while the test waits for the messages in flight: on a loaded machine a
    # fresh chunk can be several ticks old once all has arrived, so wait for a full queue.
    count = len(harness.chunks)
    harness.wait_for(lambda: len(harness.chunks) > count and harness.settled()
                     and queued_now() >= MIN_QUEUED, f'a fresh chunk ({MIN_QUEUED} or more '
                     'actions queued), nothing in flight')
    harness.holding = True  # time stands still while v2 loads and swaps in
    try:
        before = queued_now()
        harness.update(2, 'v2', harness.shas['v2'])
        harness.ros.wait_for(lambda: runtime.active.version.number == 2, 'the swap to v2')
        queued = queued_now()
        assert queued == before, f'the swap left {queued} of {before} queued actions; it ' \
            'must keep them'
    except BaseException:
        harness.holding = False  # the module's other tests share this harness
        raise
    released, held = threading.Event(), threading.Event()
    infer = runtime.infer

    def held_back(observation):
        if runtime.active.version.number == 2 and not released.is_set():
            held.set()
            released.wait(GUARD_S)
        return infer(observation)
    runtime.infer = held_back
    underruns, ticks = executor.counters['underruns'], harness.ticks
    harness.holding, harness.lagging = False, True
    try:
        harness.wait_for(held.is_set, 'the first inference of v2 (held back)')
        lag = queued - (harness.ticks - ticks) - 1
        harness.run(lag)
        assert executor.counters['underruns'] == underruns
    finally:
        released.set()
        harness.lagging = False
        runtime.infer = infer
    harness.wait_for(lambda: any(c.policy_version == '2' for c in harness.chunks),
                     'a chunk of version 2')
    versions = [c.policy_version for c in harness.chunks]
    first = versions.index('2')
    assert set(versions[first:]) == {'2'}, 'the old version came back after the swap'
    harness.wait_for(lambda: harness.status.get('active_version') == '2', 'status of v2')
    assert harness.status['active_sha256'] == harness.shas['v2']
    count = len(harness.commands)
    harness.wait_for(lambda: len(harness.commands) >= count + 10, 'commands after the swap')
    # The switch itself left no tick without an action (simulated time moved on only while
    # the held-back inference ran; otherwise once each inference was done, so an empty tick
    # here is the swap's doing, not a slow machine's).
    harness.wait_for(lambda: '2' in harness.status.get('swap_gap_ticks', {}),
                     'the swap gap on the status')
    assert harness.status['swap_gap_ticks']['2'] == 0
    assert executor.counters['underruns'] == 0
    stamps = [c.header.stamp.sec * 1_000_000_000 + c.header.stamp.nanosec
              for c in harness.commands]
    assert set(np.diff(stamps)) == {PERIOD_NS}, 'a control tick without a command'


@pytest.mark.ros
def test_without_fresh_observations_the_policy_sends_nothing(harness):
    harness.wait_for(lambda: len(harness.commands) >= 5, 'commands')
    harness.observing = False
    harness.run(1)
    harness.wait_for(harness.settled, 'nothing in flight')
    sent, blind = len(harness.commands), harness.policy.blind_ticks
    harness.run(20)  # 0.4 s without an observation
    harness.wait_for(harness.settled, 'nothing in flight')
    # At most observation_stale_after_s (0.1 s = 5 ticks) of the queued plan ran blind.
    assert len(harness.commands) - sent <= 5
    assert harness.policy.blind_ticks - blind >= 15
    harness.observing = True
    count = len(harness.commands)
    harness.wait_for(lambda: len(harness.commands) >= count + 5, 'commands again')


@pytest.mark.ros
def test_weights_uri_parameter_goes_through_the_verified_path(harness):
    node = harness.policy.node
    (result,) = node.set_parameters([Parameter('weights_uri',
                                               value=str(harness.checkpoints / 'missing'))])
    assert not result.successful and 'not found' in result.reason
    (result,) = node.set_parameters([Parameter('expected_sha256', value='12' * 32)])
    assert result.successful
    (result,) = node.set_parameters([Parameter('weights_uri',
                                               value=str(harness.checkpoints / 'v5'))])
    assert result.successful  # accepted for loading; the verdict comes on policy/status
    harness.wait_for(lambda: 'weights_uri needs a signature' in (
        harness.status.get('last_update') or {}).get('reason', ''), 'rejection: unsigned')
    # As `habc keys sign` prints it: hash and signature first, then the URI.
    uri, sha = str(harness.checkpoints / 'v5'), harness.shas['v5']
    digest = companions_digest(uri)
    token = encode_token(5, harness.key.key_id,
                         harness.key.sign(UpdateClaim(5, sha, uri, 'habc', digest)), digest)
    node.set_parameters([Parameter('expected_sha256', value=sha)])
    node.set_parameters([Parameter('weights_signature', value=token)])
    node.set_parameters([Parameter('weights_uri', value=uri)])
    version = f'5:manual-{sha[:12]}'
    harness.wait_for(lambda: harness.chunks and harness.chunks[-1].policy_version == version,
                     'chunks of version 5')
    # Status and chunks are two topics: no order between them.
    harness.wait_for(lambda: harness.status.get('active_version') == version, 'status of v5')


@pytest.mark.ros
def test_human_control_pauses_and_handback_replans(harness):
    harness.wait_for(lambda: harness.commands, 'joint commands')
    for _ in range(3):
        harness.publish_intervention(InterventionState.SOURCE_HUMAN, 'pedal')
    harness.wait_for(lambda: harness.policy._paused, 'pause')
    # What the policy sent before the pause (an inference in flight, say) has arrived.
    harness.wait_for(harness.settled, 'the commands and chunks in flight')
    commands, chunks = len(harness.commands), len(harness.chunks)
    harness.run(20)  # 0.4 s with the human in control
    assert len(harness.commands) == commands and len(harness.chunks) == chunks
    assert harness.policy.sent == {'commands': commands, 'chunks': chunks}

    handback = harness.publish_intervention(InterventionState.SOURCE_POLICY, 'handback')
    harness.wait_for(lambda: len(harness.chunks) > chunks, 'a chunk after the handback')
    harness.wait_for(lambda: len(harness.commands) > commands, 'commands after the handback')
    first = harness.chunks[chunks]
    stamp = first.header.stamp.sec + first.header.stamp.nanosec * 1e-9
    assert stamp >= handback - 1e-6, 'a chunk planned before the handback was executed'
    # Requests after the handback skip older observations, so the executor rejects at most
    # the one inference that was still running at the takeover (it finishes late on a
    # loaded machine); it never drove the robot.
    assert harness.policy.executor.counters['rejected_before_clear'] <= 1

    # A hold for another reason (the policy's own command went stale) does not pause.
    harness.publish_intervention(InterventionState.SOURCE_HOLD, 'watchdog')
    harness.wait_for(lambda: harness.policy._last_source == (InterventionState.SOURCE_HOLD,
                                                             'watchdog'), 'the hold')
    count = len(harness.commands)
    harness.wait_for(lambda: len(harness.commands) >= count + 10, 'commands during a hold')
    assert harness.policy._not_before == pytest.approx(handback, abs=1e-6)

    # Leaving an e-stop hold re-plans too: the queue went on while the robot stood still.
    harness.publish_intervention(InterventionState.SOURCE_HOLD, 'estop')
    released = harness.publish_intervention(InterventionState.SOURCE_POLICY, 'estop_reset')
    harness.wait_for(lambda: abs(harness.policy._not_before - released) < 1e-6,
                     'clear after the e-stop')


@pytest.mark.ros
def test_a_checkpoint_that_would_stretch_the_cameras_holds_and_says_why(ros_module, tmp_path):
    # Trained on 4:3 cameras; this robot's are square. Nothing tells the node the robot's
    # cameras before the first observation: it checks that one, holds, and says why.
    make_checkpoint(tmp_path / 'wide', 'sft', 0, camera_shape=[480, 640])
    ns = 'policy_fit'
    policy = PolicyNode(namespace=ns, context=ros_module.context, parameter_overrides=[
        Parameter('checkpoint', value=str(tmp_path / 'wide'))])
    node = ros_module.create_node('policy_fit_test')
    statuses, commands = [], []
    node.create_subscription(String, f'/{ns}/policy/status',
                             lambda m: statuses.append(json.loads(m.data)), LATCHED)
    node.create_subscription(PolicyCommand, f'/{ns}/policy/joint_command', commands.append,
                             COMMANDS)
    observations = node.create_publisher(Observation, f'/{ns}/observation', SENSOR_DATA)
    msg = Observation()
    msg.images = [numpy_to_image(np.zeros((32, 32, 3), np.uint8))]
    msg.joint_state.name = JOINTS
    msg.joint_state.position = [0.0] * 14
    ros_module.add_node(policy.node)
    try:
        # Observations are offered until the status names the mismatch (the first ones may
        # be sent before the subscription matched).
        ros_module.wait_for(lambda: statuses and statuses[-1].get('mismatch'),
                            'policy/status naming the camera mismatch',
                            poll=lambda: observations.publish(msg))
        mismatch = statuses[-1]['mismatch']
        assert ('image size (H, W) of camera 0: the checkpoint was trained on 480 x 640 '
                '(H/W 0.75), the robot sends 32 x 32 (H/W 1.00)') in mismatch, mismatch
        assert statuses[-1]['active_version'] == '1:sft'
        assert policy.runtime.counters['inferences'] == 0 and commands == []
    finally:
        policy.close()
        ros_module.remove_node(policy.node)


@pytest.mark.ros
def test_console_script_exits_with_a_clear_line_for_a_bad_checkpoint(tmp_path):
    script = ROOT / 'install' / 'habc_policy' / 'lib' / 'habc_policy' / 'policy_node'
    child = Child([str(script), '--ros-args', '-r', '__ns:=/policy_bad', '-p',
                   f'checkpoint:={tmp_path / "missing"}'])
    try:
        assert child.finish(timeout=60) == 2, child.output
    finally:
        child.kill()
    assert 'invalid configuration' in child.output
    assert 'parameter checkpoint' in child.output and 'not found' in child.output


@pytest.mark.ros
def test_low_viability_raises_a_help_request_that_a_takeover_answers(harness):
    # Every checkpoint here carries a critic with p_v ~ 0: after help_below_for_s (0.5 s of
    # simulated time) the robot asks for help, with the trace that led to it.
    harness.wait_for(lambda: any(r.active for r in harness.help_requests), 'a help request')
    raised = next(r for r in harness.help_requests if r.active)
    assert raised.reason == 'low' and raised.viability < 0.01
    assert len(raised.trace_stamps) == len(raised.trace_viability) >= 2
    assert raised.trace_stamps[-1] - raised.trace_stamps[0] >= 0.5 - 1e-6
    assert raised.policy_version
    harness.wait_for(lambda: (harness.status.get('help') or {}).get('requested'),
                     'the request on policy/status')
    assert harness.status['critic'] == 'ok'
    # The operator takes over: the request is answered.
    count = len(harness.help_requests)
    harness.publish_intervention(InterventionState.SOURCE_HUMAN, 'pedal')
    harness.wait_for(lambda: any(not r.active and r.reason == 'answered'
                                 for r in harness.help_requests[count:]), 'answered')
    harness.wait_for(lambda: not harness.status['help']['requested'], 'status cleared')
    harness.publish_intervention(InterventionState.SOURCE_POLICY, 'handback')
    harness.wait_for(lambda: any(r.active for r in harness.help_requests[count:]),
                     'a new request after the handback (p_v is still ~0)')


@pytest.mark.ros
def test_the_checkpoints_calibrated_threshold_replaces_the_parameter(harness):
    harness.wait_for(lambda: harness.status.get('active_version'), 'an active version')
    number = PolicyVersion.parse(harness.status['active_version']).number
    harness.update(number + 1, 'v2', harness.shas['v2'])
    harness.wait_for(lambda: (harness.status.get('help') or {}).get('threshold') == 0.25,
                     "v2's calibrated threshold")
    assert harness.status['help']['threshold_source'].startswith('calibrated 0.250')
    # v5 has no calibration: back to the parameter.
    harness.update(number + 2, 'v5', harness.shas['v5'])
    harness.wait_for(lambda: harness.status['help']['threshold_source'] == 'parameter',
                     "v5's parameter threshold")
    assert harness.status['help']['threshold'] == pytest.approx(0.3)


@pytest.mark.ros
def test_a_request_open_when_the_episode_ends_is_cleared(harness):
    harness.wait_for(lambda: (harness.status.get('help') or {}).get('requested'),
                     'an open help request')
    count = len(harness.help_requests)
    # The arbiter holds idle: no episode runs, so the open request is not the next one's.
    harness.publish_intervention(InterventionState.SOURCE_HOLD, 'idle')
    harness.wait_for(lambda: any(not r.active and r.reason == 'reset'
                                 for r in harness.help_requests[count:]), 'reset')
    harness.wait_for(lambda: not harness.status['help']['requested'], 'status cleared')
