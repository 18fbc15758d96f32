"""Build Megatron-Core GPT models: from a :class:`DecoderSpec` (HF families) or any ``TransformerConfig``.

``te=False`` gives the local layer spec (CPU, tests), ``te=True`` the Transformer Engine spec (GPU clusters).
Models are lists of chunks, one per virtual pipeline stage, each carrying ``layer_offset`` (global index of its
first layer), optionally wrapped in Megatron DDP with ``finalize_model_grads``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from megatron_hapo.models.hf_config import DecoderSpec
from megatron_hapo.models.precision import FP8Config, check_fp8, fp8_transformer_settings
from megatron_hapo.parallel.runtime import model_parallel_layout, on_gpu, rank_device


def build_chunks(config: Any, make_model: Callable[[int | None, bool, bool], torch.nn.Module], *,
                 dtype: torch.dtype, ddp: bool) -> list[torch.nn.Module]:  # fmt: skip
    """One model per virtual stage of the initialised model-parallel layout, on this rank's device.

    ``make_model(vp_stage, pre_process, post_process)`` builds one chunk from ``config``. As Megatron-LM's
    ``get_model``, each chunk is moved to this rank's device before the DDP wrap: Megatron's DDP puts its grad
    buffer on the current device and its optimizer refuses parameters elsewhere. With 16-bit parameters the
    gradients are accumulated and reduced in float32 (Megatron-LM forces this for bf16): summed in bf16 over many
    micro-batches they would lose the small contributions.
    """
    from megatron.core.distributed import (  # noqa: PLC0415  (megatron imported only when building)
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset  # noqa: PLC0415

    layout = model_parallel_layout()
    device = rank_device()
    chunks = []
    for stage in range(layout.vpp) if layout.vpp else [None]:
        model = make_model(stage, layout.first_stage(stage), layout.last_stage(stage))
        model = model.to(device=device, dtype=dtype)  # local-spec norms are built in float32 whatever the dtype
        if ddp:
            ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=dtype in (torch.bfloat16, torch.float16))
            model = DistributedDataParallel(config, ddp_config, model, disable_bucketing=bool(stage))
        model.layer_offset = get_transformer_layer_offset(config, vp_stage=stage)
        chunks.append(model)
    if ddp:
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = [chunk.no_sync for chunk in chunks] if layout.vpp else chunks[0].no_sync
    return chunks


def transformer_config(spec: DecoderSpec, *, dtype: torch.dtype = torch.float32, **overrides: Any) -> Any:
    """The Megatron ``TransformerConfig`` of ``spec`` for the initialised layout (CPU-safe fusions; parameters are
    initialised on the GPU there, on the CPU otherwise)."""
    from megatron.core.transformer import TransformerConfig  # noqa: PLC0415

    layout = model_parallel_layout()
    tp, pp, vpp = layout.tp, layout.pp, layout.vpp
    spec.check_parallel(tp=tp, pp=pp, vpp=vpp)
    settings = dict(
        num_layers=spec.num_layers, hidden_size=spec.hidden_size, num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_query_groups, kv_channels=spec.head_dim, ffn_hidden_size=spec.ffn_hidden_size,
        normalization="RMSNorm", layernorm_epsilon=spec.norm_eps, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, add_qkv_bias=spec.qkv_bias,
        qk_layernorm=spec.qk_norm, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp, params_dtype=dtype, pipeline_dtype=dtype,
        use_cpu_initialization=not on_gpu(), hidden_dropout=0.0, attention_dropout=0.0, bias_activation_fusion=False,
        bias_dropout_fusion=False, masked_softmax_fusion=False, gradient_accumulation_fusion=False,
        persist_layer_norm=False, apply_rope_fusion=False,
    )  # fmt: skip
    settings.update(overrides)
    return TransformerConfig(**settings)


def build_gpt(spec: DecoderSpec, *, dtype: torch.dtype = torch.float32, te: bool = False, ddp: bool = False,
              make_vocab_size_divisible_by: int = 128, fp8: FP8Config | None = None,
              **config_overrides: Any) -> list[torch.nn.Module]:  # fmt: skip
    """The Megatron GPT of an HF decoder family for this rank (random weights; load them with ``loading``).

    ``fp8`` (with ``te=True`` on a CUDA GPU) turns on FP8 through Transformer Engine after :func:`check_fp8`.
    """
    from megatron.core.models.gpt import GPTModel, gpt_layer_specs  # noqa: PLC0415

    if fp8 is not None and fp8.fp8 is not None:
        if not te:
            raise ValueError("fp8 needs the Transformer Engine layer spec: build with te=True")
        capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
        check_fp8(fp8, spec, pp=model_parallel_layout().pp, capability=capability)
        config_overrides = {**fp8_transformer_settings(fp8), **config_overrides}
    config = transformer_config(spec, dtype=dtype, **config_overrides)
    if te:
        layer_spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=spec.qk_norm)
    else:
        layer_spec = gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=spec.qk_norm, normalization="RMSNorm")
    vocab = spec.padded_vocab_size(model_parallel_layout().tp, make_vocab_size_divisible_by)

    def make_model(stage: int | None, first: bool, last: bool) -> torch.nn.Module:
        return GPTModel(
            config=config, transformer_layer_spec=layer_spec, vocab_size=vocab,
            max_sequence_length=spec.max_position_embeddings, pre_process=first, post_process=last,
            share_embeddings_and_output_weights=spec.tie_word_embeddings, position_embedding_type="rope",
            rotary_base=int(spec.rope_theta), rope_scaling=spec.rope_scaling_factor is not None,
            rope_scaling_factor=spec.rope_scaling_factor or 8.0, vp_stage=stage,
        )  # fmt: skip

    return build_chunks(config, make_model, dtype=dtype, ddp=ddp)
