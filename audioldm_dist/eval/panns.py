"""PANNs Cnn14 at 16 kHz (Kong et al. 2020), the classifier audioldm_eval uses for FD, KL and IS.

The layout and parameter names are those of `audioset_tagging_cnn`'s Cnn14 with torchlibrosa's front
end, so the released `Cnn14_16k_mAP=0.438.pth` (its `model` entry) loads with strict=True: the
STFT is two frozen Conv1d (`spectrogram_extractor.stft.conv_real/conv_imag`, windowed DFT rows) and
the mel filterbank a frozen `logmel_extractor.melW`; the file carries both, so loaded weights use
its exact front end. Front end of the 16 kHz model: n_fft 512 (periodic Hann), hop 160, centred with
reflect padding, power spectrogram, 64 librosa (Slaney) mel bands 50–8000 Hz, 10·log10(max(x, 1e-10)).
Inference only: no SpecAugment, no mixup, no dropout. `prepare_input` applies audioldm_eval's
input handling (DC offset removed, clips under 2 s zero-padded to 2 s).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torchaudio
from torch import nn
from torch.nn import functional as F

SAMPLE_RATE = 16000
EMBEDDING_DIM = 2048
NUM_CLASSES = 527
PAD_TO_NUM_SAMPLES = 32000
"""audioldm_eval zero-pads clips shorter than 2 s (at 16 kHz) before Cnn14."""


@dataclass(frozen=True, kw_only=True)
class Cnn14Options:
    """Front-end settings; the defaults are audioldm_eval's 16 kHz model (`Cnn14_16k`)."""

    sample_rate: int = SAMPLE_RATE
    n_fft: int = 512
    hop_length: int = 160
    num_mels: int = 64
    fmin: float = 50.0
    fmax: float = 8000.0
    num_classes: int = NUM_CLASSES


def prepare_input(waveform: torch.Tensor) -> torch.Tensor:
    """(B, samples) at 16 kHz → mean removed per clip and zero-padded to 2 s, as audioldm_eval's loader does."""
    waveform = waveform - waveform.mean(dim=-1, keepdim=True)
    if waveform.shape[-1] < PAD_TO_NUM_SAMPLES:
        waveform = F.pad(waveform, (0, PAD_TO_NUM_SAMPLES - waveform.shape[-1]))
    return waveform


class _STFT(nn.Module):
    """torchlibrosa's STFT: the windowed DFT as two strided Conv1d (real and imaginary rows)."""

    def __init__(self, *, n_fft: int, hop_length: int) -> None:
        super().__init__()
        self.n_fft = n_fft
        num_bins = n_fft // 2 + 1
        self.conv_real = nn.Conv1d(1, num_bins, kernel_size=n_fft, stride=hop_length, bias=False)
        self.conv_imag = nn.Conv1d(1, num_bins, kernel_size=n_fft, stride=hop_length, bias=False)
        time = torch.arange(n_fft, dtype=torch.float64)
        angle = 2 * math.pi * torch.outer(torch.arange(num_bins, dtype=torch.float64), time) / n_fft  # (bins, n_fft)
        window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64)
        with torch.no_grad():
            self.conv_real.weight.copy_((torch.cos(angle) * window)[:, None, :].float())
            self.conv_imag.weight.copy_((-torch.sin(angle) * window)[:, None, :].float())

    def forward(self, waveform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.pad(waveform[:, None, :], (self.n_fft // 2, self.n_fft // 2), mode="reflect")  # (B, 1, T + n_fft)
        real = self.conv_real(x).transpose(1, 2)[:, None]  # (B, 1, frames, bins)
        imag = self.conv_imag(x).transpose(1, 2)[:, None]
        return real, imag


class _Spectrogram(nn.Module):
    def __init__(self, *, n_fft: int, hop_length: int) -> None:
        super().__init__()
        self.stft = _STFT(n_fft=n_fft, hop_length=hop_length)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        real, imag = self.stft(waveform)
        return real ** 2 + imag ** 2  # (B, 1, frames, bins) power


class _LogMel(nn.Module):
    def __init__(self, options: Cnn14Options) -> None:
        super().__init__()
        # librosa.filters.mel(htk=False, norm="slaney") is torchaudio's slaney scale and norm.
        mel = torchaudio.functional.melscale_fbanks(options.n_fft // 2 + 1, f_min=options.fmin, f_max=options.fmax,
                                                    n_mels=options.num_mels, sample_rate=options.sample_rate,
                                                    norm="slaney", mel_scale="slaney")
        self.melW = nn.Parameter(mel, requires_grad=False)  # (bins, mels)

    def forward(self, power: torch.Tensor) -> torch.Tensor:
        return 10.0 * torch.log10(torch.clamp(power @ self.melW, min=1e-10))  # (B, 1, frames, mels) dB, ref 1


class ConvBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor, *, pool_size: tuple[int, int]) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.avg_pool2d(x, kernel_size=pool_size)


class Cnn14(nn.Module):
    """(B, samples) 16 kHz waveform → 2048-d embedding and 527 AudioSet logits."""

    def __init__(self, options: Cnn14Options = Cnn14Options()) -> None:
        super().__init__()
        self.options = options
        self.spectrogram_extractor = _Spectrogram(n_fft=options.n_fft, hop_length=options.hop_length)
        self.logmel_extractor = _LogMel(options)
        self.bn0 = nn.BatchNorm2d(options.num_mels)
        widths = [1, 64, 128, 256, 512, 1024, 2048]
        for index in range(6):
            setattr(self, f"conv_block{index + 1}", ConvBlock(widths[index], widths[index + 1]))
        self.fc1 = nn.Linear(EMBEDDING_DIM, EMBEDDING_DIM)
        self.fc_audioset = nn.Linear(EMBEDDING_DIM, options.num_classes)
        self.eval()

    def init_random(self) -> None:
        """Random weights for offline tests: He-normal convolutions and linears (activations keep their
        scale through 14 layers, so clips stay distinguishable), and a bn0 that roughly standardises
        log-mel dB (mean −40, std 20), the job the trained bn0 does."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                module.reset_parameters()
        with torch.no_grad():
            self.bn0.running_mean.fill_(-40.0)
            self.bn0.running_var.fill_(20.0 ** 2)

    def train(self, mode: bool = True) -> "Cnn14":
        return super().train(False)  # inference only: BatchNorm uses the released running statistics

    def forward(self, waveform: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.logmel_extractor(self.spectrogram_extractor(waveform))  # (B, 1, frames, mels)
        x = self.bn0(x.transpose(1, 3)).transpose(1, 3)  # BatchNorm over mel bins
        for index in range(1, 6):
            x = getattr(self, f"conv_block{index}")(x, pool_size=(2, 2))
        x = self.conv_block6(x, pool_size=(1, 1))  # (B, 2048, frames/32, mels/32)
        x = x.mean(dim=3)
        x = x.max(dim=2).values + x.mean(dim=2)  # (B, 2048)
        embedding = F.relu(self.fc1(x))
        return {"embedding": embedding, "logits": self.fc_audioset(embedding)}
