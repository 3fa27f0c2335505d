"""The train report counts requested and spontaneous takeovers and the help requests."""

import json

from episode_bags import SEC, TICK_NS, write_episode
import numpy as np

from habc_episodes.dataset import Label, LoadedBag, LoadResult
from habc_episodes.episode_bags import episode_from_bag
from habc_episodes.vocabulary import EpisodeKind, Outcome
from habc_learner.credit import CreditConfig
from habc_learner.data import SampleBuffer
from habc_learner.train_report import build_report, write_report

START_NS = 100 * SEC


def loaded(path, outcome, kind=EpisodeKind.ROLLOUT):
    episode = episode_from_bag(path, outcome, with_images=False, kind=kind)
    return LoadedBag(path, episode, Label(Outcome.parse(outcome), 'sidecar'), 1000, 0.01)


def test_requested_and_spontaneous_takeovers_and_help_requests_in_the_report(tmp_path):
    # Episode a: a request raised at tick 1 and answered by the pedal at tick 3, then a
    # second one that recovered. Episode b: an old bag, one spontaneous takeover. The
    # demonstration is human throughout and counts no takeover.
    a = write_episode(tmp_path / 'a', [0, 0, 0, 1, 1, 0, 0, 0, 0],
                      ['start'] * 3 + ['engage'] * 2 + ['handback'] * 4, start_ns=START_NS,
                      help_requests=[(START_NS + TICK_NS, True, 'low', 0.1),
                                     (START_NS + 3 * TICK_NS + 1000, False, 'answered', 0.1),
                                     (START_NS + 6 * TICK_NS, True, 'stalled', 0.4),
                                     (START_NS + 7 * TICK_NS, False, 'recovered', 0.6)])
    b = write_episode(tmp_path / 'b', [0, 1, 1, 0, 0], start_ns=START_NS)
    demo = write_episode(tmp_path / 'demo', [1, 1, 1], start_ns=START_NS)
    result = LoadResult(loaded=[loaded(a, 'success'), loaded(b, 'failure'),
                                loaded(demo, 'success', EpisodeKind.DEMO)])
    buffer = SampleBuffer(CreditConfig(horizon=2))
    for item in result.loaded:
        buffer.add(item.episode)
    everything = np.ones(len(buffer), dtype=bool)
    report = build_report(command='habc train', result=result, buffer=buffer,
                          actor_mask=everything, critic_mask=everything, history=[],
                          training={'method': 'habc', 'policy': 'mlp', 'init': '', 'steps': 0,
                                    'batch_size': 1, 'seconds': 0.0, 'samples_per_s': 0.0,
                                    'checkpoint': 'ckpt', 'tensorboard': 'tb'}, mapping={})
    by_bag = {row['bag']: row for row in report['episodes']}
    first, second, demonstration = by_bag[str(a)], by_bag[str(b)], by_bag[str(demo)]
    assert (demonstration['requested_takeovers'], demonstration['spontaneous_takeovers']) == (
        0, 0)
    assert (first['requested_takeovers'], first['spontaneous_takeovers'],
            first['help_requests'], first['help_answered'], first['help_recovered'],
            first['help_unanswered']) == (1, 0, 2, 1, 1, 0)
    assert first['help_request_records'][0]['answered_by'] == 'engage'
    assert (second['requested_takeovers'], second['spontaneous_takeovers'],
            second['help_requests']) == (0, 1, 0)
    data = report['data']
    assert (data['requested_takeovers'], data['spontaneous_takeovers'], data['help_requests'],
            data['help_answered'], data['help_recovered'], data['help_unanswered']) == (
        1, 1, 2, 1, 1, 0)

    markdown = write_report(tmp_path / 'out', report).read_text()
    assert ('Takeovers of rollouts: 1 requested (a help request of the robot was open, or the '
            'takeover answered it), 1 spontaneous. Help requests: 2 (1 answered, 1 recovered '
            'without help, 0 unanswered).') in markdown
    assert '| req. takeovers | spont. takeovers | help req. |' in markdown
    saved = json.loads((tmp_path / 'out' / 'report.json').read_text())
    assert saved['data']['requested_takeovers'] == 1
