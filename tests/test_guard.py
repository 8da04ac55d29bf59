"""The pieces that end a job instead of hanging it, one process at a time (the 2-rank runs are test_failures.py)."""
from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from audioldm_dist.engine import checkpoint, distributed
from audioldm_dist.fileio import DiskFullError

ROOT = Path(__file__).resolve().parents[1]

_GUARDED = r"""
import logging, sys, time
from pathlib import Path
from audioldm_dist.engine.guard import JobGuard
logging.basicConfig(level=logging.INFO, format="%(message)s")
run_dir, mode = Path(sys.argv[1]), sys.argv[2]
guard = JobGuard(run_dir=run_dir, attempt="a1", rank=0, hang_timeout=1.0, hang_timeout_long=60.0)
guard.step_done(0.01)
if mode == "peer":
    (run_dir / ".failures" / "a1" / "rank1.txt").write_text("rank 1 failed: RuntimeError: boom\n")
    time.sleep(60)
elif mode == "hang":
    guard.set_phase("step 7")
    time.sleep(60)
elif mode == "fail":
    try:
        raise ValueError("bad shard")
    except ValueError as error:
        guard.fail(error)
"""


def _guarded(tmp_path: Path, mode: str) -> tuple[subprocess.CompletedProcess, float]:
    script = tmp_path / "guarded.py"
    script.write_text(_GUARDED)
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "run"), mode], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    return result, time.monotonic() - started


def test_a_peer_failure_report_ends_this_rank_with_exit_4_and_its_stacks(tmp_path: Path) -> None:
    result, seconds = _guarded(tmp_path, "peer")
    assert result.returncode == 4 and seconds < 15, result.stderr
    assert "another rank ended the job (rank 1 failed: RuntimeError: boom)" in result.stderr
    assert "Python stacks of every thread follow" in result.stderr and "guarded.py" in result.stderr


def test_the_watchdog_ends_a_stuck_step_with_exit_3_saying_where(tmp_path: Path) -> None:
    result, seconds = _guarded(tmp_path, "hang")
    assert result.returncode == 3 and seconds < 15, result.stderr
    assert "hang watchdog: no progress for" in result.stderr and "while in step 7" in result.stderr
    assert 'File "' in result.stderr and "guarded.py" in result.stderr  # the stack of the waiting main thread
    report = (tmp_path / "run" / ".failures" / "a1" / "rank0.txt").read_text()
    assert report.startswith("rank 0 hung: no progress for") and "step 7" in report


def test_a_failing_rank_reports_once_and_exits_1(tmp_path: Path) -> None:
    result, _ = _guarded(tmp_path, "fail")
    assert result.returncode == 1
    assert result.stderr.count("rank 0: training failed: ValueError: bad shard") == 1
    assert (tmp_path / "run" / ".failures" / "a1" / "rank0.txt").read_text().strip() == \
        "rank 0 failed: ValueError: bad shard"


def test_the_median_step_time_sets_the_default_allowance(tmp_path: Path) -> None:
    from audioldm_dist.engine.guard import HANG_FLOOR_SECONDS, JobGuard

    guard = JobGuard(run_dir=tmp_path, attempt="a", rank=0, hang_timeout=0.0, hang_timeout_long=1800.0)
    try:
        assert guard.allowance() == 1800.0  # start-up
        for seconds in (40.0, 50.0, 45.0):
            guard.step_done(seconds)
        assert guard.allowance() == 20 * 45.0
        guard.step_seconds = [1.0]
        assert guard.allowance() == HANG_FLOOR_SECONDS
        with guard.phase("validation at step 3"):
            assert guard.allowance() == 1800.0
        assert guard.allowance() == HANG_FLOOR_SECONDS
    finally:
        guard.close()
    assert not (tmp_path / ".failures").exists()  # a run that ended well leaves no report folder


def test_low_disk_before_a_save_warns_or_stops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    tag = checkpoint.checkpoint_dir(tmp_path) / "global_step2"
    tag.mkdir(parents=True)
    (tag / "shard.pt").write_bytes(b"x" * 5000)
    (checkpoint.checkpoint_dir(tmp_path) / "latest").write_text("global_step2")
    monkeypatch.setattr(checkpoint, "free_bytes", lambda folder: 1000)
    with caplog.at_level(logging.WARNING):
        assert checkpoint.check_room(tmp_path, rank=0, stop=False) == 5000
    assert "has 1000 B free but the last checkpoint (global_step2) took 4.9 KB" in caplog.text
    with pytest.raises(DiskFullError, match=r"the next checkpoint \(train.stop_on_low_disk\) could not be written"):
        checkpoint.check_room(tmp_path, rank=0, stop=True)
    monkeypatch.setattr(checkpoint, "free_bytes", lambda folder: 10**9)
    assert checkpoint.check_room(tmp_path, rank=0, stop=True) == 5000


def test_extension_cache_is_per_environment_and_a_slow_build_names_its_locks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    folder = distributed.extensions_dir()
    assert folder.is_relative_to(Path(sys.prefix)) and "torch" in folder.name
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    (tmp_path / "deepspeed_shm_comm").mkdir()
    (tmp_path / "deepspeed_shm_comm" / "lock").write_text("")
    monkeypatch.setattr(distributed, "LOCK_WARNING_SECONDS", 0.05)
    with caplog.at_level(logging.WARNING), distributed.build_lock_warning(rank=1):
        time.sleep(0.5)
    assert "rank 1: still waiting after" in caplog.text and str(tmp_path / "deepspeed_shm_comm" / "lock") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING), distributed.build_lock_warning(rank=1):
        pass
    time.sleep(0.2)
    assert "still waiting" not in caplog.text  # a quick start says nothing


def test_our_collectives_use_the_rank_gpu_under_nccl(monkeypatch: pytest.MonkeyPatch) -> None:
    """NCCL takes no CPU tensors: on an H100 every run failed at its first step (stop flag, scale broadcast)."""
    import torch

    assert distributed.collective_device() == torch.device("cpu")  # no process group: gloo-style CPU
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "gloo")
    assert distributed.collective_device() == torch.device("cpu")
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert distributed.collective_device() == torch.device("cuda", 3)
