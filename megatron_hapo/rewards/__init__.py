"""Rewards: verifiers of model answers, run in worker processes with time and memory limits.

Nothing here imports torch: the worker processes stay small and start fast.
"""

from megatron_hapo.rewards.math_answer import MathScore, boxed_math_score, dapo_math_score, last_boxed, normalize_answer
from megatron_hapo.rewards.synthetic import first_token_equals, first_token_parity, modular_sum_prompts
from megatron_hapo.rewards.workers import Outcome, RewardWorkers

__all__ = [
    "MathScore",
    "Outcome",
    "RewardWorkers",
    "boxed_math_score",
    "dapo_math_score",
    "first_token_equals",
    "first_token_parity",
    "last_boxed",
    "modular_sum_prompts",
    "normalize_answer",
]
