"""Token-level RL math: pure torch on local tensors (no torch.distributed, no megatron).

Every function takes explicit scalars and documents its tensor shapes. The public names below are the API that
``parallel/``, ``rollout/`` and ``trainer/`` build on; see docs/ALGORITHMS.md for the algorithms as
compositions of these components and every departure from the papers or the published code.
"""

from megatron_hapo.algos.advantages import grpo_advantages, hapo_advantages
from megatron_hapo.algos.aggregation import AGGREGATION_MODES, AggregationMode, aggregate_loss, aggregation_terms
from megatron_hapo.algos.clipping import adaptive_clip_bounds, redistribute_advantages
from megatron_hapo.algos.components import (
    ADVANTAGE,
    AGGREGATION,
    CLIP,
    GROUP_FILTER,
    GUIDE_POLICY,
    RATIO,
    REDISTRIBUTION,
    REWARD_SHAPING,
    ROLLOUT_CORRECTION,
    SAMPLING,
    AdvantageInputs,
    GuideBatch,
)
from megatron_hapo.algos.compose import (
    compute_advantages,
    keep_groups,
    needs_entropy,
    policy_loss,
    reads_old_log_prob_before_loss,
    reads_rollout_entropy,
    shape_rewards,
    token_policy_loss,
)
from megatron_hapo.algos.dapo import filter_groups, overlong_penalty
from megatron_hapo.algos.entropy import (
    ENTROPY_SIGNS,
    EntropyStats,
    apply_entropy_stats,
    entropy_from_logits,
    nearest_rank_index,
    nearest_rank_quantile,
    normalized_entropy,
)
from megatron_hapo.algos.gtpo import (
    GTPO_NORMS,
    grpo_s_advantages,
    grpo_s_sequence_rewards,
    gtpo_advantages,
    gtpo_token_rewards,
)
from megatron_hapo.algos.mixed_policy import guide_policy_surrogate, mix_losses, zero_reward_groups
from megatron_hapo.algos.registry import PluginField, Registry
from megatron_hapo.algos.rollout_correction import rollout_mismatch_metrics, truncated_importance_weights
from megatron_hapo.algos.sampling import adaptive_temperature
from megatron_hapo.algos.surrogate import (
    RATIO_LEVELS,
    clipped_surrogate,
    clipped_surrogate_from_ratio,
    importance_ratio,
    masked_mean,
)

#: Every component registry, by the config section that selects its kind.
REGISTRIES = {
    "sampling": SAMPLING,
    "reward_shaping": REWARD_SHAPING,
    "group_filter": GROUP_FILTER,
    "advantage": ADVANTAGE,
    "clip": CLIP,
    "redistribution": REDISTRIBUTION,
    "ratio": RATIO,
    "aggregation": AGGREGATION,
    "guide_policy": GUIDE_POLICY,
    "rollout_correction": ROLLOUT_CORRECTION,
}

__all__ = [
    "ADVANTAGE",
    "AGGREGATION",
    "AGGREGATION_MODES",
    "CLIP",
    "ENTROPY_SIGNS",
    "GROUP_FILTER",
    "GTPO_NORMS",
    "GUIDE_POLICY",
    "RATIO",
    "RATIO_LEVELS",
    "REDISTRIBUTION",
    "REGISTRIES",
    "REWARD_SHAPING",
    "ROLLOUT_CORRECTION",
    "SAMPLING",
    "AdvantageInputs",
    "AggregationMode",
    "EntropyStats",
    "GuideBatch",
    "PluginField",
    "Registry",
    "adaptive_clip_bounds",
    "adaptive_temperature",
    "aggregate_loss",
    "aggregation_terms",
    "apply_entropy_stats",
    "clipped_surrogate",
    "clipped_surrogate_from_ratio",
    "compute_advantages",
    "entropy_from_logits",
    "filter_groups",
    "grpo_advantages",
    "grpo_s_advantages",
    "grpo_s_sequence_rewards",
    "gtpo_advantages",
    "gtpo_token_rewards",
    "guide_policy_surrogate",
    "hapo_advantages",
    "importance_ratio",
    "keep_groups",
    "masked_mean",
    "mix_losses",
    "nearest_rank_index",
    "nearest_rank_quantile",
    "needs_entropy",
    "normalized_entropy",
    "overlong_penalty",
    "policy_loss",
    "reads_old_log_prob_before_loss",
    "reads_rollout_entropy",
    "redistribute_advantages",
    "rollout_mismatch_metrics",
    "shape_rewards",
    "token_policy_loss",
    "truncated_importance_weights",
    "zero_reward_groups",
]
