"""Help-request thresholds chosen for a stated false-alarm rate (split conformal, no rclpy).

A help request is a false alarm when the episode would have succeeded without help. The
monitor's low rule (habc_policy.help_request) raises when p_v stays below the threshold
tau for `below_for_s`. For one episode, the score

    s = min over windows of at least below_for_s of (max p_v inside the window)

is the level that p_v stays below for that long at some point: the rule raises iff s < tau.
Given the scores s_1..s_n of n successful episodes of the same policy (the calibration set)
and a target rate alpha, tau = s_(k), the k-th smallest, with k = floor(alpha (n + 1)) + 1,
raises on a new successful episode with probability at most (k - 1) / (n + 1) <= alpha,
when the episodes are exchangeable (split conformal prediction; SAFE, arXiv 2506.09937,
calibrates its failure detector the same way). What it does not promise: how many failures
it catches. That is measured on the failed episodes (`detection_rate`) and reported.

Only the stretch of an episode that the policy drove, up to the first takeover, counts:
after a takeover the monitor starts afresh and the human's states are not the policy's.
"""

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
import json
import math
from pathlib import Path

import numpy as np

from habc_policy.help_request import HelpRequestParams

CALIBRATION_FILE = 'help_calibration.json'
MAX_BELOW_FOR_S = 60.0  # = HelpRequestParams.help_below_for_s's limit
HYSTERESIS = 0.1       # clear_above = threshold + this (capped at 1): a request does not chatter


def sustained_low(trace: Sequence[tuple[float, float]], below_for_s: float) -> float:
    """Return the score s of one episode's (stamp, p_v) trace (module docstring).

    inf when no stretch of the trace spans below_for_s (too short to ever raise).
    """
    stamps = np.asarray([t for t, _ in trace], dtype=np.float64)
    values = np.asarray([v for _, v in trace], dtype=np.float64)
    score = math.inf
    end = 0
    for start in range(len(stamps)):
        end = max(end, start)
        # The monitor raises on the first sample at least below_for_s after the first one
        # below the threshold: the window is start..end inclusive.
        while end < len(stamps) and stamps[end] - stamps[start] < below_for_s:
            end += 1
        if end == len(stamps):
            break
        score = min(score, float(values[start:end + 1].max()))
    return score


def conformal_threshold(scores: Sequence[float], alpha: float) -> tuple[float, float]:
    """Return (tau, bound): the threshold for false-alarm rate alpha and its exact bound.

    bound = (k - 1) / (n + 1) <= alpha. With alpha below 1 / (n + 1) no episode may raise:
    tau = 0 (never) and bound 0; with alpha of n / (n + 1) or more, (1, 1): no promise.

    Raises:
        ValueError: no scores, or alpha outside (0, 1).
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f'the false-alarm rate must be in (0, 1), got {alpha}')
    ordered = sorted(float(s) for s in scores)
    n = len(ordered)
    if n == 0:
        raise ValueError('no successful episode to calibrate on: label some episodes '
                         'success first')
    k = math.floor(alpha * (n + 1)) + 1
    if k == 1:
        return 0.0, 0.0
    if k > n:
        return 1.0, 1.0  # a rate this high promises nothing: every episode may raise
    return min(1.0, ordered[k - 1]), (k - 1) / (n + 1)


@dataclass(frozen=True)
class HelpCalibration:
    """A calibrated threshold for the low rule, what it promises and what was measured."""

    help_threshold: float
    help_clear_above: float
    help_below_for_s: float
    target_false_alarm_rate: float     # alpha asked for
    false_alarm_bound: float           # (k - 1) / (n + 1) <= alpha: the conformal promise
    calibration_successes: int         # n
    calibration_false_alarms: float    # share of the n that the threshold raises on
    failures: int                      # failed (or taken-over) episodes scored
    detection_rate: float | None       # share of those the threshold raises on
    median_lead_s: float | None        # before a failure's end or takeover, when raised
    policy_version: str = ''

    def __post_init__(self) -> None:
        # A file edited by hand must not reach the monitor with thresholds it refuses.
        if not (0.0 <= self.help_threshold <= self.help_clear_above <= 1.0
                and 0.0 <= self.help_below_for_s <= MAX_BELOW_FOR_S
                and 0.0 < self.target_false_alarm_rate < 1.0
                and 0.0 <= self.false_alarm_bound <= 1.0):
            raise ValueError('thresholds out of range: 0 <= help_threshold <= '
                             f'help_clear_above <= 1, 0 <= help_below_for_s <= '
                             f'{MAX_BELOW_FOR_S:g}, rates in [0, 1]')

    def apply(self, params: HelpRequestParams) -> HelpRequestParams:
        """Return `params` with this calibrated low rule in place, and the stall rule off.

        The false-alarm bound is the low rule's: a stall rule beside it would raise on
        successes the calibration never counted.
        """
        return replace(params, help_threshold=self.help_threshold,
                       help_clear_above=self.help_clear_above,
                       help_below_for_s=self.help_below_for_s, help_stall_window_s=0.0)

    def describe(self) -> str:
        """One line for the status: the threshold and its promise."""
        return (f'calibrated {self.help_threshold:.3f} (low rule only; false alarms <= '
                f'{self.false_alarm_bound:.2f} on {self.calibration_successes} successes)')

    def save(self, folder: Path) -> Path:
        """Write this calibration into a checkpoint folder; return the file."""
        path = Path(folder) / CALIBRATION_FILE
        path.write_text(json.dumps(asdict(self), indent=2) + '\n')
        return path

    @classmethod
    def load(cls, folder: Path) -> 'HelpCalibration | None':
        """Read a checkpoint's calibration; None when it has none.

        Raises:
            ValueError: a calibration file that is not one (names the file).
        """
        path = Path(folder) / CALIBRATION_FILE
        if not path.is_file():
            return None
        try:
            text = path.read_text()
        except OSError as exc:
            raise ValueError(f'{path} is unreadable ({exc})') from None
        return cls.from_text(text, path)

    @classmethod
    def from_text(cls, text: str, path: Path | str = CALIBRATION_FILE) -> 'HelpCalibration':
        """Parse a calibration file's text (`path` names it in errors).

        Raises:
            ValueError: not a help calibration, or thresholds out of range.
        """
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError) as exc:
            raise ValueError(f'{path} is not a help calibration ({exc}); run habc calibrate '
                             'again') from None


@dataclass(frozen=True)
class ScoredEpisode:
    """One labelled episode's policy-driven p_v trace, reduced to what calibration needs."""

    success: bool            # the policy succeeded alone (no takeover)
    trace: tuple[tuple[float, float], ...]   # (stamp s, p_v), up to the first takeover
    end: float               # stamp of the episode's end, or of the first takeover


def first_raise(trace: Sequence[tuple[float, float]], tau: float,
                below_for_s: float) -> float | None:
    """Return the stamp at which the low rule raises on `trace` with threshold tau, if it does."""
    below_since = None
    for stamp, p_v in trace:
        if p_v < tau:
            below_since = stamp if below_since is None else below_since
            if stamp - below_since >= below_for_s:
                return stamp
        else:
            below_since = None
    return None


def calibrate(episodes: Sequence[ScoredEpisode], alpha: float, below_for_s: float,
              policy_version: str = '') -> HelpCalibration:
    """Choose the threshold for false-alarm rate alpha on the successes; score the failures.

    Raises:
        ValueError: no successful episode, or alpha outside (0, 1).
    """
    successes = [sustained_low(e.trace, below_for_s) for e in episodes if e.success]
    tau, bound = conformal_threshold(successes, alpha)
    failures = [e for e in episodes if not e.success]
    leads = []
    for episode in failures:
        raised = first_raise(episode.trace, tau, below_for_s)
        if raised is not None:
            leads.append(episode.end - raised)
    return HelpCalibration(
        help_threshold=tau, help_clear_above=min(1.0, tau + HYSTERESIS),
        help_below_for_s=below_for_s, target_false_alarm_rate=alpha,
        false_alarm_bound=bound, calibration_successes=len(successes),
        calibration_false_alarms=float(np.mean([s < tau for s in successes])),
        failures=len(failures),
        detection_rate=len(leads) / len(failures) if failures else None,
        median_lead_s=float(np.median(leads)) if leads else None,
        policy_version=policy_version)


def reliability(p_v: Sequence[float], outcomes: Sequence[bool], bins: int = 10) -> dict:
    """Calibration of p_v against the outcomes: Brier score and a reliability table.

    Each (p_v, outcome) pair is one prediction (one inference of an episode, labelled with
    that episode's outcome). Returns brier, the Brier score of always predicting the base
    rate (a p_v that knows nothing), and per bin the mean p_v, the success share and count.
    """
    p = np.asarray(p_v, dtype=np.float64)
    y = np.asarray(outcomes, dtype=np.float64)
    if p.shape != y.shape or p.size == 0:
        raise ValueError('reliability needs as many outcomes as p_v values, at least one')
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    table = []
    for b in range(bins):
        mask = index == b
        table.append({'low': float(edges[b]), 'high': float(edges[b + 1]),
                      'count': int(mask.sum()),
                      'mean_p_v': float(p[mask].mean()) if mask.any() else None,
                      'success_share': float(y[mask].mean()) if mask.any() else None})
    base = float(y.mean())
    return {'brier': float(np.mean((p - y) ** 2)),
            'brier_base_rate': float(np.mean((base - y) ** 2)), 'base_rate': base,
            'predictions': int(p.size), 'bins': table}
