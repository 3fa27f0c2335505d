"""Episode index (no rclpy): one SQLite row per recorded episode, shared between processes.

The episode recorder creates and finishes rows, the dashboard labels them, and the learner
asks for episodes labelled since its last look. All three may be separate processes, so the
database runs in WAL mode: readers never block the writer and vice versa. WAL needs the
processes to share one host's memory; it does not work on network file systems (NFS, SMB),
so keep the index on a local disk and share the bags, not the index file.

Since schema version 3 a row also keeps the robot's help requests (habc_episodes.help_requests):
how many, how many takeovers were requested (a request was open, or the takeover answered
it) and how many spontaneous, and each request's record (when raised, when cleared and why,
by whom answered) as JSON. Rows finished before that have NULL counts: not known.

Every write of a label takes the next value of a counter that only ever grows (`label_seq`).
A learner remembers the largest sequence it consumed and asks `labelled_since(that)`: a
relabelled episode comes back with a new, larger sequence, so it is seen again exactly once
per change and never counted twice.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
import json
from pathlib import Path
import sqlite3
import threading
from typing import Any

from habc_episodes.help_requests import HelpRequestRecord, HelpSummary
from habc_episodes.vocabulary import EpisodeStatus, LABEL_OUTCOMES, Outcome

# The index stores outcomes and statuses as their text labels (vocabulary.py).
_OUTCOME_LABELS = Outcome.labels()
_TRAINABLE_LABELS = tuple(o.label for o in Outcome if o.trainable)
_LABEL_LABELS = tuple(o.label for o in LABEL_OUTCOMES)
_STATUS_LABELS = EpisodeStatus.labels()
_FINISHED_LABELS = tuple(s.label for s in EpisodeStatus if s.finished)


def _sql_list(labels: tuple[str, ...]) -> str:
    return ', '.join(f"'{label}'" for label in labels)


# Bump when the table layout changes and add a step to _MIGRATIONS (from version N to N+1).
SCHEMA_VERSION = 3

_EPISODES_TABLE = f"""
CREATE TABLE {{name}} (
    episode_id TEXT PRIMARY KEY NOT NULL CHECK (episode_id != ''),
    bag_path TEXT NOT NULL,
    robot TEXT NOT NULL DEFAULT '',
    instruction TEXT NOT NULL DEFAULT '',
    outcome TEXT NOT NULL DEFAULT '{Outcome.UNLABELLED.label}'
        CHECK (outcome IN ({_sql_list(_OUTCOME_LABELS)})),
    labeler TEXT NOT NULL DEFAULT '',
    note TEXT NOT NULL DEFAULT '',
    num_steps INTEGER NOT NULL DEFAULT 0,
    num_interventions INTEGER NOT NULL DEFAULT 0,
    policy_version TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL DEFAULT '{EpisodeStatus.RECORDING.label}'
        CHECK (status IN ({_sql_list(_STATUS_LABELS)})),
    started_at REAL NOT NULL,
    ended_at REAL,
    labelled_at REAL,
    label_seq INTEGER UNIQUE
)"""
# A new file gets the version 2 layout and then every later step, as an old file does: each
# column is defined once, in the step that added it.
_SCHEMA_V2 = _EPISODES_TABLE.format(name='episodes') + """;
CREATE INDEX episodes_by_start ON episodes (started_at);
CREATE TABLE counters (name TEXT PRIMARY KEY NOT NULL, value INTEGER NOT NULL);
INSERT INTO counters (name, value) VALUES ('label_seq', 0);
"""

_V2_COLUMNS = ('episode_id', 'bag_path', 'robot', 'instruction', 'outcome', 'labeler', 'note',
               'num_steps', 'num_interventions', 'policy_version', 'status', 'started_at',
               'ended_at', 'labelled_at', 'label_seq')
_HELP_COLUMNS = ('num_help_requests', 'num_requested_takeovers', 'num_spontaneous_takeovers',
                 'help_requests')
_COLUMNS = _V2_COLUMNS + _HELP_COLUMNS
_MIGRATIONS: dict[int, str] = {
    # Version 1 spelled "no label yet" 'unknown'; the vocabulary's one spelling is
    # 'unlabelled'. SQLite cannot change a CHECK constraint in place: rebuild the table.
    1: _EPISODES_TABLE.format(name='episodes_v2') + f""";
INSERT INTO episodes_v2 ({', '.join(_V2_COLUMNS)})
    SELECT {', '.join(_V2_COLUMNS).replace(
        'outcome,', "CASE outcome WHEN 'unknown' THEN 'unlabelled' ELSE outcome END,", 1)}
    FROM episodes;
DROP TABLE episodes;
ALTER TABLE episodes_v2 RENAME TO episodes;
CREATE INDEX episodes_by_start ON episodes (started_at)""",
    # Help requests: added columns keep every row; NULL counts say "recorded before help
    # requests were kept" (not zero: nobody knows whether the robot asked).
    2: """
ALTER TABLE episodes ADD COLUMN num_help_requests INTEGER;
ALTER TABLE episodes ADD COLUMN num_requested_takeovers INTEGER;
ALTER TABLE episodes ADD COLUMN num_spontaneous_takeovers INTEGER;
ALTER TABLE episodes ADD COLUMN help_requests TEXT NOT NULL DEFAULT '[]'""",
}
_SELECT = f'SELECT {", ".join(_COLUMNS)} FROM episodes'


@dataclass(frozen=True)
class EpisodeRecord:
    """One row of the episode index; times are unix seconds.

    The help fields (schema version 3) are None and () for rows finished before help
    requests were kept; `help_requests` times count from the episode's first step.
    """

    episode_id: str
    bag_path: str
    robot: str
    instruction: str
    outcome: str
    labeler: str
    note: str
    num_steps: int
    num_interventions: int
    policy_version: str
    status: str
    started_at: float
    ended_at: float | None
    labelled_at: float | None
    label_seq: int | None
    num_help_requests: int | None = None
    num_requested_takeovers: int | None = None
    num_spontaneous_takeovers: int | None = None
    help_requests: tuple[HelpRequestRecord, ...] = ()

    @classmethod
    def from_row(cls, row: Sequence[Any] | Mapping[str, Any]) -> EpisodeRecord:
        """Build a record from a row of columns named as the fields (a mapping: by name).

        A mapping may lack the help columns (an index of an older schema); they default.
        """
        values = dict(row) if isinstance(row, Mapping) else dict(
            zip([f.name for f in fields(cls)], row, strict=True))
        values['help_requests'] = _help_records(values.get('help_requests', ()))
        return cls(**values)

    @property
    def help_known(self) -> bool:
        """True when the row says whether the robot asked for help (schema 3 and later)."""
        return self.num_help_requests is not None

    def help_count(self, outcome: str) -> int:
        """Return how many requests ended so (help_requests.HELP_OUTCOMES)."""
        return HelpSummary(self.help_requests).count(outcome)

    @property
    def trainable(self) -> bool:
        """Return True when the learner may train on this episode.

        It needs a success/failure label and a finished bag; an episode cut short (status
        'incomplete') counts only because a person labelled it after looking at it.
        """
        return self.outcome in _TRAINABLE_LABELS and self.status in _FINISHED_LABELS


def _help_records(text: Any) -> tuple[HelpRequestRecord, ...]:
    """Read the help_requests column (JSON list of records)."""
    if isinstance(text, tuple | list):
        return tuple(text)
    try:
        return tuple(HelpRequestRecord.from_dict(item) for item in json.loads(text or '[]'))
    except (TypeError, ValueError, AttributeError):
        # A cell edited by hand must not hide the row (or the whole index); its counts stay.
        return ()


class EpisodeIndex:
    """SQLite index of recorded episodes (thread-safe; several processes may open one file).

    The recorder owns the file and opens it writable (the default). Readers (the learner, the
    dashboard's history, `habc episodes list/show/export`) open it with `read_only=True`:
    they never create the file, never change the schema and cannot write a row by mistake.
    """

    def __init__(self, path: str | Path, timeout_s: float = 10.0, *,
                 read_only: bool = False) -> None:
        """Open (or, writable, create) the index at `path`.

        Args:
            path: the SQLite file (the recorder writes <storage_dir>/episodes.sqlite).
            timeout_s: how long a statement waits for another process's lock.
            read_only: open an existing index for reading only.

        Raises:
            FileNotFoundError: read-only and there is no file at `path`, or one that the
                recorder has only begun to create (no tables yet).
            RuntimeError: the file was written by a newer schema version than this code
                knows, or (read-only) by an older one that a writer must upgrade first.
            ValueError: the file is an SQLite database but not an episode index.
        """
        self.path = Path(path)
        self.read_only = read_only
        if read_only:
            if not self.path.is_file():
                raise FileNotFoundError(
                    f'no episode index at {self.path}; the episode recorder creates it at '
                    '<storage_dir>/episodes.sqlite when it starts')
            # mode=ro: SQLite refuses every write. WAL readers still need the -shm file,
            # which the recorder (the writer) keeps.
            uri = f'{self.path.resolve().as_uri()}?mode=ro'
            self._db = sqlite3.connect(uri, uri=True, timeout=timeout_s, isolation_level=None,
                                       check_same_thread=False)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Autocommit mode: transactions are opened explicitly (BEGIN IMMEDIATE for writes,
            # so two writers serialise on the lock instead of failing on upgrade from read to
            # write).
            self._db = sqlite3.connect(str(self.path), timeout=timeout_s, isolation_level=None,
                                       check_same_thread=False)
        self._lock = threading.RLock()
        try:
            self._db.execute(f'PRAGMA busy_timeout = {int(timeout_s * 1000)}')
            if read_only:
                self.journal_mode = str(self._db.execute('PRAGMA journal_mode').fetchone()[0])
                self._check_schema()
            else:
                self.journal_mode = str(
                    self._db.execute('PRAGMA journal_mode=WAL').fetchone()[0])
                self._upgrade_schema()
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> EpisodeIndex:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # Writers -------------------------------------------------------------------------------

    def create(self, episode_id: str, bag_path: str | Path, instruction: str,
               policy_version: str, *, started_at: float, robot: str = '') -> EpisodeRecord:
        """Add an episode that starts recording now (status 'recording', outcome 'unlabelled').

        Raises:
            ValueError: `episode_id` is empty or already in the index.
        """
        if not episode_id:
            raise ValueError('episode_id must not be empty')
        with self._write() as db:
            try:
                db.execute('INSERT INTO episodes (episode_id, bag_path, robot, instruction, '
                           'policy_version, started_at) VALUES (?, ?, ?, ?, ?, ?)',
                           (episode_id, str(bag_path), robot, instruction, policy_version,
                            float(started_at)))
            except sqlite3.IntegrityError:
                raise ValueError(f'episode {episode_id!r} already exists in {self.path}; '
                                 'episode ids must be unique (include a timestamp or a '
                                 'counter)') from None
        return self.get(episode_id)

    def finish(self, episode_id: str, num_steps: int, num_interventions: int, *,
               ended_at: float, complete: bool = True,
               policy_version: str | None = None,
               help_summary: HelpSummary | None = None) -> EpisodeRecord:
        """Record the end of an episode and its counts.

        `complete=False` marks a recording that ended abnormally (an error, or a bag rescued
        after a crash) as 'incomplete'; an incomplete row may be finished again to fill in the
        counts once the bag has been recovered. `policy_version`, when given, replaces the
        stored one (the recorder fills it in when no version was known at the start).
        `help_summary`, when given, stores the help requests and the requested and spontaneous
        takeovers; without it they stay unknown (NULL).

        Raises:
            KeyError: no such episode.
            ValueError: negative counts, or the episode was already finished as complete.
        """
        if num_steps < 0 or num_interventions < 0:
            raise ValueError(f'episode {episode_id!r}: counts must not be negative (got '
                             f'num_steps={num_steps}, num_interventions={num_interventions})')
        status = (EpisodeStatus.COMPLETE if complete else EpisodeStatus.INCOMPLETE).label
        with self._write() as db:
            current = self._get(db, episode_id)
            if current.status == EpisodeStatus.COMPLETE.label:
                raise ValueError(f'episode {episode_id!r} was already finished at '
                                 f'{current.ended_at}; it cannot be finished twice')
            if current.status == EpisodeStatus.INCOMPLETE.label and complete:
                raise ValueError(f'episode {episode_id!r} is incomplete (its recording was cut '
                                 'short); finish it with complete=False')
            # A labelled episode may become trainable here: give it a new sequence so that a
            # learner whose cursor already passed its old sequence still picks it up.
            seq = self._next_seq(db) if current.label_seq is not None else None
            db.execute('UPDATE episodes SET num_steps = ?, num_interventions = ?, '
                       'ended_at = ?, status = ?, label_seq = COALESCE(?, label_seq), '
                       'policy_version = COALESCE(?, policy_version) WHERE episode_id = ?',
                       (int(num_steps), int(num_interventions), float(ended_at), status, seq,
                        policy_version, episode_id))
            if help_summary is not None:
                help = help_summary
                db.execute('UPDATE episodes SET num_help_requests = ?, '
                           'num_requested_takeovers = ?, num_spontaneous_takeovers = ?, '
                           'help_requests = ? WHERE episode_id = ?',
                           (len(help.requests), help.requested_takeovers,
                            help.spontaneous_takeovers,
                            json.dumps([r.to_dict() for r in help.requests]), episode_id))
        return self.get(episode_id)

    def label(self, episode_id: str, outcome: str | Outcome, labeler: str = '',
              note: str = '', *, now: float) -> EpisodeRecord:
        """Set or change the outcome label; every call takes a new, larger `label_seq`.

        `outcome` is one of LABEL_OUTCOMES, as the enum or its label ('success', ...).

        Raises:
            KeyError: no such episode.
            ValueError: `outcome` is not one of LABEL_OUTCOMES.
        """
        text = outcome.label if isinstance(outcome, Outcome) else outcome
        if text not in _LABEL_LABELS:
            raise ValueError(f'invalid outcome {outcome!r} for episode {episode_id!r}; '
                             f'choose one of {list(_LABEL_LABELS)}')
        outcome = text
        with self._write() as db:
            self._get(db, episode_id)
            db.execute('UPDATE episodes SET outcome = ?, labeler = ?, note = ?, labelled_at = ?, '
                       'label_seq = ? WHERE episode_id = ?',
                       (outcome, labeler, note, float(now), self._next_seq(db), episode_id))
        return self.get(episode_id)

    def mark_incomplete_recordings(self, robot: str | None = None) -> list[str]:
        """Mark every row still 'recording' as 'incomplete' and return their ids.

        Call it when a recorder starts: a row left 'recording' belongs to a recorder that
        died mid-episode. With several robots writing one index, pass the recorder's own
        `robot` so that another robot's live recording is left alone.
        """
        with self._write() as db:
            query, args = 'SELECT episode_id, label_seq FROM episodes WHERE status = ?', \
                [EpisodeStatus.RECORDING.label]
            if robot is not None:
                query += ' AND robot = ?'
                args.append(robot)
            rows = db.execute(query + ' ORDER BY started_at, episode_id', args).fetchall()
            for episode_id, label_seq in rows:
                # Same reason as in finish(): a labelled row becomes trainable now.
                seq = self._next_seq(db) if label_seq is not None else None
                db.execute('UPDATE episodes SET status = ?, '
                           'label_seq = COALESCE(?, label_seq) WHERE episode_id = ?',
                           (EpisodeStatus.INCOMPLETE.label, seq, episode_id))
        return [row[0] for row in rows]

    # Readers -------------------------------------------------------------------------------

    def get(self, episode_id: str) -> EpisodeRecord:
        """Return the episode's record.

        Raises:
            KeyError: no such episode.
        """
        with self._lock:
            return self._get(self._db, episode_id)

    def labelled_since(self, seq: int, *, trainable_only: bool = True) -> list[EpisodeRecord]:
        """Return episodes whose label changed after sequence `seq`, by ascending label_seq.

        With `trainable_only` (the default) only episodes the learner may train on come back.
        A learner that keeps per-episode state should pass False so that it also sees an
        episode relabelled from success/failure to 'discarded' and can drop it.
        """
        query = _SELECT + ' WHERE label_seq > ?'
        if trainable_only:
            query += (f' AND outcome IN ({_sql_list(_TRAINABLE_LABELS)}) '
                      f'AND status IN ({_sql_list(_FINISHED_LABELS)})')
        with self._lock:
            rows = self._db.execute(query + ' ORDER BY label_seq', (int(seq),)).fetchall()
        return [EpisodeRecord.from_row(row) for row in rows]

    def last_label_seq(self) -> int:
        """Return the largest label sequence handed out so far (0 before the first label)."""
        with self._lock:
            return int(self._db.execute(
                "SELECT value FROM counters WHERE name = 'label_seq'").fetchone()[0])

    def list(self, limit: int | None = None, status: str | None = None,
             outcome: str | None = None) -> list[EpisodeRecord]:
        """Return episodes, newest first, optionally filtered by status and outcome.

        Raises:
            ValueError: unknown status or outcome, or a negative limit.
        """
        query, args = _SELECT, []
        clauses = []
        if status is not None:
            if status not in _STATUS_LABELS:
                raise ValueError(f'invalid status {status!r}; choose one of '
                                 f'{list(_STATUS_LABELS)}')
            clauses.append('status = ?')
            args.append(status)
        if outcome is not None:
            if outcome not in _OUTCOME_LABELS:
                raise ValueError(f'invalid outcome {outcome!r}; choose one of '
                                 f'{list(_OUTCOME_LABELS)}')
            clauses.append('outcome = ?')
            args.append(outcome)
        if clauses:
            query += ' WHERE ' + ' AND '.join(clauses)
        query += ' ORDER BY started_at DESC, episode_id DESC'
        if limit is not None:
            if limit < 0:
                raise ValueError(f'limit must not be negative (got {limit})')
            query += ' LIMIT ?'
            args.append(int(limit))
        with self._lock:
            rows = self._db.execute(query, args).fetchall()
        return [EpisodeRecord.from_row(row) for row in rows]

    # Internals -----------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """Run the block in one IMMEDIATE transaction (commit on success, else roll back)."""
        if self.read_only:
            raise PermissionError(f'the episode index {self.path} was opened read-only; only '
                                  'the episode recorder (or `habc episodes label`) writes it')
        with self._lock:
            self._db.execute('BEGIN IMMEDIATE')
            try:
                yield self._db
            except BaseException:
                self._db.execute('ROLLBACK')
                raise
            self._db.execute('COMMIT')

    def _get(self, db: sqlite3.Connection, episode_id: str) -> EpisodeRecord:
        row = db.execute(_SELECT + ' WHERE episode_id = ?', (episode_id,)).fetchone()
        if row is None:
            raise KeyError(f'episode {episode_id!r} is not in the episode index {self.path}; '
                           'check the id (list() shows the recorded episodes)')
        return EpisodeRecord.from_row(row)

    @staticmethod
    def _next_seq(db: sqlite3.Connection) -> int:
        # A counter row rather than MAX(label_seq)+1: sequences are never reused, even if the
        # row holding the largest one is deleted by hand.
        db.execute("UPDATE counters SET value = value + 1 WHERE name = 'label_seq'")
        return int(db.execute("SELECT value FROM counters WHERE name = 'label_seq'")
                   .fetchone()[0])

    def _schema_version(self, db: sqlite3.Connection) -> int:
        """Return the file's schema version; RuntimeError when newer than this code."""
        version = int(db.execute('PRAGMA user_version').fetchone()[0])
        if version > SCHEMA_VERSION:
            raise RuntimeError(f'{self.path} has episode index schema version {version}, '
                               f'newer than this code ({SCHEMA_VERSION}); update habc')
        return version

    def _check_schema(self) -> None:
        version = self._schema_version(self._db)
        if version == SCHEMA_VERSION:
            return
        if version == 0:
            tables = self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            if not tables.fetchall():
                # The recorder has created the file but not yet its tables: to a reader the
                # index does not exist yet (it retries, as when there is no file).
                raise FileNotFoundError(f'the episode index at {self.path} is being created '
                                        '(the recorder is starting); try again shortly')
            raise ValueError(f'{self.path} is not an episode index (no schema version)')
        raise RuntimeError(f'{self.path} has the older episode index schema version {version}; '
                           'a writer upgrades it: start the episode recorder once, or run '
                           '`habc episodes label` on it')

    def _upgrade_schema(self) -> None:
        with self._write() as db:
            version = self._schema_version(db)
            start = version
            if version == 0:
                tables = db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                if tables.fetchall():
                    raise ValueError(f'{self.path} is an SQLite database but not an episode '
                                     'index (it has tables but no schema version)')
                # executescript() would commit the open transaction; run statement by statement.
                for statement in _SCHEMA_V2.split(';'):
                    if statement.strip():
                        db.execute(statement)
                start = 2
            for step in range(start, SCHEMA_VERSION):
                for statement in _MIGRATIONS[step].split(';'):
                    if statement.strip():
                        db.execute(statement)
            if version != SCHEMA_VERSION:
                db.execute(f'PRAGMA user_version = {SCHEMA_VERSION}')
