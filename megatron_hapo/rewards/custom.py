"""Users' reward functions, named by reference: ``"package.module:function"`` or ``"path/to/file.py:function"``.

A reward function is called in the verifier worker processes (:class:`~megatron_hapo.rewards.RewardWorkers`, with
their time and memory limits) as ``function(response, ground_truth, extra)``: the decoded response text, the row's
answer, and a dict of the row's other fields (``data.extra_keys``; empty without). It returns a number (the
reward; ``correct`` is then ``reward > 0``), or a mapping with ``score`` and optionally ``correct`` (a bool) and
other numeric entries (sub-scores, reported as ``reward/<name>`` step metrics). Anything else, an exception, a
timeout or a crash scores the failure value and is counted like a built-in verifier's failure.

Only the module the user names is imported (a file path is imported as a module of its own name); nothing in a
prompt file or a checkpoint is ever run.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

from megatron_hapo.plugins import PluginError, load_function

#: The rules built into :func:`~megatron_hapo.rewards.math_answer.math_reward`.
BUILT_IN_RULES = ("dapo_math", "boxed_math")


class RewardFunctionError(ValueError):
    """A reward function that cannot be loaded or returns what the trainer cannot use (one line, names it)."""


def is_reference(rule: str) -> bool:
    """Whether ``rule`` names a user's function (``module:function``) rather than a built-in rule."""
    return rule not in BUILT_IN_RULES


def load_reward_function(reference: str) -> Callable[..., Any]:
    """The function ``reference`` names (``module:function`` / ``file.py:function``), checked to take three
    positional arguments; :class:`RewardFunctionError` (one line) otherwise."""
    if ":" not in reference:
        raise RewardFunctionError(
            f"reward {reference!r}: name a built-in rule ({', '.join(BUILT_IN_RULES)}) or a function as "
            "'package.module:function' or 'path/to/file.py:function'"
        )
    try:
        function = load_function(reference, "reward")
    except PluginError as exc:
        raise RewardFunctionError(str(exc)) from None
    try:
        inspect.signature(function).bind("response", "answer", {})
    except TypeError as exc:
        raise RewardFunctionError(
            f"reward {reference!r}: must take (response, ground_truth, extra); {function.__name__}"
            f"{inspect.signature(function)} does not ({exc})"
        ) from None
    return function


def read_result(value: Any, reference: str) -> tuple[float, bool, dict[str, float]]:
    """``(reward, correct, sub-scores)`` from a reward function's return value; :class:`RewardFunctionError`
    for anything else (a non-number, a NaN, a mapping without ``score``)."""
    if isinstance(value, Mapping):
        if "score" not in value:
            raise RewardFunctionError(f"reward {reference!r} returned a mapping without 'score': {sorted(value)}")
        score = _number(value["score"], reference, "score")
        correct = value.get("correct", score > 0)
        if not isinstance(correct, bool):
            raise RewardFunctionError(f"reward {reference!r}: 'correct' must be a bool, got {correct!r}")
        extra = {str(k): _number(v, reference, str(k)) for k, v in value.items() if k not in ("score", "correct")}
        return score, correct, extra
    score = _number(value, reference, "the return value")
    return score, score > 0, {}


def _number(value: Any, reference: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RewardFunctionError(f"reward {reference!r}: {what} must be a finite number, got {value!r}")
    return float(value)


_LOADED: dict[str, Callable[..., Any]] = {}


def custom_reward(
    response: str, ground_truth: Any, extra: Mapping[str, Any] | None = None, *, reference: str
) -> tuple[float, bool, dict[str, float]]:
    """One response scored by the function ``reference`` names (loaded once per worker process): a worker
    function, ``(reward, correct, sub-scores)``."""
    function = _LOADED.get(reference)
    if function is None:
        function = _LOADED[reference] = load_reward_function(reference)
    return read_result(function(response, ground_truth, dict(extra or {})), reference)
