"""Synthetic verifiable tasks on token ids, for CPU runs with tiny random models (no tokenizer needed)."""

from __future__ import annotations

import random
from collections.abc import Sequence


def first_token_parity(token_ids: Sequence[int], answer: int) -> tuple[float, bool]:
    """Correct when the first response token has the parity ``answer`` (0 or 1): +1 / -1, and the verdict.

    About half of a random model's responses are correct, so groups have mixed rewards from the first step.
    """
    correct = bool(token_ids) and token_ids[0] % 2 == int(answer)
    return (1.0 if correct else -1.0), correct


#: Token ids of the digits 0-9 and of the "+" and "=" signs in the modular-sum task (any vocabulary >= 32).
DIGIT_TOKENS = tuple(range(10, 20))
PLUS_TOKEN, EQUALS_TOKEN = 20, 21


def modular_sum_prompts(count: int, seed: int, max_addend: int = 9) -> tuple[list[list[int]], list[int]]:
    """``count`` prompts ``a + b =`` over the digit tokens and their answers, the digit token of ``(a + b) mod 10``
    (``a`` in 0-9, ``b`` in 0-``max_addend``).

    A random model answers with a digit about 2 % of the time on a 512-token vocabulary, so it needs a short
    supervised warm-up before RL has a signal (:mod:`megatron_hapo.trainer.warmup`).
    """
    gen = random.Random(seed)
    prompts, answers = [], []
    for _ in range(count):
        a, b = gen.randrange(10), gen.randrange(max_addend + 1)
        prompts.append([DIGIT_TOKENS[a], PLUS_TOKEN, DIGIT_TOKENS[b], EQUALS_TOKEN])
        answers.append(DIGIT_TOKENS[(a + b) % 10])
    return prompts, answers


def first_token_equals(token_ids: Sequence[int], answer: int) -> tuple[float, bool]:
    """Correct when the first response token is ``answer``: +1 / -1, and the verdict."""
    correct = bool(token_ids) and token_ids[0] == int(answer)
    return (1.0 if correct else -1.0), correct
