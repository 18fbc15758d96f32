"""What a failing launch test shows of a run: the trainer's own lines, not the libraries' INFO.

A rank's log holds megatron_hapo's messages (``<time> megatron_hapo.<module> [rank N]: ...``: the data, the
step lines of a log that is not a terminal, the stop message, the resume), the launch script's ``[launch]``
lines, and hundreds of lines of vLLM, Megatron and torch output around them. A failure message leads with the
first kind and with any Python traceback or faulthandler dump; the whole logs stay on disk, named in the message.
"""

from __future__ import annotations

import re
from pathlib import Path

#: A line of the trainer's own: its logging format (train._setup_logging), the launch script, a stop message.
OWN_LINE = re.compile(r"^\S+ \S+ megatron_hapo[.\w]* \[rank \d+\]: |^\[launch\]|^srun: ")
#: The first line of a block kept whole: a Python traceback or a faulthandler dump.
BLOCK_START = re.compile(r"^(Traceback \(most recent call last\):|Fatal Python error|Current thread|Thread 0x)")
#: The line that ends a traceback: the exception (``RuntimeError: ...``, ``KeyboardInterrupt``).
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(: .*)?$")


def trainer_lines(text: str, last: int = 40) -> list[str]:
    """The last ``last`` lines of ``text`` that are the trainer's own, tracebacks kept whole (their indented
    lines and the exception line that ends them)."""
    kept: list[str] = []
    in_block = False
    for line in text.splitlines():
        inside = in_block and (line.startswith((" ", "\t")) or not line.strip())
        ends = in_block and not inside and EXCEPTION_LINE.match(line) is not None
        in_block = BLOCK_START.match(line) is not None or inside
        if in_block or ends or OWN_LINE.match(line):
            kept.append(line)
    return kept[-last:]


def run_report(run_dir: Path, *outputs: str, last: int = 40) -> str:
    """The trainer's lines of every rank log under ``run_dir/logs`` and of ``outputs`` (batch or launcher
    output), each under its name, with the paths of the whole logs."""
    parts = []
    for i, output in enumerate(outputs):
        parts.append(f"-- launcher output {i} (trainer lines):\n" + "\n".join(trainer_lines(output, last)))
    for log in sorted(run_dir.glob("logs/*/rank-*.log")):
        lines = trainer_lines(log.read_text(errors="replace"), last)
        parts.append(f"-- {log} (trainer lines; the whole log is that file):\n" + "\n".join(lines))
    return "\n".join(parts)
