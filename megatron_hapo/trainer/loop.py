"""The training loop around :func:`~megatron_hapo.trainer.step.rl_step`: schedule, evaluation, metrics, checkpoints.

    for step in range(total_steps):
        set the learning rate (linear warm-up)
        metrics = rl_step(prompts of this step)       # rollout -> reward -> advantages -> update -> sync
        write metrics; every eval_interval steps: avg@n / pass@k per benchmark; every save_interval steps: checkpoint

        if asked to stop (a signal before a time limit): checkpoint and return; the request is also seen between
        the step's phases (after the rollout: the step is dropped; after the updates: no sync, no evaluation), so
        a stop waits for one phase, not a whole step and its evaluation

Checkpoints (:mod:`megatron_hapo.trainer.checkpoint`) hold everything a resumed run needs; the prompt order is
seeded and read from ``state.data_cursor`` (saved with the checkpoint), so ``train(...,
state=load_checkpoint(...))`` continues where the run stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from megatron_hapo.config import Config, to_tree
from megatron_hapo.parallel import runtime
from megatron_hapo.parallel.collectives import any_rank
from megatron_hapo.rollout.engine import RolloutEngine
from megatron_hapo.trainer.actor import Actor
from megatron_hapo.trainer.checkpoint import save_checkpoint
from megatron_hapo.trainer.evaluation import BestAndFinal, EvalSet, EvalSettings, eval_metrics, evaluate_sets
from megatron_hapo.trainer.metrics import MetricsWriter, WandbTarget
from megatron_hapo.trainer.pacing import hold_between_steps, step_line
from megatron_hapo.trainer.rollout_dump import RolloutDumps
from megatron_hapo.trainer.scoring import Scorer, reward_failures
from megatron_hapo.trainer.step import StepState, rl_step

if TYPE_CHECKING:
    from megatron.core.optimizer import MegatronOptimizer

logger = logging.getLogger(__name__)


@dataclass
class LoopSettings:
    """Run-level settings of the loop (data and schedule come from the config)."""

    run_dir: Path
    eval_interval: int = 0
    """Evaluate every this many steps (0: never; the last step is always evaluated when there are eval sets)."""
    eval_before_train: bool = False
    """Also evaluate the starting policy of a fresh run, as a row of its own (``step -1``)."""
    save_interval: int = 0
    """Checkpoint every this many steps (0: only at the end)."""
    keep_last: int = 0
    """Keep only this many newest checkpoints (0: all)."""
    optimizer_sharding: str = "dp_reshardable"
    """The distributed optimizer's checkpoint format (``output.optimizer_sharding``)."""
    model_dir: Path | None = None
    """The policy's HF directory: its config and tokenizer go into every checkpoint (exportable to HF)."""
    max_consecutive_skips: int = 0
    """Stop the run (last good checkpoint intact) after this many steps in a row whose every update was skipped
    for a non-finite gradient norm (0: never)."""
    eval_settings: EvalSettings = field(default_factory=EvalSettings)
    progress_bar: bool = True
    """Rank 0 shows a progress bar on a terminal (tqdm), else (a Slurm log) logs a line per ``log_interval`` steps."""
    log_interval: int = 1
    """Without a terminal: a step line every this many steps and at the last (``output.log_interval``)."""
    wandb: WandbTarget | None = None
    """Also log to Weights & Biases (``output.wandb_*``)."""
    max_reward_failure_share: float = 1.0
    """Stop when more than this share of a step's answers could not be verified (``output.*``; 1: never)."""
    save_rollouts_every: int = 0
    """Dump the responses of every this many steps with their per-token values (``output.save_rollouts_every``;
    0: never; :mod:`megatron_hapo.trainer.rollout_dump`)."""
    save_rollouts_samples: int = 32
    """Responses per dumped step, whole groups (``output.save_rollouts_samples``)."""
    tokenizer: Any = None
    """Decodes the dumps' text (``None``: token ids only)."""
    on_step: Callable[[int, dict], None] | None = None
    """Called on every rank with ``(step, metrics)`` after each step's metrics are written (e.g. a progress
    line of a demo)."""

    def rollout_dumps(self, seed: int) -> RolloutDumps:
        """The run's rollout dumps (``save_rollouts_every=0``: none are due)."""
        return RolloutDumps(
            self.run_dir, self.save_rollouts_every, self.save_rollouts_samples, seed=seed, tokenizer=self.tokenizer
        )


def learning_rate(step: int, *, peak: float, warmup_steps: int) -> float:
    """Linear warm-up to ``peak`` over ``warmup_steps`` optimizer steps of the RL loop, then constant."""
    return peak * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else peak


def set_learning_rate(optimizer: MegatronOptimizer, lr: float) -> None:
    """Set ``lr`` on every parameter group of ``optimizer`` (the RL loop and the supervised warm-up)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def _next_prompts(
    order: list[int], prompts: Sequence[list[int]], answers: Sequence[Any], state: StepState, count: int
) -> tuple[list[list[int]], list[Any]]:
    """The next ``count`` prompts of the seeded order (cycling), advancing ``state.data_cursor``."""
    picked = [order[(state.data_cursor + i) % len(order)] for i in range(count)]
    state.data_cursor += count
    return [list(prompts[i]) for i in picked], [answers[i] for i in picked]


def _check_skips(state: StepState, metrics: dict, limit: int) -> None:
    """Count steps whose every optimizer step was skipped; raise once ``limit`` of them come in a row."""
    skipped_all = metrics.get("optimizer_steps", 0) > 0 and metrics["updates_skipped"] == metrics["optimizer_steps"]
    state.consecutive_skips = state.consecutive_skips + 1 if skipped_all else 0
    if limit and state.consecutive_skips >= limit:
        raise FloatingPointError(
            f"{state.consecutive_skips} steps in a row had only non-finite gradient norms (last: step "
            f"{state.step - 1}); stopping with the last checkpoint intact. Lower optim.lr or check the data"
        )


def _evaluate(
    engine: RolloutEngine, sets: Sequence[EvalSet], settings: EvalSettings, tracker: BestAndFinal, state: StepState
) -> dict[str, float]:
    """The ``eval/<set>/...`` metrics of the policy ``engine`` serves, recorded in ``tracker`` at the step of the
    row they go into (``state.step - 1``; -1 before training) and in ``state`` (kept across a resume)."""
    metrics = eval_metrics(evaluate_sets(engine, sets, settings))
    tracker.update(state.step - 1, metrics)
    state.eval_best, state.eval_final = dict(tracker.best), dict(tracker.final)
    main = [f"{name.split('/')[1]} {value:.3f}" for name, value in metrics.items() if "/avg@" in name]
    logger.info("evaluation avg@%d: %s", settings.n, ", ".join(main))
    return metrics


def _show_step(progress: tqdm, log_line: bool, step: int, total: int, metrics: dict) -> None:
    """Advance the progress bar; with ``log_line`` (rank 0 and not a terminal, where the bar is off: a Slurm log)
    log the step's line instead."""
    progress.update()
    progress.set_postfix(reward=f"{metrics['reward_mean']:.3f}", acc=f"{metrics['accuracy']:.3f}")
    if log_line:
        logger.info(step_line(step, total, metrics))


@dataclass
class _StepInputs:
    """What every step of a run is made from."""

    actor: Actor
    engines: tuple[RolloutEngine, RolloutEngine | None]
    """The policy's engine and the mixed-policy guide's."""
    score: Scorer
    config: Config
    take: Callable[[int], tuple[list[list[int]], list[Any]]]
    """The next prompts of the seeded order (advancing ``state.data_cursor``)."""
    should_stop: Callable[[], bool] | None
    dumps: RolloutDumps | None = None


def _step_or_drop(inputs: _StepInputs, state: StepState) -> dict | None:
    """:func:`rl_step` on the next ``train.prompts_per_step`` prompts; ``None`` when a stop came during its
    rollout: the step is dropped and ``state`` is as before it (its prompts come again on resume)."""
    engine, guide_engine = inputs.engines
    cursor, dumps = state.data_cursor, inputs.dumps
    step_prompts, step_answers = inputs.take(inputs.config.train.prompts_per_step)
    metrics = rl_step(
        inputs.actor,
        engine,
        inputs.score,
        prompts=step_prompts,
        answers=step_answers,
        config=inputs.config,
        state=state,
        guide_engine=guide_engine,
        more_prompts=inputs.take,
        should_stop=inputs.should_stop,
        dumps=dumps,
    )
    if metrics is None:
        state.data_cursor, state.stopped = cursor, True
    elif dumps is not None and dumps.due(state.step - 1):  # failed writes so far (they finish in the background)
        metrics["rollout_dump_errors"] = runtime.max_over_ranks(float(dumps.errors()))
    return metrics


@dataclass
class _StepRecord:
    """Where a finished step's metrics go."""

    settings: LoopSettings
    writer: MetricsWriter
    progress: tqdm
    shown: bool
    """Rank 0 with progress shown (a bar on a terminal, else a log line)."""


def _record_step(
    record: _StepRecord,
    state: StepState,
    metrics: dict,
    *,
    lr: float,
    score: Scorer,
    evaluation: Callable[[StepState], dict[str, float]] | None,
) -> None:
    """A finished step (``state.step`` counts it): its learning rate added, the verifier's failures and the
    skipped updates checked, the step shown, evaluated (``evaluation``), written and passed to
    ``settings.on_step`` (``metrics`` is updated in place: ``state.metrics`` holds it)."""
    settings, step, total = record.settings, state.step - 1, record.progress.total
    metrics["lr"] = lr
    metrics.update(reward_failures(score, settings.max_reward_failure_share))
    _check_skips(state, metrics, settings.max_consecutive_skips)
    last = state.step == total
    log_line = record.shown and record.progress.disable and (last or state.step % settings.log_interval == 0)
    _show_step(record.progress, log_line, step, total, metrics)
    if evaluation is not None:
        metrics.update(evaluation(state))
    record.writer.write(step, metrics)
    if settings.on_step is not None:
        settings.on_step(step, metrics)


def _save(actor: Actor, state: StepState, settings: LoopSettings) -> None:
    """A checkpoint of ``state`` under ``run_dir/checkpoints``."""
    save_checkpoint(
        settings.run_dir / "checkpoints",
        actor,
        state,
        hf_dir=settings.model_dir,
        keep_last=settings.keep_last,
        optimizer_sharding=settings.optimizer_sharding,
    )


def _open_writer(settings: LoopSettings, config: Config, state: StepState) -> MetricsWriter:
    """The run's metrics sinks (rank 0 writes), continuing a resumed run's rows and W&B run."""
    return MetricsWriter(
        settings.run_dir,
        enabled=runtime.rank() == 0,
        first_step=state.step,
        wandb=settings.wandb,
        config=to_tree(config),
    )


def _close(progress: tqdm, writer: MetricsWriter, dumps: RolloutDumps) -> None:
    """Close the run's outputs; the dump writer process stops also when the metrics sinks fail to close."""
    progress.close()
    try:
        writer.close()
    finally:
        dumps.close()


def train(
    actor: Actor,
    engine: RolloutEngine,
    score: Scorer,
    config: Config,
    settings: LoopSettings,
    *,
    prompts: Sequence[list[int]],
    answers: Sequence[Any],
    eval_sets: Sequence[EvalSet] = (),
    state: StepState | None = None,
    guide_engine: RolloutEngine | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> StepState:
    """Run ``config.train.total_steps`` RL steps over ``prompts`` (in a seeded order, cycling); every rank calls it.

    ``eval_sets`` are evaluated every ``settings.eval_interval`` steps and after the last (``eval/<set>/...``;
    best and final in ``eval_summary.json``). ``guide_engine`` serves a mixed-policy guide. ``should_stop`` is
    asked before the first step, between each step's phases (:func:`rl_step`) and after every step (every rank;
    any may say yes): the run then checkpoints (if it trained since it started) and returns with
    ``state.stopped`` set. ``settings.on_step`` sees every step's metrics.
    """
    state = state or StepState()
    per_step = config.train.prompts_per_step
    if per_step > len(prompts):
        raise ValueError(f"train.prompts_per_step={per_step} exceeds the {len(prompts)} prompts available")
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(config.train.seed)).tolist()
    writer = _open_writer(settings, config, state)
    tracker = BestAndFinal(state.eval_best, state.eval_final)  # a resumed run keeps its best and final
    total = config.train.total_steps
    shown = settings.progress_bar and runtime.rank() == 0
    progress = tqdm(total=total, initial=state.step, desc="RL steps", unit="step", disable=None if shown else True)
    take = partial(_next_prompts, order, prompts, answers, state)
    dumps = settings.rollout_dumps(config.train.seed)
    inputs = _StepInputs(actor, (engine, guide_engine), score, config, take, should_stop, dumps)
    try:
        hold_between_steps(state.step, should_stop)  # test pacing only (MEGATRON_HAPO_TEST_HOLD)
        if any_rank(should_stop is not None and should_stop()):  # a stop asked for during start-up
            state.stopped = True
            return state
        saved_at = state.step  # the step of the checkpoint this process started from (0: none needed)
        actor.offload_training_state()  # model.offload: the engine generates without the optimizer state beside it
        if eval_sets and settings.eval_before_train and state.step == 0:
            writer.write(-1, _evaluate(engine, eval_sets, settings.eval_settings, tracker, state))
        while state.step < total:
            lr = learning_rate(state.step, peak=config.optim.lr, warmup_steps=config.optim.warmup_steps)
            set_learning_rate(actor.optimizer, lr)
            metrics = _step_or_drop(inputs, state)
            if metrics is None:  # stopped after the rollout: the step is dropped, its prompts come again on resume
                if state.step != saved_at:
                    _save(actor, state, settings)
                break
            stopped_in_step = bool(metrics.pop("stopped", 0.0))  # after its updates: not synced, not evaluated
            last = state.step == total
            due = last or (settings.eval_interval > 0 and state.step % settings.eval_interval == 0)
            evaluate = bool(eval_sets) and due and not stopped_in_step
            _record_step(
                _StepRecord(settings, writer, progress, shown),
                state,
                metrics,
                lr=lr,
                score=score,
                evaluation=partial(_evaluate, engine, eval_sets, settings.eval_settings, tracker) if evaluate else None,
            )
            hold_between_steps(state.step, should_stop)  # test pacing only (MEGATRON_HAPO_TEST_HOLD)
            stop = stopped_in_step or any_rank(should_stop is not None and should_stop())
            if last or stop or (settings.save_interval and state.step % settings.save_interval == 0):
                _save(actor, state, settings)
                saved_at = state.step
            if stop and not last:
                state.stopped = True
                break
    finally:
        _close(progress, writer, dumps)
    if runtime.rank() == 0:
        tracker.write(settings.run_dir / "eval_summary.json")  # {set: {metric: {best, best_step, final}}}
    return state
