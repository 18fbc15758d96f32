"""Trainer checkpoints: model + optimizer (Megatron ``dist_checkpointing``, reshardable) + the trainer's own state.

A checkpoint is ``ROOT/step_XXXXXX/``: the torch_dist files of ``{"model", "optimizer"}``,
``trainer_state.json`` (step, the EntropyStats for the next rollout, counters, best evaluation), ``rng/`` (every
rank's Python, NumPy and torch generator states), ``hf/`` (the
policy's HF config and tokenizer, so ``tools/convert_mcore_to_hf.py`` exports it) and ``manifest.json`` (every
file's size and SHA-256, :mod:`megatron_hapo.trainer.manifest`). It is written into a staging directory and
renamed into place once every rank is done; then ``ROOT/latest`` (a one-line file naming it) is replaced
atomically, and all but the newest ``keep_last`` checkpoints are deleted. A run killed while saving leaves the
previous checkpoint and pointer intact; a corrupt or partial checkpoint is refused on load, naming the file,
and the newest intact one is used instead. The rollout is reproducible from the step alone (its seeds derive
from ``train.seed``, the step and the generation round), and the data order from the saved data cursor, so these
files are the whole state of a run.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_hapo.algos import EntropyStats
from megatron_hapo.models.checkpoint import (
    chunks_sharded_state_dict,
    copy_side_files,
    load_chunks_state,
    publish_staging,
    staging_dir,
)
from megatron_hapo.models.provider import sync_params
from megatron_hapo.models.safe_checkpoint import require_data_only
from megatron_hapo.parallel import runtime
from megatron_hapo.trainer.manifest import rank_world, verify_manifest, write_manifest
from megatron_hapo.trainer.step import Actor, StepState

logger = logging.getLogger(__name__)
TRAINER_STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"step_(\d{6,})")


def save_checkpoint(
    root: Path,
    actor: Actor,
    state: StepState,
    *,
    hf_dir: Path | None = None,
    keep_last: int = 0,
    optimizer_sharding: str = "dp_reshardable",
) -> Path:
    """Model + optimizer (torch_dist) + trainer state at ``root/step_XXXXXX``; then ``root/latest`` (collective).

    ``hf_dir``: the policy's HF directory, whose config and tokenizer are copied in; ``keep_last``: delete all
    but this many newest checkpoints afterwards (0: keep all); ``optimizer_sharding``: the distributed
    optimizer's format (``output.optimizer_sharding``), recorded in the checkpoint with the layout.
    """
    from megatron.core import dist_checkpointing  # noqa: PLC0415

    out = root / f"step_{state.step:06d}"
    if runtime.rank() == 0 and out.exists():  # saved by a run killed before its pointer moved: not the latest
        if (root / "latest").is_file() and (root / "latest").read_text().strip() == out.name:
            raise FileExistsError(f"{out} is the latest checkpoint; the run would overwrite it")
        shutil.rmtree(out)
    runtime.barrier()
    staging = staging_dir(out)
    if runtime.rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while saving
        staging.mkdir(parents=True)
    runtime.barrier()
    sync_params(actor.chunks)  # current parameters, also under an overlapped distributed optimizer
    _allocate_optimizer_state(actor.optimizer)  # an optimizer that has not stepped yet (every group filtered)
    model_state = chunks_sharded_state_dict(actor.chunks)
    metadata = {"distrib_optim_sharding_type": optimizer_sharding, "layout": _layout()}
    payload = {"model": model_state, "optimizer": actor.optimizer.sharded_state_dict(model_state, metadata=metadata)}
    dist_checkpointing.save(payload, str(staging), content_metadata=metadata)
    write_rng_state(staging)
    if runtime.rank() == 0:
        stats = None if state.stats is None else state.stats.as_floats()
        trainer_state = {
            "step": state.step,
            "entropy_stats": stats,
            "skipped_updates": state.skipped_updates,
            "eval_best": state.eval_best,
            "eval_final": state.eval_final,
            "data_cursor": state.data_cursor,
            "keep_rate": state.keep_rate,
        }
        _write_synced(staging / TRAINER_STATE, json.dumps(trainer_state))
        if hf_dir is not None:
            copy_side_files(Path(hf_dir), staging / "hf")
    write_manifest(staging)
    publish_staging(staging, out)
    if runtime.rank() == 0:
        pointer = root / ".latest.partial"
        _write_synced(pointer, out.name)
        os.replace(pointer, root / "latest")
        if keep_last > 0:
            for old in _step_dirs(root)[keep_last:]:
                shutil.rmtree(old)
    runtime.barrier()
    return out


def _step_dirs(root: Path) -> list[Path]:
    """The published checkpoints under ``root``, newest first."""
    found = [p for p in root.glob("step_*") if p.is_dir() and _STEP_DIR.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step_")), reverse=True)


def _write_synced(path: Path, text: str) -> None:
    with path.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def latest_checkpoint(root: Path) -> Path | None:
    """The newest intact checkpoint under ``root``: the one ``root/latest`` names when it verifies, else the newest
    older one that does, with a warning naming what was wrong (collective). ``None`` for a fresh run; an error
    when checkpoints exist but none is intact."""
    pointer = root / "latest"
    named = root / pointer.read_text().strip() if pointer.is_file() else None
    candidates = ([named] if named is not None else []) + [p for p in _step_dirs(root) if p != named]
    refused: list[str] = []
    for candidate in candidates:
        problems = verify_manifest(candidate) if candidate.is_dir() else [f"{candidate.name}: missing"]
        if not problems:
            if refused:
                logger.warning("refused %s; resuming from %s instead", "; ".join(refused), candidate.name)
            return candidate
        refused.append("; ".join(problems))
    if refused:
        raise RuntimeError(f"no intact checkpoint under {root}: {'; '.join(refused)}")
    return None


def read_trainer_state(checkpoint: Path) -> StepState:
    """The trainer state saved with a checkpoint (model and optimizer are loaded by :func:`load_checkpoint`)."""
    saved = json.loads((checkpoint / TRAINER_STATE).read_text())
    stats = saved["entropy_stats"]
    best = saved.get("eval_best")  # before 2026-12-07 one [value, step] of an unnamed set: not carried over
    return StepState(
        step=saved["step"],
        stats=None if stats is None else EntropyStats.from_floats(**stats),
        skipped_updates=saved["skipped_updates"],
        data_cursor=int(saved["data_cursor"]),
        eval_best={k: (float(v[0]), int(v[1])) for k, v in best.items()} if isinstance(best, dict) else {},
        eval_final={k: float(v) for k, v in saved.get("eval_final", {}).items()},
        keep_rate=saved.get("keep_rate"),  # absent before the over-sampled rounds: estimated afresh
    )


def load_checkpoint(checkpoint: Path, actor: Actor) -> StepState:
    """Load model + optimizer into ``actor`` (any TP / PP layout) and return the trainer state (collective)."""
    from megatron.core import dist_checkpointing  # noqa: PLC0415

    require_data_only(checkpoint)  # before any of its pickles is read
    metadata = _optimizer_metadata(checkpoint, actor)
    _allocate_optimizer_state(actor.optimizer)
    model_state = chunks_sharded_state_dict(actor.chunks)
    request: dict[str, Any] = {
        "model": model_state,
        "optimizer": actor.optimizer.sharded_state_dict(model_state, is_loading=True, metadata=metadata),
    }
    loaded = dist_checkpointing.load(request, str(checkpoint))
    load_chunks_state(actor.chunks, loaded["model"], checkpoint)
    with torch.no_grad():  # a float32 model's distributed optimizer holds views of the parameters: in-place copies
        actor.optimizer.load_state_dict(loaded["optimizer"])
    _restore_adam_steps(actor.optimizer)
    restore_rng_state(checkpoint)
    return read_trainer_state(checkpoint)


def load_model_weights(checkpoint: Path, actor: Actor) -> None:
    """Load only the model weights of a Megatron checkpoint into ``actor`` (any TP / PP layout; collective): a
    trainer checkpoint (``step_*``, its ``model`` part) or a converted one (``tools/convert_hf_to_mcore.py``).
    The optimizer keeps its fresh state; its main (float32) copies are refreshed from the loaded weights."""
    from megatron.core import dist_checkpointing  # noqa: PLC0415

    require_data_only(checkpoint)  # before any of its pickles is read
    model_state = chunks_sharded_state_dict(actor.chunks)
    trainer = (checkpoint / TRAINER_STATE).is_file()
    loaded = dist_checkpointing.load({"model": model_state} if trainer else model_state, str(checkpoint))
    with torch.no_grad():
        load_chunks_state(actor.chunks, loaded["model"] if trainer else loaded, checkpoint)
        actor.optimizer.reload_model_params()


def _layout() -> list[int]:
    """``[TP, PP, VPP or 0]`` of this run (a ``dp_reshardable`` optimizer state loads only into the same)."""
    layout = runtime.model_parallel_layout()
    return [layout.tp, layout.pp, layout.vpp or 0]


def _optimizer_metadata(checkpoint: Path, actor: Actor) -> dict:
    """The saved optimizer format, checked against this run's layout and optimizer."""
    from megatron.core import dist_checkpointing  # noqa: PLC0415

    saved = dist_checkpointing.load_content_metadata(str(checkpoint))
    if saved is None:  # written before formats were recorded: the plain optimizer's per-parameter state
        saved = {"distrib_optim_sharding_type": "fully_reshardable", "layout": _layout()}
    distributed = any(True for _ in _distributed_parts(actor.optimizer))
    if distributed and saved["distrib_optim_sharding_type"] == "dp_reshardable" and saved["layout"] != _layout():
        raise ValueError(
            f"{checkpoint} holds the distributed optimizer's state for TP x PP x VPP = "
            f"{saved['layout']} (output.optimizer_sharding=dp_reshardable, which reshards over data "
            f"parallelism only); this run is {_layout()}. Resume at that layout, or save the "
            "checkpoint with output.optimizer_sharding=fully_reshardable"
        )
    return {"distrib_optim_sharding_type": saved["distrib_optim_sharding_type"]}


def _distributed_parts(optimizer: Any) -> Iterator[tuple[Any, Any]]:
    """``(DistributedOptimizer, its torch optimizer)`` for each distributed part of a (chained) Megatron optimizer."""
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        if type(part).__name__ == "DistributedOptimizer" and getattr(part, "optimizer", None) is not None:
            yield part, part.optimizer


def _allocate_optimizer_state(optimizer: Any) -> None:
    """Give a distributed optimizer that has not stepped yet its state tensors: the state a fresh torch Adam
    would create at its first step (zero moments, step 0), which loading overwrites or the next step continues.

    Megatron-Core 0.19.2's ``DistributedOptimizer.state_dict`` reads the step from each parameter's state when
    torch's Adam runs it (no Apex / Transformer Engine, as on CPU), so an optimizer that never stepped can neither
    build a loading request nor be saved (``assert len(steps) == 1``: a DAPO run whose first steps kept no group
    crashed at its first checkpoint). Upstream's own dummy initialisation (a step on zero gradients, used for
    Megatron-FSDP) runs here at learning rate 0, which leaves the parameters untouched; its step count is then
    set back to 0, so the first real update has Adam's first-step bias correction, as without a checkpoint."""
    for part, inner in _distributed_parts(optimizer):
        if len(inner.state):
            continue
        rates = [group["lr"] for group in inner.param_groups]
        for group in inner.param_groups:
            group["lr"] = 0.0
        part._init_optimizer_states_with_dummy_values()  # upstream's own (pinned megatron-core)
        for group, rate in zip(inner.param_groups, rates, strict=True):
            group["lr"] = rate
        for state in inner.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"].zero_()
            elif "step" in state:
                state["step"] = 0


def _restore_adam_steps(optimizer: Any) -> None:
    """Set each parameter's Adam step to its group's loaded step (torch Adam keeps one per parameter).

    megatron-core 0.19.2's ``DistributedOptimizer.load_state_dict`` sets them from the checkpoint's param groups,
    then copies the ``dp_reshardable`` parameter state over them, whose ``step`` entries are the loading
    request's placeholders (measured: a checkpoint after 3 steps reloaded with step 1, which changes Adam's bias
    correction). Apex / Transformer Engine's fused Adam keeps the step in the param groups only."""
    for _, inner in _distributed_parts(optimizer):
        for group in inner.param_groups:
            if "step" not in group:
                continue
            for param in group["params"]:
                state = inner.state.get(param)
                if state and isinstance(state.get("step"), torch.Tensor):
                    state["step"] = torch.full_like(state["step"], float(group["step"]))


def _rng_path(directory: Path, rank: int, world: int) -> Path:
    return directory / "rng" / f"rank_{rank:05d}_of_{world:05d}.json"


def write_rng_state(directory: Path) -> None:
    """This rank's Python, NumPy and torch CPU generators (and CUDA's on a GPU) as JSON."""
    rank, world = rank_world()
    numpy_state: tuple[Any, ...] = tuple(np.random.get_state())
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "torch": torch.get_rng_state().tolist(),
        "cuda": torch.cuda.get_rng_state().tolist() if torch.cuda.is_available() else None,
    }
    path = _rng_path(directory, rank, world)
    path.parent.mkdir(exist_ok=True)
    _write_synced(path, json.dumps(state))


def restore_rng_state(checkpoint: Path) -> None:
    """Restore this rank's generators when the checkpoint was saved by as many ranks (else keep them, warned)."""
    rank, world = rank_world()
    path = _rng_path(checkpoint, rank, world)
    if not path.is_file():
        logger.warning(
            "%s has no random state for %d ranks (saved with another world size); generators keep their seeds",
            checkpoint.name,
            world,
        )
        return
    state = json.loads(path.read_text())
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))
