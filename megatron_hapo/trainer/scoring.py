"""Scorers: the verifier as the trainer's step calls it, ``score(response token ids, answers) -> (rewards,
correct)``, over verifier worker processes (:func:`worker_scorer`) or in this process (:func:`inline_scorer`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from megatron_hapo.rewards import RewardWorkers
from megatron_hapo.rewards.math_answer import math_reward

if TYPE_CHECKING:
    from megatron_hapo.config import Config

#: ``score(response token ids, answer) -> (reward, correct)`` per response.
Scorer = Callable[[Sequence[list[int]], Sequence[Any]], tuple[torch.Tensor, torch.Tensor]]


def worker_scorer(
    workers: RewardWorkers,
    failure: tuple[float, bool] = (-1.0, False),
    decode: Callable[[list[list[int]]], list[str]] | None = None,
) -> Scorer:
    """A :data:`Scorer` over a :class:`~megatron_hapo.rewards.RewardWorkers` whose function returns ``(reward,
    correct)``; a response whose verification timed out, crashed or raised scores ``failure`` (and is counted).
    ``decode`` (e.g. a tokenizer's ``batch_decode``) turns the token ids into the text the verifier reads."""

    def score(token_ids: Sequence[list[int]], answers: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        responses = decode(list(token_ids)) if decode is not None else token_ids
        outcomes = workers.map(list(zip(responses, answers, strict=True)))
        values = [o.value if o.status == "ok" else failure for o in outcomes]
        return torch.tensor([v[0] for v in values]), torch.tensor([v[1] for v in values])

    return score


def inline_scorer(verify: Callable[[list[int], Any], tuple[float, bool]]) -> Scorer:
    """A :data:`Scorer` that calls ``verify(response token ids, answer) -> (reward, correct)`` in this process
    (a cheap, trusted verifier such as a toy task's; real verifiers run in :class:`RewardWorkers`)."""

    def score(token_ids: Sequence[list[int]], answers: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        values = [verify(list(ids), answer) for ids, answer in zip(token_ids, answers, strict=True)]
        return torch.tensor([float(v[0]) for v in values]), torch.tensor([bool(v[1]) for v in values])

    return score


@contextmanager
def math_scorers(
    config: Config, rules: Iterable[str], decode: Callable[[list[list[int]]], list[str]]
) -> Iterator[dict[str, Scorer]]:
    """A :func:`worker_scorer` for each answer rule in ``rules`` (``dapo_math`` / ``boxed_math``: the training
    data's and each evaluation set's), each over its own ``output.reward_workers`` verifier processes, all closed
    on exit."""
    with ExitStack() as stack:
        scorers = {}
        for rule in dict.fromkeys(rules):
            workers = RewardWorkers(
                partial(math_reward, rule=rule, math_verify=config.data.math_verify),
                workers=config.output.reward_workers,
                timeout_s=config.output.reward_timeout_s,
                failure_value=(-1.0, False),
            )
            stack.callback(workers.close)
            scorers[rule] = worker_scorer(workers, decode=decode)
        yield scorers
