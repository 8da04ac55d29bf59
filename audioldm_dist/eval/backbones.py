"""The frozen networks the metrics run on, built from the user's checkpoint files (or random, loudly).

Nothing is downloaded: a path that does not exist is a `ValueError` naming it and where the file is
published. Released weights load with strict=True, so a wrong file (the VGGish PCA parameters given
as the model, a 32 kHz Cnn14) is an error naming the file and the keys that differ.
"""
from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from audioldm_dist.eval.config import CLAP_HUB_NAME, PANNS_URL, VGGISH_URL, EvalConfig
from audioldm_dist.eval.panns import Cnn14
from audioldm_dist.eval.vggish import VGGish

log = logging.getLogger("audioldm_dist.eval")

RANDOM_WARNING = ("RANDOM-INITIALISED BACKBONES (--random-backbones): every metric below is computed on "
                  "untrained networks and is NOT comparable to published numbers or to runs with real weights")


def read_state_dict(path: str | Path, *, flag: str, url: str, trust: bool) -> dict[str, torch.Tensor]:
    """A state dict from a checkpoint file: the whole file or its `model` / `state_dict` entry."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{flag} {path}: no such file (the released weights: {url})")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if not trust:
            raise ValueError(f"{flag} {path}: the file holds more than tensors and was not unpickled "
                             f"({str(error).splitlines()[0]}); if you trust its source, "
                             "pass --trust-checkpoints") from None
        log.warning("%s %s: loading with full unpickling (--trust-checkpoints)", flag, path)
        loaded = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated or not a torch file
        raise ValueError(f"{flag} {path}: not a readable PyTorch checkpoint ({error})") from None
    for key in ("model", "state_dict"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ValueError(f"{flag} {path}: expected a state dict (or a dict with a 'model' entry)")
    return loaded


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], *, path: str | Path, flag: str, url: str) -> None:
    """Loads `state` (read from `path`) into `model` with strict=True; differences are a ValueError naming the file."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "") if keys else "none"

        shapes = ", ".join(f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                           for k in mismatched[:3])
        raise ValueError(f"{flag} {path}: not a {type(model).__name__} checkpoint; missing keys: {few(missing)}; "
                         f"unexpected keys: {few(unexpected)}; shape mismatches: {shapes or 'none'} "
                         f"(the released weights: {url})")
    model.load_state_dict(state, strict=True)


class ClapScorer:
    """CLAP text and audio embeddings through our conditioner wrapper (transformers' ClapModel)."""

    def __init__(self, *, checkpoint: str | None, captions: list[str], device: torch.device, seed: int) -> None:
        """`checkpoint` None: a small random CLAP whose word tokenizer is fitted on `captions` (tests)."""
        from audioldm_dist.config import ConditionerConfig
        from audioldm_dist.models.conditioners import build_conditioner

        if checkpoint is not None and not Path(checkpoint).is_dir():
            raise ValueError(f"--clap-ckpt {checkpoint}: no such folder (a transformers CLAP model saved with "
                             f"save_pretrained, e.g. a local copy of {CLAP_HUB_NAME})")
        config = ConditionerConfig(kind="clap", pretrained=checkpoint or "", random_init=checkpoint is None,
                                   tiny={"seed": seed}, ucg_rate=0.0)
        try:
            self.conditioner = build_conditioner(config, captions=captions).to(device)
        except (OSError, ValueError) as error:  # transformers: missing config, weights or tokenizer files
            raise ValueError(f"--clap-ckpt {checkpoint}: cannot load a CLAP model from it ({error})") from None
        self.device = device
        self.seed = seed

    @torch.no_grad()
    def text_embeddings(self, captions: list[str]) -> np.ndarray:
        return self.conditioner.encode_text(captions, device=self.device).film.float().cpu().numpy()  # (N, 512)

    @torch.no_grad()
    def audio_embedding(self, waveform: np.ndarray, *, sample_rate: int) -> np.ndarray:
        """`(1, samples)` mono clip at its own rate → unit-norm CLAP audio embedding (resampled to 48 kHz)."""
        np.random.seed(self.seed)  # the feature extractor crops clips longer than its window at random
        batch = torch.from_numpy(waveform)[None].to(self.device)  # (1, 1, samples)
        return self.conditioner.encode_audio(batch, sample_rate=sample_rate).film[0].float().cpu().numpy()


@dataclass
class Backbones:
    """Cnn14 and VGGish on `device`, and how they were made (recorded in every metrics JSON)."""

    panns: Cnn14
    vggish: VGGish
    device: torch.device
    description: dict


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def build_backbones(config: EvalConfig) -> Backbones:
    """Cnn14 and VGGish from the configured files, or seeded random weights with a loud warning."""
    device = resolve_device(config.device)
    if config.random_backbones:
        for line in ("=" * 100, RANDOM_WARNING, "=" * 100):
            log.warning(line)
        ignored = [flag for flag, value in (("--panns-ckpt", config.panns_ckpt), ("--vggish-ckpt", config.vggish_ckpt))
                   if value is not None]
        if ignored:
            log.warning("--random-backbones: %s ignored", " and ".join(ignored))
        torch.manual_seed(config.seed)
        panns, vggish = Cnn14(), VGGish()
        panns.init_random()
        vggish.init_random()
        description = {"random_backbones": True, "seed": config.seed, "warning": RANDOM_WARNING}
    else:
        trust = config.trust_checkpoints
        panns_state = read_state_dict(config.panns_ckpt, flag="--panns-ckpt", url=PANNS_URL, trust=trust)
        vggish_state = read_state_dict(config.vggish_ckpt, flag="--vggish-ckpt", url=VGGISH_URL, trust=trust)
        panns, vggish = Cnn14(), VGGish()
        load_weights(panns, panns_state, path=config.panns_ckpt, flag="--panns-ckpt", url=PANNS_URL)
        load_weights(vggish, vggish_state, path=config.vggish_ckpt, flag="--vggish-ckpt", url=VGGISH_URL)
        description = {"random_backbones": False, "panns_ckpt": str(Path(config.panns_ckpt).resolve()),
                       "vggish_ckpt": str(Path(config.vggish_ckpt).resolve())}
    for model in (panns, vggish):
        model.requires_grad_(False)
    return Backbones(panns=panns.to(device), vggish=vggish.to(device), device=device, description=description)
