"""Evaluation: avg@k and pass@k of the current policy on held-out prompts (HAPO's settings by default).

HAPO reports avg@k (mean accuracy over k samples per problem) at T = 0.5, top-p 0.7, k = 8, and both the best and
the final step's numbers (spec H8). pass@k uses the unbiased estimator of Chen et al. (2021) with n = k samples,
which is 1 when any sample is correct.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import comb
from typing import Any

import torch

from megatron_hapo.rollout.engine import RolloutEngine, SamplingSettings
from megatron_hapo.trainer.scoring import Scorer


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k from ``num_correct`` correct out of ``num_samples >= k`` samples: ``1 - C(n-c, k) / C(n, k)``."""
    if not 0 < k <= num_samples or not 0 <= num_correct <= num_samples:
        raise ValueError(f"need 0 < k <= n and 0 <= c <= n, got n={num_samples}, c={num_correct}, k={k}")
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - comb(num_samples - num_correct, k) / comb(num_samples, k)


@dataclass(frozen=True)
class EvalSettings:
    """How the policy is evaluated."""

    k: int = 8
    temperature: float = 0.5
    top_p: float = 0.7
    max_tokens: int = 4096
    seed: int = 0


def evaluate(
    engine: RolloutEngine, score: Scorer, prompts: Sequence[list[int]], answers: Sequence[Any], settings: EvalSettings
) -> dict[str, float]:
    """``avg@k`` and ``pass@k`` over ``prompts`` (plain temperature: no adaptive sampling in evaluation).

    ``score`` is a trainer :data:`~megatron_hapo.trainer.step.Scorer`: token ids and answers -> (rewards, correct).
    """
    sampling = SamplingSettings(
        max_tokens=settings.max_tokens, temperature=settings.temperature, top_p=settings.top_p, seed=settings.seed
    )
    responses = engine.generate(prompts, settings.k, sampling, None)
    _, correct = score([r.token_ids for r in responses], [answers[r.prompt_index] for r in responses])
    per_prompt = correct.view(len(prompts), settings.k)
    counts = per_prompt.sum(-1).tolist()
    k = settings.k
    return {
        f"avg@{k}": float(per_prompt.float().mean()),
        f"pass@{k}": float(torch.tensor([pass_at_k(k, int(c), k) for c in counts]).mean()),
        "eval_response_length": float(sum(len(r.token_ids) for r in responses) / len(responses)),
    }


@dataclass
class BestAndFinal:
    """Tracks the best and the latest value of one evaluation metric (both are reported, spec H8)."""

    name: str
    best: float = float("-inf")
    best_step: int = -1
    final: float = float("nan")

    def update(self, step: int, metrics: dict[str, float]) -> None:
        """Record ``metrics[name]`` at ``step``."""
        value = metrics[self.name]
        self.final = value
        if value > self.best:
            self.best, self.best_step = value, step
