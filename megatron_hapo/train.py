"""The trainer entry point: a model, a prompt dataset with answers and a preset -> token-aware RL end to end.

    python -m megatron_hapo.train CONFIG [key=value ...] [--local-ranks N]

Under ``torchrun`` or ``srun`` (``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` set) every rank joins the job's
process group (NCCL on GPUs, gloo on CPU). Without them, ``--local-ranks N`` starts N gloo ranks on this
machine. Each rank builds its Megatron share of ``model.path`` (``model.tensor_parallel`` x
``model.pipeline_parallel``; the rest is data parallel), a colocated vLLM engine (``engine.*``), verifier
workers (``data.reward``, and each evaluation set's rule), reads and chat-templates ``data.train_file`` and the
evaluation sets (``data.eval_sets``, ``data.eval_file``), and runs ``trainer.loop.train``: metrics, evaluations
and checkpoints go to ``output.dir``.

Preemption: a run whose ``output.dir`` holds a checkpoint resumes from it (model, optimizer, step, entropy
statistics, best evaluation; the data order and rollout seeds follow from the step). SIGUSR1, SIGTERM or SIGINT
(Slurm sends one before the time limit, ``#SBATCH --signal``) finishes the step in progress, checkpoints and
exits with status 75 (``EXIT_REQUEUE``), on which the launch script requeues the job; during start-up it stops
before the first step. A second, different signal (or a second Ctrl-C) kills every process the run started and
exits at once (status 1), leaving the last complete checkpoint in place; a repeated SIGUSR1 / SIGTERM is the
same request. Helper processes never act on these signals
(:mod:`megatron_hapo.processes`).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
from collections.abc import Callable
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the heavy modules load after the stop signals are blocked (main)
    from megatron_hapo.config import Config
    from megatron_hapo.data import PromptSet
    from megatron_hapo.rollout.engine import RolloutEngine
    from megatron_hapo.trainer.actor import Actor
    from megatron_hapo.trainer.preflight import RunData
    from megatron_hapo.trainer.step import StepState

logger = logging.getLogger("megatron_hapo.train")
#: Exit status of a run that stopped on a signal after checkpointing: the launch scripts requeue on it.
EXIT_REQUEUE = 75
STOPPED_MARKER = ".stopped_for_requeue"


def _prompts(
    config: Config, tokenizer: Any, path: str | None, read: PromptSet | None
) -> tuple[list[list[int]], list[Any]]:
    """The chat-templated token ids and answers of ``read`` (the rows of ``path``, read by the preflight)."""
    from megatron_hapo.data import encode_prompts  # noqa: PLC0415
    from megatron_hapo.trainer.scoring import scored_answers  # noqa: PLC0415

    if read is None:
        return [], []
    encoded = encode_prompts(read.examples, tokenizer, max_prompt_length=config.rollout.max_prompt_length)
    logger.info(
        "%s: %d prompts, %d malformed rows skipped, %d over rollout.max_prompt_length dropped",
        path,
        len(encoded.token_ids),
        len(read.skipped),
        encoded.dropped_too_long,
    )
    return encoded.token_ids, scored_answers(encoded.examples, config.data.reward)


def _setup_logging(rank: int) -> None:
    """megatron_hapo's INFO messages on rank 0 (warnings on every rank), in each rank's own process."""
    package = logging.getLogger("megatron_hapo")
    if not package.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(name)s [rank %(rank)s]: %(message)s", defaults={"rank": rank})
        )
        package.addHandler(handler)
    package.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    package.propagate = False


def _rank(rank: int, world: int, config: Config, should_stop: Callable[[], bool], data: RunData) -> bool:
    """One rank of the run (the process group exists); whether it stopped early on a signal (same on all ranks).

    ``data``: the prompt files' rows (:func:`~megatron_hapo.trainer.preflight.check_inputs`). ``should_stop``
    says whether a stop was asked for (:class:`~megatron_hapo.processes.StopSignals`).
    """
    _setup_logging(rank)
    import transformers  # noqa: PLC0415

    from megatron_hapo.plugins import import_plugins  # noqa: PLC0415

    import_plugins(config.algo.plugins)  # a rank is a process of its own: its registries start built-in

    from megatron_hapo.parallel import runtime  # noqa: PLC0415
    from megatron_hapo.trainer.actor import build_actor, build_engines  # noqa: PLC0415
    from megatron_hapo.trainer.evaluation import EvalSettings, encode_eval_sets  # noqa: PLC0415
    from megatron_hapo.trainer.loop import LoopSettings, train  # noqa: PLC0415
    from megatron_hapo.trainer.scoring import math_scorers  # noqa: PLC0415

    model, out = config.model, config.output
    runtime.quiet_logs()
    connections = os.environ.get(runtime.MAX_CONNECTIONS_ENV) or "unset"
    logger.info("%s=%s (tensor parallel %d)", runtime.MAX_CONNECTIONS_ENV, connections, model.tensor_parallel)
    runtime.initialize_model_parallel(
        model.tensor_parallel, model.pipeline_parallel, model.virtual_pipeline, seed=config.train.seed
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(model.path)
    prompts, answers = _prompts(config, tokenizer, config.data.train_file, data.train)
    if not prompts:
        raise ValueError(f"{config.data.train_file}: no prompt fits rollout.max_prompt_length")
    actor = build_actor(config, probe_prompts=prompts)
    engine, guide = build_engines(config)
    settings = LoopSettings(
        Path(out.dir),
        eval_interval=out.eval_interval,
        eval_before_train=out.eval_before_train,
        log_interval=out.log_interval,
        wandb=_wandb_target(config),
        max_reward_failure_share=out.max_reward_failure_share,
        save_interval=out.save_interval,
        eval_settings=EvalSettings.from_config(config),
        keep_last=out.keep_last,
        model_dir=Path(str(model.path)),  # checked by the preflight
        optimizer_sharding=out.optimizer_sharding,
        max_consecutive_skips=config.train.max_consecutive_skips,
        save_rollouts_every=out.save_rollouts_every,
        save_rollouts_samples=out.save_rollouts_samples,
        tokenizer=tokenizer,
    )
    decode = partial(tokenizer.batch_decode, skip_special_tokens=True)
    rules = [config.data.reward, *(one.reward for one in data.evals)]
    try:
        with math_scorers(config, rules, decode) as scorers:
            evals = encode_eval_sets(data.evals, tokenizer, config.rollout.max_prompt_length, scorers)
            state = _start_state(actor, engine, config, data.resume)
            state = train(
                actor,
                engine,
                scorers[config.data.reward],
                config,
                settings,
                prompts=prompts,
                answers=answers,
                eval_sets=evals,
                state=state,
                guide_engine=guide,
                should_stop=should_stop,
            )
        if state.stopped and rank == 0:  # for the parent of local ranks (mp.spawn returns no values)
            (Path(out.dir) / STOPPED_MARKER).write_text(str(state.step))
    finally:
        engine.close()
        if guide is not None:
            guide.close()
    return state.stopped


def _wandb_target(config: Config) -> Any:
    """The run's W&B target (``output.wandb_*``), or ``None``."""
    from megatron_hapo.trainer.metrics import WandbTarget  # noqa: PLC0415

    out = config.output
    if out.wandb_project is None:
        return None
    return WandbTarget(out.wandb_project, out.wandb_entity, out.wandb_name, out.wandb_group)


def _start_state(actor: Actor, engine: RolloutEngine, config: Config, explicit: Path | None) -> StepState | None:
    """Where the run starts (loaded into ``actor``, the engine synced): the whole state of ``explicit``
    (``train.resume_from``) or of the run's latest checkpoint; else the weights of ``model.init_from``; else the
    HF weights as built (``None``)."""
    from megatron_hapo.parallel import runtime  # noqa: PLC0415
    from megatron_hapo.trainer.checkpoint import latest_checkpoint, load_checkpoint, load_model_weights  # noqa: PLC0415
    from megatron_hapo.trainer.manifest import verify_manifest  # noqa: PLC0415
    from megatron_hapo.trainer.preflight import RESUMED_FROM  # noqa: PLC0415
    from megatron_hapo.trainer.step import sync_and_verify  # noqa: PLC0415

    run_dir = Path(str(config.output.dir))
    checkpoint = explicit or latest_checkpoint(run_dir / "checkpoints")
    if explicit is not None and (problems := verify_manifest(explicit)):
        raise RuntimeError(f"train.resume_from={str(explicit)!r} is not intact: {'; '.join(problems)}")
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, actor)
        sync_and_verify(actor, engine)  # the engine started from the HF weights
        if explicit is not None and runtime.rank() == 0:  # a requeue of the same command continues from its own
            (run_dir / RESUMED_FROM).write_text(str(config.train.resume_from))
        logger.info("resumed from %s (step %d)", checkpoint, state.step)
        return state
    if config.model.init_from:
        load_model_weights(Path(config.model.init_from), actor)
        sync_and_verify(actor, engine)
        logger.info("started from the weights of %s", config.model.init_from)
    return None


def _write_local_launch_record(run_dir: Path, ranks: int) -> None:
    """``launch.json`` of a ``--local-ranks`` run: one node, its ranks, the GPU they use or ``cpu``."""
    import torch  # noqa: PLC0415

    on_gpus = torch.cuda.is_available() and torch.cuda.device_count() >= ranks  # as run_local_ranks decides
    record = {
        "nodes": 1,
        "gpus_per_node": ranks,
        "gpu": torch.cuda.get_device_name(0) if on_gpus else "cpu",
        "master_addr": "local",
        "attempt": 0,
    }
    (run_dir / "launch.json").write_text(json.dumps(record) + "\n")


def _keep_previous_config(run_dir: Path) -> None:
    """Keep the ``config.json`` of the run's earlier starts as ``config.<n>.json`` (n = 1, 2, ...)."""
    previous = run_dir / "config.json"
    if previous.is_file():
        n = 1 + sum(1 for _ in run_dir.glob("config.*.json"))
        previous.rename(run_dir / f"config.{n}.json")


def _joined_rank(config: Config, should_stop: Callable[[], bool], data: RunData) -> bool:
    """Join the launcher's process group (torchrun / srun environment) and run this rank; whether it stopped."""
    from megatron_hapo.parallel import runtime  # noqa: PLC0415

    with runtime.process_group(timeout=timedelta(minutes=config.parallel.timeout_minutes)):  # NCCL on GPU, else gloo
        return _rank(runtime.rank(), runtime.world_size(), config, should_stop, data)


def main(argv: list[str] | None = None) -> int:
    from megatron_hapo.processes import StopSignals  # noqa: PLC0415

    faulthandler.enable()  # a crash in native code leaves every thread's Python stack in the rank's log
    # first: every helper process and thread started from here on inherits the blocked stop signals
    joined = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    stops = StopSignals(shared=not joined)
    from megatron_hapo.config import load_config  # noqa: PLC0415
    from megatron_hapo.config.errors import ConfigError  # noqa: PLC0415
    from megatron_hapo.config.loader import to_tree  # noqa: PLC0415
    from megatron_hapo.parallel import runtime  # noqa: PLC0415
    from megatron_hapo.parallel.local_launch import run_local_ranks  # noqa: PLC0415
    from megatron_hapo.trainer.preflight import check_inputs  # noqa: PLC0415

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, help="run or preset YAML (configs/runs/, configs/algo/)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    parser.add_argument("--local-ranks", type=int, default=1, help="gloo ranks on this machine (no launcher)")
    parser.add_argument(
        "--resume-from", metavar="STEP_DIR", help="resume from this checkpoint (train.resume_from): any run's step_*"
    )
    parser.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume although the config differs from the saved one in keys other than steps, intervals, paths",
    )
    args = parser.parse_args(argv)
    if args.resume_from:
        args.overrides.append(f"train.resume_from={args.resume_from}")
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:  # one message, no traceback (as print_config)
        raise SystemExit(str(exc)) from None
    leader = not joined or os.environ["RANK"] == "0"  # the one process that checks and writes the run's config
    runtime.set_cuda_connections(config.model.tensor_parallel)  # before anything starts CUDA in this process
    # before any rank starts: one line each
    data = check_inputs(config, compare_config=leader and not args.allow_config_change)
    run_dir = Path(config.output.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if leader:
        _keep_previous_config(run_dir)
        (run_dir / "config.json").write_text(json.dumps(to_tree(config), indent=1))
    if not joined:  # the launch scripts write theirs; tools/scaling_study.py counts the ranks from it
        _write_local_launch_record(run_dir, args.local_ranks)
    marker = run_dir / STOPPED_MARKER
    marker.unlink(missing_ok=True)
    if joined:
        stopped = _joined_rank(config, stops.requested, data)
    else:
        error_log = run_dir / "rank_error.log"  # a failed rank's traceback; the terminal gets its first line
        timeout = timedelta(minutes=config.parallel.timeout_minutes)
        run_local_ranks(_rank, args.local_ranks, config, stops.event.is_set, data, error_log=error_log, timeout=timeout)
        stopped = marker.is_file()
    marker.unlink(missing_ok=True)
    if stopped:
        logger.warning(
            "stopped on a signal (checkpointed, or before the first step); exit %d asks the launcher to requeue",
            EXIT_REQUEUE,
        )
        return EXIT_REQUEUE
    return 0


if __name__ == "__main__":
    from megatron_hapo.processes import exit_after_cleanup, run_cli

    exit_after_cleanup(run_cli(main))  # a refused input: its line, status 2; an exception: traceback, status 1
