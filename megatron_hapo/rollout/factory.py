"""Build the rollout engine that ``engine.kind`` names (``vllm`` or ``hf``); each is imported only when chosen."""

from __future__ import annotations

from pathlib import Path

from megatron_hapo.config.run import EngineConfig
from megatron_hapo.rollout.engine import RolloutEngine


def make_engine(
    model_dir: str | Path,
    engine: EngineConfig,
    *,
    dtype: str,
    max_model_len: int,
    seed: int,
    gpu_memory_utilization: float | None = None,
    sleep_mode: bool = True,
) -> RolloutEngine:
    """The rollout engine of ``engine.kind`` for the HF checkpoint in ``model_dir``, in this rank.

    Args:
        model_dir: HF checkpoint directory (the policy, or the guide policy of mixed-policy DAPO).
        engine: the ``engine`` config section.
        dtype: the trainer's ``model.dtype``, used when ``engine.dtype`` is ``auto``.
        max_model_len: longest prompt + response in tokens.
        seed: engine seed (requests carry their own seeds when sampling is seeded).
        gpu_memory_utilization: overrides ``engine.gpu_memory_utilization`` (vLLM only; e.g. a second engine).
        sleep_mode: whether the engine can sleep on GPU (vLLM 0.32 allows one sleep-mode engine per process:
            a second engine, such as the guide policy's, keeps its memory for the whole run).

    The vLLM engine is built collectively by every rank of the job (torch.distributed must be initialised);
    the HF engine is a whole model per rank and needs no process group.
    """
    engine_dtype = dtype if engine.dtype == "auto" else engine.dtype
    if engine.kind == "hf":
        from megatron_hapo.rollout.hf_engine import HFEngine, HFEngineConfig  # noqa: PLC0415

        if engine.tensor_parallel != 1:
            raise ValueError(
                f"engine.kind=hf keeps a whole model in each rank: engine.tensor_parallel must be 1, "
                f"got {engine.tensor_parallel}"
            )
        return HFEngine(
            model_dir,
            HFEngineConfig(
                max_model_len=max_model_len, max_num_seqs=engine.max_num_seqs, dtype=engine_dtype, seed=seed
            ),
        )
    if engine.kind == "vllm":
        from megatron_hapo.rollout.vllm_engine import VLLMConfig, VLLMEngine  # noqa: PLC0415

        memory = engine.gpu_memory_utilization if gpu_memory_utilization is None else gpu_memory_utilization
        return VLLMEngine(
            model_dir,
            VLLMConfig(
                tensor_parallel_size=engine.tensor_parallel,
                max_model_len=max_model_len,
                max_num_seqs=engine.max_num_seqs,
                gpu_memory_utilization=memory,
                cpu_kv_cache_gib=engine.cpu_kv_cache_gib,
                dtype=engine_dtype,
                seed=seed,
                enable_sleep_mode=sleep_mode,
                sleep_level=engine.sleep_level,
                async_scheduling=engine.async_scheduling,
            ),
        )
    raise ValueError(f"engine.kind must be vllm or hf, got {engine.kind!r}")
