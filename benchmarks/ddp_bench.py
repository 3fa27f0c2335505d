#!/usr/bin/env python3
"""Data-parallel training throughput: HABC steps/s with K = 1, 2, ... torchrun processes.

Trains the small VLA (two 96 px views, chunks of 50; bench_training.py's model and
synthetic buffer) with the HABC method at the learner's default batch of 64 under torchrun,
once per K, through the Trainer's data-parallel path (DistributedSampler shards, DDP
gradient averaging, global-batch normalisers). Each process takes 64 / K samples of every
step. Reports global steps/s (and samples/s) after untimed warm-up steps, the speed-up over
K = 1 and the efficiency (speed-up / K). Writes JSON and a Markdown table into --out and
prints the table.

CPU (gloo): every process gets --threads torch threads (default 1), so K = 2 uses twice the
cores of K = 1; that is the comparison a machine with K free cores makes. GPU (NCCL): pass
--device cuda; process r trains on cuda:r (benchmarks/ddp_gpu.sh).

    python benchmarks/ddp_bench.py [--nprocs 1 2] [--steps 10] [--out benchmarks/results/ddp]
    python benchmarks/ddp_bench.py --device cuda --nprocs 1 2 4 8 --steps 30
"""

import argparse
import json
import os
from pathlib import Path
import platform
import subprocess
import sys
import tempfile
import time

BATCH_SIZE = 64  # the learner's default batch_size


def worker(args: argparse.Namespace) -> None:
    """One torchrun process: train warm-up + timed steps; rank 0 writes the timing."""
    from bench_training import make_policy, synthetic_episodes
    import numpy as np
    import torch

    from habc_learner import distributed
    from habc_learner.methods import MethodConfig
    from habc_learner.trainer import TrainConfig, Trainer

    torch.set_num_threads(args.threads)
    context = distributed.init_from_env(args.device)
    episodes = synthetic_episodes(np.random.default_rng(0), images=True)
    torch.manual_seed(0)
    policy = make_policy('vla', Path(tempfile.gettempdir()))
    method = MethodConfig(method='habc', horizon=policy.horizon, warmup_steps=0)
    buffer = method.make_buffer()
    for episode in episodes:
        buffer.add(episode)
    train = TrainConfig(steps=args.steps, batch_size=args.batch_size, device=context.device,
                        log_every=args.steps + args.warmup)
    trainer = Trainer(policy, buffer, method, train, progress=False)
    trainer.fit(args.warmup)
    synchronize(context.device)
    distributed.barrier()
    start = time.perf_counter()
    trainer.fit(args.steps)
    synchronize(context.device)
    distributed.barrier()
    seconds = time.perf_counter() - start
    if distributed.is_main():
        Path(args.result).write_text(json.dumps({
            'processes': context.world_size, 'backend': context.backend,
            'device': context.device, 'steps': args.steps, 'seconds': seconds,
            'steps_per_s': args.steps / seconds,
            'samples_per_s': args.steps * args.batch_size / seconds,
            'per_process_batch': args.batch_size // context.world_size}) + '\n')
    distributed.destroy()


def synchronize(device: str) -> None:
    import torch
    if device.startswith('cuda'):
        torch.cuda.synchronize(device)


def table(rows: list[dict]) -> str:
    base = next((r['steps_per_s'] for r in rows if r['processes'] == 1), None)
    lines = ['| K | backend | batch / process | steps/s | samples/s | speed-up | efficiency |',
             '|---|---|---|---|---|---|---|']
    for r in rows:
        speedup = r['steps_per_s'] / base if base else float('nan')
        lines.append(f"| {r['processes']} | {r['backend']} | {r['per_process_batch']} | "
                     f"{r['steps_per_s']:.3f} | {r['samples_per_s']:.1f} | {speedup:.2f}x | "
                     f"{speedup / r['processes']:.0%} |")
    return '\n'.join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--nprocs', type=int, nargs='+', default=[1, 2])
    parser.add_argument('--steps', type=int, default=10, help='timed steps (10)')
    parser.add_argument('--warmup', type=int, default=2, help='untimed steps first (2)')
    parser.add_argument('--batch-size', type=int, default=BATCH_SIZE)
    parser.add_argument('--threads', type=int, default=1, help='torch threads per process')
    parser.add_argument('--device', default='cpu', help='cpu (gloo) or cuda (NCCL)')
    parser.add_argument('--out', type=Path, default=Path('benchmarks/results/ddp'))
    parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--result', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    from habc_learner.distributed import loopback_environment, torchrun_command

    rows = []
    env = loopback_environment()
    env['OMP_NUM_THREADS'] = str(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        for k in args.nprocs:
            result = Path(scratch) / f'k{k}.json'
            command = torchrun_command(k, 'ddp_bench', [
                '--worker', '--result', str(result), '--steps', str(args.steps),
                '--warmup', str(args.warmup), '--batch-size', str(args.batch_size),
                '--threads', str(args.threads), '--device', args.device])
            # Run as a module from this folder: bench_training imports the same way.
            path = [str(Path(__file__).resolve().parent), env.get('PYTHONPATH', '')]
            subprocess.run(command, env={**env, 'PYTHONPATH': os.pathsep.join(filter(None, path))},
                           check=True)
            rows.append(json.loads(result.read_text()))
            print(table(rows).splitlines()[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {'command': ' '.join(['python', 'benchmarks/ddp_bench.py', *sys.argv[1:]]),
            'model': 'small VLA (2 x 96 px views, horizon 50), method habc',
            'batch_size': args.batch_size, 'threads_per_process': args.threads,
            'machine': f'{platform.machine()}, {os.cpu_count()} CPUs', 'rows': rows}
    (args.out / 'ddp_throughput.json').write_text(json.dumps(meta, indent=2) + '\n')
    text = (f"# Data-parallel HABC training, {meta['model']}\n\n"
            f"`{meta['command']}` on {meta['machine']}, global batch {args.batch_size}, "
            f'{args.threads} torch thread(s) per process, {args.steps} timed steps.\n\n'
            + table(rows) + '\n')
    (args.out / 'ddp_throughput.md').write_text(text)
    print(text)


if __name__ == '__main__':
    main()
