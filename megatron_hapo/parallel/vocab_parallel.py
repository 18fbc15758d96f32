"""Log-prob of the sampled token and full-vocabulary entropy over vocabulary-sharded logits.

Placement contract: ``logits`` is sharded on the vocabulary over ``tp_group`` (rank ``r`` holds global ids
``[r * V_local, (r + 1) * V_local)``, Megatron's ``VocabParallelEmbedding`` layout); ``targets``, ``temperature``
and ``mask`` are replicated across the group; both outputs are replicated.

Built like Megatron's ``tensor_parallel/cross_entropy.py``: the local steps on a ``[T, V_local]`` chunk are kept
apart from the two all-reduces per chunk (a MAX of the row maxima, then one SUM of the stacked
``[sum exp, sum exp * z, target logit]``). Tokens are processed in chunks of ``chunk_size`` rows, so beside the
logits (and their gradient) only ``[chunk_size, V_local]`` float32 temporaries are alive; the logits are never
cloned nor converted to float32 as a whole. The backward recomputes the chunk's softmax from the saved per-token
statistics (max, sum, entropy: ``O(N)`` float32) and needs no communication.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist

from megatron_hapo.parallel.collectives import all_reduce, group_rank_size

#: Rows per chunk: 4096 x (152k / tp) float32 temporaries stay around 2.5 GB / tp.
DEFAULT_CHUNK_SIZE = 4096


def _chunk_forward(
    z: torch.Tensor, local_targets: torch.Tensor, group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk. ``z``: ``[T, V_local]`` float32 scaled logits; ``local_targets``: ``[T]`` local id or -1.

    Returns ``(log_prob, entropy, row_max, sum_exp)``, each ``[T]`` float32 and replicated.
    """
    if z.shape[-1] == 0:  # every column of this shard is vocabulary padding
        local_max, target_logit = z.new_full(z.shape[:1], float("-inf")), z.new_zeros(z.shape[:1])
    else:
        local_max = z.amax(dim=-1)
    row_max = all_reduce(local_max, dist.ReduceOp.MAX, group)
    shifted = (z - row_max.unsqueeze(-1)).clamp_min_(-1e4)
    exp = shifted.exp()
    if z.shape[-1]:
        on_shard = local_targets >= 0
        target_logit = shifted.gather(-1, local_targets.clamp_min(0).unsqueeze(-1)).squeeze(-1) * on_shard
    sums = torch.stack([exp.sum(dim=-1), torch.linalg.vecdot(exp, shifted), target_logit])
    sum_exp, sum_exp_z, target_logit = all_reduce(sums, dist.ReduceOp.SUM, group)
    log_sum = sum_exp.log()
    return target_logit - log_sum, log_sum - sum_exp_z / sum_exp, row_max, sum_exp


class ChunkStats(NamedTuple):
    """Per-token ``[N]`` tensors the backward needs: local target id (-1 off-shard), temperature, and the
    forward's float32 row max, sum of exponentials and entropy."""

    local_targets: torch.Tensor
    temperature: torch.Tensor
    row_max: torch.Tensor
    sum_exp: torch.Tensor
    entropy: torch.Tensor


def chunk_logits_grad(
    logits: torch.Tensor,
    chunk: torch.Tensor,
    saved: ChunkStats,
    grad_log_prob: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
) -> torch.Tensor:
    """Gradient w.r.t. the unscaled logits ``[T, V_local]`` (float32) of the rows ``chunk`` ``[T]``.

    Recomputes the chunk's softmax from the saved statistics (no communication): with ``z = logits / temp``,
    ``d log_prob / dz = onehot - p`` and ``d entropy / dz = -p (log p + H)``; the result is divided by ``temp``.
    """
    temp = saved.temperature.index_select(0, chunk).unsqueeze(-1)
    shifted = logits / temp - saved.row_max.index_select(0, chunk).unsqueeze(-1)
    log_p = shifted.clamp_min_(-1e4) - saved.sum_exp.index_select(0, chunk).log().unsqueeze(-1)
    p = log_p.exp()
    grad_z = torch.zeros_like(p)
    if grad_log_prob is not None and p.shape[-1]:  # (a shard of padding only has no target and no gradient)
        g = grad_log_prob.index_select(0, chunk).to(p.dtype).unsqueeze(-1)
        targets = saved.local_targets.index_select(0, chunk)
        on_shard = (targets >= 0).to(p.dtype).unsqueeze(-1)
        grad_z -= g * p
        grad_z.scatter_add_(-1, targets.clamp_min(0).unsqueeze(-1), g * on_shard)
    if grad_entropy is not None:
        g = grad_entropy.index_select(0, chunk).to(p.dtype).unsqueeze(-1)
        grad_z -= g * p * (log_p + saved.entropy.index_select(0, chunk).unsqueeze(-1))
    return grad_z.div_(temp)


def valid_columns(vocab_size: int | None, vocab_local: int, group: dist.ProcessGroup | None) -> int:
    """Columns of this rank's shard that are real vocabulary (the rest is Megatron's padding, excluded)."""
    if vocab_size is None:
        return vocab_local
    rank, _ = group_rank_size(group)
    return max(0, min(vocab_local, vocab_size - rank * vocab_local))


def local_target_ids(targets: torch.Tensor, vocab_local: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """``[N]`` global ids -> ids within this rank's vocabulary shard, -1 where the target lies on another rank."""
    rank, _ = group_rank_size(group)
    local = targets - rank * vocab_local
    return torch.where((local >= 0) & (local < vocab_local), local, torch.full_like(local, -1))


def chunked_forward(
    chunk_logits: Callable[[torch.Tensor], torch.Tensor],
    local_targets: torch.Tensor,
    temperature: torch.Tensor,
    rows: torch.Tensor,
    *,
    group: dist.ProcessGroup | None,
    chunk_size: int,
) -> tuple[torch.Tensor, ChunkStats]:
    """Run :func:`_chunk_forward` over ``rows`` in chunks; ``chunk_logits(rows [T]) -> [T, V_local]`` logits.

    Computes in ``temperature``'s dtype (the compute dtype). Returns ``(log_prob [N], ChunkStats)``; rows not in
    ``rows`` get log-prob and entropy 0.
    """
    num = local_targets.shape[0]
    log_prob, entropy = (torch.zeros(num, dtype=temperature.dtype, device=temperature.device) for _ in range(2))
    row_max, sum_exp = torch.zeros_like(log_prob), torch.ones_like(log_prob)
    for chunk in rows.split(chunk_size):
        z = chunk_logits(chunk).to(temperature.dtype) / temperature.index_select(0, chunk).unsqueeze(-1)
        outs = _chunk_forward(z, local_targets.index_select(0, chunk), group)
        for out, value in zip((log_prob, entropy, row_max, sum_exp), outs, strict=True):
            out.index_copy_(0, chunk, value)
    return log_prob, ChunkStats(local_targets, temperature, row_max, sum_exp, entropy)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 inputs are computed in float64 (reference checks); every other float dtype in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def prepare_inputs(  # noqa: PLR0917
    targets: torch.Tensor,
    vocab_size: int,
    temperature: float | torch.Tensor,
    mask: torch.Tensor | None,
    chunk_size: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate the replicated inputs; returns ``(temperature [N] in dtype, rows [K] kept token indices)``."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    temp = torch.as_tensor(temperature, device=targets.device).to(dtype).expand(targets.shape[0])
    keep = torch.ones_like(targets, dtype=torch.bool) if mask is None else mask.bool()
    rows = keep.nonzero().squeeze(-1)
    kept_targets = targets.index_select(0, rows)
    if bool(((kept_targets < 0) | (kept_targets >= vocab_size)).any()):
        raise ValueError(f"targets must be vocabulary ids in [0, {vocab_size}) on unmasked tokens")
    if bool((temp.index_select(0, rows) <= 0).any()):
        raise ValueError("temperature must be > 0 for log-probs and entropy (on unmasked tokens)")
    return temp.contiguous(), rows


class _VocabParallelLogProbEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature, rows, group, chunk_size, with_entropy_grad, vocab_size):  # noqa: ANN001, ANN205, PLR0917
        local = local_target_ids(targets, logits.shape[-1], group)
        real = logits[:, : valid_columns(vocab_size, logits.shape[-1], group)]
        log_prob, saved = chunked_forward(
            lambda chunk: real.index_select(0, chunk), local, temperature, rows, group=group, chunk_size=chunk_size
        )
        entropy = saved.entropy
        ctx.save_for_backward(logits, local, temperature, rows, saved.row_max, saved.sum_exp, entropy)
        ctx.chunk_size, ctx.with_entropy_grad, ctx.real = chunk_size, with_entropy_grad, real.shape[-1]
        if not with_entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return log_prob, entropy

    @staticmethod
    def backward(ctx, grad_log_prob, grad_entropy):  # noqa: ANN001, ANN205
        logits, local, temperature, rows, row_max, sum_exp, entropy = ctx.saved_tensors
        grad_logits = torch.zeros_like(logits)
        real, grad_real = logits[:, : ctx.real], grad_logits[:, : ctx.real]  # padding columns keep gradient 0
        saved = ChunkStats(local, temperature, row_max, sum_exp, entropy)
        grads = (grad_log_prob, grad_entropy if ctx.with_entropy_grad else None)
        for chunk in rows.split(ctx.chunk_size):
            grad_z = chunk_logits_grad(real.index_select(0, chunk).to(temperature.dtype), chunk, saved, *grads)
            grad_real.index_copy_(0, chunk, grad_z.to(logits.dtype))
        return grad_logits, None, None, None, None, None, None, None


def vocab_parallel_logprob_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    tp_group: dist.ProcessGroup | None,
    temperature: float | torch.Tensor = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    with_entropy_grad: bool = False,
    mask: torch.Tensor | None = None,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of ``targets`` and full-vocabulary entropy of ``softmax(logits / temperature)``.

    Args:
        logits: ``[N, V / tp]`` local vocabulary shard, any float dtype (math in float32; float64 stays float64).
        targets: ``[N]`` global vocabulary ids, replicated over ``tp_group``.
        tp_group: the tensor-parallel group the vocabulary is sharded over; ``None`` on one rank.
        temperature: a float or ``[N]`` per-token temperatures (> 0), replicated.
        chunk_size: tokens per chunk (bounds the float32 temporaries to ``[chunk_size, V / tp]``).
        with_entropy_grad: let gradients flow through the entropy (off: the entropy is a detached metric).
        mask: ``[N]`` bool, replicated; tokens outside it are skipped (outputs 0, gradient 0).
        vocab_size: the real vocabulary size when the shards hold Megatron's padding rows (global ids
            ``>= vocab_size`` are excluded from the softmax and get no gradient); ``None``: no padding.

    Returns:
        ``(log_prob [N], entropy [N])`` float32 (float64 for float64 logits), replicated over ``tp_group``.
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"need logits [N, V_local] and targets [N]; got {tuple(logits.shape)}, {tuple(targets.shape)}")
    _, tp_size = group_rank_size(tp_group)
    dtype = compute_dtype(logits.dtype)
    vocab = real_vocab(vocab_size, logits.shape[-1] * tp_size)
    temp, rows = prepare_inputs(targets, vocab, temperature, mask, chunk_size, dtype)
    return _VocabParallelLogProbEntropy.apply(
        logits, targets.long(), temp, rows, tp_group, chunk_size, with_entropy_grad, vocab_size
    )


def real_vocab(vocab_size: int | None, padded: int) -> int:
    if vocab_size is not None and not 0 < vocab_size <= padded:
        raise ValueError(f"vocab_size={vocab_size} must be in (0, {padded}] (the sharded, padded vocabulary)")
    return padded if vocab_size is None else vocab_size
