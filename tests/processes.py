"""Process-tree helpers for the tests that signal a job step the way SLURM does."""
from __future__ import annotations

from pathlib import Path


def descendants(pid: int, *, cmdline_contains: bytes = b"") -> list[int]:
    """Every process below `pid` (from /proc) whose command line contains `cmdline_contains`: what SLURM
    signals in a job step besides the task itself. The filter keeps the tests' own daemons out."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return [pid for pid in found if cmdline_contains in _cmdline(pid)]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def signal_all(pids: list[int], signum: int) -> None:
    import os

    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def free_port() -> int:
    """A TCP port nobody listens on now: fixed ports collide with a run left over from an earlier test."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
