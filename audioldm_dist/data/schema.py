"""The WebDataset sample schema that `make-shards` writes and the streaming loader reads.

One place for the member extensions and JSON field names, so the writer and the reader cannot drift.
"""
from __future__ import annotations

import re

AUDIO_EXTENSIONS = ("flac", "wav", "mp3", "ogg", "opus")
"""Tar member extensions recognised as the audio of a sample (make-shards writes `flac` by default)."""
JSON_EXTENSION = "json"

# Fields of the per-sample JSON.
CAPTIONS = "captions"  # list[str]: every caption of the record
CAPTION = "caption"  # str: the first caption, for tools that expect one
LABELS = "labels"  # list[str]: label mids
LABEL_NAMES = "label_names"  # list[str]: display names from class_labels_indices.csv
SOURCE_PATH = "source_path"
DATASET = "dataset"
SPLIT = "split"
ORIGINAL_SAMPLE_RATE = "original_sample_rate"
ORIGINAL_CHANNELS = "original_channels"
SAMPLE_RATE = "sample_rate"
DURATION = "duration"

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def sample_key(dataset: str, split: str, index: int) -> str:
    """A dot-free, zero-padded key: WebDataset splits a member name at its first dot."""
    return f"{_UNSAFE.sub('-', dataset)}_{_UNSAFE.sub('-', split)}_{index:09d}"


def shard_name(prefix: str, shard_index: int) -> str:
    return f"{prefix}-{shard_index:06d}.tar"
