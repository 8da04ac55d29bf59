"""Submit training to SLURM through submitit: `python launch/slurm.py --nodes 8 --gpus-per-node 8 --partition P
--time 48:00:00 -- --config configs/audioldm_s.yaml --deepspeed_config configs/ds/zero2.json --run-dir runs/s1 ...`

Everything after `--` is `train.py`'s command line, unchanged: each task runs the same `main(argv)`
(`launch/slurm_task.py`). Submission only lives here: checks (sbatch present, partition
known, run directory not another config's), the submitit parameters, `--dry-run`, `--local`, `--wait`.
`--dry-run` needs no SLURM: it prints the sbatch script that submitit's SlurmExecutor writes for these
parameters (`sbatch_script`; tests/test_launch_slurm.py compares it with the one a real submission wrote).
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

DEFAULT_SIGNAL_DELAY_S = 180


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python launch/slurm.py", description=__doc__.split("\n")[0],
                                     usage="%(prog)s --nodes N [options] -- TRAIN.PY ARGUMENTS")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (0: a CPU job)")
    parser.add_argument("--tasks-per-node", type=int, help="default: one per GPU (1 without GPUs)")
    parser.add_argument("--cpus-per-task", type=int,
                        help="default: the partition's CPUs per node / tasks per node (unknown: 8 with GPUs, else 1)")
    parser.add_argument("--mem-gb", type=float, help="memory per node (default: the cluster's DefMemPerCPU)")
    parser.add_argument("--partition")
    parser.add_argument("--time", default="24:00:00", help="time limit per allocation: [D-]HH:MM[:SS] or minutes")
    parser.add_argument("--account")
    parser.add_argument("--qos")
    parser.add_argument("--constraint")
    parser.add_argument("--exclude", help="nodes to avoid (SLURM node list)")
    parser.add_argument("--job-name", help="default: audioldm-RUNDIRNAME")
    parser.add_argument("--signal-delay", type=int,
                        help="seconds before the time limit at which SLURM signals the job to save and requeue "
                             "(default: from the run's step time, else %d)" % DEFAULT_SIGNAL_DELAY_S)
    parser.add_argument("--max-requeues", type=int, default=10, help="time-limit requeues before the job gives up")
    parser.add_argument("--wait", action="store_true", help="block until the job (with its requeues) ends")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script and task environment only")
    parser.add_argument("--local", action="store_true",
                        help="run the same job here through submitit's local executor (tasks-per-node processes)")
    return parser


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" not in argv:
        raise ValueError("put train.py's arguments after `--`, e.g. -- --config configs/tiny.yaml "
                         "--deepspeed_config configs/ds/zero2.json --run-dir runs/x --train-data shards/train")
    at = argv.index("--")
    return argv[:at], argv[at + 1:]


def parse_time_minutes(text: str) -> int:
    """SLURM's time formats: MM, HH:MM:SS, D-HH[:MM[:SS]] → whole minutes (rounded up)."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise ValueError(f"--time {text!r}: expected minutes, HH:MM:SS or D-HH:MM:SS")
    days, first, second, third = match.groups()
    if days is None and second is None:
        return int(first)
    hours, minutes, seconds = int(first), int(second or 0), int(third or 0)
    total = (int(days or 0) * 24 + hours) * 3600 + minutes * 60 + seconds
    return max(1, -(-total // 60))


def signal_delay_for(run_dir: Path, requested: int | None) -> int:
    """Room for one more step plus the checkpoint: 3 median step times + 60 s from the run's metrics."""
    if requested is not None:
        return requested
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        records = [json.loads(line) for line in metrics.read_text().splitlines()[-200:] if line.strip()]
        step_seconds = [r["step_seconds"] for r in records if r.get("step_seconds")]
        if step_seconds:
            return int(max(90, 3 * statistics.median(step_seconds) + 60))
    return DEFAULT_SIGNAL_DELAY_S


def train_option(train_argv: list[str], name: str) -> str | None:
    for index, arg in enumerate(train_argv):
        if arg == name and index + 1 < len(train_argv):
            return train_argv[index + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def check_train_arguments(train_argv: list[str]) -> tuple[Path, "object"]:
    """train.py's own parser and config loading, run here so mistakes surface before submission."""
    from audioldm_dist.engine.run_config import check_run_config
    from audioldm_dist.engine.trainer import build_parser as train_parser, resolve_config

    try:
        train_args = train_parser().parse_args(train_argv)
    except SystemExit:
        raise ValueError("the train.py arguments after `--` are invalid (see above)") from None
    config = resolve_config(train_args)
    if not Path(train_args.deepspeed_config).is_file():
        raise ValueError(f"--deepspeed_config {train_args.deepspeed_config}: no such file")
    run_dir = Path(train_args.run_dir).resolve()
    check_run_config(run_dir, config, config_path=train_args.config)
    return run_dir, config


def check_cluster(partition: str | None) -> int | None:
    """sbatch present and the partition known; returns the partition's CPUs per node (None if unknown)."""
    if shutil.which("sbatch") is None:
        raise ValueError("sbatch not found on PATH: run this on a SLURM login node (or use --local, or --dry-run)")
    listing = subprocess.run(["sinfo", "-h", "-o", "%R %c"], capture_output=True, text=True, timeout=60)
    if listing.returncode != 0:
        raise ValueError(f"sinfo failed: {listing.stderr.strip()}")
    cpus = {}
    for line in listing.stdout.splitlines():
        name, _, count = line.partition(" ")
        cpus[name] = int(re.sub(r"\D", "", count) or 0) or None
    if partition is not None and partition not in cpus:
        raise ValueError(f"unknown partition {partition!r}; this cluster has: {', '.join(sorted(cpus)) or 'none'}")
    if partition is None:
        return min((c for c in cpus.values() if c), default=None)
    return cpus[partition]


def executor_parameters(args: argparse.Namespace, *, run_dir: Path, node_cpus: int | None) -> dict:
    """What submitit's AutoExecutor gets: generic names, `slurm_*` for SLURM-only ones."""
    tasks = args.tasks_per_node or max(1, args.gpus_per_node)
    cpus = args.cpus_per_task or (max(1, node_cpus // tasks) if node_cpus else (8 if args.gpus_per_node else 1))
    parameters = {"name": args.job_name or f"audioldm-{run_dir.name}", "nodes": args.nodes, "tasks_per_node": tasks,
                  "cpus_per_task": cpus, "timeout_min": parse_time_minutes(args.time),
                  "slurm_signal_delay_s": signal_delay_for(run_dir, args.signal_delay),
                  # A task that exits non-zero (a failed rank: exit 1, 3 or 4) ends the whole step at once instead
                  # of leaving the others to wait; submitit then reports the job failed and does not requeue it.
                  "slurm_srun_args": ["--kill-on-bad-exit=1"]}
    if args.gpus_per_node:
        parameters["gpus_per_node"] = args.gpus_per_node
    if args.mem_gb:
        parameters["mem_gb"] = args.mem_gb
    for name in ("partition", "account", "qos", "constraint", "exclude"):
        if getattr(args, name):
            parameters[f"slurm_{name}"] = getattr(args, name)
    return parameters


def make_executor(args: argparse.Namespace, *, run_dir: Path, parameters: dict):
    import submitit

    executor = submitit.AutoExecutor(folder=str(run_dir / "slurm" / "%j"), cluster="local" if args.local else "slurm",
                                     slurm_max_num_timeout=args.max_requeues)
    if args.local:
        parameters = {k: v for k, v in parameters.items() if not k.startswith("slurm_")}
        parameters["nodes"] = 1
    executor.update_parameters(**parameters)
    return executor


SBATCH_NAMES = {"name": "job_name", "nodes": "nodes", "tasks_per_node": "ntasks_per_node",
                "cpus_per_task": "cpus_per_task", "gpus_per_node": "gpus_per_node", "timeout_min": "time",
                "mem_gb": "mem"}
"""`executor_parameters`' generic names → sbatch's; `slurm_X` parameters are sbatch's X (submitit's mapping)."""


def sbatch_script(parameters: dict, *, folder: Path) -> str:
    """The sbatch script submitit's SlurmExecutor writes for `executor_parameters` (its layout: #SBATCH lines
    sorted by name, then srun over `python -m submitit.core._submit FOLDER`), with the job id still `%j`."""
    flags = {"open-mode": "append", "wckey": "submitit", "output": str(folder / "%j_0_log.out"),
             "error": str(folder / "%j_0_log.err")}
    for name, value in parameters.items():
        if name == "slurm_signal_delay_s":
            flags["signal"] = f"USR2@{value}"
        elif name == "mem_gb":
            flags["mem"] = f"{int(value)}GB" if value == int(value) else f"{int(value * 1024)}MB"
        elif name != "slurm_srun_args":
            flags[SBATCH_NAMES.get(name, name.removeprefix("slurm_"))] = value
    srun = ["srun", "--unbuffered", "--output", str(folder / "%j_%t_log.out"), "--error",
            str(folder / "%j_%t_log.err"), *parameters.get("slurm_srun_args", [])]
    lines = ["#!/bin/bash", "", "# Parameters"]
    lines += [f"#SBATCH --{key.replace('_', '-')}={shlex.quote(str(flags[key]))}" for key in sorted(flags)]
    lines += ["", "# command", "export SUBMITIT_EXECUTOR=slurm",
              f"{shlex.join(srun)} {shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}",
              ""]
    return "\n".join(lines)


def describe_tasks(parameters: dict) -> str:
    """The per-task environment each task will set (`audioldm_dist.engine.distributed.task_environment`)."""
    tasks, nodes = parameters["tasks_per_node"], parameters["nodes"]
    world = tasks * nodes
    shown = sorted({0, 1, tasks, world - 1} & set(range(world)))
    lines = ["per-task environment (MASTER_ADDR = NodeAddr of the first host of SLURM_JOB_NODELIST, "
             "MASTER_PORT = 20000 + job id % 20000):"]
    for rank in shown:
        lines.append(f"  task {rank}: node {rank // tasks}, RANK={rank} LOCAL_RANK={rank % tasks} WORLD_SIZE={world}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        ours, train_argv = split_argv(argv)
        args = build_parser().parse_args(ours)
        run_dir, _ = check_train_arguments(train_argv)
        node_cpus = None if (args.dry_run or args.local) else check_cluster(args.partition)
        parameters = executor_parameters(args, run_dir=run_dir, node_cpus=node_cpus)
        if args.local and args.nodes != 1:
            raise ValueError("--local runs on this machine: use --nodes 1 (and --tasks-per-node N)")
    except ValueError as error:
        print(f"launch/slurm.py: error: {error}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(sbatch_script(parameters, folder=run_dir / "slurm" / "%j"))
        print(describe_tasks(parameters))
        print("train.py arguments: " + " ".join(train_argv))
        return 0
    from launch.slurm_task import TrainingTask

    run_dir.mkdir(parents=True, exist_ok=True)
    executor = make_executor(args, run_dir=run_dir, parameters=parameters)
    job = executor.submit(TrainingTask(train_argv, run_dir=str(run_dir)))
    placeholder = run_dir / "slurm" / "%j"  # submitit creates its folder pattern literally too
    if placeholder.is_dir() and not any(placeholder.iterdir()):
        placeholder.rmdir()
    log_dir = run_dir / "slurm" / str(job.job_id)
    print(f"submitted job {job.job_id} ({parameters['nodes']} node(s) × {parameters['tasks_per_node']} task(s)), "
          f"run directory {run_dir}")
    print(f"logs: {log_dir}/{job.job_id}_<task>_log.out and .err; follow rank 0 with:\n"
          f"  tail -f {log_dir}/{job.job_id}_0_log.out\n"
          f"state: squeue -j {job.job_id}   stop: scancel {job.job_id}   "
          f"resume by hand later: the same command (train.py resumes from {run_dir}/checkpoints/latest)")
    if not args.wait:
        return 0
    try:
        job.results()  # one per task
    except Exception as error:  # submitit raises the task's failure, with its log tail
        print(f"job {job.job_id} failed: {error}", file=sys.stderr)
        return 1
    print(f"job {job.job_id} finished; checkpoints in {run_dir}/checkpoints")
    return 0


if __name__ == "__main__":
    sys.exit(main())
