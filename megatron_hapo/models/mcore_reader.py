"""Read a torch_dist checkpoint piece by piece, without building the model: the streaming side of export.

Megatron stores each decoder parameter once for all layers, under a key without the layer index
(``decoder.layers.mlp.linear_fc1.weight``) with a leading layer axis of size ``num_layers``, and uses the
Transformer Engine names whichever layer spec saved it. :class:`McoreReader` reads any set of mapping rules
(``te=True`` names, global layer indices) as full, unsharded tensors, loading only the bytes of those layers, so
exporting a 70B checkpoint needs memory for one group of layers, not for the model.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import torch

from megatron_hapo.models.mapping import Rule
from megatron_hapo.models.safe_checkpoint import require_data_only

T = TypeVar("T")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def checkpoint_key(megatron_name: str) -> tuple[str, int | None]:
    """``decoder.layers.3.mlp.linear_fc2.weight`` -> (``decoder.layers.mlp.linear_fc2.weight``, 3)."""
    if match := _LAYER.match(megatron_name):
        return f"decoder.layers.{match.group(2)}", int(match.group(1))
    return megatron_name, None


class McoreReader:
    """Full tensors of a torch_dist checkpoint by Megatron parameter name (collective over the world group)."""

    def __init__(self, ckpt_dir: str | Path) -> None:
        from megatron.core import dist_checkpointing  # noqa: PLC0415

        self.ckpt_dir = Path(ckpt_dir)
        require_data_only(self.ckpt_dir)  # before any of its pickles is read
        self._metadata = dist_checkpointing.load_tensors_metadata(str(self.ckpt_dir))

    def nbytes(self, rule: Rule) -> int:
        """Bytes of the full tensor of ``rule`` (one layer of it for a decoder parameter)."""
        key, layer = checkpoint_key(rule.megatron)
        shape, dtype = self._stored(key, rule)
        per = shape[1:] if layer is not None else shape
        return int(torch.Size(per).numel()) * dtype.itemsize

    def _stored(self, key: str, rule: Rule) -> tuple[tuple[int, ...], torch.dtype]:
        if key not in self._metadata:
            raise ValueError(f"{self.ckpt_dir} has no tensor {key} (needed for {rule.hf}); wrong model or checkpoint")
        stored = self._metadata[key]
        return tuple(stored.global_shape), stored.dtype

    def read(self, group: list[Rule]) -> dict[str, torch.Tensor]:
        """``{rule.megatron: full tensor}`` for the rules of ``group``, loaded in one call."""
        from megatron.core import dist_checkpointing  # noqa: PLC0415
        from megatron.core.dist_checkpointing import ShardedTensor  # noqa: PLC0415

        request = {}
        for rule in group:
            key, layer = checkpoint_key(rule.megatron)
            shape, dtype = self._stored(key, rule)
            if layer is None:
                request[rule.megatron] = ShardedTensor.from_rank_offsets(key, torch.empty(shape, dtype=dtype))
                continue
            if layer >= shape[0]:
                raise ValueError(f"{key} holds {shape[0]} layers; layer {layer} was asked for (config mismatch)")
            # The layer axis as a real axis of a [1, ...] slice (not a "prepended" one, whose legacy load path
            # insists on every layer being requested).
            data = torch.empty((1, *shape[1:]), dtype=dtype)
            request[rule.megatron] = ShardedTensor.from_rank_offsets(key, data, (0, layer, shape[0]))
        loaded = dist_checkpointing.load(request, str(self.ckpt_dir), validate_access_integrity=False)  # a subset
        return {name: tensor[0] if checkpoint_key(name)[1] is not None else tensor for name, tensor in loaded.items()}

    def groups(self, table: list[Rule], max_bytes: int) -> Iterator[list[Rule]]:
        """``table`` in order, cut into groups of at most ``max_bytes`` (a larger single tensor is its own group)."""
        return pack_by_bytes(table, self.nbytes, max_bytes)


def pack_by_bytes(items: Iterable[T], nbytes: Callable[[T], int], max_bytes: int) -> Iterator[list[T]]:
    """``items`` in order, in consecutive groups of at most ``max_bytes`` (an item larger alone is its own group)."""
    group: list[T] = []
    size = 0
    for item in items:
        item_bytes = nbytes(item)
        if group and size + item_bytes > max_bytes:
            yield group
            group, size = [], 0
        group.append(item)
        size += item_bytes
    if group:
        yield group
