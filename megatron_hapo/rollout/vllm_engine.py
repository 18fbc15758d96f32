"""vLLM as the rollout engine, colocated with the Megatron trainer in the same ranks (no Ray).

Every rank of the training job constructs a :class:`VLLMEngine` (construction is collective). vLLM's
``external_launcher`` backend joins the existing torch.distributed world and groups consecutive ranks into
engines of ``tensor_parallel_size`` ranks each; the rollout TP is chosen independently of the trainer's TP / PP.
Each engine runs in-process, so weights, callables and the adaptive-temperature processor's records pass
without serialisation.

vLLM changes process-wide state that Megatron relies on; :func:`_guard_process_state` keeps it intact:
- tearing an engine down destroys the *default* process group (Megatron's collectives then silently break):
  only vLLM's own groups are destroyed here;
- ``LLM(seed=...)`` reseeds the CPU generator: the generator state is saved and restored around construction;
- on CPU it replaces ``torch.set_num_threads`` with a no-op; the original stays reachable as
  ``SET_NUM_THREADS``;
- on CPU, TP >= 2 engines name their shared memory after a constant: a per-job prefix avoids collisions with
  other jobs or a crashed earlier run.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist

from megatron_hapo.algos import EntropyStats
from megatron_hapo.rollout.engine import Response, SamplingSettings

logger = logging.getLogger(__name__)

#: ``torch.set_num_threads`` as it was before vLLM's CPU worker replaced it.
SET_NUM_THREADS = torch.set_num_threads


@dataclass(frozen=True, kw_only=True)
class VLLMConfig:
    """Settings of the colocated vLLM engine."""

    tensor_parallel_size: int = 1
    """Ranks per engine (consecutive ranks); must divide the world size."""
    max_model_len: int = 4096
    """Longest prompt + response in tokens."""
    max_num_seqs: int = 256
    """Sequences decoded together."""
    dtype: str = "auto"
    """Weights / activations dtype of the engine (``auto``: the checkpoint's)."""
    gpu_memory_utilization: float = 0.5
    """Share of GPU memory for weights + KV cache (the trainer holds the rest while the engine sleeps)."""
    cpu_kv_cache_gib: int = 1
    """KV-cache size per engine on CPU in whole GiB (``VLLM_CPU_KVCACHE_SPACE``)."""
    logprobs_mode: Literal["raw_logprobs", "processed_logprobs"] = "raw_logprobs"
    """``raw_logprobs``: log-probs at temperature 1 before any processor, comparable with the trainer's;
    ``processed_logprobs``: of the distribution actually sampled from (after the adaptive and base temperature)."""
    enable_sleep_mode: bool = True
    """On GPU: free weights / KV cache between rollouts (``sleep`` / ``wake_up``); ignored on CPU."""
    enforce_eager: bool | None = None
    """Skip CUDA graphs (``None``: eager on CPU, graphs on GPU)."""
    seed: int = 0
    """Engine seed (requests carry their own seeds when ``SamplingSettings.seed`` is set)."""


def _guard_process_state() -> None:
    """Patch vLLM (once per process) so that an engine cannot break the trainer's process state."""
    import vllm.distributed.parallel_state as vllm_state  # noqa: PLC0415

    if getattr(vllm_state, "_megatron_hapo_guarded", False):
        return

    def destroy_own_groups_only() -> None:
        if vllm_state._WORLD is not None:
            vllm_state._WORLD.destroy()
        vllm_state._WORLD = None
        vllm_state._NODE_COUNT = None

    vllm_state.destroy_distributed_environment = destroy_own_groups_only
    vllm_state._megatron_hapo_guarded = True
    if not torch.cuda.is_available():
        from vllm.distributed.device_communicators import cpu_communicator  # noqa: PLC0415

        shm = cpu_communicator._CPUSHMDistributed
        original = shm.make_group_name
        job_id = torch.tensor([os.getpid() if dist.get_rank() == 0 else 0])  # one name per job, any rank count
        dist.broadcast(job_id, src=0)
        job = f"/mhapo{int(job_id)}-"
        shm.make_group_name = staticmethod(lambda comm: job + original(comm).lstrip("/"))


def _launcher_environment() -> None:
    """The variables vLLM's external launcher reads, from the initialised default process group."""
    if not dist.is_initialized():
        raise RuntimeError("VLLMEngine runs inside the trainer's ranks: initialise torch.distributed first")
    os.environ.setdefault("RANK", str(dist.get_rank()))
    os.environ.setdefault("WORLD_SIZE", str(dist.get_world_size()))
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    os.environ.setdefault("LOCAL_RANK", str(dist.get_rank() % devices if devices else dist.get_rank()))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine (external_launcher needs it)
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")  # our processor uses the V1 interface


class VLLMEngine:
    """A vLLM engine in this rank (collective construction), implementing :class:`~.engine.RolloutEngine`."""

    def __init__(self, model_dir: str | Path, config: VLLMConfig) -> None:
        from vllm import LLM  # noqa: PLC0415

        from megatron_hapo.rollout import temperature_processor  # noqa: PLC0415

        if dist.get_world_size() % config.tensor_parallel_size:
            raise ValueError(f"rollout tensor_parallel_size={config.tensor_parallel_size} must divide the "
                             f"world size {dist.get_world_size()}")  # fmt: skip
        _launcher_environment()
        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(config.cpu_kv_cache_gib)
        _guard_process_state()
        self.config = config
        rng = torch.get_rng_state()
        known = len(temperature_processor.INSTANCES)
        self.llm = LLM(
            model=str(model_dir), skip_tokenizer_init=True, dtype=config.dtype,
            tensor_parallel_size=config.tensor_parallel_size, distributed_executor_backend="external_launcher",
            max_model_len=config.max_model_len, max_num_seqs=config.max_num_seqs, seed=config.seed,
            gpu_memory_utilization=config.gpu_memory_utilization, logprobs_mode=config.logprobs_mode,
            enforce_eager=(not on_gpu) if config.enforce_eager is None else config.enforce_eager,
            enable_sleep_mode=config.enable_sleep_mode and on_gpu,
            logits_processors=[temperature_processor.AdaptiveTemperatureProcessor],
        )  # fmt: skip
        torch.set_rng_state(rng)
        if len(temperature_processor.INSTANCES) != known + 1:
            raise RuntimeError("vLLM did not build exactly one adaptive-temperature processor in this rank")
        self.processor = temperature_processor.INSTANCES[-1]
        self.asleep = False

    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingSettings,
                 stats: EntropyStats | None) -> list[Response]:  # fmt: skip
        """``n`` responses per prompt, grouped by prompt (see :class:`~.engine.RolloutEngine`)."""
        requests = [{"prompt_token_ids": list(prompt)} for prompt in prompts for _ in range(n)]
        params = [self._params(i, sampling, stats) for i in range(len(requests))]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        records = self.processor.take_records()
        responses = []
        for i, output in enumerate(outputs):
            completion = output.outputs[0]
            tokens = list(completion.token_ids)
            log_probs = torch.tensor([completion.logprobs[t][tok].logprob for t, tok in enumerate(tokens)],
                                     dtype=torch.float32)  # fmt: skip
            temperatures = records.get(i)
            if temperatures is not None and len(temperatures) != len(tokens):
                raise RuntimeError(f"request {i}: {len(temperatures)} temperatures for {len(tokens)} tokens")
            responses.append(Response(
                prompt_index=i // n, token_ids=tokens, log_probs=log_probs,
                finish_reason="length" if completion.finish_reason == "length" else "stop",
                temperatures=None if temperatures is None else torch.tensor(temperatures, dtype=torch.float32),
            ))  # fmt: skip
        return responses

    def _params(self, index: int, sampling: SamplingSettings, stats: EntropyStats | None) -> object:
        from vllm import SamplingParams  # noqa: PLC0415

        from megatron_hapo.rollout.temperature_processor import request_args  # noqa: PLC0415

        adaptive = sampling.adaptive_tau is not None and stats is not None and sampling.temperature > 0
        extra = request_args(index, tau=sampling.adaptive_tau, temperature=sampling.temperature,
                             stats=stats) if adaptive else None  # fmt: skip
        return SamplingParams(
            n=1, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
            max_tokens=sampling.max_tokens, logprobs=0, stop_token_ids=list(sampling.stop_token_ids),
            seed=None if sampling.seed is None else sampling.seed + index, extra_args=extra,
        )  # fmt: skip

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace weights by HF name (full tensors; complete layers per call; vLLM cuts its own TP shard)."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named_tensors)})
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def prompt_log_probs(self, token_ids: Sequence[int]) -> torch.Tensor:
        """``[S - 1]`` float32 log-probs of ``token_ids[1:]`` at temperature 1 (vLLM's prompt log-probs)."""
        from vllm import SamplingParams  # noqa: PLC0415

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        (output,) = self.llm.generate([{"prompt_token_ids": list(token_ids)}], params, use_tqdm=False)
        return torch.tensor([output.prompt_logprobs[t][tok].logprob for t, tok in enumerate(token_ids) if t > 0],
                            dtype=torch.float32)  # fmt: skip

    def sleep(self) -> None:
        """Free the engine's GPU memory for training (weights and KV cache; GPU with sleep mode only)."""
        if self.config.enable_sleep_mode and torch.cuda.is_available() and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake_up(self) -> None:
        """Take the GPU memory back before a rollout (weights must be synced afterwards at level 1)."""
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def close(self) -> None:
        """Shut the engine down, leaving the trainer's process groups alone."""
        del self.llm
        gc.collect()
