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
