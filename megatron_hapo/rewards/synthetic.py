"""Synthetic verifiable tasks on token ids, for CPU runs with tiny random models (no tokenizer needed)."""

from __future__ import annotations

from collections.abc import Sequence


def first_token_parity(token_ids: Sequence[int], answer: int) -> tuple[float, bool]:
    """Correct when the first response token has the parity ``answer`` (0 or 1): +1 / -1, and the verdict.

    About half of a random model's responses are correct, so groups have mixed rewards from the first step.
    """
    correct = bool(token_ids) and token_ids[0] % 2 == int(answer)
    return (1.0 if correct else -1.0), correct
