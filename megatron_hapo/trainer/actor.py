"""The trainer's actor: the Megatron model replica of this rank, its optimizer, and how its step cuts batches;
built from a run config (:func:`build_actor`), with the rollout engines it syncs into (:func:`build_engines`).
The entry point (``megatron_hapo.train``), the demos and the tests build them here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from megatron_hapo.config import Config
from megatron_hapo.config.run import ModelConfig, microbatch_token_budget
from megatron_hapo.models.hf_config import DecoderSpec
from megatron_hapo.parallel import runtime
from megatron_hapo.parallel.collectives import group_rank_size
from megatron_hapo.parallel.policy_loss import ParallelGroups
from megatron_hapo.parallel.runtime import on_gpu
from megatron_hapo.rollout.engine import RolloutEngine
from megatron_hapo.rollout.weight_sync import SyncPlan
from megatron_hapo.trainer.microbatch import SEQUENCE_MULTIPLE, BatchLayout

if TYPE_CHECKING:
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.optimizer import MegatronOptimizer


@dataclass
class Actor:
    """The trainer's model replica on this rank and what its step needs."""

    chunks: list[DistributedDataParallel]
    """The model chunks of this rank (one per virtual pipeline stage)."""
    optimizer: MegatronOptimizer
    spec: DecoderSpec
    groups: ParallelGroups
    sync_plan: SyncPlan
    probe: list[int]
    micro_batch_size: int = 4
    """Sequences per micro-batch without a token budget."""
    max_tokens: int | None = None
    """Token budget of a training micro-batch (``train.max_tokens_per_microbatch``), or ``None``."""
    forward_max_tokens: int | None = None
    """Token budget of a forward-only micro-batch; ``None``: twice ``max_tokens``."""
    pack: bool = False
    """Pack several sequences into one row under the budget (``train.pack_sequences``)."""
    fused_output: bool = False
    """Log-probs and entropies without logits (``model.fused_output``)."""
    sequence_multiple: int = SEQUENCE_MULTIPLE
    """Micro-batch rows are padded to a multiple of this (:func:`~megatron_hapo.models.precision.token_multiple`:
    what FP8 and sequence parallelism need)."""
    sync_tolerance: float = 1e-3
    offload: bool = False
    """``model.offload=optimizer``: optimizer state and gradient buffers leave the GPU outside the updates."""
    offloaded: bool = False

    def offload_training_state(self) -> None:
        """Move the optimizer state to CPU memory and release the gradient buffers (with ``offload``), through
        Megatron-Core's own hooks for RL (``MegatronOptimizer.offload_to_cpu``, DDP ``offload_grad_buffers``).
        Off a GPU the optimizer state stays (it is host memory already); the gradient buffers are released."""
        if self.offload and not self.offloaded:
            for chunk in self.chunks:
                chunk.offload_grad_buffers(synchronize=on_gpu(), empty_cache=on_gpu())
            self.optimizer.offload_to_cpu()
            self.offloaded = True

    def restore_training_state(self) -> None:
        """Undo :meth:`offload_training_state` before an update (the gradient buffers come back zeroed)."""
        if self.offloaded:
            self.optimizer.restore_from_cpu()
            for chunk in self.chunks:
                chunk.restore_grad_buffers(synchronize=on_gpu())
            self.offloaded = False

    @property
    def microbatch_multiple(self) -> int:
        """Each schedule call runs a multiple of this many micro-batches: with virtual stages, Megatron's
        interleaved schedule takes them in groups of the pipeline size (``microbatch_group_size_per_vp_stage``)."""
        return group_rank_size(self.groups.pp)[1] if len(self.chunks) > 1 else 1

    def layout(self, *, forward_only: bool = False) -> BatchLayout:
        """How this actor cuts a share of sequences into micro-batches (training or forward-only)."""
        budget = self.max_tokens
        if forward_only and budget is not None:
            budget = self.forward_max_tokens or 2 * budget
        uniform = group_rank_size(self.groups.pp)[1] > 1 and not self.chunks[0].config.variable_seq_lengths
        return BatchLayout(
            micro_batch_size=self.micro_batch_size,
            max_tokens=budget,
            pack=self.pack and budget is not None,
            count_multiple=self.microbatch_multiple,
            uniform_shape=uniform,
            sequence_multiple=self.sequence_multiple,
        )


#: Bytes of full tensors per weight-sync bucket.
SYNC_BUCKET_BYTES = 512 * 2**20
#: Default ``engine.sync_tolerance`` (mean multiplicative probe error) when trainer and engine are float32, and
#: otherwise (16-bit or FP8 on either side). benchmarks/bench_sync_probe.py, CPU, random Llamas: correct float32
#: syncs <= 3.5e-6, correct 16-bit syncs 0.015-0.15, a corrupted layer 2-31, a zeroed final norm 2.8-405.
FP32_SYNC_TOLERANCE, LOW_PRECISION_SYNC_TOLERANCE = 1e-3, 0.25


def sync_tolerance(config: Config) -> float:
    """``engine.sync_tolerance``, or its default for the trainer's and the engine's dtypes."""
    if config.engine.sync_tolerance is not None:
        return config.engine.sync_tolerance
    engine_dtype = config.model.dtype if config.engine.dtype == "auto" else config.engine.dtype
    exact = config.model.dtype == "float32" and engine_dtype in ("float32", "float") and config.model.fp8 is None
    return FP32_SYNC_TOLERANCE if exact else LOW_PRECISION_SYNC_TOLERANCE


def model_overrides(model: ModelConfig, tp: int) -> dict[str, Any]:
    """The Megatron ``TransformerConfig`` settings that follow from ``config.model`` at tensor-parallel size ``tp``."""
    # PP2 x VPP with batched P2P gives wrong gradients (parallel.policy_loss.check_pipeline_schedule)
    overrides: dict[str, Any] = {"batch_p2p_comm": False} if model.virtual_pipeline else {}
    if model.sequence_parallel and tp > 1:
        overrides["sequence_parallel"] = True
    if model.recompute == "full":
        overrides.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return overrides


def build_actor(config: Config, probe_prompts: Sequence[Sequence[int]] = ()) -> Actor:
    """The actor of ``config`` on this rank (after :func:`runtime.initialize_model_parallel`): ``model.path``'s
    weights in this rank's share, the optimizer, the weight-sync plan, and the sync probe drawn from
    ``probe_prompts`` (the training prompts; none: no probe)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: PLC0415

    from megatron_hapo.models import HFCheckpoint, build_gpt, load_hf_weights, read_decoder_spec  # noqa: PLC0415
    from megatron_hapo.models.precision import FP8Config, token_multiple  # noqa: PLC0415
    from megatron_hapo.rollout.weight_sync import PROBE_TOKENS, build_sync_plan, sync_probe  # noqa: PLC0415

    model, optim = config.model, config.optim
    if not model.path:
        raise ValueError("model.path is not set: the policy's HF checkpoint directory")
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
    # vLLM scores a prompt only when it leaves room for one output token: at most context - 1 tokens
    train, probe_length = config.train, min(PROBE_TOKENS, (context_length(config) - 1) // 16 * 16)
    return Actor(
        chunks,
        optimizer,
        spec,
        groups,
        plan,
        probe=sync_probe(list(probe_prompts), length=probe_length) if probe_prompts else [],
        micro_batch_size=model.micro_batch_size,
        max_tokens=microbatch_token_budget(config),
        forward_max_tokens=train.forward_max_tokens_per_microbatch,
        pack=train.pack_sequences,
        fused_output=model.fused_output,
        sequence_multiple=token_multiple(
            model.fp8_recipe if model.fp8 else None, tp=layout.tp, sequence_parallel=model.sequence_parallel
        ),
        sync_tolerance=sync_tolerance(config),
        offload=model.offload == "optimizer",
    )


def context_length(config: Config) -> int:
    """The engines' context: the longest prompt plus the longest response."""
    return config.rollout.max_prompt_length + config.rollout.max_response_length


def build_engine(config: Config, model_dir: str, **kwargs: Any) -> RolloutEngine:
    """A rollout engine of ``config.engine`` serving ``model_dir``, divided over the engine replicas
    (:mod:`megatron_hapo.rollout.divided`: each replica generates its share of every call); every rank calls it.
    ``kwargs`` go to :func:`~megatron_hapo.rollout.factory.make_engine`."""
    from megatron_hapo.rollout.divided import DividedEngine  # noqa: PLC0415
    from megatron_hapo.rollout.factory import make_engine  # noqa: PLC0415

    engine = make_engine(
        model_dir,
        engine=config.engine,
        dtype=config.model.dtype,
        seed=config.train.seed,
        max_model_len=context_length(config),
        **kwargs,
    )
    return DividedEngine(engine, ranks_per_engine=config.engine.tensor_parallel)


def build_guide_engine(config: Config, policy_engine: RolloutEngine) -> RolloutEngine | None:
    """The frozen guide policy's engine of a mixed-policy algorithm (``None`` without one).

    vLLM 0.32 lets one engine per process sleep (its sleep-mode allocator is process-wide), so the guide engine
    is built without sleep mode and with its own share, ``engine.guide_gpu_memory_utilization``, while the policy
    engine sleeps: vLLM's start-up memory check then sees the memory the policy engine handed back.
    """
    guide_path = config.algo.guide_policy.model_path
    if config.algo.guide_policy.kind == "none" or guide_path is None:
        return None
    policy_engine.sleep(level=1)  # woken again before any sync: its weights must come back
    guide = build_engine(
        config, guide_path, sleep_mode=False, gpu_memory_utilization=config.engine.guide_gpu_memory_utilization
    )
    policy_engine.wake_up()
    return guide


def build_engines(config: Config) -> tuple[RolloutEngine, RolloutEngine | None]:
    """The policy's rollout engine of ``model.path`` and the guide's (:func:`build_guide_engine`)."""
    if not config.model.path:
        raise ValueError("model.path is not set: the policy's HF checkpoint directory")
    engine = build_engine(config, config.model.path)
    return engine, build_guide_engine(config, engine)
