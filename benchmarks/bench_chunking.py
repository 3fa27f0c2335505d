#!/usr/bin/env python3
"""Real-time chunking vs receding horizon vs temporal ensembling, closed loop in simulation.

On the simulated ALOHA TransferCube (state track: 14 joints + the cube's position), one
flow-matching policy drives the robot through habc_policy.chunk_executor.ChunkExecutor, on a
VIRTUAL clock of 50 Hz control ticks with a simulated inference delay of d ticks: the chunk
planned from the observation of tick t becomes available at tick t + d while the robot keeps
executing the previous plan (one inference in flight at a time, started when the executor asks
for one, as the policy node does; a tick with nothing due holds the last command). Modes:

  receding  the executor's receding horizon: the first k actions of each chunk
  ensemble  ACT's temporal ensembling over every chunk covering a tick (query continuously)
  rtc       receding horizon, and each chunk sampled with real-time chunking's guided prefix
            (arXiv 2506.07339): the newest plan's actions from the new chunk's first due time
            on (ChunkExecutor.planned_actions), the first `delay` of them committed; delay =
            the executor's measured delay (actions consumed during inference, cold start left
            out), the simulated d before the first measurement

k = min(H, max(10, 2 d)) and the next inference starts when d actions remain (the latency
trigger; min_remaining_steps d + 1 before the first delay measurement): with one inference in
flight a chunk must cover 2 d ticks, so at d = 15 (H = 20) the robot holds between chunks.
Per mode and delay: success over N held-out initial states (seeds 2,000,000 + i, never used
for demonstrations or tuning; the sampling noise scale was picked on tuning seeds
1,000,000 + i), the executed command's jerk (third difference; RMS overall, within 3 ticks
after a chunk boundary, elsewhere), the
velocity jump at boundaries (|delta a| at the boundary minus |delta a| one tick before; norms
over the 12 arm joints' commands in rad, the grippers left out: they open and close in
steps), hold ticks, and the wall time of each predict_action_chunk call (1 torch thread),
guided or not.

The policy: LowDimFlowPolicy (hidden 512, H = 20) trained on 50 clean scripted demonstrations
for 8000 steps (~4-5 CPU minutes here), sampled with noise_scale 0.25. At noise_scale 1 it
succeeded on 0 of 20 tuning states (its samples are too noisy to grasp), at 0.25 on 14, at 0.1
on 18 (bench notes in LowDimFlowConfig); 0.25 keeps the samples stochastic, which is where
chunk seams come from. The benchmark state track's L2 regressor is not a flow policy.

    python benchmarks/bench_chunking.py [--episodes 50] [--delays 0 3 6 15] \
        [--checkpoint DIR] [--out benchmarks/results]
"""

import argparse
from dataclasses import replace
import json
import os
from pathlib import Path
import platform
import subprocess
import sys
import time

import numpy as np

MODES = ('receding', 'ensemble', 'rtc')
PERIOD = 0.02
HORIZON = 20
DEMOS = 50
TRAIN_STEPS = 8000
NOISE_SCALE = 0.25
MAX_STEPS = 400
BOUNDARY_TICKS = 3  # a jump at tick t shows in the third differences of t, t + 1, t + 2


def train_policy(directory: Path, progress: bool) -> None:
    """Record clean demonstrations and train the flow policy into `directory`."""
    import torch
    from tqdm.auto import tqdm

    from habc_episodes.vocabulary import PolicyVersion
    from habc_learner.methods import MethodConfig
    from habc_learner.trainer import TrainConfig, Trainer
    from habc_policy.models.lowdim import LowDimFlowConfig, LowDimFlowPolicy
    from habc_sim.bench import demo_episodes, DEMO_SEED_BASE, EpisodeJob, run_job

    torch.set_num_threads(1)
    jobs = [EpisodeJob('transfer_cube', 'state', DEMO_SEED_BASE + i, MAX_STEPS, 96, ('angle',))
            for i in range(DEMOS)]
    demos = demo_episodes([run_job(job) for job in tqdm(jobs, desc='demos', disable=not progress)],
                          'transfer_cube')
    config = MethodConfig(method='sft', horizon=HORIZON)
    buffer = config.make_buffer()
    for episode in demos:
        buffer.add(episode)
    policy = LowDimFlowPolicy(LowDimFlowConfig(
        state_dim=17, action_dim=14, horizon=HORIZON, feature_dim=512, hidden_dim=512,
        num_layers=3, noise_scale=NOISE_SCALE))
    trainer = Trainer(policy, buffer, config,
                      TrainConfig(steps=TRAIN_STEPS, batch_size=256, actor_lr=1e-3, seed=0),
                      progress=progress)
    trainer.fit(description='train flow policy')
    trainer.save_checkpoint(directory, version=PolicyVersion.parse('1:flow'))


def load_flow_policy(directory: Path):
    """Load the checkpoint with the benchmark's sampling noise scale."""
    from habc_policy.models.base import load_policy
    from habc_policy.models.lowdim import LowDimFlowPolicy

    policy = load_policy(directory)
    if policy.config.noise_scale != NOISE_SCALE:  # e.g. a checkpoint trained elsewhere
        state = policy.state_dict()
        policy = LowDimFlowPolicy(replace(policy.config, noise_scale=NOISE_SCALE))
        policy.load_state_dict(state)
    return policy.eval()


def execute_steps_for(delay: int) -> int:
    """Return k: with one inference in flight a chunk must cover 2 d ticks (else holds)."""
    return min(HORIZON, max(10, 2 * delay))


def executor_for(mode: str, delay: int):
    from habc_policy.chunk_executor import ChunkExecutor, ChunkExecutorParams

    if mode == 'ensemble':
        params = ChunkExecutorParams(control_period_s=PERIOD, mode='ensemble',
                                     stale_after_s=0.75 * PERIOD, min_remaining_steps=HORIZON,
                                     execute_steps=HORIZON)
    else:
        params = ChunkExecutorParams(control_period_s=PERIOD, mode='receding',
                                     execute_steps=execute_steps_for(delay),
                                     stale_after_s=0.75 * PERIOD,
                                     min_remaining_steps=delay + 1,
                                     latency_trigger=True, latency_margin_steps=1)
    return ChunkExecutor(params)


def rtc_prefix(executor, start_time: float,
               delay_estimate: int) -> tuple[np.ndarray, int] | None:
    """Return the guided prefix for a chunk whose step 0 is due at start_time, and its delay.

    The newest plan from start_time on (the whole chunk, not only its executed steps). Of
    its first `delay` actions (committed: they run while the inference does), those past the
    end of the queued ones are replaced by the last queued one: the robot holds there.
    """
    planned = executor.planned_actions(start_time, HORIZON)
    if planned is None or len(planned) == 0:
        return None
    planned = np.array(planned, dtype=np.float64)
    end = executor.plan_end()
    if end is not None:
        queued = int(round((end - start_time) / PERIOD)) + 1  # rows of `planned` queued
        if 0 < queued < len(planned):
            planned[queued:min(delay_estimate, len(planned))] = planned[queued - 1]
    return planned, min(delay_estimate, len(planned))


def run_episode(env, policy, mode: str, delay: int, seed: int) -> dict:
    """One episode on the virtual clock; returns metrics and the executed commands."""
    import torch

    from habc_episodes.vocabulary import STARTUP_VERSION
    from habc_sim.aloha import policy_observation

    executor = executor_for(mode, delay)
    generator = torch.Generator().manual_seed(seed)
    observation = env.reset(seed)
    pending = None  # (arrival tick, observed tick, chunk)
    chunk_id = 0
    commands, sources, latencies = [], [], []
    last = np.asarray(observation['state'], dtype=np.float64)
    holds = 0
    step = 0
    while True:
        if pending is not None and pending[0] <= step:
            _, observed, chunk = pending
            pending = None
            chunk_id += 1
            executor.add_chunk(chunk, (observed + 1) * PERIOD, PERIOD, STARTUP_VERSION, chunk_id)
        if pending is None and executor.needs_inference(step * PERIOD):
            seen = policy_observation(observation, 'state')
            prefix, committed = None, 0
            if mode == 'rtc':
                measured = executor.delay_steps
                found = rtc_prefix(executor, (step + 1) * PERIOD,
                                   delay if measured is None else measured)
                if found is not None:
                    prefix, committed = found
            start = time.perf_counter()
            chunk = policy.predict_action_chunk(seen, prefix=prefix, delay=committed,
                                                generator=generator)
            latencies.append((prefix is not None, 1000 * (time.perf_counter() - start)))
            pending = (step + delay, step, chunk)
            if delay == 0:
                continue  # lands at this tick: handled at the top of the loop
        scheduled = executor.next_action((step + 1) * PERIOD)
        if scheduled is None:
            holds += 1
            action, source = last, -1
        else:
            action, source = np.asarray(scheduled.action, dtype=np.float64), scheduled.chunk_id
        commands.append(action)
        sources.append(source)
        last = action
        result = env.step(action)
        observation = result.observation
        step += 1
        if result.success or result.truncated:
            break
    return {'seed': seed, 'success': bool(result.success), 'steps': step, 'holds': holds,
            'commands': np.stack(commands), 'sources': np.array(sources),
            'latencies': latencies, 'stale_dropped': executor.counters['stale_dropped']}


ARM_JOINTS = [0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12]  # the grippers open and close in steps


def fill_holds(sources: np.ndarray) -> np.ndarray:
    """Chunk id per tick, a hold (-1) counted as part of the chunk it holds the end of."""
    filled = sources.copy()
    for t in range(1, len(filled)):
        if filled[t] < 0:
            filled[t] = filled[t - 1]
    return filled


def smoothness(commands: np.ndarray, sources: np.ndarray) -> dict:
    """Jerk and velocity-jump statistics of one episode's executed arm-joint commands."""
    arm = commands[:, ARM_JOINTS]
    velocity = np.linalg.norm(np.diff(arm, axis=0), axis=1)      # |delta a_t|, t >= 1
    jerk = np.linalg.norm(np.diff(arm, n=3, axis=0), axis=1)     # at t >= 3
    # A boundary: the first tick of a new chunk (its newest contributor, in ensemble mode).
    sources = fill_holds(sources)
    boundary = [t for t in range(1, len(sources))
                if sources[t] != sources[t - 1] and sources[t - 1] >= 0]
    near = np.zeros(len(commands), dtype=bool)
    for t in boundary:
        near[t:t + BOUNDARY_TICKS] = True
    near_jerk = near[3:]
    jumps = [velocity[t - 1] - velocity[t - 2] for t in boundary if t >= 2]
    return {'jerk_sq': jerk ** 2, 'near': near_jerk, 'jumps': jumps,
            'boundaries': len(boundary)}


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def cell_summary(episodes: list[dict]) -> dict:
    jerk_sq = np.concatenate([e['smooth']['jerk_sq'] for e in episodes])
    near = np.concatenate([e['smooth']['near'] for e in episodes])
    jumps = [j for e in episodes for j in e['smooth']['jumps']]
    plain = [ms for e in episodes for guided, ms in e['latencies'] if not guided]
    guided = [ms for e in episodes for guided, ms in e['latencies'] if guided]
    successes = sum(e['success'] for e in episodes)
    return {
        'episodes': len(episodes), 'successes': successes,
        'success_rate': successes / len(episodes),
        'jerk_rms': float(np.sqrt(jerk_sq.mean())),
        'jerk_rms_boundary': float(np.sqrt(jerk_sq[near].mean())) if near.any() else None,
        'jerk_rms_inside': float(np.sqrt(jerk_sq[~near].mean())) if (~near).any() else None,
        'velocity_jump_mean': float(np.mean(jumps)) if jumps else None,
        'velocity_jump_p90': percentile(jumps, 90),
        'boundaries_per_episode': float(np.mean([e['smooth']['boundaries'] for e in episodes])),
        'hold_ticks_per_episode': float(np.mean([e['holds'] for e in episodes])),
        'latency_ms_unguided_p50': percentile(plain, 50),
        'latency_ms_unguided_p99': percentile(plain, 99),
        'latency_ms_guided_p50': percentile(guided, 50),
        'latency_ms_guided_p99': percentile(guided, 99),
        'calls_unguided': len(plain), 'calls_guided': len(guided),
    }


def fmt(value, spec: str = '.3f') -> str:
    return '-' if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    lines = ['| mode | d | k | success | jerk RMS | jerk at boundaries | jerk inside | '
             'velocity jump at boundaries (mean / p90) | holds / ep | latency ms p50 / p99 |',
             '|---|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        s = r['summary']
        if r['mode'] == 'rtc':
            latency = (f"{fmt(s['latency_ms_guided_p50'], '.2f')} / "
                       f"{fmt(s['latency_ms_guided_p99'], '.2f')} (guided)")
        else:
            latency = (f"{fmt(s['latency_ms_unguided_p50'], '.2f')} / "
                       f"{fmt(s['latency_ms_unguided_p99'], '.2f')}")
        lines.append(
            f"| {r['mode']} | {r['delay']} | {r['execute_steps']} | {s['successes']}/"
            f"{s['episodes']} ({100 * s['success_rate']:.0f}%) | {fmt(s['jerk_rms'])} | "
            f"{fmt(s['jerk_rms_boundary'])} | {fmt(s['jerk_rms_inside'])} | "
            f"{fmt(s['velocity_jump_mean'])} / {fmt(s['velocity_jump_p90'])} | "
            f"{s['hold_ticks_per_episode']:.1f} | {latency} |")
    return '\n'.join(lines)


def plot(rows: list[dict], traces: dict, path: Path, delays: list[int]) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    colors = {'receding': 'tab:blue', 'ensemble': 'tab:orange', 'rtc': 'tab:green'}
    ax = axes[0]
    for mode, trace in traces.items():
        commands, sources = trace['commands'], trace['sources']
        joint = trace['joint']
        ticks = np.arange(len(commands))
        ax.plot(ticks, commands[:, joint], color=colors[mode], label=mode, lw=1.2)
        edges = [t for t in range(1, len(sources)) if sources[t] != sources[t - 1]]
        ax.plot(edges, commands[edges, joint], 'o', color=colors[mode], ms=3)
    ax.set_title(f'executed command, joint {traces["rtc"]["joint"]} '
                 f'(seed {traces["rtc"]["seed"]}, d = {traces["rtc"]["delay"]}; '
                 'dots: chunk boundaries)', fontsize=9)
    ax.set_xlabel('control tick (20 ms)')
    ax.set_ylabel('rad')
    ax.legend(fontsize=8)
    for ax, key, title in ((axes[1], 'jerk_rms_boundary', 'jerk RMS at chunk boundaries'),
                           (axes[2], 'success_rate', 'task success')):
        for mode in MODES:
            values = [next(r['summary'][key] for r in rows
                           if r['mode'] == mode and r['delay'] == d) for d in delays]
            ax.plot(delays, [np.nan if v is None else v for v in values], 'o-',
                    color=colors[mode], label=mode)
        ax.set_xlabel('inference delay d (ticks of 20 ms)')
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def git_commit() -> str:
    try:
        head = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no', '--',
                                'benchmarks/bench_chunking.py', 'src/habc_policy'],
                               capture_output=True, text=True).stdout.strip()
        return head + (' (with uncommitted changes under src/habc_policy or this script)'
                       if dirty else '')
    except (OSError, subprocess.CalledProcessError):
        return 'unknown'


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--episodes', type=int, default=50, help='evaluation states per cell')
    parser.add_argument('--delays', type=int, nargs='+', default=[0, 3, 6, 15])
    parser.add_argument('--modes', nargs='+', default=list(MODES), choices=MODES)
    parser.add_argument('--checkpoint', type=Path, default=Path('runs/bench_chunking/policy'),
                        help='the flow policy; trained here first when the folder is empty')
    parser.add_argument('--out', type=Path, default=Path('benchmarks/results'))
    parser.add_argument('--no-progress', action='store_true')
    args = parser.parse_args(argv)
    progress = not args.no_progress

    import torch
    from tqdm.auto import tqdm

    from habc_sim.aloha import AlohaConfig, AlohaEnv
    from habc_sim.bench import EVAL_SEED_BASE

    torch.set_num_threads(1)
    started = time.time()
    trained_here = not (args.checkpoint / 'model.safetensors').is_file()
    if trained_here:
        train_policy(args.checkpoint, progress)
    train_s = time.time() - started
    policy = load_flow_policy(args.checkpoint)
    env = AlohaEnv(AlohaConfig(task='transfer_cube', cameras=[], max_steps=MAX_STEPS))
    rows, traces = [], {}
    cells = [(mode, delay) for delay in args.delays for mode in args.modes]
    bar = tqdm(total=len(cells) * args.episodes, desc='episodes', disable=not progress,
               dynamic_ncols=True)
    trace_delay = 6 if 6 in args.delays else args.delays[0]
    for mode, delay in cells:
        episodes = []
        for i in range(args.episodes):
            episode = run_episode(env, policy, mode, delay, EVAL_SEED_BASE + i)
            episode['smooth'] = smoothness(episode['commands'], episode['sources'])
            if delay == trace_delay and i == 0:
                traces[mode] = {'commands': episode['commands'][:200],
                                'sources': episode['sources'][:200], 'joint': 1,
                                'seed': episode['seed'], 'delay': delay}
            episodes.append(episode)
            bar.update()
        summary = cell_summary(episodes)
        bar.set_postfix(mode=mode, d=delay, success=summary['successes'])
        rows.append({'mode': mode, 'delay': delay, 'execute_steps': (
            HORIZON if mode == 'ensemble' else execute_steps_for(delay)), 'summary': summary,
            'per_episode': [{'seed': e['seed'], 'success': e['success'], 'steps': e['steps'],
                             'holds': e['holds'], 'stale_dropped': e['stale_dropped']}
                            for e in episodes]})
    bar.close()
    env.close()
    args.out.mkdir(parents=True, exist_ok=True)
    command = 'python benchmarks/bench_chunking.py ' + ' '.join(argv or sys.argv[1:])
    meta = {'command': command.strip(), 'commit': git_commit(),
            'machine': f'{platform.machine()}, {os.cpu_count()} CPU cores, torch threads 1',
            'policy': {'checkpoint': str(args.checkpoint), 'trained_here': trained_here,
                       'train_s': round(train_s, 1), 'demos': DEMOS, 'train_steps': TRAIN_STEPS,
                       'noise_scale': NOISE_SCALE, 'horizon': HORIZON},
            'episodes_per_cell': args.episodes, 'eval_seeds': f'{EVAL_SEED_BASE}..'
            f'{EVAL_SEED_BASE + args.episodes - 1}', 'wall_s': round(time.time() - started, 1)}
    (args.out / 'chunking.json').write_text(json.dumps({**meta, 'rows': rows}, indent=2) + '\n')
    text = table(rows)
    (args.out / 'chunking.md').write_text(
        '# Real-time chunking vs receding horizon vs temporal ensembling\n\n'
        f'Command: `{meta["command"]}` on commit {meta["commit"]}; {meta["machine"]}; '
        f'{args.episodes} held-out TransferCube states per cell (seeds {meta["eval_seeds"]}); '
        f'wall time {meta["wall_s"]:.0f} s (policy training {train_s:.0f} s).\n\n'
        + text + '\n\n![trajectories, jerk and success vs delay](chunking.png)\n')
    plot(rows, traces, args.out / 'chunking.png', args.delays)
    print(text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
