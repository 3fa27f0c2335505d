#!/usr/bin/env python3
"""Closed-loop latency: control jitter, observation to command, image transport, hot swap.

Starts the loop's real processes (sim_robot, sync, policy, teleop_arbiter) with
`habc launch bringup`, in a namespace and a ROS domain of their own, with an untrained
SmallVLA of the demo's size whose actions stay near the start pose, and measures:

1. the arbiter's control-period jitter at 50 Hz, read from arbiter/diagnostics, without and
   with a concurrent training process (Trainer steps on a SmallVLA, 1 torch thread);
2. observation -> policy/chunk latency, and how often a chunk's first action (due one
   control period after its observation) is already late or stale when the chunk arrives;
3. hot-swap time: PolicyUpdate published -> policy/status reports the version active, and
   the control ticks without an action at the swap (policy/status swap_gap_ticks);
4. 640x480 rgb8 image latency between two processes, with the shipped Fast DDS profile
   (config/dds/fastdds_localhost.xml) and with Fast DDS defaults (the variable unset).

Every process keeps ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST. The load average at start and
end is part of the report: on a shared machine the numbers are what they are. Writes
loop_latency.{json,md,png} under --out and prints the table (about 3 minutes).

    python benchmarks/bench_loop.py [--window 30] [--idle-window 20] [--out benchmarks/results]
"""

import argparse
from collections.abc import Callable
from dataclasses import dataclass
import json
import math
import os
from pathlib import Path
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_PROFILE = ROOT / 'config' / 'dds' / 'fastdds_localhost.xml'
PROFILE_VARS = ('FASTRTPS_DEFAULT_PROFILES_FILE', 'FASTDDS_DEFAULT_PROFILES_FILE')
NAMESPACE = 'bench_loop'
PERIOD_S = 0.02            # the arbiter's and the policy's control period (50 Hz)
STALE_AFTER_S = 0.75 * PERIOD_S   # policy_node's default stale_after_s
EXECUTE_STEPS = 10         # config/params/policy.yaml: actions executed per chunk
IMAGE_TOPIC = 'bench/image_raw'
VLA_SIZE = {'state_dim': 14, 'action_dim': 14, 'horizon': 20, 'num_views': 1,
            'image_size': 96, 'action_head': 'l2'}
INSTRUCTION = 'transfer the cube to the left arm'


# Helpers --------------------------------------------------------------------------------


def ros_environment(domain_id: int, profile: bool = True) -> dict[str, str]:
    """Environment of a child rclpy process: loopback discovery, the benchmark's domain.

    profile=False unsets the Fast DDS profile variables, so Fast DDS runs on its defaults.
    """
    env = dict(os.environ, PYTHONUNBUFFERED='1', ROS_DOMAIN_ID=str(domain_id),
               ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST', RMW_IMPLEMENTATION='rmw_fastrtps_cpp')
    for var in PROFILE_VARS:
        if profile:
            env[var] = str(SHIPPED_PROFILE)
        else:
            env.pop(var, None)
    return env


def percentiles(values: list[float] | np.ndarray) -> dict[str, float | int]:
    """Count, p50, p99, max and mean of `values` (NaN where there are none)."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        nan = float('nan')
        return {'n': 0, 'p50': nan, 'p99': nan, 'max': nan, 'mean': nan}
    return {'n': int(data.size), 'p50': float(np.percentile(data, 50)),
            'p99': float(np.percentile(data, 99)), 'max': float(data.max()),
            'mean': float(data.mean())}


_STARTED = time.monotonic()


def say(text: str) -> None:
    """Print a progress line with the seconds since the benchmark started."""
    print(f'[bench_loop {time.monotonic() - _STARTED:5.1f} s] {text}', flush=True)


def finite(value: Any) -> Any:
    """Return `value` with every NaN float replaced by None (strict JSON), recursively."""
    if isinstance(value, float):
        return None if value != value else value
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite(item) for item in value]
    return value


def load_average() -> list[float]:
    """Return the 1, 5 and 15 minute load averages."""
    return [round(v, 2) for v in os.getloadavg()]


class Child:
    """A child process whose output lines are collected (with receipt times) by a thread."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path | None = None,
                 cwd: Path | None = None) -> None:
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, env=env,
                                        cwd=cwd, start_new_session=True, bufsize=1)
        self.lines: list[tuple[float, str]] = []
        self._log = open(log, 'w') if log else None  # closed by the reader thread
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append((time.monotonic(), line.rstrip('\n')))
            if self._log:
                self._log.write(line)
                self._log.flush()
        if self._log:
            self._log.close()

    def tail(self, count: int = 40) -> str:
        return '\n'.join(line for _, line in self.lines[-count:])

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30.0) -> int:
        """Send `sig`, wait up to `timeout`, then kill the process group; return the code."""
        if self.process.poll() is None:
            try:
                os.kill(self.process.pid, sig)
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
            except ProcessLookupError:
                pass
        self._reader.join(timeout=5.0)
        return self.process.returncode


def wait_for(predicate: Callable[[], Any], timeout: float, what: str,
             child: Child | None = None) -> Any:
    """Poll `predicate` until it returns something truthy; raise RuntimeError on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if child is not None and child.process.poll() is not None:
            raise RuntimeError(f'the bringup exited while waiting for {what}:\n{child.tail()}')
        if time.monotonic() > deadline:
            tail = f':\n{child.tail()}' if child is not None else ''
            raise RuntimeError(f'timeout ({timeout:.0f} s) waiting for {what}{tail}')
        time.sleep(0.05)


# Checkpoints and parameters -------------------------------------------------------------


def save_checkpoint(directory: Path, version: str, seed: int) -> str:
    """Save an untrained SmallVLA of the demo's size whose actions stay near the start pose.

    Returns the SHA-256 of its model.safetensors.
    """
    import torch

    from habc_policy.models.vla import SmallVLA, SmallVLAConfig
    from habc_sim.aloha import START_ARM_POSE

    torch.manual_seed(seed)
    policy = SmallVLA(SmallVLAConfig(**VLA_SIZE))
    home = np.concatenate([START_ARM_POSE[:6], [0.5], START_ARM_POSE[8:14], [0.5]])
    policy.set_normalization({'actions_mean': home, 'actions_std': np.full(14, 0.01)})
    policy.version = version
    return policy.save(directory)


def write_params(path: Path, checkpoint: Path, jitter_window: int) -> Path:
    """Write the bringup's extra parameter file (layered over config/params/*.yaml)."""
    params = {
        # An isolated bench: the updates below are not signed, from this run's folder.
        '/**/policy': {'checkpoint': str(checkpoint), 'torch_threads': 1,
                       'require_signed_updates': False,
                       'checkpoint_roots': [str(checkpoint.parent)]},
        # No recorder runs episodes here: the policy drives without one.
        '/**/teleop_arbiter': {'jitter_window': jitter_window,
                               'hold_between_episodes': False},
    }
    path.write_text(yaml.safe_dump({k: {'ros__parameters': v} for k, v in params.items()}))
    return path


# The listener ---------------------------------------------------------------------------


@dataclass
class ChunkRecord:
    """One policy/chunk as the listener received it."""

    receipt: float       # time.monotonic() at the callback
    latency_s: float     # wall-clock receipt - header stamp (the observation's stamp)
    dt: float
    version: str
    skipped: int = 0     # ActionChunk.skipped_steps: actions that fell due during inference
    late: bool = False   # ActionChunk.late: a tick without an action since the last chunk
    inference_s: float = math.nan   # ActionChunk.inference_s: the model's own time
    turnaround_s: float = math.nan  # ActionChunk.turnaround_s: request -> chunk accepted


class Monitor:
    """Listens to the loop in the benchmark's namespace and publishes policy updates."""

    def __init__(self, namespace: str) -> None:
        from diagnostic_msgs.msg import DiagnosticArray
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
        from std_msgs.msg import String

        from habc_common.qos import COMMANDS, LATCHED, SENSOR_DATA
        from habc_msgs.msg import ActionChunk, InterventionState, Observation, PolicyUpdate

        self.node = rclpy.create_node('bench_loop_monitor', namespace=namespace)
        self.diagnostics: list[tuple[float, dict[str, str]]] = []
        self.tick_stamps: list[tuple[float, int]] = []
        self.chunks: list[ChunkRecord] = []
        self.statuses: list[tuple[float, dict]] = []
        # (receipt, receipt - stamp) of each synchronized observation, as the policy gets it.
        self.observations: list[tuple[float, float]] = []
        # Deep, latched reader queue: two statuses sent back to back (staged, active) both
        # reach the callback.
        status_qos = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE,
                                durability=DurabilityPolicy.TRANSIENT_LOCAL)
        node = self.node
        node.create_subscription(DiagnosticArray, 'arbiter/diagnostics', self._on_diagnostics,
                                 10)
        node.create_subscription(InterventionState, 'intervention', self._on_tick, COMMANDS)
        node.create_subscription(ActionChunk, 'policy/chunk', self._on_chunk, COMMANDS)
        node.create_subscription(Observation, 'observation', self._on_observation, SENSOR_DATA)
        node.create_subscription(String, 'policy/status', self._on_status, status_qos)
        self.update_publisher = node.create_publisher(PolicyUpdate, 'policy/update', LATCHED)
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()

    def _on_diagnostics(self, msg: Any) -> None:
        for status in msg.status:
            if status.name.endswith('control tick'):
                values = {kv.key: kv.value for kv in status.values}
                self.diagnostics.append((time.monotonic(), values))

    def _on_tick(self, msg: Any) -> None:
        stamp = msg.header.stamp
        self.tick_stamps.append((time.monotonic(), stamp.sec * 1_000_000_000 + stamp.nanosec))

    def _on_chunk(self, msg: Any) -> None:
        now_ns = time.time_ns()
        stamp = msg.header.stamp
        stamp_ns = stamp.sec * 1_000_000_000 + stamp.nanosec
        self.chunks.append(ChunkRecord(time.monotonic(), (now_ns - stamp_ns) * 1e-9, msg.dt,
                                       msg.policy_version, msg.skipped_steps, msg.late,
                                       msg.inference_s, msg.turnaround_s))

    def _on_observation(self, msg: Any) -> None:
        stamp = msg.header.stamp
        age = time.time_ns() - (stamp.sec * 1_000_000_000 + stamp.nanosec)
        self.observations.append((time.monotonic(), age * 1e-9))

    def _on_status(self, msg: Any) -> None:
        try:
            self.statuses.append((time.monotonic(), json.loads(msg.data)))
        except json.JSONDecodeError:
            pass

    def next_diagnostics(self, after: float, timeout: float = 5.0) -> tuple[float, dict]:
        """Return the first arbiter/diagnostics received after monotonic time `after`."""
        def find() -> tuple[float, dict] | None:
            return next((d for d in list(self.diagnostics) if d[0] > after), None)
        return wait_for(find, timeout, 'arbiter/diagnostics')

    def status_since(self, since: float, test: Callable[[dict], bool]) -> float | None:
        """Receipt time of the first policy/status after `since` that passes `test`."""
        return next((t for t, s in list(self.statuses) if t >= since and test(s)), None)


# Phase measurements ---------------------------------------------------------------------


def tick_stats(stamps_ns: list[int]) -> dict[str, float]:
    """Tick-period jitter of a window of arbiter tick stamps (as TickStats computes it)."""
    if len(stamps_ns) < 2:
        return {}
    periods = np.diff(np.sort(np.asarray(stamps_ns, dtype=np.int64))) * 1e-9
    jitter = np.abs(periods - PERIOD_S) * 1e3
    late = periods > 1.5 * PERIOD_S
    stats = percentiles(jitter)
    return {'ticks': len(stamps_ns), 'mean_period_ms': float(periods.mean() * 1e3),
            'jitter_p50_ms': stats['p50'], 'jitter_p99_ms': stats['p99'],
            'jitter_max_ms': stats['max'], 'late_ticks': int(late.sum()),
            'missed_ticks': int(sum(max(0, round(p / PERIOD_S) - 1) for p in periods[late])),
            'periods_ms': [round(float(p) * 1e3, 3) for p in periods]}


def chunk_stats(chunks: list[ChunkRecord], seconds: float) -> dict[str, Any]:
    """Observation -> chunk receipt latency and the first action's due time vs arrival."""
    latency = np.array([c.latency_s for c in chunks]) * 1e3
    dt = np.array([c.dt or PERIOD_S for c in chunks]) * 1e3
    behind = latency - dt   # receipt - due time of the first action (obs stamp + one period)
    past_due = [sum(1 for i in range(EXECUTE_STEPS) if (i + 1) * d < lat)
                for lat, d in zip(latency, dt, strict=True)]
    n = len(chunks)
    return {
        'chunks': n, 'chunks_per_s': n / seconds if seconds else float('nan'),
        'obs_to_chunk_ms': percentiles(latency),
        'first_action_due_to_arrival_ms': percentiles(behind),
        'first_action_late_pct': 100.0 * float(np.mean(behind > 0)) if n else float('nan'),
        'first_action_stale_pct': (100.0 * float(np.mean(behind > STALE_AFTER_S * 1e3))
                                   if n else float('nan')),
        'actions_past_due_on_arrival_mean': float(np.mean(past_due)) if n else float('nan'),
        'skipped_steps_mean': float(np.mean([c.skipped for c in chunks])) if n else math.nan,
        'late_chunks_pct': 100.0 * float(np.mean([c.late for c in chunks])) if n else math.nan,
        'inference_ms': percentiles([c.inference_s * 1e3 for c in chunks]),
        'turnaround_ms': percentiles([c.turnaround_s * 1e3 for c in chunks]),
        # Observation stamp -> inference request, plus the chunk's way to the listener.
        'before_request_ms': percentiles([(c.latency_s - c.turnaround_s) * 1e3
                                          for c in chunks]),
        'latencies_ms': [round(float(v), 3) for v in latency],
    }


def diagnostics_window(before: dict[str, str], after: dict[str, str]) -> dict[str, float]:
    """Return the arbiter's numbers for the window between two arbiter/diagnostics messages.

    ticks, late and missed ticks are cumulative in TickStats: their difference is exact for
    the window. The jitter percentiles and busy_mean are over the arbiter's recent window of
    jitter_window periods; max_abs_jitter and max_busy are since the node started.
    """
    def number(values: dict[str, str], key: str) -> float:
        try:
            return float(values[key])
        except (KeyError, ValueError):
            return float('nan')

    out = {f'{key}_delta': number(after, key) - number(before, key)
           for key in ('ticks', 'late_ticks', 'missed_ticks')}
    for key in ('jitter_p50_ms', 'jitter_p99_ms', 'busy_mean_ms'):
        out[key] = number(after, key)
    for key in ('max_abs_jitter_ms', 'max_busy_ms', 'mean_period_ms'):
        out[f'{key}_since_start'] = number(after, key)
    out['source'] = after.get('source', '')
    return out


def measure_phase(monitor: Monitor, seconds: float, launcher: Child,
                  trainer: Child | None = None) -> dict[str, Any]:
    """Measure one window that starts and ends at an arbiter/diagnostics message."""
    t0, before = monitor.next_diagnostics(time.monotonic())
    deadline = t0 + seconds
    while time.monotonic() < deadline:
        if launcher.process.poll() is not None:
            raise RuntimeError(f'the bringup exited during the measurement:\n{launcher.tail()}')
        time.sleep(0.2)
    t1, after = monitor.next_diagnostics(deadline)
    stamps = [s for t, s in list(monitor.tick_stamps) if t0 <= t <= t1]
    chunks = [c for c in list(monitor.chunks) if t0 <= c.receipt <= t1]
    status = next((s for t, s in reversed(list(monitor.statuses)) if t <= t1), {})
    result = {'seconds': t1 - t0, 'load_average': load_average(),
              'diagnostics': diagnostics_window(before, after),
              'tick_stamps': tick_stats(stamps), 'chunks': chunk_stats(chunks, t1 - t0),
              'observation_age_ms': percentiles([1e3 * a for t, a in list(monitor.observations)
                                                 if t0 <= t <= t1]),
              # The policy's own turnaround (inference request -> chunk accepted), warm.
              'inference_p50_ms': 1e3 * (status.get('inference_turnaround_p50_s') or math.nan),
              'inference_p90_ms': 1e3 * (status.get('inference_turnaround_s') or math.nan)}
    if trainer is not None:
        steps = [(t, int(line.split()[1])) for t, line in list(trainer.lines)
                 if line.startswith('steps ')]
        inside = [(t, n) for t, n in steps if t0 <= t <= t1]
        if len(inside) >= 2:
            (ta, na), (tb, nb) = inside[0], inside[-1]
            result['training_steps_per_s'] = (nb - na) / (tb - ta) if tb > ta else float('nan')
        result['training_steps_total'] = steps[-1][1] if steps else 0
    return result


def hot_swaps(monitor: Monitor, updates: list[tuple[int, str, Path]],
              timeout: float = 45.0) -> list[dict[str, Any]]:
    """Publish each PolicyUpdate; time publish -> staged -> active -> first action."""
    from habc_msgs.msg import PolicyUpdate

    rows = []
    for version, sha256, directory in updates:
        name = str(version)
        msg = PolicyUpdate(version=version, sha256=sha256, uri=f'file://{directory}',
                           format='safetensors')
        msg.header.stamp = monitor.node.get_clock().now().to_msg()
        published = time.monotonic()
        monitor.update_publisher.publish(msg)
        row: dict[str, Any] = {'version': version}

        def active(s: dict, name: str = name) -> bool:
            return s.get('active_version') == name

        def rejected(s: dict, name: str = name) -> bool:
            update = s.get('last_update') or {}
            return update.get('version') == name and update.get('result') == 'rejected'

        def done(published: float = published, active=active, rejected=rejected) -> bool:
            return (monitor.status_since(published, active) is not None
                    or monitor.status_since(published, rejected) is not None)

        try:
            wait_for(done, timeout, f'policy/status active_version {name}')
        except RuntimeError as exc:
            row['error'] = str(exc)
            rows.append(row)
            continue
        fail = monitor.status_since(published, rejected)
        if fail is not None:
            reason = next(s['last_update'].get('reason', '') for t, s in monitor.statuses
                          if t == fail)
            row['error'] = f'rejected: {reason}'
            rows.append(row)
            continue
        staged = monitor.status_since(published, lambda s, n=name: s.get('staged_version') == n)
        activated = monitor.status_since(published, active)
        row['publish_to_staged_s'] = None if staged is None else staged - published
        row['publish_to_active_s'] = activated - published

        def gap(published: float = published, name: str = name) -> dict | None:
            return next((s for t, s in list(monitor.statuses) if t >= published
                         and name in (s.get('swap_gap_ticks') or {})), None)
        try:
            status = wait_for(gap, 10.0, f'swap_gap_ticks[{name!r}]')
            row['swap_gap_ticks'] = status['swap_gap_ticks'][name]
        except RuntimeError:
            row['swap_gap_ticks'] = None
        rows.append(row)
        time.sleep(1.0)
    return rows


# Image transport ------------------------------------------------------------------------


def image_transport(domain_id: int, seconds: float, rate_hz: float, profile: bool,
                    workdir: Path) -> dict[str, Any]:
    """One publisher and one subscriber process on 640x480 rgb8 images; latencies in ms."""
    env = ros_environment(domain_id, profile=profile)
    script = str(Path(__file__).resolve())
    # cwd: a folder without a DEFAULT_FASTRTPS_PROFILES.xml, which Fast DDS would also load.
    subscriber = subprocess.Popen(
        [sys.executable, script, '--role', 'image-sub', '--image-seconds', str(seconds)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=workdir)
    publisher = subprocess.Popen(
        [sys.executable, script, '--role', 'image-pub', '--image-seconds', str(seconds),
         '--image-rate', str(rate_hz)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=workdir)
    try:
        pub_out, pub_err = publisher.communicate(timeout=seconds + 60)
        time.sleep(1.0)  # the last frames in flight
        subscriber.send_signal(signal.SIGTERM)
        sub_out, sub_err = subscriber.communicate(timeout=30)
    finally:
        for process in (publisher, subscriber):
            if process.poll() is None:
                process.kill()
                process.wait()
    try:
        published = json.loads(pub_out.strip().splitlines()[-1])
        received = json.loads(sub_out.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError) as exc:
        raise RuntimeError(f'image transport run failed:\npublisher: {pub_out}{pub_err}\n'
                           f'subscriber: {sub_out}{sub_err}') from exc
    if 'error' in published:
        raise RuntimeError(f'image publisher: {published["error"]}')
    latencies = received['latencies_ms']
    return {'profile': str(SHIPPED_PROFILE.relative_to(ROOT)) if profile
            else 'Fast DDS defaults (profile variables unset)',
            'published': published['published'], 'received': len(latencies),
            'lost': published['published'] - len(set(received['seqs'])),
            'latency_ms': percentiles(latencies),
            'latencies_ms': [round(v, 3) for v in latencies]}


def run_image_publisher(seconds: float, rate_hz: float) -> None:
    """Child role: publish 640x480 rgb8 images for `seconds` once a subscriber matched."""
    import rclpy
    from sensor_msgs.msg import Image

    from habc_common.qos import SENSOR_DATA

    rclpy.init()
    node = rclpy.create_node('bench_image_pub', namespace=NAMESPACE)
    publisher = node.create_publisher(Image, IMAGE_TOPIC, SENSOR_DATA)
    deadline = time.monotonic() + 30.0
    while publisher.get_subscription_count() == 0:
        if time.monotonic() > deadline:
            print(json.dumps({'error': 'no subscriber matched within 30 s', 'published': 0}))
            return
        time.sleep(0.05)
    time.sleep(1.0)  # the subscriber's side of the match, too
    pixels = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    count = int(round(seconds * rate_hz))
    due = time.monotonic()
    for seq in range(count):
        msg = Image(height=480, width=640, encoding='rgb8', is_bigendian=0, step=640 * 3)
        msg.header.frame_id = str(seq)
        msg.data = pixels.tobytes()  # bytes: assigning the array itself is slow
        msg.header.stamp = node.get_clock().now().to_msg()
        publisher.publish(msg)
        due += 1.0 / rate_hz
        time.sleep(max(0.0, due - time.monotonic()))
    print(json.dumps({'published': count}), flush=True)
    time.sleep(0.5)
    node.destroy_node()
    rclpy.shutdown()


def run_image_subscriber(seconds: float) -> None:
    """Child role: receive images until SIGTERM; print receipt - header stamp (ms) as JSON."""
    import rclpy
    from rclpy.signals import SignalHandlerOptions
    from sensor_msgs.msg import Image

    from habc_common.qos import SENSOR_DATA

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    node = rclpy.create_node('bench_image_sub', namespace=NAMESPACE)
    clock = node.get_clock()
    latencies: list[float] = []
    seqs: list[int] = []

    def on_image(msg: Image) -> None:
        now = clock.now().nanoseconds
        stamp = msg.header.stamp
        latencies.append((now - stamp.sec * 1_000_000_000 - stamp.nanosec) * 1e-6)
        seqs.append(int(msg.header.frame_id))

    node.create_subscription(Image, IMAGE_TOPIC, on_image, SENSOR_DATA)
    deadline = time.monotonic() + seconds + 90.0
    while not stop.is_set() and time.monotonic() < deadline:
        rclpy.spin_once(node, timeout_sec=0.1)
    print(json.dumps({'latencies_ms': latencies, 'seqs': seqs}), flush=True)
    node.destroy_node()
    rclpy.shutdown()


# Training load --------------------------------------------------------------------------


def run_training_load() -> None:
    """Child role: Trainer steps (habc, batch 16) on a SmallVLA with random data until SIGTERM.

    Prints 'steps N' after every fit() call (2 steps each).
    """
    import torch

    from habc_episodes.episode import Episode
    from habc_episodes.vocabulary import Controller, EpisodeKind, Outcome
    from habc_learner.methods import MethodConfig
    from habc_learner.trainer import seed_everything, TrainConfig, Trainer
    from habc_policy.models.vla import SmallVLA, SmallVLAConfig

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    torch.set_num_threads(1)
    rng = seed_everything(0)
    size, length = VLA_SIZE['image_size'], 60
    method = MethodConfig(method='habc', horizon=VLA_SIZE['horizon'], warmup_steps=0)
    buffer = method.make_buffer()
    for i in range(8):
        controllers = np.full(length, Controller.POLICY)
        if i % 4 == 0:
            controllers[:] = Controller.HUMAN
        elif i % 4 == 1:
            controllers[length // 2:] = Controller.HUMAN
        observations = {
            'state': rng.normal(size=(length, 14)).astype(np.float32),
            'images': rng.integers(0, 255, (length, 1, size, size, 3), dtype=np.uint8)}
        buffer.add(Episode(observations=observations,
                           actions=rng.normal(size=(length, 14)).astype(np.float32),
                           controllers=controllers, instruction=INSTRUCTION,
                           kind=EpisodeKind.DEMO if i % 4 == 0 else EpisodeKind.ROLLOUT,
                           outcome=Outcome.SUCCESS if i % 3 else Outcome.FAILURE))
    trainer = Trainer(SmallVLA(SmallVLAConfig(**VLA_SIZE)), buffer, method,
                      TrainConfig(steps=2, batch_size=16, log_every=1_000_000),
                      progress=False)
    steps = 0
    while not stop.is_set():
        trainer.fit(steps=2)
        steps += 2
        print(f'steps {steps}', flush=True)


# Report ---------------------------------------------------------------------------------


def _ms(value: float | None, digits: int = 1) -> str:
    if value is None or value != value:  # None or NaN
        return '-'
    return f'{value:.{digits}f}'


def _verdict(value: float | None, limit: float) -> str:
    if value is None or value != value:
        return 'not measured'
    return 'met' if value <= limit else 'NOT met'


def goals_table(report: dict[str, Any]) -> list[str]:
    """Return the issue's goals with the measured numbers (rows only for what was run)."""
    rows = []
    phases = report['phases']
    for name, limit in (('quiet', 1.0), ('loaded', 2.0)):
        if name in phases:
            p99 = phases[name]['diagnostics']['jitter_p99_ms']
            rows.append((f'arbiter jitter p99, {name}', f'<= {limit:g} ms', f'{_ms(p99, 2)} ms',
                         _verdict(p99, limit)))
    if phases:
        seconds = sum(p['seconds'] for p in phases.values())
        missed = sum(p['diagnostics']['missed_ticks_delta'] for p in phases.values())
        rows.append((f'missed ticks (all phases, {seconds:.0f} s)', '0 in 60 s',
                     f'{missed:.0f}', _verdict(missed, 0)))
    for name, phase in phases.items():
        c = phase['chunks']
        p50, inference = c['obs_to_chunk_ms']['p50'], c['inference_ms']['p50']
        excess = p50 - inference if inference == inference else math.nan
        rows.append((f'obs->chunk p50 - inference p50, {name}', '<= 10 ms',
                     f'{_ms(p50)} - {_ms(inference)} = {_ms(excess)} ms', _verdict(excess, 10)))
        late = c.get('late_chunks_pct')
        rows.append((f'chunks that came late, {name}', '< 10 %', f'{_ms(late)} %',
                     _verdict(late, 9.999)))
    gaps = [row.get('swap_gap_ticks') for row in report['hot_swaps']]
    if gaps:
        worst = max((g for g in gaps if g is not None), default=None)
        rows.append(('empty ticks at a hot swap', '0', ', '.join(map(str, gaps)),
                     _verdict(worst, 0)))
    ingest = report.get('ingestion')
    if ingest:
        for label, ratio in ingest['ratios'].items():
            rows.append((f'bag ingestion vs a plain rosbags read, {label}', '>= 0.8x',
                         f'{ratio:.3f}x', 'met' if ratio >= 0.8 else 'NOT met'))
    if not rows:
        return []
    lines = ['## Goals (issue 14)', '', '| goal | target | measured | |', '|---|---|---|---|']
    lines += [f'| {a} | {b} | {c} | {d} |' for a, b, c, d in rows]
    lines += ['', 'late chunk: ActionChunk.late, the robot had a control tick without a '
              "policy action since the previous chunk (the executor's underruns). inference: "
              "ActionChunk.inference_s, the model's own time for each chunk in the window.",
              'The first action of a chunk (due one period after its observation) cannot be '
              'on time when inference plus transport take longer than a period; the '
              'scheduler plans with that: it skips the actions that fall due during the '
              'inference (reported per chunk) and counts a chunk late only when the robot '
              'ran out of plan before it came.']
    if ingest:
        lines.append(f"Ingestion: from {ingest['source']} (benchmarks/bench_ingest.py).")
    return lines + ['']


def markdown(report: dict[str, Any]) -> str:
    """Return the report as Markdown tables, with what each number measures."""
    meta = report['meta']
    lines = [f"Closed-loop latency ({meta['cores']} cores, {meta['cpu']}, "
             f"{meta['started']}; load average 1/5/15 min: start "
             f"{'/'.join(map(str, meta['load_average_start']))}, end "
             f"{'/'.join(map(str, meta['load_average_end']))}; total "
             f"{meta['total_s']:.0f} s)", '',
             'Shared machine: other jobs ran during the measurement; the load average is the '
             'context of every number below.', '']
    phases = report['phases']
    lines += goals_table(report)
    if phases:
        window = meta['jitter_window']
        lines += ['## 1. Arbiter control period at 50 Hz (sim_robot + sync + policy + arbiter)',
                  '',
                  '| phase | s | load 1 min | ticks | jitter p50 ms | jitter p99 ms | '
                  'max ms | late ticks | missed ticks | tick busy mean ms |',
                  '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
        for name, phase in phases.items():
            d, s = phase['diagnostics'], phase['tick_stamps']
            lines.append(
                f"| {name} | {phase['seconds']:.0f} | {phase['load_average'][0]} | "
                f"{d['ticks_delta']:.0f} | {_ms(d['jitter_p50_ms'], 2)} | "
                f"{_ms(d['jitter_p99_ms'], 2)} | {_ms(s.get('jitter_max_ms'))} | "
                f"{d['late_ticks_delta']:.0f} | {d['missed_ticks_delta']:.0f} | "
                f"{_ms(d['busy_mean_ms'], 2)} |")
        lines += ['',
                  "jitter = |tick period - 20 ms| of the arbiter's steady-clock control timer. "
                  'p50/p99 and busy mean: arbiter/diagnostics at the end of the window '
                  f'(TickStats over its last {window} periods, jitter_window set so they lie '
                  'in the window); ticks, late ticks (period > 30 ms) and missed ticks: '
                  'difference of the cumulative diagnostics counters over the window; max: '
                  "from the stamps of the arbiter's `intervention` messages in the window "
                  '(diagnostics only keep a since-start max). Stamp-based cross-check '
                  '(whole window): ' + '; '.join(
                      f"{name} p50 {_ms(p['tick_stamps'].get('jitter_p50_ms'), 2)} / p99 "
                      f"{_ms(p['tick_stamps'].get('jitter_p99_ms'), 2)} ms"
                      for name, p in phases.items()) + '.']
        train = [p for p in phases.values() if 'training_steps_per_s' in p]
        if train:
            lines.append(f"Training load: {_ms(train[0]['training_steps_per_s'], 2)} "
                         'Trainer steps/s (habc, SmallVLA, batch 16, 1 torch thread) during '
                         'its window.')
        lines.append('Phases: quiet = the loop alone (sim_robot, sync, policy with its '
                     'inference, arbiter, started by `habc launch bringup use_sim_time:=false`'
                     " with the bringup's nice levels and SCHED_FIFO requests); loaded = the "
                     'same plus a training process (nice 0) and one CPU hog (`python -c '
                     "'while 1: pass'`) on the 2 cores.")
        lines += ['', '## 2. Observation to command (policy/chunk)', '',
                  '| phase | chunks | chunks/s | obs->chunk p50 ms | p99 ms | max ms | '
                  'first action due->arrival p50 ms | p99 ms | first action late | '
                  'first action stale | actions past due on arrival (of 10) |',
                  '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
        for name, phase in phases.items():
            c = phase['chunks']
            lat, behind = c['obs_to_chunk_ms'], c['first_action_due_to_arrival_ms']
            lines.append(
                f"| {name} | {c['chunks']} | {_ms(c['chunks_per_s'])} | {_ms(lat['p50'])} | "
                f"{_ms(lat['p99'])} | {_ms(lat['max'])} | {_ms(behind['p50'])} | "
                f"{_ms(behind['p99'])} | {_ms(c['first_action_late_pct'], 0)}% | "
                f"{_ms(c['first_action_stale_pct'], 0)}% | "
                f"{_ms(c['actions_past_due_on_arrival_mean'], 2)} |")
        lines += ['',
                  'obs->chunk: wall-clock receipt of each policy/chunk in a separate listener '
                  'process minus its header stamp, which is the observation stamp (the '
                  'simulator stamps joint states and images after stepping and rendering). It '
                  'covers sim publish -> sync -> policy (waiting for the next inference '
                  'request, the newest observation only) -> inference -> chunk publish -> DDS '
                  "-> listener callback; the policy's executor holds the chunk slightly "
                  'before the listener does. first action due->arrival: receipt - (stamp + '
                  "20 ms), the first action's due time in ChunkExecutor; late: > 0 ms; "
                  f'stale: > {STALE_AFTER_S * 1e3:.0f} ms (stale_after_s = 0.75 period), the '
                  'executor no longer runs it; actions past due: of the 10 executed actions '
                  '(due at stamp + k * 20 ms, k = 1..10), those due before the receipt.']
    swaps = report['hot_swaps']
    if swaps:
        lines += ['', '## 3. Hot swap (PolicyUpdate -> active in policy_node)', '',
                  '| version | publish -> staged s | publish -> active s | '
                  'swap_gap_ticks | note |',
                  '|---:|---:|---:|---:|---|']
        for row in swaps:
            gap = row.get('swap_gap_ticks')
            lines.append(f"| {row['version']} | {_ms(row.get('publish_to_staged_s'), 2)} | "
                         f"{_ms(row.get('publish_to_active_s'), 2)} | "
                         f"{'-' if gap is None else gap} | {row.get('error', '')} |")
        lines += ['',
                  'Publish (LATCHED, file:// URI, sha256 of model.safetensors) -> receipt of '
                  'policy/status with staged_version (verified: hashed, loaded, one warm-up '
                  'inference on the loader thread) and with active_version (swapped at the '
                  'next chunk boundary). swap_gap_ticks: control ticks without an action '
                  "before the new version's first action (0 = seamless)."]
    images = report['image_transport']
    if images:
        lines += ['', '## 4. Image transport, 640x480 rgb8 at '
                  f"{meta['image_rate_hz']:g} Hz, two processes, SENSOR_DATA QoS "
                  '(best effort, depth 5)', '',
                  '| Fast DDS config | published | received | lost | p50 ms | p99 ms | max ms |',
                  '|---|---:|---:|---:|---:|---:|---:|']
        for row in images:
            lat = row['latency_ms']
            lines.append(f"| {row['profile']} | {row['published']} | {row['received']} | "
                         f"{row['lost']} | {_ms(lat['p50'], 2)} | {_ms(lat['p99'], 2)} | "
                         f"{_ms(lat['max'], 2)} |")
        lines += ['',
                  'Latency: subscriber callback time minus the header stamp, set just before '
                  'publish() (data assigned with arr.tobytes() before that); includes '
                  'serialization, transport, deserialization into a Python message and the '
                  'executor. Both runs keep ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST; the '
                  'second unsets FASTRTPS_DEFAULT_PROFILES_FILE and '
                  'FASTDDS_DEFAULT_PROFILES_FILE.']
    if report['errors']:
        lines += ['', '## Errors', ''] + [f'- {e}' for e in report['errors']]
    return '\n'.join(lines) + '\n'


def ingestion_ratios(path: Path) -> dict[str, Any] | None:
    """Return the loader's speed relative to a plain rosbags read, from bench_ingest's JSON."""
    if not path.is_file():
        return None
    try:
        rows = json.loads(path.read_text()).get('results', [])
    except (json.JSONDecodeError, AttributeError):
        return None
    plain = {(r.get('set'), r.get('cache')): r.get('mb_per_s') for r in rows
             if str(r.get('reader', '')).startswith('rosbags')}
    ratios = {}
    for row in rows:
        reference = plain.get((row.get('set'), row.get('cache')))
        if 'loader' in str(row.get('reader', '')) and reference and row.get('mb_per_s'):
            label = f"{row.get('set')} bags, {row.get('cache')} cache, {row.get('reader')}"
            if row.get('workers') is not None:
                label += f" ({row['workers']} worker(s))"
            ratios[label] = float(row['mb_per_s']) / float(reference)
    return {'source': str(path), 'ratios': ratios} if ratios else None


def plot(report: dict[str, Any], path: Path) -> None:
    """Tick periods, observation->chunk latency and image latency, one panel each."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    limit = 3.0  # ms either side of the period; farther ones go in the edge bins
    for name, phase in report['phases'].items():
        periods = phase['tick_stamps'].get('periods_ms', [])
        if periods:
            deviation = np.clip(np.asarray(periods) - PERIOD_S * 1e3, -limit, limit)
            p99 = phase['tick_stamps'].get('jitter_p99_ms', float('nan'))
            axes[0].hist(deviation, bins=np.linspace(-limit, limit, 121), alpha=0.6,
                         label=f'{name} (p99 |jitter| {p99:.2f} ms)')
        latency = np.sort(phase['chunks']['latencies_ms'])
        if latency.size:
            axes[1].plot(latency, np.arange(1, latency.size + 1) / latency.size, label=name)
    for goal, style in ((1.0, ':'), (2.0, '--')):
        for sign in (-1, 1):
            axes[0].axvline(sign * goal, color='k', ls=style, lw=0.8,
                            label=f'goal p99 {goal:g} ms ({"quiet" if goal == 1 else "loaded"})'
                            if sign > 0 else None)
    axes[0].set_yscale('log')
    axes[0].set_xlabel(f'arbiter tick period - {PERIOD_S * 1e3:g} ms (ms; beyond +-{limit:g} '
                       'in the edge bins)')
    axes[0].set_ylabel('ticks')
    axes[0].set_title('control tick jitter (50 Hz, steady clock)')
    axes[1].axvline(PERIOD_S * 1e3, color='tab:orange', ls='--', lw=0.8,
                    label='first action due')
    axes[1].axvline((PERIOD_S + STALE_AFTER_S) * 1e3, color='tab:red', ls='--', lw=0.8,
                    label='first action stale')
    axes[1].set_xlabel('observation stamp -> chunk receipt (ms)')
    axes[1].set_title('observation to command')
    for row in report['image_transport']:
        latency = np.sort(row['latencies_ms'])
        if latency.size:
            label = 'shipped profile' if row['profile'].endswith('.xml') else 'Fast DDS defaults'
            axes[2].plot(latency, np.arange(1, latency.size + 1) / latency.size, label=label)
    axes[2].set_xlabel('640x480 rgb8 image latency (ms)')
    axes[2].set_title('image transport, two processes')
    for ax in axes[1:]:
        ax.set_ylabel('fraction')
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# Main -----------------------------------------------------------------------------------


def run_loop(args: argparse.Namespace, tmp: Path, domain_id: int,
             report: dict[str, Any]) -> None:
    """Phases 1, 2 and 4 of the module docstring on one bringup (hot swap last)."""
    import rclpy
    from rclpy.signals import SignalHandlerOptions

    versions = [1] + list(range(2, 2 + args.swaps))
    checkpoints: dict[int, tuple[str, Path]] = {}
    for version in versions:
        directory = tmp / f'v{version}'
        checkpoints[version] = (save_checkpoint(directory, str(version), seed=version),
                                directory.resolve())
    windows = [w for w in (args.idle_window, args.window) if w > 0]
    jitter_window = max(10, int(min(windows) / PERIOD_S * 0.9))
    report['meta']['jitter_window'] = jitter_window
    params = write_params(tmp / 'params.yaml', checkpoints[1][1], jitter_window)
    env = ros_environment(domain_id)
    say(f'starting the bringup (ROS_DOMAIN_ID={domain_id}, namespace '
          f'{NAMESPACE}; log {tmp / "launch.log"})')
    launcher = Child([sys.executable, '-m', 'habc.cli', 'launch', 'bringup',
                      f'namespace:={NAMESPACE}', 'use_learner:=false',
                      'use_scripted_operator:=false', 'use_recorder:=false',
                      # The steady clock, as on a robot: every node ticks on wall time.
                      'use_sim_time:=false', f'params_file:={params}'], env,
                     log=tmp / 'launch.log')
    os.environ.update({'ROS_DOMAIN_ID': str(domain_id),
                       'ROS_AUTOMATIC_DISCOVERY_RANGE': 'LOCALHOST'})
    # Ctrl-C reaches this loop as KeyboardInterrupt; rclpy's signal thread would race the
    # monitor executor's shutdown (habc_common.node_main.StopRequest says how).
    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    monitor = None
    trainer = None
    try:
        monitor = Monitor(NAMESPACE)
        started = time.monotonic()
        wait_for(lambda: monitor.chunks and monitor.diagnostics
                 and monitor.diagnostics[-1][1].get('source') == 'POLICY',
                 args.startup_timeout, 'policy chunks and the arbiter executing POLICY',
                 launcher)
        report['meta']['bringup_ready_s'] = time.monotonic() - started
        say(f'loop running after {time.monotonic() - started:.0f} s')
        time.sleep(2.0)
        if args.idle_window > 0:
            say(f'quiet (the loop and its inference only): {args.idle_window:g} s')
            report['phases']['quiet'] = measure_phase(monitor, args.idle_window, launcher)
        if args.window > 0:
            trainer = Child([sys.executable, str(Path(__file__).resolve()), '--role', 'train'],
                            env, log=tmp / 'train.log')
            hog = Child([sys.executable, '-c', 'while 1: pass'], env)
            wait_for(lambda: any(line.startswith('steps ') for _, line in trainer.lines),
                     90.0, 'the training load to run its first steps')
            say(f'loaded (training + inference + one CPU hog): {args.window:g} s')
            try:
                report['phases']['loaded'] = measure_phase(
                    monitor, args.window, launcher, trainer)
            finally:
                hog.stop(signal.SIGKILL, timeout=15.0)
            trainer.stop(signal.SIGTERM, timeout=15.0)
            trainer = None
        if args.swaps > 0:
            time.sleep(1.0)
            say(f'hot swaps: versions {versions[1:]}')
            report['hot_swaps'] = hot_swaps(
                monitor, [(v, *checkpoints[v]) for v in versions[1:]])
    finally:
        if trainer is not None:
            trainer.stop(signal.SIGTERM, timeout=15.0)
        say('stopping the bringup')
        code = launcher.stop(signal.SIGINT, timeout=40.0)
        if code not in (0, None):
            report['errors'].append(f'the bringup exited with code {code} at shutdown; '
                                    f'its last lines:\n{launcher.tail(20)}')
        say('bringup stopped')
        if monitor is not None:
            monitor.close()
        if rclpy.ok():
            rclpy.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog='Runs the loop in ROS domain --domain-id and namespace bench_loop, so other '
        'loops on this machine are not disturbed. Takes about 3 minutes with the defaults.')
    parser.add_argument('--window', type=float, default=60.0, metavar='S',
                        help='seconds measured under load: a training process and one CPU '
                        'hog beside the loop (0: skip)')
    parser.add_argument('--idle-window', type=float, default=60.0, metavar='S',
                        help='seconds measured quiet: the loop and its inference only '
                        '(0: skip)')
    parser.add_argument('--swaps', type=int, default=3,
                        help='hot swaps to versions 2, 3, ... (0: skip)')
    parser.add_argument('--image-seconds', type=float, default=10.0, metavar='S',
                        help='seconds of images per Fast DDS configuration (0: skip)')
    parser.add_argument('--image-rate', type=float, default=30.0, metavar='HZ')
    parser.add_argument('--startup-timeout', type=float, default=120.0, metavar='S')
    parser.add_argument('--domain-id', type=int, default=150 + os.getpid() % 50,
                        help='ROS_DOMAIN_ID of every process (default 150-199, by pid)')
    parser.add_argument('--out', type=Path, default=Path('benchmarks/results'))
    parser.add_argument('--role', choices=['train', 'image-pub', 'image-sub'],
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    # The hard rule of this project, for this process and every child: DDS on loopback.
    os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    if args.role == 'train':
        run_training_load()
        return
    if args.role == 'image-pub':
        run_image_publisher(args.image_seconds, args.image_rate)
        return
    if args.role == 'image-sub':
        run_image_subscriber(args.image_seconds)
        return

    from habc_common.ros_env import apply_project_defaults
    apply_project_defaults()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    report: dict[str, Any] = {
        'meta': {'started': time.strftime('%Y-%m-%d %H:%M:%S'), 'cores': os.cpu_count(),
                 'cpu': platform.processor() or platform.machine(),
                 'load_average_start': load_average(), 'domain_id': args.domain_id,
                 'model': {'type': 'SmallVLA', **VLA_SIZE, 'trained': False},
                 'control_rate_hz': 1.0 / PERIOD_S, 'image_rate_hz': args.image_rate},
        'phases': {}, 'hot_swaps': [], 'image_transport': [], 'errors': []}
    say(f"load average at start: {report['meta']['load_average_start']}")
    with tempfile.TemporaryDirectory(prefix='bench_loop_') as name:
        tmp = Path(name)
        if args.window > 0 or args.idle_window > 0 or args.swaps > 0:
            try:
                run_loop(args, tmp, args.domain_id, report)
            except RuntimeError as exc:
                report['errors'].append(str(exc))
                say(f'error: {exc}')
        if args.image_seconds > 0:
            for profile in (True, False):
                say('image transport, '
                    + ('shipped profile' if profile else 'Fast DDS defaults'))
                try:
                    report['image_transport'].append(image_transport(
                        args.domain_id, args.image_seconds, args.image_rate, profile, tmp))
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    report['errors'].append(str(exc))
    report['ingestion'] = ingestion_ratios(args.out / 'bag_ingestion.json')
    report['meta']['load_average_end'] = load_average()
    report['meta']['total_s'] = time.monotonic() - start
    text = markdown(report)
    (args.out / 'loop_latency.json').write_text(json.dumps(finite(report), indent=1) + '\n')
    (args.out / 'loop_latency.md').write_text(text)
    plot(report, args.out / 'loop_latency.png')
    print(text)
    print(f'wrote {args.out}/loop_latency.{{json,md,png}}')


if __name__ == '__main__':
    main()
