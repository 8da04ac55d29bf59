import hashlib
import json
from pathlib import Path

import soundfile

from audioldm_dist.demo_data import write_demo_dataset


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_writes_identical_files_and_another_seed_does_not(tmp_path: Path) -> None:
    first = _digest(write_demo_dataset(tmp_path / "a", num_clips=12, seed=3).parent.parent)
    second = _digest(write_demo_dataset(tmp_path / "b", num_clips=12, seed=3).parent.parent)
    third = _digest(write_demo_dataset(tmp_path / "c", num_clips=12, seed=4).parent.parent)
    assert first == second
    assert first != third


def test_layout_mixes_rates_channels_and_formats(demo_root: Path) -> None:
    raw = json.loads(demo_root.read_text())
    assert set(raw["metadata"]["path"]["demo"]) == {"train", "val", "test", "class_label_indices"}
    audio_files = [p for p in (demo_root.parent.parent / "audio").rglob("*") if p.is_file()]
    infos = [soundfile.info(str(p)) for p in audio_files]
    assert {info.samplerate for info in infos} == {16000, 22050, 44100, 48000}
    assert {info.channels for info in infos} == {1, 2}
    assert {p.suffix for p in audio_files} == {".wav", ".flac"}


def test_balanced_captions_hold_every_choice_equally_often() -> None:
    from collections import Counter

    from audioldm_dist.demo_data import NOTE_NAMES, balanced_captions
    from audioldm_dist.eval.conformance import checks_for

    pairs = balanced_captions(repeats=2)
    assert len({name for name, _ in pairs}) == len(pairs)
    expected = Counter((check.kind, check.expected) for _, caption in pairs for check in checks_for(caption))
    assert {expected[("tone note", note)] for note in NOTE_NAMES.values()} == {4}
    assert expected[("tone wave", "sine")] == expected[("tone wave", "square")] == 14
    assert expected[("chirp direction", "rising")] == expected[("chirp direction", "falling")] == 10
