"""Mixed-policy DAPO terms (spec 4), a reading of an abstract: no code or equations were published.

Our reading (documented in docs/ALGORITHMS.md, ambiguity M1):
  (a) a frozen guide policy ``pi_phi`` supplies samples; on them the DAPO token-level clipped surrogate uses the
      ratio ``pi_theta / pi_phi`` and is added to the on-policy loss with a weight;
  (b) groups in which no on-policy response is correct ("zero-reward groups", which dynamic sampling would
      drop) are routed to the guide policy, whose responses form that off-policy batch.
"""

from __future__ import annotations

import torch

from megatron_hapo.algos._checks import check_range, group_index
from megatron_hapo.algos.advantages import GroupIds
from megatron_hapo.algos.surrogate import clipped_surrogate


def zero_reward_groups(correct: torch.Tensor, group_ids: GroupIds) -> torch.Tensor:
    """Responses whose group has no correct response: the prompts to route to the guide policy.

    Args:
        correct: ``[B]`` bool (or 0/1) correctness.
        group_ids: ``[B]`` group of each response.

    Returns:
        ``[B]`` bool, True for every response of a group with no correct response.
    """
    index, num_groups = group_index(group_ids, correct.device)
    num_correct = torch.zeros(num_groups, dtype=torch.long, device=correct.device)
    num_correct = num_correct.index_add_(0, index, correct.bool().long())
    return (num_correct == 0)[index]


def guide_policy_surrogate(
    log_prob: torch.Tensor,
    guide_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float,
    eps_high: float,
    dual_clip_c: float | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Off-policy clipped surrogate on guide-policy samples, ratio ``pi_theta / pi_phi``.

    Args:
        log_prob: ``[B, L]`` current policy log-probs of the guide's tokens (carry the gradient).
        guide_log_prob: ``[B, L]`` the frozen guide policy's log-probs of the same tokens.
        advantages: ``[B]`` or ``[B, L]`` group advantages computed on the guide's responses.
        mask: ``[B, L]`` valid tokens.

    Returns:
        ``(per_token_loss [B, L], metrics)`` with metric names prefixed ``guide_``.
    """
    loss, metrics = clipped_surrogate(
        log_prob, guide_log_prob, advantages, eps_low=eps_low, eps_high=eps_high, dual_clip_c=dual_clip_c, mask=mask
    )
    return loss, {f"guide_{name}": value for name, value in metrics.items()}


def mix_losses(on_policy_loss: torch.Tensor, guide_loss: torch.Tensor | None, *, weight: float) -> torch.Tensor:
    """``on_policy_loss + weight * guide_loss`` (the guide term is absent when no batch was routed)."""
    check_range("weight", weight, 0.0, None)
    return on_policy_loss if guide_loss is None else on_policy_loss + weight * guide_loss
