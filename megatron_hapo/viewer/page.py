"""One self-contained HTML page of rollout dumps: the data, the script and the style inline (works offline, from
a file, with no server and nothing fetched)."""

from __future__ import annotations

import json
from html import escape
from importlib import resources
from pathlib import Path
from typing import Any

from megatron_hapo.viewer.dumps import CENTRES, QUANTITIES, DumpError, StepDump, panel, read_dump, saved_steps, summary


def _asset(name: str) -> str:
    return resources.files("megatron_hapo.viewer").joinpath(name).read_text(encoding="utf-8")


def _script_json(data: Any) -> str:
    """JSON safe inside a ``<script>`` element (no ``</script>``, no ``<!--``)."""
    return json.dumps(data, allow_nan=False).replace("<", "\\u003c").replace(">", "\\u003e")


def render_page(title: str, summaries: list[dict[str, Any]], dumps: list[StepDump]) -> str:
    """The page of ``dumps`` (one panel each, side by side) under a table of ``summaries``."""
    data = {
        "title": title,
        "quantities": QUANTITIES,
        "centres": CENTRES,
        "summaries": summaries,
        "panels": [panel(dump) for dump in dumps],
    }
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{escape(title)}</title><style>{_asset('page.css')}</style></head>\n<body>"
        f"<h1>{escape(title)}</h1><div id='summary'></div><div id='controls'></div><div id='panels'></div>\n"
        f"<script type='application/json' id='data'>{_script_json(data)}</script>\n"
        f"<script>{_asset('page.js')}</script></body></html>\n"
    )


def pick_steps(available: dict[int, Path], wanted: list[int] | None, run: Path) -> list[int]:
    """The steps to show: ``wanted`` (each must be saved) or the last saved one."""
    if not wanted:
        return [max(available)]
    missing = [step for step in wanted if step not in available]
    if missing:
        raise DumpError(f"{run}: step {missing[0]} was not saved; saved steps: {sorted(available)}")
    return wanted


def build_page(runs: list[Path], steps: list[int] | None) -> tuple[str, int]:
    """The page of ``runs`` (one or two) at ``steps`` (of the first run; the same steps of a second), every saved
    step in the summary. Returns the page and the number of token elements it shows."""
    saved = {run: saved_steps(run) for run in runs}
    chosen = pick_steps(saved[runs[0]], steps, runs[0])
    labels = {run: run.name or str(run) for run in runs}
    if len(set(labels.values())) < len(runs):  # two runs of one name: their paths tell them apart
        labels = {run: str(run) for run in runs}
    summaries, shown = [], []
    for run in runs:
        for step, path in saved[run].items():
            if len(runs) > 1 and step not in saved[runs[0]]:
                continue
            dump = read_dump(path, labels[run])
            summaries.append(summary(dump))
            if step in chosen:
                shown.append(dump)
        missing = [step for step in chosen if step not in saved[run]]
        if missing:
            raise DumpError(f"{run}: step {missing[0]} was not saved; saved steps: {sorted(saved[run])}")
    shown.sort(key=lambda d: (chosen.index(d.step), runs.index(next(r for r in runs if labels[r] == d.run))))
    title = " vs ".join(labels[run] for run in runs) + " \u00b7 rollouts"
    tokens = sum(len(r["response_ids"]) for dump in shown for r in dump.responses)
    return render_page(title, summaries, shown), tokens


__all__ = ["build_page", "pick_steps", "render_page"]
