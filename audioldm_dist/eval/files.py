"""The clips of a folder: which files, how they pair by name, their captions, and decoding them.

A clip's name is its file stem, so `val_step0000200/Y7f3.wav` pairs with `reference/Y7f3.flac`.
Captions for the CLAP score come from the sidecar `NAME.json` (its `caption` key) that
`audioldm_dist.infer` and the trainer's validation write beside every wav, or from a `--captions`
file: a JSON object {name: caption} or a `.lst` of `filename|caption` lines (infer's input).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from audioldm_dist.data.audio import AudioDecodeError, decode, downmix, resample

log = logging.getLogger("audioldm_dist.eval")

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")


def list_clips(folder: str | Path) -> dict[str, Path]:
    """name → audio file of `folder` (not recursive), sorted; two files with one name are an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder")
    clips: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in AUDIO_SUFFIXES or not path.is_file():
            continue
        if path.stem in clips:
            raise ValueError(f"{folder}: two audio files named {path.stem!r} ({clips[path.stem].name}, {path.name}); "
                             "clips are paired by name, so names must be unique")
        clips[path.stem] = path
    if not clips:
        raise ValueError(f"{folder}: no audio files ({', '.join(AUDIO_SUFFIXES)})")
    return clips


@dataclass(frozen=True, kw_only=True)
class Pairing:
    """Names in both folders (sorted), and those only one folder has."""

    paired: list[str]
    generated_only: list[str]
    reference_only: list[str]

    def report(self, *, max_listed: int) -> dict:
        return {"generated_only": {"count": len(self.generated_only), "names": self.generated_only[:max_listed]},
                "reference_only": {"count": len(self.reference_only), "names": self.reference_only[:max_listed]}}


def pair_by_name(generated: list[str] | set[str], reference: list[str] | set[str]) -> Pairing:
    generated, reference = set(generated), set(reference)
    return Pairing(paired=sorted(generated & reference), generated_only=sorted(generated - reference),
                   reference_only=sorted(reference - generated))


@dataclass
class FailedFiles:
    """Files that could not be used: counted and listed with the reason, never fatal."""

    items: list[dict] = field(default_factory=list)

    def add(self, path: Path, reason: str) -> None:
        self.items.append({"path": str(path), "reason": reason})

    def report(self, *, max_listed: int) -> dict:
        return {"count": len(self.items), "files": self.items[:max_listed]}


def load_mono(path: Path, *, min_seconds: float) -> tuple[np.ndarray, int]:
    """`(1, samples)` float32 at the file's own rate (channel mean); `AudioDecodeError` if unusable."""
    waveform, sample_rate = decode(path)
    waveform = downmix(waveform)
    if waveform.shape[1] < min_seconds * sample_rate:
        raise AudioDecodeError("too_short", f"{path}: {waveform.shape[1] / sample_rate:.3f} s, "
                                            f"the metrics need at least {min_seconds:.3f} s")
    return waveform, sample_rate


def to_rate(waveform: np.ndarray, *, sample_rate: int, target: int) -> np.ndarray:
    """Resampled with torchaudio (the data pipeline's one resampler)."""
    return resample(waveform, orig_freq=sample_rate, new_freq=target)


def read_captions_file(path: str | Path) -> dict[str, str]:
    """name → caption from a JSON object or a `.lst` (`filename|caption` lines, names as infer makes them)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--captions {path}: no such file")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"--captions {path}: not valid JSON ({error})") from None
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise ValueError(f"--captions {path}: expected a JSON object mapping file names to caption strings")
        return {Path(name).stem: caption for name, caption in data.items()}
    from audioldm_dist.prompts import read_prompts

    return {prompt.name: prompt.caption for prompt in read_prompts(path)}


def sidecar_captions(clips: dict[str, Path]) -> dict[str, str]:
    """name → the `caption` of `NAME.json` beside the clip, for the clips that have one."""
    captions: dict[str, str] = {}
    for name, path in clips.items():
        sidecar = path.with_suffix(".json")
        if not sidecar.is_file():
            continue
        try:
            data = json.loads(sidecar.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            log.warning("%s: unreadable sidecar, no caption for %s (%s)", sidecar, name, error)
            continue
        if isinstance(data, dict) and isinstance(data.get("caption"), str):
            captions[name] = data["caption"]
    return captions
