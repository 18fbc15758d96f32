"""Several evaluation sets: their config (a path or a mapping), columns found per file, prompt templates and
answer rules, the shipped example data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_hapo.config import ConfigError, load_config
from megatron_hapo.data.arithmetic import EXAMPLES, write_arithmetic_data
from megatron_hapo.data.prompts import TEMPLATES, read_prompts
from megatron_hapo.rewards.math_answer import math_reward
from megatron_hapo.trainer.preflight import eval_specs, read_eval_sets

HAPO = Path(__file__).resolve().parents[2] / "configs" / "algo" / "hapo.yaml"


def test_the_shipped_example_data_is_the_generators_output(tmp_path: Path) -> None:
    for path in write_arithmetic_data(tmp_path):
        assert path.read_bytes() == (EXAMPLES / path.name).read_bytes(), path.name
    train = read_prompts(EXAMPLES / "train.jsonl")  # DAPO's keys, the trainer's defaults
    assert len(train.examples) == 200 and train.examples[0].messages[0][0] == "user"


def test_eval_sets_take_a_path_or_a_mapping_and_find_each_files_columns() -> None:
    config = load_config(
        HAPO,
        [
            f"data.eval_sets.aime={EXAMPLES / 'test_aime.jsonl'}",
            f"data.eval_sets.math.file={EXAMPLES / 'test_math.jsonl'}",
            "data.eval_sets.math.template=boxed",
            f"data.eval_file={EXAMPLES / 'train.jsonl'}",
        ],
    )
    sets = {one.name: one for one in read_eval_sets(config, eval_specs(config))}
    assert list(sets) == ["train", "aime", "math"]  # data.eval_file is named after its stem
    aime, math = sets["aime"], sets["math"]
    assert aime.reward == "dapo_math" and math.reward == "boxed_math"  # data.reward; the boxed template's rule
    assert aime.examples[0].messages == (("user", "What is 0 + 9 ?"),) and aime.examples[0].answer == "9"
    question = "What is 5 * 3 ?"
    assert math.examples[0].messages == (("user", TEMPLATES["boxed"].replace("{problem}", question)),)
    assert math.examples[0].answer == "5 * 3 = \\boxed{15}"  # MATH's solution: the rules take its last \boxed{}
    assert math_reward("so \\boxed{15}", math.examples[0].answer, rule="boxed_math") == (1.0, True)
    assert math_reward("Answer: 15", math.examples[0].answer, rule="dapo_math") == (1.0, True)
    assert math_reward("Answer: 16", math.examples[0].answer, rule="dapo_math") == (-1.0, False)


def test_a_template_of_ones_own_and_a_named_column(tmp_path: Path) -> None:
    path = tmp_path / "olympiad.jsonl"
    rows = [
        {"question": "What is 2 + 2 ?", "final_answer": ["4"]},
        {"question": "What is 9 * 3 ?", "final_answer": 27.0},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = load_config(
        HAPO,
        [
            f"data.eval_sets.oly.file={path}",
            "data.eval_sets.oly.template=Q: {problem} A:",
            "data.eval_sets.oly.reward=boxed_math",
        ],
    )
    (oly,) = read_eval_sets(config, eval_specs(config))
    assert [e.messages[0][1] for e in oly.examples] == ["Q: What is 2 + 2 ? A:", "Q: What is 9 * 3 ? A:"]
    assert [e.answer for e in oly.examples] == ["4", "27"]  # a list of one; AMC's integral floats
    assert oly.reward == "boxed_math"
    named = load_config(HAPO, [f"data.eval_sets.oly.file={path}", "data.eval_sets.oly.answer_key=missing"])
    with pytest.raises(SystemExit, match=r"data.eval_sets.oly: .*line 1: missing key 'missing'.*answer_key"):
        read_eval_sets(named, eval_specs(named))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["output.eval_k=4"], "'output.eval_k' is now 'output.eval.n'"),
        (["data.eval_sets.a.template=boxed"], "data.eval_sets.a: missing 'file'"),
        (["data.eval_sets.a.file=x", "data.eval_sets.a.template=fancy"], "one of none, dapo, boxed, or a text"),
        (["data.eval_sets.mean=x"], "not 'mean'"),
        (["output.eval.n=4", "output.eval.k=[1,8]"], r"output.eval.k\[1\]=8 is out of range"),
        (["output.eval.top_p=0"], "output.eval.top_p=0.0 is out of range"),
    ],
)
def test_eval_config_errors_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(HAPO, overrides)


def test_a_set_named_twice_and_a_missing_file_are_refused(tmp_path: Path) -> None:
    clash = load_config(HAPO, [f"data.eval_file={tmp_path / 'aime.jsonl'}", "data.eval_sets.aime=other.jsonl"])
    with pytest.raises(SystemExit, match="data.eval_sets.aime: also the name of data.eval_file's set"):
        eval_specs(clash)
    missing = load_config(HAPO, ["data.eval_sets.aime=/nowhere/aime.jsonl"])
    with pytest.raises(SystemExit, match=r"data.eval_sets.aime='/nowhere/aime.jsonl': no such file"):
        read_eval_sets(missing, eval_specs(missing))
    cli = eval_specs(missing, {"aime": str(EXAMPLES / "test_aime.jsonl")})  # --set replaces the config's set
    assert cli["aime"][0] == "--set aime" and len(read_eval_sets(missing, cli)[0].examples) == 50
