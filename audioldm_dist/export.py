"""`python -m audioldm_dist.export RUN_DIR [--tag global_stepN] [--out FILE]`: one fp32 checkpoint.

Consolidates the ZeRO shards of a run's checkpoint (DeepSpeed's zero_to_fp32) into the layout of the
released AudioLDM files, which `load_pretrained`, `--reload_from_ckpt` and `check_checkpoint` read:
`model.diffusion_model.*` (UNet), `model_ema.*` (its EMA, LitEma names), `first_stage_model.*` (VAE),
`first_stage_model.vocoder.*` (HiFi-GAN), `cond_stage_model.*` (conditioner), `scale_factor`, plus
`audioldm_dist` metadata (config, step, tokenizer captions of a random_init conditioner).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from audioldm_dist.engine import checkpoint
from audioldm_dist.fileio import DiskFullError, atomic_torch_save

PREFIX = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "vocoder": "first_stage_model.vocoder.",
          "conditioner": "cond_stage_model."}
"""Each part's key prefix in the released AudioLDM checkpoints."""


def export(run_dir: Path, *, tag: str | None = None, out: Path | None = None) -> Path:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    point = checkpoint.find_resume_point(run_dir, "auto" if tag is None else str(checkpoint.checkpoint_dir(run_dir) / tag))
    if point is None:
        raise ValueError(f"{run_dir}: no complete checkpoint to export (no {checkpoint.checkpoint_dir(run_dir) / 'latest'})")
    trained_state = get_fp32_state_dict_from_zero_checkpoint(str(point.load_dir), tag=point.tag)
    client = checkpoint.load_client_state(point)
    frozen_path = run_dir / checkpoint.FROZEN_PARTS
    if not frozen_path.is_file():
        raise ValueError(f"{frozen_path} missing: the run's frozen parts are needed for export")
    frozen = torch.load(frozen_path, map_location="cpu", weights_only=False)
    trained = frozen.get("trained", "unet")  # what DeepSpeed's files hold: the UNet, or the VAE (train.target=vae)
    parts = {part: state for part, state in frozen.items() if part in PREFIX}
    parts[trained] = {k: v.float() for k, v in trained_state.items()}
    state: dict[str, torch.Tensor] = {}
    for part, part_state in parts.items():
        state.update({PREFIX[part] + key: tensor for key, tensor in part_state.items() if key != "scale_factor"})
    if trained == "unet":
        for name, tensor in client["ema"]["shadow"].items():
            state["model_ema.diffusion_model" + name.replace(".", "")] = tensor.float()
        state["model_ema.num_updates"] = torch.tensor(client["ema"]["num_updates"], dtype=torch.int)  # as LitEma
    state["scale_factor"] = torch.tensor(client["scale_factor"])
    out = out or run_dir / f"export_{point.tag}.ckpt"
    atomic_torch_save(out, {"state_dict": state, "audioldm_dist": {"config": client["config"], "step": point.meta["step"],
                                                                "captions": frozen.get("captions")}})
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m audioldm_dist.export", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--tag", help="global_stepN (default: the newest complete checkpoint)")
    parser.add_argument("--out", help="output file (default: RUN_DIR/export_TAG.ckpt)")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        path = export(Path(args.run_dir), tag=args.tag, out=Path(args.out) if args.out else None)
    except ValueError as error:
        print(f"export: error: {error}", file=sys.stderr)
        return 2
    except DiskFullError as error:
        print(f"export: error: {error.strerror}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
