"""No hangs: a failing rank ends the whole job quickly, with its reason, and leaves no process behind.

On a cluster a hung job is worse than a crashed one: it holds its GPUs until the time limit and nobody
learns why. Three mechanisms, one thread per rank (`JobGuard`):

- **A failing rank ends itself.** `fail()` logs the reason once, publishes it for the other ranks (a
  file per rank in the run directory, `RUN/.failures/<attempt>/rank{R}.txt`: the run directory is shared
  by every node anyway, and a file outlives the rank that wrote it, unlike rank 0's TCP store), kills
  every process below the rank (DataLoader workers and their forkserver ignore SLURM's signals while the
  run is healthy, so nothing else would end them; wandb's helper), restores the default action of
  SIGTERM/USR1/USR2 so a late signal ends the rank, and leaves with `os._exit`: Python's exit handlers
  (multiprocessing joining workers) are what hung before.
- **The other ranks notice.** The guard thread polls the failure folder every `POLL_SECONDS`; a peer's
  failure dumps this rank's Python stacks to the log and exits with `EXIT_PEER_FAILED`. A rank killed
  outright (SIGKILL, OOM killer) writes nothing, but its sockets close: gloo collectives then raise at
  once, and NCCL ones meet the process-group timeout (`train.hang_timeout_long`) or the watchdog below.
- **A hang watchdog.** If no training step completes within the allowance, every rank writes the stacks of
  all its threads (faulthandler) to its log, says where it was waiting (the phase: start-up, step N,
  validation, checkpoint) and exits with `EXIT_HANG`. The allowance in the step phase is
  `train.hang_timeout` seconds, or (0) max(`HANG_FLOOR_SECONDS`, `HANG_MEDIAN_FACTOR` × the median step
  time so far); start-up, validation and checkpoints get `train.hang_timeout_long`.

Exit codes: 0 done or saved on a signal, 1 this rank failed (its reason is in its log), 2 bad arguments or
config, 3 the watchdog saw no progress, 4 another rank failed. The deepspeed launcher then ends the other
ranks; under SLURM `--kill-on-bad-exit` does (launch/slurm.py sets it).
"""
from __future__ import annotations

import faulthandler
import logging
import os
import signal
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NoReturn

log = logging.getLogger(__name__)

EXIT_FAILED, EXIT_HANG, EXIT_PEER_FAILED = 1, 3, 4
POLL_SECONDS = 1.0
HANG_FLOOR_SECONDS = 600.0
HANG_MEDIAN_FACTOR = 20.0
FAILURES = ".failures"
TEST_FAULT = "AUDIOLDM_TEST_FAULT"
"""Test hook: `raise:RANK:STEP` raises, `block:RANK:STEP` blocks forever, on that rank at the start of that step."""


def kill_descendants() -> None:
    """SIGKILL every process below this one (loader workers, forkserver, resource tracker, wandb)."""
    import psutil

    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(children, timeout=5)


_LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def _one_line(error: BaseException) -> str:
    text = [line for line in str(error).strip().splitlines() if line.strip()]
    if len(text) > 1 and text[0].startswith("Caught "):  # a DataLoader worker's error: its last line says what
        line = f"in a DataLoader worker: {text[-1].strip()}"[:500]
    else:
        line = f"{type(error).__name__}: {text[0] if text else ''}"[:500]
    if any(marker in line for marker in _LOST_PEER):
        line += " (another rank is gone: see its log; killed by a signal or the OOM killer?)"
    return line


def _flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:
            pass
    sys.stdout.flush()
    sys.stderr.flush()


class JobGuard:
    """The failure flag and hang watchdog of one rank (see the module docstring)."""

    def __init__(self, *, run_dir: Path, attempt: str, rank: int, hang_timeout: float, hang_timeout_long: float
                 ) -> None:
        self.rank = rank
        self.folder = Path(run_dir) / FAILURES / attempt
        self.hang_timeout = hang_timeout
        self.hang_timeout_long = hang_timeout_long
        self.phase_name, self.long_phase = "start-up", True
        self.last_progress = time.monotonic()
        self.step_seconds: list[float] = []
        self._ending = threading.Lock()
        self._stopped = threading.Event()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._watch, name=f"audioldm-guard-rank{rank}", daemon=True)
        self._thread.start()

    # -- what the trainer tells the guard ---------------------------------------------------------
    def step_done(self, seconds: float) -> None:
        self.step_seconds = (self.step_seconds + [seconds])[-100:]
        self.phase_name, self.long_phase = "step", False
        self.last_progress = time.monotonic()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Start-up, validation, checkpoint: the long allowance while inside."""
        before = (self.phase_name, self.long_phase)
        self.phase_name, self.long_phase = name, True
        self.last_progress = time.monotonic()
        try:
            yield
        finally:
            self.phase_name, self.long_phase = before
            self.last_progress = time.monotonic()

    def set_phase(self, name: str) -> None:
        """Names where a step is (e.g. `step 12`) for the watchdog's message."""
        self.phase_name = name

    def allowance(self) -> float:
        if self.long_phase:
            return self.hang_timeout_long
        if self.hang_timeout > 0:
            return self.hang_timeout
        median = statistics.median(self.step_seconds) if self.step_seconds else 0.0
        return max(HANG_FLOOR_SECONDS, HANG_MEDIAN_FACTOR * median)

    def close(self) -> None:
        """The run ended well: stop watching and remove this attempt's (empty) report folder."""
        self._stopped.set()
        for folder in (self.folder, self.folder.parent):
            try:
                folder.rmdir()
            except OSError:
                pass  # not empty (a report, or another rank's folder) or already gone

    # -- ending the rank ----------------------------------------------------------------------------
    def fail(self, error: BaseException) -> NoReturn:
        """This rank failed: log once, tell the others, leave nothing running, exit 1. An error that says a peer
        is gone waits a moment for that peer's report: then this rank only followed it (exit 4)."""
        if any(marker in str(error) for marker in _LOST_PEER):
            deadline = time.monotonic() + 2 * POLL_SECONDS
            while (peer := self._peer_failure()) is None and time.monotonic() < deadline:
                time.sleep(0.1)
            if peer is not None:
                log.error("rank %d: another rank ended the job (%s): stopping this rank too", self.rank, peer)
                self._end(EXIT_PEER_FAILED, f"rank {self.rank} stopped: {peer}", dump_stacks=True)
        log.error("rank %d: training failed: %s", self.rank, _one_line(error), exc_info=error)
        self._end(EXIT_FAILED, f"rank {self.rank} failed: {_one_line(error)}", dump_stacks=False)

    def _end(self, code: int, reason: str, *, dump_stacks: bool) -> NoReturn:
        if not self._ending.acquire(blocking=False):  # another path is already ending this rank
            while True:
                time.sleep(60)
        for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
            try:
                signal.signal(signum, signal.SIG_DFL)  # a late SIGTERM now ends the rank
            except ValueError:  # not the main thread: signals arriving now are ignored by nobody but us
                pass
        try:
            (self.folder / f"rank{self.rank}.txt").write_text(reason + "\n")
        except OSError:
            pass  # a full disk: the exit code and the log still carry the reason
        if dump_stacks:
            log.error("rank %d: Python stacks of every thread follow", self.rank)
            _flush_logs()
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        kill_descendants()
        log.error("rank %d: exiting with %d (%s)", self.rank, code, reason)
        _flush_logs()
        os._exit(code)

    def _peer_failure(self) -> str | None:
        try:
            reports = sorted(self.folder.glob("rank*.txt"))
        except OSError:
            return None
        for report in reports:
            if report.name != f"rank{self.rank}.txt":
                try:
                    return report.read_text().strip() or report.stem
                except OSError:
                    return report.stem
        return None

    def _watch(self) -> None:
        while not self._stopped.wait(POLL_SECONDS):
            peer = self._peer_failure()
            if peer is not None:
                log.error("rank %d: another rank ended the job (%s): stopping this rank too", self.rank, peer)
                self._end(EXIT_PEER_FAILED, f"rank {self.rank} stopped: {peer}", dump_stacks=True)
            waited = time.monotonic() - self.last_progress
            if waited > self.allowance():
                log.error("rank %d: hang watchdog: no progress for %.0f s (allowance %.0f s) while in %s",
                          self.rank, waited, self.allowance(), self.phase_name)
                self._end(EXIT_HANG, f"rank {self.rank} hung: no progress for {waited:.0f} s while in "
                                     f"{self.phase_name}", dump_stacks=True)


def inject_test_fault(*, rank: int, step: int) -> None:
    """The failure tests' hook (env AUDIOLDM_TEST_FAULT); does nothing when the variable is unset."""
    spec = os.environ.get(TEST_FAULT)
    if not spec:
        return
    kind, fault_rank, fault_step = spec.split(":")
    if int(fault_rank) != rank or int(fault_step) != step:
        return
    if kind == "raise":
        raise RuntimeError(f"{TEST_FAULT}: injected failure on rank {rank} at step {step}")
    if kind == "block":
        log.warning("rank %d: %s: blocking forever at step %d", rank, TEST_FAULT, step)
        threading.Event().wait()
    raise ValueError(f"{TEST_FAULT}={spec!r}: expected raise|block:RANK:STEP")
