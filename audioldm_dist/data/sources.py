"""Turning `--train-data` specs into a list of shard URLs with their sample counts.

A spec is one of
- a make-shards output folder (its `manifest.json`),
- a brace pattern of tars, local (`shards/train-{000000..000127}.tar`) or a `pipe:` command
  (`pipe:aws s3 cp s3://bucket/train-{000000..000127}.tar -`), whose counts come from
  `SPEC::sizes=PATH`, or a `sizes.json` (open_clip's format) next to the local tars, or, for tars
  without one, from their headers, counted once and cached (`tar_counts`),
- a single tar with `::sizes=PATH`.
Several specs are mixed; `SPEC::weight=W` sets how often each of its shards is read per epoch
(2.0: twice, 0.5: a seeded half of them each epoch; default 1.0). Counts are needed up front: they
define the epoch.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import braceexpand

from audioldm_dist.data.tar_counts import cache_path, count_and_cache, read_cached

MANIFEST_FILE = "manifest.json"
SIZES_FILE = "sizes.json"


@dataclass(frozen=True, kw_only=True)
class ShardInfo:
    url: str
    num_samples: int
    weight: float = 1.0
    """Expected reads of this shard per epoch (from the spec's `::weight=`)."""


def _tar_basename(url: str) -> str:
    # The last path-looking token that ends in .tar: works for local paths and pipe: commands.
    tars = re.findall(r"[^\s/]+\.tar", url)
    if not tars:
        raise ValueError(f"shard URL {url!r} names no .tar file")
    return tars[-1]


def _load_sizes(path: Path, *, spec: str) -> dict[str, int]:
    if not path.is_file():
        raise ValueError(f"data spec {spec!r}: no sample counts: {path} not found")
    return read_cached(path)


def resolve_spec(spec: str, *, cache_dir: Path | None = None) -> list[ShardInfo]:
    """One spec → its shards, in order. Tars without counts are counted once and cached (`tar_counts`),
    in `cache_dir` when their own folder is not writable."""
    spec, _, options = spec.partition("::")
    sizes_path = None
    weight = 1.0
    for option in filter(None, options.split("::")):
        key, _, value = option.partition("=")
        if key == "sizes" and value:
            sizes_path = Path(value)
        elif key == "weight":
            try:
                weight = float(value)
            except ValueError:
                weight = -1.0
            if weight < 0:
                raise ValueError(f"data spec option {option!r}: expected weight=W with W >= 0")
        else:
            raise ValueError(f"data spec option {option!r}: expected sizes=PATH or weight=W")
    return [ShardInfo(url=shard.url, num_samples=shard.num_samples, weight=weight)
            for shard in _resolve_shards(spec, sizes_path, cache_dir)]


def _resolve_shards(spec: str, sizes_path: Path | None, cache_dir: Path | None) -> list[ShardInfo]:
    local = Path(spec)
    if not spec.startswith("pipe:") and local.is_dir():
        manifest_path = local / MANIFEST_FILE
        if not manifest_path.is_file():
            raise ValueError(f"data folder {local} has no {MANIFEST_FILE}: make it with make-shards, or give a "
                             f"brace pattern of its tars")
        manifest = json.loads(manifest_path.read_text())
        return [ShardInfo(url=str(local / shard["name"]), num_samples=int(shard["num_samples"]))
                for shard in manifest["shards"]]
    urls = list(braceexpand.braceexpand(spec))
    if not spec.startswith("pipe:") and not Path(urls[0]).exists():
        raise ValueError(f"data spec {spec!r}: {urls[0]} not found (expected a make-shards folder, a tar, or a "
                         f"brace pattern of tars)")
    named = {_tar_basename(url): url for url in urls}
    if sizes_path is not None:  # counts given: they must cover every tar
        sizes = _load_sizes(sizes_path, spec=spec)
        for name in named:
            if name not in sizes:
                raise ValueError(f"data spec {spec!r}: {name} has no count in {sizes_path}")
    else:
        beside = None if spec.startswith("pipe:") else Path(urls[0]).parent
        found = beside / SIZES_FILE if beside is not None else None
        cache = cache_path(spec, beside=beside, cache_dir=cache_dir)
        sizes = count_and_cache(spec, named, known={**read_cached(found), **read_cached(cache)}, path=cache)
    return [ShardInfo(url=url, num_samples=sizes[_tar_basename(url)]) for url in urls]


def resolve_specs(specs: list[str] | str, *, cache_dir: Path | None = None) -> list[ShardInfo]:
    specs = [specs] if isinstance(specs, str) else specs
    if not specs:
        raise ValueError("no data given: pass a make-shards folder, a brace pattern, or several")
    return [shard for spec in specs for shard in resolve_spec(spec, cache_dir=cache_dir)]


def shards_fingerprint(shards: list[ShardInfo]) -> str:
    """Identifies the shard list a stream state belongs to."""
    return hashlib.sha256(json.dumps([[s.url, s.num_samples, s.weight] for s in shards]).encode()).hexdigest()[:16]
