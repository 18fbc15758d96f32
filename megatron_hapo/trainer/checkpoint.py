"""Trainer checkpoints: model + optimizer (Megatron ``dist_checkpointing``, reshardable) + the trainer's own state.

A checkpoint is ``ROOT/step_XXXXXX/``: the torch_dist files of ``{"model", "optimizer"}`` and
``trainer_state.json`` (step, the EntropyStats for the next rollout, counters). It is written into a staging
directory and renamed into place once every rank is done; then ``ROOT/latest`` (a one-line file naming it) is
replaced atomically. A run killed while saving leaves the previous checkpoint and pointer intact. The rollout
is reproducible from the step alone (its seeds derive from ``train.seed`` and the step), and so is the data
order, so these files are the whole state of a run.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from megatron_hapo.algos import EntropyStats
from megatron_hapo.models.checkpoint import (
    chunks_sharded_state_dict,
    load_chunks_state,
    publish_staging,
    staging_dir,
)
from megatron_hapo.trainer.step import Actor, StepState

TRAINER_STATE = "trainer_state.json"


def save_checkpoint(root: Path, actor: Actor, state: StepState) -> Path:
    """Model + optimizer (torch_dist) + trainer state at ``root/step_XXXXXX``; then ``root/latest`` (collective)."""
    from megatron.core import dist_checkpointing  # noqa: PLC0415

    out = root / f"step_{state.step:06d}"
    if dist.get_rank() == 0 and out.exists():  # saved by a run killed before its pointer moved: not the latest
        if (root / "latest").is_file() and (root / "latest").read_text().strip() == out.name:
            raise FileExistsError(f"{out} is the latest checkpoint; the run would overwrite it")
        shutil.rmtree(out)
    dist.barrier()
    staging = staging_dir(out)
    if dist.get_rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while saving
        staging.mkdir(parents=True)
    dist.barrier()
    model_state = chunks_sharded_state_dict(actor.chunks)
    payload = {"model": model_state, "optimizer": actor.optimizer.sharded_state_dict(model_state)}
    dist_checkpointing.save(payload, str(staging))
    if dist.get_rank() == 0:
        stats = None if state.stats is None else state.stats.as_floats()
        trainer_state = {"step": state.step, "entropy_stats": stats, "skipped_updates": state.skipped_updates,
                         "eval_best": state.eval_best}  # fmt: skip
        _write_synced(staging / TRAINER_STATE, json.dumps(trainer_state))
    publish_staging(staging, out)
    if dist.get_rank() == 0:
        pointer = root / ".latest.partial"
        _write_synced(pointer, out.name)
        os.replace(pointer, root / "latest")
    dist.barrier()
    return out


def _write_synced(path: Path, text: str) -> None:
    with path.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint ``root/latest`` names, or ``None`` for a fresh run (no pointer yet)."""
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is missing or incomplete")
    return path


def read_trainer_state(checkpoint: Path) -> StepState:
    """The trainer state saved with a checkpoint (model and optimizer are loaded by :func:`load_checkpoint`)."""
    saved = json.loads((checkpoint / TRAINER_STATE).read_text())
    stats = saved["entropy_stats"]
    best = saved.get("eval_best")
    return StepState(step=saved["step"], stats=None if stats is None else EntropyStats.from_floats(**stats),
                     skipped_updates=saved["skipped_updates"],
                     eval_best=None if best is None else (float(best[0]), int(best[1])))  # fmt: skip


def load_checkpoint(checkpoint: Path, actor: Actor) -> StepState:
    """Load model + optimizer into ``actor`` (any TP / PP layout) and return the trainer state (collective)."""
    from megatron.core import dist_checkpointing  # noqa: PLC0415

    model_state = chunks_sharded_state_dict(actor.chunks)
    request: dict[str, Any] = {
        "model": model_state,
        "optimizer": actor.optimizer.sharded_state_dict(model_state, is_loading=True),
    }
    loaded = dist_checkpointing.load(request, str(checkpoint))
    load_chunks_state(actor.chunks, loaded["model"], checkpoint)
    actor.optimizer.load_state_dict(loaded["optimizer"])
    return read_trainer_state(checkpoint)
