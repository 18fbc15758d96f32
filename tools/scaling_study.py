#!/usr/bin/env python
"""Scaling studies: lay out, launch and collect a study file's cells; or the throughput of runs, measured or predicted.

    .venv/bin/python tools/scaling_study.py plan | submit [--local] | collect STUDY.yaml   # configs/studies/
    .venv/bin/python tools/scaling_study.py [RUN_DIR ...] [--predict NAME=CONFIG_JSON[:GPUS] ...] --out OUT

The first form is :mod:`megatron_hapo.studies` (``plan`` / ``submit`` / ``collect``; see there). The second:

Writes ``OUT/scaling_table.md`` (also printed), ``OUT/scaling.json`` and ``OUT/scaling.png`` (step-time split,
tokens/s/GPU against parameters, reward curves). One row per run or case; the ``source`` column says whether its
numbers were measured or predicted, and every predicted number carries ``(p)`` in the table and ``predicted: true``
in the JSON. With neither runs nor ``--predict`` it predicts the two calibration models (and so reproduces them).

Measured rows (a RUN_DIR holds the trainer's ``metrics.jsonl`` and ``config.json``, and the Slurm launcher's
``launch.json`` when launched that way, else 1 node x 1 GPU is assumed): means over the steps after the first
(warm-up); rollout = ``time_generate``, train = ``time_old_log_prob + time_train``, sync = ``time_sync``, other =
the rest of ``time_step``; tokens/s/GPU = ``tokens_per_second`` / GPUs. Parameters come from ``--params-b
RUN=BILLIONS`` when given, else from the Hugging Face ``config.json`` under ``model.path``.

Predicted rows come from an analytic model, tokens/s/GPU = C * N^-alpha (N parameters), with C and alpha fitted to
exactly two published NeMo-RL v0.5 H100 BF16 on-policy GRPO figures: Llama-3.1-8B 1,581 tokens/s/GPU, step 92.8 s
on 16 GPUs; Qwen3-32B 571 tokens/s/GPU, step 376 s on 32 GPUs. Step s = tokens per step / (tokens/s/GPU * GPUs)
(``--tokens-per-step``, default the Llama-3.1-8B workload 1,581 * 16 * 92.8; a calibration model keeps its own).

ASSUMPTION (the step split of predicted rows; NeMo-RL publishes no generation/training/refit split): rollout is
1050 / 1700 = 61.8% of the step, the only published rollout-vs-step pair in the peer survey (verl, DeepSeek-671B on
96 GPUs); sync seconds follow a power law through verl's full NCCL broadcast times on H100 (7B 5.5-6.0 s, 32B
14.2-18.1 s; midpoints 5.75 s and 16.15 s), an upper bound for a colocated CUDA-IPC refit; train is the rest.

MFU is a training-equivalent MFU: 6 * N * tokens/s/GPU / peak (``--peak-tflops``, default 989 = H100 BF16 dense);
it counts every token as one forward+backward, which a rollout token is not.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from megatron_hapo.studies.throughput import (
    ASSUMPTION,
    CALIBRATION,
    CALIBRATION_SOURCE,
    DEFAULT_TOKENS_PER_STEP,
    LLAMA_31_8B,
    QWEN3_32B,
    ROLLOUT_FRACTION,
    SPLIT,
    SYNC_POINTS,
    calibration_fit,
    dense_decoder_params,
    fit_power_law,
    measured_row,
    mfu,
    predict_tokens_per_s_per_gpu,
    predicted_row,
    predicted_sync_s,
)
from megatron_hapo.trainer.metrics import read_metrics

__all__ = [  # the names the tests and other tools reach through this script
    "LLAMA_31_8B",
    "QWEN3_32B",
    "ROLLOUT_FRACTION",
    "SYNC_POINTS",
    "fit_power_law",
    "mfu",
    "predicted_sync_s",
]

COLUMNS = (
    ("name", "name"),
    ("params_b", "params (B)"),
    ("gpus", "GPUs"),
    ("source", "source"),
    ("step_s", "step s"),
    *((key, key.replace("_s", " s")) for key in SPLIT),
    ("tokens_per_s_per_gpu", "tokens/s/GPU"),
    ("mfu", "MFU"),
)


def run_params_and_gpus(run_dir: Path, params_b: dict[str, float]) -> tuple[int, int, list[str]]:
    """``(parameters, GPUs, notes)`` of a run directory; ``ValueError`` when the size cannot be found."""
    config_file = run_dir / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    model_path = config.get("model", {}).get("path")
    notes = []
    if run_dir.name in params_b:
        num_params = round(params_b[run_dir.name] * 1e9)
    elif model_path and (Path(model_path) / "config.json").is_file():
        num_params = dense_decoder_params(json.loads((Path(model_path) / "config.json").read_text()))
    else:
        raise ValueError(
            f"{run_dir}: cannot count parameters (model.path={model_path!r} has no config.json); "
            f"pass --params-b {run_dir.name}=BILLIONS"
        )
    launch_file = run_dir / "launch.json"
    if launch_file.is_file():  # the launch scripts and --local-ranks write it
        launch = json.loads(launch_file.read_text())
        gpus = int(launch["nodes"]) * int(launch["gpus_per_node"])
        if launch.get("gpu") == "cpu":
            notes.append(f"{run_dir.name}: ran on {gpus} CPU ranks (tokens/s per rank; no MFU)")
    else:
        gpus = 1
        notes.append(f"{run_dir.name}: no launch.json, assumed 1 node x 1 GPU")
    return num_params, gpus, notes


def _cell(row: dict, key: str) -> str:
    value = row[key]
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        text = f"{value:.1%}" if key == "mfu" else f"{value:.2f}" if key == "params_b" else f"{value:,.1f}"
        if key == "tokens_per_s_per_gpu" and abs(value) >= 100:
            text = f"{value:,.0f}"
        return f"{text} (p)" if key in row["predicted_fields"] else text
    return str(value)


def render_markdown(rows: list[dict], notes: list[str]) -> str:
    """The table plus its notes, as markdown."""
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(row, key) for key, _ in COLUMNS) + " |" for row in rows]
    return "\n".join([*lines, "", *(f"- {note}" for note in notes)]) + "\n"


def plot(rows: list[dict], curves: dict[str, list[tuple[float, float]]], fit: tuple[float, float], out: Path) -> None:
    """Write the three-panel PNG: step split, tokens/s/GPU vs parameters (log-log), reward curves."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    figure, (split_ax, scale_ax, reward_ax) = plt.subplots(1, 3, figsize=(15, 4.2))
    labels = [f"{row['name']}\n({row['source']})" for row in rows]
    bottom = [0.0] * len(rows)
    for key, colour in zip(SPLIT, ("tab:blue", "tab:orange", "tab:green", "tab:grey"), strict=True):
        heights = [max(0.0, row[key]) if not math.isnan(row[key]) else 0.0 for row in rows]
        bars = split_ax.bar(labels, heights, bottom=bottom, color=colour, label=key.replace("_s", ""))
        for bar, row in zip(bars, rows, strict=True):
            bar.set_hatch("//" if row["predicted"] else "")
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    split_ax.set_ylabel("seconds per step")
    split_ax.set_title("step-time split (hatched = predicted)")
    split_ax.tick_params(axis="x", labelsize=7)
    split_ax.legend(fontsize=8)
    sizes = [row["params_b"] * 1e9 for row in rows] + [dense_decoder_params(c["arch"]) for c in CALIBRATION]
    grid = [min(sizes) / 1.5 * (max(sizes) * 2.25 / min(sizes)) ** (i / 49) for i in range(50)]
    scale_ax.loglog(
        [n / 1e9 for n in grid],
        [predict_tokens_per_s_per_gpu(n, fit) for n in grid],
        "k--",
        label=f"fit C*N^-{fit[1]:.3f}",
    )
    published = [(dense_decoder_params(c["arch"]) / 1e9, c["tokens_per_s_per_gpu"]) for c in CALIBRATION]
    scale_ax.scatter(*zip(*published, strict=True), marker="x", s=70, color="k", label="published (NeMo-RL)")
    for index, row in enumerate(rows):
        colour, label = f"C{index % 10}", f"{row['name']} ({row['source']})"
        scale_ax.scatter(
            row["params_b"],
            row["tokens_per_s_per_gpu"],
            s=50,
            edgecolors=colour,
            facecolors="none" if row["predicted"] else colour,
            label=label,
        )
    scale_ax.set_xlabel("parameters (B)")
    scale_ax.set_ylabel("tokens/s/GPU")
    scale_ax.set_title("throughput vs size (hollow = predicted)")
    scale_ax.legend(fontsize=7)
    for name, points in curves.items():
        reward_ax.plot(*zip(*points, strict=True), marker=".", label=name)
    if curves:
        reward_ax.legend(fontsize=8)
    else:
        reward_ax.text(0.5, 0.5, "no measured runs", ha="center", va="center", transform=reward_ax.transAxes)
    reward_ax.set_title("reward_mean (measured runs)")
    reward_ax.set_xlabel("step")
    for axis in (split_ax, scale_ax, reward_ax):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)


def parse_predict(text: str) -> tuple[str, Path, int]:
    """``NAME=CONFIG[:GPUS]`` -> ``(name, config path, GPUs)`` (GPUs default 8); ``ValueError`` when malformed."""
    name, sep, rest = text.partition("=")
    path, colon, gpus_text = rest.rpartition(":")
    if not (colon and gpus_text.isdigit()):
        path, gpus_text = rest, "8"
    if not (sep and name and path) or int(gpus_text) < 1:
        raise ValueError(f"--predict {text!r}: expected NAME=CONFIG_JSON[:GPUS] with GPUS >= 1")
    config = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
    if not config.is_file():
        raise ValueError(f"--predict {text!r}: no such config file {config}")
    return name, config, int(gpus_text)


def parse_params_b(text: str) -> tuple[str, float]:
    """``NAME=BILLIONS`` -> ``(name, billions)``; ``ValueError`` when malformed."""
    name, sep, value = text.partition("=")
    try:
        billions = float(value)
    except ValueError:
        billions = math.nan
    if not (sep and name) or not billions > 0:
        raise ValueError(f"--params-b {text!r}: expected RUN_NAME=BILLIONS with BILLIONS > 0")
    return name, billions


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=Path, help="run directories with metrics.jsonl and config.json")
    parser.add_argument(
        "--predict",
        action="append",
        default=[],
        metavar="NAME=CONFIG[:GPUS]",
        help="predict for the HF config.json (or its directory) on GPUS GPUs (default 8)",
    )
    parser.add_argument(
        "--params-b",
        action="append",
        default=[],
        metavar="RUN=BILLIONS",
        help="parameters (billions) of a run, by directory name",
    )
    parser.add_argument(
        "--tokens-per-step",
        type=float,
        default=DEFAULT_TOKENS_PER_STEP,
        help="tokens per step of predicted cases (default: the Llama-3.1-8B run)",
    )
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="GPU peak (989 = H100 BF16 dense)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    return parser


def collect_rows(args: argparse.Namespace, fit: tuple[float, float]) -> tuple[list[dict], dict, list[str]]:
    """``(rows, reward curves, notes)`` of the runs and cases; ``ValueError`` on bad input."""
    cases = [parse_predict(text) for text in args.predict]
    params_b = dict(parse_params_b(text) for text in args.params_b)
    if args.tokens_per_step <= 0 or args.peak_tflops <= 0:
        raise ValueError("--tokens-per-step and --peak-tflops must be positive")
    peak, rows, curves, notes = args.peak_tflops * 1e12, [], {}, []
    for run in args.runs:
        if not (run / "metrics.jsonl").is_file():
            raise ValueError(f"{run} has no metrics.jsonl")
        metrics = read_metrics(run)
        if not metrics:
            raise ValueError(f"{run}/metrics.jsonl is empty")
        num_params, gpus, run_notes = run_params_and_gpus(run, params_b)
        rows.append(measured_row(run.name, metrics, num_params, gpus, peak))
        if any(note.startswith(f"{run.name}: ran on") for note in run_notes):
            rows[-1]["mfu"] = math.nan  # a GPU's peak says nothing of a CPU run
        notes += [
            *run_notes,
            f"{run.name}: the analytic model predicts "
            f"{predict_tokens_per_s_per_gpu(num_params, fit):,.0f} tokens/s/GPU at this size",
        ]
        curves[run.name] = [(row["step"], row["reward_mean"]) for row in metrics if "reward_mean" in row]
    low, high = sorted(dense_decoder_params(c["arch"]) for c in CALIBRATION)
    for name, config, gpus in cases:
        num_params = dense_decoder_params(json.loads(config.read_text()))
        if not low <= num_params <= high:
            notes.append(
                f"{name}: {num_params / 1e9:.2f}B lies outside the calibrated {low / 1e9:.1f}-"
                f"{high / 1e9:.1f}B range; its prediction is an extrapolation"
            )
        rows.append(predicted_row(name, num_params, gpus, fit, tokens_per_step=args.tokens_per_step, peak_flops=peak))
    if not rows:  # no runs, no cases: predict the calibration models on their own workloads
        for c in CALIBRATION:
            tokens = c["tokens_per_s_per_gpu"] * c["gpus"] * c["step_s"]
            num_params = dense_decoder_params(c["arch"])
            rows.append(predicted_row(c["name"], num_params, c["gpus"], fit, tokens_per_step=tokens, peak_flops=peak))
    return rows, curves, notes


def general_notes(fit: tuple[float, float], peak_tflops: float) -> list[str]:
    """The notes under every table: flags, the model and its calibration, the assumption, the MFU definition."""
    calibration = "; ".join(
        f"{c['name']} {c['tokens_per_s_per_gpu']:,.0f} tokens/s/GPU, step {c['step_s']} s on {c['gpus']} GPUs"
        for c in CALIBRATION
    )
    return [
        "(p) = predicted by the analytic model, not measured; the source column says which rows are measured",
        f"model: tokens/s/GPU = {fit[0]:.4g} * N^-{fit[1]:.4f}, fitted to {CALIBRATION_SOURCE}: {calibration}",
        ASSUMPTION,
        f"MFU = training-equivalent MFU (6N per token) over a {peak_tflops:g} TFLOP/s peak per GPU",
        "measured: means over the steps after the first; rollout = time_generate, train = time_old_log_prob + "
        "time_train, sync = time_sync, other = the rest of time_step",
    ]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("plan", "submit", "collect"):  # a study file: megatron_hapo.studies
        from megatron_hapo.studies.cli import main as study_main  # noqa: PLC0415

        return study_main(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    fit = calibration_fit()
    try:
        rows, curves, notes = collect_rows(args, fit)
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as error:
        parser.error(str(error))
    notes += general_notes(fit, args.peak_tflops)
    args.out.mkdir(parents=True, exist_ok=True)
    table = render_markdown(rows, notes)
    (args.out / "scaling_table.md").write_text(table)
    fit_json = {"c": fit[0], "alpha": fit[1], "source": CALIBRATION_SOURCE, "assumption": ASSUMPTION}
    (args.out / "scaling.json").write_text(json.dumps({"rows": rows, "notes": notes, "fit": fit_json}, indent=2))
    plot(rows, curves, fit, args.out / "scaling.png")
    print(table)
    print(f"wrote {args.out / 'scaling_table.md'}, {args.out / 'scaling.json'}, {args.out / 'scaling.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
