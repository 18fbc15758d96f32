#!/usr/bin/env python
"""Draw the training curves of one or more runs into one PNG, to compare algorithms or settings.

    .venv/bin/python tools/plot_metrics.py RUN_DIR [RUN_DIR ...] --out curves.png [--metrics reward_mean accuracy]

Each RUN_DIR holds the ``metrics.jsonl`` the trainer writes; the legend uses the directory names. One panel per
metric (default: reward, accuracy, response length, entropy-adaptive temperature, rollout-vs-trainer KL); a
metric a run did not log is left out of that run's panel.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_hapo.trainer.plots import DEFAULT_METRICS, plot


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories with metrics.jsonl")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS), help="metrics to draw")
    args = parser.parse_args(argv)
    for run in args.runs:
        if not (run / "metrics.jsonl").is_file():
            parser.error(f"{run} has no metrics.jsonl")
    drawn = plot(args.runs, args.out, tuple(args.metrics))
    print(f"wrote {args.out}: {', '.join(drawn)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
