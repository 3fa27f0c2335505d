"""learner_node: trains on newly labelled episodes and publishes versioned policy updates.

Topics: publishes `policy/update` (habc_msgs/PolicyUpdate, latched) after every round and
`learner/status` (std_msgs/String with JSON, latched: state 'idle' | 'training', version,
round, episodes, pending, last metrics, and progress while training). It reads the episode
index (SQLite, `index_path`) and the bags it names; it subscribes to nothing.

A timer polls the index every `poll_period_s`; polling (which reads bags) and training run in
one worker thread, so the executor never blocks and at most one round runs at a time. After a
restart the node republishes its latest version at once (latched), so a policy node that
restarted meanwhile catches up. The logic lives in habc_learner.learner.Learner.
"""

import json
import threading
import time

from diagnostic_msgs.msg import KeyValue
from rclpy.node import Node
from std_msgs.msg import String
import torch

from habc_common.node_main import spin_node
from habc_common.params import declare_node_parameters
from habc_common.qos import LATCHED
from habc_episodes.index import EpisodeIndex
from habc_learner.learner import (
    CHECKPOINT_FORMAT,
    expand_path,
    Learner,
    LearnerParams,
    RoundResult,
)
from habc_msgs.msg import PolicyUpdate

PARAMS = LearnerParams


class RoundAbortedError(Exception):
    """Raised from the progress callback to end a round when the node shuts down."""


def policy_update_message(result: RoundResult) -> PolicyUpdate:
    """Return the PolicyUpdate announcing a checkpoint folder written by the learner."""
    msg = PolicyUpdate()
    seconds = int(result.written_at)
    msg.header.stamp.sec = seconds
    msg.header.stamp.nanosec = int((result.written_at - seconds) * 1e9)
    msg.version = result.version.number
    msg.sha256 = result.sha256
    msg.format = CHECKPOINT_FORMAT
    msg.uri = result.path.resolve().as_uri()  # file:///abs/dir, percent-encoded
    msg.metrics = [KeyValue(key=key, value=f'{value:.6g}' if isinstance(value, float)
                            else str(value))
                   for key, value in sorted(result.metrics.items())]
    return msg


class LearnerNode:
    """Thin rclpy adapter over Learner."""

    def __init__(self) -> None:
        self.node = Node('learner')
        self.params = declare_node_parameters(self.node, LearnerParams)
        # Training shares the machine with the robot-side nodes: cap its CPU threads.
        torch.set_num_threads(self.params.torch_threads)
        logger = self.node.get_logger()
        self.learner = Learner(self.params, log=logger.info)
        self.index_path = expand_path(self.params.index_path)
        # Opened read-only once the recorder has created it (the learner never writes it).
        self.index: EpisodeIndex | None = None
        self.update_publisher = self.node.create_publisher(PolicyUpdate, 'policy/update',
                                                           LATCHED)
        self.status_publisher = self.node.create_publisher(String, 'learner/status', LATCHED)
        self._worker: threading.Thread | None = None
        self._closing = threading.Event()
        latest = self.learner.latest()
        if latest is not None:
            self.update_publisher.publish(policy_update_message(latest))
            logger.info(f'republished version {latest.version} ({latest.path})')
        self.publish_status('idle')
        self.node.create_timer(self.params.poll_period_s, self.poll_callback)
        logger.info(f'ready: version {self.learner.version}, method {self.params.method}, '
                    f'{self.params.episodes_per_round} episodes per round, index '
                    f'{self.index_path}, work_dir {self.learner.work_dir}')

    def publish_status(self, state: str, **extra: object) -> None:
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
            if self.index is None:
                try:
                    self.index = EpisodeIndex(self.index_path, read_only=True)
                except FileNotFoundError:
                    self.publish_status('idle', waiting=f'no episode index at {self.index_path} '
                                        'yet (the recorder creates it when it starts)')
                    return
            added = self.learner.poll(self.index)
            if added:
                self.publish_status('idle')
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
            self.update_publisher.publish(policy_update_message(result))
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

    def close(self) -> None:
        """Let a running poll finish briefly; a round cut short is redone after a restart."""
        self._closing.set()
        if self._worker is not None:
            self._worker.join(timeout=2.0)
        if self.index is not None:
            self.index.close()


def main(args: list[str] | None = None) -> None:
    """Run learner_node until shutdown."""
    spin_node(LearnerNode, args, single_threaded=True)


if __name__ == '__main__':
    main()
