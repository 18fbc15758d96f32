"""DAPO's soft overlong punishment and dynamic-sampling group filter (spec 1.2)."""

from __future__ import annotations

import torch

from megatron_hapo.algos._checks import check_finite, group_index
from megatron_hapo.algos.advantages import GroupIds


def overlong_penalty(
    lengths: torch.Tensor, *, max_length: int, buffer_length: int, penalty_factor: float = 1.0
) -> torch.Tensor:
    """Soft overlong punishment, added to the correctness reward (verl ``dapo`` reward manager).

    ``penalty = min(-(L - (max_length - buffer_length)) / buffer_length * penalty_factor, 0)``, clamped at
    ``-penalty_factor`` (the paper's -1 beyond ``max_length``; verl reaches it only at truncation).

    Args:
        lengths: ``[B]`` response lengths in tokens.
        max_length: maximum response length (``L_max``).
        buffer_length: the soft zone ``L_cache`` before ``max_length``; 0 < buffer_length <= max_length.

    Returns:
        ``[B]`` float32 penalties in ``[-penalty_factor, 0]``.
    """
    if not 0 < buffer_length <= max_length:
        raise ValueError(f"need 0 < buffer_length ({buffer_length}) <= max_length ({max_length})")
    if penalty_factor < 0:
        raise ValueError(f"penalty_factor must be >= 0, got {penalty_factor}")
    expected = max_length - buffer_length
    exceed = lengths.float() - expected
    penalty = (-exceed / buffer_length * penalty_factor).clamp_max(0.0)
    return penalty.clamp_min(-penalty_factor)


def filter_groups(metric: torch.Tensor, group_ids: GroupIds) -> torch.Tensor:
    """Dynamic sampling: keep responses whose group's metric is not all equal (groups of one are kept).

    Use the accuracy metric (correct / wrong), not the length-shaped score, as verl does.

    Args:
        metric: ``[B]`` per-response metric (e.g. 1.0 correct, 0.0 wrong).
        group_ids: ``[B]`` group of each response.

    Returns:
        ``[B]`` bool: True for responses of kept groups.
    """
    check_finite("metric", metric)
    index, num_groups = group_index(group_ids, metric.device)
    values = metric.double()
    empty = torch.zeros(num_groups, dtype=torch.float64, device=metric.device)
    high = empty.scatter_reduce(0, index, values, reduce="amax", include_self=False)
    low = empty.scatter_reduce(0, index, values, reduce="amin", include_self=False)
    size = torch.zeros(num_groups, dtype=torch.long, device=metric.device).index_add_(0, index, torch.ones_like(index))
    keep_group = (high > low) | (size == 1)
    return keep_group[index]
