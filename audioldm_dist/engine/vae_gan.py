"""VAE training (train.target=vae) under DeepSpeed: the generator (VAE) and the patch discriminator.

Design: two DeepSpeed engines, each with its own optimizer built from the same DeepSpeed JSON (the
original has two Adam optimizers with the same lr and betas, `autoencoder.py:471-493`): the trainer's
engine wraps the VAE, a second one wraps the discriminator. One engine with both parameter groups
cannot do what the original does per batch: step the discriminator first, then compute the generator's
adversarial term with the *updated* discriminator and step the VAE (`autoencoder.py:307-386`). Two
engines also keep each optimizer's state, gradient clipping and loss scaling separate.

Per micro-batch: VAE forward once (posterior sampled with the trainer's generator) → discriminator
loss on detached x, x̂ → its backward/step → LPIPS (dropout on) and the generator loss, where D(x̂) runs
with the discriminator's parameters detached (`torch.func.functional_call`), so the generator's
backward never writes gradients into the discriminator engine (the original leaves them there and
clears them with `zero_grad`; DeepSpeed's ZeRO hooks would accumulate them into the next step) → VAE
backward/step. The adaptive weight's last-layer gradients are taken without a backward through the
engine's outputs (DeepSpeed would run its gradient reduction for it): see `objectives.generator_loss`. The loss arithmetic is in `objectives.py`; this module only drives the engines.

`vae.disc_start` counts our steps (optimizer steps of the VAE engine; batches without accumulation).
Checkpoints: the discriminator engine saves into `global_stepN/discriminator/` inside the VAE's tag,
before `meta.json` and `latest` are written, so a complete checkpoint always holds both. Limits (each a
`ValueError` at start-up): ZeRO stage 3 (the adaptive weight needs the decoder's last-layer gradient
and the discriminator's parameters whole) and resuming on another world size (the discriminator
checkpoint is not converted to a universal one).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist

from audioldm_dist.config import Config
from audioldm_dist.engine.distributed import collective_device
from audioldm_dist.models.discriminator import NLayerDiscriminator
from audioldm_dist.engine.objectives import discriminator_loss, disc_factor, generator_loss

log = logging.getLogger(__name__)

DISCRIMINATOR_TAG = "discriminator"
"""Folder of the discriminator engine's files inside a checkpoint's tag folder."""
METRICS = ("rec_loss", "p_loss", "nll_loss", "kl_loss", "g_loss", "d_weight", "disc_factor", "disc_loss",
           "logits_real", "logits_fake")
"""Loss terms averaged over micro-batches and ranks into each metrics.jsonl record."""


def check_vae_ds_config(ds: dict) -> None:
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage == 3:
        raise ValueError("train.target=vae supports ZeRO stages 0-2 (the adaptive GAN weight needs the decoder's "
                         "last-layer gradient and whole discriminator weights); use configs/ds/vae.json or zero2.json")


class VAEGAN:
    """The discriminator engine, the LPIPS network and one training micro-step of the original's VAE loss."""

    def __init__(self, *, model, vae_engine, disc_engine, lpips: torch.nn.Module, config: Config) -> None:
        self.model = model
        self.vae_engine = vae_engine
        self.disc_engine = disc_engine
        self.lpips = lpips
        self.config = config.vae
        self._dtype = next(disc_engine.module.parameters()).dtype
        self._last_layer_input: dict[str, torch.Tensor] = {}
        vae_engine.module.decoder.conv_out.register_forward_hook(
            lambda module, inputs, output: self._last_layer_input.update(x=inputs[0].detach()))

    def _discriminate(self, x: torch.Tensor) -> torch.Tensor:
        return self.disc_engine(x.to(self._dtype))

    def _discriminate_frozen(self, x: torch.Tensor) -> torch.Tensor:
        """D(x) with gradients to x only; BatchNorm's running statistics update as in any training forward."""
        module = self.disc_engine.module
        params = {name: p.detach() for name, p in module.named_parameters()}
        return torch.func.functional_call(module, params, (x.to(self._dtype),))

    def micro_step(self, batch: dict, *, generator: torch.Generator, step: int) -> dict[str, torch.Tensor]:
        """Discriminator backward/step, then generator backward/step; `step`: completed steps before this one."""
        mel = self.model.batch_log_mel(batch).unsqueeze(1)  # (B, 1, frames, mels)
        reconstruction, posterior = self.vae_engine(mel, generator=generator)
        factor = disc_factor(step, disc_start=self.config.disc_start)
        d_loss, d_terms = discriminator_loss(self._discriminate, mel, reconstruction, factor=factor)
        self.disc_engine.backward(d_loss)
        self.disc_engine.step()
        self.lpips.train()  # NetLinLayer dropout active, as under the original's Lightning .train()
        # The dropout masks come from a seed drawn from the trainer's (checkpointed) generator, not from the
        # global RNG that the loader also draws from at start-up: resumed runs see the same masks.
        seed = int(torch.randint(0, 2**62, (), generator=generator))
        with torch.random.fork_rng(devices=[mel.device] if mel.device.type == "cuda" else []):
            torch.manual_seed(seed)
            surrogate, g_terms = generator_loss(
                mel, reconstruction, posterior, discriminator=self._discriminate_frozen, lpips=self.lpips,
                last_layer=self.vae_engine.module.decoder.conv_out, last_layer_input=self._last_layer_input["x"],
                perceptual_weight=self.config.perceptual_weight, kl_weight=self.config.kl_weight,
                disc_weight=self.config.disc_weight, factor=factor)
        self.vae_engine.backward(surrogate)
        self.vae_engine.step()
        return {**g_terms, **d_terms}

    def save(self, tag_dir: Path) -> None:
        self.disc_engine.save_checkpoint(str(tag_dir), tag=DISCRIMINATOR_TAG, save_latest=False)

    def load(self, tag_dir: Path) -> None:
        if not (tag_dir / DISCRIMINATOR_TAG).is_dir():
            raise ValueError(f"{tag_dir}: no {DISCRIMINATOR_TAG}/ folder; not a train.target=vae checkpoint")
        self.disc_engine.load_checkpoint(str(tag_dir), tag=DISCRIMINATOR_TAG, load_module_strict=True)


def build_vae_gan(model, *, vae_engine, ds: dict, config: Config, device: torch.device, lpips) -> VAEGAN:
    """The discriminator (seeded, as the trainer seeds every rank alike) in its own engine, from a copy of `ds`."""
    import copy

    import deepspeed

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed + 1)
        discriminator = NLayerDiscriminator(input_nc=config.vae.in_channels, ndf=64, n_layers=3).to(device)
    disc_engine, _, _, _ = deepspeed.initialize(model=discriminator, model_parameters=list(discriminator.parameters()),
                                                config=copy.deepcopy(ds))
    return VAEGAN(model=model, vae_engine=vae_engine, disc_engine=disc_engine, lpips=lpips.to(device), config=config)


def mean_metrics(records: list[dict[str, torch.Tensor]], *, world_size: int) -> dict[str, float]:
    """Each term's mean over the step's micro-batches and all ranks (one all-reduce)."""
    values = torch.stack([torch.stack([r[name].float() for name in METRICS]) for r in records]).mean(0)
    if dist.is_initialized():
        values = values.to(collective_device())
        dist.all_reduce(values)
        values /= world_size
    return dict(zip(METRICS, values.tolist()))
