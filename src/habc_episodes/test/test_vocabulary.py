"""The episode vocabulary: one spelling per word, and PolicyVersion's text form."""

import pytest

from habc_episodes.vocabulary import Controller, Outcome, PolicyVersion, STARTUP_VERSION


def test_outcome_and_controller_spellings():
    assert Outcome.labels() == ('unlabelled', 'success', 'failure', 'discarded')
    assert Outcome.parse('unknown') is Outcome.UNLABELLED  # hand-written label files
    assert Outcome.parse(True) is Outcome.SUCCESS and Outcome.parse(None) is Outcome.UNLABELLED
    assert Controller.parse('Human') is Controller.HUMAN and Controller.parse(2) is Controller.HOLD
    with pytest.raises(ValueError, match='use one of policy, human, hold'):
        Controller.parse('robot')


def test_policy_version_text_round_trips():
    for version, text in [(PolicyVersion(3), '3'), (STARTUP_VERSION, '1:sft'),
                          (PolicyVersion(2, 'manual-0123456789ab'), '2:manual-0123456789ab')]:
        assert str(version) == text and PolicyVersion.parse(text) == version
    assert PolicyVersion.parse(4) == PolicyVersion(4)
    assert PolicyVersion.parse(STARTUP_VERSION) is STARTUP_VERSION


def test_a_bare_tag_is_the_startup_number():
    # Checkpoints written before versions had numbers said 'sft' or 'untrained'.
    assert PolicyVersion.parse('sft') == STARTUP_VERSION
    assert PolicyVersion.parse(' untrained ') == PolicyVersion(1, 'untrained')
    assert PolicyVersion.parse('v3') == PolicyVersion(1, 'v3')


def test_invalid_versions_are_refused():
    with pytest.raises(ValueError, match='empty policy version'):
        PolicyVersion.parse('  ')
    with pytest.raises(ValueError, match='integer >= 0'):
        PolicyVersion(-1)
    with pytest.raises(ValueError, match='must not contain'):
        PolicyVersion(2, 'a:b')


def test_versions_order_as_the_weights_ran():
    texts = ['10', '2', '', '1:sft', '2:manual-ab', '3']
    assert sorted(texts, key=PolicyVersion.sort_key) == ['', '1:sft', '2', '2:manual-ab', '3',
                                                        '10']
    assert PolicyVersion(2) < PolicyVersion(10) and STARTUP_VERSION < PolicyVersion(2)
