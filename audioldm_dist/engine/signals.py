"""SIGTERM / SIGUSR1 / SIGUSR2 on any rank → every rank saves at the next step boundary and exits 0.

The handler only sets a flag; `should_stop()` all-reduces it (max) at a step boundary, so all ranks
agree on the same step and no collective is left half-done. SLURM sends these before a time limit
(`--signal`) or on preemption. After the checkpoint is written, `forward()` hands each received signal
to the handler that was installed before ours: under submitit (the SLURM launcher) that is submitit's
own checkpoint-and-requeue handler for SIGUSR2, so the job requeues itself only once the save is
complete; under a plain `deepspeed train.py` there is none and the process just exits 0.
"""
from __future__ import annotations

import logging
import signal

import torch
import torch.distributed as dist

from audioldm_dist.data.stream import JOB_SIGNALS as STOP_SIGNALS
from audioldm_dist.engine.distributed import collective_device

log = logging.getLogger(__name__)


class StopSignal:
    def __init__(self, *, rank: int) -> None:
        self.rank = rank
        self.received: list[int] = []
        self.stopped_early = False
        """Set by the trainer when it saved and stopped before max_steps because of a signal."""
        self.previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}

    def _handle(self, signum: int, _frame) -> None:
        if signum not in self.received:
            self.received.append(signum)
        log.warning("rank %d: received %s: will save a checkpoint at the next step boundary", self.rank,
                    signal.Signals(signum).name)

    def should_stop(self) -> bool:
        flag = torch.tensor([1 if self.received else 0], device=collective_device())
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def forward(self) -> None:
        """Calls the earlier handlers of the signals this rank received (submitit's requeue)."""
        for signum in self.received:
            handler = self.previous.get(signum)
            if callable(handler):
                log.warning("rank %d: passing %s on to %s", self.rank, signal.Signals(signum).name,
                            getattr(handler, "__qualname__", handler))
                handler(signum, None)

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
