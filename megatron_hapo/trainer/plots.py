"""PNG curves of training runs (``metrics.jsonl`` per run), for comparing algorithms or settings."""

from __future__ import annotations

from pathlib import Path

from megatron_hapo.trainer.metrics import read_metrics

DEFAULT_METRICS = ("reward_mean", "accuracy", "avg@8", "response_length_mean", "temperature_mean", "mismatch_kl")


def _x_values(run_rows: list[dict], axis: str) -> list[float]:
    """Each row's position on ``axis``: its step, or the samples generated up to and including it."""
    if axis == "step":
        return [row["step"] for row in run_rows]
    total, out = 0.0, []
    for row in run_rows:
        total += row.get("generated_samples", 0.0)
        out.append(total)
    return out


def _expand(metrics: tuple[str, ...], logged: set[str]) -> list[str]:
    """The metrics that were logged; a name logged only per evaluation set (``avg@8``) stands for each
    ``eval/<set>/avg@8``."""
    out: list[str] = []
    for metric in metrics:
        out.extend([metric] if metric in logged else sorted(n for n in logged if n.endswith(f"/{metric}")))
    return out


def plot(runs: list[Path], out: Path, metrics: tuple[str, ...] = DEFAULT_METRICS) -> list[str]:
    """Write the PNG: a row of curves against the step and, when the runs logged ``generated_samples``, a row
    against the samples generated so far (an algorithm that generates extra rounds, such as DAPO's dynamic
    sampling, is drawn at the cost it paid). ``avg@8`` draws each set's ``eval/<set>/avg@8``. Returns the
    metrics that had data in some run."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = {run: read_metrics(run) for run in runs}
    present = _expand(metrics, {name for run_rows in rows.values() for row in run_rows for name in row})
    if not present:
        raise ValueError(f"none of {list(metrics)} was logged in {[str(r) for r in runs]}")
    x_axes = ["step"]
    if all(any("generated_samples" in row for row in run_rows) for run_rows in rows.values()):
        x_axes.append("generated samples")
    size = (4.2 * len(present), 3.2 * len(x_axes))
    figure, axes = plt.subplots(len(x_axes), len(present), figsize=size, squeeze=False)
    for axes_row, x_axis in zip(axes, x_axes, strict=True):
        for axis, metric in zip(axes_row, present, strict=True):
            for run, run_rows in rows.items():
                xs = _x_values(run_rows, "step" if x_axis == "step" else "samples")
                points = [(x, row[metric]) for x, row in zip(xs, run_rows, strict=True) if metric in row]
                if points:
                    axis.plot(*zip(*points, strict=True), label=run.name, marker=".")
            axis.set_title(metric)
            axis.set_xlabel(x_axis)
            axis.grid(alpha=0.3)
        axes_row[0].legend()
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return present
