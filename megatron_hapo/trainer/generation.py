"""One step's generation: rounds of rollouts, scored and filtered (DAPO's dynamic sampling generates more rounds
until enough groups have mixed outcomes)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from megatron_hapo.algos import keep_groups
from megatron_hapo.config import Config
from megatron_hapo.rollout.engine import Response, RolloutEngine, SamplingSettings
from megatron_hapo.trainer.metrics import PhaseClock
from megatron_hapo.trainer.scoring import Scorer

if TYPE_CHECKING:
    from megatron_hapo.trainer.step import StepState

#: Seed offset between generation rounds of one step (steps are 1 apart; requests add their index).
ROUND_SEED_OFFSET = 1_000_000_007
#: ``more_prompts(count) -> (prompts, answers)``: the next prompts of the data order, for extra generation rounds.
PromptSource = Callable[[int], tuple[list[list[int]], list[Any]]]


@dataclass
class Generated:
    """The responses of one step's generation rounds, scored and filtered."""

    prompts: list[list[int]]
    answers: list[Any]
    responses: list[Response]
    rewards: torch.Tensor
    correct: torch.Tensor
    keep: torch.Tensor
    """``[P * n]`` bool: the groups the filter keeps, at most the step's number of prompts."""
    rounds: int
    sampling: SamplingSettings | None = None
    """The first round's sampling settings (the guide policy samples like it)."""


def generate_rounds(
    engine: RolloutEngine,
    score: Scorer,
    *,
    prompts: Sequence[list[int]],
    answers: Sequence[Any],
    more_prompts: PromptSource | None,
    config: Config,
    state: StepState,
    clock: PhaseClock,
) -> Generated:
    """Generate, score and filter; with a group filter (DAPO dynamic sampling, spec 1.2) generate further rounds
    of as many new prompts until the kept groups reach the step's number of prompts (extra ones are dropped) or
    ``algo.group_filter.max_generation_rounds`` is spent (then the step trains on what it kept, see
    docs/ALGORITHMS.md)."""
    algo, n, target = config.algo, config.rollout.num_samples_per_prompt, len(prompts)
    filtering = algo.group_filter.kind != "none"
    limit = algo.group_filter.max_generation_rounds
    out = Generated([], [], [], torch.zeros(0), torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.bool), 0)
    batch, batch_answers = list(prompts), list(answers)
    while True:
        sampling = SamplingSettings.for_training(
            algo.sampling,
            max_tokens=config.rollout.max_response_length,
            seed=config.train.seed * 1_000_003 + state.step + out.rounds * ROUND_SEED_OFFSET,
        )
        out.sampling = out.sampling or sampling
        with clock("generate"):
            new = engine.generate(batch, n, sampling, state.stats)
        with clock("reward"):
            rewards, correct = score([r.token_ids for r in new], [batch_answers[r.prompt_index] for r in new])
        offset = len(out.prompts)
        out.responses += [dataclasses.replace(r, prompt_index=r.prompt_index + offset) for r in new]
        out.prompts, out.answers = out.prompts + batch, out.answers + batch_answers
        out.rewards, out.correct = torch.cat([out.rewards, rewards.float()]), torch.cat([out.correct, correct.bool()])
        out.rounds += 1
        group_ids = torch.arange(len(out.prompts)).repeat_interleave(n)
        out.keep = keep_groups(algo, out.correct.float(), group_ids)
        kept = out.keep.view(-1, n)[:, 0].nonzero().flatten()
        if more_prompts is None or not filtering or len(kept) >= target or (limit > 0 and out.rounds >= limit):
            break
        batch, batch_answers = more_prompts(target)
    per_group = out.keep.view(-1, n)  # a view: clearing rows clears out.keep
    per_group[kept[target:]] = False  # exactly the step's number of groups, as verl truncates
    return out
