"""Summaries of episode index records per policy version (no rclpy, no torch).

The dashboard's success plot and `habc demo`'s table both show what happened while each
policy version was active; both count it here, from EpisodeRecord rows of the index.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
import math
from typing import Any

from habc_episodes.vocabulary import EpisodeStatus, Outcome, PolicyVersion

_RECORDING = EpisodeStatus.RECORDING.label
_SUCCESS, _FAILURE = Outcome.SUCCESS.label, Outcome.FAILURE.label
_DISCARDED = Outcome.DISCARDED.label


@dataclass(frozen=True)
class VersionStats:
    """Outcomes and takeovers of the finished, not discarded episodes of one policy version."""

    version: str
    episodes: int
    successes: int
    failures: int
    discarded: int
    takeovers: int
    steps: int

    @property
    def labelled(self) -> int:
        return self.successes + self.failures

    @property
    def success_rate(self) -> float | None:
        """Return successes / labelled episodes (None before the first label)."""
        return self.successes / self.labelled if self.labelled else None

    @property
    def takeovers_per_episode(self) -> float | None:
        return self.takeovers / self.episodes if self.episodes else None


def _version_order(text: str) -> tuple:
    try:
        return (PolicyVersion.sort_key(text), text)
    except ValueError:
        # A malformed version text in an old index must not hide every other row: last.
        return ((2, 0, text), text)


def version_stats(records: Iterable[Any], *, labelled_only: bool = False,
                  no_version: str = '-') -> list[VersionStats]:
    """Return per-version stats of index records (EpisodeRecord-like), oldest version first.

    Episodes still recording are left out, and discarded ones are only counted as such: the
    operator said they say nothing about the policy. With `labelled_only`, episodes not
    labelled yet are left out too (their takeovers with them), so that `episodes` counts
    only the episodes whose outcome is known. Versions are ordered as they ran on the robot
    (PolicyVersion.sort_key: '1:sft', then '2', then '10'). Episodes without a version (no
    policy acted) are grouped under `no_version`, before every version.
    """
    groups: dict[str, dict[str, int]] = {}
    for record in records:
        if record.status == _RECORDING:
            continue
        if labelled_only and record.outcome not in (_SUCCESS, _FAILURE, _DISCARDED):
            continue
        group = groups.setdefault(record.policy_version or '', {
            'episodes': 0, 'successes': 0, 'failures': 0, 'discarded': 0, 'takeovers': 0,
            'steps': 0})
        if record.outcome == _DISCARDED:
            group['discarded'] += 1
            continue
        group['episodes'] += 1
        group['successes'] += record.outcome == _SUCCESS
        group['failures'] += record.outcome == _FAILURE
        group['takeovers'] += record.num_interventions
        group['steps'] += record.num_steps
    return [VersionStats(version or no_version, **groups[version])
            for version in sorted(groups, key=_version_order)]


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score 95% interval of a success rate."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # All or none: the bound is exactly 1 (or 0); the formula can round to just inside it.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high
