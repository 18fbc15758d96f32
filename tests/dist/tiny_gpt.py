"""A tiny Megatron-Core GPTModel on CPU for the parallel-invariance tests: build, load full weights, gather grads.

Weights are loaded from one single-rank state dict into every TP / PP layout (tensor-parallel parameters are
split along Megatron's ``partition_dim``; pipeline stages shift the layer index), so every layout computes the
same function (the model's MLP is not gated, so a plain split is the right TP layout). A model is a list of
chunks (one per virtual pipeline stage), as Megatron's schedules take it.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist

VOCAB, SEQ, LAYERS = 128, 16, 4


def init_megatron(tp: int, pp: int, vpp: int | None = None) -> None:
    """(Re)initialise Megatron's model-parallel state on the current gloo world (CPU patches applied)."""
    from megatron_hapo.parallel import runtime

    runtime.initialize_model_parallel(tp, pp, vpp)


def build_model(*, per_token_loss: bool = False, ddp: bool = True, batch_p2p_comm: bool = True) -> list:
    """The float64 tiny GPT's chunks for the current layout (see :func:`megatron_hapo.models.build_tiny_gpt`)."""
    from megatron_hapo.models import TinyGPTShape, build_tiny_gpt

    shape = TinyGPTShape(vocab_size=VOCAB, seq_length=SEQ, num_layers=LAYERS)
    return build_tiny_gpt(
        shape, dtype=torch.float64, ddp=ddp, calculate_per_token_loss=per_token_loss, batch_p2p_comm=batch_p2p_comm
    )


def _named_parameters(chunks: list):
    """``(global name, parameter)`` of every chunk: the layer index shifted by the chunk's offset."""
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            shifted = re.sub(r"layers\.(\d+)\.", lambda m, c=chunk: f"layers.{int(m.group(1)) + c.layer_offset}.", name)
            yield shifted.removeprefix("module."), param


def load_full_state(chunks: list, full: dict[str, torch.Tensor]) -> None:
    """Copy the single-rank weights ``full`` into this rank's shard of the model ``chunks``."""
    from megatron.core import parallel_state as mpu

    tp_rank, tp_size = mpu.get_tensor_model_parallel_rank(), mpu.get_tensor_model_parallel_world_size()
    with torch.no_grad():
        for name, param in _named_parameters(chunks):
            value = full[name]
            if getattr(param, "tensor_model_parallel", False):
                value = value.chunk(tp_size, dim=param.partition_dim)[tp_rank]
            param.copy_(value)


def full_state(chunks: list) -> dict[str, torch.Tensor]:
    """Parameters of a single-rank model by global name."""
    return {name: p.detach().clone() for name, p in _named_parameters(chunks)}


def full_grads(chunks: list) -> dict[str, torch.Tensor]:
    """Every parameter's gradient (``main_grad`` under DDP), un-sharded, by global name, on every rank."""
    from megatron.core import parallel_state as mpu

    tp_group, tp_size = mpu.get_tensor_model_parallel_group(), mpu.get_tensor_model_parallel_world_size()
    local = {}
    for name, param in _named_parameters(chunks):
        grad = param.main_grad if hasattr(param, "main_grad") else param.grad
        if getattr(param, "tensor_model_parallel", False) and tp_size > 1:
            pieces = [torch.empty_like(grad) for _ in range(tp_size)]
            dist.all_gather(pieces, grad.contiguous(), group=tp_group)
            grad = torch.cat(pieces, dim=param.partition_dim)
        local[name] = grad.detach().clone()
    gathered: list[dict[str, torch.Tensor]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, local)
    merged: dict[str, torch.Tensor] = {}
    for part in gathered:
        merged.update(part)
    return merged
