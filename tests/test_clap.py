"""The original's CLAP in transformers: key conversion, offline config, front end, equivalence with laion_clap."""
from __future__ import annotations

import sys
import types

import pytest
import torch

from audioldm_dist.config import ConditionerConfig
from audioldm_dist.models.clap import (ROBERTA_BASE, ClapAudioFrontEnd, convert_laion_state_dict, fit_clap_length,
                                       laion_clap_config)
from audioldm_dist.models.conditioners import build_conditioner
from reference_files import load_reference

CLAP_SHAPES_FILE = "clap_state_dict_shapes.json"
LAION_INSTALL = ("pip install --no-deps laion-clap torchlibrosa && "
                 "pip install librosa ftfy h5py wget pandas scikit-learn braceexpand webdataset")


def clap_reference() -> dict:
    return load_reference(CLAP_SHAPES_FILE)


def released_clap_state(*, prefix: str = "cond_stage_model.model.", seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors in the exact released layout (418 keys)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, spec in clap_reference()["released_checkpoint_layout"].items():
        dtype = getattr(torch, spec["dtype"])
        state[prefix + key.removeprefix("cond_stage_model.model.")] = (
            torch.randn(spec["shape"], generator=generator) if dtype.is_floating_point
            else torch.randint(0, 64, spec["shape"], generator=generator).to(dtype))
    return state


def offline_clap(amodel: str = "HTSAT-tiny"):
    return build_conditioner(ConditionerConfig(kind="clap", pretrained="", amodel=amodel, max_length=512),
                             load_weights=False)


def test_released_layout_converts_and_loads_strictly_dropping_exactly_the_documented_keys() -> None:
    reference = clap_reference()
    state = released_clap_state()
    converted, dropped = convert_laion_state_dict(state)
    assert sorted(dropped) == sorted(reference["mapping_summary"]["unmatched_keys"]) and len(dropped) == 20
    expected = {hf["key"]: hf["shape"] for entry in reference["mapping"] if entry["all_ok"] for hf in entry["hf"]}
    assert {key: list(converted[key].shape) for key in expected} == expected  # the reference mapping, key by key
    model = offline_clap().model
    model.load_state_dict(converted, strict=True)
    assert set(model.state_dict()) == set(reference["transformers_ClapModel"])
    # the qkv split: query/key/value are the thirds of the fused tensor
    fused = state["cond_stage_model.model.audio_branch.layers.0.blocks.0.attn.qkv.weight"]
    query = model.state_dict()["audio_model.audio_encoder.layers.0.blocks.0.attention.self.query.weight"]
    torch.testing.assert_close(query, fused[: fused.shape[0] // 3])


def test_the_training_repo_and_standalone_prefixes_convert_the_same() -> None:
    released, _ = convert_laion_state_dict(released_clap_state())
    training_repo, dropped = convert_laion_state_dict(released_clap_state(prefix="cond_stage_models.0.model."))
    standalone, _ = convert_laion_state_dict(released_clap_state(prefix="module."))
    assert released.keys() == training_repo.keys() == standalone.keys() and len(dropped) == 20


def test_offline_config_builds_exactly_the_released_clapmodel_shapes() -> None:
    reference = clap_reference()["transformers_ClapModel"]
    shapes = {key: list(value.shape) for key, value in offline_clap().model.state_dict().items()}
    assert shapes == {key: spec["shape"] for key, spec in reference.items()}
    base = laion_clap_config(amodel="HTSAT-base")
    assert (base.audio_config.patch_embeds_hidden_size, list(base.audio_config.depths),
            base.audio_config.hidden_size) == (128, [2, 2, 12, 2], 1024)
    assert base.text_config.layer_norm_eps == 1e-5 and base.text_config.type_vocab_size == 1


def test_length_rule_keeps_the_first_480000_samples_and_repeat_pads_shorter_clips() -> None:
    long = torch.arange(491520.0)[None]  # 10.24 s at 48 kHz
    assert torch.equal(fit_clap_length(long), long[:, :480000])
    short = torch.arange(1.0, 200001.0)[None]
    filled = fit_clap_length(short)
    assert filled.shape == (1, 480000) and torch.equal(filled[0, 200000:400000], short[0])
    assert filled[0, 400000:].abs().sum() == 0


def test_front_end_matches_torchlibrosa_as_laion_htsat_builds_it() -> None:
    stft = pytest.importorskip("torchlibrosa.stft", reason=f"torchlibrosa not installed ({LAION_INSTALL})")
    spectrogram = stft.Spectrogram(n_fft=1024, hop_length=480, win_length=1024, window="hann", center=True,
                                   pad_mode="reflect", freeze_parameters=True)
    logmel = stft.LogmelFilterBank(sr=48000, n_fft=1024, n_mels=64, fmin=50, fmax=14000, ref=1.0, amin=1e-10,
                                   top_db=None, freeze_parameters=True)
    audio = 0.3 * torch.randn(2, 480000, generator=torch.Generator().manual_seed(0))
    expected = logmel(spectrogram(audio))  # (B, 1, frames, 64)
    ours = ClapAudioFrontEnd()(audio, sample_rate=48000)
    assert ours.shape == expected.shape == (2, 1, 1001, 64)
    assert (ours - expected).abs().max() < 2e-3  # dB; float32 conv-DFT vs FFT


def _import_laion(monkeypatch: pytest.MonkeyPatch):
    """laion_clap's model code, offline: RoBERTa from roberta-base's config values instead of the hub (as the
    reference shapes were built); torchvision (image transforms it never uses here) stubbed if missing."""
    from transformers import RobertaConfig, RobertaModel

    try:
        import torchvision  # noqa: F401
    except ImportError:
        class _Any:
            def __init__(self, *args, **kwargs) -> None:
                pass
        names = {"torchvision": {}, "torchvision.datasets": {}, "torchvision.ops": {},
                 "torchvision.ops.misc": {"FrozenBatchNorm2d": _Any},
                 "torchvision.transforms": {name: _Any for name in ("Normalize", "Compose", "RandomResizedCrop",
                                                                    "InterpolationMode", "ToTensor", "Resize",
                                                                    "CenterCrop")}}
        for name, attributes in names.items():
            module = types.ModuleType(name)
            module.__dict__.update(attributes)
            monkeypatch.setitem(sys.modules, name, module)
    try:
        from laion_clap.clap_module import create_model
    except ImportError as error:
        pytest.skip(f"laion_clap is not importable ({error}); install with: {LAION_INSTALL}")
    monkeypatch.setattr(RobertaModel, "from_pretrained",
                        classmethod(lambda cls, *args, **kwargs: cls(RobertaConfig(**ROBERTA_BASE))))
    return create_model


def test_converted_clap_gives_laion_clap_text_and_audio_embeddings(monkeypatch: pytest.MonkeyPatch) -> None:
    import torchaudio

    create_model = _import_laion(monkeypatch)
    torch.manual_seed(0)
    laion, _ = create_model("HTSAT-tiny", "roberta", pretrained="", precision="fp32", device="cpu",
                            enable_fusion=False)
    laion.eval()
    state = laion.state_dict()
    for key in state:  # non-trivial BatchNorm statistics, so that a wrong mapping of bn0 shows
        if key.endswith(("running_mean", "running_var")):
            state[key] = torch.rand_like(state[key]) + (0.5 if key.endswith("var") else -0.5)
    laion.load_state_dict(state)
    ours = offline_clap()
    assert ours.load_laion_state_dict(state, source="laion") and len(ours.load_laion_state_dict(state, source="x")) > 0

    input_ids = torch.randint(3, 50000, (2, 40), generator=torch.Generator().manual_seed(1))
    input_ids[:, 0], input_ids[0, 30], input_ids[0, 31:] = 0, 2, 1  # <s> … </s> <pad>…
    input_ids[1, 39] = 2
    attention_mask = (input_ids != 1).long()
    with torch.no_grad():
        expected_text = laion.get_text_embedding({"input_ids": input_ids, "attention_mask": attention_mask})
        text = torch.nn.functional.normalize(
            ours.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output, dim=-1)
    assert (text - expected_text).abs().max() < 1e-4, float((text - expected_text).abs().max())  # measured 1e-7

    waveform = 0.1 * torch.randn(2, 1, 163840, generator=torch.Generator().manual_seed(2))  # 10.24 s at 16 kHz
    with torch.no_grad():  # the original's path: conditional_models.py:1291-1313 and get_audio_features
        audio_48k = torchaudio.functional.resample(waveform, orig_freq=16000, new_freq=48000).squeeze(1)
        assert audio_48k.shape[-1] > 480000
        expected_audio = laion.get_audio_embedding([{"waveform": clip[:480000], "longer": torch.tensor([True])}
                                                    for clip in audio_48k])
    audio = ours.encode_audio(waveform, sample_rate=16000).film
    assert (audio - expected_audio).abs().max() < 1e-4, float((audio - expected_audio).abs().max())  # 6e-8
    assert (audio - text).abs().max() > 1e-2  # the two towers give different vectors: the test can tell


def test_load_pretrained_converts_a_released_clap_and_keeps_our_export_layout() -> None:
    from types import SimpleNamespace

    from audioldm_dist.pretrained import load_conditioner_unless_supplied, load_pretrained

    holder = SimpleNamespace(conditioner=offline_clap())  # pretrained="": only a checkpoint can fill it
    state = released_clap_state(seed=3) | {"model.diffusion_model.x": torch.zeros(1)}
    report = load_pretrained(holder, state, parts=("conditioner",))
    part = report.parts["conditioner"]
    assert (len(part.matched), part.missing, part.unexpected, len(part.ignored)) == (447, [], [], 20)
    weight = holder.conditioner.model.text_projection.linear1.weight
    torch.testing.assert_close(weight, state["cond_stage_model.model.text_projection.0.weight"])
    load_conditioner_unless_supplied(holder, report, checkpoint="released")  # supplied: `pretrained` not read

    ours = {f"cond_stage_model.{key}": 2 * value for key, value in holder.conditioner.state_dict().items()}
    report = load_pretrained(holder, ours, parts=("conditioner",))
    assert (len(report.parts["conditioner"].matched), report.parts["conditioner"].ignored) == (447, [])
    torch.testing.assert_close(holder.conditioner.model.text_projection.linear1.weight,
                               2 * state["cond_stage_model.model.text_projection.0.weight"])
    with pytest.raises(ValueError, match="conditioner.pretrained is empty"):
        load_conditioner_unless_supplied(holder, None, checkpoint=None)
