"""LPIPS perceptual distance as taming-transformers computes it for the VAE loss, in plain torch.

The original VAE loss (`audioldm_train/losses/contperceptual.py:27`, `LPIPS().eval()`) uses taming's
`taming/modules/losses/lpips.py`: torchvision's ImageNet VGG16 `features` cut into five slices
(relu1_2 … relu5_3), a ScalingLayer, unit-normalised feature differences, a 1×1 conv head per slice
(`NetLinLayer`, with `nn.Dropout()` in front: taming builds LPIPS with `use_dropout=True`,
lpips.py:13,67-73) and a spatial mean. Module and key names are taming's (`net.slice1.0.weight`,
`lin0.model.1.weight`, `scaling_layer.shift`), so taming's `LPIPS().state_dict()` loads as it is.

Mel input is 1-channel: it broadcasts against the 3-channel shift/scale (lpips.py:57-64), giving three
differently scaled copies, as in the original. The weights are frozen. The dropout acts in train mode:
the original sets `.eval()` once at construction, but Lightning's `.train()` on the parent re-enables it.

Weights (`vae.lpips_weights`): one torch file with taming's key names, made from torchvision's VGG16
ImageNet file and taming's LPIPS heads (`vgg.pth`, https://heibox.uni-heidelberg.de/f/607503859c864bc1b30b/?dl=1,
md5 d507d7349b931f0638a25a48a722f98a) without torchvision installed:

    python -m audioldm_dist.models.lpips --vgg16 vgg16-397923af.pth --heads vgg.pth --out lpips_vgg.pt
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

CHANNELS = (64, 128, 256, 512, 512)
"""Channels of the five VGG16 slices (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3)."""
VGG16_FEATURES = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
"""torchvision's VGG16 `features` (configuration "D"): conv 3×3 + ReLU per number, max-pool per M."""
SLICE_BOUNDS = (0, 4, 9, 16, 23, 30)
"""taming's slices of `features` by index (lpips.py:84-93): [0,4), [4,9), [9,16), [16,23), [23,30)."""


def vgg16_feature_layers() -> list[nn.Module]:
    """torchvision's `vgg16().features` layers in order (indices match its state-dict keys)."""
    layers: list[nn.Module] = []
    in_channels = 3
    for item in VGG16_FEATURES:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_channels, item, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_channels = item
    return layers


class VGG16Slices(nn.Module):
    """taming's `vgg16` wrapper: five Sequentials keeping torchvision's layer indices as names."""

    def __init__(self) -> None:
        super().__init__()
        layers = vgg16_feature_layers()
        for number, (start, end) in enumerate(zip(SLICE_BOUNDS[:-1], SLICE_BOUNDS[1:]), start=1):
            block = nn.Sequential()
            for index in range(start, end):
                block.add_module(str(index), layers[index])
            setattr(self, f"slice{number}", block)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for number in range(1, len(SLICE_BOUNDS)):
            x = getattr(self, f"slice{number}")(x)
            outputs.append(x)
        return outputs


class ScalingLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale  # (B, 1, H, W) broadcasts to (B, 3, H, W)


class NetLinLayer(nn.Module):
    """Dropout then a 1×1 conv to one channel (`model.0`, `model.1` as taming names them)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, stride=1, padding=0, bias=False))


def _normalize(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (torch.sqrt(torch.sum(x**2, dim=1, keepdim=True)) + eps)


class LPIPS(nn.Module):
    """LPIPS(x, y) → (B, 1, 1, 1). Frozen: its parameters never require gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.net = VGG16Slices()
        for index, channels in enumerate(CHANNELS):
            setattr(self, f"lin{index}", NetLinLayer(channels))
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        features_x, features_y = self.net(self.scaling_layer(x)), self.net(self.scaling_layer(y))
        total = None
        for index, (fx, fy) in enumerate(zip(features_x, features_y)):
            diff = (_normalize(fx) - _normalize(fy)) ** 2  # (B, C_k, H_k, W_k)
            value = getattr(self, f"lin{index}").model(diff).mean([2, 3], keepdim=True)  # (B, 1, 1, 1)
            total = value if total is None else total + value
        return total


def random_lpips(*, seed: int = 0) -> LPIPS:
    """LPIPS with seeded random weights (PyTorch's default init; heads made non-negative as trained ones are)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lpips = LPIPS()
    for index in range(len(CHANNELS)):
        getattr(lpips, f"lin{index}").model[1].weight.abs_()
    return lpips


def check_state(state: dict, *, where: str) -> dict[str, torch.Tensor]:
    """`state` completed with the constant ScalingLayer buffers; a ValueError naming `where` if keys differ."""
    expected = LPIPS().state_dict()
    missing = sorted(k for k in expected if k not in state and not k.startswith("scaling_layer."))
    unexpected = sorted(k for k in state if k not in expected)
    if missing or unexpected:
        raise ValueError(f"{where}: not an LPIPS VGG16 state dict with taming's key names; missing "
                         f"{missing[:5]}{'…' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}")
    return {**expected, **state}


def load_lpips(*, weights: str, random_init: bool, seed: int = 0) -> LPIPS:
    """LPIPS from the weights file `weights` (taming key names), or seeded random weights (tests, demo)."""
    if random_init:
        if weights:
            raise ValueError(f"vae.lpips_weights={weights!r} and vae.lpips_random_init=true: choose one")
        log.warning("vae.lpips_random_init=true: the perceptual loss uses RANDOM VGG16/LPIPS weights "
                    "(tests and demos only; set vae.lpips_weights for real training)")
        return random_lpips(seed=seed)
    if not weights:
        raise ValueError("vae.lpips_weights is not set: VAE training (train.target=vae) needs the LPIPS VGG16 "
                         "weights file (make it with `python -m audioldm_dist.models.lpips --vgg16 … --heads vgg.pth "
                         "--out lpips_vgg.pt`), or vae.lpips_random_init=true for a test run")
    path = Path(weights)
    if not path.is_file():
        raise ValueError(f"vae.lpips_weights={weights}: no such file (expected the LPIPS VGG16 weights made by "
                         f"`python -m audioldm_dist.models.lpips`)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    lpips = LPIPS()
    lpips.load_state_dict(check_state(state.get("state_dict", state), where=f"vae.lpips_weights={weights}"))
    return lpips


def convert(*, vgg16: dict, heads: dict) -> dict[str, torch.Tensor]:
    """torchvision's VGG16 state dict (`features.N.*`) + taming's `vgg.pth` heads → our/taming key names."""
    state = {}
    for number, (start, end) in enumerate(zip(SLICE_BOUNDS[:-1], SLICE_BOUNDS[1:]), start=1):
        for index in range(start, end):
            for kind in ("weight", "bias"):
                key = f"features.{index}.{kind}"
                if key in vgg16:
                    state[f"net.slice{number}.{index}.{kind}"] = vgg16[key]
    state.update({key: value for key, value in heads.items() if key.startswith("lin")})
    return state


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m audioldm_dist.models.lpips",
                                     description="Write the vae.lpips_weights file from torchvision's VGG16 "
                                                 "and taming's LPIPS heads.")
    parser.add_argument("--vgg16", required=True, help="torchvision's vgg16-397923af.pth (ImageNet)")
    parser.add_argument("--heads", required=True, help="taming/LPIPS vgg.pth (linear heads lin0…lin4)")
    parser.add_argument("--out", required=True)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    state = convert(vgg16=torch.load(args.vgg16, map_location="cpu", weights_only=True),
                    heads=torch.load(args.heads, map_location="cpu", weights_only=True))
    LPIPS().load_state_dict(check_state(state, where=args.out))  # every key present, every shape right
    torch.save(state, args.out)
    print(f"wrote {args.out} ({len(state)} tensors)")


if __name__ == "__main__":
    main()
