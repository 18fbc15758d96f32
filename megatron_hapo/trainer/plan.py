"""The step's sequence plan: which data-parallel rank computes and trains each sequence, decided once per step.

The PPO epochs walk the same mini-batches (whole groups of ``n``, ``train.mini_batch_prompts`` groups each),
and each mini-batch's rows are split over the data-parallel ranks balanced by tokens (longest sequence first to
the least-loaded rank: long-tailed response lengths would otherwise leave one rank the long ones and the others
waiting for it at the gradient reduction). A sequence therefore stays
on one rank through every mini-batch and epoch, and that rank is the one that computes its old log-probs and
entropies in the forward-only pass. The sequences no mini-batch trains on (groups the filter dropped) are
needed only when something reads the whole rollout's entropy statistics (``algos.reads_rollout_entropy``); then
they are split over the ranks the same way, so that every forward-only sequence is computed on exactly one
data-parallel rank.
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
    lengths: torch.Tensor
    """``[N]`` int64 tokens of every sequence (what the split balances)."""

    @classmethod
    def build(
        cls,
        keep: torch.Tensor,
        n: int,
        mini_batch_prompts: int,
        *,
        num_on_policy: int,
        dp: tuple[int, int],
        lengths: torch.Tensor,
    ) -> SequencePlan:
        """The plan of a batch whose kept groups are ``keep`` (``[N]`` bool, whole groups of ``n``; rows from
        ``num_on_policy`` on are the guide's, kept whole) of sequences of ``lengths`` (``[N]``) for data-parallel
        ``(rank, size)`` ``dp``."""
        kept_groups = keep.view(-1, n)[:, 0].nonzero().flatten()
        offsets = torch.arange(n)
        minibatches = [(groups[:, None] * n + offsets).flatten() for groups in kept_groups.split(mini_batch_prompts)]
        untrained = (~keep[:num_on_policy]).nonzero().flatten()
        return cls(minibatches, dp[0], dp[1], num_on_policy, untrained, lengths)

    def local(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's share of ``rows`` (ascending), from :func:`balanced_split`."""
        return balanced_split(rows, self.lengths[rows], self.dp_size)[self.dp_rank]

    def forward_rows(self, *, untrained: bool = True) -> torch.Tensor:
        """``[F]`` the on-policy rows whose old log-probs and entropies this rank computes, ascending: its block
        of every mini-batch, then (``untrained``) its block of the rows no mini-batch trains on."""
        shares = [self.local(rows) for rows in self.minibatches]
        if untrained:
            shares.append(self.local(self.untrained))
        mine = torch.cat([*shares, torch.zeros(0, dtype=torch.long)])
        return mine[mine < self.num_on_policy].sort().values


def balanced_split(rows: torch.Tensor, lengths: torch.Tensor, parts: int) -> list[torch.Tensor]:
    """``rows`` (``[R]``, tokens ``lengths`` ``[R]``) in ``parts`` shares of nearly equal tokens: longest first, each
    to the share with the fewest tokens so far (ties: the lower index, so every rank computes the same split).
    Each share is ascending."""
    loads, members = [0] * parts, [[] for _ in range(parts)]  # type: list[int], list[list[int]]
    for i in sorted(range(len(rows)), key=lambda i: (-int(lengths[i]), i)):
        part = min(range(parts), key=lambda k: (loads[k], k))
        members[part].append(i)
        loads[part] += int(lengths[i])
    return [rows[torch.tensor(sorted(m), dtype=torch.long)] for m in members]
