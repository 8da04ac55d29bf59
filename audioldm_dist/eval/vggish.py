"""VGGish (Hershey et al. 2017) as torchvggish ports it: the embedding audioldm_eval uses for FAD.

Parameter names are torchvggish's (`features.{0,3,6,8,11,13}`, `embeddings.{0,2,4}`), so its
released `vggish-10086976.pth` loads with strict=True. As in audioldm_eval's FAD, the embedding is the
last Linear layer before its ReLU (`use_activation=False`) and without the PCA/quantisation
post-processing (`postprocess=False`): 128-d per 0.96 s patch, every patch of every clip.

Front end (VGGish's `mel_features`, no parameters): 25 ms periodic-Hann frames (400 samples) every
10 ms at 16 kHz, no centring, |rfft| with n_fft 512, 64 HTK-mel bands 125–7500 Hz (DC bin excluded),
log(mel + 0.01), then non-overlapping 96-frame patches; an incomplete last patch is dropped.
"""
from __future__ import annotations

import math

import torch
from torch import nn

SAMPLE_RATE = 16000
EMBEDDING_DIM = 128
WINDOW_LENGTH = 400
HOP_LENGTH = 160
FFT_LENGTH = 512
NUM_BANDS = 64
PATCH_FRAMES = 96
MEL_MIN_HZ = 125.0
MEL_MAX_HZ = 7500.0
LOG_OFFSET = 0.01
MIN_NUM_SAMPLES = WINDOW_LENGTH + (PATCH_FRAMES - 1) * HOP_LENGTH
"""15,600 samples (0.975 s): the shortest clip that yields one patch."""


def _hertz_to_mel(hertz: torch.Tensor) -> torch.Tensor:
    return 1127.0 * torch.log(1.0 + hertz / 700.0)


def vggish_mel_matrix() -> torch.Tensor:
    """`mel_features.spectrogram_to_mel_matrix` for VGGish's settings: `(257, 64)` float64."""
    num_bins = FFT_LENGTH // 2 + 1
    bins_mel = _hertz_to_mel(torch.linspace(0.0, SAMPLE_RATE / 2, num_bins, dtype=torch.float64))
    edges = torch.linspace(_hertz_to_mel(torch.tensor(MEL_MIN_HZ, dtype=torch.float64)).item(),
                           _hertz_to_mel(torch.tensor(MEL_MAX_HZ, dtype=torch.float64)).item(),
                           NUM_BANDS + 2, dtype=torch.float64)
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bins_mel[:, None] - lower) / (center - lower)
    falling = (upper - bins_mel[:, None]) / (upper - center)
    matrix = torch.clamp(torch.minimum(rising, falling), min=0.0)
    matrix[0] = 0.0  # HTK leaves out the DC bin
    return matrix


class VGGishFrontEnd(nn.Module):
    """(samples,) 16 kHz waveform → `(patches, 1, 96, 64)` log-mel patches."""

    def __init__(self) -> None:
        super().__init__()
        window = 0.5 - 0.5 * torch.cos(2 * math.pi / WINDOW_LENGTH * torch.arange(WINDOW_LENGTH, dtype=torch.float64))
        self.register_buffer("window", window, persistent=False)  # not in the released state dict
        self.register_buffer("mel_matrix", vggish_mel_matrix(), persistent=False)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        x = waveform.to(torch.float64)
        if x.shape[-1] < MIN_NUM_SAMPLES:
            raise ValueError(f"VGGish needs at least {MIN_NUM_SAMPLES} samples at 16 kHz, got {x.shape[-1]}")
        frames = x.unfold(-1, WINDOW_LENGTH, HOP_LENGTH) * self.window  # (frames, 400)
        magnitude = torch.fft.rfft(frames, n=FFT_LENGTH).abs()  # (frames, 257)
        log_mel = torch.log(magnitude @ self.mel_matrix + LOG_OFFSET)  # (frames, 64)
        num_patches = log_mel.shape[0] // PATCH_FRAMES
        patches = log_mel[: num_patches * PATCH_FRAMES].reshape(num_patches, 1, PATCH_FRAMES, NUM_BANDS)
        return patches.float()


def _features() -> nn.Sequential:
    layers: list[nn.Module] = []
    in_channels = 1
    for width in [64, "M", 128, "M", 256, 256, "M", 512, 512, "M"]:
        if width == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_channels, width, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_channels = width
    return nn.Sequential(*layers)


class VGGish(nn.Module):
    """(samples,) 16 kHz waveform → `(patches, 128)` pre-activation VGGish embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.front_end = VGGishFrontEnd()
        self.features = _features()
        # torchvggish ends with a ReLU after embeddings.4; audioldm_eval's FAD drops it.
        self.embeddings = nn.Sequential(nn.Linear(512 * 4 * 6, 4096), nn.ReLU(True), nn.Linear(4096, 4096),
                                        nn.ReLU(True), nn.Linear(4096, EMBEDDING_DIM))
        self.eval()

    def init_random(self) -> None:
        """He-normal weights, zero bias: activations keep their scale, so random embeddings still differ
        between clips (VGGish's own std-0.01 init collapses them to ~0 and FAD to 0)."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def train(self, mode: bool = True) -> "VGGish":
        return super().train(False)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        x = self.features(self.front_end(waveform))  # (patches, 512, 6, 4)
        x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # TF's channels-last flattening order
        return self.embeddings(x)
