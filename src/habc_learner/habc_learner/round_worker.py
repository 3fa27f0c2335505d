"""One learner round trained data-parallel in torchrun's processes (no rclpy).

The online learner hands a round to K processes: it writes a JSON spec and runs
`python -m habc_learner.round_worker SPEC.json` under torchrun (`run_round` does both).
Every process reads the same bags into the same buffer (as the learner builds it: the
demonstrations, then the episodes in the spec's order), loads the same start checkpoint
and trains its share of every minibatch; rank 0 writes the checkpoint
(Trainer.save_checkpoint) and a result JSON. The learner node stays the only publisher of
PolicyUpdate: it reads the result and publishes as after an in-process round.

The spec (JSON object):
    init_checkpoint  folder of the policy to start from (model.safetensors, config.json);
                     its critic.safetensors and trainer_state.pt (AdamW moments, target
                     critic), when present, start the critic and the optimizers
    episodes         [{"bag_path", "outcome", "episode_id", "instruction" (optional)}]
    demos_dir        folder of demonstration bags ('' = none)
    cameras          indices into Observation.images ([] = all); image_size (0 = as
                     recorded) - the learner's parameters of the same names
    method           MethodConfig fields;  train: TrainConfig fields ("device" 'cpu' or
                     'cuda': each process then takes cuda:LOCAL_RANK)
    start_step       the trainer's step count at the start (warm-up and IR count from it)
    output           checkpoint folder to write (replaced if it exists)
    version          the checkpoint's policy version, e.g. "3"
    result           where rank 0 writes the result JSON (default: OUTPUT.result.json)
    log_dir          TensorBoard folder ('' = none; optional)
The result (JSON): {"version", "sha256", "step", "metrics", "checkpoint", "world_size",
"episodes", "demos", "samples", "history" (the logged
metrics: global-batch means, one entry per `log_every` steps)}.
"""

from collections.abc import Callable, Sequence
from dataclasses import fields
import json
from pathlib import Path
import shutil
import subprocess
import sys
import traceback
from typing import Any

from habc_episodes.vocabulary import EpisodeKind, Outcome
from habc_learner import distributed

MODULE = 'habc_learner.round_worker'
SPEC_NAME, RESULT_NAME = 'round_spec.json', 'round_result.json'
# Output lines run_round keeps for the error message of a failed round.
TAIL_LINES = 40
# How a process's failure starts its line: run_round puts these lines first in its error
# (torchrun's own report of the failure is longer than the tail).
ERROR_PREFIX = 'round_worker failed:'
REQUIRED = ('init_checkpoint', 'episodes', 'method', 'train', 'output', 'version')


def check_spec(spec: dict[str, Any]) -> None:
    """Raise ValueError naming what is wrong with a round spec (missing or unknown keys)."""
    from habc_learner.methods import MethodConfig
    from habc_learner.trainer import TrainConfig

    missing = [key for key in REQUIRED if key not in spec]
    if missing:
        raise ValueError(f'round spec lacks {", ".join(missing)}')
    for key, cls in (('method', MethodConfig), ('train', TrainConfig)):
        unknown = set(spec[key]) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f'round spec {key}: unknown fields {sorted(unknown)}')
    for item in spec['episodes']:
        absent = {'bag_path', 'outcome', 'episode_id'} - set(item)
        if absent:
            raise ValueError(f'round spec episode {item}: lacks {sorted(absent)}')


def result_path(spec: dict[str, Any]) -> Path:
    """Where the round's result JSON goes."""
    output = Path(spec['output'])
    return Path(spec.get('result') or output.with_name(output.name + '.result.json'))


def train_round(spec: dict[str, Any], log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train the round `spec` describes in this process (one of torchrun's, or alone).

    Every process must call it with the same spec. Returns the result (all processes);
    rank 0 has written the checkpoint and the result JSON.
    """
    from habc_episodes.episode_bags import episode_from_bag
    from habc_learner.methods import MethodConfig
    from habc_learner.policies import fit_problems
    from habc_learner.trainer import TrainConfig, Trainer
    from habc_policy.models.base import load_policy

    check_spec(spec)
    train = dict(spec['train'])
    if distributed.launched_by_torchrun():
        train['device'] = distributed.init_from_env(train.get('device', 'cpu')).device
    train_config = TrainConfig(**train)
    method = MethodConfig(**spec['method'])
    init = Path(spec['init_checkpoint'])
    policy = load_policy(init, map_location=train_config.device)

    image_size = int(spec.get('image_size') or 0) or None
    if image_size is None and policy.exact_image_size:
        # As the learner: a policy that takes only its own size gets images resized to it.
        image_size = policy.config.image_size
    cameras = list(spec.get('cameras') or []) or None

    def load(bag: Path, outcome: str, episode_id: str, instruction: str, kind: EpisodeKind):
        episode = episode_from_bag(bag, outcome, cameras=cameras, image_size=image_size,
                                   episode_id=episode_id, kind=kind)
        if not episode.instruction:
            episode.instruction = instruction
        problems = fit_problems(episode, policy, cameras='the cameras parameter',
                                check_image_size=False)
        if problems:
            raise ValueError(f'episode {episode_id} does not fit the policy: '
                             + '; '.join(problems))
        return episode

    demos = []
    if spec.get('demos_dir'):
        # The learner's rule: every rosbag2 folder in demos_dir, sorted; a bad one is skipped.
        for bag in sorted(p for p in Path(spec['demos_dir']).iterdir()
                          if (p / 'metadata.yaml').is_file()):
            try:
                demos.append(load(bag, Outcome.SUCCESS, f'demo-{bag.name}', '',
                                  EpisodeKind.DEMO))
            except Exception as exc:  # noqa: BLE001 - the other demonstrations still count
                log(f'demonstration {bag} skipped: {type(exc).__name__}: {exc}')
    episodes = [load(Path(item['bag_path']), item['outcome'], item['episode_id'],
                     item.get('instruction', ''), EpisodeKind.ROLLOUT)
                for item in spec['episodes']]
    buffer = method.make_buffer()
    for episode in demos + episodes:
        buffer.add(episode)

    log_dir = Path(spec['log_dir']) if spec.get('log_dir') else None
    trainer = Trainer(policy, buffer, method, train_config, log_dir=log_dir, progress=False)
    trainer.step = int(spec.get('start_step', 0))
    trainer.resume_from(init, log)
    k = distributed.world_size()
    log(f'round {spec["version"]}: {len(episodes)} episodes, {len(demos)} demonstrations, '
        f'{len(buffer)} samples, {train_config.steps} steps on {k} process(es)')

    def report(summary: dict[str, float]) -> None:
        losses = ', '.join(f'{key.split("/")[-1]} {value:.4g}' for key, value in summary.items()
                           if key.startswith('losses/') and not key.endswith('grad_norm'))
        log(f'step {int(summary["step"])}: {losses}')

    metrics = trainer.fit(on_log=report)
    if trainer.writer is not None:
        trainer.writer.close()
    output = Path(spec['output'])
    if distributed.is_main() and output.exists():
        shutil.rmtree(output)
    distributed.barrier()
    info = trainer.save_checkpoint(output, spec['version'])
    result = {'version': str(spec['version']), 'sha256': info['sha256'], 'step': trainer.step,
              'metrics': {key: float(value) for key, value in metrics.items()},
              'checkpoint': str(output), 'world_size': k, 'episodes': len(episodes),
              'demos': len(demos), 'samples': len(buffer), 'history': trainer.history}
    if distributed.is_main():
        path = result_path(spec)
        scratch = path.with_name(path.name + '.tmp')
        scratch.write_text(json.dumps(result, indent=2) + '\n')
        scratch.replace(path)
    distributed.barrier()
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: `python -m habc_learner.round_worker SPEC.json` (under torchrun)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print(f'usage: python -m {MODULE} SPEC.json (under torchrun)', file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    main_process = not distributed.launched_by_torchrun() or distributed.rank_from_env() == 0
    log = (lambda line: print(line, flush=True)) if main_process else (lambda line: None)
    try:
        train_round(spec, log)
    except Exception as exc:
        # Every process says why it failed: a failure on rank 1 is as real as on rank 0.
        traceback.print_exc()
        print(f'{ERROR_PREFIX} rank {distributed.rank_from_env()}: {type(exc).__name__}: '
              f'{exc}', flush=True)
        return 1
    finally:
        distributed.destroy()
    return 0


def run_round(spec: dict[str, Any], nproc: int, workdir: Path,
              log: Callable[[str], None]) -> dict[str, Any]:
    """Train one round in `nproc` local processes under torchrun; return its result.

    Writes the spec into `workdir` (with "result" pointed there), starts torchrun as a
    subprocess on the loopback interface, passes each line it prints to `log`, and reads
    the result JSON rank 0 wrote.

    Raises:
        ValueError: a spec with missing or unknown fields, or nproc < 1.
        RuntimeError: the round failed; the message ends with its last output lines.
    """
    if nproc < 1:
        raise ValueError(f'nproc must be >= 1, got {nproc}')
    check_spec(spec)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    spec = {**spec, 'result': str(workdir / RESULT_NAME)}
    result_file = Path(spec['result'])
    result_file.unlink(missing_ok=True)
    spec_file = workdir / SPEC_NAME
    spec_file.write_text(json.dumps(spec, indent=2) + '\n')
    command = distributed.torchrun_command(nproc, MODULE, [str(spec_file)])
    tail: list[str] = []
    errors: list[str] = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=distributed.loopback_environment(), cwd=workdir) as process:
        for line in process.stdout:
            line = line.rstrip('\n')
            tail = (tail + [line])[-TAIL_LINES:]
            # A process's own report, or a C++ abort's (gloo, NCCL), which torchrun's long
            # failure report would push out of the tail.
            if line.startswith(ERROR_PREFIX) or 'terminate called' in line or \
                    'what():' in line:
                errors.append(line)
            log(line)
        code = process.wait()
    if code != 0 or not result_file.is_file():
        raise RuntimeError(f'round {spec["version"]} failed in torchrun ({nproc} processes, '
                           f'exit code {code}): ' + '; '.join(errors)
                           + '\nlast output:\n' + '\n'.join(tail))
    return json.loads(result_file.read_text())


if __name__ == '__main__':
    sys.exit(main())
