"""Intervention-aware credit assignment: every rule, by hand and as properties."""

import json
import math
import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st
import numpy as np
import pytest

from habc_learner.credit import (
    ActorWeight,
    assign_credit,
    credit_from_json,
    credit_records,
    CreditConfig,
    Role,
    scaled_min_human_steps,
)

P, H, X = 'policy', 'human', 'hold'


def table(controllers, outcome, **config):
    credit = assign_credit(controllers, outcome, CreditConfig(**config))
    return [(r.role, r.label, r.trains_viability, r.trains_efficiency, r.actor_weight)
            for r in credit_records(credit)]


def test_no_intervention_success_labels_every_policy_window():
    rows = table([P] * 4, 'success', horizon=2)
    assert rows == [('policy_labelled', 1, True, True, 'gate')] * 4


def test_no_intervention_failure_trains_viability_only_and_zero_weight():
    rows = table([P] * 3, 'failure', horizon=2)
    assert rows == [('policy_labelled', 0, True, False, 'zero')] * 3


def test_only_post_intervention_suffix_is_labelled():
    # P P H H P with H=2, k=1 (worked by hand):
    # t0 window [P,P]: 0 human -> policy before the last human step -> unlabelled
    # t1 [P,H], t2 [H,H], t3 [H,P]: >= 1 human -> human windows
    # t4 [P]: after the last human step -> labelled with y
    rows = table([P, P, H, H, P], 'success', horizon=2, min_human_steps=1)
    assert rows == [
        ('policy_unlabelled', None, False, False, 'excluded'),
        ('human', None, False, True, 'one'),
        ('human', None, False, True, 'one'),
        ('human', None, False, True, 'one'),
        ('policy_labelled', 1, True, True, 'gate'),
    ]


def test_policy_between_interventions_stays_unlabelled():
    controllers = [P] * 3 + [H] * 3 + [P] * 3 + [H] * 3 + [P] * 3
    credit = assign_credit(controllers, 'failure', CreditConfig(horizon=3, min_human_steps=2))
    roles = [r.value for r in credit.role]
    # t=7 window [P,P,H] has 1 < 2 human steps and lies before the last human step.
    assert roles[7] == 'policy_unlabelled'
    assert roles[12:] == ['policy_labelled'] * 3
    assert list(credit.label[12:]) == [0.0, 0.0, 0.0]
    assert np.isnan(credit.label[:12]).all()
    assert list(credit.segment) == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3 + [4] * 3


def test_human_window_threshold_k():
    # window of 4 with exactly k human steps is human; k - 1 is not.
    controllers = [P, P, H, H, P, P, P, P]
    at_k = assign_credit(controllers, 'success', CreditConfig(horizon=4, min_human_steps=2))
    above_k = assign_credit(controllers, 'success', CreditConfig(horizon=4, min_human_steps=3))
    assert at_k.role[0] == Role.HUMAN  # [P,P,H,H]
    assert above_k.role[0] == Role.POLICY_UNLABELLED


def test_window_cut_by_episode_end_needs_min_k_and_length():
    # Human-completed episode: the last window has 2 steps, both human, k=5 -> human window.
    credit = assign_credit([P] * 6 + [H] * 6, 'success', CreditConfig(horizon=10,
                                                                     min_human_steps=5))
    assert credit.role[-1] == Role.HUMAN and credit.role[-2] == Role.HUMAN


def test_k_scales_with_horizon():
    assert CreditConfig().k == 10
    assert scaled_min_human_steps(50) == 10
    assert scaled_min_human_steps(25) == 5
    assert scaled_min_human_steps(10) == 2
    assert scaled_min_human_steps(2) == 1
    with pytest.raises(ValueError, match='min_human_steps must be in'):
        CreditConfig(horizon=5, min_human_steps=6)


def test_ir_weights_human_windows_with_the_gate():
    rows = table([P, H, H, P], 'success', horizon=1, intervention_reweighting=True)
    assert [r[4] for r in rows] == ['excluded', 'gate', 'gate', 'gate']
    assert [r[0] for r in rows] == ['policy_unlabelled', 'human', 'human', 'policy_labelled']


def test_human_windows_of_failed_episode_are_imitation_only():
    rows = table([P, H, H], 'failure', horizon=1)
    assert rows[1] == ('human', None, False, False, 'one')


def test_naive_credit_labels_every_window_including_human():
    rows = table([P, P, H, H, P], 'failure', horizon=2, min_human_steps=1, naive=True)
    assert [r[1] for r in rows] == [0] * 5
    assert all(r[2] for r in rows)
    assert [r[4] for r in rows] == ['zero'] * 5
    assert [r[0] for r in rows] == ['policy_labelled', 'human', 'human', 'human',
                                    'policy_labelled']


def test_hold_steps_are_excluded():
    rows = table([P, X, X, P], 'success', horizon=1)
    assert [r[0] for r in rows] == ['policy_labelled', 'hold', 'hold', 'policy_labelled']
    assert [r[4] for r in rows] == ['gate', 'excluded', 'excluded', 'gate']


def test_unlabelled_and_discarded_episodes():
    unlabelled = table([P, H, P], None, horizon=1)
    assert [r[0] for r in unlabelled] == ['policy_unlabelled', 'human', 'policy_unlabelled']
    assert all(r[1] is None and not r[2] and not r[3] for r in unlabelled)
    discarded = table([P, H, P], 'discarded', horizon=1)
    assert all(r[4] == 'excluded' and not r[2] and not r[3] for r in discarded)


def test_terminal_success_flag():
    assert list(assign_credit([P] * 3, 'success', CreditConfig(horizon=2))
                .terminal_success) == [False, False, True]
    assert not assign_credit([P] * 3, 'failure', CreditConfig(horizon=2)).terminal_success.any()


episodes = st.tuples(
    st.lists(st.sampled_from([P, H, X]), min_size=1, max_size=60),
    st.sampled_from(['success', 'failure', None, 'discarded']),
    st.integers(min_value=1, max_value=12),
    st.data())


@settings(max_examples=300, deadline=None)
@given(episodes)
def test_properties_of_intervention_aware_credit(case):
    controllers, outcome, horizon, data = case
    k = data.draw(st.integers(min_value=1, max_value=horizon))
    ir = data.draw(st.booleans())
    credit = assign_credit(controllers, outcome, CreditConfig(horizon, k, ir))
    human_steps = [t for t, c in enumerate(controllers) if c == H]
    last_human = human_steps[-1] if human_steps else -1
    for t, role in enumerate(credit.role):
        labelled = not math.isnan(credit.label[t])
        # No outcome label ever lands on a human window ...
        if role == Role.HUMAN:
            assert not labelled and not credit.trains_viability[t]
        # ... or on a window anchored before (or at) the last intervention.
        if t <= last_human:
            assert not labelled
        if labelled:
            assert outcome in ('success', 'failure')
            assert credit.label[t] == (1.0 if outcome == 'success' else 0.0)
        # Efficiency targets only come from successful episodes.
        if credit.trains_efficiency[t]:
            assert outcome == 'success' and role in (Role.HUMAN, Role.POLICY_LABELLED)
        if credit.actor_weight[t] == ActorWeight.ZERO:
            assert outcome == 'failure' and role == Role.POLICY_LABELLED
        if outcome == 'discarded':
            assert credit.actor_weight[t] == ActorWeight.EXCLUDED


def test_credit_json_matches_the_documented_format():
    records = credit_from_json({'controllers': [P, H, P], 'outcome': 'success',
                                'horizon': 1, 'min_human_steps': 1})
    assert records[0] == {'t': 0, 'segment': 0, 'role': 'policy_unlabelled', 'label': None,
                          'trains_viability': False, 'trains_efficiency': False,
                          'actor_weight': 'excluded'}
    assert records[2]['label'] == 1 and records[2]['actor_weight'] == 'gate'
    assert credit_from_json({'controllers': [H], 'outcome': 'success', 'horizon': 1,
                             'ir': True})[0]['actor_weight'] == 'gate'


@pytest.mark.parametrize('data, message', [
    ([1, 2], 'expected a JSON object'),
    ({'controllers': []}, 'non-empty list'),
    ({'controllers': ['robot']}, "unknown controller 'robot'"),
    ({'controllers': [P], 'outcome': 'win'}, "unknown outcome 'win'"),
    ({'controllers': [P], 'horizon': '5'}, '"horizon" must be an integer'),
    ({'controllers': [P], 'horizn': 5}, r"unknown key\(s\) \['horizn'\]"),
])
def test_credit_json_errors_are_actionable(data, message):
    with pytest.raises(ValueError, match=message):
        credit_from_json(data)


def test_habc_credit_command_reads_stdin_and_files(tmp_path):
    payload = {'controllers': [P, P, H, H, P], 'outcome': 'success', 'horizon': 2,
               'min_human_steps': 1}
    command = [sys.executable, '-m', 'habc.cli', 'credit']
    result = subprocess.run(command, input=json.dumps(payload), capture_output=True,
                            text=True, check=True)
    printed = json.loads(result.stdout)
    assert [r['role'] for r in printed] == ['policy_unlabelled', 'human', 'human', 'human',
                                            'policy_labelled']
    path = tmp_path / 'episode.json'
    path.write_text(json.dumps(payload))
    assert json.loads(subprocess.run([*command, str(path)], capture_output=True, text=True,
                                     check=True).stdout) == printed
    bad = subprocess.run(command, input='{"controllers": "PPH"}', capture_output=True,
                         text=True)
    assert bad.returncode == 2 and 'habc credit: "controllers" must be' in bad.stderr
