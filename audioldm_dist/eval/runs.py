"""Run directories: which validation folders to evaluate, where results go, and the summary table.

The trainer writes `RUN_DIR/val_stepNNNNNNN/NAME.wav` (+ `NAME.json` with the caption) every
`val_every` steps and the matching real clips once to `RUN_DIR/val_reference/`. Every `val_*`
folder except the reference is evaluated; its metrics go to `RUN_DIR/val_stepNNNNNNN.metrics.json`,
beside the folder as the original eval.py does, and the table across steps to `RUN_DIR/eval_summary.md`.
"""
from __future__ import annotations

import re
from pathlib import Path

REFERENCE_DIR = "val_reference"
SUMMARY_NAME = "eval_summary.md"
COLUMNS = (("FD ↓", "frechet_distance"), ("FAD ↓", "frechet_audio_distance"),
           ("KL softmax ↓", "kullback_leibler_divergence_softmax"),
           ("KL sigmoid ↓", "kullback_leibler_divergence_sigmoid"), ("IS ↑", "inception_score_mean"),
           ("CLAP ↑", "clap_score"))


def metrics_path(folder: Path) -> Path:
    """`RUN/val_step0000200` → `RUN/val_step0000200.metrics.json`."""
    folder = folder if folder.name else folder.resolve()  # "." has no name
    return folder.parent / f"{folder.name}.metrics.json"


def step_of(folder: Path) -> int | None:
    """The training step in a folder name (`val_step0000200` → 200), if it ends in digits."""
    match = re.search(r"(\d+)$", folder.name)
    return int(match.group(1)) if match else None


def validation_folders(run_dir: Path, *, exclude: Path | None = None) -> list[Path]:
    """`val_*` folders of a run, by step; the reference folder (and `exclude`) left out."""
    excluded = {REFERENCE_DIR}
    folders = [p for p in run_dir.glob("val_*") if p.is_dir() and p.name not in excluded
               and (exclude is None or p.resolve() != exclude.resolve())]
    return sorted(folders, key=lambda p: (step_of(p) is None, step_of(p) or 0, p.name))


def find_run_dirs(runs_root: Path) -> list[Path]:
    """Subfolders of `runs_root` that hold at least one validation folder (`--log_path all`)."""
    if not runs_root.is_dir():
        raise ValueError(f"--runs-root {runs_root}: no such folder")
    runs = [p for p in sorted(runs_root.iterdir()) if p.is_dir() and validation_folders(p)]
    if not runs:
        raise ValueError(f"--log_path all: no run directory under {runs_root} has val_* folders")
    return runs


def reference_for(run_dir: Path, given: Path | None) -> Path:
    """`--reference` when given, else the run's own `val_reference/`."""
    if given is not None:
        return given
    default = run_dir / REFERENCE_DIR
    if not default.is_dir():
        raise ValueError(f"{run_dir}: no {REFERENCE_DIR}/ folder; pass --reference DIR with the real clips")
    return default


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def summary_markdown(title: str, results: list[dict], *, warning: str | None = None) -> str:
    """One row per evaluated folder, by step, with clip counts; failed folders say why."""
    lines = [f"# {title}", ""]
    if warning:
        lines += [f"**WARNING: {warning}**", ""]
    references = sorted({r["reference"] for r in results if "reference" in r})
    if references:
        lines += [f"Reference: `{ref}`" for ref in references] + [""]
    header = ["folder", "step", *(name for name, _ in COLUMNS), "clips", "paired", "failed files"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        folder = Path(result["generated"])
        step = step_of(folder)
        if "error" in result:
            lines.append(f"| {folder.name} | {step if step is not None else '–'} | error: {result['error']} |")
            continue
        counts = result["counts"]
        failed = result["failed_files"]["generated"]["count"] + result["failed_files"]["reference"]["count"]
        cells = [folder.name, "–" if step is None else str(step), *(_cell(result["metrics"][k]) for _, k in COLUMNS),
                 f"{counts['generated_used']}/{counts['reference_used']}", str(counts["paired"]), str(failed)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "clips: generated/reference clips read; paired: names in both (KL); "
                  "– : not computed (see `skipped_metrics` in the folder's metrics JSON)."]
    return "\n".join(lines) + "\n"
