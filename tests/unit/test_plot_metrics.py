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
