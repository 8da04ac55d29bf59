"""A stand-in for `sacct` on the test cluster, which has no accounting database (no slurmdbd).

submitit learns job states only from `sacct -o JobID,State,NodeList --parsable2 -j ID ...`; without
accounting the real sacct fails, submitit logs "Bypassing sacct error" and a job killed before it wrote
its result (scancel, node failure) is never seen as done: `job.result()` would wait forever. This script
answers the same query from `scontrol show job`, which keeps finished jobs for MinJobAge seconds.
`SlurmCluster` installs it as `<workdir>/bin/sacct`; it answers only the forms submitit uses.
"""
from __future__ import annotations

import argparse
import subprocess
import sys

FIELDS = {"jobid": "JobID", "state": "State", "nodelist": "NodeList", "jobname": "JobName",
          "partition": "Partition", "exitcode": "ExitCode"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sacct", description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--format", default="JobID,State,NodeList")
    parser.add_argument("-j", "--jobs", action="append", default=[])
    parser.add_argument("-P", "--parsable2", action="store_true")
    parser.add_argument("-n", "--noheader", action="store_true")
    parser.add_argument("-X", "--allocations", action="store_true")
    args = parser.parse_args(argv)
    if not args.parsable2:
        parser.error("only --parsable2 output is implemented (what submitit asks for)")
    return args


def scontrol_records(job_id: str) -> list[dict[str, str]]:
    """`scontrol show job -o` as one dict per job (array tasks are separate records); [] if purged."""
    proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    if proc.returncode != 0:
        return []
    records = []
    for line in proc.stdout.splitlines():
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        if "JobId" in fields:
            records.append(fields)
    return records


def sacct_row(record: dict[str, str], fields: list[str]) -> str:
    """One `--parsable2` line; array tasks are named ARRAYID_TASK as sacct does (ranges as ARRAYID_[1-3])."""
    job_id = record["JobId"]
    if "ArrayJobId" in record and "ArrayTaskId" in record:
        task = record["ArrayTaskId"]
        task = task if task.isdigit() else f"[{task}]"
        job_id = f"{record['ArrayJobId']}_{task}"
    values = {"jobid": job_id, "state": record.get("JobState", "UNKNOWN"),
              "nodelist": record.get("NodeList", "(null)"), "jobname": record.get("JobName", ""),
              "partition": record.get("Partition", ""), "exitcode": record.get("ExitCode", "")}
    return "|".join(values[name] for name in fields)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    fields = [name.strip().lower() for name in args.format.split(",")]
    unknown = [name for name in fields if name not in FIELDS]
    if unknown:
        print(f"sacct (test stand-in): unsupported fields {unknown}; known: {sorted(FIELDS.values())}",
              file=sys.stderr)
        return 1
    job_ids = [job_id for arg in args.jobs for job_id in arg.split(",") if job_id]
    lines = [] if args.noheader else ["|".join(FIELDS[name] for name in fields)]
    seen = set()
    for job_id in job_ids:
        for record in scontrol_records(job_id.split("_")[0]):
            row = sacct_row(record, fields)
            if row not in seen:
                seen.add(row)
                lines.append(row)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
