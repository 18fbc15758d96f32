"""Metrics sinks: one JSON line per step always, TensorBoard always, Weights & Biases when asked and installed.

Only the first rank of the world writes (every rank of a replica holds the same step metrics); values must be
numbers. A non-finite value is written as it is (``NaN`` in jsonl), never dropped: a NaN loss is data.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class MetricsWriter:
    """Writes ``metrics.jsonl`` and TensorBoard events under ``run_dir`` (rank 0 only)."""

    def __init__(self, run_dir: str | Path, *, enabled: bool = True, wandb_project: str | None = None,
                 config: dict[str, Any] | None = None) -> None:  # fmt: skip
        self.run_dir, self.enabled = Path(run_dir), enabled
        self._jsonl = self._tensorboard = self._wandb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = (self.run_dir / "metrics.jsonl").open("a")
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415  (needs the tensorboard package)

        self._tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"))
        if wandb_project is not None:
            try:
                import wandb  # noqa: PLC0415
            except ImportError:
                logger.warning("wandb_project=%s given but wandb is not installed; jsonl + TensorBoard only",
                               wandb_project)  # fmt: skip
            else:
                self._wandb = wandb.init(project=wandb_project, dir=str(self.run_dir), config=config or {})

    def write(self, step: int, metrics: dict[str, float]) -> None:
        """Record one step's metrics (flushed at once: a killed run keeps every written step)."""
        if not self.enabled:
            return
        bad = {k: v for k, v in metrics.items() if not isinstance(v, int | float)}
        if bad:
            raise TypeError(f"metrics must be numbers; got {bad}")
        self._jsonl.write(json.dumps({"step": step, **metrics}, allow_nan=True) + "\n")
        self._jsonl.flush()
        for name, value in metrics.items():
            self._tensorboard.add_scalar(name, value, step)
        self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def close(self) -> None:
        """Close the sinks."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    """The rows of a run's ``metrics.jsonl`` (``NaN`` restored), for plots and tests."""
    rows = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.append({k: (math.nan if v is None else v) for k, v in row.items()})
    return rows
