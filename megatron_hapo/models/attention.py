"""Packed sequences (the THD layout) in Megatron-Core's local attention, for CPU runs and tests.

On a GPU, Transformer Engine's attention takes several sequences packed into one row (``PackedSeqParams`` with
``qkv_format="thd"`` and ``cu_seqlens``) and attends within each of them only. Megatron-Core 0.19.2's local
``DotProductAttention`` refuses packed sequences. :class:`PackedDotProductAttention` accepts them: it runs the
local attention once per length of the pack's sequences (the sequences of one length stacked as a batch), which
is a block-diagonal causal mask without computing the masked blocks (the cost is ``sum_i s_i^2``, as a varlen
kernel's, not ``(sum_i s_i)^2``; one call per sequence cost 60 % more update time on CPU at 8 equal sequences of
160 tokens per micro-batch, ``benchmarks/bench_vs_trl.py``). Rotary embeddings
already restart at each sequence in Megatron's THD path (``apply_rotary_pos_emb(cu_seqlens=...)``), so a packed
row computes what each sequence computes alone.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, cast

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
                spans = list(itertools.pairwise(packed_seq_params.cu_seqlens_q.tolist()))
                outputs, order = [], []
                for members in _same_length_runs(spans):  # one batched call per length, gathered in one op
                    length = spans[members[0]][1] - spans[members[0]][0]
                    index = torch.cat([torch.arange(spans[i][0], spans[i][1]) for i in members]).to(query.device)
                    q, k, v = (
                        x.index_select(0, index).unflatten(0, (len(members), length)).transpose(0, 1).contiguous()
                        for x in (query, key, value)
                    )  # [s, n, heads, dim]
                    out = self._causal(q, k, v, attn_mask_type)
                    outputs.append(out.transpose(0, 1).flatten(0, 1))  # [n * s, heads * dim], sequence by sequence
                    order.append(index)
                gathered = torch.cat(outputs)
                inverse = torch.empty_like(torch.cat(order))
                inverse[torch.cat(order)] = torch.arange(len(inverse), device=inverse.device)
                return gathered.index_select(0, inverse)[:, None]  # [t, 1, heads * dim]: the module makes hidden

            def _causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_type: Any) -> torch.Tensor:
                """``[s, n, heads, dim]`` query, ``[s, n, groups, dim]`` key / value -> ``[s, n, heads * dim]``:
                torch's fused causal attention where it computes what Megatron's does (causal, no dropout, no
                window, vanilla softmax), else Megatron's."""
                config = self.config
                plain = (
                    self.attention_dropout.p == 0
                    and self.softmax_offset is None
                    and config.window_size is None
                    and getattr(mask_type, "name", "") == "causal"
                )
                if not plain:
                    return super().forward(q, k, v, None, mask_type)
                scale = self.softmax_scale * (self.layer_number if config.apply_query_key_layer_scaling else 1)
                q, k, v = (x.permute(1, 2, 0, 3) for x in (q, k, v))  # [n, heads or groups, s, dim]
                if k.shape[1] != q.shape[1]:  # grouped-query attention: each group serves heads / groups heads
                    k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
                return out.permute(2, 0, 1, 3).flatten(2)

        _PACKED = PackedDotProductAttention
    return _PACKED


_PACKED: type | None = None


def _same_length_runs(spans: list[tuple[int, int]]) -> list[list[int]]:
    """Indices of the non-empty ``(start, end)`` spans grouped by length: each group is one batched attention
    call (sequences of equal length stack without padding; RL responses at ``max_tokens`` often share one). The
    group's tokens are gathered and the outputs put back by one index op each, not a slice per sequence (each
    slice's backward writes a zero tensor of the whole row: 0.4 s of a 5.5 s CPU update)."""
    groups: dict[int, list[int]] = {}
    for i, (start, end) in enumerate(spans):
        if end > start:
            groups.setdefault(end - start, []).append(i)
    return list(groups.values())


def packed_rotary_class() -> type:
    """Megatron's ``RotaryEmbedding`` that, for a THD-packed row, returns each token's own frequencies (positions
    restarting at every sequence), so that the unfused RoPE rotates the whole row in one call.

    Megatron-Core 0.19.2's unfused THD path (``rope_utils._apply_rotary_pos_emb_thd``) rotates one sequence at a
    time when its frequencies cover the longest sequence: per layer, query and key, split, rotate, copy back, and
    as many backward nodes. Given frequencies of the row's length it rotates once (its "exact mapping" case,
    which for context parallel size 1 takes them as they are). The rotation is the same; on CPU, at 8 sequences
    of 160 tokens per micro-batch, the per-sequence path cost about 1.5 s of a 6.7 s update
    (``benchmarks/bench_vs_trl.py``). Transformer Engine's fused THD kernel (GPU) restarts positions itself and
    is not given these.
    """
    global _PACKED_ROPE  # noqa: PLW0603
    if _PACKED_ROPE is None:
        from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding  # noqa: PLC0415

        class PackedRotaryEmbedding(RotaryEmbedding):
            """Per-token frequencies ``[t, 1, 1, dim]`` for a packed row (context parallel size 1)."""

            _cu_seqlens: torch.Tensor | None = None

            def get_rotary_seq_len(
                self,
                inference_context: Any,
                transformer: Any,
                transformer_input: Any,
                transformer_config: Any,
                packed_seq_params: Any = None,
                **kwargs: Any,
            ) -> int:
                params, self._cu_seqlens = packed_seq_params, None
                if params is not None and params.qkv_format == "thd" and transformer_config.context_parallel_size == 1:
                    self._cu_seqlens = params.cu_seqlens_q  # read by the forward of this same model call
                    return int(params.cu_seqlens_q[-1])
                return super().get_rotary_seq_len(
                    inference_context, transformer, transformer_input, transformer_config, params, **kwargs
                )

            def forward(
                self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group: Any = None
            ) -> torch.Tensor:
                bounds = self._cu_seqlens
                if not packed_seq or bounds is None or int(bounds[-1]) != max_seq_len:
                    return super().forward(max_seq_len, offset, packed_seq, cp_group)
                lengths = (bounds[1:] - bounds[:-1]).long().cpu()
                starts = bounds[:-1].long().cpu().repeat_interleave(lengths)
                positions = torch.arange(max_seq_len) - starts
                emb = self.get_emb(int(lengths.max()), offset)
                return emb[positions.to(emb.device)]

        _PACKED_ROPE = PackedRotaryEmbedding
    return _PACKED_ROPE


_PACKED_ROPE: type | None = None


def with_packed_rotary(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` (a local-spec ``GPTModel``, unfused RoPE) with :func:`packed_rotary_class` as its rotary
    embedding (the same module, its class swapped: no state is added or renamed)."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding  # noqa: PLC0415

    rope, config = getattr(model, "rotary_pos_emb", None), cast("Any", model).config
    if type(rope) is RotaryEmbedding and not config.apply_rope_fusion:
        rope.__class__ = packed_rotary_class()
    return model


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
