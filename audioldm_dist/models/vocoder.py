"""HiFi-GAN generator (V1 "resblock 1"): log-mel (B, mels, frames) → waveform (B, 1, frames × hop).

Weights are kept in weight-norm form (`weight_g` / `weight_v`, as released checkpoints store them);
`remove_weight_norm()` folds them for inference.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from audioldm_dist.config import VocoderConfig

LRELU_SLOPE = 0.1


def _weight_norm(module: nn.Module) -> nn.Module:
    # The legacy API keeps the checkpoint names weight_g / weight_v (parametrizations would rename them).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return nn.utils.weight_norm(module)


def _padding(kernel: int, dilation: int) -> int:
    return (kernel * dilation - dilation) // 2


class ResBlock1(nn.Module):
    def __init__(self, channels: int, kernel: int, dilations: list[int]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(_weight_norm(nn.Conv1d(channels, channels, kernel, dilation=d,
                                                           padding=_padding(kernel, d))) for d in dilations)
        self.convs2 = nn.ModuleList(_weight_norm(nn.Conv1d(channels, channels, kernel, dilation=1,
                                                           padding=_padding(kernel, 1))) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv1, conv2 in zip(self.convs1, self.convs2):
            x = x + conv2(F.leaky_relu(conv1(F.leaky_relu(x, LRELU_SLOPE)), LRELU_SLOPE))
        return x


class HiFiGAN(nn.Module):
    def __init__(self, config: VocoderConfig) -> None:
        super().__init__()
        self.config = config
        self.num_kernels = len(config.resblock_kernel_sizes)
        channels = config.upsample_initial_channel
        self.conv_pre = _weight_norm(nn.Conv1d(config.num_mels, channels, 7, padding=3))
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        for i, (rate, kernel) in enumerate(zip(config.upsample_rates, config.upsample_kernel_sizes)):
            self.ups.append(_weight_norm(nn.ConvTranspose1d(channels // 2**i, channels // 2 ** (i + 1), kernel, rate,
                                                            padding=(kernel - rate) // 2)))
            for res_kernel, dilations in zip(config.resblock_kernel_sizes, config.resblock_dilation_sizes):
                self.resblocks.append(ResBlock1(channels // 2 ** (i + 1), res_kernel, dilations))
        self.conv_post = _weight_norm(nn.Conv1d(channels // 2 ** len(config.upsample_rates), 1, 7, padding=3))

    @property
    def hop_length(self) -> int:
        hop = 1
        for rate in self.config.upsample_rates:
            hop *= rate
        return hop

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, mels, frames) → (B, 1, frames × hop_length) in [-1, 1]."""
        x = self.conv_pre(mel)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, LRELU_SLOPE))
            blocks = self.resblocks[i * self.num_kernels:(i + 1) * self.num_kernels]
            x = sum(block(x) for block in blocks) / self.num_kernels
        return torch.tanh(self.conv_post(F.leaky_relu(x)))

    def remove_weight_norm(self) -> None:
        """Folds weight_g/weight_v into plain weights (faster inference; the checkpoint names change)."""
        for module in self.modules():
            if hasattr(module, "weight_g"):
                nn.utils.remove_weight_norm(module)
