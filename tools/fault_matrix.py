#!/usr/bin/env python3
"""Fault-injection run: the habc loop on the simulated robot while its nodes fail in turn.

The nodes of config/bringup.yaml run as separate processes under this tool (the same
commands `habc launch bringup` runs), with `habc demo`'s parameters, so each can be killed
and restarted on its own. In turn, mid-episode:

1. every node is killed with SIGKILL and restarted: sim_robot, sync, policy,
   teleop_arbiter, episode_recorder, scripted_operator, learner;
2. the disk fills up while recording: the recorder's storage is a small tmpfs (needs
   root; reported as not run otherwise) that is shrunk to what is used plus a few MB, then
   given space again;
3. the clock jumps: /clock (the simulated time every node follows) is published 5 s back,
   then 5 s ahead.

After each fault it measures what the robot was commanded (forward_position_controller/
commands): how many commands still moved it after the fault, and whether the loop came
back (an episode recorded and labelled after it). At the end it checks the episode index
and the learner's state: every labelled episode's bag is readable or marked incomplete, no
episode is counted twice, and the learner went on training after its restart.

    . env.sh && python tools/fault_matrix.py --checkpoint runs/demo/sft \
        --out benchmarks/results/fault_matrix

Writes fault_matrix.json and fault_matrix.md (a table: fault, what held, what was lost).
"""

import argparse
from collections import Counter
import json
import os
from pathlib import Path
import signal
import subprocess
import sys
import threading
import time

from loop_runs import run_folders
import yaml

ROOT = Path(__file__).resolve().parents[1]
NODE_ORDER = ('sim_robot', 'sync', 'policy', 'teleop_arbiter', 'episode_recorder',
              'scripted_operator', 'learner')
# A command is a move when any joint target changes by more than this (rad).
MOVE_EPS = 1e-6


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--checkpoint', type=Path, default=ROOT / 'runs' / 'demo' / 'sft')
    parser.add_argument('--out', type=Path,
                        default=ROOT / 'benchmarks' / 'results' / 'fault_matrix')
    parser.add_argument('--run-dir', type=Path, default=ROOT / 'runs' / 'fault_matrix')
    parser.add_argument('--recover-timeout-s', type=float, default=300.0,
                        help='how long the loop may take to record a labelled episode after '
                        'a fault')
    parser.add_argument('--nodes', nargs='*', default=list(NODE_ORDER),
                        help='nodes to kill, in order')
    parser.add_argument('--skip-disk', action='store_true')
    parser.add_argument('--skip-clock', action='store_true')
    return parser.parse_args()


class Monitor:
    """What the loop publishes, as seen from outside (rclpy in a background thread)."""

    def __init__(self) -> None:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from rosgraph_msgs.msg import Clock
        from std_msgs.msg import Float64MultiArray, String

        from habc_common.qos import COMMANDS, LATCHED
        from habc_common.ros_env import apply_project_defaults
        from habc_msgs.msg import EpisodeEvent, InterventionState

        apply_project_defaults()  # loopback-only DDS unless opened on purpose
        rclpy.init()
        self.node = rclpy.create_node('fault_matrix_monitor')
        self.lock = threading.Lock()
        self.events: list[tuple[float, str, int]] = []
        self.commands: list[tuple[float, tuple[float, ...]]] = []
        self.learner: dict = {}
        self.clock_ns = 0
        self.source = -1  # the arbiter's executed source (InterventionState) of the last tick
        node = self.node
        node.create_subscription(EpisodeEvent, '/recorder/events', self._on_event, COMMANDS)
        node.create_subscription(Float64MultiArray, '/forward_position_controller/commands',
                                 self._on_command, COMMANDS)
        node.create_subscription(String, '/learner/status', self._on_learner, LATCHED)
        node.create_subscription(InterventionState, '/intervention', self._on_intervention,
                                 COMMANDS)
        node.create_subscription(Clock, '/clock', self._on_clock, 10)
        self.clock = node.create_publisher(Clock, '/clock', 10)
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def _on_event(self, msg) -> None:
        with self.lock:
            self.events.append((time.monotonic(), msg.episode_id, msg.event))

    def _on_command(self, msg) -> None:
        with self.lock:
            self.commands.append((time.monotonic(), tuple(msg.data), self.source))

    def _on_intervention(self, msg) -> None:
        self.source = msg.source

    def _on_learner(self, msg) -> None:
        with self.lock:
            self.learner = json.loads(msg.data)

    def _on_clock(self, msg) -> None:
        self.clock_ns = msg.clock.sec * 1_000_000_000 + msg.clock.nanosec

    def episode_running(self) -> bool:
        with self.lock:
            last = {}
            for _, episode, event in self.events:
                if event in (0, 1):
                    last[episode] = event
        return any(event == 0 for event in last.values())

    def labelled_after(self, since: float) -> int:
        """Count the episodes that started after `since` and have been labelled since."""
        with self.lock:
            started = {episode for t, episode, event in self.events
                       if t > since and event == 0}
            return len({episode for t, episode, event in self.events
                        if event == 2 and episode in started})

    def moves_after(self, since: float, until: float) -> tuple[int, int]:
        """Count the commands in (since, until] that moved the robot's target.

        Returns (moves while the policy's commands were executed, moves in all): a human
        who took over may drive on; the policy must not, once its inputs are gone.
        """
        with self.lock:
            commands = [c for c in self.commands if c[0] <= until]
        policy = every = 0
        previous = None
        for stamp, values, source in commands:
            if previous is not None and stamp > since and any(
                    abs(a - b) > MOVE_EPS for a, b in zip(values, previous, strict=False)):
                every += 1
                policy += source == 0  # InterventionState.SOURCE_POLICY
            previous = values
        return policy, every

    def close(self) -> None:
        import rclpy
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.shutdown()


class Loop:
    """The bringup's nodes, one subprocess each, with their logs under the run folder."""

    def __init__(self, params: Path, logs: Path) -> None:
        from habc.bringup import (
            description_path,
            find_executable,
            load_description,
            resolve,
            ros_arguments,
        )

        self.nodes = {n.name: n for n in resolve(load_description(description_path('bringup')),
                                                 {'params_file': str(params)})}
        self.commands = {name: [str(find_executable(n.package, n.executable)),
                                *ros_arguments(n)] for name, n in self.nodes.items()}
        self.logs = logs
        self.processes: dict[str, subprocess.Popen] = {}
        self.starts: Counter = Counter()

    def start(self, name: str) -> None:
        self.starts[name] += 1
        log = (self.logs / f'{name}.{self.starts[name]}.log').open('w')
        self.processes[name] = subprocess.Popen(
            self.commands[name], stdout=log, stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED='1'))

    def kill(self, name: str) -> None:
        process = self.processes[name]
        process.send_signal(signal.SIGKILL)
        process.wait()

    def exited(self) -> list[str]:
        return [name for name, p in self.processes.items() if p.poll() is not None]

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for process in self.processes.values():
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


def wait_for(predicate, timeout: float, loop: Loop | None = None) -> float | None:
    """Return the seconds until predicate() held, or None after `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.2)
    return None


def fault_row(monitor: Monitor, loop: Loop, fault: str, inject, restore, args,
              back=None) -> dict:
    """Inject a fault mid-episode, restore, and measure what held.

    back: what counts as the loop being back (default: an episode started after the
    restore has been recorded and labelled).
    """
    running = wait_for(monitor.episode_running, args.recover_timeout_s)
    time.sleep(1.5)  # well into the episode
    at = time.monotonic()
    detail = inject() or ''
    time.sleep(2.0)
    policy_moves, moves = monitor.moves_after(at, at + 2.0)
    restore()
    restored = time.monotonic()
    back = back or (lambda: monitor.labelled_after(restored) >= 1)
    recovered = wait_for(back, args.recover_timeout_s)
    row = {'fault': fault, 'mid_episode': running is not None,
           'policy_moves_after_fault_2s': policy_moves, 'moves_after_fault_2s': moves,
           'recovered_s': recovered,
           'exited': loop.exited(), 'detail': detail}
    back = f'recovered in {recovered:.0f} s' if recovered is not None else 'NOT recovered'
    print(f'[fault matrix] {fault}: {policy_moves} moving policy commands ({moves} in all) '
          f'in the 2 s after it; {back}'
          f'{"; " + detail if detail else ""}', flush=True)
    return row


def main() -> int:
    from habc.demo import DemoConfig, write_params

    args = parse_args()
    checkpoint, run_dir = run_folders('fault matrix', args.checkpoint, args.run_dir)
    (run_dir / 'logs').mkdir(parents=True)
    storage = run_dir / 'episodes'
    storage.mkdir()
    mounted = not args.skip_disk and subprocess.run(
        ['mount', '-t', 'tmpfs', '-o', 'size=4g', 'tmpfs', str(storage)],
        capture_output=True).returncode == 0
    params_path = write_params(DemoConfig(out=run_dir), checkpoint, run_dir)
    params = yaml.safe_load(params_path.read_text())
    params['/**/learner']['ros__parameters'].update(episodes_per_round=2, steps_per_round=20,
                                                    max_episodes=8)
    params['/**/scripted_operator']['ros__parameters']['max_steps'] = 150
    params['/**/sim_robot']['ros__parameters']['max_steps'] = 150
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))

    monitor = Monitor()
    loop = Loop(params_path, run_dir / 'logs')
    rows = []
    try:
        for name in loop.nodes:
            loop.start(name)
        if wait_for(lambda: monitor.labelled_after(0) >= 1, args.recover_timeout_s) is None:
            print('fault matrix: the loop recorded no labelled episode; see '
                  f'{run_dir / "logs"}', file=sys.stderr)
            return 1
        learner_before = None
        for name in args.nodes:
            back = None
            if name == 'learner':
                # Back when it trained a round after its restart (it resumes from work_dir).
                learner_before = monitor.learner.get('round') or 0
                back = lambda before=learner_before: (  # noqa: E731
                    (monitor.learner.get('round') or 0) > before)
            rows.append(fault_row(monitor, loop, f'SIGKILL {name}',
                                  lambda n=name: loop.kill(n), lambda n=name: loop.start(n),
                                  args, back))
        if mounted:
            def fill() -> str:
                used = int(subprocess.run(['du', '-sm', str(storage)], capture_output=True,
                                          text=True).stdout.split()[0])
                subprocess.run(['mount', '-o', f'remount,size={used + 4}m', str(storage)],
                               check=True)
                time.sleep(20.0)  # recording goes on until the disk is full
                return f'storage shrunk to {used + 4} MB ({used} MB used)'
            rows.append(fault_row(monitor, loop, 'disk full while recording', fill,
                                  lambda: subprocess.run(['mount', '-o', 'remount,size=4g',
                                                          str(storage)], check=True), args))
        else:
            rows.append({'fault': 'disk full while recording', 'not_run': True,
                         'detail': 'skipped' if args.skip_disk else 'cannot mount a tmpfs '
                         '(needs root)'})
        if not args.skip_clock:
            from rosgraph_msgs.msg import Clock

            def jump() -> str:
                for offset in (-5_000_000_000, 5_000_000_000):
                    target = monitor.clock_ns + offset
                    msg = Clock()
                    msg.clock.sec, msg.clock.nanosec = divmod(target, 1_000_000_000)
                    monitor.clock.publish(msg)
                    time.sleep(0.5)
                return '/clock published 5 s back, then 5 s ahead of the simulation'
            rows.append(fault_row(monitor, loop, 'clock jump', jump, lambda: None, args))
        learner_after = monitor.learner.get('round')
    finally:
        loop.stop()
        monitor.close()

    checks = final_checks(run_dir, storage, learner_before, learner_after)
    if mounted:
        # Copy the index and bags off the tmpfs before it goes.
        subprocess.run(['cp', '-a', str(storage), str(run_dir / 'episodes_copy')], check=False)
        subprocess.run(['umount', str(storage)], check=False)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {'command': 'python tools/fault_matrix.py ' + ' '.join(sys.argv[1:]),
              'rows': rows, 'checks': checks, 'node_starts': dict(loop.starts)}
    (args.out / 'fault_matrix.json').write_text(json.dumps(result, indent=1))
    text = table(result)
    (args.out / 'fault_matrix.md').write_text(text)
    print(text)
    return 0 if checks['ok'] and all(r.get('recovered_s') is not None or r.get('not_run')
                                     for r in rows) else 1


def final_checks(run_dir: Path, storage: Path, learner_before, learner_after) -> dict:
    """Return what was lost or counted twice, from the index and the learner's state."""
    from habc_episodes.dataset import read_index
    from habc_episodes.episode_bags import episode_from_bag
    from habc_learner.learner import STATE_FILE

    records = read_index(storage / 'episodes.sqlite')
    statuses = Counter(r.status for r in records)
    labelled = [r for r in records if r.outcome]
    unreadable, empty = [], []
    for record in labelled:
        if record.status != 'complete':
            continue
        bag = Path(record.bag_path)
        bag = bag if bag.is_absolute() else storage / bag
        try:
            episode_from_bag(bag, record.outcome, with_images=False)
        except Exception as exc:  # noqa: BLE001 - every failure is what the table reports
            # A bag that reads but holds no executed step recorded an episode in which the
            # robot was never commanded (the arbiter sends nothing before the policy's first
            # command): nothing was lost. Anything else is a damaged bag.
            text = f'{record.episode_id}: {type(exc).__name__}: {exc}'
            (empty if 'has no messages' in str(exc) and record.num_steps == 0
             else unreadable).append(text)
    state_file = run_dir / 'learner' / STATE_FILE
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    learner_ids = [item['episode_id'] for item in state.get('episodes', [])]
    trainable = {r.episode_id for r in records if r.trainable}
    counted_twice = sorted(i for i, n in Counter(learner_ids).items() if n > 1)
    unknown = sorted(set(learner_ids) - trainable)
    checks = {'episodes': len(records), 'statuses': dict(statuses), 'labelled': len(labelled),
              'labelled_unreadable': unreadable, 'labelled_without_steps': empty,
              'learner_episodes': len(learner_ids),
              'learner_counted_twice': counted_twice, 'learner_not_trainable': unknown,
              'learner_round_before_kill': learner_before,
              'learner_round_at_end': learner_after,
              'learner_resumed': (learner_before is not None and learner_after is not None
                                  and learner_after > learner_before)}
    checks['ok'] = not unreadable and not counted_twice and not unknown and \
        checks['learner_resumed']
    return checks


def table(result: dict) -> str:
    lines = ['# Fault matrix: the habc loop on the simulated robot', '',
             f'Command: `{result["command"]}`', '',
             'Moving commands: commands to the robot in the 2 s after the fault that changed '
             "its target; 'policy' counts those executed from the policy (the arbiter's "
             'source), the rest came from the scripted human who may have taken over. A fault '
             'on the control path (sim, sync, policy, arbiter) should stop the policy moving '
             'the robot within a few ticks (the arbiter holds once the policy command is '
             '0.2 s old); one elsewhere (recorder, operator, learner, clock) lets it go on.',
             '',
             '| fault | mid-episode | moving commands in the 2 s after: policy / all | loop '
             'back: an episode started after the restart, recorded and labelled (learner: a '
             'round) | nodes exited at the end of the phase | note |',
             '|---|---|---|---|---|---|']
    for row in result['rows']:
        if row.get('not_run'):
            lines.append(f'| {row["fault"]} | - | - | not run | - | {row["detail"]} |')
            continue
        back = (f'{row["recovered_s"]:.0f} s' if row['recovered_s'] is not None
                else 'NOT within the timeout')
        lines.append(f'| {row["fault"]} | {"yes" if row["mid_episode"] else "no"} | '
                     f'{row["policy_moves_after_fault_2s"]} / {row["moves_after_fault_2s"]} '
                     f'| {back} | '
                     f'{", ".join(row["exited"]) or "-"} | {row["detail"] or "-"} |')
    c = result['checks']
    lines += ['', '## What was lost', '',
              f'- Episodes in the index: {c["episodes"]} ({c["statuses"]}); labelled: '
              f'{c["labelled"]}.',
              f'- Labelled complete episodes whose bag does not read: '
              f'{len(c["labelled_unreadable"])} {c["labelled_unreadable"] or ""}'.rstrip(),
              f'- Labelled episodes in which the robot was never commanded (an empty bag, '
              f'nothing lost): {len(c["labelled_without_steps"])}.',
              f'- Learner: {c["learner_episodes"]} episodes in its buffer state; counted twice: '
              f'{c["learner_counted_twice"] or "none"}; not trainable in the index: '
              f'{c["learner_not_trainable"] or "none"}.',
              f'- Learner round before its kill: {c["learner_round_before_kill"]}, at the end: '
              f'{c["learner_round_at_end"]} (resumed: {c["learner_resumed"]}).',
              f'- Verdict: {"nothing lost" if c["ok"] else "SOMETHING WAS LOST (above)"}.']
    return '\n'.join(lines) + '\n'


if __name__ == '__main__':
    sys.exit(main())
