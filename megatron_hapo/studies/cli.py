"""``tools/scaling_study.py plan | submit | collect STUDY``: lay out, launch and collect a study's cells.

- ``plan``: every cell's layout, GPUs and memory fit from the planner (``megatron_hapo.models.plan``), refusing
  cells that do not fit, and the GPU-hours, estimated from the throughput fit (marked as estimates).
- ``submit``: every cell not yet finished, through ``launch/local.sh`` (the launch scripts' path): one ``sbatch``
  job per cell, or with ``--local`` one after another on this machine. A finished cell (its last checkpoint is
  its last step) is not run again; an unfinished one resumes from its checkpoint; a failed one is reported
  (exit status 1). ``ROOT/submit.json`` records each cell's job or exit status.
- ``collect``: :mod:`megatron_hapo.studies.collect`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from megatron_hapo.config.errors import ConfigError
from megatron_hapo.studies.spec import REPO, Cell, Study, StudyError, load_study

LAUNCHER = REPO / "launch" / "local.sh"


def finished(cell: Cell, total_steps: int) -> bool:
    """Whether the cell's run reached its last step (its ``checkpoints/latest`` names that step)."""
    latest = cell.run_dir / "checkpoints" / "latest"
    return latest.is_file() and latest.read_text().strip() == f"step_{total_steps:06d}"


def _architecture(config: object) -> dict | None:
    model = config.model  # type: ignore[attr-defined]
    source = model.config_file or (str(Path(model.path) / "config.json") if model.path else None)
    return json.loads(Path(source).read_text()) if source and Path(source).is_file() else None


def plan_cell(cell: Cell) -> dict:
    """The planner's verdict on one cell: layout, parameters, errors, and the estimated GPU-hours."""
    from megatron_hapo.models.hf_config import decoder_spec  # noqa: PLC0415
    from megatron_hapo.models.plan import GIB, Layout, fit_errors, plan_run  # noqa: PLC0415
    from megatron_hapo.studies.throughput import estimated_step_s, stop_lead_time  # noqa: PLC0415

    row: dict = {"cell": cell.name, "gpus": cell.gpus, "errors": []}
    try:
        config = cell.config()
    except ConfigError as exc:
        return {**row, "errors": [str(exc)]}
    arch = _architecture(config)
    if arch is None:
        return {**row, "errors": ["no architecture: model.config_file or model.path/config.json is missing"]}
    model = config.model
    layout = Layout(
        cell.size.nodes,
        cell.size.gpus_per_node,
        model.tensor_parallel,
        model.pipeline_parallel,
        model.virtual_pipeline,
        config.engine.tensor_parallel,
    )
    plan = plan_run(decoder_spec(arch), config, layout)
    errors = list(plan.errors)
    if not errors and cell.size.gpu_gib:
        errors = fit_errors(plan, config, cell.size.gpu_gib * GIB)
    steps = config.train.total_steps
    row.update(
        params_b=plan.total_params / 1e9,
        layout=f"TP{layout.tp} PP{layout.pp} DP{layout.dp} / engine TP{layout.engine_tp}",
        steps=steps,
        errors=errors,
        device="GPU" if cell.size.gpu_gib else "CPU",
    )
    if cell.size.gpu_gib:  # responses at half their limit on average: an ESTIMATE
        row["gpu_hours_estimate"] = steps * estimated_step_s(config, plan.total_params, cell.gpus) * cell.gpus / 3600
        size = {"nodes": cell.size.nodes, "gpus_per_node": cell.size.gpus_per_node}
        row["stop_lead_s"] = stop_lead_time(config, plan.total_params, **size)["lead_s"]
    return row


def _params(billions: float) -> str:
    return f"{billions:.3g}B" if billions >= 1 else f"{billions * 1e3:.3g}M"


def plan(study: Study) -> int:
    """Print every cell's plan and the total GPU-hours; 1 when a cell is refused."""
    rows = [plan_cell(cell) for cell in study.cells()]
    print(f"study {study.name}: {len(rows)} cells -> {study.root}")
    print(f"{'cell':<28}{'params':>9}  {'layout':<30}{'GPUs':>5}{'steps':>7}{'GPU-h (est.)':>14}  verdict")
    for row in rows:
        hours = row.get("gpu_hours_estimate")
        shown = f"{hours:,.0f}" if hours is not None else f"{row.get('device', '')}"
        verdict = "refused: " + "; ".join(row["errors"]) if row["errors"] else "fits"
        params = _params(row["params_b"]) if "params_b" in row else "?"
        print(
            f"{row['cell']:<28}{params:>9}  {row.get('layout', ''):<30}{row['gpus']:>5}{row.get('steps', ''):>7}"
            f"{shown:>14}  {verdict}"
        )
    total = sum(r.get("gpu_hours_estimate", 0.0) for r in rows if not r["errors"])
    if not any("gpu_hours_estimate" in r for r in rows):
        print("total: CPU cells only (no GPU-hour estimate)")
    else:
        print(
            f"total: {total:,.0f} GPU-hours, ESTIMATED from the throughput fit (tools/scaling_study.py; responses "
            "at half their limit), not measured"
        )
    refused = [r["cell"] for r in rows if r["errors"]]
    if refused:
        print(f"refused: {len(refused)} cell(s): {', '.join(refused)}", file=sys.stderr)
    return 1 if refused else 0


def _record(study: Study, cell: Cell, entry: dict) -> None:
    path = study.root / "submit.json"
    records = json.loads(path.read_text()) if path.is_file() else {}
    records[cell.name] = {**entry, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path.write_text(json.dumps(records, indent=1))


def _launch_env(cell: Cell) -> dict[str, str]:
    return {
        **os.environ,
        "RUN_ROOT": str(cell.study.root),
        "RUN_NAME": cell.name,
        "GPUS_PER_NODE": str(cell.size.gpus_per_node),
        "NNODES": str(cell.size.nodes),
    }


def _queued(study: Study, cell: Cell) -> str | None:
    """The job id of the cell's recorded Slurm job when Slurm still has it pending or running."""
    path = study.root / "submit.json"
    job = (json.loads(path.read_text()) if path.is_file() else {}).get(cell.name, {}).get("job")
    if job is None:
        return None
    state = subprocess.run(["squeue", "-h", "-j", str(job), "-o", "%T"], capture_output=True, text=True, check=False)
    return str(job) if state.stdout.strip() in ("PENDING", "RUNNING", "CONFIGURING", "REQUEUED") else None


def submit(study: Study, *, local: bool, sbatch_args: list[str]) -> int:
    """Launch every unfinished cell (see the module docstring); 1 when a local cell failed."""
    from megatron_hapo.studies.throughput import MIN_LEAD_S  # noqa: PLC0415

    if not LAUNCHER.is_file():
        raise StudyError(f"submit runs the repository's launch scripts ({LAUNCHER} missing): run it from a clone")
    study.root.mkdir(parents=True, exist_ok=True)
    failed = []
    for cell in study.cells():
        config = cell.config()
        if finished(cell, config.train.total_steps):
            print(f"{cell.name}: finished, not run again")
            continue
        cell_config = cell.write_config()
        if local:
            log = study.root / f"{cell.name}.submit.log"
            print(f"{cell.name}: running here ({cell.gpus} ranks), log {log}", flush=True)
            with log.open("w") as handle:
                code = subprocess.run(
                    ["bash", str(LAUNCHER), str(cell_config)],
                    cwd=REPO,
                    env=_launch_env(cell),
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                    check=False,
                ).returncode
            _record(study, cell, {"exit": code, "log": str(log)})
            if code != 0:
                failed.append(cell.name)
                print(f"{cell.name}: FAILED (exit {code}); see {log} and {cell.run_dir / 'logs'}")
            continue
        if (job := _queued(study, cell)) is not None:
            print(f"{cell.name}: queued or running as job {job}, not submitted again")
            continue
        args = [
            "sbatch",
            "--parsable",
            f"--nodes={cell.size.nodes}",
            f"--gpus-per-node={cell.size.gpus_per_node}",
            f"--ntasks-per-node={cell.size.gpus_per_node}",  # one rank per GPU, as the launch scripts run them
            f"--job-name={study.name}-{cell.name}",
            f"--output={study.root}/{cell.name}.slurm-%j.out",
            "--requeue",
            f"--signal=USR1@{int(plan_cell(cell).get('stop_lead_s', MIN_LEAD_S))}",  # the plan's (floor: CPU cells)
            "--open-mode=append",
            *sbatch_args,
            str(LAUNCHER),
            str(cell_config),
        ]
        done = subprocess.run(args, cwd=REPO, env=_launch_env(cell), capture_output=True, text=True, check=False)
        if done.returncode != 0:
            failed.append(cell.name)
            print(f"{cell.name}: sbatch refused it: {done.stderr.strip()}")
            continue
        job_id = done.stdout.strip().split(";")[0]
        _record(study, cell, {"job": int(job_id)})
        print(f"{cell.name}: submitted as job {job_id}")
    if failed:
        print(f"{len(failed)} cell(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="scaling_study.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=("plan", "submit", "collect"))
    parser.add_argument("study", type=Path, help="a study file (configs/studies/*.yaml)")
    parser.add_argument("--local", action="store_true", help="submit: run the cells one after another here")
    parser.add_argument("--sbatch-arg", action="append", default=[], help="submit: an extra sbatch option")
    parser.add_argument("--out", type=Path, help="collect: where study.md / study.json / PNGs go (default: ROOT)")
    args = parser.parse_args(argv)
    try:
        study = load_study(args.study)
        if args.command == "plan":
            return plan(study)
        if args.command == "submit":
            return submit(study, local=args.local, sbatch_args=args.sbatch_arg)
        from megatron_hapo.studies.collect import collect  # noqa: PLC0415

        return collect(study, args.out or study.root)
    except (StudyError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
