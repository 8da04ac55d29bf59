"""Griffin-Lim "vocoder": log-mel (B, mels, frames) → waveform (B, 1, frames × hop), no learned weights.

The inverse of our exact features (`data/melspec.py`): exp undoes `log(clamp(x, 1e-5))`, the
pseudo-inverse of the Slaney mel filters gives the least-norm non-negative STFT magnitude (as
torchaudio's `InverseMelScale`), and Griffin-Lim recovers a phase for the same window and hop. Our
STFT frames are centred half a hop later than torch's `center=True` frames, so the output is delayed
by hop/2 to line up with the input. Selected with `vocoder.kind: griffinlim`; HiFi-GAN stays the default.
"""
from __future__ import annotations

import torch
import torchaudio
from torch import nn

from audioldm_dist.config import AudioConfig


class GriffinLim(nn.Module):
    def __init__(self, audio: AudioConfig, *, mel_basis: torch.Tensor, num_iters: int) -> None:
        """`mel_basis`: (mels, freqs), the filters the features were made with (`MelFeatures.mel_basis`)."""
        super().__init__()
        self.audio = audio
        self.num_iters = num_iters
        self.register_buffer("mel_inverse", torch.linalg.pinv(mel_basis.double()).float(), persistent=False)
        self.register_buffer("window", torch.hann_window(audio.win_length), persistent=False)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, mels, frames) log-mel → (B, 1, frames × hop) in [-1, 1]."""
        audio = self.audio
        frames = mel.shape[-1]
        mel_inverse = self.mel_inverse[:, : mel.shape[-2]]  # features drop the odd last mel bin only if odd
        magnitude = (mel_inverse @ mel.float().exp()).clamp_min(0.0)  # (B, freqs, frames)
        half_hop = audio.hop_length // 2
        waveform = torchaudio.functional.griffinlim(
            magnitude, self.window, audio.filter_length, audio.hop_length, audio.win_length, power=1.0,
            n_iter=self.num_iters, momentum=0.99, length=frames * audio.hop_length - half_hop, rand_init=False)
        waveform = torch.nn.functional.pad(waveform, (half_hop, 0))
        return waveform.clamp(-1.0, 1.0).unsqueeze(1)

    def remove_weight_norm(self) -> None:
        """Nothing to fold (the HiFi-GAN interface `infer` calls)."""
