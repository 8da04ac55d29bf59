from pathlib import Path

import pytest

from audioldm_dist.config import AudioConfig, Config, load_config

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    config = load_config(path)
    assert isinstance(config, Config)
    assert config.audio.num_samples == int(config.audio.sampling_rate * config.audio.duration)


def test_defaults_match_the_original_audioldm_preprocessing() -> None:
    config = load_config(None)
    assert config.audio.num_samples == 163840
    assert config.audio.num_frames == 1024


def test_override_sets_a_nested_field_with_its_type() -> None:
    config = load_config(CONFIG_DIR / "audioldm_s.yaml", ["audio.duration=5.12", "data.train=[a, b]"])
    assert config.audio.duration == 5.12
    assert config.data.train == ["a", "b"]
    assert config.audio.num_frames == 512


def test_unknown_key_names_the_key_and_the_allowed_ones(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("audio:\n  durration: 5\n")
    with pytest.raises(ValueError, match=r"unknown key 'durration' in AudioConfig; allowed: .*duration"):
        load_config(path)


def test_unknown_override_section_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown key 'audoi'"):
        load_config(None, ["audoi.duration=5"])


def test_wrong_type_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"audio.*sampling_rate.*expected a number"):
        load_config(None, ["audio.sampling_rate=fast"])


def test_override_without_equals_sign_is_explained() -> None:
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        load_config(None, ["audio.duration"])


def test_invalid_combination_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="Nyquist"):
        AudioConfig(sampling_rate=8000, mel_fmax=8000)
