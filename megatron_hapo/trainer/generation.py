"""One step's generation: rounds of rollouts, scored and filtered (DAPO's dynamic sampling generates more rounds
until enough groups have mixed outcomes)."""

from __future__ import annotations

import dataclasses
import hashlib
import math
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
    of new prompts until the kept groups reach the step's number of prompts (extra ones are dropped, the first
    kept in the data order stay) or ``algo.group_filter.max_generation_rounds`` is spent (then the step trains on
    what it kept, see docs/ALGORITHMS.md). Each round is over-sampled by the expected keep rate
    (:func:`round_prompts`), the first by the recent steps' (``state.keep_rate``, updated here)."""
    algo, n, target = config.algo, config.rollout.num_samples_per_prompt, len(prompts)
    filtering = algo.group_filter.kind != "none"
    limit = algo.group_filter.max_generation_rounds
    out = Generated([], [], [], torch.zeros(0), torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.bool), 0)
    batch, batch_answers = list(prompts), list(answers)
    if filtering and more_prompts is not None:  # the first round over-sampled by the recent keep rate
        extra = round_prompts(target, state.keep_rate, algo.group_filter.oversample) - target
        if extra > 0:
            more, more_answers = more_prompts(extra)
            batch, batch_answers = batch + more, batch_answers + more_answers
    while True:
        sampling = SamplingSettings.for_training(
            algo.sampling,
            max_tokens=config.rollout.max_response_length,
            min_tokens=config.rollout.min_response_length,
            seed=rollout_seed(config.train.seed, state.step, out.rounds),
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
        rate = len(kept) / len(out.prompts)  # this step's so far
        batch, batch_answers = more_prompts(round_prompts(target - len(kept), rate, algo.group_filter.oversample))
    if filtering:
        rate = float(out.keep.view(-1, n)[:, 0].float().mean())
        state.keep_rate = (
            rate if state.keep_rate is None else KEEP_RATE_DECAY * state.keep_rate + (1 - KEEP_RATE_DECAY) * rate
        )
    per_group = out.keep.view(-1, n)  # a view: clearing rows clears out.keep
    per_group[kept[target:]] = False  # exactly the step's number of groups, as verl truncates
    return out


def rollout_seed(train_seed: int, step: int, round_index: int) -> int:
    """The base seed of one generation round (request ``i`` samples with ``base + i``): a 62-bit hash of
    ``(train.seed, step, round)``, so that no two rounds' request seeds overlap. (A base of ``seed + step`` made
    request ``i + 1`` of step ``k`` and request ``i`` of step ``k + 1`` draw the same random numbers; two rounds
    of 2^24 requests overlap with probability 2^-37 here.)"""
    digest = hashlib.blake2b(f"rollout/{train_seed}/{step}/{round_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


#: Weight of the previous steps in the keep rate's moving average.
KEEP_RATE_DECAY = 0.5


def round_prompts(needed: int, keep_rate: float | None, oversample: float) -> int:
    """Prompts a generation round asks for to keep ``needed`` groups: ``needed / keep_rate``, within ``[needed,
    oversample x needed]`` (``keep_rate`` ``None``, before any step: ``needed``)."""
    if keep_rate is None or needed <= 0:
        return max(needed, 0)
    wanted = needed / max(keep_rate, 1e-9)
    return int(min(max(math.ceil(wanted), needed), math.floor(oversample * needed)))
