"""A reward function and a data set from outside the package: the countdown game (TinyZero's task).

Each problem gives three numbers and a target; a response is right when it is an arithmetic expression that uses
each given number at most once and equals the target. The rows keep the numbers in a field of their own, which
reaches the reward function through ``data.extra_keys``:

    python examples/plugins/countdown.py --out runs/countdown.jsonl --count 64      # the data set
    python -m megatron_hapo.train configs/algo/grpo.yaml data.train_file=runs/countdown.jsonl \\
        data.answer_key=target data.extra_keys=[numbers] \\
        data.reward=examples/plugins/countdown.py:countdown_reward ...

The reward runs in the verifier worker processes (time and memory limits; an exception is counted, the response
scores 0). The response is read as data: its expression is parsed with :mod:`ast` and only numbers and
``+ - * /`` are evaluated, never ``eval``. Numbers are written digit by digit (``1 2`` is twelve) so that the
word-level tokenizer of ``tools/make_tiny_model.py`` knows every token.
"""

from __future__ import annotations

import argparse
import ast
import json
import operator
import random
from collections import Counter
from pathlib import Path

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_ALLOWED = set("0123456789+-*/() ")


def _digits(value: int) -> str:
    return " ".join(str(value))


def make_countdown(count: int, seed: int = 0) -> list[dict]:
    """``count`` problems: three numbers in 1-9 and a target that one expression of them reaches."""
    rng = random.Random(seed)
    rows = []
    while len(rows) < count:
        numbers = [rng.randint(1, 9) for _ in range(3)]
        a, b, c = numbers
        target = rng.choice([a + b + c, a * b + c, a * b - c, (a + b) * c])
        if target <= 0:
            continue
        question = f"Solve the following math problem {' '.join(map(_digits, numbers))} = {_digits(target)} ?"
        rows.append({"prompt": [{"role": "user", "content": question}], "target": str(target), "numbers": numbers})
    return rows


def _evaluate(node: ast.AST, used: list[int]) -> float:
    """The value of a parsed expression of numbers and ``+ - * /`` (the numbers it uses appended to ``used``)."""
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, used)
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        used.append(node.value)
        return float(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.left, used), _evaluate(node.right, used))
    raise ValueError(f"not an arithmetic expression: {ast.dump(node)[:60]}")


def countdown_reward(response: str, ground_truth: str, extra: dict) -> dict:
    """1 when the response's expression uses only the given numbers (each at most once) and equals the target,
    else 0; sub-score ``format``: whether the response was an arithmetic expression at all (a step metric)."""
    text = response.replace(" ", "")
    text = "".join(ch for ch in text if ch in _ALLOWED)  # digits written one by one join up again
    used: list[int] = []
    try:
        value = _evaluate(ast.parse(text, mode="eval"), used)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return {"score": 0.0, "correct": False, "format": 0.0}
    allowed = Counter(int(n) for n in extra["numbers"])
    fair = not Counter(used) - allowed
    right = fair and abs(value - float(ground_truth)) < 1e-9
    return {"score": 1.0 if right else 0.0, "correct": bool(right), "format": 1.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the .jsonl file to write")
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as f:
        for row in make_countdown(args.count, args.seed):
            f.write(json.dumps(row) + "\n")
    print(f"wrote {args.count} countdown problems to {args.out}")


if __name__ == "__main__":
    main()
