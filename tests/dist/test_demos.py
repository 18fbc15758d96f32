"""The quickstart's two stages: the trainer's own step, quiet, deterministic on one machine."""

import importlib.util
import subprocess
import sys

import pytest


def _run(module, *args, cwd):
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=cwd, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def test_presets_demo_learns_with_both_sign_conventions_and_repeats_itself(tmp_path):
    outputs = {}
    for run, sign in enumerate(("published", "published", "paper")):
        args = ["--presets", "hapo", "--steps", "12", "--run-dir", str(tmp_path / sign), f"algo.entropy.sign={sign}"]
        outputs[run] = _run("megatron_hapo.demos.presets", *args, cwd=tmp_path).stdout
        assert "every preset learns" in outputs[run]
        assert (tmp_path / sign / "hapo" / "metrics.jsonl").is_file()
        assert (tmp_path / sign / "log.txt").is_file()  # library output went here, not to the console
    assert outputs[0] == outputs[1]  # the same run twice (the second replaced the first's run directory)
    assert outputs[0] != outputs[2]  # the paper's sign convention samples differently
    lines = outputs[0].splitlines()
    assert sum("step" in line for line in lines) == 12 and len(lines) <= 12 + 5, outputs[0]


def test_a_demo_refuses_a_run_directory_it_did_not_write(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    done = subprocess.run(
        [sys.executable, "-m", "megatron_hapo.demos.presets", "--presets", "hapo", "--run-dir", str(tmp_path / "mine")],
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0 and "holds something other than a demo run" in done.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_rl_demo_short_run_is_quiet_and_repeats_itself(tmp_path):
    args = ["--presets", "hapo", "dapo", "--steps", "2", "--warmup-steps", "2", "--eval-interval", "2"]
    first = _run("megatron_hapo.demos.rl_demo", *args, "--run-dir", "run", cwd=tmp_path)
    second = _run("megatron_hapo.demos.rl_demo", *args, "--run-dir", "run", cwd=tmp_path)
    assert first.stdout == second.stdout
    lines = first.stdout.splitlines()
    assert sum(" step " in line for line in lines) == 4 and len(lines) <= 4 + 8, first.stdout
    assert "INFO" not in first.stdout + first.stderr and len(first.stderr.splitlines()) <= 2, first.stderr
    assert (tmp_path / "run" / "curves.png").is_file() and (tmp_path / "run" / "log.txt").stat().st_size > 0
