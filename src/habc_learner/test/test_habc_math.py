"""Eqs. 1 and 3-8 against numbers worked out by hand, plus properties of the gate."""

import math

from hypothesis import given, settings
from hypothesis import strategies as st
import pytest
import torch

from habc_learner.habc import (
    efficiency_advantage,
    efficiency_loss,
    efficiency_target,
    gate,
    normalize_weights,
    viability_advantage,
    viability_loss,
    weighted_bc_loss,
)


def t(*values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def test_eq5_viability_advantage():
    assert viability_advantage(t(0.5, -1.0), t(1.5, -3.0)).tolist() == [1.0, -2.0]


def test_eq6_efficiency_advantage():
    # -1 + (-8) - (-10) = 1 ; -1 + (-5) - (-5) = -1
    assert efficiency_advantage(t(-10.0, -5.0), t(-8.0, -5.0)).tolist() == [1.0, -1.0]
    # a stride of 5 control steps costs 5
    assert efficiency_advantage(t(-10.0), t(-4.0), steps=5).tolist() == [1.0]


def test_eq7_gate_by_hand():
    z_v = t(0.0, math.log(3.0), -math.log(4.0))   # p_v = 0.5, 0.75, 0.2
    a_v = t(1.0, 2.0, -1.0)
    a_e = t(-1.0, 0.4, 3.0)
    # 0.5*1 + 0.5*(-1) = 0 ; 0.25*2 + 0.75*0.4 = 0.8 ; 0.8*(-1) + 0.2*3 = -0.2
    expected = [1.0, 1.0 + math.tanh(0.8), 1.0 + math.tanh(-0.2)]
    assert gate(z_v, a_v, a_e).tolist() == pytest.approx(expected, abs=1e-12)
    assert expected[1] == pytest.approx(1.6640367702678489)
    assert expected[2] == pytest.approx(0.802624679775096)


def test_gate_follows_viability_when_unlikely_and_progress_when_likely():
    a_v, a_e = t(2.0, 2.0), t(-2.0, -2.0)
    low, high = gate(t(-8.0, 8.0), a_v, a_e).tolist()
    assert low > 1.9 and high < 0.1


def test_eq3_efficiency_target_and_stop_gradient():
    v_e_next = t(-3.0, -7.0).requires_grad_()
    target = efficiency_target(v_e_next, torch.tensor([False, True]))
    assert target.tolist() == [-4.0, 0.0]
    assert not target.requires_grad


def test_eq4_losses_by_hand():
    # BCE(z=0, y=1) = ln 2 ; BCE(z=0, y=0) = ln 2 ; masked-out entry ignored
    bce = viability_loss(t(0.0, 0.0, 5.0), t(1.0, 0.0, float('nan')),
                         torch.tensor([True, True, False]))
    assert bce.item() == pytest.approx(math.log(2.0))
    # Huber delta 1: |d| = 3 -> 3 - 0.5 = 2.5 ; |d| = 0.5 -> 0.5 * 0.25 = 0.125
    huber = efficiency_loss(t(-2.0, -4.5), t(-5.0, -5.0), torch.tensor([True, True]))
    assert huber.item() == pytest.approx((2.5 + 0.125) / 2)
    empty = efficiency_loss(t(-2.0), t(-5.0), torch.tensor([False]))
    assert empty.item() == 0.0


def test_eq8_normalisation_by_hand():
    w = t(2.0, 0.5, 1.5, 7.0, 3.0)
    is_sft = torch.tensor([False, False, False, True, False])
    valid = torch.tensor([True, True, True, True, False])
    # c = (2 + 0.5 + 1.5) / 3 = 4/3
    assert normalize_weights(w, is_sft, valid).tolist() == pytest.approx(
        [1.5, 0.375, 1.125, 1.0, 0.0])


def test_eq8_all_zero_weights_stay_zero_and_sft_only_batch():
    w = t(0.0, 0.0)
    out = normalize_weights(w, torch.tensor([False, False]), torch.tensor([True, True]))
    assert out.tolist() == [0.0, 0.0]
    out = normalize_weights(t(0.3, 5.0), torch.tensor([True, True]), torch.tensor([True, True]))
    assert out.tolist() == [1.0, 1.0]


def test_eq1_weighted_bc_loss():
    loss = weighted_bc_loss(t(1.0, 2.0, 3.0), t(0.0, 1.0, 2.0))
    assert loss.item() == pytest.approx(8.0 / 3.0)


finite = st.floats(min_value=-15.0, max_value=15.0, allow_nan=False)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(st.floats(-30.0, 30.0), finite, finite), min_size=1, max_size=50))
def test_gate_stays_in_open_interval(rows):
    z_v, a_v, a_e = (torch.tensor(col, dtype=torch.float64) for col in zip(*rows, strict=True))
    g = gate(z_v, a_v, a_e)
    # |(1 - p) A_v + p A_e| <= 15, where tanh is still representably below 1 in float64.
    assert ((g > 0.0) & (g < 2.0)).all()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(-1e6, 1e6), st.floats(-1e6, 1e6), st.floats(-1e6, 1e6)),
                min_size=1, max_size=20))
def test_gate_never_leaves_closed_interval_in_float32(rows):
    # Far outside any critic's range, float32 tanh saturates to exactly +-1: g in [0, 2].
    z_v, a_v, a_e = (torch.tensor(col, dtype=torch.float32) for col in zip(*rows, strict=True))
    g = gate(z_v, a_v, a_e)
    assert torch.isfinite(g).all() and ((g >= 0.0) & (g <= 2.0)).all()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.floats(0.0, 2.0), st.booleans(), st.booleans()), min_size=1,
                max_size=64))
def test_normalised_non_sft_weights_have_unit_mean(rows):
    w, is_sft, valid = (torch.tensor(col) for col in zip(*rows, strict=True))
    w = w.to(torch.float64)
    rollout = valid & ~is_sft
    out = normalize_weights(w, is_sft, valid)
    assert (out[is_sft & valid] == 1.0).all()
    assert (out[~valid] == 0.0).all()
    if rollout.any() and w[rollout].mean() > 1e-6:
        assert out[rollout].mean().item() == pytest.approx(1.0)
