"""Metrics sinks: one JSON line per step always, TensorBoard always, Weights & Biases when asked and installed.

Only the first rank of the world writes (every rank of a replica holds the same step metrics); values must be
numbers. A non-finite value is written as it is (``NaN`` in jsonl), never dropped: a NaN loss is data.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_hapo.algos import EntropyStats

logger = logging.getLogger(__name__)


#: The W&B run id of a run directory: a resumed run (a requeue too) continues the same W&B run.
WANDB_ID_FILE = "wandb_run_id.txt"


@dataclass(frozen=True)
class WandbTarget:
    """Where a run logs in Weights & Biases (``output.wandb_*``); ``WANDB_MODE=offline`` is honoured."""

    project: str
    entity: str | None = None
    name: str | None = None
    """The run's display name (default: the run directory's name)."""
    group: str | None = None
    """Runs shown together (a study's name)."""

    def start(self, run_dir: Path, config: dict[str, Any], *, resumed: bool) -> Any:
        """``wandb.init`` into ``run_dir/wandb``, continuing the run directory's W&B run when it has one."""
        import wandb  # noqa: PLC0415  (checked at start-up: preflight.check_inputs)

        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resumed and id_file.is_file() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        return wandb.init(
            project=self.project,
            entity=self.entity,
            name=self.name or run_dir.name,
            group=self.group,
            dir=str(run_dir),
            config=config,
            id=run_id,
            resume="allow",
        )


class MetricsWriter:
    """Writes ``metrics.jsonl`` and TensorBoard events under ``run_dir`` (rank 0 only)."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        enabled: bool = True,
        wandb: WandbTarget | None = None,
        config: dict[str, Any] | None = None,
        first_step: int = 0,
    ) -> None:
        """``first_step``: a resumed run's step; rows of that step or later (written after the checkpoint it
        resumes from, by the run that was killed) are dropped from ``metrics.jsonl`` so that no step repeats (a
        fresh run, ``first_step`` 0, drops every row, the ``step -1`` evaluation before training too).
        ``wandb``: also log to that Weights & Biases run, with ``config`` (the run's resolved config)."""
        self.run_dir, self.enabled = Path(run_dir), enabled
        self._jsonl = self._tensorboard = self._wandb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "metrics.jsonl"
        if path.is_file():
            rows = path.read_text().splitlines()
            kept = [line for line in rows if first_step > 0 and json.loads(line)["step"] < first_step]
            staged = path.with_suffix(".jsonl.partial")
            staged.write_text("".join(f"{line}\n" for line in kept))
            os.replace(staged, path)
        self._jsonl = path.open("a")
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415  (needs the tensorboard package)

        self._tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"))
        if wandb is not None:
            self._wandb = wandb.start(self.run_dir, config or {}, resumed=first_step > 0)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        """Record one step's metrics (flushed at once: a killed run keeps every written step). TensorBoard tags
        are grouped: ``eval/<set>/...`` as named, every other metric under ``train/``; Weights & Biases, which
        takes no negative step, counts from 1 (the ``step -1`` evaluation before training at 0)."""
        if not self.enabled:
            return
        bad = {k: v for k, v in metrics.items() if not isinstance(v, int | float)}
        if bad:
            raise TypeError(f"metrics must be numbers; got {bad}")
        assert self._jsonl is not None and self._tensorboard is not None  # opened when enabled
        self._jsonl.write(json.dumps({"step": step, **metrics}, allow_nan=True) + "\n")
        self._jsonl.flush()
        for name, value in metrics.items():
            self._tensorboard.add_scalar(name if "/" in name else f"train/{name}", value, step)
        self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.log({k if "/" in k else f"train/{k}": v for k, v in metrics.items()}, step=step + 1)

    def close(self) -> None:
        """Close the sinks."""
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tensorboard is not None:
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


#: Loss-step metrics that are maxima / minima over tokens; every other per-micro-batch metric is a token mean.
_EXTREMES = {
    "ratio_max": max,
    "ratio_min": min,
    "guide_ratio_max": max,
    "guide_ratio_min": min,
    "mismatch_max_abs_log_ratio": max,  # from the update's forward when the forward-only pass is skipped
    "mismatch_max_ratio": max,
    "mismatch_min_ratio": min,
}
_SUMS = ("loss_share", "entropy_sum", "num_tokens", "guide_num_tokens")


def reduce_loss_metrics(outputs: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """One update's metrics from the per-micro-batch dicts of the policy-loss step (last pipeline stage).

    Token means (clip fractions, ratio mean, approx KL, ...) are weighted by each micro-batch's valid tokens
    (``guide_*`` ones by its guide tokens); ``ratio_max`` / ``ratio_min`` are extremes; micro-batches without such
    tokens are left out, and a metric no micro-batch has tokens for is absent. ``loss`` is the sum of the
    micro-batches' shares, and ``entropy_mean`` the token mean of the training forward's entropies.
    """

    def total(name: str) -> float:
        return sum(float(o.get(name, 0.0)) for o in outputs)

    out = {"loss": total("loss_share"), "entropy_mean": total("entropy_sum") / max(total("num_tokens"), 1.0)}
    names = {name for o in outputs for name in o} - set(_SUMS)
    for name in sorted(names):
        weight = "guide_num_tokens" if name.startswith("guide_") else "num_tokens"
        present = [o for o in outputs if name in o and float(o.get(weight, 0.0)) > 0]  # empty masks say nothing
        if not present:
            continue
        if name in _EXTREMES:
            out[name] = _EXTREMES[name](float(o[name]) for o in present)
            continue
        tokens = sum(float(o[weight]) for o in present)
        out[name] = sum(float(o[name]) * float(o[weight]) for o in present) / tokens
    return out


def entropy_stats_metrics(stats: EntropyStats) -> dict[str, float]:
    """The step's pooled entropy statistics (they set the next rollout's adaptive temperature)."""
    return {"entropy_pivot": float(stats.pivot), "entropy_rms": float(stats.rms)}


class PhaseClock:
    """Wall time per phase of one step: ``with clock("generate"): ...``; then :meth:`metrics`."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - begin

    def metrics(self, *, response_tokens: int, total_tokens: int) -> dict[str, float]:
        """``time_<phase>``, ``time_step``, ``tokens_per_second`` (prompt + response tokens over the step) and
        ``rollout_tokens_per_second`` (response tokens over the generation time)."""
        step = time.perf_counter() - self.start
        out = {f"time_{phase}": seconds for phase, seconds in self.seconds.items()}
        out["time_step"] = step
        out["tokens_per_second"] = total_tokens / max(step, 1e-9)
        out["rollout_tokens_per_second"] = response_tokens / max(self.seconds.get("generate", 0.0), 1e-9)
        return out
