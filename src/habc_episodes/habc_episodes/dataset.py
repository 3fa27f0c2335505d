"""Training data from any directory of bags, for `habc train` (no rclpy).

    find_bags()  every bag under the given paths: rosbag2 folders (metadata.yaml + MCAP or
                 sqlite3), folders holding one .mcap file and no metadata.yaml, bare
                 .mcap/.db3 files
    Labeller     the outcome of each bag, from the sources below
    load_bags()  Episodes of the labelled bags (bag_episodes.episode_from_bag), loaded by
                 worker processes (loading.load_all) and streamed in order, with a progress
                 bar; every bag that cannot be used is reported with the reason and skipped,
                 and the others are still used

Outcome labels, first source that labels a bag wins:
  1. the labels CSV of the command line (`--labels`, columns bag,outcome[,note]): the
     explicit decision of whoever runs this training, so it overrides the others;
  2. the episode index (episodes.sqlite of our recorder, found beside the bag folders, one
     level up as in `<storage_dir>/bags/<id>`, or given with `--index`): the live record that
     the dashboard relabels;
  3. a sidecar file next to the bag's data (outcome.yaml / label.json / ..., see
     SIDECAR_NAMES): a static note written together with the bag.
'unlabelled' in the index is no label (the next source may give one); 'discarded' in the
winning source skips the bag. Bags without a label are reported and skipped.

Nothing here writes into the input: bags are opened read-only by rosbags and the index with
SQLite's read-only mode.
"""

from collections import Counter
from collections.abc import Iterable, Sequence
import csv
from dataclasses import dataclass, field, fields
import json
import os
from pathlib import Path
import sqlite3
import time

from habc_episodes.episode import Episode
from habc_episodes.episode_bags import BAG_FILE_SUFFIXES, bag_files, bag_name, TopicMapping
from habc_episodes.index import EpisodeRecord
from habc_episodes.loading import BagJob, default_workers, load_all
from habc_episodes.vocabulary import EpisodeKind, LABEL_OUTCOMES, Outcome

INDEX_NAME = 'episodes.sqlite'
SIDECAR_NAMES = ('outcome.yaml', 'outcome.yml', 'outcome.json', 'outcome.txt',
                 'label.yaml', 'label.yml', 'label.json', 'label.txt')


@dataclass(frozen=True)
class Label:
    """The outcome of one bag and where it came from."""

    outcome: Outcome
    # 'labels' (the CSV), 'index', 'sidecar' or 'demonstration' (a demo without a label).
    source: str
    # The file that gave the label.
    origin: str = ''
    note: str = ''


@dataclass(frozen=True)
class SkippedBag:
    """A bag that was not used, and why."""

    path: Path
    # 'unlabelled', 'discarded', 'unreadable' (damaged files), 'unusable' (wrong topics,
    # inconsistent messages, a bad sidecar) or 'mismatch' (does not fit the policy).
    reason: str
    message: str


@dataclass
class LoadedBag:
    """One bag turned into an Episode."""

    path: Path
    episode: Episode
    label: Label
    size_bytes: int
    seconds: float
    # CPU time of the process that loaded it (a worker process, with several workers).
    cpu_seconds: float = 0.0


@dataclass
class LoadResult:
    """What load_bags() used and skipped."""

    loaded: list[LoadedBag] = field(default_factory=list)
    skipped: list[SkippedBag] = field(default_factory=list)
    # Bytes of every bag that was read (used or not), and the time it took.
    size_bytes: int = 0
    seconds: float = 0.0
    # Rows of the labels CSV that named no bag that was found (typos, missing bags).
    unmatched_labels: list[str] = field(default_factory=list)
    # Processes that loaded the bags (1: this one).
    workers: int = 1

    @property
    def episodes(self) -> list[Episode]:
        return [item.episode for item in self.loaded]

    def skip(self, item: LoadedBag, reason: str, message: str) -> None:
        """Move a loaded bag to the skipped ones (e.g. it does not fit the policy)."""
        self.loaded.remove(item)
        self.skipped.append(SkippedBag(item.path, reason, message))


# Finding bags --------------------------------------------------------------------------------

def find_bags(paths: Iterable[str | Path]) -> list[Path]:
    """Return every bag under `paths` (each a bag, or a directory searched recursively).

    A directory is a bag if it has metadata.yaml, or if it holds exactly one .mcap file and no
    subdirectories (a rosbag2 folder without its metadata); otherwise each .mcap/.db3 file in
    it is a bag of its own. Hidden entries (recover_bag's scratch folder) are ignored.

    Raises:
        FileNotFoundError: a path does not exist.
    """
    found: dict[Path, None] = {}
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise FileNotFoundError(f'{path} does not exist')
        if path.is_file() or _is_bag_dir(path):
            found.setdefault(path.resolve())
            continue
        for root, dirs, files in os.walk(path):
            root_path = Path(root)
            dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
            if root_path != path and _is_bag_dir(root_path):
                found.setdefault(root_path.resolve())
                dirs[:] = []
                continue
            for name in sorted(files):
                if not name.startswith('.') and Path(name).suffix in BAG_FILE_SUFFIXES:
                    found.setdefault((root_path / name).resolve())
    return list(found)


def _is_bag_dir(path: Path) -> bool:
    if not path.is_dir():
        return False
    if (path / 'metadata.yaml').is_file():
        return True
    entries = [p for p in path.iterdir() if not p.name.startswith('.')]
    return (not any(p.is_dir() for p in entries)
            and sum(p.suffix == '.mcap' for p in entries) == 1)


def bag_size(path: Path) -> int:
    """Return the bytes of a bag's files."""
    return sum(p.stat().st_size for p in bag_files(path))


# Labels --------------------------------------------------------------------------------------

def parse_outcome(value: object, where: str) -> Outcome | None:
    """Return the label's Outcome (None for no label); ValueError names `where`."""
    try:
        outcome = Outcome.parse(value if isinstance(value, (bool, type(None))) else str(value))
    except ValueError:
        raise ValueError(f'{where}: unknown outcome {value!r}; use '
                         f'{", ".join(o.label for o in LABEL_OUTCOMES)}') from None
    return None if outcome is Outcome.UNLABELLED else outcome


@dataclass(frozen=True)
class CsvLabel:
    bag: str
    outcome: Outcome | None
    note: str
    line: int


def read_labels_csv(path: str | Path) -> list[CsvLabel]:
    """Read a labels CSV: columns bag,outcome[,note], with or without a header row.

    `bag` is a bag path (absolute, or relative to the CSV's folder) or a bag's name (its
    folder name, or its file name with or without suffix).

    Raises:
        ValueError: the file cannot be read, or a row is malformed (line number given): a
            typo in a labels file must not silently drop or mislabel data.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding='utf-8-sig')
    except OSError as exc:
        raise ValueError(f'labels file {path}: {exc}') from None
    rows = list(csv.reader(text.splitlines()))
    labels = []
    for line, row in enumerate(rows, 1):
        cells = [cell.strip() for cell in row]
        if not any(cells) or cells[0].startswith('#'):
            continue
        if line == 1 and cells[0].lower() == 'bag':
            if len(cells) < 2 or cells[1].lower() != 'outcome':
                raise ValueError(f'{path}:1: the header must be bag,outcome[,note], got '
                                 f'{",".join(row)}')
            continue
        if len(cells) < 2 or not cells[0]:
            raise ValueError(f'{path}:{line}: expected bag,outcome[,note], got {",".join(row)}')
        outcome = parse_outcome(cells[1], f'{path}:{line}')
        labels.append(CsvLabel(cells[0], outcome, ','.join(cells[2:]), line))
    return labels


def read_index(path: str | Path) -> list[EpisodeRecord]:
    """Read every row of an episode index without writing to it (SQLite read-only mode).

    Raises:
        ValueError: not an episode index, or it cannot be read.
    """
    path = Path(path).resolve()
    rows = names = None
    # With a live writer (a -wal file beside it) mode=ro is needed to see its newest commits.
    # Without one, immutable=1 reads the file alone: mode=ro would leave empty -wal and -shm
    # files next to an index that nobody is writing.
    live = path.with_name(path.name + '-wal').exists()
    for options in (('mode=ro', 'immutable=1') if live else ('immutable=1', 'mode=ro')):
        try:
            db = sqlite3.connect(f'{path.as_uri()}?{options}', uri=True)
            try:
                # The columns this file has: an index of an older schema (its recorder not
                # restarted since an upgrade of habc) lacks the newest, which then default.
                present = {row[1] for row in db.execute('PRAGMA table_info(episodes)')}
                names = [f.name for f in fields(EpisodeRecord) if f.name in present]
                rows = db.execute(f'SELECT {", ".join(names) or "*"} FROM episodes').fetchall()
            finally:
                db.close()
            break
        except (sqlite3.Error, UnicodeDecodeError) as exc:
            # A damaged schema page can hold bytes that are not UTF-8 (found by fuzzing:
            # tests/test_fuzz_inputs.py), which sqlite3 raises as UnicodeDecodeError.
            error = exc
    if rows is None:
        raise ValueError(f'episode index {path} cannot be read: {error}')
    try:
        return [EpisodeRecord.from_row(dict(zip(names, row, strict=True))) for row in rows]
    except (TypeError, ValueError) as exc:
        raise ValueError(f'episode index {path}: a row cannot be read ({exc})') from None


class Labeller:
    """The outcome of each bag, from a labels CSV, episode indices and sidecar files."""

    def __init__(self, labels_csv: str | Path | None = None,
                 index_paths: Sequence[str | Path] = ()) -> None:
        """Read the labels CSV now (errors raise ValueError); indices are read on first use.

        Args:
            labels_csv: CSV of bag,outcome[,note] rows (highest precedence).
            index_paths: episode indices to look bags up in before the ones found beside
                the bags.
        """
        self.csv_path = Path(labels_csv).resolve() if labels_csv else None
        self.csv = read_labels_csv(self.csv_path) if self.csv_path else []
        self._used_rows: set[int] = set()
        self.index_paths = [Path(p).expanduser().resolve() for p in index_paths]
        for index in self.index_paths:
            if not index.is_file():
                raise ValueError(f'episode index {index} does not exist')
        self._indices: dict[Path, tuple[dict[Path, EpisodeRecord], dict[str, EpisodeRecord]]] = {}
        # Problems of indices found beside the bags: reported, not fatal.
        self.index_problems: dict[Path, str] = {}

    def label(self, bag: Path) -> Label | None:
        """Return the bag's label by precedence (module docstring), or None.

        Raises:
            ValueError: a sidecar file that cannot be parsed (the bag should be skipped).
        """
        bag = Path(bag).resolve()
        return self._from_csv(bag) or self._from_index(bag) or self._from_sidecar(bag)

    def unmatched(self) -> list[str]:
        """Return the CSV rows no labelled bag matched so far, as 'file:line: bag'."""
        return [f'{self.csv_path}:{row.line}: {row.bag}' for i, row in enumerate(self.csv)
                if i not in self._used_rows]

    def _from_csv(self, bag: Path) -> Label | None:
        names = {bag.name, bag_name(bag)}
        for i, row in enumerate(self.csv):
            candidate = Path(row.bag).expanduser()
            if not candidate.is_absolute():
                candidate = self.csv_path.parent / candidate
            if candidate.resolve() == bag or row.bag in names:
                self._used_rows.add(i)
                if row.outcome is None:
                    return None
                return Label(row.outcome, 'labels', f'{self.csv_path}:{row.line}', row.note)
        return None

    def _from_index(self, bag: Path) -> Label | None:
        beside = [bag.parent / INDEX_NAME, bag.parent.parent / INDEX_NAME]
        for index in [*self.index_paths, *(p for p in beside if p.is_file())]:
            by_path, by_id = self._index(index)
            record = by_path.get(bag) or by_id.get(bag_name(bag))
            if record is None:
                continue
            outcome = parse_outcome(record.outcome, f'{index}: episode {record.episode_id}')
            if outcome is None:
                return None  # in the index but not labelled yet: a sidecar may say more
            return Label(outcome, 'index', str(index), record.note)
        return None

    def _index(self, path: Path) -> tuple[dict[Path, EpisodeRecord], dict[str, EpisodeRecord]]:
        path = path.resolve()
        if path not in self._indices:
            try:
                records = read_index(path)
            except ValueError as exc:
                if path in self.index_paths:
                    raise
                self.index_problems[path] = str(exc)
                records = []
            by_path, by_id = {}, {}
            for record in records:
                # Relative bag paths are relative to the index (as the learner reads them).
                bag = Path(record.bag_path).expanduser()
                bag = bag if bag.is_absolute() else path.parent / bag
                by_path[bag.resolve()] = record
                by_id[record.episode_id] = record
            self._indices[path] = (by_path, by_id)
        return self._indices[path]

    @staticmethod
    def sidecars(bag: Path) -> list[Path]:
        """Return the sidecar files that could label `bag`, in the order they are tried."""
        if bag.is_dir():
            candidates = [bag / name for name in SIDECAR_NAMES]
            candidates += [p.parent / f'{p.stem}.{name}' for p in sorted(bag.glob('*.mcap'))
                           for name in SIDECAR_NAMES]
        else:
            candidates = [bag.parent / f'{bag.stem}.{name}' for name in SIDECAR_NAMES]
        return [p for p in candidates if p.is_file()]

    def _from_sidecar(self, bag: Path) -> Label | None:
        for path in self.sidecars(bag):
            value, note = _read_sidecar(path)
            outcome = parse_outcome(value, f'sidecar {path}')
            if outcome is not None:
                return Label(outcome, 'sidecar', str(path), note)
        return None


def _read_sidecar(path: Path) -> tuple[object, str]:
    """Return (outcome value, note) of a sidecar: a bare word, or a mapping with 'outcome'."""
    import yaml

    try:
        text = path.read_text(encoding='utf-8')
        data = json.loads(text) if path.suffix == '.json' else (
            text.strip() if path.suffix == '.txt' else yaml.safe_load(text))
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ValueError(f'sidecar {path} cannot be read: {exc}') from None
    if isinstance(data, dict):
        keys = [key for key in ('outcome', 'label') if key in data]
        if not keys:
            raise ValueError(f'sidecar {path} has no "outcome" key (e.g. outcome: success)')
        return data[keys[0]], str(data.get('note', '') or '')
    if data is None or isinstance(data, str | bool):
        return data, ''
    raise ValueError(f'sidecar {path}: expected "success", "failure" or a mapping like '
                     f'{{outcome: success, note: ...}}, got {data!r}')


# Loading -------------------------------------------------------------------------------------

def load_bags(bags: Sequence[str | Path], *, demos: Sequence[str | Path] = (),
              labeller: Labeller | None = None, topics: TopicMapping | None = None,
              cameras: Sequence[int] | None = None, image_size: int | None = None,
              with_images: bool = True, progress: bool = True,
              workers: int | None = None) -> LoadResult:
    """Turn every labelled bag under `bags` (and every demonstration under `demos`) into Episodes.

    Demonstration bags need no label (one labelled failure or discarded is skipped). Bags
    are labelled before they are read, so an unlabelled bag costs no reading. A bag found
    under several paths is used once. `workers` processes load the bags (None: one per
    core and per 128 MiB of bags, see loading.default_workers(); 1: this process); the
    result is the same, in the same order, whatever their number.

    Raises:
        FileNotFoundError: a path does not exist (a bag that exists but cannot be read is
            reported in the result instead).
        ValueError: workers < 1.
        RuntimeError: a worker process died (out of memory?); the message names the bag.
    """
    if workers is not None and workers < 1:
        raise ValueError(f'workers must be >= 1, got {workers}')
    labeller = labeller or Labeller()
    topics = topics or TopicMapping()
    result = LoadResult()
    jobs: list[tuple[Path, Label, EpisodeKind]] = []
    seen: set[Path] = set()
    for paths, kind in ((demos, EpisodeKind.DEMO), (bags, EpisodeKind.ROLLOUT)):
        for bag in find_bags(paths):
            if bag in seen:
                continue
            seen.add(bag)
            try:
                label = labeller.label(bag)
            except ValueError as exc:
                result.skipped.append(SkippedBag(bag, 'unusable', str(exc)))
                continue
            if kind == EpisodeKind.DEMO:
                if label is not None and label.outcome != Outcome.SUCCESS:
                    result.skipped.append(SkippedBag(
                        bag, 'discarded', f'demonstration labelled {label.outcome.name.lower()} '
                        f'by {label.source} ({label.origin})'))
                    continue
                label = label or Label(Outcome.SUCCESS, 'demonstration')
            elif label is None:
                result.skipped.append(SkippedBag(
                    bag, 'unlabelled', 'no outcome label: not in the labels CSV, not labelled in '
                    'an episode index, no sidecar file (e.g. outcome.yaml with "outcome: '
                    'success"); label it to train on it'))
                continue
            elif label.outcome == Outcome.DISCARDED:
                result.skipped.append(SkippedBag(
                    bag, 'discarded', f'discarded by {label.source} ({label.origin})'))
                continue
            jobs.append((bag, label, kind))
    result.unmatched_labels = labeller.unmatched()

    sizes = [bag_size(bag) for bag, _, _ in jobs]
    result.workers = min(workers or default_workers(len(jobs), sum(sizes)),
                         max(1, len(jobs)))
    views = tuple(int(c) for c in cameras) if cameras is not None else None
    bag_jobs = [BagJob(bag, label.outcome, kind, views, image_size, topics, with_images)
                for bag, label, kind in jobs]
    from tqdm.auto import tqdm
    bar = tqdm(total=sum(sizes), unit='B', unit_scale=True, unit_divisor=1024,
               desc=f'loading {len(jobs)} bags'
                    + (f' ({result.workers} processes)' if result.workers > 1 else ''),
               disable=not progress, dynamic_ncols=True)
    started = time.perf_counter()
    with bar:
        outcomes = load_all(bag_jobs, result.workers)
        for (bag, label, _), size, outcome in zip(jobs, sizes, outcomes, strict=True):
            if outcome.episode is None:
                result.skipped.append(SkippedBag(bag, outcome.reason, outcome.message))
            else:
                result.loaded.append(LoadedBag(bag, outcome.episode, label, size,
                                               outcome.seconds, outcome.cpu_seconds))
            result.size_bytes += size
            bar.update(size)
    result.seconds = time.perf_counter() - started
    return result


def summarize_skipped(skipped: Sequence[SkippedBag]) -> dict[str, int]:
    """Return reason -> number of skipped bags."""
    return dict(Counter(item.reason for item in skipped))
