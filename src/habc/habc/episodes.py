"""`habc episodes`: list, inspect, label and export the episodes of an episode index (no rclpy).

The index is the SQLite file the episode recorder writes (<storage_dir>/episodes.sqlite,
default ~/.habc/episodes/episodes.sqlite); each row names one episode bag.

    list     a table of episodes, newest first, with filters; REQ / SPONT: takeovers the
             robot asked for (a help request was open, or the takeover answered it) and
             spontaneous ones, HELP: the robot's help requests ('-': recorded before the
             index kept them)
    show     one episode: its row, its help requests (when raised, how cleared, answered by
             whom), its intervention segments read from the bag, and how the credit
             assignment treats each segment (the learner's rules and defaults)
    label    set or change an outcome in the index; the learner picks the change up at its
             next poll (no EpisodeEvent is published: for live dashboards label through the
             recorder's recorder/label_episode service instead)
    export   labelled episodes as a LeRobot-style dataset (habc_episodes.lerobot_export)
"""

from __future__ import annotations

import argparse
from bisect import bisect_right
from dataclasses import asdict, dataclass
from datetime import datetime
import getpass
import json
import os
from pathlib import Path
import sys
import time
from typing import Any

from habc_episodes.help_requests import ANSWERED, RECOVERED, UNANSWERED
from habc_episodes.index import EpisodeIndex, EpisodeRecord
from habc_episodes.vocabulary import Controller, EpisodeStatus, LABEL_OUTCOMES, Outcome

HELP = __doc__ + """
examples:
  habc episodes list --outcome unlabelled --limit 20
  habc episodes show robot1-20250101-120000-1 --horizon 10
  habc episodes label robot1-20250101-120000-1 failure --note 'dropped the cube'
  habc episodes export ~/datasets/habc_cube --storage-dir /data/episodes

Exit codes: 0 done, 1 an episode or bag could not be used, 2 bad arguments or no index."""

DEFAULT_STORAGE_DIR = '~/.habc/episodes'
INDEX_FILE = 'episodes.sqlite'


class EpisodesError(Exception):
    """A user-facing failure: one line, exit code `code`."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def expand(path: str | Path) -> Path:
    """Expand ~ and $VARIABLES as the recorder and the learner do."""
    return Path(os.path.expandvars(os.path.expanduser(str(path))))


def index_path(index: str | None = None, storage_dir: str | None = None) -> Path:
    """Return the index file: --index, else <--storage-dir>/episodes.sqlite, else the default."""
    if index:
        return expand(index)
    return expand(storage_dir or DEFAULT_STORAGE_DIR) / INDEX_FILE


def open_index(path: Path, *, read_only: bool = True) -> EpisodeIndex:
    """Open an existing index; EpisodeIndex() would create an empty one at a mistyped path.

    Raises:
        EpisodesError: no file there (exit code 2).
    """
    if not path.is_file():
        raise EpisodesError(f'no episode index at {path}; the recorder writes '
                            f'<storage_dir>/{INDEX_FILE}: pass --index FILE or --storage-dir '
                            'DIR', code=2)
    return EpisodeIndex(path, read_only=read_only)


def _time(seconds: float | None) -> str:
    if seconds is None:
        return '-'
    return datetime.fromtimestamp(seconds).strftime('%Y-%m-%d %H:%M:%S')


# list ----------------------------------------------------------------------------------------

LIST_COLUMNS = ('ID', 'OUTCOME', 'STATUS', 'STEPS', 'INTERV', 'REQ', 'SPONT', 'HELP',
                'POLICY', 'STARTED', 'DURATION')


def _count(value: int | None) -> str:
    return '-' if value is None else str(value)


def list_rows(records: list[EpisodeRecord]) -> list[tuple[str, ...]]:
    """Return the table rows of `habc episodes list`."""
    rows = []
    for r in records:
        duration = f'{r.ended_at - r.started_at:.1f} s' if r.ended_at is not None else '-'
        rows.append((r.episode_id, r.outcome, r.status, str(r.num_steps),
                     str(r.num_interventions), _count(r.num_requested_takeovers),
                     _count(r.num_spontaneous_takeovers), _count(r.num_help_requests),
                     r.policy_version or '-', _time(r.started_at), duration))
    return rows


def help_lines(record: EpisodeRecord) -> list[str]:
    """Return what `habc episodes show` says of an episode's help requests and takeovers."""
    if not record.help_known:
        what = ('not known yet (recording)' if record.status == EpisodeStatus.RECORDING.label
                else 'not known (recorded before the index kept help requests)')
        return [f'help         {what}']
    lines = [f'takeovers    {record.num_requested_takeovers} requested, '
             f'{record.num_spontaneous_takeovers} spontaneous',
             f'help         {record.num_help_requests} request(s): '
             + ', '.join(f'{record.help_count(o)} {o}'
                         for o in (ANSWERED, RECOVERED, UNANSWERED))]
    if record.help_requests:
        def seconds(value: float | None) -> str:
            return '-' if value is None else f'{value:.2f}'
        rows = [(seconds(h.raised_at), h.reason or '-',
                 '-' if h.p_v is None else f'{h.p_v:.2f}', seconds(h.cleared_at),
                 h.cleared_reason or 'open', h.answered_by or '-', h.policy_version or '-')
                for h in record.help_requests]
        lines += ['', 'help requests (s from the first step):']
        lines += format_table(('RAISED', 'REASON', 'P_V', 'CLEARED', 'HOW', 'BY', 'POLICY'),
                              rows, right=(0, 2, 3)).splitlines()
    return lines


def format_table(header: tuple[str, ...], rows: list[tuple[str, ...]],
                 right: tuple[int, ...] = ()) -> str:
    """Format rows as aligned columns; columns in `right` are right-aligned (numbers)."""
    widths = [max(len(str(cell)) for cell in column) for column in
              zip(header, *rows, strict=True)]
    lines = []
    for row in (header, *rows):
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append('  '.join(cells).rstrip())
    return '\n'.join(lines)


def cmd_list(index: EpisodeIndex, args: argparse.Namespace) -> int:
    try:
        records = index.list(limit=args.limit, status=args.status, outcome=args.outcome)
    except ValueError as exc:
        raise EpisodesError(str(exc), code=2) from None
    if args.json:
        print(json.dumps([asdict(r) for r in records], indent=1))
        return 0
    if not records:
        print(f'no episodes in {index.path}' + (' match the filters' if (
            args.status or args.outcome) else ''))
        return 0
    print(format_table(LIST_COLUMNS, list_rows(records), right=(3, 4, 7)))
    return 0


# show ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EpisodeSteps:
    """The control steps of a bag as the learner sees them (see bag_episodes)."""

    stamps_ns: list[int]
    controllers: list[int]
    # (header stamp ns, source, reason) of every InterventionState, by stamp.
    interventions: list[tuple[int, int, str]]


def _resolve(path: Path, name: str, msgtype: str, available: dict, required: bool) -> str:
    from habc_episodes.episode_bags import match_topic

    matches = [t for t in match_topic(name, list(available)) if available[t][0] == msgtype]
    if len(matches) > 1:
        raise ValueError(f'bag {path}: {name!r} matches several topics {matches}')
    if not matches and required:
        listing = ', '.join(f'{t} ({m})' for t, (m, _) in sorted(available.items()))
        raise ValueError(f'bag {path} has no {name} topic ({msgtype}); it holds: '
                         f'{listing or "nothing"}')
    return matches[0] if matches else ''


def read_steps(bag_path: str | Path) -> EpisodeSteps:
    """Read the executed actions (and intervention states) of a bag, one entry per step.

    Steps are what habc_episodes.episode_bags.episode_from_bag makes of the bag: executed
    actions in header-stamp order, without those stamped before the first observation.
    Only stamps, sources and reasons are kept (no images), so long episodes are cheap.

    Raises:
        FileNotFoundError: no bag there.
        ValueError: the bag lacks observations or executed actions.
    """
    from habc_episodes.bag_format import read_episode_messages
    from habc_episodes.episode_bags import bag_topics, EXECUTED_ACTION_TYPE, OBSERVATION_TYPE

    path = Path(bag_path)
    if not (path / 'metadata.yaml').is_file():
        raise FileNotFoundError(f'{path} is not a rosbag2 directory (no metadata.yaml); a bag '
                                'of a crashed recorder needs habc_episodes.recovery.recover_bag()')
    available = bag_topics(path)
    obs = _resolve(path, 'observation', OBSERVATION_TYPE, available, True)
    act = _resolve(path, 'executed_action', EXECUTED_ACTION_TYPE, available, True)
    state = _resolve(path, 'intervention', 'habc_msgs/msg/InterventionState', available,
                     False)
    first_obs: int | None = None
    actions: list[tuple[int, int]] = []
    interventions: list[tuple[int, int, str]] = []
    for topic, _, msg in read_episode_messages(path, [t for t in (obs, act, state) if t]):
        stamp = int(msg.header.stamp.sec) * 1_000_000_000 + int(msg.header.stamp.nanosec)
        if topic == obs:
            first_obs = stamp if first_obs is None else min(first_obs, stamp)
        elif topic == act:
            actions.append((stamp, int(msg.source)))
        else:
            interventions.append((stamp, int(msg.source), str(msg.reason)))
    actions.sort(key=lambda item: item[0])  # stable, as in episode_from_bag
    interventions.sort(key=lambda item: item[0])
    kept = [a for a in actions if first_obs is not None and a[0] >= first_obs]
    return EpisodeSteps([s for s, _ in kept], [c for _, c in kept], interventions)


@dataclass(frozen=True)
class Segment:
    """One run of steps under one controller, and the credit of the windows anchored in it."""

    segment: int
    controller: str
    first_step: int
    last_step: int
    start_s: float  # header time of the first step, relative to the episode's first step
    end_s: float
    reason: str     # InterventionState.reason at the switch ('' when the bag has none)
    roles: dict[str, int]
    labelled: int   # windows that get the outcome label


def segment_summary(steps: EpisodeSteps, outcome: str, credit_config: Any) -> list[Segment]:
    """Summarise an episode's steps per intervention segment, with the credit per role."""
    import numpy as np

    from habc_episodes.episode import segments
    from habc_episodes.vocabulary import Outcome
    from habc_learner.credit import assign_credit

    if not steps.controllers:
        return []
    credit = assign_credit(steps.controllers, Outcome.parse(outcome), credit_config)
    t0 = steps.stamps_ns[0]
    iv_stamps = [stamp for stamp, _, _ in steps.interventions]
    result = []
    for number, (start, end, controller) in enumerate(segments(steps.controllers)):
        roles: dict[str, int] = {}
        for t in range(start, end):
            roles[credit.role[t].value] = roles.get(credit.role[t].value, 0) + 1
        # The arbiter's state message of the tick that switched: the newest one at or
        # before the segment's first step, if it reports the same source.
        reason = ''
        k = bisect_right(iv_stamps, steps.stamps_ns[start]) - 1
        if k >= 0 and steps.interventions[k][1] == int(controller):
            reason = steps.interventions[k][2]
        labelled = int(np.count_nonzero(~np.isnan(credit.label[start:end])))
        result.append(Segment(number, Controller(int(controller)).label, start, end - 1,
                              (steps.stamps_ns[start] - t0) / 1e9,
                              (steps.stamps_ns[end - 1] - t0) / 1e9, reason, roles, labelled))
    return result


# The learner's methods (habc_learner.methods.Method; importing it would load torch).
METHODS = ('sft', 'imit_dagger', 'imit_recap', 'habc_v', 'habc', 'habc_ir', 'habc_naive', 'awr')


def credit_config_for(method: str, horizon: int, min_human_steps: int | None) -> Any:
    """Return the CreditConfig the learner's `method` uses (MethodConfig.credit_config()).

    Built here from the same three settings instead of through MethodConfig, whose module
    loads torch (seconds, for a table); test_episodes_cli checks that both agree.
    """
    from habc_learner.credit import CreditConfig

    try:
        return CreditConfig(horizon=horizon, min_human_steps=min_human_steps,
                            naive=method == 'habc_naive')
    except ValueError as exc:
        raise EpisodesError(str(exc), code=2) from None


def cmd_show(index: EpisodeIndex, args: argparse.Namespace) -> int:
    try:
        record = index.get(args.episode_id)
    except KeyError as exc:
        raise EpisodesError(exc.args[0]) from None
    config = credit_config_for(args.method, args.horizon, args.min_human_steps)
    bag = _bag_path(record, index.path)
    problem = ''
    try:
        steps = read_steps(bag)
        summary = segment_summary(steps, record.outcome, config)
    except (FileNotFoundError, ValueError) as exc:
        steps, summary, problem = None, [], str(exc)
    if args.json:
        print(json.dumps({'record': asdict(record), 'bag': str(bag),
                          'steps': len(steps.controllers) if steps else None,
                          'credit': {'method': args.method, 'horizon': config.horizon,
                                     'min_human_steps': config.k, 'naive': config.naive},
                          'segments': [asdict(s) for s in summary],
                          'error': problem or None}, indent=1))
        return 1 if problem else 0
    r = record
    label = r.outcome
    if r.labelled_at is not None:
        label += f' (by {r.labeler or "?"} at {_time(r.labelled_at)}'
        label += f': {r.note})' if r.note else ')'
    duration = f' ({r.ended_at - r.started_at:.1f} s)' if r.ended_at is not None else ''
    print(f'episode      {r.episode_id}')
    print(f'outcome      {label}')
    print(f'status       {r.status}')
    print(f'steps        {r.num_steps}, {r.num_interventions} intervention(s)')
    print(f'policy       {r.policy_version or "-"}')
    print(f'instruction  {r.instruction or "-"}')
    print(f'robot        {r.robot or "-"}')
    print(f'time         {_time(r.started_at)} - {_time(r.ended_at)}{duration}')
    print(f'bag          {bag}')
    print('\n'.join(help_lines(r)))
    if problem:
        print(f'habc episodes: cannot read the segments: {problem}', file=sys.stderr)
        return 1
    print(f'\n{len(steps.controllers)} training steps in {len(summary)} segment(s); credit of '
          f'the windows anchored in each ({args.method}, H={config.horizon}, k={config.k}'
          f'{", naive" if config.naive else ""}):')
    rows = [(str(s.segment), s.controller, f'{s.first_step}-{s.last_step}',
             str(s.last_step - s.first_step + 1), f'{s.start_s:.2f}-{s.end_s:.2f}',
             s.reason or '-', ', '.join(f'{role} {n}' for role, n in s.roles.items()))
            for s in summary]
    print(format_table(('SEG', 'CONTROLLER', 'STEPS', 'N', 'TIME (s)', 'REASON', 'CREDIT'),
                       rows, right=(0, 3)))
    return 0


def _bag_path(record: EpisodeRecord, index_file: Path) -> Path:
    # As the learner resolves it: a relative path is tried beside the index first.
    path = expand(record.bag_path)
    if path.is_absolute():
        return path
    beside = index_file.parent / path
    return beside if beside.exists() else path.resolve()


# label ---------------------------------------------------------------------------------------

def cmd_label(index: EpisodeIndex, args: argparse.Namespace) -> int:
    try:
        before = index.get(args.episode_id).outcome
        record = index.label(args.episode_id, args.outcome, args.labeler, args.note,
                             now=time.time())
    except KeyError as exc:
        raise EpisodesError(exc.args[0]) from None
    change = f'{before} -> {record.outcome}' if before != record.outcome else record.outcome
    note = ' (not trained on until its status is complete or incomplete)' if (
        record.outcome != 'discarded' and not record.trainable) else ''
    print(f'episode {record.episode_id} labelled {change} by {record.labeler or "-"} '
          f'(label_seq {record.label_seq}){note}')
    return 0


# export --------------------------------------------------------------------------------------

def cmd_export(index: EpisodeIndex, args: argparse.Namespace) -> int:
    from habc_episodes.lerobot_export import export_lerobot, ExportOptions

    if args.ids:
        try:
            records = [index.get(episode_id) for episode_id in args.ids]
        except KeyError as exc:
            raise EpisodesError(exc.args[0]) from None
        untrainable = [r.episode_id for r in records if not r.trainable]
        if untrainable:
            raise EpisodesError(f'{untrainable} are not labelled success/failure with a '
                                'finished bag; label them first (habc episodes label)', code=2)
    else:
        records = [r for r in index.list() if r.trainable]
    if args.outcome:
        records = [r for r in records if r.outcome == args.outcome]
    records.sort(key=lambda r: (r.started_at, r.episode_id))
    if not records:
        raise EpisodesError(f'no labelled (success/failure) episodes to export in {index.path}')
    options = ExportOptions(images=not args.no_images, image_size=args.image_size or None,
                            fps=args.fps, overwrite=args.overwrite)
    try:
        report = export_lerobot([(r, _bag_path(r, index.path)) for r in records],
                                expand(args.out), options, source=str(index.path))
    except (FileExistsError, ValueError) as exc:
        raise EpisodesError(str(exc), code=2) from None
    for episode_id, reason in report.skipped.items():
        print(f'habc episodes: skipped {episode_id}: {reason}', file=sys.stderr)
    if report.data_format != 'parquet':
        print('habc episodes: pyarrow is not installed, so the frames went into .npz files '
              '(same columns) instead of parquet; `pip install pyarrow` and export again for '
              'a dataset LeRobot can load', file=sys.stderr)
    print(f'exported {report.episodes} episode(s), {report.frames} frames at {report.fps} fps '
          f'to {report.path} ({report.data_format}'
          f'{", PNG frames" if report.images else ", no images"})')
    return 1 if not report.episodes else 0


# command line --------------------------------------------------------------------------------

def _common(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument('--index', metavar='FILE',
                       help=f'episode index (default: {DEFAULT_STORAGE_DIR}/{INDEX_FILE})')
    where.add_argument('--storage-dir', metavar='DIR',
                       help=f"the recorder's storage_dir; the index is DIR/{INDEX_FILE}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `habc episodes` actions to a parser."""
    sub = parser.add_subparsers(dest='action', metavar='ACTION', required=True)
    p = sub.add_parser('list', help='table of episodes, newest first')
    _common(p)
    p.add_argument('--outcome', choices=Outcome.labels())
    p.add_argument('--status', choices=EpisodeStatus.labels())
    p.add_argument('--limit', type=int, default=50, help='at most this many (default 50)')
    p.add_argument('--json', action='store_true', help='the index rows as JSON')
    p.set_defaults(action_run=cmd_list)

    p = sub.add_parser('show', help='one episode: record, intervention segments, credit')
    _common(p)
    p.add_argument('episode_id', metavar='ID')
    p.add_argument('--method', default='habc', choices=METHODS,
                   help='training method whose credit rules apply (default habc; habc_naive '
                   'gives every window the outcome)')
    p.add_argument('--horizon', type=int, default=50,
                   help="chunk length H of the learner's policy (default 50, the paper's)")
    p.add_argument('--min-human-steps', type=int, default=None, metavar='K',
                   help='human steps that make a human window (default 10 of 50, scaled)')
    p.add_argument('--json', action='store_true')
    p.set_defaults(action_run=cmd_show)

    p = sub.add_parser('label', help='set or change the outcome in the index')
    _common(p)
    p.add_argument('episode_id', metavar='ID')
    p.add_argument('outcome', choices=[o.label for o in LABEL_OUTCOMES])
    p.add_argument('--note', default='')
    p.add_argument('--labeler', default=_user(), help='default: your user name')
    p.set_defaults(action_run=cmd_label)

    p = sub.add_parser('export', help='labelled episodes as a LeRobot-style dataset')
    _common(p)
    p.add_argument('out', metavar='OUT', help='dataset folder to create')
    p.add_argument('--format', choices=('lerobot',), default='lerobot')
    p.add_argument('--outcome', choices=tuple(o.label for o in Outcome if o.trainable),
                   help='only these (default: both)')
    p.add_argument('--ids', nargs='+', metavar='ID', help='only these episodes')
    p.add_argument('--no-images', action='store_true', help='leave the camera images out')
    p.add_argument('--image-size', type=int, default=0, metavar='PX',
                   help='resize images to PX x PX (default: as recorded)')
    p.add_argument('--fps', type=int, default=None,
                   help='frame rate to declare (default: from the step timestamps)')
    p.add_argument('--overwrite', action='store_true',
                   help='replace an earlier export at OUT')
    p.set_defaults(action_run=cmd_export)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return 'habc episodes'


def run(args: argparse.Namespace) -> int:
    """Run one `habc episodes` action; see HELP for the exit codes."""
    try:
        # Only `label` writes; list, show and export open the index read-only.
        writes = args.action_run is cmd_label
        with open_index(index_path(args.index, args.storage_dir),
                        read_only=not writes) as index:
            return args.action_run(index, args)
    except EpisodesError as exc:
        print(f'habc episodes: {exc}', file=sys.stderr)
        return exc.code


def main(argv: list[str] | None = None) -> None:
    """Run `habc episodes` on its own (python -m habc.episodes)."""
    parser = argparse.ArgumentParser(prog='habc episodes', description=HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    sys.exit(run(parser.parse_args(argv)))


if __name__ == '__main__':
    main()
