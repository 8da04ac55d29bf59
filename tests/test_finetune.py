"""Finetuning a checkpoint in the released layout on 2 CPU ranks keeps every weight it carries.

The file is written as the original code writes it: UNet and VAE under their Lightning prefixes, a
top-level `scale_factor` of 0.123, the HiFi-GAN after `remove_weight_norm` (plain `.weight`), and the
CLAP in laion_clap names with the exact released layout of ../shared/reference (HTSAT-tiny + RoBERTa-base,
418 tensors; random weights). After 2 steps and an export, the scale is still 0.123 (not re-estimated),
the vocoder and CLAP are the ones given, the EMA goes on from the checkpoint's, and the export loads with
nothing missing.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from audioldm_dist.config import load_config
from audioldm_dist.ldm import AudioLDM
from audioldm_dist.models.clap import convert_laion_state_dict
from audioldm_dist.models.conditioners import build_word_tokenizer
from audioldm_dist.pretrained import map_state_dict
from processes import free_port
from test_clap import released_clap_state

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
SCALE = 0.123
EMA_UPDATES = 100_000


def _overrides(tokenizer: Path) -> list[str]:
    """The tiny model with a FiLM width of 512 and the released CLAP architecture, weights from the checkpoint."""
    return ["unet.film_dim=512", "conditioner.random_init=false", "conditioner.pretrained=''",
            "conditioner.amodel=HTSAT-tiny", f"conditioner.tokenizer={tokenizer}", "conditioner.max_length=64"]


def _released_checkpoint(path: Path, *, overrides: list[str]) -> dict[str, torch.Tensor]:
    config = load_config(ROOT / "configs" / "tiny.yaml", overrides)
    torch.manual_seed(1)
    model = AudioLDM(config, load_conditioner_weights=False)
    vocoder = model.vocoder
    vocoder.remove_weight_norm()  # what the original saves (utilities/model_util.py get_vocoder)
    state = {f"model.diffusion_model.{k}": v for k, v in model.unet.state_dict().items()}
    state |= {f"first_stage_model.{k}": v for k, v in model.vae.state_dict().items() if k != "scale_factor"}
    state |= {f"first_stage_model.vocoder.{k}": v for k, v in vocoder.state_dict().items()}
    clap = {key: value * 0.02 if value.is_floating_point() else value for key, value in released_clap_state().items()}
    clap["cond_stage_model.model.text_branch.embeddings.position_ids"] = torch.arange(514).unsqueeze(0)
    state |= clap
    state["scale_factor"] = torch.tensor(SCALE)
    for name, value in model.unet.state_dict().items():  # LitEma's names: no dots; an EMA unlike the weights
        state["model_ema.diffusion_model" + name.replace(".", "")] = value + 0.01 * torch.randn_like(value)
    state["model_ema.num_updates"] = torch.tensor(EMA_UPDATES, dtype=torch.int)
    torch.save({"state_dict": state}, path)
    return state


@pytest.mark.slow
def test_finetuning_a_released_layout_keeps_scale_vocoder_and_clap(train_shards: Path, tmp_path: Path) -> None:
    tokenizer = tmp_path / "tokenizer"
    build_word_tokenizer(["a sine tone", "a rising chirp", "white noise"], max_length=64).save_pretrained(tokenizer)
    overrides = _overrides(tokenizer)
    given = _released_checkpoint(tmp_path / "released.ckpt", overrides=overrides)
    run_dir = tmp_path / "run"
    command = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "train.py", "--deepspeed_config",
               "configs/ds/zero2.json", "--config", "configs/tiny.yaml", "--run-dir", str(run_dir), "--train-data",
               str(train_shards), "--max-steps", "2", "--save-every", "2", "--reload_from_ckpt",
               str(tmp_path / "released.ckpt"), *[arg for item in overrides for arg in ("--set", item)]]
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "scale_by_std: latent scale factor" not in output  # never re-estimated over the checkpoint's
    assert "conditioner.pretrained is not read" in output
    exported = subprocess.run([sys.executable, "-m", "audioldm_dist.export", str(run_dir)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
    assert exported.returncode == 0, exported.stderr[-3000:]
    state = torch.load(run_dir / "export_global_step2.ckpt", map_location="cpu", weights_only=False)["state_dict"]

    assert float(state["scale_factor"]) == pytest.approx(SCALE)
    for key, plain in given.items():  # the vocoder given, in our weight-norm form: g·v/‖v‖ = the plain weight
        if key.startswith("first_stage_model.vocoder.") and key.endswith(".weight"):
            stem = key[: -len("weight")]
            v, g = state[stem + "weight_v"], state[stem + "weight_g"]
            folded = g * v / v.flatten(1).norm(dim=1).reshape(g.shape)
            assert torch.allclose(folded, plain, atol=1e-6), key
    converted, _ = convert_laion_state_dict({k: v for k, v in given.items() if k.startswith("cond_stage_model.")})
    assert converted and all(torch.equal(state[f"cond_stage_model.model.{key}"], value)
                             for key, value in converted.items())

    # The EMA goes on from the checkpoint's (2 updates at decay 0.9999), not from the weights.
    assert int(state["model_ema.num_updates"]) == EMA_UPDATES + 2
    ema_keys = [key for key in given if key.startswith("model_ema.diffusion_model")]
    assert ema_keys and all((state[key] - given[key]).abs().max() < 1e-4 for key in ema_keys)  # weights: 0.01 away
    model = AudioLDM(load_config(ROOT / "configs" / "tiny.yaml", overrides), load_conditioner_weights=False)
    _, report = map_state_dict(state, {part: getattr(model, part) for part in ("unet", "vae", "vocoder", "conditioner")})
    for part, part_report in report.parts.items():
        assert not part_report.missing and not part_report.unexpected and not part_report.mismatched, (
            part, part_report.missing[:5], part_report.unexpected[:5])


def test_vae_reload_from_ckpt_reads_the_first_stage_only(tmp_path: Path) -> None:
    """The two-stage recipe: a VAE run's export (any UNet in it, here of another width) gives the LDM stage its
    VAE and nothing else, as the original's first_stage_config reload_from_ckpt."""
    from audioldm_dist.build import build_model_with_weights

    torch.manual_seed(5)
    stage1 = AudioLDM(load_config(ROOT / "configs" / "tiny.yaml", ["unet.model_channels=64"]))
    state = {f"model.diffusion_model.{k}": v for k, v in stage1.unet.state_dict().items()}
    state |= {f"first_stage_model.{k}": v for k, v in stage1.vae.state_dict().items() if k != "scale_factor"}
    state["scale_factor"] = torch.tensor(1.0)
    torch.save({"state_dict": state}, tmp_path / "vae.ckpt")

    config = load_config(ROOT / "configs" / "tiny.yaml", [f"vae.reload_from_ckpt={tmp_path / 'vae.ckpt'}"])
    torch.manual_seed(0)
    fresh_unet = AudioLDM(config).unet.state_dict()
    torch.manual_seed(0)
    model, report = build_model_with_weights(config, captions=None, reload_from_ckpt=None, resuming=False)
    assert report is None
    for key, value in stage1.vae.state_dict().items():
        assert torch.equal(model.vae.state_dict()[key], value), key
    assert all(torch.equal(model.unet.state_dict()[k], v) for k, v in fresh_unet.items())  # not the 64-wide one
    from audioldm_dist.pretrained import load_pretrained

    vae_only = load_pretrained(model, tmp_path / "vae.ckpt", parts=("vae",))
    assert not vae_only.other and all(key.startswith("model.diffusion_model.") for key in vae_only.not_read)
    assert "not read (parts not asked for)" in vae_only.summary()
