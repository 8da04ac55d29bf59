"""Config (+ a checkpoint) → the AudioLDM with its weights: the one builder the trainer and encode-shards share,
so both see the same frozen VAE and conditioner (and so the same encoding fingerprint); and what the model
needs to know of its shards before training (their captions, their encoding)."""
from __future__ import annotations

import logging

import torch
from torch import nn

from audioldm_dist.config import Config
from audioldm_dist.data.encoded import check_encoding
from audioldm_dist.data.shard_reader import captions_for_tokenizer, detect_encoding
from audioldm_dist.data.sources import ShardInfo
from audioldm_dist.encoding import model_encoding
from audioldm_dist.pretrained import LoadReport

log = logging.getLogger(__name__)


def tokenizer_captions(config: Config, shards: list[ShardInfo], *, reload_from_ckpt: str | None) -> list[str] | None:
    """The vocabulary of a random_init (offline, tiny) text encoder: an exported model's, else the shards'
    captions; None for a pretrained tokenizer."""
    if not config.conditioner.random_init:
        return None
    from audioldm_dist.pretrained import read_export_metadata

    exported = read_export_metadata(reload_from_ckpt).get("captions") if reload_from_ckpt else None
    return exported or captions_for_tokenizer(shards)


def build_model_with_weights(config: Config, *, captions: list[str] | None, reload_from_ckpt: str | None,
                             resuming: bool) -> tuple[nn.Module, LoadReport | None]:
    """AudioLDM with --reload_from_ckpt's weights; the conditioner from `conditioner.pretrained` only if that
    checkpoint did not supply it. Seeds torch with train.seed first, so random-initialised parts are the same
    on every rank and in encode-shards. `resuming`: the first step is no longer the original's dry run."""
    from audioldm_dist.ldm import AudioLDM
    from audioldm_dist.pretrained import load_conditioner_unless_supplied, load_pretrained

    torch.manual_seed(config.train.seed)  # identical initial weights on every rank
    model = AudioLDM(config, captions=captions, load_conditioner_weights=False)
    if config.vae.reload_from_ckpt:  # the first stage alone, as the original's first_stage_config (autoencoder.py)
        log.info("vae.reload_from_ckpt: the VAE from %s", config.vae.reload_from_ckpt)
        load_pretrained(model, config.vae.reload_from_ckpt, parts=("vae",))
    report = load_pretrained(model, reload_from_ckpt) if reload_from_ckpt else None
    load_conditioner_unless_supplied(model, report, checkpoint=reload_from_ckpt)
    model.conditional_dry_run_finished = resuming
    return model, report


def check_encoded_shards(shards: list[ShardInfo], *, model: nn.Module, config: Config) -> dict | None:
    """Encoded shards (encode-shards): the model's encoding fingerprints, after checking that the shards were
    encoded with this VAE, conditioner and audio config (else EncodingMismatchError naming both); audio
    shards: None."""
    found = detect_encoding(shards)
    if found is None:
        return None
    if config.train.target != "ldm":
        raise ValueError(f"{shards[0].url}: encoded shards hold VAE posteriors, not log-mels; train.target="
                         f"{config.train.target} needs audio shards (make-shards output)")
    expected = model_encoding(model, config)
    check_encoding(found, expected, where=shards[0].url)
    log.info("encoded shards (fingerprint %s): no audio decode, STFT, VAE encoder or conditioner forward in "
             "training", expected["fingerprint"])
    return expected
