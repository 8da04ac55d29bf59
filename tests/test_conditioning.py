"""The original's conditioning recipe (ddpm.py:656-683, 1211-1215, 1276-1277; conditional_models.py:1321-1324),
checked statistically, and offline behaviour of every from_pretrained and of check_checkpoint."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from audioldm_dist.config import load_config
from audioldm_dist.ldm import AudioLDM
from audioldm_dist.models.conditioners import Condition

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["a dog barks", "rain on a roof", "a car passes", "birds sing"]
TEXT, AUDIO, EMPTY = 1.0, 2.0, 0.0  # what the stubbed encoders return, to tell the outcomes apart
N = 4000


def tiny_model(*overrides: str) -> AudioLDM:
    torch.manual_seed(0)
    return AudioLDM(load_config(ROOT / "configs" / "tiny.yaml", list(overrides)), captions=CAPTIONS)


@pytest.fixture(scope="module")
def clap_model() -> AudioLDM:
    return tiny_model()


@pytest.fixture(scope="module")
def t5_model() -> AudioLDM:
    return tiny_model("unet.film_dim=0", "unet.context_dims=[64]", "conditioner.kind=t5", "conditioner.tiny={}",
                      "conditioner.embed_mode=text")


def with_settings(model: AudioLDM, **changes) -> None:
    settings = dataclasses.replace(model.config.conditioner, **changes)
    model.config = dataclasses.replace(model.config, conditioner=settings)
    model.conditioner.config = settings
    model.conditional_dry_run_finished = True


def stub_encoders(model: AudioLDM, monkeypatch: pytest.MonkeyPatch) -> None:
    """Encoders that return a constant per path (text 1, audio 2, empty caption 0)."""
    dim = model.conditioner.embedding_dim

    def encode_text(texts, *, device):
        return Condition(film=torch.tensor([[EMPTY if text == "" else TEXT] for text in texts]).expand(-1, dim))

    def encode_audio(waveform, *, sample_rate):
        return Condition(film=torch.full((waveform.shape[0], dim), AUDIO))

    monkeypatch.setattr(model.conditioner, "encode_text", encode_text)
    monkeypatch.setattr(model.conditioner, "encode_audio", encode_audio)
    model.conditioner.forget_unconditional()


def outcomes(model: AudioLDM, *, mode: str, calls: int, generator: torch.Generator) -> torch.Tensor:
    """(calls, B) value of each sample's FiLM vector after the training recipe."""
    batch = {"text": CAPTIONS, "waveform": torch.zeros(len(CAPTIONS), 1, 160)}
    rows = [model.training_condition(batch, mode=mode, batch_size=len(CAPTIONS), device=torch.device("cpu"),
                                     generator=generator).film[:, 0] for _ in range(calls)]
    return torch.stack(rows)


def within(observed: float, expected: float, *, count: int) -> bool:
    return abs(observed - expected) < 5 * (expected * (1 - expected) / count) ** 0.5


def test_mixed_mode_uses_text_with_probability_phi_of_half(clap_model: AudioLDM) -> None:
    with_settings(clap_model, embed_mode="mixed")
    generator = torch.Generator().manual_seed(0)
    modes = [clap_model.training_embed_mode(generator=generator) for _ in range(N)]
    assert set(modes) == {"text", "audio"}
    assert within(modes.count("text") / N, 0.6915, count=N)  # Φ(0.5), not a uniform 0.5
    with_settings(clap_model, embed_mode="text")
    assert {clap_model.training_embed_mode(generator=generator) for _ in range(100)} == {"text"}


def test_loss_encodes_the_waveform_in_audio_mode(clap_model: AudioLDM, monkeypatch: pytest.MonkeyPatch) -> None:
    with_settings(clap_model, embed_mode="mixed", ucg_rate=0.0, ucg_sample_rate=0.0)
    stub_encoders(clap_model, monkeypatch)
    seen: list[float] = []
    record = clap_model.training_condition

    def training_condition(*args, **kwargs) -> Condition:
        condition = record(*args, **kwargs)
        seen.append(float(condition.film[0, 0]))
        return condition

    monkeypatch.setattr(clap_model, "training_embed_mode", lambda *, generator: "audio")
    monkeypatch.setattr(clap_model, "training_condition", training_condition)
    batch = {"text": CAPTIONS[:2], "waveform": torch.randn(2, 1, clap_model.config.audio.num_samples)}
    clap_model.loss(batch, generator=torch.Generator().manual_seed(0))
    assert seen == [AUDIO]


def test_batch_and_sample_dropout_rates(clap_model: AudioLDM, monkeypatch: pytest.MonkeyPatch) -> None:
    with_settings(clap_model, ucg_rate=0.1, ucg_sample_rate=0.1)
    stub_encoders(clap_model, monkeypatch)
    values = outcomes(clap_model, mode="text", calls=N, generator=torch.Generator().manual_seed(1))
    whole = (values == EMPTY).all(dim=1)
    assert within(whole.float().mean().item(), 0.1 + 0.9 * 0.1 ** 4, count=N)  # per batch (+ all 4 by chance)
    kept = values[~whole]
    assert within((kept == EMPTY).float().mean().item(), 0.1, count=kept.numel())  # per sample
    assert within((values == EMPTY).float().mean().item(), 0.19, count=values.numel())  # 0.1 + 0.9·0.1
    assert set(values.unique().tolist()) == {EMPTY, TEXT}


def test_first_call_never_drops_and_later_calls_do(clap_model: AudioLDM, monkeypatch: pytest.MonkeyPatch) -> None:
    with_settings(clap_model, ucg_rate=1.0, ucg_sample_rate=0.0)
    stub_encoders(clap_model, monkeypatch)
    clap_model.conditional_dry_run_finished = False
    generator = torch.Generator().manual_seed(2)
    assert (outcomes(clap_model, mode="text", calls=1, generator=generator) == TEXT).all()
    assert (outcomes(clap_model, mode="text", calls=3, generator=generator) == EMPTY).all()


def test_randomness_comes_from_the_generator_only(clap_model: AudioLDM, monkeypatch: pytest.MonkeyPatch) -> None:
    with_settings(clap_model, embed_mode="mixed", ucg_rate=0.5, ucg_sample_rate=0.5)
    stub_encoders(clap_model, monkeypatch)
    torch.manual_seed(123)
    global_state = torch.get_rng_state()
    first = outcomes(clap_model, mode="text", calls=50, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), global_state)
    again = outcomes(clap_model, mode="text", calls=50, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, again)


def test_unconditional_is_the_text_embedding_of_the_empty_caption_also_in_audio_mode(clap_model: AudioLDM) -> None:
    with_settings(clap_model, ucg_rate=0.0, ucg_sample_rate=1.0)
    clap_model.conditioner.forget_unconditional()
    batch = {"text": CAPTIONS[:2], "waveform": 0.1 * torch.randn(2, 1, clap_model.config.audio.num_samples)}
    empty_text = clap_model.conditioner.encode_text([""], device=torch.device("cpu")).film
    silence = clap_model.conditioner.encode_audio(torch.zeros(1, 1, 16000), sample_rate=16000).film
    assert (empty_text - silence).abs().max() > 1e-3  # the two candidates differ, so the check below can fail
    for mode in ("audio", "text"):
        film = clap_model.training_condition(batch, mode=mode, batch_size=2, device=torch.device("cpu"),
                                             generator=torch.Generator().manual_seed(0)).film
        torch.testing.assert_close(film, empty_text.expand(2, -1))
    with_settings(clap_model, ucg_rate=1.0, ucg_sample_rate=0.0)
    film = clap_model.training_condition(batch, mode="audio", batch_size=2, device=torch.device("cpu"),
                                         generator=torch.Generator().manual_seed(0)).film
    torch.testing.assert_close(film, empty_text.expand(2, -1))


def test_validation_loss_uses_text_without_dropout(clap_model: AudioLDM, monkeypatch: pytest.MonkeyPatch) -> None:
    with_settings(clap_model, embed_mode="mixed", ucg_rate=1.0, ucg_sample_rate=1.0)
    stub_encoders(clap_model, monkeypatch)
    monkeypatch.setattr(clap_model, "training_condition", lambda *a, **k: pytest.fail("training recipe in validation"))
    seen: list[Condition] = []
    record = clap_model.condition
    monkeypatch.setattr(clap_model, "condition", lambda *a, **k: seen.append(record(*a, **k)) or seen[-1])
    batch = {"text": CAPTIONS[:2], "waveform": torch.randn(2, 1, clap_model.config.audio.num_samples)}
    clap_model.loss(batch, generator=torch.Generator().manual_seed(0), guidance_dropout=False, reduction="none")
    assert len(seen) == 1 and (seen[0].film == TEXT).all()


def test_t5_has_only_the_per_batch_dropout(t5_model: AudioLDM) -> None:
    with_settings(t5_model, ucg_rate=0.0, ucg_sample_rate=1.0)
    device = torch.device("cpu")
    batch = {"text": CAPTIONS[:2]}
    expected = t5_model.condition(batch, device=device)
    kept = t5_model.training_condition(batch, mode="text", batch_size=2, device=device,
                                       generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(kept.contexts[0], expected.contexts[0])
    assert t5_model.training_embed_mode(generator=torch.Generator()) == "text"
    with_settings(t5_model, ucg_rate=1.0, ucg_sample_rate=0.0)
    dropped = t5_model.training_condition(batch, mode="text", batch_size=2, device=device,
                                          generator=torch.Generator().manual_seed(0))
    empty = t5_model.conditioner.encode_text([""], device=device)
    torch.testing.assert_close(dropped.contexts[0], empty.contexts[0].expand(2, -1, -1))
    assert torch.equal(dropped.masks[0], empty.masks[0].expand(2, -1))


def run_cli(args: list[str], **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env=environment)


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9"}])
def test_uncached_hub_name_is_one_clear_line_quickly(tmp_path: Path, env: dict) -> None:
    empty = tmp_path / "empty.ckpt"
    torch.save({"state_dict": {"scale_factor": torch.tensor(1.0)}}, empty)
    start = time.monotonic()
    result = run_cli(["audioldm_dist.check_checkpoint", str(empty), "--config", "configs/audioldm_s.yaml",
                      "--set", "conditioner.pretrained=nobody/no-such-clap"], HF_HOME=str(tmp_path / "hf"), **env)
    assert result.returncode == 2 and time.monotonic() - start < 30
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line, no traceback
    assert "conditioner.pretrained='nobody/no-such-clap' is a hub name that is not in the local cache" in result.stderr
    assert "save_pretrained folder" in result.stderr


def test_uncached_tokenizer_names_its_setting(clap_model: AudioLDM, monkeypatch: pytest.MonkeyPatch) -> None:
    from audioldm_dist.config import ConditionerConfig
    from audioldm_dist.models.conditioners import build_conditioner

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    conditioner = build_conditioner(ConditionerConfig(kind="clap", tokenizer="nobody/no-such-tokenizer",
                                                      random_init=False, pretrained=""), load_weights=False)
    with pytest.raises(ValueError, match=r"conditioner\.tokenizer='nobody/no-such-tokenizer' is a hub name that is "
                                         r"not in the local cache"):
        conditioner.encode_text(["a dog"], device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"conditioner\.pretrained is empty and no checkpoint supplied"):
        conditioner.load_weights()


def released_layout_file(path: Path) -> None:
    """UNet/VAE at AudioLDM-S shapes, the CLAP in laion layout, the vocoder with plain weights (as the original
    saves it); every tensor a stride-0 view of one number, so the file is small."""
    from test_clap import clap_reference
    from test_models import _reference_shapes

    zero = torch.zeros(())
    state = {key: zero.expand(shape) for part in ("unet_model.diffusion_model", "vae_first_stage_model")
             for key, shape in _reference_shapes()[part].items()}
    for key, spec in clap_reference()["released_checkpoint_layout"].items():
        state[key] = torch.zeros((), dtype=getattr(torch, spec["dtype"])).expand(spec["shape"])
    # The vocoder as the original saves it inside LDM checkpoints: plain weights, weight norm removed (194 tensors).
    from reference_files import load_reference

    plain = next(iter(load_reference("vocoder_in_ldm_checkpoint_shapes.json").values()))
    state |= {key: torch.ones(()).expand(shape) for key, shape in plain.items()}
    state["scale_factor"] = torch.tensor(0.6)
    torch.save({"state_dict": state}, path)


def test_check_checkpoint_of_a_released_layout_matches_every_part_offline(tmp_path: Path) -> None:
    checkpoint = tmp_path / "released.ckpt"
    released_layout_file(checkpoint)
    start = time.monotonic()
    result = run_cli(["audioldm_dist.check_checkpoint", str(checkpoint), "--config", "configs/audioldm_s.yaml"],
                     HF_HOME=str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - start < 60
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()
            if line.split() and line.split()[0] in ("unet", "vae", "vocoder", "conditioner")}
    assert set(rows) == {"unet", "vae", "vocoder", "conditioner"}
    for part, (matched, missing, unexpected, shape_errors, ignored) in rows.items():
        assert int(matched) > 0 and (missing, unexpected, shape_errors) == ("0", "0", "0"), (part, result.stdout)
    assert rows["conditioner"][0] == "447" and rows["conditioner"][4] == "20"
    assert rows["vocoder"][0] == "291"  # 97 weights as weight_g + weight_v, and the biases


def test_word_tokenizer_knows_every_word_of_its_captions_whatever_the_case() -> None:
    """The vocabulary was fitted lower-cased while text was encoded as written: "A4", "Hz" became <unk>, and
    captions that differ only there (the demo's notes) looked alike to a random_init encoder."""
    from audioldm_dist.models.conditioners import build_word_tokenizer

    captions = ["A steady sine wave tone at 440 Hz, the note A4", "A steady sine wave tone at 220 Hz, the note A3"]
    tokenizer = build_word_tokenizer(captions, max_length=32)
    for caption in captions:
        assert tokenizer.unk_token not in tokenizer.tokenize(caption), tokenizer.tokenize(caption)
    assert tokenizer(captions[0])["input_ids"] != tokenizer(captions[1])["input_ids"]
    assert tokenizer.tokenize("A DOG") == ["a", "<unk>"]
