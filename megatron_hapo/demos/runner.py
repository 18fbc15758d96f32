"""The demos' rank body: each preset in turn through the trainer's own loop, on one shared rollout engine.

Per preset, every rank builds the actor from the config (:func:`~megatron_hapo.trainer.actor.build_actor`, the
entry point's function), pushes its weights into the engine (built once, for the first preset), optionally runs
the supervised warm-up, then :func:`~megatron_hapo.trainer.loop.train`. Library output (Megatron, vLLM,
transformers, warnings) goes to ``RUN_DIR/log.txt``; rank 0 prints one progress line per step.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from megatron_hapo.config import Config, load_config
from megatron_hapo.config.presets import preset_path
from megatron_hapo.demos.tasks import Task, TokenNames

if TYPE_CHECKING:
    from megatron_hapo.rewards import RewardWorkers
    from megatron_hapo.rollout.engine import RolloutEngine
    from megatron_hapo.trainer.actor import Actor

#: Marks a directory as a demo's run directory, which the next run of the demo may replace.
DEMO_MARKER = ".megatron_hapo_demo"


@dataclass
class DemoJob:
    """What the ranks run: ``presets`` in turn, each with ``overrides`` on top of its preset file."""

    presets: list[str]
    overrides: list[str]
    task: Task
    run_dir: Path
    per_preset: dict[str, list[str]] = field(default_factory=dict)
    """Extra overrides of one preset (e.g. the guide checkpoint of ``mixed_dapo``)."""
    warmup_steps: int = 0
    warmup_lr: float = 2e-3
    reward_workers: int = 0
    """Verifier worker processes (0: the verdict runs in the rank's own process)."""
    eval_interval: int = 0


def demo_config(job: DemoJob, preset: str) -> Config:
    """The preset's config for this demo, from the preset files shipped in the package."""
    run = [f"output.dir={job.run_dir / preset}", *job.overrides, *job.per_preset.get(preset, [])]
    return load_config(preset_path(preset), run)


def split_overrides(presets: list[str], overrides: list[str]) -> tuple[list[str], list[str]]:
    """``--presets hapo key=value`` reads the override as a preset name (argparse's ``nargs="+"``): move every
    ``key=value`` from ``presets`` to ``overrides``; an unknown preset stops here, before any rank starts."""
    names = [p for p in presets if "=" not in p]
    for name in names:
        try:
            preset_path(name)
        except FileNotFoundError as error:
            raise SystemExit(str(error)) from None
    return names, [*overrides, *(p for p in presets if "=" in p)]


def prepare_run_dir(run_dir: Path) -> None:
    """Make ``run_dir`` ready for a demo: an earlier run of a demo there is replaced; anything else is refused."""
    if run_dir.exists() and any(run_dir.iterdir()):
        if not (run_dir / DEMO_MARKER).is_file():
            raise SystemExit(f"{run_dir} exists and holds something other than a demo run; pass another --run-dir")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / DEMO_MARKER).write_text("a megatron_hapo demo run: the next run of a demo replaces this directory\n")


def send_output_to_log(log_file: Path) -> TextIO:
    """Send this process's stdout and stderr (file descriptors 1 and 2: Python, C++ and library output alike)
    and its log records and warnings to ``log_file``; returns a stream on the original stdout."""
    console = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        force=True,
        format="%(asctime)s %(process)d %(name)s %(levelname)s: %(message)s",
    )
    logging.captureWarnings(True)
    return console


def run_presets(rank: int, world: int, job: DemoJob) -> None:
    """Body of :func:`~megatron_hapo.parallel.local_launch.run_local_ranks`: every preset of ``job`` in turn."""
    console = send_output_to_log(job.run_dir / "log.txt")
    from megatron_hapo.parallel import runtime  # noqa: PLC0415
    from megatron_hapo.trainer.actor import build_actor, build_engine, build_guide_engine  # noqa: PLC0415
    from megatron_hapo.trainer.step import sync_and_verify  # noqa: PLC0415

    runtime.quiet_logs()
    engine, workers = None, _workers(job)
    try:
        for preset in job.presets:
            config = demo_config(job, preset)
            model = config.model
            runtime.initialize_model_parallel(model.tensor_parallel, model.pipeline_parallel, seed=config.train.seed)
            actor = build_actor(config, probe_prompts=job.task.prompts)
            if engine is None:
                engine = build_engine(config, str(model.path))
            else:  # the shared engine still serves the previous preset's weights
                sync_and_verify(actor, engine)
            guide = build_guide_engine(config, engine)
            try:
                _train_preset(
                    actor,
                    engine,
                    config,
                    guide=guide,
                    workers=workers,
                    job=job,
                    console=console if rank == 0 else None,
                )
            finally:
                if guide is not None:
                    guide.close()
    finally:
        if workers is not None:
            workers.close()
        if engine is not None:
            engine.close()


def _workers(job: DemoJob) -> RewardWorkers | None:
    """Verifier worker processes for ``job.task.verdict`` (``None``: it runs in this process)."""
    from megatron_hapo.rewards import RewardWorkers  # noqa: PLC0415

    if job.reward_workers <= 0:
        return None
    return RewardWorkers(job.task.verdict, workers=job.reward_workers, timeout_s=30.0, failure_value=(-1.0, False))


def _train_preset(
    actor: Actor,
    engine: RolloutEngine,
    config: Config,
    *,
    guide: RolloutEngine | None,
    workers: RewardWorkers | None,
    job: DemoJob,
    console: TextIO | None,
) -> None:
    """One preset's run: the warm-up (if any), then the trainer's loop with a progress line per step."""
    from megatron_hapo.trainer.evaluation import EvalSet, EvalSettings  # noqa: PLC0415
    from megatron_hapo.trainer.loop import LoopSettings, train  # noqa: PLC0415
    from megatron_hapo.trainer.scoring import inline_scorer, worker_scorer  # noqa: PLC0415
    from megatron_hapo.trainer.warmup import supervised_warmup  # noqa: PLC0415

    task, preset = job.task, Path(config.output.dir).name
    if job.warmup_steps:
        supervised_warmup(
            actor,
            engine,
            task.warmup_examples,
            steps=job.warmup_steps,
            batch_size=32,
            lr=job.warmup_lr,
            seed=config.train.seed,
        )
    score = inline_scorer(task.verdict) if workers is None else worker_scorer(workers)
    settings = LoopSettings(
        Path(config.output.dir),
        eval_interval=job.eval_interval,
        keep_last=1,
        progress_bar=False,
        eval_settings=EvalSettings.from_config(config),
        save_rollouts_every=config.output.save_rollouts_every,
        save_rollouts_samples=config.output.save_rollouts_samples,
        tokenizer=TokenNames(task.token_names),
        on_step=None if console is None else _ProgressLine(console, preset, config.train.total_steps),
    )
    held_out = EvalSet("held_out", task.eval_prompts, task.eval_answers, score)
    train(
        actor,
        engine,
        score,
        config,
        settings,
        prompts=task.prompts,
        answers=task.answers,
        eval_sets=[held_out] if job.eval_interval else [],
        guide_engine=guide,
    )


@dataclass
class _ProgressLine:
    """Prints ``preset  step k/K  accuracy  reward  samples so far  [avg@k]`` per step (no timings: the same
    run prints the same lines)."""

    console: TextIO
    preset: str
    total: int
    samples: int = 0

    def __call__(self, step: int, metrics: dict) -> None:
        self.samples += int(metrics.get("generated_samples", 0))
        evaluation = "".join(f"  {name.rsplit('/', 1)[1]} {value:.3f}" for name, value in _avg(metrics).items())
        print(
            f"{self.preset:<11} step {step + 1:>3}/{self.total}  accuracy {metrics['accuracy']:.3f}  "
            f"reward {metrics['reward_mean']:+.3f}  samples {self.samples:>6}{evaluation}",
            file=self.console,
        )


def _avg(metrics: dict) -> dict:
    """The held-out set's ``eval/held_out/avg@k`` of a step's metrics (empty where it was not evaluated)."""
    return {name: value for name, value in metrics.items() if name.startswith("eval/held_out/avg@")}


def overlong_buffer_overrides(preset: str, buffer_length: int) -> list[str]:
    """``algo.reward_shaping.buffer_length`` capped at ``buffer_length`` where the preset's shaping has one."""
    from megatron_hapo.algos import REWARD_SHAPING  # noqa: PLC0415

    shaping = load_config(preset_path(preset)).algo.reward_shaping
    if "buffer_length" not in REWARD_SHAPING.get(shaping.kind).knobs:
        return []
    return [f"algo.reward_shaping.buffer_length={min(shaping.buffer_length, buffer_length)}"]


@dataclass
class SummaryRow:
    """One preset's run: mean accuracy of the first and last ``window`` steps, temperatures, samples."""

    preset: str
    first: float
    last: float
    temp_min: float
    temp_max: float
    samples: int
    final_eval: float | None


def summary_rows(run_dir: Path, presets: list[str], window: int) -> list[SummaryRow]:
    """The summary of each preset's ``metrics.jsonl`` under ``run_dir``."""
    from megatron_hapo.trainer.metrics import read_metrics  # noqa: PLC0415

    rows = []
    for preset in presets:
        metrics = read_metrics(run_dir / preset)
        accuracy = [row["accuracy"] for row in metrics]
        evals = [value for row in metrics for value in _avg(row).values()]
        rows.append(
            SummaryRow(
                preset,
                sum(accuracy[:window]) / window,
                sum(accuracy[-window:]) / window,
                min((row.get("temperature_min", 1.0) for row in metrics), default=1.0),
                max((row.get("temperature_max", 1.0) for row in metrics), default=1.0),
                int(sum(row.get("generated_samples", 0) for row in metrics)),
                evals[-1] if evals else None,
            )
        )
    return rows
