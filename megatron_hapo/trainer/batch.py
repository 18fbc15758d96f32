"""The step's batch: every sequence of one RL step, made once in host memory.

The rollout's sequences are stored back to back without padding (``tokens`` and their offsets ``starts``, as a
THD pack), and every per-token quantity of the step lives in the response layout ``[N, L]``: row ``i``, slot
``j`` is response token ``j`` of sequence ``i`` (the layout the algorithms read). The forward-only pass fills
``old_log_prob`` and ``entropy``, the advantages fill ``advantages`` and ``weights``, and the updates read them;
micro-batches are cut from it by :mod:`megatron_hapo.trainer.microbatch`, padded or packed, and put back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch

from megatron_hapo.rollout.engine import Response


def _zeros(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros(like.shape)


@dataclass
class StepBatch:
    """``N`` prompt + response sequences of one step (the policy's, then any guide policy's)."""

    tokens: torch.Tensor
    """``[T]`` int64 every sequence's prompt and response ids, back to back."""
    starts: torch.Tensor
    """``[N + 1]`` int64 offset of each sequence in ``tokens`` (``cu_seqlens``)."""
    prompt_lengths: torch.Tensor
    """``[N]`` int64."""
    response_mask: torch.Tensor
    """``[N, L]`` bool valid response tokens, left-aligned."""
    rollout_log_prob: torch.Tensor
    """``[N, L]`` float32 the engine's log-probs of the response tokens."""
    guide_rows: torch.Tensor
    """``[N]`` bool sequences sampled by a frozen guide policy (their ``old_log_prob`` is the guide's own)."""
    old_log_prob: torch.Tensor = field(default=None)  # type: ignore[assignment]
    """``[N, L]`` behaviour log-probs (the forward-only pass fills the policy's rows)."""
    entropy: torch.Tensor = field(default=None)  # type: ignore[assignment]
    """``[N, L]`` forward-only entropies (0 on guide rows)."""
    advantages: torch.Tensor = field(default=None)  # type: ignore[assignment]
    """``[N, L]`` per-token advantages (0 outside the kept groups)."""
    weights: torch.Tensor | None = None
    """``[N, L]`` rollout-correction weights, or ``None``."""

    def __post_init__(self) -> None:
        for name in ("old_log_prob", "entropy", "advantages"):
            if getattr(self, name) is None:
                setattr(self, name, _zeros(self.rollout_log_prob))

    @classmethod
    def from_responses(
        cls,
        prompts: Sequence[Sequence[int]],
        responses: Sequence[Response],
        *,
        max_response_length: int,
        guide: bool = False,
    ) -> StepBatch:
        """The batch of ``responses`` (each pointing at its prompt by ``prompt_index``); ``guide`` flags them all
        as guide-policy sequences whose behaviour log-probs are the engine's."""
        seqs = [list(prompts[r.prompt_index]) + list(r.token_ids) for r in responses]
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
        response_mask = torch.zeros(len(seqs), max_response_length, dtype=torch.bool)
        rollout_log_prob = torch.zeros(len(seqs), max_response_length)
        for i, response in enumerate(responses):
            count = len(response.token_ids)
            if count > max_response_length:
                raise ValueError(
                    f"response {i} has {count} tokens, more than max_response_length {max_response_length}"
                )
            if count and len(prompts[response.prompt_index]) == 0:
                raise ValueError(f"response {i} has an empty prompt: its first token would have nothing to follow")
            response_mask[i, :count] = True
            rollout_log_prob[i, :count] = response.log_probs
        flat = [t for s in seqs for t in s]
        batch = cls(
            tokens=torch.tensor(flat, dtype=torch.long),
            starts=torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]),
            prompt_lengths=lengths - response_mask.sum(-1),
            response_mask=response_mask,
            rollout_log_prob=rollout_log_prob,
            guide_rows=torch.full((len(seqs),), guide),
        )
        if guide:
            batch.old_log_prob = rollout_log_prob.clone()
        return batch

    @property
    def num_sequences(self) -> int:
        """``N``."""
        return len(self.prompt_lengths)

    @property
    def lengths(self) -> torch.Tensor:
        """``[N]`` int64 prompt + response tokens of each sequence."""
        return self.starts.diff()

    @property
    def response_lengths(self) -> torch.Tensor:
        """``[N]`` int64."""
        return self.response_mask.sum(-1)

    def on_policy_mask(self) -> torch.Tensor:
        """``[N, L]`` bool: the response tokens of the policy's own sequences."""
        return self.response_mask & ~self.guide_rows[:, None]

    def join(self, other: StepBatch) -> StepBatch:
        """The sequences of ``self`` then ``other`` (the same response width ``L``); missing rollout-correction
        weights count as ones."""
        if other.response_mask.shape[1] != self.response_mask.shape[1]:
            raise ValueError("joined batches need the same response width (rollout.max_response_length)")
        per_row = {
            f.name: torch.cat([getattr(self, f.name), getattr(other, f.name)])
            for f in fields(self)
            if f.name not in ("tokens", "starts", "weights")
        }
        weights = None
        if self.weights is not None or other.weights is not None:
            weights = torch.cat(
                [b.weights if b.weights is not None else torch.ones(b.response_mask.shape) for b in (self, other)]
            )
        starts = torch.cat([self.starts, other.starts[1:] + self.starts[-1]])
        return StepBatch(tokens=torch.cat([self.tokens, other.tokens]), starts=starts, weights=weights, **per_row)


def per_token(advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """``[M]`` per-sequence or ``[M, L]`` per-token advantages -> ``[M, L]`` (0 beyond each response)."""
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    return advantages * response_mask
