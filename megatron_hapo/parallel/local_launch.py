"""Run a function on ``world`` local processes joined by one process group (tools, self-checks, ``--local-ranks``).

On a machine with at least ``world`` GPUs each rank takes ``cuda:<rank>`` and the group is NCCL, exactly as
under ``torchrun``; otherwise the ranks run on the CPU over gloo (with CUDA hidden from them when there are too
few GPUs or when asked for the CPU, so that every rank takes the CPU path of
:mod:`megatron_hapo.parallel.runtime`).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import tempfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from megatron_hapo.parallel import runtime
from megatron_hapo.processes import die_with_parent, exit_after_cleanup

logger = logging.getLogger(__name__)


_Meeting = tuple[str, timedelta | None]
"""Where the local ranks meet (the rendezvous file) and their collectives' timeout."""


def _entry(rank: int, world: int, meeting: _Meeting, body: Callable[..., object], args: tuple) -> None:
    rendezvous, timeout = meeting
    die_with_parent()  # nothing outlives the parent, whatever it dies of
    faulthandler.enable()  # a crash in native code leaves every thread's Python stack on stderr
    os.environ[runtime.LOCAL_RANK_ENV] = str(rank)
    with runtime.process_group(init_method=f"file://{rendezvous}", rank=rank, world_size=world, timeout=timeout):
        body(rank, world, *args)
    exit_after_cleanup(0)  # a failed body raises to torch's spawn wrapper, which reports it to the parent


class RankFailedError(RuntimeError):
    """A local rank failed: the message is one line (the rank and its error's first line), for the user's
    terminal (``processes.run_cli`` prints only it); the rank's whole traceback is chained (``__cause__``) and
    written to the error log."""


def _error_line(text: str) -> str:
    """The exception line of a traceback's text (the first line after its last indented one)."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    indented = [i for i, line in enumerate(lines) if line.startswith(" ")]
    after = indented[-1] + 1 if indented else 0
    return lines[after] if after < len(lines) else (lines[-1] if lines else "no message")


def _rank_failure(exc: Exception, error_log: Path | None) -> RankFailedError:
    """The one-line :class:`RankFailedError` of a failed ``mp.spawn``; the whole text goes to ``error_log`` (or a
    file in the system's temporary directory), which the line names."""
    text = str(exc)
    if isinstance(exc, mp.ProcessRaisedException):
        summary = f"rank {exc.error_index} failed: {_error_line(text)}"
    else:  # ProcessExitedException: it printed its own message (a one-line SystemExit) or died
        summary = f"rank {getattr(exc, 'error_index', '?')}: {text.strip().splitlines()[-1]}"
    if error_log is None:  # no run directory to keep it in: the system's temporary directory
        handle, name = tempfile.mkstemp(prefix="megatron_hapo-rank-error-", suffix=".log")
        os.close(handle)
        error_log = Path(name)
    error_log.parent.mkdir(parents=True, exist_ok=True)
    error_log.write_text(text + "\n")
    return RankFailedError(f"{summary} (traceback: {error_log})")


def run_local_ranks(
    body: Callable[..., object],
    world: int,
    *args: Any,
    device: str = "auto",
    rendezvous_dir: Path | None = None,
    error_log: Path | None = None,
    timeout: timedelta | None = None,
) -> None:
    """Call the module-level ``body(rank, world, *args)`` on ``world`` processes; a failing rank raises here a
    :class:`RankFailedError`: one line for the terminal, the rank's traceback in ``error_log`` (when given).

    ``device="cpu"`` keeps the ranks on the CPU even on a GPU node (the conversion tools: a whole model shard in
    host memory, where a GPU might not hold it); ``auto`` uses one GPU per rank when there are enough.
    ``rendezvous_dir``: where the ranks meet (a temporary directory by default). ``timeout``: of every collective
    (:data:`~megatron_hapo.parallel.runtime.DEFAULT_TIMEOUT` by default).
    """
    if device not in ("auto", "cpu"):
        raise ValueError(f"device must be auto or cpu, got {device!r}")
    hide_gpus = torch.cuda.is_available() and (device == "cpu" or torch.cuda.device_count() < world)
    if hide_gpus and device == "auto":
        logger.warning("%d local ranks but %d GPUs: the ranks run on the CPU", world, torch.cuda.device_count())
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hide_gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # read by the spawned children when they import torch
    try:
        with tempfile.TemporaryDirectory(dir=rendezvous_dir) as tmp:
            meeting = (str(Path(tmp) / "rendezvous"), timeout)
            mp.spawn(_entry, args=(world, meeting, body, args), nprocs=world, join=True)
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
        raise _rank_failure(exc, error_log) from exc
    finally:
        if hide_gpus:
            if saved is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = saved
