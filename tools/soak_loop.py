#!/usr/bin/env python3
"""Soak run: the whole habc loop for a long time, every node's resources sampled each minute.

Starts `habc launch bringup` on the simulated robot with `habc demo`'s parameters (episodes
run until the soak ends, the learner trains a round every few episodes), then samples each
node's resident memory, open file descriptors and threads every --sample-s seconds. A node
that exits, or a growth trend after the warm-up, fails the run:

- file descriptors or threads: the last third of the samples averages more than
  --max-fd-growth / --max-thread-growth above the first third (a handle or thread leak);
- memory: a least-squares slope above --max-rss-mb-per-10min over the samples after the
  warm-up, and more than 5% growth between the first and the last third.

The learner's buffer grows with every episode by design; `--max-episodes` bounds it
(learner parameter max_episodes), so what grows after it is full is a leak.

    . env.sh && python tools/soak_loop.py --minutes 30 --checkpoint runs/demo/sft \
        --out benchmarks/results/soak

Writes soak.json (every sample), soak.md (a table per node) and soak.png.
"""

import argparse
import json
from pathlib import Path
import sys
import time

from loop_runs import run_folders
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--minutes', type=float, default=30.0, help='how long the loop runs')
    parser.add_argument('--sample-s', type=float, default=60.0, help='sampling period')
    parser.add_argument('--warmup-min', type=float, default=5.0,
                        help='minutes left out of the trend (start-up, buffer filling)')
    parser.add_argument('--checkpoint', type=Path, default=ROOT / 'runs' / 'demo' / 'sft',
                        help='SFT checkpoint the policy and the learner start from')
    parser.add_argument('--max-episodes', type=int, default=8,
                        help="the learner's buffer bound (learner parameter max_episodes)")
    parser.add_argument('--max-fd-growth', type=float, default=3.0)
    parser.add_argument('--max-thread-growth', type=float, default=2.0)
    parser.add_argument('--max-rss-mb-per-10min', type=float, default=5.0)
    parser.add_argument('--out', type=Path, default=ROOT / 'benchmarks' / 'results' / 'soak')
    parser.add_argument('--run-dir', type=Path, default=ROOT / 'runs' / 'soak')
    return parser.parse_args()


def node_processes(launcher, executables: dict[str, str]) -> dict:
    """Return node name -> psutil.Process among the launcher's descendants."""
    found = {}
    for child in launcher.children(recursive=True):
        try:
            command = ' '.join(child.cmdline())
        except Exception:  # noqa: BLE001 - a process that just exited
            continue
        for name, executable in executables.items():
            if executable in command and '__node:=' + name in command:
                found[name] = child
    return found


def sample(processes: dict) -> dict:
    """Return node -> {rss_mb, fds, threads, pid} (None for a node that is gone)."""
    import psutil

    rows = {}
    for name, process in processes.items():
        try:
            with process.oneshot():
                rows[name] = {'rss_mb': process.memory_info().rss / 2**20,
                              'fds': process.num_fds(), 'threads': process.num_threads(),
                              'pid': process.pid}
        except psutil.Error:
            rows[name] = None
    return rows


def trend(times_min: np.ndarray, values: np.ndarray) -> dict:
    """Return slope per 10 min, and the first- and last-third means."""
    third = max(1, len(values) // 3)
    slope = float(np.polyfit(times_min, values, 1)[0] * 10) if len(values) >= 2 else 0.0
    return {'per_10min': slope, 'first': float(values[:third].mean()),
            'last': float(values[-third:].mean())}


def analyse(samples: list[dict], args: argparse.Namespace) -> dict:
    """Return per-node verdicts from the samples after the warm-up."""
    nodes = sorted({name for s in samples for name in s['nodes']})
    verdicts = {}
    for name in nodes:
        rows = [(s['minute'], s['nodes'].get(name)) for s in samples]
        problems = []
        if any(row is None for _, row in rows):
            problems.append('exited or was not found in some samples')
        pids = {row['pid'] for _, row in rows if row}
        if len(pids) > 1:
            problems.append(f'restarted ({len(pids)} pids)')
        kept = [(t, row) for t, row in rows if row and t >= args.warmup_min]
        result = {'problems': problems, 'samples': len(kept)}
        if len(kept) >= 3:
            times = np.array([t for t, _ in kept])
            for metric in ('rss_mb', 'fds', 'threads'):
                result[metric] = trend(times, np.array([row[metric] for _, row in kept],
                                                       dtype=float))
            growth = {metric: result[metric]['last'] - result[metric]['first']
                      for metric in ('rss_mb', 'fds', 'threads')}
            if growth['fds'] > args.max_fd_growth:
                problems.append(f'file descriptors grew by {growth["fds"]:.1f}')
            if growth['threads'] > args.max_thread_growth:
                problems.append(f'threads grew by {growth["threads"]:.1f}')
            rss = result['rss_mb']
            if (rss['per_10min'] > args.max_rss_mb_per_10min
                    and growth['rss_mb'] > 0.05 * rss['first']):
                problems.append(f'memory grows {rss["per_10min"]:.1f} MB per 10 min')
        else:
            problems.append('fewer than 3 samples after the warm-up')
        result['verdict'] = 'FAIL' if problems else 'ok'
        verdicts[name] = result
    return verdicts


def write_table(path: Path, verdicts: dict, meta: dict) -> str:
    lines = [f'# Soak run: {meta["minutes"]:.0f} minutes of the habc loop on the simulated '
             'robot', '',
             f'Command: `{meta["command"]}`', '',
             f'Machine: {meta["machine"]}. Episodes labelled: {meta["episodes"]}; learner '
             f'version at the end: {meta["version"]}; samples every {meta["sample_s"]:.0f} s, '
             f'trend after the first {meta["warmup_min"]:.0f} min.', '',
             '| node | RSS MB first -> last third | RSS slope MB/10 min | fds | threads | '
             'verdict |', '|---|---|---|---|---|---|']
    for name, v in verdicts.items():
        if 'rss_mb' not in v:
            lines.append(f'| {name} | - | - | - | - | {v["verdict"]}: '
                         f'{"; ".join(v["problems"])} |')
            continue
        r, f, t = v['rss_mb'], v['fds'], v['threads']
        verdict = v['verdict'] + (f': {"; ".join(v["problems"])}' if v['problems'] else '')
        lines.append(f'| {name} | {r["first"]:.1f} -> {r["last"]:.1f} | '
                     f'{r["per_10min"]:+.2f} | {f["first"]:.0f} -> {f["last"]:.0f} | '
                     f'{t["first"]:.0f} -> {t["last"]:.0f} | {verdict} |')
    text = '\n'.join(lines) + '\n'
    path.write_text(text)
    return text


def plot(path: Path, samples: list[dict], warmup_min: float) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    nodes = sorted({name for s in samples for name in s['nodes']})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for axis, metric, label in zip(axes, ('rss_mb', 'fds', 'threads'),
                                   ('resident memory (MB)', 'open file descriptors',
                                    'threads'), strict=True):
        for name in nodes:
            points = [(s['minute'], s['nodes'][name][metric]) for s in samples
                      if s['nodes'].get(name)]
            if points:
                axis.plot(*zip(*points, strict=True), marker='.', label=name)
        axis.axvspan(0, warmup_min, color='0.9', label='warm-up (not in the trend)')
        axis.set_xlabel('minutes')
        axis.set_title(label)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle('habc loop soak: every node, sampled each minute')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    import psutil

    from habc.bringup import description_path, load_description
    from habc.demo import DemoConfig, start_bringup, stop_bringup, write_params
    from habc_episodes.dataset import read_index

    args = parse_args()
    checkpoint, run_dir = run_folders('soak', args.checkpoint, args.run_dir)
    run_dir.mkdir(parents=True)
    params_path = write_params(DemoConfig(out=run_dir), checkpoint, run_dir)
    params = yaml.safe_load(params_path.read_text())
    params['/**/learner']['ros__parameters']['max_episodes'] = args.max_episodes
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    description = load_description(description_path('bringup'))
    executables = {node.name: f'/lib/{node.package}/{node.executable}'
                   for node in description.nodes}
    launcher = start_bringup(params_path, run_dir / 'launch.log')
    samples: list[dict] = []
    try:
        parent = psutil.Process(launcher.pid)
        # The clock starts once every node runs: the same processes are then followed to
        # the end (one that exits or restarts fails the run).
        deadline = time.monotonic() + 180
        while len(processes := node_processes(parent, executables)) < len(executables):
            if time.monotonic() > deadline or launcher.poll() is not None:
                print(f'soak: only {sorted(processes)} of {sorted(executables)} started; see '
                      f'{run_dir / "launch.log"}', file=sys.stderr)
                return 1
            time.sleep(1.0)
        started = time.monotonic()
        while True:
            minute = (time.monotonic() - started) / 60
            nodes = sample(processes)
            samples.append({'minute': minute, 'nodes': nodes})
            alive = ', '.join(f'{n} {row["rss_mb"]:.0f} MB/{row["fds"]} fd/{row["threads"]} th'
                              for n, row in sorted(nodes.items()) if row)
            print(f'[soak {minute:5.1f} min] {len(nodes)} nodes: {alive}', flush=True)
            if launcher.poll() is not None:
                print(f'soak: the bringup exited (code {launcher.returncode}); see '
                      f'{run_dir / "launch.log"}', file=sys.stderr)
                break
            if minute >= args.minutes:
                break
            time.sleep(max(0.0, started + (len(samples)) * args.sample_s - time.monotonic()))
    finally:
        stop_bringup(launcher, timeout_s=90)
    records = read_index(run_dir / 'episodes' / 'episodes.sqlite')
    labelled = [r for r in records if r.outcome]
    newest = max((r.policy_version for r in records), default='-',
                 key=lambda text: int(text.split(':')[0]) if text[:1].isdigit() else -1)
    verdicts = analyse(samples, args)
    args.out.mkdir(parents=True, exist_ok=True)
    import platform
    meta = {'minutes': samples[-1]['minute'] if samples else 0.0,
            'command': 'python tools/soak_loop.py ' + ' '.join(sys.argv[1:]),
            'machine': f'{platform.node()}, {psutil.cpu_count()} CPUs, '
                       f'{psutil.virtual_memory().total / 2**30:.0f} GB',
            'episodes': len(labelled), 'version': newest,
            'sample_s': args.sample_s, 'warmup_min': args.warmup_min,
            'launcher_exit': launcher.returncode}
    (args.out / 'soak.json').write_text(json.dumps(
        {'meta': meta, 'verdicts': verdicts, 'samples': samples}, indent=1))
    print(write_table(args.out / 'soak.md', verdicts, meta))
    plot(args.out / 'soak.png', samples, args.warmup_min)
    failed = [name for name, v in verdicts.items() if v['verdict'] != 'ok']
    if failed or len(verdicts) < len(executables):
        print(f'soak: FAILED ({", ".join(failed) or "nodes missing"})', file=sys.stderr)
        return 1
    print(f'soak: ok, {len(verdicts)} nodes, nothing grew; results in {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
