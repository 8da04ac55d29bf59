"""The make-shards job: inspect headers → plan → write the missing shards in parallel → manifest.

Shards are written by `shards.pool` (forkserver workers, one shard per task); progress is counted per
file and shown by tqdm in the parent (`progress_bar`, shared with encode-shards).
"""
from __future__ import annotations

import json
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from audioldm_dist.data.metadata import DatasetRoot, LabelIndex
from shards.manifest import Manifest, ShardEntry, write_manifest
from shards.plan import Failure, ShardOptions, ShardSpec, inspect_entry, order_entries, plan_shards
from audioldm_dist.fileio import atomic_write_bytes
from shards.pool import ProgressCallback, report, task_runner
from shards.writer import STATE_DIR, ShardRecord, completed_record, write_shard

log = logging.getLogger("make-shards")

OPTIONS_FILE = "options.json"


@dataclass(frozen=True, kw_only=True)
class MakeShardsResult:
    manifest: Manifest
    num_written: int
    num_reused: int
    failed_fraction: float


class OptionsMismatchError(ValueError):
    """The output folder holds shards made from other inputs or options."""


# --- worker side -------------------------------------------------------------------------------
def _write_shard_task(args: tuple[ShardSpec, Path, ShardOptions, LabelIndex | None]) -> ShardRecord:
    spec, out_dir, options, labels = args
    return write_shard(spec, out_dir=out_dir, options=options, labels=labels, progress=report)


# --- parent side -------------------------------------------------------------------------------
@contextmanager
def progress_bar(*, total: int, desc: str, show: bool) -> Iterator[ProgressCallback]:
    """A tqdm bar over files with the audio hours per second written so far; yields its `tick(files, seconds)`."""
    bar = tqdm(total=total, desc=desc, unit="file", disable=not show, file=sys.stderr, smoothing=0.1)
    audio_seconds = [0.0]

    def tick(num_files: int, seconds: float) -> None:
        audio_seconds[0] += seconds
        bar.update(num_files)
        elapsed = max(bar.format_dict["elapsed"], 1e-9)
        bar.set_postfix_str(f"{audio_seconds[0] / 3600 / elapsed:.3f} audio-h/s", refresh=False)

    try:
        yield tick
    finally:
        bar.close()


def check_output_folder(out_dir: Path, *, options, source: dict, overwrite: bool,
                        remove_stale: bool = True) -> None:
    """Refuses to mix shards of different inputs/options in one folder, which would corrupt the set.
    `options` is a dataclass with a `prefix` (make-shards' ShardOptions, encode-shards' EncodeOptions);
    `remove_stale=False` leaves temp files of killed runs to their owners (several ranks share the folder)."""
    state_dir = out_dir / STATE_DIR
    state_dir.mkdir(parents=True, exist_ok=True)
    if remove_stale:
        for stale in out_dir.glob(f".{options.prefix}-*.tar.tmp-*"):  # left by a killed run
            stale.unlink()
    wanted = {"options": asdict(options), "source": source}
    options_path = state_dir / OPTIONS_FILE
    if options_path.exists() and not overwrite:
        previous = json.loads(options_path.read_text())
        if previous != wanted:
            changed = sorted(
                key for section in ("options", "source") for key in set(previous.get(section, {})) | set(wanted[section])
                if previous.get(section, {}).get(key) != wanted[section].get(key)
            )
            raise OptionsMismatchError(
                f"{out_dir} holds shards made with other settings (changed: {', '.join(changed)}); "
                f"use a new --out folder, or --overwrite to rebuild this one"
            )
    if overwrite:
        for old in list(out_dir.glob(f"{options.prefix}-*.tar")) + list(state_dir.glob("*.tar.json")):
            old.unlink()
    atomic_write_bytes(options_path, json.dumps(wanted, sort_keys=True, indent=1).encode())


def make_shards(*, metadata_root: str | Path, dataset: str, split: str, out_dir: str | Path,
                options: ShardOptions, workers: int = 1, overwrite: bool = False,
                command: list[str] | None = None, show_progress: bool = True) -> MakeShardsResult:
    """Runs the whole job; safe to rerun after a kill (completed shards are kept)."""
    out_dir = Path(out_dir)
    root = DatasetRoot.load(metadata_root)
    entries = root.entries(dataset, split)  # raises MetadataError naming file/entry/field
    labels = root.label_index(dataset)
    if not entries:
        raise ValueError(f"{root.split_path(dataset, split)}: split {split!r} of {dataset!r} has no entries")
    source = {"metadata_root": str(root.path), "dataset": dataset, "split": split}
    check_output_folder(out_dir, options=options, source=source, overwrite=overwrite)
    ordered = order_entries(entries, options)

    started = time.perf_counter()
    # Headers are read by threads in this process (I/O bound; libsndfile releases the GIL).
    with ThreadPoolExecutor(max_workers=min(32, 4 * workers)) as threads:
        inspected = list(tqdm(threads.map(lambda entry: inspect_entry(entry, options), ordered),
                              total=len(ordered), desc="reading headers", unit="file",
                              disable=not show_progress, file=sys.stderr))
    specs = plan_shards(inspected, options)
    header_failures = [item for item in inspected if isinstance(item, Failure)]
    log.info("planned %d shards for %d files (%d unreadable) in %.1fs", len(specs), len(ordered),
             len(header_failures), time.perf_counter() - started)

    records: dict[str, ShardRecord] = {}
    todo: list[ShardSpec] = []
    for spec in specs:
        record = completed_record(spec, out_dir=out_dir)
        if record is None:
            todo.append(spec)
        else:
            records[spec.name] = record
    if records:
        log.info("reusing %d complete shards; writing %d", len(records), len(todo))
    with progress_bar(total=sum(len(spec.samples) for spec in todo), desc=f"writing {len(todo)} shards",
                      show=show_progress) as tick, \
            task_runner(workers=workers, preload=["shards.make"], progress=tick) as run:
        for record in run(_write_shard_task, [(spec, out_dir, options, labels) for spec in todo]):
            records[record.name] = record

    all_failures = [failure.__dict__ for failure in header_failures]
    shard_entries = []
    for spec in specs:
        record = records[spec.name]
        all_failures.extend(record.failures)
        shard_entries.append(ShardEntry(name=record.name, num_samples=record.num_samples, bytes=record.bytes,
                                        sha256=record.sha256, seconds=record.seconds))
    all_failures.sort(key=lambda failure: failure["key"])
    failed_fraction = len(all_failures) / len(entries)
    manifest = Manifest(shards=shard_entries, num_entries=len(entries), num_failed=len(all_failures),
                        options=asdict(options), source=source, command=command or [])
    write_manifest(out_dir, manifest, failures=all_failures)
    return MakeShardsResult(manifest=manifest, num_written=len(todo), num_reused=len(specs) - len(todo),
                            failed_fraction=failed_fraction)
