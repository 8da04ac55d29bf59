"""`make-shards --verify DIR` / `encode-shards --verify OUT`: every shard against the manifest, every sample
decoded (audio) or read (encoded tensors, finite)."""
from __future__ import annotations

import json
import multiprocessing as mp
import tarfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

import numpy as np

from audioldm_dist.config import AudioConfig
from audioldm_dist.data import encoded, schema
from audioldm_dist.data.audio import AudioDecodeError, decode
from shards.manifest import Manifest, ShardEntry
from shards.writer import sha256_of_file


@dataclass(kw_only=True)
class ShardCheck:
    name: str
    num_samples: int = 0
    keys: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def check_shard(folder: Path, shard: ShardEntry) -> ShardCheck:
    """Size, sha256, tar structure, and a decode of every sample of one shard."""
    check = ShardCheck(name=shard.name)
    path = folder / shard.name
    if not path.is_file():
        check.problems.append(f"{shard.name}: missing")
        return check
    size = path.stat().st_size
    if size != shard.bytes:
        check.problems.append(f"{shard.name}: {size} bytes, manifest says {shard.bytes}")
    elif sha256_of_file(path) != shard.sha256:
        check.problems.append(f"{shard.name}: sha256 differs from the manifest")
    members: dict[str, dict[str, bytes]] = defaultdict(dict)
    try:
        with tarfile.open(path, mode="r:") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                key, _, extension = member.name.partition(".")
                members[key][extension] = archive.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as error:
        check.problems.append(f"{shard.name}: unreadable tar: {error}")
    for key, files in members.items():
        if encoded.is_encoded(files):  # encode-shards output: every tensor readable and finite, json complete
            try:
                encoded.encoded_sample(files, name=f"{shard.name}/{key}", key=key, config=AudioConfig(), labels=None,
                                       rng=np.random.default_rng(0), expected=None)
            except (AudioDecodeError, ValueError) as error:
                check.problems.append(f"{shard.name}/{key}: {error}")
                continue
            check.keys.append(key)
            check.num_samples += 1
            continue
        audio_ext = next((ext for ext in schema.AUDIO_EXTENSIONS if ext in files), None)
        if audio_ext is None or schema.JSON_EXTENSION not in files:
            check.problems.append(f"{shard.name}/{key}: expected an audio member and a json member, "
                                  f"found {sorted(files)}")
            continue
        try:
            metadata = json.loads(files[schema.JSON_EXTENSION])
            waveform, rate = decode(files[audio_ext], name=f"{shard.name}/{key}.{audio_ext}")
        except (AudioDecodeError, ValueError) as error:
            check.problems.append(f"{shard.name}/{key}: {error}")
            continue
        if metadata.get(schema.SAMPLE_RATE) != rate:
            check.problems.append(f"{shard.name}/{key}: decoded at {rate} Hz, json says {metadata.get('sample_rate')}")
        check.keys.append(key)
        check.num_samples += 1
    if check.num_samples != shard.num_samples:
        check.problems.append(f"{shard.name}: {check.num_samples} valid samples, manifest says {shard.num_samples}")
    return check


def _check_task(args: tuple[Path, ShardEntry]) -> ShardCheck:
    return check_shard(*args)


def verify_folder(folder: str | Path, *, workers: int = 1, show_progress: bool = True) -> list[str]:
    """All problems found (empty when the folder is sound)."""
    folder = Path(folder)
    manifest = Manifest.load(folder)
    tasks = [(folder, shard) for shard in manifest.shards]
    if workers > 1:
        with mp.get_context("forkserver").Pool(workers) as pool:
            checks = list(tqdm(pool.imap(_check_task, tasks), total=len(tasks), desc="verifying", unit="shard",
                               disable=not show_progress))
    else:
        checks = [check_shard(*task) for task in tqdm(tasks, desc="verifying", unit="shard", disable=not show_progress)]
    problems = [problem for check in checks for problem in check.problems]
    seen: dict[str, str] = {}
    for check in checks:
        for key in check.keys:
            if key in seen:
                problems.append(f"key {key} appears in both {seen[key]} and {check.name}")
            seen[key] = check.name
    sizes_path = folder / "sizes.json"
    if sizes_path.exists():
        sizes = json.loads(sizes_path.read_text())
        expected = {shard.name: shard.num_samples for shard in manifest.shards}
        if sizes != expected:
            problems.append("sizes.json disagrees with manifest.json")
    return problems
