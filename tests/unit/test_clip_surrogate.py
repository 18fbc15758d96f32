"""Tests of HAPO's adaptive clipping / advantage redistribution (spec 2.4, 2.5) and the clipped surrogate with
Clip-Higher, dual clip and token / sequence ratios (spec 1.2, 2.6, 3.3, ambiguity G3)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import F64, SETTINGS, ones_mask, t64
from hypothesis import given
from hypothesis import strategies as st

from megatron_hapo.algos import (
    adaptive_clip_bounds,
    clipped_surrogate,
    clipped_surrogate_from_ratio,
    importance_ratio,
    redistribute_advantages,
)


# ---------------------------------------------------------------------------------------------------------------
# adaptive_clip_bounds (published ada_clip)
# ---------------------------------------------------------------------------------------------------------------
def test_adaptive_clip_bounds_hand_values():
    h_hat = torch.tensor([0.0, 0.5, 1.0, -0.5, -1.0])
    low, high = adaptive_clip_bounds(h_hat, eps_low=0.2, eps_high=0.28, alpha=1.0)
    # low varies only where h_hat <= 0: 0.2 * (1 - h):   h = 0 -> 0.2, -0.5 -> 0.3, -1 -> 0.4
    # high varies only where h_hat > 0: 0.28 * (1 + h):  0.5 -> 0.42, 1 -> 0.56 (h = 0 keeps 0.28)
    torch.testing.assert_close(low, torch.tensor([0.2, 0.2, 0.2, 0.3, 0.4]))
    torch.testing.assert_close(high, torch.tensor([0.28, 0.42, 0.56, 0.28, 0.28]))
    assert low.dtype == high.dtype == torch.float32


def test_adaptive_clip_bounds_alpha():
    h_hat = torch.tensor([1.0, -1.0])
    low, high = adaptive_clip_bounds(h_hat, eps_low=0.2, eps_high=0.2, alpha=0.5)
    # high(1) = 0.2 * 1.5 = 0.3; low(-1) = 0.2 * 1.5 = 0.3
    torch.testing.assert_close(low, torch.tensor([0.2, 0.3]))
    torch.testing.assert_close(high, torch.tensor([0.3, 0.2]))
    low0, high0 = adaptive_clip_bounds(h_hat, eps_low=0.2, eps_high=0.2, alpha=0.0)
    torch.testing.assert_close(low0, torch.full((2,), 0.2))
    torch.testing.assert_close(high0, torch.full((2,), 0.2))


@given(h=st.lists(st.floats(0.0, 1.0, width=32), min_size=1, max_size=20))
@SETTINGS
def test_adaptive_clip_bounds_published_sign_only_widens_high(h):
    # Spec 2.5 "code reality": with h_hat >= 0, eps_low stays 0.2 everywhere and eps_high is in [0.2, 0.4].
    low, high = adaptive_clip_bounds(torch.tensor(h), eps_low=0.2, eps_high=0.2, alpha=1.0)
    assert torch.equal(low, torch.full_like(low, 0.2))
    assert bool((high >= 0.2 - 1e-7).all()) and bool((high <= 0.4 + 1e-7).all())


def test_adaptive_clip_bounds_detached_and_checked():
    h_hat = torch.tensor([0.5, -0.5], requires_grad=True)
    low, high = adaptive_clip_bounds(h_hat, eps_low=0.2, eps_high=0.2, alpha=1.0)
    assert not low.requires_grad and not high.requires_grad
    with pytest.raises(ValueError):
        adaptive_clip_bounds(h_hat, eps_low=1.5, eps_high=0.2, alpha=1.0)
    with pytest.raises(ValueError):
        adaptive_clip_bounds(h_hat, eps_low=0.2, eps_high=-0.1, alpha=1.0)
    with pytest.raises(ValueError):
        adaptive_clip_bounds(h_hat, eps_low=0.2, eps_high=0.2, alpha=-1.0)


# ---------------------------------------------------------------------------------------------------------------
# redistribute_advantages (published ada_advantage)
# ---------------------------------------------------------------------------------------------------------------
def test_redistribute_high_entropy_open_neutral_zone():
    # eps 0.2 / 0.2 -> N = (0.9, 1.1), open. h_hat = 0.5 > 0, A = 2 -> A' = 2 * 1.5 = 3.
    # ratio 0.9 and 1.1 are ON the boundary -> outside -> A'; 0.95 inside -> A; 0.85 / 1.2 outside -> A'.
    ratio = torch.tensor([[0.9, 0.95, 1.1, 1.2, 0.85]])  # float32, as the loss computes it
    h_hat = torch.full((1, 5), 0.5)
    got = redistribute_advantages(torch.tensor([2.0]), h_hat, ratio, 0.2, 0.2, beta=1.0)
    torch.testing.assert_close(got, torch.tensor([[3.0, 2.0, 3.0, 3.0, 3.0]]))


def test_redistribute_neutral_zone_edges_exact_in_float64():
    ratio = t64([[0.9, 1.1]])  # exactly on the edges of the open zone (0.9, 1.1) -> outside -> A' = 3
    got = redistribute_advantages(t64([2.0]), torch.full((1, 2), 0.5, dtype=F64), ratio, 0.2, 0.2, beta=1.0)
    torch.testing.assert_close(got, t64([[3.0, 3.0]]))


def test_redistribute_low_entropy_attenuates_inside_zone():
    # paper sign: h_hat = -0.5 <= 0 -> A' = A * (1 - 0.5) = 1 when the ratio is INSIDE N, else A = 2.
    # h_hat = 0 is on the low side too: A' = A * (1 + 0) = A.
    ratio = torch.tensor([[1.0, 1.2, 1.0, 0.5]])
    h_hat = torch.tensor([[-0.5, -0.5, 0.0, 0.0]])
    got = redistribute_advantages(torch.full((1, 4), 2.0), h_hat, ratio, 0.2, 0.2, beta=1.0)
    torch.testing.assert_close(got, torch.tensor([[1.0, 2.0, 2.0, 2.0]]))


def test_redistribute_negative_advantage_and_beta():
    # A = -2, h_hat = 0.5, ratio outside N -> -2 * (1 + beta * 0.5): beta 1 -> -3, beta 2 -> -4, beta 0 -> -2
    ratio, h_hat = torch.tensor([[1.5]]), torch.tensor([[0.5]])
    for beta, expected in ((1.0, -3.0), (2.0, -4.0), (0.0, -2.0)):
        got = redistribute_advantages(torch.tensor([-2.0]), h_hat, ratio, 0.2, 0.2, beta=beta)
        assert got.item() == pytest.approx(expected)
    with pytest.raises(ValueError):
        redistribute_advantages(torch.tensor([-2.0]), h_hat, ratio, 0.2, 0.2, beta=-1.0)


def test_redistribute_uses_per_token_adapted_bounds():
    # token 0: eps (0.2, 0.2) -> N = (0.9, 1.1): ratio 1.2 outside -> A' = 1.5
    # token 1: eps (0.4, 0.6) -> N = (0.8, 1.3): ratio 1.2 inside  -> A  = 1.0
    ratio = torch.tensor([[1.2, 1.2]])
    h_hat = torch.tensor([[0.5, 0.5]])
    low, high = torch.tensor([[0.2, 0.4]]), torch.tensor([[0.2, 0.6]])
    got = redistribute_advantages(torch.tensor([1.0]), h_hat, ratio, low, high, beta=1.0)
    torch.testing.assert_close(got, torch.tensor([[1.5, 1.0]]))


def test_redistribute_has_no_gradient_and_broadcasts():
    advantages = torch.tensor([1.0, -1.0], requires_grad=True)
    ratio = torch.tensor([[1.0, 1.5], [1.5, 1.0]], requires_grad=True)
    h_hat = torch.full((2, 2), 1.0)
    got = redistribute_advantages(advantages, h_hat, ratio, 0.2, 0.2, beta=1.0)
    assert not got.requires_grad
    # row 0 (A = 1): inside -> 1, outside -> 2; row 1 (A = -1): outside -> -2, inside -> -1
    torch.testing.assert_close(got, torch.tensor([[1.0, 2.0], [-2.0, -1.0]]))
    full = redistribute_advantages(advantages.detach()[:, None].expand(2, 2), h_hat, ratio, 0.2, 0.2, beta=1.0)
    assert torch.equal(got, full)


# ---------------------------------------------------------------------------------------------------------------
# clipped_surrogate_from_ratio / clipped_surrogate
# ---------------------------------------------------------------------------------------------------------------
def test_surrogate_hand_values_clip_higher_and_dual_clip():
    # eps_low 0.2 -> lower bound 0.8, eps_high 0.28 -> upper bound 1.28, c = 3.
    ratio = t64([[1.5, 0.5, 5.0, 1.0, 0.5, 1.5, 5.0]])
    adv = t64([[1.0, -1.0, -1.0, 1.0, 1.0, -1.0, 1.0]])
    loss, metrics = clipped_surrogate_from_ratio(
        ratio, adv, ones_mask(1, 7), eps_low=0.2, eps_high=0.28, dual_clip_c=3.0
    )
    expected = t64(
        [
            [
                -1.28,  # A=+1, r=1.5: max(-1.5, -1.28)          clipped high
                0.8,  # A=-1, r=0.5: max(0.5, 0.8)               clipped low
                3.0,  # A=-1, r=5:   max(5, 1.28) = 5, min(5, 3)  dual clip
                -1.0,  # A=+1, r=1:  unclipped
                -0.5,  # A=+1, r=0.5: max(-0.5, -0.8)            unclipped (ratio below, A > 0)
                1.5,  # A=-1, r=1.5: max(1.5, 1.28), min(1.5, 3) unclipped
                -1.28,  # A=+1, r=5: dual clip never applies to A > 0
            ]
        ]
    )
    torch.testing.assert_close(loss, expected, atol=1e-7, rtol=0)
    # clip_frac: tokens 0, 1, 6 -> 3/7; low: token 1 -> 1/7; high: tokens 0, 6 -> 2/7; dual: token 2 -> 1/7
    assert metrics["clip_frac"].item() == pytest.approx(3 / 7)
    assert metrics["clip_frac_low"].item() == pytest.approx(1 / 7)
    assert metrics["clip_frac_high"].item() == pytest.approx(2 / 7)
    assert metrics["dual_clip_frac"].item() == pytest.approx(1 / 7)
    assert metrics["ratio_mean"].item() == pytest.approx(15.0 / 7)  # (1.5 + 0.5 + 5 + 1 + 0.5 + 1.5 + 5) / 7
    assert metrics["ratio_max"].item() == 5.0 and metrics["ratio_min"].item() == 0.5


def test_surrogate_without_dual_clip_is_unbounded_for_negative_advantages():
    loss, metrics = clipped_surrogate_from_ratio(
        t64([[5.0]]), t64([-1.0]), ones_mask(1, 1), eps_low=0.2, eps_high=0.2, dual_clip_c=None
    )
    assert loss.item() == 5.0  # max(5, 1.2)
    assert metrics["dual_clip_frac"].item() == 0.0


def test_surrogate_metrics_respect_mask_and_are_detached():
    ratio = t64([[1.5, 0.5, 5.0, 1.0]]).requires_grad_()
    adv = t64([[1.0, -1.0, -1.0, 1.0]])
    mask = torch.tensor([[True, True, False, True]])
    _, metrics = clipped_surrogate_from_ratio(ratio, adv, mask, eps_low=0.2, eps_high=0.2, dual_clip_c=3.0)
    assert metrics["clip_frac"].item() == pytest.approx(2 / 3)  # tokens 0, 1 of 3 valid
    assert metrics["dual_clip_frac"].item() == 0.0  # the dual-clipped token is masked
    assert metrics["ratio_max"].item() == 1.5  # masked 5.0 ignored
    assert all(not value.requires_grad for value in metrics.values())


def test_surrogate_empty_mask_metrics_are_finite():
    _, metrics = clipped_surrogate_from_ratio(
        t64([[1.5, 0.5]]), t64([1.0]), torch.zeros(1, 2, dtype=torch.bool), eps_low=0.2, eps_high=0.2, dual_clip_c=3.0
    )
    for name, value in metrics.items():
        assert math.isfinite(value.item()), name
    assert metrics["clip_frac"].item() == 0.0
    assert metrics["ratio_max"].item() == 1.0


def test_surrogate_per_token_bounds():
    # r = 1.4, A = 1: eps_high 0.2 -> -1.2 (clipped); eps_high 0.5 -> -1.4 (inside)
    # r = 0.7, A = -1: eps_low 0.2 -> 0.8 (clipped); eps_low 0.4 -> 0.7 (inside)
    ratio = t64([[1.4, 1.4, 0.7, 0.7]])
    adv = t64([[1.0, 1.0, -1.0, -1.0]])
    low = torch.tensor([[0.2, 0.2, 0.2, 0.4]])
    high = torch.tensor([[0.2, 0.5, 0.2, 0.2]])
    loss, _ = clipped_surrogate_from_ratio(ratio, adv, ones_mask(1, 4), eps_low=low, eps_high=high, dual_clip_c=None)
    torch.testing.assert_close(loss, t64([[-1.2, -1.4, 0.8, 0.7]]), atol=1e-6, rtol=0)


def test_surrogate_gradient_is_zero_when_clipped():
    old = torch.zeros(1, 5, dtype=F64)
    ratios = t64([[1.5, 0.5, 5.0, 1.1, 0.9]])
    log_prob = ratios.log().requires_grad_()
    adv = t64([[1.0, -1.0, -1.0, 1.0, -1.0]])
    loss, _ = clipped_surrogate(log_prob, old, adv, eps_low=0.2, eps_high=0.2, dual_clip_c=3.0)
    loss.sum().backward()
    # d(-A r)/d log_prob = -A r where unclipped; 0 where clipped (tokens 0, 1) or dual-clipped (token 2)
    torch.testing.assert_close(log_prob.grad, t64([[0.0, 0.0, 0.0, -1.1, 0.9]]), atol=1e-12, rtol=0)


def test_surrogate_from_log_probs_matches_ratio_form_and_approx_kl():
    torch.manual_seed(0)
    old = torch.randn(3, 4, dtype=F64)
    log_prob = old + 0.3 * torch.randn(3, 4, dtype=F64)
    adv = torch.randn(3, dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]).bool()
    loss, metrics = clipped_surrogate(log_prob, old, adv, eps_low=0.2, eps_high=0.28, dual_clip_c=3.0, mask=mask)
    ref, _ = clipped_surrogate_from_ratio(
        torch.exp(log_prob - old), adv, mask, eps_low=0.2, eps_high=0.28, dual_clip_c=3.0
    )
    torch.testing.assert_close(loss, ref)
    expected_kl = ((old - log_prob) * mask).sum() / mask.sum()
    assert metrics["approx_kl"].item() == pytest.approx(expected_kl.item())
    # [B] advantages broadcast like [B, L]
    loss_bl, _ = clipped_surrogate(
        log_prob, old, adv[:, None].expand(3, 4), eps_low=0.2, eps_high=0.28, dual_clip_c=3.0, mask=mask
    )
    assert torch.equal(loss, loss_bl)


def test_log_ratio_clamp_keeps_loss_and_gradient_finite():
    old = torch.zeros(1, 4)
    log_prob = torch.tensor([[100.0, 100.0, -100.0, 0.0]], requires_grad=True)  # exp(100) overflows float32
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0]])
    loss, _ = clipped_surrogate(log_prob, old, adv, eps_low=0.2, eps_high=0.2, dual_clip_c=None)
    # token 0: A>0, ratio exp(20) -> clipped high -> -1.2; token 1: A<0, no dual clip -> exp(20) (finite);
    # token 2: ratio exp(-20), A<0 -> clipped low -> 0.8; token 3: -1
    torch.testing.assert_close(loss, torch.tensor([[-1.2, math.exp(20.0), 0.8, -1.0]]))
    loss.sum().backward()
    assert bool(torch.isfinite(log_prob.grad).all())
    # outside the clamp the log-ratio has no gradient; inside it is -A r = -1
    torch.testing.assert_close(log_prob.grad, torch.tensor([[0.0, 0.0, 0.0, -1.0]]))


def test_surrogate_rejects_bad_inputs():
    ratio = t64([[1.0, 1.0]])
    with pytest.raises(ValueError, match="dual_clip_c"):
        clipped_surrogate_from_ratio(ratio, t64([1.0]), ones_mask(1, 2), eps_low=0.2, eps_high=0.2, dual_clip_c=1.0)
    with pytest.raises(ValueError, match="advantages"):
        clipped_surrogate_from_ratio(
            ratio, t64([float("nan")]), ones_mask(1, 2), eps_low=0.2, eps_high=0.2, dual_clip_c=None
        )
    with pytest.raises(ValueError, match="old_log_prob"):
        clipped_surrogate(
            t64([[0.0, 0.0]]), t64([[0.0, float("nan")]]), t64([1.0]), eps_low=0.2, eps_high=0.2, dual_clip_c=None
        )
    with pytest.raises(ValueError):
        clipped_surrogate(t64([[0.0]]), t64([[0.0]]), t64([1.0]), eps_low=1.5, eps_high=0.2, dual_clip_c=None)
    with pytest.raises(ValueError):
        clipped_surrogate_from_ratio(ratio, t64([1.0]), ones_mask(1, 3), eps_low=0.2, eps_high=0.2, dual_clip_c=None)


@given(
    log_ratio=st.lists(st.floats(-3, 3, allow_nan=False), min_size=1, max_size=16),
    adv=st.floats(-3, 3, allow_nan=False),
    eps_low=st.floats(0.05, 0.5),
    eps_high=st.floats(0.05, 0.5),
    c=st.one_of(st.none(), st.floats(1.5, 10.0)),
)
@SETTINGS
def test_surrogate_matches_loop_reference(log_ratio, adv, eps_low, eps_high, c):
    ratio = torch.tensor([log_ratio], dtype=torch.float32).exp()
    loss, _ = clipped_surrogate_from_ratio(
        ratio, torch.tensor([adv]), ones_mask(1, len(log_ratio)), eps_low=eps_low, eps_high=eps_high, dual_clip_c=c
    )
    for got, r in zip(loss[0].tolist(), ratio[0].tolist(), strict=True):
        clipped_r = min(max(r, 1 - eps_low), 1 + eps_high)
        expected = max(-adv * r, -adv * clipped_r)
        if c is not None and adv < 0:
            expected = min(expected, -adv * c)
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_surrogate_float64_bounds_are_exact():
    # r = 0.8 + 5e-9 lies inside [0.8, 1.2]: A = -1 -> loss = max(r, clip(r)) = r, gradient d loss / d r = 1.
    ratio = t64([[0.8 + 5e-9]]).requires_grad_()
    loss, metrics = clipped_surrogate_from_ratio(
        ratio, t64([-1.0]), ones_mask(1, 1), eps_low=0.2, eps_high=0.2, dual_clip_c=None
    )
    loss.sum().backward()
    assert loss.item() == ratio.item()
    assert ratio.grad.item() == 1.0
    assert metrics["clip_frac"].item() == 0.0


# ---------------------------------------------------------------------------------------------------------------
# importance_ratio
# ---------------------------------------------------------------------------------------------------------------
def test_importance_ratio_levels_hand_values():
    old = torch.zeros(2, 3, dtype=F64)
    # row 0: token ratios (2, 0.5, 100) with the last token masked; row 1: (4, 1, 1) all valid
    log_prob = t64([[math.log(2.0), math.log(0.5), math.log(100.0)], [math.log(4.0), 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]]).bool()
    token = importance_ratio(log_prob, old, mask, level="token")
    torch.testing.assert_close(token, t64([[2.0, 0.5, 100.0], [4.0, 1.0, 1.0]]))
    seq_mean = importance_ratio(log_prob, old, mask, level="sequence_mean")
    # row 0: (2 + 0.5) / 2 = 1.25 (masked 100 ignored), broadcast; row 1: (4 + 1 + 1) / 3 = 2
    torch.testing.assert_close(seq_mean, t64([[1.25] * 3, [2.0] * 3]))
    seq_geo = importance_ratio(log_prob, old, mask, level="sequence_geometric")
    # row 0: exp((ln 2 + ln 0.5) / 2) = 1; row 1: exp(ln 4 / 3) = 4^(1/3) = 1.587401
    torch.testing.assert_close(seq_geo, t64([[1.0] * 3, [4.0 ** (1 / 3)] * 3]))


def test_importance_ratio_sequence_mean_gradient():
    old = torch.zeros(1, 3, dtype=F64)
    log_prob = t64([[math.log(2.0), math.log(0.5), 1.0]]).requires_grad_()
    mask = torch.tensor([[1, 1, 0]]).bool()
    ratio = importance_ratio(log_prob, old, mask, level="sequence_mean")
    ratio[0, 0].backward()
    # d/dlp_t of mean_t exp(lp_t) = exp(lp_t) / |o| for valid t, 0 for masked: (2/2, 0.5/2, 0)
    torch.testing.assert_close(log_prob.grad, t64([[1.0, 0.25, 0.0]]))


def test_importance_ratio_clamp_and_empty_rows():
    old = torch.zeros(2, 2)
    log_prob = torch.tensor([[50.0, -50.0], [0.3, 0.3]])
    token = importance_ratio(log_prob, old, ones_mask(2, 2))
    torch.testing.assert_close(token[0], torch.tensor([math.exp(20.0), math.exp(-20.0)]))
    empty = torch.tensor([[1, 1], [0, 0]]).bool()
    for level in ("sequence_mean", "sequence_geometric"):
        assert bool(torch.isfinite(importance_ratio(log_prob, old, empty, level=level)).all())


def test_importance_ratio_rejects_bad_inputs():
    with pytest.raises(ValueError, match="level"):
        importance_ratio(torch.zeros(1, 2), torch.zeros(1, 2), ones_mask(1, 2), level="sequence_median")
    with pytest.raises(ValueError):
        importance_ratio(torch.zeros(1, 2), torch.zeros(1, 3), ones_mask(1, 2))
