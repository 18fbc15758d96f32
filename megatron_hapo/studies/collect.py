"""Collect a study's finished cells into ``study.md``, ``study.json`` and PNGs.

Per benchmark (and their mean), the best and the final avg@n of each size and algorithm as the mean and range
over the seeds that finished (``eval_summary.json``); accuracy against parameters and against generated samples
(``metrics.jsonl``); the step-time split and tokens/s per GPU (or per CPU rank) from the run's own launch record
(``launch.json``), MFU only where the GPU's peak is known. A cell that has not finished is shown as such (how
many seeds finished, or ``not finished``), never as a zero.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import fmean
from typing import Any

from megatron_hapo.studies.cli import finished
from megatron_hapo.studies.spec import Cell, Study
from megatron_hapo.studies.throughput import dense_decoder_params, measured_row

#: Dense BF16 peak TFLOP/s by the GPU name in ``launch.json`` (NVIDIA data sheets); other devices: no MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0}


def peak_flops(device: str) -> float | None:
    """The peak of a ``launch.json`` device name (``NVIDIA H100 80GB HBM3``), or ``None`` (a CPU, an unknown GPU)."""
    return next((tflops * 1e12 for name, tflops in PEAK_TFLOPS.items() if name in device), None)


def cell_result(cell: Cell) -> dict[str, Any]:
    """What one cell's run directory says: status, per benchmark best / final, curves, throughput."""
    config = cell.config()
    out: dict[str, Any] = {"cell": cell.name, "size": cell.size.name, "algorithm": cell.algorithm, "seed": cell.seed}
    run = cell.run_dir
    out["status"] = (
        "finished"
        if finished(cell, config.train.total_steps)
        else ("not started" if not (run / "metrics.jsonl").is_file() else "unfinished")
    )
    arch = Path(str(config.model.config_file or Path(str(config.model.path)) / "config.json"))
    out["params"] = dense_decoder_params(json.loads(arch.read_text())) if arch.is_file() else None
    if out["status"] != "finished":
        return out
    summary = json.loads((run / "eval_summary.json").read_text()) if (run / "eval_summary.json").is_file() else {}
    out["eval"] = {
        group: {metric: {"best": v["best"], "final": v["final"]} for metric, v in metrics.items() if "avg@" in metric}
        for group, metrics in summary.items()
    }
    from megatron_hapo.trainer.metrics import read_metrics  # noqa: PLC0415

    rows = [r for r in read_metrics(run) if r["step"] >= 0]
    samples = 0.0
    out["curve"] = []
    for row in rows:
        samples += row.get("generated_samples", 0.0)
        out["curve"].append((row["step"], samples, row.get("accuracy", math.nan)))
    launch = json.loads((run / "launch.json").read_text()) if (run / "launch.json").is_file() else {}
    gpus = int(launch.get("nodes", 1)) * int(launch.get("gpus_per_node", 1))
    device = str(launch.get("gpu", "unknown"))
    peak = peak_flops(device)
    speed = measured_row(cell.name, rows, out["params"] or 0, gpus, peak or 1.0)
    out["throughput"] = {
        "device": device,
        "ranks": gpus,
        **{k: speed[k] for k in ("step_s", "rollout_s", "train_s", "sync_s", "other_s", "tokens_per_s_per_gpu")},
        "mfu": speed["mfu"] if peak is not None else None,
    }
    return out


def _spread(values: list[float]) -> str:
    return f"{fmean(values):.3f} [{min(values):.3f}, {max(values):.3f}]" if values else ""


def summarize(study: Study, results: list[dict]) -> dict[str, Any]:
    """``{benchmark: {size: {algorithm: {best, final, seeds, finished}}}}`` over the seeds, and the throughput."""
    groups = sorted({g for r in results for g in r.get("eval", {})}, key=lambda g: (g == "mean", g))
    table: dict[str, Any] = {}
    for group in groups:
        for size in study.sizes:
            for algorithm in study.algorithms:
                cells = [r for r in results if r["size"] == size and r["algorithm"] == algorithm]
                done = [r for r in cells if group in r.get("eval", {})]
                values = {
                    kind: [next(iter(r["eval"][group].values()))[kind] for r in done] for kind in ("best", "final")
                }
                table.setdefault(group, {}).setdefault(size, {})[algorithm] = {
                    "best": _spread([v for v in values["best"] if v is not None]),
                    "final": _spread([v for v in values["final"] if v is not None]),
                    "best_values": values["best"],
                    "final_values": values["final"],
                    "finished": len(done),
                    "seeds": len(cells),
                }
    return table


def render(study: Study, results: list[dict], table: dict[str, Any]) -> str:
    """``study.md``."""
    lines = [f"# Study {study.name}", "", study.description, ""]
    metric = next((m for r in results for g in r.get("eval", {}).values() for m in g), "avg@n")
    algorithms = list(study.algorithms)
    for group, sizes in table.items():
        lines += [f"## {group}: {metric}, best / final (mean [min, max] over seeds)", ""]
        lines.append("| size | params | " + " | ".join(f"{a} best | {a} final" for a in algorithms) + " |")
        lines.append("|---|---|" + "---|---|" * len(algorithms))
        for size, per_algorithm in sizes.items():
            params = next((r["params"] for r in results if r["size"] == size and r["params"]), None)
            cells = []
            for algorithm in algorithms:
                entry = per_algorithm[algorithm]
                if not entry["finished"]:
                    cells += ["not finished", "not finished"]
                    continue
                tail = "" if entry["finished"] == entry["seeds"] else f" ({entry['finished']}/{entry['seeds']} seeds)"
                cells += [entry["best"] + tail, entry["final"] + tail]
            shown = f"{params / 1e6:.2f}M" if params else "?"
            lines.append(f"| {size} | {shown} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "## Cost",
        "",
        "| cell | status | device x ranks | step s | rollout s | train s | tokens/s per rank | MFU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        t = r.get("throughput")
        if t is None:
            lines.append(f"| {r['cell']} | {r['status']} | | | | | | |")
            continue
        mfu = f"{t['mfu']:.2%}" if t["mfu"] is not None else "n/a"
        lines.append(
            f"| {r['cell']} | {r['status']} | {t['device']} x {t['ranks']} | {t['step_s']:.2f} | "
            f"{t['rollout_s']:.2f} | {t['train_s']:.2f} | {t['tokens_per_s_per_gpu']:,.0f} | {mfu} |"
        )
    return "\n".join(lines) + "\n"


def plot(study: Study, results: list[dict], table: dict[str, Any], out: Path) -> list[Path]:
    """``accuracy_vs_params.png`` (final avg@n of each benchmark group, mean and range over seeds) and
    ``accuracy_vs_samples.png`` (training accuracy of every finished cell against generated samples)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    paths = [out / "accuracy_vs_params.png", out / "accuracy_vs_samples.png"]
    groups = list(table)
    figure, axes = plt.subplots(1, max(len(groups), 1), figsize=(4.5 * max(len(groups), 1), 3.6), squeeze=False)
    for axis, group in zip(axes[0], groups, strict=False):
        for algorithm in study.algorithms:
            points = []
            for size, per_algorithm in table[group].items():
                params = next((r["params"] for r in results if r["size"] == size and r["params"]), None)
                values = [v for v in per_algorithm[algorithm]["final_values"] if v is not None]
                if params and values:
                    points.append((params, fmean(values), min(values), max(values)))
            if points:
                xs, ys, lows, highs = zip(*points, strict=True)
                errors = [
                    [y - lo for y, lo in zip(ys, lows, strict=True)],
                    [h - y for y, h in zip(ys, highs, strict=True)],
                ]
                axis.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=algorithm)
        axis.set_xscale("log")
        axis.set_title(f"{group}: final accuracy")
        axis.set_xlabel("parameters")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(paths[0], dpi=110)
    plt.close(figure)
    figure, axis = plt.subplots(figsize=(6.5, 4))
    styles = dict(zip(study.sizes, ("-", "--", ":", "-."), strict=False))
    colours = {a: f"C{i}" for i, a in enumerate(study.algorithms)}
    for r in results:
        if r.get("curve"):
            _, samples, accuracy = zip(*r["curve"], strict=True)
            axis.plot(samples, accuracy, styles.get(r["size"], "-"), color=colours[r["algorithm"]], label=r["cell"])
    axis.set_xlabel("generated samples")
    axis.set_ylabel("training accuracy")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=6, ncol=2)
    figure.tight_layout()
    figure.savefig(paths[1], dpi=110)
    plt.close(figure)
    return paths


def _strict(value: Any) -> Any:
    """``value`` with every NaN / infinity as ``None`` (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    return value


def collect(study: Study, out: Path) -> int:
    """Write ``study.md``, ``study.json`` and the PNGs into ``out``; print the table."""
    results = [cell_result(cell) for cell in study.cells()]
    table = summarize(study, results)
    out.mkdir(parents=True, exist_ok=True)
    text = render(study, results, table)
    (out / "study.md").write_text(text)
    report = _strict({"study": study.name, "cells": results, "table": table})
    (out / "study.json").write_text(json.dumps(report, indent=1, allow_nan=False))
    pngs = plot(study, results, table, out)
    print(text)
    print(f"wrote {out / 'study.md'}, {out / 'study.json'}, {', '.join(str(p) for p in pngs)}")
    return 0
