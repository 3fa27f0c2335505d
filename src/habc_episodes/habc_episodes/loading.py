"""Bags to Episodes in worker processes, streamed in order (no rclpy).

    BagJob          one bag to load and how (label, views, image size, topics)
    load_one()      a BagJob in this process: a BagOutcome (the Episode, or why not)
    load_all()      BagOutcomes of many jobs, in the jobs' order, loaded by `workers` processes
    default_workers()  how many processes load_all() uses unless told

A worker process builds a whole episode (reading, decoding, resizing: CPU work that one
Python process does on one core), so N workers use N cores. The big part of an episode, its
images, does not travel back through the pool's pipe (pickling 16 MB of frames costs the
receiving process more CPU time than loading them did): the worker writes them into a file
in a private /dev/shm folder (tmpfs: memory, not disk) that this process maps and unlinks
at once; the Episode's array then lives in that mapping and is freed with it. Where there
is no /dev/shm, or it is full, images are pickled instead.

At most 2 x workers bags are in flight, and results are handed on in order as they come:
memory holds the episodes already handed on plus those few, never every message or every
image twice.
"""

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
import itertools
import math
import mmap
import multiprocessing
import os
from pathlib import Path
import shutil
import tempfile
import threading
import time

import numpy as np

from habc_episodes.bag_format import _shared_typestore
from habc_episodes.episode import Episode
from habc_episodes.episode_bags import (
    BagReadError,
    empty_frames,
    episode_from_bag,
    TopicMapping,
)
from habc_episodes.vocabulary import EpisodeKind, Outcome

# More processes than this rarely help: they share one disk, and each holds an episode.
MAX_DEFAULT_WORKERS = 8
# Bags smaller than this in all are loaded in this process (unless told otherwise).
WORKER_MIN_BYTES = 128 << 20
SHM_ROOT = Path('/dev/shm')


@dataclass(frozen=True)
class BagJob:
    """One bag to turn into an Episode (the arguments of episode_from_bag)."""

    path: Path
    outcome: Outcome
    kind: EpisodeKind = EpisodeKind.ROLLOUT
    cameras: tuple[int, ...] | None = None
    image_size: int | None = None
    topics: TopicMapping = TopicMapping()
    with_images: bool = True


@dataclass
class BagOutcome:
    """What became of a BagJob: an Episode, or the reason it was skipped."""

    job: BagJob
    episode: Episode | None
    # '' when loaded; else 'unreadable' (damaged files) or 'unusable' (wrong topics,
    # inconsistent messages).
    reason: str = ''
    message: str = ''
    seconds: float = 0.0
    # CPU time of the process that loaded it (a worker's, with workers).
    cpu_seconds: float = 0.0


def load_one(job: BagJob,
             allocate: Callable[[tuple[int, ...]], np.ndarray] | None = None) -> BagOutcome:
    """Load one bag in this process; errors that mean "skip this bag" become the outcome."""
    started, started_cpu = time.perf_counter(), time.process_time()
    episode, reason, message = None, '', ''
    try:
        episode = episode_from_bag(job.path, job.outcome, cameras=job.cameras,
                                   image_size=job.image_size, topics=job.topics, kind=job.kind,
                                   with_images=job.with_images, allocate=allocate)
    except BagReadError as exc:
        reason, message = 'unreadable', str(exc)
    except (ValueError, FileNotFoundError) as exc:
        reason, message = 'unusable', str(exc)
    return BagOutcome(job, episode, reason, message, time.perf_counter() - started,
                      time.process_time() - started_cpu)


def default_workers(jobs: int, size_bytes: int | None = None) -> int:
    """Return the processes load_all() uses for `jobs` bags of `size_bytes` in all.

    One per core, at most 8, and one per WORKER_MIN_BYTES of bags: a worker costs what
    loading a few MB takes when forked, and ~0.3 s of CPU time (importing numpy and rosbags,
    what loading ~100 MB takes) where it cannot be (see _pool_context()).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    by_size = jobs if size_bytes is None else size_bytes // WORKER_MIN_BYTES
    return max(1, min(jobs, cores, MAX_DEFAULT_WORKERS, by_size))


def load_all(jobs: Sequence[BagJob], workers: int | None = None) -> Iterator[BagOutcome]:
    """Yield the BagOutcome of every job, in order, loaded by `workers` processes.

    workers None takes default_workers(len(jobs)); 1 (or one job) loads in this process. The
    same bags give the same outcomes whatever the number of workers.

    Raises:
        ValueError: workers < 1.
        RuntimeError: a worker process died (killed, out of memory); the message names the
            bag it was loading.
    """
    if workers is None:
        workers = default_workers(len(jobs))
    if workers < 1:
        raise ValueError(f'workers must be >= 1, got {workers}')
    if workers == 1 or len(jobs) <= 1:
        for job in jobs:
            yield load_one(job)
        return
    yield from _load_in_workers(jobs, min(workers, len(jobs)))


def _load_in_workers(jobs: Sequence[BagJob], workers: int) -> Iterator[BagOutcome]:
    shared = _shared_folder()
    pool = ProcessPoolExecutor(workers, mp_context=_pool_context())
    pending: list[tuple[BagJob, Future]] = []
    queue = iter(jobs)
    try:
        for job in itertools.islice(queue, 2 * workers):
            pending.append((job, pool.submit(_load_in_worker, job, shared)))
        while pending:
            job, future = pending.pop(0)
            try:
                outcome = future.result()
            except BrokenProcessPool as exc:
                raise RuntimeError(
                    f'a loader process died while loading bag {job.path} or a bag beside it '
                    f'({exc}); if it ran out of memory, load with fewer workers '
                    '(habc train --load-workers 1)') from exc
            for next_job in itertools.islice(queue, 1):
                pending.append((next_job, pool.submit(_load_in_worker, next_job, shared)))
            yield _attached(outcome, shared)
    finally:
        for _, future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        if shared is not None:
            shutil.rmtree(shared, ignore_errors=True)


def _pool_context() -> multiprocessing.context.BaseContext:
    """Return how the worker processes start.

    fork where this process runs no other Python thread: a worker starts in milliseconds
    with numpy, rosbags and the typestore already loaded (a spawned one imports them, ~0.3 s
    of CPU time each, a third of what loading 1 GB of bags takes on one core), and nothing
    that another thread could hold locked at the fork is used by the loader. Else (a ROS
    node, a trainer with threads) forkserver: one clean process that imports this module
    once and forks the workers; spawn where neither exists.
    """
    methods = multiprocessing.get_all_start_methods()
    if 'fork' in methods and threading.active_count() == 1:
        _shared_typestore()  # built once here, inherited by every worker
        return multiprocessing.get_context('fork')
    if 'forkserver' in methods:
        context = multiprocessing.get_context('forkserver')
        context.set_forkserver_preload([__name__])
        return context
    return multiprocessing.get_context('spawn')


def _shared_folder() -> Path | None:
    """Return a new private folder in /dev/shm for the workers' images, or None."""
    if not SHM_ROOT.is_dir():
        return None
    try:
        return Path(tempfile.mkdtemp(prefix='habc-load-', dir=SHM_ROOT))
    except OSError:
        return None


@dataclass(frozen=True)
class _SharedImages:
    """Where a worker left an episode's images: a file of the shared folder."""

    name: str
    shape: tuple[int, ...]


class _SharedArrays:
    """Allocates image arrays in files of the shared folder (a worker's `allocate`)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files: list[tuple[Path, np.ndarray]] = []
        self._names = itertools.count()

    def __call__(self, shape: tuple[int, ...]) -> np.ndarray:
        size = math.prod(shape)
        path = self.folder / f'{os.getpid()}-{next(self._names)}'
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError:
            return empty_frames(shape)
        try:
            # Reserve the pages now: a full tmpfs then fails here (ENOSPC) instead of killing
            # the process with SIGBUS when a page is first written.
            os.posix_fallocate(fd, 0, max(1, size))
            mapping = mmap.mmap(fd, max(1, size))
        except OSError:
            path.unlink(missing_ok=True)
            return empty_frames(shape)
        finally:
            os.close(fd)
        array = np.frombuffer(mapping, dtype=np.uint8, count=size).reshape(shape)
        self.files.append((path, array))
        return array

    def export(self, array: np.ndarray) -> _SharedImages | None:
        """Return where `array` lies if it is one of ours; remove every other file."""
        kept = None
        for path, allocated in self.files:
            if allocated is array:
                kept = _SharedImages(path.name, array.shape)
            else:
                path.unlink(missing_ok=True)
        self.files.clear()
        return kept


def _load_in_worker(job: BagJob, shared: Path | None) -> BagOutcome:
    if shared is None:
        return load_one(job)
    arrays = _SharedArrays(shared)
    try:
        outcome = load_one(job, arrays)
        images = outcome.episode.observations.get('images') if outcome.episode else None
        where = arrays.export(images) if images is not None else None
        if where is not None:
            outcome.episode.observations['images'] = where
        return outcome
    finally:
        arrays.export(None)  # an exception: remove what was allocated


def _attached(outcome: BagOutcome, shared: Path | None) -> BagOutcome:
    """Map the images a worker left in the shared folder into this process (and unlink)."""
    episode = outcome.episode
    where = episode.observations.get('images') if episode is not None else None
    if isinstance(where, _SharedImages):
        path = shared / where.name
        size = math.prod(where.shape)
        fd = os.open(path, os.O_RDWR)
        try:
            mapping = mmap.mmap(fd, max(1, size))
        finally:
            os.close(fd)
            path.unlink()
        episode.observations['images'] = np.frombuffer(
            mapping, dtype=np.uint8, count=size).reshape(where.shape)
    return outcome
