"""launch/slurm.py on a real 2-node SLURM cluster (tests/slurm_cluster.py): a tiny DeepSpeed training
across both nodes, and a requeue mid-run that resumes and ends exactly where an uninterrupted run does."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))
import slurm as launcher  # noqa: E402  (launch/slurm.py is a script, imported for its functions)

MAX_STEPS = 16


def _launch_command(run_dir: Path, shards: Path) -> list[str]:
    return [sys.executable, "launch/slurm.py", "--nodes", "2", "--tasks-per-node", "1", "--partition", "debug",
            "--time", "30", "--wait", "--", "--config", "configs/tiny.yaml", "--deepspeed_config",
            "configs/ds/zero2.json", "--run-dir", str(run_dir), "--train-data", str(shards),
            "--max-steps", str(MAX_STEPS), "--save-every", "8"]


def _env(cluster) -> dict[str, str]:
    return cluster.client_env({"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"})


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _task_logs(run_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((run_dir / "slurm").glob("*/*_log.*")))


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, train_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("slurm_runs") / "whole"
    result = subprocess.run(_launch_command(run_dir, train_shards), cwd=ROOT, env=_env(slurm_cluster),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:] + _task_logs(run_dir)[-4000:]
    assert re.search(r"submitted job \d+ \(2 node\(s\) × 1 task\(s\)\)", result.stdout)
    return run_dir


def test_two_nodes_train_to_completion_and_checkpoint(uninterrupted: Path) -> None:
    assert (uninterrupted / "checkpoints" / "latest").read_text().strip() == f"global_step{MAX_STEPS}"
    assert [r["step"] for r in _metrics(uninterrupted)] == list(range(1, MAX_STEPS + 1))
    logs = _task_logs(uninterrupted)
    # one task per node, and the master found as the first node's NodeAddr (node names do not resolve here)
    assert re.search(r"task 0/2 on node node1 .*master 127\.0\.0\.1:\d+", logs), logs[-3000:]
    assert re.search(r"task 1/2 on node node2 .*master 127\.0\.0\.1:\d+", logs), logs[-3000:]


def test_dry_run_prints_the_script_that_submitit_submitted(uninterrupted: Path) -> None:
    """`--dry-run` renders the script itself (no submitit internals): it must be the one submitit wrote."""
    (submitted,) = (uninterrupted / "slurm").glob("*/*_submission.sh")
    text = submitted.read_text()
    cpus = re.search(r"#SBATCH --cpus-per-task=(\d+)", text).group(1)  # from sinfo at submission
    args = launcher.build_parser().parse_args(["--nodes", "2", "--tasks-per-node", "1", "--partition", "debug",
                                               "--time", "30", "--cpus-per-task", cpus, "--signal-delay", "180"])
    parameters = launcher.executor_parameters(args, run_dir=uninterrupted.resolve(), node_cpus=None)
    assert launcher.sbatch_script(parameters, folder=uninterrupted.resolve() / "slurm" / "%j") == text


def test_pre_timeout_signal_saves_requeues_and_resumes_to_the_same_end(slurm_cluster, uninterrupted: Path,
                                                                        train_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "requeued"
    launcher = subprocess.Popen(_launch_command(run_dir, train_shards), cwd=ROOT, env=_env(slurm_cluster),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not any(r["step"] >= 3 for r in _metrics(run_dir)):
            assert launcher.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.5)
        (job_id,) = [p.name for p in (run_dir / "slurm").iterdir() if p.name.isdigit()]
        slurm_cluster.run("scancel", "--signal=USR2", job_id)  # what SLURM sends at --signal=USR2@N
        output, _ = launcher.communicate(timeout=600)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    logs = _task_logs(run_dir)
    assert launcher.returncode == 0, output[-2000:] + logs[-4000:]
    assert "stopped by signal after saving step" in logs and "requeueing" in logs and "resumed from" in logs
    saved = re.search(r"stopped by signal after saving step (\d+)", logs).group(1)
    assert 3 <= int(saved) < MAX_STEPS
    records = _metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, MAX_STEPS + 1))  # each step once, resumed after the save
    expected = {r["step"]: r["loss"] for r in _metrics(uninterrupted)}
    for record in records:
        assert record["loss"] == pytest.approx(expected[record["step"]], abs=1e-6), record
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"global_step{MAX_STEPS}"


def test_an_unknown_partition_is_refused_before_submission(slurm_cluster, tmp_path: Path) -> None:
    command = [sys.executable, "launch/slurm.py", "--nodes", "2", "--partition", "gpu-big", "--",
               "--config", "configs/tiny.yaml", "--deepspeed_config", "configs/ds/zero2.json",
               "--run-dir", str(tmp_path / "run"), "--train-data", "x"]
    result = subprocess.run(command, cwd=ROOT, env=_env(slurm_cluster), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "unknown partition 'gpu-big'; this cluster has: debug, urgent" in result.stderr
    assert not (tmp_path / "run").exists()
