"""Stop signals reach the run, never its helpers, and nothing a run starts outlives it (parallel/processes.py).

Slurm sends a job step's signals to every process it tracks. Here every process of a small program gets them:
the main process (with :class:`StopSignals`), verifier workers and their forkserver, and a spawned
``multiprocessing`` manager (what Megatron's checkpoint writer starts). The helpers must keep working; the
second signal must leave no process behind. The same for the parent of local ranks (``--local-ranks``) under
two Ctrl-C, with ranks stuck where a signal cannot interrupt them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from megatron_hapo.processes import descendants, running, still_running

HELPERS = """
import json, multiprocessing as mp, operator, sys
from megatron_hapo.processes import StopSignals, descendants

if __name__ == "__main__":
    stops = StopSignals()
    from megatron_hapo.rewards import RewardWorkers  # after: it imports torch, which starts a thread

    workers = RewardWorkers(operator.add, workers=2, timeout_s=30.0)
    manager = mp.get_context("spawn").Manager()  # as Megatron's FileSystemWriterAsync does
    queue = manager.Queue()
    print(json.dumps(descendants()), flush=True)
    sys.stdin.readline()  # the test signals every process, then says go
    outcomes = workers.map([(1, 2), (3, 4), (5, 6)])
    queue.put("written")
    print(json.dumps({"requested": stops.requested(), "sums": [o.value for o in outcomes],
                      "status": [o.status for o in outcomes], "queue": queue.get()}), flush=True)
    sys.stdin.readline()  # waits here for the second signal
"""

LOCAL_RANKS = """
import multiprocessing as mp, sys, time
from pathlib import Path
from megatron_hapo.processes import StopSignals

def body(rank, world, stop, out):
    manager = mp.get_context("spawn").Manager()  # a rank's own helper
    (Path(out) / f"ready-{rank}").write_text("")
    while not stop.is_set():
        time.sleep(0.05)
    (Path(out) / f"saw-stop-{rank}").write_text("")
    while True:  # stuck: as in a collective, which no signal interrupts
        time.sleep(0.05)

if __name__ == "__main__":
    stops = StopSignals(shared=True)  # before torch (imported by local_launch) starts a thread
    from megatron_hapo.parallel.local_launch import run_local_ranks

    run_local_ranks(body, 2, stops.event, sys.argv[1], device="cpu")
"""


def _start(tmp_path: Path, source: str, *args: str, stderr: int | None = None) -> subprocess.Popen:
    script = tmp_path / "program.py"
    script.write_text(textwrap.dedent(source))
    return subprocess.Popen(
        [sys.executable, str(script), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        start_new_session=True,
    )


def test_helpers_survive_stop_signals_and_the_second_signal_leaves_nothing(tmp_path: Path) -> None:
    program = _start(tmp_path, HELPERS)
    try:
        helpers = json.loads(program.stdout.readline())
        assert len(helpers) >= 4, helpers  # forkserver, two workers, the manager (and a resource tracker)
        os.kill(program.pid, signal.SIGUSR1)
        for pid in helpers:  # as slurmstepd does: every process of the step, each stop signal (and SIGCONT)
            for signum in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGCONT):
                os.kill(pid, signum)
        time.sleep(0.5)
        assert all(running(pid) for pid in helpers), [pid for pid in helpers if not running(pid)]
        program.stdin.write("go\n")
        program.stdin.flush()
        report = json.loads(program.stdout.readline())
        assert report == {"requested": True, "sums": [3, 7, 11], "status": ["ok"] * 3, "queue": "written"}, report
        os.kill(program.pid, signal.SIGTERM)  # the second stop signal: out at once, and everything with it
        assert program.wait(timeout=60) == 1
        assert not still_running(helpers)
    finally:
        program.kill()


def test_local_ranks_get_the_stop_and_two_ctrl_c_leave_no_rank_behind(tmp_path: Path) -> None:
    program = _start(tmp_path, LOCAL_RANKS, str(tmp_path))
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("ready-*"))) < 2 and program.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        started = descendants(program.pid)
        assert len(started) >= 4, started  # two ranks, their managers
        os.killpg(program.pid, signal.SIGINT)  # Ctrl-C: the whole foreground process group
        while len(list(tmp_path.glob("saw-stop-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sorted(p.name for p in tmp_path.glob("saw-stop-*")) == ["saw-stop-0", "saw-stop-1"]
        assert program.poll() is None and all(running(pid) for pid in started)  # the first only asks
        os.killpg(program.pid, signal.SIGINT)  # a second press (the first was taken: the ranks saw it)
        assert program.wait(timeout=60) == 1
        assert not still_running(started)
    finally:
        program.kill()


def test_a_dead_idle_verifier_worker_is_replaced_on_send() -> None:
    import operator

    from megatron_hapo.rewards import RewardWorkers

    workers = RewardWorkers(operator.add, workers=2, timeout_s=30.0)
    try:
        assert [o.value for o in workers.map([(1, 1), (2, 2)])] == [2, 4]
        for worker in workers._pool:  # killed while idle (before: BrokenPipeError on the next send)
            worker.process.kill()
            worker.process.join()
        outcomes = workers.map([(1, 2), (3, 4), (5, 6)])
        assert [(o.value, o.status) for o in outcomes] == [(3, "ok"), (7, "ok"), (11, "ok")]
    finally:
        workers.close()


def test_a_repeated_sigterm_is_one_request_however_late(tmp_path: Path) -> None:
    # as a plain scancel under srun: directly, and forwarded by srun; no time window decides (processes.REPEATABLE)
    program = _start(tmp_path, HELPERS, stderr=subprocess.PIPE)
    try:
        program.stdout.readline()
        os.kill(program.pid, signal.SIGTERM)
        assert "signal 15: finishing this step" in _stderr_line(program, "signal 15")
        os.kill(program.pid, signal.SIGTERM)  # taken after the first (its line came): not merged by the kernel
        assert "the same stop request" in _stderr_line(program, "signal 15 again")
        program.stdin.write("go\n")
        program.stdin.flush()
        assert json.loads(program.stdout.readline())["requested"] is True  # still working after both
        os.kill(program.pid, signal.SIGINT)  # a different signal: a real second request
        assert program.wait(timeout=60) == 1
    finally:
        program.kill()


def _stderr_line(program: subprocess.Popen, text: str) -> str:
    """The first line of the program's stderr holding ``text`` (read up to it; a hang guard at EOF)."""
    for line in program.stderr:
        if text in line:
            return line
    raise AssertionError(f"no {text!r} on stderr before it closed")


EXIT_AFTER_CLEANUP = """
import atexit, json, multiprocessing as mp, operator, sys
from megatron_hapo.processes import descendants, exit_after_cleanup

if __name__ == "__main__":
    from megatron_hapo.rewards import RewardWorkers

    workers = RewardWorkers(operator.add, workers=1, timeout_s=30.0)  # left for the exit handlers to stop
    manager = mp.get_context("spawn").Manager()
    atexit.register(lambda: open(sys.argv[1], "w").write("handlers ran"))
    print(json.dumps(descendants()), flush=True)
    print("buffered, not yet flushed", end="")
    exit_after_cleanup(7)
"""


def test_exit_after_cleanup_runs_the_exit_handlers_and_leaves_no_helper(tmp_path: Path) -> None:
    marker = tmp_path / "handlers"
    program = _start(tmp_path, EXIT_AFTER_CLEANUP, str(marker))
    helpers = json.loads(program.stdout.readline())
    program.stdin.close()
    assert program.wait(timeout=60) == 7  # the status given, not the interpreter's
    assert len(helpers) >= 2, helpers  # the manager and the forkserver at least
    deadline = time.monotonic() + 10
    while [pid for pid in helpers if running(pid)] and time.monotonic() < deadline:
        time.sleep(0.1)  # a helper whose pipe closed at exit ends on its own
    assert not [pid for pid in helpers if running(pid)], helpers  # (a bare os._exit leaves the manager)
    assert marker.read_text() == "handlers ran"
    # the same buffered reader as readline's (communicate() would read past what it holds); EOF: no helper left
    assert program.stdout.read() == "buffered, not yet flushed"  # the streams are flushed


def test_tensor_parallel_ranks_get_one_cuda_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA_DEVICE_MAX_CONNECTIONS=1 with TP > 1 (Megatron's overlapped TP communication needs issue order);
    left at CUDA's default without TP; a value the user set wins."""
    from megatron_hapo.parallel import runtime

    monkeypatch.delenv(runtime.MAX_CONNECTIONS_ENV, raising=False)
    assert runtime.set_cuda_connections(1) is None and runtime.MAX_CONNECTIONS_ENV not in os.environ
    assert runtime.set_cuda_connections(8) == "1" and os.environ[runtime.MAX_CONNECTIONS_ENV] == "1"
    monkeypatch.setenv(runtime.MAX_CONNECTIONS_ENV, "4")
    assert runtime.set_cuda_connections(2) == "4"
