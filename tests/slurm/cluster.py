"""A two-node Slurm cluster on this machine for tests (the recipe: docs/SLURM_CPU.md).

Debian's slurm-wlm and munge, installed with apt-get when missing. Needs root. Nodes n1 and n2 both run on this host
(NodeAddr=127.0.0.1), each with two fake GPUs (device files that are symlinks to /dev/null).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

NODES = ("n1", "n2")
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"})
INSTALL = "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge"
MUNGE_KEY = Path("/etc/munge/munge.key")
#: Seconds from a job's SIGTERM (scancel, the time limit) to slurmd's SIGKILL. A real cluster's default is 30;
#: here 300, so that the ranks' finishing their step and saving it (about 3 s) never races it on a slow machine.
KILL_WAIT_S = 300

SLURM_CONF = """\
ClusterName=hapotest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
AuthType=auth/munge
StateSaveLocation={work}/state
SlurmctldPidFile={work}/run/slurmctld.pid
SlurmctldLogFile={work}/log/slurmctld.log
SlurmdSpoolDir={work}/spool/%n
SlurmdPidFile={work}/run/slurmd-%n.pid
SlurmdLogFile={work}/log/slurmd-%n.log
SlurmdDebug={slurmd_debug}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
MinJobAge=600
KillWait={kill_wait}
JobRequeue=1
GresTypes=gpu
{nodes}
PartitionName=debug Nodes={node_list} Default=YES MaxTime=INFINITE State=UP
"""
NODE_LINE = "NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} {hw} Gres=gpu:2 State=UNKNOWN"


class SlurmUnavailable(Exception):  # noqa: N818 (the name says what callers skip on)
    """Slurm cannot be set up on this machine (not root, no package registry, ...)."""


def _free_port(preferred: int, taken: set[int]) -> int:
    """`preferred` when nothing listens there, else a port the kernel hands out."""
    for port in (preferred, 0):
        if port in taken:
            continue
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the daemons do: TIME_WAIT is no clash
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise SlurmUnavailable("no free TCP port")


def _sh(cmd: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=timeout)


def _hardware() -> str:
    """CPUs, sockets, cores, threads from `slurmd -C`; RealMemory a little under the reported value."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(\w+)=(\S+)", out.splitlines()[0]))
    keys = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
    hw = [f"{k}={fields[k]}" for k in keys if k in fields]
    hw.append(f"RealMemory={int(int(fields['RealMemory']) * 0.9)}")
    return " ".join(hw)


class SlurmCluster:
    """Daemons started by `start`, stopped by `stop` (also at interpreter exit)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.conf_path = workdir / "slurm.conf"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        self.env["SLURM_CONF"] = str(self.conf_path)
        self._procs: dict[str, subprocess.Popen] = {}  # daemon name -> process (all run in the foreground)
        self.started_munged = False  # stop() ends munged only when this cluster started it
        self._stopped = False
        self.timings: dict[str, float] = {}

    # ---- set-up -------------------------------------------------------------------------------------------------
    @classmethod
    def start(cls, workdir: Path, slurmd_debug: str = "info") -> SlurmCluster:
        """Install if needed, start munged (when not running), slurmctld and two slurmd; wait until both idle."""
        if os.geteuid() != 0:
            raise SlurmUnavailable("the Slurm test cluster needs root")
        cluster = cls(Path(workdir).resolve())
        t0 = time.monotonic()
        cluster._install()
        cluster.timings["install_s"] = time.monotonic() - t0
        atexit.register(cluster.stop)
        t0 = time.monotonic()
        try:
            cluster._start_munge()
            cluster._write_config(slurmd_debug)
            cluster._start_daemons()
        except BaseException:
            cluster.stop()
            raise
        cluster.timings["start_s"] = time.monotonic() - t0
        return cluster

    def _install(self) -> None:
        if shutil.which("slurmctld") and shutil.which("munged"):
            return
        if not shutil.which("apt-get"):
            raise SlurmUnavailable("slurm-wlm is not installed and there is no apt-get")
        try:
            res = _sh(INSTALL, timeout=900)
        except subprocess.TimeoutExpired:
            raise SlurmUnavailable("apt-get install slurm-wlm munge timed out") from None
        if res.returncode != 0 or not (shutil.which("slurmctld") and shutil.which("munged")):
            raise SlurmUnavailable(f"apt-get install slurm-wlm munge failed: {(res.stderr or res.stdout)[-500:]}")

    def _start_munge(self) -> None:
        """Start munged as user munge unless `munge -n` already works."""
        if _sh("munge -n >/dev/null", timeout=10).returncode == 0:
            return
        if not MUNGE_KEY.exists():
            _sh(f"mungekey --create --keyfile={MUNGE_KEY} || dd if=/dev/urandom of={MUNGE_KEY} bs=1024 count=1")
        run_dir = Path("/run/munge")
        run_dir.mkdir(mode=0o755, exist_ok=True)
        for path in (MUNGE_KEY.parent, MUNGE_KEY, run_dir, Path("/var/lib/munge"), Path("/var/log/munge")):
            if path.exists():
                shutil.chown(path, "munge", "munge")
        MUNGE_KEY.chmod(0o400)
        MUNGE_KEY.parent.chmod(0o700)
        self._spawn("munged", ["munged", "--foreground"], user="munge", group="munge", extra_groups=[])
        self.started_munged = True
        self._poll(lambda: _sh("munge -n >/dev/null", timeout=10).returncode == 0, 20, "munged does not answer")

    def _write_config(self, slurmd_debug: str) -> None:
        work = self.workdir
        for sub in ("state", "run", "log", *(f"spool/{n}" for n in NODES)):
            (work / sub).mkdir(parents=True, exist_ok=True)
        for i in range(2):
            dev = work / f"nvidia{i}"
            if not dev.is_symlink():
                dev.symlink_to("/dev/null")
        host = socket.gethostname().split(".")[0]
        ctld_port = _free_port(6817, set())
        ports = [ctld_port]
        for preferred in (6821, 6822):
            ports.append(_free_port(preferred, set(ports)))
        hw = _hardware()
        nodes = "\n".join(
            NODE_LINE.format(name=n, host=host, port=p, hw=hw) for n, p in zip(NODES, ports[1:], strict=True)
        )
        conf = SLURM_CONF.format(
            host=host,
            ctld_port=ctld_port,
            work=work,
            slurmd_debug=slurmd_debug,
            nodes=nodes,
            node_list=",".join(NODES),
            kill_wait=KILL_WAIT_S,
        )
        self.conf_path.write_text(conf)
        (work / "gres.conf").write_text(f"NodeName=n[1-2] Name=gpu File={work}/nvidia[0-1]\n")

    def _start_daemons(self) -> None:
        conf = str(self.conf_path)
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", conf])
        self._poll(lambda: "UP" in self.run("scontrol", "ping", check=False).stdout, 30, "slurmctld is not UP")
        for node in NODES:
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", conf])

        def both_idle() -> bool:
            out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout
            states = dict(line.split() for line in out.splitlines())
            return all(states.get(n) == "idle" for n in NODES)

        self._poll(both_idle, 60, "nodes n1 and n2 did not become idle")

    def _spawn(self, name: str, argv: list[str], **kwargs: object) -> None:
        """Start a daemon in the foreground in its own session: Ctrl-C on pytest leaves it to stop()."""
        log = self.workdir / "log" / f"{name}.stdout"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            self._procs[name] = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kwargs
            )

    def _poll(self, ready: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            dead = [n for n, p in self._procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"{what} (exited: {dead})\n{self.daemon_logs()}")
            time.sleep(0.5)

    # ---- tear-down ----------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancel remaining jobs, wait for the queue to empty (60 s at most), TERM (then KILL) our daemons."""
        if self._stopped:
            return
        self._stopped = True
        t0 = time.monotonic()
        ctld = self._procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                if not self._queue_empty():
                    self.run("scancel", "--user=root", check=False, timeout=10)
                    deadline = time.monotonic() + 60
                    while time.monotonic() < deadline and not self._queue_empty():
                        time.sleep(1)
        # slurmd before slurmctld (nodes do not go DOWN in a saved state), munged last
        order = [n for n in self._procs if n.startswith("slurmd")] + ["slurmctld", "munged"]
        for name in order:
            proc = self._procs.get(name)
            if proc is not None:
                self._terminate(proc)
        self.timings["stop_s"] = time.monotonic() - t0

    def _queue_empty(self) -> bool:
        return not self.run("squeue", "-h", check=False, timeout=10).stdout.strip()

    @staticmethod
    def _terminate(proc: subprocess.Popen) -> None:
        if proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    # ---- client helpers -----------------------------------------------------------------------------------------
    def run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        """A Slurm client command with SLURM_CONF set; output captured as text."""
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True, check=check, timeout=timeout)

    def sbatch(self, args: list[str], cwd: Path, env: dict[str, str] | None = None) -> int:
        """Submit with `sbatch --parsable`; `env` is added to the cluster environment. Returns the job id."""
        full_env = {**self.env, **(env or {})}
        res = subprocess.run(
            ["sbatch", "--parsable", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=60
        )
        if res.returncode != 0:
            raise RuntimeError(f"sbatch {args} failed ({res.returncode}): {res.stderr}")
        return int(res.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """Fields of `scontrol -o show job ID` ({} when Slurm does not know the job)."""
        res = self.run("scontrol", "-o", "show", "job", str(job_id), check=False)
        line = res.stdout.strip().splitlines()[0] if res.returncode == 0 and res.stdout.strip() else ""
        # values may hold spaces (Reason, Command with arguments): a field starts at " Key="
        return dict(m.split("=", 1) for m in re.split(r" (?=[A-Za-z][\w:/]*=)", line) if "=" in m)

    def wait(self, job_id: int, states: set[str] | frozenset[str] = FINAL_STATES, timeout_s: float = 300) -> dict:
        """Poll every 2 s until the job's JobState is one of `states`; return its fields."""
        deadline = time.monotonic() + timeout_s
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(2)
        raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout_s} s: {info}\n{self.daemon_logs()}")

    def daemon_logs(self, lines: int = 30) -> str:
        """The last lines of the slurmctld and slurmd logs."""
        parts = []
        for log in sorted((self.workdir / "log").glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"== {log.name}\n" + "\n".join(tail))
        return "\n".join(parts)
