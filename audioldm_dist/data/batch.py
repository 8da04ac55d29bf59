"""One sample and one batch in the original AudioLDM format, shared by the streaming and map-style loaders.

Batch keys and shapes are the original code's, so model code ports unchanged: `waveform` [B, 1, T],
`log_mel_spec` [B, frames, mels], `stft` [B, frames, bins], `text` (list), `fname` (list),
`label_vector` [B, classes], `duration` [B], `sampling_rate` [B]. Ours on top: `key` (list) and
`valid` [B] (False marks padding in evaluation batches, which metrics must ignore). A loader made
with `features_in_loader=False` leaves out `log_mel_spec` and `stft`; the trainer then computes them
with `MelFeatures.batch` on its device.
"""
from __future__ import annotations

import numpy as np
import torch

from audioldm_dist.config import AudioConfig
from audioldm_dist.data.audio import downmix
from audioldm_dist.data.melspec import MelFeatures, waveform_to_features
from audioldm_dist.data.metadata import LabelIndex


def label_vector(mids: list[str], labels: LabelIndex | None) -> np.ndarray:
    """Multi-hot over the classes of `labels` (unknown mids are ignored); empty without a label index."""
    if labels is None:
        return np.zeros(0, dtype=np.float32)
    vector = np.zeros(labels.num_classes, dtype=np.float32)
    for mid in mids:
        if mid in labels.index_by_mid:
            vector[labels.index_by_mid[mid]] = 1.0
    return vector


def choose_caption(captions: list[str], rng: np.random.Generator) -> int:
    """The index of the caption a sample trains with: uniform over the record's captions, picked per item fetched
    as the original (DS:547-558 in shared/reference/original_recipe.md), one draw of the sample's rng; 0 without
    captions."""
    return int(rng.integers(len(captions))) if captions else 0


def make_sample(waveform: np.ndarray, sample_rate: int, *, captions: list[str], label_mids: list[str],
                fname: str, key: str, config: AudioConfig, mel: MelFeatures | None, labels: LabelIndex | None,
                rng: np.random.Generator | None, start_seconds: float | None = None) -> dict:
    """`(channels, T)` audio at any rate → one sample: crop, resample, normalise, features, caption. The crop
    is random (the loader) unless `start_seconds` fixes it (encode-shards; `rng` may then be None, and the
    caption is the first)."""
    clip = waveform_to_features(downmix(waveform), sample_rate, config=config, mel=mel, rng=rng,
                                start_seconds=start_seconds)
    text = (captions[choose_caption(captions, rng)] if rng is not None else captions[0]) if captions else ""
    sample = {"waveform": torch.from_numpy(clip.waveform)}
    if clip.log_mel_spec is not None:
        sample.update(log_mel_spec=clip.log_mel_spec, stft=clip.stft)
    return sample | {
        "text": text,
        "fname": fname,
        "label_vector": torch.from_numpy(label_vector(label_mids, labels)),
        "duration": config.duration,
        "sampling_rate": config.sampling_rate,
        "random_start_sample_in_original_audio_file": clip.crop_start,
        "key": key,
        "valid": True,
    }


def padding_sample(*, config: AudioConfig, mel: MelFeatures | None, labels: LabelIndex | None) -> dict:
    """A silent, invalid sample that fills evaluation batches to the common size."""
    silence = np.zeros((1, config.num_samples), dtype=np.float32)
    sample = make_sample(silence, config.sampling_rate, captions=[""], label_mids=[], fname="", key="",
                         config=config, mel=mel, labels=labels, rng=np.random.default_rng(0))
    sample["valid"] = False
    return sample


def collate(samples: list[dict]) -> dict:
    """Stacks tensors, lists strings, tensors of scalars."""
    batch: dict = {}
    for key in samples[0]:
        values = [sample[key] for sample in samples]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], str):
            batch[key] = values
        elif isinstance(values[0], bool):
            batch[key] = torch.tensor(values, dtype=torch.bool)
        elif isinstance(values[0], float):
            batch[key] = torch.tensor(values, dtype=torch.float64)  # as torch's default_collate does
        else:
            batch[key] = torch.tensor(values)
    return batch
