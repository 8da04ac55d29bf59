"""`python -m audioldm_dist.check_checkpoint CKPT --config CONFIG`: will this checkpoint load?

Builds the configured model without loading any weights (the conditioner's architecture from its
config, so this works offline; a tiny random one for `random_init` configs) and prints per part (UNet, VAE, conditioner, vocoder) the matched, missing and
unexpected keys. Exit 1 on shape mismatches, 2 on an unreadable file; missing parts only warn, since
the released files omit some (run it before a long finetuning job).
"""
from __future__ import annotations

import argparse
import sys

from audioldm_dist.config import load_config
from audioldm_dist.pretrained import CheckpointError, map_state_dict, read_state_dict


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m audioldm_dist.check_checkpoint", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a released AudioLDM .ckpt, an exported state dict, or a HiFi-GAN .ckpt")
    parser.add_argument("--config", required=True, help="the experiment YAML the checkpoint should fit")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config, args.set)
        state = read_state_dict(args.checkpoint)
    except (ValueError, CheckpointError) as error:
        print(f"check_checkpoint: error: {error}", file=sys.stderr)
        return 2
    from audioldm_dist.ldm import AudioLDM
    from audioldm_dist.pretrained import read_export_metadata

    # A random_init conditioner's vocabulary travels in our exports; released files have none.
    try:
        model = AudioLDM(config, captions=read_export_metadata(args.checkpoint).get("captions"),
                         load_conditioner_weights=False)
    except ValueError as error:  # e.g. a conditioner.pretrained hub name that is not cached, offline
        print(f"check_checkpoint: error: {error}", file=sys.stderr)
        return 2
    modules = {part: getattr(model, part) for part in ("unet", "vae", "vocoder", "conditioner")}
    _, report = map_state_dict(state, modules)
    print(f"{args.checkpoint}: {len(state)} tensors")
    print(report.summary())
    if not report.ok:
        print("check_checkpoint: shape mismatches: this checkpoint does not fit the config", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
