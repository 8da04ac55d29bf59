"""Loader processes die with the process that started them: imported (and so run) in the forkserver.

The forkserver, its DataLoader workers and their helpers ignore SLURM's job signals so that a healthy
rank can save before they stop (see `stream.JOB_SIGNALS`). When the rank itself dies outright (SIGKILL,
the OOM killer) nothing would end them, and they would hold the job's output pipes open forever. Linux's
parent-death signal closes that gap: the forkserver gets SIGKILL when the rank's main thread ends, and
each worker when the forkserver ends. Elsewhere this is a no-op.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """SIGKILL this process when its parent ends (also if the parent already ended before the call)."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


if __name__ != "__main__":
    die_with_parent()
