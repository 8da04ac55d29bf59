"""Model parts: shapes, released-checkpoint layout, attention backends, sampling, overfitting, loaders."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from audioldm_dist.config import Config, ConditionerConfig, UNetConfig, VAEConfig, VocoderConfig, load_config
from audioldm_dist.diffusion.objective import diffusion_loss
from audioldm_dist.ldm import AudioLDM
from audioldm_dist.models.attention import BACKENDS, scaled_dot_product, select_backend
from audioldm_dist.models.unet import UNetModel
from audioldm_dist.models.vae import AutoencoderKL
from audioldm_dist.models.vocoder import HiFiGAN
from audioldm_dist.original_config import read_original_config, unmapped_reason
from audioldm_dist.pretrained import CheckpointError, load_pretrained
from reference_files import load_reference

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["a steady sine wave tone", "a rising chirp", "bursts of white noise", "a slow rhythmic beat"]
SHAPES_FILE = "audioldm_s_state_dict_shapes.json"


def _reference_shapes() -> dict:
    return load_reference(SHAPES_FILE)


@pytest.fixture(scope="module")
def tiny() -> AudioLDM:
    torch.manual_seed(0)
    return AudioLDM(load_config(ROOT / "configs" / "tiny.yaml"), captions=CAPTIONS)


def test_shapes_through_encode_unet_decode_vocoder(tiny: AudioLDM) -> None:
    frames, mels = tiny.config.audio.num_frames, tiny.config.audio.n_mel_channels
    log_mel = torch.randn(2, frames, mels)
    z = tiny.latents(log_mel)
    assert z.shape == (2, *tiny.latent_shape) == (2, 8, frames // 4, mels // 4)
    condition = tiny.conditioner.encode_text(CAPTIONS[:2], device=torch.device("cpu"))
    assert condition.film.shape == (2, 32)
    out = tiny.denoise(z, torch.tensor([1, 500]), condition)
    assert out.shape == z.shape
    mel = tiny.vae.decode(z)
    assert mel.shape == (2, 1, frames, mels)
    waveform = tiny.vocoder(mel.squeeze(1).transpose(1, 2))
    assert waveform.shape == (2, 1, frames * 160)


def test_released_s_layout_loads_strictly_into_unet_vae_and_vocoder() -> None:
    shapes = _reference_shapes()
    parts = {
        "unet_model.diffusion_model": (UNetModel(UNetConfig()), "model.diffusion_model."),
        "vae_first_stage_model": (AutoencoderKL(VAEConfig()), "first_stage_model."),
        "hifigan_16k_64bins_generator": (HiFiGAN(VocoderConfig(**{
            k: v for k, v in shapes["hifigan_16k_64bins_config"].items()
            if k in ("upsample_rates", "upsample_kernel_sizes", "upsample_initial_channel", "resblock_kernel_sizes",
                     "resblock_dilation_sizes", "num_mels")})), "generator."),
    }
    for part, (module, prefix) in parts.items():
        state = {key[len(prefix):]: torch.randn(shape) for key, shape in shapes[part].items()}
        if part == "vae_first_stage_model":
            state["scale_factor"] = torch.tensor(0.7)  # ours: the LatentDiffusion's top-level buffer
        module.load_state_dict(state, strict=True)
        if part == "unet_model.diffusion_model":
            assert sum(p.numel() for p in module.parameters()) == 185_036_552


def test_attention_backends_agree_in_float32() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 33, 16) for _ in range(3))
    mask = torch.ones(2, 33, dtype=torch.bool)
    mask[1, 20:] = False
    available = ["sdpa", "math"] + (["xformers"] if torch.cuda.is_available() else [])
    for use_mask in (None, mask):
        outputs = {name: scaled_dot_product(q, k, v, backend=name, mask=use_mask) for name in available}
        for name in available:
            assert torch.allclose(outputs[name], outputs["math"], atol=1e-5), name
    if not torch.cuda.is_available():
        assert select_backend("auto") == "sdpa"
        with pytest.raises(ValueError, match="needs CUDA"):
            select_backend("xformers")


def test_unet_output_is_the_same_with_every_backend() -> None:
    torch.manual_seed(0)
    unet = UNetModel(UNetConfig(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[1, 2],
                                num_head_channels=16, film_dim=8, context_dims=[12]))
    for parameter in unet.parameters():  # zero-initialised output layers would hide differences
        torch.nn.init.normal_(parameter, std=0.05)
    x, t, film = torch.randn(2, 8, 16, 8), torch.tensor([3, 700]), torch.randn(2, 8)
    context, context_mask = torch.randn(2, 5, 12), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    outputs = {}
    for backend in ("sdpa", "math"):
        unet.set_attention_backend(backend)
        outputs[backend] = unet(x, t, film=film, contexts=[context], context_masks=[context_mask])
    assert torch.allclose(outputs["sdpa"], outputs["math"], atol=1e-5)
    assert set(BACKENDS) == {"xformers", "sdpa", "math"}


def test_ddim_with_guidance_gives_finite_audio_of_the_right_length(tiny: AudioLDM) -> None:
    tiny.eval()
    first = tiny.generate(CAPTIONS[:2], num_steps=4, guidance_scale=3.5, generator=torch.Generator().manual_seed(1))
    again = tiny.generate(CAPTIONS[:2], num_steps=4, guidance_scale=3.5, generator=torch.Generator().manual_seed(1))
    assert first.shape == (2, 1, tiny.config.audio.num_samples)
    assert torch.isfinite(first).all() and first.abs().max() <= 1.0
    assert torch.equal(first, again)


@pytest.mark.slow
def test_tiny_model_overfits_one_batch() -> None:
    torch.manual_seed(0)
    config = load_config(ROOT / "configs" / "tiny.yaml", ["conditioner.ucg_rate=0", "conditioner.ucg_sample_rate=0",
                                                             "conditioner.embed_mode=text"])
    model = AudioLDM(config, captions=CAPTIONS)
    model.train()
    batch = {"log_mel_spec": torch.randn(2, config.audio.num_frames, 64) * 2 - 4, "text": CAPTIONS[:2]}
    model.vae.scale_factor.fill_(model.latent_scale_from(batch))
    x0 = model.latents(batch["log_mel_spec"], generator=torch.Generator().manual_seed(0))
    condition = model.condition(batch, device=torch.device("cpu"))

    def loss_with(seed: int) -> torch.Tensor:
        return diffusion_loss(lambda x_t, t: model.denoise(x_t, t, condition), x0, schedule=model.schedule,
                              generator=torch.Generator().manual_seed(seed))

    def evaluate() -> float:  # the same 16 draws of (t, noise) before and after
        with torch.no_grad():
            return sum(loss_with(10_000 + i).item() for i in range(16)) / 16

    num_steps = 800
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3)
    decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / num_steps)
    before = evaluate()
    for step in range(num_steps):
        optimizer.zero_grad()
        loss_with(step).backward()
        optimizer.step()
        decay.step()
    after = evaluate()
    assert after < before / 10, (before, after)


def test_frozen_parts_are_not_trainable(tiny: AudioLDM) -> None:
    trainable = {id(p) for p in tiny.trainable_parameters()}
    assert trainable == {id(p) for p in tiny.unet.parameters()}
    for part in (tiny.vae, tiny.vocoder, tiny.conditioner):
        assert not any(p.requires_grad for p in part.parameters())
    tiny.train()
    assert not tiny.vae.training and not tiny.conditioner.training and tiny.unet.training


def test_guidance_dropout_swaps_in_the_empty_caption_embedding(tiny: AudioLDM) -> None:
    device = torch.device("cpu")
    condition = tiny.conditioner.encode_text(CAPTIONS[:2], device=device)
    empty = tiny.conditioner.unconditional(device)
    always = ConditionerConfig(**{**tiny.config.conditioner.__dict__, "ucg_rate": 1.0})
    tiny.conditioner.config, saved = always, tiny.conditioner.config
    dry_run_finished, tiny.conditional_dry_run_finished = tiny.conditional_dry_run_finished, True
    try:  # the training path: a whole-batch drop (ucg_rate 1) past the original's dry run
        dropped = tiny.training_condition({"text": CAPTIONS[:2]}, mode="text", batch_size=2, device=device,
                                          generator=torch.Generator().manual_seed(0))
    finally:
        tiny.conditioner.config, tiny.conditional_dry_run_finished = saved, dry_run_finished
    assert torch.allclose(dropped.film, empty.film.expand(2, -1))
    assert not torch.allclose(condition.film, dropped.film)


def test_cross_attention_variant_with_t5_runs_with_a_padding_mask() -> None:
    config = load_config(ROOT / "configs" / "tiny.yaml",
                         ["unet.film_dim=0", "unet.context_dims=[64]", "conditioner.kind=t5", "conditioner.tiny={}"])
    model = AudioLDM(config, captions=CAPTIONS)
    condition = model.conditioner.encode_text(["a tone", "a slow rhythmic beat with clicks"], device=torch.device("cpu"))
    assert condition.contexts[0].shape[-1] == 64 and not condition.masks[0][0].all()
    loss = model.loss({"log_mel_spec": torch.randn(2, 128, 64), "text": ["a tone", "a slow rhythmic beat"]})
    assert torch.isfinite(loss)
    assert model.generate(["a tone"], num_steps=2).shape == (1, 1, config.audio.num_samples)


def _fake_released_checkpoint(path: Path, *, break_key: str | None = None) -> None:
    shapes = _reference_shapes()
    state = {}
    for part in ("unet_model.diffusion_model", "vae_first_stage_model"):
        for key, shape in shapes[part].items():
            state[key] = torch.zeros(shape)
    state["scale_factor"] = torch.tensor(0.6)
    if break_key:
        state[break_key] = torch.zeros(3, 3)
    torch.save({"state_dict": state}, path)


def test_load_pretrained_reports_missing_and_rejects_shape_mismatch(tmp_path: Path) -> None:
    config = load_config(ROOT / "configs" / "audioldm_s.yaml",
                         ["conditioner.random_init=true", "conditioner.tiny={projection_dim: 512}"])
    model = AudioLDM(config, captions=CAPTIONS)
    good, bad = tmp_path / "good.ckpt", tmp_path / "bad.ckpt"
    _fake_released_checkpoint(good)
    report = load_pretrained(model, good)
    assert len(report.parts["unet"].matched) == 690 and len(report.parts["vocoder"].missing) == 291
    assert float(model.vae.scale_factor) == pytest.approx(0.6)
    assert model.unet.out[2].weight.abs().sum() == 0
    _fake_released_checkpoint(bad, break_key="model.diffusion_model.out.2.weight")
    with pytest.raises(CheckpointError, match=r"model\.diffusion_model\.out\.2\.weight: checkpoint \(3, 3\)"):
        load_pretrained(model, bad)


@pytest.mark.slow
def test_check_checkpoint_cli_exit_codes(tmp_path: Path) -> None:
    good, bad, junk = tmp_path / "good.ckpt", tmp_path / "bad.ckpt", tmp_path / "junk.ckpt"
    _fake_released_checkpoint(good)
    _fake_released_checkpoint(bad, break_key="first_stage_model.decoder.conv_out.weight")
    junk.write_bytes(b"not a checkpoint")
    args = [sys.executable, "-m", "audioldm_dist.check_checkpoint", "--config", str(ROOT / "configs" / "audioldm_s.yaml"),
            "--set", "conditioner.random_init=true", "--set", "conditioner.tiny={projection_dim: 512}"]
    ok = subprocess.run([*args, str(good)], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "unet              690        0           0             0" in ok.stdout
    mismatch = subprocess.run([*args, str(bad)], capture_output=True, text=True, timeout=300)
    assert mismatch.returncode == 1 and "SHAPE ERROR vae: first_stage_model.decoder.conv_out.weight" in mismatch.stdout
    unreadable = subprocess.run([*args, str(junk)], capture_output=True, text=True, timeout=300)
    assert unreadable.returncode == 2 and "not a readable torch checkpoint" in unreadable.stderr


def test_original_yaml_maps_onto_our_config() -> None:
    config, unmapped = read_original_config(ROOT / "tests" / "data" / "audioldm_original.yaml")
    assert isinstance(config, Config)
    assert config.unet == UNetConfig()  # audioldm_original.yaml is AudioLDM-S
    assert config.audio.duration == 10.24 and config.data.train == []  # dataset names: make-shards' input
    assert "make-shards" in unmapped_reason("data.train") and "metadata_root" in unmapped
    # The YAML's embed_mode is overridden at every training step by the text/audio switch: mixed.
    assert config.conditioner.kind == "clap" and config.conditioner.embed_mode == "mixed"
    assert config.conditioner.pretrained == "data/checkpoints/clap_htsat_tiny.pt"
    assert config.conditioner.amodel == "HTSAT-tiny" and config.conditioner.max_length == 512
    assert config.diffusion.ddim_steps == 200 and config.diffusion.guidance_scale == 3.5
    train = config.train  # the original's schedule (step.*, base_learning_rate, warmup_steps, batchsize)
    assert (train.learning_rate, train.warmup_steps, train.max_steps, train.micro_batch_size, train.save_every,
            train.keep_last) == (1e-4, 2000, 800_000, 2, 5000, 1)
    assert "model.params.base_learning_rate" not in unmapped and "step.max_steps" not in unmapped
    unknown = [key for key in unmapped if unmapped_reason(key).startswith("no counterpart here and no known reason")]
    assert not unknown, f"original keys dropped without a reason: {unknown}"
    assert (config.vae.disc_start, config.vae.kl_weight, config.vae.disc_weight) == (25000, 1000.0, 0.5)


def test_original_vae_yaml_maps_onto_a_vae_stage_config() -> None:
    """16k_64.yaml: the autoencoder's params at the top; disc_start counts Lightning's 2 steps per batch."""
    config, unmapped = read_original_config(ROOT / "tests" / "data" / "vae_16k_64_original.yaml")
    assert config.train.target == "vae" and config.train.learning_rate == 8e-6 and config.train.micro_batch_size == 4
    assert config.train.warmup_steps == 0 and not config.vae.scale_by_std
    assert (config.vae.disc_start, config.vae.kl_weight, config.vae.disc_weight) == (25000, 1000.0, 0.5)
    assert (config.vae.ch, config.vae.ch_mult, config.vae.embed_dim) == (128, [1, 2, 4], 8)
    unknown = [key for key in unmapped if unmapped_reason(key).startswith("no counterpart here and no known reason")]
    assert not unknown, f"original keys dropped without a reason: {unknown}"


@pytest.mark.parametrize("parameterization", ["eps", "v", "x0"])
def test_every_parameterisation_recovers_noise_and_clean_latents(parameterization: str) -> None:
    from audioldm_dist.config import DiffusionConfig
    from audioldm_dist.diffusion.schedule import NoiseSchedule

    schedule = NoiseSchedule(DiffusionConfig(parameterization=parameterization))
    assert schedule.betas[0].item() == pytest.approx(0.0015) and schedule.betas[-1].item() == pytest.approx(0.0195)
    x0, noise, t = torch.randn(3, 8, 4, 4), torch.randn(3, 8, 4, 4), torch.tensor([0, 400, 999])
    x_t = schedule.add_noise(x0, noise, t)
    target = {"eps": noise, "x0": x0, "v": schedule.velocity(x0, noise, t)}[parameterization]
    eps, x0_hat = schedule.to_eps_and_x0(target, x_t, t)
    assert torch.allclose(eps, noise, atol=1e-4) and torch.allclose(x0_hat, x0, atol=1e-4)


def test_ema_tracks_the_weights_and_round_trips() -> None:
    from audioldm_dist.diffusion.ema import EMA

    model = torch.nn.Linear(4, 4)
    ema = EMA(model, decay=0.5)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # warm-up decay min(0.5, 2/11) → the shadow moves 9/11 of the way
    assert torch.allclose(ema.shadow["weight"], start + 9 / 11, atol=1e-6)
    restored = EMA(torch.nn.Linear(4, 4), decay=0.9)
    restored.load_state_dict(ema.state_dict())
    restored.copy_to(model)
    assert torch.allclose(model.weight, start + 9 / 11, atol=1e-6) and restored.num_updates == 1


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    config = UNetConfig(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[2],
                        num_head_channels=16, film_dim=8)
    plain = UNetModel(config)
    checkpointed = UNetModel(UNetConfig(**{**config.__dict__, "gradient_checkpointing": True}))
    checkpointed.load_state_dict(plain.state_dict())
    x, t, film = torch.randn(2, 8, 16, 8), torch.tensor([3, 700]), torch.randn(2, 8)
    grads = []
    for model in (plain, checkpointed):
        model.train()
        model(x, t, film=film).pow(2).mean().backward()
        grads.append(model.time_embed[0].weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_clap_audio_embedding_mode(tiny: AudioLDM) -> None:
    waveform = torch.randn(2, 1, 16000) * 0.1
    condition = tiny.conditioner.encode_audio(waveform, sample_rate=16000)
    assert condition.film.shape == (2, 32)
    assert torch.allclose(condition.film.norm(dim=-1), torch.ones(2), atol=1e-5)
