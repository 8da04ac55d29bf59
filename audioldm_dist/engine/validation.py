"""Validation during training: the loss on the val shards, and DDIM samples for fixed val captions.

Loss: every rank reads its share of the val split once (an evaluation-mode stream: padding marked
`valid`, so every sample counts exactly once), with one fixed noise seed, so the numbers compare
across steps; sums are all-reduced. Every rank takes part because under ZeRO-3 each forward gathers
parameters from all of them. The training RNGs are not touched, so resumed runs stay exact.

Samples: rank 0 generates for the first `train.val_num_samples` val items with the EMA weights (a
plain UNet copy, so ZeRO-3's partitioning does not matter) and writes `RUN_DIR/val_stepNNNNNNN/KEY.wav`,
`KEY.png` (its log-mel in colour, axes in s and Hz, the caption as title; `plots.py`) and `KEY.json`
(caption, step: the sidecar `infer` writes too). The real clips,
cropped and resampled as the model hears them, go once to `RUN_DIR/val_reference/KEY.wav`, so
`python -m audioldm_dist.eval --log_path RUN_DIR` compares every validation folder with them.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import soundfile
import torch
import torch.distributed as dist

from audioldm_dist.config import Config
from audioldm_dist.data.sources import ShardInfo
from audioldm_dist.data.stream import ShardStream, StreamOptions, make_loader
from audioldm_dist.diffusion.ema import EMA
from audioldm_dist.engine.distributed import collective_device
from audioldm_dist.engine.objectives import Objective
from audioldm_dist.plots import spectrogram_png
from audioldm_dist.prompts import safe_name, unique_name

log = logging.getLogger(__name__)

VAL_SEED = 1234
REFERENCE_DIR = "val_reference"


def val_dir(run_dir: Path, step: int) -> Path:
    return run_dir / f"val_step{step:07d}"


@dataclass(frozen=True, kw_only=True)
class ValPrompt:
    key: str
    caption: str


class Validator:
    """Owns the val shards, the fixed prompts and (rank 0) the EMA UNet copy used for sampling."""

    def __init__(self, shards: list[ShardInfo], *, config: Config, objective: Objective, rank: int, world_size: int,
                 run_dir: Path, encoding: dict | None = None) -> None:
        """`encoding`: the model's fingerprints when the val shards are encoded (encode-shards); None for audio."""
        self.shards = shards
        self.encoding = encoding
        self.config = config
        self.objective = objective
        self.rank = rank
        self.world_size = world_size
        self.run_dir = run_dir
        self._sampling_unet = None
        self.prompts: list[ValPrompt] = []
        if config.train.target != "ldm" and config.train.val_num_samples > 0:
            log.warning("train.target=%s: validation computes the loss only (samples are for the ldm target)",
                        config.train.target)
        elif rank == 0 and config.train.val_num_samples > 0:
            self.prompts = self._write_reference(config.train.val_num_samples)

    def _stream(self, *, rank: int, world_size: int) -> ShardStream:
        return ShardStream(self.shards, audio=self.config.audio, options=StreamOptions(
            batch_size=self.config.train.micro_batch_size, rank=rank, world_size=world_size, num_workers=0,
            seed=VAL_SEED, shuffle=False, drop_last=False, max_epochs=1, allow_shard_sharing=True,
            max_failed_fraction=self.config.data.max_failed_fraction, encoding=self.encoding))

    def _write_reference(self, count: int) -> list[ValPrompt]:
        """The first `count` val samples: their captions become the fixed prompts, their audio the reference."""
        out = self.run_dir / REFERENCE_DIR
        out.mkdir(parents=True, exist_ok=True)
        prompts: list[ValPrompt] = []
        for batch in make_loader(self._stream(rank=0, world_size=1)):
            for index in range(len(batch["key"])):
                if not bool(batch["valid"][index]) or len(prompts) == count:
                    continue
                key, caption = _file_stem(batch["fname"][index], batch["key"][index], used=prompts), batch["text"][index]
                if "waveform" in batch:  # encoded val shards carry no audio: prompts only
                    soundfile.write(str(out / f"{key}.wav"), batch["waveform"][index, 0].numpy(),
                                    self.config.audio.sampling_rate)
                (out / f"{key}.json").write_text(json.dumps({"caption": caption, "key": key}, indent=1))
                prompts.append(ValPrompt(key=key, caption=caption))
            if len(prompts) == count:
                break
        return prompts

    @torch.no_grad()
    def loss(self, engine) -> float:
        """Mean per-sample loss over the val split (or `val_batches` batches per rank), all ranks."""
        generator = torch.Generator().manual_seed(VAL_SEED + self.rank)
        total = torch.zeros(2, dtype=torch.float64)
        was_training = engine.module.training
        engine.module.eval()
        try:
            for number, batch in enumerate(make_loader(self._stream(rank=self.rank, world_size=self.world_size))):
                if self.config.train.val_batches and number == self.config.train.val_batches:
                    break
                losses = self.objective(batch, generator=generator, network=engine, evaluation=True)
                valid = batch["valid"].to(losses.device)
                total += torch.stack([(losses * valid).sum(), valid.sum()]).double().cpu()
        finally:
            engine.module.train(was_training)
        if dist.is_initialized():
            total = total.to(collective_device())
            dist.all_reduce(total)
        return float(total[0] / total[1].clamp_min(1))

    @torch.no_grad()
    def write_samples(self, model, ema: EMA, *, step: int) -> list[Path]:
        """Rank 0: DDIM samples of the fixed prompts with the EMA weights; returns the wav paths."""
        if self.rank != 0 or not self.prompts:
            return []
        from audioldm_dist.models.unet import UNetModel

        device = model.vae.scale_factor.device
        if self._sampling_unet is None:
            self._sampling_unet = UNetModel(self.config.unet).to(device).eval()
        ema.copy_to(self._sampling_unet)
        generator = torch.Generator().manual_seed(VAL_SEED)
        waveforms = model.generate([p.caption for p in self.prompts], generator=generator, unet=self._sampling_unet)
        out = val_dir(self.run_dir, step)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for prompt, waveform in zip(self.prompts, waveforms):
            audio = waveform[0].float().cpu()
            soundfile.write(str(out / f"{prompt.key}.wav"), audio.numpy(), self.config.audio.sampling_rate)
            log_mel = model.mel.batch(audio.view(1, 1, -1).to(device))[0][0].cpu()  # (frames, mels)
            spectrogram_png(log_mel, audio=self.config.audio, mel_basis=model.mel.mel_basis, title=prompt.caption,
                            path=out / f"{prompt.key}.png")
            (out / f"{prompt.key}.json").write_text(json.dumps(
                {"caption": prompt.caption, "key": prompt.key, "step": step, "ema": True,
                 "ddim_steps": self.config.diffusion.ddim_steps,
                 "guidance_scale": self.config.diffusion.guidance_scale}, indent=1))
            paths.append(out / f"{prompt.key}.wav")
        return paths


def _file_stem(fname: str, key: str, *, used: list[ValPrompt]) -> str:
    """The source file's stem (what `eval` pairs by), made safe and unique."""
    return unique_name(safe_name(Path(fname).stem if fname else key), {prompt.key for prompt in used})
