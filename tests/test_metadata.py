import json
import os
from pathlib import Path

import pytest

from audioldm_dist.data.metadata import DatasetRoot, MetadataError


def _split_file(root_path: Path, split: str = "train") -> Path:
    return DatasetRoot.load(root_path).split_path("demo", split)


def test_reads_every_split_with_captions_labels_and_absolute_paths(demo_root: Path) -> None:
    root = DatasetRoot.load(demo_root)
    total = 0
    for split in ("train", "val", "test"):
        entries = root.entries("demo", split)
        total += len(entries)
        assert all(entry.audio_path.is_file() for entry in entries)
        assert all(entry.captions and entry.label_mids for entry in entries)
    assert total == 40
    assert root.label_index("demo").num_classes == 8


def test_relative_paths_resolve_against_cwd_first_then_the_json_folder(demo_copy: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # "../audio" does not exist from here: falls back to the json folder
    assert DatasetRoot.load(demo_copy).audio_root("demo") == (demo_copy.parent.parent / "audio").resolve()
    # The original convention: paths relative to the working directory win when they exist.
    elsewhere = tmp_path / "cwd"
    (elsewhere / "audio").mkdir(parents=True)
    raw = json.loads(demo_copy.read_text())
    raw["demo"] = "audio"
    demo_copy.write_text(json.dumps(raw))
    monkeypatch.chdir(elsewhere)
    assert DatasetRoot.load(demo_copy).audio_root("demo") == (elsewhere / "audio").resolve()


def _rewrite_entry(split_file: Path, index: int, **changes) -> None:
    raw = json.loads(split_file.read_text())
    for key, value in changes.items():
        if value is None:
            raw["data"][index].pop(key, None)
        else:
            raw["data"][index][key] = value
    split_file.write_text(json.dumps(raw))


@pytest.mark.parametrize("field,changes,message", [
    ("wav", {"wav": None}, r'entry 3: field "wav" is missing'),
    ("caption", {"caption": None, "caption_2": None}, r'entry 3: field "caption" is missing'),
    ("labels", {"labels": "/m/nope"}, r"entry 3: field \"labels\": unknown label mid '/m/nope'"),
])
def test_malformed_entry_names_file_index_and_field(demo_copy: Path, field: str, changes: dict, message: str) -> None:
    split_file = _split_file(demo_copy)
    _rewrite_entry(split_file, 3, **changes)
    with pytest.raises(MetadataError, match=message) as error:
        DatasetRoot.load(demo_copy).entries("demo", "train")
    assert str(split_file) in str(error.value)


def test_unknown_dataset_and_split_list_what_exists(demo_root: Path) -> None:
    root = DatasetRoot.load(demo_root)
    with pytest.raises(MetadataError, match="unknown dataset 'audiocaps'; registered: demo"):
        root.entries("audiocaps", "train")
    with pytest.raises(MetadataError, match="has no split 'dev'; available: train, val, test"):
        root.entries("demo", "dev")


def test_missing_and_invalid_json_are_explained(tmp_path: Path) -> None:
    with pytest.raises(MetadataError, match="dataset_root.json not found"):
        DatasetRoot.load(tmp_path / "dataset_root.json")
    bad = tmp_path / "dataset_root.json"
    bad.write_text("{not json")
    with pytest.raises(MetadataError, match="invalid JSON at line 1"):
        DatasetRoot.load(bad)
