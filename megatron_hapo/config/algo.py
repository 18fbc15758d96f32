"""Algorithm configuration: one dataclass per component, each selecting a registered kind.

An algorithm is a composition: the presets in ``configs/algo/`` only pick kinds and values. The defaults here are
the plain GRPO setting (fixed temperature, no shaping, no filter, GRPO advantages, symmetric clip 0.2, token
ratio, token-mean), so a preset states only what differs from plain GRPO.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(kw_only=True, slots=True)
class ComponentConfig:
    """A component section: its ``kind`` (a registered kind) and that kind's fields."""

    plugin_fields: dict[str, Any] = field(default_factory=dict)
    """Values of the fields a plugin kind declares (``register(fields=...)``), set as ``algo.<component>.<name>``
    like the fields below and shown and saved that way (filled in by the config loader)."""


@dataclass(kw_only=True, slots=True)
class SamplingConfig(ComponentConfig):
    """Rollout sampling of the training responses (spec 2.2)."""

    kind: str = "fixed"
    """``fixed`` (the plain temperature) or ``entropy_adaptive`` (HAPO: T_t = T (1 + tau h_hat) per decode step)."""
    temperature: float = 1.0
    """Base sampling temperature T (> 0)."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]; 1 disables top-p."""
    top_k: int = -1
    """Top-k cut-off; -1 disables top-k."""
    tau: float = 0.05
    """Adaptive-temperature strength in [0, 1): T_t lies in [T (1 - tau), T (1 + tau)]."""


@dataclass(kw_only=True, slots=True)
class EntropyConfig:
    """HAPO's entropy normaliser h_hat (spec 2.1), shared by sampling, clipping and redistribution."""

    pivot_quantile: float = 0.8
    """Quantile of log-entropy used as the pivot, in [0, 1] (0.8 in every HAPO recipe; ambiguity H2)."""
    sign: Literal["published", "paper"] = "published"
    """``published``: h_hat in [0, 1] as the released code computes it; ``paper``: h_hat in [-1, 1], negative
    for low-entropy tokens, as the paper describes (ambiguity H1)."""
    scope: Literal["microbatch", "minibatch", "step"] = "microbatch"
    """Tokens the loss-time statistics are computed over: ``microbatch`` (published code, ambiguity H3),
    ``minibatch`` or ``step`` (computed across data-parallel ranks)."""


@dataclass(kw_only=True, slots=True)
class RewardShapingConfig(ComponentConfig):
    """Shaping added to the correctness reward (spec 1.2)."""

    kind: str = "none"
    """``none`` or ``dapo_overlong`` (DAPO soft overlong punishment)."""
    buffer_length: int = 4096
    """Soft-punishment zone L_cache before ``rollout.max_response_length`` (tokens, > 0)."""
    penalty_factor: float = 1.0
    """Penalty at the maximum length (>= 0); the penalty grows linearly over the buffer up to this value."""


@dataclass(kw_only=True, slots=True)
class GroupFilterConfig(ComponentConfig):
    """Dynamic sampling: which groups enter the training batch (spec 1.2)."""

    kind: str = "none"
    """``none`` (keep every group) or ``all_equal`` (drop groups whose metric is identical across responses)."""
    metric: Literal["acc"] = "acc"
    """Per-response metric the filter compares: ``acc`` (correctness, not the length-shaped score)."""
    max_generation_rounds: int = 10
    """Generation rounds allowed to fill the batch with kept groups; <= 0 means unlimited."""
    oversample: float = 3.0
    """The most prompts a round asks for, as a multiple of the groups it still needs (>= 1; 1: rounds of exactly
    the missing groups, as before). Each round asks for ``needed / keep rate`` prompts, the keep rate being the
    recent steps' (the round's own in later rounds), within ``[needed, oversample x needed]``: with DAPO's filter
    most steps then need one round. verl's DAPO recipe generates 3x the training batch per round."""


@dataclass(kw_only=True, slots=True)
class AdvantageConfig(ComponentConfig):
    """Advantage estimator (spec 1.1, 2.3, 3.2, 3.3)."""

    kind: str = "grpo"
    """``grpo``, ``hapo_token`` (token-level group average), ``gtpo`` (entropy-shaped token rewards) or
    ``grpo_s`` (entropy-shaped sequence rewards)."""
    std_norm: bool = True
    """Divide by the group standard deviation (False: Dr.GRPO-style centring only)."""
    eps: float = 1e-6
    """Added to standard deviations and entropy denominators (> 0)."""
    fallback_threshold: float = 5.0
    """``hapo_token``: a group with any |A| >= this falls back to GRPO advantages (> 0)."""
    fallback_includes_padding: bool = True
    """``hapo_token``: the fallback test also covers padding positions, as the published code does (H5)."""
    reward_weight: float = 1.0
    """``gtpo`` / ``grpo_s``: weight of the outcome reward (alpha_1 / beta_1)."""
    entropy_weight: float = 0.1
    """``gtpo`` / ``grpo_s``: weight of the entropy bonus (alpha_2 / beta_2), >= 0."""
    gtpo_norm: Literal["joint", "per_polarity"] = "joint"
    """``gtpo``: z-score all active tokens of a group together, or each polarity apart (ambiguity G1)."""


@dataclass(kw_only=True, slots=True)
class ClipConfig(ComponentConfig):
    """Importance-ratio clipping (spec 1.2, 2.5)."""

    kind: str = "fixed"
    """``fixed`` (ratio in [1 - eps_low, 1 + eps_high]) or ``entropy_adaptive`` (HAPO per-token bounds)."""
    eps_low: float = 0.2
    """Lower clip range, in (0, 1)."""
    eps_high: float = 0.2
    """Upper clip range (> 0); 0.28 is DAPO's Clip-Higher."""
    alpha: float = 1.0
    """``entropy_adaptive``: how far h_hat widens the bounds (>= 0)."""
    dual_clip_c: float | None = None
    """Dual-clip constant (> 1) capping the loss of negative-advantage tokens at -A c; null disables it."""


@dataclass(kw_only=True, slots=True)
class RedistributionConfig(ComponentConfig):
    """Differential advantage redistribution (spec 2.4)."""

    kind: str = "none"
    """``none`` or ``hapo`` (scale advantages by 1 + beta h_hat depending on the ratio's neutral zone)."""
    beta: float = 1.0
    """``hapo``: redistribution strength (>= 0)."""


@dataclass(kw_only=True, slots=True)
class RatioConfig(ComponentConfig):
    """Level of the importance ratio (spec 3.3, ambiguity G3)."""

    kind: str = "token"
    """``token``, ``sequence_mean`` (mean of token ratios, GRPO-S) or ``sequence_geometric`` (GSPO-style)."""


@dataclass(kw_only=True, slots=True)
class AggregationConfig(ComponentConfig):
    """How per-token losses become one loss (exact across ranks and micro-batches)."""

    kind: str = "token-mean"
    """``token-mean``, ``seq-mean-token-mean``, ``seq-mean-token-sum`` or ``token-sum``."""


@dataclass(kw_only=True, slots=True)
class GuidePolicyConfig(ComponentConfig):
    """Mixed-policy DAPO: a frozen guide policy (spec 4; a reading of an abstract, ambiguity M1)."""

    kind: str = "none"
    """``none`` or ``mixed`` (guide samples with ratio pi_theta / pi_phi, added to the loss)."""
    model_path: str | None = None
    """``mixed``: the guide policy's checkpoint (HF directory); the trainer refuses to start ``mixed`` without it."""
    weight: float = 1.0
    """``mixed``: weight of the guide-policy loss term (>= 0)."""
    route_zero_reward_groups: bool = True
    """``mixed``: send prompts whose responses are all wrong to the guide policy."""
    eps_low: float = 0.2
    """``mixed``: lower clip range of the guide term, in (0, 1)."""
    eps_high: float = 0.28
    """``mixed``: upper clip range of the guide term (> 0)."""
    dual_clip_c: float | None = None
    """``mixed``: dual-clip constant of the guide term (> 1), or null."""


@dataclass(kw_only=True, slots=True)
class RolloutCorrectionConfig(ComponentConfig):
    """Correction for the rollout engine's log-probs differing from the trainer's (docs/ROLLOUT.md)."""

    kind: str = "none"
    """``none`` (published HAPO / DAPO) or ``tis``: weight each token's loss by min(pi_old / pi_rollout, cap)."""
    cap: float = 2.0
    """``tis``: truncation C (>= 1)."""


@dataclass(kw_only=True, slots=True)
class AlgoConfig:
    """An RL algorithm as a composition of component kinds."""

    plugins: list[str] = field(default_factory=list)
    """Your modules (dotted names or ``.py`` paths) that register kinds (``@ADVANTAGE.register(...)``), imported
    before the config is checked, in every rank (docs/EXTENDING.md)."""

    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Rollout sampling (fixed or entropy-adaptive temperature)."""
    entropy: EntropyConfig = field(default_factory=EntropyConfig)
    """Entropy normaliser settings shared by every h_hat consumer."""
    reward_shaping: RewardShapingConfig = field(default_factory=RewardShapingConfig)
    """Reward shaping added to correctness."""
    group_filter: GroupFilterConfig = field(default_factory=GroupFilterConfig)
    """Dynamic-sampling group filter."""
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    """Advantage estimator."""
    clip: ClipConfig = field(default_factory=ClipConfig)
    """Ratio clipping."""
    redistribution: RedistributionConfig = field(default_factory=RedistributionConfig)
    """Advantage redistribution."""
    ratio: RatioConfig = field(default_factory=RatioConfig)
    """Importance-ratio level."""
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    """Loss aggregation."""
    guide_policy: GuidePolicyConfig = field(default_factory=GuidePolicyConfig)
    """Frozen guide policy (mixed-policy DAPO)."""
    rollout_correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)
    """Rollout-vs-trainer log-prob mismatch correction (off in the published recipes)."""
