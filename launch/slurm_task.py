"""What every task of a job submitted by `launch/slurm.py` runs: the same `main(argv)` as `train.py`.

submitit starts one process per task; this sets the torch.distributed variables from the job
(`submitit.JobEnvironment`: SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, SLURM_JOB_NODELIST), the
master being the first node's SLURM NodeAddr and the port derived from the job id, then calls the
trainer. Requeue is submitit's: on the pre-timeout signal (USR2) the trainer saves at the next step
boundary on every rank and then hands the signal to submitit's handler, which calls `checkpoint()`
here and runs `scontrol requeue`; the requeued job resumes from `latest`. `checkpoint()` refuses to
requeue (the job ends) when no new checkpoint was written since the job last started: a crash loop
must not burn the allocation. submitit caps timeouts (`--max-requeues`); preemptions are not capped.

Only launch/ imports submitit. submitit pickles the `TrainingTask` at submission and unpickles it in every
task, so the tasks import this module as `launch.slurm_task`: from the install of this repository (setup.py's
packages include `launch`; scripts/setup_env.sh installs it editable) or the job's PYTHONPATH.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import submitit

from audioldm_dist.engine import checkpoint
from audioldm_dist.engine.distributed import node_address, slurm_first_host, task_environment
from audioldm_dist.engine.trainer import main as train_main

log = logging.getLogger("audioldm_dist.slurm")


def latest_step(run_dir: Path) -> int | None:
    point = checkpoint.find_resume_point(run_dir, "auto")
    return None if point is None else int(point.meta["step"])


class TrainingTask(submitit.helpers.Checkpointable):
    def __init__(self, train_argv: list[str], *, run_dir: str) -> None:
        self.train_argv = list(train_argv)
        self.run_dir = run_dir
        self.step_at_start: int | None = None

    def __call__(self) -> int:
        job = submitit.JobEnvironment()
        nodelist = os.environ.get("SLURM_JOB_NODELIST")
        master = node_address(slurm_first_host(nodelist)) if nodelist else "127.0.0.1"
        os.environ.update(task_environment(global_rank=job.global_rank, local_rank=job.local_rank,
                                           num_tasks=job.num_tasks, master_addr=master, job_id=str(job.job_id)))
        self.step_at_start = latest_step(Path(self.run_dir))
        logging.basicConfig(level=logging.INFO)
        log.info("task %d/%d on node %s (%s): master %s:%s, run %s, starting from step %s", job.global_rank,
                 job.num_tasks, os.environ.get("SLURMD_NODENAME", "-"), job.hostname, master, os.environ["MASTER_PORT"],
                 self.run_dir, self.step_at_start or 0)
        status = train_main(self.train_argv)
        if status != 0:
            raise RuntimeError(f"rank {job.global_rank}: train.py {' '.join(self.train_argv)} exited with {status}")
        return status

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on the requeue signal, after the trainer saved: requeue only on progress."""
        now = latest_step(Path(self.run_dir))
        if now is None or (self.step_at_start is not None and now <= self.step_at_start):
            log.error("no new checkpoint since this job started (step %s): not requeueing", self.step_at_start)
            return None
        log.warning("checkpoint at step %d (job started at %s): requeueing", now, self.step_at_start)
        return submitit.helpers.DelayedSubmission(TrainingTask(self.train_argv, run_dir=self.run_dir))
