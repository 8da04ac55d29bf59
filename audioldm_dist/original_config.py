"""Reading the original AudioLDM training YAMLs (e.g. `audioldm_original.yaml`) into our `Config`.

Users bring their experiment files: `preprocessing`, and the
`model.params` tree (`unet_config`, `first_stage_config.params.ddconfig`, `cond_stage_config`,
schedule and evaluation settings) and the training schedule (`step.max_steps`, `base_learning_rate`,
`warmup_steps`, `batchsize`, checkpoint cadence) map onto our sections. YAML anchors resolve as usual.
Every other key is returned with the reason it has no counterpart (`UNMAPPED_REASONS`), so nothing is
dropped silently; a key with no known reason is reported as such.

    config, unmapped = read_original_config("audioldm_original.yaml")
    python -m audioldm_dist.original_config audioldm_original.yaml   # prints our YAML and the unmapped keys
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from audioldm_dist.config import Config, from_dict, to_dict


def _get(tree: dict, path: str, default: Any = None) -> Any:
    node: Any = tree
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


def _flatten(tree: Any, prefix: str = "") -> list[str]:
    if not isinstance(tree, dict):
        return [prefix]
    return [leaf for key, value in tree.items() for leaf in _flatten(value, f"{prefix}.{key}" if prefix else str(key))]


# (original path, our section, our key)
_SCALARS = [
    ("preprocessing.audio.sampling_rate", "audio", "sampling_rate"),
    ("preprocessing.audio.duration", "audio", "duration"),
    ("preprocessing.stft.filter_length", "audio", "filter_length"),
    ("preprocessing.stft.hop_length", "audio", "hop_length"),
    ("preprocessing.stft.win_length", "audio", "win_length"),
    ("preprocessing.mel.n_mel_channels", "audio", "n_mel_channels"),
    ("preprocessing.mel.mel_fmin", "audio", "mel_fmin"),
    ("preprocessing.mel.mel_fmax", "audio", "mel_fmax"),
    ("step.max_steps", "train", "max_steps"),
    ("step.save_checkpoint_every_n_steps", "train", "save_every"),
    ("step.save_top_k", "train", "keep_last"),
    ("model.params.base_learning_rate", "train", "learning_rate"),
    ("model.params.warmup_steps", "train", "warmup_steps"),
    ("model.params.batchsize", "train", "micro_batch_size"),
    ("model.params.unet_config.params.in_channels", "unet", "in_channels"),
    ("model.params.unet_config.params.out_channels", "unet", "out_channels"),
    ("model.params.unet_config.params.model_channels", "unet", "model_channels"),
    ("model.params.unet_config.params.channel_mult", "unet", "channel_mult"),
    ("model.params.unet_config.params.num_res_blocks", "unet", "num_res_blocks"),
    ("model.params.unet_config.params.attention_resolutions", "unet", "attention_resolutions"),
    ("model.params.unet_config.params.num_head_channels", "unet", "num_head_channels"),
    ("model.params.unet_config.params.transformer_depth", "unet", "transformer_depth"),
    ("model.params.unet_config.params.dropout", "unet", "dropout"),
    ("{vae}.embed_dim", "vae", "embed_dim"),
    ("{vae}.ddconfig.ch", "vae", "ch"),
    ("{vae}.ddconfig.ch_mult", "vae", "ch_mult"),
    ("{vae}.ddconfig.num_res_blocks", "vae", "num_res_blocks"),
    ("{vae}.ddconfig.z_channels", "vae", "z_channels"),
    ("{vae}.ddconfig.in_channels", "vae", "in_channels"),
    ("{vae}.ddconfig.out_ch", "vae", "out_ch"),
    ("{vae}.ddconfig.double_z", "vae", "double_z"),
    ("{vae}.reload_from_ckpt", "vae", "reload_from_ckpt"),
    ("{vae}.lossconfig.params.kl_weight", "vae", "kl_weight"),
    ("{vae}.lossconfig.params.disc_weight", "vae", "disc_weight"),
    ("{vae}.lossconfig.params.perceptual_weight", "vae", "perceptual_weight"),
    ("model.params.scale_by_std", "vae", "scale_by_std"),
    ("model.params.timesteps", "diffusion", "num_timesteps"),
    ("model.params.linear_start", "diffusion", "linear_start"),
    ("model.params.linear_end", "diffusion", "linear_end"),
    ("model.params.parameterization", "diffusion", "parameterization"),
    ("model.params.unconditional_prob_cfg", "conditioner", "ucg_rate"),
    ("model.params.evaluation_params.unconditional_guidance_scale", "diffusion", "guidance_scale"),
    ("model.params.evaluation_params.ddim_sampling_steps", "diffusion", "ddim_steps"),
]


# Why an original key has no counterpart: matched on the full dotted path, then on its last component.
UNMAPPED_REASONS: dict[str, str] = {
    "metadata_root": "make-shards --metadata-root reads it; the shards it writes go in data.train / data.val",
    "data.train": "make-shards --dataset NAME --split train makes shards of it; they go in data.train (--train-data)",
    "data.val": "make-shards --dataset NAME --split val makes shards of it; they go in data.val (--val-data)",
    "data.test": "make-shards --dataset NAME --split test; infer/eval read the test captions and clips",
    "data.class_label_indices": "make-shards reads it from the metadata root (the label vectors are in the shards)",
    "log_directory": "the run directory is train.py --run-dir",
    "project": "the wandb project is WANDB_PROJECT",
    "precision": "the trainer always sets torch.set_float32_matmul_precision('high'), as the original",
    "data.dataloader_add_ons": "not needed: the CLAP audio path resamples to 48 kHz itself",
    "step.validation_every_n_epochs": "train.val_every counts steps (a stream has no fixed epoch)",
    "preprocessing.audio.max_wav_value": "unused by the original's training (audio is peak-normalised)",
    "augmentation.mixup": "the original has no mixup code path (dataset.py:158): nothing to map",
    "target": "a class path: ours are fixed classes chosen by conditioner.kind and train.target",
    "reload_from_ckpt": "pass that checkpoint to train.py --reload_from_ckpt",
    "sampling_rate": "the same value as preprocessing.audio.sampling_rate",
    "mel_bins": "the same value as preprocessing.mel.n_mel_channels",
    "monitor": "Lightning's checkpoint monitor: we keep the newest train.keep_last checkpoints",
    "image_key": "the VAE input is always the log-mel (fbank)",
    "first_stage_key": "the VAE input is always the log-mel (fbank)",
    "subband": "1 is the only value (the released VAE)",
    "time_shuffle": "1 is the only value (the released VAE)",
    "resolution": "unused by the mel VAE",
    "downsample_time": "false is the only value (the released VAE)",
    "attn_resolutions": "[] is the only value (the released VAE: attention in the middle block only)",
    "dropout": "0.0 is the only value for the VAE",
    "optimize_ddpm_parameter": "true: train.target=ldm trains the UNet",
    "optimize_gpt": "AudioLDM 2 only",
    "num_timesteps_cond": "1 is the only value (the cond schedule is not shortened)",
    "log_every_t": "intermediate-sample logging of the original; not used",
    "latent_t_size": "derived from audio.duration and the VAE's downsampling",
    "latent_f_size": "derived from audio.n_mel_channels and the VAE's downsampling",
    "channels": "the same value as vae.embed_dim",
    "latent_embed_dim": "the same value as vae.embed_dim",
    "image_size": "unused by the UNet (latents of any size)",
    "extra_film_use_concat": "always true: FiLM is concatenated to the time embedding (the released layout)",
    "use_spatial_transformer": "always true (the released layout)",
    "n_candidates_per_samples": "infer --n_candidates (best-of-N by CLAP)",
    "disc_in_channels": "1: the log-mel (the discriminator's input channels follow vae.in_channels)",
    "model.params.first_stage_config.base_learning_rate": "the VAE stage's learning rate: train.learning_rate "
                                                          "of a train.target=vae run",
    "model.params.first_stage_config.params.batchsize": "the VAE stage's batch: train.micro_batch_size of a "
                                                       "train.target=vae run",
}


def unmapped_reason(key: str) -> str:
    """Why original key `key` (dotted path) has no counterpart here."""
    if key in UNMAPPED_REASONS:
        return UNMAPPED_REASONS[key]
    return UNMAPPED_REASONS.get(key.rsplit(".", 1)[-1], "no counterpart here and no known reason: please report it")


def _vae_root(tree: dict) -> str:
    """Where the autoencoder's params sit: inside an LDM config, or at the top of a VAE config (16k_64.yaml)."""
    return "model.params" if "AutoencoderKL" in str(_get(tree, "model.target", "")) else \
        "model.params.first_stage_config.params"


def _vae_stage(tree: dict, raw: dict, used: set[str], *, vae: str) -> None:
    """disc_start counts Lightning steps, two per batch under the VAE's manual optimisation (original_recipe.md
    §c); ours counts batches. A VAE config (16k_64.yaml) also sets the VAE stage's training schedule."""
    disc_start = _get(tree, f"{vae}.lossconfig.params.disc_start")
    if disc_start is not None:
        raw.setdefault("vae", {})["disc_start"] = int(disc_start) // 2
        used.add(f"{vae}.lossconfig.params.disc_start")
    if vae != "model.params":
        return
    train = raw.setdefault("train", {})
    train.update(target="vae", warmup_steps=0)  # the VAE stage has no warm-up (autoencoder.py:471-493)
    for original, ours in (("model.base_learning_rate", "learning_rate"), ("model.params.batchsize", "micro_batch_size")):
        if _get(tree, original) is not None:
            train[ours] = _get(tree, original)
            used.add(original)
    # The original downloads LPIPS' VGG16 at run time; ours reads one local file (configs/vae_16k_64.yaml's path).
    raw["vae"].update(scale_by_std=False, lpips_weights="data/checkpoints/lpips_vgg.pt")


def read_original_config(path: str | Path) -> tuple[Config, list[str]]:
    """Our config from an original YAML, and the original keys that have no counterpart (see `unmapped_reason`)."""
    path = Path(path)
    tree = yaml.safe_load(path.read_text())
    if not isinstance(tree, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    raw: dict[str, dict] = {}
    used: set[str] = set()
    vae = _vae_root(tree)
    for original, section, key in _SCALARS:
        original = original.format(vae=vae)
        if vae == "model.params" and (section, key) in (("train", "learning_rate"), ("train", "micro_batch_size")):
            continue  # a VAE config: its stage's schedule (`_vae_stage`)
        value = _get(tree, original)
        if value is not None:
            raw.setdefault(section, {})[key] = [value] if key == "train" and isinstance(value, str) else value
            used.add(original)
    unet = _get(tree, "model.params.unet_config.params", {}) or {}
    film_dim = unet.get("extra_film_condition_dim")
    context_dim = unet.get("context_dim")
    if unet:  # a VAE config has no UNet: ours keeps its defaults
        raw.setdefault("unet", {})["film_dim"] = int(film_dim or 0)
        raw["unet"]["context_dims"] = [int(d) for d in (context_dim or [])] if isinstance(context_dim, list) else (
            [int(context_dim)] if context_dim else [])
    used.update(f"model.params.unet_config.params.{key}" for key in ("extra_film_condition_dim", "context_dim"))
    for name, condition in (_get(tree, "model.params.cond_stage_config", {}) or {}).items():
        target = str(condition.get("target", ""))
        params = condition.get("params", {}) or {}
        conditioner = raw.setdefault("conditioner", {})
        if "FlanT5" in target or "T5" in target:
            conditioner.update(kind="t5", pretrained="google/flan-t5-large")
        elif "CLAP" in target:
            # The YAML's embed_mode is overridden every training step (ddpm.py:656-683): mixed.
            conditioner.update(kind="clap", pretrained=str(params.get("pretrained_path") or ""),
                               amodel=str(params.get("amodel") or "HTSAT-tiny"), tokenizer="roberta-base",
                               max_length=512, embed_mode="mixed")
        used.update(f"model.params.cond_stage_config.{name}.{leaf}" for leaf in _flatten(condition))
    _vae_stage(tree, raw, used, vae=vae)
    config = from_dict(Config, raw, where=str(path))
    unmapped = [key for key in _flatten(tree) if key not in used and not key.startswith("variables.")]
    return config, unmapped


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m audioldm_dist.original_config",
                                     description="Convert an original AudioLDM training YAML to ours.")
    parser.add_argument("original_yaml")
    parser.add_argument("--out", help="write our YAML here (default: print it)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    config, unmapped = read_original_config(args.original_yaml)
    text = yaml.safe_dump(to_dict(config), sort_keys=False)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)
    if unmapped:
        print(f"# {len(unmapped)} original keys have no counterpart here:")
        for key in unmapped:
            print(f"#   {key}: {unmapped_reason(key)}")


if __name__ == "__main__":
    main()
