"""Stop signals and the processes a run starts: a stop request reaches the run, never its helper processes, and
nothing the run started outlives it.

Slurm signals every process of a job step (``scancel --signal``, the ``--signal=SIG@T`` warning, the time limit,
plain ``scancel``), not only the ranks: the verifier forkserver and its workers, Megatron's checkpoint-writer
manager (a spawned process) and any other helper get the same SIGUSR1 / SIGTERM, and by default die of it, so
the rank then fails on a broken pipe. :class:`StopSignals`, installed first thing in a rank (or in the parent of
local ranks), therefore *blocks* SIGUSR1, SIGTERM and SIGINT in the main thread. Threads and processes started
later inherit the blocked mask (across ``fork`` and ``exec``), so helpers never act on a stop signal; a watcher
thread takes them with ``sigwait``:

- the first asks the run to stop (:meth:`StopSignals.requested`: the loop checkpoints after the step and exits
  with ``EXIT_REQUEUE``);
- the second kills every descendant process (SIGKILL) and exits at once with status 1. A second request is a
  *different* stop signal (the time limit's SIGTERM after its USR1 warning), or a second Ctrl-C (SIGINT). A
  repeat of SIGUSR1 or SIGTERM is the same request, however late it comes (:data:`REPEATABLE`): under Slurm a
  ``scancel`` reaches a rank directly and again through srun, and a preemption may be signalled twice; the
  escalation of those is Slurm's own SIGKILL after ``KillWait``. No timing window decides.

A helper that must be stopped is therefore killed (SIGKILL), not terminated: a blocked SIGTERM never arrives.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

logger = logging.getLogger(__name__)

#: The signals that ask a run to stop: Slurm's warning (``--signal=USR1@T``), SIGTERM (scancel, time limit, node
#: drain) and SIGINT (Ctrl-C; srun forwards it).
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
#: Stop signals whose repeat is the same request: a plain ``scancel`` (or the time limit) SIGTERMs every process
#: of the step and srun passes its own SIGTERM on too; a preemption's USR1 may be sent twice. SIGINT is not
#: among them: Ctrl-C twice means "now".
REPEATABLE = frozenset({signal.SIGUSR1, signal.SIGTERM})
_PR_SET_PDEATHSIG = 1


class StopSignals:
    """Block :data:`STOP_SIGNALS` in this process's main thread (and so in everything started later) and count
    them on a watcher thread. Create it in the main thread, before any helper process or thread starts, and
    before ``import torch`` (which starts a thread; this module imports only the standard library).

    ``shared`` (the parent of local ranks) keeps the request in a ``multiprocessing`` event that the spawned
    ranks read (:meth:`event`), since they inherit the blocked mask and never see a signal themselves.
    """

    def __init__(self, *, shared: bool = False) -> None:
        import multiprocessing as mp  # noqa: PLC0415

        self.count = 0
        self._first: int | None = None
        self.repeats = 0
        """Repeats of the first signal taken as the same request (:data:`REPEATABLE`)."""
        if len(os.listdir("/proc/self/task")) > 1:  # e.g. ``import torch`` starts one
            logger.warning(
                "threads started before the stop signals were blocked (import torch after StopSignals): "
                "a stop signal one of them takes waits until the main thread runs Python"
            )
        self._event: Any = mp.get_context("spawn").Event() if shared else threading.Event()
        # a thread that existed before (none in our entry points) could still take a signal: handle it the same
        for signum in STOP_SIGNALS:
            signal.signal(signum, lambda signum, _frame: self._received(signum))
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        # multiprocessing's resource tracker, started by the first helper, unblocks SIGINT and SIGTERM in the
        # starting thread once it runs (CPython's resource_tracker.ensure_running): start it now, block again
        from multiprocessing import resource_tracker  # noqa: PLC0415

        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        threading.Thread(target=self._watch, name="stop-signals", daemon=True).start()

    @property
    def event(self) -> Any:
        """The stop request as an event (a ``multiprocessing`` one when ``shared``)."""
        return self._event

    def requested(self) -> bool:
        """Whether a stop was asked for (the loop asks after every step; in the main thread)."""
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # again, should a library have unblocked them
        return self._event.is_set()

    def _watch(self) -> None:
        while True:
            self._received(signal.sigwait(STOP_SIGNALS))

    def _received(self, signum: int) -> None:
        if signum == self._first and signum in REPEATABLE:
            self.repeats += 1  # the first request again: Slurm delivers scancel's SIGTERM directly and through srun
            logger.warning("signal %d again: the same stop request, still finishing the step", signum)
            return
        self._first = self._first or signum
        self.count += 1
        if self.count > 1:
            logger.warning("signal %d again: stopping every process of this run now", signum)
            kill_descendants()
            os._exit(1)  # the last complete checkpoint stays; a save in progress is only a staging directory
        logger.warning("signal %d: finishing this step, then checkpointing and stopping", signum)
        self._event.set()


def _stat(pid: int | str) -> list[str] | None:
    """``/proc/<pid>/stat`` after ``pid (comm)``: state, parent pid, ... (``None``: no such process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def running(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited (a zombie has)."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def still_running(pids: list[int], timeout_s: float = 60.0) -> list[int]:
    """Those of ``pids`` still running once every one has ended or ``timeout_s`` has passed (waits for the event;
    the timeout only guards against a hang: a killed process ends once the kernel has freed its memory, which
    takes longer on a loaded machine)."""
    deadline = time.monotonic() + timeout_s
    while [pid for pid in pids if running(pid)] and time.monotonic() < deadline:
        time.sleep(0.05)
    return [pid for pid in pids if running(pid)]


def descendants(pid: int | None = None) -> list[int]:
    """Every living descendant of process ``pid`` (default: this one), children before grandchildren (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        fields = _stat(entry.name) if entry.name.isdigit() else None  # gone meanwhile: None
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, frontier = [], [os.getpid() if pid is None else pid]
    while frontier:
        kids = [kid for parent in frontier for kid in children.get(parent, [])]
        found += kids
        frontier = kids
    return found


def kill_descendants() -> int:
    """SIGKILL every descendant of this process (stop signals are blocked in them); returns how many."""
    pids = descendants()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent exits, however the parent dies (Linux; a no-op
    elsewhere). For the spawned local ranks: a SIGINT death signal (torch's default) waits on the blocked mask."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def exit_after_cleanup(status: int) -> NoReturn:
    """End this process with ``status``: the ``atexit`` handlers run, then the process exits without the
    interpreter's finalisation.

    The handlers (multiprocessing's, which stops managers and joins helper processes; logging's; the libraries')
    run while the interpreter is whole. What is skipped is the teardown after them, where PyTorch's autograd and
    gloo threads can race the interpreter and crash a process whose work is done (pytorch/pytorch#190489: SIGSEGV or
    SIGABRT at exit), turning a finished rank into a failed job that Slurm does not requeue. The same cure as
    TensorRT-LLM's spawned workers (NVIDIA/TensorRT-LLM#15820).
    """
    atexit._run_exitfuncs()  # private but long-standing: the handlers, in the order the interpreter runs them
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


#: Exit status of a refused input (a config, file, key or argument): one line on stderr, as argparse exits.
EXIT_BAD_INPUT = 2


def run_cli(main: Callable[[], int | None]) -> int:
    """``main()``'s status, with a refused input (``SystemExit`` carrying its one-line message) turned into
    that line on stderr and :data:`EXIT_BAD_INPUT`, and a failed local rank (``RankFailedError``) into its line
    and status 1; any other exit or exception passes through."""
    from megatron_hapo.parallel.local_launch import RankFailedError  # noqa: PLC0415

    try:
        return main() or 0
    except RankFailedError as exc:  # its line; the traceback is in the file the line names
        sys.stderr.write(f"{exc}\n")
        return 1
    except SystemExit as exc:
        if not isinstance(exc.code, str):
            raise
        sys.stderr.write(exc.code + "\n")
        return EXIT_BAD_INPUT
