"""The clipped policy-gradient surrogate with Clip-Higher and dual clip (spec 1.2, 2.6), token or sequence ratio.

Departure (documented in docs/ALGORITHMS.md): the log-ratio is clamped to [-20, 20] before ``exp`` (as current
verl does); the published HAPO code does not clamp, and an overflowed ratio there turns into an Inf loss or a
NaN gradient through the unselected branch of the clip.
"""

from __future__ import annotations

from typing import Literal

import torch

from megatron_hapo.algos._checks import as_mask, check_finite, check_range, check_same_shape

LOG_RATIO_CLAMP = 20.0
RatioLevel = Literal["token", "sequence_mean", "sequence_geometric"]
RATIO_LEVELS: tuple[str, ...] = ("token", "sequence_mean", "sequence_geometric")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``mask`` (0 when the mask is empty, never NaN)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1)


def importance_ratio(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, mask: torch.Tensor, *, level: RatioLevel = "token"
) -> torch.Tensor:
    """Importance ratio ``pi / pi_old`` per token, or per sequence broadcast over its tokens (GRPO-S, G3).

    Args:
        log_prob, old_log_prob: ``[B, L]``; ``log_prob`` carries the gradient.
        mask: ``[B, L]`` valid tokens.
        level: ``token``: ``exp(lp - old)``; ``sequence_mean``: mean over valid tokens of the token ratios
            (the transcription of GRPO-S); ``sequence_geometric``: ``exp(mean(lp - old))`` (GSPO-style).

    Returns:
        ``[B, L]`` ratios.
    """
    check_same_shape(log_prob=log_prob, old_log_prob=old_log_prob, mask=mask)
    log_ratio = (log_prob - old_log_prob).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if level == "token":
        return torch.exp(log_ratio)
    weights = mask.to(log_ratio.dtype)
    num_tokens = weights.sum(-1, keepdim=True).clamp_min(1)
    if level == "sequence_mean":
        seq = (torch.exp(log_ratio) * weights).sum(-1, keepdim=True) / num_tokens
    elif level == "sequence_geometric":
        seq = torch.exp((log_ratio * weights).sum(-1, keepdim=True) / num_tokens)
    else:
        raise ValueError(f"unknown ratio level {level!r}; valid: {', '.join(RATIO_LEVELS)}")
    return seq.expand_as(log_ratio)


def clipped_surrogate_from_ratio(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float | torch.Tensor,
    eps_high: float | torch.Tensor,
    dual_clip_c: float | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token clipped loss ``max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))``, dual-clipped for ``A < 0``.

    Args:
        ratio: ``[B, L]`` importance ratios (carry the gradient).
        advantages: ``[B, L]`` or ``[B]`` (no gradient).
        mask: ``[B, L]`` valid tokens; used for the metrics only (aggregate the loss with the same mask).
        eps_low, eps_high: scalar or ``[B, L]`` clip ranges.
        dual_clip_c: for ``A < 0`` the loss is capped at ``-A c`` (verl ``clip_ratio_c``; must be > 1);
            ``None`` disables dual clip.

    Returns:
        ``(per_token_loss [B, L], metrics)``; metrics are detached 0-dim tensors averaged over valid tokens:
        ``clip_frac`` (any clip active), ``clip_frac_low`` / ``clip_frac_high`` (ratio beyond the low / high bound
        with the clip active), ``dual_clip_frac``, ``ratio_mean``, ``ratio_max``, ``ratio_min``.
    """
    if dual_clip_c is not None and dual_clip_c <= 1.0:
        raise ValueError(f"dual_clip_c must be > 1 (or None to disable), got {dual_clip_c}")
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    advantages = advantages.detach().expand_as(ratio)
    check_finite("advantages", advantages)
    valid = as_mask(mask, ratio)
    # bounds in the ratio's dtype: float32 copies of 0.2 would move the clip edges of a float64 ratio
    low = 1.0 - torch.as_tensor(eps_low, dtype=ratio.dtype, device=ratio.device)
    high = 1.0 + torch.as_tensor(eps_high, dtype=ratio.dtype, device=ratio.device)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * torch.clamp(ratio, low, high)
    loss = torch.maximum(loss_unclipped, loss_clipped)
    dual_active = torch.zeros_like(valid)
    if dual_clip_c is not None:
        loss_dual = -advantages * dual_clip_c
        dual_active = (advantages < 0) & (loss > loss_dual)
        loss = torch.where(advantages < 0, torch.minimum(loss, loss_dual), loss)
    with torch.no_grad():
        clipped = loss_clipped > loss_unclipped
        r = ratio.detach()
        metrics = {
            "clip_frac": masked_mean(clipped.float(), valid),
            "clip_frac_low": masked_mean((clipped & (r < low)).float(), valid),
            "clip_frac_high": masked_mean((clipped & (r > high)).float(), valid),
            "dual_clip_frac": masked_mean(dual_active.float(), valid),
            "ratio_mean": masked_mean(r, valid),
            "ratio_max": r.masked_fill(~valid, float("-inf")).max() if bool(valid.any()) else r.new_ones(()),
            "ratio_min": r.masked_fill(~valid, float("inf")).min() if bool(valid.any()) else r.new_ones(()),
        }
    return loss, metrics


def clipped_surrogate(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    *,
    eps_low: float | torch.Tensor,
    eps_high: float | torch.Tensor,
    dual_clip_c: float | None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The token-level clipped surrogate from log-probs (spec 1.2, 2.6).

    Args:
        log_prob: ``[B, L]`` current policy log-probs of the sampled tokens (carry the gradient).
        old_log_prob: ``[B, L]`` behaviour (old) policy log-probs.
        advantages: ``[B, L]`` or ``[B]``.
        eps_low, eps_high: scalar or per-token ``[B, L]`` clip ranges.
        dual_clip_c: dual-clip constant (> 1) or ``None``.
        mask: ``[B, L]`` valid tokens (all valid when ``None``); metrics average over it.

    Returns:
        ``(per_token_loss [B, L], metrics)`` as :func:`clipped_surrogate_from_ratio`, plus ``approx_kl``
        (mean of ``old - new`` log-prob over valid tokens).
    """
    if mask is None:
        mask = torch.ones_like(log_prob, dtype=torch.bool)
    check_finite("old_log_prob", old_log_prob)
    if isinstance(eps_low, float):
        check_range("eps_low", eps_low, 0.0, 1.0)
    ratio = importance_ratio(log_prob, old_log_prob, mask)
    loss, metrics = clipped_surrogate_from_ratio(
        ratio, advantages, mask, eps_low=eps_low, eps_high=eps_high, dual_clip_c=dual_clip_c
    )
    metrics["approx_kl"] = masked_mean((old_log_prob - log_prob).detach(), mask.bool())
    return loss, metrics
