"""The registered kinds of every component, as thin adapters over the algorithm functions.

Each adapter has one signature per component so that a composition only looks kinds up; no code tests an
algorithm's name. Adapters receive tensors plus the config fields their entry declares in ``uses``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_hapo.algos.advantages import GroupIds, grpo_advantages, hapo_advantages
from megatron_hapo.algos.aggregation import AGGREGATION_MODES, aggregate_loss
from megatron_hapo.algos.clipping import adaptive_clip_bounds, redistribute_advantages
from megatron_hapo.algos.dapo import filter_groups, overlong_penalty
from megatron_hapo.algos.entropy import EntropyStats
from megatron_hapo.algos.gtpo import GtpoNorm, grpo_s_advantages, gtpo_advantages, gtpo_token_rewards
from megatron_hapo.algos.mixed_policy import guide_policy_surrogate
from megatron_hapo.algos.registry import Registry
from megatron_hapo.algos.rollout_correction import truncated_importance_weights
from megatron_hapo.algos.sampling import adaptive_temperature
from megatron_hapo.algos.surrogate import RATIO_LEVELS, importance_ratio

ADVANTAGE = Registry("advantage")
REWARD_SHAPING = Registry("reward_shaping")
GROUP_FILTER = Registry("group_filter")
CLIP = Registry("clip")
REDISTRIBUTION = Registry("redistribution")
RATIO = Registry("ratio")
AGGREGATION = Registry("aggregation")
SAMPLING = Registry("sampling")
GUIDE_POLICY = Registry("guide_policy")
ROLLOUT_CORRECTION = Registry("rollout_correction")


@dataclass(frozen=True)
class AdvantageInputs:
    """What an advantage estimator may read.

    Attributes:
        rewards: ``[B]`` scalar rewards (correctness plus shaping).
        group_ids: ``[B]`` group (prompt) of each response.
        mask: ``[B, L]`` valid response tokens.
        correct: ``[B]`` bool correctness (GTPO / GRPO-S polarity); ``None`` when not needed.
        entropy: ``[B, L]`` old-policy token entropies (GTPO / GRPO-S); ``None`` when not needed.
    """

    rewards: torch.Tensor
    group_ids: GroupIds
    mask: torch.Tensor
    correct: torch.Tensor | None = None
    entropy: torch.Tensor | None = None

    def lengths(self) -> torch.Tensor:
        """``[B]`` valid-token counts."""
        return self.mask.long().sum(-1)


def _tokens(per_response: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Broadcast ``[B]`` to ``[B, L]`` and zero the masked positions."""
    return per_response.unsqueeze(-1) * mask.to(per_response.dtype)


def _require(inputs: AdvantageInputs, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    if inputs.entropy is None or inputs.correct is None:
        raise ValueError(f"advantage kind {kind!r} needs old-policy token entropies and correctness")
    return inputs.entropy, inputs.correct


@ADVANTAGE.register("grpo", uses=("std_norm", "eps"))
def _grpo(inputs: AdvantageInputs, *, std_norm: bool, eps: float) -> torch.Tensor:
    return _tokens(grpo_advantages(inputs.rewards, inputs.group_ids, std_norm=std_norm, eps=eps), inputs.mask)


@ADVANTAGE.register("hapo_token", uses=("std_norm", "eps", "fallback_threshold", "fallback_includes_padding"))
def _hapo_token(
    inputs: AdvantageInputs, *, std_norm: bool, eps: float, fallback_threshold: float, fallback_includes_padding: bool
) -> torch.Tensor:
    adv = hapo_advantages(
        inputs.rewards,
        inputs.lengths(),
        inputs.group_ids,
        padded_length=inputs.mask.shape[-1] if fallback_includes_padding else None,
        std_norm=std_norm,
        eps=eps,
        fallback_threshold=fallback_threshold,
    )
    return _tokens(adv, inputs.mask)


@ADVANTAGE.register("gtpo", uses=("eps", "reward_weight", "entropy_weight", "gtpo_norm"), needs_entropy=True)
def _gtpo(
    inputs: AdvantageInputs, *, eps: float, reward_weight: float, entropy_weight: float, gtpo_norm: GtpoNorm
) -> torch.Tensor:
    entropy, correct = _require(inputs, "gtpo")
    token_rewards = gtpo_token_rewards(
        inputs.rewards,
        correct,
        entropy,
        inputs.mask,
        inputs.group_ids,
        reward_weight=reward_weight,
        entropy_weight=entropy_weight,
        eps=eps,
    )
    return gtpo_advantages(token_rewards, correct, inputs.mask, inputs.group_ids, norm=gtpo_norm, eps=eps)


@ADVANTAGE.register("grpo_s", uses=("std_norm", "eps", "reward_weight", "entropy_weight"), needs_entropy=True)
def _grpo_s(
    inputs: AdvantageInputs, *, std_norm: bool, eps: float, reward_weight: float, entropy_weight: float
) -> torch.Tensor:
    entropy, correct = _require(inputs, "grpo_s")
    adv = grpo_s_advantages(
        inputs.rewards,
        correct,
        entropy,
        inputs.mask,
        inputs.group_ids,
        reward_weight=reward_weight,
        entropy_weight=entropy_weight,
        std_norm=std_norm,
        eps=eps,
    )
    return _tokens(adv, inputs.mask)


@REWARD_SHAPING.register("none")
def _no_shaping(rewards: torch.Tensor, lengths: torch.Tensor, *, max_length: int) -> torch.Tensor:
    return rewards


@REWARD_SHAPING.register("dapo_overlong", uses=("buffer_length", "penalty_factor"))
def _dapo_overlong(
    rewards: torch.Tensor, lengths: torch.Tensor, *, max_length: int, buffer_length: int, penalty_factor: float
) -> torch.Tensor:
    return rewards + overlong_penalty(
        lengths, max_length=max_length, buffer_length=buffer_length, penalty_factor=penalty_factor
    ).to(rewards.dtype)


@GROUP_FILTER.register("none")
def _keep_all(metric: torch.Tensor, group_ids: GroupIds) -> torch.Tensor:
    return torch.ones_like(metric, dtype=torch.bool)


@GROUP_FILTER.register(
    "all_equal",
    uses=("metric",),
    read_by={
        "max_generation_rounds": "megatron_hapo.trainer.generation",
        "oversample": "megatron_hapo.trainer.generation",
    },
)
def _drop_all_equal(metric: torch.Tensor, group_ids: GroupIds) -> torch.Tensor:
    return filter_groups(metric, group_ids)


@CLIP.register("fixed", uses=("eps_low", "eps_high"), read_by={"dual_clip_c": "megatron_hapo.algos.compose"})
def _fixed_clip(h_hat: torch.Tensor | None, *, eps_low: float, eps_high: float) -> tuple[float, float]:
    return eps_low, eps_high


@CLIP.register(
    "entropy_adaptive",
    uses=("eps_low", "eps_high", "alpha"),
    needs_entropy=True,
    read_by={"dual_clip_c": "megatron_hapo.algos.compose"},
)
def _adaptive_clip(
    h_hat: torch.Tensor, *, eps_low: float, eps_high: float, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return adaptive_clip_bounds(h_hat, eps_low=eps_low, eps_high=eps_high, alpha=alpha)


@REDISTRIBUTION.register("none")
def _no_redistribution(advantages, h_hat, ratio, eps_low_t, eps_high_t) -> torch.Tensor:  # noqa: ANN001
    return advantages


@REDISTRIBUTION.register("hapo", uses=("beta",), needs_entropy=True)
def _hapo_redistribution(advantages, h_hat, ratio, eps_low_t, eps_high_t, *, beta: float) -> torch.Tensor:  # noqa: ANN001
    return redistribute_advantages(advantages, h_hat, ratio, eps_low_t, eps_high_t, beta=beta)


for _level in RATIO_LEVELS:
    RATIO.register(_level, whole_sequences=_level != "token")(
        lambda log_prob, old_log_prob, mask, _level=_level: importance_ratio(log_prob, old_log_prob, mask, level=_level)
    )

for _mode in AGGREGATION_MODES:
    AGGREGATION.register(_mode, whole_sequences=_mode.startswith("seq-mean"))(
        lambda loss, mask, global_denominator=None, _mode=_mode: aggregate_loss(
            loss, mask, _mode, global_denominator=global_denominator
        )
    )


#: The rollout engines sample with top-p / top-k; the registered function is the temperature step alone.
_SAMPLER_KNOBS = {"top_p": "megatron_hapo.rollout.engine", "top_k": "megatron_hapo.rollout.engine"}


@SAMPLING.register("fixed", uses=("temperature",), read_by=_SAMPLER_KNOBS)
def _fixed_temperature(logits: torch.Tensor, stats: EntropyStats | None, *, temperature: float) -> torch.Tensor:
    return adaptive_temperature(logits, temperature, None, tau=0.0)


@SAMPLING.register("entropy_adaptive", uses=("temperature", "tau"), needs_entropy=True, read_by=_SAMPLER_KNOBS)
def _adaptive_temperature(
    logits: torch.Tensor, stats: EntropyStats | None, *, temperature: float, tau: float
) -> torch.Tensor:
    return adaptive_temperature(logits, temperature, stats, tau=tau)


@dataclass(frozen=True)
class GuideBatch:
    """Responses sampled from the frozen guide policy, scored by the current policy.

    Attributes:
        log_prob: ``[B, L]`` current-policy log-probs of the guide's tokens (carry the gradient).
        guide_log_prob: ``[B, L]`` the guide policy's log-probs of the same tokens.
        advantages: ``[B]`` or ``[B, L]`` group advantages of the guide's responses.
        mask: ``[B, L]`` valid tokens.
    """

    log_prob: torch.Tensor
    guide_log_prob: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor


@GUIDE_POLICY.register("none")
def _no_guide(batch: GuideBatch | None) -> None:
    return None


@GUIDE_POLICY.register(
    "mixed",
    uses=("eps_low", "eps_high", "dual_clip_c"),
    read_by={
        "weight": "megatron_hapo.parallel.policy_loss",
        "route_zero_reward_groups": "megatron_hapo.trainer.guide",
        "model_path": "megatron_hapo.trainer.preflight",
    },
)
def _mixed_guide(
    batch: GuideBatch | None, *, eps_low: float, eps_high: float, dual_clip_c: float | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
    if batch is None:
        return None
    return guide_policy_surrogate(
        batch.log_prob,
        batch.guide_log_prob,
        batch.advantages,
        batch.mask,
        eps_low=eps_low,
        eps_high=eps_high,
        dual_clip_c=dual_clip_c,
    )


@ROLLOUT_CORRECTION.register("none")
def _no_correction(old_log_prob: torch.Tensor, rollout_log_prob: torch.Tensor | None, mask: torch.Tensor) -> None:
    return None


@ROLLOUT_CORRECTION.register("tis", uses=("cap",))
def _truncated_importance_sampling(
    old_log_prob: torch.Tensor, rollout_log_prob: torch.Tensor | None, mask: torch.Tensor, *, cap: float
) -> torch.Tensor:
    if rollout_log_prob is None:
        raise ValueError("algo.rollout_correction.kind=tis needs the rollout engine's log-probs of the responses")
    return truncated_importance_weights(old_log_prob, rollout_log_prob, mask, cap=cap)
