"""Plan a run on a cluster without GPUs: layout checks and per-rank memory for training and rollout.

Parameters are counted exactly from the Megatron layout of the HF architecture (``DecoderSpec``): the
embedding and output layer split over TP with Megatron's vocabulary padding, transformer layers split over
PP stages and TP (norms replicated). Memory per GPU, in bytes:

- training (the heaviest pipeline stage): parameters (``model.dtype``), gradients (float32: Megatron DDP's
  buffer accumulates and reduces in float32 for 16-bit parameters), optimizer state (Adam m and v in float32,
  plus float32 main parameters when the model is bfloat16; divided by the data-parallel size with Megatron's
  distributed optimizer, ``model.distributed_optimizer``), activations of the micro-batches in flight (1F1B
  keeps up to ``pp`` on the first stage), and the float32 logits of one micro-batch on the last stage. Per
  layer and micro-batch of ``s`` tokens, with flash attention, activations take ``s b h (10 + 24 / tp)`` bytes
  in 16-bit precision without sequence parallelism and ``34 s b h / tp`` with it (Korthikanti et al., 2022),
  and the layer input, ``2 s b h`` (``/ tp`` with sequence parallelism), with full recomputation (one layer
  is rebuilt at a time).
- rollout (vLLM, colocated, asleep during training): the trainer keeps its parameters on the GPU while the
  engine generates, and its gradient buffer and optimizer state too unless ``model.offload=optimizer`` moves
  them to CPU memory; that resident state plus ``engine.gpu_memory_utilization x GPU`` must fit the GPU. The
  engine's weights are ``/ engine TP`` in 16-bit; the rest of ``engine.gpu_memory_utilization x GPU`` is KV
  cache, ``2 L kv_heads head_dim`` 16-bit values per token (KV heads split over the engine TP, replicated when
  TP exceeds them). vLLM schedules as many sequences as the cache holds (up to ``max_num_seqs``), so the plan
  reports how many full-length sequences fit and fails only when not even one does.
- the guide engine of mixed-policy algorithms (``algo.guide_policy.kind=mixed``): vLLM lets one engine per process
  sleep, so the guide keeps ``engine.guide_gpu_memory_utilization x GPU`` for the whole run, through training
  too. Its weights (the guide's parameters in 16-bit ``/ engine TP``) and one full-length sequence must fit that
  share; the share must fit beside the trainer in both phases.

These are estimates of what dominates, not an allocator trace; the report says so and adds a fixed allowance
for the CUDA context and NCCL buffers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from megatron_hapo.models.hf_config import DecoderSpec
from megatron_hapo.models.precision import FP8Config, check_fp8, token_multiple

if TYPE_CHECKING:
    from megatron_hapo.config import Config

GIB = 2**30
#: CUDA context, NCCL buffers and allocator slack per GPU (an allowance, not a measurement).
RUNTIME_RESERVE_BYTES = 3 * GIB
H100_CAPABILITY = (9, 0)


@dataclass
class Layout:
    """A cluster and the parallel layout of one run."""

    nodes: int
    gpus_per_node: int
    tp: int
    pp: int
    vpp: int | None
    engine_tp: int

    @property
    def world(self) -> int:
        """GPUs in the job."""
        return self.nodes * self.gpus_per_node

    @property
    def dp(self) -> int:
        """Data-parallel replicas of the trainer."""
        return self.world // (self.tp * self.pp)


@dataclass
class Plan:
    """What the planner found: errors (the run cannot start), notes, and the memory estimates in bytes."""

    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    training: dict[str, float] = field(default_factory=dict)
    rollout: dict[str, float] = field(default_factory=dict)
    params_per_stage: list[int] = field(default_factory=list)
    total_params: int = 0
    offloaded: tuple[str, ...] = ()
    """Parts of ``training`` that leave the GPU while the engine generates (``model.offload``)."""
    guide: dict[str, float] = field(default_factory=dict)
    """The mixed-policy guide engine's ``weights`` and ``kv_per_sequence`` per GPU and its ``engine_tp`` (empty
    without a guide)."""


def layer_params(spec: DecoderSpec, tp: int) -> int:
    """Parameters of one transformer layer on one TP rank."""
    h, heads, groups, d = spec.hidden_size, spec.num_attention_heads, spec.num_query_groups, spec.head_dim
    qkv = h * (heads + 2 * groups) * d + (heads + 2 * groups) * d * spec.qkv_bias
    attention = (qkv + heads * d * h) // tp
    mlp = 3 * h * spec.ffn_hidden_size // tp
    norms = 2 * h + 2 * d * spec.qk_norm  # replicated on every TP rank
    return attention + mlp + norms


def stage_params(spec: DecoderSpec, tp: int, pp: int) -> list[int]:
    """Parameters per TP rank of each pipeline stage (embedding on the first, final norm + output on the last)."""
    vocab = spec.padded_vocab_size(tp) * spec.hidden_size // tp
    per_stage = [spec.num_layers // pp * layer_params(spec, tp) for _ in range(pp)]
    per_stage[0] += vocab
    per_stage[-1] += spec.hidden_size + (vocab if (not spec.tie_word_embeddings or pp > 1) else 0)
    return per_stage


def total_params(spec: DecoderSpec) -> int:
    """Parameters of the unpadded model (as the HF checkpoint counts them)."""
    embedding = spec.vocab_size * spec.hidden_size
    output = 0 if spec.tie_word_embeddings else embedding
    return embedding + output + spec.hidden_size + spec.num_layers * layer_params(spec, 1)


def check_layout(spec: DecoderSpec, config: Config, layout: Layout) -> list[str]:
    """Every divisibility constraint of the trainer and the engine; one message per violation."""
    errors = []
    model_parallel = layout.tp * layout.pp
    if layout.world % model_parallel:
        errors.append(
            f"{layout.world} GPUs are not divisible by model.tensor_parallel x model.pipeline_parallel "
            f"= {model_parallel}"
        )
    try:
        spec.check_parallel(tp=layout.tp, pp=layout.pp, vpp=layout.vpp)
    except ValueError as exc:
        errors.append(f"trainer layout: {exc}")
    if layout.vpp and layout.pp == 1:
        errors.append("model.virtual_pipeline needs model.pipeline_parallel > 1")
    errors += _batch_errors(config)
    errors += _padding_errors(config, layout)
    errors += _engine_errors(spec, config, layout)
    if config.model.fp8:
        errors += _fp8_errors(spec, config, layout)
    longest = config.rollout.max_prompt_length + config.rollout.max_response_length
    if longest > spec.max_position_embeddings:
        errors.append(
            f"rollout.max_prompt_length + max_response_length = {longest} exceeds the model's "
            f"max_position_embeddings {spec.max_position_embeddings}"
        )
    return errors


def _fp8_errors(spec: DecoderSpec, config: Config, layout: Layout) -> list[str]:
    """FP8 settings checked as on an H100 (compute capability 9.0), the GPUs the run configs target."""
    fp8 = FP8Config(fp8=config.model.fp8, recipe=config.model.fp8_recipe)
    try:
        check_fp8(fp8, spec, pp=layout.pp, capability=H100_CAPABILITY)
    except ValueError as exc:
        return [f"model.fp8 on H100: {exc}"]
    return []


def row_multiple(config: Config, layout: Layout) -> int:
    """The multiple every micro-batch row is padded to in this layout (FP8 recipe, TP with sequence parallelism)."""
    recipe = config.model.fp8_recipe if config.model.fp8 else None
    return token_multiple(recipe, tp=layout.tp, sequence_parallel=config.model.sequence_parallel)


def _padding_errors(config: Config, layout: Layout) -> list[str]:
    """A token budget must hold one padded row of the layout's multiple."""
    multiple, train = row_multiple(config, layout), config.train
    errors = []
    for key in ("max_tokens_per_microbatch", "forward_max_tokens_per_microbatch"):
        budget = getattr(train, key)
        if budget is not None and budget < multiple:
            errors.append(
                f"train.{key}={budget} is below one padded row of this layout ({multiple} tokens: fp8 / sequence "
                f"parallelism at TP {layout.tp}): raise it to {multiple} or more"
            )
    return errors


def _batch_errors(config: Config) -> list[str]:
    """The step's prompts must split into mini-batches. (Micro-batches always have a token budget, set or derived
    from the rollout lengths: any number of sequences per rank splits into them, and their count is filled up to
    the interleaved schedule's multiple.)"""
    train, errors = config.train, []
    if train.prompts_per_step % train.mini_batch_prompts:
        errors.append(
            f"train.mini_batch_prompts={train.mini_batch_prompts} does not divide "
            f"train.prompts_per_step={train.prompts_per_step}"
        )
    return errors


def _engine_errors(spec: DecoderSpec, config: Config, layout: Layout) -> list[str]:
    tp = layout.engine_tp
    errors = []
    if layout.world % tp:
        errors.append(f"engine.tensor_parallel={tp} does not divide the {layout.world} GPUs")
    if tp > layout.gpus_per_node:
        errors.append(f"engine.tensor_parallel={tp} spans nodes ({layout.gpus_per_node} GPUs per node)")
    if spec.num_attention_heads % tp:
        errors.append(f"num_attention_heads={spec.num_attention_heads} is not divisible by engine.tensor_parallel={tp}")
    groups = spec.num_query_groups
    if groups % tp and tp % groups:
        errors.append(f"num_key_value_heads={groups} and engine.tensor_parallel={tp}: one must divide the other")
    return errors


def microbatch_tokens(config: Config) -> int:
    """The most tokens one training micro-batch computes on: its budget (derived from the rollout lengths where
    none is set, as the trainer derives it), or one longest sequence where that is more."""
    from megatron_hapo.config.run import microbatch_token_budget  # noqa: PLC0415

    longest = config.rollout.max_prompt_length + config.rollout.max_response_length
    budget = microbatch_token_budget(config)
    return max(budget, longest) if budget is not None else longest * config.model.micro_batch_size


def _activation_bytes(spec: DecoderSpec, config: Config, layout: Layout) -> tuple[float, float]:
    """``(activations of the micro-batches in flight on the first stage, float32 logits on the last)``.

    A micro-batch holds ``train.max_tokens_per_microbatch`` tokens (or one longest sequence where that is more),
    without a budget ``model.micro_batch_size`` sequences of the longest possible length."""
    h = spec.hidden_size
    tokens = microbatch_tokens(config)
    split = layout.tp if config.model.sequence_parallel and layout.tp > 1 else 1  # sequence parallelism
    layer = tokens * h * (34 / layout.tp if split > 1 else 10 + 24 / layout.tp)
    per_layer = 2 * tokens * h / split if config.model.recompute == "full" else layer
    layers = spec.num_layers // layout.pp
    in_flight = layout.pp
    rebuilt = layer if config.model.recompute == "full" else 0.0
    vocab_local = spec.padded_vocab_size(layout.tp) / layout.tp
    if config.model.fused_output:  # no logits: a few chunks of at most MAX_CHUNK_ELEMENTS float32 each
        from megatron_hapo.parallel.chunked_softmax import MAX_CHUNK_ELEMENTS  # noqa: PLC0415

        return in_flight * layers * per_layer + rebuilt, 4 * 4 * min(tokens * vocab_local, MAX_CHUNK_ELEMENTS)
    logits = 2 * 4 * tokens * vocab_local  # logits + softmax, float32
    return in_flight * layers * per_layer + rebuilt, logits


def _engine_bytes(spec: DecoderSpec, config: Config, layout: Layout) -> dict[str, float]:
    """A vLLM engine of ``spec`` at the engine TP: 16-bit weights and the KV cache of one full-length sequence."""
    kv_heads = max(spec.num_query_groups // layout.engine_tp, 1)
    sequence = config.rollout.max_prompt_length + config.rollout.max_response_length
    return {
        "weights": total_params(spec) * 2 / layout.engine_tp,
        "kv_per_sequence": sequence * 2 * spec.num_layers * kv_heads * spec.head_dim * 2,
    }


def plan_run(spec: DecoderSpec, config: Config, layout: Layout, guide_spec: DecoderSpec | None = None) -> Plan:
    """Check the layout and estimate per-GPU memory of training and rollout (see the module docstring).
    ``guide_spec``: the mixed-policy guide's architecture (default: the policy's)."""
    plan = Plan(errors=check_layout(spec, config, layout), total_params=total_params(spec))
    if plan.errors:
        return plan
    plan.params_per_stage = stage_params(spec, layout.tp, layout.pp)
    heaviest = max(plan.params_per_stage)
    width = 2 if config.model.dtype == "bfloat16" else 4
    optimizer_width = 8 + (4 if width == 2 else 0)
    activations, logits = _activation_bytes(spec, config, layout)
    shards = layout.dp if config.model.distributed_optimizer else 1
    plan.training = {
        "parameters": heaviest * width,
        "gradients": heaviest * 4,
        "optimizer": heaviest * optimizer_width / shards,
        "activations": activations,
        "logits": logits,
        "runtime": RUNTIME_RESERVE_BYTES,
    }
    plan.offloaded = ("gradients", "optimizer") if config.model.offload == "optimizer" else ()
    plan.rollout = _engine_bytes(spec, config, layout)
    if config.algo.guide_policy.kind != "none":
        plan.guide = {**_engine_bytes(guide_spec or spec, config, layout), "engine_tp": layout.engine_tp}
        if guide_spec is None:
            plan.notes.append("guide engine: the policy's architecture assumed (no config.json at its model_path)")
    if config.model.fp8:
        plan.notes.append("fp8: estimated as bf16 (Transformer Engine's FP8 weight copies are transient per layer)")
    if layout.pp == 2 and layout.vpp:
        plan.notes.append("PP=2 with virtual stages: the trainer turns batch_p2p_comm off (known-bad batched P2P)")
    plan.notes.append(f"vocabulary padded to {spec.padded_vocab_size(layout.tp)} rows for TP {layout.tp}")
    if (multiple := row_multiple(config, layout)) > 16:
        plan.notes.append(f"micro-batch rows padded to multiples of {multiple} tokens (fp8 / sequence parallelism)")
    return plan


def fit_errors(plan: Plan, config: Config, gpu_bytes: float) -> list[str]:
    """Why ``plan`` does not fit GPUs of ``gpu_bytes`` (empty when it fits)."""
    errors = _guide_errors(plan, config, gpu_bytes)
    training, guide_share = sum(plan.training.values()), guide_share_bytes(plan, config, gpu_bytes)
    if training + guide_share > gpu_bytes:
        beside = f" beside the guide engine's {guide_share / GIB:.1f} GiB" if guide_share else ""
        errors.append(
            f"training needs {training / GIB:.1f} GiB per GPU{beside}, more than the {gpu_bytes / GIB:.0f} GiB "
            "available: raise model.tensor_parallel / pipeline_parallel, lower "
            "train.max_tokens_per_microbatch (or model.micro_batch_size without a budget) or "
            "set model.recompute=full"
        )
    resident, engine_share = trainer_resident_bytes(plan), config.engine.gpu_memory_utilization * gpu_bytes
    resident += guide_share
    if resident + engine_share > gpu_bytes:
        most = max(int((gpu_bytes - resident) / gpu_bytes * 100) / 100, 0.0)
        kept = ", ".join(name for name in ("parameters", "gradients", "optimizer") if name not in plan.offloaded)
        kept += ", and the guide engine's share" if guide_share else ""
        errors.append(
            f"during rollout the trainer keeps {resident / GIB:.1f} GiB per GPU ({kept}) beside the "
            f"engine's engine.gpu_memory_utilization x GPU = "
            f"{engine_share / GIB:.1f} GiB: lower engine.gpu_memory_utilization to {most:.2f} or less, "
            "set model.offload=optimizer, or raise model.tensor_parallel / pipeline_parallel"
        )
    if (sequences := full_length_sequences(plan, config, gpu_bytes)) < 1:
        weights, budget = plan.rollout["weights"] / GIB, config.engine.gpu_memory_utilization * gpu_bytes / GIB
        errors.append(
            f"the rollout engine's KV cache holds no full-length sequence ({weights:.1f} GiB of weights "
            f"in engine.gpu_memory_utilization x GPU = {budget:.1f} GiB): raise engine.tensor_parallel or "
            "engine.gpu_memory_utilization"
        )
    elif sequences < config.engine.max_num_seqs:
        plan.notes.append(
            f"the KV cache holds {sequences} full-length sequences per engine, fewer than "
            f"engine.max_num_seqs={config.engine.max_num_seqs}: vLLM runs fewer at once when all "
            "responses are long"
        )
    return errors


def guide_share_bytes(plan: Plan, config: Config, gpu_bytes: float) -> float:
    """What the mixed-policy guide engine holds on every GPU for the whole run (0 without one)."""
    return config.engine.guide_gpu_memory_utilization * gpu_bytes if plan.guide else 0.0


def _guide_errors(plan: Plan, config: Config, gpu_bytes: float) -> list[str]:
    """The guide engine's weights, the runtime reserve and one full-length sequence must fit its share."""
    if not plan.guide:
        return []
    share, weights = guide_share_bytes(plan, config, gpu_bytes), plan.guide["weights"]
    needed = weights + RUNTIME_RESERVE_BYTES + plan.guide["kv_per_sequence"]
    if needed <= share:
        return []
    least = -(-needed / gpu_bytes * 100 // 1) / 100  # rounded up to a hundredth
    return [
        f"the guide engine needs {needed / GIB:.1f} GiB per GPU (weights {weights / GIB:.1f} GiB at engine TP "
        f"{int(plan.guide['engine_tp'])} and one full-length sequence), more than "
        f"engine.guide_gpu_memory_utilization x GPU = {share / GIB:.1f} GiB: raise "
        f"engine.guide_gpu_memory_utilization to {least:.2f} (and make room: model.offload=optimizer, a lower "
        "engine.gpu_memory_utilization) or raise engine.tensor_parallel, which splits the guide too; vLLM lets "
        "one engine per process sleep, so the guide keeps its share through training"
    ]


def trainer_resident_bytes(plan: Plan) -> float:
    """What the trainer keeps on a GPU while the engine generates: parameters, gradient buffer and optimizer state
    (less what ``model.offload`` moves to CPU memory) and the runtime allowance (activations and logits are freed
    between steps)."""
    kept = [name for name in ("parameters", "gradients", "optimizer") if name not in plan.offloaded]
    return sum(plan.training[name] for name in (*kept, "runtime"))


def full_length_sequences(plan: Plan, config: Config, gpu_bytes: float) -> int:
    """Sequences of ``max_prompt_length + max_response_length`` tokens the engine's KV cache holds at once."""
    budget = config.engine.gpu_memory_utilization * gpu_bytes - plan.rollout["weights"] - RUNTIME_RESERVE_BYTES
    return int(max(budget, 0) // plan.rollout["kv_per_sequence"])
