"""The built-in demo dataset: procedurally generated, captioned clips in the exact AudioLDM layout.

`python -m audioldm_dist.demo_data OUT_DIR [--num-clips N] [--seed S]` writes

    OUT_DIR/audio/{train,val,test}/NNNNN_<kind>.{wav,flac}   mixed rates (16/22.05/44.1/48 kHz), mono/stereo
    OUT_DIR/metadata/dataset_root.json                      registers the dataset "demo"
    OUT_DIR/metadata/demo/datafiles/demo_{train,val,test}.json
    OUT_DIR/metadata/demo/class_labels_indices.csv

Paths in `dataset_root.json` are relative to its own folder, so the data works from any directory.
Kinds take turns (tone, chirp, noise, rhythm, chord, siren), so every split holds each in equal shares;
everything else is drawn from the seed: the same seed writes the same files.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import soundfile

DATASET_NAME = "demo"
SAMPLE_RATES = (16000, 22050, 44100, 48000)
SPLIT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}

# (mid, display name) of the demo's label vocabulary, in index order.
CLASSES = [
    ("/m/demo_tone", "Tone"),
    ("/m/demo_chirp", "Chirp"),
    ("/m/demo_noise", "Noise"),
    ("/m/demo_rhythm", "Rhythm"),
    ("/m/demo_chord", "Chord"),
    ("/m/demo_siren", "Siren"),
    ("/m/demo_low", "Low frequency"),
    ("/m/demo_high", "High frequency"),
]
NOTE_NAMES = {220.0: "A3", 440.0: "A4", 659.26: "E5", 880.0: "A5", 1318.51: "E6", 1760.0: "A6", 2349.32: "D7"}
"""The tones' notes: a fifth or an octave apart, so that a small model's log-mel (64 bins over 0-8 kHz, ~47 Hz
wide below 1 kHz) and its 4× smaller latent hold each on its own rows; the top note's 3rd partial stays below
7.5 kHz."""
CLICK_FREQUENCIES = (200.0, 800.0, 1200.0)
NOISE_COLOURS = ("white", "low rumbling")
CLIP_SECONDS = {"chirp": (0.64, 0.8)}
"""Clip durations by kind (default 1.5-5 s). A chirp sweeps over its whole clip: a clip just longer than the demo's
0.64 s training crop puts nearly the whole sweep, low to high or high to low, in every crop; a crop of a 1-5 s
clip holds a random stretch of it, often a near-steady tone (the demo's chirps scored at chance with those)."""
DEFAULT_CLIP_SECONDS = (1.5, 5.0)


def _envelope(num_samples: int, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    attack = max(1, int(sample_rate * rng.uniform(0.005, 0.1)))
    release = max(1, int(sample_rate * rng.uniform(0.02, 0.3)))
    env = np.ones(num_samples, dtype=np.float64)
    env[:attack] = np.linspace(0.0, 1.0, attack)
    env[-release:] = np.minimum(env[-release:], np.linspace(1.0, 0.0, release))
    return env


def _pitch_labels(freq: float) -> list[str]:
    if freq < 300:
        return ["/m/demo_low"]
    if freq > 700:
        return ["/m/demo_high"]
    return []


SQUARE_TOP_HZ = 7500.0
"""A square wave's harmonics stop here: below the 8 kHz the model sees, at every native rate. A naive
sign(sin) square aliases its harmonics above the file's Nyquist back down to rate-dependent frequencies, so
the same caption would be a different picture at 16, 22.05, 44.1 and 48 kHz."""


def _band_limited_square(freq: float, t: np.ndarray) -> np.ndarray:
    """Odd harmonics k·freq below SQUARE_TOP_HZ with amplitudes 1/k (the Fourier series of a square wave),
    scaled to a peak near 0.5 as the naive square had."""
    harmonics = range(1, int(SQUARE_TOP_HZ // freq) + 1, 2)
    return 0.5 * 4 / np.pi * sum(np.sin(2 * np.pi * k * freq * t) / k for k in harmonics)


def _tone(t: np.ndarray, sr: int, rng: np.random.Generator) -> tuple[np.ndarray, str, list[str]]:
    freq = float(rng.choice(list(NOTE_NAMES)))
    wave = rng.choice(["sine", "square"])
    signal = np.sin(2 * np.pi * freq * t) if wave == "sine" else _band_limited_square(freq, t)
    return signal, _tone_caption(str(wave), freq), ["/m/demo_tone", *_pitch_labels(freq)]


def _tone_caption(wave: str, freq: float) -> str:
    return f"A steady {wave} wave tone at {freq:g} Hz, the note {NOTE_NAMES[freq]}"


def _chirp_range(rng: np.random.Generator) -> tuple[float, float]:
    return float(rng.uniform(150, 500)), float(rng.uniform(1500, 4000))


def _chirp_caption(start: float, stop: float) -> str:
    return f"A {'rising' if stop > start else 'falling'} chirp sweeping from {start:.0f} Hz to {stop:.0f} Hz"


def _chirp(t: np.ndarray, sr: int, rng: np.random.Generator) -> tuple[np.ndarray, str, list[str]]:
    low, high = _chirp_range(rng)
    start, stop = (low, high) if rng.integers(2) else (high, low)
    duration = t[-1] + 1.0 / sr
    freq = start * (stop / start) ** (t / duration)
    phase = 2 * np.pi * np.cumsum(freq) / sr
    return np.sin(phase), _chirp_caption(start, stop), ["/m/demo_chirp"]


def balanced_captions(repeats: int = 2, seed: int = 0) -> list[tuple[str, str]]:
    """(name, caption) pairs balanced over what caption conformance measures: every note × wave `repeats`
    times, and 10 × `repeats` chirps, half rising, half falling (end points drawn as the generator draws
    them). A small split drawn at random is not balanced: the demo's test split has 7 falling chirps of 8."""
    rng = np.random.default_rng(seed)
    pairs = [(f"tone_{NOTE_NAMES[freq]}_{wave}_{repeat}", _tone_caption(wave, freq))
             for repeat in range(repeats) for freq in NOTE_NAMES for wave in ("sine", "square")]
    for i in range(10 * repeats):
        low, high = _chirp_range(rng)
        pairs.append((f"chirp_{i}", _chirp_caption(*((low, high) if i % 2 == 0 else (high, low)))))
    return pairs


def _noise(t: np.ndarray, sr: int, rng: np.random.Generator) -> tuple[np.ndarray, str, list[str]]:
    num_bursts = int(rng.integers(2, 6))
    signal = np.zeros_like(t)
    for _ in range(num_bursts):
        start = int(rng.uniform(0, 0.8) * len(t))
        length = int(rng.uniform(0.05, 0.3) * sr)
        signal[start:start + length] = rng.standard_normal(len(signal[start:start + length]))
    colour = rng.choice(list(NOISE_COLOURS))
    if colour == "low rumbling":
        kernel = np.ones(32) / 32
        signal = np.convolve(signal, kernel, mode="same") * 4
    return signal * 0.4, f"{num_bursts} short bursts of {colour} noise", ["/m/demo_noise"]


def _rhythm(t: np.ndarray, sr: int, rng: np.random.Generator) -> tuple[np.ndarray, str, list[str]]:
    bpm = int(rng.choice([60, 90, 120, 150, 180]))
    freq = float(rng.choice(list(CLICK_FREQUENCIES)))
    period = 60.0 / bpm
    local = np.mod(t, period)
    click = np.sin(2 * np.pi * freq * t) * np.exp(-local * 40)
    speed = "slow" if bpm <= 90 else "fast"
    return click, f"A {speed} rhythmic beat at {bpm} beats per minute with {freq:g} Hz clicks", [
        "/m/demo_rhythm", *_pitch_labels(freq)]


def _chord(t: np.ndarray, sr: int, rng: np.random.Generator) -> tuple[np.ndarray, str, list[str]]:
    root = float(rng.choice([220.0, 440.0, 880.0]))
    quality = rng.choice(["major", "minor"])
    third = root * (2 ** ((4 if quality == "major" else 3) / 12))
    fifth = root * 2 ** (7 / 12)
    signal = sum(np.sin(2 * np.pi * f * t) for f in (root, third, fifth)) / 3
    return signal, f"A sustained {quality} chord on {NOTE_NAMES[root]}", ["/m/demo_chord", "/m/demo_tone"]


def _siren(t: np.ndarray, sr: int, rng: np.random.Generator) -> tuple[np.ndarray, str, list[str]]:
    rate = float(rng.choice([0.5, 1.0, 2.0]))
    centre = float(rng.uniform(600, 1000))
    freq = centre + 250 * np.sin(2 * np.pi * rate * t)
    phase = 2 * np.pi * np.cumsum(freq) / sr
    return np.sin(phase), f"A wailing siren rising and falling {rate:g} times per second", ["/m/demo_siren"]


GENERATORS = {"tone": _tone, "chirp": _chirp, "noise": _noise, "rhythm": _rhythm, "chord": _chord, "siren": _siren}


def make_clip(rng: np.random.Generator, kind: str | None = None) -> dict:
    """One clip of `kind` (default: drawn at random): samples `(frames, channels)`, its rate, format, captions
    and label mids."""
    kind = kind or str(rng.choice(list(GENERATORS)))
    sample_rate = int(rng.choice(SAMPLE_RATES))
    duration = float(rng.uniform(*CLIP_SECONDS.get(kind, DEFAULT_CLIP_SECONDS)))
    t = np.arange(int(sample_rate * duration)) / sample_rate
    signal, caption, labels = GENERATORS[kind](t, sample_rate, rng)
    signal = signal * _envelope(len(t), sample_rate, rng) * rng.uniform(0.3, 0.9)
    signal = signal + rng.standard_normal(len(t)) * 0.002  # a little room noise, never silent
    num_channels = int(rng.choice([1, 2]))
    if num_channels == 2:
        pan = rng.uniform(0.3, 1.0)
        samples = np.stack([signal * pan, signal * (1.3 - pan)], axis=1)
    else:
        samples = signal[:, None]
    extra = {}
    if rng.uniform() < 0.3:  # some records carry a second caption, as AudioCaps-style metadata does
        extra["caption_2"] = f"Synthetic {kind} sound" + (" in stereo" if num_channels == 2 else "")
    return {
        "kind": kind,
        "samples": np.clip(samples, -1, 1).astype(np.float32),
        "sample_rate": sample_rate,
        "format": str(rng.choice(["wav", "flac"])),
        "caption": caption,
        "labels": sorted(set(labels), key=[mid for mid, _ in CLASSES].index),
        "extra": extra,
    }


def write_demo_dataset(out_dir: str | Path, *, num_clips: int = 240, seed: int = 0) -> Path:
    """Writes the demo dataset and returns the path of its `dataset_root.json`."""
    if num_clips < 3:
        raise ValueError(f"--num-clips must be at least 3 (one clip per split), got {num_clips}")
    out_dir = Path(out_dir)
    metadata_dir = out_dir / "metadata"
    datafiles_dir = metadata_dir / DATASET_NAME / "datafiles"
    datafiles_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    num_val = max(1, round(num_clips * SPLIT_FRACTIONS["val"]))
    num_test = max(1, round(num_clips * SPLIT_FRACTIONS["test"]))
    split_of = ["train"] * (num_clips - num_val - num_test) + ["val"] * num_val + ["test"] * num_test
    records: dict[str, list[dict]] = {split: [] for split in SPLIT_FRACTIONS}
    kinds = list(GENERATORS)
    for clip_index, split in enumerate(split_of):
        clip = make_clip(rng, kinds[clip_index % len(kinds)])  # every split has each kind in equal shares
        relative = f"{split}/{clip_index:05d}_{clip['kind']}.{clip['format']}"
        audio_path = out_dir / "audio" / relative
        audio_path.parent.mkdir(parents=True, exist_ok=True)
        subtype = "PCM_16" if clip["format"] == "wav" else None
        soundfile.write(str(audio_path), clip["samples"], clip["sample_rate"], format=clip["format"].upper(),
                        subtype=subtype)
        records[split].append({"wav": relative, "caption": clip["caption"], "labels": ",".join(clip["labels"]),
                               **clip["extra"]})
    split_paths = {}
    for split, split_records in records.items():
        path = datafiles_dir / f"{DATASET_NAME}_{split}.json"
        path.write_text(json.dumps({"data": split_records}, indent=1) + "\n")
        split_paths[split] = path.relative_to(metadata_dir).as_posix()
    labels_path = metadata_dir / DATASET_NAME / "class_labels_indices.csv"
    with labels_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", "mid", "display_name"])
        for index, (mid, name) in enumerate(CLASSES):
            writer.writerow([index, mid, name])
    dataset_root = {
        DATASET_NAME: "../audio",
        "comments": {"demo": "procedurally generated by audioldm_dist.demo_data; paths relative to this file"},
        "metadata": {"path": {DATASET_NAME: {
            **split_paths,
            "class_label_indices": labels_path.relative_to(metadata_dir).as_posix(),
        }}},
    }
    root_path = metadata_dir / "dataset_root.json"
    root_path.write_text(json.dumps(dataset_root, indent=2) + "\n")
    return root_path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m audioldm_dist.demo_data", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", help="folder to write the dataset into")
    parser.add_argument("--num-clips", type=int, default=240, help="clips over all splits (80/10/10)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        root = write_demo_dataset(args.out_dir, num_clips=args.num_clips, seed=args.seed)
    except ValueError as error:
        parser.error(str(error))
    print(f"wrote {args.num_clips} clips; dataset 'demo' registered in {root}")


if __name__ == "__main__":
    main()
