"""Policy runtime (no rclpy): verified weight loading, hot swap, and one inference per chunk.

policy_node is a thin adapter over the classes here:
  PolicyRuntime    loads and verifies weights (sha256, loadable, compatible, one warm-up
                   inference), holds the active policy and at most one staged successor,
                   turns an observation into model input, and runs one inference that feeds
                   the ChunkExecutor;
  InferenceWorker  the inference thread: runs PolicyRuntime.infer on the newest observation
                   when asked, and swaps in staged weights between two inferences.

Versions (habc_episodes.vocabulary.PolicyVersion: a number that orders updates and an
optional tag; its text is the label on every chunk and command):
  startup checkpoint   the checkpoint's config.json version (PolicyVersion.parse: '1:sft' as
                       the SFT checkpoint is saved, STARTUP_VERSION; the learner's '2', ...);
  PolicyUpdate         accepted only when msg.version is above the active and the staged
                       number; version = PolicyVersion(msg.version);
  weights_uri (param)  an operator's manual load: when the checkpoint's number is above the
                       active number its version is used as for an update; otherwise the
                       number stays (so the learner's next update still replaces it) and the
                       tag is 'manual-<first 12 hex of sha256>'.

Verification, in this order; any failure raises WeightsError with the reason and leaves
the active policy untouched: the version is newer; the URI resolves to a local checkpoint
folder (model.safetensors + config.json; `file://` URIs or plain paths, to the folder or to
the weights file); the SHA-256 of the weights file matches (required for PolicyUpdate,
optional for the parameters); the checkpoint loads; the file did not change while it was
hashed and loaded; its state_dim, action_dim and camera count fit the robot as far as the
runtime knows it (the joint_names parameter from the start; the joints and images of the
last observation once one came); they match the active policy's; and one warm-up inference
runs (the first call is slow: the text encoder loads then).

Inline weights (PolicyUpdate.data): the bytes are a safetensors state dict for the SAME
architecture as the active policy (an update of a small model without a config file); they
are verified against sha256 and loaded strictly into a fresh copy of that architecture.
They are rejected when no policy is active yet.

All times are seconds passed in by the caller.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
import hashlib
import math
import os
from pathlib import Path
import threading
import time
from typing import Any
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

import numpy as np

from habc_common.checkpoints import LEARNER_WORK_DIR
from habc_common.control_loop import ControlThreadParams
from habc_common.params import param
from habc_common.update_trust import (
    companions_digest_of,
    decode_token,
    DEFAULT_KEY_DIR,
    DEFAULT_POLICY_NAME,
    read_companions,
    UntrustedUpdateError,
    UpdateClaim,
    UpdateGate,
)
from habc_episodes.vocabulary import PolicyVersion
from habc_policy.chunk_executor import ChunkExecutor, ChunkExecutorParams
from habc_policy.help_request import HelpRequestParams
from habc_policy.image_convert import image_to_numpy
from habc_policy.robot_fit import check_fit, RobotInterface


@dataclass(frozen=True)
class PolicyNodeParams(ControlThreadParams, HelpRequestParams):
    """Parameters of policy_node (with its control tick's scheduling and its help requests)."""

    checkpoint: str = param(
        '', 'Checkpoint folder (model.safetensors + config.json) loaded at start-up; empty: '
        'the newest `habc demo` checkpoint (habc_common.checkpoints), taken when it appears, '
        'or a PolicyUpdate or weights_uri, whichever comes first.', read_only=True)
    weights_uri: str = param(
        '', 'Weights to load (checkpoint folder, its model.safetensors, or a file:// URI). '
        'Setting it at run time (ros2 param set) loads it through the same verified path '
        'as a PolicyUpdate; the result is published on policy/status.')
    expected_sha256: str = param(
        '', 'SHA-256 (hex) that the weights of `checkpoint` and `weights_uri` must have; '
        'empty: not checked (weights_uri needs it when updates must be signed).')
    weights_signature: str = param(
        '', 'Signature of the next weights_uri, `<version>.<key id>.<signature hex>` as '
        '`habc keys sign` prints it: set it and expected_sha256 first, then weights_uri.')
    policy_name: str = param(
        DEFAULT_POLICY_NAME, "Name of the policy this node runs: a signed update names it, so "
        "one meant for another robot's policy is refused.", read_only=True)
    require_signed_updates: bool = param(
        True, 'Apply a PolicyUpdate or weights_uri only when a key of trusted_keys signed it '
        '(habc_common.update_trust). false lets any process on the DDS domain change the '
        'policy that drives the robot: for an isolated test bench only.', read_only=True)
    trusted_keys: list[str] = param(
        [DEFAULT_KEY_DIR], 'Public keys (*.pub files, or folders of them) whose signed '
        "updates are applied; read at each update. The learner's key pair is created in "
        f'{DEFAULT_KEY_DIR} on its first start (`habc keys show`).', read_only=True)
    checkpoint_roots: list[str] = param(
        [LEARNER_WORK_DIR], 'Folders that PolicyUpdate URIs and weights_uri may load from, '
        "after resolving symbolic links (the learner's work_dir by default; the bringup adds "
        "its learner's).", read_only=True)
    control_rate_hz: float = param(
        50.0, 'Control tick rate (Hz): one action per tick; chunks have dt = 1 / rate.',
        min=1.0, max=1000.0, read_only=True)
    execute_steps: int = param(
        10, 'Receding horizon: actions executed from each chunk before the next replaces '
        'it.', min=1, max=10000, read_only=True)
    mode: str = param(
        'receding', "'receding' (first execute_steps actions of each chunk) or 'ensemble' "
        '(ACT temporal ensembling).', choices=('receding', 'ensemble'), read_only=True)
    ensemble_decay: float = param(
        0.01, "Ensemble mode: ACT's m in w_i = exp(-m * i), i = 0 for the oldest chunk.",
        min=0.0, max=100.0, read_only=True)
    stale_after_s: float = param(
        0.0, 'An action may run this much before or after its due time (s); 0: 0.75 of the '
        'control period.', min=0.0, max=10.0, read_only=True)
    min_remaining_steps: int = param(
        5, 'Start the next inference when fewer actions than this remain queued: the '
        'inference latency in ticks plus one (at least the horizon in ensemble mode).',
        min=1, max=10000, read_only=True)
    command_lead_s: float = param(
        0.0, 'Publish each action this long before its due time, so that it reaches the robot '
        'on time through the arbiter and the robot driver (their delay; 0: none). Actions '
        'that can no longer arrive on time are dropped as stale.', min=0.0, max=1.0,
        read_only=True)
    latency_trigger: bool = param(
        True, 'Receding mode: start inferences earlier when the measured delay (actions past '
        'due when a chunk starts executing, 75th percentile of the last latency_window '
        'chunks) plus latency_margin_steps exceeds min_remaining_steps.', read_only=True)
    latency_margin_steps: int = param(
        2, 'Latency-aware trigger: actions kept in reserve beyond the measured delay.',
        min=0, max=10000, read_only=True)
    latency_window: int = param(
        20, 'Latency-aware trigger and inference schedule: chunks the delay and turnaround '
        'estimates look back over.', min=1, max=10000, read_only=True)
    realtime_chunking: bool = param(
        False, 'Receding mode with a flow-matching policy (supports_guided_prefix): sample each '
        'chunk guided toward what the robot does meanwhile, so consecutive chunks join without '
        'a jump (real-time chunking, arXiv 2506.07339): the current plan from the new '
        "chunk's first due time is the prefix, its first d actions (the measured delay) "
        'committed. Ignored, with a note on policy/status, for other policies.',
        read_only=True)
    rtc_max_guidance: float = param(
        5.0, "Real-time chunking: the guidance clip beta (the paper's 5).", min=0.0,
        max=1000.0, read_only=True)
    schedule_inference: bool = param(
        True, 'Receding mode: start each inference as late as still lands in time, from the '
        'newest observation (habc_policy.inference_schedule): before the queued plan ends by '
        'the measured turnaround (90th percentile, cold starts left out) plus '
        'inference_margin_s. false: the remaining-actions trigger (min_remaining_steps, '
        'latency_trigger).', read_only=True)
    inference_margin_s: float = param(
        0.01, 'Inference schedule: reserve (s) beyond the measured turnaround.', min=0.0,
        max=10.0, read_only=True)
    observation_stale_after_s: float = param(
        0.1, 'Send nothing while the newest observation is older than this (s, on the '
        "node's clock): a chunk is a plan for what the robot saw, and with the cameras or "
        'the synchronizer gone it would run on blind; the arbiter then holds. 0: off.',
        min=0.0, max=10.0, read_only=True)
    device: str = param('cpu', "Torch device of the policy, e.g. 'cpu' or 'cuda:0'.",
                        read_only=True)
    torch_threads: int = param(
        0, "Threads torch uses for inference; 0: half the CPUs the process may use (at least "
        "1), leaving the rest to the robot-side nodes' control ticks.", min=0, max=256,
        read_only=True)
    joint_names: list[str] = param(
        [], 'Joint order of the policy state and actions; empty: the order of the '
        "observation's joint_state (the first joint_states message sync_node saw).",
        read_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()  # HelpRequestParams: validates every field and its levels
        if self.realtime_chunking and self.mode != 'receding':
            raise ValueError("parameter realtime_chunking needs mode 'receding' (it guides "
                             'each chunk toward the plan the robot executes)')
        sha = self.expected_sha256
        if sha and not is_sha256(sha):
            raise ValueError(f'parameter expected_sha256 must be 64 hex digits, got {sha!r}')
        self.executor_params()  # raises ValueError naming a bad combination

    @property
    def control_period_s(self) -> float:
        return 1.0 / self.control_rate_hz

    def executor_params(self) -> ChunkExecutorParams:
        """Parameters of the node's ChunkExecutor."""
        period = self.control_period_s
        return ChunkExecutorParams(
            control_period_s=period, execute_steps=self.execute_steps, mode=self.mode,
            ensemble_decay=self.ensemble_decay,
            stale_after_s=self.stale_after_s or 0.75 * period,
            min_remaining_steps=self.min_remaining_steps, latency_trigger=self.latency_trigger,
            latency_margin_steps=self.latency_margin_steps, latency_window=self.latency_window)


# Tag of weights an operator loaded through the weights_uri parameter.
MANUAL_TAG = 'manual-'


class WeightsError(Exception):
    """Weights that failed verification; str(exc) is the reason, for logs and status."""


@dataclass
class LoadedPolicy:
    """A verified policy ready to act: the model and where it came from."""

    policy: Any
    version: PolicyVersion
    sha256: str
    source: str
    # Duration of its second warm-up inference (s): what its first inference will take.
    warmup_s: float = math.nan
    # The HABC critic trained with it (models.critic), loaded with the actor, or why not.
    critic: Any = None
    critic_problem: str = ''
    # Its help threshold from `habc calibrate` (help_calibration.HelpCalibration), if any,
    # or why the file could not be used.
    help_calibration: Any = None
    help_calibration_problem: str = ''


@dataclass
class PolicyObservation:
    """One observation as the runtime needs it (built from habc_msgs/Observation).

    images: (H, W, 3) uint8 RGB arrays, one per camera (views are fine); positions follow
    joint_names. header_stamp is passed through to the chunk (the message's stamp).
    """

    stamp: float
    images: list[np.ndarray]
    joint_names: list[str]
    positions: np.ndarray
    instruction: str
    header_stamp: Any = None


@dataclass
class ChunkResult:
    """The outcome of one inference: the chunk and whether the executor took it."""

    actions: np.ndarray
    version: PolicyVersion
    chunk_id: int
    start_time: float
    dt: float
    joint_names: list[str]
    accepted: bool
    latency_s: float
    observation: PolicyObservation
    # Actions of the chunk already stale when it was accepted (they fell due during the
    # inference), and whether the robot had a tick without a policy action since the
    # previous chunk (the executor's underruns: this one came late).
    skipped: int = 0
    late: bool = False
    # Request to accepted (s) as the worker measured it; cold: the first inference of a
    # version (at start-up or after a swap), left out of the latency estimate.
    turnaround_s: float = math.nan
    cold: bool = False
    # The critic's viability p_v = P(success | observation) and efficiency value V_e (control
    # steps, <= 0) of the weights that planned the chunk; nan without a critic.
    viability: float = math.nan
    efficiency_value: float = math.nan
    # Those weights' critic problem ('' with a critic) and help calibration (or None, and
    # why): the help monitor's settings follow the weights that produced p_v, not the ones
    # active when the chunk arrives.
    critic_problem: str = ''
    help_calibration: Any = None
    help_calibration_problem: str = ''


@dataclass
class UpdateRecord:
    """The last weight load attempt, for policy/status."""

    source: str
    version: str
    result: str  # 'staged', 'active', 'rejected', 'ignored'
    reason: str = ''
    sha256: str = ''
    extra: dict[str, Any] = field(default_factory=dict)


def is_sha256(text: str) -> bool:
    """Return whether `text` is a hex SHA-256 digest (64 hex digits, either case)."""
    return len(text) == 64 and all(c in '0123456789abcdef' for c in text.lower())


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of a byte string."""
    return hashlib.sha256(data).hexdigest()


def resolve_checkpoint_dir(uri: str) -> Path:
    """Return the checkpoint folder that a URI or path names; raise WeightsError if none.

    Accepts a folder, its model.safetensors, and both as `file://` URIs; `lerobot:PATH` for a
    LeRobot policy folder (load_policy also recognises one without the prefix). Other
    schemes are rejected: the policy node reads checkpoints from local or mounted storage.
    """
    # Here, not at module level: torch loads with it, and a bad path should fail fast.
    from habc_policy.models.base import CONFIG_FILE, LEROBOT_PREFIX, WEIGHTS_FILE

    if not uri:
        raise WeightsError('no checkpoint: the URI is empty')
    if uri.startswith(LEROBOT_PREFIX):
        uri = uri[len(LEROBOT_PREFIX):]
    parsed = urlparse(uri)
    if parsed.scheme == 'file':
        if parsed.netloc not in ('', 'localhost'):
            raise WeightsError(f'{uri}: file URIs on another host ({parsed.netloc}) are not '
                               'readable; mount the storage and use a local path')
        path = Path(url2pathname(unquote(parsed.path)))
    elif parsed.scheme and len(parsed.scheme) > 1:  # one letter: a Windows drive
        raise WeightsError(f'{uri}: URI scheme {parsed.scheme!r} is not supported; use a '
                           'local path or a file:// URI')
    else:
        path = Path(uri)
    path = path.expanduser()
    if path.is_dir():
        folder = path
    elif path.is_file():
        if path.name != WEIGHTS_FILE:
            raise WeightsError(f'{path}: expected a checkpoint folder or its {WEIGHTS_FILE}, '
                               f'got another file')
        folder = path.parent
    else:
        raise WeightsError(f'{path}: not found')
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (folder / name).is_file():
            raise WeightsError(f'{folder}: {name} missing (a checkpoint folder holds '
                               f'{WEIGHTS_FILE} and {CONFIG_FILE})')
    return folder


def _checkpoint_version(text: str, folder: Path) -> PolicyVersion:
    try:
        return PolicyVersion.parse(text)
    except ValueError as exc:
        raise WeightsError(f'{folder}: config.json has no usable version ({exc})') from None


def _stat_key(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


class PolicyRuntime:
    """The policy side of policy_node without ROS (see the module docstring).

    Threads: `infer` and `swap_if_pending` run on the inference thread only; the `load_*`
    and `offer_*` methods on one loader thread (they are slow); `status` anywhere.
    """

    def __init__(self, executor: ChunkExecutor, control_period_s: float, gate: UpdateGate,
                 device: str = 'cpu', joint_names: Sequence[str] = (),
                 clock: Callable[[], float] | None = None, realtime_chunking: bool = False,
                 max_guidance: float = 5.0) -> None:
        # clock: the executor's time (s), to count the actions that fell due meanwhile
        # (ChunkResult.skipped; 0 without a clock).
        # realtime_chunking, max_guidance: PolicyNodeParams.realtime_chunking, rtc_max_guidance.
        self.executor = executor
        self.clock = clock
        self.realtime_chunking = realtime_chunking
        self.max_guidance = float(max_guidance)
        self.gate = gate
        self.period = float(control_period_s)
        self.device = device
        self.joint_names = list(joint_names)
        self.active: LoadedPolicy | None = None
        self.last_update: UpdateRecord | None = None
        self.counters: dict[str, int] = {'inferences': 0, 'chunks_rejected': 0, 'swaps': 0,
                                         'updates_rejected': 0, 'inference_errors': 0,
                                         'chunks_nonfinite': 0, 'guided_chunks': 0}
        # The version before the last swap (a broken new one falls back to it), and the
        # highest number of a version retired for non-finite actions.
        self._previous: LoadedPolicy | None = None
        self._retired_number = 0
        self._pending: LoadedPolicy | None = None
        self._lock = threading.Lock()
        self._next_chunk_id = 0
        self._underruns_seen = 0
        self._instruction = ''
        # (joints, camera images) of the last observation inferred on: what the robot sends.
        self._observed: tuple[int, tuple[tuple[int, int], ...]] | None = None
        # Why the active policy does not fit the robot's observations ('' when it does), and
        # the (observed robot, active policy) it was last checked for.
        self.mismatch = ''
        self._fit_checked: tuple | None = None

    # Loading --------------------------------------------------------------------------

    @property
    def pending(self) -> LoadedPolicy | None:
        """The verified policy waiting for the next swap, if any."""
        with self._lock:
            return self._pending

    def newest_number(self) -> int:
        """Return the number an update must exceed: the staged, active or a retired one's."""
        with self._lock:
            candidates = [p.version.number for p in (self.active, self._pending)
                          if p is not None]
        return max(candidates + [self._retired_number], default=0)

    def _retire_broken(self, broken: LoadedPolicy) -> None:
        """Drop a chunk with NaN or inf actions: back to the previous version, or hold.

        Raises WeightsError with what happened (the node reports it on policy/status). The
        broken version's number stays the one to exceed, so the same update, sent again,
        is not taken a second time.
        """
        with self._lock:
            previous = self._previous if self.active is broken else None
            if previous is not None:
                self.active, self._previous = previous, None
            self._retired_number = max(self._retired_number, broken.version.number)
        if previous is None:
            reason = (f'version {broken.version} produced non-finite actions (NaN or inf); '
                      'no earlier version to return to: holding')
        else:
            self.executor.stage_version(previous.version)
            reason = (f'version {broken.version} produced non-finite actions (NaN or inf); '
                      f'back to version {previous.version}')
        self.record_rejection(broken.source, str(broken.version), reason)
        raise WeightsError(reason)

    def load_startup(self, checkpoint: str, expected_sha256: str = '') -> LoadedPolicy:
        """Load the start-up checkpoint and make it active at once (no inference runs yet)."""
        loaded = self._load_checkpoint(checkpoint, expected_sha256, version=None,
                                       require_sha=False)
        with self._lock:
            self.active = loaded
        self.executor.stage_version(loaded.version)
        self.last_update = UpdateRecord(checkpoint, str(loaded.version), 'active',
                                        sha256=loaded.sha256)
        return loaded

    def offer_update(self, version: int, sha256: str, uri: str = '', data: bytes = b'',
                     fmt: str = 'safetensors', policy_name: str = '', signer: str = '',
                     signature: bytes = b'', companions_sha256: str = '') -> LoadedPolicy:
        """Verify and load a PolicyUpdate's weights and stage them for the next swap.

        In order: format, a version above the node's, the signature over (version, sha256,
        uri, policy_name, companions_sha256) by a trusted key, the URI under the checkpoint
        roots, then the weights' hash and the load (update_trust says why each). The critic
        and calibration beside the weights load only when they match companions_sha256.
        """
        source = uri or 'inline'
        try:
            if fmt not in ('', 'safetensors'):
                raise WeightsError(f"format {fmt!r} is not supported; use 'safetensors'")
            if version <= self.newest_number():
                raise WeightsError(f'version {version} is not newer than '
                                   f'{self.newest_number()}')
            if not is_sha256(sha256):
                raise WeightsError(f'sha256 {sha256!r} is not 64 hex digits')
            claim = UpdateClaim(version, sha256, uri, policy_name, companions_sha256)
            self._check_claim(claim, signer, bytes(signature))
            signed = self._signed_companions(claim, signature)
            if data:
                loaded = self._load_inline(bytes(data), sha256.lower(), PolicyVersion(version))
            else:
                loaded = self._load_checkpoint(uri, sha256, version=PolicyVersion(version),
                                               require_sha=True, within_roots=True,
                                               signed_companions=signed)
            self._stage(loaded)
        except WeightsError as exc:
            self.record_rejection(source, str(version), str(exc))
            raise
        return loaded

    def offer_weights_uri(self, uri: str, expected_sha256: str = '',
                          signature_token: str = '') -> LoadedPolicy:
        """Verify and load weights named by the weights_uri parameter; stage them.

        With signed updates required, `signature_token` (the weights_signature parameter)
        carries the version and a trusted key's signature over (version, expected_sha256,
        uri, policy_name), and the version must be above the node's. Without, the weights
        load under their own version, or above the active one with a 'manual-' tag.
        """
        try:
            version, signed = None, None
            if self.gate.require_signature or signature_token:
                try:
                    number, signer, signature, companions = decode_token(signature_token)
                except ValueError as exc:
                    raise WeightsError(f'weights_uri needs a signature: {exc}') from None
                if not is_sha256(expected_sha256):
                    raise WeightsError('weights_uri needs expected_sha256 (the signature '
                                       'covers it): set it before weights_uri')
                if number <= self.newest_number():
                    raise WeightsError(f'signed version {number} is not newer than '
                                       f'{self.newest_number()}; sign it with a higher '
                                       '--version')
                claim = UpdateClaim(number, expected_sha256, uri, self.gate.policy_name,
                                    companions)
                self._check_claim(claim, signer, signature)
                signed = self._signed_companions(claim, signature)
                version = PolicyVersion(number, MANUAL_TAG + expected_sha256.lower()[:12])
            loaded = self._load_checkpoint(uri, expected_sha256, version=version,
                                           require_sha=False, manual=True, within_roots=True,
                                           signed_companions=signed)
            self._stage(loaded)
        except WeightsError as exc:
            self.record_rejection(uri, '', str(exc))
            raise
        return loaded

    def _signed_companions(self, claim: UpdateClaim, signature: bytes) -> str | None:
        # After the claim was checked: the companions digest a signature vouches for ('' for
        # none), or None when no signature is in play (companion files load as they are).
        if self.gate.require_signature or signature:
            return claim.companions_sha256.lower()
        return None

    def _check_claim(self, claim: UpdateClaim, signer: str, signature: bytes) -> None:
        try:
            self.gate.check_claim(claim, signer, signature)
        except UntrustedUpdateError as exc:
            raise WeightsError(str(exc)) from None

    def offer_checkpoint(self, checkpoint: str) -> LoadedPolicy:
        """Verify and load a start-up checkpoint that appeared later; stage it (own version).

        For a node that started without weights and found its checkpoint afterwards.
        """
        try:
            loaded = self._load_checkpoint(checkpoint, '', version=None, require_sha=False)
            self._stage(loaded)
        except WeightsError as exc:
            self.record_rejection(checkpoint, '', str(exc))
            raise
        return loaded

    def swap_if_pending(self, allowed: Callable[[LoadedPolicy], bool] | None = None
                        ) -> LoadedPolicy | None:
        """Make the staged policy active (between two inferences); return it, or None.

        allowed(staged): whether to swap now; False keeps it staged for a later call (the
        node defers a swap while the queued plan is too short to cover a cold inference).
        """
        with self._lock:
            loaded = self._pending
            if loaded is None or (allowed is not None and not allowed(loaded)):
                return None
            self._pending = None
            self._previous, self.active = self.active, loaded
        self.executor.stage_version(loaded.version)
        self.counters['swaps'] += 1
        self.last_update = UpdateRecord(loaded.source, str(loaded.version), 'active',
                                        sha256=loaded.sha256)
        return loaded

    def status(self) -> dict[str, Any]:
        """Active version, staged version and the last load result (policy/status JSON)."""
        with self._lock:
            active, pending = self.active, self._pending
        update = self.last_update
        return {
            'active_version': None if active is None else str(active.version),
            'active_number': None if active is None else active.version.number,
            'active_sha256': None if active is None else active.sha256,
            'active_source': None if active is None else active.source,
            'staged_version': None if pending is None else str(pending.version),
            'last_update': None if update is None else {
                'source': update.source, 'version': update.version, 'result': update.result,
                'reason': update.reason, 'sha256': update.sha256},
            'counters': dict(self.counters),
            # Why the active version holds ('' when it fits the robot's observations).
            'mismatch': self.mismatch or None,
            'realtime_chunking': self._realtime_chunking_state(active),
            # The active version's critic: 'ok', or why there is none (no help requests).
            'critic': None if active is None else (active.critic_problem or 'ok'),
        }

    def _realtime_chunking_state(self, active: LoadedPolicy | None) -> str:
        if not self.realtime_chunking:
            return 'off'
        if active is not None and not getattr(active.policy, 'supports_guided_prefix', False):
            return (f'ignored: {type(active.policy).__name__} is not a flow-matching policy '
                    'that takes a guided prefix')
        return 'on'

    def _stage(self, loaded: LoadedPolicy) -> None:
        with self._lock:
            newest = max([p.version.number for p in (self.active, self._pending)
                          if p is not None], default=0)
            manual = loaded.version.tag.startswith(MANUAL_TAG)
            if not manual and loaded.version.number <= newest:
                raise WeightsError(f'version {loaded.version.number} is not newer than '
                                   f'{newest} (a newer one was loaded meanwhile)')
            self._pending = loaded
        self.last_update = UpdateRecord(loaded.source, str(loaded.version), 'staged',
                                        sha256=loaded.sha256)

    def record_rejection(self, source: str, version: str, reason: str) -> None:
        """Count a failed load and keep its reason for the status."""
        self.counters['updates_rejected'] += 1
        self.last_update = UpdateRecord(source, version, 'rejected', reason)

    def _load_checkpoint(self, uri: str, expected_sha256: str, version: PolicyVersion | None,
                         require_sha: bool, manual: bool = False,
                         within_roots: bool = False,
                         signed_companions: str | None = None) -> LoadedPolicy:
        from habc_policy.models.base import load_policy, sha256_file, WEIGHTS_FILE

        folder = resolve_checkpoint_dir(uri)
        if within_roots:
            # Every file a loader may read (a LeRobot folder has processor files, a vlm/
            # folder), through the resolved path: the files checked are the files loaded.
            try:
                inside = [str(path.relative_to(folder)) for path in folder.rglob('*')]
                folder = self.gate.check_location(folder, inside)
            except (UntrustedUpdateError, OSError) as exc:
                raise WeightsError(str(exc)) from None
        weights = folder / WEIGHTS_FILE
        if require_sha and not expected_sha256:
            raise WeightsError('no sha256 given: updates must name the hash of their weights')
        try:
            before = _stat_key(weights)
            digest = sha256_file(weights)
        except OSError as exc:
            raise WeightsError(f'{weights}: unreadable: {exc}') from exc
        if expected_sha256 and digest != expected_sha256.lower():
            raise WeightsError(f'{weights}: sha256 mismatch: expected {expected_sha256}, '
                               f'file has {digest}')
        try:
            policy = load_policy(folder)
        except Exception as exc:  # any parse error of a bad file is a rejection
            raise WeightsError(f'{folder}: cannot load: {type(exc).__name__}: {exc}') from exc
        try:
            changed = _stat_key(weights) != before
        except OSError:
            changed = True
        if changed:
            raise WeightsError(f'{weights} changed while it was verified and loaded; '
                               'publish the update after the checkpoint is written')
        own = _checkpoint_version(policy.version, folder)
        if version is None and manual:
            active = self.newest_number()
            version = (own if own.number > active
                       else PolicyVersion(active, f'{MANUAL_TAG}{digest[:12]}'))
        elif version is None:
            version = own
        loaded = self._finish_load(policy, version, digest, str(folder))
        self._attach_critic(loaded, folder, signed_companions)
        return loaded

    def _attach_critic(self, loaded: LoadedPolicy, folder: Path,
                       signed_companions: str | None = None) -> None:
        # The critic that was trained with these weights, from the same folder. A missing or
        # foreign critic is reported (policy/status), never a reason to refuse the actor.
        # Under a signature, only the critic and calibration it covers (signed_companions):
        # each file is read once, and the bytes hashed are the bytes loaded.
        from habc_policy.help_calibration import CALIBRATION_FILE, HelpCalibration
        from habc_policy.models.critic import CRITIC_FILE, load_policy_critic

        contents = read_companions(folder)
        if signed_companions is not None and companions_digest_of(contents) != signed_companions:
            loaded.critic_problem = (
                'the critic and calibration beside the weights are not the ones the update '
                'signed (changed after signing? sign again with habc keys sign, or the '
                'learner publishes them); acting without help requests')
            return
        result = load_policy_critic(folder, loaded.policy, contents.get(CRITIC_FILE))
        loaded.critic, loaded.critic_problem = result.critic, result.problem
        if loaded.critic is not None and CALIBRATION_FILE in contents:
            try:
                loaded.help_calibration = HelpCalibration.from_text(
                    contents[CALIBRATION_FILE].decode('utf-8', 'replace'),
                    folder / CALIBRATION_FILE)
            except ValueError as exc:
                loaded.help_calibration_problem = str(exc)

    def viability(self, loaded: LoadedPolicy, inputs: dict[str, Any],
                  features: Any = None) -> tuple[float, float]:
        """Return (p_v, V_e) of the critic of `loaded` on model inputs (nan without one).

        `features`: the policy's encoding of these inputs, when the inference computed it.
        """
        from habc_policy.models.critic import estimate, estimate_from_features

        if loaded.critic is None:
            return math.nan, math.nan
        if features is None:
            p_v, v_e = estimate(loaded.policy, loaded.critic, self._batch(inputs))
        else:
            p_v, v_e = estimate_from_features(loaded.critic, features)
        return float(p_v[0]), float(v_e[0])

    def _load_inline(self, data: bytes, sha256: str, version: PolicyVersion) -> LoadedPolicy:
        from safetensors.torch import load as load_safetensors

        active = self.active
        if active is None:
            raise WeightsError('inline weights need an active policy (they reuse its '
                               'architecture); send a uri with config.json instead')
        digest = sha256_bytes(data)
        if digest != sha256:
            raise WeightsError(f'inline weights: sha256 mismatch: expected {sha256}, data '
                               f'has {digest}')
        try:
            state = load_safetensors(data)
            policy = type(active.policy)(active.policy.config)
            missing, unexpected = policy.load_checkpoint_state(state)
            if missing or unexpected:
                raise ValueError(f'missing {missing}, unexpected {unexpected}')
        except Exception as exc:  # any parse or shape error is a rejection
            raise WeightsError(f'inline weights: cannot load: {type(exc).__name__}: '
                               f'{exc}') from exc
        policy.version = str(version)
        loaded = self._finish_load(policy, version, digest, 'inline')
        loaded.critic_problem = ('inline weights carry no critic (send a uri to a checkpoint '
                                 'folder with critic.safetensors)')
        return loaded

    def _finish_load(self, policy: Any, version: PolicyVersion, digest: str,
                     source: str) -> LoadedPolicy:
        self.check_fits_robot(policy, source)
        active = self.active
        if active is not None:
            self._check_compatible(active.policy, policy)
        policy.to(self.device).eval()
        try:
            # Twice: the first call pays one-off set-up; the second is what the first real
            # inference after the swap will take (LoadedPolicy.warmup_s).
            inputs = self._dummy_input(policy)
            self._predict(policy, inputs)
            started = time.monotonic()
            warm_up, _ = self._predict(policy, inputs)
            warmup_s = time.monotonic() - started
        except Exception as exc:  # a model that cannot run must not go live
            raise WeightsError(f'{source}: warm-up inference failed: '
                               f'{type(exc).__name__}: {exc}') from exc
        if not np.all(np.isfinite(warm_up)):
            raise WeightsError(f'{source}: warm-up inference gave non-finite actions (NaN or '
                               'inf): the weights are broken')
        return LoadedPolicy(policy, version, digest, source, warmup_s)

    def check_fits_robot(self, policy: Any, source: str = 'the checkpoint') -> None:
        """Raise WeightsError naming both sides when `policy` does not fit the robot.

        A policy that does not fit would load, then fail on every observation while the
        robot holds; refused here, the reason goes to policy/status and the active version
        keeps acting (at start-up the node stops with it). What the robot is: joint_names
        (its length is the state and the action size), else the joints of the last
        observation; the cameras (count and image shape) from that observation. Before the
        first observation without joint_names nothing is known, and infer checks the active
        policy on the first one (robot_fit says what fits).
        """
        try:
            check_fit(policy.config, self.robot_interface(), source)
        except ValueError as exc:
            raise WeightsError(str(exc)) from None

    def robot_interface(self) -> RobotInterface:
        """Return what is known of the robot: parameter joint_names, the last observation."""
        observed = self._observed
        if self.joint_names:
            joints, joints_from = len(self.joint_names), 'joints in parameter joint_names'
        elif observed is not None:
            joints, joints_from = observed[0], 'joints in its observations'
        else:
            joints, joints_from = None, ''
        # The robot's commands name the same joints as its state.
        return RobotInterface(joints, joints, joints_from,
                              None if observed is None else observed[1])

    @staticmethod
    def _check_compatible(old: Any, new: Any) -> None:
        for name in ('action_dim', 'state_dim', 'num_views'):
            a = getattr(old.config, name, None)
            b = getattr(new.config, name, None)
            if a != b:
                raise WeightsError(f'{name} is {b}, the active policy has {a}: the robot '
                                   'interface of a hot-swapped policy must not change')

    def _dummy_input(self, policy: Any) -> dict[str, Any]:
        config = policy.config
        inputs: dict[str, Any] = {'state': np.zeros(config.state_dim, np.float32)}
        if hasattr(config, 'num_views'):
            inputs['images'] = np.zeros((config.num_views, *_image_shape(config), 3), np.uint8)
            # The instruction the robot runs, so its embedding is cached before the swap.
            inputs['instruction'] = self._instruction or 'warm up'
        return inputs

    # Inference ------------------------------------------------------------------------

    def command_joint_names(self, observation: PolicyObservation) -> list[str]:
        """Names of the action columns: the joint_names parameter, or the observation's."""
        return self.joint_names or list(observation.joint_names)

    def model_input(self, policy: Any, observation: PolicyObservation) -> dict[str, Any]:
        """Return the policy's input dict for one observation (ValueError on a mismatch).

        State: the joint positions, reordered to joint_names when that is set. Images (VLA
        policies): one per view, resized (nearest neighbour) to the policy's image size (its
        image_shape where the config has one, else image_size square) when the camera sends
        another size.
        """
        config = policy.config
        positions = np.asarray(observation.positions, dtype=np.float32)
        if self.joint_names:
            index = {name: i for i, name in enumerate(observation.joint_names)}
            missing = [name for name in self.joint_names if name not in index]
            if missing:
                raise ValueError(f'observation lacks joints {missing} of parameter '
                                 f'joint_names; it has {list(observation.joint_names)}')
            positions = positions[[index[name] for name in self.joint_names]]
        if positions.shape != (config.state_dim,):
            raise ValueError(f'the policy takes {config.state_dim} joint positions, the '
                             f'observation has {positions.shape[0]}')
        inputs: dict[str, Any] = {'state': positions}
        if hasattr(config, 'num_views'):
            if len(observation.images) != config.num_views:
                raise ValueError(f'the policy takes {config.num_views} camera image(s), the '
                                 f'observation has {len(observation.images)}; set the '
                                 "sync node's cameras to the policy's views, in order")
            shape = _image_shape(config)
            inputs['images'] = np.stack([_resize_nearest(image, shape)
                                         for image in observation.images])
            inputs['instruction'] = observation.instruction
            self._instruction = observation.instruction
        return inputs

    def infer(self, observation: PolicyObservation) -> ChunkResult | None:
        """Run the active policy on `observation` and add the chunk to the executor.

        The chunk's first action is due one control period after the observation stamp (the
        executor drops the actions that are already stale when it arrives). Returns None
        when no policy is active; raises WeightsError while the active policy does not fit
        the robot (robot_fit; status() names both sides under 'mismatch'), ValueError when one
        observation does not fit it. Call swap_if_pending before, on the same thread, never
        during.
        """
        active = self.active
        self._observed = (len(observation.joint_names),
                          tuple(tuple(np.shape(image)[:2]) for image in observation.images))
        if active is None:
            return None
        checked = self._fit_checked
        if checked is None or checked[1] is not active or checked[0] != self._observed:
            # The first observation of this version, or the robot changed (a camera dropped
            # out): check the fit once, not on every observation.
            self._fit_checked = (self._observed, active)
            try:
                self.check_fits_robot(active.policy, active.source)
                self.mismatch = ''
            except WeightsError as exc:
                self.mismatch = str(exc)
        if self.mismatch:
            raise WeightsError(f'version {active.version} holds: {self.mismatch}')
        names = self.command_joint_names(observation)
        inputs = self.model_input(active.policy, observation)
        start_time = observation.stamp + self.period
        prefix, delay = self.guided_prefix(active.policy, start_time)
        started = time.monotonic()
        features = None
        if prefix is None:
            # With a critic: the chunk and the critic's features from one encoder pass.
            actions, features = self._predict(active.policy, inputs,
                                              with_features=active.critic is not None)
        else:
            actions = np.asarray(active.policy.predict_action_chunk(
                inputs, prefix=prefix, delay=delay, max_guidance=self.max_guidance),
                dtype=np.float32)
            self.counters['guided_chunks'] += 1
        latency = time.monotonic() - started
        if actions.ndim != 2 or actions.shape[1] != len(names):
            raise ValueError(f'the policy returned actions of shape {actions.shape}; it must '
                             f'be (H, {len(names)}) for joints {names}')
        if not np.all(np.isfinite(actions)):
            self.counters['chunks_nonfinite'] += 1
            self._retire_broken(active)
        chunk_id = self._next_chunk_id
        self._next_chunk_id += 1
        # Late: the robot had a tick without a policy action since the last chunk came.
        underruns = self.executor.counters['underruns']
        accepted = self.executor.add_chunk(actions, start_time, self.period, active.version,
                                           chunk_id)
        self.counters['inferences'] += 1
        late = False
        if accepted:
            late, self._underruns_seen = underruns > self._underruns_seen, underruns
        else:
            self.counters['chunks_rejected'] += 1
        skipped = (0 if self.clock is None
                   else self.executor.past_due(start_time, actions.shape[0], self.clock()))
        # After the chunk is queued: the critic never delays the robot's plan.
        p_v, v_e = self.viability(active, inputs, features)
        return ChunkResult(actions, active.version, chunk_id, start_time, self.period, names,
                           accepted, latency, observation, skipped=skipped, late=late,
                           viability=p_v, efficiency_value=v_e,
                           critic_problem=active.critic_problem,
                           help_calibration=active.help_calibration,
                           help_calibration_problem=active.help_calibration_problem)

    def guided_prefix(self, policy: Any, start_time: float) -> tuple[np.ndarray | None, int]:
        """Return the real-time chunking prefix of a chunk first due at start_time, and d.

        The prefix is the current plan from start_time on (the executor's newest chunk,
        whole); its first d actions are committed: d is the executor's measured delay (actions
        that fell due during recent inferences, cold starts left out), at most the prefix.
        (None, 0) without realtime_chunking, for a policy that cannot be guided, or with no
        plan yet (the first chunk after a start or a clear is sampled freely).
        """
        if not self.realtime_chunking or not getattr(policy, 'supports_guided_prefix', False):
            return None, 0
        planned = self.executor.planned_actions(start_time, policy.horizon)
        if planned is None or len(planned) == 0:
            return None, 0
        delay = self.executor.delay_steps or 0
        return planned, min(delay, len(planned))

    def _batch(self, inputs: dict[str, Any]) -> dict[str, Any]:
        import torch

        return {key: [value] if isinstance(value, str)
                else torch.as_tensor(np.ascontiguousarray(value), device=self.device)[None]
                for key, value in inputs.items()}

    def _predict(self, policy: Any, inputs: dict[str, Any],
                 with_features: bool = False) -> tuple[np.ndarray, Any]:
        """Return the (H, D) chunk, and the policy's features of the inputs (or None)."""
        import torch

        batch = self._batch(inputs)
        features = None
        with torch.inference_mode():
            if with_features:
                chunks, features = policy.sample_chunks_and_features(batch)
            else:
                chunks = policy.sample_chunks(batch)
        return chunks[0].float().cpu().numpy(), features


def _image_shape(config: Any) -> tuple[int, int]:
    # (H, W) the policy was trained on: LeRobot configs name both (a 480 x 640 camera stays
    # 4:3); habc's own policies take square images of image_size.
    shape = getattr(config, 'image_shape', None)
    return tuple(shape) if shape else (config.image_size, config.image_size)


def _resize_nearest(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f'camera images must be (H, W, 3) uint8, got {image.shape} '
                         f'{image.dtype}')
    height, width = image.shape[:2]
    if (height, width) == tuple(shape):
        return image
    rows = (np.arange(shape[0]) * height) // shape[0]
    cols = (np.arange(shape[1]) * width) // shape[1]
    return image[rows][:, cols]


def observation_from_msg(msg: Any) -> PolicyObservation:
    """Build a PolicyObservation from a habc_msgs/Observation (images are not copied)."""
    stamp = msg.header.stamp
    return PolicyObservation(
        stamp=stamp.sec + stamp.nanosec * 1e-9,
        images=[image_to_numpy(image, rgb=True) for image in msg.images],
        joint_names=list(msg.joint_state.name),
        positions=np.asarray(msg.joint_state.position, dtype=np.float64),
        instruction=msg.instruction, header_stamp=stamp)


class InferenceWorker:
    """The inference thread: one inference at a time, on the newest observation.

    `offer` stores an observation (a newer one replaces an older one that was not used);
    `request` starts an inference on it unless one is running or it was used already; the
    result goes to `on_result` (or the exception to `on_error`) on this thread. Staged
    weights are swapped in before an inference starts, and when the worker is woken while
    idle, so a swap never happens during an inference; `on_swap` reports it.
    """

    def __init__(self, runtime: PolicyRuntime,
                 on_result: Callable[[ChunkResult], None],
                 on_error: Callable[[Exception], None],
                 on_swap: Callable[[LoadedPolicy], None] | None = None,
                 swap_allowed: Callable[[LoadedPolicy], bool] | None = None) -> None:
        self.runtime = runtime
        self._swap_allowed = swap_allowed
        self._on_result = on_result
        self._on_error = on_error
        self._on_swap = on_swap
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._newest: PolicyObservation | None = None
        self._requested: PolicyObservation | None = None
        self._last_stamp = -math.inf
        self._requested_at = math.nan
        # The next inference is the first of its weights (start-up or a swap): cold.
        self._cold = True
        self._busy = False
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name='policy_inference', daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread after the running inference (if any) ends."""
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._busy

    def offer(self, observation: PolicyObservation) -> None:
        """Keep `observation` as the newest one (if it is newer than the kept one)."""
        with self._lock:
            if self._newest is None or observation.stamp > self._newest.stamp:
                self._newest = observation

    def request(self, not_before: float = -math.inf) -> bool:
        """Start an inference on the newest observation; False when none is started.

        Nothing starts while an inference runs, without an observation newer than the last
        one inferred, or when the newest one is stamped before `not_before` (s).
        """
        with self._lock:
            newest = self._newest
            if (self._busy or newest is None or newest.stamp <= self._last_stamp
                    or newest.stamp < not_before):
                return False
            self._busy = True
            self._requested = newest
            self._requested_at = time.monotonic()
            self._last_stamp = newest.stamp
        self._wake.set()
        return True

    def wake(self) -> None:
        """Let an idle worker swap in newly staged weights now."""
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stopping:
                return
            try:
                swapped = self.runtime.swap_if_pending(self._swap_allowed)
                if swapped is not None:
                    self._cold = True
                    if self._on_swap is not None:
                        self._on_swap(swapped)
            except Exception as exc:  # report, keep the thread alive
                self._on_error(exc)
            with self._lock:
                observation, self._requested = self._requested, None
                requested_at = self._requested_at
            if observation is None:
                continue
            try:
                result = self.runtime.infer(observation)
                if result is not None:
                    result.turnaround_s = time.monotonic() - requested_at
                    result.cold, self._cold = self._cold, False
                    self._on_result(result)
            except Exception as exc:  # report, keep the thread alive
                self.runtime.counters['inference_errors'] += 1
                self._on_error(exc)
            finally:
                with self._lock:
                    self._busy = False
