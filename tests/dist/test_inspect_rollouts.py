"""The README's "Look inside a run" lines, as written: a three-step HAPO run at two ranks dumps its rollouts, the
viewer writes its page, and headless Chromium renders it offline: every dumped token of the two steps shown is a
token element, in order, with the dump's text and every value exactly as dumped in its hover text; a screenshot
is taken."""

from __future__ import annotations

import gzip
import json
import math
import subprocess
import sys
from pathlib import Path

from browser import Tokens, rendered_dom, screenshot
from test_plugins import readme_lines

REPO = Path(__file__).resolve().parents[2]
SECTION = "## Look inside a run, token by token"


def _dumped(run_dir: Path, step: int) -> list[dict]:
    with gzip.open(run_dir / "rollouts" / f"step_{step:06d}.jsonl.gz", "rt") as lines:
        rows = [json.loads(line) for line in lines]
    return sorted(rows, key=lambda r: (r["group"], r["sample"]))


def _title_values(title: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in title.splitlines()[1:])


def test_the_page_of_a_hapo_run_in_a_browser(tmp_path: Path) -> None:
    for name in ("tools", "megatron_hapo", "configs"):
        (tmp_path / name).symlink_to(REPO / name)
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))  # the virtual environment running the tests
    commands = readme_lines(REPO / "README.md", SECTION)
    assert len(commands) == 3 and "output.save_rollouts_every=1" in commands[1], commands
    for command in commands:
        result = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{command}\n{result.stderr[-4000:]}"
    run_dir, page = tmp_path / "runs" / "inspect" / "hapo", tmp_path / "runs" / "inspect" / "hapo.html"
    assert sorted(p.name for p in (run_dir / "rollouts").iterdir()) == [f"step_00000{s}.jsonl.gz" for s in range(3)]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(row["rollout_dump_errors"] == 0 for row in rows)
    expected = [(row, i) for step in (1, 2) for row in _dumped(run_dir, step) for i in range(len(row["response_ids"]))]
    assert all(len(_dumped(run_dir, step)) == 8 for step in range(3))  # two whole groups of four per step

    dom = rendered_dom(page)
    assert 'data-rendered="1"' in dom, dom[-2000:]
    parsed = Tokens()
    parsed.feed(dom)
    assert parsed.headings == ["hapo \u00b7 step 1", "hapo \u00b7 step 2"]
    assert len(parsed.tokens) == len(expected)  # every saved token of the two steps, nothing more
    names = ("entropy", "h_hat", "temperature", "advantage", "group_advantage", "eps_low", "eps_high", "ratio")
    for (text, title), (row, i) in zip(parsed.tokens, expected, strict=True):
        token = row["tokens"][i]
        shown_text = token.replace("\n", "\u21b5\n").replace("\t", "\u2192\t")
        assert text == (shown_text if token else f"<{row['response_ids'][i]}>")
        shown = _title_values(title)
        for name in (*names, "rollout_log_prob", "old_log_prob", "loss_mask"):
            value = row["values"][name][i]
            assert (shown[name] == "null") if value is None else math.isclose(float(shown[name]), value, rel_tol=0)
    picture = screenshot(page, tmp_path / "inspect_rollouts.png")
    header = picture.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(header[16:20], "big") == 1400
