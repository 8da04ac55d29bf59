"""Decoding, resampling and encoding of audio: the one implementation that make-shards, the streaming
loader and the features CLI share.

Decoding goes through `soundfile` (torchaudio 2.9+ no longer loads files); resampling through
`torchaudio.functional.resample` with its default windowed-sinc kernel, the call the original AudioLDM
code makes, so shards and on-the-fly features agree with it.
"""
from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
import torch
import torchaudio

MIN_NUM_SAMPLES = 101
"""The original loader asserts `waveform_length > 100`: anything shorter is unusable."""


class AudioDecodeError(Exception):
    """A clip that cannot be used; `reason` is a short machine-friendly tag for failure reports."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, kw_only=True)
class AudioInfo:
    """What the file header says, read without decoding the samples."""

    sample_rate: int
    num_channels: int
    num_frames: int
    format: str

    @property
    def duration(self) -> float:
        return self.num_frames / self.sample_rate if self.sample_rate else 0.0


def _existing_nonempty(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise AudioDecodeError("missing", f"no such file: {path}")
    if path.stat().st_size == 0:
        raise AudioDecodeError("empty", f"file has 0 bytes: {path}")
    return path


def read_info(path: str | Path) -> AudioInfo:
    """Header of an audio file; raises `AudioDecodeError` for missing, unreadable or empty files."""
    path = _existing_nonempty(path)
    try:
        with soundfile.SoundFile(str(path)) as handle:  # cheaper than soundfile.info, which also reads logs
            info = AudioInfo(sample_rate=handle.samplerate, num_channels=handle.channels, num_frames=handle.frames,
                             format=handle.format)
    except Exception as error:  # soundfile raises LibsndfileError, RuntimeError or OSError
        raise AudioDecodeError("unreadable", f"{path}: {error}") from None
    if info.num_frames <= 0:
        raise AudioDecodeError("empty", f"no audio frames in {path}")
    return info


def decode(source: str | Path | bytes, *, name: str = "") -> tuple[np.ndarray, int]:
    """Decodes a file or in-memory bytes to float32 `(channels, samples)` in [-1, 1] and its rate."""
    label = name or ("<bytes>" if isinstance(source, bytes) else str(source))
    if isinstance(source, bytes):
        if not source:
            raise AudioDecodeError("empty", f"0 bytes: {label}")
        handle: str | io.BytesIO = io.BytesIO(source)
    else:
        handle = str(_existing_nonempty(source))
    try:
        samples, sample_rate = soundfile.read(handle, dtype="float32", always_2d=True)  # (T, C)
    except Exception as error:
        raise AudioDecodeError("corrupt", f"{label}: {error}") from None
    if samples.shape[0] == 0:
        raise AudioDecodeError("empty", f"no audio frames in {label}")
    if samples.shape[0] < MIN_NUM_SAMPLES:
        raise AudioDecodeError("too_short", f"{label}: {samples.shape[0]} samples, need at least {MIN_NUM_SAMPLES}")
    if not np.isfinite(samples).all():
        raise AudioDecodeError("corrupt", f"{label}: non-finite samples")
    return np.ascontiguousarray(samples.T), int(sample_rate)


def downmix(waveform: np.ndarray) -> np.ndarray:
    """`(channels, samples)` → `(1, samples)` by averaging the channels."""
    if waveform.shape[0] == 1:
        return waveform
    return waveform.mean(axis=0, keepdims=True, dtype=np.float32)


@functools.lru_cache(maxsize=32)
def _resampler(orig_freq: int, new_freq: int) -> torchaudio.transforms.Resample:
    # Same kernel as torchaudio.functional.resample's defaults, built once per rate pair.
    return torchaudio.transforms.Resample(orig_freq, new_freq)


def resample(waveform: np.ndarray, *, orig_freq: int, new_freq: int) -> np.ndarray:
    """Resamples `(channels, samples)` float32 exactly as `torchaudio.functional.resample` would."""
    if orig_freq == new_freq:
        return waveform
    with torch.no_grad():
        resampled = _resampler(orig_freq, new_freq)(torch.from_numpy(np.ascontiguousarray(waveform)))
    return resampled.numpy()


def encode_flac(waveform: np.ndarray, *, sample_rate: int) -> bytes:
    """`(1, samples)` float32 → 16-bit FLAC bytes (lossless for 16-bit PCM; peaks clipped to full scale)."""
    mono = np.clip(waveform[0], -1.0, 1.0 - 1.0 / 32768)
    buffer = io.BytesIO()
    soundfile.write(buffer, mono, sample_rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()
