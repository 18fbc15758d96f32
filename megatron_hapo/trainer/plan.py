"""The step's sequence plan: which data-parallel rank computes and trains each sequence, decided once per step.

The PPO epochs walk the same mini-batches (whole groups of ``n``, ``train.mini_batch_prompts`` groups each),
and each mini-batch's rows are cut into one contiguous block per data-parallel rank. A sequence therefore stays
on one rank through every mini-batch and epoch, and that rank is the one that computes its old log-probs and
entropies in the forward-only pass. The sequences no mini-batch trains on (groups the filter dropped) are still
needed for the step's entropy statistics and metrics; they are cut into blocks over the ranks as well, so
that every forward-only sequence is computed on exactly one data-parallel rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SequencePlan:
    """One step's split of sequences over mini-batches and data-parallel ranks (the same on every rank)."""

    minibatches: list[torch.Tensor]
    """Rows of each mini-batch of one PPO epoch, in update order (``[n * groups]`` int64 each)."""
    dp_rank: int
    dp_size: int
    num_on_policy: int
    """Rows ``[0, num_on_policy)`` are the policy's own samples (forward-only); later rows come from the guide."""
    untrained: torch.Tensor
    """On-policy rows in no mini-batch (``[U]`` int64)."""

    @classmethod
    def build(cls, keep: torch.Tensor, n: int, mini_batch_prompts: int, *, num_on_policy: int,
              dp: tuple[int, int]) -> SequencePlan:  # fmt: skip
        """The plan of a batch whose kept groups are ``keep`` (``[N]`` bool, whole groups of ``n``; rows from
        ``num_on_policy`` on are the guide's, kept whole) for data-parallel ``(rank, size)`` ``dp``."""
        kept_groups = keep.view(-1, n)[:, 0].nonzero().flatten()
        offsets = torch.arange(n)
        minibatches = [(groups[:, None] * n + offsets).flatten() for groups in kept_groups.split(mini_batch_prompts)]
        untrained = (~keep[:num_on_policy]).nonzero().flatten()
        return cls(minibatches, dp[0], dp[1], num_on_policy, untrained)

    def local(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's block of ``rows`` (``[R]`` -> ``[R / dp]``, the first blocks one longer when uneven)."""
        return rows.tensor_split(self.dp_size)[self.dp_rank]

    def forward_rows(self) -> torch.Tensor:
        """``[F]`` the on-policy rows whose old log-probs and entropies this rank computes, ascending: its block
        of every mini-batch, then its block of the untrained rows."""
        trained = [self.local(rows) for rows in self.minibatches]
        mine = torch.cat([*trained, self.local(self.untrained), torch.zeros(0, dtype=torch.long)])
        return mine[mine < self.num_on_policy].sort().values
