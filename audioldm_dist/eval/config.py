"""What an evaluation needs besides the folders: where the backbone weights are, and how to run them.

A YAML file with these keys can be given with `--config`; command-line flags override it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from audioldm_dist.config import from_dict

PANNS_URL = "https://zenodo.org/record/3987831/files/Cnn14_16k_mAP%3D0.438.pth"
VGGISH_URL = "https://github.com/harritaylor/torchvggish/releases/download/v0.1/vggish-10086976.pth"
CLAP_HUB_NAME = "laion/larger_clap_music_and_speech"


@dataclass(kw_only=True)
class EvalConfig:
    """Backbone weights and run settings of `python -m audioldm_dist.eval`."""

    panns_ckpt: str | None = None
    """PANNs `Cnn14_16k_mAP=0.438.pth` (FD, KL, IS); required unless random_backbones."""
    vggish_ckpt: str | None = None
    """torchvggish `vggish-10086976.pth` (FAD); required unless random_backbones."""
    clap_ckpt: str | None = None
    """A local transformers CLAP folder (`save_pretrained` layout) for the CLAP score; none: no CLAP score."""
    random_backbones: bool = False
    """Random-initialised backbones (seeded): for tests and offline smoke runs; numbers are not comparable."""
    trust_checkpoints: bool = False
    """Allow full unpickling of checkpoint files that are not plain tensors (only for files you trust)."""
    device: str = "auto"
    """auto (cuda when available) | cpu | cuda | cuda:N."""
    seed: int = 0
    """Seed of the random backbones and of CLAP's crop of clips longer than its window."""
    max_listed: int = 10
    """How many names of unmatched or failed files the JSON and the log list (all are counted)."""
    pad_short: bool = False
    """Zero-pad clips shorter than one VGGish patch (0.975 s) to that length instead of skipping them: for models
    trained and sampled on short clips (the demo's 0.64 s). audioldm_eval needs 0.975 s; padded numbers are not
    comparable to papers (PANNs pads clips under 2 s in either case, as audioldm_eval does)."""

    def __post_init__(self) -> None:
        if self.max_listed < 0:
            raise ValueError(f"max_listed must be ≥ 0, got {self.max_listed}")
        if not self.random_backbones:
            for name, url in (("panns_ckpt", PANNS_URL), ("vggish_ckpt", VGGISH_URL)):
                if getattr(self, name) is None:
                    raise ValueError(f"--{name.replace('_', '-')} is required (download {url}), "
                                     "or pass --random-backbones for numbers that are not comparable to papers")


def load_eval_config(path: str | Path | None, overrides: dict) -> EvalConfig:
    """YAML file (optional) with its keys replaced by the command-line `overrides` that are not None."""
    raw: dict = {}
    where = "command line"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"--config {path}: no such file")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping of EvalConfig keys, found {type(raw).__name__}")
        where = str(path)
    raw = {**raw, **{key: value for key, value in overrides.items() if value is not None}}
    return from_dict(EvalConfig, raw, where=where)
