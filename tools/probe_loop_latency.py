#!/usr/bin/env python3
r"""Probe what inference latency costs a checkpoint: offline episodes with the loop's timing.

The ROS loop's policy node starts an inference when fewer than `min_remaining_steps` queued
actions lie ahead; the chunk lands some control ticks after its observation, and the actions
whose ticks passed are dropped (habc_policy.chunk_executor). This probe replays that timing
in the offline runner (habc_sim.runner.DelayedChunks) with a fixed delay d in control steps
(50 Hz: d = 5 is 100 ms), on TUNING states (never the held-out evaluation range), so the
loss from latency is measured apart from everything else the loop adds (DDS, bags, the
learner sharing the cores).

Prints a progress bar per delay and a table; writes result.json next to the checkpoint
(or --out). Example (about 10 minutes on 2 cores for a two-camera VLA):

    python tools/probe_loop_latency.py runs/demo/sft --delays 0 2 4 8 --episodes 20
"""

import argparse
import json
from pathlib import Path
import sys

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('checkpoint', type=Path, help='policy checkpoint folder')
    parser.add_argument('--task', default='transfer_cube', choices=['transfer_cube', 'insertion'])
    parser.add_argument('--track', default='pixels', choices=['state', 'pixels'])
    parser.add_argument('--cameras', nargs='+', default=['top', 'angle'],
                        help="the checkpoint's cameras, in its order (pixel track)")
    parser.add_argument('--delays', nargs='+', type=int, default=[0, 2, 4, 8],
                        help='chunk delays to try, in control steps (0: synchronous)')
    parser.add_argument('--episodes', type=int, default=20, help='tuning states per delay')
    parser.add_argument('--execute-steps', type=int, default=20,
                        help="the policy node's execute_steps (bringup default 20)")
    parser.add_argument('--min-remaining', type=int, default=10,
                        help="the policy node's min_remaining_steps (bringup default 10)")
    parser.add_argument('--fixed-trigger', action='store_true',
                        help="turn the node's latency_trigger off")
    parser.add_argument('--actuation-delay', type=int, default=0,
                        help='steps each action takes to reach the robot (the arbiter and '
                        "driver's delay; the policy node's command_lead_s makes up for it)")
    parser.add_argument('--max-steps', type=int, default=400)
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--out', type=Path, help='result.json folder (default: checkpoint)')
    args = parser.parse_args(argv)
    if not (args.checkpoint / 'model.safetensors').is_file():
        parser.error(f'{args.checkpoint} holds no model.safetensors; give a checkpoint folder '
                     '(e.g. runs/demo/sft)')

    from habc_episodes.stats import wilson_interval
    from habc_sim import bench
    from habc_sim.rollouts import WorkerPool

    rows = []
    with WorkerPool(args.workers) as pool:
        for delay in args.delays:
            jobs = [bench.EpisodeJob(args.task, args.track, bench.TUNE_SEED_BASE + i,
                                     args.max_steps, 96, tuple(args.cameras),
                                     str(args.checkpoint.resolve()),
                                     execute_steps=args.execute_steps,
                                     inference_delay_steps=delay,
                                     min_remaining_steps=args.min_remaining,
                                     latency_trigger=not args.fixed_trigger,
                                     actuation_delay_steps=args.actuation_delay)
                    for i in range(args.episodes)]
            results = list(pool.map(bench.run_job, jobs, f'delay {delay}'))
            successes = sum(r['success'] for r in results)
            low, high = wilson_interval(successes, len(results))
            rows.append({'delay_steps': delay, 'delay_ms': 20 * delay, 'episodes': len(results),
                         'successes': successes, 'wilson95': [low, high],
                         'hold_steps': float(np.mean([r.get('hold_steps', 0) for r in results])),
                         'stale_dropped': float(np.mean([r.get('stale_dropped', 0)
                                                         for r in results]))})
    print(f'\n{args.checkpoint}: {args.task}, {args.episodes} tuning states per delay, '
          f'execute_steps {args.execute_steps}, min_remaining {args.min_remaining}, '
          f'latency trigger {"off" if args.fixed_trigger else "on"}, actuation delay '
          f'{args.actuation_delay} steps')
    print('| delay (steps) | delay (ms) | success | Wilson 95% | hold steps/ep | stale/ep |')
    print('|---:|---:|---:|---:|---:|---:|')
    for row in rows:
        low, high = row['wilson95']
        print(f"| {row['delay_steps']} | {row['delay_ms']} | {row['successes']}/"
              f"{row['episodes']} | {100 * low:.0f}-{100 * high:.0f}% | "
              f"{row['hold_steps']:.1f} | {row['stale_dropped']:.1f} |")
    out = args.out or args.checkpoint
    out.mkdir(parents=True, exist_ok=True)
    (out / 'latency_probe.json').write_text(json.dumps({'args': {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        'rows': rows}, indent=1) + '\n')
    print(f'wrote {out / "latency_probe.json"}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
