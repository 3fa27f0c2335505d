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


def run_parallel(function: Callable[[Any], dict], jobs: Iterable[Any], workers: int,
                 description: str, progress: bool = True) -> Iterator[dict]:
    """Yield function(job) for every job, computed by `workers` processes (in job order)."""
    jobs = list(jobs)
    bar = tqdm(total=len(jobs), desc=description, disable=not progress, dynamic_ncols=True)
    if workers <= 1:
        for job in jobs:
            yield function(job)
            bar.update()
    else:
        context = multiprocessing.get_context('spawn')
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            for result in pool.map(function, jobs):
                yield result
                bar.update()
    bar.close()
