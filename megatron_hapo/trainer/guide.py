"""Mixed-policy DAPO in the trainer: zero-reward groups are routed to a frozen guide policy's own engine.

Our reading of the abstract (docs/ALGORITHMS.md, ambiguity M1): the prompts whose on-policy responses are all
wrong (the groups dynamic sampling drops) are answered again by the guide engine, ``n`` responses each. Those
responses are scored by the same verifier, shaped like on-policy ones, and get GRPO advantages within their
own group. They enter the update as extra sequences flagged ``guide_rows``: the loss applies the guide term
(ratio ``pi_theta / pi_phi``, the guide's log-probs from its engine) to them, weighted by
``algo.guide_policy.weight``. The guide's weights never change, so it is never synced.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from megatron_hapo.algos import grpo_advantages, shape_rewards, zero_reward_groups
from megatron_hapo.config import AlgoConfig, Config
from megatron_hapo.rollout.engine import RolloutEngine
from megatron_hapo.trainer.batch import StepBatch, per_token
from megatron_hapo.trainer.generation import Generated
from megatron_hapo.trainer.scoring import Scorer

#: Offset of the guide engine's request seeds from the policy's (so the two never draw the same stream).
GUIDE_SEED_OFFSET = 500_009


@dataclass
class GuideRollout:
    """The guide policy's responses to the routed prompts."""

    batch: StepBatch
    """``M = routed x n`` sequences flagged ``guide_rows``; ``old_log_prob`` holds the guide's log-probs
    ``pi_phi``, ``advantages`` the GRPO advantages within each routed group."""
    routed_prompts: torch.Tensor
    """``[routed]`` indices of the routed prompts in the step's prompt list."""
    correct: torch.Tensor
    """``[M]`` bool verifier outcome of each guide response."""


def check_guide_setup(algo: AlgoConfig, guide_engine: RolloutEngine | None) -> None:
    """Refuse a guide-policy algorithm without a guide engine (before a rollout is spent)."""
    if algo.guide_policy.kind != "none" and guide_engine is None:
        raise ValueError(
            f"algo.guide_policy.kind={algo.guide_policy.kind} needs a guide engine serving the frozen guide policy "
            "(algo.guide_policy.model_path); pass guide_engine= or set algo.guide_policy.kind=none"
        )


def guide_rollout(
    engine: RolloutEngine | None, score: Scorer, generated: Generated, *, config: Config
) -> GuideRollout | None:
    """Answer the zero-reward groups of this step's ``generated`` responses with the guide engine (``None``:
    nothing routed or no guide). The guide samples like the step's first round at its fixed temperature (no
    adaptive statistics), with its own seeds."""
    algo, n, sampling = config.algo, config.rollout.num_samples_per_prompt, generated.sampling
    prompts, answers, correct = generated.prompts, generated.answers, generated.correct.bool()
    if sampling is None:
        raise ValueError("the step generated no round")
    cfg = algo.guide_policy
    if cfg.kind == "none" or not cfg.route_zero_reward_groups or engine is None:
        return None
    group_ids = torch.arange(len(prompts)).repeat_interleave(n)
    routed = zero_reward_groups(correct, group_ids).view(-1, n)[:, 0].nonzero().flatten()
    if routed.numel() == 0:
        return None
    seed = None if sampling.seed is None else sampling.seed + GUIDE_SEED_OFFSET
    guide_sampling = dataclasses.replace(sampling, adaptive_tau=None, seed=seed)
    routed_prompts = [prompts[i] for i in routed.tolist()]
    engine.wake_up()  # an engine that can sleep does so between its rollouts (no-ops for one that cannot)
    responses = engine.generate(routed_prompts, n, guide_sampling, None)
    engine.sleep(level=1)  # nothing reloads the frozen guide's weights: they must come back on wake-up
    max_length = config.rollout.max_response_length
    batch = StepBatch.from_responses(routed_prompts, responses, max_response_length=max_length, guide=True)
    routed_answers = [answers[i] for i in routed.repeat_interleave(n).tolist()]
    rewards, guide_correct = score([r.token_ids for r in responses], routed_answers)
    shaped = shape_rewards(algo, rewards, batch.response_lengths, max_length=max_length)
    advantages = grpo_advantages(shaped, torch.arange(len(routed)).repeat_interleave(n))
    batch.advantages = per_token(advantages, batch.response_mask)
    return GuideRollout(batch, routed, guide_correct.bool())
