"""What the model sees: the original AudioLDM crop, normalisation, STFT magnitude and log-mel.

Every step reproduces the original data pipeline (checked against
`shared/reference/seed_feature_reference.npz` to 1e-4): a random `duration` window that avoids
silence (up to 10 tries for a peak above 1e-4), mean removal, peak normalisation to 0.5, zero padding
at the end; STFT with n_fft 1024, hop 160, Hann window, reflect padding of (n_fft - hop) / 2 and
`center=False`; Slaney mel filters; `log(clamp(x, 1e-5))`; the time axis padded or cut to
`duration * rate / hop` frames and the STFT's odd last bin dropped.
The CLI that writes these for one file is `python -m audioldm_dist.features`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torchaudio

from audioldm_dist.config import AudioConfig
from audioldm_dist.data.audio import resample

SILENCE_PEAK = 1e-4
NUM_CROP_TRIES = 10


def random_crop(waveform: np.ndarray, *, num_samples: int, rng: np.random.Generator | None,
                start: int | None = None) -> tuple[np.ndarray, int]:
    """A `num_samples` window of `(channels, T)`: at `start`, or random avoiding silent windows."""
    length = waveform.shape[-1]
    if length <= num_samples:
        return waveform, 0
    if start is not None:
        start = min(max(0, start), length - num_samples)
        return waveform[:, start:start + num_samples], start
    assert rng is not None, "random_crop needs an rng or a start"
    for _ in range(NUM_CROP_TRIES):
        start = int(rng.uniform(0, length - num_samples))
        if np.abs(waveform[:, start:start + num_samples]).max() > SILENCE_PEAK:
            break
    return waveform[:, start:start + num_samples], start


def normalize(waveform: np.ndarray) -> np.ndarray:
    """Mean removed, peak scaled to 0.5 (the original `normalize_wav`)."""
    waveform = waveform - np.mean(waveform)
    waveform = waveform / (np.max(np.abs(waveform)) + 1e-8)
    return (waveform * 0.5).astype(np.float32)


def pad_to(waveform: np.ndarray, num_samples: int) -> np.ndarray:
    """Zero-pads `(1, T)` at the end (or cuts) to exactly `num_samples`."""
    padded = np.zeros((1, num_samples), dtype=np.float32)
    length = min(num_samples, waveform.shape[-1])
    padded[:, :length] = waveform[:, :length]
    return padded


class MelFeatures:
    """STFT magnitude and log-mel of a `(1, T)` waveform, with the window and filters built once."""

    def __init__(self, config: AudioConfig) -> None:
        self.config = config
        self.window = torch.hann_window(config.win_length)
        self.mel_basis = torchaudio.functional.melscale_fbanks(
            n_freqs=config.filter_length // 2 + 1, f_min=config.mel_fmin, f_max=config.mel_fmax,
            n_mels=config.n_mel_channels, sample_rate=config.sampling_rate, norm="slaney", mel_scale="slaney",
        ).T  # (mels, freqs)

    def __call__(self, waveform: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One `(1, T)` clip → `log_mel_spec` (frames, mels) and `stft` (frames, bins)."""
        log_mel, spec = self.batch(torch.as_tensor(waveform, dtype=torch.float32).reshape(1, -1))
        return log_mel[0], spec[0]

    def batch(self, waveform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(B, T)` or `(B, 1, T)` on any device → `(B, frames, mels)` and `(B, frames, bins)`, padded/cut
        to `num_frames`. The trainer uses this when the loader ships waveforms only."""
        config = self.config
        y = waveform.reshape(waveform.shape[0], -1).float()
        window = self.window.to(y.device)
        mel_basis = self.mel_basis.to(y.device)
        pad = int((config.filter_length - config.hop_length) / 2)
        y = torch.nn.functional.pad(y.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
        spec = torch.stft(y, config.filter_length, hop_length=config.hop_length, win_length=config.win_length,
                          window=window, center=False, pad_mode="reflect", normalized=False, onesided=True,
                          return_complex=True).abs()  # (B, freqs, frames)
        log_mel = torch.log(torch.clamp(mel_basis @ spec, min=1e-5))  # (B, mels, frames)
        return self._fit_frames(log_mel.transpose(1, 2)), self._fit_frames(spec.transpose(1, 2))

    def _fit_frames(self, features: torch.Tensor) -> torch.Tensor:
        target = self.config.num_frames
        if features.shape[-2] < target:
            features = torch.nn.functional.pad(features, (0, 0, 0, target - features.shape[-2]))
        features = features[..., :target, :]
        if features.shape[-1] % 2 != 0:
            features = features[..., :-1]
        return features


@dataclass(frozen=True, kw_only=True)
class ClipFeatures:
    waveform: np.ndarray  # (1, num_samples)
    log_mel_spec: torch.Tensor | None  # (frames, mels); None when features are left to the trainer
    stft: torch.Tensor | None  # (frames, bins)
    crop_start: int  # in samples of the rate the crop was taken at


def waveform_to_features(waveform: np.ndarray, sample_rate: int, *, config: AudioConfig, mel: MelFeatures | None,
                         rng: np.random.Generator | None = None, start_seconds: float | None = None,
                         crop_before_resample: bool = True) -> ClipFeatures:
    """Mono `(1, T)` at `sample_rate` → crop, resample, normalise, pad, features.

    With `mel=None` only the waveform is prepared (the trainer computes features on its device).
    `crop_before_resample=True` is the original order (window at the file's native rate). Shards are
    already at the target rate, so both orders coincide there apart from resampler edge effects.
    """
    start = None if start_seconds is None else int(round(start_seconds * sample_rate))
    if crop_before_resample:
        cropped, crop_start = random_crop(waveform, num_samples=int(sample_rate * config.duration), rng=rng,
                                          start=start)
        resampled = resample(cropped, orig_freq=sample_rate, new_freq=config.sampling_rate)
    else:
        resampled = resample(waveform, orig_freq=sample_rate, new_freq=config.sampling_rate)
        start = None if start_seconds is None else int(round(start_seconds * config.sampling_rate))
        resampled, crop_start = random_crop(resampled, num_samples=config.num_samples, rng=rng, start=start)
    final = pad_to(normalize(resampled[:1]), config.num_samples)
    log_mel_spec, stft = mel(final) if mel is not None else (None, None)
    return ClipFeatures(waveform=final, log_mel_spec=log_mel_spec, stft=stft, crop_start=crop_start)
