"""Prompt datasets: the DAPO-Math-17k parquet layout and jsonl, chat templates, the prompt-length limit.

A row holds a prompt (a chat: a list of ``{"role", "content"}`` messages, or a plain string taken as one user
message) and a ground-truth answer, found by dotted keys (DAPO-Math-17k: ``prompt`` and
``reward_model.ground_truth``). A malformed row is an error that names the file and the row, or, with
``bad_rows="skip"``, is skipped and counted. Prompts longer than the limit after the chat template are dropped
and counted, never truncated.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class DataError(ValueError):
    """A prompt file or row that cannot be used; the message names the file and the row."""


@dataclass(frozen=True)
class PromptExample:
    """One prompt and its answer."""

    messages: tuple[tuple[str, str], ...]
    """The chat as ``(role, content)`` pairs."""
    answer: str
    """Ground truth for the verifier."""
    row: int
    """Its line in a jsonl file (from 1) or its row in a parquet file (from 0)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """The row's other fields for a reward function of yours (``data.extra_keys``, or a row adapter's)."""


@dataclass
class PromptSet:
    """The usable rows of a file, and what was left out."""

    examples: list[PromptExample]
    skipped: list[tuple[int, str]] = field(default_factory=list)
    """``(line or row, reason)`` of each malformed row skipped (``bad_rows="skip"``)."""


def _rows(path: Path) -> list[tuple[int, Any]]:
    """``(row number, row)``: jsonl rows are numbered by line (1-based), parquet rows from 0."""
    if path.suffix == ".jsonl":
        rows: list[tuple[int, Any]] = []
        for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
            if raw.strip():
                rows.append((number, _json_row(raw)))
        return rows
    if path.suffix == ".parquet":
        import pyarrow as pa  # noqa: PLC0415  (only for parquet files)
        import pyarrow.parquet as pq  # noqa: PLC0415

        try:
            return list(enumerate(pq.read_table(path).to_pylist()))
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{path}: not a readable parquet file ({type(exc).__name__}: {exc})") from None
    raise DataError(f"{path}: unsupported prompt file type {path.suffix!r}; use .parquet or .jsonl")


def _json_row(raw: bytes) -> Any:
    """One jsonl line as JSON, or the :class:`DataError` saying why not (a row that ``bad_rows=skip`` skips)."""
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return DataError(f"not UTF-8 (byte {exc.start}: {exc.reason})")
    except json.JSONDecodeError as exc:
        return DataError(f"invalid JSON ({exc.msg})")
    except RecursionError:
        return DataError("JSON nested too deeply")


def _lookup(row: Any, dotted: str) -> Any:
    value = row
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            raise DataError(f"missing key {dotted!r}")
        value = value[key]
    return value


def _messages(prompt: Any) -> tuple[tuple[str, str], ...]:
    if isinstance(prompt, str):
        return (("user", prompt),)
    if isinstance(prompt, Sequence) and prompt and all(isinstance(m, dict) for m in prompt):
        try:
            return tuple((str(m["role"]), str(m["content"])) for m in prompt)
        except KeyError as exc:
            raise DataError(f"a chat message lacks {exc}") from None
    raise DataError(f"the prompt must be a string or a non-empty list of chat messages, got {type(prompt).__name__}")


#: Column names of common benchmark files, tried in order when the configured key is absent from a file's first
#: row: DAPO / verl (``prompt``, ``reward_model.ground_truth``), AIME / MATH-500 (``problem``, ``answer``),
#: OpenCompass AIME 2025 (``question``), OlympiadBench (``final_answer``).
PROMPT_KEYS = ("prompt", "problem", "question")
ANSWER_KEYS = ("reward_model.ground_truth", "answer", "final_answer", "solution")

#: Prompt templates by name; ``{problem}`` is where the prompt goes. ``dapo``: the instruction of DAPO-Math-17k's
#: prompts (answer on a last ``Answer:`` line, the ``dapo_math`` rule); ``boxed``: Qwen2.5-Math's chain-of-thought
#: instruction (answer in ``\boxed{}``, the ``boxed_math`` rule).
TEMPLATES = {
    "none": "{problem}",
    "dapo": (
        "Solve the following math problem step by step. The last line of your response should be of the form "
        "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{problem}\n\n"
        'Remember to put your answer on its own line after "Answer:".'
    ),
    "boxed": "{problem}\nPlease reason step by step, and put your final answer within \\boxed{}.",
}
#: The answer rule each named template asks for.
TEMPLATE_REWARDS = {"dapo": "dapo_math", "boxed": "boxed_math"}


def apply_template(examples: Sequence[PromptExample], template: str) -> list[PromptExample]:
    """``examples`` with the last user message put into ``template`` (a name of :data:`TEMPLATES` or a text
    holding ``{problem}``; ``none`` leaves them as they are)."""
    text = TEMPLATES.get(template, template)
    if text == "{problem}":
        return list(examples)
    out = []
    for example in examples:
        messages = list(example.messages)
        last = max((i for i, (role, _) in enumerate(messages) if role == "user"), default=len(messages) - 1)
        messages[last] = (messages[last][0], text.replace("{problem}", messages[last][1]))
        out.append(PromptExample(tuple(messages), example.answer, example.row))
    return out


def _answer_text(answer: Any, key: str) -> str:
    """A ground truth as text: a number as written (an integral float as an integer: AMC's ``27.0``), a list of
    one value as that value (OlympiadBench's ``final_answer``)."""
    if isinstance(answer, list) and len(answer) == 1:
        answer = answer[0]
    if isinstance(answer, list | dict) or answer is None:
        raise DataError(f"{key!r} must be a string or number, got {type(answer).__name__}")
    if isinstance(answer, float) and answer.is_integer():
        return str(int(answer))
    return str(answer)


def detect_keys(path: str | Path, prompt_key: str, answer_key: str) -> tuple[str, str]:
    """The prompt and answer keys of ``path``: the given ones when its first row has them, else the first of
    :data:`PROMPT_KEYS` / :data:`ANSWER_KEYS` it has (the given ones again when none fits: the read then names
    the missing key)."""
    try:
        rows = _rows(Path(path)) if Path(path).is_file() else []
    except DataError:  # unreadable: the read itself names the file and why
        return prompt_key, answer_key
    first = next((row for _, row in rows if isinstance(row, dict)), None)
    if first is None:
        return prompt_key, answer_key

    def has(key: str) -> bool:
        try:
            _lookup(first, key)
        except DataError:
            return False
        return True

    found = [
        next((k for k in (given, *known) if has(k)), given)
        for given, known in ((prompt_key, PROMPT_KEYS), (answer_key, ANSWER_KEYS))
    ]
    return found[0], found[1]


def _example(
    row: Any,
    number: int,
    *,
    prompt_key: str,
    answer_key: str,
    extra_keys: Sequence[str],
    adapter: Callable[[dict[str, Any]], Any] | None,
) -> PromptExample:
    """One row as a :class:`PromptExample` (by its keys, or by the adapter); :class:`DataError` if unusable."""
    if adapter is None:
        extra = {key: _lookup(row, key) for key in extra_keys}
        return PromptExample(
            _messages(_lookup(row, prompt_key)), _answer_text(_lookup(row, answer_key), answer_key), number, extra
        )
    try:
        adapted = adapter(row)
    except Exception as exc:  # the adapter's failure on this row is the row's
        raise DataError(f"data.row_adapter raised {type(exc).__name__}: {exc}") from None
    if not isinstance(adapted, dict) or not {"prompt", "answer"} <= adapted.keys():
        raise DataError(f"data.row_adapter must return a mapping with 'prompt' and 'answer', got {adapted!r:.80}")
    extra = adapted.get("extra") or {}
    if not isinstance(extra, dict):
        raise DataError(f"data.row_adapter's 'extra' must be a mapping, got {type(extra).__name__}")
    return PromptExample(_messages(adapted["prompt"]), _answer_text(adapted["answer"], "answer"), number, extra)


def read_prompts(
    path: str | Path,
    *,
    prompt_key: str = "prompt",
    answer_key: str = "reward_model.ground_truth",
    bad_rows: Literal["error", "skip"] = "error",
    extra_keys: Sequence[str] = (),
    row_adapter: Callable[[dict[str, Any]], Any] | None = None,
) -> PromptSet:
    """Read a ``.parquet`` or ``.jsonl`` prompt file (see the module docstring). ``extra_keys``: dotted keys of
    each row kept in :attr:`PromptExample.extra`. ``row_adapter``: a function of the row returning a mapping of
    ``prompt`` (messages or text), ``answer`` and optionally ``extra`` (a dict), used instead of the keys."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such prompt file")
    out = PromptSet([])
    unit = "line" if path.suffix == ".jsonl" else "row"
    for row_number, row in _rows(path):
        try:
            if isinstance(row, DataError):
                raise row
            out.examples.append(
                _example(
                    row,
                    row_number,
                    prompt_key=prompt_key,
                    answer_key=answer_key,
                    extra_keys=extra_keys,
                    adapter=row_adapter,
                )
            )
        except DataError as exc:
            if bad_rows == "error":
                raise DataError(f"{path}: {unit} {row_number}: {exc} (bad_rows=skip skips such rows)") from None
            out.skipped.append((row_number, str(exc)))
    if not out.examples:
        raise DataError(f"{path}: no usable prompt rows ({len(out.skipped)} skipped)")
    return out


@dataclass
class EncodedPrompts:
    """Token ids of the prompts that fit, and how many did not."""

    token_ids: list[list[int]]
    examples: list[PromptExample]
    dropped_too_long: int


def encode_prompts(examples: Sequence[PromptExample], tokenizer: Any, *, max_prompt_length: int) -> EncodedPrompts:
    """Apply the tokenizer's chat template (with the generation prompt); drop prompts over the limit."""
    out = EncodedPrompts([], [], 0)
    for example in examples:
        chat = [{"role": role, "content": content} for role, content in example.messages]
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # transformers 5 returns a BatchEncoding
        if len(ids) > max_prompt_length:
            out.dropped_too_long += 1
            continue
        out.token_ids.append(ids)
        out.examples.append(example)
    return out
