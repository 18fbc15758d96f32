"""GTPO (token-level entropy-shaped rewards) and GRPO-S (sequence level), spec 3.2-3.3.

There is no official code; the formulas follow the third-party transcriptions quoted in the spec. Entropies
are those of the old (sampling) policy and carry no gradient. Responses are split into ``O+`` (correct) and
``O-`` (the rest); all sums run within a group (prompt).

GTPO normalisation (ambiguity G1): ``joint`` z-scores all active token rewards of a group together (keeps the
correct / wrong sign; default); ``per_polarity`` z-scores ``O+`` and ``O-`` tokens separately, as transcribed.
Both use the population std over tokens plus ``eps``.
"""

from __future__ import annotations

from typing import Literal

import torch

from megatron_hapo.algos._checks import as_mask, check_finite, group_index
from megatron_hapo.algos.advantages import GroupIds, grpo_advantages

GtpoNorm = Literal["joint", "per_polarity"]
GTPO_NORMS: tuple[str, ...] = ("joint", "per_polarity")


def _check_entropy_inputs(entropy: torch.Tensor, mask: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    valid = as_mask(mask, entropy)
    if correct.shape != entropy.shape[:1]:
        raise ValueError(f"correct must be [B]={entropy.shape[0]}, got {tuple(correct.shape)}")
    check_finite("entropy[mask]", entropy[valid])
    if bool((entropy[valid] < 0).any()):
        raise ValueError("entropy must be >= 0")
    return valid


def _group_position_sum(values: torch.Tensor, index: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``[B, L]`` -> ``[G, L]`` sums over the responses of each group at each position."""
    out = torch.zeros((num_groups, values.shape[1]), dtype=values.dtype, device=values.device)
    return out.index_add_(0, index, values)


def gtpo_token_rewards(
    rewards: torch.Tensor,
    correct: torch.Tensor,
    entropy: torch.Tensor,
    mask: torch.Tensor,
    group_ids: GroupIds,
    *,
    reward_weight: float = 1.0,
    entropy_weight: float = 0.1,
    eps: float = 1e-6,
) -> torch.Tensor:
    """GTPO token rewards (spec 3.2, alpha_1 = ``reward_weight``, alpha_2 = ``entropy_weight``).

    ``O+``: ``alpha_1 R_i + alpha_2 d_t H_{i,t} / (sum_{k in O+ active at t} H_{k,t} + eps)``.
    ``O-``: ``-alpha_1 - alpha_2 h_t H_{j,t}^-1 / (sum_{k in O- active at t} H_{k,t}^-1 + eps)``, with
    ``H^-1 = 1 / (H + eps)``; ``d_t`` and ``h_t`` count the active responses of each polarity at ``t``.

    Args:
        rewards: ``[B]`` outcome rewards (``R_i`` of ``O+``).
        correct: ``[B]`` bool, membership of ``O+``.
        entropy: ``[B, L]`` old-policy token entropies (detached).
        mask: ``[B, L]`` valid tokens ("active at t").
        group_ids: ``[B]`` group of each response.

    Returns:
        ``[B, L]`` token rewards, 0 at masked positions.
    """
    valid = _check_entropy_inputs(entropy, mask, correct)
    index, num_groups = group_index(group_ids, entropy.device)
    ent = entropy.detach().double().masked_fill(~valid, 0.0)
    pos = (valid & correct.bool().unsqueeze(-1)).double()
    neg = (valid & ~correct.bool().unsqueeze(-1)).double()
    inv = (1.0 / (ent + eps)) * neg
    pos_share = ent * pos / (_group_position_sum(ent * pos, index, num_groups)[index] + eps)
    neg_share = inv / (_group_position_sum(inv, index, num_groups)[index] + eps)
    d_t = _group_position_sum(pos, index, num_groups)[index]
    h_t = _group_position_sum(neg, index, num_groups)[index]
    r = rewards.double().unsqueeze(-1)
    token_pos = (reward_weight * r + entropy_weight * pos_share * d_t) * pos
    token_neg = (-reward_weight - entropy_weight * neg_share * h_t) * neg
    return (token_pos + token_neg).to(torch.float32)


def _zscore_within(
    values: torch.Tensor, member: torch.Tensor, index: torch.Tensor, num_groups: int, eps: float
) -> torch.Tensor:
    """Z-score ``values [B, L]`` over the ``member`` tokens of each group (population std + eps)."""
    m = member.double()
    count = _group_position_sum(m, index, num_groups).sum(-1).clamp_min(1)
    mean = _group_position_sum(values * m, index, num_groups).sum(-1) / count
    centred = (values - mean[index].unsqueeze(-1)) * m
    std = (_group_position_sum(centred.pow(2), index, num_groups).sum(-1) / count).sqrt()
    return centred / (std[index].unsqueeze(-1) + eps)


def gtpo_advantages(
    token_rewards: torch.Tensor,
    correct: torch.Tensor,
    mask: torch.Tensor,
    group_ids: GroupIds,
    *,
    norm: GtpoNorm = "joint",
    eps: float = 1e-6,
) -> torch.Tensor:
    """GTPO advantages from token rewards: group z-scores, ``joint`` or ``per_polarity`` (ambiguity G1).

    Args:
        token_rewards: ``[B, L]`` from :func:`gtpo_token_rewards`.
        correct: ``[B]`` bool.
        mask: ``[B, L]`` valid tokens.
        group_ids: ``[B]``.

    Returns:
        ``[B, L]`` advantages, 0 at masked positions.
    """
    valid = as_mask(mask, token_rewards)
    index, num_groups = group_index(group_ids, token_rewards.device)
    values = token_rewards.double()
    if norm == "joint":
        adv = _zscore_within(values, valid, index, num_groups, eps)
    elif norm == "per_polarity":
        is_pos = valid & correct.bool().unsqueeze(-1)
        is_neg = valid & ~correct.bool().unsqueeze(-1)
        adv = _zscore_within(values, is_pos, index, num_groups, eps) + _zscore_within(
            values, is_neg, index, num_groups, eps
        )
    else:
        raise ValueError(f"unknown GTPO normalisation {norm!r}; valid: {', '.join(GTPO_NORMS)}")
    return adv.to(torch.float32)


def grpo_s_sequence_rewards(
    rewards: torch.Tensor,
    correct: torch.Tensor,
    entropy: torch.Tensor,
    mask: torch.Tensor,
    group_ids: GroupIds,
    *,
    reward_weight: float = 1.0,
    entropy_weight: float = 0.1,
    eps: float = 1e-6,
) -> torch.Tensor:
    """GRPO-S sequence rewards (spec 3.3, beta_1 = ``reward_weight``, beta_2 = ``entropy_weight``).

    With ``Hbar_i`` the mean entropy of response ``i`` over its valid tokens, ``n = |O+|``, ``m = |O-|``:
    ``O+``: ``beta_1 R_i + beta_2 n Hbar_i / (sum_{O+} Hbar + eps)``;
    ``O-``: ``-beta_1 - beta_2 m Hbar_j^-1 / (sum_{O-} Hbar^-1 + eps)`` with ``Hbar^-1 = 1 / (Hbar + eps)``.

    Returns:
        ``[B]`` float32 sequence rewards.
    """
    valid = _check_entropy_inputs(entropy, mask, correct)
    index, num_groups = group_index(group_ids, entropy.device)
    ent = entropy.detach().double().masked_fill(~valid, 0.0)
    mean_entropy = ent.sum(-1) / valid.sum(-1).clamp_min(1)
    is_pos = correct.bool().double()
    is_neg = 1.0 - is_pos
    inv = is_neg / (mean_entropy + eps)

    def per_group(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(0, index, values)[index]

    pos_bonus = per_group(is_pos) * mean_entropy * is_pos / (per_group(mean_entropy * is_pos) + eps)
    neg_bonus = per_group(is_neg) * inv / (per_group(inv) + eps)
    seq_pos = (reward_weight * rewards.double() + entropy_weight * pos_bonus) * is_pos
    seq_neg = (-reward_weight - entropy_weight * neg_bonus) * is_neg
    return (seq_pos + seq_neg).to(torch.float32)


def grpo_s_advantages(
    rewards: torch.Tensor,
    correct: torch.Tensor,
    entropy: torch.Tensor,
    mask: torch.Tensor,
    group_ids: GroupIds,
    *,
    reward_weight: float = 1.0,
    entropy_weight: float = 0.1,
    std_norm: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """GRPO-S advantages: GRPO group z-scores of :func:`grpo_s_sequence_rewards`. Returns ``[B]``."""
    seq_rewards = grpo_s_sequence_rewards(
        rewards, correct, entropy, mask, group_ids, reward_weight=reward_weight, entropy_weight=entropy_weight, eps=eps
    )
    return grpo_advantages(seq_rewards, group_ids, std_norm=std_norm, eps=eps)
