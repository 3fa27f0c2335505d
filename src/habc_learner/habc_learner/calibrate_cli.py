"""`habc calibrate`: help thresholds for a stated false-alarm rate, written into a checkpoint.

Reads labelled episode bags of the checkpoint's policy (as `habc train` reads them), runs the
checkpoint's critic on the observations the policy drove (up to the first takeover), and
chooses the help threshold by split conformal prediction on the successful episodes
without a takeover (habc_policy.help_calibration): a new successful episode of the same
policy raises a help request with probability at most the stated rate. Failed episodes and
episodes a human took over are scored too: the share the threshold would have caught, and
how long before the end or the takeover. The result goes into the checkpoint folder as
help_calibration.json, which the policy node applies with the weights (parameter
help_use_calibration).
"""

from __future__ import annotations

import argparse
from pathlib import Path
import sys
from typing import TYPE_CHECKING

import numpy as np

from habc_episodes.vocabulary import Controller, Outcome
from habc_learner.train_cli import add_bag_reading_arguments, bag_reading
from habc_policy.help_calibration import MAX_BELOW_FOR_S

if TYPE_CHECKING:  # torch-heavy: imported by run() only
    from habc_episodes.episode import Episode
    from habc_policy.models.base import Policy
    from habc_policy.models.critic import DualHeadCritic

HELP = """Calibrate the help-request threshold of a checkpoint on labelled episodes.

  habc calibrate CHECKPOINT BAG_OR_FOLDER... [--false-alarm-rate 0.1]

CHECKPOINT is a folder with model.safetensors, config.json and the critic.safetensors that
HABC trained with it. The episodes should come from this policy (its rollouts): successes
without a takeover set the threshold, failures and takeovers measure what it catches.
Labels come from the episode index, a --labels CSV or sidecar files, as for `habc train`.
With n successful episodes, a rate below 1/(n+1) cannot raise at all: record more episodes.
Writes CHECKPOINT/help_calibration.json (not with --dry-run)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `habc calibrate` options."""
    parser.add_argument('checkpoint', type=Path, help='checkpoint folder (with its critic)')
    parser.add_argument('bags', nargs='+', help='episode bags or folders searched for bags')
    parser.add_argument('--false-alarm-rate', type=float, default=0.1,
                        help='target share of successful episodes that raise a request '
                        '(default 0.1)')
    parser.add_argument('--below-for', type=float, default=0.5, dest='below_for_s',
                        help='seconds p_v must stay below the threshold (the node parameter '
                        'help_below_for_s; default 0.5)')
    parser.add_argument('--every', type=int, default=10, dest='every_steps',
                        help='score every N-th control step: how often the policy node '
                        'estimates p_v, once per inference (about every execute_steps '
                        'steps, or the chunk length with schedule_inference). Sparser '
                        'sampling on the robot than here raises more often than stated '
                        '(default 10)')
    add_bag_reading_arguments(parser)
    parser.add_argument('--dry-run', action='store_true',
                        help='print the calibration, do not write it into the checkpoint')
    parser.add_argument('--quiet', action='store_true', help='no progress bar')


def _error(message: str) -> int:
    print(f'habc calibrate: {message}', file=sys.stderr)
    return 2


def _viability_trace(episode: Episode, policy: Policy, critic: DualHeadCritic,
                     every_steps: int) -> tuple[tuple[tuple[float, float], ...], float]:
    """Return the (stamp, p_v) trace of the policy-driven steps, and where that stretch ends.

    The stretch runs up to the first takeover (or the episode's last step); stamps are
    seconds from the episode's start.
    """
    import torch

    from habc_policy.models.critic import estimate

    human = np.flatnonzero(np.asarray(episode.controllers) == Controller.HUMAN)
    end_index = int(human[0]) if len(human) else len(episode) - 1
    steps = np.arange(0, end_index + (0 if len(human) else 1), every_steps)
    stamps = np.asarray(episode.timestamps, dtype=np.float64)
    if not len(steps):
        return (), float(stamps[end_index] - stamps[0])
    device = next(policy.parameters()).device
    batch = {key: torch.as_tensor(np.ascontiguousarray(value[steps]), device=device)
             for key, value in episode.observations.items()}
    batch['instruction'] = [episode.instruction] * len(steps)
    p_v, _ = estimate(policy, critic, batch)
    start = float(stamps[0])
    trace = tuple((float(stamps[s]) - start, float(v)) for s, v in zip(steps, p_v.tolist(),
                                                                       strict=True))
    return trace, float(stamps[end_index]) - start


def run(args: argparse.Namespace) -> int:
    """Calibrate and write the checkpoint's help_calibration.json; 0 on success, 2 on bad input."""
    from habc_episodes.dataset import load_bags
    from habc_policy.help_calibration import calibrate, ScoredEpisode
    from habc_policy.models.base import load_policy
    from habc_policy.models.critic import load_policy_critic

    if not 0.0 < args.false_alarm_rate < 1.0:
        return _error(f'--false-alarm-rate must lie in (0, 1), got {args.false_alarm_rate}')
    if args.every_steps < 1 or not 0 <= args.below_for_s <= MAX_BELOW_FOR_S:
        return _error(f'--every must be >= 1 and --below-for in [0, {MAX_BELOW_FOR_S:g}] s')
    folder = args.checkpoint.expanduser()
    try:
        policy = load_policy(folder)
    except (OSError, ValueError, ImportError) as exc:
        return _error(f'{folder}: cannot load the policy: {exc}')
    policy.eval()
    critic = load_policy_critic(folder, policy)
    if critic.critic is None:
        return _error(f'{folder}: {critic.problem}; calibrate a checkpoint trained with HABC')
    try:
        topics, labeller = bag_reading(args)
        views = getattr(policy.config, 'num_views', None)
        result = load_bags(args.bags, labeller=labeller, topics=topics,
                           image_size=getattr(policy.config, 'image_size', None),
                           with_images=views is not None, progress=not args.quiet)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        return _error(str(exc))
    for item in result.skipped:
        print(f'habc calibrate: skipped {item.path} ({item.reason}): {item.message}',
              file=sys.stderr)
    scored = []
    for episode in result.episodes:
        if episode.outcome not in (Outcome.SUCCESS, Outcome.FAILURE):
            continue
        trace, end = _viability_trace(episode, policy, critic.critic, args.every_steps)
        took_over = bool(np.any(np.asarray(episode.controllers) == Controller.HUMAN))
        # Only the policy's own successes may set the threshold; a rescued episode needed help.
        scored.append(ScoredEpisode(episode.outcome == Outcome.SUCCESS and not took_over,
                                    trace, end))
    try:
        calibration = calibrate(scored, args.false_alarm_rate, args.below_for_s,
                                str(getattr(policy, 'version', '')))
    except ValueError as exc:
        return _error(f'{exc} (of {len(scored)} labelled episodes, none succeeded without a '
                      'takeover)')
    c = calibration
    print(f'calibrated on {c.calibration_successes} successful episodes without a takeover; '
          f'scored {c.failures} failed or taken-over ones')
    print(f'  help_threshold   {c.help_threshold:.3f}  (p_v below it for {c.help_below_for_s:g} '
          's raises a request)')
    print(f'  help_clear_above {c.help_clear_above:.3f}')
    print(f'  false alarms     <= {c.false_alarm_bound:.3f} of new successful episodes '
          f'(asked {c.target_false_alarm_rate:g}); {c.calibration_false_alarms:.3f} of these')
    if c.detection_rate is not None:
        lead = '' if c.median_lead_s is None else f', median {c.median_lead_s:.1f} s before'
        print(f'  caught           {c.detection_rate:.3f} of the failed or taken-over '
              f'episodes{lead}')
    if c.help_threshold == 0.0:
        print(f'  note: {c.calibration_successes} successes are too few for rate '
              f'{c.target_false_alarm_rate:g}: the threshold never raises; record at least '
              f'{int(np.ceil(1 / c.target_false_alarm_rate)) - 1} successful episodes',
              file=sys.stderr)
    if args.dry_run:
        return 0
    path = calibration.save(folder)
    print(f'wrote {path}')
    return 0


def main(argv: list[str] | None = None) -> None:
    """Console entry point (`ros2 run habc_learner calibrate`)."""
    parser = argparse.ArgumentParser(prog='habc calibrate', description=HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    sys.exit(run(parser.parse_args(argv)))
