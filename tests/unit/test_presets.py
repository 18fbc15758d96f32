"""Every preset loads, validates and resolves; the presets only pick kinds and values; the tools work."""

import ast
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from megatron_hapo.algos import REGISTRIES
from megatron_hapo.config import load_config

REPO = Path(__file__).resolve().parents[2]
PRESETS = sorted((REPO / "configs" / "algo").glob("*.yaml"))
EXPECTED = {"grpo", "dapo", "hapo", "gtpo", "grpo_s", "mixed_dapo"}


def test_all_required_presets_exist():
    assert {p.stem for p in PRESETS} >= EXPECTED


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_loads_validates_and_is_silent(preset):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = load_config(preset)
    for section, registry in REGISTRIES.items():
        assert getattr(config.algo, section).kind in registry.kinds()


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_only_sets_algo_kinds_and_values(preset):
    tree = yaml.safe_load(preset.read_text())
    assert set(tree) <= {"base", "algo", "data"}
    assert set(tree.get("data", {})) <= {"math_verify"}  # the published code's verifier (docs/ALGORITHMS.md 26)
    for section in tree.get("algo", {}).values():
        assert isinstance(section, dict)
        assert all(not isinstance(v, dict | list) for v in section.values())


def test_presets_differ_as_the_spec_says():
    hapo, dapo = load_config(REPO / "configs/algo/hapo.yaml").algo, load_config(REPO / "configs/algo/dapo.yaml").algo
    assert (hapo.clip.eps_low, hapo.clip.eps_high, hapo.clip.dual_clip_c) == (0.2, 0.2, 10.0)
    assert (dapo.clip.eps_low, dapo.clip.eps_high) == (0.2, 0.28)
    assert hapo.group_filter.kind == "none" and dapo.group_filter.kind == "all_equal"
    assert load_config(REPO / "configs/algo/hapo.yaml").data.math_verify  # HAPO's published reward; DAPO's: verl's
    assert not load_config(REPO / "configs/algo/dapo.yaml").data.math_verify
    assert hapo.entropy.pivot_quantile == 0.8 and hapo.sampling.tau == 0.05


def test_no_code_tests_an_algorithm_name():
    names = {"grpo", "dapo", "hapo", "gtpo", "grpo_s", "mixed_dapo"}
    for path in (REPO / "megatron_hapo").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                for const in ast.walk(node):
                    assert not (isinstance(const, ast.Constant) and const.value in names), f"{path}:{node.lineno}"


def test_print_config_tool_resolves_and_reports():
    cmd = [
        sys.executable,
        str(REPO / "tools/print_config.py"),
        str(REPO / "configs/algo/hapo.yaml"),
        "algo.clip.eps_high=0.28",
        "algo.redistribution.kind=none",
        "algo.redistribution.beta=0.5",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    tree = yaml.safe_load(done.stdout)
    assert tree["algo"]["clip"]["eps_high"] == 0.28
    assert "algo.redistribution.beta=0.5 has no effect" in done.stderr
    bad = subprocess.run([*cmd[:3], "algo.clp.kind=x"], capture_output=True, text=True)
    assert bad.returncode == 2 and "did you mean 'algo.clip'" in bad.stderr
    docs = subprocess.run([*cmd[:3], "--docs"], capture_output=True, text=True, check=True)
    assert "# Lower clip range, in (0, 1)." in docs.stdout
