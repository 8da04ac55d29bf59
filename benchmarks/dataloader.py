"""Training-loader throughput: shards (1 process, 2 workers) next to the original way (44.1 kHz wav).

    python benchmarks/dataloader.py [--num-clips 200] [--repeats 2]

Writes `--num-clips` 10 s, 44.1 kHz mono wav clips (the demo's sound generators) in the AudioLDM
layout, shards them with make-shards (16 kHz FLAC), then measures samples/s of full 10.24 s AudioLDM
samples (waveform, STFT, log-mel) for
- the map-style loader reading the original files the original way (decode 44.1 kHz, crop, resample),
- the streaming loader in the main process (1 process),
- the streaming loader with 2 DataLoader workers (wall time from the first batch, so worker start-up
  is excluded; the time to the first batch is printed separately),
- the streaming loader in the main process shipping waveforms only (`features_in_loader=False`: the
  trainer computes STFT/log-mel on its device), for the share the features take,
- the streaming loader in the main process on the same shards after `encode-shards` (configs/tiny.yaml's
  random-initialised VAE and text encoder, 10.24 s crops): stored posteriors and embeddings, nothing to
  decode or compute.
All rows in one run; best of `--repeats`. Prints a markdown table, then one line of JSON.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile
import torch

# Run as a script, this folder comes first on sys.path and benchmarks/shards.py would hide the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from audioldm_dist.config import AudioConfig, load_config  # noqa: E402
from audioldm_dist.data.metadata import DatasetRoot  # noqa: E402
from audioldm_dist.data.mapstyle import MetadataDataset  # noqa: E402
from audioldm_dist.data.sources import resolve_specs  # noqa: E402
from audioldm_dist.data.shard_reader import detect_encoding  # noqa: E402
from audioldm_dist.data.stream import ShardStream, StreamOptions, make_loader  # noqa: E402
from audioldm_dist.demo_data import GENERATORS  # noqa: E402
from shards.encode import EncodeOptions, encode_shards  # noqa: E402
from shards.make import make_shards  # noqa: E402
from shards.plan import ShardOptions  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RATE = 44100
SECONDS = 10.0
BATCH = 4


def write_wav_dataset(folder: Path, num_clips: int) -> Path:
    """AudioCaps-like clips: 10 s, 44.1 kHz, mono wav, registered as dataset "bench"."""
    rng = np.random.default_rng(0)
    (folder / "audio").mkdir(parents=True)
    t = np.arange(int(RATE * SECONDS)) / RATE
    records = []
    for index in range(num_clips):
        kind = list(GENERATORS)[index % len(GENERATORS)]
        signal, caption, labels = GENERATORS[kind](t, RATE, rng)
        soundfile.write(str(folder / "audio" / f"{index:05d}.wav"), (0.5 * signal).astype(np.float32), RATE,
                        subtype="PCM_16")
        records.append({"wav": f"{index:05d}.wav", "caption": caption})
    (folder / "train.json").write_text(json.dumps({"data": records}))
    root = folder / "dataset_root.json"
    root.write_text(json.dumps({"bench": "audio", "metadata": {"path": {"bench": {"train": "train.json"}}}}))
    return root


def measure_map_style(root: Path, audio: AudioConfig, num_samples: int) -> float:
    dataset = MetadataDataset(DatasetRoot.load(root), ["bench"], "train", audio=audio)
    started = time.perf_counter()
    for index in range(num_samples):
        dataset[index]
    return num_samples / (time.perf_counter() - started)


def measure_stream(shards_dir: Path, audio: AudioConfig, num_workers: int, *, features_in_loader: bool = True
                   ) -> tuple[float, float]:
    """(samples/s after the first batch, seconds to the first batch)."""
    shards = resolve_specs([str(shards_dir)])
    stream = ShardStream(shards, audio=audio, options=StreamOptions(batch_size=BATCH, num_workers=num_workers,
                                                                     max_epochs=1, shuffle_buffer=64,
                                                                     features_in_loader=features_in_loader,
                                                                     encoding=detect_encoding(shards)))
    started = time.perf_counter()
    iterator = iter(make_loader(stream))
    next(iterator)
    first = time.perf_counter()
    num_batches = sum(1 for _ in iterator)
    return num_batches * BATCH / (time.perf_counter() - first), first - started


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-clips", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    torch.set_num_threads(1)  # one core per loader process, as in the loader's workers
    audio = AudioConfig()  # 10.24 s at 16 kHz: the AudioLDM sample
    work = Path(tempfile.mkdtemp(prefix="bench_loader_"))
    try:
        root = write_wav_dataset(work / "data", args.num_clips)
        make_shards(metadata_root=root, dataset="bench", split="train", out_dir=work / "shards",
                    options=ShardOptions(max_count=max(1, args.num_clips // 8)), workers=2, show_progress=False)
        encode_shards(config=load_config(ROOT / "configs/tiny.yaml", ["audio.duration=10.24"]),
                      sources=[str(work / "shards")], out_dir=work / "encoded", options=EncodeOptions(crops_per_clip=1),
                      workers=2, show_progress=False)
        rows = {"map-style, original files (44.1 kHz wav, resample per sample)": [], "shards, 1 process": [],
                "shards, 2 workers": [], "shards, 1 process, waveform only (features on the trainer)": [],
                "encoded shards (encode-shards), 1 process": []}
        first_batch = []
        for _ in range(args.repeats):
            rows["map-style, original files (44.1 kHz wav, resample per sample)"].append(
                measure_map_style(root, audio, min(args.num_clips, 100)))
            rows["shards, 1 process"].append(measure_stream(work / "shards", audio, 0)[0])
            rate, startup = measure_stream(work / "shards", audio, 2)
            rows["shards, 2 workers"].append(rate)
            first_batch.append(startup)
            rows["shards, 1 process, waveform only (features on the trainer)"].append(
                measure_stream(work / "shards", audio, 0, features_in_loader=False)[0])
            rows["encoded shards (encode-shards), 1 process"].append(measure_stream(work / "encoded", audio, 0)[0])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best = {name: max(values) for name, values in rows.items()}
    baseline = best["map-style, original files (44.1 kHz wav, resample per sample)"]
    print(f"{args.num_clips} clips of {SECONDS:g} s; 10.24 s AudioLDM samples; best of {args.repeats}\n")
    print("| loader | processes | samples/s | vs original way |")
    print("|---|---|---|---|")
    for name, rate in best.items():
        processes = 2 if "2 workers" in name else 1
        print(f"| {name} | {processes} | {rate:.1f} | {rate / baseline:.2f}x |")
    per_process = best["shards, 1 process"] / baseline
    encoded = best["encoded shards (encode-shards), 1 process"] / baseline
    print(f"\nencoded shards vs original way, per process: {encoded:.1f}x (goal >= 20x)")
    print(f"shards vs original way, per process: {per_process:.2f}x (goal >= 3x); "
          f"2-worker loader start-up to first batch: {min(first_batch):.1f} s")
    print(json.dumps({"samples_per_s_original_way": round(baseline, 1),
                      "samples_per_s_shards_1_process": round(best["shards, 1 process"], 1),
                      "samples_per_s_shards_2_workers": round(best["shards, 2 workers"], 1),
                      "samples_per_s_shards_waveform_only": round(
                          best["shards, 1 process, waveform only (features on the trainer)"], 1),
                      "samples_per_s_encoded_1_process": round(best["encoded shards (encode-shards), 1 process"], 1),
                      "ratio_per_process": round(per_process, 2), "ratio_encoded_per_process": round(encoded, 2)}))


if __name__ == "__main__":
    main()
