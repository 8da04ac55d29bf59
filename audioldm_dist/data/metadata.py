"""Reads datasets registered the AudioLDM way: `dataset_root.json` → per-split JSON → audio files.

Relative paths in `dataset_root.json` resolve against the current directory, as the original code
does, and, if nothing exists there, against the folder that holds `dataset_root.json`, so a data
folder can be moved or used from another working directory. Every error names the file, the entry
index and the field.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SPLITS = ("train", "val", "test")


class MetadataError(ValueError):
    """Malformed or inconsistent metadata; the message names the file, entry and field."""


@dataclass(frozen=True, kw_only=True)
class LabelIndex:
    """The `class_labels_indices.csv` of a dataset: mid → (index, display name)."""

    path: Path
    index_by_mid: dict[str, int]
    name_by_mid: dict[str, str]

    @property
    def num_classes(self) -> int:
        return len(self.index_by_mid)


@dataclass(frozen=True, kw_only=True)
class AudioEntry:
    """One record of a split's metadata JSON, with its audio path made absolute."""

    dataset: str
    split: str
    index: int
    """Position in the split's `data` list: stable, used to build sample keys."""
    audio_path: Path
    wav: str
    """The path as written in the metadata (relative to the dataset root)."""
    captions: list[str]
    label_mids: list[str] = field(default_factory=list)


def _read_json(path: Path, *, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MetadataError(f"{what} not found: {path}") from None
    except OSError as error:
        raise MetadataError(f"{what} unreadable: {path}: {error}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise MetadataError(f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}") from None


def resolve_path(path_text: str, *, base_dir: Path) -> Path:
    """CWD first (the original behaviour), then the folder of the file that named the path."""
    path = Path(os.path.expanduser(path_text))
    if path.is_absolute():
        return path
    from_cwd = Path.cwd() / path
    if from_cwd.exists():
        return from_cwd.resolve()
    return (base_dir / path).resolve()


@dataclass(frozen=True, kw_only=True)
class DatasetRoot:
    """A parsed `dataset_root.json`."""

    path: Path
    raw: dict[str, Any]

    @classmethod
    def load(cls, path: str | Path) -> DatasetRoot:
        path = Path(path).resolve()
        raw = _read_json(path, what="dataset_root.json")
        if not isinstance(raw, dict):
            raise MetadataError(f"{path}: expected a JSON object at the top level")
        metadata = raw.get("metadata")
        if not isinstance(metadata, dict) or not isinstance(metadata.get("path"), dict):
            raise MetadataError(f'{path}: missing the "metadata": {{"path": {{...}}}} section')
        return cls(path=path, raw=raw)

    @property
    def dataset_names(self) -> list[str]:
        return sorted(self.raw["metadata"]["path"])

    def _dataset_paths(self, dataset: str) -> dict[str, str]:
        paths = self.raw["metadata"]["path"]
        if dataset not in paths:
            raise MetadataError(
                f"{self.path}: unknown dataset {dataset!r}; registered: {', '.join(self.dataset_names) or 'none'}"
            )
        if not isinstance(paths[dataset], dict):
            raise MetadataError(f"{self.path}: metadata.path.{dataset} must be an object of split → file")
        return paths[dataset]

    def audio_root(self, dataset: str) -> Path:
        if dataset not in self.raw or not isinstance(self.raw[dataset], str):
            raise MetadataError(
                f'{self.path}: no audio root for dataset {dataset!r} (expected a top-level "{dataset}": "<folder>")'
            )
        return resolve_path(self.raw[dataset], base_dir=self.path.parent)

    def split_path(self, dataset: str, split: str) -> Path:
        paths = self._dataset_paths(dataset)
        if split not in paths or split == "class_label_indices":
            known = [key for key in paths if key != "class_label_indices"]
            raise MetadataError(
                f"{self.path}: dataset {dataset!r} has no split {split!r}; available: {', '.join(known) or 'none'}"
            )
        return resolve_path(paths[split], base_dir=self.path.parent)

    def label_index(self, dataset: str) -> LabelIndex | None:
        """The dataset's label CSV, or None when it registers none."""
        paths = self._dataset_paths(dataset)
        if "class_label_indices" not in paths:
            return None
        return read_label_index(resolve_path(paths["class_label_indices"], base_dir=self.path.parent))

    def entries(self, dataset: str, split: str) -> list[AudioEntry]:
        """Every record of one split, validated; raises `MetadataError` naming file, index and field."""
        split_file = self.split_path(dataset, split)
        audio_root = self.audio_root(dataset)
        labels = self.label_index(dataset)
        raw = _read_json(split_file, what=f"metadata for {dataset}/{split}")
        if not isinstance(raw, dict) or not isinstance(raw.get("data"), list):
            raise MetadataError(f'{split_file}: expected {{"data": [...]}} at the top level')
        return [
            _parse_entry(record, index=i, split_file=split_file, dataset=dataset, split=split,
                         audio_root=audio_root, labels=labels)
            for i, record in enumerate(raw["data"])
        ]


def _parse_entry(record: Any, *, index: int, split_file: Path, dataset: str, split: str,
                 audio_root: Path, labels: LabelIndex | None) -> AudioEntry:
    where = f"{split_file}: entry {index}"
    if not isinstance(record, dict):
        raise MetadataError(f"{where}: expected an object, found {type(record).__name__}")
    wav = record.get("wav")
    if not isinstance(wav, str) or not wav:
        raise MetadataError(f'{where}: field "wav" is missing or not a non-empty string')
    captions = [record[key] for key in sorted(record) if "caption" in key and isinstance(record[key], str)]
    captions = [caption for caption in captions if caption.strip()]
    if not captions:
        raise MetadataError(f'{where}: field "caption" is missing or empty (any key containing "caption" counts)')
    label_text = record.get("labels", "")
    if label_text is None:
        label_text = ""
    if not isinstance(label_text, str):
        raise MetadataError(f'{where}: field "labels" must be a comma-separated string of mids')
    mids = [mid.strip() for mid in label_text.split(",") if mid.strip()]
    if labels is not None:
        for mid in mids:
            if mid not in labels.index_by_mid:
                raise MetadataError(f'{where}: field "labels": unknown label mid {mid!r} (not in {labels.path})')
    return AudioEntry(dataset=dataset, split=split, index=index, audio_path=audio_root / wav,
                      wav=wav, captions=captions, label_mids=mids)


def read_label_index(path: Path) -> LabelIndex:
    """Parses `index,mid,display_name` rows."""
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except FileNotFoundError:
        raise MetadataError(f"class_labels_indices.csv not found: {path}") from None
    index_by_mid: dict[str, int] = {}
    name_by_mid: dict[str, str] = {}
    for line, row in enumerate(rows, start=2):
        try:
            index_by_mid[row["mid"]] = int(row["index"])
            name_by_mid[row["mid"]] = row["display_name"]
        except (KeyError, TypeError, ValueError):
            raise MetadataError(f"{path}: line {line}: expected columns index,mid,display_name") from None
    return LabelIndex(path=path, index_by_mid=index_by_mid, name_by_mid=name_by_mid)
