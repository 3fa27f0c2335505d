"""learner_node: trains on newly labelled episodes and publishes versioned policy updates.

Every PolicyUpdate is signed with the Ed25519 key `signing_key` (created with its .pub on
the first start; habc_common.update_trust), since policy nodes apply only signed updates.

Topics: publishes `policy/update` (habc_msgs/PolicyUpdate, latched) after every round and
`learner/status` (std_msgs/String with JSON, latched: state 'waiting' | 'idle' | 'training',
version, round, episodes, pending, episodes per robot, per-store cursors and problems, last
metrics, and progress while training). It reads the episode index (SQLite, `index_path`), or
in a fleet every robot's (`index_paths`), and the bags they name; it subscribes to nothing.
A store that does not exist yet or cannot be read is skipped and retried at every poll.

Starting point. After a restart the node resumes from `work_dir`; on a first start it needs
the SFT checkpoint: `init_checkpoint`, or, left empty, the newest one `habc demo` trained
(habc_common.checkpoints: runs/demo/sft in the current folder or in $HABC_ROOT). With none,
it does not exit: it publishes state 'waiting' with the reason (logged once) and, every
`poll_period_s`, looks again, so it starts as soon as `habc demo` has written one or
`ros2 param set /learner init_checkpoint DIR` names one (a folder that holds no checkpoint is
refused at once).

A timer polls the index every `poll_period_s`; polling (which reads bags) and training run in
one worker thread, so the executor never blocks and at most one round runs at a time. After a
restart the node republishes its latest version at once (latched), so a policy node that
restarted meanwhile catches up. The logic lives in habc_learner.learner.Learner.
"""

from dataclasses import replace
import json
from pathlib import Path
import sqlite3
import threading
import time
from typing import Any

from diagnostic_msgs.msg import KeyValue
from rcl_interfaces.msg import SetParametersResult
from rclpy.node import Node
from std_msgs.msg import String
import torch

from habc_common import checkpoints
from habc_common.control_loop import compute_threads
from habc_common.node_main import spin_node
from habc_common.params import declare_node_parameters
from habc_common.qos import LATCHED
from habc_common.update_trust import (
    companions_digest,
    ensure_key_pair,
    load_signing_key,
    public_path,
    SigningKey,
    UntrustedUpdateError,
    UpdateClaim,
)
from habc_episodes.index import EpisodeIndex
from habc_learner.learner import (
    CHECKPOINT_FORMAT,
    expand_path,
    has_state,
    Learner,
    LearnerParams,
    RoundResult,
)
from habc_msgs.msg import PolicyUpdate
from habc_policy.models.base import LEROBOT_PREFIX

PARAMS = LearnerParams


class RoundAbortedError(Exception):
    """Raised from the progress callback to end a round when the node shuts down."""


def policy_update_message(result: RoundResult, key: SigningKey,
                          policy_name: str) -> PolicyUpdate:
    """Return the signed PolicyUpdate announcing a checkpoint folder the learner wrote."""
    msg = PolicyUpdate()
    seconds = int(result.written_at)
    msg.header.stamp.sec = seconds
    msg.header.stamp.nanosec = int((result.written_at - seconds) * 1e9)
    msg.version = result.version.number
    msg.sha256 = result.sha256
    msg.format = CHECKPOINT_FORMAT
    msg.uri = result.path.resolve().as_uri()  # file:///abs/dir, percent-encoded
    msg.policy_name = policy_name
    msg.key_id = key.key_id
    # Over the critic and its calibration too: the robot trusts its help requests as much.
    msg.companions_sha256 = companions_digest(result.path)
    msg.signature = list(key.sign(UpdateClaim(msg.version, msg.sha256, msg.uri, policy_name,
                                              msg.companions_sha256)))
    msg.metrics = [KeyValue(key=key, value=f'{value:.6g}' if isinstance(value, float)
                            else str(value))
                   for key, value in sorted(result.metrics.items())]
    return msg


def _signing_key(path: str, logger: Any) -> SigningKey:
    """Load the signing key, creating the pair on a first start (ValueError: unusable)."""
    if ensure_key_pair(path):
        logger.info(f'created the signing key pair {path} and {public_path(path)}: policy '
                    'nodes on this machine trust it by default; copy the .pub to a robot '
                    "on another machine (its policy node's trusted_keys)")
    try:
        return load_signing_key(path)
    except UntrustedUpdateError as exc:
        raise ValueError(f'parameter signing_key: {exc}') from None


class LearnerNode:
    """Thin rclpy adapter over Learner."""

    def __init__(self) -> None:
        self.node = Node('learner')
        self.params = declare_node_parameters(self.node, LearnerParams)
        self.signing_key = _signing_key(self.params.signing_key, self.node.get_logger())
        # Training shares the machine with the robot-side nodes: cap its CPU threads.
        torch.set_num_threads(compute_threads(self.params.torch_threads))
        self.learner: Learner | None = None
        # One index per robot store (index_paths), else index_path; each is opened read-only
        # once its recorder has created it (the learner never writes them).
        self.store_paths = self.params.store_paths()
        self.indexes: dict[Path, EpisodeIndex] = {}
        self.update_publisher = self.node.create_publisher(PolicyUpdate, 'policy/update',
                                                           LATCHED)
        self.status_publisher = self.node.create_publisher(String, 'learner/status', LATCHED)
        self._worker: threading.Thread | None = None
        self._closing = threading.Event()
        # Until a checkpoint is known: why the node waits, and the search for one.
        self._waiting = ''
        self._watch = checkpoints.CheckpointWatch()
        self._failed_init = ''  # an init_checkpoint set at run time that could not be used
        self._failed_found: Path | None = None  # a found checkpoint that could not be used
        # A first start fails here, as before, only on a checkpoint the user named.
        self._start(at_startup=True)
        self.node.add_on_set_parameters_callback(self._check_parameters)
        self.node.create_timer(self.params.poll_period_s, self.poll_callback)

    def _update_message(self, result: RoundResult) -> PolicyUpdate:
        return policy_update_message(result, self.signing_key, self.params.policy_name)

    def _start(self, at_startup: bool = False) -> bool:
        """Create the Learner once its starting point is known; return True once it runs.

        Raises:
            ValueError: at start-up only, when the state in work_dir or the init_checkpoint
                the parameters name cannot be used (the node exits with that line).
        """
        logger = self.node.get_logger()
        init = str(self.node.get_parameter('init_checkpoint').value or '')
        found = None
        if not init and not has_state(self.params.work_dir):
            found = self._watch.poll()
            if found is None:
                if self._failed_found is None:  # else its reason stays on the status
                    self._wait(self._no_checkpoint_reason())
                return False
            init = str(found)
        elif init and init == self._failed_init:
            return False  # already tried and refused; a new value or a restart tries again
        try:
            learner = Learner(replace(self.params, init_checkpoint=init), log=logger.info)
        except ValueError as exc:
            if at_startup and found is None:
                raise
            self._failed_init = '' if found is not None else init
            self._failed_found = found
            self._wait(f'cannot start from {init}: {exc}; waiting for another checkpoint '
                       f'(set init_checkpoint, or train one with `habc demo`)')
            return False
        self.learner, self._waiting = learner, ''
        latest = learner.latest()
        if latest is not None:
            self.update_publisher.publish(self._update_message(latest))
            logger.info(f'republished version {latest.version} ({latest.path})')
        self.publish_status('idle')
        origin = (f', starting from {found} (init_checkpoint was empty: the newest `habc demo` '
                  'checkpoint)' if found is not None else '')
        logger.info(f'ready: version {learner.version}, method {self.params.method}, '
                    f'{self.params.episodes_per_round} episodes per round, '
                    f'{_stores_text(self.store_paths)}, work_dir {learner.work_dir}{origin}')
        return True

    def _no_checkpoint_reason(self) -> str:
        work_dir = expand_path(self.params.work_dir)
        return (f'waiting for a checkpoint: no learner state in {work_dir}, init_checkpoint '
                'is empty and no `habc demo` checkpoint is in '
                f'{checkpoints.describe_search(self._watch.folders)}; run `make run` (or '
                '`habc demo`) once, or `ros2 param set '
                f'{self.node.get_fully_qualified_name()} init_checkpoint DIR`; the learner '
                'starts as soon as one is there')

    def _wait(self, reason: str) -> None:
        """Publish and log why the learner waits, once per reason (never on every poll)."""
        if reason == self._waiting:
            return
        self._waiting = reason
        self.node.get_logger().warning(reason)
        self.publish_status('waiting')

    def _check_parameters(self, parameters: list) -> SetParametersResult:
        for parameter in parameters:
            if parameter.name != 'init_checkpoint':
                continue
            if self.learner is not None:
                return SetParametersResult(
                    successful=False, reason='the learner already runs (from '
                    f'{self.learner.work_dir}); init_checkpoint counts on a first start only')
            # A LeRobot folder may be named `lerobot:PATH` (Learner strips the prefix).
            value = str(parameter.value or '').removeprefix(LEROBOT_PREFIX)
            folder = expand_path(value) if value else None
            if folder is not None and not checkpoints.is_checkpoint(folder):
                return SetParametersResult(
                    successful=False, reason=f'{folder} is not a checkpoint folder '
                    f'({checkpoints.WEIGHTS_FILE} and {checkpoints.CONFIG_FILE})')
        return SetParametersResult(successful=True)

    def publish_status(self, state: str, **extra: object) -> None:
        if self.learner is None:
            status: dict[str, Any] = {
                'state': 'waiting', 'waiting': self._waiting, 'version': None, 'round': 0,
                'method': self.params.method, 'episodes_per_round':
                self.params.episodes_per_round,
                'search': [str(f) for f in self._watch.folders], **extra}
        else:
            status = self.learner.status(state, **extra)
        self.status_publisher.publish(String(data=json.dumps(status, default=str)))

    def poll_callback(self) -> None:
        if self._closing.is_set() or (self._worker is not None and self._worker.is_alive()):
            return  # the previous poll or round is still running; the next tick retries
        self._worker = threading.Thread(target=self._work, name='learner', daemon=True)
        self._worker.start()

    def _work(self) -> None:
        logger = self.node.get_logger()
        try:
            if self.learner is None and not self._start():
                return  # no checkpoint yet: the status says why
            missing = self._open_indexes()
            added = self.learner.poll(list(self.indexes.values()))
            if missing and not self.indexes:
                self.publish_status('idle', waiting=f'no episode index at {", ".join(missing)} '
                                    'yet (the recorder creates it when it starts)')
                return
            if added:
                self.publish_status('idle', **({'missing_stores': missing} if missing else {}))
            if not self.learner.ready() or self._closing.is_set():
                return
            started = time.monotonic()
            self.publish_status('training', progress={'step': 0})

            def progress(step: int, steps: int, metrics: dict[str, float]) -> None:
                if self._closing.is_set():
                    raise RoundAbortedError('the node is shutting down')
                self.publish_status('training', progress={
                    'step': step, 'steps': steps, 'elapsed_s': time.monotonic() - started,
                    'losses/actor': metrics.get('losses/actor')})

            result = self.learner.train_round(on_progress=progress)
            self.update_publisher.publish(self._update_message(result))
            logger.info(f'published policy/update version {result.version}')
            self.publish_status('idle')
        except Exception as exc:  # noqa: BLE001 - keep the node alive; the log says why
            if self._closing.is_set():
                return
            # A persistent fault (an unreadable index) would otherwise log every poll.
            logger.error(f'learner step failed: {type(exc).__name__}: {exc}',
                         throttle_duration_sec=10.0)
            try:
                self.publish_status('idle', error=f'{type(exc).__name__}: {exc}')
            except Exception:  # noqa: BLE001 - already shutting down
                pass

    def _open_indexes(self) -> list[str]:
        """Open the stores whose index exists now; return those still missing.

        A robot that has not started yet (or whose store is gone) is simply not read: the
        learner trains on the others and picks it up once its recorder has created it.
        """
        missing = []
        for path in self.store_paths:
            if path in self.indexes:
                continue
            try:
                self.indexes[path] = EpisodeIndex(path, read_only=True)
                self.node.get_logger().info(f'reading episode store {path}')
            except FileNotFoundError:
                missing.append(str(path))
            except (RuntimeError, ValueError, sqlite3.Error) as exc:
                missing.append(str(path))
                self.node.get_logger().error(f'episode store {path} cannot be read: {exc}',
                                             throttle_duration_sec=60.0)
        return missing

    def close(self) -> None:
        """Let a running poll finish briefly; a round cut short is redone after a restart."""
        self._closing.set()
        if self._worker is not None:
            self._worker.join(timeout=2.0)
        for index in self.indexes.values():
            index.close()


def _stores_text(paths: list[Path]) -> str:
    if len(paths) == 1:
        return f'index {paths[0]}'
    return f'{len(paths)} episode stores ({", ".join(str(p) for p in paths)})'


def main(args: list[str] | None = None) -> None:
    """Run learner_node until shutdown."""
    spin_node(LearnerNode, args)


if __name__ == '__main__':
    main()
