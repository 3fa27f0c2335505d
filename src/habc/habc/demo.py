"""`habc demo`: the user's main job on the simulated robot, end to end, from a fresh clone.

1. If no SFT checkpoint exists in the output folder, record demonstrations with the scripted
   expert (images + joints + instruction) and train the small VLA on them (version 1); with
   --backbone, a TransformersVLA on that local VLM folder instead (its frozen prefix and a
   flow-matching action expert; slow on CPU with a real VLM: lower --sft-steps or use a GPU).
2. Start the closed loop with `habc launch bringup` (sim robot, sync, policy, arbiter,
   recorder, scripted operator, learner) on a parameter file written for this run.
3. Watch it: each time the learner's new weights go live in the policy node, print a table
   row for the version that just finished (episodes, success %, interventions, update
   latency); at the end write summary.json and a PNG plot per policy version.
"""

import argparse
from dataclasses import dataclass, field, replace
import json
import os
from pathlib import Path
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import yaml

from habc_common.checkpoints import DEMO_OUT, SFT_NAME
from habc_episodes.stats import wilson_interval
from habc_episodes.vocabulary import PolicyVersion, STARTUP_VERSION

HELP = __doc__


@dataclass
class DemoConfig:
    """Budgets of one demo run (defaults finish within about 20 minutes on 2 CPU cores)."""

    out: Path
    task: str = 'transfer_cube'
    # The pixel track's SFT recipe at a smaller budget: demonstrations with 1 cm waypoint
    # noise (variety the policy learns to recover from), two cameras, an object locator.
    demos: int = 60
    demo_noise: float = 0.01
    sft_steps: int = 3000
    batch_size: int = 32
    cameras: tuple[str, ...] = ('top', 'angle')
    rounds: int = 2
    episodes_per_round: int = 4
    steps_per_round: int = 60
    max_steps: int = 400
    method: str = 'habc'
    # The learner's actor learning rate: the pixel track's online rate (habc_sim.bench,
    # profile 'pixels'; at SFT's 1e-3 a few hundred steps undo the SFT policy).
    actor_lr: float = 1e-4
    takeover_probability: float = 0.5
    workers: int = 2
    timeout_s: float = 1500.0
    # A local VLM folder: the SFT policy is a TransformersVLA on it (None: the small VLA).
    backbone: Path | None = None


@dataclass
class VersionRow:
    """One row of the table: a policy version's labelled episodes and its update latency."""

    version: str
    episodes: int = 0
    successes: int = 0
    interventions: int = 0
    update_latency_s: float | None = None   # PolicyUpdate received -> live in the policy

    @property
    def success_rate(self) -> float:
        return self.successes / self.episodes if self.episodes else 0.0


@dataclass
class Monitor:
    """Receipt times of weight updates and of their activation in the policy node."""

    updates: dict[str, float] = field(default_factory=dict)
    activations: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def latency(self, version: str) -> float | None:
        with self.lock:
            if version in self.updates and version in self.activations:
                return self.activations[version] - self.updates[version]
        return None


def set_aside_if_stale(checkpoint: Path, cameras: tuple[str, ...],
                       backbone: Path | None = None) -> None:
    """Rename an SFT checkpoint of another recipe out of the way.

    Without `backbone` the recipe is the small VLA with a locator on `cameras`; with it, a
    transformers_vla policy on that folder and those cameras. A checkpoint of the other kind
    is not reused: the user asked for this one. It is kept (renamed to sft-old-<time>), never
    deleted; the demo then trains a new one.
    """
    config_path = checkpoint / 'config.json'
    if not config_path.is_file():
        return
    try:
        meta = json.loads(config_path.read_text())
    except json.JSONDecodeError:
        meta = {}
    config = meta.get('config', {})
    views = config.get('num_views')
    if backbone is None:
        if views == len(cameras) and config.get('locator'):
            return
        recipe = f'locator: {"yes" if config.get("locator") else "no"}'
    else:
        trained_on = config.get('backbone_dir') or ''
        if (meta.get('type') == 'transformers_vla' and views == len(cameras)
                and trained_on and Path(trained_on) == backbone.expanduser().resolve()):
            return
        recipe = f'backbone: {trained_on or "none"}'
    aside = checkpoint.with_name(f'{checkpoint.name}-old-{time.strftime("%Y%m%d-%H%M%S")}')
    checkpoint.rename(aside)
    target = f' on {backbone}' if backbone is not None else ''
    print(f'[demo] {checkpoint} was trained by an older recipe ({views} camera(s), {recipe}); '
          f'kept as {aside}, training a new one for cameras {list(cameras)}{target}',
          flush=True)


def sft_profile(config: DemoConfig) -> Any:
    """Return the pixel track's SFT profile (habc_sim.bench) at the demo's budgets."""
    from habc_sim import bench

    return replace(bench.PROFILES['pixels'], max_steps=config.max_steps, demos=config.demos,
                   demo_noise=config.demo_noise, sft_steps=config.sft_steps,
                   batch_size=config.batch_size, cameras=config.cameras)


def train_backbone_sft(config: DemoConfig, profile: Any, checkpoint: Path) -> None:
    """Record the expert demonstrations and train a TransformersVLA on `config.backbone`.

    The same recording (demonstration seeds and noise) and SFT budget as the small VLA's,
    with the policy on the backbone, on the GPU when there is one (a pretrained VLM's prefix
    is the cost of every step). Writes version 1 to `checkpoint`.

    Raises:
        RuntimeError: no demonstration succeeded.
    """
    import torch

    from habc_sim import bench

    bench.train_sft(config.task, 'pixels', 0, profile, checkpoint, version=STARTUP_VERSION,
                    workers=config.workers, policy_kind='transformers_vla',
                    policy_overrides={'backbone_dir': str(config.backbone)},
                    device='cuda' if torch.cuda.is_available() else 'cpu')


def write_params(config: DemoConfig, checkpoint: Path, out: Path) -> Path:
    """Write the run's parameter file, layered over config/params/*.yaml (params_file:=)."""
    out = out.resolve()
    # The operator runs episodes until the demo stops the loop (once the last version has
    # run its episodes): updates arrive while episodes go on, so no fixed count fits.
    episodes = 0
    params = {
        '/**/sim_robot': {'task': config.task, 'max_steps': config.max_steps,
                          'cameras': list(config.cameras)},
        '/**/sync': {'cameras': list(config.cameras)},
        '/**/policy': {'checkpoint': str(checkpoint.resolve()), 'torch_threads': 1},
        '/**/episode_recorder': {'storage_dir': str(out / 'episodes')},
        '/**/scripted_operator': {'episodes': episodes, 'max_steps': config.max_steps,
                                  'takeover_probability': config.takeover_probability},
        '/**/learner': {'index_path': str(out / 'episodes' / 'episodes.sqlite'),
                        'work_dir': str(out / 'learner'),
                        'init_checkpoint': str(checkpoint.resolve()),
                        'method': config.method,
                        'episodes_per_round': config.episodes_per_round,
                        'steps_per_round': config.steps_per_round,
                        'batch_size': config.batch_size, 'actor_lr': config.actor_lr,
                        'torch_threads': 1},
    }
    path = out / 'params.yaml'
    path.write_text(yaml.safe_dump({k: {'ros__parameters': v} for k, v in params.items()},
                                   sort_keys=False))
    return path


def _start_monitor(monitor: Monitor):
    """Subscribe to weight updates and policy status in a background rclpy thread."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.signals import SignalHandlerOptions
    from std_msgs.msg import String

    from habc_common.qos import LATCHED
    from habc_msgs.msg import PolicyUpdate

    # Ctrl-C reaches the main loop as KeyboardInterrupt; rclpy's signal thread would race
    # the executor's shutdown below (habc_common.node_main.StopRequest says how).
    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    node = rclpy.create_node('habc_demo_monitor')

    def on_update(msg: PolicyUpdate) -> None:
        with monitor.lock:
            monitor.updates.setdefault(str(msg.version), time.monotonic())

    def on_status(msg: String) -> None:
        try:
            version = json.loads(msg.data).get('active_version') or ''
        except json.JSONDecodeError:
            return
        if not version:  # no weights yet
            return
        with monitor.lock:
            monitor.activations.setdefault(version, time.monotonic())

    node.create_subscription(PolicyUpdate, 'policy/update', on_update, LATCHED)
    node.create_subscription(String, 'policy/status', on_status, LATCHED)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    thread = threading.Thread(target=executor.spin, daemon=True)
    thread.start()
    return executor, node


def _number(version: str) -> int:
    """Return the number of a version text; -1 for no version ('none', '')."""
    return -1 if version in ('', 'none') else PolicyVersion.parse(version).number


def version_stats(index_path: Path, monitor: Monitor) -> list[VersionRow]:
    """Finished, labelled episodes grouped by the policy version that ran them."""
    from habc_episodes.index import EpisodeIndex
    from habc_episodes.stats import version_stats as stats_per_version
    if not index_path.exists():
        return []
    with EpisodeIndex(index_path) as index:
        records = index.list()
    # 'none' = no chunk seen during the episode: the policy never acted in it.
    return [VersionRow(s.version, s.labelled, s.successes, s.takeovers,
                       monitor.latency(s.version))
            for s in stats_per_version(records, labelled_only=True, no_version='none')]


def format_row(row: VersionRow) -> str:
    latency = (f'{row.update_latency_s:.2f} s' if row.update_latency_s is not None
               else '- (initial)' if row.version == str(STARTUP_VERSION) else '-')
    low, high = wilson_interval(row.successes, row.episodes)
    interval = f'{100 * low:.0f}-{100 * high:.0f}%'
    return (f'| {row.version:>7} | {row.episodes:>8} | {100 * row.success_rate:>8.0f}% | '
            f'{interval:>12} | {row.interventions:>13} | {latency:>14} |')


TABLE_HEADER = ('| version | episodes |  success |   Wilson 95% | interventions | update latency |'
                '\n|--------:|---------:|---------:|-------------:|--------------:|---------------:|')


def plot(rows: list[VersionRow], path: Path) -> None:
    """Success rate and interventions per episode for each policy version."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    versions = [r.version for r in rows]
    rates = [r.success_rate for r in rows]
    intervals = [wilson_interval(r.successes, r.episodes) for r in rows]
    # Points with their interval, not bars: a 0% version stays visible, with how little
    # its few episodes say. Clipped at 0: at 100% the Wilson bound can round to just
    # below the rate, and matplotlib refuses a negative error.
    below = [max(0.0, rate - low) for rate, (low, _) in zip(rates, intervals, strict=True)]
    above = [max(0.0, high - rate) for rate, (_, high) in zip(rates, intervals, strict=True)]
    ax.errorbar(versions, rates, yerr=[below, above],
                fmt='o', color='tab:green', capsize=4, label='success (Wilson 95%)')
    for version, rate, row in zip(versions, rates, rows, strict=True):
        ax.annotate(f'{row.successes}/{row.episodes}', (version, rate), fontsize=8,
                    textcoords='offset points', xytext=(8, -3))
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel('policy version')
    ax.set_ylabel('success rate of its labelled episodes')
    twin = ax.twinx()
    twin.plot(versions, [r.interventions / max(r.episodes, 1) for r in rows], 's--',
              color='tab:red', alpha=0.7, label='interventions / episode')
    twin.set_ylabel('interventions per episode')
    twin.set_ylim(0, 1.15 * max([r.interventions / max(r.episodes, 1) for r in rows] + [1]))
    ax.set_xlim(-0.5, len(versions) - 0.5)  # categorical: room beside the first and last
    fig.legend(loc='lower center', ncol=2, fontsize=8, bbox_to_anchor=(0.5, 0.0))
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)


def start_bringup(params: Path, log_path: Path) -> subprocess.Popen:
    """Start `habc launch bringup params_file:=PARAMS`, its output going to `log_path`."""
    with open(log_path, 'w') as log:
        return subprocess.Popen(
            [sys.executable, '-m', 'habc.cli', 'launch', 'bringup', f'params_file:={params}'],
            stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())


def stop_bringup(launcher: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """Ctrl-C a started bringup (its nodes stop cleanly); kill it after `timeout_s`."""
    if launcher.poll() is None:
        launcher.send_signal(signal.SIGINT)
        try:
            launcher.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            launcher.kill()


def run_loop(config: DemoConfig, params: Path, out: Path) -> int:
    """Run the bringup until the scripted operator's episodes are done; print the table."""
    from habc_common.ros_env import apply_project_defaults
    apply_project_defaults()
    log_path = out / 'launch.log'
    index_path = out / 'episodes' / 'episodes.sqlite'
    monitor = Monitor()
    executor, node = _start_monitor(monitor)
    launcher = start_bringup(params, log_path)
    print(f'[demo] loop started (node logs: {log_path}): the learner trains after every '
          f'{config.episodes_per_round} labelled episodes; the demo stops once version '
          f'{config.rounds + 1} has run {config.episodes_per_round} episodes', flush=True)
    print(TABLE_HEADER, flush=True)
    printed: set[str] = set()
    deadline = time.monotonic() + config.timeout_s
    code = 0
    try:
        while True:
            if launcher.poll() is not None:
                print(f'[demo] the bringup exited early (code {launcher.returncode}); see '
                      f'{log_path}', file=sys.stderr)
                code = 1
                break
            rows = version_stats(index_path, monitor)
            live = set(monitor.activations)
            for row in rows:
                # A version's row is final once a newer version is live.
                newer = [v for v in live if _number(v) > _number(row.version) >= 0]
                if row.version not in printed and newer:
                    printed.add(row.version)
                    print(format_row(row), flush=True)
            # The learner keeps training while episodes run, so later versions may follow:
            # stop once versions past the last round have run a round's episodes.
            last = config.rounds + 1
            if sum(r.episodes for r in rows
                   if _number(r.version) >= last) >= config.episodes_per_round:
                break
            if time.monotonic() > deadline:
                print(f'[demo] timeout after {config.timeout_s:.0f} s', file=sys.stderr)
                code = 1
                break
            time.sleep(1.0)
    except KeyboardInterrupt:
        print('[demo] Ctrl-C: stopping the loop and writing what was measured',
              file=sys.stderr)
        code = 130
    finally:
        stop_bringup(launcher)
        executor.shutdown()
        node.destroy_node()
        import rclpy
        if rclpy.ok():
            rclpy.shutdown()
    rows = version_stats(index_path, monitor)
    for row in rows:
        if row.version not in printed:
            print(format_row(row), flush=True)
    # A row is printed once a newer version is live, but episodes that the older version
    # had started were still running then: they count for it too. The final counts:
    print('[demo] final counts (with the episodes still running when a row was printed):\n'
          + TABLE_HEADER, flush=True)
    for row in rows:
        print(format_row(row), flush=True)
    summary = {'config': {k: str(v) if isinstance(v, Path) else v
                          for k, v in vars(config).items()},
               'versions': [{**vars(r), 'success_rate': r.success_rate} for r in rows]}
    (out / 'summary.json').write_text(json.dumps(summary, indent=1) + '\n')
    if rows:
        plot(rows, out / 'success_per_version.png')
    print(f'[demo] wrote {out}/summary.json and success_per_version.png', flush=True)
    return code


# `--long`: the budgets a visible change needs, where the default's 20 minutes do not give
# it (SFT from 100 demonstrations, as the pixel track's bench; 10 episodes per version).
LONG_SCHEDULE = {'demos': 100, 'episodes_per_round': 10, 'rounds': 3, 'timeout': 3600.0}
LONG_OUT = DEMO_OUT / 'long'   # runs/demo/*/sft: where `habc launch bringup` looks too


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `habc demo` options."""
    # runs/demo: where a plain `habc launch bringup` looks for the SFT checkpoint.
    d = DemoConfig(out=DEMO_OUT)
    parser.add_argument('--out', type=Path, default=d.out,
                        help='run folder: SFT checkpoint, episodes, learner (default runs/demo)')
    parser.add_argument('--rounds', type=int, default=d.rounds,
                        help=f'learner rounds, i.e. weight updates (default {d.rounds})')
    parser.add_argument('--episodes-per-round', type=int, default=d.episodes_per_round)
    parser.add_argument('--steps-per-round', type=int, default=d.steps_per_round,
                        help='gradient steps per learner round')
    parser.add_argument('--demos', type=int, default=d.demos,
                        help='expert demonstrations for the SFT checkpoint (first run only)')
    parser.add_argument('--sft-steps', type=int, default=d.sft_steps)
    parser.add_argument('--max-steps', type=int, default=d.max_steps,
                        help='control ticks per episode (50 Hz)')
    parser.add_argument('--method', default=d.method, help='learner method (default habc)')
    parser.add_argument('--timeout', type=float, default=d.timeout_s, metavar='S',
                        help='stop the loop after this many seconds')
    parser.add_argument('--backbone', type=Path, metavar='VLM_FOLDER',
                        help='SFT policy on a pretrained vision-language model instead of the '
                        'small VLA: a local SmolVLM/SmolVLM2 or PaliGemma folder (config.json, '
                        '*.safetensors, tokenizer), never downloaded; a TransformersVLA with '
                        'the backbone frozen. An SFT checkpoint of another recipe in --out is '
                        'set aside (kept), and the learner trains on from the new one')
    parser.add_argument('--long', action='store_true',
                        help='the longer schedule (about 40 min on 2 cores): SFT from '
                        f"{LONG_SCHEDULE['demos']} demonstrations, "
                        f"{LONG_SCHEDULE['episodes_per_round']} episodes per version, "
                        f"{LONG_SCHEDULE['rounds']} rounds, in {LONG_OUT}; options given "
                        'explicitly still win')


def apply_long_schedule(args: argparse.Namespace, parser_defaults: dict) -> None:
    """Replace the options left at their defaults by the --long schedule's values."""
    for name, value in {**LONG_SCHEDULE, 'out': LONG_OUT}.items():
        if getattr(args, name) == parser_defaults[name]:
            setattr(args, name, value)


def run(args: argparse.Namespace) -> int:
    """Run the demo; return the exit code."""
    if getattr(args, 'long', False):
        defaults = argparse.ArgumentParser()
        add_arguments(defaults)
        apply_long_schedule(args, vars(defaults.parse_args([])))
    for name in ('rounds', 'episodes_per_round', 'steps_per_round', 'demos', 'sft_steps',
                 'max_steps'):
        if getattr(args, name) < 1:
            print(f'habc demo: --{name.replace("_", "-")} must be >= 1', file=sys.stderr)
            return 2
    config = DemoConfig(out=args.out, rounds=args.rounds,
                        episodes_per_round=args.episodes_per_round,
                        steps_per_round=args.steps_per_round, demos=args.demos,
                        sft_steps=args.sft_steps, max_steps=args.max_steps,
                        method=args.method, timeout_s=args.timeout)
    backbone = getattr(args, 'backbone', None)
    if backbone is not None:
        from habc_policy.models.transformers_vla import check_backbone_dir

        config.backbone = backbone.expanduser().resolve()
        try:  # before minutes of demonstrations, not after them
            check_backbone_dir(config.backbone)
        except (OSError, ValueError) as exc:
            print(f'habc demo: --backbone: {exc}', file=sys.stderr)
            return 2
    config.out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    checkpoint = config.out / SFT_NAME
    set_aside_if_stale(checkpoint, config.cameras, config.backbone)
    if not (checkpoint / 'model.safetensors').is_file():
        from habc_sim import bench

        policy_name = (f'a TransformersVLA on {config.backbone}' if config.backbone
                       else 'the small VLA')
        print(f'[demo] no SFT checkpoint at {checkpoint}: recording {config.demos} expert '
              f'demonstrations and training {policy_name} on them', flush=True)
        # The pixel track's SFT at the demo's budgets (seed 0).
        profile = sft_profile(config)
        if config.backbone is not None:
            train_backbone_sft(config, profile, checkpoint)
        else:
            bench.train_sft(config.task, 'pixels', 0, profile, checkpoint,
                            version=STARTUP_VERSION, workers=config.workers)
        print(f'[demo] SFT checkpoint (version 1) written to {checkpoint}', flush=True)
    # Each run gets its own episodes and learner (the SFT checkpoint is shared): versions
    # and tables start from 1 again.
    run_dir = config.out / time.strftime('run-%Y%m%d-%H%M%S')
    run_dir.mkdir(parents=True)
    params = write_params(config, checkpoint, run_dir)
    code = run_loop(config, params, run_dir)
    print(f'[demo] total {time.monotonic() - start:.0f} s', flush=True)
    return code
