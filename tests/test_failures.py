"""No hangs: on 2 CPU ranks, every failure ends the whole job non-zero within 2 minutes, names its reason and
leaves no process behind (checked by process group); a full disk keeps `latest` complete and resumable."""
from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from processes import descendants, free_port

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
JOB_SECONDS = 120  # the bound: the whole job ends within 2 minutes of the failure

pytestmark = pytest.mark.slow


def _start(run_dir: Path, shards: Path, *, max_steps: int = 6, save_every: int = 100, extra: tuple[str, ...] = (),
           env: dict | None = None) -> subprocess.Popen:
    command = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "train.py",
               "--deepspeed_config", "configs/ds/zero2.json", "--config", "configs/tiny.yaml", "--run-dir", str(run_dir),
               "--train-data", str(shards), "--max-steps", str(max_steps), "--save-every", str(save_every), *extra]
    return subprocess.Popen(command, cwd=ROOT, env={**os.environ, "WANDB_MODE": "offline", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _group_members(pgid: int) -> list[int]:
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def _finish(process: subprocess.Popen) -> str:
    """Waits for the job (failing the test past the bound), then checks that nothing of it is left running."""
    try:
        output, _ = process.communicate(timeout=JOB_SECONDS + 60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"the job did not end within {JOB_SECONDS + 60} s:\n{output[-6000:]}")
    deadline = time.monotonic() + 10
    while _group_members(process.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = _group_members(process.pid)
    if left:
        os.killpg(process.pid, signal.SIGKILL)
    assert not left, f"processes left behind: {left}\n{output[-3000:]}"
    return output


def _corrupt_audio(shards: Path, out: Path) -> Path:
    """A copy of `shards` with every third audio member garbage: a third of the samples fail to decode, far
    more than max_failed_fraction (5%)."""
    shutil.copytree(shards, out)
    audio_index = 0
    for tar_path in sorted(out.glob("*.tar")):
        buffer = io.BytesIO()
        with tarfile.open(tar_path) as source, tarfile.open(fileobj=buffer, mode="w") as target:
            for member in source.getmembers():
                data = source.extractfile(member).read()
                if member.name.endswith((".flac", ".wav")) and (audio_index := audio_index + 1) % 3 == 0:
                    data = b"not audio at all " * 64
                    member.size = len(data)
                target.addfile(member, io.BytesIO(data))
        tar_path.write_bytes(buffer.getvalue())
    return out


def test_data_error_on_both_ranks_ends_the_job(train_shards: Path, tmp_path: Path) -> None:
    shards = _corrupt_audio(train_shards, tmp_path / "broken")
    started = time.monotonic()
    output = _finish(_start(tmp_path / "run", shards, max_steps=20))
    # The loader's own error (too many failed samples, or a batch with none decodable), as the one-line reason.
    assert re.search(r"rank \d: training failed: in a DataLoader worker: RuntimeError: rank \d: .*(more than "
                     r"data\.max_failed_fraction=0.05|no decodable sample in a whole batch)", output), output[-4000:]
    assert time.monotonic() - started < JOB_SECONDS + 30
    assert "exits with return code = 1" in output, output[-3000:]


def _home_with_stale_build_locks(home: Path) -> dict[str, str]:
    """A HOME whose default extension cache holds the `lock` files a newer torch leaves there by design (an
    older torch waited on them forever); the environment of a run that must not be stopped by them."""
    import torch

    cuda = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    for op in ("deepspeed_shm_comm", "fused_adam", "cpu_adam"):
        for name in (f"{python}_{cuda}", f"{python}_cpu"):
            folder = home / ".cache" / "torch_extensions" / name / op
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "lock").write_text("")
    return {"HOME": str(home), "TORCH_EXTENSIONS_DIR": ""}


def test_error_on_one_rank_ends_the_other_rank_too(train_shards: Path, tmp_path: Path) -> None:
    """Also: stale build locks in the default extension cache do not stop the run (it reaches step 3)."""
    started = time.monotonic()
    env = {"AUDIOLDM_TEST_FAULT": "raise:1:3", **_home_with_stale_build_locks(tmp_path / "home")}
    process = _start(tmp_path / "run", train_shards, env=env)
    output = _finish(process)
    assert "rank 1: training failed: RuntimeError: AUDIOLDM_TEST_FAULT: injected failure on rank 1 at step 3" in output
    assert process.returncode != 0
    assert time.monotonic() - started < JOB_SECONDS + 30


def test_sigkill_of_one_rank_ends_the_job(train_shards: Path, tmp_path: Path) -> None:
    process = _start(tmp_path / "run", train_shards, max_steps=400)
    deadline = time.monotonic() + 240
    metrics = tmp_path / "run" / "metrics.jsonl"
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert process.poll() is None and time.monotonic() < deadline, "the run did not start training"
        time.sleep(0.5)
    ranks = [pid for pid in descendants(process.pid, cmdline_contains=b"train.py") if b"--local_rank=1" in
             Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert ranks, "rank 1 not found"
    os.kill(ranks[0], signal.SIGKILL)  # as the OOM killer does
    started = time.monotonic()
    output = _finish(process)
    assert process.returncode != 0
    assert "rank 0: training failed" in output, output[-4000:]
    assert time.monotonic() - started < JOB_SECONDS


def test_a_step_blocked_forever_trips_the_watchdog_on_every_rank(train_shards: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    process = _start(tmp_path / "run", train_shards, extra=("--set", "train.hang_timeout=15"),
                     env={"AUDIOLDM_TEST_FAULT": "block:1:3"})
    output = _finish(process)
    assert process.returncode != 0
    # Rank 1 blocks, rank 0 waits for it in a collective: whichever watchdog polls first ends the job, the other
    # rank follows; both write their stacks.
    assert re.search(r"rank \d: hang watchdog: no progress for \d+ s .*while in step 3", output), output[-5000:]
    assert output.count("Python stacks of every thread follow") == 2
    assert "inject_test_fault" in output  # rank 1's stack shows where it waits
    assert time.monotonic() - started < JOB_SECONDS + 60


def _tmpfs(mount_point: Path, *, size: str):
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a small tmpfs")
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    return mount_point


@pytest.fixture
def small_disk(tmp_path: Path):
    yield _tmpfs(tmp_path / "small_disk", size="28m")
    subprocess.run(["umount", "-l", str(tmp_path / "small_disk")], check=False)


@pytest.fixture
def tiny_disk(tmp_path: Path):
    yield _tmpfs(tmp_path / "tiny_disk", size="1m")
    subprocess.run(["umount", "-l", str(tmp_path / "tiny_disk")], check=False)


def test_make_shards_and_atomic_writes_on_a_full_disk_say_so_in_one_line(demo_root: Path, tiny_disk: Path) -> None:
    import torch

    from audioldm_dist.fileio import DiskFullError, atomic_torch_save

    with pytest.raises(DiskFullError, match=r"model.ckpt could not be written to .*: no space left on the device or "
                                            r"quota exceeded \(needs about 4\.0 MB, .* free\)"):
        atomic_torch_save(tiny_disk / "model.ckpt", torch.zeros(1 << 20))  # what export and checkpoints write
    assert not list(tiny_disk.iterdir())  # no partial temp file left
    result = subprocess.run([sys.executable, "-c", "import sys; from shards.cli import main; sys.exit(main())",
                             "--metadata-root", str(demo_root), "--dataset", "demo", "--split", "train", "--out",
                             str(tiny_disk / "shards"), "--workers", "1", "--max-count", "4", "--quiet"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "could not be written to" in errors[0] and "no space left" in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_full_disk_during_a_checkpoint_keeps_latest_and_the_run_resumes_elsewhere(
        train_shards: Path, tmp_path: Path, small_disk: Path) -> None:
    run_dir = small_disk / "run"
    started = time.monotonic()
    process = _start(run_dir, train_shards, max_steps=8, save_every=2, extra=("--set", "train.keep_last=5"))
    output = _finish(process)
    assert process.returncode != 0, output[-3000:]
    assert "could not be written to" in output and "no space left on the device" in output, output[-5000:]
    assert "`latest` still names global_step" in output
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert (run_dir / "checkpoints" / latest / "meta.json").is_file()
    partial = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("global_step"))
    assert partial[-1] == latest, f"a partial checkpoint folder was left: {partial}"
    roomy = tmp_path / "moved"
    shutil.copytree(run_dir, roomy, ignore=shutil.ignore_patterns(".failures"))
    resumed = _start(roomy, train_shards, max_steps=int(latest.removeprefix("global_step")) + 2, save_every=2,
                     extra=("--set", "train.keep_last=5"))
    output = _finish(resumed)
    assert resumed.returncode == 0, output[-4000:]
    assert f"resumed from {roomy / 'checkpoints' / latest}" in output
