"""The whole AudioLDM: conditioner → UNet over VAE latents → VAE decoder → HiFi-GAN.

`AudioLDM.loss(batch)` is the DDPM training objective on a loader batch; `AudioLDM.generate(texts)`
is DDIM with classifier-free guidance down to waveforms. Only the UNet is trainable: the VAE,
vocoder and conditioner are frozen and kept out of the optimizer (`trainable_parameters`).
"""
from __future__ import annotations

import torch
from torch import nn

from audioldm_dist.config import Config
from audioldm_dist.data.features import MelFeatures
from audioldm_dist.diffusion.ddim import ddim_sample
from audioldm_dist.diffusion.objective import diffusion_loss
from audioldm_dist.diffusion.schedule import NoiseSchedule
from audioldm_dist.models.conditioners import Condition, build_conditioner
from audioldm_dist.models.unet import UNetModel
from audioldm_dist.models.vae import AutoencoderKL
from audioldm_dist.models.vocoder import HiFiGAN


class AudioLDM(nn.Module):
    def __init__(self, config: Config, *, captions: list[str] | None = None) -> None:
        super().__init__()
        self.config = config
        self.captions = captions
        self.unet = UNetModel(config.unet)
        self.vae = AutoencoderKL(config.vae)
        self.vocoder = HiFiGAN(config.vocoder)
        self.conditioner = build_conditioner(config.conditioner, captions=captions)
        self.schedule = NoiseSchedule(config.diffusion)
        self.mel = MelFeatures(config.audio)
        for frozen in (self.vae, self.vocoder):
            frozen.requires_grad_(False)
            frozen.eval()
        film_dim = config.unet.film_dim
        if film_dim and getattr(self.conditioner, "embedding_dim", film_dim) != film_dim:
            raise ValueError(f"unet.film_dim={film_dim} but the conditioner embeds to "
                             f"{self.conditioner.embedding_dim}")

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> "AudioLDM":
        super().train(mode)
        self.vae.eval()
        self.vocoder.eval()
        return self

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        factor = self.vae.downsampling_factor
        return (self.config.vae.embed_dim, self.config.audio.num_frames // factor,
                self.config.audio.n_mel_channels // factor)

    def batch_log_mel(self, batch: dict) -> torch.Tensor:
        device = next(self.vae.parameters()).device
        if "log_mel_spec" in batch:
            return batch["log_mel_spec"].to(device)
        return self.mel.batch(batch["waveform"].to(device))[0]

    @torch.no_grad()
    def latent_scale_from(self, batch: dict, *, seed: int = 0) -> float:
        """`scale_by_std` as the original: 1 / std of latents sampled from the posterior of a batch (the
        trainer uses the first batch); the sampling noise is seeded so every run agrees."""
        posterior = self.vae.encode(self.batch_log_mel(batch).unsqueeze(1))
        latents = posterior.sample(torch.Generator(device="cpu").manual_seed(seed))
        return float(1.0 / latents.flatten().std().clamp_min(1e-8))

    @torch.no_grad()
    def latents(self, log_mel: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, frames, mels) log-mel → scaled latents (B, C, frames/f, mels/f)."""
        z = self.vae.encode(log_mel.unsqueeze(1)).sample(generator)
        return z * self.vae.scale_factor

    def condition(self, batch: dict, *, device: torch.device) -> Condition:
        if self.config.conditioner.embed_mode == "audio":
            return self.conditioner.encode_audio(batch["waveform"].to(device),
                                                 sample_rate=self.config.audio.sampling_rate)
        return self.conditioner.encode_text(list(batch["text"]), device=device)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, condition: Condition, *, unet: nn.Module | None = None
                ) -> torch.Tensor:
        return (unet or self.unet)(x_t, t, film=condition.film, contexts=condition.contexts, context_masks=condition.masks)

    def loss(self, batch: dict, *, generator: torch.Generator | None = None, unet: nn.Module | None = None,
             reduction: str = "mean", guidance_dropout: bool = True) -> torch.Tensor:
        """DDPM loss on a loader batch (uses `log_mel_spec` if the loader computed it, else the waveform).

        `unet` replaces `self.unet` in the forward pass (the DeepSpeed engine that wraps it); validation
        turns `guidance_dropout` off and asks for per-sample losses (`reduction="none"`)."""
        device = next(self.unet.parameters()).device
        log_mel = self.batch_log_mel(batch)
        x0 = self.latents(log_mel.to(next(self.vae.parameters()).dtype), generator=generator)
        condition = self.condition(batch, device=device)
        if guidance_dropout:
            condition = self.conditioner.drop_for_guidance(condition, batch_size=x0.shape[0], device=device,
                                                           generator=generator)
        network = unet or self.unet
        unet_dtype = next(self.unet.parameters()).dtype

        def denoiser(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return network(x_t.to(unet_dtype), t, film=None if condition.film is None else condition.film.to(unet_dtype),
                           contexts=None if condition.contexts is None else [c.to(unet_dtype) for c in condition.contexts],
                           context_masks=condition.masks)

        return diffusion_loss(denoiser, x0, schedule=self.schedule, generator=generator, reduction=reduction)

    @torch.no_grad()
    def generate(self, texts: list[str], *, num_steps: int | None = None, guidance_scale: float | None = None,
                 generator: torch.Generator | None = None, show_progress: bool = False,
                 unet: nn.Module | None = None) -> torch.Tensor:
        """Captions → waveforms (B, 1, samples) at the configured rate and duration; `unet` replaces
        `self.unet` (validation samples with EMA weights while training goes on)."""
        unet = unet or self.unet
        device = next(unet.parameters()).device
        dtype = next(unet.parameters()).dtype
        diffusion = self.config.diffusion
        condition = self.conditioner.encode_text(texts, device=device)
        unconditional = self.conditioner.unconditional(device).repeat(len(texts))

        def denoiser(x_t: torch.Tensor, t: torch.Tensor, conditional: bool) -> torch.Tensor:
            return self.denoise(x_t, t, condition if conditional else unconditional, unet=unet)

        z = ddim_sample(denoiser, (len(texts), *self.latent_shape), schedule=self.schedule,
                        num_steps=num_steps or diffusion.ddim_steps,
                        guidance_scale=diffusion.guidance_scale if guidance_scale is None else guidance_scale,
                        eta=diffusion.ddim_eta, generator=generator, device=device, dtype=dtype, show_progress=show_progress)
        mel = self.vae.decode(z.to(next(self.vae.parameters()).dtype) / self.vae.scale_factor)  # (B, 1, frames, mels)
        waveform = self.vocoder(mel.squeeze(1).transpose(1, 2).float())
        return waveform[..., : self.config.audio.num_samples]
