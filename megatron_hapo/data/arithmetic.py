"""The example data set that ships with the package: single-digit arithmetic (``What is 7 * 8 ?``), 300
problems, every word known to the tiny models' tokenizer (``tools/make_tiny_model.py``).

``megatron_hapo/examples/arithmetic/`` holds its three files, written by :func:`write_arithmetic_data` (a test
checks that the shipped files are its output):

- ``train.jsonl``: 200 problems in DAPO-Math-17k's layout (``prompt`` chat, ``reward_model.ground_truth``);
- ``test_aime.jsonl``: 50 in AIME 2024's columns (``id``, ``problem``, ``answer``);
- ``test_math.jsonl``: 50 in MATH's columns (``problem``, ``solution`` ending in ``\\boxed{}``, ``level``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

#: Where the shipped files are.
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "arithmetic"
_OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def arithmetic_problems(seed: int = 0) -> list[tuple[str, int]]:
    """Every ``a op b`` over digits a, b and op in ``+ - *`` as ``(question, answer)``, in a seeded order."""
    problems = [
        (f"What is {a} {op} {b} ?", fn(a, b)) for op, fn in _OPERATIONS.items() for a in range(10) for b in range(10)
    ]
    random.Random(seed).shuffle(problems)
    return problems


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def write_arithmetic_data(out: Path) -> list[Path]:
    """Write the three files of the example set into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    problems = arithmetic_problems()
    train = [
        {
            "data_source": "arithmetic",
            "prompt": [{"role": "user", "content": question}],
            "ability": "MATH",
            "reward_model": {"style": "rule", "ground_truth": str(answer)},
            "extra_info": {"index": i},
        }
        for i, (question, answer) in enumerate(problems[:200])
    ]
    aime = [{"id": i, "problem": q, "answer": str(a)} for i, (q, a) in enumerate(problems[200:250])]
    math = [{"problem": q, "solution": f"{q[8:-2]} = \\boxed{{{a}}}", "level": "Level 1"} for q, a in problems[250:]]
    paths = [out / "train.jsonl", out / "test_aime.jsonl", out / "test_math.jsonl"]
    tables: tuple[list[dict], ...] = (train, aime, math)
    for path, rows in zip(paths, tables, strict=True):
        _jsonl(path, rows)
    return paths
