"""Compose the configured kinds into the per-step computations (spec 2.6 order).

``algo`` is any object shaped like :class:`megatron_hapo.config.AlgoConfig` (this layer does not import the
config package); each component is looked up in its registry and receives only the fields it declares.

Per micro-batch, the loss runs: entropy -> ``h_hat`` (when a kind needs it) -> clip bounds -> ratio ->
redistributed advantages -> clipped surrogate -> aggregation (+ the guide-policy term when configured).
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_hapo.algos.components import (
    ADVANTAGE,
    AGGREGATION,
    CLIP,
    GROUP_FILTER,
    GUIDE_POLICY,
    RATIO,
    REDISTRIBUTION,
    REWARD_SHAPING,
    SAMPLING,
    AdvantageInputs,
    GuideBatch,
)
from megatron_hapo.algos.entropy import normalized_entropy
from megatron_hapo.algos.mixed_policy import mix_losses
from megatron_hapo.algos.surrogate import clipped_surrogate_from_ratio, masked_mean


def shape_rewards(algo: Any, rewards: torch.Tensor, lengths: torch.Tensor, *, max_length: int) -> torch.Tensor:
    """Apply the configured reward shaping. ``rewards``, ``lengths``: ``[B]``; returns ``[B]``."""
    cfg = algo.reward_shaping
    fn = REWARD_SHAPING.get(cfg.kind).fn
    return fn(rewards, lengths, max_length=max_length, **REWARD_SHAPING.params(cfg.kind, cfg))


def keep_groups(algo: Any, metric: torch.Tensor, group_ids: Any) -> torch.Tensor:
    """``[B]`` bool: responses of the groups the configured filter keeps (``metric``: ``[B]`` accuracy)."""
    cfg = algo.group_filter
    fields = {k: v for k, v in GROUP_FILTER.params(cfg.kind, cfg).items() if k != "metric"}  # metric: the tensor
    return GROUP_FILTER.get(cfg.kind).fn(metric, group_ids, **fields)


def compute_advantages(algo: Any, inputs: AdvantageInputs) -> torch.Tensor:
    """``[B, L]`` token advantages of the configured estimator (0 at masked positions)."""
    cfg = algo.advantage
    return ADVANTAGE.get(cfg.kind).fn(inputs, **ADVANTAGE.params(cfg.kind, cfg))


def needs_entropy(algo: Any) -> bool:
    """Whether the loss needs the current forward's token entropies (an ``h_hat`` consumer is configured)."""
    return CLIP.get(algo.clip.kind).needs_entropy or REDISTRIBUTION.get(algo.redistribution.kind).needs_entropy


def reads_rollout_entropy(algo: Any) -> bool:
    """Whether anything reads the entropy statistics of the whole rollout (every generated response, the groups
    the filter drops included): the next rollout's adaptive temperature, or the loss at ``entropy.scope=step``.
    Without a reader the forward-only pass needs only the trained sequences (verl's order: filter, then old
    log-probs)."""
    adaptive = SAMPLING.get(algo.sampling.kind).needs_entropy
    return adaptive or (needs_entropy(algo) and algo.entropy.scope == "step")


def reads_old_log_prob_before_loss(algo: Any) -> bool:
    """Whether anything reads the old log-probs or token entropies of the forward-only pass before the loss:
    the advantages (GTPO's and GRPO-S's entropy shaping), the entropy statistics (the next rollout's adaptive
    temperature, an ``h_hat`` consumer at ``step`` / ``minibatch`` scope), the rollout correction's weights and the
    mixed-policy guide's rows. Without any, and with one on-policy optimizer step, the old policy is the update's
    own forward: the pass is a no-op (:func:`~megatron_hapo.trainer.step.rl_step`)."""
    before_loss = {  # the components that run between the rollout and the loss
        "sampling": SAMPLING,
        "reward_shaping": REWARD_SHAPING,
        "group_filter": GROUP_FILTER,
        "advantage": ADVANTAGE,
    }
    if any(registry.get(getattr(algo, section).kind).needs_entropy for section, registry in before_loss.items()):
        return True
    if needs_entropy(algo) and algo.entropy.scope != "microbatch":
        return True
    return algo.rollout_correction.kind != "none" or algo.guide_policy.kind != "none"


def token_policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    algo: Any,
    entropy: torch.Tensor | None = None,
    h_hat: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
    record: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token policy loss of the configured composition.

    Args:
        log_prob: ``[B, L]`` current log-probs (carry the gradient).
        old_log_prob: ``[B, L]`` behaviour-policy log-probs.
        advantages: ``[B, L]`` or ``[B]``.
        mask: ``[B, L]`` valid tokens.
        algo: the algorithm config.
        entropy: ``[B, L]`` current-forward token entropies; normalised over this call's valid tokens
            (micro-batch scope, as the published code) when ``h_hat`` is not given.
        h_hat: ``[B, L]`` precomputed normalised entropies (a distributed caller passes minibatch / step scope).
        token_weights: ``[B, L]`` per-token loss multipliers without gradient (the rollout correction's TIS
            weights, :func:`~megatron_hapo.algos.rollout_correction.truncated_importance_weights`).
        record: filled, when given, with the per-token values the loss used, ``[B, L]`` float32 each, without
            gradient: ``ratio``, ``advantage`` (after redistribution), ``eps_low``, ``eps_high`` and, where an
            ``h_hat`` consumer is configured, ``h_hat`` (rollout dumps, :mod:`megatron_hapo.trainer.rollout_dump`).

    Returns:
        ``(per_token_loss [B, L], metrics)``.
    """
    metrics: dict[str, torch.Tensor] = {}
    if needs_entropy(algo) and h_hat is None:
        if entropy is None:
            raise ValueError("the configured clip / redistribution kinds need token entropies; pass entropy=")
        h_hat, _ = normalized_entropy(
            entropy.detach(), mask, pivot_quantile=algo.entropy.pivot_quantile, sign=algo.entropy.sign
        )
    if h_hat is not None:
        metrics["h_hat_mean"] = masked_mean(h_hat.detach(), mask.bool())
    clip_cfg, red_cfg = algo.clip, algo.redistribution
    eps_low, eps_high = CLIP.get(clip_cfg.kind).fn(h_hat, **CLIP.params(clip_cfg.kind, clip_cfg))
    ratio = RATIO.get(algo.ratio.kind).fn(log_prob, old_log_prob, mask)
    advantages = REDISTRIBUTION.get(red_cfg.kind).fn(
        advantages, h_hat, ratio, eps_low, eps_high, **REDISTRIBUTION.params(red_cfg.kind, red_cfg)
    )
    loss, surrogate_metrics = clipped_surrogate_from_ratio(
        ratio, advantages, mask, eps_low=eps_low, eps_high=eps_high, dual_clip_c=clip_cfg.dual_clip_c
    )
    metrics.update(surrogate_metrics)
    if record is not None:
        used = {"ratio": ratio, "advantage": advantages, "eps_low": eps_low, "eps_high": eps_high, "h_hat": h_hat}
        record.update({name: _per_token(value, mask) for name, value in used.items() if value is not None})
    if token_weights is not None:
        loss = loss * token_weights.detach()
        metrics["tis_weight_mean"] = masked_mean(token_weights.detach(), mask.bool())
    metrics["approx_kl"] = masked_mean((old_log_prob - log_prob).detach(), mask.bool())
    if isinstance(eps_high, torch.Tensor):
        metrics["eps_high_mean"] = masked_mean(eps_high, mask.bool())
        metrics["eps_low_mean"] = masked_mean(eps_low, mask.bool())
    return loss, metrics


def _per_token(value: torch.Tensor | float, mask: torch.Tensor) -> torch.Tensor:
    """A float, ``[B]`` per-sequence or ``[B, L]`` value -> ``[B, L]`` float32 without gradient."""
    if not isinstance(value, torch.Tensor):  # no host-to-device copy of a scalar
        return torch.full(mask.shape, float(value), dtype=torch.float32, device=mask.device)
    value = value.detach().float()
    if value.dim() == 1:
        value = value[:, None]
    return value.expand(mask.shape).clone()


def policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    algo: Any,
    entropy: torch.Tensor | None = None,
    h_hat: torch.Tensor | None = None,
    global_denominator: float | torch.Tensor | None = None,
    guide_batch: GuideBatch | None = None,
    guide_global_denominator: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Scalar policy loss: :func:`token_policy_loss`, aggregated, plus the weighted guide-policy term.

    ``global_denominator`` makes the aggregation exact across ranks and micro-batches (see
    :mod:`megatron_hapo.algos.aggregation`); ``None`` aggregates over this call alone.

    Returns:
        ``(loss 0-dim, metrics)``.
    """
    per_token, metrics = token_policy_loss(
        log_prob, old_log_prob, advantages, mask, algo=algo, entropy=entropy, h_hat=h_hat
    )
    aggregate = AGGREGATION.get(algo.aggregation.kind).fn
    loss = aggregate(per_token, mask, global_denominator)
    guide_cfg = algo.guide_policy
    guide = GUIDE_POLICY.get(guide_cfg.kind).fn(guide_batch, **GUIDE_POLICY.params(guide_cfg.kind, guide_cfg))
    guide_loss = None
    if guide is not None and guide_batch is not None:
        guide_per_token, guide_metrics = guide
        guide_loss = aggregate(guide_per_token, guide_batch.mask, guide_global_denominator)
        metrics.update(guide_metrics)
        metrics["guide_loss"] = guide_loss.detach()
    loss = mix_losses(loss, guide_loss, weight=getattr(guide_cfg, "weight", 0.0))
    metrics["loss"] = loss.detach()
    return loss, metrics
