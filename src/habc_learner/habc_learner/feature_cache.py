"""Frame features of a frozen backbone, computed once per buffer row and reused.

HABC's critic needs the policy's features of s_{t+1} (and of s_{t+stride}) at every step.
For a policy on a frozen VLM (TransformersVLA, finetune='frozen') those features start with
the pooled prefix, a VLM pass that plain behaviour cloning never runs for s_{t+1}: measured,
HABC took 1.78x the step time of plain BC on tvla_s. But a frozen backbone's pooled prefix
of a frame never changes (eval mode, no augmentation), so it is computed once per frame and
looked up afterwards; only the trainable rest (the state token) is recomputed.

    key           (buffer.frame_token, frame row); the SampleBuffer puts both in every
                  observation dict it gathers ('frame_token', 'frame_rows')
    filled from   the actor's pass over s_t (`store`, after features_and_loss: free) and
                  the s_{t+1} lookups themselves, whose misses run the backbone on the
                  missing rows only (each distinct row once); `warm` fills a whole buffer
    invalidated   by another frame_token (a rebuilt or copied buffer numbers its rows
                  anew), another policy object, or another device: the cache empties
    memory        a (rows, cacheable_feature_dim) tensor on the training device in the
                  features' dtype, indexed by row, growing by doubling up to `max_rows`;
                  rows >= max_rows are never stored (computed every time). Bound:
                  max_rows x width x bytes, e.g. 100k rows x 576 (SmolVLM-256M) x 4 B =
                  230 MB, or x 2048 (SmolVLM2-2.2B) = 820 MB; set max_rows to fit
                  (0 switches the cache off)

A row < max_rows is stored whichever order rows arrive in; with the learner's uniform
sampling, any fixed set of max_rows rows hits as often as an LRU set would.

Exactness: a hit returns the features computed for the same frame by the same frozen
weights, in another batch. Batch size and padding length change the blocking of the
backbone's float32 reductions, so a hit equals a fresh `encode` to float32 rounding (not
bit for bit); the tests check both.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
import weakref

import torch

from habc_policy.models.base import Policy

DEFAULT_MAX_ROWS = 100_000
_MIN_CAPACITY = 1024


@dataclass
class CacheCounters:
    """What the cache saved and what it cost, in rows (tests and benchmarks read them)."""

    looked_up: int = 0     # observations looked up (duplicates in a batch counted)
    hits: int = 0          # observations whose cacheable features came from the cache
    computed: int = 0      # distinct rows run through the backbone by lookups and `warm`
    stored: int = 0        # rows written (from lookups, `store` and `warm`)
    invalidations: int = 0  # times the cache emptied for a new token, policy or device


class FeatureCache:
    """Cacheable policy features per (frame_token, frame row), for one policy at a time."""

    def __init__(self, max_rows: int = DEFAULT_MAX_ROWS) -> None:
        if max_rows < 0:
            raise ValueError(f'FeatureCache max_rows must be >= 0 (0 = off), got {max_rows}')
        self.max_rows = max_rows
        self.counters = CacheCounters()
        self._token: Any = None
        self._policy: weakref.ref | None = None
        self._values: torch.Tensor | None = None
        self._filled: torch.Tensor | None = None

    def __deepcopy__(self, memo: dict) -> 'FeatureCache':
        # A copied algorithm has a copied policy: a new policy object starts empty (and does
        # not double the memory of a cache it could not use).
        return FeatureCache(self.max_rows)

    def __len__(self) -> int:
        return 0 if self._filled is None else int(self._filled.sum())

    @property
    def nbytes(self) -> int:
        """Memory the cached features take now (at most max_rows x width x item size)."""
        return 0 if self._values is None else self._values.nelement() * self._values.itemsize

    def clear(self) -> None:
        """Forget every row (the next lookup recomputes)."""
        if self._values is not None:
            self.counters.invalidations += 1
        self._token, self._policy, self._values, self._filled = None, None, None, None

    # --- keys ----------------------------------------------------------------------------
    def _bind(self, policy: Policy, token: Any) -> torch.device | None:
        """Return the device of `policy`'s features when the cache applies to them, else None.

        Empties the cache when its key moved on: another frame token, policy or device.
        """
        if not self.max_rows or not policy.cacheable_feature_dim or token is None:
            return None
        device = next(policy.parameters()).device
        bound = self._policy() if self._policy is not None else None
        if (bound is not policy or token != self._token
                or (self._values is not None and self._values.device != device)):
            self.clear()
            self._token, self._policy = token, weakref.ref(policy)
        return device

    def _rows(self, policy: Policy, obs: dict[str, Any]) -> torch.Tensor | None:
        rows = obs.get('frame_rows')
        device = self._bind(policy, obs.get('frame_token')) if rows is not None else None
        return None if device is None else rows.to(device)

    def _hits(self, rows: torch.Tensor) -> torch.Tensor:
        if self._filled is None:
            return torch.zeros_like(rows, dtype=torch.bool)
        inside = rows < len(self._filled)
        hits = torch.zeros_like(rows, dtype=torch.bool)
        hits[inside] = self._filled[rows[inside]]
        return hits

    def _write(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        keep = rows < self.max_rows
        if not bool(keep.any()):
            return
        rows, values = rows[keep], values[keep].detach()
        if self._values is not None and (self._values.dtype != values.dtype
                                         or self._values.shape[1] != values.shape[1]):
            token, policy = self._token, self._policy
            self.clear()
            self._token, self._policy = token, policy
        needed = int(rows.max()) + 1
        capacity = 0 if self._values is None else len(self._values)
        if needed > capacity:
            # Doubling keeps the copies few while the buffer grows a round at a time.
            size = min(self.max_rows, max(needed, 2 * capacity, _MIN_CAPACITY))
            grown = values.new_zeros((size, values.shape[1]))
            filled = torch.zeros(size, dtype=torch.bool, device=values.device)
            if self._values is not None:
                grown[:capacity], filled[:capacity] = self._values, self._filled
            self._values, self._filled = grown, filled
        self._values[rows] = values
        self._filled[rows] = True
        self.counters.stored += len(rows)

    # --- use -----------------------------------------------------------------------------
    def store(self, policy: Policy, obs: dict[str, Any], features: torch.Tensor) -> None:
        """Remember the cacheable columns of `features`, `policy`'s features of `obs`.

        For features a pass computed anyway (the actor's features_and_loss over s_t).
        """
        rows = self._rows(policy, obs)
        if rows is not None:
            self._write(rows, features[:, :policy.cacheable_feature_dim])

    def encode(self, policy: Policy, obs: dict[str, Any]) -> torch.Tensor:
        """`policy.encode(obs)`, the cacheable part looked up and computed for misses only.

        Observations without frame rows, a policy with nothing cacheable, or max_rows 0:
        plain `policy.encode`.
        """
        rows = self._rows(policy, obs)
        if rows is None:
            return policy.encode(obs)
        hits = self._hits(rows)
        found, misses = torch.nonzero(hits).squeeze(1), torch.nonzero(~hits).squeeze(1)
        self.counters.looked_up += len(rows)
        self.counters.hits += len(found)
        # Gathered before the misses are written: a write may grow (or reset) the storage.
        values = self._values[rows[found]] if len(found) else None
        computed = None
        if len(misses):
            # Each distinct missing row once: a batch repeats rows (sampling with replacement,
            # the last step's s_{t+1} is itself).
            unique, inverse = torch.unique(rows[misses], return_inverse=True)
            first = torch.full_like(unique, len(rows)).scatter_reduce_(
                0, inverse, misses, reduce='amin')
            computed = policy.encode_cacheable(select(obs, first))
            self.counters.computed += len(unique)
            self._write(unique, computed)
        like = computed if computed is not None else values
        cached = like.new_empty((len(rows), like.shape[1]))
        if computed is not None:
            cached[misses] = computed[inverse]
        if values is not None:
            cached[found] = values.to(cached.dtype)
        return policy.encode_with_cached(obs, cached)

    @torch.no_grad()
    def warm(self, policy: Policy, buffer: Any, device: torch.device | str = 'cpu',
             chunk: int = 256) -> int:
        """Compute every row of `buffer` (up to max_rows) not cached yet; return how many.

        In batches of `chunk` frames without gradients. The lookups fill the cache anyway
        (with fewer rows: the actor's pass stores s_t for free); this only reaches the
        steady state at once, e.g. for a benchmark.
        """
        features_device = self._bind(policy, buffer.frame_token)
        if features_device is None:
            return 0
        every = torch.arange(min(len(buffer), self.max_rows), device=features_device)
        missing = every[~self._hits(every)].cpu().numpy()
        for start in range(0, len(missing), chunk):
            obs = buffer.frames(missing[start:start + chunk], device)
            self._write(obs['frame_rows'].to(features_device), policy.encode_cacheable(obs))
            self.counters.computed += len(obs['frame_rows'])
        return len(missing)


def select(obs: dict[str, Any], positions: torch.Tensor) -> dict[str, Any]:
    """Return the observations at `positions` of a batch (per-sample tensors and lists)."""
    size = len(obs['frame_rows'])
    picked = positions.cpu().tolist()
    out = {}
    for key, value in obs.items():
        if isinstance(value, torch.Tensor) and value.ndim and len(value) == size:
            out[key] = value[positions.to(value.device)]
        elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == size:
            out[key] = [value[i] for i in picked]
        else:
            out[key] = value
    return out
