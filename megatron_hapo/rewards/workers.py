"""Run a verifier in worker processes with a time and memory limit per call; a failure scores as wrong.

Verifiers parse untrusted model output (math-verify uses ``signal.alarm`` and sympy, which can hang or blow up
on adversarial input). :class:`RewardWorkers` keeps a few forkserver workers. Each call gets a deadline, counted
from the moment the worker starts the call (a worker says so first), so a worker's own start-up (the import of
the verifier's module: a second or more when it imports torch, longer on a loaded machine) never eats a call's
time; a worker that is not ready within ``startup_timeout_s`` counts as crashed. A worker that misses a deadline
is killed and replaced. A worker that dies (segfault, out of memory under ``RLIMIT_AS``) is
replaced too, and an exception inside the verifier is caught. Each of these scores the response with
``failure_value`` and is counted, so one bad response never stalls or crashes the run. Model output is only
ever passed as data: nothing is evaluated.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any


@dataclass(frozen=True)
class Outcome:
    """The result of one verifier call."""

    value: Any
    """The verifier's return value, or ``failure_value``."""
    status: str
    """``ok``, ``timeout`` (killed at the deadline), ``crash`` (the worker died) or ``error`` (it raised)."""
    detail: str = ""
    """Why it failed: the verifier's exception (``error``), or what happened to the worker."""


def _serve(conn: Connection, fn: Callable[..., Any], memory_mb: int | None) -> None:
    if memory_mb is not None:
        import resource  # noqa: PLC0415  (POSIX only)

        limit = memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    while True:
        try:
            index, args = conn.recv()
        except EOFError:
            return
        conn.send((index, "start", None))  # the call's time limit runs from here
        try:
            conn.send((index, "ok", fn(*args)))
        except Exception as exc:  # the verifier's own failure is data for the caller
            conn.send((index, "error", f"{type(exc).__name__}: {exc}"))


@dataclass
class _Worker:
    process: Any
    conn: Connection
    task: int | None = None
    deadline: float = 0.0
    started: bool = False
    """Whether the worker has started its task (its time limit runs), or is still getting ready for it."""


@dataclass
class RewardWorkers:
    """A pool of verifier processes; ``fn`` must be a module-level (picklable) function."""

    fn: Callable[..., Any]
    workers: int = 2
    timeout_s: float = 10.0
    memory_mb: int | None = 2048
    failure_value: Any = None
    startup_timeout_s: float = 300.0
    """How long a new worker may take to start its first call (a hang guard: the import of ``fn``'s module)."""
    counts: Counter = field(default_factory=Counter)
    """Outcomes by status since construction (``ok``, ``timeout``, ``crash``, ``error``)."""

    def __post_init__(self) -> None:
        if self.workers < 1 or not 0 < self.timeout_s < float("inf") or not 0 < self.startup_timeout_s < float("inf"):
            raise ValueError(
                f"need workers >= 1 and finite timeouts > 0, got {self.workers}, {self.timeout_s}, "
                f"{self.startup_timeout_s}"
            )
        self._context = mp.get_context("forkserver")
        self._pool = [self._start() for _ in range(self.workers)]

    def _start(self) -> _Worker:
        parent, child = self._context.Pipe()
        process = self._context.Process(target=_serve, args=(child, self.fn, self.memory_mb), daemon=True)
        process.start()
        child.close()
        return _Worker(process, parent)

    def _replace(self, worker: _Worker) -> _Worker:
        worker.process.kill()
        worker.process.join()
        worker.conn.close()
        fresh = self._pool[self._pool.index(worker)] = self._start()
        return fresh

    def map(self, calls: Sequence[tuple]) -> list[Outcome]:
        """``fn(*args)`` for every ``args`` in ``calls``, in order, each within the time limit."""
        results: list[Outcome | None] = [None] * len(calls)
        pending = list(range(len(calls)))[::-1]
        while pending or any(w.task is not None for w in self._pool):
            for worker in self._pool:
                if worker.task is None and pending:
                    worker.task = pending.pop()
                    self._send(worker, calls[worker.task])
            busy = [w for w in self._pool if w.task is not None]
            ready = wait([w.conn for w in busy], timeout=max(0.0, min(w.deadline for w in busy) - time.monotonic()))
            for worker in busy:
                if worker.conn in ready:
                    self._collect(worker, results)
                elif time.monotonic() >= worker.deadline:
                    assert worker.task is not None  # worker is in busy
                    late = worker.started
                    detail = f"no answer within {self.timeout_s} s" if late else "the worker did not start the call"
                    results[worker.task] = Outcome(self.failure_value, "timeout" if late else "crash", detail)
                    self._replace(worker)
        done: list[Outcome] = []
        for outcome in results:
            assert outcome is not None  # the loop above runs until every task has its outcome
            self.counts[outcome.status] += 1
            done.append(outcome)
        return done

    def _send(self, worker: _Worker, args: tuple) -> None:
        """Give ``worker`` its task; one found dead meanwhile (killed while idle) is replaced and the task goes to
        the new worker instead (nothing was started, so nothing is counted)."""
        try:
            worker.conn.send((worker.task, args))
        except OSError:  # BrokenPipeError, ConnectionResetError: the worker is gone
            task, worker = worker.task, self._replace(worker)
            worker.task = task
            worker.conn.send((task, args))
        worker.started = False
        worker.deadline = time.monotonic() + self.startup_timeout_s + self.timeout_s

    def _collect(self, worker: _Worker, results: list[Outcome | None]) -> None:
        task = worker.task
        assert task is not None  # called for busy workers only
        try:
            index, status, value = worker.conn.recv()
        except (EOFError, OSError):  # the worker died mid-call (crash, memory limit, killed)
            results[task] = Outcome(self.failure_value, "crash", "the worker died during the call")
            self._replace(worker)
            return
        if status == "start":  # the call begins now: its own time limit
            worker.started, worker.deadline = True, time.monotonic() + self.timeout_s
            return
        worker.task = None
        results[index] = Outcome(
            value if status == "ok" else self.failure_value, status, "" if status == "ok" else value
        )

    def close(self) -> None:
        """Stop the workers."""
        for worker in self._pool:
            worker.conn.close()
            worker.process.kill()
            worker.process.join()
        self._pool = []
