"""HAPO's loss-time token shaping: asymmetric adaptive clipping (spec 2.5) and differential advantage
redistribution (spec 2.4). Both run under ``no_grad`` from the current micro-batch's ``h_hat``.
"""

from __future__ import annotations

import torch

from megatron_hapo.algos._checks import check_range


def adaptive_clip_bounds(
    h_hat: torch.Tensor, *, eps_low: float, eps_high: float, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clip ranges (published ``ada_clip``).

    ``eps_low_t = eps_low * (1 - alpha * h_hat)`` where ``h_hat <= 0`` (else ``eps_low``);
    ``eps_high_t = eps_high * (1 + alpha * h_hat)`` where ``h_hat > 0`` (else ``eps_high``).
    With the published sign (``h_hat >= 0``) only ``eps_high`` varies, over ``[eps_high, eps_high (1 + alpha)]``.

    Args:
        h_hat: ``[*]`` normalised entropies.

    Returns:
        ``(eps_low_t [*], eps_high_t [*])`` float32.
    """
    check_range("eps_low", eps_low, 0.0, 1.0)
    check_range("eps_high", eps_high, 0.0, None)
    check_range("alpha", alpha, 0.0, None)
    h_hat = h_hat.detach().float()
    low = torch.where(h_hat <= 0, eps_low * (1.0 - alpha * h_hat), torch.full_like(h_hat, eps_low))
    high = torch.where(h_hat > 0, eps_high * (1.0 + alpha * h_hat), torch.full_like(h_hat, eps_high))
    return low, high


def redistribute_advantages(
    advantages: torch.Tensor,
    h_hat: torch.Tensor,
    ratio: torch.Tensor,
    eps_low_t: torch.Tensor | float,
    eps_high_t: torch.Tensor | float,
    *,
    beta: float,
) -> torch.Tensor:
    """Differential advantage redistribution (published ``ada_advantage``).

    With ``A' = A (1 + beta h_hat)`` and the open neutral zone ``N = (1 - eps_low_t / 2, 1 + eps_high_t / 2)``:
    high-entropy tokens (``h_hat > 0``) take ``A'`` when their ratio has left ``N``; low-entropy tokens
    (``h_hat <= 0``) take ``A'`` while inside ``N``. Everything else keeps ``A``.

    Args:
        advantages: ``[B, L]`` or ``[B]`` (broadcast over tokens).
        h_hat: ``[B, L]`` normalised entropies.
        ratio: ``[B, L]`` current importance ratio (detached here).
        eps_low_t, eps_high_t: ``[B, L]`` or scalar clip ranges (after :func:`adaptive_clip_bounds`).
        beta: redistribution strength (1.0 in the HAPO recipes).

    Returns:
        ``[B, L]`` redistributed advantages (no gradient).
    """
    check_range("beta", beta, 0.0, None)
    with torch.no_grad():
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(-1)
        advantages = advantages.expand_as(h_hat)
        ratio = ratio.detach()
        scaled = advantages * (1.0 + beta * h_hat)
        low_edge = 1.0 - torch.as_tensor(eps_low_t, dtype=ratio.dtype, device=ratio.device) / 2
        high_edge = 1.0 + torch.as_tensor(eps_high_t, dtype=ratio.dtype, device=ratio.device) / 2
        inside = (ratio > low_edge) & (ratio < high_edge)
        high_side = torch.where(inside, advantages, scaled)
        low_side = torch.where(inside, scaled, advantages)
        return torch.where(h_hat > 0, high_side, low_side)
