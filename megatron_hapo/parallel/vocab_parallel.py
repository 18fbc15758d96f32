"""Log-prob of the sampled token and full-vocabulary entropy over vocabulary-sharded logits.

Placement contract: ``logits`` is sharded on the vocabulary over ``tp_group`` (rank ``r`` holds global ids
``[r * V_local, (r + 1) * V_local)``, Megatron's ``VocabParallelEmbedding`` layout); ``targets``, ``temperature``
and ``mask`` are replicated across the group; both outputs are replicated.

Built like Megatron's ``tensor_parallel/cross_entropy.py``: the local steps on a ``[T, V_local]`` chunk are kept
apart from the two all-reduces per chunk (:mod:`megatron_hapo.parallel.chunked_softmax`). Tokens are processed
in chunks, so beside the logits (and their gradient) only a few ``[chunk, V_local]`` float32 temporaries are
alive; the logits are never cloned nor converted to float32 as a whole. The backward recomputes each chunk's
softmax from the saved per-token statistics (max, sum, entropy: ``O(N)``) and needs no communication.
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
from megatron_hapo.parallel.collectives import group_rank_size


class _VocabParallelLogProbEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature, chunks, group, with_entropy_grad, vocab_size):  # noqa: ANN001, ANN205, PLR0917
        local = local_target_ids(targets, logits.shape[-1], group)
        real = logits[:, : valid_columns(vocab_size, logits.shape[-1], group)]
        log_prob, saved = chunked_forward(
            lambda chunk: take_rows(real, chunk, temperature.dtype), local, temperature, chunks, group=group
        )
        ctx.save_for_backward(logits, local, temperature, saved.row_max, saved.sum_exp, saved.entropy)
        ctx.chunks, ctx.with_entropy_grad, ctx.real = chunks, with_entropy_grad, real.shape[-1]
        if not with_entropy_grad:
            ctx.mark_non_differentiable(saved.entropy)
        return log_prob, saved.entropy

    @staticmethod
    def backward(ctx, grad_log_prob, grad_entropy):  # noqa: ANN001, ANN205
        logits, local, temperature, row_max, sum_exp, entropy = ctx.saved_tensors
        grad_logits = torch.zeros_like(logits)
        real, grad_real = logits[:, : ctx.real], grad_logits[:, : ctx.real]  # padding columns keep gradient 0
        saved = ChunkStats(local, temperature, row_max, sum_exp, entropy)
        grads = (grad_log_prob, grad_entropy if ctx.with_entropy_grad else None)
        for chunk in ctx.chunks:
            rows, as_slice = chunk
            grad_z = chunk_logits_grad(take_rows(real, chunk, temperature.dtype), rows, saved, *grads)
            if as_slice is not None:
                grad_real[as_slice] = grad_z
            else:
                grad_real.index_copy_(0, rows, grad_z.to(logits.dtype))
        return grad_logits, None, None, None, None, None, None


def vocab_parallel_logprob_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    tp_group: dist.ProcessGroup | None,
    temperature: float | torch.Tensor = 1.0,
    chunk_size: int | None = None,
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
        chunk_size: tokens per chunk; ``None`` picks one that keeps the temporaries under a quarter of a float32
            logits-sized tensor (:func:`megatron_hapo.parallel.chunked_softmax.auto_chunk_rows`).
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
    vocab = real_vocab(vocab_size, logits.shape[-1] * tp_size)
    temp, chunks = prepare_inputs(
        targets,
        vocab,
        temperature,
        mask,
        chunk_size,
        dtype=compute_dtype(logits.dtype),
        vocab_local=logits.shape[-1],
        device=logits.device,
    )
    return _VocabParallelLogProbEntropy.apply(
        logits, targets.long(), temp, chunks, tp_group, with_entropy_grad, vocab_size
    )
