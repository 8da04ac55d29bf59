"""Writing one shard: decode → downmix → resample → FLAC, into a tar that appears only when complete.

Each shard is written to a hidden temp name in the output folder, fsynced and renamed, then its
record (counts, sha256, failures, fingerprint) is written the same way into `.make-shards/`. A shard
whose tar and record both exist and agree is complete; anything else is redone on a rerun. Tar
headers carry fixed owner and time, so the bytes depend only on the plan.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from audioldm_dist.data import schema
from audioldm_dist.data.audio import AudioDecodeError, decode, downmix, encode_flac, resample
from audioldm_dist.data.metadata import LabelIndex
from audioldm_dist.fileio import atomic_write_bytes, disk_full_error, fsync_dir, is_out_of_space
from shards.plan import PlannedSample, ShardOptions, ShardSpec, failure_of

STATE_DIR = ".make-shards"

ProgressCallback = Callable[[int, float], None]
"""Called once per processed file with (1, seconds of audio written)."""


@dataclass(kw_only=True)
class ShardRecord:
    """What a finished shard holds; the manifest is assembled from these."""

    name: str
    fingerprint: str
    num_samples: int
    bytes: int
    sha256: str
    seconds: float
    failures: list[dict] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> ShardRecord | None:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None


class _HashingWriter(io.RawIOBase):
    """A write-only file wrapper that hashes what passes through (tarfile needs write and tell)."""

    def __init__(self, handle: io.RawIOBase) -> None:
        self._handle = handle
        self.sha256 = hashlib.sha256()
        self.num_bytes = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self._handle.write(data)
        self.sha256.update(data)
        self.num_bytes += len(data)
        return len(data)

    def tell(self) -> int:
        return self.num_bytes


def _add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    archive.addfile(info, io.BytesIO(data))


def sample_metadata(sample: PlannedSample, *, labels: LabelIndex | None, sample_rate: int,
                    num_frames: int) -> dict:
    entry = sample.entry
    names = [labels.name_by_mid.get(mid, "") for mid in entry.label_mids] if labels else []
    return {
        schema.CAPTION: entry.captions[0],
        schema.CAPTIONS: entry.captions,
        schema.LABELS: entry.label_mids,
        schema.LABEL_NAMES: names,
        schema.SOURCE_PATH: str(entry.audio_path),
        schema.DATASET: entry.dataset,
        schema.SPLIT: entry.split,
        schema.ORIGINAL_SAMPLE_RATE: sample.source_rate,
        schema.ORIGINAL_CHANNELS: sample.source_channels,
        schema.SAMPLE_RATE: sample_rate,
        schema.DURATION: round(num_frames / sample_rate, 6),
    }


def encode_sample(sample: PlannedSample, options: ShardOptions, labels: LabelIndex | None
                  ) -> tuple[dict[str, bytes], float]:
    """The tar members of one sample and its duration; raises `AudioDecodeError` for unusable audio."""
    path = sample.entry.audio_path
    try:
        source_bytes = path.read_bytes()
    except FileNotFoundError:
        raise AudioDecodeError("missing", f"no such file: {path}") from None
    except OSError as error:
        raise AudioDecodeError("unreadable", f"{path}: {error}") from None
    waveform, source_rate = decode(source_bytes, name=str(path))
    if options.keep_source:
        extension = path.suffix.lower().lstrip(".")
        if extension not in schema.AUDIO_EXTENSIONS:
            raise AudioDecodeError("unsupported", f"{path}: --keep-source stores only {schema.AUDIO_EXTENSIONS}")
        audio, rate, num_frames = source_bytes, source_rate, waveform.shape[1]
    else:
        mono = resample(downmix(waveform), orig_freq=source_rate, new_freq=options.sample_rate)
        extension, rate, num_frames = "flac", options.sample_rate, mono.shape[1]
        audio = encode_flac(mono, sample_rate=rate)
    metadata = sample_metadata(sample, labels=labels, sample_rate=rate, num_frames=num_frames)
    members = {extension: audio, schema.JSON_EXTENSION: json.dumps(metadata, sort_keys=True).encode()}
    return members, num_frames / rate


def write_shard(spec: ShardSpec, *, out_dir: Path, options: ShardOptions, labels: LabelIndex | None,
                progress: ProgressCallback | None = None) -> ShardRecord:
    """Writes one make-shards shard atomically and its record (see `write_tar`)."""
    def encode(sample: PlannedSample) -> tuple[list[tuple[str, dict[str, bytes]]], float]:
        members, seconds = encode_sample(sample, options, labels)
        return [(sample.key, members)], seconds

    def failure(sample: PlannedSample, error: AudioDecodeError) -> dict:
        return asdict(failure_of(sample.key, sample.entry, error))

    return write_tar(spec.name, fingerprint=spec.fingerprint, out_dir=out_dir, items=spec.samples, encode=encode,
                     failure=failure, progress=progress)


EncodeItem = Callable[[Any], tuple[list[tuple[str, dict[str, bytes]]], float]]
"""One input item → its output samples `(key, {extension: bytes})` and the seconds of audio they hold;
raises `AudioDecodeError` (or anything else) for an item that must be skipped."""


def write_tar(name: str, *, fingerprint: str, out_dir: Path, items: Iterable[Any], encode: EncodeItem,
              failure: Callable[[Any, AudioDecodeError], dict], progress: ProgressCallback | None = None
              ) -> ShardRecord:
    """Writes the tar `name` from `items` atomically and its record; an item whose `encode` raises is a
    failure (`failure(item, error)`, one line of failures.jsonl), never an error. make-shards and
    encode-shards both write through here. No room left on the output's device: the partial file is removed
    and a DiskFullError names the folder."""
    tmp_path = out_dir / f".{name}.tmp-{os.getpid()}"
    try:
        return _write_tar(name, fingerprint=fingerprint, out_dir=out_dir, tmp_path=tmp_path, items=items,
                          encode=encode, failure=failure, progress=progress)
    except OSError as error:
        tmp_path.unlink(missing_ok=True)
        if is_out_of_space(error, out_dir):
            raise disk_full_error(out_dir, what=f"shard {name}", needed=0) from error
        raise


def _write_tar(name: str, *, fingerprint: str, out_dir: Path, tmp_path: Path, items: Iterable[Any],
               encode: EncodeItem, failure: Callable[[Any, AudioDecodeError], dict],
               progress: ProgressCallback | None) -> ShardRecord:
    final_path = out_dir / name
    failures: list[dict] = []
    num_samples = 0
    seconds = 0.0
    with open(tmp_path, "wb", buffering=0) as handle:
        hashing = _HashingWriter(handle)
        # The buffer hands the hashing writer large chunks instead of tarfile's many small writes.
        buffered = io.BufferedWriter(hashing, buffer_size=1 << 22)
        with tarfile.open(fileobj=buffered, mode="w", format=tarfile.USTAR_FORMAT) as archive:
            for item in items:
                try:
                    samples, item_seconds = encode(item)
                except AudioDecodeError as error:
                    failures.append(failure(item, error))
                    item_seconds = 0.0
                except Exception as error:  # one odd file must never kill a 10,000-file job
                    failures.append(failure(item, AudioDecodeError("error", f"{type(error).__name__}: {error}")))
                    item_seconds = 0.0
                else:
                    for key, members in samples:
                        for extension, data in members.items():
                            _add_member(archive, f"{key}.{extension}", data)
                        num_samples += 1
                    seconds += item_seconds
                if progress is not None:
                    progress(1, item_seconds)
        buffered.flush()
        os.fsync(handle.fileno())
    os.replace(tmp_path, final_path)
    fsync_dir(out_dir)
    record = ShardRecord(name=name, fingerprint=fingerprint, num_samples=num_samples,
                         bytes=hashing.num_bytes, sha256=hashing.sha256.hexdigest(), seconds=round(seconds, 6),
                         failures=failures)
    atomic_write_bytes(out_dir / STATE_DIR / f"{name}.json", json.dumps(asdict(record)).encode())
    return record


def sha256_of_file(path: Path, *, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def completed_record(spec: ShardSpec, *, out_dir: Path) -> ShardRecord | None:
    """The shard's record if its tar is complete and matches it (size and sha256), else None. `spec` is
    anything with a `name` and a `fingerprint` (make-shards' ShardSpec, encode-shards' EncodeSpec)."""
    record = ShardRecord.load(out_dir / STATE_DIR / f"{spec.name}.json")
    tar_path = out_dir / spec.name
    if record is None or record.fingerprint != spec.fingerprint or not tar_path.is_file():
        return None
    if tar_path.stat().st_size != record.bytes or sha256_of_file(tar_path) != record.sha256:
        return None
    return record
