"""The original latent-diffusion noise schedule: betas linear in sqrt space, from 0.0015 to 0.0195."""
from __future__ import annotations

import torch

from audioldm_dist.config import DiffusionConfig


class NoiseSchedule:
    """ᾱ_t and the q(x_t | x_0) helpers every parameterisation needs; float64 tables, cast on use."""

    def __init__(self, config: DiffusionConfig) -> None:
        self.config = config
        betas = torch.linspace(config.linear_start**0.5, config.linear_end**0.5, config.num_timesteps,
                               dtype=torch.float64) ** 2
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)

    @property
    def num_timesteps(self) -> int:
        return self.config.num_timesteps

    def _at(self, table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return table.to(like.device)[t].to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))

    def sqrt_alpha_bar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self._at(self.alphas_cumprod.sqrt(), t, like)

    def sqrt_one_minus_alpha_bar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self._at((1.0 - self.alphas_cumprod).sqrt(), t, like)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ x_0 + √(1-ᾱ) ε."""
        return self.sqrt_alpha_bar(t, x0) * x0 + self.sqrt_one_minus_alpha_bar(t, x0) * noise

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = √ᾱ ε − √(1-ᾱ) x_0."""
        return self.sqrt_alpha_bar(t, x0) * noise - self.sqrt_one_minus_alpha_bar(t, x0) * x0

    def to_eps_and_x0(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """The model output under the configured parameterisation → (ε̂, x̂_0)."""
        a, s = self.sqrt_alpha_bar(t, x_t), self.sqrt_one_minus_alpha_bar(t, x_t)
        kind = self.config.parameterization
        if kind == "eps":
            eps = prediction
            x0 = (x_t - s * eps) / a
        elif kind == "x0":
            x0 = prediction
            eps = (x_t - a * x0) / s
        else:  # v
            x0 = a * x_t - s * prediction
            eps = s * x_t + a * prediction
        return eps, x0
