"""tools/plot_metrics.py draws the runs' curves into a PNG and refuses runs without metrics."""

import subprocess
import sys
from pathlib import Path

from megatron_hapo.trainer.metrics import MetricsWriter


def test_plot_two_runs(tmp_path: Path, repo_root: Path) -> None:
    for name, slope in (("hapo", 0.1), ("dapo", 0.05)):
        writer = MetricsWriter(tmp_path / name)
        for step in range(5):
            writer.write(step, {"reward_mean": -1 + slope * step, "accuracy": 0.5 + slope * step / 2})
        writer.close()
    out = tmp_path / "curves.png"
    tool = [sys.executable, str(repo_root / "tools" / "plot_metrics.py")]
    result = subprocess.run(
        [*tool, str(tmp_path / "hapo"), str(tmp_path / "dapo"), "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "reward_mean, accuracy" in result.stdout and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = subprocess.run(
        [*tool, str(tmp_path / "nothing"), "--out", str(out)], capture_output=True, text=True, check=False
    )
    assert missing.returncode == 2 and "has no metrics.jsonl" in missing.stderr


def test_curves_against_generated_samples_place_each_step_at_its_cost(tmp_path: Path) -> None:
    from megatron_hapo.trainer.plots import _x_values, plot

    rows = [{"step": 0, "generated_samples": 128.0}, {"step": 1, "generated_samples": 640.0}, {"step": 2}]
    assert _x_values(rows, "step") == [0, 1, 2]
    assert _x_values(rows, "samples") == [128.0, 768.0, 768.0]  # cumulative; a step without the metric adds 0
    writer = MetricsWriter(tmp_path / "dapo")
    for step, samples in enumerate((128.0, 1280.0)):
        writer.write(step, {"accuracy": 0.5, "generated_samples": samples})
    writer.close()
    assert plot([tmp_path / "dapo"], tmp_path / "curves.png") == ["accuracy"]
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
