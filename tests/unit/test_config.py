"""The config layer: strict keys, strict types, ranges, overrides, no-effect warnings, field docs."""

import dataclasses
import warnings
from pathlib import Path

import pytest

from megatron_hapo import config as cfg
from megatron_hapo.config import Config, ConfigError, ConfigWarning, load_config, parse_override


def _all_config_classes():
    seen, todo = [], [Config]
    while todo:
        cls = todo.pop()
        seen.append(cls)
        for f in dataclasses.fields(cls):
            tp = cls.__dataclass_fields__[f.name].type
            nested = getattr(cfg, tp, None) if isinstance(tp, str) else None
            if nested is not None and dataclasses.is_dataclass(nested):
                todo.append(nested)
    return seen


def test_every_field_has_a_docstring():
    classes = _all_config_classes()
    assert len(classes) >= 14
    for cls in classes:
        docs = cfg.field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


def test_defaults_are_valid_and_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = load_config(None)
    assert config.algo.advantage.kind == "grpo"
    assert config.algo.clip.eps_low == 0.2


def test_dotted_override_sets_nested_value_and_int_widens_to_float():
    config = load_config(None, ["algo.clip.eps_high=0.28", "optim.lr=1", "algo.clip.dual_clip_c=null"])
    assert config.algo.clip.eps_high == 0.28
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)
    assert config.algo.clip.dual_clip_c is None


def test_exponent_floats_that_yaml_reads_as_strings_are_numbers():
    assert load_config(None, ["optim.lr=1e-3"]).optim.lr == 1e-3  # YAML 1.1 makes "1e-3" a string
    with pytest.raises(ConfigError, match="expected float"):
        load_config(None, ["optim.lr=fast"])


def test_unknown_key_names_the_key_and_closest_valid_one():
    expected = r"unknown config key 'algo\.clip\.eps_hihg'; did you mean 'algo\.clip\.eps_high'"
    with pytest.raises(ConfigError, match=expected):
        load_config(None, ["algo.clip.eps_hihg=0.3"])
    with pytest.raises(ConfigError, match=r"'algo\.advantge'; did you mean 'algo\.advantage'"):
        load_config(None, ["algo.advantge.kind=grpo"])


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("algo:\n  clip:\n    epsilon_low: 0.1\n")
    with pytest.raises(ConfigError, match=r"algo\.clip\.epsilon_low.*did you mean 'algo\.clip\.eps_low'"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("algo.clip.eps_high=abc", r"algo\.clip\.eps_high: expected float, got str 'abc'"),
        ("train.ppo_epochs=1.5", r"train\.ppo_epochs: expected int, got float"),
        ("algo.advantage.std_norm=1", r"algo\.advantage\.std_norm: expected bool, got int"),
        ("algo.entropy.sign=positive", r"algo\.entropy\.sign: 'positive' is not one of 'published', 'paper'"),
        ("optim.betas=[0.9]", r"optim\.betas: expected a list of 2 values"),
        ("algo.clip=3", r"algo\.clip: expected a mapping"),
    ],
)
def test_wrong_types_are_reported_with_the_key(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])


def test_range_errors_are_all_listed_at_once():
    overrides = [
        "algo.clip.eps_low=1.5",
        "algo.sampling.temperature=0",
        "train.mini_batch_prompts=30",
        "algo.clip.dual_clip_c=0.5",
    ]
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert "algo.clip.eps_low=1.5 is out of range: must be in (0.0, 1.0)" in message
    assert "algo.sampling.temperature=0.0 is out of range" in message
    assert "train.mini_batch_prompts=30 must divide train.prompts_per_step=512" in message
    assert "algo.clip.dual_clip_c=0.5 is out of range" in message


def test_unknown_kind_lists_valid_kinds():
    expected = r"algo\.advantage\.kind='ppo' is not a known kind; valid kinds: grpo, hapo_token"
    with pytest.raises(ConfigError, match=expected):
        load_config(None, ["algo.advantage.kind=ppo"])


def test_overlong_buffer_longer_than_max_response_is_an_error():
    with pytest.raises(ConfigError, match="buffer_length=4096 exceeds rollout.max_response_length=1024"):
        load_config(None, ["algo.reward_shaping.kind=dapo_overlong", "rollout.max_response_length=1024"])


def test_knob_without_effect_warns():
    with pytest.warns(ConfigWarning, match=r"algo\.clip\.alpha=0\.5 has no effect with algo\.clip\.kind='fixed'"):
        load_config(None, ["algo.clip.alpha=0.5"])
    with pytest.warns(ConfigWarning, match=r"algo\.entropy\.sign='paper' has no effect"):
        load_config(None, ["algo.entropy.sign=paper"])
    with pytest.warns(ConfigWarning, match=r"algo\.sampling\.tau=0\.1 has no effect"):
        load_config(None, ["algo.sampling.tau=0.1"])


def test_entropy_scope_warns_when_only_sampling_uses_h_hat():
    with pytest.warns(ConfigWarning, match=r"algo\.entropy\.scope='step' has no effect: no h_hat consumer in the loss"):
        load_config(None, ["algo.sampling.kind=entropy_adaptive", "algo.entropy.scope=step"])


def test_knob_with_effect_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(None, ["algo.clip.kind=entropy_adaptive", "algo.clip.alpha=0.5", "algo.entropy.sign=paper"])


def test_base_files_merge_in_order_and_cycles_are_caught(tmp_path):
    (tmp_path / "a.yaml").write_text("algo:\n  clip: {eps_high: 0.3, eps_low: 0.1}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nalgo:\n  clip: {eps_high: 0.25}\n")
    config = load_config(tmp_path / "b.yaml", ["algo.clip.eps_low=0.15"])
    assert (config.algo.clip.eps_low, config.algo.clip.eps_high) == (0.15, 0.25)
    (tmp_path / "c.yaml").write_text("base: d.yaml\n")
    (tmp_path / "d.yaml").write_text("base: c.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "c.yaml")


def test_bad_files_and_overrides_give_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("algo: {clip: [\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(tmp_path / "broken.yaml")
    with pytest.raises(ConfigError, match="not of the form dotted.key=value"):
        parse_override("algo.clip.eps_high")
    with pytest.raises(ConfigError, match="'algo.clip.eps_high' is a value, not a section"):
        load_config(None, ["algo.clip.eps_high=0.3", "algo.clip.eps_high.x=1"])


def test_round_trip_through_tree_is_identity():
    config = load_config(None, ["algo.clip.eps_high=0.28", "optim.betas=[0.9, 0.95]"])
    rebuilt = cfg.build_dataclass(Config, cfg.to_tree(config))
    assert rebuilt == config


def test_override_values_mean_what_was_typed() -> None:
    """A text field takes the override's text verbatim (YAML would read ` #` as a comment); other fields the
    YAML value; `null` is None where allowed."""
    from megatron_hapo.config import load_config

    config = load_config(
        None,
        [
            "output.dir=/runs/exp #2",
            "model.path=/data/model dir/x #v2",
            "data.eval_sets.a=/data/a: b.jsonl",  # YAML would refuse the ': '
            "engine.kind=hf",
            "engine.tensor_parallel=1",
            "optim.lr=1e-3",
            "model.init_from=null",
            "output.eval.k=[1, 4]",
        ],
    )
    assert config.output.dir == "/runs/exp #2" and config.model.path == "/data/model dir/x #v2"
    assert config.data.eval_sets["a"].file == "/data/a: b.jsonl"
    assert (config.engine.kind, config.optim.lr, config.model.init_from, config.output.eval.k) == (
        "hf",
        1e-3,
        None,
        [1, 4],
    )


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "1e999"])
def test_nan_and_infinity_are_refused(value: str, tmp_path: Path) -> None:
    from megatron_hapo.config import load_config

    with pytest.raises(ConfigError, match=r"optim\.lr: .* is not a finite number"):
        load_config(None, [f"optim.lr={value}"])
    with pytest.raises(ConfigError, match=r"output\.reward_timeout_s: .* is not a finite number"):
        load_config(None, [f"output.reward_timeout_s={value}"])
    path = tmp_path / "c.yaml"
    path.write_text(f"algo: {{sampling: {{temperature: {value}}}}}\n")
    if value != "1e999":  # YAML's spellings in a file
        with pytest.raises(ConfigError, match=r"algo\.sampling\.temperature: .* is not a finite number"):
            load_config(path)
