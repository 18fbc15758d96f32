"""The chunk machinery shared by the logits kernel and the fused hidden-state kernel.

A chunk is ``T`` token rows of the vocabulary shard, ``[T, V_local]``, in the compute dtype (float32; float64
for float64 inputs). The forward needs two all-reduces per chunk (a MAX of the row maxima; one SUM of the
stacked ``[sum exp, sum exp * z, target logit]``) and keeps ``O(N)`` statistics; the backward recomputes the
chunk's softmax from them without communication. Every step works in place on the chunk's own copy, so a
forward chunk holds two ``[T, V_local]`` tensors and a backward chunk two, plus the input dtype's gathered rows.

The automatic chunk size is ``ceil(K / 16)`` rows for ``K`` kept tokens, at least 16 rows and at most
``2**26 / V_local`` rows (256 MiB of float32 per temporary), so the temporaries stay below a quarter of one
float32 logits-sized tensor while chunks stay large enough to amortise the per-chunk collectives.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist

from megatron_hapo.parallel.collectives import all_reduce, group_rank_size

#: Chunks per kept-token count (temporaries ~ 3 / CHUNKS_PER_BATCH of one float32 logits tensor).
CHUNKS_PER_BATCH = 16
#: Bounds of the automatic chunk: rows, and float32 elements per [T, V_local] temporary.
MIN_CHUNK_ROWS, MAX_CHUNK_ELEMENTS = 16, 2**26

#: ``(rows [T] kept-token indices, the same rows as a slice when they are contiguous, else None)``.
Chunk = tuple[torch.Tensor, slice | None]


class ChunkStats(NamedTuple):
    """Per-token ``[N]`` tensors the backward needs: local target id (-1 off-shard), temperature, and the
    forward's row max, sum of exponentials and entropy (compute dtype)."""

    local_targets: torch.Tensor
    temperature: torch.Tensor
    row_max: torch.Tensor
    sum_exp: torch.Tensor
    entropy: torch.Tensor


def auto_chunk_rows(kept: int, vocab_local: int) -> int:
    """The default chunk size for ``kept`` tokens over a ``vocab_local``-wide shard (module docstring)."""
    by_count = max(MIN_CHUNK_ROWS, -(-kept // CHUNKS_PER_BATCH))
    return max(1, min(by_count, MAX_CHUNK_ELEMENTS // max(vocab_local, 1)))


def split_rows(rows: torch.Tensor, chunk_size: int) -> list[Chunk]:
    """Chunks of ``rows``; contiguous runs (no mask) also come as slices, read without a gather copy."""
    contiguous = rows.numel() == 0 or int(rows[-1] - rows[0]) + 1 == rows.numel()
    start = int(rows[0]) if rows.numel() else 0
    chunks = []
    for i, chunk in enumerate(rows.split(chunk_size)):
        first = start + i * chunk_size
        chunks.append((chunk, slice(first, first + chunk.numel()) if contiguous else None))
    return chunks


def take_rows(tensor: torch.Tensor, chunk: Chunk, dtype: torch.dtype) -> torch.Tensor:
    """A fresh ``dtype`` copy of the chunk's rows of ``tensor`` (the caller may modify it in place)."""
    indices, as_slice = chunk
    if as_slice is not None:
        return tensor[as_slice].to(dtype, copy=True)
    return tensor.index_select(0, indices).to(dtype)


def _chunk_forward(
    z: torch.Tensor, local_targets: torch.Tensor, group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk. ``z``: ``[T, V_local]`` scaled logits (overwritten); ``local_targets``: ``[T]`` local id or -1.

    Returns ``(log_prob, entropy, row_max, sum_exp)``, each ``[T]`` and replicated.
    """
    empty = z.shape[-1] == 0  # every column of this shard is vocabulary padding
    local_max = z.new_full(z.shape[:1], float("-inf")) if empty else z.amax(dim=-1)
    row_max = all_reduce(local_max, dist.ReduceOp.MAX, group)
    shifted = z.sub_(row_max.unsqueeze(-1)).clamp_min_(-1e4)
    exp = shifted.exp()
    target_logit = z.new_zeros(z.shape[:1])
    if not empty:
        on_shard = local_targets >= 0
        target_logit = shifted.gather(-1, local_targets.clamp_min(0).unsqueeze(-1)).squeeze(-1) * on_shard
    sum_exp_z = torch.bmm(exp.unsqueeze(1), shifted.unsqueeze(-1)).reshape(-1)  # no [T, V] product tensor
    sums = torch.stack([exp.sum(dim=-1), sum_exp_z, target_logit])
    sum_exp, sum_exp_z, target_logit = all_reduce(sums, dist.ReduceOp.SUM, group)
    log_sum = sum_exp.log()
    return target_logit - log_sum, log_sum - sum_exp_z / sum_exp, row_max, sum_exp


def chunked_forward(
    chunk_logits: Callable[[Chunk], torch.Tensor],
    local_targets: torch.Tensor,
    temperature: torch.Tensor,
    chunks: list[Chunk],
    *,
    group: dist.ProcessGroup | None,
) -> tuple[torch.Tensor, ChunkStats]:
    """Run :func:`_chunk_forward` over ``chunks``; ``chunk_logits(chunk) -> [T, V_local]`` fresh logits in the
    compute dtype (``temperature``'s). Returns ``(log_prob [N], ChunkStats)``; rows in no chunk get 0."""
    num = local_targets.shape[0]
    log_prob, entropy = (torch.zeros(num, dtype=temperature.dtype, device=temperature.device) for _ in range(2))
    row_max, sum_exp = torch.zeros_like(log_prob), torch.ones_like(log_prob)
    for chunk in chunks:
        rows = chunk[0]
        z = chunk_logits(chunk).div_(temperature.index_select(0, rows).unsqueeze(-1))
        outs = _chunk_forward(z, local_targets.index_select(0, rows), group)
        for out, value in zip((log_prob, entropy, row_max, sum_exp), outs, strict=True):
            out.index_copy_(0, rows, value)
    return log_prob, ChunkStats(local_targets, temperature, row_max, sum_exp, entropy)


def chunk_logits_grad(
    logits: torch.Tensor,
    rows: torch.Tensor,
    saved: ChunkStats,
    grad_log_prob: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
) -> torch.Tensor:
    """Gradient w.r.t. the unscaled logits ``[T, V_local]`` (a fresh copy, overwritten) of ``rows`` ``[T]``.

    Recomputes the chunk's softmax from the saved statistics (no communication). With ``z = logits / temp``:
    ``d log_prob / dz = onehot - p`` and ``d entropy / dz = -p (log p + H)``, so the gradient is
    ``-p (g_H (log p + H) + g_lp) + g_lp onehot``, divided by ``temp``; built in place in two tensors.
    """
    temp = saved.temperature.index_select(0, rows).unsqueeze(-1)
    log_p = logits.div_(temp).sub_(saved.row_max.index_select(0, rows).unsqueeze(-1)).clamp_min_(-1e4)
    log_p.sub_(saved.sum_exp.index_select(0, rows).log().unsqueeze(-1))
    p = log_p.exp()
    g_lp = None if grad_log_prob is None else grad_log_prob.index_select(0, rows).to(p.dtype).unsqueeze(-1)
    if grad_entropy is not None:
        coeff = log_p.add_(saved.entropy.index_select(0, rows).unsqueeze(-1))
        coeff.mul_(grad_entropy.index_select(0, rows).to(p.dtype).unsqueeze(-1))
        if g_lp is not None:
            coeff.add_(g_lp)
        grad_z = p.mul_(coeff).neg_()
    elif g_lp is not None:
        grad_z = p.mul_(g_lp).neg_()
    else:
        grad_z = p.zero_()
    if g_lp is not None and p.shape[-1]:  # (a shard of padding only has no target)
        targets = saved.local_targets.index_select(0, rows)
        on_shard = (targets >= 0).to(p.dtype).unsqueeze(-1)
        grad_z.scatter_add_(-1, targets.clamp_min(0).unsqueeze(-1), g_lp * on_shard)
    return grad_z.div_(temp)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 inputs are computed in float64 (reference checks); every other float dtype in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def real_vocab(vocab_size: int | None, padded: int) -> int:
    """The real vocabulary size (``padded`` when ``vocab_size`` is None), checked against the padded size."""
    if vocab_size is not None and not 0 < vocab_size <= padded:
        raise ValueError(f"vocab_size={vocab_size} must be in (0, {padded}] (the sharded, padded vocabulary)")
    return padded if vocab_size is None else vocab_size


def prepare_inputs(
    targets: torch.Tensor,
    vocab_size: int,
    temperature: float | torch.Tensor,
    mask: torch.Tensor | None,
    chunk_size: int | None,
    *,
    dtype: torch.dtype,
    vocab_local: int,
    device: torch.device,
) -> tuple[torch.Tensor, list[Chunk]]:
    """Validate the replicated inputs; returns ``(temperature [N] in dtype on device, the kept tokens' chunks)``.

    ``device`` is the compute device (the logits' / output weight's); targets and mask must already be there
    (the trainer moves each micro-batch to its rank's device once), a temperature tensor is moved there."""
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (or None for automatic), got {chunk_size}")
    for name, tensor in (("targets", targets), ("mask", mask)):
        if tensor is not None and tensor.device != device:
            raise ValueError(f"{name} on {tensor.device} but the logits on {device}: move the micro-batch first")
    temp = torch.as_tensor(temperature).to(device=device, dtype=dtype).expand(targets.shape[0])
    keep = torch.ones_like(targets, dtype=torch.bool) if mask is None else mask.bool()
    rows = keep.nonzero().squeeze(-1)
    kept_targets = targets.index_select(0, rows)
    if bool(((kept_targets < 0) | (kept_targets >= vocab_size)).any()):
        raise ValueError(f"targets must be vocabulary ids in [0, {vocab_size}) on unmasked tokens")
    if bool((temp.index_select(0, rows) <= 0).any()):
        raise ValueError("temperature must be > 0 for log-probs and entropy (on unmasked tokens)")
    size = chunk_size or auto_chunk_rows(rows.numel(), vocab_local)
    return temp.contiguous(), split_rows(rows, size)
