"""The training loop around :func:`~megatron_hapo.trainer.step.rl_step`: schedule, evaluation, metrics, checkpoints.

    for step in range(total_steps):
        set the learning rate (linear warm-up)
        metrics = rl_step(prompts of this step)       # rollout -> reward -> advantages -> update -> sync
        write metrics; every eval_interval steps: avg@k / pass@k; every save_interval steps: checkpoint

Checkpoints are Megatron ``dist_checkpointing`` directories (model and optimizer, reshardable) plus the
trainer's own state (step, the EntropyStats for the next rollout, counters) in ``trainer_state.json``. Each is
written to a staging directory and renamed into place; the ``latest`` pointer moves last.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from megatron_hapo.algos import EntropyStats
from megatron_hapo.models.checkpoint import chunks_sharded_state_dict, publish_staging, staging_dir
from megatron_hapo.trainer.evaluation import BestAndFinal, EvalSettings, evaluate
from megatron_hapo.trainer.metrics import MetricsWriter
from megatron_hapo.trainer.step import Actor, Scorer, StepState, rl_step


@dataclass
class LoopSettings:
    """Run-level settings of the loop (data and schedule come from the config)."""

    run_dir: Path
    eval_interval: int = 0
    """Evaluate every this many steps (0: never; the last step is always evaluated when eval prompts exist)."""
    save_interval: int = 0
    """Checkpoint every this many steps (0: only at the end)."""
    eval_settings: EvalSettings = field(default_factory=EvalSettings)


def learning_rate(step: int, *, peak: float, warmup_steps: int) -> float:
    """Linear warm-up to ``peak`` over ``warmup_steps`` optimizer steps of the RL loop, then constant."""
    return peak * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else peak


def _set_lr(optimizer: Any, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def save_checkpoint(root: Path, actor: Actor, state: StepState) -> Path:
    """Model + optimizer (torch_dist) + trainer state at ``root/step_XXXXXX``; then ``root/latest`` (collective)."""
    from megatron.core import dist_checkpointing  # noqa: PLC0415

    out = root / f"step_{state.step:06d}"
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
        trainer_state = {"step": state.step, "entropy_stats": stats, "skipped_updates": state.skipped_updates}
        (staging / "trainer_state.json").write_text(json.dumps(trainer_state))
    publish_staging(staging, out)
    if dist.get_rank() == 0:
        pointer = root / ".latest.partial"
        pointer.write_text(out.name)
        os.replace(pointer, root / "latest")
    dist.barrier()
    return out


def read_trainer_state(checkpoint: Path) -> StepState:
    """The trainer state saved with a checkpoint (model and optimizer are loaded by the caller)."""
    saved = json.loads((checkpoint / "trainer_state.json").read_text())
    stats = saved["entropy_stats"]
    return StepState(step=saved["step"], stats=None if stats is None else EntropyStats.from_floats(**stats),
                     skipped_updates=saved["skipped_updates"])  # fmt: skip


def train(actor: Actor, engine: Any, score: Scorer, config: Any, settings: LoopSettings, *,
          prompts: Sequence[list[int]], answers: Sequence[Any], eval_prompts: Sequence[list[int]] = (),
          eval_answers: Sequence[Any] = (), state: StepState | None = None,
          guide_engine: Any = None) -> StepState:  # fmt: skip
    """Run ``config.train.total_steps`` RL steps over ``prompts`` (in a seeded order, cycling); every rank calls it.

    ``guide_engine`` serves the frozen guide policy of mixed-policy algorithms. Rank 0 shows a progress bar.
    """
    state = state or StepState()
    per_step = config.train.prompts_per_step
    if per_step > len(prompts):
        raise ValueError(f"train.prompts_per_step={per_step} exceeds the {len(prompts)} prompts available")
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(config.train.seed)).tolist()
    writer = MetricsWriter(settings.run_dir, enabled=dist.get_rank() == 0)
    tracker = BestAndFinal(f"avg@{settings.eval_settings.k}")
    total = config.train.total_steps
    progress = tqdm(
        total=total, initial=state.step, desc="RL steps", unit="step", disable=None if dist.get_rank() == 0 else True
    )  # None: shown on a terminal only
    try:
        while state.step < total:
            start = state.step * per_step % len(order)
            picked = [order[(start + i) % len(order)] for i in range(per_step)]
            lr = learning_rate(state.step, peak=config.optim.lr, warmup_steps=config.optim.warmup_steps)
            _set_lr(actor.optimizer, lr)
            step = state.step
            metrics = rl_step(actor, engine, score, prompts=[prompts[i] for i in picked],
                              answers=[answers[i] for i in picked], config=config, state=state,
                              guide_engine=guide_engine)  # fmt: skip
            metrics["lr"] = lr
            progress.update()
            progress.set_postfix(reward=f"{metrics['reward_mean']:.3f}", acc=f"{metrics['accuracy']:.3f}")
            last = state.step == total
            if eval_prompts and (last or (settings.eval_interval and state.step % settings.eval_interval == 0)):
                metrics.update(evaluate(engine, score, eval_prompts, eval_answers, settings.eval_settings))
                tracker.update(step, metrics)
                metrics[f"best_{tracker.name}"] = tracker.best
            writer.write(step, metrics)
            if last or (settings.save_interval and state.step % settings.save_interval == 0):
                save_checkpoint(settings.run_dir / "checkpoints", actor, state)
    finally:
        progress.close()
        writer.close()
    if not math.isinf(tracker.best) and dist.get_rank() == 0:
        summary = {"best": tracker.best, "best_step": tracker.best_step, "final": tracker.final}
        (settings.run_dir / "eval_summary.json").write_text(json.dumps({tracker.name: summary}))
    return state
