"""What the loop does between two steps besides saving: the step line of a log that is not a terminal, and the
test pacing that holds a run at a step boundary until an event a test waits for has happened.

Test pacing (never set by the launch scripts, the configs or the demos): when the environment variable
``MEGATRON_HAPO_TEST_HOLD`` names a file, every rank waits at each step boundary (before the first step too)
while that file exists and its first word is a step count the run has reached (an empty file: any), until a
stop is requested or the file is removed; with the word ``keep`` after the count only the file's removal ends
the hold (a stop request is then being handled, and the run is still there). A test that needs a run to be
training when something outside it lands (a Slurm time-limit warning, whose timing depends on slurmctld's
30-second timer; a second signal while the first is handled) holds it there instead of racing the machine's
speed: ``tests/slurm/test_launch_slurm.py``, ``tests/fault/test_signals.py``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from megatron_hapo.parallel.collectives import any_rank

logger = logging.getLogger(__name__)
HOLD_ENV = "MEGATRON_HAPO_TEST_HOLD"
HOLD_POLL_S = 0.2


def _hold_here(path: Path, steps_done: int) -> tuple[bool, bool]:
    """Whether the hold file asks for a hold at ``steps_done`` completed steps, and whether it keeps holding
    after a stop request (this rank's view of the file)."""
    try:
        words = path.read_text().split()
    except OSError:  # absent (or removed while read)
        return False, False
    return not words or steps_done >= int(words[0]), "keep" in words[1:]


def hold_between_steps(steps_done: int, should_stop: Callable[[], bool] | None) -> None:
    """Wait while the test-pacing file holds the run (see the module docstring); collective, every rank calls it.

    Every rank decides together (one ``any_rank`` per poll), so all leave the wait at the same poll.
    """
    name = os.environ.get(HOLD_ENV)
    if not name:
        return
    path, announced = Path(name), False
    while True:
        holds, keep = _hold_here(path, steps_done)
        if not any_rank(holds) or (not any_rank(keep) and any_rank(should_stop is not None and should_stop())):
            return
        if not announced:
            logger.info("test pacing: holding after %d steps while %s exists", steps_done, path)
            announced = True
        time.sleep(HOLD_POLL_S)


def step_line(step: int, total: int, metrics: Mapping[str, float]) -> str:
    """One line of a step for a log: ``step 2 (3/16) reward 0.250 acc 0.500 len 12.0 time 2.1s`` (``step`` as in
    ``metrics.jsonl``, counted from 0)."""
    return (
        f"step {step} ({step + 1}/{total}) reward {metrics.get('reward_mean', float('nan')):.3f} "
        f"acc {metrics.get('accuracy', float('nan')):.3f} len {metrics.get('response_length_mean', float('nan')):.1f} "
        f"time {metrics.get('time_step', float('nan')):.1f}s"
    )
