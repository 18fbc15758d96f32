"""Build the rollout engine that ``engine.kind`` names (``vllm`` or ``hf``); each is imported only when chosen."""

from __future__ import annotations

import json
import math
from pathlib import Path

from megatron_hapo.config.run import EngineConfig
from megatron_hapo.rollout.engine import RolloutEngine

#: vLLM's KV-cache page on CPU is at most this many tokens: each sequence is counted in whole pages.
KV_PAGE_TOKENS = 128
#: Bytes of one element of the KV cache by engine dtype.
_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}


def cpu_kv_cache_bytes(model_dir: str | Path, *, dtype: str, max_num_seqs: int, max_model_len: int) -> int:
    """Bytes of the KV cache one rollout call can use on CPU: ``max_num_seqs`` sequences of ``max_model_len``.

    Per token ``2 (K, V) x layers x KV heads x head dim x bytes``, from the checkpoint's ``config.json``; each
    sequence in whole pages (:data:`KV_PAGE_TOKENS`). Without a size vLLM's CPU worker takes
    ``gpu_memory_utilization`` of the NUMA node's memory minus what the process holds (the trainer's included);
    this project's old default was a fixed 1 GiB. ``dtype``: the engine's (``auto``: the checkpoint's).
    """
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config = config.get("text_config", config)
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    name = (config.get("torch_dtype") or config.get("dtype") or "float32") if dtype == "auto" else dtype
    per_token = 2 * config["num_hidden_layers"] * kv_heads * head_dim * _DTYPE_BYTES.get(str(name), 4)
    tokens = max_num_seqs * math.ceil(max_model_len / KV_PAGE_TOKENS) * KV_PAGE_TOKENS
    return per_token * tokens


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
        kv_bytes = (
            cpu_kv_cache_bytes(
                model_dir, dtype=engine_dtype, max_num_seqs=engine.max_num_seqs, max_model_len=max_model_len
            )
            if engine.cpu_kv_cache_gib is None
            else int(engine.cpu_kv_cache_gib * 2**30)
        )
        return VLLMEngine(
            model_dir,
            VLLMConfig(
                tensor_parallel_size=engine.tensor_parallel,
                max_model_len=max_model_len,
                max_num_seqs=engine.max_num_seqs,
                gpu_memory_utilization=memory,
                cpu_kv_cache_bytes=kv_bytes,
                dtype=engine_dtype,
                seed=seed,
                enable_sleep_mode=sleep_mode,
                sleep_level=engine.sleep_level,
                async_scheduling=engine.async_scheduling,
            ),
        )
    raise ValueError(f"engine.kind must be vllm or hf, got {engine.kind!r}")
