"""Extending without forking (docs/EXTENDING.md): the shipped examples, from outside the package, through the
trainer's entry point at two ranks, and their pieces on their own.

- ``examples/plugins/rloo.py`` registers an advantage kind with a field of its own (``loo_eps``);
- ``examples/plugins/countdown.py`` is a reward function with a sub-score and a data set whose rows carry their
  numbers in a field of their own (``data.extra_keys``).

``python -m megatron_hapo.train ... algo.plugins=[examples/plugins/rloo.py] algo.advantage.kind=rloo
algo.advantage.loo_eps=... data.reward=examples/plugins/countdown.py:countdown_reward --local-ranks 2`` trains two
steps: the field is validated, recorded in ``config.json`` as set, the sub-score is a step metric, and each rank
(a process of its own) imported the plugin before it looked the kind up (else it stops on an unknown kind).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples" / "plugins"))  # the examples as a user's modules


@pytest.fixture(autouse=True)
def isolated_registries():
    """Plugin kinds registered by a test in this process are gone after it (and their modules, so that the next
    load imports and registers them again): other tests see the built-in registries."""
    from megatron_hapo.algos import REGISTRIES

    saved = {name: dict(registry._entries) for name, registry in REGISTRIES.items()}
    yield
    for name, registry in REGISTRIES.items():
        registry._entries.clear()
        registry._entries.update(saved[name])
    for module in [m for m in sys.modules if m.startswith("megatron_hapo_plugin_")]:
        del sys.modules[module]


def test_rloo_kind_and_its_field() -> None:
    from megatron_hapo.algos import ADVANTAGE
    from megatron_hapo.algos.components import AdvantageInputs
    from megatron_hapo.config import load_config, to_tree

    plugin = "algo.plugins=[examples/plugins/rloo.py]"
    config = load_config(
        "configs/algo/grpo.yaml", [plugin, "algo.advantage.kind=rloo", "algo.advantage.loo_eps=0.5"], warn=False
    )
    assert to_tree(config)["algo"]["advantage"]["loo_eps"] == 0.5  # saved as set, beside the built-in fields
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 3.0])
    inputs = AdvantageInputs(rewards, [0, 0, 0, 1, 1, 2], torch.ones(6, 2, dtype=torch.bool))
    params = ADVANTAGE.params("rloo", config.algo.advantage)
    assert params == {"std_norm": True, "loo_eps": 0.5}
    advantages = ADVANTAGE.get("rloo").fn(inputs, **params)[:, 0]
    std = rewards[:3].std()  # Bessel-corrected, as GRPO's
    expected = torch.tensor([1.0 / (std + 0.5), -0.5 / (std + 0.5), -0.5 / (std + 0.5), 0.0, 0.0, 0.0])
    torch.testing.assert_close(advantages, expected)
    assert ADVANTAGE.params("rloo", load_config("configs/algo/grpo.yaml", [plugin], warn=False).algo.advantage) == {
        "std_norm": True,
        "loo_eps": 1e-6,  # the declared default when the kind is chosen without it
    }


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["algo.advantage.kind=rloo", "algo.advantage.loo_epz=1"], "did you mean 'algo.advantage.loo_eps'"),
        (["algo.advantage.kind=rloo", "algo.advantage.loo_eps=tiny"], "algo.advantage.loo_eps: expected float"),
        (["algo.advantage.loo_eps=1"], "unknown config key 'algo.advantage.loo_eps'"),  # not the chosen kind's
        (["algo.advantage.plugin_fields={}"], "unknown config key 'algo.advantage.plugin_fields'"),
    ],
)
def test_plugin_fields_are_checked_like_built_in_ones(overrides: list[str], says: str) -> None:
    from megatron_hapo.config import ConfigError, load_config

    with pytest.raises(ConfigError) as caught:
        load_config("configs/algo/grpo.yaml", ["algo.plugins=[examples/plugins/rloo.py]", *overrides], warn=False)
    assert says in str(caught.value) and "\n" not in str(caught.value), str(caught.value)


def test_bad_plugins_are_one_line(tmp_path: Path) -> None:
    from megatron_hapo.config import ConfigError, load_config

    twice = tmp_path / "twice.py"
    twice.write_text("from megatron_hapo.algos import ADVANTAGE\nADVANTAGE.register('grpo')(lambda inputs: None)\n")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('this plugin is broken')\n")
    for plugin, says in [
        (twice, "ValueError: advantage kind 'grpo' is already registered"),
        (broken, "RuntimeError: this plugin is broken"),
        (tmp_path / "absent.py", "no such file"),
        ("no_such_plugin_module", "No module named 'no_such_plugin_module'"),
    ]:
        with pytest.raises(ConfigError) as caught:
            load_config("configs/algo/grpo.yaml", [f"algo.plugins=[{plugin}]"], warn=False)
        message = str(caught.value)
        assert message.startswith("algo.plugins: ") and says in message and "\n" not in message, message


def test_countdown_reward_and_rows() -> None:
    from countdown import countdown_reward, make_countdown

    rows = make_countdown(20, seed=3)
    assert len(rows) == 20 and all(len(r["numbers"]) == 3 for r in rows)
    assert countdown_reward("3 + 4 * 2", "11", {"numbers": [3, 4, 2]}) == {"score": 1.0, "correct": True, "format": 1.0}
    assert countdown_reward("4 * 4 - 5", "11", {"numbers": [3, 4, 5]})["score"] == 0.0  # 4 used twice
    assert countdown_reward("1 2 - 1", "11", {"numbers": [12, 1]})["correct"]  # digits join up
    assert countdown_reward("__import__('os')", "1", {"numbers": [1]}) == {
        "score": 0.0,
        "correct": False,
        "format": 0.0,
    }


def readme_lines(readme: Path, section: str = "## Extending") -> list[str]:
    """The commands of the first ``bash`` block of the README's extending section, continuation lines joined."""
    block = readme.read_text().split(section, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_train_with_the_examples_at_two_ranks(tmp_path: Path) -> None:
    """The README's lines, as written, in a fresh directory: a tiny model, the countdown data, three steps of
    RLOO on the countdown reward at two ranks with the default (vLLM) engine."""
    for name in ("tools", "megatron_hapo", "configs", "examples"):
        (tmp_path / name).symlink_to(REPO / name)
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))  # the virtual environment running the tests
    commands = readme_lines(REPO / "README.md")
    assert len(commands) == 3 and "algo.plugins=[examples/plugins/rloo.py]" in commands[2], commands
    for command in commands:
        result = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{command}\n{result.stderr[-4000:]}"
    run_dir = tmp_path / "runs" / "countdown" / "run"
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["algo"]["plugins"] == ["examples/plugins/rloo.py"]
    assert saved["algo"]["advantage"]["kind"] == "rloo" and saved["algo"]["advantage"]["loo_eps"] == 1e-4
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(0.0 <= r["reward/format"] <= 1.0 for r in rows), rows  # the function's sub-score, as a metric
    assert all(r["reward_errors"] == 0.0 for r in rows)


def test_print_config_shows_a_plugin_field_with_its_doc() -> None:
    command = [
        sys.executable,
        "tools/print_config.py",
        "configs/algo/grpo.yaml",
        "algo.plugins=[examples/plugins/rloo.py]",
        "algo.advantage.kind=rloo",
        "algo.advantage.loo_eps=0.25",
        "--docs",
    ]
    shown = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True).stdout.splitlines()
    at = shown.index("    loo_eps: 0.25")
    assert "added to the group's standard deviation" in shown[at - 1] and "plugin field of kind 'rloo'" in shown[at - 1]
    plain = subprocess.run(command[:-1], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "  advantage:\n    kind: rloo\n" in plain and "    loo_eps: 0.25\n" in plain
