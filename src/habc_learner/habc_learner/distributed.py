"""Data-parallel training under torchrun: process group, ranks, global sums (no rclpy).

torchrun (`python -m torch.distributed.run`) starts K processes and tells each its place in
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. `init_from_env` joins them:
gloo on CPU, NCCL on GPUs (process r on cuda:LOCAL_RANK). The trainer then notices the
process group (`is_initialized`) and trains data-parallel: each process takes 1/K of every
minibatch, DistributedDataParallel averages the gradients, and rank 0 alone writes files.
`torchrun_command` builds the command line that starts K processes on this machine, on the
loopback interface only. docs/distributed.md says what is checked and what is not.
"""

from collections.abc import Sequence
from dataclasses import dataclass
import datetime
import os
import socket
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from habc_learner.habc import ShardSum

# What torchrun sets in every process it starts.
TORCHRUN_VARIABLES = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')
LOOPBACK = '127.0.0.1'
# How long a collective waits for the slowest process before it fails (not a timing test:
# a guard against a process that died without the others noticing).
COLLECTIVE_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands among the data-parallel ones."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: str


def launched_by_torchrun() -> bool:
    """Return True in a process that torchrun started (its variables are all set)."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def rank_from_env() -> int:
    """Return the rank torchrun gave this process (0 when not started by torchrun)."""
    return int(os.environ.get('RANK', '0'))


def init_from_env(device: str = 'cpu') -> DistributedContext:
    """Join the process group torchrun's variables describe; return this process's place.

    `device` 'cpu' uses gloo; 'cuda' (or 'cuda:N', 'auto' with a GPU) uses NCCL, and this
    process trains on cuda:LOCAL_RANK.

    Raises:
        RuntimeError: not started by torchrun (its variables are missing), or a GPU device
            requested without enough GPUs on this machine.
    """
    if not launched_by_torchrun():
        missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
        raise RuntimeError(f'not started by torchrun ({", ".join(missing)} unset): run '
                           'python -m torch.distributed.run --nproc-per-node K ...')
    rank, world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
    local_rank = int(os.environ['LOCAL_RANK'])
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device.startswith('cuda'):
        if torch.cuda.device_count() <= local_rank:
            raise RuntimeError(f'process {rank} needs cuda:{local_rank}, but this machine has '
                               f'{torch.cuda.device_count()} GPU(s): start at most that many '
                               'processes per node')
        device, backend = f'cuda:{local_rank}', 'nccl'
        torch.cuda.set_device(local_rank)
    else:
        device, backend = 'cpu', 'gloo'
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    return DistributedContext(rank, world, local_rank, backend, device)


def is_initialized() -> bool:
    """Return True when this process is one of a data-parallel group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Return this process's rank (0 outside a group)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """Return the number of data-parallel processes (1 outside a group)."""
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """Return True on the process that writes checkpoints, logs and reports (rank 0)."""
    return rank() == 0


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Return the sum of the detached `x` over all processes (`x` itself outside a group)."""
    if not is_initialized():
        return x
    total = x.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


class GlobalBatchSum(ShardSum):
    """ShardSum over the processes of the group: the HABC normalisers of the global batch."""

    def __init__(self) -> None:
        self.shards = world_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(x)


def barrier() -> None:
    """Wait until every process arrives here (nothing outside a group)."""
    if is_initialized():
        dist.barrier()


def broadcast_object(value: object, source: int = 0) -> object:
    """Return rank `source`'s `value` on every process (picklable values)."""
    if not is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=source)
    return box[0]


def mean_over_ranks(stats: dict[str, float]) -> dict[str, float]:
    """Average each metric over the processes that have it (all of them, for most).

    A loss computed as shards * (shard sum) / (global count) averages to the global
    batch's value. Metrics a shard lacks (e.g. no human window in it) average over the
    shards that have one.
    """
    if not is_initialized():
        return dict(stats)
    gathered: list[dict[str, float]] = [{} for _ in range(world_size())]
    dist.all_gather_object(gathered, stats)
    keys = sorted({key for item in gathered for key in item})
    return {key: float(np.mean([item[key] for item in gathered if key in item]))
            for key in keys}


def destroy() -> None:
    """Leave the process group (so the process exits without warnings)."""
    if is_initialized():
        dist.destroy_process_group()


class ShardedBatches:
    """Minibatches of a sample pool for this process, through torch's DistributedSampler.

    The sampler shuffles the pool with `seed` + pass number and deals out rank r's share as
    perm[r::K]; this process takes them `batch_size // K` at a time. The K shards of the
    j-th batch are then together exactly the j-th batch of a one-process run with the same
    seed (perm[jB:(j+1)B]), shard r holding its rows r, r + K, ...; no sample repeats within
    a pass. A pass ends after floor(len / B) whole global batches (so the sampler's padding
    is never used) and the next pass reshuffles (set_epoch). A pool smaller than one global
    batch is repeated within a pass until it fills one.

    Raises:
        ValueError: `batch_size` is not a multiple of the number of processes, or the pool
            is empty.
    """

    def __init__(self, pool: np.ndarray, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1) -> None:
        if batch_size % world_size:
            raise ValueError(f'the batch size {batch_size} must be a multiple of the number '
                             f'of processes {world_size}: each takes an equal share')
        if len(pool) == 0:
            raise ValueError('no samples to draw minibatches from')
        self.pool = np.asarray(pool)
        self.batch_size, self.local_batch = batch_size, batch_size // world_size
        repeats = -(-batch_size // len(self.pool))  # ceil: one pass fills a global batch
        self._items = np.tile(self.pool, repeats)
        self.batches_per_pass = len(self._items) // batch_size
        self.sampler = DistributedSampler(self._items, num_replicas=world_size, rank=rank,
                                          shuffle=True, seed=seed)
        self.epoch = 0
        self._order: np.ndarray | None = None
        self._next = 0

    def next(self) -> np.ndarray:
        """Return this process's sample indices of the next minibatch (batch_size // K)."""
        if self._order is None or self._next == self.batches_per_pass:
            self.sampler.set_epoch(self.epoch)
            self.epoch += 1
            self._order = np.fromiter(iter(self.sampler), dtype=np.int64)
            self._next = 0
        start = self._next * self.local_batch
        self._next += 1
        return self._items[self._order[start:start + self.local_batch]]


def free_loopback_port() -> int:
    """Return a TCP port free on 127.0.0.1 now (for the rendezvous of one local run)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def torchrun_command(nproc: int, module: str, args: Sequence[str]) -> list[str]:
    """Return the command that runs `python -m module args` in `nproc` local processes.

    A single-machine rendezvous on 127.0.0.1 at a free port (static, no agent store on
    another address); pair it with `loopback_environment()`.
    """
    return [sys.executable, '-m', 'torch.distributed.run', '--nnodes', '1', '--node-rank', '0',
            '--nproc-per-node', str(nproc), '--master-addr', LOOPBACK,
            '--master-port', str(free_loopback_port()), '-m', module, *args]


def loopback_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """Return `base` (default os.environ) with the collectives kept on the loopback device.

    gloo and NCCL otherwise pick the interface of the host name; ROS discovery stays local
    as in every habc process.
    """
    env = dict(os.environ if base is None else base)
    env['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    env['MASTER_ADDR'] = LOOPBACK
    env.setdefault('GLOO_SOCKET_IFNAME', 'lo')
    env.setdefault('NCCL_SOCKET_IFNAME', 'lo')
    # One OpenMP thread per process unless set: K processes share the cores.
    env.setdefault('OMP_NUM_THREADS', '1')
    return env
