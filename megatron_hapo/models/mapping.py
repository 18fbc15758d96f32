"""HF <-> Megatron-Core parameter mapping for the dense decoder families (Llama 3, Qwen2/2.5, Qwen3).

One table serves checkpoint conversion and the weight sync into the rollout engine (``rollout.weight_sync``).
Each :class:`Rule` names one
Megatron parameter, the HF tensors it is made of, how they are fused (``copy``, ``qkv``: per KV group
``[q heads of the group, k, v]`` so that a tensor-parallel split keeps whole groups; ``gate_up``: per TP rank
``[gate shard; up shard]``; ``vocab``: padded with zero rows to the padded vocabulary) and the dimension split
across TP ranks. Everything works tensor by tensor: nothing needs the whole model in memory.

Megatron names are those of ``GPTModel`` with the local layer spec (``te=False``) or the Transformer Engine spec
(``te=True``, where the pre-attention / pre-MLP norms live inside the fused linear layers). Layer indices are
global; a pipeline stage subtracts its layer offset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from megatron_hapo.models.hf_config import DecoderSpec

Fusion = Literal["copy", "qkv", "gate_up", "vocab"]


@dataclass(frozen=True)
class Rule:
    """One Megatron parameter and the HF tensors it is built from."""

    megatron: str
    hf: tuple[str, ...]
    fusion: Fusion = "copy"
    tp_dim: int | None = None
    """Dimension split across tensor-parallel ranks (``None``: replicated)."""


def _layer_rules(spec: DecoderSpec, i: int, *, te: bool) -> list[Rule]:
    hf, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
    attn = f"{hf}self_attn."
    qkv = tuple(f"{attn}{p}_proj.weight" for p in "qkv")
    rules = [
        Rule(mg + "self_attention.linear_qkv.weight", qkv, "qkv", 0),
        Rule(mg + "self_attention.linear_proj.weight", (f"{attn}o_proj.weight",), "copy", 1),
        Rule(mg + "mlp.linear_fc1.weight", (f"{hf}mlp.gate_proj.weight", f"{hf}mlp.up_proj.weight"), "gate_up", 0),
        Rule(mg + "mlp.linear_fc2.weight", (f"{hf}mlp.down_proj.weight",), "copy", 1),
    ]
    input_norm = mg + ("self_attention.linear_qkv.layer_norm_weight" if te else "input_layernorm.weight")
    mlp_norm = mg + ("mlp.linear_fc1.layer_norm_weight" if te else "pre_mlp_layernorm.weight")
    rules += [
        Rule(input_norm, (f"{hf}input_layernorm.weight",)),
        Rule(mlp_norm, (f"{hf}post_attention_layernorm.weight",)),
    ]
    if spec.qkv_bias:
        rules.append(
            Rule(mg + "self_attention.linear_qkv.bias", tuple(f"{attn}{p}_proj.bias" for p in "qkv"), "qkv", 0)
        )
    if spec.qk_norm:
        rules += [
            Rule(mg + "self_attention.q_layernorm.weight", (f"{attn}q_norm.weight",)),
            Rule(mg + "self_attention.k_layernorm.weight", (f"{attn}k_norm.weight",)),
        ]
    return rules


def rules(
    spec: DecoderSpec, *, te: bool = False, layers: range | None = None, first: bool = True, last: bool = True
) -> list[Rule]:
    """The rules of the given global ``layers`` (default all), plus embedding (``first``) and head (``last``)."""
    out = [Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab", 0)] if first else []
    for i in layers if layers is not None else range(spec.num_layers):
        out += _layer_rules(spec, i, te=te)
    if last:
        out.append(Rule("decoder.final_layernorm.weight", ("model.norm.weight",)))
        if not spec.tie_word_embeddings:
            out.append(Rule("output_layer.weight", ("lm_head.weight",), "vocab", 0))
        elif not first:  # tied, but the head lives on another pipeline stage: Megatron keeps a copy there
            out.append(Rule("output_layer.weight", ("model.embed_tokens.weight",), "vocab", 0))
    return out


def _fuse_qkv(spec: DecoderSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``[nq*d, ...], [ng*d, ...], [ng*d, ...]`` -> ``[(nq + 2 ng) * d, ...]`` grouped per KV head."""
    groups, d = spec.num_query_groups, spec.head_dim
    rest = q.shape[1:]
    per_group = [q.reshape(groups, -1, *rest), k.reshape(groups, d, *rest), v.reshape(groups, d, *rest)]
    return torch.cat(per_group, dim=1).reshape(-1, *rest)


def _split_qkv(spec: DecoderSpec, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups, d = spec.num_query_groups, spec.head_dim
    q_per_group = spec.num_attention_heads // groups * d
    rest = fused.shape[1:]
    q, k, v = fused.reshape(groups, q_per_group + 2 * d, *rest).split([q_per_group, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def to_megatron_shard(
    rule: Rule,
    tensors: list[torch.Tensor],
    spec: DecoderSpec,
    *,
    tp_rank: int = 0,
    tp_size: int = 1,
    padded_vocab: int | None = None,
) -> torch.Tensor:
    """This TP rank's shard of ``rule.megatron`` from the HF ``tensors`` (in ``rule.hf`` order)."""
    for (
        name,
        tensor,
    ) in zip(rule.hf, tensors, strict=True):
        if tensor.dim() == 0:
            raise ValueError(f"{name}: a scalar where a weight was expected")
    if rule.fusion == "qkv":
        full = _fuse_qkv(spec, *tensors)
    elif rule.fusion == "gate_up":
        gate, up = tensors
        return torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]], dim=0)
    elif rule.fusion == "vocab":
        (full,) = tensors
        target = padded_vocab or full.shape[0]
        if target < full.shape[0]:
            raise ValueError(f"{rule.hf[0]}: {full.shape[0]} vocabulary rows exceed the padded size {target}")
        full = torch.cat([full, full.new_zeros(target - full.shape[0], *full.shape[1:])])
    else:
        (full,) = tensors
    return full if rule.tp_dim is None else full.chunk(tp_size, dim=rule.tp_dim)[tp_rank]


def to_hf(rule: Rule, shards: list[torch.Tensor], spec: DecoderSpec) -> dict[str, torch.Tensor]:
    """The HF tensors of ``rule`` from every TP rank's shard of ``rule.megatron`` (in rank order)."""
    if rule.fusion == "gate_up":
        gates, ups = zip(*(shard.chunk(2, dim=0) for shard in shards), strict=True)
        joined = (gates[0], ups[0]) if len(shards) == 1 else (torch.cat(gates), torch.cat(ups))  # no copy at TP1
        return dict(zip(rule.hf, joined, strict=True))
    full = shards[0] if rule.tp_dim is None or len(shards) == 1 else torch.cat(shards, dim=rule.tp_dim)
    if rule.fusion == "qkv":
        return dict(zip(rule.hf, _split_qkv(spec, full), strict=True))
    if rule.fusion == "vocab":
        full = full[: spec.vocab_size]
    return {rule.hf[0]: full}
