"""The few collective helpers the parallel layer shares; a ``None`` group means "this rank alone".

Each helper allocates on the device its group's backend needs (:func:`runtime.collective_device`: CUDA for
NCCL, CPU for gloo) and hands results back on the caller's device, so a caller never has to know the backend.
"""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.distributed as dist

from megatron_hapo.parallel.runtime import collective_device

_T = TypeVar("_T")


def group_rank_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """``(rank in group, group size)``; ``(0, 1)`` for ``None``."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def all_reduce(
    tensor: torch.Tensor, op: dist.ReduceOp | dist.ReduceOp.RedOpType, group: dist.ProcessGroup | None
) -> torch.Tensor:
    """In-place all-reduce of ``tensor`` over ``group`` (a no-op for ``None`` or one rank); returns ``tensor``.

    A tensor on another device than the backend's is staged there and copied back."""
    if group_rank_size(group)[1] > 1:
        device = collective_device(group)
        if tensor.device == device:
            dist.all_reduce(tensor, op=op, group=group)
        else:
            staged = tensor.to(device)
            dist.all_reduce(staged, op=op, group=group)
            tensor.copy_(staged)
    return tensor


def gather_vocab_shards(local: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """``[..., V / tp]`` vocabulary shards -> the full ``[..., V]`` on every rank of ``group`` (for sampling)."""
    _, size = group_rank_size(group)
    if size == 1:
        return local
    device = collective_device(group)
    staged = local.to(device).contiguous()
    pieces = [torch.empty_like(staged) for _ in range(size)]
    dist.all_gather(pieces, staged, group=group)
    return torch.cat(pieces, dim=-1).to(local.device)


def objects_from_last_stage(value: _T, pp_group: dist.ProcessGroup | None) -> _T:
    """``value`` of the last pipeline stage (small Python objects, e.g. metrics) on every stage of ``pp_group``."""
    _, size = group_rank_size(pp_group)
    if size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=dist.get_process_group_ranks(pp_group)[-1], group=pp_group)
    return box[0]


def check_same_on_ranks(name: str, tensor: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    """Raise on every rank of ``group`` unless ``tensor`` (integers) is the same on all of them.

    Data-parallel ranks each train on a share of one batch; a batch that differed between them (rollouts that
    drifted apart) would train on a mixture silently. Two all-reduces of a position-weighted checksum.
    """
    _, size = group_rank_size(group)
    if size == 1:
        return
    flat = tensor.reshape(-1).to(torch.float64)
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64).remainder(9973) + 1
    checksum = torch.stack([(flat * weights).sum(), torch.tensor(float(flat.numel()), dtype=torch.float64)])
    device = collective_device(group)
    low, high = checksum.to(device), checksum.clone().to(device)
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    if not torch.equal(low, high):
        raise RuntimeError(
            f"{name} differs between the ranks of a data-parallel group: every replica must build "
            "the same batch (same engine seeds and weights)"
        )


def any_rank(flag: bool, group: dist.ProcessGroup | None = None) -> bool:
    """Whether ``flag`` is set on any rank of ``group`` (the default group: the whole job); collective."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=collective_device(group))
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return bool(value.item())


#: Bytes of one all-reduce of :func:`rows_from_owners` (bounds the staging copy on the backend's device).
ROWS_CHUNK_BYTES = 64 * 2**20


def rows_from_owners(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Every rank of ``group`` fills the rows it owns (``[N, ...]``, zeros elsewhere, each row owned by one rank);
    afterwards each rank holds every row (in place; returns ``tensor``).

    A sum of one value and zeros is exact, so this equals a gather of the owners' rows. It runs as all-reduces of
    at most :data:`ROWS_CHUNK_BYTES` each, so a large batch never stages a whole copy on the GPU (NCCL)."""
    if group_rank_size(group)[1] == 1 or tensor.numel() == 0:
        return tensor
    row_bytes = max(1, tensor[0].numel() * tensor.element_size())
    for part in tensor.split(max(1, ROWS_CHUNK_BYTES // row_bytes)):
        all_reduce(part, dist.ReduceOp.SUM, group)
    return tensor
