#!/usr/bin/env python
"""Collect the throughput of RL runs across model sizes into one table and PNG, measured or predicted.

    .venv/bin/python tools/scaling_study.py [RUN_DIR ...] [--predict NAME=CONFIG_JSON[:GPUS] ...] --out OUT

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
from statistics import fmean

from megatron_hapo.models.hf_config import decoder_spec
from megatron_hapo.models.plan import total_params
from megatron_hapo.trainer.metrics import read_metrics

#: Architectures of the two calibration models (Hugging Face config keys) and their published figures.
_MODELS = Path(__file__).resolve().parents[1] / "configs" / "models"
LLAMA_31_8B = json.loads((_MODELS / "llama-3.1-8b-instruct" / "config.json").read_text())
QWEN3_32B = json.loads((_MODELS / "qwen3-32b" / "config.json").read_text())
CALIBRATION = (
    {"name": "Llama-3.1-8B", "arch": LLAMA_31_8B, "tokens_per_s_per_gpu": 1581.0, "step_s": 92.8, "gpus": 16},
    {"name": "Qwen3-32B", "arch": QWEN3_32B, "tokens_per_s_per_gpu": 571.0, "step_s": 376.0, "gpus": 32},
)
CALIBRATION_SOURCE = "NeMo-RL v0.5 performance summary, H100 BF16, on-policy GRPO"
#: Assumed rollout share of a predicted step (verl DeepSeek-671B, 96 GPUs: rollout 1050 s of a 1700 s step).
ROLLOUT_FRACTION = 1050.0 / 1700.0
#: (parameters, seconds) of verl's full NCCL weight broadcast on H100 (midpoints of 5.5-6.0 s and 14.2-18.1 s).
SYNC_POINTS = ((7e9, 5.75), (32e9, 16.15))
DEFAULT_TOKENS_PER_STEP = 1581.0 * 16 * 92.8
ASSUMPTION = (
    f"predicted split is an ASSUMPTION: rollout = {ROLLOUT_FRACTION:.1%} of the step (verl DeepSeek-671B "
    "1050 s of 1700 s; NeMo-RL publishes no split), sync = power law through verl's H100 NCCL broadcast "
    "times (7B 5.75 s, 32B 16.15 s), train = the rest"
)
SPLIT = ("rollout_s", "train_s", "sync_s", "other_s")
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
PREDICTED_FIELDS = ("step_s", *SPLIT, "tokens_per_s_per_gpu", "mfu")


def dense_decoder_params(hf_config: dict) -> int:
    """Parameters of a decoder megatron_hapo trains (Llama 3, Qwen2, Qwen3) from its Hugging Face config dict: the
    planner's count (``megatron_hapo.models.plan.total_params``); other architectures are refused, naming why."""
    return total_params(decoder_spec(hf_config))


def fit_power_law(points: tuple[tuple[float, float], ...]) -> tuple[float, float]:
    """``(C, alpha)`` with ``y = C * x^-alpha`` through exactly two ``(x, y)`` points."""
    (x1, y1), (x2, y2) = points
    alpha = math.log(y1 / y2) / math.log(x2 / x1)
    return y1 * x1**alpha, alpha


def calibration_fit() -> tuple[float, float]:
    """``(C, alpha)`` of tokens/s/GPU = C * N^-alpha through the two calibration models."""
    return fit_power_law(tuple((dense_decoder_params(c["arch"]), c["tokens_per_s_per_gpu"]) for c in CALIBRATION))


def predict_tokens_per_s_per_gpu(num_params: float, fit: tuple[float, float]) -> float:
    """The analytic model's tokens/s/GPU for ``num_params`` parameters."""
    c, alpha = fit
    return c * num_params**-alpha


def predicted_sync_s(num_params: float) -> float:
    """Assumed weight-sync seconds (power law through ``SYNC_POINTS``)."""
    c, alpha = fit_power_law(SYNC_POINTS)
    return c * num_params**-alpha


def mfu(num_params: float, tokens_per_s_per_gpu: float, peak_flops: float) -> float:
    """Training-equivalent MFU: 6 N FLOPs per token over the GPU's peak."""
    return 6.0 * num_params * tokens_per_s_per_gpu / peak_flops


def predicted_row(
    name: str, num_params: int, gpus: int, fit: tuple[float, float], *, tokens_per_step: float, peak_flops: float
) -> dict:
    """One ``predicted`` row: throughput from the fit, step from the workload, split from the ASSUMPTION."""
    tps = predict_tokens_per_s_per_gpu(num_params, fit)
    step = tokens_per_step / (tps * gpus)
    rollout, sync = ROLLOUT_FRACTION * step, min(predicted_sync_s(num_params), (1 - ROLLOUT_FRACTION) * step)
    return {
        "name": name,
        "params_b": num_params / 1e9,
        "gpus": gpus,
        "source": "predicted",
        "predicted": True,
        "predicted_fields": list(PREDICTED_FIELDS),
        "step_s": step,
        "rollout_s": rollout,
        "train_s": step - rollout - sync,
        "sync_s": sync,
        "other_s": 0.0,
        "tokens_per_s_per_gpu": tps,
        "mfu": mfu(num_params, tps, peak_flops),
        "tokens_per_step": tokens_per_step,
    }


def measured_row(name: str, metrics: list[dict], num_params: int, gpus: int, peak_flops: float) -> dict:
    """One ``measured`` row: means over the steps after the first (all steps when there is only one)."""
    rows = metrics[1:] or metrics

    def mean(*keys: str) -> float:
        values = [sum(row[k] for k in keys) for row in rows if all(k in row for k in keys)]
        return fmean(values) if values else math.nan

    step, rollout, sync = mean("time_step"), mean("time_generate"), mean("time_sync")
    train = mean("time_old_log_prob", "time_train")
    tps = mean("tokens_per_second") / gpus
    return {
        "name": name,
        "params_b": num_params / 1e9,
        "gpus": gpus,
        "source": "measured",
        "predicted": False,
        "predicted_fields": [],
        "step_s": step,
        "rollout_s": rollout,
        "train_s": train,
        "sync_s": sync,
        "other_s": step - rollout - train - sync,
        "tokens_per_s_per_gpu": tps,
        "mfu": mfu(num_params, tps, peak_flops),
        "steps_averaged": len(rows),
    }


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
    if launch_file.is_file():
        launch = json.loads(launch_file.read_text())
        gpus = int(launch["nodes"]) * int(launch["gpus_per_node"])
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
