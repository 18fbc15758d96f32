"""Outcome advantages: GRPO (spec 1.1) and HAPO's token-level group average (spec 2.3).

Group statistics are computed in float64 with scatter sums (vectorised, no Python loop over groups) and the
result is returned in the rewards' floating dtype.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from megatron_hapo.algos._checks import check_finite, check_same_shape, group_index

GroupIds = torch.Tensor | Sequence[Hashable]


def group_sum(values: torch.Tensor, index: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Sum ``values [B]`` into ``[num_groups]`` by ``index [B]``."""
    return torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(0, index, values)


def _check_rewards(rewards: torch.Tensor) -> None:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [B], got shape {tuple(rewards.shape)}")
    check_finite("rewards", rewards)


def grpo_advantages(
    rewards: torch.Tensor, group_ids: GroupIds, *, std_norm: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO outcome advantages ``(R_i - mean_G R) / (std_G R + eps)`` (verl ``compute_grpo_outcome_advantage``).

    ``std`` is Bessel-corrected (N - 1). A group of one response uses mean 0 and std 1, as verl does, so its
    advantage is ``R / (1 + eps)``. ``std_norm=False`` drops the division (Dr.GRPO).

    Args:
        rewards: ``[B]`` scalar outcome rewards.
        group_ids: ``[B]`` group (prompt) of each response: ints, strings or uuids.

    Returns:
        ``[B]`` advantages (broadcast them over each response's valid tokens).
    """
    _check_rewards(rewards)
    index, num_groups = group_index(group_ids, rewards.device)
    adv = _grpo_on_index(rewards.double(), index, num_groups, std_norm=std_norm, eps=eps)
    return adv.to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def _grpo_on_index(
    r: torch.Tensor, index: torch.Tensor, num_groups: int, *, std_norm: bool, eps: float
) -> torch.Tensor:
    """GRPO advantages of float64 rewards ``r [B]`` grouped by dense ``index [B]``; see :func:`grpo_advantages`."""
    count = group_sum(torch.ones_like(r), index, num_groups)
    mean = group_sum(r, index, num_groups) / count
    centred = r - mean[index]
    var = group_sum(centred.pow(2), index, num_groups) / (count - 1).clamp_min(1)
    singleton = count == 1
    mean = torch.where(singleton, torch.zeros_like(mean), mean)
    std = torch.where(singleton, torch.ones_like(var), var.sqrt())
    adv = r - mean[index]
    return adv / (std[index] + eps) if std_norm else adv


def hapo_advantages(
    rewards: torch.Tensor,
    lengths: torch.Tensor,
    group_ids: GroupIds,
    *,
    padded_length: int | None = None,
    std_norm: bool = True,
    eps: float = 1e-6,
    fallback_threshold: float = 5.0,
) -> torch.Tensor:
    """HAPO's token-level group average with the GRPO fallback (published ``compute_hapo_outcome_advantage``).

    Per group, every valid token of response ``i`` carries ``R_i``; ``mu`` and ``sigma`` are the token-weighted
    mean and population std: ``mu = sum L_i R_i / sum L_i``, ``sigma^2 = sum L_i (R_i - mu)^2 / sum L_i``, and
    ``A_i = (R_i - mu) / (sigma + eps)``. If any ``|A| >= fallback_threshold`` the whole group falls back to
    :func:`grpo_advantages`.

    Args:
        rewards: ``[B]`` scalar rewards.
        lengths: ``[B]`` valid-token counts ``L_i`` (0 allowed: such a response adds nothing to mu, sigma).
        group_ids: ``[B]`` group of each response.
        padded_length: the padded response length ``L``. Given, the fallback test also covers the padding
            positions of the ``[G, L]`` tensor, whose value is ``(0 - mu) / (sigma + eps)``: exactly the published
            code (ambiguity H5). ``None`` tests valid tokens only.
        std_norm: divide by ``sigma + eps`` (``False``: ``A_i = R_i - mu``).
        fallback_threshold: ``|A|`` at or above which a group uses GRPO advantages.

    Returns:
        ``[B]`` advantages. A group with no valid token at all uses the GRPO advantages (the published code
        would produce NaN; nothing of it reaches the loss either way).
    """
    _check_rewards(rewards)
    check_same_shape(rewards=rewards, lengths=lengths)
    if bool((lengths < 0).any()):
        raise ValueError("lengths must be >= 0")
    if padded_length is not None and bool((lengths > padded_length).any()):
        raise ValueError(f"a length exceeds padded_length={padded_length}")
    index, num_groups = group_index(group_ids, rewards.device)
    r, w = rewards.double(), lengths.double()
    num_tokens = group_sum(w, index, num_groups)
    safe_tokens = num_tokens.clamp_min(1)
    mu = group_sum(w * r, index, num_groups) / safe_tokens
    sigma = (group_sum(w * (r - mu[index]).pow(2), index, num_groups) / safe_tokens).sqrt()
    scale = (sigma + eps) if std_norm else torch.ones_like(sigma)
    adv = (r - mu[index]) / scale[index]

    has_tokens = w > 0
    worst = torch.zeros(num_groups, dtype=torch.float64, device=r.device)
    worst = worst.scatter_reduce(0, index, torch.where(has_tokens, adv.abs(), 0.0), reduce="amax")
    if padded_length is not None:
        has_padding = group_sum((w < padded_length).double(), index, num_groups) > 0
        pad_value = (mu / scale).abs()
        worst = torch.where(has_padding, torch.maximum(worst, pad_value), worst)
    fallback = (worst >= fallback_threshold) | (num_tokens == 0)
    grpo = _grpo_on_index(r, index, num_groups, std_norm=std_norm, eps=eps)
    out = torch.where(fallback[index], grpo, adv)
    return out.to(rewards.dtype if rewards.is_floating_point() else torch.float32)
