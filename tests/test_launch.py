"""launch/slurm.py without a cluster: node lists, task environments, sbatch parameters, early errors."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from audioldm_dist.engine.distributed import DistEnv, expand_hostlist, port_for_job, slurm_first_host, task_environment

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))
import slurm as launcher  # noqa: E402  (launch/slurm.py is a script, imported for its functions)


NODE_LISTS = {
    "gpu[01-03,07],cpu5": ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"],
    "cpu5,gpu[01-03]": ["cpu5", "gpu01", "gpu02", "gpu03"],
    "n[8-10],x[08-10]": ["n8", "n9", "n10", "x08", "x09", "x10"],  # a range keeps the digits of its start
    "r[1-2]n[1,3]": ["r1n1", "r1n3", "r2n1", "r2n3"],  # several groups: their product
    "node7": ["node7"],
    "a, b[2]": ["a", "b2"],
}


@pytest.mark.parametrize("nodelist", NODE_LISTS)
def test_node_lists_expand_as_slurm_does(nodelist: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert expand_hostlist(nodelist) == NODE_LISTS[nodelist]
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: slurm_first_host uses expand_hostlist
    assert slurm_first_host(nodelist) == NODE_LISTS[nodelist][0]


@pytest.mark.parametrize("nodelist", ["gpu[01-03", "gpu]1", "gpu[[1]]", "gpu[a-b]", "gpu[3-1]", "gpu[1-]"])
def test_a_malformed_node_list_is_an_error_naming_it(nodelist: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(nodelist))):
        expand_hostlist(nodelist)


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="needs SLURM's scontrol")
def test_node_lists_expand_as_scontrol_does(tmp_path: Path) -> None:
    """SLURM's own expansion, with a minimal slurm.conf (scontrol show hostnames needs one, not a controller)."""
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=t\nSlurmctldHost=localhost\nNodeName=n1 CPUs=1\nPartitionName=p Nodes=n1\n")
    for nodelist, hosts in NODE_LISTS.items():
        result = subprocess.run(["scontrol", "show", "hostnames", nodelist.replace(" ", "")], capture_output=True,
                                text=True, timeout=60, env={**os.environ, "SLURM_CONF": str(conf)})
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == hosts == expand_hostlist(nodelist)


def test_task_environment_for_several_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    tasks_per_node, nodes = 8, 2
    seen = set()
    for rank in range(tasks_per_node * nodes):
        env = task_environment(global_rank=rank, local_rank=rank % tasks_per_node, num_tasks=16, master_addr="10.0.0.1",
                               job_id="4242")
        assert env == {"RANK": str(rank), "WORLD_SIZE": "16", "LOCAL_RANK": str(rank % tasks_per_node),
                       "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": str(20000 + 4242)}
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        dist_env = DistEnv.from_environ()  # what the trainer then reads
        seen.add((dist_env.rank, dist_env.local_rank))
        assert dist_env.world_size == 16
    assert len(seen) == 16
    assert port_for_job("123456_7") == port_for_job("123456_7") != port_for_job("123457")
    assert 20000 <= port_for_job("99999999") < 40000


def test_sbatch_parameters_for_8_nodes_of_8_gpus(tmp_path: Path) -> None:
    args = launcher.build_parser().parse_args(["--nodes", "8", "--gpus-per-node", "8", "--partition", "gpu", "--time",
                                               "48:00:00", "--account", "lab", "--qos", "high", "--exclude", "gpu13"])
    parameters = launcher.executor_parameters(args, run_dir=tmp_path / "s1", node_cpus=96)
    assert parameters == {"name": "audioldm-s1", "nodes": 8, "tasks_per_node": 8, "gpus_per_node": 8,
                          "cpus_per_task": 12, "timeout_min": 2880, "slurm_signal_delay_s": 180,
                          "slurm_partition": "gpu", "slurm_account": "lab", "slurm_qos": "high",
                          "slurm_exclude": "gpu13", "slurm_srun_args": ["--kill-on-bad-exit=1"]}
    assert launcher.parse_time_minutes("1-00:30") == 1470 and launcher.parse_time_minutes("90") == 90
    assert launcher.parse_time_minutes("00:00:30") == 1
    (tmp_path / "s1").mkdir()
    (tmp_path / "s1" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0, "step_seconds": 40.0}\n' * 3)
    assert launcher.signal_delay_for(tmp_path / "s1", None) == 180  # 3 × 40 s + 60 s


def _run_launcher(*args: str, path: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"PATH": path} if path is not None else {})}
    return subprocess.run([sys.executable, "launch/slurm.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env)


TRAIN = ["--config", "configs/tiny.yaml", "--deepspeed_config", "configs/ds/zero2.json", "--train-data", "x"]


def test_dry_run_prints_the_sbatch_script_and_task_environment(tmp_path: Path) -> None:
    result = _run_launcher("--nodes", "8", "--gpus-per-node", "8", "--partition", "gpu", "--time", "48:00:00",
                           "--dry-run", "--", *TRAIN, "--run-dir", str(tmp_path / "run"),
                           path=str(tmp_path))  # no SLURM needed to see the script
    assert result.returncode == 0, result.stderr
    for line in ("#SBATCH --nodes=8", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --time=2880", "#SBATCH --signal=USR2@180",
                 "task 63: node 7, RANK=63 LOCAL_RANK=7 WORLD_SIZE=64"):
        assert line in result.stdout
    assert "srun --unbuffered --output" in result.stdout and "--kill-on-bad-exit=1" in result.stdout
    assert not (tmp_path / "run").exists()  # nothing written, nothing submitted


def test_errors_before_anything_is_submitted(tmp_path: Path) -> None:
    no_sbatch = _run_launcher("--nodes", "2", "--", *TRAIN, "--run-dir", str(tmp_path / "run"),
                              path=str(tmp_path))  # a PATH without SLURM's tools
    assert no_sbatch.returncode == 2 and "sbatch not found on PATH" in no_sbatch.stderr
    missing_separator = _run_launcher("--nodes", "2")
    assert missing_separator.returncode == 2 and "after `--`" in missing_separator.stderr
    run = tmp_path / "other"
    run.mkdir()
    (run / "config.json").write_text('{"audio": {"duration": 10.24}}')
    other = _run_launcher("--nodes", "2", "--dry-run", "--", *TRAIN, "--run-dir", str(run))
    assert other.returncode == 2 and "belongs to a different config: audio.duration: run has 10.24" in other.stderr


def test_requeue_only_after_progress(tmp_path: Path) -> None:
    """submitit asks TrainingTask.checkpoint() before requeueing: no new checkpoint since the job started
    (a crash loop) → None, and submitit ends the job instead of requeueing it."""
    import json

    from launch.slurm_task import TrainingTask, latest_step

    tag = tmp_path / "checkpoints" / "global_step5"
    tag.mkdir(parents=True)
    (tag / "meta.json").write_text(json.dumps({"step": 5, "world_size": 2, "zero_stage": 2}))
    (tmp_path / "checkpoints" / "latest").write_text("global_step5")
    assert latest_step(tmp_path) == 5
    task = TrainingTask(["--config", "c.yaml"], run_dir=str(tmp_path))
    task.step_at_start = 5
    assert task.checkpoint() is None
    task.step_at_start = 3
    again = task.checkpoint()
    assert again.function.train_argv == ["--config", "c.yaml"] and again.function.step_at_start is None


@pytest.mark.slow
def test_local_runs_the_same_job_with_submitits_local_executor(train_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "local"
    result = _run_launcher("--nodes", "1", "--tasks-per-node", "2", "--local", "--wait", "--",
                           "--config", "configs/tiny.yaml", "--deepspeed_config", "configs/ds/zero2.json",
                           "--run-dir", str(run), "--train-data", str(train_shards), "--max-steps", "4",
                           "--save-every", "4")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "finished; checkpoints in" in result.stdout
    assert (run / "checkpoints" / "latest").read_text().strip() == "global_step4"
    logs = "".join(p.read_text() for p in run.glob("slurm/*/*_log.err"))
    assert "task 0/2" in logs and "task 1/2" in logs
