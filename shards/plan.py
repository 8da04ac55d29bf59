"""Deciding which sample lands in which shard, before any audio is decoded.

The plan is a pure function of the metadata, the file headers (rate, channels, frames), the seed and
the shard bounds, so two runs write byte-identical shards and a rerun knows exactly which shards it
still owes. `--max-size` is enforced with an upper bound of each sample's size in the tar (16-bit PCM
at the target rate for re-encoded audio, which FLAC never exceeds by more than the margin we add; the
file size for `--keep-source`), so no shard is ever larger than asked unless a single sample is.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from audioldm_dist.data.audio import AudioDecodeError, read_info
from audioldm_dist.data.metadata import AudioEntry
from audioldm_dist.data.schema import sample_key, shard_name

TAR_BLOCK = 512
TAR_END_OVERHEAD = 10240  # two zero blocks, padded to tarfile's 20-block record
JSON_BUDGET = 4096  # generous bound for one sample's JSON member


@dataclass(frozen=True, kw_only=True)
class ShardOptions:
    """Everything that changes shard contents; part of every shard's fingerprint."""

    sample_rate: int = 16000
    keep_source: bool = False
    max_count: int = 1000
    max_size: int = 1_000_000_000
    seed: int = 0
    shuffle: bool = True
    prefix: str = "train"
    min_duration: float = 0.0

    def __post_init__(self) -> None:
        if self.max_count < 1:
            raise ValueError(f"--max-count must be at least 1, got {self.max_count}")
        if self.max_size < 4 * TAR_BLOCK + TAR_END_OVERHEAD:
            raise ValueError(f"--max-size {self.max_size} is too small for even one sample")
        if self.sample_rate < 1000:
            raise ValueError(f"--sample-rate must be at least 1000 Hz, got {self.sample_rate}")


@dataclass(frozen=True, kw_only=True)
class PlannedSample:
    key: str
    entry: AudioEntry
    source_rate: int
    source_channels: int
    source_frames: int
    source_bytes: int
    source_mtime_ns: int


@dataclass(frozen=True, kw_only=True)
class ShardSpec:
    index: int
    name: str
    samples: list[PlannedSample] = field(default_factory=list)
    fingerprint: str = ""


@dataclass(frozen=True, kw_only=True)
class Failure:
    """A sample that was skipped, with the reason; one line of `failures.jsonl`."""

    key: str
    dataset: str
    split: str
    index: int
    path: str
    reason: str
    detail: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def failure_of(sample_key_: str, entry: AudioEntry, error: AudioDecodeError) -> Failure:
    return Failure(key=sample_key_, dataset=entry.dataset, split=entry.split, index=entry.index,
                   path=str(entry.audio_path), reason=error.reason, detail=error.detail)


def inspect_entry(entry: AudioEntry, options: ShardOptions) -> PlannedSample | Failure:
    """Reads one file's header; the cheap first pass that the plan is built from."""
    key = sample_key(entry.dataset, entry.split, entry.index)
    try:
        info = read_info(entry.audio_path)
        if info.duration < options.min_duration:
            raise AudioDecodeError("too_short", f"{entry.audio_path}: {info.duration:.3f} s < --min-duration "
                                                f"{options.min_duration} s")
        stat = entry.audio_path.stat()
    except AudioDecodeError as error:
        return failure_of(key, entry, error)
    except OSError as error:
        return failure_of(key, entry, AudioDecodeError("unreadable", f"{entry.audio_path}: {error}"))
    return PlannedSample(key=key, entry=entry, source_rate=info.sample_rate, source_channels=info.num_channels,
                         source_frames=info.num_frames, source_bytes=stat.st_size, source_mtime_ns=stat.st_mtime_ns)


def _padded(num_bytes: int) -> int:
    return TAR_BLOCK + math.ceil(num_bytes / TAR_BLOCK) * TAR_BLOCK


def size_bound(sample: PlannedSample, options: ShardOptions) -> int:
    """Upper bound of the bytes one sample occupies in a tar (two members with headers)."""
    if options.keep_source:
        audio_bytes = sample.source_bytes
    else:
        out_frames = math.ceil(sample.source_frames * options.sample_rate / sample.source_rate)
        audio_bytes = int(2 * out_frames * 1.01) + 8192  # 16-bit PCM + FLAC framing margin
    return _padded(audio_bytes) + _padded(JSON_BUDGET)


def order_entries(entries: list[AudioEntry], options: ShardOptions) -> list[AudioEntry]:
    """The order samples are written in: a seeded permutation, so every shard mixes the whole split."""
    if not options.shuffle:
        return list(entries)
    permutation = np.random.default_rng(options.seed).permutation(len(entries))
    return [entries[i] for i in permutation]


def plan_shards(inspected: list[PlannedSample | Failure], options: ShardOptions) -> list[ShardSpec]:
    """Packs the readable samples, in order, into shards bounded by count and size."""
    groups: list[list[PlannedSample]] = [[]]
    group_bytes = TAR_END_OVERHEAD
    for item in inspected:
        if isinstance(item, Failure):
            continue
        bound = size_bound(item, options)
        current = groups[-1]
        if current and (len(current) >= options.max_count or group_bytes + bound > options.max_size):
            groups.append([])
            group_bytes = TAR_END_OVERHEAD
        groups[-1].append(item)
        group_bytes += bound
    if not groups[-1]:
        groups.pop()
    return [ShardSpec(index=i, name=shard_name(options.prefix, i), samples=samples,
                      fingerprint=fingerprint(samples, options))
            for i, samples in enumerate(groups)]


def fingerprint(samples: list[PlannedSample], options: ShardOptions) -> str:
    """Identifies a shard's intended contents: options, keys, source files and their size/mtime."""
    payload = {
        "options": asdict(options),
        "samples": [[s.key, str(s.entry.audio_path), s.source_bytes, s.source_mtime_ns, s.entry.captions,
                     s.entry.label_mids] for s in samples],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
