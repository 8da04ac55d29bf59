"""What each `train.target` optimises, as one callable the trainer and validation share.

`ldm` (default): the UNet's DDPM loss; VAE, conditioner and vocoder frozen (AudioLDM's main stage).
`vae`: the mel AutoencoderKL alone (the original's `autoencoder.py` stage): L1 reconstruction of the
log-mel, summed per sample and averaged over the batch, plus `vae.kl_weight` × KL(q(z|x) || N(0, I)),
as the original's LPIPSWithDiscriminator with its discriminator not yet started and log-variance 0.
The adversarial part is not implemented (README says so).
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import nn

TRAINED_PART = {"ldm": "unet", "vae": "vae"}
"""train.target → the AudioLDM part that DeepSpeed wraps and the optimizer updates."""


class Objective(Protocol):
    def __call__(self, batch: dict, *, generator: torch.Generator | None, network: nn.Module,
                 evaluation: bool = False) -> torch.Tensor:
        """Mean loss over the batch; with `evaluation`, per-sample losses (B,) and no guidance dropout."""


def make_objective(model, target: str) -> Objective:
    if target == "ldm":
        def ldm(batch, *, generator, network, evaluation=False):
            return model.loss(batch, generator=generator, unet=network, reduction="none" if evaluation else "mean",
                              guidance_dropout=not evaluation)
        return ldm
    if target == "vae":
        def vae(batch, *, generator, network, evaluation=False):
            per_sample = vae_loss(network, model.batch_log_mel(batch), generator=generator,
                                  kl_weight=model.config.vae.kl_weight)
            return per_sample if evaluation else per_sample.mean()
        return vae
    raise ValueError(f"train.target={target!r}: expected one of {', '.join(TRAINED_PART)}")


def vae_loss(vae: Callable, log_mel: torch.Tensor, *, generator: torch.Generator | None, kl_weight: float
             ) -> torch.Tensor:
    """Per-sample L1 reconstruction (summed over the mel) + kl_weight × KL; `vae` may be the engine."""
    mel = log_mel.unsqueeze(1)  # (B, 1, frames, mels)
    reconstruction, posterior = vae(mel, generator=generator)
    l1 = (reconstruction.float() - mel.float()).abs().flatten(1).sum(1)
    return l1 + kl_weight * posterior.kl().float()
