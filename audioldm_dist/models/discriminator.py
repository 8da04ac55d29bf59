"""The patch discriminator of the VAE loss: taming's `NLayerDiscriminator` (pix2pix PatchGAN).

As the original builds it (`audioldm_train/losses/contperceptual.py:32-34`, `disc_in_channels 1`,
`n_layers 3`, `use_actnorm False`; taming `modules/discriminator/model.py:17-63`): conv 4×4/2 + LeakyReLU,
then n_layers−1 strided convs and one stride-1 conv (no bias) each with BatchNorm + LeakyReLU(0.2),
then a 4×4 conv to one logit per patch. Initialised as taming's `weights_init` (model.py:8-14):
conv weights ~ N(0, 0.02), BatchNorm weight ~ N(1, 0.02), bias 0. Key names (`main.N.*`) are taming's.
"""
from __future__ import annotations

from torch import Tensor, nn


def weights_init(module: nn.Module) -> None:
    name = module.__class__.__name__
    if "Conv" in name:
        nn.init.normal_(module.weight.data, 0.0, 0.02)
    elif "BatchNorm" in name:
        nn.init.normal_(module.weight.data, 1.0, 0.02)
        nn.init.constant_(module.bias.data, 0)


class NLayerDiscriminator(nn.Module):
    """(B, input_nc, H, W) → patch logits (B, 1, H', W')."""

    def __init__(self, *, input_nc: int = 1, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(input_nc, ndf, kernel_size=4, stride=2, padding=1),
                                   nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            previous, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * previous, ndf * mult, kernel_size=4, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, kernel_size=4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(weights_init)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)
