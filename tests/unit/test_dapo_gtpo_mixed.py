"""Tests of DAPO's overlong shaping and group filter (spec 1.2), GTPO / GRPO-S (spec 3.2-3.3, ambiguity G1) and
the mixed-policy DAPO terms (spec 4)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import F64, SETTINGS, t64
from hypothesis import given
from hypothesis import strategies as st

from megatron_hapo.algos import (
    clipped_surrogate,
    filter_groups,
    grpo_advantages,
    grpo_s_advantages,
    grpo_s_sequence_rewards,
    gtpo_advantages,
    gtpo_token_rewards,
    guide_policy_surrogate,
    mix_losses,
    overlong_penalty,
    zero_reward_groups,
)


# ---------------------------------------------------------------------------------------------------------------
# overlong_penalty
# ---------------------------------------------------------------------------------------------------------------
def test_overlong_penalty_hand_values():
    lengths = torch.tensor([10, 16, 17, 18, 20, 24])
    # L_max = 20, L_cache = 4 -> soft zone starts after 16: -(L - 16) / 4, clamped at -1
    got = overlong_penalty(lengths, max_length=20, buffer_length=4)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0]))
    assert got.dtype == torch.float32
    # penalty_factor 0.5 halves the slope and the floor: -(L - 16) / 4 * 0.5, clamped at -0.5
    half = overlong_penalty(lengths, max_length=20, buffer_length=4, penalty_factor=0.5)
    torch.testing.assert_close(half, torch.tensor([0.0, 0.0, -0.125, -0.25, -0.5, -0.5]))


def test_overlong_penalty_dapo_paper_setting():
    # L_max 20480, L_cache 4096: 16384 -> 0, 18432 -> -0.5, 20480 -> -1
    got = overlong_penalty(torch.tensor([16384, 18432, 20480]), max_length=20480, buffer_length=4096)
    torch.testing.assert_close(got, torch.tensor([0.0, -0.5, -1.0]))


def test_overlong_penalty_rejects_bad_settings():
    lengths = torch.tensor([1])
    with pytest.raises(ValueError):
        overlong_penalty(lengths, max_length=20, buffer_length=0)
    with pytest.raises(ValueError):
        overlong_penalty(lengths, max_length=20, buffer_length=21)
    with pytest.raises(ValueError):
        overlong_penalty(lengths, max_length=20, buffer_length=4, penalty_factor=-1.0)


# ---------------------------------------------------------------------------------------------------------------
# filter_groups
# ---------------------------------------------------------------------------------------------------------------
def test_filter_groups_hand_values_and_singletons():
    metric = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    groups = ["mixed", "mixed", "all_right", "all_right", "all_wrong", "all_wrong", "solo_right", "solo_wrong"]
    got = filter_groups(metric, groups)
    assert got.tolist() == [True, True, False, False, False, False, True, True]


def test_filter_groups_tensor_ids_and_tiny_differences():
    got = filter_groups(t64([0.5, 0.5 + 1e-12, 2.0, 2.0]), torch.tensor([3, 3, 1, 1]))
    assert got.tolist() == [True, True, False, False]


def test_filter_groups_rejects_nan():
    with pytest.raises(ValueError):
        filter_groups(torch.tensor([1.0, float("nan")]), [0, 0])


# ---------------------------------------------------------------------------------------------------------------
# GTPO token rewards
# ---------------------------------------------------------------------------------------------------------------
# One group of four: o1, o2 correct (O+), o3, o4 wrong (O-); 99 marks padding (must not count).
CORRECT = torch.tensor([True, True, False, False])
REWARDS = t64([1.0, 1.0, -1.0, -1.0])
ENTROPY = t64([[1.0, 2.0, 3.0], [3.0, 2.0, 99.0], [1.0, 1.0, 99.0], [0.5, 4.0, 2.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 0], [1, 1, 1]]).bool()


def test_gtpo_token_rewards_hand_values():
    got = gtpo_token_rewards(REWARDS, CORRECT, ENTROPY, MASK, [0, 0, 0, 0], reward_weight=1.0, entropy_weight=0.1)
    # O+, t=0: H (1, 3), d = 2 -> 1 + 0.1 * 2 * (1/4, 3/4) = (1.05, 1.15)
    #      t=1: H (2, 2), d = 2 -> 1 + 0.1 * 2 * 1/2 = 1.1 each;  t=2: only o1, d = 1 -> 1 + 0.1 = 1.1
    # O-, t=0: 1/H (1, 2), sum 3, h = 2 -> -1 - 0.1 * 2 * (1/3, 2/3) = (-1.06667, -1.13333)
    #      t=1: 1/H (1, 0.25), sum 1.25, h = 2 -> -1 - 0.1 * 2 * (0.8, 0.2) = (-1.16, -1.04)
    #      t=2: only o4, h = 1 -> -1 - 0.1 = -1.1
    expected = torch.tensor(
        [
            [1.05, 1.1, 1.1],
            [1.15, 1.1, 0.0],
            [-1.0 - 0.2 / 3.0, -1.16, 0.0],
            [-1.0 - 0.4 / 3.0, -1.04, -1.1],
        ]
    )
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_gtpo_token_rewards_weights_and_reward_scale():
    # alpha_1 scales R_i for O+ and the constant -alpha_1 for O-; alpha_2 = 0 removes every entropy bonus.
    got = gtpo_token_rewards(
        t64([0.5, 0.5, -7.0, -7.0]), CORRECT, ENTROPY, MASK, [0] * 4, reward_weight=2.0, entropy_weight=0.0
    )
    expected = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [-2.0, -2.0, 0.0], [-2.0, -2.0, -2.0]])
    torch.testing.assert_close(got, expected)


def test_gtpo_token_rewards_groups_are_independent():
    both = torch.cat([ENTROPY, ENTROPY * 2.0])
    got = gtpo_token_rewards(
        torch.cat([REWARDS, REWARDS]),
        torch.cat([CORRECT, CORRECT]),
        both,
        torch.cat([MASK, MASK]),
        ["a"] * 4 + ["b"] * 4,
    )
    alone = gtpo_token_rewards(REWARDS, CORRECT, ENTROPY * 2.0, MASK, [0] * 4)
    torch.testing.assert_close(got[4:], alone)


def test_gtpo_token_rewards_zero_entropy_is_finite():
    entropy = ENTROPY.clone()
    entropy[2, 0] = 0.0  # a fully confident wrong token: 1 / (0 + eps) takes (almost) the whole bonus
    got = gtpo_token_rewards(REWARDS, CORRECT, entropy, MASK, [0] * 4)
    assert bool(torch.isfinite(got).all())
    assert got[2, 0].item() == pytest.approx(-1.0 - 0.1 * 2, abs=1e-5)  # share ~1, h_0 = 2
    assert got[3, 0].item() == pytest.approx(-1.0, abs=1e-5)


def test_gtpo_token_rewards_rejects_bad_inputs():
    bad = ENTROPY.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError):
        gtpo_token_rewards(REWARDS, CORRECT, bad, MASK, [0] * 4)
    negative = ENTROPY.clone()
    negative[0, 0] = -0.1
    with pytest.raises(ValueError):
        gtpo_token_rewards(REWARDS, CORRECT, negative, MASK, [0] * 4)
    with pytest.raises(ValueError):
        gtpo_token_rewards(REWARDS, CORRECT[:3], ENTROPY, MASK, [0] * 4)


@given(seed=st.integers(0, 100_000), alpha2=st.floats(0.01, 1.0))
@SETTINGS
def test_gtpo_entropy_bonus_conservation(seed, alpha2):
    gen = torch.Generator().manual_seed(seed)
    batch, length = 8, 6
    entropy = torch.rand(batch, length, generator=gen, dtype=F64) * 5 + 0.01
    lengths = torch.randint(0, length + 1, (batch,), generator=gen)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    correct = torch.rand(batch, generator=gen) > 0.5
    rewards = torch.where(correct, 1.0, -1.0).double()
    groups = torch.randint(0, 3, (batch,), generator=gen)
    got = gtpo_token_rewards(
        rewards, correct, entropy, mask, groups, reward_weight=1.0, entropy_weight=alpha2, eps=1e-12
    ).double()
    for g in groups.unique().tolist():
        for t in range(length):
            pos = [i for i in range(batch) if groups[i] == g and correct[i] and mask[i, t]]
            neg = [j for j in range(batch) if groups[j] == g and not correct[j] and mask[j, t]]
            # at each t, the entropy bonus terms of O+ sum to alpha2 * d_t, those of O- to -alpha2 * h_t
            assert sum(got[i, t].item() - 1.0 for i in pos) == pytest.approx(alpha2 * len(pos), rel=1e-5, abs=1e-6)
            assert sum(got[j, t].item() + 1.0 for j in neg) == pytest.approx(-alpha2 * len(neg), rel=1e-5, abs=1e-6)
    assert torch.equal(got[~mask], torch.zeros(int((~mask).sum()), dtype=F64))


# ---------------------------------------------------------------------------------------------------------------
# GTPO advantages
# ---------------------------------------------------------------------------------------------------------------
# Hand-made token rewards (float64): O+ valid values 1.05 1.1 1.1 | 1.15 1.1, O- valid values -1 -1.2 | -1.1 x3.
TOKEN_REWARDS = t64([[1.05, 1.1, 1.1], [1.15, 1.1, 0.0], [-1.0, -1.2, 0.0], [-1.1, -1.1, -1.1]])


def test_gtpo_advantages_per_polarity_hand_values():
    got = gtpo_advantages(TOKEN_REWARDS, CORRECT, MASK, [0] * 4, norm="per_polarity", eps=1e-6)
    # O+: mean 5.5 / 5 = 1.1, deviations (-0.05, 0, 0, 0.05, 0), population std sqrt(0.005 / 5) = 0.0316228
    # O-: mean -5.5 / 5 = -1.1, deviations (0.1, -0.1, 0, 0, 0), population std sqrt(0.02 / 5) = 0.0632456
    zp = 0.05 / (math.sqrt(0.001) + 1e-6)  # 1.58109
    zn = 0.1 / (math.sqrt(0.004) + 1e-6)  # 1.58111
    expected = torch.tensor([[-zp, 0.0, 0.0], [zp, 0.0, 0.0], [zn, -zn, 0.0], [0.0, 0.0, 0.0]])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_gtpo_advantages_joint_hand_values():
    got = gtpo_advantages(TOKEN_REWARDS, CORRECT, MASK, [0] * 4, norm="joint", eps=1e-6)
    # all 10 valid tokens: mean (5.5 - 5.5) / 10 = 0; sum of squares 6.055 + 6.07 = 12.125 -> std sqrt(1.2125)
    expected = (TOKEN_REWARDS / (math.sqrt(1.2125) + 1e-6)).float() * MASK
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert bool((got[:2][MASK[:2]] > 0).all()) and bool((got[2:][MASK[2:]] < 0).all())


def test_gtpo_advantages_default_is_joint_and_unknown_norm_raises():
    default = gtpo_advantages(TOKEN_REWARDS, CORRECT, MASK, [0] * 4)
    joint = gtpo_advantages(TOKEN_REWARDS, CORRECT, MASK, [0] * 4, norm="joint")
    assert torch.equal(default, joint)
    with pytest.raises(ValueError, match="per_polarity"):
        gtpo_advantages(TOKEN_REWARDS, CORRECT, MASK, [0] * 4, norm="batch")


@given(seed=st.integers(0, 100_000))
@SETTINGS
def test_gtpo_normalisations_properties(seed):
    gen = torch.Generator().manual_seed(seed)
    batch, length = 8, 5
    entropy = torch.rand(batch, length, generator=gen, dtype=F64) * 3 + 0.05
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    correct = torch.tensor([True, False, True, False, False, True, True, True])  # both polarities in each group
    rewards = torch.where(correct, 1.0, -1.0).double()
    token_rewards = gtpo_token_rewards(rewards, correct, entropy, mask, groups)
    per_pol = gtpo_advantages(token_rewards, correct, mask, groups, norm="per_polarity").double()
    joint = gtpo_advantages(token_rewards, correct, mask, groups, norm="joint").double()
    for g in (0, 1):
        in_group = (groups == g)[:, None] & mask
        pos = in_group & correct[:, None]
        neg = in_group & ~correct[:, None]
        # per_polarity: zero mean within each polarity (the correct / wrong sign is lost, ambiguity G1)
        assert per_pol[pos].mean().item() == pytest.approx(0.0, abs=1e-5)
        assert per_pol[neg].mean().item() == pytest.approx(0.0, abs=1e-5)
        # joint: zero mean over the group, correct responses above wrong ones on average
        assert joint[in_group].mean().item() == pytest.approx(0.0, abs=1e-5)
        assert joint[pos].mean().item() > 0 > joint[neg].mean().item()
    assert torch.equal(joint[~mask], torch.zeros(int((~mask).sum()), dtype=F64))
    assert torch.equal(per_pol[~mask], torch.zeros(int((~mask).sum()), dtype=F64))


# ---------------------------------------------------------------------------------------------------------------
# GRPO-S
# ---------------------------------------------------------------------------------------------------------------
# Mean entropies over valid tokens: o1 (1+2+3)/3 = 2, o2 (3+3)/2 = 3, o3 (0.25+0.75)/2 = 0.5, o4 (1+3+2)/3 = 2.
S_ENTROPY = t64([[1.0, 2.0, 3.0], [3.0, 3.0, 99.0], [0.25, 0.75, 99.0], [1.0, 3.0, 2.0]])


def test_grpo_s_sequence_rewards_hand_values():
    got = grpo_s_sequence_rewards(REWARDS, CORRECT, S_ENTROPY, MASK, [0] * 4, reward_weight=1.0, entropy_weight=0.1)
    # O+ (n = 2): 1 + 0.1 * 2 * (2, 3) / 5 = (1.08, 1.12)
    # O- (m = 2): 1/Hbar = (2, 0.5), sum 2.5 -> -1 - 0.1 * 2 * (2, 0.5) / 2.5 = (-1.16, -1.04)
    torch.testing.assert_close(got, torch.tensor([1.08, 1.12, -1.16, -1.04]), atol=1e-5, rtol=1e-5)
    # the reward of a wrong response does not enter (-beta_1 is a constant)
    other = grpo_s_sequence_rewards(t64([1.0, 1.0, -7.0, 3.0]), CORRECT, S_ENTROPY, MASK, [0] * 4)
    torch.testing.assert_close(other, got)


def test_grpo_s_advantages_are_grpo_of_sequence_rewards():
    groups = ["q", "q", "q", "q"]
    seq = grpo_s_sequence_rewards(REWARDS, CORRECT, S_ENTROPY, MASK, groups)
    got = grpo_s_advantages(REWARDS, CORRECT, S_ENTROPY, MASK, groups)
    torch.testing.assert_close(got, grpo_advantages(seq, groups))
    # (1.08, 1.12, -1.16, -1.04): mean 0, Bessel std sqrt((1.1664 + 1.2544 + 1.3456 + 1.0816) / 3) = 1.27169
    std = math.sqrt((1.08**2 + 1.12**2 + 1.16**2 + 1.04**2) / 3)
    torch.testing.assert_close(got, torch.tensor([1.08, 1.12, -1.16, -1.04]) / std, atol=1e-5, rtol=1e-5)
    centred = grpo_s_advantages(REWARDS, CORRECT, S_ENTROPY, MASK, groups, std_norm=False)
    torch.testing.assert_close(centred, torch.tensor([1.08, 1.12, -1.16, -1.04]), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Mixed-policy DAPO
# ---------------------------------------------------------------------------------------------------------------
def test_zero_reward_groups():
    correct = torch.tensor([0, 0, 1, 0, 0, 0])
    got = zero_reward_groups(correct, ["a", "a", "a", "b", "b", "c"])
    assert got.tolist() == [False, False, False, True, True, True]
    assert zero_reward_groups(torch.tensor([True, False]), torch.tensor([5, 6])).tolist() == [False, True]


def test_guide_policy_surrogate_is_clipped_surrogate_against_guide_log_probs():
    torch.manual_seed(0)
    guide = torch.randn(3, 4, dtype=F64)
    log_prob = (guide + 0.4 * torch.randn(3, 4, dtype=F64)).requires_grad_()
    adv = t64([1.0, -0.5, 2.0])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]).bool()
    got, metrics = guide_policy_surrogate(log_prob, guide, adv, mask, eps_low=0.2, eps_high=0.28, dual_clip_c=3.0)
    ref, ref_metrics = clipped_surrogate(log_prob, guide, adv, eps_low=0.2, eps_high=0.28, dual_clip_c=3.0, mask=mask)
    assert torch.equal(got, ref)
    assert set(metrics) == {f"guide_{name}" for name in ref_metrics}
    for name, value in ref_metrics.items():
        assert torch.equal(metrics[f"guide_{name}"], value)
    got.sum().backward()
    assert log_prob.grad is not None and bool(log_prob.grad.abs().sum() > 0)


def test_mix_losses():
    on, guide = torch.tensor(1.5), torch.tensor(-2.0)
    assert mix_losses(on, guide, weight=0.5).item() == pytest.approx(0.5)  # 1.5 + 0.5 * -2
    assert mix_losses(on, None, weight=0.5) is on
    assert mix_losses(on, guide, weight=0.0).item() == 1.5
    with pytest.raises(ValueError):
        mix_losses(on, guide, weight=-1.0)
