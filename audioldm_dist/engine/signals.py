"""SIGTERM / SIGUSR1 on any rank → every rank saves at the next step boundary and exits 0.

The handler only sets a flag; `should_stop()` all-reduces it (max) at a step boundary, so all ranks
agree on the same step and no collective is left half-done. SLURM sends these before a time limit or
on preemption; the launcher relies on the exit code 0 after the save.
"""
from __future__ import annotations

import logging
import signal

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class StopSignal:
    def __init__(self, *, rank: int) -> None:
        self.rank = rank
        self.received: int | None = None
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, _frame) -> None:
        self.received = signum
        log.warning("rank %d: received %s: will save a checkpoint at the next step boundary", self.rank,
                    signal.Signals(signum).name)

    def should_stop(self) -> bool:
        flag = torch.tensor([1 if self.received is not None else 0])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
