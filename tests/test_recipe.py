"""The original AudioLDM recipe around the networks: DDIM timesteps, vocoder layouts, optimiser and schedule.

Each rule is checked against the original's formula or behaviour, cited in ../shared/reference/original_recipe.md.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from audioldm_dist.config import DiffusionConfig, VocoderConfig, load_config
from audioldm_dist.diffusion.ddim import ddim_sample, ddim_timesteps
from audioldm_dist.diffusion.schedule import NoiseSchedule
from audioldm_dist.models.vocoder import HiFiGAN
from audioldm_dist.pretrained import load_pretrained, map_state_dict
from processes import free_port
from reference_files import load_reference

ROOT = Path(__file__).resolve().parents[1]


def _original_ddim_timesteps(num_ddim: int, num_ddpm: int = 1000) -> np.ndarray:
    """utilities/diffusion_util.py `make_ddim_timesteps(\"uniform\", ...)`, line by line."""
    c = num_ddpm // num_ddim
    return np.asarray(list(range(0, num_ddpm, c))) + 1


@pytest.mark.parametrize("steps", [7, 50, 200, 250, 500])
def test_ddim_timesteps_follow_the_original_rule(steps: int) -> None:
    ours = ddim_timesteps(1000, steps)
    assert ours == _original_ddim_timesteps(steps).tolist()
    assert ours[-1] == {7: 995, 50: 981, 200: 996, 250: 997, 500: 999}[steps]  # sampling starts at the top
    if steps == 7:
        assert len(ours) == 8 and ours[-1] == 995  # 1000 // 7 = 142: eight steps, the first at t = 995


@pytest.mark.parametrize("steps", [3, 9, 333, 501, 1000])
def test_ddim_steps_the_original_crashes_on_are_a_clear_error(steps: int) -> None:
    with pytest.raises(IndexError):  # what the original does: ᾱ indexed at t = 1000
        np.zeros(1000)[_original_ddim_timesteps(steps)]
    with pytest.raises(ValueError, match=r"reaches t=1000, past the schedule.*use e.g. \d+ steps \(at most 500\)"):
        ddim_timesteps(1000, steps)
    if steps > 500:
        with pytest.raises(ValueError, match=r"diffusion.ddim_steps=.*expected 1 to 500"):
            DiffusionConfig(ddim_steps=steps)


def test_every_step_count_the_original_runs_is_accepted() -> None:
    for steps in range(1, 501):
        runs = _original_ddim_timesteps(steps).max() < 1000
        if runs:
            assert ddim_timesteps(1000, steps) == _original_ddim_timesteps(steps).tolist()
        else:
            with pytest.raises(ValueError):
                ddim_timesteps(1000, steps)


def test_ddim_with_eta_adds_noise_at_every_step_the_last_included() -> None:
    """original ddim.py p_sample_ddim: x_prev = √ᾱ_prev·x0 + dir + σ_t·noise at every index, 0 included."""
    schedule = NoiseSchedule(DiffusionConfig())
    zero_model = lambda x, t, conditional: torch.zeros_like(x)  # noqa: E731  (ε = 0: x0 = x / √ᾱ_t)
    draws = []
    for eta in (0.0, 1.0):
        draws.append(ddim_sample(zero_model, (1, 2, 2, 2), schedule=schedule, num_steps=2, eta=eta,
                                 generator=torch.Generator().manual_seed(0)))
    steps = ddim_timesteps(1000, 2)  # [1, 501]
    alphas = schedule.alphas_cumprod.double()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((1, 2, 2, 2), generator=generator).double()
    for index in (1, 0):
        alpha, prev = alphas[steps[index]], alphas[steps[index - 1]] if index else alphas[0]
        sigma = ((1 - prev) / (1 - alpha) * (1 - alpha / prev)).sqrt()
        x = prev.sqrt() * x / alpha.sqrt() + (1 - prev - sigma**2).sqrt() * 0 + sigma * torch.randn(
            (1, 2, 2, 2), generator=generator).double()
    assert torch.allclose(draws[1].double(), x, atol=1e-6)
    assert not torch.allclose(draws[0], draws[1])


def _s_vocoder() -> HiFiGAN:
    config = load_reference("audioldm_s_state_dict_shapes.json")["hifigan_16k_64bins_config"]
    fields = ("upsample_rates", "upsample_kernel_sizes", "upsample_initial_channel", "resblock_kernel_sizes",
              "resblock_dilation_sizes", "num_mels")
    return HiFiGAN(VocoderConfig(**{key: config[key] for key in fields})).eval()


def test_vocoder_saved_without_weight_norm_loads_and_gives_the_same_audio() -> None:
    """The original saves HiFi-GAN after remove_weight_norm (plain .weight): 194 tensors in LDM checkpoints."""
    torch.manual_seed(0)
    original = _s_vocoder()
    original.remove_weight_norm()
    plain = {f"first_stage_model.vocoder.{key}": value for key, value in original.state_dict().items()}
    layout = next(iter(load_reference("vocoder_in_ldm_checkpoint_shapes.json").values()))
    assert {key: list(value.shape) for key, value in plain.items()} == layout
    ours = _s_vocoder()

    class Holder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vocoder = ours

    report = load_pretrained(Holder(), plain, parts=("vocoder",))
    vocoder = report.parts["vocoder"]
    assert not vocoder.missing and not vocoder.unexpected and not vocoder.mismatched
    mel = torch.randn(1, 64, 12)
    with torch.no_grad():
        assert torch.allclose(ours(mel), original(mel), atol=1e-5)


def test_vocoder_in_weight_norm_form_still_loads_as_it_is() -> None:
    source = _s_vocoder()
    state = {f"generator.{key}": value for key, value in source.state_dict().items()}
    per_part, report = map_state_dict(state, {"vocoder": _s_vocoder()})
    assert not report.parts["vocoder"].missing and not report.parts["vocoder"].unexpected
    assert all(torch.equal(per_part["vocoder"][key], value) for key, value in source.state_dict().items())


_OPTIMIZER_PROBE = r"""
import json, sys, torch, torch.distributed as dist
from audioldm_dist.config import TrainConfig
from audioldm_dist.engine.ds_config import initialize_engine, load_ds_config
dist.init_process_group("gloo")
out = {}
for name in sys.argv[1:]:
    train = TrainConfig(micro_batch_size=1, learning_rate=1e-3, warmup_steps=4)
    torch.manual_seed(0)
    model, reference = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    reference.load_state_dict(model.state_dict())
    engine = initialize_engine(model, load_ds_config(f"configs/ds/{name}.json", train, world_size=1), fresh=True)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    adamw = torch.optim.AdamW(reference.parameters(), lr=1e-3)  # the original: torch defaults (ddpm.py:1046-1072)
    lrs = []
    for step in range(7):
        lrs.append(inner.param_groups[0]["lr"])
        for group in adamw.param_groups:  # the original's warmup_step (ddpm.py:560-578)
            group["lr"] = 1e-3 * (step / 4 if step <= 4 else 1.0)
        x = torch.randn(2, 3)
        engine.backward(engine(x).pow(2).sum() * 50)  # large gradients: clipping at 1 would show
        engine.step()
        adamw.zero_grad()
        (reference(x).pow(2).sum() * 50).backward()
        adamw.step()
    group = {k: v for k, v in inner.param_groups[0].items() if k in ("betas", "eps", "weight_decay")}
    difference = max((a.detach().float() - b.detach()).abs().max().item()
                     for a, b in zip(engine.module.parameters(), reference.parameters()))
    out[name] = {"lrs": lrs, "group": group, "clip": engine.gradient_clipping(), "difference": difference}
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_shipped_deepspeed_configs_train_with_the_original_optimizer_and_warmup(tmp_path: Path) -> None:
    """AdamW (torch defaults: weight decay 0.01), lr·min(g/W, 1) before update g, no clipping: the engine's
    optimiser state and its updates equal torch.optim.AdamW driven by the original's warmup_step."""
    script = tmp_path / "probe.py"
    script.write_text(_OPTIMIZER_PROBE)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(script), "zero1", "zero2", "zero2_offload"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    probes = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))[7:])
    expected_lrs = [1e-3 * min(g / 4, 1.0) for g in range(7)]
    for name, probe in probes.items():
        assert probe["lrs"] == pytest.approx(expected_lrs, abs=1e-12), name
        assert probe["group"] == {"betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}, name
        assert probe["clip"] == 0.0, name
        assert probe["difference"] < 1e-6, (name, probe["difference"])


def test_every_shipped_deepspeed_config_is_the_original_optimizer_unless_named_otherwise() -> None:
    for path in sorted((ROOT / "configs" / "ds").glob("*.json")):
        ds = json.loads(path.read_text())
        assert ds["gradient_clipping"] == 0.0, path.name
        if path.stem == "vae":  # the autoencoder stage: Adam(betas=(0.5, 0.9)), no decay (autoencoder.py:471-493)
            assert ds["optimizer"] == {"type": "Adam", "params": {"lr": "auto", "betas": [0.5, 0.9], "eps": 1e-8,
                                                                  "weight_decay": 0.0}}
            continue
        assert ds["optimizer"] == {"type": "AdamW", "params": {"lr": "auto", "betas": [0.9, 0.999], "eps": 1e-8,
                                                               "weight_decay": 0.01}}, path.name
        expected = "WarmupCosineLR" if path.stem == "zero2_cosine" else "WarmupLR"  # the one named option
        assert ds["scheduler"]["type"] == expected, path.name


def test_shipped_model_configs_train_on_the_original_schedule() -> None:
    for name in ("audioldm_s", "audioldm_m", "audioldm_flant5"):
        train = load_config(ROOT / "configs" / f"{name}.yaml").train
        assert (train.learning_rate, train.warmup_steps, train.max_steps, train.micro_batch_size,
                train.gradient_accumulation_steps, train.save_every) == (1e-4, 2000, 800_000, 2, 1, 5000), name
