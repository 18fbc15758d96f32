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
