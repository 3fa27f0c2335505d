"""Help requests paired and matched to takeovers, checked against hand-made timelines."""

import numpy as np
import pytest

from habc_episodes.help_requests import (
    ANSWERED,
    HelpLog,
    HelpMessage,
    HelpRequestRecord,
    RECOVERED,
    summarize_help,
    Takeover,
    takeover_steps,
    TakeoverDetector,
    UNANSWERED,
)
from habc_episodes.vocabulary import Controller, HelpReason

P, H, X = int(Controller.POLICY), int(Controller.HUMAN), int(Controller.HOLD)


def raised(stamp, reason='low', p_v=0.2):
    return HelpMessage(stamp, True, reason, p_v, '3')


def cleared(stamp, reason):
    return HelpMessage(stamp, False, reason, 0.25, '3')


def test_help_reasons_are_the_policy_nodes_spellings():
    assert HelpReason.labels() == ('low', 'stalled', 'answered', 'recovered', 'reset')
    assert [r.label for r in HelpReason if r.raises] == ['low', 'stalled']


def test_takeovers_switch_into_human_ignoring_holds_streamed_or_as_an_array():
    cases = [
        ([P, P, H, H, X, H, P, H], [2, 7]),  # the hold inside a human run is no new takeover
        ([H, H, P], [0]),                    # an episode that starts under human control
        ([P, X, H, X, P, X, H], [2, 6]),
        ([X, X], []), ([], []),
    ]
    for sources, expected in cases:
        assert takeover_steps(np.array(sources, dtype=np.int8)).tolist() == expected
        detector = TakeoverDetector()
        assert [t for t, s in enumerate(sources) if detector.on_source(s)] == expected


def test_a_request_answered_by_a_takeover_marks_it_requested():
    # Raised at 10.5 s, a pedal takeover at 11.0 s answers it (the clearing carries the
    # takeover tick's stamp, a float round trip off); a later spontaneous one at 14.0 s.
    summary = summarize_help([cleared(11.0 + 2e-7, 'answered'), raised(10.5)],
                             [(14.0, 'deviation', 40), (11.0, 'engage', 25)], start=10.0)
    assert summary.requests == (HelpRequestRecord(
        raised_at=0.5, reason='low', p_v=0.2, cleared_at=pytest.approx(1.0), cleared_reason=
        'answered', answered_by='engage', policy_version='3'),)
    assert summary.takeovers == (Takeover(1.0, 'engage', True, 25),
                                 Takeover(4.0, 'deviation', False, 40))
    assert (summary.requested_takeovers, summary.spontaneous_takeovers) == (1, 1)
    assert [summary.count(o) for o in (ANSWERED, RECOVERED, UNANSWERED)] == [1, 0, 0]


def test_recovered_open_reset_and_unrecorded_raises():
    summary = summarize_help(
        [cleared(1.0, 'answered'),              # raised before the recording began
         raised(2.0, 'stalled', 0.4), cleared(3.0, 'recovered'),
         raised(5.0), cleared(5.5, 'reset'),
         raised(8.0), raised(8.0),              # a latched raise delivered twice
         ], [(1.0, 'engage', 0), (4.0, 'engage', 5), (9.0, '', 12)], start=0.0)
    outcomes = [(r.raised_at, r.reason, r.cleared_at, r.cleared_reason, r.answered_by,
                 r.outcome) for r in summary.requests]
    assert outcomes == [
        (None, '', 1.0, 'answered', 'engage', ANSWERED),
        (2.0, 'stalled', 3.0, 'recovered', '', RECOVERED),
        (5.0, 'low', 5.5, 'reset', '', UNANSWERED),
        (8.0, 'low', None, '', '', UNANSWERED),  # still open at the end
    ]
    assert summary.requests[0].p_v is None and summary.requests[1].p_v == 0.4
    # 1.0 answered the unrecorded raise; 4.0 fell between requests; 9.0 found one open.
    assert [t.requested for t in summary.takeovers] == [True, False, True]


def test_a_raise_whose_clearing_was_lost_ends_at_the_next_raise():
    summary = summarize_help([raised(1.0), raised(3.0), cleared(6.0, 'answered')],
                             [(2.0, 'engage', None), (6.0, 'engage', None)], start=0.0)
    assert [(r.raised_at, r.cleared_at, r.answered_by) for r in summary.requests] == [
        (1.0, None, ''), (3.0, 6.0, 'engage')]
    assert [t.requested for t in summary.takeovers] == [True, True]


def test_no_messages_make_every_takeover_spontaneous():
    summary = summarize_help([], [(3.0, 'engage', 7)], start=1.0)
    assert summary.requests == () and summary.takeovers == (Takeover(2.0, 'engage', False, 7),)


def test_records_survive_a_json_round_trip():
    record = HelpRequestRecord(None, '', None, 1.5, 'answered', 'engage', '2')
    assert HelpRequestRecord.from_dict(record.to_dict()) == record
    assert HelpRequestRecord.from_dict({'raised_at': 1, 'extra': 'ignored'}) == \
        HelpRequestRecord(1.0, '', None, None, '', '', '')


def test_the_log_counts_from_the_first_step_and_takes_takeovers_from_states():
    log = HelpLog()
    log.on_help(raised(100.1))                # before the first step: negative
    for k, source in enumerate([P, P, H, X, H, P]):
        stamp = 100.2 + 0.02 * k
        log.on_source(stamp, source, 'engage' if source == H else 'start')
        log.on_step(stamp)
    log.on_help(cleared(100.24, 'answered'))
    summary = log.summary()
    (record,) = summary.requests
    assert record.raised_at == pytest.approx(-0.1) and record.cleared_at == pytest.approx(0.04)
    assert record.answered_by == 'engage'
    (takeover,) = summary.takeovers
    assert takeover.at == pytest.approx(0.04) and takeover.requested and takeover.step is None
    empty = HelpLog()
    empty.on_help(raised(7.0))
    # Without a step it counts from the first thing recorded.
    assert empty.summary().requests[0].raised_at == 0.0
