"""Evaluate models on one or more benchmarks, outside training, on the trainer's own engines and divided rollout.

    python -m megatron_hapo.evaluate TARGET [TARGET ...] [key=value ...] --set NAME=FILE [--set NAME=FILE ...]
        [--n 8] [--k 1,4,8] [--local-ranks N] [--out DIR] [--config YAML]

A TARGET is an HF model directory, a Megatron checkpoint (a run's ``checkpoints/step_*`` or the output of
``tools/convert_hf_to_mcore.py``: exported to a temporary HF directory first), or a run directory (every
``checkpoints/step_*`` in order: a curve). Each set is a ``.jsonl`` / ``.parquet`` prompt file; its prompt and
answer columns are the config's ``data.prompt_key`` / ``data.answer_key`` or, when a file lacks them, the common
ones (``problem`` / ``question``, ``answer`` / ``final_answer``). ``key=value`` arguments override the config as
in training (``engine.kind=hf``, ``engine.tensor_parallel=2``, ``model.dtype=float32``). ``--n`` samples per
prompt at the config's evaluation sampling (HAPO's: T 0.5, top-p 0.7; ``--temperature`` / ``--top-p`` change
it), seeded by ``train.seed``: the numbers of an in-training evaluation with ``output.eval_k=n`` are reproduced
exactly. For each set: avg@n (mean accuracy), pass@k for each ``--k`` from the same n samples (unbiased
estimator), the mean response length and the responses cut at ``--max-tokens`` (default
``rollout.max_response_length``). Writes ``eval.json`` (strict JSON: a value not measured is ``null``) to
``--out`` and prints a table per target. Local ranks only (``--local-ranks``); not yet under Slurm.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from megatron_hapo.config import Config
    from megatron_hapo.rollout.engine import RolloutEngine
    from megatron_hapo.trainer.scoring import Scorer

logger = logging.getLogger("megatron_hapo.evaluate")
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "algo" / "hapo.yaml"


@dataclass(frozen=True)
class Sampling:
    """How every prompt is sampled: ``n`` samples at ``temperature`` / ``top_p``, ``max_tokens`` each."""

    n: int
    ks: tuple[int, ...]
    temperature: float
    top_p: float
    max_tokens: int
    seed: int


@dataclass(frozen=True)
class Target:
    """A model to evaluate: ``label`` in the results, ``path``; ``megatron`` when it must be exported first."""

    label: str
    path: Path
    megatron: bool


def targets(paths: list[str]) -> list[Target]:
    """The models named on the command line, a run directory expanded into its checkpoints (in step order)."""
    found: list[Target] = []
    for name in paths:
        path = Path(name)
        if (path / "config.json").is_file():
            found.append(Target(str(path), path, megatron=False))
        elif (path / ".metadata").is_file() and (path / "hf").is_dir():
            found.append(Target(str(path), path, megatron=True))
        elif (path / "checkpoints").is_dir():
            steps = sorted(p for p in (path / "checkpoints").glob("step_*") if (p / ".metadata").is_file())
            if not steps:
                raise SystemExit(f"{path}: a run directory without checkpoints (checkpoints/step_* missing)")
            found.extend(Target(str(p), p, megatron=True) for p in steps)
        else:
            raise SystemExit(
                f"{path}: not an HF model directory (config.json), a Megatron checkpoint (.metadata and hf/) or "
                "a run directory (checkpoints/)"
            )
    return found


def read_sets(config: Config, items: list[str]) -> dict[str, Any]:
    """``NAME=FILE`` items (or ``data.eval_file`` as ``eval``) read as prompt sets, columns detected."""
    from megatron_hapo.data import DataError, read_prompts  # noqa: PLC0415
    from megatron_hapo.data.prompts import detect_keys  # noqa: PLC0415

    named = dict(item.split("=", 1) for item in items if "=" in item)
    if len(named) != len(items):
        raise SystemExit(f"--set takes NAME=FILE, got {[i for i in items if '=' not in i]}")
    if not named and config.data.eval_file:
        named = {"eval": config.data.eval_file}
    if not named:
        raise SystemExit("no benchmark: pass --set NAME=FILE (a .jsonl or .parquet prompt file), one per set")
    sets = {}
    for name, path in named.items():
        if not Path(path).is_file():
            raise SystemExit(f"--set {name}={path}: no such file")
        prompt_key, answer_key = detect_keys(path, config.data.prompt_key, config.data.answer_key)
        try:
            sets[name] = read_prompts(path, prompt_key=prompt_key, answer_key=answer_key, bad_rows=config.data.bad_rows)
        except DataError as exc:
            raise SystemExit(f"--set {name}: {exc} (keys {prompt_key!r} / {answer_key!r})") from None
    return sets


def set_metrics(correct: Any, lengths: list[int], truncated: int, sampling: Sampling) -> dict[str, float | int]:
    """avg@n, pass@k per k, mean length and truncations of one set; ``correct`` is ``[prompts, n]`` bool."""
    from megatron_hapo.trainer.evaluation import pass_at_k  # noqa: PLC0415

    counts = correct.sum(-1).tolist()
    out: dict[str, float | int] = {f"avg@{sampling.n}": float(correct.float().mean())}
    for k in sampling.ks:
        out[f"pass@{k}"] = sum(pass_at_k(sampling.n, int(c), k) for c in counts) / len(counts)
    out["response_length"] = sum(lengths) / len(lengths)
    out["truncated"] = truncated
    out["prompts"] = len(counts)
    return out


def _evaluate_model(
    engine: RolloutEngine, score: Scorer, encoded: dict[str, tuple[list, list]], sampling: Sampling
) -> dict[str, dict]:
    """Every set's metrics for the model ``engine`` serves."""
    from megatron_hapo.rollout.engine import SamplingSettings  # noqa: PLC0415

    settings = SamplingSettings(
        max_tokens=sampling.max_tokens, temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed
    )
    results = {}
    for name, (prompts, answers) in encoded.items():
        responses = engine.generate(prompts, sampling.n, settings, None)
        _, correct = score([r.token_ids for r in responses], [answers[r.prompt_index] for r in responses])
        truncated = sum(r.finish_reason == "length" for r in responses)
        lengths = [len(r.token_ids) for r in responses]
        results[name] = set_metrics(correct.view(len(prompts), sampling.n), lengths, truncated, sampling)
    return results


@dataclass(frozen=True)
class Job:
    """What every rank evaluates: the config, the ``(label, HF directory)`` models, the prompt sets, the
    sampling, and the output directory."""

    config: Any
    models: list[tuple[str, str]]
    sets: dict[str, Any]
    sampling: Sampling
    out: str


def _rank(rank: int, world: int, job: Job) -> None:
    """One rank: for each (label, HF directory) an engine, every set, the results (rank 0 writes them)."""
    import transformers  # noqa: PLC0415

    from megatron_hapo.data import encode_prompts  # noqa: PLC0415
    from megatron_hapo.parallel import runtime  # noqa: PLC0415
    from megatron_hapo.rewards import RewardWorkers  # noqa: PLC0415
    from megatron_hapo.rewards.math_answer import math_reward  # noqa: PLC0415
    from megatron_hapo.trainer.actor import build_engine  # noqa: PLC0415
    from megatron_hapo.trainer.scoring import worker_scorer  # noqa: PLC0415

    config, sets, sampling = job.config, job.sets, job.sampling
    runtime.quiet_logs()
    runtime.initialize_model_parallel(1, 1, None, seed=config.train.seed)
    reward = partial(math_reward, rule=config.data.reward, math_verify=config.data.math_verify)
    workers = RewardWorkers(
        reward,
        workers=config.output.reward_workers,
        timeout_s=config.output.reward_timeout_s,
        failure_value=(-1.0, False),
    )
    results: dict[str, dict] = {}
    try:
        for label, model_dir in job.models:
            tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
            limit = config.rollout.max_prompt_length
            encoded = {}
            for name, read in sets.items():
                enc = encode_prompts(read.examples, tokenizer, max_prompt_length=limit)
                encoded[name] = (enc.token_ids, [e.answer for e in enc.examples])
            score = worker_scorer(workers, decode=partial(tokenizer.batch_decode, skip_special_tokens=True))
            engine = build_engine(config, model_dir)
            try:
                results[label] = _evaluate_model(engine, score, encoded, sampling)
            finally:
                engine.close()
            if rank == 0:
                print(table(label, results[label], sampling), flush=True)
    finally:
        workers.close()
    if rank == 0:
        report = {"sampling": asdict(sampling), "results": results}
        Path(job.out).mkdir(parents=True, exist_ok=True)
        (Path(job.out) / "eval.json").write_text(json.dumps(report, indent=1, allow_nan=False))


def table(label: str, results: dict[str, dict], sampling: Sampling) -> str:
    """A fixed-width table of one model's results, one row per set and a mean row."""
    columns = [f"avg@{sampling.n}", *(f"pass@{k}" for k in sampling.ks)]
    lines = [label, f"{'set':<16}{'prompts':>8}" + "".join(f"{c:>9}" for c in columns) + f"{'length':>9}{'cut':>6}"]
    for name, row in results.items():
        values = "".join(f"{row[c]:>9.3f}" for c in columns)
        lines.append(f"{name:<16}{row['prompts']:>8}{values}{row['response_length']:>9.1f}{row['truncated']:>6}")
    if len(results) > 1:
        means = "".join(f"{sum(r[c] for r in results.values()) / len(results):>9.3f}" for c in columns)
        lines.append(f"{'mean':<16}{'':>8}{means}")
    return "\n".join(lines)


def _export(rank: int, world: int, checkpoints: list[tuple[str, str]]) -> None:
    """Export Megatron checkpoints ``(source, destination)`` to HF directories (one rank)."""
    from megatron_hapo.models.checkpoint import mcore_to_hf  # noqa: PLC0415
    from megatron_hapo.parallel import runtime  # noqa: PLC0415

    runtime.initialize_model_parallel(1, 1)
    for source, destination in checkpoints:
        mcore_to_hf(Path(source), Path(destination))


def main(argv: list[str] | None = None) -> int:
    from megatron_hapo.config import load_config  # noqa: PLC0415
    from megatron_hapo.config.errors import ConfigError  # noqa: PLC0415
    from megatron_hapo.parallel.local_launch import run_local_ranks  # noqa: PLC0415
    from megatron_hapo.trainer.preflight import check_model_dir  # noqa: PLC0415

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "targets", nargs="+", help="HF model directories, Megatron checkpoints, run directories; key=value overrides"
    )
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=FILE", help="a benchmark")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="run or preset YAML (engine, data keys)")
    parser.add_argument("--n", type=int, help="samples per prompt (default: output.eval_k)")
    parser.add_argument("--k", help="pass@k for each of these k <= n, comma-separated (default: 1,n)")
    parser.add_argument("--temperature", type=float, default=0.5, help="sampling temperature (HAPO's: 0.5)")
    parser.add_argument("--top-p", type=float, default=0.7, help="nucleus sampling (HAPO's: 0.7)")
    parser.add_argument("--max-tokens", type=int, help="per response (default: rollout.max_response_length)")
    parser.add_argument("--local-ranks", type=int, default=1, help="gloo ranks on this machine")
    parser.add_argument("--out", type=Path, default=Path("eval"), help="where eval.json goes")
    args = parser.parse_intermixed_args(argv)
    overrides = [t for t in args.targets if "=" in t and not Path(t).exists()]
    try:
        config = load_config(args.config, overrides)
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None
    n = config.output.eval_k if args.n is None else args.n  # --n 0 is refused below, not replaced
    try:
        ks = tuple(sorted({int(k) for k in args.k.split(",")})) if args.k else tuple(sorted({1, n}))
    except ValueError:
        raise SystemExit(f"--k {args.k!r}: comma-separated whole numbers, e.g. 1,4,8") from None
    if n < 1 or not all(0 < k <= n for k in ks):
        raise SystemExit(f"--n {n} / --k {list(ks)}: need n >= 1 and each k between 1 and n")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise SystemExit(f"--max-tokens {args.max_tokens}: at least 1 token per response")
    sampling = Sampling(
        n=n,
        ks=ks,
        temperature=args.temperature,
        top_p=args.top_p,
        max_tokens=config.rollout.max_response_length if args.max_tokens is None else args.max_tokens,
        seed=config.train.seed,
    )
    found, sets = targets([t for t in args.targets if t not in overrides]), read_sets(config, args.sets)
    import torch  # noqa: PLC0415

    vllm_on_cpu = not torch.cuda.is_available() and config.engine.kind == "vllm"
    with tempfile.TemporaryDirectory(prefix="hapo-eval-") as tmp:
        exports = [(str(t.path), str(Path(tmp) / f"model{i}")) for i, t in enumerate(found) if t.megatron]
        if exports:
            run_local_ranks(_export, 1, exports, device="cpu")
        exported = dict(exports)
        models = [(t.label, exported.get(str(t.path), str(t.path))) for t in found]
        for label, model_dir in models:
            check_model_dir(model_dir, label, vllm_on_cpu=vllm_on_cpu)
        run_local_ranks(_rank, args.local_ranks, Job(config, models, sets, sampling, str(args.out)))
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {args.out / 'eval.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
