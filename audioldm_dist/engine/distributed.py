"""Rank, world size and local rank from the launcher's environment (deepspeed/torchrun, or SLURM)."""
from __future__ import annotations

import logging
import os
import re
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environ(cls) -> DistEnv:
        """torchrun / deepspeed set RANK, WORLD_SIZE, LOCAL_RANK; under srun, SLURM_* fill the gaps."""
        env = os.environ
        rank = int(env.get("RANK", env.get("SLURM_PROCID", 0)))
        world_size = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
        local_rank = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", 0)))
        return cls(rank=rank, world_size=world_size, local_rank=local_rank)


def device_for(env: DistEnv) -> torch.device:
    return torch.device("cuda", env.local_rank) if torch.cuda.is_available() else torch.device("cpu")


LOCK_WARNING_SECONDS = 60.0


def extensions_dir() -> Path:
    """Where DeepSpeed's JIT-built ops go: TORCH_EXTENSIONS_DIR if set, else inside this environment (or, when
    that is read-only, a user cache folder named after it), keyed by the torch version. The shared default (~/.cache/torch_extensions) hangs an older torch forever on the
    `lock` file a newer torch keeps there by design."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    folder = Path(sys.prefix) / "torch_extensions" / f"torch{torch.__version__}"
    if not os.access(sys.prefix, os.W_OK):  # a read-only (shared) environment: a per-environment user cache
        import hashlib

        environment = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
        folder = Path.home() / ".cache" / "audioldm_dist" / "torch_extensions" / environment / f"torch{torch.__version__}"
    os.environ["TORCH_EXTENSIONS_DIR"] = str(folder)
    return folder


def _warn_about_build_locks(folder: Path, *, rank: int) -> None:
    locks = sorted(str(lock) for lock in folder.glob("*/lock")) if folder.is_dir() else []
    log.warning("rank %d: still waiting after %.0f s for DeepSpeed's op build or its lock (%s). If no other process "
                "is building these ops, delete the lock file and start again (or set TORCH_EXTENSIONS_DIR to an "
                "empty folder)", rank, LOCK_WARNING_SECONDS, ", ".join(locks) or f"nothing locked in {folder} yet")


@contextmanager
def build_lock_warning(*, rank: int) -> Iterator[None]:
    """Around DeepSpeed calls that may JIT-build ops: after 60 s, log the lock files and what to do."""
    timer = threading.Timer(LOCK_WARNING_SECONDS, _warn_about_build_locks, args=(extensions_dir(),),
                            kwargs={"rank": rank})
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def init_process_group(env: DistEnv, *, timeout_s: float = 1800.0) -> None:
    """NCCL on CUDA, gloo on the CPU, through DeepSpeed (which also sets up its accelerator and builds its
    communication op). `timeout_s` bounds every collective (torch's default is 30 minutes)."""
    import datetime

    import deepspeed

    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ.setdefault("RANK", str(env.rank))
    os.environ.setdefault("WORLD_SIZE", str(env.world_size))
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
    with build_lock_warning(rank=env.rank):
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   timeout=datetime.timedelta(seconds=timeout_s))


def collective_device() -> torch.device:
    """Where tensors of our own collectives live: NCCL takes only this rank's GPU, gloo the CPU."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and \
            torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def attempt_id() -> str:
    """An id every rank of this start of the job shares (rank 0 draws it): names this attempt's failure reports."""
    import secrets

    token = [secrets.token_hex(6)]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(token, src=0)
    return token[0]


def destroy_process_group(*, barrier: bool = True) -> None:
    """Tear down cleanly: ZeRO-3 has aborted at interpreter exit when the group was left open.

    After an error on this rank, no barrier: the other ranks may never reach it, and exiting lets the
    launcher (deepspeed, srun) stop them."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if barrier:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def slurm_first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (`gpu[01-03,07],cpu5` → gpu01): SLURM's own expansion
    (`scontrol show hostnames`) when scontrol is here, else `expand_hostlist`."""
    import shutil
    import subprocess

    if shutil.which("scontrol"):
        result = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=60)
        if result.returncode == 0 and result.stdout.split():
            return result.stdout.split()[0]
    hosts = expand_hostlist(nodelist)
    if not hosts:
        raise ValueError(f"SLURM node list {nodelist!r} names no host")
    return hosts[0]


_BRACKETS = re.compile(r"\[([^\[\]]*)\]")


def expand_hostlist(nodelist: str) -> list[str]:
    """SLURM's hostlist syntax → host names, in order: `node[01-03,7],gpu5` → node01 node02 node03 node7 gpu5.

    A range keeps the digits of its start (`[08-10]` → 08 09 10, `[8-10]` → 8 9 10); several bracket groups in
    one name expand as their product (`r[1-2]n[1,3]` → r1n1 r1n3 r2n1 r2n3). A malformed list is a ValueError
    naming it."""
    return [host for name in _split_outside_brackets(nodelist) for host in _expand_name(name, nodelist=nodelist)]


def _split_outside_brackets(nodelist: str) -> list[str]:
    names, depth, current = [], 0, []
    for char in nodelist:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise ValueError(f"SLURM node list {nodelist!r}: unbalanced or nested brackets")
        if char == "," and depth == 0:
            names.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth:
        raise ValueError(f"SLURM node list {nodelist!r}: a bracket is not closed")
    names.append("".join(current))
    return [name.strip() for name in names if name.strip()]


def _expand_name(name: str, *, nodelist: str) -> list[str]:
    match = _BRACKETS.search(name)
    if match is None:
        if "[" in name or "]" in name:
            raise ValueError(f"SLURM node list {nodelist!r}: unbalanced brackets in {name!r}")
        return [name]
    prefix, rest = name[:match.start()], name[match.end():]
    tails = _expand_name(rest, nodelist=nodelist)
    return [prefix + value + tail for value in _expand_ranges(match.group(1), nodelist=nodelist) for tail in tails]


def _expand_ranges(ranges: str, *, nodelist: str) -> list[str]:
    """`01-03,7` → 01 02 03 7."""
    values = []
    for part in ranges.split(","):
        start, dash, end = part.strip().partition("-")
        if not start.isdigit() or (dash and not end.isdigit()) or (dash and int(end) < int(start)):
            raise ValueError(f"SLURM node list {nodelist!r}: expected N or N-M (M >= N) in brackets, found {part!r}")
        last = int(end) if dash else int(start)
        values.extend(str(number).zfill(len(start)) for number in range(int(start), last + 1))
    return values


def node_address(host: str) -> str:
    """An address other nodes can reach `host` at: SLURM's NodeAddr (what slurmd itself is reached at),
    else DNS, else the name as it is."""
    import shutil
    import socket
    import subprocess

    if shutil.which("scontrol"):
        result = subprocess.run(["scontrol", "show", "node", host], capture_output=True, text=True, timeout=60)
        for field in result.stdout.split():
            if field.startswith("NodeAddr="):
                return field.split("=", 1)[1]
    try:
        return socket.gethostbyname(host)
    except OSError:
        return host


def port_for_job(job_id: str) -> int:
    """A rendezvous port from the job id: the same after a requeue, different for jobs sharing a node."""
    digits = "".join(ch for ch in str(job_id) if ch.isdigit()) or "0"
    return 20000 + int(digits) % 20000


def task_environment(*, global_rank: int, local_rank: int, num_tasks: int, master_addr: str, job_id: str
                     ) -> dict[str, str]:
    """The torch.distributed variables of one task, as `deepspeed`/torchrun would set them."""
    return {"RANK": str(global_rank), "WORLD_SIZE": str(num_tasks), "LOCAL_RANK": str(local_rank),
            "MASTER_ADDR": master_addr, "MASTER_PORT": str(port_for_job(job_id))}
