"""The supervised warm-up's loss inside Megatron's ``get_forward_backward_func`` (the policy loss's batch contract,
:mod:`megatron_hapo.parallel.policy_loss`)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from megatron_hapo.parallel.collectives import group_rank_size
from megatron_hapo.parallel.policy_loss import ParallelGroups, PolicyMicroBatch, _logprob_entropy, _run_model
from megatron_hapo.parallel.token_mean import microbatch_loss


@dataclass(frozen=True)
class SupervisedStep:
    """Training step of a supervised warm-up: the token-mean negative log-likelihood of ``targets`` under ``mask``,
    exact over the mini-batch (``denominator``: its valid tokens over every micro-batch and DP x CP rank)."""

    groups: ParallelGroups
    denominator: torch.Tensor
    num_microbatches: int
    vocab_size: int | None

    def __call__(self, data_iterator: Any, model: Any) -> tuple[torch.Tensor, Any]:
        batch = next(data_iterator)
        return _run_model(model, batch), partial(self.loss, batch)

    def loss(self, batch: PolicyMicroBatch, logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        log_prob, _ = _logprob_entropy(batch, logits, self.groups, None, self.vocab_size)
        _, dp_size = group_rank_size(self.groups.dp)
        loss = microbatch_loss(
            -log_prob,
            batch.mask,
            "token-mean",
            denominator=self.denominator,
            num_microbatches=self.num_microbatches,
            dp_size=dp_size,
        )
        share = (-log_prob.detach() * batch.mask).sum() / self.denominator.clamp_min(1e-12)
        return loss, {"nll_share": share, "num_tokens": batch.mask.sum()}


__all__ = ["SupervisedStep"]
