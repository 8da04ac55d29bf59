"""DDIM sampling (η = 0 by default) with classifier-free guidance."""
from __future__ import annotations

from typing import Callable

import torch
from tqdm import tqdm

from audioldm_dist.diffusion.schedule import NoiseSchedule

Denoiser = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]
"""denoiser(x_t, t, conditional) → the model's prediction, with or without the condition."""


def ddim_timesteps(num_timesteps: int, num_steps: int) -> list[int]:
    """The original 'uniform' selection: every (T / steps)-th step, shifted by one (1, 6, 11, ...)."""
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"DDIM steps must be between 1 and {num_timesteps}, got {num_steps}")
    stride = num_timesteps // num_steps
    return [t + 1 for t in range(0, num_timesteps, stride)][:num_steps]


@torch.no_grad()
def ddim_sample(denoiser: Denoiser, shape: tuple[int, ...], *, schedule: NoiseSchedule, num_steps: int,
                guidance_scale: float = 1.0, eta: float = 0.0, generator: torch.Generator | None = None,
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                show_progress: bool = False) -> torch.Tensor:
    """Latents of `shape` from noise; guidance ε = ε_u + s (ε_c − ε_u) when `guidance_scale` != 1."""
    x = torch.randn(shape, generator=generator, device="cpu", dtype=torch.float32).to(device=device, dtype=dtype)
    steps = ddim_timesteps(schedule.num_timesteps, num_steps)
    alphas = schedule.alphas_cumprod
    for index in tqdm(list(reversed(range(len(steps)))), desc="DDIM", disable=not show_progress):
        t_value = min(steps[index], schedule.num_timesteps - 1)
        t = torch.full((shape[0],), t_value, device=device, dtype=torch.long)
        conditional = denoiser(x, t, True)
        if guidance_scale != 1.0:
            unconditional = denoiser(x, t, False)
            prediction = unconditional + guidance_scale * (conditional - unconditional)
        else:
            prediction = conditional
        eps, x0 = schedule.to_eps_and_x0(prediction, x, t)
        alpha = alphas[t_value]
        # As the original: the step before the first one uses ᾱ_0, not 1.
        alpha_prev = alphas[min(steps[index - 1], schedule.num_timesteps - 1)] if index > 0 else alphas[0]
        sigma = eta * ((1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)).sqrt()
        direction = (1 - alpha_prev - sigma**2).clamp_min(0).sqrt().to(dtype) * eps
        x = alpha_prev.sqrt().to(dtype) * x0 + direction
        if eta > 0 and index > 0:
            noise = torch.randn(shape, generator=generator, device="cpu").to(device=device, dtype=dtype)
            x = x + sigma.to(dtype) * noise
    return x
