"""The trainer entry point on one GPU (NCCL, bf16): ``python -m megatron_hapo.train`` as a torchrun rank would run it.

Cases: the transformers rollout engine with the local layer spec (what the one-call check machine can run), the
same with the Transformer Engine spec and FP8 (hybrid, tensorwise), and a colocated vLLM engine (sleep / wake)
with and without Transformer Engine + FP8. The ones whose package is missing skip, naming it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from gpu_helpers import free_port, gpu_check_module

pytestmark = pytest.mark.gpu

CASES = {  # id: (engine.kind, model.transformer_engine, model.fp8, fixtures that skip without the package)
    "hf-local-bf16": ("hf", False, "null", ()),
    "hf-te-fp8": ("hf", True, "hybrid", ("require_te",)),
    "vllm-local-bf16": ("vllm", False, "null", ("require_vllm",)),
    "vllm-te-fp8": ("vllm", True, "hybrid", ("require_vllm", "require_te")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_train_entry_point_on_one_gpu(
    case: str, tiny_inputs: dict[str, Path], tmp_path: Path, repo_root: Path, request: pytest.FixtureRequest
) -> None:
    engine, te, fp8, needs = CASES[case]
    for fixture in needs:
        request.getfixturevalue(fixture)
    check = gpu_check_module()
    tolerance = 0.1 if fp8 != "null" else check.SYNC_TOLERANCE  # FP8 GEMMs round further than bf16
    overrides = [item for item in check.train_overrides(tiny_inputs["model"]) if "sync_tolerance" not in item]
    run_dir = tmp_path / "run"
    env = {
        **os.environ,
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    args = [
        sys.executable,
        "-m",
        "megatron_hapo.train",
        "configs/algo/hapo.yaml",
        *overrides,
        f"engine.kind={engine}",
        f"model.transformer_engine={str(te).lower()}",
        f"model.fp8={fp8}",
        f"engine.sync_tolerance={tolerance}",
        "engine.gpu_memory_utilization=0.3",
        f"data.train_file={tiny_inputs['train']}",
        "train.total_steps=2",
        "output.reward_workers=1",
        f"output.dir={run_dir}",
    ]
    result = subprocess.run(args, cwd=repo_root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1] and all(math.isfinite(r["loss"]) for r in rows), rows
    assert all(math.isfinite(r["grad_norm"]) and r["updates_skipped"] == 0 for r in rows), rows
    assert all(r["sync_probe_error"] <= tolerance for r in rows), rows
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_000002"
