"""Architecture rules that code review would otherwise have to catch (docs/ARCHITECTURE in shared/spec)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_hapo"
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_algos_is_pure_torch():
    for path in (PACKAGE / "algos").rglob("*.py"):
        for name in _imports(path):
            assert not name.startswith(("megatron.", "torch.distributed", "megatron_hapo.config")), f"{path}: {name}"
            assert name != "megatron", path
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                assert (node.value.id, node.attr) != ("torch", "distributed"), f"{path}:{node.lineno}"


def test_files_and_functions_stay_small():
    for path in PACKAGE.rglob("*.py"):
        lines = path.read_text().splitlines()
        assert len(lines) <= MAX_FILE_LINES, f"{path} has {len(lines)} lines"
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, ast.FunctionDef):
                length = node.end_lineno - node.lineno + 1
                assert length <= MAX_FUNCTION_LINES, f"{path}:{node.lineno} {node.name} has {length} lines"


def test_no_print_in_library_code():
    entry_points = {"selfcheck.py", "megatron_selfcheck.py", "rl_demo.py"}
    for path in PACKAGE.rglob("*.py"):
        if path.name in entry_points:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id != "print", f"{path}:{node.lineno} uses print; use logging"


def test_public_algos_names_import():
    import megatron_hapo.algos as algos

    required = ["EntropyStats", "normalized_entropy", "adaptive_temperature", "grpo_advantages", "hapo_advantages",
                "adaptive_clip_bounds", "redistribute_advantages", "clipped_surrogate", "aggregate_loss",
                "overlong_penalty", "filter_groups", "gtpo_token_rewards", "gtpo_advantages", "grpo_s_advantages",
                "guide_policy_surrogate", "zero_reward_groups"]  # fmt: skip
    for name in required:
        assert hasattr(algos, name), name
    assert set(algos.__all__) <= set(dir(algos))
