"""Users' reward functions by reference (``data.reward: "module:function"`` / ``"file.py:function"``): loaded in
the verifier workers, results read (a number, or score / correct / sub-scores), bad ones refused in one line at
start-up by a probe call, failures during the run counted like a built-in verifier's."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from megatron_hapo.rewards.custom import RewardFunctionError, custom_reward, is_reference, load_reward_function

PLUGIN = textwrap.dedent(
    """
    def length_reward(response, ground_truth, extra):
        return {"score": float(len(response.split()) == int(ground_truth)), "words": float(len(response.split()))}

    def plain(response, ground_truth, extra):
        return 0.5 if ground_truth in response else 0

    def two_args(response, ground_truth):
        return 1.0

    def not_a_number(response, ground_truth, extra):
        return "yes"

    def nan(response, ground_truth, extra):
        return float("nan")

    def raises(response, ground_truth, extra):
        if response == "":
            raise KeyError("no answer line")
        return 1.0
    """
)


@pytest.fixture
def plugin(tmp_path: Path) -> Path:
    path = tmp_path / "my_rewards.py"
    path.write_text(PLUGIN)
    return path


def test_a_function_by_file_path_and_by_module(plugin: Path) -> None:
    assert custom_reward("a b c", "3", reference=f"{plugin}:length_reward") == (1.0, True, {"words": 3.0})
    assert custom_reward("a b", "3", reference=f"{plugin}:length_reward") == (0.0, False, {"words": 2.0})
    assert custom_reward("x 7", "7", {}, reference=f"{plugin}:plain") == (0.5, True, {})  # correct: score > 0
    # a module name: the benchmark's reward, importable from the repository root
    from megatron_hapo.rewards.math_answer import math_reward

    assert load_reward_function("megatron_hapo.rewards.math_answer:math_reward") is math_reward
    assert not is_reference("dapo_math") and is_reference("pkg.mod:fn")


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("two_args", "must take (response, ground_truth, extra)"),
        ("missing", "has no function 'missing'"),
        ("not_a_number", "the return value must be a finite number, got 'yes'"),
        ("nan", "must be a finite number, got nan"),
    ],
)
def test_bad_functions_are_one_line(plugin: Path, name: str, says: str) -> None:
    with pytest.raises(RewardFunctionError) as caught:
        custom_reward("", "1", reference=f"{plugin}:{name}")
    assert says in str(caught.value) and "\n" not in str(caught.value)


def test_bad_references_are_one_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_module_here\n")
    for reference, says in [
        ("dapo_maths", "name a built-in rule (dapo_math, boxed_math) or a function"),
        (f"{broken}:f", "importing"),
        (f"{tmp_path / 'absent.py'}:f", "no such file"),
        ("no_such_package_xyz:f", "No module named 'no_such_package_xyz'"),
    ]:
        with pytest.raises(RewardFunctionError) as caught:
            load_reward_function(reference)
        assert says in str(caught.value) and "\n" not in str(caught.value), str(caught.value)


def test_start_up_probe_names_the_key(plugin: Path) -> None:
    from megatron_hapo.config import load_config
    from megatron_hapo.data import PromptExample, PromptSet
    from megatron_hapo.trainer.preflight import EvalData, RunData, check_reward_functions

    data = RunData(train=PromptSet([PromptExample((("user", "q"),), "4", 1)]))
    config = load_config("configs/algo/grpo.yaml", [f"data.reward={plugin}:length_reward"], warn=False)
    check_reward_functions(config, data.evals, data.train)  # a good one passes
    for name, says in [("raises", "raised KeyError: 'no answer line' on a probe"), ("two_args", "must take")]:
        config = load_config("configs/algo/grpo.yaml", [f"data.reward={plugin}:{name}"], warn=False)
        with pytest.raises(SystemExit) as caught:
            check_reward_functions(config, data.evals, data.train)
        assert str(caught.value).startswith("data.reward: ") and says in str(caught.value), str(caught.value)
        assert "\n" not in str(caught.value)
    # the evaluator probes its sets' functions the same way (no training rows there)
    eval_set = EvalData("held", "h.jsonl", data.train.examples, 0, f"{plugin}:raises")
    with pytest.raises(SystemExit, match=r"^data.eval_sets.held.reward: reward .* raised KeyError"):
        check_reward_functions(config, [eval_set])


def test_workers_score_count_failures_and_report_sub_scores(plugin: Path) -> None:
    """Through the verifier workers as the trainer builds them: sub-scores become ``reward/<name>`` metrics, a
    raise scores 0 (not the built-in rules' -1) and is counted."""
    from megatron_hapo.config import load_config
    from megatron_hapo.trainer.scoring import math_scorers, reward_failures

    overrides = ["output.reward_workers=1"]
    config = load_config("configs/algo/grpo.yaml", overrides, warn=False)
    rules = [f"{plugin}:length_reward", f"{plugin}:raises"]
    decode = lambda ids: [" ".join("w" for _ in i) for i in ids]  # noqa: E731  (one word per token)
    with math_scorers(config, rules, decode) as scorers:
        rewards, correct = scorers[rules[0]]([[1, 2], [1, 2, 3]], ["3", "3"])
        assert rewards.tolist() == [0.0, 1.0] and correct.tolist() == [False, True]
        assert reward_failures(scorers[rules[0]], limit=0.5) == {
            "reward_errors": 0.0,
            "reward_timeouts": 0.0,
            "reward_crashes": 0.0,
            "reward/words": 2.5,
        }
        rewards, _ = scorers[rules[1]]([[], [1]], ["1", "1"])  # the empty response raises
        assert rewards.tolist() == [0.0, 1.0]
        assert reward_failures(scorers[rules[1]], limit=0.5)["reward_errors"] == 1.0


def test_extra_keys_and_a_row_adapter(tmp_path: Path) -> None:
    """Rows of another layout: extra dotted keys reach ``extra``; a row adapter by reference turns any row into
    prompt / answer / extra, a row it fails on is a bad row (named, or skipped and counted)."""
    import json

    from megatron_hapo.config import load_config
    from megatron_hapo.data import DataError, read_prompts
    from megatron_hapo.trainer.preflight import row_settings

    rows = tmp_path / "rows.jsonl"
    lines = [{"q": "2 + 2", "meta": {"sol": "4", "nums": [2, 2]}}, {"q": "bad row", "meta": {}}]
    rows.write_text("".join(json.dumps(row) + "\n" for row in lines))
    adapter = tmp_path / "adapter.py"
    adapter.write_text(
        "def adapt(row):\n"
        "    return {'prompt': row['q'], 'answer': row['meta']['sol'], 'extra': {'nums': row['meta']['nums']}}\n"
    )
    read = read_prompts(rows, prompt_key="q", answer_key="meta.sol", extra_keys=("meta.nums",), bad_rows="skip")
    assert read.examples[0].extra == {"meta.nums": [2, 2]} and len(read.skipped) == 1
    config = load_config("configs/algo/grpo.yaml", [f"data.row_adapter={adapter}:adapt"], warn=False)
    settings = row_settings(config, "prompt", "answer")
    adapted = read_prompts(rows, **(settings | {"bad_rows": "skip"}))
    (example,) = adapted.examples
    assert example.messages == (("user", "2 + 2"),) and example.answer == "4" and example.extra == {"nums": [2, 2]}
    assert adapted.skipped == [(2, "data.row_adapter raised KeyError: 'sol'")]
    with pytest.raises(DataError, match=r"line 2: data.row_adapter raised KeyError"):
        read_prompts(rows, **settings)
    bad = load_config("configs/algo/grpo.yaml", [f"data.row_adapter={adapter}:missing"], warn=False)
    with pytest.raises(SystemExit, match=r"^data.row_adapter=.*has no function 'missing'$"):
        row_settings(bad, "prompt", "answer")
