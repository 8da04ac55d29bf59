import ast
import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

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


def _section_reads() -> set[tuple[str, str]]:
    """(section, field) pairs that the code reads: `X.field` where X names the section (`config.data.train`,
    `data.train`), or is a parameter annotated with the section's class (`config: UNetConfig`), or a name
    or attribute such a value is assigned to (`self.config = config`, `settings = self.config.conditioner`)."""
    sections = {hint.__name__: name for name, hint in typing.get_type_hints(Config).items()
                if dataclasses.is_dataclass(hint)}
    reads: set[tuple[str, str]] = set()
    root = CONFIG_DIR.parent
    for path in [*root.glob("audioldm_dist/**/*.py"), root / "train.py", *root.glob("launch/*.py")]:
        if path == root / "audioldm_dist" / "config.py":
            continue
        tree = ast.parse(path.read_text())
        aliases = {name: {name} for name in sections.values()}  # section → names that refer to it here
        for node in ast.walk(tree):
            if isinstance(node, ast.arg) and node.annotation is not None:
                section = sections.get(ast.unparse(node.annotation).strip("'\""))
                if section:
                    aliases[section].add(node.arg)
        for node in ast.walk(tree):  # self.config = config (config: UNetConfig); settings = config.conditioner
            if isinstance(node, ast.Assign) and isinstance(node.value, (ast.Name, ast.Attribute)):
                value = node.value.id if isinstance(node.value, ast.Name) else node.value.attr
                targets = {t.attr if isinstance(t, ast.Attribute) else getattr(t, "id", None) for t in node.targets}
                for section, names in aliases.items():
                    if value in names:
                        names.update(targets - {None})
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                base = node.value.attr if isinstance(node.value, ast.Attribute) else getattr(node.value, "id", None)
                reads.update((section, node.attr) for section, names in aliases.items() if base in names)
    return reads


def test_no_config_key_is_dead() -> None:
    """Every key a shipped config can set is read by the code (a key parsed and never read is a lie)."""
    reads = _section_reads()
    hints = typing.get_type_hints(Config)
    dead = [f"{section}.{field.name}" for section, hint in hints.items() if dataclasses.is_dataclass(hint)
            for field in dataclasses.fields(hint) if (section, field.name) not in reads]
    assert not dead, f"config keys that no code reads: {dead}"
    for path in sorted(CONFIG_DIR.glob("*.yaml")):  # and every key the shipped configs set is such a field
        raw = yaml.safe_load(path.read_text())
        for section, keys in raw.items():
            assert all((section, key) in reads for key in keys), (path.name, section, keys)
