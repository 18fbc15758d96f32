"""A tiny Megatron-Core GPTModel on CPU for the parallel-invariance tests: build, load full weights, gather grads.

Weights are loaded from one single-rank state dict into every TP / PP layout (tensor-parallel parameters are
split along Megatron's ``partition_dim``; pipeline stages shift the layer index), so every layout computes the
same function. The MLP is not gated (GeLU), so a plain split of ``linear_fc1`` is the right TP layout. A model
is a list of chunks (one per virtual pipeline stage), as Megatron's schedules take it.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist

VOCAB, SEQ, LAYERS = 128, 16, 4


def init_megatron(tp: int, pp: int, vpp: int | None = None) -> None:
    """(Re)initialise Megatron's model-parallel state on the current gloo world."""
    from megatron.core import parallel_state as mpu
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_hapo.parallel import megatron_cpu

    megatron_cpu.install()
    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    mpu.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp
    )
    model_parallel_cuda_manual_seed(1234)


def build_model(*, per_token_loss: bool = False, ddp: bool = True, batch_p2p_comm: bool = True) -> list:
    """The tiny GPT's chunks for the current layout, wrapped in Megatron DDP (with ``finalize_model_grads``)."""
    from megatron.core import parallel_state as mpu
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    vpp = mpu.get_virtual_pipeline_model_parallel_world_size()
    config = TransformerConfig(
        num_layers=LAYERS, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
        tensor_model_parallel_size=mpu.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=mpu.get_pipeline_model_parallel_world_size(),
        virtual_pipeline_model_parallel_size=vpp, batch_p2p_comm=batch_p2p_comm,
        params_dtype=torch.float64, pipeline_dtype=torch.float64, use_cpu_initialization=True,
        hidden_dropout=0.0, attention_dropout=0.0, bias_dropout_fusion=False, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, calculate_per_token_loss=per_token_loss,
    )  # fmt: skip
    chunks = []
    for stage in range(vpp) if vpp else [None]:
        model = GPTModel(
            config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=VOCAB,
            max_sequence_length=SEQ, position_embedding_type="rope", share_embeddings_and_output_weights=False,
            pre_process=mpu.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=mpu.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage), vp_stage=stage,
        ).double()  # float64 throughout (norms are built in float32): only the loss kernel's float32 rounding stays
        if ddp:
            ddp_config = DistributedDataParallelConfig()
            model = DistributedDataParallel(config, ddp_config, model, disable_bucketing=bool(stage))
        model.layer_offset = get_transformer_layer_offset(config, vp_stage=stage)
        chunks.append(model)
    if ddp:
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = [chunk.no_sync for chunk in chunks] if vpp else chunks[0].no_sync
    return chunks


def _named_parameters(chunks: list):  # noqa: ANN202
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
