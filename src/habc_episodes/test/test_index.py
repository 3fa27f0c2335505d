"""The episode index: lifecycle, labels and their sequence, crash marking, errors, sharing."""

import sqlite3
import subprocess
import sys

import pytest

from habc_episodes.index import EpisodeIndex, EpisodeRecord, SCHEMA_VERSION


@pytest.fixture
def index(tmp_path):
    with EpisodeIndex(tmp_path / 'index' / 'episodes.sqlite') as opened:
        yield opened


def _recorded(index, episode_id, started_at, robot='', labelled=None):
    """Create and finish an episode; optionally label it."""
    index.create(episode_id, f'/bags/{episode_id}', 'transfer the cube', 'v1',
                 started_at=started_at, robot=robot)
    index.finish(episode_id, num_steps=300, num_interventions=2, ended_at=started_at + 6.0)
    if labelled is not None:
        index.label(episode_id, labelled, 'alice', now=started_at + 10.0)


def test_create_finish_get(index):
    created = index.create('ep-1', '/bags/ep-1', 'transfer the cube', 'v3',
                           started_at=100.0, robot='/left_robot')
    assert created == EpisodeRecord(
        episode_id='ep-1', bag_path='/bags/ep-1', robot='/left_robot',
        instruction='transfer the cube', outcome='unlabelled', labeler='', note='', num_steps=0,
        num_interventions=0, policy_version='v3', status='recording', started_at=100.0,
        ended_at=None, labelled_at=None, label_seq=None)
    finished = index.finish('ep-1', num_steps=250, num_interventions=3, ended_at=105.5)
    assert (finished.status, finished.num_steps, finished.num_interventions,
            finished.ended_at) == ('complete', 250, 3, 105.5)
    assert index.get('ep-1') == finished
    assert not finished.trainable  # finished but not labelled


def test_label_and_relabel_take_increasing_sequences(index):
    _recorded(index, 'ep-1', 100.0)
    _recorded(index, 'ep-2', 200.0)
    assert index.last_label_seq() == 0
    first = index.label('ep-1', 'success', 'alice', 'clean handover', now=110.0)
    assert (first.outcome, first.labeler, first.note, first.labelled_at, first.label_seq) == \
        ('success', 'alice', 'clean handover', 110.0, 1)
    assert index.label('ep-2', 'failure', 'bob', now=210.0).label_seq == 2
    relabelled = index.label('ep-1', 'failure', 'carol', 'slipped after all', now=300.0)
    assert (relabelled.outcome, relabelled.labeler, relabelled.label_seq) == \
        ('failure', 'carol', 3)
    assert index.last_label_seq() == 3

    # A learner that consumed up to sequence 2 sees ep-1 again (with its new label), once.
    assert [(r.episode_id, r.outcome, r.label_seq) for r in index.labelled_since(0)] == \
        [('ep-2', 'failure', 2), ('ep-1', 'failure', 3)]
    assert [r.episode_id for r in index.labelled_since(2)] == ['ep-1']
    assert index.labelled_since(3) == []


def test_labelled_since_returns_only_trainable_episodes(index):
    _recorded(index, 'success', 1.0, labelled='success')
    _recorded(index, 'discarded', 2.0, labelled='discarded')
    _recorded(index, 'unlabelled', 3.0)
    index.create('incomplete-labelled', '/b', '', 'v1', started_at=4.0)
    index.create('incomplete-unlabelled', '/b', '', 'v1', started_at=5.0)
    assert index.mark_incomplete_recordings() == ['incomplete-labelled', 'incomplete-unlabelled']
    index.label('incomplete-labelled', 'failure', 'alice', now=9.0)
    index.create('still-recording', '/b', '', 'v1', started_at=6.0)
    index.label('still-recording', 'success', 'alice', now=7.0)

    assert [r.episode_id for r in index.labelled_since(0)] == \
        ['success', 'incomplete-labelled']
    # With trainable_only=False a learner also sees retractions (e.g. 'discarded').
    everything = index.labelled_since(0, trainable_only=False)
    assert [r.episode_id for r in everything] == \
        ['success', 'discarded', 'incomplete-labelled', 'still-recording']
    assert [r.trainable for r in everything] == [True, False, True, False]


def test_labelled_while_recording_is_seen_after_finish(index):
    """A label set before the episode ends must not slip past a learner's cursor."""
    index.create('early', '/b', '', 'v1', started_at=1.0)
    index.label('early', 'success', 'alice', now=2.0)  # sequence 1, not trainable yet
    _recorded(index, 'other', 3.0, labelled='failure')  # sequence 2
    cursor = max(r.label_seq for r in index.labelled_since(0))
    assert cursor == 2
    finished = index.finish('early', num_steps=10, num_interventions=0, ended_at=4.0)
    assert finished.label_seq == 3 and finished.outcome == 'success'
    assert [r.episode_id for r in index.labelled_since(cursor)] == ['early']


def test_mark_incomplete_recordings(index):
    _recorded(index, 'done', 1.0)
    index.create('crashed-a', '/b', '', 'v1', started_at=2.0, robot='/a')
    index.create('crashed-b', '/b', '', 'v1', started_at=3.0, robot='/b')
    index.label('crashed-a', 'failure', 'alice', now=2.5)
    seq_before = index.get('crashed-a').label_seq

    # Robot /a's recorder restarts: robot /b's live recording is none of its business.
    assert index.mark_incomplete_recordings(robot='/a') == ['crashed-a']
    assert index.get('crashed-b').status == 'recording'
    crashed = index.get('crashed-a')
    assert crashed.status == 'incomplete'
    assert crashed.label_seq > seq_before and crashed.trainable
    assert index.mark_incomplete_recordings() == ['crashed-b']
    assert index.mark_incomplete_recordings() == []
    assert index.get('done').status == 'complete'
    assert not index.get('crashed-b').trainable

    # Counts of a rescued bag can be filled in; the episode stays incomplete.
    rescued = index.finish('crashed-b', 120, 1, ended_at=9.0, complete=False)
    assert (rescued.status, rescued.num_steps) == ('incomplete', 120)
    with pytest.raises(ValueError, match='finish it with complete=False'):
        index.finish('crashed-b', 120, 1, ended_at=9.0)


def test_errors_are_actionable(index):
    _recorded(index, 'ep-1', 1.0)
    with pytest.raises(KeyError, match="'nope' is not in the episode index"):
        index.label('nope', 'success', 'alice', now=1.0)
    with pytest.raises(KeyError, match='nope'):
        index.finish('nope', 1, 0, ended_at=1.0)
    with pytest.raises(KeyError, match='nope'):
        index.get('nope')
    for outcome in ('unknown', 'SUCCESS', 'ok', ''):
        with pytest.raises(ValueError, match=r"choose one of \['success', 'failure', "):
            index.label('ep-1', outcome, 'alice', now=1.0)
    assert index.get('ep-1').label_seq is None  # nothing was written by the failed calls
    assert index.last_label_seq() == 0
    with pytest.raises(ValueError, match='already exists'):
        index.create('ep-1', '/b', '', 'v1', started_at=1.0)
    with pytest.raises(ValueError, match='must not be empty'):
        index.create('', '/b', '', 'v1', started_at=1.0)
    with pytest.raises(ValueError, match='cannot be finished twice'):
        index.finish('ep-1', 1, 0, ended_at=2.0)
    index.create('ep-2', '/b', '', 'v1', started_at=2.0)
    with pytest.raises(ValueError, match='must not be negative'):
        index.finish('ep-2', -1, 0, ended_at=3.0)
    with pytest.raises(ValueError, match='invalid status'):
        index.list(status='done')
    with pytest.raises(ValueError, match='invalid outcome'):
        index.list(outcome='good')


def test_list_filters_and_orders_newest_first(index):
    _recorded(index, 'a', 1.0, labelled='success')
    _recorded(index, 'b', 2.0, labelled='failure')
    _recorded(index, 'c', 3.0, labelled='success')
    index.create('d', '/b', '', 'v1', started_at=4.0)
    assert [r.episode_id for r in index.list()] == ['d', 'c', 'b', 'a']
    assert [r.episode_id for r in index.list(limit=2)] == ['d', 'c']
    assert [r.episode_id for r in index.list(outcome='success')] == ['c', 'a']
    assert [r.episode_id for r in index.list(status='recording')] == ['d']
    assert [r.episode_id for r in index.list(status='complete', outcome='unlabelled')] == []


def test_schema_version_and_wal(tmp_path):
    path = tmp_path / 'episodes.sqlite'
    with EpisodeIndex(path) as index:
        assert index.journal_mode == 'wal'
        _recorded(index, 'a', 1.0, labelled='success')
    with sqlite3.connect(path) as db:
        assert db.execute('PRAGMA user_version').fetchone()[0] == SCHEMA_VERSION
        assert db.execute('PRAGMA journal_mode').fetchone()[0] == 'wal'
    with EpisodeIndex(path) as reopened:  # reopening keeps the data and the counter
        assert reopened.get('a').outcome == 'success'
        assert reopened.label('a', 'failure', now=2.0).label_seq == 2

    newer = tmp_path / 'newer.sqlite'
    with sqlite3.connect(newer) as db:
        db.execute(f'PRAGMA user_version = {SCHEMA_VERSION + 1}')
    with pytest.raises(RuntimeError, match='newer than this code'):
        EpisodeIndex(newer)
    foreign = tmp_path / 'foreign.sqlite'
    with sqlite3.connect(foreign) as db:
        db.execute('CREATE TABLE episodes (x INTEGER)')
    with pytest.raises(ValueError, match='not an episode index'):
        EpisodeIndex(foreign)
    with pytest.raises(ValueError, match='not an episode index'):
        EpisodeIndex(foreign, read_only=True)
    # A file the recorder has created but not yet given its tables: to a reader (the learner,
    # the dashboard) the index does not exist yet, and it tries again.
    starting = tmp_path / 'starting.sqlite'
    sqlite3.connect(starting).close()
    with pytest.raises(FileNotFoundError, match='being created'):
        EpisodeIndex(starting, read_only=True)


def test_two_processes_label_concurrently_without_sequence_clashes(tmp_path):
    """Writers in different processes (recorder, dashboard) share one index file."""
    path = tmp_path / 'episodes.sqlite'
    with EpisodeIndex(path) as index:
        for name in ('a', 'b'):
            _recorded(index, name, 1.0)
    script = ('import sys\n'
              'from habc_episodes.index import EpisodeIndex\n'
              'index = EpisodeIndex(sys.argv[1])\n'
              'for k in range(40):\n'
              '    index.label(sys.argv[2], "success" if k % 2 else "failure", "p", now=k)\n')
    children = [subprocess.Popen([sys.executable, '-c', script, str(path), name])
                for name in ('a', 'b')]
    with EpisodeIndex(path) as reader:
        seen = [reader.last_label_seq() for _ in range(20)]  # reads while they write
        for child in children:
            assert child.wait(timeout=60) == 0
        assert seen == sorted(seen)
        assert reader.last_label_seq() == 80
        # Each label took its own sequence (label_seq is UNIQUE: a clash would have failed a
        # child), and each episode kept its latest one.
        records = reader.labelled_since(0)
        seqs = sorted(r.label_seq for r in records)
        assert len(seqs) == 2 and seqs[1] == 80 and 40 <= seqs[0] < 80
        assert {r.outcome for r in records} == {'success'}


def test_read_only_mode_reads_but_never_creates_or_writes(tmp_path):
    path = tmp_path / 'episodes.sqlite'
    with pytest.raises(FileNotFoundError, match='recorder creates it'):
        EpisodeIndex(path, read_only=True)
    assert not path.exists()  # a mistyped path creates nothing
    with EpisodeIndex(path) as writer:
        _recorded(writer, 'a', 1.0, labelled='success')
        with EpisodeIndex(path, read_only=True) as reader:
            assert reader.get('a').outcome == 'success'
            assert [r.episode_id for r in reader.labelled_since(0)] == ['a']
            with pytest.raises(PermissionError, match='read-only'):
                reader.label('a', 'failure', now=2.0)
            with pytest.raises(PermissionError, match='read-only'):
                reader.create('b', tmp_path / 'b', '', '1', started_at=3.0)
            writer.label('a', 'failure', now=4.0)  # a reader sees the writer's changes
            assert reader.get('a').outcome == 'failure'
    assert EpisodeIndex(path, read_only=True).last_label_seq() == 2


def _version_1_index(path):
    """Write an index as schema version 1 wrote it (outcome 'unknown' for no label)."""
    with sqlite3.connect(path) as db:
        db.executescript("""
            CREATE TABLE episodes (
                episode_id TEXT PRIMARY KEY NOT NULL CHECK (episode_id != ''),
                bag_path TEXT NOT NULL, robot TEXT NOT NULL DEFAULT '',
                instruction TEXT NOT NULL DEFAULT '',
                outcome TEXT NOT NULL DEFAULT 'unknown'
                    CHECK (outcome IN ('unknown', 'success', 'failure', 'discarded')),
                labeler TEXT NOT NULL DEFAULT '', note TEXT NOT NULL DEFAULT '',
                num_steps INTEGER NOT NULL DEFAULT 0,
                num_interventions INTEGER NOT NULL DEFAULT 0,
                policy_version TEXT NOT NULL DEFAULT '',
                status TEXT NOT NULL DEFAULT 'recording'
                    CHECK (status IN ('recording', 'complete', 'incomplete')),
                started_at REAL NOT NULL, ended_at REAL, labelled_at REAL,
                label_seq INTEGER UNIQUE);
            CREATE INDEX episodes_by_start ON episodes (started_at);
            CREATE TABLE counters (name TEXT PRIMARY KEY NOT NULL, value INTEGER NOT NULL);
            INSERT INTO counters (name, value) VALUES ('label_seq', 1);
            INSERT INTO episodes (episode_id, bag_path, started_at) VALUES ('old', 'b1', 1.0);
            INSERT INTO episodes (episode_id, bag_path, outcome, status, started_at, ended_at,
                                  label_seq)
                VALUES ('done', 'b2', 'success', 'complete', 2.0, 3.0, 1);
            PRAGMA user_version = 1;
        """)


def test_a_version_1_index_is_upgraded_by_a_writer_and_refused_by_a_reader(tmp_path):
    path = tmp_path / 'episodes.sqlite'
    _version_1_index(path)
    with pytest.raises(RuntimeError, match='older episode index schema version 1'):
        EpisodeIndex(path, read_only=True)
    with EpisodeIndex(path) as index:
        assert index.get('old').outcome == 'unlabelled'
        assert index.get('done').outcome == 'success'
        assert [r.episode_id for r in index.list(outcome='unlabelled')] == ['old']
        assert index.last_label_seq() == 1
        assert index.label('old', 'failure', now=5.0).label_seq == 2
    with sqlite3.connect(path) as db:
        assert db.execute('PRAGMA user_version').fetchone()[0] == SCHEMA_VERSION
    with EpisodeIndex(path, read_only=True) as reader:
        assert [r.episode_id for r in reader.labelled_since(0, trainable_only=False)] == [
            'done', 'old']


# Schema version 3: help requests -------------------------------------------------------------

def _version_2_index(path):
    """Write an index as schema version 2 wrote it (no help request columns)."""
    with sqlite3.connect(path) as db:
        db.executescript("""
            CREATE TABLE episodes (
                episode_id TEXT PRIMARY KEY NOT NULL CHECK (episode_id != ''),
                bag_path TEXT NOT NULL, robot TEXT NOT NULL DEFAULT '',
                instruction TEXT NOT NULL DEFAULT '',
                outcome TEXT NOT NULL DEFAULT 'unlabelled'
                    CHECK (outcome IN ('unlabelled', 'success', 'failure', 'discarded')),
                labeler TEXT NOT NULL DEFAULT '', note TEXT NOT NULL DEFAULT '',
                num_steps INTEGER NOT NULL DEFAULT 0,
                num_interventions INTEGER NOT NULL DEFAULT 0,
                policy_version TEXT NOT NULL DEFAULT '',
                status TEXT NOT NULL DEFAULT 'recording'
                    CHECK (status IN ('recording', 'complete', 'incomplete')),
                started_at REAL NOT NULL, ended_at REAL, labelled_at REAL,
                label_seq INTEGER UNIQUE);
            CREATE INDEX episodes_by_start ON episodes (started_at);
            CREATE TABLE counters (name TEXT PRIMARY KEY NOT NULL, value INTEGER NOT NULL);
            INSERT INTO counters (name, value) VALUES ('label_seq', 1);
            INSERT INTO episodes (episode_id, bag_path, outcome, labeler, note, num_steps,
                                  num_interventions, policy_version, status, started_at,
                                  ended_at, labelled_at, label_seq)
                VALUES ('done', 'b1', 'success', 'alice', 'clean', 300, 2, '3', 'complete',
                        1.0, 7.0, 8.0, 1);
            INSERT INTO episodes (episode_id, bag_path, started_at) VALUES ('live', 'b2', 9.0);
            PRAGMA user_version = 2;
        """)


def test_a_version_2_index_keeps_its_rows_and_gains_help_columns(tmp_path):
    from habc_episodes.dataset import read_index
    from habc_episodes.help_requests import HelpRequestRecord, HelpSummary, Takeover

    path = tmp_path / 'episodes.sqlite'
    _version_2_index(path)
    # A reader that opens the file directly (habc train's labeller) reads it as it is.
    old = {r.episode_id: r for r in read_index(path)}
    assert (old['done'].num_interventions, old['done'].num_help_requests) == (2, None)
    with pytest.raises(RuntimeError, match='older episode index schema version 2'):
        EpisodeIndex(path, read_only=True)

    with EpisodeIndex(path) as index:
        done = index.get('done')
        # Everything recorded stays; whether the robot asked for help is not known.
        assert (done.outcome, done.labeler, done.note, done.num_steps, done.num_interventions,
                done.policy_version, done.status, done.started_at, done.ended_at,
                done.labelled_at, done.label_seq) == (
            'success', 'alice', 'clean', 300, 2, '3', 'complete', 1.0, 7.0, 8.0, 1)
        assert (done.num_help_requests, done.num_requested_takeovers,
                done.num_spontaneous_takeovers, done.help_requests) == (None, None, None, ())
        assert not done.help_known
        assert index.last_label_seq() == 1

        # The recording episode finishes under the new schema with its help requests.
        asked = HelpRequestRecord(1.5, 'low', 0.2, 2.0, 'answered', 'engage', '3')
        recovered = HelpRequestRecord(6.0, 'stalled', 0.4, 7.5, 'recovered', '', '3')
        finished = index.finish('live', 400, 2, ended_at=20.0, help_summary=HelpSummary(
            (asked, recovered), (Takeover(2.0, 'engage', True), Takeover(9.0, 'deviation',
                                                                         False))))
        assert (finished.num_help_requests, finished.num_requested_takeovers,
                finished.num_spontaneous_takeovers) == (2, 1, 1)
        assert finished.help_requests == (asked, recovered) and finished.help_known
        assert [finished.help_count(o) for o in ('answered', 'recovered', 'unanswered')] == [
            1, 1, 0]
    with sqlite3.connect(path) as db:
        assert db.execute('PRAGMA user_version').fetchone()[0] == SCHEMA_VERSION == 3
    with EpisodeIndex(path, read_only=True) as reader:
        assert [r.episode_id for r in reader.list()] == ['live', 'done']
        assert reader.get('live').help_requests == (asked, recovered)
    assert {r.episode_id: r.num_requested_takeovers for r in read_index(path)} == {
        'done': None, 'live': 1}


def test_help_counts_of_an_episode_without_requests_and_a_damaged_cell(index, tmp_path):
    from habc_episodes.help_requests import HelpSummary, Takeover

    index.create('a', '/bags/a', '', '1', started_at=1.0)
    # A robot without a critic never asks: its takeovers are all spontaneous (known: 0).
    record = index.finish('a', 100, 1, ended_at=2.0, help_summary=HelpSummary(
        (), (Takeover(0.5, 'engage', False),)))
    assert (record.num_help_requests, record.num_requested_takeovers,
            record.num_spontaneous_takeovers, record.help_requests) == (0, 0, 1, ())
    assert record.help_known
    # A cell edited by hand into something unreadable hides neither the row nor its counts.
    with sqlite3.connect(index.path) as db:
        db.execute("UPDATE episodes SET help_requests = '{not json' WHERE episode_id = 'a'")
    assert (index.get('a').help_requests, index.get('a').num_spontaneous_takeovers) == ((), 1)
