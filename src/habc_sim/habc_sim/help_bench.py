"""`habc bench --help-requests`: does a robot that asks for help save its operator time.

Per task and seed (state track):
  1. demonstrations, SFT and `habc_rounds` online HABC rounds watched by the continuous
     operator (habc_sim.bench's protocol): a policy and the critic trained with it;
  2. calibration: the policy alone on `calibration_episodes` TUNING states; for each target
     false-alarm rate alpha, the help threshold by split conformal prediction on the
     successes (habc_policy.help_calibration), as `habc calibrate` does from bags;
  3. the critic's calibration on `heldout_episodes` HELD-OUT states, the policy alone: the
     Brier score of every inference's p_v against its episode's outcome, a reliability
     diagram, and each threshold's false alarms and detections there;
  4. the same `episodes` held-out states (another block) under each way of watching, with
     the same operator (reaction delay, takeover skill, hand-back) and the same random
     streams: nobody watching; the continuous watcher; and on-request watching at each
     calibrated threshold (requests answered after the reaction delay, spontaneous checks
     at `check_rate_hz` judged with the continuous watcher's detectors).
Reported per mode: success, intervention steps per success, operator attention time,
help requests per episode, takeovers by cause, and whether help requests cut intervention
steps per success by half at equal or better success (paired over the same states).
"""

import argparse
from dataclasses import asdict, dataclass, replace
import json
import math
from pathlib import Path
import sys
import time

import numpy as np

from habc_episodes.stats import wilson_interval
from habc_policy.help_calibration import (
    calibrate,
    first_raise,
    HelpCalibration,
    reliability,
    ScoredEpisode,
    sustained_low,
)
from habc_sim.aloha import DT
from habc_sim.bench import (
    BenchProfile,
    Cell,
    EpisodeJob,
    EVAL_SEED_BASE,
    operator_settings,
    PROFILES,
    RunContext,
    TUNE_SEED_BASE,
)

UNWATCHED = 'unwatched'
CONTINUOUS = 'continuous'
MODES_BLOCK = 5000     # the modes' held-out states: EVAL_SEED_BASE + MODES_BLOCK + i


@dataclass(frozen=True)
class HelpBenchProfile:
    """Budgets of a help-request benchmark run; `training` is the HABC part's profile."""

    training: BenchProfile
    calibration_episodes: int = 100
    heldout_episodes: int = 100
    episodes: int = 100
    false_alarm_rates: tuple[float, ...] = (0.05, 0.1, 0.2)
    below_for_s: float = 0.5
    answers: tuple[str, ...] = ('take_over', 'judge')   # habc_sim.operator.Answer
    answer_probability: float = 1.0
    check_rate_hz: float = 0.05      # one spontaneous glance every 20 s on average
    check_steps: int = 50            # a glance watches 1 s (the stall detector's window)


QUICK = HelpBenchProfile(
    training=replace(PROFILES['quick'], methods=('sft', 'habc'), stage2_rounds=0),
    calibration_episodes=6, heldout_episodes=4, episodes=3, false_alarm_rates=(0.2, 0.5))
FULL = HelpBenchProfile(
    training=replace(PROFILES['full'], name='help_requests', methods=('sft', 'habc'),
                     stage1_rounds=3, stage2_rounds=0))


ANSWER_MODES = {'take_over': 'request', 'judge': 'judge'}


def mode_name(alpha: float, answer: str = 'take_over') -> str:
    """Name of the on-request mode at false-alarm rate alpha answering with `answer`."""
    return f'{ANSWER_MODES[answer]}@{alpha:g}'


def _scored(summary: dict) -> ScoredEpisode:
    trace = tuple((step * DT, p_v) for step, p_v in summary['viability'])
    return ScoredEpisode(success=bool(summary['success']), trace=trace,
                         end=summary['steps'] * DT)


def _jobs(task: str, p: BenchProfile, checkpoint: Path, first: int, count: int,
          **fields) -> list[EpisodeJob]:
    return [EpisodeJob(task, 'state', first + i, p.max_steps, p.image_size, p.cameras,
                       str(checkpoint), execute_steps=p.execute_steps, **fields)
            for i in range(count)]


def run_cell(context: RunContext, hp: HelpBenchProfile, task: str, seed: int,
             train_from: Path | None = None) -> dict:
    """Train (or take from `train_from`), calibrate and compare the watching modes."""
    p = hp.training
    cell = Cell(context, task, 'state', seed, list(p.methods))
    if train_from is None:
        cell.run()
        checkpoint = cell.dir / 'habc' / f'round{p.stage1_rounds}'
    else:
        checkpoint = train_from / cell.dir.name / 'habc' / f'round{p.stage1_rounds}'
        if not (checkpoint / 'critic.safetensors').is_file():
            raise FileNotFoundError(f'--train-from: no HABC checkpoint with a critic at '
                                    f'{checkpoint} (a run of the same profile and seeds)')
    out = {'task': task, 'seed': seed, 'checkpoint': str(checkpoint)}

    start = time.time()
    tuning = context.episodes(
        _jobs(task, p, checkpoint, TUNE_SEED_BASE + 10_000 * seed, hp.calibration_episodes,
              viability=True), f'{task} seed {seed}: calibration', 'calibration')
    scored = [_scored(r) for r in tuning]
    calibrations = {}
    for alpha in hp.false_alarm_rates:
        try:
            calibrations[alpha] = calibrate(scored, alpha, hp.below_for_s, checkpoint.name)
        except ValueError as exc:  # no successful tuning episode: nothing to calibrate on
            out.setdefault('problems', []).append(f'alpha {alpha}: {exc}')
    out['calibrations'] = {str(a): asdict(c) for a, c in calibrations.items()}
    out['tuning_success_rate'] = float(np.mean([r['success'] for r in tuning]))

    heldout = context.episodes(
        _jobs(task, p, checkpoint, EVAL_SEED_BASE, hp.heldout_episodes, viability=True),
        f'{task} seed {seed}: held-out p_v', 'heldout')
    values = [v for r in heldout for _, v in r['viability']]
    outcomes = [r['success'] for r in heldout for _ in r['viability']]
    out['reliability'] = reliability(values, outcomes)
    # p_v at each inference with its episode's outcome, for the pooled diagram.
    out['heldout_predictions'] = [[round(v, 4), bool(y)] for v, y in zip(values, outcomes,
                                                                          strict=True)]
    heldout_scored = [_scored(r) for r in heldout]
    out['heldout'] = {str(a): heldout_alarms(heldout_scored, c)
                      for a, c in calibrations.items()}
    context.add_time('calibration_s', time.time() - start)

    start = time.time()
    operator = operator_settings(p, task)
    first = EVAL_SEED_BASE + MODES_BLOCK
    modes = {UNWATCHED: _jobs(task, p, checkpoint, first, hp.episodes),
             CONTINUOUS: _jobs(task, p, checkpoint, first, hp.episodes,
                               operator=operator + (('watch', 'continuous'),))}
    for answer in hp.answers:
        for alpha, calibration in calibrations.items():
            watch = (('watch', 'on_request'), ('answer', answer),
                     ('answer_probability', hp.answer_probability),
                     ('check_rate_hz', hp.check_rate_hz), ('check_steps', hp.check_steps))
            help_params = (('help_threshold', calibration.help_threshold),
                           ('help_clear_above', calibration.help_clear_above),
                           ('help_below_for_s', calibration.help_below_for_s),
                           ('help_stall_window_s', 0.0))  # the calibrated rule alone
            modes[mode_name(alpha, answer)] = _jobs(
                task, p, checkpoint, first, hp.episodes, operator=operator + watch,
                viability=True, help=help_params)
    out['modes'] = {}
    for name, jobs in modes.items():
        results = context.episodes(jobs, f'{task} seed {seed}: {name}', 'modes')
        out['modes'][name] = [_episode_row(r) for r in results]
    context.add_time('modes_s', time.time() - start)
    return out


def heldout_alarms(episodes: list[ScoredEpisode], calibration: HelpCalibration) -> dict:
    """Score a calibrated threshold on held-out episodes of the policy alone."""
    tau, below = calibration.help_threshold, calibration.help_below_for_s
    successes = [e for e in episodes if e.success]
    failures = [e for e in episodes if not e.success]
    leads = [e.end - raised for e in failures
             if (raised := first_raise(e.trace, tau, below)) is not None]
    return {'successes': len(successes), 'failures': len(failures),
            'false_alarms': sum(sustained_low(e.trace, below) < tau for e in successes),
            'detections': len(leads),
            'median_lead_s': float(np.median(leads)) if leads else None}


def _episode_row(summary: dict) -> dict:
    causes = summary.get('takeover_causes', [])
    return {'seed': summary['seed'], 'success': bool(summary['success']),
            'steps': summary['steps'], 'interventions': summary['interventions'],
            'human_steps': summary['human_steps'],
            'attention_steps': summary.get('attention_steps', 0),
            'help_requests': summary.get('help_requests', 0),
            'requested_takeovers': sum(c == 'help_request' for c in causes),
            'spontaneous_takeovers': sum(c != 'help_request' for c in causes)}


# --- reporting --------------------------------------------------------------------------
def mode_summary(rows: list[dict]) -> dict:
    """Pool one mode's episodes (over seeds): success, effort and attention."""
    n = len(rows)
    successes = sum(r['success'] for r in rows)
    human = sum(r['human_steps'] for r in rows)
    low, high = wilson_interval(successes, n)
    return {'episodes': n, 'successes': successes, 'success_rate': successes / n,
            'ci_low': low, 'ci_high': high,
            'interventions_per_episode': sum(r['interventions'] for r in rows) / n,
            'intervention_steps_per_success': human / successes if successes else None,
            'attention_s_per_episode': DT * sum(r['attention_steps'] for r in rows) / n,
            'attention_share': (sum(r['attention_steps'] for r in rows)
                                / max(1, sum(r['steps'] for r in rows))),
            'help_requests_per_episode': sum(r['help_requests'] for r in rows) / n,
            'requested_takeovers': sum(r['requested_takeovers'] for r in rows),
            'spontaneous_takeovers': sum(r['spontaneous_takeovers'] for r in rows)}


def paired_difference(a: list[dict], b: list[dict]) -> tuple[float, float, float]:
    """Success of a minus success of b over the same states: mean and 95% normal interval."""
    key = {r['seed']: r['success'] for r in b}
    d = np.asarray([float(r['success']) - float(key[r['seed']]) for r in a])
    half = 1.96 * float(d.std(ddof=1)) / math.sqrt(len(d)) if len(d) > 1 else math.inf
    return float(d.mean()), float(d.mean()) - half, float(d.mean()) + half


def verdict(request: dict, continuous: dict, difference: tuple[float, float, float]) -> str:
    """Whether a mode halves intervention steps per success at equal or better success."""
    mine, theirs = (request['intervention_steps_per_success'],
                    continuous['intervention_steps_per_success'])
    if mine is None or theirs is None:
        return 'no successes to compare'
    if not theirs:
        return 'continuous: no intervention steps to cut'
    change = mine / theirs - 1.0
    equal = difference[2] >= 0.0 and request['success_rate'] >= continuous['success_rate']
    worse = difference[2] < 0.0
    success_note = ('equal or better success' if equal else
                    f'success {100 * difference[0]:+.0f} points (the paired interval excludes 0)'
                    if worse else
                    f'success {100 * difference[0]:+.0f} points, paired interval includes 0')
    met = 'yes' if change <= -0.5 and equal else 'no'
    return f'{met}: intervention steps per success {100 * change:+.0f}%, {success_note}'


def report(cells: list[dict], hp: HelpBenchProfile) -> str:
    """Return the markdown tables of a run (pooled over seeds, per task)."""
    lines = []
    for task in sorted({c['task'] for c in cells}):
        at = [c for c in cells if c['task'] == task]
        names = list(at[0]['modes'])
        lines += [f'\n## {task} (state track, {len(at)} seed(s), {hp.episodes} held-out '
                  'states per mode and seed, the same states for every mode)\n',
                  '| mode | success [Wilson 95%] | interventions / episode | intervention '
                  'steps per success | operator attention, s / episode (share of time) | help '
                  'requests / episode | takeovers asked / spontaneous | vs continuous |',
                  '|---|---|---|---|---|---|---|---|']
        pooled = {n: [r for c in at for r in _tagged(c, n)] for n in names}
        summaries = {n: mode_summary(rows) for n, rows in pooled.items()}
        for name in names:
            s = summaries[name]
            per = s['intervention_steps_per_success']
            against = '-'
            if name not in (UNWATCHED, CONTINUOUS):
                difference = paired_difference(pooled[name], pooled[CONTINUOUS])
                against = verdict(s, summaries[CONTINUOUS], difference)
            lines.append(
                f"| {name} | {100 * s['success_rate']:.0f}% [{100 * s['ci_low']:.0f}-"
                f"{100 * s['ci_high']:.0f}] ({s['successes']}/{s['episodes']}) | "
                f"{s['interventions_per_episode']:.2f} | "
                f"{'-' if per is None else f'{per:.1f}'} | "
                f"{s['attention_s_per_episode']:.1f} ({100 * s['attention_share']:.0f}%) | "
                f"{s['help_requests_per_episode']:.2f} | "
                f"{s['requested_takeovers']} / {s['spontaneous_takeovers']} | {against} |")
        lines += ['', "Thresholds (conformal on the tuning states' successes, per seed) and "
                  'what they do on held-out states of the policy alone:', '',
                  '| target false-alarm rate | threshold per seed | bound (k-1)/(n+1) | tuning: '
                  'successes, false alarms | held-out: false alarms / successes | held-out: '
                  'failures caught / failures | median lead (s) |',
                  '|---|---|---|---|---|---|---|']
        for alpha in hp.false_alarm_rates:
            cals = [c['calibrations'].get(str(alpha)) for c in at]
            held = [c['heldout'].get(str(alpha)) for c in at]
            if not all(cals):
                lines.append(f'| {alpha:g} | not calibrated (see problems) | | | | | |')
                continue
            leads = [h['median_lead_s'] for h in held if h['median_lead_s'] is not None]
            thresholds = ', '.join(f"{c['help_threshold']:.3f}" for c in cals)
            bounds = ', '.join(f"{c['false_alarm_bound']:.3f}" for c in cals)
            lines.append(
                f'| {alpha:g} | {thresholds} | {bounds} | '
                f"{sum(c['calibration_successes'] for c in cals)}, "
                f"{np.mean([c['calibration_false_alarms'] for c in cals]):.3f} | "
                f"{sum(h['false_alarms'] for h in held)} / {sum(h['successes'] for h in held)}"
                f" | {sum(h['detections'] for h in held)} / {sum(h['failures'] for h in held)}"
                f" | {np.median(leads) if leads else float('nan'):.1f} |")
        pairs = [tuple(x) for c in at for x in c['heldout_predictions']]
        if pairs:
            rel = reliability([v for v, _ in pairs], [y for _, y in pairs])
            lines += ['', f"p_v on held-out states (policy alone, {rel['predictions']} "
                      f"inferences): Brier {rel['brier']:.3f} against {rel['brier_base_rate']:.3f}"
                      f" for always predicting the success rate ({100 * rel['base_rate']:.0f}%)"
                      '; per seed: ' + ', '.join(f"{c['reliability']['brier']:.3f}" for c in at)]
    return '\n'.join(lines) + '\n'


def _tagged(cell: dict, mode: str) -> list[dict]:
    # Rows of one mode, with a key unique over seeds for the paired comparison.
    return [{**r, 'seed': (cell['seed'], r['seed'])} for r in cell['modes'][mode]]


def plot(cells: list[dict], path: Path) -> None:
    """Per task: reliability diagram; success vs intervention steps per success; attention."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    tasks = sorted({c['task'] for c in cells})
    fig, axes = plt.subplots(len(tasks), 3, figsize=(15, 4.3 * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks, strict=True):
        at = [c for c in cells if c['task'] == task]
        pairs = [tuple(x) for c in at for x in c['heldout_predictions']]
        ax = row[0]
        if pairs:
            rel = reliability([v for v, _ in pairs], [y for _, y in pairs])
            bins = [b for b in rel['bins'] if b['count']]
            ax.plot([0, 1], [0, 1], color='grey', linestyle=':', linewidth=1)
            ax.plot([b['mean_p_v'] for b in bins], [b['success_share'] for b in bins],
                    marker='o', color='tab:blue')
            for b in bins:
                ax.annotate(str(b['count']), (b['mean_p_v'], b['success_share']),
                            fontsize=7, xytext=(3, -9), textcoords='offset points')
            ax.set_title(f"{task}: p_v reliability (held-out, policy alone)\nBrier "
                         f"{rel['brier']:.3f}, base rate {rel['brier_base_rate']:.3f}",
                         fontsize=10)
        ax.set_xlabel('p_v (bin mean); labels: inferences per bin')
        ax.set_ylabel('share of those episodes that succeeded')
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        names = list(at[0]['modes'])
        summaries = {n: mode_summary([r for c in at for r in _tagged(c, n)]) for n in names}
        ax = row[1]
        for name, s in summaries.items():
            per = s['intervention_steps_per_success'] or 0.0
            ax.errorbar(per, s['success_rate'],
                        yerr=[[s['success_rate'] - s['ci_low']],
                              [s['ci_high'] - s['success_rate']]],
                        marker='o', capsize=3, label=name)
        ax.set_xlabel('intervention steps per success (lower: less human driving)')
        ax.set_ylabel('success (Wilson 95%)')
        ax.set_title(f'{task}: success vs human effort', fontsize=10)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
        ax = row[2]
        ax.bar(names, [summaries[n]['attention_s_per_episode'] for n in names], color='tab:orange')
        ax.set_ylabel('operator attention, s per episode')
        ax.set_title(f'{task}: time the operator watched or drove', fontsize=10)
        ax.tick_params(axis='x', rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options only the help-request benchmark reads."""
    parser.add_argument('--false-alarm-rates', type=float, nargs='+',
                        help='--help-requests: target false-alarm rates, one threshold each '
                        '(default 0.05 0.1 0.2)')
    parser.add_argument('--answers', nargs='+', choices=list(ANSWER_MODES),
                        help='--help-requests: how the on-request operator answers, one set of '
                        'modes each: take_over (request@rate) and/or judge (judge@rate); '
                        'default both')
    parser.add_argument('--train-from', type=Path,
                        help="--help-requests: take each seed's HABC checkpoint from this "
                        'earlier run of the same profile instead of training again')
    parser.add_argument('--report-only', action='store_true',
                        help='--help-requests: rebuild help_requests.md and .png from the '
                        "--out folder's help_requests.json (a finished or running run)")
    parser.add_argument('--check-rate', type=float,
                        help='--help-requests: spontaneous checks per second of the '
                        'on-request operator (default 0.05)')


def make_profile(args: argparse.Namespace) -> HelpBenchProfile:
    """Return the help benchmark's profile with the command line's overrides.

    Raises:
        ValueError: an option out of range.
    """
    base = QUICK if args.quick else FULL
    training = replace(base.training, **{
        k: tuple(v) if isinstance(v, list) else v
        for k in ('tasks', 'seeds', 'first_seed', 'demos', 'sft_steps', 'rollouts_per_round',
                  'steps_per_round', 'stage1_rounds')
        if (v := getattr(args, k, None)) is not None})
    if args.tracks and tuple(args.tracks) != ('state',):
        raise ValueError('--help-requests runs the state track only')
    if training.first_seed < 0 or training.seeds < 1 or training.first_seed + training.seeds > 10:
        raise ValueError('seeds 0-9 only: first_seed >= 0, seeds >= 1')
    if not 1 <= training.stage1_rounds <= 10:
        raise ValueError('--stage1-rounds (the HABC rounds that train the critic): 1 to 10')
    overrides: dict = {}
    if args.eval_episodes is not None:
        overrides.update(episodes=args.eval_episodes, heldout_episodes=args.eval_episodes)
    if args.false_alarm_rates:
        overrides['false_alarm_rates'] = tuple(args.false_alarm_rates)
    if args.check_rate is not None:
        overrides['check_rate_hz'] = args.check_rate
    if args.answers:
        overrides['answers'] = tuple(dict.fromkeys(args.answers))
    profile = replace(base, training=training, **overrides)
    if any(not 0 < a < 1 for a in profile.false_alarm_rates):
        raise ValueError('--false-alarm-rates must lie in (0, 1)')
    if profile.check_rate_hz < 0 or min(profile.episodes, profile.heldout_episodes) < 1:
        raise ValueError('--check-rate >= 0 and --eval-episodes >= 1')
    return profile


def run(args: argparse.Namespace) -> int:
    """Run the help-request benchmark; write help_requests.json, .md and .png."""
    import torch

    from habc_sim.rollouts import WorkerPool
    if args.report_only:
        return write_report(args.out)
    try:
        hp = make_profile(args)
    except ValueError as exc:
        print(f'habc bench: {exc}', file=sys.stderr)
        return 2
    p = hp.training
    torch.set_num_threads(p.train_threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    cells = []
    command = f'habc bench {" ".join(sys.argv[2:])}'
    with WorkerPool(args.workers) as pool:
        context = RunContext(p, args.out, pool, not args.no_progress)
        for task in p.tasks:
            for seed in range(p.first_seed, p.first_seed + p.seeds):
                try:
                    cells.append(run_cell(context, hp, task, seed, args.train_from))
                except FileNotFoundError as exc:
                    print(f'habc bench: {exc}', file=sys.stderr)
                    return 2
                _write(args.out, hp, cells, context, command)
    context.add_time('total_s', time.time() - start)
    _write(args.out, hp, cells, context, command)
    return write_report(args.out)


def write_report(out: Path) -> int:
    """Write help_requests.md and .png from out/help_requests.json; print the tables."""
    path = out / 'help_requests.json'
    try:
        payload = json.loads(path.read_text())
        cells, hp = payload['cells'], _profile_of(payload['profile'])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f'habc bench: cannot report from {path}: {exc}', file=sys.stderr)
        return 2
    if not cells:
        print(f'habc bench: {path} holds no finished cell yet', file=sys.stderr)
        return 2
    p = hp.training
    command = payload.get('command', 'habc bench --help-requests')
    header = (f'# habc bench --help-requests\n\nCommand: `{command}`'
              f'\n\nPolicy and critic: SFT then {p.stage1_rounds} HABC rounds of '
              f'{p.rollouts_per_round} rollouts watched by the continuous operator. Thresholds '
              f'from {hp.calibration_episodes} tuning states per seed; p_v calibration on '
              f'{hp.heldout_episodes} held-out states; every mode on the same {hp.episodes} '
              'other held-out states per seed. On request, the operator watches only while '
              'the robot asks, plus spontaneous checks at '
              f'{hp.check_rate_hz:g} Hz of {hp.check_steps} steps each. request@rate: asked, it '
              f'takes over (probability {hp.answer_probability:g}) after the reaction delay '
              f'({p.operator_reaction_steps} steps); judge@rate: asked, it watches with the '
              "continuous watcher's detectors while the request is open. Requests from the "
              f'low rule alone (p_v below the threshold for {hp.below_for_s:g} s). '
              f"Wall time {payload['timing_s'].get('total_s', float('nan')):.0f} s.\n")
    body = report(cells, hp)
    (out / 'help_requests.md').write_text(header + body)
    plot(cells, out / 'help_requests.png')
    print(body)
    print(f'wrote {out}/help_requests.json, help_requests.md, help_requests.png')
    return 0


def _profile_of(saved: dict) -> HelpBenchProfile:
    # A profile back from its JSON (lists back to tuples).
    def tuples(values: dict) -> dict:
        return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return HelpBenchProfile(**{**tuples(saved), 'training': BenchProfile(
        **tuples(saved['training']))})


def _write(out: Path, hp: HelpBenchProfile, cells: list[dict], context: RunContext,
           command: str) -> None:
    payload = {'command': command, 'profile': asdict(hp),
               'timing_s': {k: round(v, 1) for k, v in sorted(context.timing.items())},
               'training_results': context.results, 'cells': cells}
    # Compact: every episode of every mode is in it (help_requests.md is the readable part).
    (out / 'help_requests.json').write_text(json.dumps(payload, separators=(',', ':')) + '\n')
