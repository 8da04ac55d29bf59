"""The DDPM training objective: MSE between the UNet output and its target (ε, v or x_0)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from audioldm_dist.diffusion.schedule import NoiseSchedule


def diffusion_loss(denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor, *,
                   schedule: NoiseSchedule, generator: torch.Generator | None = None,
                   reduction: str = "mean") -> torch.Tensor:
    """One Monte-Carlo estimate of the loss for latents `x0` (B, C, T, F); `denoiser(x_t, t)` → prediction.

    `reduction="none"` gives one value per sample (B,), for validation over padded batches."""
    batch = x0.shape[0]
    t = torch.randint(0, schedule.num_timesteps, (batch,), generator=generator, device="cpu").to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, device="cpu", dtype=x0.dtype).to(x0.device)
    x_t = schedule.add_noise(x0, noise, t)
    prediction = denoiser(x_t, t)
    kind = schedule.config.parameterization
    target = noise if kind == "eps" else x0 if kind == "x0" else schedule.velocity(x0, noise, t)
    if reduction == "none":
        return F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)
    return F.mse_loss(prediction.float(), target.float())
