"""Per-clip features: one decode per file, then every backbone on it, so long folders stream.

A file that fails to decode, is too short, or makes a backbone fail is recorded in `FailedFiles`
with its path and reason and left out of every metric; the run goes on.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from audioldm_dist.data.audio import AudioDecodeError
from audioldm_dist.eval import panns, vggish
from audioldm_dist.eval.backbones import Backbones, ClapScorer
from audioldm_dist.eval.files import FailedFiles, load_mono, to_rate

log = logging.getLogger("audioldm_dist.eval")

MIN_SECONDS = vggish.MIN_NUM_SAMPLES / vggish.SAMPLE_RATE
"""0.975 s: one VGGish patch. Shorter clips are skipped (and listed), or zero-padded to it with `pad_short`."""


@dataclass
class FolderFeatures:
    """Backbone outputs per clip name (clips that failed are absent and listed in `failed`)."""

    panns_embedding: dict[str, np.ndarray] = field(default_factory=dict)  # name → (2048,)
    panns_logits: dict[str, np.ndarray] = field(default_factory=dict)  # name → (527,)
    vggish: dict[str, np.ndarray] = field(default_factory=dict)  # name → (patches, 128)
    clap_audio: dict[str, np.ndarray] = field(default_factory=dict)  # name → (512,), only with a scorer
    failed: FailedFiles = field(default_factory=FailedFiles)

    @property
    def names(self) -> list[str]:
        return sorted(self.panns_logits)


@torch.no_grad()
def clip_features(path: Path, backbones: Backbones, *, clap: ClapScorer | None,
                  pad_short: bool = False) -> dict[str, np.ndarray]:
    """One file → its Cnn14 embedding and logits, VGGish patch embeddings and (optional) CLAP embedding;
    `pad_short`: a clip under MIN_SECONDS is zero-padded to it (EvalConfig.pad_short) instead of refused."""
    waveform, sample_rate = load_mono(path, min_seconds=0.0 if pad_short else MIN_SECONDS)  # (1, samples)
    audio_16k = torch.from_numpy(to_rate(waveform, sample_rate=sample_rate, target=panns.SAMPLE_RATE))
    if pad_short and audio_16k.shape[1] < vggish.MIN_NUM_SAMPLES:
        audio_16k = torch.nn.functional.pad(audio_16k, (0, vggish.MIN_NUM_SAMPLES - audio_16k.shape[1]))
    audio_16k = audio_16k.to(backbones.device)
    outputs = backbones.panns(panns.prepare_input(audio_16k))  # both backbones run at 16 kHz: one resample
    features = {"panns_embedding": outputs["embedding"][0].double().cpu().numpy(),
                "panns_logits": outputs["logits"][0].double().cpu().numpy(),
                "vggish": backbones.vggish(audio_16k[0]).double().cpu().numpy()}
    if clap is not None:
        features["clap_audio"] = clap.audio_embedding(waveform, sample_rate=sample_rate)
    for key, value in features.items():
        if not np.isfinite(value).all():
            raise AudioDecodeError("non_finite_features", f"{path}: {key} has non-finite values")
    return features


def folder_features(clips: dict[str, Path], backbones: Backbones, *, clap: ClapScorer | None,
                    label: str, pad_short: bool = False) -> FolderFeatures:
    """Features of every clip in `clips`; failures are logged, counted and skipped."""
    result = FolderFeatures()
    for number, (name, path) in enumerate(clips.items(), start=1):
        try:
            features = clip_features(path, backbones, clap=clap, pad_short=pad_short)
        except AudioDecodeError as error:
            result.failed.add(path, f"{error.reason}: {error.detail}")
            log.warning("%s: skipped %s (%s)", label, path, error)
            continue
        except torch.OutOfMemoryError:
            raise  # not the file's fault: every later clip would fail the same way
        except (RuntimeError, ValueError) as error:  # a backbone refused the clip
            result.failed.add(path, f"backbone_error: {error}")
            log.warning("%s: skipped %s (backbone error: %s)", label, path, error)
            continue
        result.panns_embedding[name] = features["panns_embedding"]
        result.panns_logits[name] = features["panns_logits"]
        result.vggish[name] = features["vggish"]
        if "clap_audio" in features:
            result.clap_audio[name] = features["clap_audio"]
        if number % 100 == 0 or number == len(clips):
            log.info("%s: %d of %d clips", label, number, len(clips))
    return result
