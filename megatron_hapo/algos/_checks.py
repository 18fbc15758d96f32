"""Input checks shared by the algos: a clear error instead of a silent NaN.

On CUDA tensors the finiteness check is asynchronous (``torch._assert_async``), so it never forces a host sync
inside a decode step or a loss; on CPU it raises ``ValueError`` at once with the tensor's name.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise ``ValueError`` if ``tensor`` holds NaN or +-Inf (asynchronous assert on CUDA)."""
    finite = torch.isfinite(tensor).all()
    if tensor.is_cuda:
        torch._assert_async(finite, f"{name} contains NaN or Inf")
    elif not bool(finite):
        num_bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{name} contains {num_bad} non-finite value(s) (NaN or Inf); refusing to propagate them")


def check_no_nan(name: str, tensor: torch.Tensor) -> None:
    """Raise ``ValueError`` if ``tensor`` holds NaN (``-inf`` is allowed, e.g. masked logits)."""
    ok = ~(torch.isnan(tensor).any() | torch.isposinf(tensor).any())
    if tensor.is_cuda:
        torch._assert_async(ok, f"{name} contains NaN or +Inf")
    elif not bool(ok):
        raise ValueError(f"{name} contains NaN or +Inf; refusing to propagate them")


def check_same_shape(**tensors: torch.Tensor) -> None:
    """Raise ``ValueError`` unless every named tensor has the same shape."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shape mismatch: {shapes}")


def check_range(name: str, value: float, low: float | None = None, high: float | None = None) -> None:
    """Raise ``ValueError`` unless ``low <= value <= high`` (either bound may be omitted)."""
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name}={value} is outside [{low}, {high}]")


def group_index(group_ids: torch.Tensor | Sequence[Hashable], device: torch.device) -> tuple[torch.Tensor, int]:
    """Map arbitrary group ids (ints, strings, uuids) to dense indices.

    Args:
        group_ids: ``[B]`` tensor of integers, or a sequence of hashable ids (e.g. prompt uuids).
        device: where to place the result.

    Returns:
        ``(index [B] long, num_groups)`` with ``index[i]`` in ``[0, num_groups)``; groups are numbered in order
        of first appearance, so the numbering does not depend on the ids' values.
    """
    if isinstance(group_ids, torch.Tensor):
        if group_ids.dim() != 1:
            raise ValueError(f"group_ids must be 1-D, got shape {tuple(group_ids.shape)}")
        keys: Sequence[Hashable] = group_ids.tolist()
    else:
        keys = list(group_ids)
    dense: dict[Hashable, int] = {}
    index = [dense.setdefault(key, len(dense)) for key in keys]
    return torch.tensor(index, dtype=torch.long, device=device), len(dense)


def as_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Return ``mask`` as a bool tensor with ``like``'s shape, or raise ``ValueError``."""
    if tuple(mask.shape) != tuple(like.shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match tensor shape {tuple(like.shape)}")
    return mask.bool()
