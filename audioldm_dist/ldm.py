"""The whole AudioLDM: conditioner → UNet over VAE latents → VAE decoder → HiFi-GAN (or Griffin-Lim).

`AudioLDM.loss(batch)` is the DDPM training objective on a loader batch; `AudioLDM.generate(texts)`
is DDIM with classifier-free guidance down to waveforms. What trains depends on train.target: `ldm`
(the default, AudioLDM's main stage) trains the UNet (`trainable_parameters`) with the VAE, vocoder
and conditioner frozen; `vae` (the original's first stage) trains the VAE instead, with its own loss
(`engine/objectives.py`), and leaves the UNet as it is. The VAE and vocoder are built frozen; the
trainer unfreezes the part it trains.

Conditioning in training follows the original recipe (`training_condition`), every draw from the
generator passed to `loss` (the trainer's, so exact resume replays them): CLAP's text/audio switch per
micro-batch, classifier-free dropout of whole batches (never on the first call: the original's dry run)
and, for CLAP, of single samples. Validation and generation encode the captions, with no dropout.
"""
from __future__ import annotations

import torch
from torch import nn

from audioldm_dist.config import Config
from audioldm_dist.data.melspec import MelFeatures
from audioldm_dist.diffusion.ddim import ddim_sample, ddim_timesteps
from audioldm_dist.diffusion.objective import diffusion_loss
from audioldm_dist.diffusion.schedule import NoiseSchedule
from audioldm_dist.models.conditioners import Condition, build_conditioner
from audioldm_dist.models.unet import UNetModel
from audioldm_dist.models.vae import AutoencoderKL, DiagonalGaussian
from audioldm_dist.models.griffinlim import GriffinLim
from audioldm_dist.models.vocoder import HiFiGAN


def latent_shape(config: Config) -> tuple[int, int, int]:
    """(C, frames/f, mels/f) of one crop's latent, from the config alone (no model is built)."""
    factor = AutoencoderKL.factor_for(config.vae)
    return config.vae.embed_dim, config.audio.num_frames // factor, config.audio.n_mel_channels // factor


class AudioLDM(nn.Module):
    def __init__(self, config: Config, *, captions: list[str] | None = None,
                 load_conditioner_weights: bool = True) -> None:
        """`load_conditioner_weights=False`: the conditioner's architecture only, for callers that fill it from
        a checkpoint and call `conditioner.load_weights()` only if the checkpoint lacked it."""
        super().__init__()
        self.config = config
        self.captions = captions
        self.unet = UNetModel(config.unet)
        self.vae = AutoencoderKL(config.vae)
        self.mel = MelFeatures(config.audio)
        self.vocoder = (GriffinLim(config.audio, mel_basis=self.mel.mel_basis, num_iters=config.vocoder.griffinlim_iters)
                        if config.vocoder.kind == "griffinlim" else HiFiGAN(config.vocoder))
        self.conditioner = build_conditioner(config.conditioner, captions=captions,
                                             load_weights=load_conditioner_weights)
        self.conditional_dry_run_finished = False
        """False until the first `loss` call, which never drops the condition (original: ddpm.py:1276-1277);
        the trainer sets it on resume so that a resumed run replays the uninterrupted one."""
        self.schedule = NoiseSchedule(config.diffusion)
        ddim_timesteps(config.diffusion.num_timesteps, config.diffusion.ddim_steps)  # a step count the original fails on: now
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
        return latent_shape(self.config)

    def batch_log_mel(self, batch: dict) -> torch.Tensor:
        device = next(self.vae.parameters()).device
        if "log_mel_spec" in batch:
            return batch["log_mel_spec"].to(device)
        return self.mel.batch(batch["waveform"].to(device))[0]

    def posterior(self, batch: dict) -> DiagonalGaussian:
        """q(z | x) of the batch: the stored posterior of encoded shards (`posterior`, (B, 2C, frames/f, mels/f)),
        else the VAE encoder on the batch's log-mel."""
        vae_dtype = next(self.vae.parameters()).dtype
        if "posterior" in batch:  # encode-shards ran the encoder already (data/encoded.py)
            return DiagonalGaussian(batch["posterior"].to(device=next(self.vae.parameters()).device, dtype=vae_dtype))
        return self.vae.encode(self.batch_log_mel(batch).to(vae_dtype).unsqueeze(1))

    @torch.no_grad()
    def latent_scale_from(self, batch: dict, *, seed: int = 0) -> float:
        """`scale_by_std` as the original: 1 / std of latents sampled from the posterior of a batch (the
        trainer uses the first batch); the sampling noise is seeded so every run agrees."""
        latents = self.posterior(batch).sample(torch.Generator(device="cpu").manual_seed(seed))
        return float(1.0 / latents.flatten().std().clamp_min(1e-8))

    @torch.no_grad()
    def latents(self, log_mel: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, frames, mels) log-mel → scaled latents (B, C, frames/f, mels/f)."""
        return self.batch_latents({"log_mel_spec": log_mel}, generator=generator)

    @torch.no_grad()
    def batch_latents(self, batch: dict, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """A batch → scaled latents z ~ q(z | x) · scale_factor (B, C, frames/f, mels/f), one `randn` of the
        generator whether the posterior was stored or computed (original: ddpm.py `get_first_stage_encoding`)."""
        return self.posterior(batch).sample(generator) * self.vae.scale_factor

    def condition(self, batch: dict, *, device: torch.device, mode: str = "text") -> Condition:
        """The conditioner's encoding of the batch's captions (`mode="text"`) or waveforms (`"audio"`, CLAP);
        encoded shards carry both (`text_embedding` [+ `text_mask`], `clap_audio`) and are not encoded again."""
        if mode == "audio":
            if "clap_audio" in batch:
                return Condition(film=batch["clap_audio"].to(device))
            return self.conditioner.encode_audio(batch["waveform"].to(device), sample_rate=self.config.audio.sampling_rate)
        if "text_embedding" in batch:
            return Condition.from_stored(batch["text_embedding"], batch.get("text_mask"), device=device)
        return self.conditioner.encode_text(list(batch["text"]), device=device)

    def training_embed_mode(self, *, generator: torch.Generator | None) -> str:
        """CLAP with embed_mode=mixed: text if a standard normal draw < 0.5 (P = Φ(0.5) ≈ 0.691), else audio,
        for the whole micro-batch (original: ddpm.py:656-683, `torch.randn(1).item() < 0.5`)."""
        settings = self.config.conditioner
        if settings.kind != "clap" or settings.embed_mode != "mixed":
            return "audio" if settings.embed_mode == "audio" else "text"
        device = None if generator is None else generator.device
        return "text" if float(torch.randn(1, generator=generator, device=device)) < 0.5 else "audio"

    def training_condition(self, batch: dict, *, mode: str, batch_size: int, device: torch.device,
                           generator: torch.Generator | None) -> Condition:
        """The original's two layers of classifier-free dropout on top of the `mode` encoding.

        Per batch (ddpm.py:1211-1215): unconditional with probability `ucg_rate`, except on the first call
        (dry run, ddpm.py:1276-1277); the uniform is drawn on every call so the generator stays in step.
        Per sample, only when the batch was not dropped (CLAP, conditional_models.py:1321-1324)."""
        dropped = self.conditioner.batch_dropped(generator=generator) and self.conditional_dry_run_finished
        self.conditional_dry_run_finished = True
        if dropped:  # original: every conditioner returns get_unconditional_condition(B) (ddpm.py:1172-1186)
            return self.conditioner.unconditional(device).repeat(batch_size)
        condition = self.condition(batch, device=device, mode=mode)
        return self.conditioner.drop_samples(condition, generator=generator)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, condition: Condition, *, unet: nn.Module | None = None
                ) -> torch.Tensor:
        return (unet or self.unet)(x_t, t, film=condition.film, contexts=condition.contexts, context_masks=condition.masks)

    def loss(self, batch: dict, *, generator: torch.Generator | None = None, unet: nn.Module | None = None,
             reduction: str = "mean", guidance_dropout: bool = True) -> torch.Tensor:
        """DDPM loss on a loader batch (uses `log_mel_spec` if the loader computed it, else the waveform).

        `guidance_dropout=True` is training: the conditioning recipe of `training_condition`. `unet`
        replaces `self.unet` in the forward pass (the DeepSpeed engine that wraps it); validation turns `guidance_dropout` off and asks for per-sample losses (`reduction="none"`)."""
        device = next(self.unet.parameters()).device
        mode = self.training_embed_mode(generator=generator) if guidance_dropout else "text"
        x0 = self.batch_latents(batch, generator=generator)
        if guidance_dropout:
            condition = self.training_condition(batch, mode=mode, batch_size=x0.shape[0], device=device,
                                                generator=generator)
        else:  # validation: the captions, no dropout (the original keeps its per-sample 10% here too)
            condition = self.condition(batch, device=device)
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
