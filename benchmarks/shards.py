"""make-shards throughput at 1 and 2 workers next to a bare decode → resample → encode loop.

    python benchmarks/shards.py [--num-clips 3000] [--repeats 2]

Prints a markdown table, then one line of JSON with the headline figures. All rows are measured in
the same run on the same demo data (written once into a temp folder); each figure is the best of
`--repeats` runs. Wall time includes everything a user waits for (header pass, worker start-up,
manifest), so the 2-worker ratio is the honest end-to-end one.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name would hide the `shards` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch

from audioldm_dist.data.audio import decode, downmix, encode_flac, resample
from audioldm_dist.data.metadata import DatasetRoot
from audioldm_dist.demo_data import write_demo_dataset
from shards.make import make_shards
from shards.plan import ShardOptions


def bare_loop(paths: list[Path], sample_rate: int) -> float:
    """The work with no sharding around it: decode, downmix, resample, FLAC-encode each file."""
    seconds = 0.0
    for path in paths:
        waveform, rate = decode(path)
        mono = resample(downmix(waveform), orig_freq=rate, new_freq=sample_rate)
        encode_flac(mono, sample_rate=sample_rate)
        seconds += mono.shape[1] / sample_rate
    return seconds


def timed(function, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - started)
    return best, result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-clips", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=2)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    torch.set_num_threads(1)  # the same single thread per process that make-shards' workers use
    work = Path(tempfile.mkdtemp(prefix="bench_shards_"))
    try:
        root = write_demo_dataset(work / "data", num_clips=args.num_clips, seed=0)
        entries = DatasetRoot.load(root).entries("demo", "train")
        paths = [entry.audio_path for entry in entries]
        num_files = len(paths)
        bare_s, audio_seconds = timed(lambda: bare_loop(paths, 16000), args.repeats)

        def run(workers: int) -> float:
            out = work / f"shards_{workers}"
            shutil.rmtree(out, ignore_errors=True)
            make_shards(metadata_root=root, dataset="demo", split="train", out_dir=out,
                        options=ShardOptions(max_count=64), workers=workers, show_progress=False)
            return 0.0

        one_s, _ = timed(lambda: run(1), args.repeats)
        two_s, _ = timed(lambda: run(2), args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    hours = audio_seconds / 3600
    rows = [("bare decode+resample+encode loop", 1, bare_s), ("make-shards", 1, one_s), ("make-shards", 2, two_s)]
    print(f"{num_files} demo files, {hours:.3f} h of audio, best of {args.repeats}\n")
    print("| what | workers | seconds | files/s | audio-h/s | vs bare loop |")
    print("|---|---|---|---|---|---|")
    for name, workers, seconds in rows:
        print(f"| {name} | {workers} | {seconds:.2f} | {num_files / seconds:.1f} | {hours / seconds:.4f} | "
              f"{bare_s / seconds:.2f}x |")
    overhead = one_s / bare_s - 1
    speedup = one_s / two_s
    print(f"\nsharding overhead at 1 worker: {overhead:+.1%} (goal < 10%); 2 workers vs 1: {speedup:.2f}x (goal >= 1.8x)")
    print(json.dumps({"files": num_files, "audio_hours": round(hours, 4),
                      "files_per_s_1_worker": round(num_files / one_s, 2),
                      "files_per_s_2_workers": round(num_files / two_s, 2),
                      "files_per_s_bare_loop": round(num_files / bare_s, 2),
                      "speedup_2_vs_1": round(speedup, 3), "overhead_vs_bare": round(overhead, 4)}))


if __name__ == "__main__":
    main()
