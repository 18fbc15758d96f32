"""Tests of megatron_hapo.algos.entropy: token entropy and HAPO's entropy normaliser (spec 2.1, ambiguity H1)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import SETTINGS
from hypothesis import given
from hypothesis import strategies as st

from megatron_hapo.algos import (
    ENTROPY_SIGNS,
    EntropyStats,
    apply_entropy_stats,
    entropy_from_logits,
    nearest_rank_index,
    nearest_rank_quantile,
    normalized_entropy,
)


# ---------------------------------------------------------------------------------------------------------------
# Loop-based reference of spec 2.1 (written from the formulas, float64, one token at a time).
# ---------------------------------------------------------------------------------------------------------------
def reference_normalized_entropy(entropy: torch.Tensor, mask: torch.Tensor, quantile: float, sign: str):
    """Returns (h_hat as nested lists over all positions, (pivot, rms, scale_pos, scale_neg))."""
    # The log is taken in float32 like the implementation, so that the pivot is the same element and every
    # sign of (l - pivot) agrees; everything after is float64 arithmetic on Python floats.
    log_h = torch.log(entropy.float().clamp_min(1e-8)).double().tolist()
    valid = mask.bool().tolist()
    rows, cols = len(log_h), len(log_h[0])
    valid_logs = sorted(log_h[i][j] for i in range(rows) for j in range(cols) if valid[i][j])
    pivot = valid_logs[round(quantile * (len(valid_logs) - 1))]
    dev = [[log_h[i][j] - pivot for j in range(cols)] for i in range(rows)]
    sq = [dev[i][j] ** 2 for i in range(rows) for j in range(cols) if valid[i][j]]
    rms = math.sqrt(max(sum(sq) / len(sq), 1e-8))
    h = [[dev[i][j] / rms for j in range(cols)] for i in range(rows)]
    pos = [h[i][j] for i in range(rows) for j in range(cols) if valid[i][j] and h[i][j] > 0]
    neg = [h[i][j] for i in range(rows) for j in range(cols) if valid[i][j] and h[i][j] < 0]
    pos_max = max(max(pos, default=0.0), 1e-8)
    neg_min = min(min(neg, default=0.0), -1e-8)
    scale_pos = 1.0 / pos_max
    scale_neg = 1.0 / neg_min if sign == "published" else 1.0 / abs(neg_min)
    h_hat = [[h[i][j] * (scale_pos if h[i][j] > 0 else scale_neg) for j in range(cols)] for i in range(rows)]
    return h_hat, (pivot, rms, scale_pos, scale_neg)


# ---------------------------------------------------------------------------------------------------------------
# nearest_rank_index / nearest_rank_quantile
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("num_values", "quantile", "expected"),
    [
        (1, 0.8, 0),  # 0.8 * 0 = 0
        (5, 0.5, 2),  # 0.5 * 4 = 2.0
        (5, 0.8, 3),  # 0.8 * 4 = 3.2 -> 3
        (6, 0.8, 4),  # 0.8 * 5 = 4.0
        (10, 0.8, 7),  # 0.8 * 9 = 7.2 -> 7
        (11, 0.85, 8),  # 0.85 * 10 = 8.5 -> 8 (half to even), not 9
        (2, 0.5, 0),  # 0.5 * 1 = 0.5 -> 0 (half to even), not 1
        (4, 0.5, 2),  # 0.5 * 3 = 1.5 -> 2 (half to even)
        (6, 0.5, 2),  # 0.5 * 5 = 2.5 -> 2 (half to even), not 3
        (8, 0.5, 4),  # 0.5 * 7 = 3.5 -> 4 (half to even)
        (7, 0.0, 0),
        (7, 1.0, 6),
    ],
)
def test_nearest_rank_index_uses_python_round_half_even(num_values, quantile, expected):
    assert nearest_rank_index(num_values, quantile) == expected


def test_nearest_rank_index_needs_values():
    with pytest.raises(ValueError):
        nearest_rank_index(0, 0.5)


def test_nearest_rank_quantile_hand_values():
    values = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0, 0.0])  # sorted: 0 1 2 3 4 5
    assert nearest_rank_quantile(values, 0.0).item() == 0.0
    assert nearest_rank_quantile(values, 0.5).item() == 2.0  # rank round(2.5) = 2 (half to even)
    assert nearest_rank_quantile(values, 0.8).item() == 4.0  # rank round(4.0) = 4
    assert nearest_rank_quantile(values, 1.0).item() == 5.0  # rank 5, the maximum
    assert nearest_rank_quantile(values[:5], 0.5).item() == 3.0  # (5 1 4 2 3) sorted 1 2 3 4 5, rank 2


@given(
    values=st.lists(st.floats(-100, 100, allow_nan=False, width=32), min_size=1, max_size=30),
    quantile=st.floats(0.0, 1.0),
)
@SETTINGS
def test_nearest_rank_quantile_is_the_sorted_element(values, quantile):
    tensor = torch.tensor(values, dtype=torch.float32)
    expected = sorted(values)[round(quantile * (len(values) - 1))]
    got = nearest_rank_quantile(tensor, quantile)
    assert got.item() == expected
    assert got.item() in values  # an element, never an interpolation


# ---------------------------------------------------------------------------------------------------------------
# normalized_entropy
# ---------------------------------------------------------------------------------------------------------------
def _hand_batch():
    """Valid log-entropies -2, -1, 0, 1, 3 and one padding token with log-entropy 5."""
    log_h = torch.tensor([[-2.0, -1.0, 0.0], [1.0, 3.0, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return log_h.exp(), mask


def test_normalized_entropy_hand_values_published_sign():
    entropy, mask = _hand_batch()
    h_hat, stats = normalized_entropy(entropy, mask, pivot_quantile=0.8, sign="published")
    # N = 5 valid, rank round(0.8 * 4) = round(3.2) = 3 -> sorted (-2, -1, 0, 1, 3)[3] = 1 = pivot.
    # h = l - 1 = (-3, -2, -1, 0, 2); rms = sqrt((9 + 4 + 1 + 0 + 4) / 5) = sqrt(3.6).
    # pos_max = 2 / sqrt(3.6), neg_min = -3 / sqrt(3.6); published: h_hat = |h| / max|h| per side.
    # valid h_hat = (3/3, 2/3, 1/3, 0, 2/2); padding: l = 5 -> h = 4 -> 4/2 = 2 (> 1, masked later).
    expected = torch.tensor([[1.0, 2.0 / 3.0, 1.0 / 3.0], [0.0, 1.0, 2.0]])
    assert h_hat.dtype == torch.float32
    torch.testing.assert_close(h_hat, expected, atol=1e-5, rtol=1e-5)
    floats = stats.as_floats()
    assert floats["pivot"] == pytest.approx(1.0, abs=1e-6)
    assert floats["rms"] == pytest.approx(math.sqrt(3.6), rel=1e-6)
    assert floats["scale_pos"] == pytest.approx(math.sqrt(3.6) / 2.0, rel=1e-6)
    assert floats["scale_neg"] == pytest.approx(-math.sqrt(3.6) / 3.0, rel=1e-6)  # negative: published sign


def test_normalized_entropy_hand_values_paper_sign():
    entropy, mask = _hand_batch()
    h_hat, stats = normalized_entropy(entropy, mask, pivot_quantile=0.8, sign="paper")
    # Same h as above; paper: scale_neg = 1 / |neg_min| > 0 so below-pivot tokens are negative.
    expected = torch.tensor([[-1.0, -2.0 / 3.0, -1.0 / 3.0], [0.0, 1.0, 2.0]])
    torch.testing.assert_close(h_hat, expected, atol=1e-5, rtol=1e-5)
    assert stats.as_floats()["scale_neg"] == pytest.approx(math.sqrt(3.6) / 3.0, rel=1e-6)


def test_normalized_entropy_ignores_padding_values():
    entropy, mask = _hand_batch()
    h_a, stats_a = normalized_entropy(entropy, mask)
    entropy_b = entropy.clone()
    entropy_b[1, 2] = 1e-30  # a different padding value (far below every valid token)
    h_b, stats_b = normalized_entropy(entropy_b, mask)
    valid = mask.bool()
    torch.testing.assert_close(h_a[valid], h_b[valid], atol=0, rtol=0)
    assert stats_a.as_floats() == stats_b.as_floats()


def test_normalized_entropy_default_quantile_is_0_8():
    entropy, mask = _hand_batch()
    default, _ = normalized_entropy(entropy, mask)
    explicit, _ = normalized_entropy(entropy, mask, pivot_quantile=0.8)
    median, _ = normalized_entropy(entropy, mask, pivot_quantile=0.5)
    torch.testing.assert_close(default, explicit, atol=0, rtol=0)
    assert not torch.allclose(default, median)


def test_normalized_entropy_quantile_zero_has_no_negative_side():
    entropy, mask = _hand_batch()
    for sign in ENTROPY_SIGNS:
        h_hat, _ = normalized_entropy(entropy, mask, pivot_quantile=0.0, sign=sign)
        valid = h_hat[mask.bool()]
        # pivot = -2 (the minimum): h = (0, 1, 2, 3, 5) / rms, h_hat = h / max h.
        torch.testing.assert_close(valid, torch.tensor([0.0, 0.2, 0.4, 0.6, 1.0]), atol=1e-5, rtol=1e-5)


@given(
    entropy=st.lists(
        st.lists(st.floats(0.0, 12.0, allow_nan=False, width=32), min_size=4, max_size=4), min_size=1, max_size=5
    ),
    mask_bits=st.lists(st.lists(st.booleans(), min_size=4, max_size=4), min_size=5, max_size=5),
    quantile=st.sampled_from([0.0, 0.2, 0.5, 0.8, 1.0]),
    sign=st.sampled_from(ENTROPY_SIGNS),
)
@SETTINGS
def test_normalized_entropy_matches_loop_reference(entropy, mask_bits, quantile, sign):
    ent = torch.tensor(entropy, dtype=torch.float32)
    mask = torch.tensor(mask_bits[: len(entropy)])
    mask[0, 0] = True  # at least one valid token
    h_hat, stats = normalized_entropy(ent, mask, pivot_quantile=quantile, sign=sign)
    expected, (pivot, rms, scale_pos, scale_neg) = reference_normalized_entropy(ent, mask, quantile, sign)
    valid = mask.bool()
    torch.testing.assert_close(
        h_hat.double()[valid], torch.tensor(expected, dtype=torch.float64)[valid], atol=1e-4, rtol=1e-4
    )
    got = stats.as_floats()
    assert got["pivot"] == pytest.approx(pivot, abs=1e-6)
    assert got["rms"] == pytest.approx(rms, rel=1e-4)
    assert got["scale_pos"] == pytest.approx(scale_pos, rel=1e-4)
    assert got["scale_neg"] == pytest.approx(scale_neg, rel=1e-4)
    h_valid = h_hat[valid]
    if sign == "published":
        # Code behaviour (spec 2.1): h_hat in [0, 1] for every valid token.
        assert bool((h_valid >= 0).all()) and bool((h_valid <= 1 + 1e-5).all())
    else:
        assert bool((h_valid >= -1 - 1e-5).all()) and bool((h_valid <= 1 + 1e-5).all())
        log_h = torch.log(ent.clamp_min(1e-8))[valid]
        below = log_h < stats.pivot
        assert bool((h_valid[below] < 0).all())  # paper: below the pivot means negative


def test_normalized_entropy_zero_entropy_is_finite_and_zero():
    entropy = torch.zeros(2, 3)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    for sign in ENTROPY_SIGNS:
        h_hat, stats = normalized_entropy(entropy, mask, sign=sign)
        # every valid l = ln(1e-8) is the pivot: h = 0, rms = sqrt(1e-8) = 1e-4 (floored), h_hat = 0.
        assert torch.equal(h_hat, torch.zeros(2, 3))
        assert stats.as_floats()["rms"] == pytest.approx(1e-4, rel=1e-4)
        assert stats.as_floats()["pivot"] == pytest.approx(math.log(1e-8), rel=1e-6)


def test_normalized_entropy_single_token():
    entropy = torch.tensor([[0.7, 3.0]])
    mask = torch.tensor([[1, 0]])
    h_hat, stats = normalized_entropy(entropy, mask)
    assert h_hat[0, 0].item() == 0.0  # the only token is its own pivot
    assert stats.as_floats()["pivot"] == pytest.approx(math.log(0.7), rel=1e-6)


def test_normalized_entropy_empty_mask_gives_zeros_and_neutral_stats():
    entropy = torch.rand(2, 3)
    h_hat, stats = normalized_entropy(entropy, torch.zeros(2, 3, dtype=torch.bool))
    assert torch.equal(h_hat, torch.zeros(2, 3))
    assert stats.as_floats() == EntropyStats.neutral().as_floats()


def test_normalized_entropy_rejects_bad_inputs():
    entropy, mask = _hand_batch()
    with pytest.raises(ValueError, match="NaN"):
        normalized_entropy(torch.tensor([[float("nan"), 1.0]]), torch.ones(1, 2))
    with pytest.raises(ValueError):
        normalized_entropy(torch.tensor([[float("inf"), 1.0]]), torch.ones(1, 2))
    with pytest.raises(ValueError):
        normalized_entropy(entropy, mask[:, :2])  # shape mismatch
    with pytest.raises(ValueError, match="sign"):
        normalized_entropy(entropy, mask, sign="backwards")
    with pytest.raises(ValueError):
        normalized_entropy(entropy, mask, pivot_quantile=1.5)


def test_normalized_entropy_nan_in_padding_is_still_rejected():
    # A NaN anywhere is a bug upstream; it must not be silently masked.
    entropy = torch.tensor([[1.0, float("nan")]])
    with pytest.raises(ValueError):
        normalized_entropy(entropy, torch.tensor([[1, 0]]))


# ---------------------------------------------------------------------------------------------------------------
# EntropyStats / apply_entropy_stats
# ---------------------------------------------------------------------------------------------------------------
def test_entropy_stats_round_trip():
    stats = EntropyStats.from_floats(1.0, 2.0, 0.5, -0.25)
    assert stats.as_floats() == {"pivot": 1.0, "rms": 2.0, "scale_pos": 0.5, "scale_neg": -0.25}
    assert stats.pivot.dtype == torch.float32 and stats.pivot.dim() == 0
    moved = stats.to("cpu")
    assert moved.as_floats() == stats.as_floats()


def test_apply_entropy_stats_hand_values():
    stats = EntropyStats.from_floats(pivot=1.0, rms=2.0, scale_pos=0.5, scale_neg=-0.25)
    log_entropy = torch.tensor([3.0, 1.0, -1.0, 9.0, -11.0])
    # h = (l - 1) / 2 = (1, 0, -1, 4, -6); h > 0 -> * 0.5, else * -0.25
    got = apply_entropy_stats(log_entropy, stats)
    torch.testing.assert_close(got, torch.tensor([0.5, 0.0, 0.25, 2.0, 1.5]))
    clamped = apply_entropy_stats(log_entropy, stats, clamp=True)
    torch.testing.assert_close(clamped, torch.tensor([0.5, 0.0, 0.25, 1.0, 1.0]))
    # rms_eps adds to the RMS: h = (l - 1) / 3 = (2/3, 0, -2/3, 8/3, -4)
    with_eps = apply_entropy_stats(log_entropy, stats, rms_eps=1.0)
    torch.testing.assert_close(with_eps, torch.tensor([1.0 / 3.0, 0.0, 1.0 / 6.0, 4.0 / 3.0, 1.0]))


def test_apply_entropy_stats_paper_sign_clamps_below_minus_one():
    stats = EntropyStats.from_floats(pivot=1.0, rms=2.0, scale_pos=0.5, scale_neg=0.25)
    log_entropy = torch.tensor([3.0, -1.0, -11.0])
    # h = (1, -1, -6) -> (0.5, -0.25, -1.5) -> clamp -> (0.5, -0.25, -1)
    torch.testing.assert_close(apply_entropy_stats(log_entropy, stats, clamp=True), torch.tensor([0.5, -0.25, -1.0]))


def test_apply_entropy_stats_neutral_maps_to_zero():
    log_entropy = torch.tensor([-5.0, 0.0, 7.0])
    assert torch.equal(apply_entropy_stats(log_entropy, EntropyStats.neutral()), torch.zeros(3))


@pytest.mark.parametrize("sign", ENTROPY_SIGNS)
def test_apply_entropy_stats_reproduces_normalized_entropy(sign):
    torch.manual_seed(0)
    entropy = torch.rand(3, 7) * 4
    mask = torch.rand(3, 7) > 0.3
    h_hat, stats = normalized_entropy(entropy, mask, sign=sign)
    again = apply_entropy_stats(torch.log(entropy.clamp_min(1e-8)), stats)
    torch.testing.assert_close(again, h_hat, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# entropy_from_logits
# ---------------------------------------------------------------------------------------------------------------
def test_entropy_from_logits_hand_values():
    ninf = float("-inf")
    logits = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0],  # uniform over 4: ln 4
            [3.0, ninf, ninf, 3.0],  # uniform over 2 (others banned): ln 2
            [0.0, ninf, ninf, ninf],  # one allowed token: 0
            [1000.0, 0.0, 0.0, 0.0],  # numerically one-hot: ~0, not NaN
        ]
    )
    got = entropy_from_logits(logits)
    assert got.dtype == torch.float32
    assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, torch.tensor([math.log(4.0), math.log(2.0), 0.0, 0.0]), atol=1e-6, rtol=1e-6)


def test_entropy_from_logits_matches_loop_reference_and_any_dtype():
    torch.manual_seed(1)
    logits = torch.randn(5, 11, dtype=torch.float64) * 3
    logits[2, :4] = float("-inf")
    expected = []
    for row in logits.tolist():
        finite = [v for v in row if v != float("-inf")]
        top = max(finite)
        z = sum(math.exp(v - top) for v in finite)
        probs = [math.exp(v - top) / z for v in finite]
        expected.append(-sum(p * math.log(p) for p in probs if p > 0))
    torch.testing.assert_close(
        entropy_from_logits(logits).double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=1e-5
    )
    bf16 = entropy_from_logits(logits.to(torch.bfloat16))
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16.double(), torch.tensor(expected, dtype=torch.float64), atol=0.1, rtol=0.05)


@given(seed=st.integers(0, 100_000), log_scale=st.floats(-3.0, 3.0), vocab=st.integers(2, 64))
@SETTINGS
def test_entropy_from_logits_in_zero_to_log_vocab(seed, log_scale, vocab):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(16, vocab, generator=gen, dtype=torch.float64) * 10.0**log_scale
    got = entropy_from_logits(logits)
    assert bool((got >= -1e-6).all()) and bool((got <= math.log(vocab) + 1e-5).all())
    log_p = torch.log_softmax(logits, dim=-1)
    expected = -(log_p.exp() * log_p).sum(-1)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
