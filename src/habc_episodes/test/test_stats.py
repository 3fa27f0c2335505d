"""Index records summarised per policy version (the dashboard's plot, habc demo's table)."""

from habc_episodes.index import EpisodeRecord
from habc_episodes.stats import version_stats


def record(episode_id, version, outcome, takeovers, status='complete'):
    return EpisodeRecord(episode_id, f'/bags/{episode_id}', 'r', 'task', outcome, '', '', 100,
                         takeovers, version, status, 0.0, 5.0, None, None)


def test_labelled_only_leaves_unlabelled_episodes_and_their_takeovers_out():
    records = [record('a', '2', 'success', 1), record('b', '2', 'unlabelled', 4),
               record('c', '2', 'discarded', 9), record('d', '', 'failure', 2)]
    everything = {s.version: s for s in version_stats(records)}
    assert (everything['2'].episodes, everything['2'].takeovers) == (2, 5)
    labelled = version_stats(records, labelled_only=True, no_version='none')
    assert [s.version for s in labelled] == ['none', '2']
    assert (labelled[1].episodes, labelled[1].takeovers, labelled[1].discarded) == (1, 1, 1)


def test_versions_in_the_order_they_ran_and_a_malformed_one_last():
    records = [record(str(k), v, 'success', 0)
               for k, v in enumerate(['10', '1:bad tag:', '2', '1:sft', ''])]
    assert [s.version for s in version_stats(records)] == ['-', '1:sft', '2', '10',
                                                           '1:bad tag:']
