"""What each `train.target` optimises, as one callable the trainer and validation share.

`ldm` (default): the UNet's DDPM loss; VAE, conditioner and vocoder frozen (AudioLDM's main stage).
`vae`: the mel AutoencoderKL with the original's `LPIPSWithDiscriminator`
(`audioldm_train/losses/contperceptual.py`, "CP" below; 16k_64.yaml values are our `vae.*` defaults):

    rec       = |x − x̂| + perceptual_weight · LPIPS(x, x̂)          per element (LPIPS broadcast) CP:72-79
    nll       = Σ_{C,T,F,B} rec / exp(logvar) + logvar, / B         logvar fixed 0 (not optimised) CP:81-86
    kl        = Σ_B mean_{C,H,W} KL(q(z|x) ‖ N(0, I)) / B                                          CP:87-88
    g_loss    = −mean D(x̂)                                                                      CP:95-104
    d_weight  = clamp(‖∇_L nll‖ / (‖∇_L g_loss‖ + 1e-4), 0, 1e4).detach() · disc_weight,
                L = decoder.conv_out.weight                                                     CP:41-56
    factor    = 0 while step < disc_start, else 1 (taming's adopt_weight)                      CP:114-116
    generator = nll + kl_weight · kl + d_weight · factor · g_loss                              CP:117-119
    disc_loss = factor · ½(mean relu(1 − D(x)) + mean relu(1 + D(x̂)))   inputs detached   CP:138-151

`vae_objective` (the `Objective` that validation calls) is nll + kl_weight · kl per sample, what the
original's validation logs as aeloss (there autograd cannot run, so d_weight is 0, CP:105-110). The
per-batch GAN step (discriminator first, then the generator, as `autoencoder.py:307-386`) is driven by
`engine/vae_gan.py`, which owns the two DeepSpeed engines; the loss arithmetic is all here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from audioldm_dist.models.vae import DiagonalGaussian

TRAINED_PART = {"ldm": "unet", "vae": "vae"}
"""train.target → the AudioLDM part that DeepSpeed wraps and the optimizer updates."""


class Objective(Protocol):
    def __call__(self, batch: dict, *, generator: torch.Generator | None, network: nn.Module,
                 evaluation: bool = False) -> torch.Tensor:
        """Mean loss over the batch; with `evaluation`, per-sample losses (B,) and no guidance dropout."""


def make_objective(model, target: str, *, lpips: nn.Module | None = None) -> Objective:
    if target == "ldm":
        def ldm(batch, *, generator, network, evaluation=False):
            return model.loss(batch, generator=generator, unet=network, reduction="none" if evaluation else "mean",
                              guidance_dropout=not evaluation)
        return ldm
    if target == "vae":
        if lpips is None:
            raise ValueError("train.target=vae: the objective needs the LPIPS network")

        def vae(batch, *, generator, network, evaluation=False):
            mel = model.batch_log_mel(batch).unsqueeze(1)  # (B, 1, frames, mels)
            reconstruction, posterior = network(mel, generator=generator)
            lpips.train(not evaluation)  # the original's NetLinLayer dropout acts in training only
            terms = reconstruction_terms(mel, reconstruction, posterior, lpips=lpips,
                                         perceptual_weight=model.config.vae.perceptual_weight)
            per_sample = terms.nll_per_sample + model.config.vae.kl_weight * terms.kl_per_sample
            return per_sample if evaluation else per_sample.mean()
        return vae
    raise ValueError(f"train.target={target!r}: expected one of {', '.join(TRAINED_PART)}")


@dataclass(frozen=True, kw_only=True)
class ReconstructionTerms:
    rec_loss: torch.Tensor
    """Mean of the per-element reconstruction |x − x̂| + w·LPIPS (what the original logs as rec_loss)."""
    p_loss: torch.Tensor
    """LPIPS(x, x̂) per sample (B,)."""
    nll_per_sample: torch.Tensor
    """Σ over C, T, F of rec / exp(logvar) + logvar (B,); its batch mean is the original's nll_loss."""
    kl_per_sample: torch.Tensor
    """The posterior's KL, the mean over latent elements (B,)."""

    @property
    def nll(self) -> torch.Tensor:
        return self.nll_per_sample.sum() / self.nll_per_sample.shape[0]  # CP:86

    @property
    def kl(self) -> torch.Tensor:
        return self.kl_per_sample.sum() / self.kl_per_sample.shape[0]  # CP:87-88


def reconstruction_terms(mel: torch.Tensor, reconstruction: torch.Tensor, posterior: DiagonalGaussian, *,
                         lpips: nn.Module, perceptual_weight: float, logvar: float = 0.0) -> ReconstructionTerms:
    """CP:72-88 on (B, 1, T, F) inputs, in fp32 whatever the VAE's precision."""
    x, x_hat = mel.float(), reconstruction.float()
    rec = torch.abs(x - x_hat)  # (B, 1, T, F), CP:72
    p_loss = lpips(x, x_hat) if perceptual_weight > 0 else x.new_zeros(x.shape[0], 1, 1, 1)  # (B, 1, 1, 1)
    rec = rec + perceptual_weight * p_loss
    nll = rec / torch.exp(torch.tensor(logvar)) + logvar  # the original's logvar parameter stays 0 (CP:30, AE:471-493)
    return ReconstructionTerms(rec_loss=rec.mean(), p_loss=p_loss.flatten(), nll_per_sample=nll.flatten(1).sum(1),
                               kl_per_sample=posterior.kl().float())


def disc_factor(step: int, *, disc_start: int) -> float:
    """taming's adopt_weight(1.0, step, threshold=disc_start): 0 before `disc_start`, then 1."""
    return 0.0 if step < disc_start else 1.0


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """taming's hinge_d_loss (vqperceptual.py:20-24)."""
    return 0.5 * (torch.mean(F.relu(1.0 - logits_real)) + torch.mean(F.relu(1.0 + logits_fake)))


def discriminator_loss(discriminator: Callable, mel: torch.Tensor, reconstruction: torch.Tensor, *,
                       factor: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CP:133-151: real and fake through D separately (BatchNorm sees each alone), inputs detached."""
    logits_real = discriminator(mel.detach())
    logits_fake = discriminator(reconstruction.detach())
    loss = factor * hinge_d_loss(logits_real.float(), logits_fake.float())
    return loss, {"disc_loss": loss.detach(), "logits_real": logits_real.detach().float().mean(),
                  "logits_fake": logits_fake.detach().float().mean()}


def generator_loss(mel: torch.Tensor, reconstruction: torch.Tensor, posterior: DiagonalGaussian, *,
                   discriminator: Callable, lpips: nn.Module, last_layer: nn.Conv2d, last_layer_input: torch.Tensor,
                   perceptual_weight: float, kl_weight: float, disc_weight: float, factor: float
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CP:95-131. Returns a surrogate whose gradient w.r.t. the VAE is the generator loss's, and the terms.

    DeepSpeed hooks the engine's outputs: any backward through them (the original's
    `autograd.grad(nll, last_layer)`) runs its gradient reduction. So LPIPS and D see a detached copy
    x̂' of the reconstruction; ∇_x̂' of nll and g_loss give ∇_L by the conv's weight gradient from the
    last layer's input (`last_layer_input`, captured in the forward), and the VAE's backward is that of
    Σ x̂·∇_x̂'(nll + d_weight·factor·g_loss) + kl_weight·kl: the same gradient in one engine backward.
    d_weight is computed even before disc_start, as the original does (its `disc_factor` config is 1.0)."""
    leaf = reconstruction.detach().float().requires_grad_(True)  # x̂' (B, 1, T, F)
    terms = reconstruction_terms(mel, leaf, posterior, lpips=lpips, perceptual_weight=perceptual_weight)
    g_loss = -torch.mean(discriminator(leaf).float())
    nll_grad = torch.autograd.grad(terms.nll, leaf)[0]
    g_grad = torch.autograd.grad(g_loss, leaf)[0]

    def last_layer_grad(grad_output: torch.Tensor) -> torch.Tensor:
        return torch.nn.grad.conv2d_weight(last_layer_input, last_layer.weight.shape,
                                           grad_output.to(last_layer_input.dtype), stride=last_layer.stride,
                                           padding=last_layer.padding, dilation=last_layer.dilation)

    d_weight = torch.norm(last_layer_grad(nll_grad).float()) / (torch.norm(last_layer_grad(g_grad).float()) + 1e-4)
    d_weight = torch.clamp(d_weight, 0.0, 1e4).detach() * disc_weight  # CP:41-56
    loss = terms.nll + kl_weight * terms.kl + d_weight * factor * g_loss  # CP:117-119 (the value)
    leaf_grad = nll_grad + d_weight * factor * g_grad
    surrogate = (reconstruction.float() * leaf_grad).sum() + kl_weight * terms.kl
    return surrogate, {"loss": loss.detach(), "rec_loss": terms.rec_loss.detach(),
                       "p_loss": terms.p_loss.mean().detach(), "nll_loss": terms.nll.detach(),
                       "kl_loss": terms.kl.detach(), "g_loss": g_loss.detach(), "d_weight": d_weight,
                       "disc_factor": torch.tensor(factor, device=loss.device)}
