"""The released AudioLDM checkpoint layout, and a run's ZeRO checkpoint exported to it.

DeepSpeed's zero_to_fp32 consolidates the ZeRO shards; the frozen parts saved beside them at the start
(`FROZEN_PARTS`) and the client state (EMA, scale factor, config) complete the file:
`model.diffusion_model.*` (UNet), `model_ema.*` (its EMA, LitEma names), `first_stage_model.*` (VAE),
`first_stage_model.vocoder.*` (HiFi-GAN), `cond_stage_model.*` (conditioner), `scale_factor`, plus
`audioldm_dist` metadata (config, step, tokenizer captions of a random_init conditioner). `load_pretrained`,
`--reload_from_ckpt` and `check_checkpoint` read this layout.
"""
from __future__ import annotations

from pathlib import Path

import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from audioldm_dist.engine.checkpoint import (FROZEN_PARTS, checkpoint_dir, find_resume_point,
                                             load_client_state)
from audioldm_dist.fileio import atomic_torch_save

PREFIX = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "vocoder": "first_stage_model.vocoder.",
          "conditioner": "cond_stage_model."}
"""Each part's key prefix in the released AudioLDM checkpoints."""


def export(run_dir: Path, *, tag: str | None = None, out: Path | None = None) -> Path:
    """The run's newest (or `tag`) checkpoint as one fp32 file in the released layout; its path."""
    point = find_resume_point(run_dir, "auto" if tag is None else str(checkpoint_dir(run_dir) / tag))
    if point is None:
        raise ValueError(f"{run_dir}: no complete checkpoint to export (no {checkpoint_dir(run_dir) / 'latest'})")
    trained_state = get_fp32_state_dict_from_zero_checkpoint(str(point.load_dir), tag=point.tag)
    client = load_client_state(point)
    frozen_path = run_dir / FROZEN_PARTS
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
