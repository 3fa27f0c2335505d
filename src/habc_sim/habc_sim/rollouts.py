"""Episodes in parallel worker processes, one simulated robot per process.

MuJoCo's GL context (and gym-aloha's original module-global object pose) make one
environment per process the safe layout; `spawn` starts clean interpreters, so no GL or
thread state crosses a fork.
"""

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
import multiprocessing
from typing import Any

from tqdm.auto import tqdm

_ENV = None
_ENV_KEY = None


def worker_env(config) -> Any:
    """Return this process's environment for `config` (created once, then reused)."""
    global _ENV, _ENV_KEY
    from habc_sim.aloha import AlohaEnv
    if _ENV is None or _ENV_KEY != config:
        if _ENV is not None:
            _ENV.close()
        _ENV, _ENV_KEY = AlohaEnv(config), config
    return _ENV


def close_worker_env() -> None:
    """Close this process's cached environment (its renderer's GL context) now.

    Left to interpreter exit, MuJoCo's EGL renderer is freed after EGL itself is gone and
    prints an ignored EGLError; an in-process pool closes it when the pool closes.
    """
    global _ENV, _ENV_KEY
    if _ENV is not None:
        _ENV.close()
    _ENV, _ENV_KEY = None, None


class WorkerPool:
    """Worker processes kept for a whole run: each keeps its simulator and loaded policy.

    Starting a spawned interpreter, importing torch and MuJoCo and building the scene costs
    seconds; a benchmark that runs hundreds of batches of episodes pays it once. Results
    come back in job order, whichever worker ran them.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool = None
        if workers > 1:
            self._pool = ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context('spawn'))

    def map(self, function: Callable[[Any], dict], jobs: Iterable[Any], description: str,
            progress: bool = True) -> Iterator[dict]:
        """Yield function(job) for every job (in job order), with a progress bar."""
        jobs = list(jobs)
        bar = tqdm(total=len(jobs), desc=description, disable=not progress,
                   dynamic_ncols=True, leave=False)
        results = (map(function, jobs) if self._pool is None
                   else self._pool.map(function, jobs))
        for result in results:
            yield result
            bar.update()
        bar.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        else:  # the jobs ran in this process, with its cached environment
            close_worker_env()

    def __enter__(self) -> 'WorkerPool':
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_parallel(function: Callable[[Any], dict], jobs: Iterable[Any], workers: int,
                 description: str, progress: bool = True) -> Iterator[dict]:
    """Yield function(job) for every job, computed by `workers` processes (in job order)."""
    with WorkerPool(workers) as pool:
        yield from pool.map(function, jobs, description, progress)
