"""`habc train`: train a policy offline from rosbag2 recordings (no rclpy).

Reads every bag under the given paths (our recorder's bags, or `ros2 bag record` output of
standard topics described by a topic mapping file), labels them (labels CSV > episode index
> sidecar file), turns them into Episodes, trains one method on them and writes a
checkpoint, TensorBoard logs and a report into the output folder. Bags that cannot be used
(unlabelled, damaged, wrong topics, not fitting the policy) are reported and skipped; the
input is never modified.
"""

import argparse
from collections import Counter
from contextlib import ExitStack, redirect_stderr, redirect_stdout
from dataclasses import asdict
import json
import os
from pathlib import Path
import shlex
import shutil
import subprocess
import sys
import time
from typing import Any

from habc_episodes.dataset import Labeller, load_bags, LoadResult
from habc_episodes.episode_bags import TopicMapping
from habc_episodes.vocabulary import PolicyVersion, STARTUP_VERSION
from habc_learner import distributed
from habc_learner.data import HumanWindowTargets
from habc_learner.methods import AdvantageNetwork, Method, MethodConfig
from habc_learner.policies import fit_problems, new_policy

CHECKPOINT_DIR = 'checkpoint'
TENSORBOARD_DIR = 'tensorboard'

HELP = """Train a policy offline from rosbag2 recordings (MCAP or sqlite3).

Each PATH is a bag (a rosbag2 folder, a folder holding one .mcap file, or a bare .mcap/.db3
file) or a directory searched for bags. Our recorder's bags need nothing else; bags of
`ros2 bag record` of standard topics need --mapping, a YAML file such as:

  cameras: [/camera/top/image_raw, /camera/wrist/image_raw]  # sensor_msgs/Image, view order
  joint_states: /joint_states                   # sensor_msgs/JointState: the state
  command: /forward_position_controller/commands  # Float64MultiArray, JointState or
                                                # JointTrajectory: the executed action
  intervention: /teleop/engage                  # std_msgs/Bool (True = human) or
                                                # habc_msgs/InterventionState; optional
  instruction: transfer the cube                # optional (or instruction_topic: /task)
  control_period_s: 0.02                        # resample at 50 Hz; omit: a step per command
  joint_names: [...]                            # optional: state joints and their order
  stamps: header                                # or receive: the bag's receive times

Outcome labels, first that labels a bag wins: --labels CSV (bag,outcome[,note]; bag = path or
name), the episode index (episodes.sqlite beside the bags, one level up, or --index), a
sidecar file in the bag folder (outcome.yaml "outcome: success", label.json, outcome.txt).
Unlabelled, discarded, damaged and unfitting bags are reported and skipped.

Output in --out: checkpoint/ (model.safetensors, config.json, critic, metrics.json),
tensorboard/, report.md with plots/*.png, report.json.

A new policy (no --init) is the small VLA, the low-dim regressor, or with --backbone a
pretrained VLM's policy (TransformersVLA: the VLM's first layers as a prefix, a
flow-matching action expert on top; SmolVLM or PaliGemma folders, loaded from disk only,
never downloaded). Its checkpoint stores the trained weights and the backbone folder's path
and fingerprint, not the backbone: keep that folder where it is.

examples:
  habc train --bags ~/.habc/episodes --init sft/checkpoint --method habc --out runs/offline1
  habc train --bags ~/.habc/episodes --demos /data/demos --backbone ~/models/SmolVLM2-500M \\
      --method sft --out runs/vla_sft --policy-config '{"prefix_layers": 16}'
  habc train --bags /data/teleop --demos /data/demos --mapping robot.yaml \\
      --labels labels.csv --method habc --out runs/offline2 --steps 2000
  habc train --bags ~/.habc/episodes --method habc --out runs/ddp --nproc 2  # 2 processes

--nproc K trains data-parallel in K processes on this machine (torchrun; gloo on CPU, NCCL
and one GPU each with --device cuda): each takes batch-size / K samples of every minibatch,
so the result is that of one process up to float32 summation order (docs/distributed.md).
"""

# What an offline-trained checkpoint is: the start-up number, tagged as trained offline.
OFFLINE_VERSION = PolicyVersion(STARTUP_VERSION.number, 'offline')


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `habc train` options to a parser."""
    data = parser.add_argument_group('data')
    data.add_argument('--bags', nargs='+', required=True, metavar='PATH',
                      help='bags, or directories searched for bags (rollouts)')
    data.add_argument('--demos', nargs='+', default=[], metavar='PATH',
                      help='demonstration bags (D_SFT; need no label)')
    add_bag_reading_arguments(data)
    data.add_argument('--cameras', type=int, nargs='+', metavar='I',
                      help='habc bags: indices into Observation.images of the views to use')
    data.add_argument('--load-workers', type=_positive_int, metavar='N',
                      help='processes that load the bags (default: one per core, at most 8 '
                      'and one per 128 MiB of bags; 1: none besides this one)')
    training = parser.add_argument_group('training')
    training.add_argument('--method', required=True, choices=[m.value for m in Method])
    training.add_argument('--out', required=True, type=Path, metavar='DIR',
                          help='output folder (checkpoint, TensorBoard logs, report)')
    training.add_argument('--steps', type=int, default=1000, help='gradient steps (1000)')
    training.add_argument('--batch-size', type=int, default=64, help='minibatch size (64)')
    training.add_argument('--init', type=Path, metavar='CHECKPOINT',
                          help='start from this checkpoint folder: a habc checkpoint (e.g. the '
                          'SFT policy) or a LeRobot policy folder (ACT; recognised by its '
                          'config.json, or named as lerobot:PATH)')
    training.add_argument('--policy', choices=('auto', 'vla', 'lowdim', 'transformers_vla'),
                          default='auto',
                          help='new policy without --init: the small VLA (images), the '
                          'low-dim chunk regressor (joint state only) or transformers_vla '
                          '(needs --backbone); auto: vla when the bags have images, '
                          'transformers_vla with --backbone')
    training.add_argument('--backbone', type=Path, metavar='VLM_FOLDER',
                          help='new policy on a pretrained vision-language model: a local '
                          'folder as save_pretrained or `hf download` writes it (config.json, '
                          '*.safetensors, tokenizer; SmolVLM/SmolVLM2 or PaliGemma). Implies '
                          '--policy transformers_vla; its backbone is frozen unless '
                          '--policy-config sets finetune (lora or full); nothing is '
                          'downloaded')
    training.add_argument('--policy-config', type=_json_object, default={}, metavar='JSON',
                          help='new policy: config overrides, e.g. \'{"hidden_dim": 64}\'; '
                          'for --backbone e.g. \'{"prefix_layers": 16, "finetune": "lora"}\'')
    training.add_argument('--horizon', type=int, default=20,
                          help='new policy: action chunk length H (20)')
    training.add_argument('--image-size', type=int, default=96,
                          help='new policy: images are resized to this square size (96)')
    training.add_argument('--actor-lr', type=float, default=1e-3)
    training.add_argument('--critic-lr', type=float, default=1e-3)
    training.add_argument('--warmup-steps', type=int, default=500,
                          help="N_wu: gradient steps with gate g_t = 1 (500, the paper's)")
    training.add_argument('--advantage-network', default=AdvantageNetwork.TARGET.value,
                          choices=[n.value for n in AdvantageNetwork],
                          help='critic that gives both terms of each advantage: the target '
                          'copy (default), the online critic, or mixed (online at s_t, '
                          'target at s_t+1: biased, for ablations)')
    training.add_argument('--human-window-targets', default=HumanWindowTargets.HUMAN_STEPS.value,
                          choices=[t.value for t in HumanWindowTargets],
                          help="a human window's chunk targets: only the human's steps "
                          '(default) or the full chunk (for ablations)')
    training.add_argument('--advantage-stride', type=int, default=1,
                          help='k of s_t+k in the advantages: 1 = the next control step '
                          '(default); an executed chunk is the alternative')
    training.add_argument('--seed', type=int, default=0)
    training.add_argument('--device', default='auto',
                          help='torch device: auto (cuda if available), cpu, cuda, ...')
    training.add_argument('--version', default=str(OFFLINE_VERSION), type=PolicyVersion.parse,
                          help="policy version stored in the checkpoint: a number, or "
                          "'number:tag' (default %(default)s: a start-up checkpoint that the "
                          "learner's versions 2, 3, ... replace)")
    parallel = parser.add_argument_group('data-parallel training (docs/distributed.md)')
    parallel.add_argument('--nproc', type=_positive_int, default=1, metavar='K',
                          help='train in K processes under torchrun (1: in this process, as '
                          'always); --batch-size must be a multiple of K')
    parallel.add_argument('--ddp', action='store_true',
                          help='train data-parallel even with --nproc 1: the one-process '
                          'reference of a --nproc K run (the same sampler and noise)')
    parser.add_argument('--force', action='store_true',
                        help='replace a checkpoint already in --out')
    parser.add_argument('--quiet', action='store_true', help='no progress bars')


def add_bag_reading_arguments(group: argparse._ActionsContainer) -> None:
    """Add --mapping, --labels and --index: how bags are read and labelled.

    `habc train` and `habc calibrate` share them; `bag_reading(args)` turns them into the
    reader's settings.
    """
    group.add_argument('--mapping', metavar='FILE',
                       help='topic mapping YAML for bags of standard topics (default: the '
                       'habc topics observation and executed_action)')
    group.add_argument('--labels', metavar='FILE', help='labels CSV: bag,outcome[,note]')
    group.add_argument('--index', action='append', default=[], metavar='FILE',
                       help='episode index (episodes.sqlite) to label bags from; repeatable')


def bag_reading(args: argparse.Namespace) -> tuple[TopicMapping, Labeller]:
    """Return the topic mapping and labeller of add_bag_reading_arguments' options.

    Raises:
        ValueError: a mapping or labels file that is not one (the message names it).
    """
    topics = TopicMapping.from_yaml(args.mapping) if args.mapping else TopicMapping()
    return topics, Labeller(args.labels, args.index)


def _error(message: str) -> int:
    print(f'habc train: {message}', file=sys.stderr)
    return 2


def _backbone_problem(args: argparse.Namespace) -> str:
    """Settle --backbone against --policy and --init; return what is wrong ('' = nothing).

    --backbone makes a new policy, so it implies --policy transformers_vla and cannot go
    with --init (a checkpoint names the backbone it was trained on).
    """
    if args.backbone is None:
        return ''
    if args.init is not None:
        return ('--backbone builds a new policy and --init starts from a checkpoint, which '
                'names its own backbone: pass one of them')
    if args.policy not in ('auto', 'transformers_vla'):
        return (f'--backbone builds a transformers_vla policy, not --policy {args.policy}: '
                'drop one of them')
    given = args.policy_config.get('backbone_dir')
    if given and Path(given).expanduser().resolve() != args.backbone.expanduser().resolve():
        return (f'--backbone {args.backbone} and --policy-config backbone_dir {given} differ: '
                'pass the folder once')
    args.policy = 'transformers_vla'
    return ''


def run(args: argparse.Namespace) -> int:
    """Train and write checkpoint, logs and report; 0 on success, 2 on unusable input.

    With --nproc K > 1 (or --ddp) outside torchrun, start K copies of this command under
    torchrun and return its exit code; inside torchrun, be one of them.
    """
    for name in ('steps', 'batch_size', 'horizon', 'image_size'):
        if getattr(args, name) < 1:
            return _error(f'--{name.replace("_", "-")} must be >= 1')
    parallel = args.nproc > 1 or args.ddp
    if parallel and args.batch_size % args.nproc:
        return _error(f'--batch-size {args.batch_size} must be a multiple of --nproc '
                      f'{args.nproc}: each process takes an equal share')
    if distributed.launched_by_torchrun():
        return _run_in_group(args)
    if parallel:
        return _launch(args)
    return _run(args)


def _launch(args: argparse.Namespace) -> int:
    """Run this command in --nproc processes under torchrun (loopback only)."""
    command = distributed.torchrun_command(args.nproc, 'habc_learner.train_cli',
                                           _arguments(args))
    if not args.quiet:
        print(f'habc train: starting {args.nproc} processes under torchrun', flush=True)
    return subprocess.run(command, env=distributed.loopback_environment()).returncode


def _run_in_group(args: argparse.Namespace) -> int:
    """One of torchrun's processes: join the group; rank 0 alone prints and writes."""
    import torch
    device = args.device
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    args.device = distributed.init_from_env(device).device
    with ExitStack() as quiet:
        if not distributed.is_main():
            # The same messages K times help nobody; an exception still reaches stderr
            # (it leaves this block first).
            args.quiet = True
            sink = quiet.enter_context(open(os.devnull, 'w'))
            quiet.enter_context(redirect_stdout(sink))
            quiet.enter_context(redirect_stderr(sink))
        try:
            return _run(args)
        finally:
            distributed.destroy()


def _arguments(args: argparse.Namespace) -> list[str]:
    """Return the `habc train` arguments (after `train`) of `args` for torchrun's processes.

    Without --nproc and --ddp: torchrun's parser would take --nproc for an abbreviation of
    its --nproc-per-node, and its processes know they are data-parallel anyway.
    """
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv: list[str] = []
    for action in parser._actions:
        if not action.option_strings or action.dest in ('help', 'nproc', 'ddp'):
            continue
        flag, value = action.option_strings[0], getattr(args, action.dest, None)
        if value is None or value is False or value == [] or value == {}:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(action, argparse._AppendAction):
            argv += [item for v in value for item in (flag, str(v))]
        elif isinstance(value, list):
            argv += [flag, *(str(v) for v in value)]
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        else:
            argv += [flag, str(value)]
    return argv


def _run(args: argparse.Namespace) -> int:
    """Load the bags, train and write (in this process, one of a group or alone)."""
    problem = _backbone_problem(args)
    if problem:
        return _error(problem)
    try:
        topics, labeller = bag_reading(args)
    except ValueError as exc:
        return _error(str(exc))
    out = args.out.expanduser().resolve()
    checkpoint_dir = out / CHECKPOINT_DIR
    if checkpoint_dir.exists() and not args.force:
        return _error(f'{checkpoint_dir} exists; pass --force to replace it or choose '
                      'another --out')

    import torch
    device = args.device
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    policy = None
    if args.init is not None:
        from habc_policy.models.base import load_policy
        try:
            policy = load_policy(args.init.expanduser(), map_location=device)
        except (OSError, ValueError, ImportError) as exc:
            return _error(f'--init {args.init}: {exc}')
    views = getattr(policy.config, 'num_views', None) if policy is not None else None
    with_images = (views is not None) if policy is not None else args.policy != 'lowdim'
    image_size = (getattr(policy.config, 'image_size', None) if policy is not None
                  else args.image_size)

    try:
        result = load_bags(args.bags, demos=args.demos, labeller=labeller, topics=topics,
                           cameras=args.cameras, image_size=image_size,
                           with_images=with_images, progress=not args.quiet,
                           workers=args.load_workers)
    except (FileNotFoundError, RuntimeError) as exc:  # RuntimeError: a loader process died
        return _error(str(exc))
    problem = _output_problem(out, result)
    if problem:
        return _error(problem)
    if policy is None:
        spec = _majority_spec(result)
        if spec is not None:
            overrides = dict(args.policy_config)
            camera_shape = _recorded_camera_shape(result)
            if spec[2] is not None and camera_shape is not None:
                # The policy node refuses a robot camera of another aspect ratio (robot_fit).
                overrides.setdefault('camera_shape', camera_shape)
            if args.backbone is not None:
                overrides['backbone_dir'] = str(args.backbone.expanduser().resolve())
            try:
                policy = new_policy(args.policy, *spec, horizon=args.horizon,
                                    overrides=overrides)
            except (TypeError, ValueError, OSError, ImportError) as exc:
                # OSError: a backbone folder without its files; ImportError: finetune lora
                # without peft.
                return _error(f'cannot build the policy: {exc}')
    if policy is not None:
        for item in list(result.loaded):
            problems = fit_problems(item.episode, policy,
                                    cameras="--cameras or the mapping's cameras")
            if problems:
                result.skip(item, 'mismatch', f'episode {item.episode.episode_id} does not fit '
                            f'the policy: {"; ".join(problems)}')
    for item in result.skipped:
        print(f'habc train: skipped {item.path} ({item.reason}): {item.message}',
              file=sys.stderr)
    for row in result.unmatched_labels:
        print(f'habc train: label for a bag that was not found: {row}', file=sys.stderr)
    if not result.loaded:
        return _error(f'no usable episode among {len(result.skipped)} bag(s) under '
                      f'{" ".join(args.bags)}; see the reasons above')
    mb = result.size_bytes / 1e6
    print(f'loaded {len(result.loaded)} episodes ({sum(len(e) for e in result.episodes)} '
          f'steps) from {mb:.1f} MB in {result.seconds:.1f} s; skipped {len(result.skipped)}')

    try:
        return _train(args, policy, result, topics, out, device)
    except ValueError as exc:
        # e.g. a method that finds no samples (sft without demonstrations).
        return _error(str(exc))


def _train(args: argparse.Namespace, policy, result: LoadResult, topics: TopicMapping,
           out: Path, device: str) -> int:
    from habc_learner.train_report import build_report, write_report
    from habc_learner.trainer import TrainConfig, Trainer

    method = MethodConfig(method=args.method, horizon=policy.horizon,
                          warmup_steps=args.warmup_steps,
                          advantage_network=args.advantage_network,
                          human_window_targets=args.human_window_targets,
                          next_stride=args.advantage_stride)
    buffer = method.make_buffer()
    for episode in result.episodes:
        buffer.add(episode)
    train = TrainConfig(steps=args.steps, batch_size=args.batch_size, actor_lr=args.actor_lr,
                        critic_lr=args.critic_lr, seed=args.seed,
                        log_every=max(1, min(50, args.steps // 50)), device=device)
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(policy, buffer, method, train, log_dir=out / TENSORBOARD_DIR,
                      progress=not args.quiet)
    _resume_from_init(args, trainer)
    table = buffer.table
    actor_mask = trainer.algorithm.actor_mask(table)
    critic_mask = trainer.algorithm.critic_mask(table)
    started = time.perf_counter()
    try:
        trainer.fit(description=f'train {args.method}')
    finally:
        if trainer.writer is not None:
            trainer.writer.close()
    seconds = time.perf_counter() - started

    # Written aside, then moved: a crash never leaves a half-written checkpoint in place.
    scratch = out / f'.{CHECKPOINT_DIR}.tmp'
    if scratch.exists() and distributed.is_main():
        shutil.rmtree(scratch)
    distributed.barrier()
    # Data-parallel: rank 0 writes, every process gets its hash; the rest is rank 0's.
    info = trainer.save_checkpoint(scratch, version=args.version)
    if not distributed.is_main():
        return 0
    checkpoint = out / CHECKPOINT_DIR
    if checkpoint.exists():
        shutil.rmtree(checkpoint)
    os.replace(scratch, checkpoint)

    training = {
        'method': args.method, 'policy': policy.type_name,
        'policy_config': asdict(policy.config),
        'init': str(args.init) if args.init else '', 'steps': args.steps,
        'batch_size': args.batch_size, 'seconds': seconds,
        'processes': distributed.world_size(),
        'samples_per_s': args.steps * args.batch_size / seconds if seconds > 0 else 0.0,
        'device': device, 'checkpoint': str(checkpoint), 'sha256': info['sha256'],
        'version': str(args.version), 'tensorboard': str(out / TENSORBOARD_DIR),
        'method_config': asdict(method),
    }
    report = build_report(command=command_line(args), result=result, buffer=buffer,
                          actor_mask=actor_mask, critic_mask=critic_mask,
                          history=trainer.history, training=training,
                          mapping=topics.to_dict())
    path = write_report(out, report)
    last = trainer.history[-1] if trainer.history else {}
    losses = ', '.join(f'{k.split("/")[-1]} {v:.4g}' for k, v in last.items()
                       if k.startswith('losses/') and not k.endswith('grad_norm'))
    print(f'trained {args.method} for {args.steps} steps in {seconds:.1f} s ({losses})')
    print(f'checkpoint: {checkpoint} (sha256 {info["sha256"][:12]}...)')
    print(f'report: {path}')
    print(f'tensorboard: tensorboard --logdir {out / TENSORBOARD_DIR}')
    return 0


def _resume_from_init(args: argparse.Namespace, trainer) -> None:
    """Go on from the --init checkpoint's critic and training state, if of the same method.

    Another method's critic and optimizers do not apply: they start afresh.
    """
    if args.init is None:
        return
    try:
        meta = json.loads((args.init.expanduser() / 'metrics.json').read_text())
        same = meta.get('method', {}).get('method') == args.method
    except (OSError, ValueError, AttributeError):
        same = False
    if same:
        trainer.resume_from(args.init.expanduser(),
                            lambda line: print(f'habc train: {line}', flush=True))


def _output_problem(out: Path, result: LoadResult) -> str:
    """Refuse an output folder inside an input bag: the input must stay as it was."""
    for path in [item.path for item in result.loaded] + [s.path for s in result.skipped]:
        if path.is_dir() and out.is_relative_to(path.resolve()):
            return (f'--out {out} is inside the bag {path}; the input bags are never written '
                    'to: choose another folder')
    return ''


def _spec(episode) -> tuple:
    images = episode.observations.get('images')
    return (episode.observations['state'].shape[1], episode.action_dim,
            None if images is None else images.shape[1:])


def _majority_spec(result: LoadResult) -> tuple | None:
    """Return the (state dim, action dim, image shape) most episodes share."""
    if not result.loaded:
        return None
    counts = Counter(_spec(item.episode) for item in result.loaded)
    return counts.most_common(1)[0][0]


def _recorded_camera_shape(result: LoadResult) -> list[int] | None:
    """Return [H, W] of the cameras as recorded, when every view of every episode has it."""
    shapes = {shape for item in result.loaded for shape in item.episode.camera_shapes}
    complete = all(item.episode.camera_shapes for item in result.loaded)
    return list(shapes.pop()) if complete and len(shapes) == 1 else None


def command_line(args: argparse.Namespace) -> str:
    """Return the `habc train` command line that `args` stand for (for the report)."""
    parts = ['habc', 'train']
    for key, value in vars(args).items():
        if key in ('run', 'command') or value in (None, False, [], {}):
            continue
        flag = '--' + key.replace('_', '-')
        if value is True:
            parts.append(flag)
        elif isinstance(value, list):
            parts += [flag, *(str(v) for v in value)] if key != 'index' else [
                item for v in value for item in (flag, str(v))]
        elif isinstance(value, dict):
            parts += [flag, json.dumps(value)]
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f'expected a whole number >= 1, got {text!r}')
    return value


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f'not JSON: {exc}') from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('expected a JSON object like {"hidden_dim": 64}')
    return value


def main(argv: list[str] | None = None) -> None:
    """Console entry point (same as `habc train`)."""
    parser = argparse.ArgumentParser(prog='habc train', description=HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    sys.exit(run(parser.parse_args(argv)))


if __name__ == '__main__':
    main()
