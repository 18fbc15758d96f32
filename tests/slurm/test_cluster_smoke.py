"""Smoke tests of the session's Slurm cluster: two nodes, two fake GPUs each, srun and sbatch work."""

from pathlib import Path

import pytest
from cluster import SlurmCluster

pytestmark = pytest.mark.slow


def test_srun_two_nodes(slurm_cluster: SlurmCluster) -> None:
    out = slurm_cluster.run("srun", "-N2", "hostname").stdout.split()
    assert len(out) == 2, slurm_cluster.daemon_logs()


def test_srun_gpus_per_node(slurm_cluster: SlurmCluster) -> None:
    cmd = "echo $SLURMD_NODENAME $SLURM_PROCID $SLURM_GPUS_ON_NODE"
    res = slurm_cluster.run("srun", "-N2", "--gpus-per-node=2", "--ntasks-per-node=2", "bash", "-c", cmd)
    rows = sorted(line.split() for line in res.stdout.splitlines())
    assert len(rows) == 4, res.stdout
    assert {r[0] for r in rows} == {"n1", "n2"}
    assert sorted(r[1] for r in rows) == ["0", "1", "2", "3"]
    assert {r[2] for r in rows} == {"2"}


def test_sbatch_two_nodes(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    job_id = slurm_cluster.sbatch(["-N2", "--output=out-%j.txt", "--wrap", "srun -N2 hostname"], cwd=tmp_path)
    info = slurm_cluster.wait(job_id, timeout_s=60)
    assert info["JobState"] == "COMPLETED", f"{info}\n{slurm_cluster.daemon_logs()}"
    assert info["ExitCode"] == "0:0"
    assert info["NodeList"] == "n[1-2]"
    assert info["Restarts"] == "0"
    assert len((tmp_path / f"out-{job_id}.txt").read_text().splitlines()) == 2


def test_unknown_job_is_empty(slurm_cluster: SlurmCluster) -> None:
    assert slurm_cluster.job(999999) == {}
