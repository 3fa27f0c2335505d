#!/usr/bin/env python3
"""Training throughput of every method against plain BC, and the VLA's inference latency.

For each model (the low-dimensional flow policy and the small VLA) and each method, runs
gradient steps on the same synthetic buffer (rollouts with interventions, failures and
demonstrations; 14-D state and actions, chunks of 50, two 96x96 views for the VLA) and
reports samples/s and the overhead ratio against plain unweighted behaviour cloning (the
policy loss alone, no critic, no weights). Then times `predict_action_chunk` of the VLA for
1-3 views. Writes JSON, a Markdown table and a PNG plot; prints the table.

    python benchmarks/bench_training.py [--steps 15] [--out benchmarks/results]
"""

import argparse
import json
import os
from pathlib import Path
import platform
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from habc_episodes.episode import Episode
from habc_episodes.vocabulary import Controller, EpisodeKind, Outcome
from habc_learner.methods import Algorithm, Method, MethodConfig
from habc_learner.trainer import seed_everything
from habc_policy.models.lowdim import LowDimFlowConfig, LowDimFlowPolicy
from habc_policy.models.vla import SmallVLA, SmallVLAConfig

STATE_DIM = ACTION_DIM = 14
HORIZON = 50
INSTRUCTION = 'transfer the cube to the left arm'


def synthetic_episodes(rng: np.random.Generator, images: bool, views: int = 2,
                       size: int = 96, count: int = 24, length: int = 80) -> list[Episode]:
    """Mixed episodes: pure policy, policy->human, demos; successes and failures."""
    episodes = []
    for i in range(count):
        kind = EpisodeKind.DEMO if i % 4 == 0 else EpisodeKind.ROLLOUT
        controllers = np.full(length, Controller.POLICY)
        if kind == EpisodeKind.DEMO:
            controllers[:] = Controller.HUMAN
        elif i % 4 == 1:
            controllers[length // 2:] = Controller.HUMAN
        obs = {'state': rng.normal(size=(length, STATE_DIM)).astype(np.float32)}
        if images:
            obs['images'] = rng.integers(0, 255, (length, views, size, size, 3), dtype=np.uint8)
        episodes.append(Episode(observations=obs,
                                actions=rng.normal(size=(length, ACTION_DIM)).astype(np.float32),
                                controllers=controllers, kind=kind, instruction=INSTRUCTION,
                                outcome=Outcome.SUCCESS if i % 3 else Outcome.FAILURE))
    return episodes


def make_policy(model: str):
    if model == 'lowdim':
        return LowDimFlowPolicy(LowDimFlowConfig(state_dim=STATE_DIM, action_dim=ACTION_DIM,
                                                 horizon=HORIZON))
    return SmallVLA(SmallVLAConfig(state_dim=STATE_DIM, action_dim=ACTION_DIM,
                                   horizon=HORIZON, num_views=2, image_size=96))


def time_steps(step_fn, steps: int, warmup: int) -> float:
    """Seconds per step of step_fn after `warmup` untimed steps."""
    for _ in range(warmup):
        step_fn()
    start = time.perf_counter()
    for _ in range(steps):
        step_fn()
    return (time.perf_counter() - start) / steps


def method_stepper(algorithm: Algorithm, buffer, batch_size: int, rng: np.random.Generator):
    """Return a function that runs one training step of `algorithm`, as the Trainer does."""
    table = buffer.table
    actor_mask, critic_mask = algorithm.actor_mask(table), algorithm.critic_mask(table)
    counter = {'step': 0}

    def step() -> None:
        algorithm.refresh(buffer, counter['step'])
        indices = algorithm.sample_indices(table, batch_size, rng)
        batch = buffer.batch(indices)
        batch['masks'] = {'actor': torch.as_tensor(actor_mask[indices]),
                          'critic': torch.as_tensor(critic_mask[indices])}
        algorithm.update(batch, counter['step'])
        counter['step'] += 1
    return step


def bench_model(model: str, batch_size: int, steps: int, warmup: int, methods: list[str],
                bar) -> list[dict]:
    rng = seed_everything(0)
    episodes = synthetic_episodes(rng, images=model == 'vla')
    rows = []

    # Plain unweighted BC: the policy's loss alone, every sample weight 1, no critic.
    config = MethodConfig(method='sft', horizon=HORIZON)
    buffer = config.make_buffer()
    for e in episodes:
        buffer.add(e)
    policy = make_policy(model)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-4)
    every = np.arange(len(buffer))

    def bc_step():
        batch = buffer.batch(rng.choice(every, batch_size))
        loss = policy.per_sample_loss(batch['obs']).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    bc_seconds = time_steps(bc_step, steps, warmup)
    rows.append({'model': model, 'method': 'plain_bc', 'batch_size': batch_size,
                 'step_ms': bc_seconds * 1e3, 'samples_per_s': batch_size / bc_seconds,
                 'overhead_vs_bc': 1.0})
    bar.update()

    for method in methods:
        config = MethodConfig(method=method, horizon=HORIZON, warmup_steps=0)
        buffer = config.make_buffer()
        for e in episodes:
            buffer.add(e)
        seed_everything(0)
        policy = make_policy(model)
        algorithm = Algorithm(policy, config)
        algorithm.prepare(buffer, rng)
        seconds = time_steps(method_stepper(algorithm, buffer, batch_size, rng), steps,
                             warmup)
        rows.append({'model': model, 'method': method, 'batch_size': batch_size,
                     'step_ms': seconds * 1e3, 'samples_per_s': batch_size / seconds,
                     'overhead_vs_bc': seconds / bc_seconds})
        bar.update()
    return rows


def bench_latency(calls: int) -> list[dict]:
    rows = []
    rng = np.random.default_rng(0)
    for views in (1, 2, 3):
        seed_everything(0)
        policy = SmallVLA(SmallVLAConfig(state_dim=STATE_DIM, action_dim=ACTION_DIM,
                                         horizon=HORIZON, num_views=views, image_size=96))
        policy.eval()
        obs = {'images': rng.integers(0, 255, (views, 96, 96, 3), dtype=np.uint8),
               'state': rng.normal(size=STATE_DIM).astype(np.float32),
               'instruction': INSTRUCTION}
        for _ in range(10):  # warm-up, and the instruction's embedding enters the cache
            policy.predict_action_chunk(obs)
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            policy.predict_action_chunk(obs)
            times.append((time.perf_counter() - start) * 1e3)
        rows.append({'views': views, 'image_size': 96, 'horizon': HORIZON,
                     'euler_steps': policy.config.num_inference_steps, 'calls': calls,
                     'p50_ms': float(np.percentile(times, 50)),
                     'p99_ms': float(np.percentile(times, 99)),
                     'mean_ms': float(np.mean(times))})
    return rows


def markdown(training: list[dict], latency: list[dict], meta: dict) -> str:
    lines = [f"Training throughput ({meta['threads']} torch threads, {meta['cpu']}, "
             f"{meta['steps']} timed steps after {meta['warmup']} warm-up)", '',
             '| model | method | batch | ms/step | samples/s | overhead vs plain BC |',
             '|---|---|---:|---:|---:|---:|']
    for r in training:
        lines.append(f"| {r['model']} | {r['method']} | {r['batch_size']} | "
                     f"{r['step_ms']:.1f} | {r['samples_per_s']:.0f} | "
                     f"{r['overhead_vs_bc']:.2f}x |")
    lines += ['', 'SmallVLA inference latency per chunk (predict_action_chunk, one observation)',
              '', '| views | image | horizon | Euler steps | p50 ms | p99 ms |',
              '|---:|---:|---:|---:|---:|---:|']
    for r in latency:
        lines.append(f"| {r['views']} | {r['image_size']}x{r['image_size']} | {r['horizon']} "
                     f"| {r['euler_steps']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |")
    return '\n'.join(lines) + '\n'


def plot(training: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    models = sorted({r['model'] for r in training})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        rows = [r for r in training if r['model'] == model]
        ax.barh([r['method'] for r in rows], [r['overhead_vs_bc'] for r in rows],
                color=['0.6' if r['method'] == 'plain_bc' else 'tab:blue' for r in rows])
        ax.axvline(1.0, color='k', lw=0.8)
        ax.set_title(f'{model}: step time / plain BC step time')
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--steps', type=int, default=15, help='timed steps per method')
    parser.add_argument('--warmup', type=int, default=3, help='untimed steps per method')
    parser.add_argument('--lowdim-batch', type=int, default=256)
    parser.add_argument('--vla-batch', type=int, default=32)
    parser.add_argument('--latency-calls', type=int, default=100)
    parser.add_argument('--models', nargs='+', default=['lowdim', 'vla'],
                        choices=['lowdim', 'vla'])
    parser.add_argument('--methods', nargs='+', default=[m.value for m in Method],
                        choices=[m.value for m in Method])
    parser.add_argument('--out', type=Path, default=Path('benchmarks/results'))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    meta = {'threads': torch.get_num_threads(), 'cpu': platform.processor() or platform.machine(),
            'cores': os.cpu_count(), 'torch': torch.__version__, 'steps': args.steps,
            'warmup': args.warmup}
    training = []
    with tqdm(total=len(args.models) * (len(args.methods) + 1), desc='training') as bar:
        for model in args.models:
            batch = args.lowdim_batch if model == 'lowdim' else args.vla_batch
            training += bench_model(model, batch, args.steps, args.warmup, args.methods, bar)
    latency = bench_latency(args.latency_calls) if 'vla' in args.models else []
    report = markdown(training, latency, meta)
    (args.out / 'training_throughput.json').write_text(json.dumps(
        {'meta': meta, 'training': training, 'latency': latency}, indent=2) + '\n')
    (args.out / 'training_throughput.md').write_text(report)
    plot(training, args.out / 'training_throughput.png')
    print(report)
    print(f'wrote {args.out}/training_throughput.{{json,md,png}}')


if __name__ == '__main__':
    main()
