"""EntropyStats (spec 2.1) over the valid tokens of several ranks, equal to the single-process result.

The pivot is the exact nearest-rank quantile of log-entropy over the concatenated tokens of ``group`` (e.g. the
data-parallel group, or DP x CP), found without gathering tokens: float32 values are mapped to order-preserving
int32 keys and a bisection over the key range counts ``key <= mid`` with one scalar all-reduce per step (32
steps). Memory stays ``O(local tokens)`` however many tokens the step has. The RMS, the positive maximum and the
negative minimum are one all-reduce each; sums are accumulated in float64.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_hapo.algos import EntropyStats, apply_entropy_stats, nearest_rank_index
from megatron_hapo.algos._checks import check_finite
from megatron_hapo.algos.entropy import ENTROPY_EPS, EntropySign, side_scales
from megatron_hapo.parallel.collectives import all_reduce, group_rank_size
from megatron_hapo.parallel.runtime import collective_device

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def _sortable_keys(values: torch.Tensor) -> torch.Tensor:
    """float32 ``[N]`` -> int64 keys ordered like the floats (negative floats: flip all bits but the sign)."""
    bits = values.float().contiguous().view(torch.int32).long()
    return torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


def _key_to_float(key: int) -> float:
    bits = key if key >= 0 else key ^ 0x7FFFFFFF
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32)[0])


def distributed_kth_smallest(values: torch.Tensor, k: int, group: dist.ProcessGroup | None) -> float:
    """The ``k``-th smallest (0-based) element of the concatenation of every rank's ``values [N_r]`` (float32).

    All ranks of ``group`` must call it with the same ``k``; the result is identical on every rank. The
    counting runs on ``values``' device, the reductions on the backend's (:func:`collectives.all_reduce` stages
    them); each step syncs the host once.
    """
    if group_rank_size(group)[1] == 1:  # one rank (e.g. the micro-batch scope without CP): one host sync, not 32
        return float(values.float().kthvalue(k + 1).values)
    keys = _sortable_keys(values)
    low, high = _INT32_MIN, _INT32_MAX
    while low < high:
        mid = (low + high) // 2
        count = (keys <= mid).sum().reshape(1)
        if int(all_reduce(count, dist.ReduceOp.SUM, group)[0]) >= k + 1:
            high = mid
        else:
            low = mid + 1
    return _key_to_float(low)


def distributed_entropy_stats(
    entropy: torch.Tensor,
    mask: torch.Tensor,
    *,
    group: dist.ProcessGroup | None,
    pivot_quantile: float = 0.8,
    sign: EntropySign = "published",
) -> EntropyStats:
    """The statistics of :func:`megatron_hapo.algos.normalized_entropy` over the valid tokens of all ranks.

    Args:
        entropy: ``[B, L]`` (or any shape) local token entropies.
        mask: same shape, valid tokens.
        group: the ranks whose tokens are pooled (``None``: this rank alone).

    Returns:
        EntropyStats (float32, on ``entropy``'s device), identical on every rank;
        :meth:`EntropyStats.neutral` when no rank has a valid token.
    """
    valid = mask.bool()
    check_finite("entropy[mask]", entropy[valid])
    log_entropy = torch.log(entropy.float()[valid].clamp_min(ENTROPY_EPS))
    count = torch.tensor([log_entropy.numel()], dtype=torch.int64, device=entropy.device)
    total = int(all_reduce(count, dist.ReduceOp.SUM, group)[0])
    if total == 0:
        return EntropyStats.neutral().to(entropy.device)
    pivot = distributed_kth_smallest(log_entropy, nearest_rank_index(total, pivot_quantile), group)
    pivot_t = torch.tensor(pivot, dtype=torch.float32, device=entropy.device)
    h = log_entropy.double() - pivot_t.double()
    square_sum = all_reduce(h.pow(2).sum().reshape(1), dist.ReduceOp.SUM, group)
    rms = (square_sum / total).clamp_min(ENTROPY_EPS).sqrt()
    h = h / rms
    # largest deviation on each side (>= 0); a rank without tokens contributes 0 to the MAX
    extremes = torch.stack([h.clamp_min(0).max(), (-h).clamp_min(0).max()]) if h.numel() else h.new_zeros(2)
    max_positive, neg_of_min = all_reduce(extremes, dist.ReduceOp.MAX, group)
    scale_pos, scale_neg = side_scales(max_positive.float(), -neg_of_min.float(), sign)
    return EntropyStats(pivot=pivot_t, rms=rms.float().reshape(()), scale_pos=scale_pos, scale_neg=scale_neg)


def distributed_normalized_entropy(
    entropy: torch.Tensor,
    mask: torch.Tensor,
    *,
    group: dist.ProcessGroup | None,
    pivot_quantile: float = 0.8,
    sign: EntropySign = "published",
) -> tuple[torch.Tensor, EntropyStats]:
    """``(h_hat [same shape as entropy], EntropyStats)`` with statistics pooled over ``group``."""
    stats = distributed_entropy_stats(entropy, mask, group=group, pivot_quantile=pivot_quantile, sign=sign)
    return normalize_with_stats(entropy, stats), stats


def normalize_with_stats(entropy: torch.Tensor, stats: EntropyStats) -> torch.Tensor:
    """``h_hat`` of token entropies ``[*]`` under given statistics (the trainer's normaliser: no eps, no clamp)."""
    return apply_entropy_stats(torch.log(entropy.float().clamp_min(ENTROPY_EPS)), stats)


def stats_from_last_stage(stats: EntropyStats | None, pp_group: dist.ProcessGroup | None) -> EntropyStats:
    """Broadcast the statistics the last pipeline stage computed (``stats``; ``None`` elsewhere) to every stage."""
    _, pp_size = group_rank_size(pp_group)
    if pp_size == 1:
        if stats is None:
            raise ValueError("a single pipeline stage must pass its statistics")
        return stats
    last = dist.get_process_group_ranks(pp_group)[-1]
    device = collective_device(pp_group)
    values = torch.zeros(4, dtype=torch.float32, device=device)
    if stats is not None:
        values = torch.stack([stats.pivot, stats.rms, stats.scale_pos, stats.scale_neg]).float().to(device)
    dist.broadcast(values, src=last, group=pp_group)
    return EntropyStats(*values.cpu().unbind())
