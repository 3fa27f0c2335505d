"""The report of `habc train`: what the data was, how it was credited, how training went.

Written into the output folder as report.md (Markdown with PNG plots under plots/) and
report.json (the same numbers, machine-readable). No rclpy.
"""

from collections import Counter
from collections.abc import Sequence
import json
from pathlib import Path
from typing import Any

import numpy as np

from habc_episodes.dataset import LoadResult, summarize_skipped
from habc_episodes.episode import Episode, segments
from habc_episodes.help_requests import ANSWERED, RECOVERED, UNANSWERED
from habc_episodes.vocabulary import Controller, EpisodeKind
from habc_learner.data import SampleBuffer, WeightCode

# Who produced a step in the report: a controller, or a demonstration (D_SFT).
SOURCES = (*Controller.labels(), 'demonstration')
# Per-episode counts of help requests and takeovers that are summed into the data totals.
HELP_KEYS = ('requested_takeovers', 'spontaneous_takeovers', 'help_requests',
             f'help_{ANSWERED}', f'help_{RECOVERED}', f'help_{UNANSWERED}')


def episode_row(path: Path, episode: Episode, label_source: str, size_bytes: int,
                seconds: float) -> dict[str, Any]:
    """Return the per-episode numbers of the report."""
    controllers = episode.controllers
    runs = Counter(controller.name.lower() for _, _, controller in segments(controllers))
    stamps = episode.timestamps
    # A demonstration is human throughout: no takeover of a policy.
    help_summary = episode.help if episode.kind != EpisodeKind.DEMO else None
    help_counts = dict.fromkeys(HELP_KEYS, 0)
    if help_summary is not None:
        help_counts.update({
            'requested_takeovers': help_summary.requested_takeovers,
            'spontaneous_takeovers': help_summary.spontaneous_takeovers,
            'help_requests': len(help_summary.requests),
            **{f'help_{outcome}': help_summary.count(outcome)
               for outcome in (ANSWERED, RECOVERED, UNANSWERED)}})
    return {
        'bag': str(path), 'episode_id': episode.episode_id,
        'kind': 'demonstration' if episode.kind == EpisodeKind.DEMO else 'rollout',
        'outcome': episode.outcome.name.lower(), 'label_source': label_source,
        'steps': len(episode),
        'policy_steps': int(np.sum(controllers == Controller.POLICY)),
        'human_steps': int(np.sum(controllers == Controller.HUMAN)),
        'hold_steps': int(np.sum(controllers == Controller.HOLD)),
        'policy_segments': runs.get('policy', 0), 'human_segments': runs.get('human', 0),
        'hold_segments': runs.get('hold', 0),
        'segments': [[start, end, controller.name.lower()]
                     for start, end, controller in segments(controllers)],
        'duration_s': float(stamps[-1] - stamps[0]) if len(stamps) else 0.0,
        'size_mb': size_bytes / 1e6, 'load_s': seconds,
        **help_counts,
        'help_request_records': [record.to_dict() for record in episode.help_requests],
    }


def credit_summary(buffer: SampleBuffer, actor_mask: np.ndarray,
                   critic_mask: np.ndarray) -> dict[str, dict[str, int]]:
    """Return, per step source (policy / human / hold / demonstration), how its windows count.

    The source is who controlled the anchor step; the role and actor weight are those of
    habc_learner.credit (a policy step just before a takeover can sit in a human window).
    """
    table = buffer.table
    controllers = np.concatenate([np.asarray(e.controllers) for e in buffer.episodes])
    source = np.array([Controller(int(c)).name.lower() for c in controllers], dtype=object)
    source[table['is_sft']] = 'demonstration'
    label = table['label']
    role = np.full(len(source), 'policy_unlabelled', dtype=object)
    role[table['trains_viability']] = 'policy_labelled'
    role[table['is_hold']] = 'hold'
    role[table['is_human']] = 'human'
    role[table['is_sft']] = 'demonstration'
    weight_names = {code: code.name.lower() for code in WeightCode}
    summary = {}
    for name in SOURCES:
        rows = source == name
        if not rows.any():
            continue
        entry = {'windows': int(rows.sum())}
        for role_name in ('policy_labelled', 'policy_unlabelled', 'human', 'hold'):
            entry[f'role_{role_name}'] = int(np.sum(rows & (role == role_name)))
        entry['label_success'] = int(np.sum(rows & (label == 1.0)))
        entry['label_failure'] = int(np.sum(rows & (label == 0.0)))
        for code, weight_name in weight_names.items():
            entry[f'weight_{weight_name}'] = int(np.sum(rows & (table['weight_code'] == code)))
        entry['in_actor_loss'] = int(np.sum(rows & actor_mask))
        entry['in_critic_loss'] = int(np.sum(rows & critic_mask))
        summary[name] = entry
    return summary


def build_report(*, command: str, result: LoadResult, buffer: SampleBuffer,
                 actor_mask: np.ndarray, critic_mask: np.ndarray, history: list[dict],
                 training: dict[str, Any], mapping: dict[str, Any]) -> dict[str, Any]:
    """Collect every number of the report into one JSON-ready dict."""
    rows = [episode_row(item.path, item.episode, item.label.source, item.size_bytes,
                        item.seconds) for item in result.loaded]
    totals = {key: int(sum(row[key] for row in rows))
              for key in ('steps', 'policy_steps', 'human_steps', 'hold_steps',
                          'policy_segments', 'human_segments', 'hold_segments', *HELP_KEYS)}
    return {
        'command': command,
        'mapping': mapping,
        'data': {
            'episodes': len(rows),
            'rollouts': sum(row['kind'] == 'rollout' for row in rows),
            'demonstrations': sum(row['kind'] == 'demonstration' for row in rows),
            **totals,
            'outcomes': dict(Counter(row['outcome'] for row in rows)),
            'label_sources': dict(Counter(row['label_source'] for row in rows)),
            'bags_read_mb': result.size_bytes / 1e6,
            'load_s': result.seconds,
            'load_mb_per_s': (result.size_bytes / 1e6 / result.seconds
                              if result.seconds > 0 else None),
            'skipped': summarize_skipped(result.skipped),
        },
        'episodes': rows,
        'skipped': [{'bag': str(item.path), 'reason': item.reason, 'message': item.message}
                    for item in result.skipped],
        'unmatched_labels': result.unmatched_labels,
        'credit': credit_summary(buffer, actor_mask, critic_mask),
        'training': training,
        'history': history,
    }


def _plot(path: Path, history: Sequence[dict], prefix: str, title: str) -> bool:
    keys = sorted({k for row in history for k in row if k.startswith(prefix)
                   and not k.endswith('grad_norm')})
    if not keys:
        return False
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(7, 3.8))
    positive = True
    for key in keys:
        points = [(row['step'], row[key]) for row in history if key in row]
        positive = positive and all(value > 0 for _, value in points)
        axis.plot(*zip(*points, strict=True), marker='.' if len(points) < 30 else None,
                  label=key)
    if positive and prefix == 'losses/':
        axis.set_yscale('log')  # critic and actor losses differ by orders of magnitude
    axis.set_xlabel('gradient step')
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def _plot_episodes(path: Path, rows: Sequence[dict]) -> bool:
    if not rows:
        return False
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    shown = rows[:60]  # a readable figure; the table lists every episode
    figure, axis = plt.subplots(figsize=(7, max(2.0, 0.25 * len(shown) + 1.2)))
    colours = {'policy': 'tab:blue', 'human': 'tab:orange', 'hold': 'tab:gray'}
    for y, row in enumerate(shown):
        for controller, colour in colours.items():
            spans = [(start, end - start) for start, end, who in row['segments']
                     if who == controller]
            if spans:
                axis.broken_barh(spans, (y - 0.4, 0.8), color=colour)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    axis.legend(handles, list(colours), fontsize=8, loc='upper right')
    axis.set_yticks(range(len(shown)),
                    [f'{row["episode_id"]} ({row["outcome"]})' for row in shown])
    axis.invert_yaxis()
    axis.set_xlabel('step')
    axis.set_title('Who controlled each step (segments)')
    axis.tick_params(axis='y', labelsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f'{value:.4g}'
        return str(value).replace('|', '\\|').replace('\n', ' ')
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join(cell(v) for v in row) + ' |' for row in rows]
    return lines


def write_report(out: Path, report: dict[str, Any]) -> Path:
    """Write report.json, report.md and plots/*.png into `out`; return the Markdown path."""
    out = Path(out)
    plots = out / 'plots'
    plots.mkdir(parents=True, exist_ok=True)
    (out / 'report.json').write_text(json.dumps(report, indent=2, default=str) + '\n')
    data, training = report['data'], report['training']
    md = ['# habc train report', '', f'    {report["command"]}', '']
    md += ['## Data', '']
    md += _table(['episodes', 'rollouts', 'demonstrations', 'steps', 'policy steps',
                  'human steps', 'hold steps', 'policy segments', 'human segments',
                  'MB read', 'load s', 'MB/s'],
                 [[data['episodes'], data['rollouts'], data['demonstrations'], data['steps'],
                   data['policy_steps'], data['human_steps'], data['hold_steps'],
                   data['policy_segments'], data['human_segments'], data['bags_read_mb'],
                   data['load_s'], data['load_mb_per_s'] or 0.0]])
    md += ['', f'Takeovers of rollouts: {data["requested_takeovers"]} requested (a help request '
           f'of the robot was open, or the takeover answered it), '
           f'{data["spontaneous_takeovers"]} spontaneous. Help requests: '
           f'{data["help_requests"]} ({data[f"help_{ANSWERED}"]} answered, '
           f'{data[f"help_{RECOVERED}"]} recovered without help, '
           f'{data[f"help_{UNANSWERED}"]} unanswered).']
    md += ['', 'Outcomes: ' + (', '.join(f'{k} {v}' for k, v in sorted(data['outcomes'].items()))
                               or 'none'),
           '', 'Label sources (labels CSV > episode index > sidecar file): '
           + (', '.join(f'{k} {v}' for k, v in sorted(data['label_sources'].items()))
              or 'none'), '']
    if report['mapping']:
        md += ['Topic mapping: `' + json.dumps(report['mapping']) + '`', '']
    if _plot_episodes(plots / 'episodes.png', report['episodes']):
        md += ['![steps per episode](plots/episodes.png)', '']
    md += ['### Episodes', '']
    md += _table(['episode', 'kind', 'outcome', 'label from', 'steps', 'policy', 'human',
                  'hold', 'policy seg.', 'human seg.', 'req. takeovers', 'spont. takeovers',
                  'help req.', 'duration s', 'MB', 'bag'],
                 [[r['episode_id'], r['kind'], r['outcome'], r['label_source'], r['steps'],
                   r['policy_steps'], r['human_steps'], r['hold_steps'],
                   r['policy_segments'], r['human_segments'], r['requested_takeovers'],
                   r['spontaneous_takeovers'], r['help_requests'], r['duration_s'],
                   r['size_mb'], r['bag']] for r in report['episodes']])
    md += ['', '### Skipped bags', '']
    if report['skipped']:
        md += _table(['bag', 'reason', 'what is wrong / what to do'],
                     [[s['bag'], s['reason'], s['message']] for s in report['skipped']])
    else:
        md += ['None.']
    if report['unmatched_labels']:
        md += ['', 'Labels CSV rows that matched no bag: '
               + '; '.join(report['unmatched_labels'])]
    md += ['', '## Credit (habc_learner.credit) by who controlled the anchor step', '',
           'Windows are anchored at every step. Roles and actor weights as in spec/habc.md: '
           'gate = g_t of the HABC gate, zero = weight 0 (failed rollouts), one = imitation, '
           'excluded = not in the actor loss. "in actor/critic loss" counts the windows '
           f'that method {training["method"]} trains on.', '']
    columns = ['windows', 'role_policy_labelled', 'role_policy_unlabelled', 'role_human',
               'role_hold', 'label_success', 'label_failure', 'weight_gate', 'weight_zero',
               'weight_one', 'weight_excluded', 'in_actor_loss', 'in_critic_loss']
    md += _table(['source', *[c.replace('_', ' ') for c in columns]],
                 [[name, *[entry[c] for c in columns]]
                  for name, entry in report['credit'].items()])
    md += ['', '## Training', '']
    md += _table(['method', 'policy', 'init', 'steps', 'batch', 'seconds', 'samples/s',
                  'checkpoint'],
                 [[training['method'], training['policy'], training['init'] or '(new)',
                   training['steps'], training['batch_size'], training['seconds'],
                   training['samples_per_s'], training['checkpoint']]])
    final = report['history'][-1] if report['history'] else {}
    if final:
        md += ['', 'Last logged metrics (mean over the last logging window):', '']
        md += _table(['metric', 'value'], [[k, v] for k, v in sorted(final.items())])
    for name, prefix, title in (('losses', 'losses/', 'Losses'),
                                ('weights', 'weights/', 'Actor weights'),
                                ('critic', 'critic/', 'Critic')):
        if _plot(plots / f'{name}.png', report['history'], prefix, title):
            md += ['', f'![{title.lower()}](plots/{name}.png)']
    md += ['', f'TensorBoard: `tensorboard --logdir {training["tensorboard"]}`', '']
    path = out / 'report.md'
    path.write_text('\n'.join(md))
    return path
