"""Scorers: the verifier as the trainer's step calls it, ``score(response token ids, answers) -> (rewards,
correct)``, over verifier worker processes (:func:`worker_scorer`) or in this process (:func:`inline_scorer`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from megatron_hapo.rewards import RewardWorkers
from megatron_hapo.rewards.custom import custom_reward, is_reference
from megatron_hapo.rewards.math_answer import math_reward

if TYPE_CHECKING:
    from megatron_hapo.config import Config

#: What a response whose user-named reward function failed (raised, timed out, returned a non-number) scores:
#: 0, not the built-in rules' -1 (a user's scale is unknown; 0 is "no reward"); the failure is counted either way.
CUSTOM_FAILURE: tuple[float, bool, dict[str, float]] = (0.0, False, {})

#: ``score(response token ids, answer) -> (reward, correct)`` per response.
Scorer = Callable[[Sequence[list[int]], Sequence[Any]], tuple[torch.Tensor, torch.Tensor]]


class WorkerScorer:
    """A :data:`Scorer` over a :class:`~megatron_hapo.rewards.RewardWorkers` whose function returns ``(reward,
    correct)``; a response whose verification timed out, crashed or raised scores ``failure`` and is counted
    (:meth:`take_tally`). ``decode`` (e.g. a tokenizer's ``batch_decode``) turns the token ids into the text the
    verifier reads."""

    def __init__(
        self,
        workers: RewardWorkers,
        failure: tuple = (-1.0, False),
        decode: Callable[[list[list[int]]], list[str]] | None = None,
    ) -> None:
        self.workers, self.failure, self.decode = workers, failure, decode
        self._tally: dict[str, int] = {}
        self._first_failure: str | None = None
        self._sub_scores: dict[str, list[float]] = {}

    def __call__(self, token_ids: Sequence[list[int]], answers: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        responses = self.decode(list(token_ids)) if self.decode is not None else token_ids
        calls = [(r, *a) if isinstance(a, tuple) else (r, a) for r, a in zip(responses, answers, strict=True)]
        outcomes = self.workers.map(calls)
        for outcome in outcomes:
            self._tally[outcome.status] = self._tally.get(outcome.status, 0) + 1
            if outcome.status != "ok" and self._first_failure is None:
                self._first_failure = f"{outcome.status}: {outcome.detail}"
        values = [o.value if o.status == "ok" else self.failure for o in outcomes]
        for value in values:  # a user's function may return named sub-scores: (reward, correct, {name: value})
            for name, sub in (value[2] if len(value) > 2 else {}).items():
                self._sub_scores.setdefault(name, []).append(sub)
        return torch.tensor([v[0] for v in values]), torch.tensor([v[1] for v in values])

    def take_tally(self) -> tuple[dict[str, int], str | None]:
        """``({status: count}, the first failure's text)`` since the last call."""
        tally, first = self._tally, self._first_failure
        self._tally, self._first_failure = {}, None
        return tally, first

    def take_sub_scores(self) -> dict[str, float]:
        """The mean of each named sub-score since the last call, as ``reward/<name>`` metrics."""
        means = {f"reward/{name}": sum(v) / len(v) for name, v in self._sub_scores.items()}
        self._sub_scores = {}
        return means


def worker_scorer(
    workers: RewardWorkers,
    failure: tuple = (-1.0, False),
    decode: Callable[[list[list[int]]], list[str]] | None = None,
) -> WorkerScorer:
    """A :class:`WorkerScorer`."""
    return WorkerScorer(workers, failure, decode)


def reward_failures(score: Scorer, limit: float) -> dict[str, float]:
    """This step's verifier failures as metrics (``reward_errors``, ``reward_timeouts``, ``reward_crashes``) when
    ``score`` counts them; raises when more than ``limit`` of the step's answers failed, with the first failure."""
    if not isinstance(score, WorkerScorer):
        return {}
    tally, first = score.take_tally()
    total = sum(tally.values())
    failed = total - tally.get("ok", 0)
    if total and failed / total > limit:
        raise RuntimeError(
            f"{failed} of {total} answers this step could not be verified ({failed / total:.0%} > "
            f"output.max_reward_failure_share={limit}); first: {first}. Fix the verifier (or data.math_verify), or "
            "raise output.max_reward_failure_share"
        )
    names = {"error": "reward_errors", "timeout": "reward_timeouts", "crash": "reward_crashes"}
    return {metric: float(tally.get(status, 0)) for status, metric in names.items()} | score.take_sub_scores()


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
    """A :func:`worker_scorer` for each answer rule in ``rules`` (``dapo_math`` / ``boxed_math`` or a user's
    ``module:function``, :mod:`megatron_hapo.rewards.custom`: the training data's and each evaluation set's), each
    over its own ``output.reward_workers`` verifier processes, all closed on exit."""
    with ExitStack() as stack:
        scorers: dict[str, Scorer] = {}
        for rule in dict.fromkeys(rules):
            custom = is_reference(rule)
            function = (
                partial(custom_reward, reference=rule)
                if custom
                else partial(math_reward, rule=rule, math_verify=config.data.math_verify)
            )
            failure = CUSTOM_FAILURE if custom else (-1.0, False)
            workers = RewardWorkers(
                function,
                workers=config.output.reward_workers,
                timeout_s=config.output.reward_timeout_s,
                failure_value=failure,
            )
            stack.callback(workers.close)
            scorers[rule] = worker_scorer(workers, failure, decode=decode)
        yield scorers


def scored_answers(examples: Sequence[Any], rule: str) -> list[Any]:
    """What the scorer of ``rule`` gets per prompt: the answer, or for a function of yours ``(answer, extra)``
    (the row's ``data.extra_keys`` / row adapter's fields; the built-in rules read the answer alone)."""
    return [(e.answer, e.extra) if is_reference(rule) else e.answer for e in examples]
