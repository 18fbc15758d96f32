"""Tests of megatron_hapo.algos.sampling.adaptive_temperature (spec 2.2)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import SETTINGS
from hypothesis import given
from hypothesis import strategies as st

from megatron_hapo.algos import EntropyStats, adaptive_temperature, normalized_entropy

NINF = float("-inf")

# Three decode rows with known entropies: uniform over 4 (H = ln 4), uniform over 2 (H = ln 2), one allowed
# token (H = 0, floored to 1e-6 by the sampler).
LOGITS = torch.tensor(
    [
        [0.0, 0.0, 0.0, 0.0],
        [2.0, 2.0, NINF, NINF],
        [5.0, NINF, NINF, NINF],
    ]
)
LN2 = math.log(2.0)
# Pivot at log(ln 2) puts row 1 exactly on the pivot; row 0 has l = ln(2 ln 2) = ln 2 + ln ln 2, so h = ln 2 / rms.
PIVOT = math.log(LN2)


def _stats(scale_neg: float) -> EntropyStats:
    # rms + 1e-6 (sampler epsilon) = 1 up to 1e-6; scale_pos = 0.5 / ln 2 -> row 0 gets h_hat = 0.5.
    return EntropyStats.from_floats(pivot=PIVOT, rms=1.0, scale_pos=0.5 / LN2, scale_neg=scale_neg)


def reference_temperature(logits: torch.Tensor, base: float, stats: EntropyStats, tau: float) -> list[float]:
    """Loop reference of spec 2.2 in float64."""
    pivot, rms, scale_pos, scale_neg = (stats.as_floats()[k] for k in ("pivot", "rms", "scale_pos", "scale_neg"))
    out = []
    for row in logits.double().tolist():
        finite = [v for v in row if v != NINF]
        top = max(finite)
        z = sum(math.exp(v - top) for v in finite)
        entropy = -sum((math.exp(v - top) / z) * (v - top - math.log(z)) for v in finite)
        h = (math.log(max(entropy, 1e-6)) - pivot) / (rms + 1e-6)
        h_hat = h * scale_pos if h > 0 else h * scale_neg
        h_hat = min(1.0, max(-1.0, h_hat))
        out.append(base * (1.0 + tau * h_hat))
    return out


def test_no_stats_gives_plain_temperature():
    out = adaptive_temperature(LOGITS, 0.7, None, tau=0.05)
    assert out.dtype == torch.float32
    assert out.shape == (3,)
    torch.testing.assert_close(out, torch.full((3,), 0.7))


def test_no_stats_per_row_temperature_is_returned_unchanged():
    base = torch.tensor([0.0, 1.0, 0.5])
    out = adaptive_temperature(LOGITS, base, None, tau=0.05)
    torch.testing.assert_close(out, base)
    out[1] = 9.0  # a copy, not a view of the caller's tensor
    assert base[1].item() == 1.0


def test_hand_values_published_sign_only_heats():
    out = adaptive_temperature(LOGITS, 1.0, _stats(scale_neg=-0.5), tau=0.05)
    # row 0: h = ln 2 / (1 + 1e-6), h_hat = 0.5 -> T = 1 + 0.05 * 0.5 = 1.025
    # row 1: on the pivot, h = 0 -> T = 1.0
    # row 2: l = ln(1e-6) = -13.8155, h = -13.8155 - ln ln 2 = -13.449; published scale_neg < 0 -> h_hat = 6.72
    #        -> clamp 1 -> T = 1.05 (a near-deterministic row is HEATED under the published sign)
    torch.testing.assert_close(out, torch.tensor([1.025, 1.0, 1.05]), atol=1e-6, rtol=1e-6)


def test_hand_values_paper_sign_can_cool():
    out = adaptive_temperature(LOGITS, 1.0, _stats(scale_neg=0.5), tau=0.05)
    # row 2: h_hat = -6.72 -> clamp -1 -> T = 1 - 0.05 = 0.95
    torch.testing.assert_close(out, torch.tensor([1.025, 1.0, 0.95]), atol=1e-6, rtol=1e-6)
    assert out[2].item() < 1.0


def test_per_row_base_temperature_and_greedy_rows():
    base = torch.tensor([0.5, 2.0, 0.0])
    out = adaptive_temperature(LOGITS, base, _stats(scale_neg=0.5), tau=0.1)
    # row 0: 0.5 * (1 + 0.1 * 0.5) = 0.525; row 1: 2.0 * 1 = 2.0; row 2: T = 0 stays 0 (greedy)
    torch.testing.assert_close(out, torch.tensor([0.525, 2.0, 0.0]), atol=1e-6, rtol=1e-6)
    assert out[2].item() == 0.0


def test_tau_zero_is_plain_temperature():
    out = adaptive_temperature(LOGITS, 0.8, _stats(scale_neg=0.5), tau=0.0)
    torch.testing.assert_close(out, torch.full((3,), 0.8))


def test_logits_dtype_does_not_matter():
    stats = _stats(scale_neg=0.5)
    out32 = adaptive_temperature(LOGITS, 1.0, stats, tau=0.05)
    out16 = adaptive_temperature(LOGITS.to(torch.bfloat16), 1.0, stats, tau=0.05)
    assert out16.dtype == torch.float32
    torch.testing.assert_close(out16, out32, atol=1e-3, rtol=1e-3)


@given(
    seed=st.integers(0, 2**31 - 1),
    base=st.floats(0.1, 2.0),
    tau=st.floats(0.0, 0.5),
    scale=st.floats(0.1, 10.0),
)
@SETTINGS
def test_published_sign_keeps_temperature_in_t_to_t_1_plus_tau(seed, base, tau, scale):
    gen = torch.Generator().manual_seed(seed)
    # stats from one batch, applied to other logits (as the rollout does with the previous step's stats)
    entropy = torch.rand(4, 6, generator=gen) * 3
    _, stats = normalized_entropy(entropy, torch.ones(4, 6, dtype=torch.bool), sign="published")
    logits = torch.randn(8, 16, generator=gen) * scale
    out = adaptive_temperature(logits, base, stats, tau=tau)
    assert bool((out >= base * (1 - 1e-6)).all())
    assert bool((out <= base * (1 + tau) * (1 + 1e-6)).all())
    torch.testing.assert_close(
        out.double(),
        torch.tensor(reference_temperature(logits, base, stats, tau), dtype=torch.float64),
        atol=1e-5,
        rtol=1e-5,
    )


@given(seed=st.integers(0, 2**31 - 1), tau=st.floats(0.01, 0.5))
@SETTINGS
def test_paper_sign_range_and_reference(seed, tau):
    gen = torch.Generator().manual_seed(seed)
    entropy = torch.rand(4, 6, generator=gen) * 3 + 0.01
    _, stats = normalized_entropy(entropy, torch.ones(4, 6, dtype=torch.bool), sign="paper")
    logits = torch.randn(8, 16, generator=gen) * 4
    logits[0, 1:] = NINF  # a deterministic row: far below the pivot -> coolest temperature
    out = adaptive_temperature(logits, 1.0, stats, tau=tau)
    assert bool((out >= 1 - tau - 1e-6).all()) and bool((out <= 1 + tau + 1e-6).all())
    assert out[0].item() == pytest.approx(1 - tau, rel=1e-6)
    torch.testing.assert_close(
        out.double(),
        torch.tensor(reference_temperature(logits, 1.0, stats, tau), dtype=torch.float64),
        atol=1e-5,
        rtol=1e-5,
    )


def test_rejects_bad_inputs():
    stats = _stats(scale_neg=0.5)
    with pytest.raises(ValueError):
        adaptive_temperature(LOGITS[0], 1.0, stats, tau=0.05)  # not [N, V]
    with pytest.raises(ValueError):
        adaptive_temperature(LOGITS, 1.0, stats, tau=1.5)
    with pytest.raises(ValueError):
        adaptive_temperature(LOGITS, 1.0, stats, tau=-0.1)
    bad = LOGITS.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        adaptive_temperature(bad, 1.0, stats, tau=0.05)
    banned = LOGITS.clone()
    banned[0] = NINF  # every token banned: no entropy, no temperature -> a clear error, not a NaN temperature
    with pytest.raises(ValueError):
        adaptive_temperature(banned, 1.0, stats, tau=0.05)
