#!/usr/bin/env python3
"""Training throughput of every method against plain BC, and the VLA's inference latency.

For each model and each method, runs gradient steps on the same synthetic buffer (rollouts
with interventions, failures and demonstrations; 14-D state and actions, chunks of 50, two
96x96 views for the VLAs) and reports samples/s and the overhead ratio against plain
unweighted behaviour cloning (the policy loss alone, no critic, no weights). Then times
`predict_action_chunk` of the small VLA for 1-3 views. Writes JSON, a Markdown table and a
PNG plot; prints the table.

Models: `lowdim` (the low-dimensional flow policy), `vla` (SmallVLA), and TransformersVLA on
a randomly initialised SmolVLM written to a temporary folder (nothing is downloaded) at three
sizes: `tvla_s` and `tvla_m` (CPU-sized) and `tvla_l` (SmolVLM-256M-like: a 12-layer 768-wide
vision tower at 512 px, a 576-wide language model of which 16 layers form the prefix; a GPU
size). `--finetune` picks the backbone mode (frozen, lora, full).

Feature cache (habc_learner.feature_cache): with a frozen backbone the learner computes a
frame's pooled prefix once and reuses it for s_{t+1}. A method with a critic on such a
policy gets one row per `--cache` state: 'cold' starts with an empty cache (the learner's
first steps ever; the cache fills as the steps go), 'warm' fills it for every frame first,
untimed (the steady state of later rounds, once each frame has been seen), 'off' is
without the cache. The 's_{t+1} hits' column is the share of timed lookups that hit.
`--threads N` sets torch's CPU threads and `--interleave` makes the rows take turns step by
step: on a machine shared with other jobs, both keep the ratios steady.

    python benchmarks/bench_training.py [--steps 15] [--out benchmarks/results]
    python benchmarks/bench_training.py --models tvla_s tvla_m --methods habc \
        --out benchmarks/results/transformers_vla
    python benchmarks/bench_training.py --models tvla_s tvla_m --methods habc --threads 1 \
        --interleave --cache off cold warm
    python benchmarks/bench_training.py --device cuda --models vla tvla_l --methods habc
"""

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
import json
import os
from pathlib import Path
import platform
import tempfile
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from habc_episodes.episode import Episode
from habc_episodes.vocabulary import Controller, EpisodeKind, Outcome
from habc_learner.feature_cache import CacheCounters, DEFAULT_MAX_ROWS
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


# TransformersVLA sizes: the backbone writer's keyword arguments, then the policy's.
TVLA_SIZES = {
    'tvla_s': ({'vision_hidden': 64, 'vision_layers': 2, 'vision_heads': 2, 'image_size': 64,
                'patch_size': 16, 'text_hidden': 128, 'text_layers': 4, 'text_heads': 4,
                'text_kv_heads': 2},
               {'prefix_layers': 4, 'expert_hidden_dim': 128, 'expert_layers': 2}),
    'tvla_m': ({'vision_hidden': 192, 'vision_layers': 4, 'vision_heads': 4, 'image_size': 128,
                'patch_size': 16, 'text_hidden': 384, 'text_layers': 8, 'text_heads': 6,
                'text_kv_heads': 2},
               {'prefix_layers': 8, 'expert_hidden_dim': 256, 'expert_layers': 4}),
    'tvla_l': ({'vision_hidden': 768, 'vision_layers': 12, 'vision_heads': 12,
                'image_size': 512, 'patch_size': 16, 'scale_factor': 4, 'text_hidden': 576,
                'text_layers': 30, 'text_heads': 9, 'text_kv_heads': 3},
               {'prefix_layers': 16, 'expert_hidden_dim': 432, 'expert_layers': 8,
                'expert_heads': 6}),
}
VLA_MODELS = ('vla', *TVLA_SIZES)
_BACKBONES: dict[str, Path] = {}


def backbone_folder(model: str, root: Path) -> Path:
    """Write (once per run) the random SmolVLM folder of a TransformersVLA size."""
    from habc_policy.models.tiny_backbones import write_tiny_smolvlm

    if model not in _BACKBONES:
        _BACKBONES[model] = write_tiny_smolvlm(root / model, **TVLA_SIZES[model][0])
    return _BACKBONES[model]


def make_policy(model: str, root: Path, finetune: str = 'frozen'):
    if model == 'lowdim':
        return LowDimFlowPolicy(LowDimFlowConfig(state_dim=STATE_DIM, action_dim=ACTION_DIM,
                                                 horizon=HORIZON))
    if model == 'vla':
        return SmallVLA(SmallVLAConfig(state_dim=STATE_DIM, action_dim=ACTION_DIM,
                                       horizon=HORIZON, num_views=2, image_size=96))
    from habc_policy.models.transformers_vla import TransformersVLA, TransformersVLAConfig
    return TransformersVLA(TransformersVLAConfig(
        backbone_dir=str(backbone_folder(model, root)), state_dim=STATE_DIM,
        action_dim=ACTION_DIM, horizon=HORIZON, num_views=2, image_size=96,
        finetune=finetune, **TVLA_SIZES[model][1]))


def parameter_counts(policy) -> dict:
    """Parameters of the policy in millions: all of them, and those that train."""
    total = sum(p.numel() for p in policy.parameters())
    trained = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    return {'params_m': total / 1e6, 'trained_params_m': trained / 1e6}


def synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timed_step(step_fn, device: torch.device) -> float:
    """Seconds of one call of step_fn, its GPU work included."""
    synchronize(device)
    start = time.perf_counter()
    step_fn()
    synchronize(device)
    return time.perf_counter() - start


def method_stepper(algorithm: Algorithm, buffer, batch_size: int, rng: np.random.Generator,
                   device: torch.device):
    """Return a function that runs one training step of `algorithm`, as the Trainer does."""
    table = buffer.table
    actor_mask, critic_mask = algorithm.actor_mask(table), algorithm.critic_mask(table)
    counter = {'step': 0}

    def step() -> None:
        algorithm.refresh(buffer, counter['step'], device)
        indices = algorithm.sample_indices(table, batch_size, rng)
        batch = buffer.batch(indices, device)
        batch['masks'] = {'actor': torch.as_tensor(actor_mask[indices], device=device),
                          'critic': torch.as_tensor(critic_mask[indices], device=device)}
        algorithm.update(batch, counter['step'])
        counter['step'] += 1
    return step


@dataclass
class Case:
    """One row of the table: a model trained one way, stepped and timed step by step."""

    row: dict
    step: Callable[[], None] | None
    counters: CacheCounters | None = None  # the feature cache's, where one is used
    times: list[float] = field(default_factory=list)
    before: tuple[int, int] = (0, 0)  # the counters' (looked_up, hits) when timing began


def build_case(model: str, method: str, cache: str, episodes: list[Episode], batch_size: int,
               *, device: torch.device, root: Path, finetune: str) -> Case:
    """Build the policy (and algorithm) of one row, and its step function."""
    rng = np.random.default_rng(0)  # every row draws the same minibatch indices
    seed_everything(0)
    config = MethodConfig(method='sft' if method == 'plain_bc' else method, horizon=HORIZON,
                          warmup_steps=0)
    buffer = config.make_buffer()
    for e in episodes:
        buffer.add(e)
    policy = make_policy(model, root, finetune).to(device)
    row = {'model': model, 'finetune': finetune if model in TVLA_SIZES else '-',
           **parameter_counts(policy), 'method': method, 'cache': '-', 'batch_size': batch_size}
    if method == 'plain_bc':
        # Plain unweighted BC: the policy's loss alone, every sample weight 1, no critic.
        optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad],
                                      lr=3e-4)
        every = np.arange(len(buffer))

        def bc_step() -> None:
            batch = buffer.batch(rng.choice(every, batch_size), device)
            loss = policy.per_sample_loss(batch['obs']).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return Case(row, bc_step)

    algorithm = Algorithm(policy, config,
                          feature_cache_rows=0 if cache == 'off' else DEFAULT_MAX_ROWS)
    algorithm.to(device)
    algorithm.prepare(buffer, rng)
    step = method_stepper(algorithm, buffer, batch_size, rng, device)
    if policy.cacheable_feature_dim == 0 or algorithm.critic is None:
        return Case(row, step)  # nothing to cache: the cache state changes nothing
    if cache == 'warm':
        algorithm.warm_feature_cache(buffer, device)  # untimed: every frame cached
    row['cache'] = cache
    return Case(row, step, algorithm.feature_cache.counters)


def bench_model(model: str, batch_size: int, steps: int, warmup: int, methods: list[str],
                bar, *, device: torch.device, root: Path, finetune: str,
                cache_states: list[str], interleave: bool) -> list[dict]:
    """Time plain BC and each method (per feature cache state); one row each.

    ms/step is the median over the timed steps. Sequential: each row's steps run in one
    block and its model is freed before the next is built (peak GPU memory per row).
    Interleaved: all rows' models are built, then their timed steps take turns, so that a
    load that changes over minutes (another job on the machine) slows every row alike.
    """
    rng = seed_everything(0)
    episodes = synthetic_episodes(rng, images=model in VLA_MODELS)
    cases: list[Case] = []
    for method, cache in [('plain_bc', '-')] + [(m, c) for m in methods for c in cache_states]:
        peak_memory_mb(device)  # reset the peak: each row reports its own model's
        case = build_case(model, method, cache, episodes, batch_size, device=device,
                          root=root, finetune=finetune)
        if case.row['cache'] == '-' and any(c.row['method'] == method for c in cases):
            bar.update()  # a method that caches nothing gets one row, not one per state
            continue
        for _ in range(warmup):
            case.step()
        if case.counters is not None:  # the hit share counts the timed steps only
            case.before = (case.counters.looked_up, case.counters.hits)
        cases.append(case)
        if not interleave:
            case.times = [timed_step(case.step, device) for _ in range(steps)]
            case.row['peak_memory_mb'] = peak_memory_mb(device)
            case.step = None  # free the model before the next one is measured
            bar.update()
    if interleave:
        for _ in range(steps):
            for case in cases:
                case.times.append(timed_step(case.step, device))
        peak = peak_memory_mb(device)  # of all rows' models together
        for case in cases:
            case.row['peak_memory_mb'] = peak
            bar.update()
    rows = []
    for case in cases:
        row = case.row
        row['step_ms'] = float(np.median(case.times)) * 1e3
        row['step_ms_mean'] = float(np.mean(case.times)) * 1e3
        row['samples_per_s'] = batch_size / (row['step_ms'] / 1e3)
        row['overhead_vs_bc'] = row['step_ms'] / cases[0].row['step_ms']
        looked_up = 0 if case.counters is None else case.counters.looked_up - case.before[0]
        row['next_hit_share'] = ((case.counters.hits - case.before[1]) / looked_up
                                 if looked_up else None)
        rows.append(row)
    return rows


def peak_memory_mb(device: torch.device) -> float | None:
    """Peak GPU memory since the last call (None on CPU), then reset the counter."""
    if device.type != 'cuda':
        return None
    torch.cuda.empty_cache()
    peak = torch.cuda.max_memory_allocated(device) / 2**20
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def bench_latency(calls: int, device: torch.device) -> list[dict]:
    rows = []
    rng = np.random.default_rng(0)
    for views in (1, 2, 3):
        seed_everything(0)
        policy = SmallVLA(SmallVLAConfig(state_dim=STATE_DIM, action_dim=ACTION_DIM,
                                         horizon=HORIZON, num_views=views, image_size=96))
        policy.to(device).eval()
        obs = {'images': rng.integers(0, 255, (views, 96, 96, 3), dtype=np.uint8),
               'state': rng.normal(size=STATE_DIM).astype(np.float32),
               'instruction': INSTRUCTION}
        for _ in range(10):  # warm-up, and the instruction's embedding enters the cache
            policy.predict_action_chunk(obs)
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            policy.predict_action_chunk(obs)  # returns numpy: the GPU work has finished
            times.append((time.perf_counter() - start) * 1e3)
        rows.append({'views': views, 'image_size': 96, 'horizon': HORIZON,
                     'euler_steps': policy.config.num_inference_steps, 'calls': calls,
                     'p50_ms': float(np.percentile(times, 50)),
                     'p99_ms': float(np.percentile(times, 99)),
                     'mean_ms': float(np.mean(times))})
    return rows


def markdown(training: list[dict], latency: list[dict], meta: dict) -> str:
    order = 'interleaved across rows' if meta.get('interleave') else 'row after row'
    lines = [f"Training throughput on {meta['device']} ({meta['threads']} torch threads, "
             f"{meta['cpu']}; ms/step: median of {meta['steps']} timed steps after "
             f"{meta['warmup']} warm-up, {order})", '',
             '| model | backbone | params (trained), M | method | feature cache '
             '| s_{t+1} hits | batch | ms/step | samples/s | overhead vs plain BC '
             '| peak GPU MB |',
             '|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|']
    for r in training:
        peak = '-' if r['peak_memory_mb'] is None else f"{r['peak_memory_mb']:.0f}"
        hits = '-' if r['next_hit_share'] is None else f"{100 * r['next_hit_share']:.0f}%"
        lines.append(f"| {r['model']} | {r['finetune']} | {r['params_m']:.1f} "
                     f"({r['trained_params_m']:.1f}) | {r['method']} | {r['cache']} | {hits} "
                     f"| {r['batch_size']} | "
                     f"{r['step_ms']:.1f} | {r['samples_per_s']:.0f} | "
                     f"{r['overhead_vs_bc']:.2f}x | {peak} |")
    if not latency:
        return '\n'.join(lines) + '\n'

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
        labels = [r['method'] if r['cache'] == '-' else f"{r['method']} ({r['cache']} cache)"
                  for r in rows]
        ax.barh(labels, [r['overhead_vs_bc'] for r in rows],
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
                        choices=['lowdim', *VLA_MODELS],
                        help='lowdim, vla (SmallVLA) and TransformersVLA sizes tvla_s, tvla_m '
                        '(CPU) and tvla_l (SmolVLM-256M-like, for a GPU)')
    parser.add_argument('--finetune', default='frozen', choices=['frozen', 'lora', 'full'],
                        help="TransformersVLA's backbone mode (frozen)")
    parser.add_argument('--methods', nargs='+', default=[m.value for m in Method],
                        choices=[m.value for m in Method])
    parser.add_argument('--device', default='auto',
                        help='torch device: auto (cuda if available), cpu, cuda, cuda:1, ...')
    parser.add_argument('--cache', nargs='+', default=['cold', 'warm'],
                        choices=['off', 'cold', 'warm'],
                        help='feature cache states timed for a frozen-backbone policy with a '
                        'critic: off, cold (empty at the start), warm (every frame cached)')
    parser.add_argument('--threads', type=int, default=0,
                        help="torch CPU threads (0: torch's default)")
    parser.add_argument('--interleave', action='store_true',
                        help="build every row's model first, then take turns step by step "
                        '(fair ratios on a loaded machine; peak GPU memory of all together)')
    parser.add_argument('--out', type=Path, default=Path('benchmarks/results'))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(('cuda' if torch.cuda.is_available() else 'cpu')
                          if args.device == 'auto' else args.device)

    meta = {'threads': torch.get_num_threads(), 'cpu': platform.processor() or platform.machine(),
            'cores': os.cpu_count(), 'torch': torch.__version__, 'steps': args.steps,
            'warmup': args.warmup, 'device': str(device),
            'gpu': torch.cuda.get_device_name(device) if device.type == 'cuda' else None,
            'finetune': args.finetune, 'cache': args.cache, 'interleave': args.interleave}
    training = []
    with tempfile.TemporaryDirectory(prefix='habc_bench_backbones_') as root, \
            tqdm(total=len(args.models) * (len(args.methods) * len(args.cache) + 1),
                 desc='training') as bar:
        for model in args.models:
            batch = args.lowdim_batch if model == 'lowdim' else args.vla_batch
            training += bench_model(model, batch, args.steps, args.warmup, args.methods, bar,
                                    device=device, root=Path(root), finetune=args.finetune,
                                    cache_states=args.cache, interleave=args.interleave)
    latency = bench_latency(args.latency_calls, device) if 'vla' in args.models else []
    report = markdown(training, latency, meta)
    (args.out / 'training_throughput.json').write_text(json.dumps(
        {'meta': meta, 'training': training, 'latency': latency}, indent=2) + '\n')
    (args.out / 'training_throughput.md').write_text(report)
    plot(training, args.out / 'training_throughput.png')
    print(report)
    print(f'wrote {args.out}/training_throughput.{{json,md,png}}')


if __name__ == '__main__':
    main()
