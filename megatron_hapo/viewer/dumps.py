"""Read a run's rollout dumps (:mod:`megatron_hapo.trainer.rollout_dump`) and summarise them for the viewer.

A dump is ``RUN/rollouts/step_000042.jsonl.gz``, one response per line. Reading is strict about what it needs
and counts what it skips: a line that is not JSON or lacks a key is skipped and counted (the page shows the
count), a file that cannot be read is an error naming it.
"""

from __future__ import annotations

import gzip
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_hapo.trainer.rollout_dump import DUMP_DIR

#: The per-token quantities a token can be coloured by: ``name -> (label, scale)``; ``diverging`` scales are
#: centred on the value in :data:`CENTRES` (0 where not listed), ``sequential`` ones run from the lowest shown.
QUANTITIES: dict[str, tuple[str, str]] = {
    "entropy": ("entropy", "sequential"),
    "h_hat": ("normalised entropy h_hat", "diverging"),
    "temperature": ("sampling temperature", "sequential"),
    "advantage": ("advantage after redistribution", "diverging"),
    "group_advantage": ("group advantage (before redistribution)", "diverging"),
    "eps_high": ("upper clip bound eps_high", "sequential"),
    "eps_low": ("lower clip bound eps_low", "sequential"),
    "ratio": ("first update's ratio", "diverging"),
    "rollout_log_prob": ("rollout log-prob", "sequential"),
    "old_log_prob": ("trainer's old log-prob", "sequential"),
}
CENTRES = {"ratio": 1.0}
#: The keys every dumped response needs.
REQUIRED = ("step", "group", "sample", "reward", "correct", "response_ids", "values")
_STEP_FILE = re.compile(r"step_(\d+)\.jsonl\.gz$")


class DumpError(ValueError):
    """A run or dump the viewer cannot read; the message names it and the fix."""


def saved_steps(run_dir: Path) -> dict[int, Path]:
    """``{step: dump file}`` of ``run_dir``, ascending."""
    folder = Path(run_dir) / DUMP_DIR
    if not Path(run_dir).is_dir():
        raise DumpError(f"{run_dir}: no such run directory")
    files = {int(m.group(1)): p for p in folder.glob("step_*.jsonl.gz") if (m := _STEP_FILE.search(p.name))}
    if not files:
        raise DumpError(f"{folder}: no rollout dumps; train with output.save_rollouts_every=N (e.g. 1) to write them")
    return dict(sorted(files.items()))


@dataclass
class StepDump:
    """One saved step of one run."""

    run: str
    step: int
    responses: list[dict[str, Any]]
    skipped: int = 0
    """Lines that were not a complete response (not JSON, a key missing)."""
    extra: dict[str, Any] = field(default_factory=dict)


def read_dump(path: Path, run: str = "") -> StepDump:
    """The responses of one dump file (bad lines skipped and counted)."""
    responses, skipped = [], 0
    try:
        with gzip.open(path, "rt", encoding="utf-8") as lines:
            for line in lines:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    skipped += 1
                    continue
                if not isinstance(row, dict) or any(key not in row for key in REQUIRED):
                    skipped += 1
                    continue
                responses.append(row)
    except (OSError, EOFError) as error:
        raise DumpError(f"{path}: cannot read the dump ({error}); was it copied completely?") from None
    match = _STEP_FILE.search(Path(path).name)
    return StepDump(run, int(match.group(1)) if match else -1, responses, skipped)


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def token_values(dump: StepDump, name: str) -> list[float]:
    """Every response token's ``name`` value of a step (non-finite ones left out)."""
    return [v for r in dump.responses for v in r["values"].get(name, []) if v is not None and math.isfinite(v)]


def summary(dump: StepDump) -> dict[str, Any]:
    """The step's row of the summary table."""
    rows = dump.responses
    out: dict[str, Any] = {
        "run": dump.run,
        "step": dump.step,
        "responses": len(rows),
        "groups": len({r["group"] for r in rows}),
        "reward": _mean([float(r["reward"]) for r in rows]),
        "accuracy": _mean([float(bool(r["correct"])) for r in rows]),
        "length": _mean([float(len(r["response_ids"])) for r in rows]),
        "skipped_lines": dump.skipped,
    }
    for name in ("entropy", "temperature", "eps_high", "ratio"):
        out[name] = _mean(token_values(dump, name))
    out["abs_advantage"] = _mean([abs(v) for v in token_values(dump, "advantage")])
    return out


def _token_text(response: dict[str, Any], index: int) -> str:
    """A token's text as dumped; ``<id>`` where it has none (no tokenizer, or an id it does not know)."""
    tokens = response.get("tokens")
    text = tokens[index] if isinstance(tokens, list) and index < len(tokens) else ""
    return text if text else f"<{response['response_ids'][index]}>"


def forking_tokens(dump: StepDump, top_share: float = 0.2, limit: int = 12) -> list[dict[str, Any]]:
    """The tokens that most often have an entropy in the step's top ``top_share`` (the "forking" tokens):
    ``[{token, count, share of its occurrences, mean entropy}]``, most frequent first."""
    entries = [
        (value, _token_text(r, i))
        for r in dump.responses
        for i, value in enumerate(r["values"].get("entropy", []))
        if value is not None and math.isfinite(value)
    ]
    if not entries:
        return []
    ordered = sorted(value for value, _ in entries)
    threshold = ordered[min(len(ordered) - 1, int(len(ordered) * (1 - top_share)))]
    high = Counter(text for value, text in entries if value >= threshold)
    every = Counter(text for _, text in entries)
    sums: Counter[str] = Counter()
    for value, text in entries:
        if value >= threshold:
            sums[text] += value
    return [
        {"token": text, "count": count, "share": count / every[text], "mean_entropy": sums[text] / count}
        for text, count in high.most_common(limit)
    ]


def histogram(values: list[float], bins: int = 24) -> dict[str, list[float]]:
    """``{"edges": [bins + 1], "counts": [bins]}`` over the values' range (empty lists without values)."""
    if not values:
        return {"edges": [], "counts": []}
    low, high = min(values), max(values)
    if high == low:  # one value: one bar at it
        return {"edges": [low, high], "counts": [float(len(values))]}
    width = (high - low) / bins
    counts = [0.0] * bins
    for value in values:
        counts[min(bins - 1, int((value - low) / width))] += 1
    return {"edges": [low + i * width for i in range(bins + 1)], "counts": counts}


def panel(dump: StepDump) -> dict[str, Any]:
    """What the page shows of one step: its summary, forking tokens, histograms and responses."""
    responses = sorted(dump.responses, key=lambda r: (r["group"], r["sample"]))
    return {
        "run": dump.run,
        "step": dump.step,
        "summary": summary(dump),
        "forking": forking_tokens(dump),
        "histograms": {name: histogram(token_values(dump, name)) for name in ("entropy", "temperature")},
        "responses": [
            {
                "group": r["group"],
                "sample": r["sample"],
                "reward": r["reward"],
                "correct": bool(r["correct"]),
                "finish_reason": r.get("finish_reason", ""),
                "prompt": r.get("prompt", " ".join(map(str, r.get("prompt_ids", [])))),
                "tokens": [_token_text(r, i) for i in range(len(r["response_ids"]))],
                "values": {name: r["values"][name] for name in (*QUANTITIES, "loss_mask") if name in r["values"]},
            }
            for r in responses
        ],
    }


__all__ = [
    "CENTRES",
    "QUANTITIES",
    "DumpError",
    "StepDump",
    "forking_tokens",
    "histogram",
    "panel",
    "read_dump",
    "saved_steps",
    "summary",
    "token_values",
]
