"""The original way: read raw files straight from `dataset_root.json`, no shards.

For small datasets and for comparison with the streaming loader; it yields the same sample format
(`audioldm_dist.data.batch`). As in the original code, an unreadable file is skipped by moving on to
the next index; here it is also counted and logged.
"""
from __future__ import annotations

import logging

import numpy as np
from torch.utils.data import Dataset

from audioldm_dist.config import AudioConfig
from audioldm_dist.data.audio import AudioDecodeError, decode
from audioldm_dist.data.batch import make_sample
from audioldm_dist.data.melspec import MelFeatures
from audioldm_dist.data.metadata import AudioEntry, DatasetRoot, LabelIndex

log = logging.getLogger(__name__)


class MetadataDataset(Dataset):
    """Samples of one split of one or more registered datasets, decoded and cropped on the fly."""

    def __init__(self, root: DatasetRoot, datasets: list[str], split: str, *, audio: AudioConfig,
                 labels: LabelIndex | None = None, seed: int = 0) -> None:
        self.entries: list[AudioEntry] = [entry for name in datasets for entry in root.entries(name, split)]
        if not self.entries:
            raise ValueError(f"{root.path}: no entries in split {split!r} of {datasets}")
        self.audio = audio
        self.labels = labels
        self.seed = seed
        self.num_failed = 0
        self._mel: MelFeatures | None = None

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        if self._mel is None:
            self._mel = MelFeatures(self.audio)
        for offset in range(len(self.entries)):
            entry = self.entries[(index + offset) % len(self.entries)]
            try:
                waveform, rate = decode(entry.audio_path)
            except AudioDecodeError as error:
                self.num_failed += 1
                log.warning("skipping %s (entry %d of %s/%s): %s", entry.audio_path, entry.index, entry.dataset,
                            entry.split, error)
                continue
            return make_sample(waveform, rate, captions=entry.captions, label_mids=entry.label_mids,
                               fname=str(entry.audio_path), key=f"{entry.dataset}/{entry.split}/{entry.index}",
                               config=self.audio, mel=self._mel, labels=self.labels,
                               rng=np.random.default_rng([self.seed, index]))
        raise RuntimeError(f"no readable audio file among the {len(self.entries)} entries")
