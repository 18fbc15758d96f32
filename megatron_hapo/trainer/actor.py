"""Build the trainer's actor from a run config: the Megatron model of ``model.path`` for this rank's layout (on
this rank's device), its optimizer and the weight-sync plan."""

from __future__ import annotations

from typing import Any

import torch

from megatron_hapo.parallel import runtime
from megatron_hapo.trainer.step import Actor

#: Bytes of full tensors per weight-sync bucket.
SYNC_BUCKET_BYTES = 512 * 2**20
#: Default ``engine.sync_tolerance`` (mean multiplicative probe error) when trainer and engine are float32, and
#: otherwise (16-bit or FP8 on either side). benchmarks/bench_sync_probe.py, CPU, random Llamas: correct float32
#: syncs <= 3.5e-6, correct 16-bit syncs 0.015-0.15, a corrupted layer 2-31, a zeroed final norm 2.8-405.
FP32_SYNC_TOLERANCE, LOW_PRECISION_SYNC_TOLERANCE = 1e-3, 0.25


def sync_tolerance(config: Any) -> float:
    """``engine.sync_tolerance``, or its default for the trainer's and the engine's dtypes."""
    if config.engine.sync_tolerance is not None:
        return config.engine.sync_tolerance
    engine_dtype = config.model.dtype if config.engine.dtype == "auto" else config.engine.dtype
    exact = config.model.dtype == "float32" and engine_dtype in ("float32", "float") and config.model.fp8 is None
    return FP32_SYNC_TOLERANCE if exact else LOW_PRECISION_SYNC_TOLERANCE


def model_overrides(model: Any, tp: int) -> dict[str, Any]:
    """The Megatron ``TransformerConfig`` settings that follow from ``config.model`` at tensor-parallel size ``tp``."""
    # PP2 x VPP with batched P2P gives wrong gradients (parallel.policy_loss.check_pipeline_schedule)
    overrides: dict[str, Any] = {"batch_p2p_comm": False} if model.virtual_pipeline else {}
    if model.sequence_parallel and tp > 1:
        overrides["sequence_parallel"] = True
    if model.recompute == "full":
        overrides.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return overrides


def build_actor(config: Any) -> Actor:
    """The actor of ``config`` (after :func:`runtime.initialize_model_parallel`); ``probe`` is left empty."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: PLC0415

    from megatron_hapo.models import HFCheckpoint, build_gpt, load_hf_weights, read_decoder_spec  # noqa: PLC0415
    from megatron_hapo.models.precision import FP8Config  # noqa: PLC0415
    from megatron_hapo.parallel.policy_loss import ParallelGroups  # noqa: PLC0415
    from megatron_hapo.rollout.weight_sync import build_sync_plan  # noqa: PLC0415

    model, optim = config.model, config.optim
    spec = read_decoder_spec(model.path)
    dtype = getattr(torch, model.dtype)
    te = model.transformer_engine or model.fp8 is not None
    fp8 = FP8Config(fp8=model.fp8, recipe=model.fp8_recipe) if model.fp8 else None
    chunks = build_gpt(
        spec,
        ddp=True,
        dtype=dtype,
        bf16=dtype == torch.bfloat16,
        te=te,
        fp8=fp8,
        distributed_optimizer=model.distributed_optimizer,
        **model_overrides(model, runtime.model_parallel_layout().tp),
    )
    groups = ParallelGroups.from_megatron()
    layout = runtime.model_parallel_layout()
    load_hf_weights(
        chunks, spec, HFCheckpoint(model.path).__getitem__, tp_rank=layout.tp_rank, tp_size=layout.tp, te=te
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=optim.lr,
            weight_decay=optim.weight_decay,
            clip_grad=optim.grad_clip,
            adam_beta1=optim.betas[0],
            adam_beta2=optim.betas[1],
            params_dtype=dtype,
            bf16=dtype == torch.bfloat16,
            use_distributed_optimizer=model.distributed_optimizer,
        ),
        chunks,
    )
    plan = build_sync_plan(chunks, spec, groups, bucket_bytes=SYNC_BUCKET_BYTES)
    train = config.train
    return Actor(
        chunks,
        optimizer,
        spec,
        groups,
        plan,
        probe=[],
        micro_batch_size=model.micro_batch_size,
        max_tokens=train.max_tokens_per_microbatch,
        forward_max_tokens=train.forward_max_tokens_per_microbatch,
        pack=train.pack_sequences,
        fused_output=model.fused_output,
        sync_tolerance=sync_tolerance(config),
        offload=model.offload == "optimizer",
    )
