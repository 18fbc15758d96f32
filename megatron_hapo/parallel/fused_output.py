"""Log-prob and entropy straight from the final hidden states and the vocabulary-sharded output weight.

The ``[N, V / tp]`` logits never exist: each chunk of ``T`` tokens computes its ``[T, V / tp]`` logits
with one matmul, reduces them to the per-token statistics (the same two all-reduces per chunk as
:func:`megatron_hapo.parallel.vocab_parallel_logprob_entropy`) and drops them. The backward recomputes each
chunk's logits and softmax, and accumulates ``grad_hidden = grad_z @ W`` and ``grad_W += grad_z^T @ hidden``
chunk by chunk. Peak extra memory is a few ``[T, V / tp]`` float32 tensors plus one float32
weight-sized gradient accumulator, independent of ``N``.

Placement contract (Megatron's ``ColumnParallelLinear`` output layer with ``gather_output=False``):
``hidden`` ``[N, H]`` is replicated over ``tp_group`` (with sequence parallelism, gather it over the sequence
first); ``weight`` ``[V / tp, H]`` holds rows ``[r * V / tp, (r + 1) * V / tp)`` on rank ``r``; targets,
temperature and mask are replicated; both outputs are replicated. The backward all-reduces ``grad_hidden``
over ``tp_group`` (as the column-parallel layer's input gradient), so the caller must not reduce it again.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_hapo.parallel.chunked_softmax import (
    ChunkStats,
    chunk_logits_grad,
    chunked_forward,
    compute_dtype,
    local_target_ids,
    prepare_inputs,
    real_vocab,
    take_rows,
    valid_columns,
)
from megatron_hapo.parallel.collectives import all_reduce, group_rank_size


class _FusedOutputLogProbEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunks, group, with_entropy_grad, vocab_size, reduce_grad):  # noqa: ANN001, ANN205, PLR0917
        local = local_target_ids(targets, weight.shape[0], group)
        real = weight[: valid_columns(vocab_size, weight.shape[0], group)]
        log_prob, saved = chunked_forward(
            lambda chunk: (take_rows(hidden, chunk, hidden.dtype) @ real.t()).to(temperature.dtype),
            local,
            temperature,
            chunks,
            group=group,
        )
        ctx.save_for_backward(hidden, weight, local, temperature, saved.row_max, saved.sum_exp, saved.entropy)
        ctx.group, ctx.chunks, ctx.with_entropy_grad, ctx.reduce_grad = group, chunks, with_entropy_grad, reduce_grad
        ctx.real = real.shape[0]
        if not with_entropy_grad:
            ctx.mark_non_differentiable(saved.entropy)
        return log_prob, saved.entropy

    @staticmethod
    def backward(ctx, grad_log_prob, grad_entropy):  # noqa: ANN001, ANN205
        hidden, weight, local, temperature, row_max, sum_exp, entropy = ctx.saved_tensors
        saved = ChunkStats(local, temperature, row_max, sum_exp, entropy)
        grads = (grad_log_prob, grad_entropy if ctx.with_entropy_grad else None)
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=temperature.dtype) if need_weight else None
        real = weight[: ctx.real]  # padding rows: no logits, gradient 0
        for chunk in ctx.chunks:
            rows = chunk[0]
            hidden_chunk = take_rows(hidden, chunk, hidden.dtype)
            grad_z = chunk_logits_grad((hidden_chunk @ real.t()).to(temperature.dtype), rows, saved, *grads)
            if grad_hidden is not None:
                grad_hidden.index_copy_(0, rows, grad_z.to(weight.dtype) @ real)
            if grad_weight is not None:
                grad_weight[: ctx.real].addmm_(grad_z.t(), hidden_chunk.to(temperature.dtype))
        if grad_hidden is not None and ctx.reduce_grad:
            grad_hidden = all_reduce(grad_hidden, dist.ReduceOp.SUM, ctx.group)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def fused_logprob_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    tp_group: dist.ProcessGroup | None,
    temperature: float | torch.Tensor = 1.0,
    chunk_size: int | None = None,
    with_entropy_grad: bool = False,
    mask: torch.Tensor | None = None,
    vocab_size: int | None = None,
    reduce_hidden_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of ``targets`` and entropy of ``softmax(hidden @ W_full^T / temperature)`` without the logits.

    Args:
        hidden: ``[N, H]`` final hidden states (after the final norm), replicated over ``tp_group``.
        weight: ``[V / tp, H]`` this rank's rows of the output weight, same dtype as ``hidden``.
        targets: ``[N]`` global vocabulary ids, replicated.
        tp_group: the tensor-parallel group the vocabulary is sharded over; ``None`` on one rank.
        temperature: a float or ``[N]`` per-token temperatures (> 0), replicated.
        chunk_size: tokens per chunk (bounds the temporaries to ``[chunk_size, V / tp]`` float32); ``None``:
            automatic, as :func:`megatron_hapo.parallel.vocab_parallel_logprob_entropy`.
        with_entropy_grad: let gradients flow through the entropy.
        mask: ``[N]`` bool; tokens outside it are skipped (outputs 0, no gradient, no matmul).
        vocab_size: the real vocabulary size when ``weight`` holds Megatron's padding rows (excluded).
        reduce_hidden_grad: all-reduce ``hidden``'s gradient over ``tp_group`` (the column-parallel layer's input
            gradient); ``False`` when ``hidden`` came from a sequence-parallel gather, whose backward
            reduce-scatters it already.

    Returns:
        ``(log_prob [N], entropy [N])`` float32 (float64 for float64 inputs), replicated over ``tp_group``.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"need hidden [N, H] and weight [V_local, H]; got {tuple(hidden.shape)}, {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets {tuple(targets.shape)} must be [N] with N = {hidden.shape[0]}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    _, tp_size = group_rank_size(tp_group)
    vocab = real_vocab(vocab_size, weight.shape[0] * tp_size)
    temp, chunks = prepare_inputs(
        targets,
        vocab,
        temperature,
        mask,
        chunk_size,
        dtype=compute_dtype(weight.dtype),
        vocab_local=weight.shape[0],
        device=weight.device,
    )
    return _FusedOutputLogProbEntropy.apply(
        hidden, weight, targets.long(), temp, chunks, tp_group, with_entropy_grad, vocab_size, reduce_hidden_grad
    )
