"""Help thresholds for a stated false-alarm rate.

The conformal choice by hand, and the episode score against the live monitor's decisions.
"""

import math

import numpy as np
import pytest

from habc_policy.help_calibration import (
    calibrate,
    CALIBRATION_FILE,
    conformal_threshold,
    first_raise,
    HelpCalibration,
    reliability,
    ScoredEpisode,
    sustained_low,
)
from habc_policy.help_request import HelpMonitor, HelpRequestParams, RAISED


def trace(values, period=0.2):
    return tuple((i * period, v) for i, v in enumerate(values))


def test_sustained_low_by_hand():
    # Windows spanning 0.5 s = 3 samples 0.25 s apart: maxima 0.9, 0.5, 0.4, 0.6 -> 0.4.
    assert sustained_low(trace([0.9, 0.5, 0.2, 0.4, 0.3, 0.6], 0.25), 0.5) == 0.4
    assert sustained_low(trace([0.2, 0.1]), 0.4) == math.inf  # never spans 0.4 s
    assert sustained_low(trace([0.7, 0.2]), 0.0) == pytest.approx(0.2)  # one sample suffices


def test_the_score_says_exactly_when_the_live_monitor_raises():
    rng = np.random.default_rng(5)
    for _ in range(200):
        values = np.clip(np.cumsum(rng.normal(0, 0.15, 25)) + 0.6, 0, 1)
        stamps = np.cumsum(rng.uniform(0.05, 0.3, 25))
        episode = tuple(zip(stamps.tolist(), values.tolist(), strict=True))
        tau = float(rng.uniform(0.05, 0.6))
        monitor = HelpMonitor(HelpRequestParams(help_threshold=tau, help_clear_above=tau,
                                                help_below_for_s=0.5,
                                                help_stall_window_s=0.0))
        raised = [t for t, v in episode if (e := monitor.update(t, v)) and e.kind == RAISED]
        assert (sustained_low(episode, 0.5) < tau) == bool(raised)
        assert first_raise(episode, tau, 0.5) == (raised[0] if raised else None)


def test_conformal_threshold_by_hand():
    scores = [0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6]      # n = 9
    # alpha 0.2: k = floor(0.2 * 10) + 1 = 3 -> the 3rd smallest, 0.3; bound 2 / 10.
    assert conformal_threshold(scores, 0.2) == (pytest.approx(0.3), pytest.approx(0.2))
    # alpha 0.05 < 1 / 10: no episode may raise.
    assert conformal_threshold(scores, 0.05) == (0.0, 0.0)
    # Scores below the threshold: 0.1 and 0.2, 2 of 9 (<= the bound's 2 of 10 + 1).
    assert sum(s < 0.3 for s in scores) == 2
    with pytest.raises(ValueError, match='no successful episode'):
        conformal_threshold([], 0.1)
    with pytest.raises(ValueError, match=r'in \(0, 1\)'):
        conformal_threshold(scores, 1.0)


def test_the_false_alarm_rate_holds_on_new_episodes_of_the_same_policy():
    # Exchangeable episodes: the share of new successes that raise stays near or below alpha.
    rng = np.random.default_rng(11)

    def success():
        return ScoredEpisode(True, trace(np.clip(rng.normal(0.7, 0.15, 30), 0, 1)), 6.0)

    calibration = calibrate([success() for _ in range(199)], 0.1, 0.4)
    fresh = [sustained_low(success().trace, 0.4) for _ in range(4000)]
    rate = np.mean([s < calibration.help_threshold for s in fresh])
    # k = floor(0.1 * 200) + 1 = 21: the bound (k - 1) / (n + 1) is alpha itself.
    assert calibration.false_alarm_bound == pytest.approx(0.1)
    assert rate < 0.1 + 3 * math.sqrt(0.1 * 0.9 / 4000) and rate > 0.05


def test_calibrate_scores_the_failures_and_saves_into_the_checkpoint(tmp_path):
    # Each success dips to a = 0.60 .. 0.68 for three samples (0.4 s): score a.
    successes = [ScoredEpisode(True, trace([0.8] + [0.6 + 0.01 * i] * 3 + [0.9]), 1.0)
                 for i in range(9)]
    # Below 0.62 from t = 0.4 s; the low rule (0.4 s) raises at t = 0.8; ends at 2.0.
    failure = ScoredEpisode(False, trace([0.8, 0.7, 0.3, 0.2, 0.1]), 2.0)
    calibration = calibrate(successes + [failure], 0.2, 0.4, '3:habc')
    assert calibration.help_threshold == pytest.approx(0.62)   # 3rd smallest of 0.60..0.68
    assert calibration.help_clear_above == pytest.approx(0.72)
    assert calibration.calibration_false_alarms == pytest.approx(2 / 9)
    assert calibration.detection_rate == 1.0 and calibration.median_lead_s == pytest.approx(1.2)
    path = calibration.save(tmp_path)
    assert path.name == CALIBRATION_FILE
    assert HelpCalibration.load(tmp_path) == calibration
    assert HelpCalibration.load(tmp_path / 'missing') is None
    path.write_text('{"help_threshold": 0.3}')
    with pytest.raises(ValueError, match='habc calibrate'):
        HelpCalibration.load(tmp_path)


def test_reliability_by_hand():
    result = reliability([0.1, 0.15, 0.9, 0.8], [False, True, True, True], bins=2)
    # Brier: (0.01 + 0.7225 + 0.01 + 0.04) / 4; base rate 0.75 -> 0.1875.
    assert result['brier'] == pytest.approx(0.195625)
    assert result['brier_base_rate'] == pytest.approx(0.1875)
    low, high = result['bins']
    assert (low['count'], low['success_share']) == (2, 0.5)
    assert high['mean_p_v'] == pytest.approx(0.85) and high['success_share'] == 1.0


def test_a_rate_too_high_for_the_sample_promises_nothing():
    # n = 3, alpha 0.8: k = floor(3.2) + 1 = 4 > n: every episode may raise.
    assert conformal_threshold([0.2, 0.5, 0.7], 0.8) == (1.0, 1.0)


def test_a_calibration_applies_only_its_low_rule_and_refuses_bad_thresholds():
    calibration = HelpCalibration(
        help_threshold=0.2, help_clear_above=0.3, help_below_for_s=1.0,
        target_false_alarm_rate=0.1, false_alarm_bound=0.09, calibration_successes=10,
        calibration_false_alarms=0.1, failures=2, detection_rate=0.5, median_lead_s=1.0)
    params = calibration.apply(HelpRequestParams())
    assert (params.help_threshold, params.help_clear_above, params.help_below_for_s) == \
        (0.2, 0.3, 1.0)
    assert params.help_stall_window_s == 0.0     # its false alarms were never counted
    assert 'low rule only' in calibration.describe()
    for bad in ({'help_threshold': 0.5}, {'help_below_for_s': 90.0},
                {'target_false_alarm_rate': 1.0}):
        fields = {**calibration.__dict__, **bad}
        with pytest.raises(ValueError, match='out of range'):
            HelpCalibration(**fields)
    with pytest.raises(ValueError, match='not a help calibration'):
        HelpCalibration.from_text('{"help_threshold": 0.5, "help_clear_above": 0.2}')
