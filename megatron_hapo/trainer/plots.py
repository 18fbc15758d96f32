"""PNG curves of training runs (``metrics.jsonl`` per run), for comparing algorithms or settings."""

from __future__ import annotations

from pathlib import Path

from megatron_hapo.trainer.metrics import read_metrics

DEFAULT_METRICS = ("reward_mean", "accuracy", "response_length_mean", "temperature_mean", "mismatch_kl")


def plot(runs: list[Path], out: Path, metrics: tuple[str, ...] = DEFAULT_METRICS) -> list[str]:
    """Write the PNG; returns the metrics that had data in some run."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = {run: read_metrics(run) for run in runs}
    present = [m for m in metrics if any(m in row for run_rows in rows.values() for row in run_rows)]
    if not present:
        raise ValueError(f"none of {list(metrics)} was logged in {[str(r) for r in runs]}")
    figure, axes = plt.subplots(1, len(present), figsize=(4.2 * len(present), 3.2), squeeze=False)
    for axis, metric in zip(axes[0], present, strict=True):
        for run, run_rows in rows.items():
            points = [(row["step"], row[metric]) for row in run_rows if metric in row]
            if points:
                axis.plot(*zip(*points, strict=True), label=run.name, marker=".")
        axis.set_title(metric)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    axes[0][0].legend()
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return present
