"""Fingerprints of what an encoded shard depends on: the frozen VAE's and conditioner's weights and the
audio config (crop length, STFT, mel). `encode-shards` stores them in every sample and its manifest; the
trainer computes its model's and refuses shards whose fingerprint differs (`data/encoded.check_encoding`).

A weights fingerprint is the sha256 over the module's state_dict in name order (name, dtype, shape, bytes);
the VAE's `scale_factor` is left out (scale_by_std sets it from the first batch, after encoding). The
conditioner's also covers the settings that change its output with equal weights (kind, tokenizer,
max_length). Hashing reads every weight once (about a second per GB).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

import torch
from torch import nn

from audioldm_dist.config import Config

SHORT = 16  # hex digits kept: enough to tell weights apart, short enough to read in an error


def weights_sha256(module: nn.Module, *, skip: tuple[str, ...] = ("scale_factor",)) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if name in skip:
            continue
        value = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def _short(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:SHORT]


def model_encoding(model: nn.Module, config: Config) -> dict[str, str]:
    """{"vae", "conditioner", "audio", "fingerprint"} of an AudioLDM (whose VAE and conditioner are loaded)."""
    settings = config.conditioner
    parts = {
        "vae": weights_sha256(model.vae)[:SHORT],
        "conditioner": _short([weights_sha256(model.conditioner), settings.kind, settings.tokenizer,
                               settings.max_length]),
        "audio": _short(dataclasses.asdict(config.audio)),
    }
    return parts | {"fingerprint": _short(parts)}
