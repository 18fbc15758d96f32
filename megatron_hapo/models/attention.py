"""Packed sequences (the THD layout) in Megatron-Core's local attention, for CPU runs and tests.

On a GPU, Transformer Engine's attention takes several sequences packed into one row (``PackedSeqParams`` with
``qkv_format="thd"`` and ``cu_seqlens``) and attends within each of them only. Megatron-Core 0.19.2's local
``DotProductAttention`` refuses packed sequences. :class:`PackedDotProductAttention` accepts them: it runs the
local attention once per sequence of the pack, which is a block-diagonal causal mask without computing the
masked blocks (the cost is ``sum_i s_i^2``, as a varlen kernel's, not ``(sum_i s_i)^2``). Rotary embeddings
already restart at each sequence in Megatron's THD path (``apply_rotary_pos_emb(cu_seqlens=...)``), so a packed
row computes what each sequence computes alone.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import torch


def packed_attention_class() -> type:
    """Megatron's ``DotProductAttention`` extended to the THD layout (a class made on first use, so that importing
    this module does not import Megatron)."""
    global _PACKED  # noqa: PLW0603
    if _PACKED is None:
        from megatron.core.transformer.dot_product_attention import DotProductAttention  # noqa: PLC0415

        class PackedDotProductAttention(DotProductAttention):
            """Local attention that also takes THD-packed ``[t, heads, dim]`` query / key / value."""

            def forward(  # noqa: PLR0917
                self,
                query: torch.Tensor,
                key: torch.Tensor,
                value: torch.Tensor,
                attention_mask: torch.Tensor | None,
                attn_mask_type: Any = None,
                attention_bias: torch.Tensor | None = None,
                packed_seq_params: Any = None,
            ) -> torch.Tensor:
                if packed_seq_params is None:
                    return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias)
                if packed_seq_params.qkv_format != "thd":
                    raise ValueError(f"packed sequences in the {packed_seq_params.qkv_format} layout: need thd")
                bounds = packed_seq_params.cu_seqlens_q.tolist()
                outputs = [
                    super(PackedDotProductAttention, self).forward(
                        query[start:end, None], key[start:end, None], value[start:end, None], None, attn_mask_type
                    )
                    for start, end in itertools.pairwise(bounds)
                    if end > start
                ]  # each [s_i, 1, heads * dim]; the attention module reshapes to [t, 1, hidden]
                return torch.cat(outputs)

        _PACKED = PackedDotProductAttention
    return _PACKED


_PACKED: type | None = None


def replace_module(spec: Any, old: type, new: Any) -> Any:
    """``spec`` (a Megatron ``ModuleSpec`` tree) with every ``old`` module class replaced by ``new``."""
    if spec is old:
        return new
    if not dataclasses.is_dataclass(spec) or isinstance(spec, type):
        return spec
    changes = {f.name: replace_module(getattr(spec, f.name), old, new) for f in dataclasses.fields(spec)}
    return dataclasses.replace(spec, **changes)


def with_packed_attention(spec: Any) -> Any:
    """The local layer ``spec`` with its core attention able to take packed sequences."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention  # noqa: PLC0415

    return replace_module(spec, DotProductAttention, packed_attention_class())
