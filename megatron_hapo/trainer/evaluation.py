"""Evaluation: avg@n and pass@k of the current policy on one or more benchmarks (HAPO's settings by default).

HAPO reports avg@k (mean accuracy over k samples per problem) at T = 0.5, top-p 0.7, k = 8, and both the best and
the final step's numbers (spec H8). Here each benchmark gets avg@n over ``n`` samples per prompt and pass@k for
each configured ``k <= n`` from the same samples (the unbiased estimator of Chen et al., 2021), the mean response
length and the number of responses cut at the length limit. The training loop and ``python -m
megatron_hapo.evaluate`` share these functions, so the two give the same numbers for the same model and seed.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from math import comb
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from megatron_hapo.rollout.engine import RolloutEngine, SamplingSettings
from megatron_hapo.trainer.scoring import Scorer, scored_answers

if TYPE_CHECKING:
    from megatron_hapo.config import Config
    from megatron_hapo.trainer.preflight import EvalData

logger = logging.getLogger(__name__)

#: The metrics tracked for best and final (``eval_summary.json``): accuracies, not lengths or counts.
TRACKED = ("avg@", "pass@")
#: The name of the average over the sets (a set may not take it).
MEAN = "mean"


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k from ``num_correct`` correct out of ``num_samples >= k`` samples: ``1 - C(n-c, k) / C(n, k)``."""
    if not 0 < k <= num_samples or not 0 <= num_correct <= num_samples:
        raise ValueError(f"need 0 < k <= n and 0 <= c <= n, got n={num_samples}, c={num_correct}, k={k}")
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - comb(num_samples - num_correct, k) / comb(num_samples, k)


@dataclass(frozen=True)
class EvalSettings:
    """How the policy is evaluated: ``n`` samples per prompt at ``temperature`` / ``top_p``, ``max_tokens`` each,
    pass@k for each of ``ks``; seeded by ``seed``."""

    n: int = 8
    ks: tuple[int, ...] = (1, 8)
    temperature: float = 0.5
    top_p: float = 0.7
    max_tokens: int = 4096
    seed: int = 0

    @classmethod
    def from_config(cls, config: Config) -> EvalSettings:
        """``output.eval`` (max_tokens defaulting to ``rollout.max_response_length``), seeded by ``train.seed``."""
        ev = config.output.eval
        max_tokens = config.rollout.max_response_length if ev.max_tokens is None else ev.max_tokens
        return cls(ev.n, ev.ks(), ev.temperature, ev.top_p, max_tokens, config.train.seed)


@dataclass(frozen=True)
class EvalSet:
    """One benchmark, encoded: ``prompts`` (token ids), their ``answers`` and the ``score`` of its answer rule."""

    name: str
    prompts: list[list[int]]
    answers: list[Any]
    score: Scorer


def encode_eval_sets(
    evals: Sequence[EvalData], tokenizer: Any, max_prompt_length: int, scorers: dict[str, Scorer]
) -> list[EvalSet]:
    """The read sets chat-templated for ``tokenizer`` (prompts over ``max_prompt_length`` dropped and logged),
    each with the scorer of its answer rule."""
    from megatron_hapo.data import encode_prompts  # noqa: PLC0415

    out = []
    for one in evals:
        encoded = encode_prompts(one.examples, tokenizer, max_prompt_length=max_prompt_length)
        logger.info(
            "evaluation set %s (%s, %s): %d prompts, %d malformed rows skipped, %d over the prompt length dropped",
            one.name,
            one.path,
            one.reward,
            len(encoded.token_ids),
            one.skipped,
            encoded.dropped_too_long,
        )
        if not encoded.token_ids:
            raise ValueError(f"evaluation set {one.name} ({one.path}): no prompt fits rollout.max_prompt_length")
        answers = scored_answers(encoded.examples, one.reward)
        out.append(EvalSet(one.name, encoded.token_ids, answers, scorers[one.reward]))
    return out


def set_metrics(correct: torch.Tensor, lengths: list[int], truncated: int, settings: EvalSettings) -> dict[str, Any]:
    """avg@n, pass@k per k, mean response length, truncations and prompts of one set; ``correct``: ``[prompts, n]``."""
    counts = correct.sum(-1).tolist()
    out: dict[str, Any] = {f"avg@{settings.n}": float(correct.float().mean())}
    for k in settings.ks:
        out[f"pass@{k}"] = sum(pass_at_k(settings.n, int(c), k) for c in counts) / len(counts)
    out["response_length"] = sum(lengths) / len(lengths)
    out["truncated"] = truncated
    out["prompts"] = len(counts)
    return out


def evaluate_sets(engine: RolloutEngine, sets: Sequence[EvalSet], settings: EvalSettings) -> dict[str, dict]:
    """Every set's :func:`set_metrics` for the policy ``engine`` serves (plain temperature: no adaptive sampling);
    each set is sampled with the same seed, so a set's numbers do not depend on the other sets."""
    sampling = SamplingSettings(
        max_tokens=settings.max_tokens, temperature=settings.temperature, top_p=settings.top_p, seed=settings.seed
    )
    results = {}
    for one in sets:
        responses = engine.generate(one.prompts, settings.n, sampling, None)
        _, correct = one.score([r.token_ids for r in responses], [one.answers[r.prompt_index] for r in responses])
        truncated = sum(r.finish_reason == "length" for r in responses)
        lengths = [len(r.token_ids) for r in responses]
        results[one.name] = set_metrics(correct.view(len(one.prompts), settings.n), lengths, truncated, settings)
    return results


def with_mean(results: dict[str, dict]) -> dict[str, dict]:
    """``results`` and, for several sets, their ``mean`` of each accuracy metric (avg@n, pass@k)."""
    if len(results) < 2:
        return dict(results)
    first = next(iter(results.values()))
    names = [name for name in first if name.startswith(TRACKED)]
    return {**results, MEAN: {name: sum(r[name] for r in results.values()) / len(results) for name in names}}


def eval_metrics(results: dict[str, dict]) -> dict[str, float]:
    """The flat step metrics of :func:`evaluate_sets`'s results: ``eval/<set>/<metric>`` and ``eval/mean/...``."""
    return {
        f"eval/{name}/{metric}": value
        for name, row in with_mean(results).items()
        for metric, value in row.items()
        if metric != "prompts"
    }


class BestAndFinal:
    """The best and latest value of each tracked evaluation metric (``eval/<set>/avg@8`` ...; both are reported,
    spec H8). ``best`` is ``{metric: (value, step)}`` and ``final`` ``{metric: value}``: a resumed run passes its
    checkpoint's, keyed by the full metric name, so a resume with another ``n`` or other sets does not take an old
    best as its own, and one that evaluates nothing more reports what the run had."""

    def __init__(self, best: dict[str, tuple[float, int]] | None = None, final: dict[str, float] | None = None) -> None:
        self.best: dict[str, tuple[float, int]] = dict(best or {})
        self.final: dict[str, float] = dict(final or {})

    def update(self, step: int, metrics: dict[str, float]) -> None:
        """Record the tracked ``eval/...`` values of ``metrics`` at ``step``."""
        for name, value in metrics.items():
            if name.startswith("eval/") and name.rsplit("/", 1)[-1].startswith(TRACKED):
                self.final[name] = value
                if not math.isnan(value) and (name not in self.best or value > self.best[name][0]):
                    self.best[name] = (value, step)

    def summary(self) -> dict[str, dict[str, dict]]:
        """``{set: {metric: {best, best_step, final}}}``, strict JSON: a ``final`` not measured (a checkpoint saved
        before finals were kept, or a ``NaN``) is ``None``."""
        out: dict[str, dict[str, dict]] = {}
        for name, (value, step) in sorted(self.best.items()):
            _, group, metric = name.split("/", 2)
            final = self.final.get(name)
            entry = {"best": value, "best_step": step, "final": None if final is None or math.isnan(final) else final}
            out.setdefault(group, {})[metric] = entry
        return out

    def write(self, path: Path) -> None:
        """The summary as ``path`` (strict JSON), when anything was evaluated."""
        if self.best:
            path.write_text(json.dumps(self.summary(), indent=1, allow_nan=False))
