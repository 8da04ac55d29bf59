"""Typed experiment configuration: one dataclass per section, loaded from YAML with `--set` overrides.

Sections: `audio`, `data`, `unet`, `vae`, `vocoder`, `conditioner`, `diffusion`, `train` (`Config`), each field
documented where it is declared. Unknown keys are a `ValueError` that names the key and the allowed ones,
so a typo fails at start-up instead of hours into a run; `to_dict`/`from_dict` round-trip a config through
the run's config.json and its checkpoints.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass(kw_only=True)
class AudioConfig:
    """How a clip becomes the waveform the model sees (the original `preprocessing.audio/stft/mel`)."""

    sampling_rate: int = 16000
    """Target sample rate in Hz; shards are written at this rate."""
    duration: float = 10.24
    """Length of the training crop in seconds."""
    filter_length: int = 1024
    """STFT n_fft."""
    hop_length: int = 160
    win_length: int = 1024
    n_mel_channels: int = 64
    mel_fmin: float = 0.0
    mel_fmax: float = 8000.0

    def __post_init__(self) -> None:
        if self.sampling_rate <= 0:
            raise ValueError(f"audio.sampling_rate must be positive, got {self.sampling_rate}")
        if self.duration <= 0:
            raise ValueError(f"audio.duration must be positive, got {self.duration}")
        if self.mel_fmax > self.sampling_rate / 2:
            raise ValueError(
                f"audio.mel_fmax={self.mel_fmax} is above the Nyquist frequency {self.sampling_rate / 2}"
            )

    @property
    def num_samples(self) -> int:
        """Samples in one crop at the target rate (163,840 for 10.24 s at 16 kHz)."""
        return int(self.sampling_rate * self.duration)

    @property
    def num_frames(self) -> int:
        """Spectrogram frames in one crop (1024 for 10.24 s at hop 160)."""
        return int(self.num_samples / self.hop_length)


@dataclass(kw_only=True)
class DataConfig:
    """Every setting of the streaming loader (`audioldm_dist/data/stream.py`); `train.py --train-data /
    --val-data` set `train` / `val`. Shards are made with `make-shards` from the original's
    `metadata_root` / dataset names."""

    train: list[str] = field(default_factory=list)
    """Training shards: make-shards folders, brace patterns of tars (SPEC::sizes=PATH, SPEC::weight=W)."""
    val: list[str] = field(default_factory=list)
    """Validation shards (as `train`); empty: no validation."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0: read in the training process)."""
    shuffle_buffer: int = 256
    """Samples in each consumer's shuffle buffer (0: no sample shuffling; shards are still permuted)."""
    features_in_loader: bool | None = None
    """STFT and log-mel in the loader workers (true) or on the trainer's device (false); null: on the trainer
    when it is a GPU, else in the loader."""
    max_failed_fraction: float = 0.05
    """Undecodable samples are skipped and counted; above this fraction of an epoch the run stops."""
    allow_shard_sharing: bool = False
    """Allow fewer shards than ranks × workers: consumers then share shards (each reads past the others' part)."""


@dataclass(kw_only=True)
class UNetConfig:
    """The latent diffusion UNet (the original `openaimodel` layout). Defaults: AudioLDM-S."""

    in_channels: int = 8
    out_channels: int = 8
    model_channels: int = 128
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 3, 5])
    num_res_blocks: int = 2
    attention_resolutions: list[int] = field(default_factory=lambda: [8, 4, 2])
    """Downsampling factors at which the levels get spatial transformers."""
    num_head_channels: int = 32
    transformer_depth: int = 1
    film_dim: int = 512
    """Width of the global condition (CLAP embedding) concatenated to the time embedding; 0 for none."""
    context_dims: list[int] = field(default_factory=list)
    """One cross-attention transformer per entry after the self-attention one (FLAN-T5 variant: [1024])."""
    dropout: float = 0.0
    gradient_checkpointing: bool = False
    attention_backend: str = "auto"
    """auto | xformers | sdpa | math (env AUDIOLDM_ATTENTION overrides)."""

    def __post_init__(self) -> None:
        if self.model_channels % 32 != 0:
            raise ValueError(f"unet.model_channels={self.model_channels} must be a multiple of 32 (GroupNorm(32))")
        if self.film_dim == 0 and not self.context_dims:
            raise ValueError("unet: no conditioning at all; set film_dim (CLAP) or context_dims (cross-attention)")


@dataclass(kw_only=True)
class VAEConfig:
    """The mel-spectrogram AutoencoderKL (`first_stage_model`). Defaults: the released 16 kHz, 64-mel VAE."""

    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 4])
    num_res_blocks: int = 2
    z_channels: int = 8
    embed_dim: int = 8
    in_channels: int = 1
    out_ch: int = 1
    double_z: bool = True
    scale_factor: float = 1.0
    """Latent scale; with `scale_by_std` the trainer sets it to 1/std of the first batch's latents."""
    scale_by_std: bool = True
    # VAE training (train.target=vae): the original's LPIPSWithDiscriminator (engine/objectives.py), defaults 16k_64.yaml.
    kl_weight: float = 1000.0
    """Weight of the KL term, the mean over latent elements and batch (the original's `kl_weight`)."""
    perceptual_weight: float = 1.0
    """Weight of LPIPS(x, x̂) added to every element of the L1 reconstruction (summed over C, T, F)."""
    disc_weight: float = 0.5
    """Scales the adaptive weight of the generator's adversarial term (the original's `disc_weight`)."""
    disc_start: int = 25000
    """Training steps (optimizer steps = batches without accumulation) before the discriminator and the
    adversarial term start. The original's `disc_start: 50001` counts Lightning's global_step, which
    advances twice per batch (two optimizers): ours = original // 2 (`original_config` converts it)."""
    reload_from_ckpt: str = ""
    """The first stage's weights, as the original's `first_stage_config.params.reload_from_ckpt`: a VAE run's
    export (`train.target=vae`, then `python -m audioldm_dist.export`) or any AudioLDM checkpoint; only its
    `first_stage_model.*` (the VAE) is read, before `--reload_from_ckpt`. The two-stage recipe of the demo."""
    lpips_weights: str = ""
    """The LPIPS VGG16 weights file (`python -m audioldm_dist.models.lpips` writes it); needed for target=vae."""
    lpips_random_init: bool = False
    """Random LPIPS weights instead of `lpips_weights` (tests, demo; logged as a warning)."""

    def __post_init__(self) -> None:
        for name in ("kl_weight", "perceptual_weight", "disc_weight", "disc_start"):
            if getattr(self, name) < 0:
                raise ValueError(f"vae.{name} must be non-negative, got {getattr(self, name)}")
        if self.lpips_weights and self.lpips_random_init:
            raise ValueError(f"vae.lpips_weights={self.lpips_weights!r} and vae.lpips_random_init=true: choose one")


@dataclass(kw_only=True)
class VocoderConfig:
    """Mel → waveform: HiFi-GAN (the released 16 kHz, 64-mel generator) or Griffin-Lim (no weights)."""

    kind: str = "hifigan"
    """hifigan (the original; needs released or trained weights) | griffinlim (inverse mel + Griffin-Lim phase
    recovery over our exact STFT: audible output from a model trained without vocoder weights, e.g. the demo).
    The fields below up to num_mels are HiFi-GAN's."""
    griffinlim_iters: int = 32
    """Griffin-Lim iterations (kind=griffinlim)."""

    upsample_rates: list[int] = field(default_factory=lambda: [5, 4, 2, 2, 2])
    upsample_kernel_sizes: list[int] = field(default_factory=lambda: [16, 16, 8, 4, 4])
    upsample_initial_channel: int = 1024
    resblock_kernel_sizes: list[int] = field(default_factory=lambda: [3, 7, 11])
    resblock_dilation_sizes: list[list[int]] = field(default_factory=lambda: [[1, 3, 5], [1, 3, 5], [1, 3, 5]])
    num_mels: int = 64

    def __post_init__(self) -> None:
        if self.kind not in ("hifigan", "griffinlim"):
            raise ValueError(f"vocoder.kind={self.kind!r}: expected hifigan or griffinlim")
        if self.griffinlim_iters < 1:
            raise ValueError(f"vocoder.griffinlim_iters must be at least 1, got {self.griffinlim_iters}")


@dataclass(kw_only=True)
class ConditionerConfig:
    """The frozen encoder that conditions the UNet: the original's CLAP (FiLM) or FLAN-T5 (cross-attention)."""

    kind: str = "clap"
    """clap (the original laion CLAP as transformers' ClapModel) | t5 (a T5 encoder)."""
    pretrained: str = ""
    """Where the weights come from: a hub name or local save_pretrained folder (from_pretrained), or for
    kind=clap a laion_clap .pt (e.g. data/checkpoints/clap_htsat_tiny.pt, converted on load). Empty: from
    the checkpoint given to --reload_from_ckpt / infer --ckpt. Not read when that checkpoint has them."""
    amodel: str = "HTSAT-tiny"
    """CLAP audio tower for a .pt or empty `pretrained`: HTSAT-tiny (AudioLDM-S) | HTSAT-base (AudioLDM-M)."""
    tokenizer: str = ""
    """Hub name or local folder of the text tokenizer, loaded on the first encode. Empty: `pretrained` when
    that is a transformers model (hub name or folder), else roberta-base for CLAP."""
    random_init: bool = False
    """Build from `tiny` config values with random weights instead of loading (tests, demo, offline)."""
    tiny: dict = field(default_factory=dict)
    """Overrides for random_init: T5Config fields; for CLAP `projection_dim`, `text` and `audio` sub-configs;
    `seed` of the random weights."""
    embed_mode: str = "mixed"
    """CLAP in training: mixed (the original: each micro-batch uses text with probability Φ(0.5) ≈ 0.691,
    else the audio embedding of its waveform) | text | audio. Validation and generation use text."""
    ucg_rate: float = 0.1
    """Classifier-free dropout per micro-batch: the whole batch becomes unconditional with this probability
    (never on the model's first call, as the original's dry run)."""
    ucg_sample_rate: float = 0.1
    """CLAP only: in training, each sample of a conditional batch is also made unconditional with this
    probability (the original's CLAP conditioner, 0.1)."""
    max_length: int = 128
    """Tokenizer padding/truncation length (the original: 512 for CLAP's RoBERTa, 128 for FLAN-T5)."""

    def __post_init__(self) -> None:
        if self.kind not in ("clap", "t5"):
            raise ValueError(f"conditioner.kind={self.kind!r}: expected clap or t5 (a laion_clap .pt is "
                             "conditioner.pretrained of kind=clap)")
        if self.embed_mode not in ("mixed", "text", "audio"):
            raise ValueError(f"conditioner.embed_mode={self.embed_mode!r}: expected mixed, text or audio")
        if self.amodel not in ("HTSAT-tiny", "HTSAT-base"):
            raise ValueError(f"conditioner.amodel={self.amodel!r}: expected HTSAT-tiny or HTSAT-base")
        for name in ("ucg_rate", "ucg_sample_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"conditioner.{name}={getattr(self, name)}: expected a probability in [0, 1]")
        if self.kind == "t5" and self.embed_mode == "audio":
            raise ValueError("conditioner.embed_mode=audio needs kind=clap (T5 encodes text only)")


@dataclass(kw_only=True)
class DiffusionConfig:
    """DDPM training and DDIM sampling (the original linear schedule in sqrt space)."""

    num_timesteps: int = 1000
    linear_start: float = 0.0015
    linear_end: float = 0.0195
    parameterization: str = "eps"
    """eps | v | x0."""
    ddim_steps: int = 200
    """DDIM steps for validation samples and inference (at most num_timesteps / 2, as the original's rule)."""
    ddim_eta: float = 1.0
    """DDIM η: 1.0 is the original's generation default (ddpm.py `generate_sample(ddim_eta=1.0)`); 0 is deterministic."""
    guidance_scale: float = 3.5
    ema_decay: float = 0.9999

    def __post_init__(self) -> None:
        if self.parameterization not in ("eps", "v", "x0"):
            raise ValueError(f"diffusion.parameterization={self.parameterization!r}: expected eps, v or x0")
        if not 1 <= self.ddim_steps <= self.num_timesteps // 2:
            raise ValueError(f"diffusion.ddim_steps={self.ddim_steps}: expected 1 to {self.num_timesteps // 2} "
                             f"(the original's DDIM rule indexes past the schedule above num_timesteps / 2; "
                             f"diffusion/ddim.py `ddim_timesteps` names the other step counts it refuses)")
        if self.ddim_eta < 0:
            raise ValueError(f"diffusion.ddim_eta={self.ddim_eta} must be >= 0")


@dataclass(kw_only=True)
class TrainConfig:
    """The training loop; batch and schedule values must agree with the DeepSpeed JSON (checked)."""

    micro_batch_size: int = 2
    """Samples per rank per forward (DeepSpeed's train_micro_batch_size_per_gpu)."""
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    warmup_steps: int = 2000
    max_steps: int = 1000
    save_every: int = 500
    keep_last: int = 3
    log_every: int = 1
    seed: int = 0
    logger: str = "wandb"
    """wandb (offline unless WANDB_MODE says otherwise) | none; metrics.jsonl is always written."""
    target: str = "ldm"
    """What trains: ldm (the UNet; VAE, conditioner, vocoder frozen) | vae (the autoencoder alone)."""
    val_every: int = 500
    """Validate every this many steps (and at the last step)."""
    val_batches: int = 0
    """Batches per rank for the validation loss; 0: the whole val split, each sample once."""
    val_num_samples: int = 4
    """DDIM samples per validation, for the first val captions (wav + spectrogram PNG); 0: none."""
    hang_timeout: float = 0.0
    """Seconds without a completed training step before the watchdog dumps every rank's stack and ends the job
    (exit 3); 0: max(600, 20 × the median step time)."""
    hang_timeout_long: float = 1800.0
    """The allowance for start-up, validation and checkpoints, and the process group's collective timeout."""
    stop_on_low_disk: bool = False
    """Before each save, free space below the last checkpoint's size warns; with this, the run stops instead
    (exit 1, `latest` kept) before writing a checkpoint that cannot fit."""

    def __post_init__(self) -> None:
        if self.target not in ("ldm", "vae"):
            raise ValueError(f"train.target={self.target!r}: expected ldm or vae")
        if self.logger not in ("wandb", "none"):
            raise ValueError(f"train.logger={self.logger!r}: expected wandb or none")
        for name in ("micro_batch_size", "gradient_accumulation_steps", "max_steps", "save_every", "log_every",
                     "val_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        if self.hang_timeout < 0 or self.hang_timeout_long <= 0:
            raise ValueError(f"train.hang_timeout must be >= 0 and train.hang_timeout_long > 0, got "
                             f"{self.hang_timeout} and {self.hang_timeout_long}")


@dataclass(kw_only=True)
class Config:
    """The whole experiment."""

    audio: AudioConfig = field(default_factory=AudioConfig)
    data: DataConfig = field(default_factory=DataConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    vocoder: VocoderConfig = field(default_factory=VocoderConfig)
    conditioner: ConditionerConfig = field(default_factory=ConditionerConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.train.target == "vae" and not (self.vae.lpips_weights or self.vae.lpips_random_init):
            raise ValueError("train.target=vae needs vae.lpips_weights (the LPIPS VGG16 weights file; "
                             "`python -m audioldm_dist.models.lpips` makes it) or vae.lpips_random_init=true")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Reads a YAML file (or the defaults when `path` is None) and applies `key.sub=value` overrides."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text())
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping at the top level, found {type(loaded).__name__}")
        raw = loaded
        source = str(path)
    for override in overrides:
        _apply_override(raw, override)
    return from_dict(Config, raw, where=source)


def _apply_override(raw: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ValueError(f"override {override!r}: expected KEY=VALUE, e.g. audio.duration=5.12")
    dotted, value_text = override.split("=", 1)
    keys = dotted.strip().split(".")
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {override!r}: {key!r} is not a section")
    node[keys[-1]] = yaml.safe_load(value_text)


def from_dict(cls: type, raw: dict[str, Any], *, where: str) -> Any:
    """Builds dataclass `cls` from `raw`, checking every key and coercing YAML scalars to field types."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping for {cls.__name__}, found {raw!r}")
    hints = typing.get_type_hints(cls)
    allowed = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in allowed:
            raise ValueError(
                f"{where}: unknown key {key!r} in {cls.__name__}; allowed: {', '.join(sorted(allowed))}"
            )
        kwargs[key] = _coerce(hints[key], value, where=f"{where}:{key}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, *, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value or {}, where=where)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, where=where)
            except ValueError:
                continue
        raise ValueError(f"{where}: {value!r} does not match {hint}")
    if origin is list:
        (item_type,) = typing.get_args(hint)
        items = value if isinstance(value, list) else [value]
        return [_coerce(item_type, item, where=f"{where}[{i}]") for i, item in enumerate(items)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, found {value!r}")
        return dict(value)
    if hint is typing.Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where}: expected true or false, found {value!r}")
    if hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, found {value!r}")
        if hint is int and float(value) != int(value):
            raise ValueError(f"{where}: expected an integer, found {value!r}")
        return hint(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"{where}: expected a string, found {value!r}")
        return str(value)
    return value


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain data, for checkpoints and manifests."""
    return dataclasses.asdict(config)
