"""The one-call GPU check (scripts/gpu_check.sh + scripts/gpu_check.py) run end to end on the CPU.

``--allow-cpu`` takes the same code path over gloo with bf16 on the CPU: every check but ``pytest_gpu`` (tests/gpu
need CUDA; a SKIP there) and the ``sleep`` memory part of ``weight_sync`` (the hf engine offloads only on CUDA).
This proves the script, its isolation and its reports before a GPU node runs it; it proves nothing about the GPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
LINE = re.compile(r"^\[gpu-check\] (PASS|FAIL|SKIP) (\w+): (.*) \((\d+\.\d) s\)$", re.MULTILINE)


def _gpu_check() -> ModuleType:
    if "gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check", REPO_ROOT / "scripts" / "gpu_check.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = module
        spec.loader.exec_module(module)
    return sys.modules["gpu_check"]


def _cpu_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OUT")}
    return {**env, "CUDA_VISIBLE_DEVICES": "", **extra}


def _lines(text: str) -> dict[str, tuple[str, str]]:
    return {name: (status, detail) for status, name, detail, _ in LINE.findall(text)}


@pytest.mark.slow
def test_whole_check_passes_on_cpu(tmp_path: Path) -> None:
    """``bash scripts/gpu_check.sh --allow-cpu`` in this venv (nothing to install): every check passes."""
    out = tmp_path / "out"
    env = _cpu_env(
        OUT=str(out),
        GPU_CHECK_PYTHON=sys.executable,
        GPU_CHECK_WHEELS=str(tmp_path / "no_wheels"),
        GPU_CHECK_DEPS=str(tmp_path / "deps"),
    )
    result = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--allow-cpu", "--work-dir", str(tmp_path)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,  # above the script's own limits (460 s + 15 s), a hang guard
    )
    print(result.stdout[-6000:])
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "nothing to install" in result.stdout
    lines = _lines(result.stdout)
    check = _gpu_check()
    expected = ["tiny_model", *(name for name, _ in check.SUITE), "train_cli"]
    assert {name: lines.get(name, ("missing",))[0] for name in expected} == dict.fromkeys(expected, "PASS"), lines
    assert lines["pytest_gpu"][0] == "SKIP" and "need CUDA" in lines["pytest_gpu"][1]
    assert "[gpu-check] ALL PASSED" in result.stdout and "CPU run" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["passed"] and summary["mode"] == "cpu" and summary["failed"] == [], summary
    data = {c["name"]: c["data"] for c in summary["checks"]}
    assert data["device"]["backend"] == "gloo"
    assert data["forward_fp32"]["max_abs_log_prob"] < 1e-4, data["forward_fp32"]  # float32 noise, not a tolerance
    assert data["forward_bf16"]["mult_error"] < check.BF16_MULT_ERROR / 2, data["forward_bf16"]
    assert data["weight_sync"]["wrong_weight_mult_error"] > 10 * check.SYNC_TOLERANCE, data["weight_sync"]
    assert data["ppo_updates"]["max_weight_change"] > 0 and len(data["ppo_updates"]["steps"]) == check.PPO_STEPS
    assert data["checkpoint"]["differed_before_load"] > 0 and data["checkpoint"]["step"] == check.PPO_STEPS
    assert data["export_hf"]["trained_vs_initial_max_abs_log_prob"] > check.BF16_MAX_ABS  # the export is trained
    assert [row["step"] for row in data["train_cli"]["rows"]] == list(range(check.CLI_STEPS))
    for name in (
        "gpu_check.log",
        "environment.txt",
        "install.log",
        "suite.log",
        "suite_results.jsonl",
        "export.log",
        "train_cli.log",
        "train_cli_metrics.jsonl",
    ):
        assert (out / name).is_file(), name
    assert _lines((out / "gpu_check.log").read_text()) == lines


def test_checks_are_isolated_and_time_limited(tmp_path: Path) -> None:
    """A check that hangs in Python is stopped by its limit, one that raises fails alone, one that blocks past any
    signal is killed with the suite (its stack dumped first), and the stages after it still run."""
    out = tmp_path / "out"
    args = [
        sys.executable,
        "scripts/gpu_check.py",
        "--allow-cpu",
        "--out",
        str(out),
        "--work-dir",
        str(tmp_path),
        "--stages",
        "suite,pytest_gpu",
        "--checks",
        "device,forward_fp32,forward_bf16,weight_sync,ppo_updates",
        "--inject",
        "forward_fp32=hang",
        "--inject",
        "forward_bf16=raise",
        "--inject",
        "weight_sync=block",
        "--limit",
        "forward_fp32=5",
        "--limit",
        "weight_sync=5",
        "--deadline",
        "900",  # a backstop only: the blocked check is killed 5 + WATCH_GRACE_S s after its own start
    ]
    result = subprocess.run(args, cwd=REPO_ROOT, env=_cpu_env(), capture_output=True, text=True, timeout=1200)
    print(result.stdout[-4000:])
    assert result.returncode == 1, result.stdout[-4000:] + result.stderr[-2000:]
    lines = _lines(result.stdout)
    assert lines["device"][0] == "PASS", lines
    assert lines["forward_fp32"][0] == "FAIL" and "CheckTimeoutError" in lines["forward_fp32"][1], lines
    assert lines["forward_bf16"][0] == "FAIL" and "RuntimeError" in lines["forward_bf16"][1], lines
    assert lines["weight_sync"][0] == "FAIL" and "killed at its time limit" in lines["weight_sync"][1], lines
    assert lines["ppo_updates"] == ("FAIL", "not run: the suite process ended early (exit -9)"), lines
    assert lines["pytest_gpu"][0] == "SKIP"  # the stage after the killed one ran
    assert "[gpu-check] FAILED: forward_fp32, forward_bf16, weight_sync, ppo_updates;" in result.stdout
    suite_log = (out / "suite.log").read_text()
    assert "[gpu-check] killed: weight_sync ran 10 s past its limit" in suite_log
    assert "most recent call first" in suite_log and "_inject_fault" in suite_log  # the stack of the blocked check
    summary = json.loads((out / "summary.json").read_text())
    assert not summary["passed"] and summary["failed"] == ["forward_fp32", "forward_bf16", "weight_sync", "ppo_updates"]


def test_pytest_output_is_classified_by_skip_reason() -> None:
    classify = _gpu_check().classify_pytest
    head = "=========================== short test summary info ============================\n"
    allowed = (
        "SKIPPED [1] tests/gpu/conftest.py:24: vLLM is not installed (GPU build needed)\n"
        "SKIPPED [2] tests/gpu/conftest.py:29: Transformer Engine is not installed (GPU build needed)\n"
        "SKIPPED [1] tests/gpu/test_parallel_nccl.py:49: needs 2 GPUs\n"
    )
    tail = "============ 7 passed, 4 skipped, 2 warnings in 95.20s (0:01:35) =============\n"
    passed, outcome, named, unexpected = classify(head + allowed + tail, 0)
    assert passed and outcome == "7 passed, 4 skipped, 2 warnings" and not unexpected
    assert sorted(named) == ["multi_gpu", "transformer_engine_fp8", "vllm_engine"]
    other = "SKIPPED [3] tests/gpu/test_algos_cuda.py: needs a CUDA device; run tests/gpu on a GPU machine\n"
    passed, _, _, unexpected = classify(head + allowed + other + tail, 0)
    assert not passed and unexpected == [f"3x tests/gpu/test_algos_cuda.py: {other.split(': ', 1)[1].strip()}"]
    assert not classify(head + "======= 1 failed, 6 passed in 9.00s =======\n", 1)[0]
    assert not classify(head + allowed + "======= 4 skipped in 1.00s =======\n", 0)[0]  # nothing ran
    assert classify("ImportError while loading conftest\n", 4)[1] == "no pytest summary (exit 4)"


def test_carried_wheels_match_what_the_check_installs() -> None:
    """scripts/fetch_gpu_wheels.sh downloads exactly the distributions gpu_check.py installs, megatron-core at the
    version setup.py pins; this venv has them all (``--list-missing`` prints nothing)."""
    script = (REPO_ROOT / "scripts" / "fetch_gpu_wheels.sh").read_text()
    block = script[script.index("requirements=(") : script.index(")", script.index("requirements=("))]
    fetched = dict(re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', block))
    installed = {req.partition("==")[0]: req.partition("==")[2] for req, _ in _gpu_check().REQUIREMENTS}
    assert fetched.keys() == installed.keys()
    assert all(not pin or fetched[name] == pin for name, pin in installed.items()), (fetched, installed)
    setup = (REPO_ROOT / "setup.py").read_text()
    assert f'"megatron-core=={fetched["megatron-core"]}"' in setup
    result = subprocess.run(
        [sys.executable, "scripts/gpu_check.py", "--list-missing"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout == "", result.stdout
