#!/usr/bin/env python
"""Look inside a run, token by token: one self-contained HTML page of its rollout dumps.

    .venv/bin/python tools/inspect_rollouts.py RUN [--step S ...] [--compare RUN2] [--out page.html]

RUN is a run directory trained with ``output.save_rollouts_every=N`` (its ``rollouts/step_*.jsonl.gz``). The page
has a summary row per saved step, then the chosen steps (default: the last saved) side by side: each response
with its tokens coloured by a quantity you pick (entropy, h_hat, temperature, advantage before and after
redistribution, clip bounds, the first update's ratio, log-probs), every value of a token on hover, filters by
group, outcome and length, and per step the most frequent high-entropy ("forking") tokens and histograms of
entropy and temperature. ``--compare RUN2`` puts the same steps of a second run beside them (HAPO against DAPO
on the same prompts); several ``--step`` put steps of one run side by side. Open the page in any browser: it
needs no server and no network.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_hapo.viewer.dumps import DumpError
from megatron_hapo.viewer.page import build_page


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="run directory (output.dir) with rollouts/step_*.jsonl.gz")
    parser.add_argument("--step", type=int, action="append", help="a saved step to show (repeatable; default: last)")
    parser.add_argument("--compare", type=Path, help="a second run directory: its same steps side by side")
    parser.add_argument("--out", type=Path, help="the HTML file to write (default: RUN/rollouts.html)")
    args = parser.parse_args(argv)
    runs = [args.run] + ([args.compare] if args.compare else [])
    try:
        page, tokens = build_page(runs, args.step)
    except DumpError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = args.out or args.run / "rollouts.html"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(page, encoding="utf-8")
    except OSError as error:
        print(f"error: --out {out}: cannot write the page ({error.strerror}); pass a writable path", file=sys.stderr)
        return 2
    print(f"wrote {out} ({tokens} tokens; open it in a browser)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
