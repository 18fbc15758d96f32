"""Loss aggregation with an explicit global denominator.

Every mode is ``numerator / denominator``. :func:`aggregation_terms` returns the local numerator and the local
denominator; a distributed caller sums the denominators over data-parallel ranks and micro-batches once, then
calls :func:`aggregate_loss` with that global value so the gradient is exact whatever the split.

Departure: ``seq-mean-*`` modes skip sequences with no valid token in both numerator and denominator (the
published code divides 0 by 0 for them).
"""

from __future__ import annotations

from typing import Literal

import torch

from megatron_hapo.algos._checks import as_mask

AggregationMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "token-sum"]
AGGREGATION_MODES: tuple[str, ...] = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "token-sum")


def aggregation_terms(
    per_token_loss: torch.Tensor, mask: torch.Tensor, mode: AggregationMode
) -> tuple[torch.Tensor, torch.Tensor]:
    """Local ``(numerator, denominator)`` of an aggregation mode.

    Args:
        per_token_loss: ``[B, L]``.
        mask: ``[B, L]`` valid tokens.
        mode: ``token-mean`` (sum over valid tokens / number of valid tokens), ``seq-mean-token-mean``
            (sum over sequences of their token means / number of non-empty sequences), ``seq-mean-token-sum``
            (sum of per-sequence token sums / number of non-empty sequences), ``token-sum`` (sum / 1).

    Returns:
        ``(numerator 0-dim, denominator 0-dim float32)``.
    """
    valid = as_mask(mask, per_token_loss)
    weights = valid.to(per_token_loss.dtype)
    token_sum_per_seq = (per_token_loss * weights).sum(-1)
    tokens_per_seq = valid.sum(-1)
    non_empty = (tokens_per_seq > 0).sum().float()
    if mode == "token-mean":
        return token_sum_per_seq.sum(), valid.sum().float()
    if mode == "seq-mean-token-mean":
        return (token_sum_per_seq / tokens_per_seq.clamp_min(1)).sum(), non_empty
    if mode == "seq-mean-token-sum":
        return token_sum_per_seq.sum(), non_empty
    if mode == "token-sum":
        return token_sum_per_seq.sum(), torch.ones((), device=per_token_loss.device)
    raise ValueError(f"unknown aggregation mode {mode!r}; valid: {', '.join(AGGREGATION_MODES)}")


def aggregate_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    mode: AggregationMode = "token-mean",
    *,
    global_denominator: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Aggregate a per-token loss to a scalar.

    Args:
        per_token_loss: ``[B, L]``.
        mask: ``[B, L]`` valid tokens.
        mode: see :func:`aggregation_terms`.
        global_denominator: the denominator summed over every rank and micro-batch that shares the update
            (e.g. all valid tokens of the mini-batch for ``token-mean``). ``None`` uses the local one. A zero
            denominator (nothing valid anywhere) gives a zero loss that still has a gradient graph.

    Returns:
        0-dim loss.
    """
    numerator, local_denominator = aggregation_terms(per_token_loss, mask, mode)
    denominator = local_denominator if global_denominator is None else torch.as_tensor(global_denominator)
    return numerator / denominator.to(device=numerator.device, dtype=numerator.dtype).clamp_min(1e-12)
