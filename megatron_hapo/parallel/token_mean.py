"""Exact global aggregation across data-parallel ranks and micro-batches.

Megatron's pipeline schedules divide each micro-batch loss by ``num_microbatches`` (unless
``calculate_per_token_loss``), and DDP averages gradients over the data-parallel ranks. A token-mean computed
per micro-batch under those two averagings weighs tokens unequally (verl#7321). Here the denominator of the
aggregation mode is summed once over every micro-batch of the mini-batch and every DP rank, and each
micro-batch loss is pre-multiplied by ``num_microbatches * dp_size`` so that the two averagings cancel: the
accumulated, DP-averaged gradient is exactly that of ``aggregate_loss`` over the whole mini-batch.

With Megatron's ``calculate_per_token_loss`` the schedule does not divide by ``num_microbatches``, DDP sums
instead of averaging, and ``finalize_model_grads`` divides the gradients by the token count returned by every
micro-batch, summed over micro-batches and DP x CP ranks (``T``). :func:`per_token_loss_outputs` then returns
``numerator * T / D`` with the local token count, which is exact for every mode (``D = T`` for token-mean).

Context parallelism: with CP > 1 pass ``dp_size`` = the pure DP size (Megatron multiplies a two-output loss by
``cp_size`` and DDP divides by ``dp * cp``, which cancel), and sum denominators over the DP x CP group. Only
``token-mean`` / ``token-sum`` are exact under CP, since a CP rank holds pieces of sequences; the seq-mean modes
need CP = 1 (:mod:`megatron_hapo.parallel.policy_loss` enforces this).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from megatron_hapo.algos import AggregationMode, aggregation_terms
from megatron_hapo.parallel.collectives import all_reduce


def global_denominator(
    per_microbatch_masks: Iterable[torch.Tensor], mode: AggregationMode, *, dp_group: dist.ProcessGroup | None
) -> torch.Tensor:
    """The aggregation denominator of a whole mini-batch: summed over local micro-batches, then over ``dp_group``.

    Args:
        per_microbatch_masks: this rank's ``[B_m, L_m]`` valid-token masks, one per micro-batch.
        mode: the aggregation mode (``token-mean``: valid tokens; ``seq-mean-*``: non-empty sequences;
            ``token-sum``: the constant 1).
        dp_group: the data-parallel (x context-parallel) group; ``None`` on one rank.

    Returns:
        0-dim float32 tensor, identical on every rank of ``dp_group``.
    """
    masks = list(per_microbatch_masks)
    if mode == "token-sum":  # a constant normaliser (1), not a count: it does not add up over splits
        return aggregation_terms(masks[0].float(), masks[0], mode)[1] if masks else torch.ones(())
    local = torch.zeros((), dtype=torch.float32)
    for mask in masks:
        local = local.to(mask.device) + aggregation_terms(mask.float(), mask, mode)[1]
    return all_reduce(local.reshape(1), dist.ReduceOp.SUM, dp_group).reshape(())


def microbatch_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    mode: AggregationMode,
    *,
    denominator: torch.Tensor,
    num_microbatches: int,
    dp_size: int,
) -> torch.Tensor:
    """The loss a micro-batch hands to Megatron's schedule (which divides by ``num_microbatches``; DDP by ``dp_size``).

    Args:
        per_token_loss: ``[B_m, L_m]``.
        mask: ``[B_m, L_m]`` valid tokens.
        denominator: from :func:`global_denominator` for the same mini-batch.

    Returns:
        0-dim loss whose gradient, after the schedule's and DDP's averaging, sums to the exact mini-batch one.
    """
    numerator, _ = aggregation_terms(per_token_loss, mask, mode)
    return numerator / denominator.to(numerator).clamp_min(1e-12) * (num_microbatches * dp_size)


def per_token_loss_outputs(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    mode: AggregationMode,
    *,
    denominator: torch.Tensor,
    total_tokens: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, num_tokens)`` for Megatron's ``calculate_per_token_loss`` path (gradients divided by ``T``).

    Args:
        per_token_loss: ``[B_m, L_m]``.
        mask: ``[B_m, L_m]`` valid tokens.
        denominator: the mode's mini-batch denominator ``D`` (:func:`global_denominator`).
        total_tokens: ``T``, the valid tokens of the mini-batch over every micro-batch and DP x CP rank
            (:func:`global_denominator` with ``token-mean``).

    Returns:
        ``(0-dim loss = numerator * T / D, 0-dim int32 local valid-token count)``.
    """
    numerator, _ = aggregation_terms(per_token_loss, mask, mode)
    scale = total_tokens.to(numerator) / denominator.to(numerator).clamp_min(1e-12)
    return numerator * scale, mask.bool().sum().to(torch.int32)
