"""Collectives of the rollout weight sync: gather TP shards, share a pipeline stage's tensors with the others.

Every function is called by all ranks of the group it names, in the same order (the sync plan is identical on
every rank).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_hapo.parallel import runtime
from megatron_hapo.parallel.collectives import group_rank_size


def gather_shards(shard: torch.Tensor, group: dist.ProcessGroup | None) -> list[torch.Tensor]:
    """Every TP rank's ``shard`` (same shape on all), in rank order."""
    _, size = group_rank_size(group)
    if size == 1:
        return [shard]
    staged = shard.to(runtime.collective_device(group)).contiguous()
    pieces = [torch.empty_like(staged) for _ in range(size)]
    dist.all_gather(pieces, staged, group=group)
    return [piece.to(shard.device) for piece in pieces]


def all_gather_objects(value: object, group: dist.ProcessGroup | None) -> list:
    """``value`` of every rank of ``group`` (small Python objects: layouts, names, shapes); ``None``: this rank
    alone (unlike :func:`runtime.all_gather_objects`, where ``None`` is the whole job)."""
    if group_rank_size(group)[1] == 1:
        return [value]
    return runtime.all_gather_objects(value, group)


def share_from_stage(
    tensors: dict[str, torch.Tensor] | None,
    src_index: int,
    group: dist.ProcessGroup | None,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """The named tensors of group rank ``src_index`` on every rank of ``group`` (one flat broadcast per dtype).

    ``tensors`` is read on the source rank only (``None`` elsewhere); the broadcast runs on the backend's device
    and every rank gets the tensors on ``device``.
    """
    rank, size = group_rank_size(group)
    if size == 1:
        return dict(tensors or {})
    assert group is not None  # group_rank_size: a None group has size 1
    if rank == src_index and tensors is None:
        raise ValueError("share_from_stage: the source rank must pass its tensors")
    source = tensors or {}
    src = dist.get_global_rank(group, src_index)
    staging = runtime.collective_device(group)
    header: list[list[tuple[str, tuple[int, ...], torch.dtype]] | None] = [
        [(name, tuple(t.shape), t.dtype) for name, t in source.items()] if rank == src_index else None
    ]
    dist.broadcast_object_list(header, src=src, group=group)
    entries = header[0]
    assert entries is not None  # filled by the broadcast on every rank
    out: dict[str, torch.Tensor] = {}
    for dtype in sorted({d for _, _, d in entries}, key=str):
        names = [(name, shape) for name, shape, d in entries if d == dtype]
        numel = sum(torch.Size(shape).numel() for _, shape in names)
        if rank == src_index:
            flat = torch.cat([source[name].reshape(-1) for name, _ in names]).to(staging)
        else:
            flat = torch.empty(numel, dtype=dtype, device=staging)
        dist.broadcast(flat, src=src, group=group)
        flat = flat.to(device)
        for (name, shape), piece in zip(names, flat.split([torch.Size(s).numel() for _, s in names]), strict=True):
            out[name] = piece.view(shape)
    return out
