"""Evaluate models on one or more benchmarks, outside training, on the trainer's own engines and divided rollout.

    python -m megatron_hapo.evaluate TARGET [TARGET ...] [key=value ...] [--set NAME=FILE ...] [--config YAML]
        [--n 8] [--k 1,4,8] [--temperature 0.5] [--top-p 0.7] [--max-tokens N] [--local-ranks N] [--out DIR]

A TARGET is an HF model directory, a Megatron checkpoint (a run's ``checkpoints/step_*`` or the output of
``tools/convert_hf_to_mcore.py``: exported to a temporary HF directory first), or a run directory (every
``checkpoints/step_*`` in order: a curve). The benchmarks are the config's (``data.eval_sets``, with their
columns, prompt templates and answer rules, and ``data.eval_file``) and each ``--set NAME=FILE`` (a
``.jsonl`` / ``.parquet`` file whose columns are found: ``prompt`` / ``problem`` / ``question``,
``reward_model.ground_truth`` / ``answer`` / ``final_answer`` / ``solution``). ``key=value`` arguments override
the config as in training (``engine.kind=hf``, ``engine.tensor_parallel=2``, ``data.eval_sets.aime.template=
dapo``). Sampling is the config's ``output.eval`` (HAPO's: 8 samples at T 0.5, top-p 0.7; the flags change
it), seeded by ``train.seed``: a run's in-training evaluation is reproduced exactly from its checkpoint with the
run's config (``--config RUN/config.json``). For each set: avg@n (mean accuracy), pass@k for each k from the
same n samples (unbiased estimator), the mean response length and the responses cut at the length limit, and
over several sets their mean. Writes ``eval.json`` (strict JSON) to ``--out`` and prints a table per target.

Without a launcher ``--local-ranks N`` starts N ranks here; under ``srun`` / ``torchrun`` (``RANK`` and
``WORLD_SIZE`` set: ``sbatch launch/evaluate.sh ...``) every rank joins the job, and the engine replicas divide
each set's prompts as in training.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from megatron_hapo.trainer.evaluation import EvalSettings
    from megatron_hapo.trainer.preflight import EvalData

logger = logging.getLogger("megatron_hapo.evaluate")
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "algo" / "hapo.yaml"


@dataclass(frozen=True)
class Target:
    """A model to evaluate: ``label`` in the results, ``path``; ``megatron`` when it must be exported first."""

    label: str
    path: Path
    megatron: bool


def targets(paths: list[str]) -> list[Target]:
    """The models named on the command line, a run directory expanded into its checkpoints (in step order); a
    Megatron checkpoint that holds anything but plain data is refused (one line)."""
    from megatron_hapo.trainer.preflight import check_checkpoint_data  # noqa: PLC0415

    found: list[Target] = []
    for name in paths:
        path = Path(name)
        if (path / "config.json").is_file():
            found.append(Target(str(path), path, megatron=False))
        elif (path / ".metadata").is_file() and (path / "hf").is_dir():
            check_checkpoint_data(path, str(path))
            found.append(Target(str(path), path, megatron=True))
        elif (path / "checkpoints").is_dir():
            steps = sorted(p for p in (path / "checkpoints").glob("step_*") if (p / ".metadata").is_file())
            if not steps:
                raise SystemExit(f"{path}: a run directory without checkpoints (checkpoints/step_* missing)")
            for step in steps:
                check_checkpoint_data(step, str(step))
            found.extend(Target(str(p), p, megatron=True) for p in steps)
        else:
            raise SystemExit(
                f"{path}: not an HF model directory (config.json), a Megatron checkpoint (.metadata and hf/) or "
                "a run directory (checkpoints/)"
            )
    return found


def named_files(items: list[str]) -> dict[str, str]:
    """``--set NAME=FILE`` items as ``{name: file}``; a malformed item or a name given twice is refused."""
    named: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--set {item!r}: expected NAME=FILE (e.g. --set aime24=data/aime24.parquet)")
        if name in named:
            raise SystemExit(f"--set {name}: given twice ({named[name]} and {path}); one file per name")
        named[name] = path
    return named


@dataclass(frozen=True)
class Job:
    """What every rank evaluates: the config, the ``(label, HF directory)`` models, the read sets, the
    sampling, and the output directory."""

    config: Any
    models: list[tuple[str, str]]
    sets: tuple[EvalData, ...]
    settings: EvalSettings
    out: str


def _rank(rank: int, world: int, job: Job) -> None:
    """One rank: for each (label, HF directory) an engine, every set, the results (rank 0 writes them)."""
    import transformers  # noqa: PLC0415

    from megatron_hapo.plugins import import_plugins  # noqa: PLC0415

    import_plugins(job.config.algo.plugins)  # a rank is a process of its own: its registries start built-in

    from megatron_hapo.parallel import runtime  # noqa: PLC0415
    from megatron_hapo.trainer.actor import build_engine  # noqa: PLC0415
    from megatron_hapo.trainer.evaluation import encode_eval_sets, evaluate_sets, with_mean  # noqa: PLC0415
    from megatron_hapo.trainer.scoring import math_scorers  # noqa: PLC0415

    config = job.config
    runtime.quiet_logs()
    runtime.initialize_model_parallel(1, 1, None, seed=config.train.seed)
    results: dict[str, dict] = {}
    for label, model_dir in job.models:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        decode = partial(tokenizer.batch_decode, skip_special_tokens=True)
        with math_scorers(config, [one.reward for one in job.sets], decode) as scorers:
            sets = encode_eval_sets(job.sets, tokenizer, config.rollout.max_prompt_length, scorers)
            engine = build_engine(config, model_dir)
            try:
                results[label] = with_mean(evaluate_sets(engine, sets, job.settings))
            finally:
                engine.close()
        if rank == 0:
            print(table(label, results[label], job.settings), flush=True)
    if rank == 0:
        report = {"sampling": asdict(job.settings), "results": results}
        Path(job.out).mkdir(parents=True, exist_ok=True)
        (Path(job.out) / "eval.json").write_text(json.dumps(report, indent=1, allow_nan=False))


def table(label: str, results: dict[str, dict], settings: EvalSettings) -> str:
    """A fixed-width table of one model's results: one row per set, and their mean."""
    columns = [f"avg@{settings.n}", *(f"pass@{k}" for k in settings.ks)]
    lines = [label, f"{'set':<16}{'prompts':>8}" + "".join(f"{c:>9}" for c in columns) + f"{'length':>9}{'cut':>6}"]
    for name, row in results.items():
        values = "".join(f"{row[c]:>9.3f}" for c in columns)
        if name == "mean":
            lines.append(f"{name:<16}{'':>8}{values}")
        else:
            lines.append(f"{name:<16}{row['prompts']:>8}{values}{row['response_length']:>9.1f}{row['truncated']:>6}")
    return "\n".join(lines)


def _export(rank: int, world: int, checkpoints: list[tuple[str, str]]) -> None:
    """Export Megatron checkpoints ``(source, destination)`` to HF directories (one rank)."""
    from megatron_hapo.models.checkpoint import mcore_to_hf  # noqa: PLC0415
    from megatron_hapo.parallel import runtime  # noqa: PLC0415

    runtime.initialize_model_parallel(1, 1)
    for source, destination in checkpoints:
        mcore_to_hf(Path(source), Path(destination))


def _models(found: list[Target], exports_dir: Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``(label, HF directory)`` of each target, and the ``(checkpoint, HF directory)`` exports that needs."""
    exports = [(str(t.path), str(exports_dir / f"model{i}")) for i, t in enumerate(found) if t.megatron]
    exported = dict(exports)
    return [(t.label, exported.get(str(t.path), str(t.path))) for t in found], exports


def _check_models(models: list[tuple[str, str]], config: Any) -> None:
    """Each model directory usable by the engine (one line naming it, else)."""
    import torch  # noqa: PLC0415

    from megatron_hapo.trainer.preflight import check_model_dir  # noqa: PLC0415

    vllm_on_cpu = not torch.cuda.is_available() and config.engine.kind == "vllm"
    for label, model_dir in models:
        check_model_dir(model_dir, label, vllm_on_cpu=vllm_on_cpu)


def _evaluate_local(found: list[Target], job: Job, local_ranks: int) -> None:
    """Local ranks (``--local-ranks``); Megatron checkpoints exported to a temporary directory first."""
    from megatron_hapo.parallel.local_launch import run_local_ranks  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="hapo-eval-") as tmp:
        models, exports = _models(found, Path(tmp))
        if exports:
            run_local_ranks(_export, 1, exports, device="cpu")
        _check_models(models, job.config)
        error_log = Path(job.out) / "rank_error.log"  # a failed rank's traceback; the terminal gets its first line
        run_local_ranks(_rank, local_ranks, replace(job, models=models), error_log=error_log)


#: How long the ranks of a launched evaluation wait for each other (rank 0 exports the Megatron checkpoints while
#: the others wait in a barrier: a 70B model's export takes minutes, beyond the default NCCL timeout).
JOINED_TIMEOUT = timedelta(hours=4)


def _evaluate_joined(found: list[Target], job: Job) -> None:
    """Every rank of a launched job (``RANK`` / ``WORLD_SIZE``): rank 0 exports the Megatron checkpoints into
    ``--out/.exports`` (a shared filesystem, as the run directories are), then all evaluate; the exports go."""
    from megatron_hapo.parallel import runtime  # noqa: PLC0415
    from megatron_hapo.parallel.local_launch import run_local_ranks  # noqa: PLC0415

    exports_dir = Path(job.out) / ".exports"
    models, exports = _models(found, exports_dir)
    with runtime.process_group(timeout=JOINED_TIMEOUT):
        if runtime.rank() == 0 and exports:
            shutil.rmtree(exports_dir, ignore_errors=True)  # left by a killed job
            run_local_ranks(_export, 1, exports, device="cpu")  # a group of its own, on the CPU
        runtime.barrier()
        _check_models(models, job.config)
        _rank(runtime.rank(), runtime.world_size(), replace(job, models=models))
        runtime.barrier()
        if runtime.rank() == 0:
            shutil.rmtree(exports_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    from megatron_hapo.config import load_config  # noqa: PLC0415
    from megatron_hapo.config.errors import ConfigError  # noqa: PLC0415
    from megatron_hapo.trainer.evaluation import EvalSettings  # noqa: PLC0415
    from megatron_hapo.trainer.preflight import check_reward_functions, eval_specs, read_eval_sets  # noqa: PLC0415

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "targets", nargs="+", help="HF model directories, Megatron checkpoints, run directories; key=value overrides"
    )
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=FILE", help="a benchmark")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="run or preset YAML (engine, data keys)")
    parser.add_argument("--n", type=int, help="samples per prompt (output.eval.n; default 8)")
    parser.add_argument("--k", help="pass@k for each of these k <= n, comma-separated (output.eval.k; default 1,n)")
    parser.add_argument("--temperature", type=float, help="sampling temperature (output.eval.temperature; 0.5)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling (output.eval.top_p; 0.7)")
    parser.add_argument("--max-tokens", type=int, help="per response (default: rollout.max_response_length)")
    parser.add_argument("--local-ranks", type=int, default=1, help="gloo ranks on this machine")
    parser.add_argument("--out", type=Path, default=Path("eval"), help="where eval.json goes")
    args = parser.parse_intermixed_args(argv)
    overrides = [t for t in args.targets if "=" in t and not Path(t).exists()]
    if args.k is not None and not all(k.strip().isdigit() for k in args.k.split(",")):
        raise SystemExit(f"--k {args.k!r}: comma-separated whole numbers, e.g. 1,4,8")
    flags = {"n": args.n, "k": args.k and f"[{args.k}]", "temperature": args.temperature, "top_p": args.top_p}
    flags["max_tokens"] = args.max_tokens
    overrides += [f"output.eval.{key}={value}" for key, value in flags.items() if value is not None]
    try:
        config = load_config(args.config, overrides)
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None
    settings = EvalSettings.from_config(config)
    specs = eval_specs(config, named_files(args.sets))
    if not specs:
        raise SystemExit("no benchmark: pass --set NAME=FILE (a .jsonl or .parquet prompt file) or data.eval_sets")
    found, sets = targets([t for t in args.targets if t not in overrides]), read_eval_sets(config, specs)
    check_reward_functions(config, sets)
    job = Job(config, [], sets, settings, str(args.out))
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # srun / torchrun: launch/evaluate.sh
        _evaluate_joined(found, job)
    else:
        _evaluate_local(found, job, args.local_ranks)
    if os.environ.get("RANK", "0") == "0":
        print(f"wrote {args.out / 'eval.json'}")
    return 0


if __name__ == "__main__":
    from megatron_hapo.processes import run_cli

    raise SystemExit(run_cli(main))  # a refused input: its line, status 2
