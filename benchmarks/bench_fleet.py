#!/usr/bin/env python3
"""Fleet throughput: episodes per hour and learner round time for 1, 2 and 4 simulated robots.

For each fleet size N it starts `habc launch fleet robots:=N` (N robot stacks of six
processes each and one learner) in a ROS domain of its own on loopback, with an untrained
SmallVLA of the demo's size (96 px, one camera, hidden 128) as every robot's policy, the
scripted operator running episodes back to back (300 ticks each, at most 50 Hz on each
robot's simulated clock), and the learner's shipped defaults (2 episodes per round, 200
steps, batch 64). After a warm-up in which every robot finished one episode, it measures
over a fixed window:

- episodes finished per hour, per robot and in total (from the robots' episode indices);
- the learner's round time (`round/seconds` of every PolicyUpdate in the window) and rounds;
  when no round ends in the window (the learner yields the CPU to the robots: nice 10), the
  robots run on until the first one ends (up to ROUND_GUARD_S) and its time is reported,
  marked as ended after the window;
- the machine's load: the 1-minute load average and the CPU busy share (/proc/stat),
  sampled every 5 s. All N robots and the learner share this machine's cores.

Writes fleet.{json,md,png} under --out and prints the table.

    python benchmarks/bench_fleet.py [--robots 1 2 4] [--window 300] [--out DIR]
"""

import argparse
import json
import os
from pathlib import Path
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import yaml

from habc_common.ros_env import apply_project_defaults

ROOT = Path(__file__).resolve().parents[1]
DOMAIN_ID = 77
SAMPLE_S = 5.0
# Guards against a hang (a fleet that never finishes an episode), not timing requirements.
WARMUP_GUARD_S = 900.0
ROUND_GUARD_S = 1800.0
STOP_GRACE_S = 60.0


def say(text: str) -> None:
    print(f'[bench_fleet] {text}', flush=True)


def cpu_times() -> tuple[float, float]:
    """Return (busy, total) jiffies of all CPUs."""
    fields = [float(v) for v in Path('/proc/stat').read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def save_policy(directory: Path) -> None:
    import torch

    from habc_policy.models.vla import SmallVLA, SmallVLAConfig
    torch.manual_seed(0)
    policy = SmallVLA(SmallVLAConfig(state_dim=14, action_dim=14, horizon=20, num_views=1,
                                     image_size=96, hidden_dim=128, num_layers=2,
                                     action_head='l2'))
    policy.version = '1'
    policy.save(directory)


class UpdateListener:
    """Collects every PolicyUpdate's metrics with the time it arrived (own rclpy context)."""

    def __init__(self) -> None:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.signals import SignalHandlerOptions

        from habc_common.qos import LATCHED
        from habc_msgs.msg import PolicyUpdate
        self.context = rclpy.Context()
        # No rclpy signal thread: it races the executor's shutdown (node_main.StopRequest).
        rclpy.init(context=self.context, signal_handler_options=SignalHandlerOptions.NO)
        self.node = rclpy.create_node('bench_fleet', context=self.context)
        self.updates: list[tuple[float, dict[str, str]]] = []
        self.node.create_subscription(
            PolicyUpdate, '/policy/update',
            lambda m: self.updates.append((time.time(), {kv.key: kv.value
                                                         for kv in m.metrics})), LATCHED)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()
        self.context.try_shutdown()


def ended_episodes(storage: Path) -> list[tuple[str, float, int]]:
    """(robot, ended_at, steps) of every finished episode in the fleet's stores."""
    from habc_episodes.index import EpisodeIndex
    out = []
    for path in sorted(storage.glob('*/episodes.sqlite')):
        try:
            with EpisodeIndex(path, read_only=True) as index:
                out += [(r.robot, r.ended_at, r.num_steps) for r in index.list()
                        if r.ended_at is not None]
        except FileNotFoundError:  # that robot's recorder is still creating its index
            continue
    return out


def run_fleet(robots: int, window_s: float, work: Path) -> dict:
    """Run a fleet of `robots` for the warm-up and the window; return its measurements."""
    checkpoint = work / 'sft'
    if not checkpoint.is_dir():
        save_policy(checkpoint)
    run = work / f'robots{robots}'
    storage = run / 'fleet'
    params = run / 'params.yaml'
    run.mkdir(parents=True)
    params.write_text(yaml.safe_dump({k: {'ros__parameters': v} for k, v in {
        '/**/sim_robot': {'image_size': 96},
        '/**/scripted_operator': {'episodes': 0},
        '/**/learner': {'work_dir': str(run / 'learner'),
                        'signing_key': str(run / 'keys' / 'learner.key')},
    }.items()}))
    env = dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST',
               ROS_DOMAIN_ID=str(DOMAIN_ID), PYTHONUNBUFFERED='1')
    log = open(run / 'launch.log', 'w')
    launcher = subprocess.Popen(
        [sys.executable, '-m', 'habc.cli', 'launch', 'fleet', '--grace', str(STOP_GRACE_S),
         f'robots:={robots}', f'storage_root:={storage}', f'checkpoint:={checkpoint}',
         f'params_file:={params}'],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    os.environ['ROS_DOMAIN_ID'] = str(DOMAIN_ID)
    listener = UpdateListener()
    try:
        started = time.time()
        say(f'{robots} robot(s): warming up until every robot finished an episode')
        while len({robot for robot, _, _ in ended_episodes(storage)}) < robots:
            if launcher.poll() is not None:
                raise RuntimeError(f'the fleet exited ({launcher.returncode}); see {log.name}')
            if time.time() - started > WARMUP_GUARD_S:
                raise RuntimeError(f'no episode from every robot in {WARMUP_GUARD_S} s; see '
                                   f'{log.name}')
            time.sleep(1.0)
        warmup_s = time.time() - started
        say(f'{robots} robot(s): warm after {warmup_s:.0f} s; measuring {window_s:.0f} s')
        t0, (busy0, total0) = time.time(), cpu_times()
        loads, busy = [], []
        last = (busy0, total0)
        while time.time() - t0 < window_s:
            time.sleep(SAMPLE_S)
            now = cpu_times()
            busy.append((now[0] - last[0]) / max(now[1] - last[1], 1.0))
            last = now
            loads.append(os.getloadavg()[0])
            if launcher.poll() is not None:
                raise RuntimeError(f'the fleet exited ({launcher.returncode}); see {log.name}')
        t1 = time.time()
        episodes = [(robot, end, steps) for robot, end, steps in ended_episodes(storage)
                    if t0 <= end <= t1]
        rounds = [float(m['round/seconds']) for t, m in listener.updates
                  if t0 <= t <= t1 and 'round/seconds' in m]
        late = not rounds
        if late:
            say(f'{robots} robot(s): no learner round ended in the window; the robots run on '
                'until one does')
            while not any(t > t0 and 'round/seconds' in m for t, m in listener.updates):
                if time.time() - t1 > ROUND_GUARD_S or launcher.poll() is not None:
                    break
                time.sleep(1.0)
            rounds = [float(m['round/seconds']) for t, m in listener.updates
                      if t > t0 and 'round/seconds' in m][:1]
    finally:
        listener.close()
        launcher.send_signal(signal.SIGINT)
        try:
            launcher.wait(timeout=3 * STOP_GRACE_S + 30)
        except subprocess.TimeoutExpired:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
        log.close()
    hours = (t1 - t0) / 3600.0
    per_robot = {f'robot{i}': sum(r == f'robot{i}' for r, _, _ in episodes) / hours
                 for i in range(1, robots + 1)}
    return {'robots': robots, 'window_s': t1 - t0, 'warmup_s': warmup_s,
            'episodes': len(episodes), 'episodes_per_hour': len(episodes) / hours,
            'episodes_per_hour_per_robot': per_robot,
            'steps_per_episode': float(np.mean([n for _, _, n in episodes])) if episodes
            else None,
            'rounds': 0 if late else len(rounds), 'round_after_window': late,
            'round_seconds_mean': float(np.mean(rounds)) if rounds else None,
            'round_seconds_max': float(np.max(rounds)) if rounds else None,
            'load_average_mean': float(np.mean(loads)), 'cpu_busy_mean': float(np.mean(busy)),
            'processes': 6 * robots + 1}


def table(results: list[dict]) -> str:
    lines = ['| robots | processes | episodes/h (total) | episodes/h per robot | steps per '
             'episode | learner rounds in window | round time mean / max (s) | load avg '
             '(1 min) | CPU busy |',
             '|---|---|---|---|---|---|---|---|---|']
    for r in results:
        per = ', '.join(f'{v:.0f}' for v in r['episodes_per_hour_per_robot'].values())
        round_time = ('-' if r['round_seconds_mean'] is None else
                      f'{r["round_seconds_mean"]:.1f} / {r["round_seconds_max"]:.1f}')
        if r['round_after_window'] and r['round_seconds_mean'] is not None:
            round_time += ' (the first round, ended after the window)'
        steps = '-' if r['steps_per_episode'] is None else f'{r["steps_per_episode"]:.0f}'
        lines.append(f'| {r["robots"]} | {r["processes"]} | {r["episodes_per_hour"]:.0f} '
                     f'({r["episodes"]} in {r["window_s"]:.0f} s) | {per} | {steps} | '
                     f'{r["rounds"]} | {round_time} | {r["load_average_mean"]:.2f} | '
                     f'{100 * r["cpu_busy_mean"]:.0f}% |')
    return '\n'.join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    robots = [r['robots'] for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(robots, [r['episodes_per_hour'] for r in results], 'o-', label='total')
    left.plot(robots, [np.mean(list(r['episodes_per_hour_per_robot'].values()))
                       for r in results], 's--', label='per robot')
    left.set(xlabel='simulated robots', ylabel='episodes per hour', xticks=robots,
             title='Episodes per hour (2 cores shared)')
    left.legend()
    means = [r['round_seconds_mean'] or 0.0 for r in results]
    right.bar([str(n) for n in robots], means, color='tab:orange')
    right.set(xlabel='simulated robots', ylabel='learner round time (s)',
              title='Learner round (200 steps, batch 64)', ylim=(0, 1.2 * max(means + [1.0])))
    for x, r in enumerate(results):
        label = f'load {r["load_average_mean"]:.1f}' if r['round_seconds_mean'] else 'no round'
        right.annotate(label, (x, means[x]), xytext=(0, 3), textcoords='offset points',
                       ha='center', va='bottom')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog='\n'.join(__doc__.splitlines()[2:]))
    parser.add_argument('--robots', type=int, nargs='+', default=[1, 2, 4])
    parser.add_argument('--window', type=float, default=300.0, metavar='S',
                        help='measurement window per fleet size after the warm-up (300)')
    parser.add_argument('--out', type=Path, default=ROOT / 'benchmarks' / 'results' / 'fleet')
    args = parser.parse_args()
    apply_project_defaults()  # loopback DDS for this process's rclpy and every child
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(prefix='bench_fleet_') as scratch:
        for robots in args.robots:
            results.append(run_fleet(robots, args.window, Path(scratch)))
            say(json.dumps(results[-1]))
    report = {'machine': {'cpus': os.cpu_count(), 'platform': platform.platform()},
              'command': ' '.join(['python', 'benchmarks/bench_fleet.py', *sys.argv[1:]]),
              'results': results}
    (args.out / 'fleet.json').write_text(json.dumps(report, indent=1) + '\n')
    text = table(results)
    (args.out / 'fleet.md').write_text(
        f'# Fleet throughput on {os.cpu_count()} CPUs\n\n`{report["command"]}`\n\n{text}\n')
    plot(results, args.out / 'fleet.png')
    print(text)


if __name__ == '__main__':
    main()
