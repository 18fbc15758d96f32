"""tools/scaling_study.py: exact parameter counts, the two-point fit, measured rows and the written outputs."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import transformers

_TOOL = Path(__file__).resolve().parents[2] / "tools" / "scaling_study.py"
_SPEC = importlib.util.spec_from_file_location("scaling_study", _TOOL)
scaling_study = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(scaling_study)

TINY = {
    "vocab_size": 250,
    "hidden_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 96,
}


def _meta_count(config: transformers.PretrainedConfig) -> int:
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("config_cls", "extra"),
    [
        (transformers.LlamaConfig, {}),
        (transformers.LlamaConfig, {"head_dim": 32}),
        (transformers.Qwen2Config, {"tie_word_embeddings": True}),
        (transformers.Qwen3Config, {"head_dim": 32}),
    ],
)
def test_params_match_transformers(config_cls, extra) -> None:
    config = config_cls(**TINY, **extra)
    config.architectures = [config_cls.__name__.replace("Config", "ForCausalLM")]
    assert scaling_study.dense_decoder_params(config.to_dict()) == _meta_count(config)


def test_calibration_architectures() -> None:
    assert scaling_study.dense_decoder_params(scaling_study.LLAMA_31_8B) == 8_030_261_248
    assert round(scaling_study.dense_decoder_params(scaling_study.QWEN3_32B) / 1e9, 1) == 32.8


def test_fit_reproduces_calibration_points() -> None:
    fit = scaling_study.calibration_fit()
    for case in scaling_study.CALIBRATION:
        num_params = scaling_study.dense_decoder_params(case["arch"])
        predicted = scaling_study.predict_tokens_per_s_per_gpu(num_params, fit)
        assert predicted == pytest.approx(case["tokens_per_s_per_gpu"], rel=1e-6)
    assert 0 < fit[1] < 1.5  # bigger models are slower per GPU


def _write_run(root: Path) -> tuple[Path, list[dict]]:
    model = root / "tiny-qwen3"
    model.mkdir()
    config = transformers.Qwen3Config(**TINY, head_dim=32)
    config.architectures = ["Qwen3ForCausalLM"]
    (model / "config.json").write_text(json.dumps(config.to_dict()))
    run = root / "run_a"
    run.mkdir()
    config = {"model": {"path": str(model), "tensor_parallel": 1, "pipeline_parallel": 1}, "engine": {}}
    (run / "config.json").write_text(json.dumps(config))
    (run / "launch.json").write_text(json.dumps({"nodes": 2, "gpus_per_node": 4, "gpu": "H100"}))
    metrics = [
        {
            "step": s,
            "reward_mean": -1.0 + 0.2 * s,
            "time_generate": 10.0 + s,
            "time_reward": 0.5,
            "time_old_log_prob": 2.0,
            "time_train": 5.0 + s,
            "time_sync": 1.0,
            "time_step": 20.0 + 2 * s,
            "tokens_per_second": 800.0 + 100 * s,
        }
        for s in range(4)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in metrics))
    return run, metrics


def test_measured_row_by_hand(tmp_path: Path) -> None:
    run, _ = _write_run(tmp_path)
    args = scaling_study.build_parser().parse_args([str(run), "--out", str(tmp_path / "out")])
    rows, curves, notes = scaling_study.collect_rows(args, scaling_study.calibration_fit())
    (row,) = rows
    num_params = _meta_count(transformers.Qwen3Config(**TINY, head_dim=32))
    assert row["source"] == "measured" and not row["predicted"] and row["gpus"] == 8
    assert row["params_b"] == pytest.approx(num_params / 1e9)
    # steps 1..3 (step 0 is warm-up): generate 11,12,13; train 2+6,2+7,2+8; sync 1; step 22,24,26; tok/s 900..1100
    assert row["step_s"] == pytest.approx(24.0) and row["rollout_s"] == pytest.approx(12.0)
    assert row["train_s"] == pytest.approx(9.0) and row["sync_s"] == pytest.approx(1.0)
    assert row["other_s"] == pytest.approx(2.0)
    assert row["tokens_per_s_per_gpu"] == pytest.approx(1000.0 / 8)
    assert row["mfu"] == pytest.approx(6 * num_params * 125.0 / 989e12)
    assert curves["run_a"] == [(s, pytest.approx(-1.0 + 0.2 * s)) for s in range(4)]
    assert not any("assumed 1 node" in note for note in notes)


def test_main_writes_outputs_and_flags_predictions(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run, _ = _write_run(tmp_path)
    (run / "launch.json").unlink()
    arch = tmp_path / "qwen3_14b.json"
    arch.write_text(
        json.dumps(
            {
                **scaling_study.QWEN3_32B,
                "hidden_size": 5120,
                "num_hidden_layers": 40,
                "num_attention_heads": 40,
                "intermediate_size": 17408,
            }
        )
    )
    out = tmp_path / "out"
    assert scaling_study.main([str(run), "--predict", f"q14={arch}:16", "--out", str(out)]) == 0
    table = (out / "scaling_table.md").read_text()
    assert table in capsys.readouterr().out
    assert "| run_a |" in table and "| q14 |" in table and "assumed 1 node x 1 GPU" in table
    assert "ASSUMPTION" in table and "training-equivalent MFU (6N per token)" in table
    rows = {row["name"]: row for row in json.loads((out / "scaling.json").read_text())["rows"]}
    assert rows["run_a"]["source"] == "measured" and rows["run_a"]["gpus"] == 1
    q14 = rows["q14"]
    assert q14["source"] == "predicted" and q14["predicted"] and q14["gpus"] == 16
    assert "tokens_per_s_per_gpu" in q14["predicted_fields"]
    assert 571 < q14["tokens_per_s_per_gpu"] < 1581
    assert math.isclose(q14["rollout_s"] + q14["train_s"] + q14["sync_s"], q14["step_s"])
    assert q14["step_s"] == pytest.approx(scaling_study.DEFAULT_TOKENS_PER_STEP / (16 * q14["tokens_per_s_per_gpu"]))
    assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_default_reproduces_published_figures(tmp_path: Path) -> None:
    assert scaling_study.main(["--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "scaling.json").read_text())["rows"]
    assert [row["name"] for row in rows] == ["Llama-3.1-8B", "Qwen3-32B"]
    assert all(row["predicted"] for row in rows)
    for row, (tps, step) in zip(rows, ((1581, 92.8), (571, 376)), strict=True):
        assert row["tokens_per_s_per_gpu"] == pytest.approx(tps, rel=1e-6)
        assert row["step_s"] == pytest.approx(step, rel=1e-6)
    table = (tmp_path / "scaling_table.md").read_text()
    assert "1,581 (p)" in table and "571 (p)" in table


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--predict", "no_equals_sign"], "expected NAME=CONFIG_JSON[:GPUS]"),
        (["--predict", "x=/nonexistent/config.json:8"], "no such config file"),
        (["--predict", "x=CONFIG:0"], "GPUS >= 1"),
        (["--params-b", "run=abc"], "RUN_NAME=BILLIONS"),
        (["/nonexistent_run"], "has no metrics.jsonl"),
    ],
)
def test_bad_arguments_exit(tmp_path: Path, capsys: pytest.CaptureFixture, argv, message) -> None:
    if argv[-1] == "CONFIG:0":
        (tmp_path / "config.json").write_text("{}")
        argv = ["--predict", f"x={tmp_path / 'config.json'}:0"]
    with pytest.raises(SystemExit) as exit_info:
        scaling_study.main([*argv, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_run_without_size_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run, _ = _write_run(tmp_path)
    (run / "config.json").write_text(json.dumps({"model": {"path": str(tmp_path / "missing")}}))
    with pytest.raises(SystemExit):
        scaling_study.main([str(run), "--out", str(tmp_path / "out")])
    assert "--params-b run_a=BILLIONS" in capsys.readouterr().err
    assert scaling_study.main([str(run), "--params-b", "run_a=7.5", "--out", str(tmp_path / "out")]) == 0
    row = json.loads((tmp_path / "out" / "scaling.json").read_text())["rows"][0]
    assert row["params_b"] == pytest.approx(7.5)
