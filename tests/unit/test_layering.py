"""Architecture rules that code review would otherwise have to catch (the layering in README.md "Layout")."""

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
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name in ("demos", "studies") or path.name == "evaluate.py":  # their tables: their product
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id != "print", f"{path}:{node.lineno} uses print; use logging"


def test_public_algos_names_import():
    import megatron_hapo.algos as algos

    required = [
        "EntropyStats",
        "normalized_entropy",
        "adaptive_temperature",
        "grpo_advantages",
        "hapo_advantages",
        "adaptive_clip_bounds",
        "redistribute_advantages",
        "clipped_surrogate",
        "aggregate_loss",
        "overlong_penalty",
        "filter_groups",
        "gtpo_token_rewards",
        "gtpo_advantages",
        "grpo_s_advantages",
        "guide_policy_surrogate",
        "zero_reward_groups",
    ]
    for name in required:
        assert hasattr(algos, name), name
    assert set(algos.__all__) <= set(dir(algos))


REPO = PACKAGE.parent
#: ``torch.distributed`` attributes that code outside ``parallel/`` may still name (types, not calls).
DIST_ALLOWED_OUTSIDE_PARALLEL = {"ProcessGroup", "ReduceOp"}


def _outside_parallel() -> list[Path]:
    files = [p for p in PACKAGE.rglob("*.py") if p.parent.name != "parallel"]
    return files + sorted((REPO / "tools").glob("*.py"))


def test_torch_distributed_calls_live_in_parallel():
    """Every collective, rank query and group call goes through ``megatron_hapo.parallel`` (whose helpers pick
    the backend's device); elsewhere ``dist.<name>`` may only name a type."""
    for path in _outside_parallel():
        tree = ast.parse(path.read_text())
        aliases = {
            a.asname or a.name
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for a in node.names
            if a.name == "torch.distributed"
        }
        aliases |= {
            a.asname or a.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module == "torch"
            for a in node.names
            if a.name == "distributed"
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
                assert all(a.name in DIST_ALLOWED_OUTSIDE_PARALLEL for a in node.names), f"{path}:{node.lineno}"
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                assert node.attr in DIST_ALLOWED_OUTSIDE_PARALLEL, f"{path}:{node.lineno} dist.{node.attr}"


def test_megatron_parallel_state_is_read_in_parallel_only():
    """Megatron's global ``parallel_state`` getters are read by ``parallel/`` alone; the rest gets groups passed
    (``ParallelGroups``) or the layout (``runtime.model_parallel_layout``)."""
    for path in _outside_parallel():
        for name in _imports(path):
            assert not name.startswith("megatron.core.parallel_state"), f"{path}: {name}"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "megatron.core":
                assert "parallel_state" not in {a.name for a in node.names}, f"{path}:{node.lineno}"


def test_cpu_platform_adapter_is_applied_in_one_place():
    """``megatron_cpu`` patches torch.cuda process-wide: only the one model-parallel initialiser applies it, and
    only off the GPU, so the GPU path never imports it."""
    importers = []
    for path in [*PACKAGE.rglob("*.py"), *(REPO / "tools").glob("*.py"), *(REPO / "benchmarks").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = set()
            if isinstance(node, ast.ImportFrom):
                names = {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                names = {a.name for a in node.names}
            if any(n.endswith("megatron_cpu") for n in names):
                importers.append(path.relative_to(REPO).as_posix())
    assert importers == ["megatron_hapo/parallel/runtime.py"], importers
    source = (PACKAGE / "parallel" / "runtime.py").read_text()
    guarded = source.split("if not on_gpu():", 1)[1].split("    if ", 1)[0]
    assert "import megatron_cpu" in guarded and "megatron_cpu.install()" in guarded
