"""Build Megatron-Core GPT models: from a :class:`DecoderSpec` (HF families) or any ``TransformerConfig``.

``te=False`` gives the local layer spec (CPU, tests), ``te=True`` the Transformer Engine spec (GPU clusters).
Models are lists of chunks, one per virtual pipeline stage, each carrying ``layer_offset`` (global index of its
first layer), optionally wrapped in Megatron DDP with ``finalize_model_grads``.
"""

from __future__ import annotations

import copy
import importlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch

from megatron_hapo.models.attention import replace_module, with_packed_attention, with_packed_rotary
from megatron_hapo.models.hf_config import DecoderSpec
from megatron_hapo.models.precision import FP8Config, check_fp8, fp8_transformer_settings
from megatron_hapo.parallel.runtime import model_parallel_layout, on_gpu, rank_device

if TYPE_CHECKING:
    from megatron.core.distributed import DistributedDataParallel

logger = logging.getLogger(__name__)
#: apex's CUDA kernel that accumulates a weight gradient straight into the float32 main gradient; Megatron's own
#: linear layers (the output layer, also in the Transformer Engine spec) refuse gradient-accumulation fusion
#: without it.
WGRAD_KERNEL = "fused_weight_gradient_mlp_cuda"


def _wgrad_kernel_imports() -> bool:
    try:
        importlib.import_module(WGRAD_KERNEL)
    except ImportError:
        return False
    return True


def fusion_settings(*, te: bool, ddp: bool) -> dict[str, bool]:
    """The ``TransformerConfig`` fusions of a build: all off with the local spec (CPU, tests); with Transformer
    Engine on a GPU, RoPE fusion (TE's kernels, the packed THD one included: no per-sequence loop with host syncs
    in every attention layer) and the SwiGLU fusion; gradient-accumulation fusion (weight gradients accumulated
    straight into the float32 main gradient, no bf16 copy and add) where Megatron's DDP gives parameters a main
    gradient and apex's kernel imports (:data:`WGRAD_KERNEL`)."""
    fused = {
        "apply_rope_fusion": te,
        "bias_activation_fusion": te,
        "gradient_accumulation_fusion": te and ddp and _wgrad_kernel_imports(),
    }
    if te:
        reason = (
            ""
            if fused["gradient_accumulation_fusion"]
            else f" ({'no DDP' if not ddp else WGRAD_KERNEL + ' not importable'})"
        )
        logger.info(
            "fusions: rope on, bias-activation on, gradient-accumulation %s%s",
            "on" if fused["gradient_accumulation_fusion"] else "off",
            reason,
        )
    return fused


def build_chunks(
    config: Any,
    make_model: Callable[[int | None, bool, bool], torch.nn.Module],
    *,
    dtype: torch.dtype,
    ddp: bool,
    distributed_optimizer: bool = False,
) -> list[torch.nn.Module]:
    """One model per virtual stage of the initialised model-parallel layout, on this rank's device.

    ``make_model(vp_stage, pre_process, post_process)`` builds one chunk from ``config``. As Megatron-LM's
    ``get_model``, each chunk is moved to this rank's device before the DDP wrap: Megatron's DDP puts its grad
    buffer on the current device and its optimizer refuses parameters elsewhere. With 16-bit parameters the
    gradients are accumulated and reduced in float32 (Megatron-LM forces this for bf16): summed in bf16 over many
    micro-batches they would lose the small contributions.

    ``distributed_optimizer`` lays the DDP buffers out for Megatron's distributed optimizer (ZeRO-1: each
    data-parallel rank owns a shard of the optimizer state and main parameters) and overlaps the gradient
    reduce-scatter with the backward pass and the parameter all-gather with the next forward, as Megatron-LM's
    ``get_model`` / ``setup_model_and_optimizer`` wire it (``grad_sync_func`` / ``param_sync_func`` let the
    pipeline schedules start each chunk's communication). Parameters are then all-gathered only in the next
    forward: :func:`sync_params` gathers them at once before anything reads them outside a forward.
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
            ddp_config = DistributedDataParallelConfig(
                grad_reduce_in_fp32=dtype in (torch.bfloat16, torch.float16),
                use_distributed_optimizer=distributed_optimizer,
                overlap_grad_reduce=distributed_optimizer,
                overlap_param_gather=distributed_optimizer,
                align_param_gather=distributed_optimizer,
            )
            model = DistributedDataParallel(config, ddp_config, model, disable_bucketing=bool(stage))
        model.layer_offset = get_transformer_layer_offset(config, vp_stage=stage)
        chunks.append(model)
    if ddp:

        def per_chunk(name: str) -> Any:
            return [getattr(chunk, name) for chunk in chunks] if layout.vpp else getattr(chunks[0], name)

        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = per_chunk("no_sync")
        if distributed_optimizer:
            config.grad_sync_func, config.param_sync_func = per_chunk("start_grad_sync"), per_chunk("start_param_sync")
    return chunks


def sync_params(chunks: list[torch.nn.Module]) -> None:
    """All-gather the parameters an overlapped distributed optimizer updated, now (collective over DP): its
    step leaves them to the next forward's pre-hooks, but the weight sync and checkpoints read them directly."""
    for chunk in chunks:
        if getattr(getattr(chunk, "ddp_config", None), "overlap_param_gather", False):
            with torch.no_grad():
                cast("DistributedDataParallel", chunk).start_param_sync(force_sync=True)


def variable_shapes(pp: int, vpp: int | None) -> bool:
    """Whether pipeline stages exchange each micro-batch's shape (Megatron's ``variable_seq_lengths``), so that
    micro-batches are padded only to their own longest sequence (or packed to their own length).

    Not at PP2 with virtual stages: megatron-core 0.19.2 exchanges the shapes of both directions in one batch of
    P2P ops whatever ``batch_p2p_comm`` says, and with one peer in both directions they pair up crosswise (as the
    tensors do with batched P2P, :func:`~megatron_hapo.parallel.policy_loss.check_pipeline_schedule`): a stage
    received the shape of a gradient for an activation. There the micro-batches of one schedule call share one
    shape (:class:`~megatron_hapo.trainer.microbatch.BatchLayout` ``uniform_shape``)."""
    return pp > 1 and not (pp == 2 and vpp is not None and vpp > 1)


def transformer_config(spec: DecoderSpec, *, dtype: torch.dtype = torch.float32, **overrides: Any) -> Any:
    """The Megatron ``TransformerConfig`` of ``spec`` for the initialised layout (CPU-safe fusions; parameters are
    initialised on the GPU there, on the CPU otherwise)."""
    from megatron.core.transformer import TransformerConfig  # noqa: PLC0415

    layout = model_parallel_layout()
    tp, pp, vpp = layout.tp, layout.pp, layout.vpp
    spec.check_parallel(tp=tp, pp=pp, vpp=vpp)
    settings = dict(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_query_groups,
        kv_channels=spec.head_dim,
        ffn_hidden_size=spec.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=spec.norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=spec.qkv_bias,
        qk_layernorm=spec.qk_norm,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        use_cpu_initialization=not on_gpu(),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        variable_seq_lengths=variable_shapes(pp, vpp),
        moe_token_dispatcher_type="alltoall",  # allgather refuses it
    )
    settings.update(overrides)
    return TransformerConfig(**settings)


def build_gpt(
    spec: DecoderSpec,
    *,
    dtype: torch.dtype = torch.float32,
    te: bool = False,
    ddp: bool = False,
    make_vocab_size_divisible_by: int = 128,
    fp8: FP8Config | None = None,
    distributed_optimizer: bool = False,
    **config_overrides: Any,
) -> list[torch.nn.Module]:
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
    config_overrides = {**fusion_settings(te=te, ddp=ddp), **config_overrides}
    config = transformer_config(spec, dtype=dtype, **config_overrides)

    if te:
        layer_spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=spec.qk_norm)
    else:  # the local attention, extended to packed sequences (models.attention)
        layer_spec = with_packed_attention(
            gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=spec.qk_norm, normalization="RMSNorm")
        )
    vocab = spec.padded_vocab_size(model_parallel_layout().tp, make_vocab_size_divisible_by)

    def block_spec(stage: int | None) -> Any:
        return layer_spec if te else sequence_parallel_block_spec(config, layer_spec, stage)

    def make_model(stage: int | None, first: bool, last: bool) -> torch.nn.Module:
        model = GPTModel(
            config=config,
            transformer_layer_spec=block_spec(stage),
            vocab_size=vocab,
            max_sequence_length=spec.max_position_embeddings,
            pre_process=first,
            post_process=last,
            share_embeddings_and_output_weights=spec.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(spec.rope_theta),
            rope_scaling=spec.rope_scaling_factor is not None,
            rope_scaling_factor=spec.rope_scaling_factor or 8.0,
            vp_stage=stage,
        )
        return model if te else with_packed_rotary(model)

    return build_chunks(config, make_model, dtype=dtype, ddp=ddp, distributed_optimizer=distributed_optimizer)


def sequence_parallel_block_spec(config: Any, layer_spec: Any, stage: int | None) -> Any:
    """The local ``layer_spec`` as a block of this stage's layers whose torch norms take sequence parallelism
    (they refuse it unless their weights are flagged, :class:`SequenceParallelTorchNorm`); unchanged without it."""
    if not config.sequence_parallel:
        return layer_spec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm  # noqa: PLC0415
    from megatron.core.transformer.transformer_block import (  # noqa: PLC0415
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    layers = get_num_layers_to_build(config, vp_stage=stage)
    norm_spec = replace_module(layer_spec, WrappedTorchNorm, SequenceParallelTorchNorm)
    return TransformerBlockSubmodules(layer_specs=[norm_spec] * layers, layer_norm=SequenceParallelTorchNorm)


class SequenceParallelTorchNorm:
    """Megatron's ``WrappedTorchNorm`` (the local spec's norm) under sequence parallelism.

    Megatron-Core 0.19.2 refuses sequence parallelism in it only because it does not mark its weight: under
    sequence parallelism each TP rank normalises ``1 / TP`` of the sequence, so the weight's gradient is partial
    and ``finalize_model_grads`` all-reduces it over TP for parameters flagged ``sequence_parallel``, as the
    Transformer Engine and Apex norms flag theirs. (The q / k norms, flagged too as TE's are, are summed over TP
    by name in any case; ``finalize_model_grads`` reduces a weight once whichever rule picks it.)"""

    # A factory class, as Megatron's WrappedTorchNorm: a layer spec needs a class, __new__ returns the torch norm.
    def __new__(cls, config: Any, hidden_size: int, eps: float = 1e-5, **kwargs: Any) -> torch.nn.Module:  # type: ignore[misc]
        from megatron.core.transformer.torch_norm import WrappedTorchNorm  # noqa: PLC0415

        plain = copy.copy(config)
        plain.sequence_parallel = False
        norm = WrappedTorchNorm(plain, hidden_size, eps, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm
