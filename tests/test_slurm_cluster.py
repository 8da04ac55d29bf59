"""The one-machine SLURM cluster behaves like a real one where our launcher depends on it.

Two nodes, one task each; sbatch node lists; submitit's JobEnvironment; and submitit's
checkpoint-and-requeue on its USR2, whether sent by hand (`scancel --signal=USR2`, what
`job._interrupt(timeout=True)` does), by SLURM near the time limit (`--signal=USR2@N`), or on preemption.
The callables below are pickled by reference, so jobs import this module (`slurm_env` puts tests/ on
PYTHONPATH).
"""
from __future__ import annotations

import os
import re
import time
from datetime import datetime
from pathlib import Path

import pytest
import submitit

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


def job_facts() -> dict:
    """What a task of a submitit job sees of its job."""
    env = submitit.JobEnvironment()
    return {"global_rank": env.global_rank, "num_tasks": env.num_tasks, "hostnames": env.hostnames,
            "node_name": os.environ["SLURMD_NODENAME"], "node": env.node}


def sleep_forever() -> None:
    time.sleep(3600)


class ProgressLoop(submitit.helpers.Checkpointable):
    """Counts to `num_steps` (one step per `step_s`), resuming from the count rank 0 keeps in `progress`.

    checkpoint() appends the step it was called at to `progress`.checkpoints; with
    `steps_after_requeue` the requeued run only does that many more steps (the rest of a run that
    outlived its time limit), so a job signalled near its limit finishes before the next signal.
    """

    def __init__(self, progress: Path, num_steps: int, *, step_s: float = 0.5,
                 steps_after_requeue: int | None = None) -> None:
        self.progress = Path(progress)
        self.num_steps = num_steps
        self.step_s = step_s
        self.steps_after_requeue = steps_after_requeue

    def __call__(self) -> dict:
        env = submitit.JobEnvironment()
        start = self._read_step()
        step = start
        while step < self.num_steps:
            time.sleep(self.step_s)
            step += 1
            if env.global_rank == 0:  # atomically: USR2 may run checkpoint() between two bytecodes
                tmp = self.progress.with_suffix(".tmp")
                tmp.write_text(str(step))
                tmp.replace(self.progress)
        return {"rank": env.global_rank, "started_at": start, "finished_at": step,
                "restarts": int(os.environ.get("SLURM_RESTART_COUNT", 0))}

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        step = self._read_step()
        with open(f"{self.progress}.checkpoints", "a") as f:
            f.write(f"{step}\n")
        if self.steps_after_requeue is not None:
            self.num_steps = step + self.steps_after_requeue
        return super().checkpoint(*args, **kwargs)

    def _read_step(self) -> int:
        return int(self.progress.read_text()) if self.progress.exists() else 0


def wait_for(predicate, *, timeout_s: float, what: str, poll_s: float = 0.2):
    """Polls until predicate() is truthy and returns its value; fails the test after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


def read_step(path: Path) -> int:
    try:
        return int(path.read_text())
    except (FileNotFoundError, ValueError):
        return 0


def submitit_log_times(log: str, pattern: str) -> list[float]:
    """Unix times of the submitit log lines (`... (2026-01-01 10:00:00,123) - msg`) whose msg matches."""
    stamps = re.findall(r"\((\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\) - " + pattern, log)
    return [datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f").timestamp() for s in stamps]


def make_executor(folder: Path, **params) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder / "%j")
    assert executor.cluster == "slurm", f"submitit picked {executor.cluster!r}, not slurm (srun on PATH?)"
    executor.update_parameters(**{"slurm_partition": "debug", "nodes": 2, "tasks_per_node": 1,
                                  "cpus_per_task": 1, "timeout_min": 5, **params})
    return executor


def track_states(cluster, job_id: str, until, *, timeout_s: float) -> list[tuple[float, str]]:
    """(seconds, JobState) at each change of state, polled until until() is true."""
    changes: list[tuple[float, str]] = []
    start = time.monotonic()
    while not until():
        state = cluster.job_state(job_id)
        if not changes or changes[-1][1] != state:
            changes.append((round(time.monotonic() - start, 1), state))
        if time.monotonic() - start > timeout_s:
            pytest.fail(f"job {job_id} not done after {timeout_s} s; states {changes}")
        time.sleep(0.2)
    return changes


@pytest.mark.timeout(60)
def test_srun_runs_one_task_on_each_node(slurm_cluster):
    out = slurm_cluster.run("srun", "-N2", "-n2", "bash", "-c",
                            "echo $SLURM_PROCID $SLURM_NODEID $SLURMD_NODENAME $(hostname)").stdout
    rows = sorted(line.split() for line in out.splitlines())
    assert [row[:3] for row in rows] == [["0", "0", "node1"], ["1", "1", "node2"]]
    # Both nodes are this machine: code that tells nodes apart must use SLURMD_NODENAME/SLURM_NODEID.
    assert rows[0][3] == rows[1][3] == os.uname().nodename


@pytest.mark.timeout(60)
def test_sbatch_job_lists_both_nodes_and_node_addresses(slurm_cluster, tmp_path):
    out = tmp_path / "hosts.txt"
    slurm_cluster.run("sbatch", "--wait", "-N2", "-o", str(out), "--wrap",
                      "scontrol show hostnames $SLURM_JOB_NODELIST")
    assert out.read_text().split() == ["node1", "node2"]
    node = slurm_cluster.run("scontrol", "show", "node", "node1").stdout
    # Node names do not resolve; a launcher picking MASTER_ADDR must use NodeAddr (or NodeHostName).
    assert "NodeAddr=127.0.0.1" in node


@pytest.mark.timeout(60)
def test_submitit_job_environment_on_two_nodes(slurm_env, tmp_path):
    job = make_executor(tmp_path).submit(job_facts)
    results = sorted(job.results(), key=lambda r: r["global_rank"])
    assert [r["global_rank"] for r in results] == [0, 1]
    assert {r["num_tasks"] for r in results} == {2}
    assert [r["node"] for r in results] == [0, 1]
    assert [r["node_name"] for r in results] == ["node1", "node2"]
    assert all(r["hostnames"] == ["node1", "node2"] for r in results)


@pytest.mark.timeout(60)
def test_killed_job_is_seen_as_done_through_fake_sacct(slurm_env, tmp_path, record_property):
    job = make_executor(tmp_path, nodes=1).submit(sleep_forever)
    t_submit = time.monotonic()
    wait_for(lambda: slurm_env.job_state(job.job_id) == "RUNNING", timeout_s=20, what="job running")
    t_cancel = time.monotonic()
    job.cancel()
    # No result file will ever appear: only the sacct state ends the wait (and then submitit still
    # waits its _results_timeout_s = 15 s for a late result file before it raises).
    with pytest.raises(submitit.core.utils.UncompletedJobError, match="CANCELLED"):
        job.result()
    timings = {"submit_to_running_s": round(t_cancel - t_submit, 1),
               "cancel_to_done_s": round(time.monotonic() - t_cancel, 1)}
    record_property("timings", timings)
    print(timings)


@pytest.mark.timeout(90)
def test_usr2_makes_submitit_checkpoint_requeue_and_continue(slurm_env, tmp_path, record_property):
    progress = tmp_path / "progress"
    t_submit = time.monotonic()
    job = make_executor(tmp_path).submit(ProgressLoop(progress, num_steps=24))
    wait_for(lambda: read_step(progress) >= 6, timeout_s=30, what="6 steps")
    t_signal = time.monotonic()
    # What job._interrupt(timeout=True) sends: USR2 to every step of the job, not to the batch shell.
    slurm_env.run("scancel", "--signal=USR2", job.job_id)
    states = track_states(slurm_env, job.job_id, job.done, timeout_s=60)
    results = sorted(job.results(), key=lambda r: r["rank"])

    checkpoints = [int(s) for s in Path(f"{progress}.checkpoints").read_text().split()]
    assert len(checkpoints) == 1 and checkpoints[0] >= 6
    assert [r["restarts"] for r in results] == [1, 1]
    assert all(r["started_at"] >= checkpoints[0] and r["finished_at"] == 24 for r in results)
    log = job.task(0).stdout() + job.task(0).stderr()
    # timeout_min < 10: submitit counts any USR2 as a time-out (one of max_num_timeout=3 requeues).
    assert "this job is timed-out" in log and "Requeued job" in log
    timings = {"submit_to_step6_s": round(t_signal - t_submit, 1), "states_after_signal": states,
               "total_s": round(time.monotonic() - t_submit, 1)}
    record_property("timings", timings)
    print(timings)


@pytest.mark.timeout(120)
def test_time_limit_signal_makes_submitit_requeue(slurm_env, tmp_path, record_property):
    # --signal=USR2@20 on a 60 s job: slurmctld checks every 30 s and sends once end - 20 - 30 s has
    # passed, so the signal comes 10 to 40 s after the start (SLURM warns: up to 60 s early).
    progress = tmp_path / "progress"
    executor = make_executor(tmp_path, timeout_min=1, slurm_signal_delay_s=20)
    t_submit = time.time()
    job = executor.submit(ProgressLoop(progress, num_steps=200, steps_after_requeue=4))
    states = track_states(slurm_env, job.job_id, job.done, timeout_s=100)
    results = sorted(job.results(), key=lambda r: r["rank"])

    checkpoint = int(Path(f"{progress}.checkpoints").read_text().split()[0])
    assert [r["restarts"] for r in results] == [1, 1]
    assert results[0]["started_at"] == checkpoint  # rank 1 may start a step later: rank 0 writes
    assert [r["finished_at"] for r in results] == [checkpoint + 4] * 2
    log = job.task(0).stdout()
    starts = submitit_log_times(log, "Starting with")
    signals = submitit_log_times(log, "Caught signal SIGUSR2")
    requeues = submitit_log_times(log, "Requeued job")
    assert len(starts) == 2 and len(signals) == 1 and len(requeues) == 1, log
    assert 5 <= signals[0] - starts[0] <= 45
    timings = {"signal_after_start_s": round(signals[0] - starts[0], 1),
               "requeue_to_restart_s": round(starts[1] - requeues[0], 1),
               "total_s": round(time.time() - t_submit, 1), "states": states}
    record_property("timings", timings)
    print(timings)


@pytest.mark.timeout(90)
def test_preemption_signals_submitit_which_requeues(slurm_env, tmp_path, record_property):
    progress = tmp_path / "progress"
    # All 4 CPUs, and a time limit long enough that submitit calls the signal a preemption.
    executor = make_executor(tmp_path, cpus_per_task=2, timeout_min=60)
    t_submit = time.monotonic()
    job = executor.submit(ProgressLoop(progress, num_steps=24))
    wait_for(lambda: read_step(progress) >= 6, timeout_s=30, what="6 steps")
    t_urgent = time.monotonic()
    urgent = slurm_env.run("sbatch", "--parsable", "-p", "urgent", "-N2", "-c2", "-o",
                           str(tmp_path / "urgent.out"), "--wrap", "echo urgent ran").stdout.strip()
    states = track_states(slurm_env, job.job_id, job.done, timeout_s=70)
    results = job.results()

    assert slurm_env.job_state(urgent) == "COMPLETED"
    assert len(Path(f"{progress}.checkpoints").read_text().split()) == 1
    assert [r["restarts"] for r in results] == [1, 1]
    assert all(r["finished_at"] == 24 for r in results)
    log = job.task(0).stdout()
    assert "this job is preempted" in log and "Requeued job" in log and "Calling checkpoint" in log
    timings = {"submit_to_step6_s": round(t_urgent - t_submit, 1), "states_after_urgent": states,
               "total_s": round(time.monotonic() - t_submit, 1)}
    record_property("timings", timings)
    print(timings)
