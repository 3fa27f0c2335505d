#!/usr/bin/env python3
r"""Probe the pixel track's SFT: expert demonstrations -> small VLA -> success on tuning states.

    demos   N scripted-expert TransferCube episodes with waypoint noise, rendered from the
            chosen cameras, in worker processes (failed ones dropped, as a teleoperator
            would); cached under --cache, so a second probe with the same cameras, image size,
            noise and step limit records only the seeds it lacks
    locator optional (--locator-steps > 0): an object locator trained on the kept demos'
            frames, labelled with the cube's true position, frozen inside the policy
    sft     the small VLA trained with habc_learner's Trainer (method sft) on the kept ones
    eval    K episodes of the policy alone (no operator) from TUNING states (seeds from
            habc_sim.bench.TUNE_SEED_BASE; never the held-out evaluation range)

Prints a progress bar per phase and one result line; writes the checkpoint and result.json
under --out. Example (about 15 minutes on 2 cores):

    python tools/probe_vision_sft.py --demos 120 --cameras top angle --sft-steps 3000 \
        --model token_grid=3 keypoints=32 augment_shift_px=4
"""

import argparse
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
import json
import os
from pathlib import Path
import sys
import time
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Job:
    """One demonstration (checkpoint '') or policy evaluation episode, in a worker."""

    seed: int
    cameras: tuple[str, ...]
    image_size: int
    max_steps: int
    demo_noise: float = 0.0
    checkpoint: str = ''
    execute_steps: int = 10


_POLICY: dict[str, Any] = {}


def run_job(job: Job) -> dict:
    """Run one episode in this worker process (one simulated robot per process)."""
    import torch

    from habc_sim.aloha import AlohaConfig
    from habc_sim.expert import ExpertConfig, run_expert_episode
    from habc_sim.rollouts import worker_env
    from habc_sim.runner import run_policy_episode, RunnerConfig

    torch.set_num_threads(1)
    env = worker_env(AlohaConfig(task='transfer_cube', cameras=list(job.cameras),
                                 image_size=job.image_size, max_steps=job.max_steps))
    if not job.checkpoint:
        return run_expert_episode(env, job.seed, ExpertConfig(waypoint_noise=job.demo_noise),
                                  record_track='pixels')
    if job.checkpoint not in _POLICY:
        from habc_policy.models.base import load_policy
        _POLICY.clear()
        _POLICY[job.checkpoint] = load_policy(Path(job.checkpoint)).eval()
    policy = _POLICY[job.checkpoint]
    _, summary = run_policy_episode(env, job.seed, policy.predict_action_chunk, None,
                                    RunnerConfig(track='pixels',
                                                 execute_steps=job.execute_steps))
    return summary


def cache_path(args: argparse.Namespace) -> Path:
    name = (f'transfer_cube-{"+".join(args.cameras)}-{args.image_size}px-'
            f'noise{args.demo_noise:g}-max{args.max_steps}-v2')  # v2: with object labels
    return args.cache / name


def load_cache(directory: Path) -> dict[int, dict]:
    """Return the demonstrations recorded so far, by seed (one .npz per seed)."""
    demos = {}
    for path in sorted(directory.glob('*.npz')) if directory.is_dir() else []:
        with np.load(path) as data:
            demo = {'seed': int(data['seed']), 'success': bool(data['success']),
                    'steps': int(data['steps'])}
            if demo['success']:
                demo.update(actions=data['actions'], objects=data['objects'], observations={
                    'state': data['state'], 'images': data['images']})
        demos[demo['seed']] = demo
    return demos


def save_demo(directory: Path, demo: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {'seed': demo['seed'], 'success': demo['success'], 'steps': demo['steps']}
    if demo['success']:  # a failed demonstration is only remembered, never trained on
        arrays.update(actions=demo['actions'], objects=demo['objects'],
                      state=demo['observations']['state'],
                      images=demo['observations']['images'])
    temporary = directory / f'.{demo["seed"]}.tmp.npz'
    np.savez(temporary, **arrays)
    temporary.replace(directory / f'{demo["seed"]}.npz')


def record_demos(args: argparse.Namespace) -> list[dict]:
    """N expert demonstrations (cached), in seed order."""
    from habc_sim.bench import DEMO_SEED_BASE
    from habc_sim.rollouts import run_parallel

    directory = cache_path(args)
    cached = load_cache(directory)
    seeds = [DEMO_SEED_BASE + 10_000 * args.seed + i for i in range(args.demos)]
    jobs = [Job(seed, tuple(args.cameras), args.image_size, args.max_steps, args.demo_noise)
            for seed in seeds if seed not in cached]
    for demo in run_parallel(run_job, jobs, args.workers, 'demos', not args.no_progress):
        save_demo(directory, demo)
        if not demo['success']:
            demo = {k: demo[k] for k in ('seed', 'success', 'steps')}
        cached[demo['seed']] = demo
    return [cached[seed] for seed in seeds]


def train_locator(args: argparse.Namespace, demos: list[dict]):
    """Train the object locator on every --locator-stride-th frame of the kept demos."""
    from dataclasses import replace

    import torch

    from habc_sim.bench import PROFILES
    from habc_sim.bench import train_locator as fit_on_demos

    torch.set_num_threads(args.threads)
    profile = replace(PROFILES['pixels'], cameras=tuple(args.cameras),
                      image_size=args.image_size, locator_steps=args.locator_steps,
                      locator_stride=args.locator_stride)
    return fit_on_demos(demos, profile, args.seed, progress=not args.no_progress)


def train(args: argparse.Namespace, demos: list[dict], checkpoint: Path,
          locator=None) -> dict:
    """SFT of the small VLA on the successful demonstrations; return the last metrics."""
    from dataclasses import asdict

    import torch

    from habc_episodes.episode import Episode
    from habc_episodes.vocabulary import EpisodeKind, Outcome, STARTUP_VERSION
    from habc_learner.methods import MethodConfig
    from habc_learner.policies import new_policy
    from habc_learner.trainer import seed_everything, TrainConfig, Trainer
    from habc_sim.aloha import INSTRUCTIONS

    torch.set_num_threads(args.threads)
    method = MethodConfig(method='sft', horizon=args.horizon)
    buffer = method.make_buffer()
    for demo in demos:
        buffer.add(Episode(observations=demo['observations'], actions=demo['actions'],
                           controllers=['human'] * len(demo['actions']),
                           outcome=Outcome.SUCCESS, instruction=INSTRUCTIONS['transfer_cube'],
                           kind=EpisodeKind.DEMO, episode_id=f'demo-{demo["seed"]}'))
    seed_everything(args.seed)
    overrides = dict(args.model)
    if locator is not None:
        overrides['locator'] = asdict(locator.config)
    policy = new_policy('vla', 14, 14, (len(args.cameras), args.image_size, args.image_size),
                        horizon=args.horizon, overrides=overrides)
    if locator is not None:
        policy.locator.load_state_dict(locator.state_dict())
    trainer = Trainer(policy, buffer, method,
                      TrainConfig(steps=args.sft_steps, batch_size=args.batch_size,
                                  actor_lr=args.lr, seed=args.seed),
                      progress=not args.no_progress)
    metrics = trainer.fit(description='sft')
    trainer.save_checkpoint(checkpoint, version=STARTUP_VERSION)
    return metrics


def evaluate(args: argparse.Namespace, checkpoint: Path) -> list[dict]:
    """Run the policy alone on K tuning states; return the episode summaries."""
    from habc_sim.bench import EVAL_SEED_BASE, TUNE_SEED_BASE
    from habc_sim.rollouts import run_parallel

    seeds = [TUNE_SEED_BASE + i for i in range(args.eval_episodes)]
    if seeds and seeds[-1] >= EVAL_SEED_BASE:
        raise ValueError('the tuning range ends where the held-out states begin')
    jobs = [Job(seed, tuple(args.cameras), args.image_size, args.max_steps,
                checkpoint=str(checkpoint.resolve()), execute_steps=args.execute_steps)
            for seed in seeds]
    results: list[dict] = []
    for attempt in range(2):  # once more after a worker died (seen once, cause unknown)
        try:
            for result in run_parallel(run_job, jobs[len(results):], args.workers, 'eval',
                                       not args.no_progress):
                results.append(result)
            break
        except BrokenProcessPool:
            if attempt:
                raise
            print(f'probe: a worker died after {len(results)} evaluation episodes; running '
                  'the rest in new workers', file=sys.stderr)
    return results


def _model_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition('=')
    if not sep:
        raise argparse.ArgumentTypeError(f'expected KEY=VALUE, got {text!r}')
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--demos', type=int, default=120, help='demonstrations recorded')
    parser.add_argument('--demo-noise', type=float, default=0.01,
                        help='waypoint noise (m) of the demonstrations (default 0.01)')
    parser.add_argument('--cameras', nargs='+', default=['top', 'angle'],
                        help='camera names (habc_sim.aloha.CAMERAS; default top angle)')
    parser.add_argument('--image-size', type=int, default=96)
    parser.add_argument('--max-steps', type=int, default=400, help='episode step limit')
    parser.add_argument('--sft-steps', type=int, default=3000)
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--lr', type=float, default=1e-3, help='actor learning rate')
    parser.add_argument('--horizon', type=int, default=20, help='chunk length H')
    parser.add_argument('--execute-steps', type=int, default=10,
                        help='actions executed per chunk before the next inference')
    parser.add_argument('--model', nargs='*', type=_model_override, default=[],
                        metavar='KEY=VALUE',
                        help='SmallVLAConfig values, JSON-parsed (e.g. token_grid=3 '
                        'keypoints=32 augment_shift_px=4 cnn_channels=[16,32,64,64])')
    parser.add_argument('--locator-steps', type=int, default=0,
                        help='train an object locator this many steps first and freeze it '
                        'inside the policy (0: none)')
    parser.add_argument('--locator-stride', type=int, default=2,
                        help='every how many frames of a demonstration the locator sees')
    parser.add_argument('--eval-episodes', type=int, default=30,
                        help='tuning states evaluated (default 30)')
    parser.add_argument('--seed', type=int, default=0, help='demonstration and training seed')
    parser.add_argument('--workers', type=int, default=2,
                        help='worker processes for demonstrations and evaluation')
    parser.add_argument('--threads', type=int, default=1, help='torch threads for training')
    parser.add_argument('--cache', type=Path, default=Path('/tmp/habc_probe_demos'),
                        help='demonstration cache folder (default /tmp/habc_probe_demos)')
    parser.add_argument('--out', type=Path, default=Path('/tmp/habc_probe'),
                        help='checkpoint and result.json folder (default /tmp/habc_probe)')
    parser.add_argument('--checkpoint', type=Path,
                        help='evaluate this checkpoint only (no demonstrations, no SFT)')
    parser.add_argument('--no-progress', action='store_true')
    args = parser.parse_args(argv)
    args.model = dict(args.model)
    for name in ('demos', 'image_size', 'max_steps', 'sft_steps', 'batch_size', 'horizon',
                 'execute_steps', 'eval_episodes', 'workers', 'threads', 'locator_stride'):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be >= 1')
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    args.out.mkdir(parents=True, exist_ok=True)
    times = {}
    if args.checkpoint:
        start = time.monotonic()
        results = evaluate(args, args.checkpoint)
        successes = sum(r['success'] for r in results)
        print(f'probe: success {successes}/{len(results)} on tuning states | eval '
              f'{time.monotonic() - start:.0f} s | {args.checkpoint}', flush=True)
        return 0
    start = time.monotonic()
    demos = record_demos(args)
    times['demos_s'] = time.monotonic() - start
    kept = [d for d in demos if d['success']]
    if not kept:
        print('probe: no successful demonstration; lower --demo-noise', file=sys.stderr)
        return 1
    locator, locator_metrics = None, {}
    if args.locator_steps:
        start = time.monotonic()
        locator, locator_metrics = train_locator(args, kept)
        times['locator_s'] = time.monotonic() - start
        print(f'probe: locator on {locator_metrics["frames"]} frames, error train '
              f'{locator_metrics["train_error_cm"]} cm, held-out '
              f'{locator_metrics["heldout_error_cm"]} cm', flush=True)
    start = time.monotonic()
    try:
        metrics = train(args, kept, args.out / 'sft', locator)
    except ValueError as exc:
        print(f'probe: {exc}', file=sys.stderr)
        return 2
    times['sft_s'] = time.monotonic() - start
    start = time.monotonic()
    results = evaluate(args, args.out / 'sft')
    times['eval_s'] = time.monotonic() - start
    successes = sum(r['success'] for r in results)
    lengths = [r['steps'] for r in results if r['success']]
    result = {'successes': successes, 'episodes': len(results),
              'demos_kept': len(kept), 'demos': len(demos),
              'actor_loss': metrics.get('losses/actor'),
              'mean_success_steps': float(np.mean(lengths)) if lengths else None,
              'locator': locator_metrics,
              **{k: round(v, 1) for k, v in times.items()},
              'args': {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    (args.out / 'result.json').write_text(json.dumps(result, indent=1) + '\n')
    print(f'probe: success {successes}/{len(results)} on tuning states | demos '
          f'{len(kept)}/{len(demos)} kept, {times["demos_s"]:.0f} s | sft {args.sft_steps} steps '
          f'x {args.batch_size}, loss {result["actor_loss"]:.4f}, {times["sft_s"]:.0f} s | eval '
          f'{times["eval_s"]:.0f} s | {"+".join(args.cameras)} {args.image_size}px lr {args.lr:g}'
          f' H {args.horizon}/{args.execute_steps} model {json.dumps(args.model)}', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
