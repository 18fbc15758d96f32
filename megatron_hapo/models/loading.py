"""Load HF tensors into this rank's Megatron model chunks, tensor by tensor (see :mod:`.mapping`)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from megatron_hapo.models.hf_config import DecoderSpec
from megatron_hapo.models.mapping import Rule, rules, to_megatron_shard

if TYPE_CHECKING:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.module import MegatronModule


def unwrap(chunk: torch.nn.Module) -> GPTModel:
    """The GPTModel inside a chunk (Megatron DDP wraps it as ``.module``)."""
    return chunk.module if hasattr(chunk, "module") else chunk


def uses_te_spec(chunk: torch.nn.Module) -> bool:
    """Whether a chunk was built with the Transformer Engine layer spec (its norms live inside the linear layers)."""
    return any(name.endswith("linear_qkv.layer_norm_weight") for name, _ in unwrap(chunk).named_parameters())


def chunk_rules(chunk: MegatronModule, spec: DecoderSpec, *, te: bool) -> dict[str, Rule]:
    """``{local Megatron parameter name: rule}`` for one model chunk (its layers, embedding and head)."""
    model = unwrap(chunk)
    offset = chunk.layer_offset
    layers = range(offset, offset + len(model.decoder.layers))
    table = rules(spec, te=te, layers=layers, first=model.pre_process, last=model.post_process)

    def local(name: str) -> str:
        return re.sub(r"^decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{int(m.group(1)) - offset}.", name)

    return {local(rule.megatron): rule for rule in table}


def load_hf_weights(
    chunks: list[torch.nn.Module],
    spec: DecoderSpec,
    get_tensor: Callable[[str], torch.Tensor],
    *,
    tp_rank: int,
    tp_size: int,
    te: bool = False,
) -> set[str]:
    """Copy the HF tensors ``get_tensor(name)`` into the chunks' parameters; returns the HF names used.

    Raises ``ValueError`` naming the tensor for a missing HF tensor, a shape mismatch, or a model parameter no
    rule covers (a spec that does not describe this model).
    """
    used: set[str] = set()
    for chunk in chunks:
        model = unwrap(chunk)
        params = dict(model.named_parameters())
        table = chunk_rules(chunk, spec, te=te)
        if uncovered := sorted(set(params) - set(table)):
            raise ValueError(f"no HF mapping for Megatron parameters {uncovered[:5]} (spec does not fit the model)")
        for name, rule in table.items():
            if name not in params:
                raise ValueError(f"the model has no parameter {name} for {rule.hf} (spec does not fit the model)")
            tensors = []
            for hf_name in rule.hf:
                try:
                    tensors.append(get_tensor(hf_name))
                except KeyError:
                    raise ValueError(f"the checkpoint lacks tensor {hf_name} (needed for {name})") from None
            shard = to_megatron_shard(
                rule,
                tensors,
                spec,
                tp_rank=tp_rank,
                tp_size=tp_size,
                padded_vocab=model.vocab_size if rule.fusion == "vocab" else None,
            )
            if shard.shape != params[name].shape:
                raise ValueError(
                    f"{rule.hf}: shape {tuple(shard.shape)} does not fit {name} {tuple(params[name].shape)}"
                )
            with torch.no_grad():
                params[name].copy_(shard)
            used.update(rule.hf)
    return used
