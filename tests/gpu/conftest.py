"""Shared set-up of the GPU tests (marker ``gpu``: tests/conftest.py skips them without CUDA).

- ``nccl_megatron_world``: one rank on ``cuda:0`` joined through :mod:`megatron_hapo.parallel.runtime` (NCCL), with
  Megatron's TP1 / PP1 state seeded; torn down after the module.
- ``require_vllm`` / ``require_te``: skip, naming the package, where vLLM / Transformer Engine is not installed.
  The one-call check machine has neither; ``scripts/gpu_check.py`` reports these skips by name.
- ``tiny_inputs``: the tiny bf16 Llama with tokenizer and prompt files that ``scripts/gpu_check.py`` makes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from gpu_helpers import TE_MISSING, VLLM_MISSING, free_port, gpu_check_module


@pytest.fixture(scope="module")
def require_vllm() -> None:
    pytest.importorskip("vllm", reason=VLLM_MISSING)


@pytest.fixture(scope="module")
def require_te() -> None:
    pytest.importorskip("transformer_engine", reason=TE_MISSING)


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return gpu_check_module().make_tiny_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def nccl_megatron_world():
    """World of one rank on GPU 0 (NCCL) through ``parallel.runtime``, Megatron TP1 / PP1 seeded."""
    from megatron.core import parallel_state as mpu

    from megatron_hapo.parallel import runtime

    saved = dict(os.environ)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    runtime.join_process_group()
    assert runtime.backend_for_device() == "nccl" and runtime.rank_device().type == "cuda"
    runtime.initialize_model_parallel(1, 1, seed=0)
    yield
    mpu.destroy_model_parallel()
    runtime.leave_process_group()
    os.environ.clear()
    os.environ.update(saved)
