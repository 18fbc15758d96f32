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


def test_best_and_final() -> None:
    tracker = BestAndFinal("avg@8")
    for step, value in ((10, 0.2), (20, 0.5), (30, 0.4)):
        tracker.update(step, {"avg@8": value})
    assert (tracker.best, tracker.best_step, tracker.final) == (0.5, 20, 0.4)


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

    from megatron_hapo.trainer.loop import _write_eval_summary

    tracker = BestAndFinal("avg@4", best=0.5, best_step=15)  # resumed at its last step: nothing measured since
    _write_eval_summary(tmp_path / "eval_summary.json", tracker)
    text = (tmp_path / "eval_summary.json").read_text()
    assert json.loads(text) == {"avg@4": {"best": 0.5, "best_step": 15, "final": None}} and "NaN" not in text
    tracker.update(16, {"avg@4": 0.25})
    _write_eval_summary(tmp_path / "eval_summary.json", tracker)
    assert json.loads((tmp_path / "eval_summary.json").read_text())["avg@4"]["final"] == 0.25
