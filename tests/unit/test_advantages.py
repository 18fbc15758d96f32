"""Tests of megatron_hapo.algos.advantages: GRPO (spec 1.1) and HAPO's token-level group average (spec 2.3, H5)."""

from __future__ import annotations

import math
import uuid

import pytest
import torch
from helpers import F64, SETTINGS, t64
from hypothesis import assume, given
from hypothesis import strategies as st

from megatron_hapo.algos import grpo_advantages, hapo_advantages

EPS = 1e-6


# ---------------------------------------------------------------------------------------------------------------
# Loop-based references written from the spec's formulas.
# ---------------------------------------------------------------------------------------------------------------
def reference_grpo(rewards: list[float], groups: list, std_norm: bool = True, eps: float = EPS) -> list[float]:
    out = []
    for i, r in enumerate(rewards):
        members = [rewards[k] for k in range(len(rewards)) if groups[k] == groups[i]]
        if len(members) == 1:
            mean, std = 0.0, 1.0
        else:
            mean = sum(members) / len(members)
            std = math.sqrt(sum((x - mean) ** 2 for x in members) / (len(members) - 1))  # Bessel
        out.append((r - mean) / (std + eps) if std_norm else r - mean)
    return out


def reference_hapo_published(
    rewards: list[float], lengths: list[int], groups: list, padded_length: int, std_norm: bool = True
) -> list[float]:
    """Spec 2.3 as published: the [G, L] tensor holds R_i on valid tokens and 0 on padding; the fallback test
    runs over all of its entries."""
    out = [0.0] * len(rewards)
    grpo = reference_grpo(rewards, groups, std_norm)
    for g in dict.fromkeys(groups):
        members = [i for i in range(len(rewards)) if groups[i] == g]
        tokens = [rewards[i] for i in members for _ in range(lengths[i])]
        if not tokens:  # no valid token: documented departure, use GRPO
            for i in members:
                out[i] = grpo[i]
            continue
        mu = sum(tokens) / len(tokens)
        sigma = math.sqrt(sum((x - mu) ** 2 for x in tokens) / len(tokens))  # population
        scale = sigma + EPS if std_norm else 1.0
        entries = []
        for i in members:
            row = [rewards[i] if t < lengths[i] else 0.0 for t in range(padded_length)]
            entries += [(v - mu) / scale for v in row]
        fallback = any(abs(v) >= 5.0 for v in entries)
        for i in members:
            out[i] = grpo[i] if fallback else (rewards[i] - mu) / scale
    return out


# ---------------------------------------------------------------------------------------------------------------
# GRPO
# ---------------------------------------------------------------------------------------------------------------
def test_grpo_hand_values_bessel_std():
    # group 0 = (1, 2, 3): mean 2, Bessel var (1 + 0 + 1) / 2 = 1 -> A = (-1, 0, 1) / (1 + 1e-6)
    #   (population std sqrt(2/3) would give +-1.2247 instead)
    # group 1 = (1, -1, -1, -1): mean -0.5, var (2.25 + 3 * 0.25) / 3 = 1 -> A = (1.5, -0.5, -0.5, -0.5) / (1 + 1e-6)
    rewards = t64([1.0, 1.0, 2.0, -1.0, 3.0, -1.0, -1.0])
    groups = [0, 1, 0, 1, 0, 1, 1]
    got = grpo_advantages(rewards, groups)
    expected = t64([-1.0, 1.5, 0.0, -0.5, 1.0, -0.5, -0.5]) / (1.0 + EPS)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    assert got.dtype == F64


def test_grpo_two_response_group():
    # (1, -1): mean 0, Bessel std sqrt(2) -> +-1 / (sqrt(2) + 1e-6) = +-0.70711
    got = grpo_advantages(t64([1.0, -1.0]), [7, 7])
    torch.testing.assert_close(got, t64([1.0, -1.0]) / (math.sqrt(2.0) + EPS))


def test_grpo_singleton_group_is_r_over_1_plus_eps():
    got = grpo_advantages(t64([3.0, 1.0, 2.0]), ["solo", "pair", "pair"])
    # singleton: mean 0, std 1 -> 3 / (1 + 1e-6); pair (1, 2): mean 1.5, std sqrt(0.5) -> -+0.5 / 0.70711
    expected = t64([3.0 / (1.0 + EPS), -0.5 / (math.sqrt(0.5) + EPS), 0.5 / (math.sqrt(0.5) + EPS)])
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


def test_grpo_std_norm_false():
    # Dr.GRPO: only centring. (1, 2, 3) -> (-1, 0, 1); singleton (mean 0) -> R itself.
    got = grpo_advantages(t64([1.0, 2.0, 3.0, 4.0]), [0, 0, 0, 1], std_norm=False)
    assert torch.equal(got, t64([-1.0, 0.0, 1.0, 4.0]))


def test_grpo_all_equal_group_is_zero():
    got = grpo_advantages(t64([1.0, 1.0, 1.0, 0.0, 1.0]), [0, 0, 0, 1, 1])
    assert torch.equal(got[:3], torch.zeros(3, dtype=F64))
    assert got[3].item() < 0 < got[4].item()


def test_grpo_string_and_uuid_group_ids_match_integer_ids():
    rewards = t64([1.0, -1.0, 0.5, 2.0, -3.0])
    ints = grpo_advantages(rewards, torch.tensor([4, 9, 4, 9, 9]))
    strings = grpo_advantages(rewards, ["b", "a", "b", "a", "a"])
    ids = [uuid.uuid4(), uuid.uuid4()]
    uuids = grpo_advantages(rewards, [ids[0], ids[1], ids[0], ids[1], ids[1]])
    assert torch.equal(ints, strings) and torch.equal(ints, uuids)


def test_grpo_dtypes():
    assert grpo_advantages(torch.tensor([1.0, 0.0]), [0, 0]).dtype == torch.float32
    assert grpo_advantages(torch.tensor([1, 0]), [0, 0]).dtype == torch.float32  # integer rewards -> float


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_grpo_non_finite_rewards_raise(bad):
    with pytest.raises(ValueError, match="non-finite"):
        grpo_advantages(t64([1.0, bad]), [0, 0])


def test_grpo_rejects_2d_rewards():
    with pytest.raises(ValueError):
        grpo_advantages(torch.zeros(2, 3), [0, 1])


@given(
    rewards=st.lists(st.sampled_from([-1.0, 0.0, 0.5, 1.0, 2.5]), min_size=1, max_size=12),
    data=st.data(),
    std_norm=st.booleans(),
)
@SETTINGS
def test_grpo_matches_loop_reference(rewards, data, std_norm):
    groups = data.draw(st.lists(st.integers(0, 3), min_size=len(rewards), max_size=len(rewards)))
    got = grpo_advantages(t64(rewards), groups, std_norm=std_norm)
    torch.testing.assert_close(got, t64(reference_grpo(rewards, groups, std_norm)), atol=1e-9, rtol=1e-9)


@given(rewards=st.lists(st.floats(-5, 5, allow_nan=False), min_size=2, max_size=8), seed=st.integers(0, 1000))
@SETTINGS
def test_grpo_permutation_within_group_permutes_advantages(rewards, seed):
    perm = torch.randperm(len(rewards), generator=torch.Generator().manual_seed(seed))
    groups = [0] * len(rewards)
    base = grpo_advantages(t64(rewards), groups)
    permuted = grpo_advantages(t64(rewards)[perm], groups)
    torch.testing.assert_close(permuted, base[perm], atol=1e-9, rtol=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# HAPO token-level group average
# ---------------------------------------------------------------------------------------------------------------
def test_hapo_hand_values_token_weighted():
    # lengths (1, 3), rewards (1, -1): mu = (1 - 3) / 4 = -0.5; sigma^2 = (1 * 1.5^2 + 3 * 0.5^2) / 4 = 0.75
    # A = (1.5, -0.5) / (sqrt(0.75) + 1e-6) = (1.73205, -0.57735); padding value |mu| / sigma = 0.577 < 5.
    rewards, lengths = t64([1.0, -1.0]), torch.tensor([1, 3])
    expected = t64([1.5, -0.5]) / (math.sqrt(0.75) + EPS)
    for padded_length in (None, 3, 8):
        got = hapo_advantages(rewards, lengths, [0, 0], padded_length=padded_length)
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    # GRPO would give +-0.7071: the token weighting matters.
    assert not torch.allclose(expected, grpo_advantages(rewards, [0, 0]))


def test_hapo_equal_lengths_use_population_std():
    # lengths (2, 2, 2), rewards (1, 2, 3): mu = 2, population sigma = sqrt(2/3) -> A = (-1, 0, 1) / 0.816498
    got = hapo_advantages(t64([1.0, 2.0, 3.0]), torch.tensor([2, 2, 2]), [0, 0, 0])
    torch.testing.assert_close(got, t64([-1.0, 0.0, 1.0]) / (math.sqrt(2.0 / 3.0) + EPS), atol=1e-12, rtol=0)


def test_hapo_std_norm_false():
    # lengths (1, 3), rewards (1, -1): mu = -0.5 -> A = (1.5, -0.5)
    got = hapo_advantages(t64([1.0, -1.0]), torch.tensor([1, 3]), [0, 0], std_norm=False)
    torch.testing.assert_close(got, t64([1.5, -0.5]), atol=1e-15, rtol=0)


def test_hapo_fallback_from_real_tokens():
    # Two responses of lengths a, b with rewards +-1: A_0 = sqrt(b / a) (before eps).
    # a = 1, b = 24: A_0 = sqrt(24) = 4.899 < 5 -> token-level values kept
    kept = hapo_advantages(t64([1.0, -1.0]), torch.tensor([1, 24]), [0, 0])
    sigma = 2.0 * math.sqrt(24.0) / 25.0
    torch.testing.assert_close(kept, t64([48.0 / 25.0, -2.0 / 25.0]) / (sigma + EPS), atol=1e-12, rtol=0)
    # a = 1, b = 30: A_0 = sqrt(30) = 5.477 >= 5 -> whole group falls back to GRPO (+-1 / (sqrt(2) + eps))
    fell = hapo_advantages(t64([1.0, -1.0]), torch.tensor([1, 30]), [0, 0])
    torch.testing.assert_close(fell, t64([1.0, -1.0]) / (math.sqrt(2.0) + EPS), atol=1e-12, rtol=0)


def test_hapo_fallback_threshold_is_inclusive():
    # std_norm=False keeps the arithmetic exact. lengths (1, 3), rewards (4, 0): mu = 4 / 4 = 1 -> A = (3, -1).
    # GRPO (Dr.GRPO) centring: mean 2 -> (2, -2).
    rewards, lengths = t64([4.0, 0.0]), torch.tensor([1, 3])
    at = hapo_advantages(rewards, lengths, [0, 0], std_norm=False, fallback_threshold=3.0)
    assert torch.equal(at, t64([2.0, -2.0]))  # |A| = 3 >= 3 -> fallback
    above = hapo_advantages(rewards, lengths, [0, 0], std_norm=False, fallback_threshold=3.0 + 1e-9)
    assert torch.equal(above, t64([3.0, -1.0]))


def test_hapo_fallback_on_padding_positions_h5():
    # All-correct group that differs only by an overlong penalty: rewards (1.0, 0.9), lengths (2, 2).
    # mu = 0.95, sigma = 0.05 -> valid A = +-0.05 / 0.050001 = +-0.99998.
    # Padding value (0 - mu) / sigma = -19 -> |.| >= 5 -> published code falls back to GRPO:
    # mean 0.95, Bessel std sqrt(2 * 0.05^2 / 1) = 0.0707107 -> +-0.05 / 0.0707117 = +-0.70710.
    rewards, lengths = t64([1.0, 0.9]), torch.tensor([2, 2])
    token_level = t64([0.05, -0.05]) / (0.05 + EPS)
    grpo = grpo_advantages(rewards, [0, 0])
    torch.testing.assert_close(grpo, t64([0.05, -0.05]) / (math.sqrt(0.005) + EPS), atol=1e-9, rtol=0)
    with_padding = hapo_advantages(rewards, lengths, [0, 0], padded_length=4)
    torch.testing.assert_close(with_padding, grpo, atol=1e-12, rtol=0)
    valid_only = hapo_advantages(rewards, lengths, [0, 0], padded_length=None)
    torch.testing.assert_close(valid_only, token_level, atol=1e-9, rtol=0)
    # No padding position at all (every response fills the padded length): nothing to trigger the fallback.
    full = hapo_advantages(rewards, lengths, [0, 0], padded_length=2)
    torch.testing.assert_close(full, token_level, atol=1e-9, rtol=0)


def test_hapo_padding_fallback_is_per_group():
    rewards = t64([1.0, 0.9, 1.0, -1.0])
    lengths = torch.tensor([2, 2, 2, 2])
    got = hapo_advantages(rewards, lengths, ["a", "a", "b", "b"], padded_length=4)
    torch.testing.assert_close(got[:2], grpo_advantages(rewards[:2], [0, 0]), atol=1e-12, rtol=0)
    # group b: mu = 0, sigma = 1 -> A = +-1 / (1 + eps); padding value 0 -> no fallback
    torch.testing.assert_close(got[2:], t64([1.0, -1.0]) / (1.0 + EPS), atol=1e-12, rtol=0)


def test_hapo_zero_length_response_adds_no_tokens_but_counts_as_padding():
    # A zero-length response does not move mu / sigma of the others ...
    two = hapo_advantages(t64([1.0, 0.9]), torch.tensor([2, 2]), [0, 0])
    three = hapo_advantages(t64([1.0, 0.9, 5.0]), torch.tensor([2, 2, 0]), [0, 0, 0])
    torch.testing.assert_close(three[:2], two, atol=1e-12, rtol=0)
    # ... but its row is all padding, value (0 - 0.95) / 0.05 = -19: with padded_length the group falls back to
    # GRPO over all three rewards (published code: compute_grpo_outcome_advantage ignores the mask).
    padded = hapo_advantages(t64([1.0, 0.9, 5.0]), torch.tensor([2, 2, 0]), [0, 0, 0], padded_length=2)
    torch.testing.assert_close(padded, grpo_advantages(t64([1.0, 0.9, 5.0]), [0, 0, 0]), atol=1e-12, rtol=0)


def test_hapo_group_without_valid_tokens_uses_grpo_and_is_finite():
    rewards = t64([1.0, -1.0, 1.0, -1.0])
    lengths = torch.tensor([0, 0, 1, 3])
    for padded_length in (None, 4):
        got = hapo_advantages(rewards, lengths, [0, 0, 1, 1], padded_length=padded_length)
        assert bool(torch.isfinite(got).all())
        torch.testing.assert_close(got[:2], t64([1.0, -1.0]) / (math.sqrt(2.0) + EPS), atol=1e-12, rtol=0)
        torch.testing.assert_close(got[2:], t64([1.5, -0.5]) / (math.sqrt(0.75) + EPS), atol=1e-12, rtol=0)


@pytest.mark.parametrize("padded_length", [None, 5])
def test_hapo_all_equal_group_is_zero(padded_length):
    # sigma = 0: valid A = 0 / eps = 0; with padding the value -mu / eps is huge -> GRPO fallback, also 0.
    got = hapo_advantages(t64([1.0, 1.0, 1.0]), torch.tensor([1, 3, 5]), [0, 0, 0], padded_length=padded_length)
    assert torch.equal(got, torch.zeros(3, dtype=F64))


def test_hapo_single_token_responses_and_singleton_group():
    # singleton group, length 1: sigma = 0, A = 0 / eps = 0 (no fallback without padding)
    got = hapo_advantages(t64([1.0]), torch.tensor([1]), [0])
    assert torch.equal(got, t64([0.0]))
    # with padding: padding value -1 / 1e-6 -> fallback -> GRPO singleton R / (1 + eps)
    padded = hapo_advantages(t64([1.0]), torch.tensor([1]), [0], padded_length=2)
    torch.testing.assert_close(padded, t64([1.0 / (1.0 + EPS)]), atol=1e-12, rtol=0)


def test_hapo_string_and_uuid_ids():
    rewards, lengths = t64([1.0, -1.0, 0.5, 0.0]), torch.tensor([3, 1, 2, 2])
    ints = hapo_advantages(rewards, lengths, torch.tensor([1, 2, 1, 2]), padded_length=3)
    ids = [uuid.uuid4(), uuid.uuid4()]
    uuids = hapo_advantages(rewards, lengths, [ids[0], ids[1], ids[0], ids[1]], padded_length=3)
    strings = hapo_advantages(rewards, lengths, ["x", "y", "x", "y"], padded_length=3)
    assert torch.equal(ints, uuids) and torch.equal(ints, strings)


def test_hapo_rejects_bad_inputs():
    with pytest.raises(ValueError, match="non-finite"):
        hapo_advantages(t64([1.0, float("nan")]), torch.tensor([1, 1]), [0, 0])
    with pytest.raises(ValueError):
        hapo_advantages(t64([1.0, 0.0]), torch.tensor([1, -1]), [0, 0])  # negative length
    with pytest.raises(ValueError):
        hapo_advantages(t64([1.0, 0.0]), torch.tensor([1, 5]), [0, 0], padded_length=4)  # longer than padding
    with pytest.raises(ValueError):
        hapo_advantages(t64([1.0, 0.0]), torch.tensor([1, 2, 3]), [0, 0])  # shape mismatch


@given(
    rewards=st.lists(st.sampled_from([-1.0, 1.0, 0.75, -0.5, 0.0]), min_size=1, max_size=10),
    data=st.data(),
    std_norm=st.booleans(),
)
@SETTINGS
def test_hapo_matches_published_loop_reference(rewards, data, std_norm):
    n = len(rewards)
    padded_length = 6
    lengths = data.draw(st.lists(st.integers(0, padded_length), min_size=n, max_size=n))
    groups = data.draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
    expected = reference_hapo_published(rewards, lengths, groups, padded_length, std_norm)
    # keep away from the threshold, where the last bit decides the branch
    for g in set(groups):
        members = [i for i in range(n) if groups[i] == g]
        tokens = [rewards[i] for i in members for _ in range(lengths[i])]
        if tokens:
            mu = sum(tokens) / len(tokens)
            sigma = math.sqrt(sum((x - mu) ** 2 for x in tokens) / len(tokens))
            scale = sigma + EPS if std_norm else 1.0
            for v in [(rewards[i] - mu) / scale for i in members] + [mu / scale]:
                assume(abs(abs(v) - 5.0) > 1e-6)
    got = hapo_advantages(t64(rewards), torch.tensor(lengths), groups, padded_length=padded_length, std_norm=std_norm)
    # responses with no valid token: the published output never reaches the loss, compare the others only
    keep = torch.tensor(lengths) > 0
    torch.testing.assert_close(got[keep], t64(expected)[keep], atol=1e-9, rtol=1e-9)


@given(
    rewards=st.lists(st.floats(-2, 2, allow_nan=False), min_size=2, max_size=8),
    data=st.data(),
    padded=st.booleans(),
)
@SETTINGS
def test_hapo_permutation_within_group_permutes_advantages(rewards, data, padded):
    n = len(rewards)
    lengths = torch.tensor(data.draw(st.lists(st.integers(1, 5), min_size=n, max_size=n)))
    perm = torch.tensor(data.draw(st.permutations(list(range(n)))))
    kwargs = {"padded_length": 5 if padded else None}
    base = hapo_advantages(t64(rewards), lengths, [0] * n, **kwargs)
    permuted = hapo_advantages(t64(rewards)[perm], lengths[perm], [0] * n, **kwargs)
    torch.testing.assert_close(permuted, base[perm], atol=1e-9, rtol=1e-9)
