"""habc episodes: list, show (segments and credit, checked by hand), label, export."""

import argparse
from datetime import datetime
import json

from episode_bags import write_episode
import numpy as np
import pytest

from habc import episodes
from habc_episodes.index import EpisodeIndex
from habc_episodes.lerobot_export import have_pyarrow

# policy x3, human x2 (takeover by pedal), policy x3, one hold tick, policy x3
SOURCES = [0, 0, 0, 1, 1, 0, 0, 0, 2, 0, 0, 0]
REASONS = ['start'] * 3 + ['pedal'] * 2 + ['handback'] * 3 + ['watchdog'] + ['resumed'] * 3


def habc_episodes(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    episodes.add_arguments(parser)
    return episodes.run(parser.parse_args(list(argv)))


@pytest.fixture
def storage(tmp_path):
    """Return a storage dir: labelled, unlabelled and still-recording episodes in its index."""
    root = tmp_path / 'episodes'
    bags = root / 'bags'
    with EpisodeIndex(root / 'episodes.sqlite') as index:
        for n, (episode_id, outcome) in enumerate((('ep-a', 'success'), ('ep-b', None),
                                                   ('ep-c', 'failure'))):
            bag = write_episode(bags / episode_id, SOURCES if n != 2 else [0] * 6,
                                REASONS if n != 2 else None, early_action=True)
            index.create(episode_id, bag, 'transfer the cube', f'v{n + 1}',
                         started_at=1000.0 + 100 * n, robot='robot1')
            index.finish(episode_id, 13, 1, ended_at=1012.5 + 100 * n)
            if outcome:
                index.label(episode_id, outcome, 'alice', 'clean', now=1050.0 + 100 * n)
        index.create('ep-d', bags / 'ep-d', '', '', started_at=2000.0)
    return root


def test_list_prints_a_table_newest_first_with_filters(storage, capsys):
    assert habc_episodes('list', '--storage-dir', str(storage)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ['ID', 'OUTCOME', 'STATUS', 'STEPS', 'INTERV', 'REQ', 'SPONT',
                                'HELP', 'POLICY', 'STARTED', 'DURATION']
    started = datetime.fromtimestamp(1000.0).strftime('%Y-%m-%d %H:%M:%S')
    assert [line.split()[0] for line in lines[1:]] == ['ep-d', 'ep-c', 'ep-b', 'ep-a']
    # Finished without help request counts (as before the index kept them): '-'.
    assert lines[4].split() == ['ep-a', 'success', 'complete', '13', '1', '-', '-', '-', 'v1',
                                *started.split(), '12.5', 's']
    assert lines[1].split()[:9] == ['ep-d', 'unlabelled', 'recording', '0', '0', '-', '-',
                                    '-', '-']

    assert habc_episodes('list', '--index', str(storage / 'episodes.sqlite'),
                         '--outcome', 'unlabelled', '--status', 'complete') == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]] == ['ep-b']
    assert habc_episodes('list', '--storage-dir', str(storage), '--limit', '1', '--json') == 0
    assert [row['episode_id'] for row in json.loads(capsys.readouterr().out)] == ['ep-d']


def test_list_and_show_tell_requested_from_spontaneous_takeovers(tmp_path, capsys):
    from habc_episodes.episode_bags import episode_from_bag

    # The robot asked for help at 20 ms, the pedal answered it at 60 ms (step 3); later the
    # leader arm was pulled away without a request (step 7); a second request recovered.
    start_ns, tick = 100 * 10**9, 20_000_000
    sources = [0, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 0]
    reasons = ['start'] * 3 + ['engage'] * 2 + ['handback'] * 2 + ['deviation'] * 2 + [
        'handback'] * 3
    root = tmp_path / 'episodes'
    bag = write_episode(root / 'bags' / 'ep-h', sources, reasons, start_ns=start_ns,
                        help_requests=[(start_ns + tick, True, 'low', 0.125),
                                       (start_ns + 3 * tick + 1000, False, 'answered', 0.125),
                                       (start_ns + 10 * tick, True, 'stalled', 0.5),
                                       (start_ns + 11 * tick, False, 'recovered', 0.5)])
    summary = episode_from_bag(bag, 'failure', with_images=False).help
    with EpisodeIndex(root / 'episodes.sqlite') as index:
        index.create('ep-h', bag, 'transfer the cube', '1', started_at=1000.0)
        index.finish('ep-h', 12, 2, ended_at=1001.0, help_summary=summary)
    assert habc_episodes('list', '--storage-dir', str(root)) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[:9] == ['ep-h', 'unlabelled', 'complete', '12', '2', '1', '1', '2', '1']

    assert habc_episodes('show', 'ep-h', '--storage-dir', str(root)) == 0
    out = capsys.readouterr().out
    assert 'takeovers    1 requested, 1 spontaneous' in out
    assert 'help         2 request(s): 1 answered, 1 recovered, 0 unanswered' in out
    table = out[out.index('RAISED'):].splitlines()
    assert [line.split() for line in table[1:3]] == [
        ['0.02', 'low', '0.12', '0.06', 'answered', 'engage', '1'],
        ['0.20', 'stalled', '0.50', '0.22', 'recovered', '-', '1']]
    assert habc_episodes('show', 'ep-h', '--storage-dir', str(root), '--json') == 0
    shown = json.loads(capsys.readouterr().out)['record']
    assert shown['num_requested_takeovers'] == 1
    assert shown['help_requests'][0]['answered_by'] == 'engage'


def test_a_missing_index_is_not_created(tmp_path, capsys):
    assert habc_episodes('list', '--storage-dir', str(tmp_path / 'nowhere')) == 2
    assert 'no episode index at' in capsys.readouterr().err
    assert not (tmp_path / 'nowhere').exists()


def test_show_prints_segments_and_their_credit(storage, capsys):
    # H = 4 gives k = round(10 * 4 / 50) = 1: every window holding a human step is a human
    # window, so the policy steps 0-2 just before the takeover are too (windows 0-3 .. 2-5).
    # After the last human step (4) the policy windows get the success label; the hold
    # window is nobody's. The action before the first observation is not a step.
    assert habc_episodes('show', 'ep-a', '--storage-dir', str(storage), '--horizon', '4') == 0
    out = capsys.readouterr().out
    assert 'success (by alice at' in out and ': clean)' in out
    assert '12 training steps in 5 segment(s)' in out and '(habc, H=4, k=1)' in out
    table = out[out.index('SEG'):].splitlines()
    assert [line.split() for line in table[1:]] == [
        ['0', 'policy', '0-2', '3', '0.00-0.04', 'start', 'human', '3'],
        ['1', 'human', '3-4', '2', '0.06-0.08', 'pedal', 'human', '2'],
        ['2', 'policy', '5-7', '3', '0.10-0.14', 'handback', 'policy_labelled', '3'],
        ['3', 'hold', '8-8', '1', '0.16-0.16', 'watchdog', 'hold', '1'],
        ['4', 'policy', '9-11', '3', '0.18-0.22', 'resumed', 'policy_labelled', '3'],
    ]
    # The paper's H = 50, k = 10: two human steps make no human window, and nothing before
    # the takeover is labelled.
    assert habc_episodes('show', 'ep-a', '--storage-dir', str(storage), '--json') == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown['credit'] == {'method': 'habc', 'horizon': 50, 'min_human_steps': 10,
                               'naive': False}
    assert [(s['roles'], s['labelled']) for s in shown['segments']] == [
        ({'policy_unlabelled': 3}, 0), ({'policy_unlabelled': 2}, 0),
        ({'policy_labelled': 3}, 3), ({'hold': 1}, 0), ({'policy_labelled': 3}, 3)]


def test_show_steps_match_the_learner_and_its_credit_config(storage):
    from habc_episodes.episode_bags import episode_from_bag
    from habc_learner.methods import MethodConfig

    steps = episodes.read_steps(storage / 'bags' / 'ep-a')
    episode = episode_from_bag(storage / 'bags' / 'ep-a', 'success')
    assert steps.controllers == episode.controllers.tolist()
    np.testing.assert_allclose(np.array(steps.stamps_ns) * 1e-9, episode.timestamps)
    for method in episodes.METHODS:
        assert episodes.credit_config_for(method, 10, None) == \
            MethodConfig(method=method, horizon=10).credit_config()


def test_show_of_an_unknown_episode_or_a_missing_bag(storage, capsys):
    assert habc_episodes('show', 'nope', '--storage-dir', str(storage)) == 1
    assert "'nope' is not in the episode index" in capsys.readouterr().err
    assert habc_episodes('show', 'ep-d', '--storage-dir', str(storage)) == 1
    captured = capsys.readouterr()
    assert 'episode      ep-d' in captured.out
    assert 'not a rosbag2 directory' in captured.err


def test_label_writes_the_index(storage, capsys):
    index_file = storage / 'episodes.sqlite'
    with EpisodeIndex(index_file) as index:
        seq = index.last_label_seq()
    assert habc_episodes('label', 'ep-b', 'failure', '--note', 'dropped it', '--labeler',
                         'bob', '--index', str(index_file)) == 0
    assert f'episode ep-b labelled unlabelled -> failure by bob (label_seq {seq + 1})' in \
        capsys.readouterr().out
    with EpisodeIndex(index_file) as index:
        record = index.get('ep-b')
        assert (record.outcome, record.labeler, record.note) == ('failure', 'bob', 'dropped it')
        assert [r.episode_id for r in index.labelled_since(seq)] == ['ep-b']
    assert habc_episodes('label', 'nope', 'success', '--index', str(index_file)) == 1
    assert "'nope' is not in the episode index" in capsys.readouterr().err


def test_export_writes_a_lerobot_layout(storage, tmp_path, capsys):
    out = tmp_path / 'dataset'
    assert habc_episodes('export', str(out), '--storage-dir', str(storage)) == 0
    assert 'exported 2 episode(s), 18 frames at 50 fps' in capsys.readouterr().out
    info = json.loads((out / 'meta' / 'info.json').read_text())
    data_format = 'parquet' if have_pyarrow() else 'npz'
    assert (info['total_episodes'], info['total_frames'], info['fps'], info['total_tasks']) \
        == (2, 18, 50, 1)
    assert info['data_path'] == ('data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.'
                                 + data_format)
    assert info['features']['observation.images.view0']['shape'] == [8, 8, 3]
    assert info['features']['controller']['names'] == ['policy', 'human', 'hold']
    meta = [json.loads(line) for line in (out / 'meta' / 'episodes.jsonl').read_text()
            .splitlines()]
    # Oldest first; ep-b is unlabelled and ep-d still recording: not exported.
    assert [(m['habc_episode_id'], m['outcome'], m['length']) for m in meta] == [
        ('ep-a', 'success', 12), ('ep-c', 'failure', 6)]

    columns = _read_frames(out / 'data' / 'chunk-000' / f'episode_000000.{data_format}')
    assert columns['controller'].tolist() == SOURCES
    assert columns['intervention'].tolist() == [s == 1 for s in SOURCES]
    assert columns['frame_index'].tolist() == list(range(12))
    assert columns['next.done'].tolist() == [False] * 11 + [True]
    assert columns['next.success'][-1] and columns['outcome'].tolist() == [1] * 12
    np.testing.assert_allclose(columns['timestamp'], np.arange(12) / 50, atol=1e-6)
    np.testing.assert_allclose(columns['observation.state'][:, 0], 0.01 * np.arange(12),
                               atol=1e-6)
    np.testing.assert_allclose(columns['action'][:, 0], 0.01 * np.arange(12) + 0.01,
                               atol=1e-6)
    second = _read_frames(out / 'data' / 'chunk-000' / f'episode_000001.{data_format}')
    assert second['index'].tolist() == list(range(12, 18))
    assert second['outcome'].tolist() == [0] * 6 and not second['next.success'].any()
    frames = sorted((out / 'images' / 'observation.images.view0' / 'episode_000000').iterdir())
    assert len(frames) == 12 and frames[0].name == 'frame_000000.png'

    # Again only with --overwrite; --no-images leaves the frames out.
    assert habc_episodes('export', str(out), '--storage-dir', str(storage)) == 2
    assert '--overwrite' in capsys.readouterr().err
    assert habc_episodes('export', str(out), '--storage-dir', str(storage), '--overwrite',
                         '--no-images', '--outcome', 'failure') == 0
    info = json.loads((out / 'meta' / 'info.json').read_text())
    assert info['total_episodes'] == 1 and 'observation.images.view0' not in info['features']
    assert not (out / 'images').exists()


def _read_frames(path):
    if path.suffix == '.npz':
        with np.load(path) as data:
            return {name: data[name] for name in data.files}
    import pyarrow.parquet as pq
    table = pq.read_table(path)
    return {name: np.array(table[name].to_pylist()) for name in table.column_names}
