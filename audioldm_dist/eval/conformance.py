"""Caption conformance on the demo set: does each generated clip do what its caption says?

The demo captions (`audioldm_dist.demo_data`) state measurable facts. Each caption is parsed into
checks, each check measured on the audio by plain signal processing (an STFT, no learned model, so
the model being judged cannot fool it), and reported per kind next to its chance level:

| check           | caption says                         | measured                                              | chance |
|-----------------|--------------------------------------|-------------------------------------------------------|--------|
| tone note       | "... at 440 Hz, the note A4"         | the demo note whose partials 1–3 hold the most energy  | 1/7    |
| tone wave       | "A steady sine/square wave tone"     | 3rd-harmonic to fundamental energy above −20 dB       | 1/2    |
| chirp direction | "A rising/falling chirp ..."         | sign of the slope of log peak frequency over time     | 1/2    |
| click pitch     | "... with 800 Hz clicks"             | strongest frequency in 100–2000 Hz → nearest click     | 1/3    |
| noise colour    | "bursts of white/low rumbling noise" | spectral centroid above/below 1500 Hz                 | 1/2    |

The tone's note is its pitch, which for a square wave (or a blurred one) is not always the strongest
partial: each demo note is scored by the energy within half a semitone of its first three partials,
weighted 1, 1/2, 1/3 (so a note an octave below does not win on its 2nd partial), and the best wins,
unless a demo note an octave or a twelfth below the winner has a fundamental within 10 dB of the winner's:
then that lower note is the pitch (a vocoder can dim a low square wave's fundamental until a note built on
its 3rd harmonic, A3 → E5, collects more energy, and the ear still hears the fundamental).

Chance holds for a model that ignores its captions when the captions are balanced over the choices
(the demo draws them uniformly): the measured choice is then independent of the expected one.
`python -m audioldm_dist.eval --conformance --generated DIR` scores a folder (captions from the
`NAME.json` sidecars or `--captions`).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from audioldm_dist.demo_data import CLICK_FREQUENCIES, NOISE_COLOURS, NOTE_NAMES

RATE = 16000
N_FFT = 2048
HOP = 256
ACTIVE_FRACTION = 0.1
"""Frames louder than this fraction of the loudest frame's energy take part in chirp direction."""
SQUARE_HARMONIC_DB = -20.0
HALF_SEMITONE = 2 ** (1 / 24) - 1
SUBHARMONIC_DB = -10.0
"""How close (dB) the fundamental of a note an octave or a twelfth below the best-scoring one must be for the
lower note to be the pitch."""
NOISE_CENTROID_HZ = 1500.0


@dataclass(frozen=True)
class Check:
    kind: str
    expected: str
    choices: tuple[str, ...]

    @property
    def chance(self) -> float:
        return 1.0 / len(self.choices)


_NOTES = tuple(NOTE_NAMES.values())
_CLICKS = tuple(f"{hz:g} Hz" for hz in CLICK_FREQUENCIES)
_PATTERNS = (
    (re.compile(r"tone at [\d.]+ Hz, the note (\w+)"), "tone note", _NOTES),
    (re.compile(r"steady (sine|square) wave tone"), "tone wave", ("sine", "square")),
    (re.compile(r"^A (rising|falling) chirp"), "chirp direction", ("rising", "falling")),
    (re.compile(r"with ([\d.]+ Hz) clicks"), "click pitch", _CLICKS),
    (re.compile(r"bursts of (white|low rumbling) noise"), "noise colour", NOISE_COLOURS),
)
KINDS = tuple(kind for _, kind, _ in _PATTERNS)


def checks_for(caption: str) -> list[Check]:
    """The measurable statements of a demo caption (none for other captions or unmeasured kinds)."""
    checks = []
    for pattern, kind, choices in _PATTERNS:
        match = pattern.search(caption)
        if match and match.group(1) in choices:
            checks.append(Check(kind, match.group(1), choices))
    return checks


def _spectrogram(waveform: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mono 16 kHz samples → magnitude (frames, bins) and the bins' frequencies in Hz."""
    signal = torch.as_tensor(np.asarray(waveform, dtype=np.float32).reshape(-1))
    if signal.numel() < N_FFT:
        signal = torch.nn.functional.pad(signal, (0, N_FFT - signal.numel()))
    spec = torch.stft(signal, N_FFT, hop_length=HOP, window=torch.hann_window(N_FFT), center=True,
                      return_complex=True).abs().T.numpy()
    return spec, np.fft.rfftfreq(N_FFT, 1.0 / RATE)


def _peak_hz(spectrum: np.ndarray, freqs: np.ndarray, low: float, high: float) -> float:
    band = (freqs >= low) & (freqs <= high)
    index = int(np.argmax(np.where(band, spectrum, -1.0)))
    window = slice(max(index - 1, 0), index + 2)  # energy centroid of the peak and its neighbours
    weights = spectrum[window] ** 2
    return float((freqs[window] * weights).sum() / max(weights.sum(), 1e-20))


def _best_note(power: np.ndarray, freqs: np.ndarray) -> str:
    """The demo note whose harmonic series (partials 1–3, weights 1, 1/2, 1/3) holds the most energy, or the
    lowest demo note an octave or a twelfth below it whose own fundamental is within SUBHARMONIC_DB of it."""
    def energy(hz: float) -> float:
        return float(power[np.abs(freqs - hz) <= hz * HALF_SEMITONE].sum())

    scores = {hz: sum(energy(k * hz) / k for k in (1, 2, 3)) for hz in NOTE_NAMES}
    best = max(scores, key=scores.get)
    for lower in sorted(NOTE_NAMES):
        if (any(abs(best / lower - k) <= k * HALF_SEMITONE for k in (2, 3))
                and energy(lower) >= energy(best) * 10 ** (SUBHARMONIC_DB / 10)):
            return NOTE_NAMES[lower]
    return NOTE_NAMES[best]


def _nearest(hz: float, choices: dict[str, float]) -> str:
    return min(choices, key=lambda name: abs(math.log2(max(hz, 1e-3) / choices[name])))


def measure(kind: str, waveform: np.ndarray) -> str:
    """Which of the kind's choices the 16 kHz mono `waveform` shows."""
    spec, freqs = _spectrogram(waveform)
    mean = spec.mean(axis=0)
    if kind == "tone note":
        return _best_note(mean ** 2, freqs)
    if kind == "tone wave":
        fundamental = _peak_hz(mean, freqs, 150.0, 3000.0)
        energy = lambda hz: float((mean[np.abs(freqs - hz) <= 20.0] ** 2).sum())  # noqa: E731
        ratio_db = 10 * math.log10(max(energy(3 * fundamental), 1e-20) / max(energy(fundamental), 1e-20))
        return "square" if ratio_db > SQUARE_HARMONIC_DB else "sine"
    if kind == "chirp direction":
        energy = (spec ** 2).sum(axis=1)
        active = energy >= ACTIVE_FRACTION * energy.max()
        band = (freqs >= 100.0) & (freqs <= 6000.0)
        peaks = freqs[band][np.argmax(spec[:, band], axis=1)]
        times = np.arange(len(peaks))[active]
        if len(times) < 2:
            return "falling"  # nothing measurable: a fixed answer, right half of the time on balanced captions
        slope = np.polyfit(times, np.log2(peaks[active]), 1)[0]
        return "rising" if slope > 0 else "falling"
    if kind == "click pitch":
        return _nearest(_peak_hz(mean, freqs, 100.0, 2000.0), {f"{hz:g} Hz": hz for hz in CLICK_FREQUENCIES})
    if kind == "noise colour":
        power = mean ** 2
        centroid = float((freqs * power).sum() / max(power.sum(), 1e-20))
        return "white" if centroid > NOISE_CENTROID_HZ else "low rumbling"
    raise ValueError(f"unknown conformance check {kind!r}; expected one of {', '.join(KINDS)}")


def score(clips: dict[str, tuple[str, np.ndarray]]) -> dict:
    """name → (caption, 16 kHz mono waveform) → per-kind accuracy with chance, and every clip's checks."""
    rows = {kind: {"count": 0, "correct": 0, "chance": None} for kind in KINDS}
    details = []
    for name, (caption, waveform) in sorted(clips.items()):
        for check in checks_for(caption):
            measured = measure(check.kind, waveform)
            row = rows[check.kind]
            row["count"] += 1
            row["correct"] += int(measured == check.expected)
            row["chance"] = check.chance
            details.append({"name": name, "caption": caption, "kind": check.kind, "expected": check.expected,
                            "measured": measured})
    table = {kind: {**row, "accuracy": row["correct"] / row["count"]} for kind, row in rows.items() if row["count"]}
    return {"conformance": table, "clips": details}


def conformance_path(folder: Path) -> Path:
    """`DIR` → `DIR.conformance.json` beside it."""
    folder = folder if folder.name else folder.resolve()
    return folder.parent / f"{folder.name}.conformance.json"


def score_folder(folder: Path, *, captions: dict[str, str]) -> dict:
    """Scores the clips of `folder` that have a caption (resampled to 16 kHz mono) and writes the result
    to `conformance_path(folder)`."""
    from audioldm_dist.data.audio import AudioDecodeError
    from audioldm_dist.eval.files import list_clips, load_mono, to_rate

    clips = {}
    for name, path in list_clips(folder).items():
        if name in captions:
            try:
                waveform, rate = load_mono(path, min_seconds=0.0)
            except AudioDecodeError as error:
                raise ValueError(f"cannot score {path}: {error}") from None
            clips[name] = (captions[name], to_rate(waveform, sample_rate=rate, target=RATE)[0])
    if not clips:
        raise ValueError(f"{folder}: no clip has a caption (NAME.json sidecars or --captions)")
    result = {"folder": str(folder), **score(clips)}
    if not result["conformance"]:
        raise ValueError(f"{folder}: none of the {len(clips)} captions states a measurable demo fact "
                         f"(tone note, chirp direction, …); conformance is for the demo set")
    conformance_path(folder).write_text(json.dumps(result, indent=1) + "\n")
    return result


def markdown(table: dict) -> str:
    lines = ["| check | clips | correct | accuracy | chance |", "|---|---:|---:|---:|---:|"]
    for kind, row in table.items():
        lines.append(f"| {kind} | {row['count']} | {row['correct']} | {row['accuracy']:.0%} | {row['chance']:.0%} |")
    return "\n".join(lines) + "\n"
