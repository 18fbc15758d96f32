"""The launch scripts: shellcheck-clean, a real #SBATCH header each, and every one points at a planned run config."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from test_plan import SHIPPED

REPO = Path(__file__).resolve().parents[2]
SBATCH_SCRIPTS = sorted((REPO / "launch").glob("hapo_*.sh"))


def test_shell_scripts_are_shellcheck_clean() -> None:
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    scripts = [*map(str, (REPO / "launch").glob("*.sh")), *map(str, (REPO / "scripts").glob("*.sh")), ".ci/run"]
    result = subprocess.run([shellcheck, "-x", *scripts], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_sbatch_headers_and_run_configs() -> None:
    assert {p.name for p in SBATCH_SCRIPTS} >= {
        "hapo_1.5b.sh",
        "hapo_7b.sh",
        "hapo_8b.sh",
        "hapo_14b.sh",
        "hapo_32b.sh",
        "hapo_70b.sh",
    }
    for script in SBATCH_SCRIPTS:
        text = script.read_text()
        header = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, flags=re.MULTILINE))
        for key in ("nodes", "gpus-per-node", "exclusive", "time", "requeue", "signal", "output"):
            assert key in header, (script.name, key)
        assert header["signal"].startswith("USR1@")  # the trainer checkpoints and exits 75 on SIGUSR1
        config = re.search(r"^RUN_CONFIG=configs/runs/(\S+)\.yaml$", text, flags=re.MULTILINE).group(1)
        assert int(header["nodes"]) == SHIPPED[config], script.name  # the layout tools/plan.py checks in CI
        assert 'source "$REPO_ROOT/launch/_run.sh"' in text
        assert not re.search(r"^\s*[a-z_.]+=[\d.e-]+\s*$", text, flags=re.MULTILINE)  # no hyperparameters in bash


def test_every_launch_script_answers_help_and_launches_nothing(tmp_path: Path) -> None:
    scripts = sorted(p for p in (REPO / "launch").glob("*.sh") if not p.name.startswith("_"))
    assert {p.name for p in scripts} >= {"hapo_70b.sh", "local.sh", "evaluate.sh"}
    env = {"PATH": "/usr/bin:/bin", "RUN_ROOT": str(tmp_path / "runs"), "HOME": str(tmp_path)}
    for script in scripts:
        for flag in ("--help", "-h"):
            args = ["model.path=/nowhere", flag] if script.name != "local.sh" else [flag]
            result = subprocess.run(["bash", str(script), *args], cwd=tmp_path, env=env, capture_output=True, text=True)
            assert result.returncode == 0, (script.name, result.stderr)
            assert f"launch/{script.name}" in result.stdout, (script.name, result.stdout)  # an example command
            assert "Environment (all optional):" in result.stdout and "RUN_ROOT" in result.stdout
            assert ("Slurm resources" in result.stdout) == (script.name != "local.sh"), result.stdout
    assert not (tmp_path / "runs").exists() and list(tmp_path.iterdir()) == []  # nothing launched, nothing written


def test_runs_go_to_the_clusters_scratch_file_system(tmp_path: Path) -> None:
    """Without RUN_ROOT, a cluster's $SCRATCH holds the run directory (its checkpoints are large); RUN_ROOT wins."""
    base = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "GPUS_PER_NODE": "1", "PYTHON": "/bin/false"}
    for extra, expected in (
        ({"SCRATCH": str(tmp_path / "scratch")}, tmp_path / "scratch" / "megatron_hapo" / "runs" / "r"),
        ({"SCRATCH": str(tmp_path / "scratch"), "RUN_ROOT": str(tmp_path / "mine")}, tmp_path / "mine" / "r"),
    ):
        env = {**base, **extra, "RUN_NAME": "r"}
        result = subprocess.run(
            ["bash", str(REPO / "launch" / "hapo_1.5b.sh"), "model.path=/nowhere"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert f"-> {expected} (attempt 0" in result.stdout, result.stdout + result.stderr
        assert (expected / "logs").is_dir()  # the rank logs went there (the ranks were /bin/false: exit 1)
        assert result.returncode == 1, result.stderr


def test_each_scripts_stop_signal_is_its_runs_estimated_lead_time() -> None:
    """``--signal=USR1@T``: T is the planner's stop lead time for the script's run config and nodes (the longest
    phase between two stop checks plus the checkpoint, with margin; docs/GPU.md), not a fixed 10 minutes that a
    70B step and its ~1 TB checkpoint would overrun."""
    import json

    from megatron_hapo.config import load_config
    from megatron_hapo.studies.throughput import MIN_LEAD_S, dense_decoder_params, stop_lead_time

    leads = {}
    for script in SBATCH_SCRIPTS:
        text = script.read_text()
        header = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, flags=re.MULTILINE))
        config = load_config(REPO / re.search(r"^RUN_CONFIG=(\S+)$", text, flags=re.MULTILINE).group(1), warn=False)
        params = dense_decoder_params(json.loads((REPO / config.model.config_file).read_text()))
        size = {"nodes": int(header["nodes"]), "gpus_per_node": int(header["gpus-per-node"])}
        lead = stop_lead_time(config, params, **size)
        assert header["signal"] == f"USR1@{int(lead['lead_s'])}", (script.name, lead)
        assert lead["lead_s"] >= 1.25 * (max(lead["rollout_s"], lead["updates_s"]) + lead["save_s"]), script.name
        leads[script.name] = lead["lead_s"]
    assert leads["hapo_70b.sh"] > MIN_LEAD_S and min(leads.values()) == MIN_LEAD_S, leads
