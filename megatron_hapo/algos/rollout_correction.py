"""Rollout-vs-trainer mismatch: per-step metrics and truncated importance sampling (TIS).

The rollout engine and the trainer compute log-probs of the same tokens with different kernels (and, in a
buggy setup, different weights). ``d = log pi_trainer - log pi_rollout`` per valid token measures the gap;
TIS (Yao et al., 2025, "Your efficient RL framework secretly brings you off-policy RL training") reweights
each token's loss by ``min(exp(d_old), cap)`` with ``d_old`` taken from the trainer's old log-probs, so that
the update stays unbiased for the policy that actually sampled.
"""

from __future__ import annotations

import torch

from megatron_hapo.algos._checks import as_mask, check_no_nan, check_range, check_same_shape


def rollout_mismatch_metrics(
    trainer_log_prob: torch.Tensor, rollout_log_prob: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Mismatch statistics over the valid tokens (0-dim float32 tensors; zeros when none is valid).

    Args:
        trainer_log_prob: ``[B, L]`` the trainer's log-probs of the sampled tokens.
        rollout_log_prob: ``[B, L]`` the engine's log-probs of the same tokens.
        mask: ``[B, L]`` valid tokens.

    Returns:
        ``mismatch_kl`` (k1 estimate of KL(rollout || trainer): mean of ``-d``), ``mismatch_k3`` (mean of
        ``exp(d) - 1 - d``, non-negative), ``mismatch_max_abs_log_ratio``, ``mismatch_max_ratio`` and
        ``mismatch_min_ratio`` (of ``exp(d)``).
    """
    check_same_shape(trainer_log_prob=trainer_log_prob, rollout_log_prob=rollout_log_prob)
    valid = as_mask(mask, trainer_log_prob)
    d = (trainer_log_prob.float() - rollout_log_prob.float())[valid]
    check_no_nan("trainer / rollout log-probs", d)
    if d.numel() == 0:
        zero = torch.zeros((), device=trainer_log_prob.device)
        return {
            name: zero
            for name in (
                "mismatch_kl",
                "mismatch_k3",
                "mismatch_max_abs_log_ratio",
                "mismatch_max_ratio",
                "mismatch_min_ratio",
            )
        }
    return {
        "mismatch_kl": (-d).mean(),
        "mismatch_k3": (torch.expm1(d) - d).mean(),
        "mismatch_max_abs_log_ratio": d.abs().max(),
        "mismatch_max_ratio": d.max().exp(),
        "mismatch_min_ratio": d.min().exp(),
    }


def truncated_importance_weights(
    old_log_prob: torch.Tensor, rollout_log_prob: torch.Tensor, mask: torch.Tensor, *, cap: float
) -> torch.Tensor:
    """``[B, L]`` TIS weights ``min(exp(old - rollout), cap)`` (no gradient; 0 outside the mask).

    Args:
        old_log_prob: ``[B, L]`` the trainer's behaviour log-probs (before the update).
        rollout_log_prob: ``[B, L]`` the engine's log-probs of the sampled tokens.
        mask: ``[B, L]`` valid tokens.
        cap: truncation ``C >= 1`` (2 in the TIS paper's recipes).
    """
    check_same_shape(old_log_prob=old_log_prob, rollout_log_prob=rollout_log_prob)
    check_range("cap", cap, 1.0, None)
    valid = as_mask(mask, old_log_prob)
    log_ratio = (old_log_prob.detach().float() - rollout_log_prob.detach().float()).masked_fill(~valid, 0.0)
    check_no_nan("old / rollout log-probs", log_ratio)
    return torch.exp(log_ratio).clamp(max=cap) * valid
