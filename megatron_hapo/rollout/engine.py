"""The rollout engine protocol: generate groups of responses, take new weights, score a probe sequence, and
sleep while the trainer holds the accelerator.

An engine lives in the trainer's ranks. Prompts are token ids (the trainer owns the tokenizer). Every
response carries the engine's own log-probs of its tokens, so the trainer can measure (and optionally correct)
the rollout-vs-trainer mismatch, and, with HAPO's adaptive sampling, the temperature each token was drawn at.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import torch

from megatron_hapo.algos import SAMPLING, EntropyStats

if TYPE_CHECKING:
    from megatron_hapo.config import SamplingConfig

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True, kw_only=True)
class SamplingSettings:
    """How one rollout call samples (built from ``algo.sampling`` and ``rollout`` config, or for validation)."""

    max_tokens: int
    """Longest response in tokens (> 0)."""
    temperature: float = 1.0
    """Base temperature T (0: greedy)."""
    top_p: float = 1.0
    """Nucleus mass in (0, 1]."""
    top_k: int = -1
    """Top-k cut-off (-1: off)."""
    adaptive_tau: float | None = None
    """HAPO adaptive temperature strength (``T_t = T (1 + tau h_hat)``); ``None``: the plain temperature."""
    stop_token_ids: tuple[int, ...] = ()
    """Tokens that end a response besides the model's EOS."""
    seed: int | None = None
    """Base seed: request ``i`` samples with ``seed + i`` (reproducible rollouts); ``None``: unseeded."""
    min_tokens: int = 0
    """No EOS / stop token before this many tokens (vLLM's ``min_tokens``: their logits are masked before any
    other processing; the recorded log-probs stay the model's raw ones). 0: off."""

    def __post_init__(self) -> None:
        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be > 0, got {self.max_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")
        if self.adaptive_tau is not None and not 0 <= self.adaptive_tau < 1:
            raise ValueError(f"adaptive_tau must lie in [0, 1), got {self.adaptive_tau}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"need 0 <= min_tokens <= max_tokens, got {self.min_tokens} and {self.max_tokens}")

    @classmethod
    def for_training(
        cls, sampling: SamplingConfig, *, max_tokens: int, seed: int | None = None, min_tokens: int = 0
    ) -> SamplingSettings:
        """From an ``algo.sampling`` config (``kind`` fixed | entropy_adaptive, temperature, top_p, top_k, tau)."""
        adaptive = SAMPLING.get(sampling.kind).needs_entropy  # the registry's entry says whether it adapts
        return cls(
            max_tokens=max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            adaptive_tau=sampling.tau if adaptive else None,
            seed=seed,
            min_tokens=min_tokens,
        )


@dataclass
class Response:
    """One generated response."""

    prompt_index: int
    """Index of its prompt in the ``generate`` call."""
    token_ids: list[int]
    """``[L]`` generated token ids (EOS included when it stopped on one)."""
    log_probs: torch.Tensor
    """``[L]`` float32 engine log-probs of ``token_ids`` (see the engine's ``logprobs_mode``)."""
    finish_reason: FinishReason
    """``stop`` (EOS / stop token) or ``length`` (hit ``max_tokens``)."""
    temperatures: torch.Tensor | None = None
    """``[L]`` float32 temperature each token was sampled at (adaptive sampling only)."""


class RolloutEngine(Protocol):
    """What the trainer needs from a rollout engine."""

    def generate(
        self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingSettings, stats: EntropyStats | None
    ) -> list[Response]:
        """``n`` responses per prompt, grouped by prompt (``[p0 r0 .. p0 r(n-1), p1 r0, ...]``).

        ``stats`` are the previous training step's entropy statistics (adaptive sampling; ``None``: none yet).
        """
        ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace weights by HF name with full (unsharded) tensors; each call carries complete layers."""
        ...

    def prompt_log_probs(self, token_ids: Sequence[int]) -> torch.Tensor:
        """``[S - 1]`` float32 log-probs of ``token_ids[1:]`` given their prefixes, at temperature 1."""
        ...

    def sleep(self, level: int | None = None) -> None:
        """Hand the engine's accelerator memory to the trainer (no-op where there is nothing to free).

        ``level`` (vLLM's sleep level; ``None``: the engine's configured one): 1 keeps the weights in host memory
        for the wake-up, 2 drops them (a full ``load_weights`` must follow the wake-up)."""
        ...

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Take memory back: ``["weights"]``, ``["kv_cache"]`` or everything (``None``); no-op when awake."""
        ...

    def close(self) -> None:
        """Free the engine's model and memory; the engine is not used afterwards."""
        ...


def temperature_metrics(responses: Sequence[Response]) -> dict[str, float]:
    """Distribution of the temperatures the tokens were sampled at (adaptive sampling; ``{}`` without it).

    Returns ``temperature_min``, ``_p10``, ``_mean``, ``_p90`` and ``_max`` over every sampled token.
    """
    recorded = [r.temperatures for r in responses if r.temperatures is not None and r.temperatures.numel()]
    if not recorded:
        return {}
    values = torch.cat(recorded).double()
    low, high = torch.quantile(values, torch.tensor([0.1, 0.9], dtype=torch.float64)).tolist()
    return {
        "temperature_min": float(values.min()),
        "temperature_p10": low,
        "temperature_mean": float(values.mean()),
        "temperature_p90": high,
        "temperature_max": float(values.max()),
    }
