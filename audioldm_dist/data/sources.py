"""Turning `--train-data` specs into a list of shard URLs with their sample counts.

A spec is one of
- a make-shards output folder (its `manifest.json`),
- a brace pattern of tars, local (`shards/train-{000000..000127}.tar`) or a `pipe:` command
  (`pipe:aws s3 cp s3://bucket/train-{000000..000127}.tar -`), whose counts come from a
  `sizes.json` (open_clip's format) next to the local tars, or from `SPEC::sizes=PATH`,
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
    try:
        sizes = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"data spec {spec!r}: no sample counts: {path} not found (make-shards writes it; "
                         f"or give SPEC::sizes=PATH)") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON: {error}") from None
    return {Path(name).name: int(count) for name, count in sizes.items()}


def resolve_spec(spec: str) -> list[ShardInfo]:
    """One spec → its shards, in order."""
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
            for shard in _resolve_shards(spec, sizes_path)]


def _resolve_shards(spec: str, sizes_path: Path | None) -> list[ShardInfo]:
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
    if sizes_path is None:
        if spec.startswith("pipe:"):
            raise ValueError(f"data spec {spec!r}: a pipe: pattern needs ::sizes=PATH for its sample counts")
        sizes_path = Path(urls[0]).parent / SIZES_FILE
    sizes = _load_sizes(sizes_path, spec=spec)
    shards = []
    for url in urls:
        name = _tar_basename(url)
        if name not in sizes:
            raise ValueError(f"data spec {spec!r}: {name} has no count in {sizes_path}")
        shards.append(ShardInfo(url=url, num_samples=sizes[name]))
    return shards


def resolve_specs(specs: list[str] | str) -> list[ShardInfo]:
    specs = [specs] if isinstance(specs, str) else specs
    if not specs:
        raise ValueError("no data given: pass a make-shards folder, a brace pattern, or several")
    return [shard for spec in specs for shard in resolve_spec(spec)]


def shards_fingerprint(shards: list[ShardInfo]) -> str:
    """Identifies the shard list a stream state belongs to."""
    return hashlib.sha256(json.dumps([[s.url, s.num_samples, s.weight] for s in shards]).encode()).hexdigest()[:16]
