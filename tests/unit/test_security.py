"""Security rules that hold across the code base: every ``torch.load`` refuses arbitrary pickles
(``weights_only=True``), and no code evaluates text (model outputs, data, configs) as Python."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOURCES = [p for d in ("megatron_hapo", "tools", "benchmarks", "tests") for p in (REPO / d).rglob("*.py")]


def _calls(tree: ast.AST):
    return (node for node in ast.walk(tree) if isinstance(node, ast.Call))


def test_every_torch_load_is_weights_only() -> None:
    offenders = []
    for path in SOURCES:
        for call in _calls(ast.parse(path.read_text())):
            func = call.func
            if isinstance(func, ast.Attribute) and func.attr == "load" and getattr(func.value, "id", "") == "torch":
                weights_only = [k for k in call.keywords if k.arg == "weights_only"]
                if not weights_only or getattr(weights_only[0].value, "value", None) is not True:
                    offenders.append(f"{path.relative_to(REPO)}:{call.lineno}")
    assert not offenders, offenders


def test_no_eval_or_exec_of_text() -> None:
    offenders = [
        f"{path.relative_to(REPO)}:{call.lineno}"
        for path in SOURCES
        if path.parts[-2] != "unit" or path.name != "test_security.py"
        for call in _calls(ast.parse(path.read_text()))
        if isinstance(call.func, ast.Name) and call.func.id in {"eval", "exec", "compile"}
    ]
    assert not offenders, offenders
