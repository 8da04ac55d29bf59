"""Shared fixtures: a small demo dataset written once per session, shards made from it, and the
one-machine SLURM cluster (`slurm_cluster`, `slurm_env`; see slurm_cluster.py)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Offline by design (scripts/test.sh sets it too): before anything imports huggingface_hub, which reads it once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from audioldm_dist.demo_data import write_demo_dataset  # noqa: E402
from shards.make import make_shards  # noqa: E402
from shards.plan import ShardOptions  # noqa: E402
from slurm_cluster import slurm_cluster, slurm_env  # noqa: E402, F401  (fixtures)

NUM_DEMO_CLIPS = 40


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`dataset_root.json` of a 40-clip demo dataset (32 train / 4 val / 4 test)."""
    return write_demo_dataset(tmp_path_factory.mktemp("demo"), num_clips=NUM_DEMO_CLIPS, seed=0)


@pytest.fixture
def demo_copy(demo_root: Path, tmp_path: Path) -> Path:
    """A private copy of the demo dataset that a test may damage; returns its dataset_root.json."""
    data_dir = tmp_path / "data"
    shutil.copytree(demo_root.parent.parent, data_dir)
    return data_dir / "metadata" / "dataset_root.json"


@pytest.fixture(scope="session")
def train_shards(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo train split as shards of at most 6 samples."""
    return _split_shards(demo_root, tmp_path_factory, "train")


@pytest.fixture(scope="session")
def val_shards(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo val split as shards of at most 6 samples."""
    return _split_shards(demo_root, tmp_path_factory, "val")


def _split_shards(demo_root: Path, tmp_path_factory: pytest.TempPathFactory, split: str) -> Path:
    out = tmp_path_factory.mktemp("shards") / split
    make_shards(metadata_root=demo_root, dataset="demo", split=split, out_dir=out,
                options=ShardOptions(max_count=6), workers=1, show_progress=False)
    return out
