"""Run-level configuration: rollout shape, optimizer, batch layout (spec 2.7 defaults), and for the trainer
entry point (``python -m megatron_hapo.train``) the model and its parallel layout, the data, the rollout engine
and the run's outputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from megatron_hapo.config.algo import AlgoConfig


@dataclass(kw_only=True, slots=True)
class RolloutConfig:
    """Shape of the rollout."""

    num_samples_per_prompt: int = 16
    """Responses generated per prompt (the group size G, >= 1)."""
    max_prompt_length: int = 1024
    """Longest prompt in tokens; longer prompts are dropped and counted (> 0)."""
    max_response_length: int = 4096
    """Longest response in tokens (L_max, > 0); generation stops there."""
    min_response_length: int = 0
    """No EOS before this many tokens (vLLM's ``min_tokens``; 0: off). For benchmarks of a fixed length
    (``benchmarks/bench_vs_trl.py``) and for recipes that forbid empty answers."""


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    """AdamW with linear warm-up then constant learning rate (HAPO recipes)."""

    lr: float = 1e-6
    """Peak learning rate (> 0)."""
    warmup_steps: int = 10
    """Optimizer steps of linear warm-up (>= 0)."""
    weight_decay: float = 0.1
    """Decoupled weight decay (>= 0)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (> 0); a non-finite norm skips the step."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas, each in [0, 1)."""


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """Batch layout of one RL step."""

    prompts_per_step: int = 512
    """Prompts per rollout step (after group filtering, >= 1)."""
    mini_batch_prompts: int = 32
    """Prompts per optimizer step; must divide ``prompts_per_step``."""
    ppo_epochs: int = 1
    """Passes over the rollout batch per step (>= 1)."""
    total_steps: int = 1000
    """RL steps to run (>= 1)."""
    resume_from: str | None = None
    """Resume the whole run state (model, optimizer, step, statistics, data order) from this checkpoint, a
    ``step_*`` directory of this or another run, instead of ``output.dir``'s latest (``--resume-from DIR``)."""
    seed: int = 1
    """Global random seed."""
    max_consecutive_skips: int = 5
    """Stop after this many steps in a row whose every update had a non-finite gradient norm (0: never)."""
    max_tokens_per_microbatch: int | None = None
    """Token budget of a training micro-batch: sequences are grouped so that each micro-batch computes on at most
    this many tokens (a longer sequence gets one of its own), each padded only to its own micro-batch's longest
    (or packed, ``pack_sequences``). ``null``: derived from the rollout lengths, ``model.micro_batch_size`` x
    (``max_prompt_length`` + ``max_response_length``): the tokens a micro-batch of that many sequences could
    hold, now filled with real tokens instead of padding; but ``model.micro_batch_size`` sequences where the loss
    reads per-micro-batch entropy statistics (:func:`microbatch_token_budget`)."""
    forward_max_tokens_per_microbatch: int | None = None
    """The same for the forward-only pass (no activations kept for a backward, so it can be larger); ``null``:
    twice ``max_tokens_per_microbatch``."""
    old_log_prob_pass: Literal["auto", "always"] = "auto"
    """The forward-only pass for the old log-probs and entropies: ``auto`` skips it where it is a no-op (one
    on-policy optimizer step, one epoch, and nothing reads old log-probs or entropies before the loss: GRPO and
    DAPO; the loss then takes its own log-probs, detached, as the old ones); ``always`` runs it every step."""
    pack_sequences: bool = True
    """With a token budget, put several sequences in one row (THD: Transformer Engine's attention on a GPU, a
    per-sequence local attention on CPU) instead of one padded row each."""


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """The policy model and the trainer's parallel layout."""

    path: str | None = None
    """HF checkpoint directory (weights, config, tokenizer); the trainer entry point requires it."""
    init_from: str | None = None
    """A Megatron checkpoint to start the policy from, weights only (a new run; the optimizer starts fresh):
    the output of ``tools/convert_hf_to_mcore.py`` or any run's ``checkpoints/step_*``. ``path`` still gives the
    architecture, the tokenizer and the rollout engine's first weights, which a verified sync replaces before the
    first step. Ignored when the run resumes."""
    config_file: str | None = None
    """An architecture-only HF ``config.json`` (``configs/models/``) for ``tools/plan.py`` where ``path`` is absent."""
    tensor_parallel: int = 1
    """Megatron tensor-parallel size (divides the world size with ``pipeline_parallel``; the rest is DP)."""
    pipeline_parallel: int = 1
    """Megatron pipeline-parallel size."""
    virtual_pipeline: int | None = None
    """Virtual pipeline stages per rank (interleaved schedule), or null."""
    micro_batch_size: int = 4
    """Without ``train.max_tokens_per_microbatch``: the budget of a micro-batch is this many sequences of the
    longest possible length (prompt + response), filled with real tokens (packed)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Trainer parameter / compute dtype (Megatron keeps float32 main parameters for the optimizer)."""
    recompute: Literal["none", "full"] = "none"
    """Activation recomputation: ``full`` keeps only each layer's input and recomputes the layer in backward."""
    transformer_engine: bool = False
    """Build with the Transformer Engine layer spec (GPU; fused norm + linear kernels). ``fp8`` needs it."""
    fp8: Literal["e4m3", "hybrid"] | None = None
    """FP8 training through Transformer Engine (GPU, compute capability >= 8.9), or null for bf16 / fp32."""
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "tensorwise"
    """FP8 scaling recipe (``models.precision``: which GPUs run which)."""
    distributed_optimizer: bool = True
    """Megatron's distributed optimizer (ZeRO-1): Adam state and float32 main parameters sharded over the
    data-parallel ranks, gradients reduce-scattered during the backward pass and parameters all-gathered during
    the next forward (overlapped)."""
    sequence_parallel: bool = True
    """Megatron sequence parallelism when ``tensor_parallel`` > 1: norms, dropout and residuals hold ``1 / TP`` of
    the sequence, so activations outside attention and MLP are split over TP too."""
    fused_output: bool = False
    """Compute the log-probs and entropies from the final hidden states and the output weight chunk by chunk
    (``parallel.fused_output``): the ``[tokens, V / tp]`` logits never exist. Off by default: on CPU it measured
    slower at equal memory (docs/PERFORMANCE.md, "Fused output layer in the trainer")."""
    offload: Literal["none", "optimizer"] = "none"
    """``optimizer``: the optimizer state (Adam moments, main parameters) and the gradient buffers leave the GPU
    between updates (CPU memory), so the rollout engine has that memory while it generates."""


@dataclass(kw_only=True, slots=True)
class EvalSetConfig:
    """One evaluation benchmark: its file, its columns, its prompt template and answer rule. In YAML or an
    override a plain path stands for ``{file: PATH}`` (``data.eval_sets.aime24=data/aime24.parquet``)."""

    SHORTHAND: ClassVar[str] = "file"

    file: str
    """The benchmark's ``.parquet`` / ``.jsonl`` file."""
    prompt_key: str | None = None
    """Dotted key of its prompt; null: ``data.prompt_key`` when the file has it, else the first of ``prompt``,
    ``problem``, ``question`` it has."""
    answer_key: str | None = None
    """Dotted key of its answer; null: ``data.answer_key`` when the file has it, else the first of
    ``reward_model.ground_truth``, ``answer``, ``final_answer``, ``solution`` (its last ``\\boxed{}``) it has."""
    template: str = "none"
    """How a prompt is put to the model: ``none`` (as written in the file), ``dapo`` (DAPO's instruction to end
    with an ``Answer:`` line), ``boxed`` (Qwen2.5-Math's: the answer in ``\\boxed{}``), or a text holding
    ``{problem}`` where the prompt goes. Applied to the last user message, before the chat template."""
    reward: str | None = None
    """The answer rule (as ``data.reward``); null: the template's (``dapo``: dapo_math, ``boxed``: boxed_math),
    else ``data.reward``."""


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Prompt files and how their answers are verified."""

    train_file: str | None = None
    """Training prompts: DAPO-Math-17k ``.parquet`` layout or ``.jsonl`` (required by the trainer entry point)."""
    eval_file: str | None = None
    """One evaluation file, read with ``prompt_key`` / ``answer_key`` as written (the set is named after the
    file's stem), or null. Several benchmarks: ``eval_sets``."""
    eval_sets: dict[str, EvalSetConfig] = field(default_factory=dict)
    """Evaluation benchmarks by name (``aime24: data/aime24.parquet``, or a mapping of ``file``, ``prompt_key``,
    ``answer_key``, ``template``, ``reward``); each is reported as ``eval/<name>/avg@n`` and in
    ``eval_summary.json``, with their ``mean``."""
    prompt_key: str = "prompt"
    """Dotted key of the chat-format prompt (a list of ``{role, content}`` messages, or a plain string)."""
    answer_key: str = "reward_model.ground_truth"
    """Dotted key of the ground-truth answer."""
    bad_rows: Literal["error", "skip"] = "error"
    """A malformed row stops with its file and row (``error``) or is skipped and counted (``skip``)."""
    extra_keys: list[str] = field(default_factory=list)
    """Dotted keys of each row passed to a reward function of yours as its ``extra`` dict (e.g. a countdown
    problem's ``numbers``); they must be in every row."""
    row_adapter: str | None = None
    """A function of yours (``module:function`` / ``file.py:function``) that turns a row of any layout into
    ``{"prompt": messages or text, "answer": ..., "extra": {...}}``; used instead of ``prompt_key`` / ``answer_key``
    / ``extra_keys`` (docs/EXTENDING.md)."""
    reward: str = "dapo_math"
    """Verifier: ``dapo_math`` (DAPO's last ``Answer:`` line), ``boxed_math`` (the last ``\\boxed{}``), or your
    own function, ``package.module:function`` or ``path/to/file.py:function``, called as ``f(response,
    ground_truth, extra)`` in the verifier workers (``megatron_hapo.rewards.custom``; docs/EXTENDING.md)."""
    math_verify: bool = False
    """Fall back to ``math-verify`` (when installed) for answers that do not match after normalisation."""


@dataclass(kw_only=True, slots=True)
class EngineConfig:
    """The colocated rollout engine (vLLM, or Hugging Face transformers where vLLM is not installed)."""

    kind: Literal["vllm", "hf"] = "vllm"
    """``vllm``: vLLM (``tensor_parallel`` ranks per engine); ``hf``: a transformers model with its own decode
    loop, a whole copy in each rank (``tensor_parallel`` must be 1), with vLLM's sampling, adaptive temperature and
    raw log-probs (``megatron_hapo.rollout.hf_engine``; ``max_num_seqs`` is its batch size, the KV-cache and
    memory settings do not apply)."""
    tensor_parallel: int = 1
    """Ranks per engine (consecutive ranks; independent of the trainer's layout)."""
    max_num_seqs: int = 256
    """Sequences decoded together."""
    gpu_memory_utilization: float = 0.5
    """Share of GPU memory for the engine's weights and KV cache."""
    guide_gpu_memory_utilization: float = 0.15
    """Share of GPU memory for the mixed-policy guide engine (vLLM). vLLM 0.32 lets one engine per process sleep,
    so the guide keeps its weights and KV cache for the whole run: the policy engine's share, this one and the
    trainer's memory must fit the GPU together."""
    cpu_kv_cache_gib: float | None = None
    """KV cache per engine on CPU, in GiB; ``None``: what one rollout call can use, ``max_num_seqs`` sequences of
    prompt + response length (``rollout.factory.cpu_kv_cache_bytes``)."""
    sleep_level: Literal[1, 2] = 2
    """How the policy engine (vLLM, on GPU) frees its memory while the trainer updates: 2 drops its weights,
    which the weight sync after every step replaces in full (no copy to host memory and back: 16.4 GiB per GPU
    at 70B TP8); 1 copies them to pinned host memory and back. The guide engine never drops its weights."""
    async_scheduling: bool | None = None
    """vLLM's async scheduling (the next step scheduled while the GPU runs this one); ``None``: vLLM's default
    (on for GPUs with this launcher; the CPU build turns it off). Not yet run with the adaptive temperature on a
    GPU: docs/GPU.md."""
    dtype: str = "auto"
    """Engine dtype (``auto``: the trainer's ``model.dtype``, so that the sync can be verified tightly)."""
    sync_tolerance: float | None = None
    """Largest mean multiplicative error ``mean(exp(|engine - trainer|)) - 1`` of the probe log-probs after a sync
    (``None``: 1e-3 when trainer and engine are float32, else 0.25; measured by benchmarks/bench_sync_probe.py:
    correct 16-bit syncs up to 0.15, a corrupted layer or a zeroed norm 2 to 400)."""


@dataclass(kw_only=True, slots=True)
class EvalConfig:
    """Evaluation sampling: ``n`` samples per prompt (HAPO's: 8 at T = 0.5, top-p 0.7), seeded by ``train.seed``."""

    n: int = 8
    """Samples per prompt: avg@n is their mean accuracy."""
    k: list[int] | None = None
    """pass@k for each of these k (each <= n) from the same n samples (unbiased estimator); null: 1 and n."""
    temperature: float = 0.5
    """Sampling temperature (0: greedy; no adaptive temperature in evaluation)."""
    top_p: float = 0.7
    """Nucleus sampling, in (0, 1]."""
    max_tokens: int | None = None
    """Longest response; null: ``rollout.max_response_length``. A response cut there is counted (``truncated``)."""

    def ks(self) -> tuple[int, ...]:
        """The pass@k values, sorted, without repeats."""
        return tuple(sorted(set(self.k) if self.k else {1, self.n}))


@dataclass(kw_only=True, slots=True)
class OutputConfig:
    """Where a run writes, how often it evaluates and saves, and its verifier workers."""

    dir: str = "runs/default"
    """Run directory: metrics.jsonl, TensorBoard events, checkpoints/, eval_summary.json."""
    eval_interval: int = 0
    """Evaluate every this many steps (0: only at the end; needs ``data.eval_sets`` or ``data.eval_file``)."""
    eval_before_train: bool = False
    """Also evaluate the starting policy before the first step (a fresh run only; its row is ``step -1``)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """How evaluation samples (in training and ``python -m megatron_hapo.evaluate``)."""
    save_interval: int = 0
    """Checkpoint every this many steps (0: only at the end)."""
    keep_last: int = 3
    """Keep the newest this many checkpoints, delete older ones (0: keep all)."""
    optimizer_sharding: Literal["dp_reshardable", "fully_reshardable"] = "dp_reshardable"
    """How the distributed optimizer's state is saved: ``dp_reshardable`` (each rank writes its shard, no
    gather; a resume may change the data-parallel size only, Megatron-LM's default) or ``fully_reshardable`` (the
    state gathered per parameter on DP rank 0 while saving; a resume may change TP, PP and DP)."""
    reward_workers: int = 4
    """Verifier worker processes."""
    max_reward_failure_share: float = 0.25
    """Stop the run, with the first failure's text, when more than this share of a step's answers could not be
    verified (the verifier raised, timed out or crashed: each scores as wrong and is counted in
    ``reward_errors`` / ``reward_timeouts`` / ``reward_crashes``). 1: never stop."""
    reward_timeout_s: float = 10.0
    """Per-response verification time limit, from the moment a worker starts the call (its start-up does not
    count); a timeout scores the response as wrong and is counted."""
    save_rollouts_every: int = 0
    """Dump the responses of every this many steps with their per-token values (sampling temperature, rollout and
    old log-probs, entropy, ``h_hat``, advantages before and after redistribution, clip bounds, first ratio, loss
    mask) to ``rollouts/step_*.jsonl.gz``; 0: off. ``tools/inspect_rollouts.py RUN`` shows them."""
    save_rollouts_samples: int = 32
    """Responses per dumped step: whole groups of the trained ones, chosen by ``train.seed`` and the step."""
    log_interval: int = 1
    """Where the output is not a terminal (a Slurm log), one line every this many steps and at the last: step,
    reward, accuracy, response length, step time (on a terminal a progress bar instead)."""
    wandb_project: str | None = None
    """Also log to this Weights & Biases project (``pip install 'megatron_hapo[wandb]'``; ``WANDB_MODE=offline``
    logs to ``output.dir/wandb`` for a later ``wandb sync``). A resumed run continues the same W&B run."""
    wandb_entity: str | None = None
    """The W&B team or user (default: the logged-in user's)."""
    wandb_name: str | None = None
    """The W&B run name (default: the run directory's name)."""
    wandb_group: str | None = None
    """The W&B group (a study's name: its runs shown together)."""


def microbatch_token_budget(config: Config) -> int | None:
    """The training micro-batch's token budget: ``train.max_tokens_per_microbatch``, or where it is not set
    ``model.micro_batch_size`` longest possible sequences (rounded up to 16 tokens). The trainer cuts micro-batches
    by it (packed, ``train.pack_sequences``) and the planner sizes their activations by it: the same memory as
    ``micro_batch_size`` padded sequences of the longest length, without computing on padding.

    ``None`` (``micro_batch_size`` sequences per micro-batch, as before) where the loss reads statistics of each
    micro-batch (an ``h_hat`` consumer at ``algo.entropy.scope=microbatch``, the published HAPO code's reading):
    there the micro-batch's members are part of the algorithm, and a budget would change which sequences share
    the statistics (measured in the RL demo: HAPO's last-5 accuracy 0.58 against 0.66 over three seeds)."""
    from megatron_hapo.algos.compose import needs_entropy  # noqa: PLC0415

    if config.train.max_tokens_per_microbatch is not None:
        return config.train.max_tokens_per_microbatch
    if needs_entropy(config.algo) and config.algo.entropy.scope == "microbatch":
        return None
    longest = config.rollout.max_prompt_length + config.rollout.max_response_length
    return -(-config.model.micro_batch_size * longest // 16) * 16


@dataclass(kw_only=True, slots=True)
class ParallelConfig:
    """The job's process groups (the trainer's layout is ``model.*``, the engine's ``engine.tensor_parallel``)."""

    timeout_minutes: int = 60
    """How long a collective may wait before the job fails (the default group, Megatron's groups and their gloo
    twins; NCCL's own default is 10). A synchronous checkpoint of a large model on a shared file system waits in
    barriers for minutes: 60, as NeMo-RL advises for long saves (>= 1)."""


@dataclass(kw_only=True, slots=True)
class Config:
    """The whole resolved configuration of a run."""

    algo: AlgoConfig = field(default_factory=AlgoConfig)
    """The RL algorithm as a composition of components."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Rollout shape."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Batch layout and length of training."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Policy model and trainer parallel layout (trainer entry point)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompt data and verifier (trainer entry point)."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Rollout engine (trainer entry point)."""
    output: OutputConfig = field(default_factory=OutputConfig)
    """Run directory, evaluation and checkpoint intervals, verifier workers (trainer entry point)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Process-group settings (trainer entry point)."""
