"""The trainer entry point on one GPU: NCCL, bf16, the Transformer Engine layer spec with FP8 (hybrid,
tensorwise), a vLLM engine sharing the GPU (sleep / wake) and a verified weight sync from the TE-spec model."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    import transformers

    path = tmp_path_factory.mktemp("llama")
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                                      eos_token_id=2, bos_token_id=1)  # fmt: skip
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return path


@pytest.mark.parametrize("fp8", ["null", "hybrid"])
def test_train_entry_point_on_one_gpu(tiny_llama: Path, tmp_path: Path, repo_root: Path, fp8: str) -> None:
    sys.path.insert(0, str(repo_root / "tests" / "dist"))
    from test_train_cli import _dapo_jsonl, _model_with_tokenizer

    model = _model_with_tokenizer(tiny_llama, tmp_path / "model")
    run_dir = tmp_path / "run"
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29611"}  # fmt: skip
    args = [
        sys.executable, "-m", "megatron_hapo.train", "configs/algo/hapo.yaml", f"model.path={model}",
        "model.dtype=bfloat16", "model.transformer_engine=true", f"model.fp8={fp8}", "model.micro_batch_size=4",
        f"data.train_file={_dapo_jsonl(tmp_path / 't.jsonl', 16)}", "rollout.num_samples_per_prompt=4",
        "rollout.max_prompt_length=32", "rollout.max_response_length=16", "algo.reward_shaping.buffer_length=4",
        "train.prompts_per_step=4", "train.mini_batch_prompts=2", "train.total_steps=2", "optim.lr=1e-4",
        "engine.gpu_memory_utilization=0.3", "engine.sync_tolerance=0.1", "output.reward_workers=1",
        f"output.dir={run_dir}",
    ]  # fmt: skip
    result = subprocess.run(args, cwd=repo_root, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1] and all(math.isfinite(r["loss"]) for r in rows), rows
    assert all(r["sync_probe_error"] <= 0.1 for r in rows), rows
