"""vLLM as the rollout engine, colocated with the Megatron trainer in the same ranks (no Ray).

Every rank of the training job constructs a :class:`VLLMEngine` (construction is collective). vLLM's
``external_launcher`` backend joins the existing torch.distributed world and groups consecutive ranks into
engines of ``tensor_parallel_size`` ranks each; the rollout TP is chosen independently of the trainer's TP / PP.
Each engine runs in-process, so weights, callables and the adaptive-temperature processor's records pass
without serialisation.

vLLM changes process-wide state that Megatron relies on; :func:`_guard_process_state` keeps it intact:
- tearing an engine down destroys the *default* process group (Megatron's collectives then silently break):
  only vLLM's own groups are destroyed here;
- ``LLM(seed=...)`` reseeds torch (CPU and CUDA), ``random`` and NumPy: their states are saved and restored around
  construction;
- on CPU it replaces ``torch.set_num_threads`` with a no-op; the original stays reachable as
  ``SET_NUM_THREADS``;
- on CPU, TP >= 2 engines name their shared memory after a constant: a per-job prefix avoids collisions with
  other jobs or a crashed earlier run.

Sleep mode (GPU only; vLLM refuses it on CPU) uses vLLM's ``CuMemAllocator``, a process-wide singleton: one
sleep-mode engine per process (docs/ROLLOUT.md, "On GPU").
"""

from __future__ import annotations

import gc
import logging
import math
import os
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast

import torch

from megatron_hapo.algos import EntropyStats
from megatron_hapo.parallel import runtime
from megatron_hapo.rollout.engine import Response, SamplingSettings

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.config.model import ModelDType
    from vllm.distributed.device_communicators.cpu_communicator import CpuCommunicator
    from vllm.inputs import TokensPrompt

logger = logging.getLogger(__name__)

#: ``torch.set_num_threads`` as it was before vLLM's CPU worker replaced it.
SET_NUM_THREADS = torch.set_num_threads

#: vLLM's sleep-mode memory tags (``vllm.v1.executor.abstract.SLEEP_TAGS``).
SLEEP_TAGS = frozenset(("weights", "kv_cache"))

#: The live engines of this process that use vLLM's sleep mode (its allocator allows one).
_SLEEP_MODE_ENGINES: weakref.WeakSet = weakref.WeakSet()

#: Whether :func:`_guard_process_state` has patched vLLM in this process.
_guarded = False


@dataclass(frozen=True, kw_only=True)
class VLLMConfig:
    """Settings of the colocated vLLM engine."""

    tensor_parallel_size: int = 1
    """Ranks per engine (consecutive ranks); must divide the world size."""
    max_model_len: int = 4096
    """Longest prompt + response in tokens."""
    max_num_seqs: int = 256
    """Sequences decoded together."""
    max_num_batched_tokens: int | None = None
    """Token budget of one engine step (``None``: vLLM's default); longer prompts are prefilled in chunks."""
    dtype: str = "auto"
    """Weights / activations dtype of the engine (``auto``: the checkpoint's)."""
    gpu_memory_utilization: float = 0.5
    """This engine's budget for weights + activations + KV cache, as a share of the GPU's *total* memory; at
    start-up vLLM refuses to run unless that much is free (sleeping engines' memory counts as free)."""
    cpu_kv_cache_bytes: int = 2**30
    """KV-cache size per engine on CPU (vLLM's ``kv_cache_memory_bytes``; ``VLLM_CPU_KVCACHE_SPACE`` in the
    environment, whole GiB, wins over it: vLLM's legacy setting). The trainer sizes it from the step
    (:func:`megatron_hapo.rollout.factory.cpu_kv_cache_bytes`)."""
    logprobs_mode: Literal["raw_logprobs", "processed_logprobs"] = "raw_logprobs"
    """``raw_logprobs``: log-probs at temperature 1 before any processor, comparable with the trainer's;
    ``processed_logprobs``: of the distribution actually sampled from (after the adaptive and base temperature)."""
    enable_sleep_mode: bool = True
    """On GPU: free weights / KV cache between rollouts (``sleep`` / ``wake_up``); ignored on CPU. vLLM allows
    one sleep-mode engine per process: a second engine (e.g. a frozen guide) must set it off."""
    sleep_level: Literal[1, 2] = 2
    """1: weights are copied to host memory and restored on wake-up (usable at once); 2: weights are dropped
    (no host copy; a full ``load_weights`` must follow every wake-up before the engine is used: the weight sync
    after every step does). :meth:`VLLMEngine.sleep` may name another level for one sleep."""
    async_scheduling: bool | None = None
    """vLLM's async scheduling (``None``: vLLM's default, on with GPUs and this launcher; CPU forces it off)."""
    enforce_eager: bool | None = None
    """Skip CUDA graphs (``None``: eager on CPU, graphs on GPU)."""
    seed: int = 0
    """Engine seed (requests carry their own seeds when ``SamplingSettings.seed`` is set)."""

    def __post_init__(self) -> None:
        if self.sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 or 2, got {self.sleep_level}")


#: vLLM loggers whose INFO lines repeat at every weight sync (the reload's start and time, the prefix-cache reset):
#: WARNING and above only, so that a rank's log shows the steps rather than three lines per sync.
_PER_SYNC_LOGGERS = ("vllm.model_executor.model_loader.reload.inplace", "vllm.v1.core.block_pool")
_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


class _WeightlessRopeFilter(logging.Filter):
    """Drops vLLM's "RotaryEmbedding: Failed to load weights" at every in-place reload (the weight sync).

    Harmless: a rotary embedding has no checkpoint weight, only its cos/sin cache, a buffer computed from the
    model config (rope theta, positions). vLLM 0.32's layerwise reload counts that buffer as loadable, finds
    that nothing was loaded into it and puts the original buffer back (``finalize_layerwise_processing`` ->
    ``_place_kernel_tensors``, ``model_loader/reload/layerwise.py``), which is right. The same warning for any
    other layer class (a weight the sync missed) still shows; the sync is verified either way
    (``rollout.weight_sync``).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.msg == "%s: Failed to load weights"
            and isinstance(record.args, tuple)
            and str(record.args[0]).endswith("RotaryEmbedding")
        )


def _quiet_weight_sync_logs() -> None:
    """Apply :data:`_PER_SYNC_LOGGERS` and :class:`_WeightlessRopeFilter` (idempotent). Call it after the engine
    is built: vLLM's ``configure_logging`` (``dictConfig``) sets its child loggers back to NOTSET."""
    for name in _PER_SYNC_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    reload_logger = logging.getLogger(_RELOAD_LOGGER)
    if not any(isinstance(f, _WeightlessRopeFilter) for f in reload_logger.filters):
        reload_logger.addFilter(_WeightlessRopeFilter())


def _guard_process_state() -> None:
    """Patch vLLM (once per process) so that an engine cannot break the trainer's process state."""
    import vllm.distributed.parallel_state as vllm_state  # noqa: PLC0415

    global _guarded  # noqa: PLW0603
    if _guarded:
        return

    def destroy_own_groups_only() -> None:
        if vllm_state._WORLD is not None:
            vllm_state._WORLD.destroy()
        vllm_state._WORLD = None
        vllm_state._NODE_COUNT = None

    vllm_state.destroy_distributed_environment = destroy_own_groups_only
    _guarded = True
    if not runtime.on_gpu():
        from vllm.distributed.device_communicators import cpu_communicator  # noqa: PLC0415

        shm = cpu_communicator._CPUSHMDistributed
        original = shm.make_group_name
        job = f"/mhapo{runtime.broadcast_int(os.getpid() if runtime.rank() == 0 else 0, src=0)}-"  # one per job

        def make_group_name(communicator: CpuCommunicator) -> str:
            return job + original(communicator).lstrip("/")

        shm.make_group_name = staticmethod(make_group_name)  # type: ignore[method-assign]  # patching vLLM's class


def _generator_states() -> tuple:
    """torch (CPU and this rank's GPU), ``random`` and NumPy generator states: ``LLM(seed=...)`` reseeds them all
    (vLLM's ``set_random_seed``), and Megatron's CUDA RNG tracker seeds the default CUDA generator."""
    import random  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415

    cuda = torch.cuda.get_rng_state() if runtime.on_gpu() else None
    return torch.get_rng_state(), cuda, random.getstate(), np.random.get_state()


def _restore_generator_states(states: tuple) -> None:
    import random  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415

    cpu, cuda, python, numpy_state = states
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)
    random.setstate(python)
    np.random.set_state(numpy_state)


def _launcher_environment() -> None:
    """The variables vLLM's external launcher reads, from the trainer's process group."""
    if not runtime.initialized():
        raise RuntimeError(
            "VLLMEngine runs inside the trainer's ranks: join the process group first "
            "(megatron_hapo.parallel.runtime.join_process_group or run_local_ranks)"
        )
    os.environ.setdefault("RANK", str(runtime.rank()))
    os.environ.setdefault("WORLD_SIZE", str(runtime.world_size()))
    local_rank = runtime.rank_device().index if runtime.on_gpu() else runtime.rank()
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine (external_launcher needs it)
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")  # our processor uses the V1 interface


def trim_records(temperatures: Sequence[float], num_tokens: int, *, request: int) -> torch.Tensor:
    """``[num_tokens]`` float32: the recorded temperatures of a response's tokens (positions ``0 .. L-1``).

    Records past the last token come from the step async scheduling runs after a stop token before it sees the
    stop (``AsyncScheduler``); they are always trailing, and dropped. Fewer records than tokens, or a non-finite
    temperature (NaN / +Inf logits, or every token banned), raise ``RuntimeError``.
    """
    if len(temperatures) < num_tokens:
        raise RuntimeError(f"request {request}: {len(temperatures)} temperatures recorded for {num_tokens} tokens")
    kept = torch.tensor(temperatures[:num_tokens], dtype=torch.float32)
    if not bool(torch.isfinite(kept).all()):
        bad = [t for t, value in enumerate(kept.tolist()) if not math.isfinite(value)]
        raise RuntimeError(
            f"request {request}: non-finite adaptive temperature at tokens {bad} (the logits held "
            f"NaN / +Inf, or every token was banned)"
        )
    return kept


class VLLMEngine:
    """A vLLM engine in this rank (collective construction), implementing :class:`~.engine.RolloutEngine`."""

    def __init__(self, model_dir: str | Path, config: VLLMConfig) -> None:
        from vllm import LLM  # noqa: PLC0415

        from megatron_hapo.rollout import temperature_processor  # noqa: PLC0415

        if runtime.world_size() % config.tensor_parallel_size:
            raise ValueError(
                f"rollout tensor_parallel_size={config.tensor_parallel_size} must divide the "
                f"world size {runtime.world_size()}"
            )
        on_gpu = runtime.on_gpu()
        self._sleep_mode = config.enable_sleep_mode and on_gpu
        """Whether :meth:`sleep` / :meth:`wake_up` reach vLLM (tests may switch it on over CPU's no-op worker)."""
        if self._sleep_mode and len(_SLEEP_MODE_ENGINES):
            raise RuntimeError(
                "a second vLLM engine with sleep mode in this process: vLLM 0.32's CuMemAllocator is a process-wide "
                "singleton that refuses to load a model while it holds any allocation, asleep ones included "
                "(vllm/v1/worker/gpu_worker.py, _maybe_get_memory_pool_context), and sleep / wake_up act on all of "
                "its memory. Build this engine with enable_sleep_mode=False, or close the other one first."
            )
        _launcher_environment()
        _guard_process_state()
        self.config = config
        optional = {
            name: getattr(config, name)
            for name in ("async_scheduling", "max_num_batched_tokens")
            if getattr(config, name) is not None
        }
        if not on_gpu:
            optional["kv_cache_memory_bytes"] = config.cpu_kv_cache_bytes
        rng = _generator_states()
        known = len(temperature_processor.INSTANCES)
        self.llm = LLM(
            model=str(model_dir),
            skip_tokenizer_init=True,
            dtype=cast("ModelDType", config.dtype),  # a vLLM dtype name: vLLM validates it
            tensor_parallel_size=config.tensor_parallel_size,
            distributed_executor_backend="external_launcher",
            max_model_len=config.max_model_len,
            max_num_seqs=config.max_num_seqs,
            seed=config.seed,
            gpu_memory_utilization=config.gpu_memory_utilization,
            logprobs_mode=config.logprobs_mode,
            enforce_eager=(not on_gpu) if config.enforce_eager is None else config.enforce_eager,
            enable_sleep_mode=self._sleep_mode,
            logits_processors=[temperature_processor.AdaptiveTemperatureProcessor],
            **optional,
        )
        _restore_generator_states(rng)
        _quiet_weight_sync_logs()  # after: the engine's logging set-up (dictConfig) resets vLLM's child loggers
        if len(temperature_processor.INSTANCES) != known + 1:
            raise RuntimeError("vLLM did not build exactly one adaptive-temperature processor in this rank")
        self.processor = temperature_processor.INSTANCES[-1]
        self._sleeping: set[str] = set()
        self._sleep_level: int = self.config.sleep_level
        """The level of the current (or last) sleep."""
        self._weights_dropped = False
        """Woken from a level-2 sleep and not loaded since: the weights are garbage."""
        if self._sleep_mode:
            _SLEEP_MODE_ENGINES.add(self)

    @property
    def asleep(self) -> bool:
        """Whether any of the engine's memory (weights or KV cache) is released."""
        return bool(self._sleeping)

    @property
    def sleeping_tags(self) -> frozenset[str]:
        """The memory tags currently released (subset of ``{"weights", "kv_cache"}``)."""
        return frozenset(self._sleeping)

    def _check_usable(self) -> None:
        if self._sleeping:
            raise RuntimeError(f"the vLLM engine is asleep ({sorted(self._sleeping)}): wake_up() before using it")
        if self._weights_dropped:
            raise RuntimeError("the vLLM engine woke from a level-2 sleep: load_weights() before using it")

    def generate(
        self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingSettings, stats: EntropyStats | None
    ) -> list[Response]:
        """``n`` responses per prompt, grouped by prompt (see :class:`~.engine.RolloutEngine`)."""
        self._check_usable()
        requests: list[TokensPrompt] = [{"prompt_token_ids": list(prompt)} for prompt in prompts for _ in range(n)]
        params = [self._params(i, sampling, stats) for i in range(len(requests))]
        self.processor.discard_records()  # nothing left over from an interrupted call
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        records = self.processor.take_records()
        responses = []
        for i, output in enumerate(outputs):
            completion = output.outputs[0]
            tokens = list(completion.token_ids)
            token_logprobs = completion.logprobs
            assert token_logprobs is not None  # requested: SamplingParams(logprobs=0)
            log_probs = torch.tensor(
                [token_logprobs[t][tok].logprob for t, tok in enumerate(tokens)], dtype=torch.float32
            )
            temperatures = records.get(i)
            responses.append(
                Response(
                    prompt_index=i // n,
                    token_ids=tokens,
                    log_probs=log_probs,
                    finish_reason="length" if completion.finish_reason == "length" else "stop",
                    temperatures=None if temperatures is None else trim_records(temperatures, len(tokens), request=i),
                )
            )
        return responses

    def _params(self, index: int, sampling: SamplingSettings, stats: EntropyStats | None) -> SamplingParams:
        from vllm import SamplingParams  # noqa: PLC0415

        from megatron_hapo.rollout.temperature_processor import request_args  # noqa: PLC0415

        extra = None
        if sampling.adaptive_tau is not None and stats is not None and sampling.temperature > 0:  # adaptive
            extra = request_args(index, tau=sampling.adaptive_tau, temperature=sampling.temperature, stats=stats)
        return SamplingParams(
            n=1,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            max_tokens=sampling.max_tokens,
            min_tokens=sampling.min_tokens,
            logprobs=0,
            stop_token_ids=list(sampling.stop_token_ids),
            seed=None if sampling.seed is None else sampling.seed + index,
            extra_args=extra,
        )

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace weights by HF name (full tensors; vLLM cuts its own TP shard), in one vLLM reload.

        ``named_tensors`` may be a lazy stream whose production runs collectives (the weight sync): it is
        consumed exactly once, in order, to its end on every rank (vLLM's loader does; whatever it leaves, also
        after an error, is drained here so that every rank runs the same collectives), and never materialised.
        Every layer's tensors must arrive within the one call (vLLM rebuilds a layer from what one reload gave it).
        """
        if "weights" in self._sleeping:
            raise RuntimeError("the vLLM engine's weights are asleep: wake_up(['weights']) before load_weights()")
        weights = iter(named_tensors)
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        finally:
            left = [name for name, _ in weights]  # also after an error, so that no rank skips a collective
        if left:
            raise RuntimeError(
                f"vLLM's reload_weights returned without reading {len(left)} tensors "
                f"(first: {left[0]}); they were drained, not loaded"
            )
        self._weights_dropped = False
        if not self.llm.reset_prefix_cache():  # cached KV blocks were computed with the old weights
            raise RuntimeError("vLLM could not reset its prefix cache after the weight update (blocks in use)")

    def prompt_log_probs(self, token_ids: Sequence[int]) -> torch.Tensor:
        """``[S - 1]`` float32 log-probs of ``token_ids[1:]`` at temperature 1 (vLLM's prompt log-probs)."""
        from vllm import SamplingParams  # noqa: PLC0415

        self._check_usable()
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        prompt: TokensPrompt = {"prompt_token_ids": list(token_ids)}
        (output,) = self.llm.generate([prompt], params, use_tqdm=False)
        positions = output.prompt_logprobs
        assert positions is not None  # requested: SamplingParams(prompt_logprobs=0)
        values = []
        for t, tok in enumerate(token_ids):
            if t > 0:  # the first prompt token has no log-prob
                position = positions[t]
                assert position is not None  # None only at position 0
                values.append(position[tok].logprob)
        return torch.tensor(values, dtype=torch.float32)

    def sleep(self, level: int | None = None) -> None:
        """Release the engine's GPU memory (weights and KV cache) for training; no-op on CPU or when asleep.

        At level 1 the weights go to host memory and come back on wake-up; at level 2 they are dropped (vLLM
        keeps only the model's buffers, such as rotary tables) and a full :meth:`load_weights` must follow the
        wake-up. ``level``: ``None`` is ``config.sleep_level``. The KV cache is dropped at both levels, and vLLM
        resets its prefix cache as it falls asleep. Works right after construction.
        """
        level = self.config.sleep_level if level is None else level
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level}")
        if not self._sleep_mode or self._sleeping == SLEEP_TAGS:
            return
        if "weights" in self._sleeping:  # vLLM would skip the call and leave the KV cache in memory
            raise RuntimeError("the vLLM engine's KV cache is awake but its weights are not: wake_up() fully first")
        self.llm.sleep(level=level)
        self._sleeping, self._sleep_level = set(SLEEP_TAGS), level

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Take GPU memory back: ``["weights"]``, ``["kv_cache"]`` or both (``None``); no-op for awake parts.

        Weights first, then the weight sync, then the KV cache keeps the sync's buffers and the KV cache from
        holding memory at the same time. vLLM generates only once both are awake. At ``sleep_level`` 1 the
        woken weights are those from before the sleep; at level 2 they are garbage until :meth:`load_weights`.
        """
        wanted = set(SLEEP_TAGS if tags is None else tags)
        if not wanted <= SLEEP_TAGS:
            raise ValueError(f"wake_up tags must be among {sorted(SLEEP_TAGS)}, got {sorted(wanted)}")
        waking = sorted(wanted & self._sleeping)
        if not waking:
            return
        fully_awake = self.llm.wake_up(tags=waking)  # only asleep tags: vLLM ignores the call if one is awake
        self._sleeping -= set(waking)
        if "weights" in waking and self._sleep_level == 2:
            self._weights_dropped = True
        if bool(fully_awake) != (not self._sleeping):
            raise RuntimeError(f"vLLM reports fully_awake={fully_awake} but {sorted(self._sleeping)} still sleep")

    def close(self) -> None:
        """Shut the engine down, leaving the trainer's process groups alone.

        The shutdown is called explicitly: vLLM's engine core ``gc.freeze()``-s the heap at start-up
        (``v1/engine/core.py``), so a reference cycle through the ``LLM`` would otherwise keep it, and vLLM's
        process groups, alive (the next engine then finds a TP group of the old size).
        """
        _SLEEP_MODE_ENGINES.discard(self)
        self.llm.llm_engine.engine_core.shutdown()  # idempotent; the LLM's finalizer will not run it again
        del self.llm
        gc.collect()
