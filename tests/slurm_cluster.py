"""A real multi-node SLURM cluster on this one machine, for integration tests of the SLURM launcher.

Each node is its own `slurmd -N nodeK` on 127.0.0.1 with its own port, so jobs really span nodes
(SLURM_NODEID, SLURM_JOB_NODELIST, one task per node) although the nodes share one kernel and one
hostname. Daemons run in the foreground as our children (`-D`, munged `-F`) so that `stop()` ends
exactly the processes it started, by pid; a private munged on a socket under `workdir` keeps the
cluster off any system munge. Config, state, spools and logs stay in `workdir`; ports are parameters so
two clusters can run side by side. Accounting is off: see `fake_sacct.py` for what submitit needs then.

    with SlurmCluster(tmp_path, base_port=free_base_port(2)) as cluster:
        cluster.run("srun", "-N2", "-n2", "hostname")
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest

SBIN_DIRS = ("/usr/sbin", "/sbin")
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")
INSTALL_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "install_slurm.sh"
MUNGE_KEY = Path("/etc/munge/munge.key")
# Variables of an enclosing allocation: srun/sbatch would read them and run inside that job instead.
LEAKY_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")


@dataclass
class SlurmCluster:
    """`num_nodes` slurmd (node1..nodeN) plus slurmctld and munged, all rooted in `workdir`.

    Partition `debug` (default, preemptible with PreemptMode=REQUEUE) and partition `urgent` (higher
    PriorityTier, preempts `debug`) both hold every node.
    """

    workdir: Path
    num_nodes: int = 2
    # Every node claims this many of the machine's CPUs (they overlap; nothing is bound).
    cpus_per_node: int = 2
    # slurmctld listens on base_port, node k (1-based) on base_port + k.
    base_port: int = 16817
    # Seconds between SIGTERM and SIGKILL when a job is killed, requeued or times out (slurmd waits >= 5).
    kill_wait_s: int = 2
    # Seconds a finished job stays visible to squeue --states=all / scontrol show job / fake sacct.
    min_job_age_s: int = 3600
    # Seconds a preempted `debug` job may still run after its --signal (preempt_send_user_signal).
    preempt_grace_s: int = 10
    # Seconds a requeued job waits before it may start again (AuthInfo cred_expire; SLURM's default
    # 120 s). It is also the lifetime of a step's launch credential, so not much less than 10.
    requeue_delay_s: int = 10
    # Put `fake_sacct.py` on the cluster's PATH as `sacct` (submitit reads job states from sacct).
    fake_sacct: bool = True
    start_timeout_s: float = 60.0
    _procs: dict[str, subprocess.Popen] = field(default_factory=dict, init=False, repr=False)
    _logs: list[IO[bytes]] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        if self.num_nodes < 1 or self.cpus_per_node < 1:
            raise ValueError(f"need num_nodes >= 1 and cpus_per_node >= 1, got {self.num_nodes} and "
                             f"{self.cpus_per_node}")
        if len(str(self.munge_socket)) > 100:
            raise ValueError(f"workdir too long for a unix socket path (max ~100): {self.munge_socket}")

    @property
    def conf_path(self) -> Path:
        return self.workdir / "etc" / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.workdir / "munge" / "munge.socket.2"

    @property
    def node_names(self) -> list[str]:
        return [f"node{k}" for k in range(1, self.num_nodes + 1)]

    @property
    def env(self) -> dict[str, str]:
        """What a client needs: SLURM_CONF, and PATH with the fake sacct first and sbin last."""
        path = [str(self.workdir / "bin")] if self.fake_sacct else []
        path += [os.environ.get("PATH", "/usr/bin:/bin"), *SBIN_DIRS]
        return {"SLURM_CONF": str(self.conf_path), "PATH": os.pathsep.join(path)}

    def client_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """os.environ without the variables of an enclosing SLURM job, plus `env` and `extra`."""
        base = {k: v for k, v in os.environ.items() if not k.startswith(LEAKY_PREFIXES)}
        return {**base, **self.env, **(extra or {})}

    def run(self, *args: str, timeout: float = 60, check: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Runs a client command (sbatch, srun, scontrol, ...) on this cluster; text output captured."""
        proc = subprocess.run(list(args), env=self.client_env(env), capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"`{' '.join(args)}` exited {proc.returncode}\nstdout:\n{proc.stdout}\n"
                               f"stderr:\n{proc.stderr}")
        return proc

    def job_state(self, job_id: str) -> str:
        """JobState from `scontrol show job` (kept MinJobAge seconds after the end), '' once purged."""
        proc = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        fields = dict(item.split("=", 1) for item in proc.stdout.split() if "=" in item)
        return fields.get("JobState", "")

    def start(self) -> "SlurmCluster":
        """Writes slurm.conf, starts munged, slurmctld and the slurmd, and waits until all nodes are idle."""
        if os.geteuid() != 0:
            raise RuntimeError("the test cluster runs its daemons as root (SlurmUser=root): run as root")
        missing = [tool for tool in DAEMONS + CLIENTS if _which(tool) is None]
        if missing:
            raise RuntimeError(f"SLURM tools missing: {missing}; run `bash {INSTALL_SCRIPT}` as root")
        if self._procs:
            raise RuntimeError(f"cluster in {self.workdir} already started")
        self.stop_leftovers()
        for sub in ("etc", "bin", "state", "log", "run", "munge", *(f"spool/{n}" for n in self.node_names)):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self.munge_socket.parent.chmod(0o755)
        self.conf_path.write_text(slurm_conf_text(self))
        if self.fake_sacct:
            _write_fake_sacct(self.workdir / "bin" / "sacct")
        try:
            self._start_munged()
            # -c: a cold start, no jobs or node states recovered from an earlier run in this workdir.
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-c", "-f", str(self.conf_path)])
            for name in self.node_names:
                self._spawn(name, [_which("slurmd"), "-D", "-N", name, "-f", str(self.conf_path)])
            self._wait_until_idle()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, *, drain_timeout_s: float = 20) -> None:
        """Cancels every job, then stops the daemons this object started (munged last) by pid.

        Jobs go first because their slurmstepd outlive a stopped slurmd (by design, for restarts).
        """
        if self._procs.get("slurmctld") is not None and self._procs["slurmctld"].poll() is None:
            self._cancel_all_jobs(timeout_s=drain_timeout_s)
        for name in reversed(list(self._procs)):
            proc = self._procs.pop(name)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=15)
        while self._logs:
            self._logs.pop().close()

    def stop_leftovers(self) -> list[int]:
        """Ends what an owner killed before its stop() left running in this workdir; returns the pids.

        Finds daemons by the pid files in workdir, trusting a pid only if its command line names this
        slurm.conf (or munge socket); cancels their jobs first, as stop() does.
        """
        run, conf_arg = self.workdir / "run", f" -f {self.conf_path} "
        candidates = [(path, conf_arg) for path in sorted(run.glob("slurmd-*.pid"))]
        candidates += [(run / "slurmctld.pid", conf_arg),
                       (self.munge_socket.parent / "munged.pid", f" --socket={self.munge_socket} ")]
        pids = [pid for path, arg in candidates if (pid := _read_pid(path)) and arg in _cmdline(pid)]
        if pids and self.munge_socket.exists():
            self._cancel_all_jobs(timeout_s=20)
        for pid in pids:  # slurmd, slurmctld, munged: each may need the next to shut down cleanly
            _terminate_pid(pid)
        return pids

    def _cancel_all_jobs(self, *, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while job_ids := self.run("squeue", "-h", "-o", "%i", check=False, timeout=15).stdout.split():
            if time.monotonic() > deadline:
                break
            self.run("scancel", "--full", *job_ids, check=False, timeout=15)
            time.sleep(0.5)

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pids(self) -> dict[str, int]:
        return {name: proc.pid for name, proc in self._procs.items()}

    def log_tails(self, num_lines: int = 25) -> str:
        """The last lines of each daemon's log file (its captured stderr if it has none), for errors."""
        parts = []
        for name in ("munged", "slurmctld", *self.node_names):
            log = self.workdir / "log" / (f"slurmd-{name}.log" if name.startswith("node") else f"{name}.log")
            path = log if log.exists() else self.workdir / "log" / f"{name}.stderr"
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()[-num_lines:]
                parts.append(f"--- {path} (last {len(lines)} lines)\n" + "\n".join(lines))
        return "\n".join(parts)

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.workdir / "log" / f"{name}.stderr", "ab")
        self._logs.append(log)
        # Own session: a Ctrl-C in the terminal reaches pytest, which then stops us in order.
        self._procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, env=self.client_env(),
                                             start_new_session=True)

    def _start_munged(self) -> None:
        if not MUNGE_KEY.exists():
            raise RuntimeError(f"{MUNGE_KEY} missing; run `bash {INSTALL_SCRIPT}` as root")
        munge_dir = self.munge_socket.parent
        self._spawn("munged", [_which("munged"), "-F", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={MUNGE_KEY}", f"--pid-file={munge_dir / 'munged.pid'}",
                               f"--seed-file={munge_dir / 'munged.seed'}"])
        deadline = time.monotonic() + 10
        while not self.munge_socket.exists():
            if self._procs["munged"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"munged did not come up\n{self.log_tails()}")
            time.sleep(0.1)

    def _wait_until_idle(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            dead = {name: proc.returncode for name, proc in self._procs.items() if proc.poll() is not None}
            if dead:
                raise RuntimeError(f"SLURM daemons exited early (name: exit code) {dead}\n{self.log_tails()}")
            proc = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False, timeout=15)
            states = dict(line.split() for line in proc.stdout.splitlines() if len(line.split()) == 2)
            if proc.returncode == 0 and all(states.get(n) == "idle" for n in self.node_names):
                return
            time.sleep(0.5)
        raise RuntimeError(f"nodes not idle after {self.start_timeout_s:.0f} s: {states}\n{self.log_tails()}")


def slurm_conf_text(cluster: SlurmCluster) -> str:
    """slurm.conf for `cluster` (SLURM 22.05; `man slurm.conf` explains each key)."""
    wd = cluster.workdir
    host = socket.gethostname().split(".")[0]
    nodes = f"node[1-{cluster.num_nodes}]" if cluster.num_nodes > 1 else "node1"
    lines = [
        "ClusterName=audioldm-test",
        # The address in parentheses spares slurmctld and the clients a DNS lookup of the hostname.
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={cluster.base_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={cluster.munge_socket},cred_expire={cluster.requeue_delay_s}",
        f"StateSaveLocation={wd / 'state'}",
        f"SlurmctldPidFile={wd / 'run' / 'slurmctld.pid'}",
        f"SlurmctldLogFile={wd / 'log' / 'slurmctld.log'}",
        f"SlurmdSpoolDir={wd / 'spool' / '%n'}",
        f"SlurmdPidFile={wd / 'run' / 'slurmd-%n.pid'}",
        f"SlurmdLogFile={wd / 'log' / 'slurmd-%n.log'}",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        # No cgroups (they need systemd or a writable cgroupfs): processes are tracked by parent pid.
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "MpiDefault=none",
        "SwitchType=switch/none",
        "PropagateResourceLimits=NONE",
        "MailProg=/bin/true",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SchedulerType=sched/backfill",
        # Schedule often: with the default 60 s main loop a requeued job would idle up to a minute.
        "SchedulerParameters=sched_interval=2,bf_interval=1",
        "ReturnToService=2",
        f"KillWait={cluster.kill_wait_s}",
        f"MinJobAge={cluster.min_job_age_s}",
        "InactiveLimit=0",
        "JobRequeue=1",
        # Jobs in `urgent` requeue jobs in `debug`; the victim first gets its --signal (submitit: USR2).
        "PreemptType=preempt/partition_prio",
        "PreemptMode=REQUEUE",
        "SlurmctldParameters=preempt_send_user_signal",
    ]
    memory_mb = _memory_mb()
    for k, name in enumerate(cluster.node_names, start=1):
        lines.append(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 "
                     f"Port={cluster.base_port + k} CPUs={cluster.cpus_per_node} "
                     f"RealMemory={memory_mb} State=UNKNOWN")
    lines.append(f"PartitionName=debug Nodes={nodes} Default=YES MaxTime=INFINITE State=UP "
                 f"PriorityTier=1 GraceTime={cluster.preempt_grace_s}")
    lines.append(f"PartitionName=urgent Nodes={nodes} MaxTime=INFINITE State=UP PriorityTier=2 "
                 "PreemptMode=OFF")
    return "\n".join(lines) + "\n"


def free_base_port(num_nodes: int, start: int = 16817, stop: int = 30000) -> int:
    """The first port >= start such that it and the next num_nodes ports are free to bind."""
    for base in range(start, stop, num_nodes + 1):
        if all(_port_free(base + k) for k in range(num_nodes + 1)):
            return base
    raise RuntimeError(f"no {num_nodes + 1} free consecutive ports in [{start}, {stop})")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _memory_mb() -> int:
    """90% of MemTotal: every node claims the machine's memory, and slurmd drains a node that has less."""
    with open("/proc/meminfo") as f:
        total_kb = int(next(line for line in f if line.startswith("MemTotal:")).split()[1])
    return int(total_kb / 1024 * 0.9)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _cmdline(pid: int) -> str:
    """The command line of a live (not zombie) process, '' if there is none."""
    try:
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return ""
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, IndexError):
        return ""


def _terminate_pid(pid: int, timeout_s: float = 15) -> None:
    """SIGTERM, then SIGKILL after timeout_s, for a process that is not our child (no wait())."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout_s
        while _cmdline(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not _cmdline(pid):
            return


def _which(tool: str) -> str | None:
    return shutil.which(tool) or shutil.which(tool, path=os.pathsep.join(SBIN_DIRS))


def _write_fake_sacct(path: Path) -> None:
    script = Path(__file__).resolve().parent / "fake_sacct.py"
    path.write_text(f"#!/bin/sh\nexec {sys.executable} {script} \"$@\"\n")
    path.chmod(0o755)


def ensure_slurm_installed() -> None:
    """Runs scripts/install_slurm.sh when a SLURM tool or the munge key is missing; raises if it fails."""
    if os.geteuid() == 0 and all(_which(tool) for tool in DAEMONS + CLIENTS) and MUNGE_KEY.exists():
        return
    proc = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{INSTALL_SCRIPT} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory):
    """A started 2-node cluster for the session; fails (never skips) when SLURM cannot run here."""
    workdir = tmp_path_factory.mktemp("slurm")
    try:
        ensure_slurm_installed()
        cluster = SlurmCluster(workdir, base_port=free_base_port(2)).start()
    except Exception as error:  # CI must run these tests: a missing SLURM is a failure, not a skip.
        pytest.fail(f"could not start the test SLURM cluster in {workdir}: {error}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def slurm_env(slurm_cluster: SlurmCluster, monkeypatch: pytest.MonkeyPatch) -> SlurmCluster:
    """Points this process's environment at the cluster, for code that calls sbatch itself (submitit).

    Jobs inherit the submitter's environment (sbatch --export=ALL), so PYTHONPATH also gains tests/:
    a callable pickled from a test module is imported by name inside the job.
    """
    for key in [k for k in os.environ if k.startswith(LEAKY_PREFIXES)]:
        monkeypatch.delenv(key)
    for key, value in slurm_cluster.env.items():
        monkeypatch.setenv(key, value)
    tests_dir = str(Path(__file__).resolve().parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")])))
    return slurm_cluster
