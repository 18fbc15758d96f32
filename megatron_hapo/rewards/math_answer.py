"""Math answer checking: DAPO's "Answer:" rule, boxed-answer extraction, and an optional math-verify fallback.

The DAPO rule (``math_dapo`` in verl, used by DAPO and HAPO): take the last ``Answer: ...`` line among the final
300 characters of the response, normalise it and the ground truth the same way (units, ``\\text{}``, dollar
signs, spacing, thousands separators...), and compare the strings. Score +1 when equal, -1 otherwise. HAPO's copy
then asks math-verify whether the two are mathematically equal and can turn -1 into +1; here that fallback is
``math_verify=True`` and needs the ``math-verify`` package. These functions run inside the reward worker
processes (:mod:`.workers`), never in the trainer's process.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

#: Only this tail of a response is searched (DAPO: keeps the regex cheap on long responses).
TAIL_CHARS = 300

_ANSWER_LINE = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")
_REPLACE = (
    (r"\ ", ""),
    (" ", ""),
    ("mbox", "text"),
    (",\\text{and}", ","),
    ("\\text{and}", ","),
    ("\\text{m}", "\\text{}"),
    ("\\$", ""),
    (".$", "$"),
)
_UNITS = (
    "square",
    "ways",
    "integers",
    "dollars",
    "mph",
    "inches",
    "hours",
    "km",
    "units",
    "\\ldots",
    "points",
    "feet",
    "minutes",
    "digits",
    "cents",
    "degrees",
    "cm",
    "gm",
    "pounds",
    "meters",
    "meals",
    "edges",
    "students",
    "childrentickets",
    "multiples",
    "\\text{s}",
    "\\text{.}",
    "\\text{\ns}",
    "\\text{}^2",
    "\\text{}^3",
    "\\text{\n}",
    "\\text{}",
    r"\mathrm{th}",
    r"^\circ",
    r"^{\circ}",
    r"\;",
    r",\!",
    "{,}",
    '"',
    "\\dots",
)
_UNWRAP = (r"\\text", r"\\textbf", r"\\overline", r"\\boxed")


@dataclass(frozen=True)
class MathScore:
    """The verdict on one response."""

    score: float
    """+1 correct, -1 wrong (DAPO)."""
    correct: bool
    prediction: str
    """The normalised extracted answer (``[INVALID]`` when none was found)."""


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) with balanced braces; ``None`` if absent."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        match = re.match(r"\\boxed (\S+)", text[start:])  # "\boxed 5"
        return match.group(1) if match else None
    depth = 0
    for i in range(brace, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[brace + 1 : i]
    return None


_DOLLAR_SPAN = re.compile(r"(.*?)(\$)(.*?)(\$)(.*)")


def _keep_dollar_span(line: str) -> str:
    """DAPO's ``$...$`` rule on one line (the text between its first two ``$``), in linear time: the regex
    scans every start position of a line without two ``$`` to its end (quadratic: 32k characters took 7.9 s),
    and such a line never matches."""
    return _DOLLAR_SPAN.sub(r"$\3$", line) if line.count("$") >= 2 else line


def normalize_answer(answer: str) -> str:
    """DAPO's ``normalize_final_answer``: the same string for the same answer written differently."""
    answer = answer.rsplit("=", maxsplit=1)[-1]
    for before, after in _REPLACE:
        answer = answer.replace(before, after)
    for unit in _UNITS:
        answer = answer.replace(unit, "")
    answer = "\n".join(map(_keep_dollar_span, answer.split("\n")))
    for command in _UNWRAP:
        answer = re.sub(command + r"\{(.*)\}" if command == r"\\boxed" else command + r"\{(.*?)\}", r"\1", answer)
    answer = re.sub(r"(frac)([^{])(.)", r"frac{\2}{\3}", answer)
    answer = re.sub(r"(sqrt)([^{])", r"sqrt{\2}", answer)
    answer = answer.replace("$", "")
    if answer.replace(",", "").isdigit():
        answer = answer.replace(",", "")
    return answer.strip()


def _math_verify_equal(prediction: str, ground_truth: str) -> bool:
    """math-verify's equality, without its own timeouts (the worker's deadline bounds the call): its warning
    that they are off, once per call, is silenced."""
    from math_verify import parse, verify  # noqa: PLC0415  (optional dependency)

    logging.getLogger("math_verify").setLevel(logging.ERROR)

    return bool(
        verify(
            parse(f"${ground_truth}$", parsing_timeout=None),
            parse(f"${prediction}$", parsing_timeout=None),
            timeout_seconds=None,
        )
    )


def _judge(prediction: str, ground_truth: str, *, math_verify: bool) -> MathScore:
    correct = prediction == normalize_answer(ground_truth)
    if not correct and math_verify and prediction != "[INVALID]":
        correct = _math_verify_equal(prediction, ground_truth)
    return MathScore(1.0 if correct else -1.0, correct, prediction)


def dapo_math_score(response: str, ground_truth: str, *, math_verify: bool = False) -> MathScore:
    """DAPO's rule: the last ``Answer:`` line of the response's tail against the ground truth (its last
    ``\\boxed{}`` when it has one: a worked solution such as MATH's ``solution`` column)."""
    lines = _ANSWER_LINE.findall(response[-TAIL_CHARS:])
    prediction = normalize_answer(lines[-1]) if lines else "[INVALID]"
    return _judge(prediction, last_boxed(ground_truth) or ground_truth, math_verify=math_verify)


def boxed_math_score(response: str, ground_truth: str, *, math_verify: bool = False) -> MathScore:
    """The last ``\\boxed{}`` of the response against the ground truth (itself boxed or plain)."""
    boxed = last_boxed(response)
    truth = last_boxed(ground_truth) or ground_truth
    return _judge(normalize_answer(boxed) if boxed is not None else "[INVALID]", truth, math_verify=math_verify)


def math_reward(
    response: str, ground_truth: str, rule: str = "dapo_math", math_verify: bool = False
) -> tuple[float, bool]:
    """``(reward, correct)`` of one response under ``rule`` (``dapo_math`` or ``boxed_math``); a worker function."""
    rules = {"dapo_math": dapo_math_score, "boxed_math": boxed_math_score}
    if rule not in rules:
        raise ValueError(f"unknown reward rule {rule!r}; valid: {', '.join(rules)}")
    score = rules[rule](response, ground_truth, math_verify=math_verify)
    return score.score, score.correct
