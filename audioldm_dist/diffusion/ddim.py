"""DDIM sampling with classifier-free guidance, as the original's `DDIMSampler` (modules/latent_diffusion/ddim.py).

Timesteps follow the original's 'uniform' rule exactly (`make_ddim_timesteps`): every (T // S)-th step of
range(0, T), each shifted by one. When S does not divide T this gives more than S steps (S = 7 → 8 steps,
the first at t = 995), as the original does; an S whose stride divides T - 1 (S = 3, 9, 27, 37, 111, 333 or
above T / 2 for T = 1000) makes the original index ᾱ at t = T and crash, so it is refused with a clear error. With η > 0 fresh noise is added at every step, the last included,
as the original's `p_sample_ddim` does (η = 1 is the original's generation default, `diffusion.ddim_eta`).
"""
from __future__ import annotations

from typing import Callable

import torch
from tqdm import tqdm

from audioldm_dist.diffusion.schedule import NoiseSchedule

Denoiser = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]
"""denoiser(x_t, t, conditional) → the model's prediction, with or without the condition."""


def ddim_timesteps(num_timesteps: int, num_steps: int) -> list[int]:
    """The original 'uniform' selection: range(0, T, T // S) + 1 (1, 6, 11, ... for T=1000, S=200).

    Original: utilities/diffusion_util.py `make_ddim_timesteps` (c = T // S; range(0, T, c); + 1). When c
    divides T - 1 the last step is t = T and the original's ᾱ lookup fails (S = 3, 9, 27, 37, 111, 333 and
    every S above T/2 for T = 1000): refused here with the nearest S that works."""
    stride = num_timesteps // num_steps if 1 <= num_steps <= num_timesteps else 0
    if stride == 0 or (num_timesteps - 1) % stride == 0:
        works = [s for s in range(1, num_timesteps + 1) if (num_timesteps - 1) % (num_timesteps // s) != 0]
        nearest = min(works, key=lambda s: (abs(s - num_steps), s))
        raise ValueError(f"DDIM steps {num_steps}: the original's uniform rule (range(0, {num_timesteps}, "
                         f"{num_timesteps} // steps) + 1) reaches t={num_timesteps}, past the schedule, so the "
                         f"original fails on it; use e.g. {nearest} steps (at most {max(works)})")
    return [t + 1 for t in range(0, num_timesteps, stride)]


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
        t_value = steps[index]
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
        alpha_prev = alphas[steps[index - 1]] if index > 0 else alphas[0]
        sigma = eta * ((1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)).sqrt()
        direction = (1 - alpha_prev - sigma**2).clamp_min(0).sqrt().to(dtype) * eps
        x = alpha_prev.sqrt().to(dtype) * x0 + direction
        if eta > 0:  # every step, the last included (original ddim.py p_sample_ddim: x_prev = ... + σ_t·noise)
            noise = torch.randn(shape, generator=generator, device="cpu").to(device=device, dtype=dtype)
            x = x + sigma.to(dtype) * noise
    return x
