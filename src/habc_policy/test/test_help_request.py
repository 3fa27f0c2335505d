"""Help requests from the live viability p_v, on injected time (no clock, no ROS)."""

import math

import pytest

from habc_policy.help_request import (
    ANSWERED,
    CLEARED,
    HelpMonitor,
    HelpRequestParams,
    LOW,
    RAISED,
    RECOVERED,
    RESET,
    STALLED,
)

DT = 0.1  # one inference every 100 ms


def feed(monitor, start, values):
    """Feed p_v values at start, start + DT, ...; return the events with their stamps."""
    events = []
    for k, value in enumerate(values):
        event = monitor.update(round(start + k * DT, 6), value)
        if event is not None:
            events.append(event)
    return events


def params(**changes):
    values = {'help_threshold': 0.3, 'help_below_for_s': 0.5, 'help_stall_window_s': 0.0,
              'help_clear_above': 0.4, 'help_clear_for_s': 0.5, 'help_trace_s': 1.0}
    return HelpRequestParams(**{**values, **changes})


def test_low_viability_for_long_enough_raises_once_with_its_trace():
    monitor = HelpMonitor(params())
    # Dips below the threshold shorter than 0.5 s raise nothing.
    assert feed(monitor, 0.0, [0.8, 0.25, 0.25, 0.5, 0.2, 0.2, 0.2, 0.35]) == []
    events = feed(monitor, 1.0, [0.2] * 10)
    (event,) = events  # raised once, not on every low value after
    assert (event.kind, event.reason) == (RAISED, LOW)
    assert event.stamp == pytest.approx(1.5)  # 0.5 s after the first low value at 1.0
    assert monitor.requested and event.p_v == 0.2
    # The trace holds the last help_trace_s (1 s) of p_v, oldest first.
    stamps = [t for t, _ in event.trace]
    assert stamps == sorted(stamps) and stamps[0] >= 0.5 - 1e-9 and stamps[-1] == 1.5


def test_a_request_clears_only_after_p_v_stays_above_the_hysteresis_level():
    monitor = HelpMonitor(params())
    (raised,) = feed(monitor, 0.0, [0.1] * 6)
    # Back above the threshold (0.3) but not above clear_above (0.4): still requested.
    assert feed(monitor, 1.0, [0.35] * 10) == []
    # Above 0.4, but with a dip: the clock restarts.
    assert feed(monitor, 2.0, [0.5, 0.5, 0.5, 0.38, 0.5, 0.5]) == []
    (cleared,) = feed(monitor, 2.6, [0.5] * 6)
    assert (cleared.kind, cleared.reason) == (CLEARED, RECOVERED)
    assert cleared.stamp == pytest.approx(2.4 + 0.5)  # 0.5 s above since 2.4
    assert not monitor.requested
    # Values between the levels after recovery raise nothing: no chatter.
    assert feed(monitor, 4.0, [0.35, 0.45, 0.35, 0.45] * 5) == []


def test_a_takeover_answers_the_request_and_history_restarts():
    monitor = HelpMonitor(params())
    feed(monitor, 0.0, [0.1] * 6)
    answered = monitor.on_takeover(0.7)
    assert (answered.kind, answered.reason, answered.stamp) == (CLEARED, ANSWERED, 0.7)
    assert not monitor.requested
    assert monitor.on_takeover(0.8) is None  # nothing open: nothing to answer
    # After the handback the low timer starts from scratch.
    assert feed(monitor, 2.0, [0.1] * 5) == []
    assert feed(monitor, 2.5, [0.1])[0].reason == LOW


def test_viability_that_stops_rising_raises_a_stall():
    monitor = HelpMonitor(params(help_stall_window_s=1.0, help_min_rise=0.05,
                                 help_stall_below=0.6))
    # Rising steadily: progress, no request.
    assert feed(monitor, 0.0, [0.4 + 0.01 * k for k in range(20)]) == []
    # Flat at 0.5 (above the low threshold): a stall once a whole window shows no rise.
    events = feed(monitor, 2.0, [0.5] * 15)
    (event,) = events
    assert (event.kind, event.reason) == (RAISED, STALLED)
    # At 2.5 the last second (from 0.55 at 1.5) rose by at most 0.04 before falling.
    assert event.stamp == pytest.approx(2.5)
    # Staying flat keeps it open; rising again (by help_min_rise) for 0.5 s clears it.
    assert feed(monitor, 3.5, [0.52] * 5) == []
    (cleared,) = feed(monitor, 4.0, [0.56] * 8)
    assert (cleared.reason, cleared.stamp) == (RECOVERED, pytest.approx(4.5))
    # Flat but above help_stall_below: confident and not rising is fine.
    calm = HelpMonitor(params(help_stall_window_s=1.0, help_min_rise=0.05,
                              help_stall_below=0.6))
    assert feed(calm, 0.0, [0.9] * 30) == []


def test_without_a_critic_nothing_is_raised_and_the_status_says_why():
    monitor = HelpMonitor(params())
    assert monitor.set_critic_problem('checkpoint v3 has no critic.safetensors') is None
    assert feed(monitor, 0.0, [0.0] * 20) == []
    assert not monitor.requested and 'no critic' in monitor.critic_problem
    # A request open when the critic goes away is cleared, not left hanging.
    monitor = HelpMonitor(params())
    feed(monitor, 0.0, [0.1] * 6)
    event = monitor.set_critic_problem('critic of another shape')
    assert (event.kind, event.reason) == (CLEARED, RESET) and not monitor.requested


def test_bad_samples_and_reset():
    monitor = HelpMonitor(params())
    assert monitor.update(0.0, math.nan) is None and monitor.update(0.1, math.inf) is None
    feed(monitor, 1.0, [0.1] * 6)
    assert monitor.update(1.2, 0.9) is None  # older than the newest sample: ignored
    assert monitor.requested
    event = monitor.reset(2.0)
    assert (event.kind, event.reason) == (CLEARED, RESET) and not monitor.requested
    assert monitor.reset(2.1) is None


def test_parameters_refuse_a_clearing_level_below_the_threshold():
    with pytest.raises(ValueError, match='help_clear_above'):
        HelpRequestParams(help_threshold=0.5, help_clear_above=0.4)
    with pytest.raises(ValueError):
        HelpRequestParams(help_threshold=1.5)
