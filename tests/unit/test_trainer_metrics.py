"""Evaluation estimators and the metrics sinks."""

import math
from pathlib import Path

import pytest

from megatron_hapo.trainer.evaluation import BestAndFinal, pass_at_k
from megatron_hapo.trainer.metrics import MetricsWriter, read_metrics


def test_pass_at_k_by_hand() -> None:
    assert pass_at_k(8, 0, 8) == 0.0 and pass_at_k(8, 1, 8) == 1.0
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(5, 2, 1) == pytest.approx(2 / 5)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_best_and_final_per_set_and_metric() -> None:
    tracker = BestAndFinal()
    for step, value in ((10, 0.2), (20, 0.5), (30, 0.4)):
        tracker.update(step, {"eval/aime/avg@8": value, "eval/aime/pass@8": 1.0, "eval/aime/truncated": 3, "loss": 1})
    assert tracker.best == {"eval/aime/avg@8": (0.5, 20), "eval/aime/pass@8": (1.0, 10)}  # accuracies only
    assert tracker.summary()["aime"]["avg@8"] == {"best": 0.5, "best_step": 20, "final": 0.4}


def test_metrics_are_written_as_jsonl_and_tensorboard(tmp_path: Path) -> None:
    writer = MetricsWriter(tmp_path)
    writer.write(0, {"loss": 1.5, "reward_mean": -0.25})
    writer.write(1, {"loss": float("nan"), "reward_mean": 0.0})
    with pytest.raises(TypeError, match="numbers"):
        writer.write(2, {"loss": "high"})
    writer.close()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1] and rows[0]["loss"] == 1.5 and math.isnan(rows[1]["loss"])
    assert any((tmp_path / "tensorboard").iterdir())
    MetricsWriter(tmp_path / "off", enabled=False).write(0, {"loss": 1.0})
    assert not (tmp_path / "off").exists()


def test_loss_metrics_weigh_micro_batches_by_their_tokens_and_skip_empty_ones():
    import torch

    from megatron_hapo.trainer.metrics import reduce_loss_metrics

    def mb(tokens: int, clip: float, rmax: float, guide_tokens: int = 0, **extra: float) -> dict:
        out = {
            "loss_share": torch.tensor(0.5),
            "entropy_sum": torch.tensor(2.0 * tokens),
            "num_tokens": torch.tensor(tokens),
            "clip_frac": torch.tensor(clip),
            "ratio_max": torch.tensor(rmax),
        }
        if guide_tokens:
            out.update(guide_num_tokens=torch.tensor(guide_tokens), guide_clip_frac=torch.tensor(extra["guide"]))
        return out

    out = reduce_loss_metrics([mb(30, 0.1, 1.5), mb(10, 0.5, 2.5, guide_tokens=4, guide=0.25), mb(0, 0.0, 9.0)])
    assert out["loss"] == 1.5 and out["entropy_mean"] == 2.0
    assert abs(out["clip_frac"] - (30 * 0.1 + 10 * 0.5) / 40) < 1e-7  # token-weighted; the empty one left out
    assert out["ratio_max"] == 2.5 and out["guide_clip_frac"] == 0.25
    only_guide = reduce_loss_metrics([mb(0, 0.0, 1.0, guide_tokens=8, guide=0.5)])
    assert "clip_frac" not in only_guide and only_guide["guide_clip_frac"] == 0.5


def test_phase_clock_splits_the_step_time():
    import time

    from megatron_hapo.trainer.metrics import PhaseClock

    clock = PhaseClock()
    with clock("generate"):
        time.sleep(0.02)
    with clock("train"):
        time.sleep(0.01)
    out = clock.metrics(response_tokens=100, total_tokens=300)
    assert out["time_generate"] >= 0.02 and out["time_train"] >= 0.01
    assert out["time_step"] >= out["time_generate"] + out["time_train"]
    assert out["rollout_tokens_per_second"] <= 100 / 0.02 and out["tokens_per_second"] <= 300 / 0.03


def test_eval_summary_is_strict_json_with_null_for_an_unmeasured_final(tmp_path: Path) -> None:
    import json

    tracker = BestAndFinal({"eval/aime/avg@4": (0.5, 15)})  # a checkpoint saved before finals were kept
    tracker.write(tmp_path / "eval_summary.json")
    text = (tmp_path / "eval_summary.json").read_text()
    assert json.loads(text) == {"aime": {"avg@4": {"best": 0.5, "best_step": 15, "final": None}}} and "NaN" not in text
    tracker.update(16, {"eval/aime/avg@4": 0.25, "eval/math/avg@4": float("nan")})  # a NaN is never a best
    tracker.write(tmp_path / "eval_summary.json")
    assert json.loads((tmp_path / "eval_summary.json").read_text()) == {
        "aime": {"avg@4": {"best": 0.5, "best_step": 15, "final": 0.25}}
    }
    resumed = BestAndFinal({"eval/aime/avg@4": (0.5, 15)}, {"eval/aime/avg@4": 0.25})  # evaluates nothing more
    assert resumed.summary() == tracker.summary()
    BestAndFinal().write(tmp_path / "none.json")  # nothing evaluated: no summary
    assert not (tmp_path / "none.json").exists()


def test_eval_metrics_are_grouped_per_set_with_their_mean() -> None:
    import torch

    from megatron_hapo.trainer.evaluation import EvalSettings, eval_metrics, set_metrics, with_mean

    settings = EvalSettings(n=4, ks=(1, 2, 4))
    correct = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    one = set_metrics(correct, lengths=[3] * 12, truncated=2, settings=settings)
    assert one["avg@4"] == pytest.approx(5 / 12) and one["pass@1"] == pytest.approx(one["avg@4"])
    assert one["pass@2"] == pytest.approx((0.5 + 1 + 0) / 3) and one["pass@4"] == pytest.approx(2 / 3)
    assert (one["truncated"], one["prompts"], one["response_length"]) == (2, 3, 3.0)
    other = set_metrics(correct[:1], lengths=[5] * 4, truncated=0, settings=settings)
    flat = eval_metrics({"aime": one, "math": other})
    assert flat["eval/mean/avg@4"] == pytest.approx((5 / 12 + 1 / 4) / 2)
    assert "eval/aime/prompts" not in flat and flat["eval/math/truncated"] == 0
    assert "eval/mean/response_length" not in flat and set(with_mean({"aime": one})) == {"aime"}  # one set: no mean


def test_a_resumed_writer_keeps_the_evaluation_before_training_and_a_fresh_one_drops_it(tmp_path: Path) -> None:
    writer = MetricsWriter(tmp_path)
    for step, row in ((-1, {"eval/a/avg@4": 0.1}), (0, {"loss": 1.0}), (1, {"loss": 2.0}), (2, {"loss": 3.0})):
        writer.write(step, row)
    writer.close()
    MetricsWriter(tmp_path, first_step=2).close()  # resumed from step_000002
    assert [r["step"] for r in read_metrics(tmp_path)] == [-1, 0, 1]
    MetricsWriter(tmp_path, first_step=0).close()  # a fresh start in the same directory
    assert read_metrics(tmp_path) == []


def test_tensorboard_tags_are_grouped(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = MetricsWriter(tmp_path)
    writer.write(-1, {"eval/aime/avg@8": 0.25})
    writer.write(0, {"reward_mean": 0.5, "eval/aime/avg@8": 0.5})
    writer.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"train/reward_mean", "eval/aime/avg@8"}
    assert [(e.step, e.value) for e in events.Scalars("eval/aime/avg@8")] == [(-1, 0.25), (0, 0.5)]


def _wandb_records(path: Path) -> list:
    """The records of a W&B ``.wandb`` file (a LevelDB-style log: a 7-byte file header, 32 KiB blocks, records
    of crc32c (4) length (2) type (1: full, 2: first, 3: middle, 4: last) and data) as protobuf ``Record``s."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, chunks, pending = path.read_bytes(), 7, 32768, [], b""
    assert data[:4] == b":W&B", data[:8]
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the block's tail is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            chunks.append(pending + chunk if kind == 4 else chunk)
        elif kind in (2, 3):
            pending = chunk if kind == 2 else pending + chunk
    records = []
    for raw in chunks:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        records.append(record)
    return records


def test_wandb_gets_the_runs_metrics_and_config_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real wandb package, offline: the run's metrics (grouped), config, name and group are in its run file,
    and a resumed writer continues the same W&B run."""
    pytest.importorskip("wandb", reason="the dev extra installs wandb")
    import json

    from megatron_hapo.trainer.metrics import WANDB_ID_FILE, WandbTarget

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    target = WandbTarget("hapo-study", name=None, group="tiny-study")
    writer = MetricsWriter(tmp_path / "run", wandb=target, config={"algo": {"clip": {"eps_high": 0.28}}})
    writer.write(-1, {"eval/aime/avg@4": 0.25})
    writer.write(0, {"reward_mean": 0.5, "accuracy": 0.75})
    writer.close()
    run_id = (tmp_path / "run" / WANDB_ID_FILE).read_text()
    (run_file,) = (tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    records = _wandb_records(run_file)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.project, run.display_name, run.run_group) == ("hapo-study", "run", "tiny-study")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["algo"] == {"clip": {"eps_high": 0.28}}
    history = [
        {("/".join(i.nested_key) if i.nested_key else i.key): json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    assert [(h["_step"], h.get("eval/aime/avg@4"), h.get("train/reward_mean")) for h in history] == [
        (0, 0.25, None),
        (1, None, 0.5),
    ]
    MetricsWriter(tmp_path / "run", wandb=target, first_step=1).close()  # resumed: the same W&B run
    assert (tmp_path / "run" / WANDB_ID_FILE).read_text() == run_id
    assert len(list((tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}"))) >= 1


def test_asking_for_wandb_without_the_package_stops_at_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from megatron_hapo.config import load_config
    from megatron_hapo.trainer import preflight

    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else found(name, *a))
    config = load_config(None, ["output.wandb_project=hapo"])
    with pytest.raises(SystemExit, match=r"wandb is not installed; pip install 'megatron_hapo\[wandb\]'"):
        preflight.check_inputs(config)
