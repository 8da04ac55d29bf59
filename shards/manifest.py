"""`manifest.json`, `sizes.json` (open_clip's format) and `failures.jsonl` of a shard folder."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from audioldm_dist.fileio import atomic_write_bytes

MANIFEST_FILE = "manifest.json"
SIZES_FILE = "sizes.json"
FAILURES_FILE = "failures.jsonl"
MANIFEST_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class ShardEntry:
    name: str
    num_samples: int
    bytes: int
    sha256: str
    seconds: float


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """Every shard with its count, size, hash and audio seconds; totals; how it was made."""

    shards: list[ShardEntry]
    num_entries: int
    """Records in the metadata split, failed ones included."""
    num_failed: int
    options: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    command: list[str] = field(default_factory=list)
    created_by: str = "make-shards"
    """The tool that wrote the folder: make-shards (audio) or encode-shards (VAE posteriors, embeddings)."""

    @property
    def num_samples(self) -> int:
        return sum(shard.num_samples for shard in self.shards)

    @property
    def total_seconds(self) -> float:
        return sum(shard.seconds for shard in self.shards)

    def to_dict(self) -> dict:
        return {
            "version": MANIFEST_VERSION,
            "created_by": self.created_by,
            "command": self.command,
            "options": self.options,
            "source": self.source,
            "totals": {
                "num_shards": len(self.shards),
                "num_samples": self.num_samples,
                "num_entries": self.num_entries,
                "num_failed": self.num_failed,
                "bytes": sum(shard.bytes for shard in self.shards),
                "seconds": round(self.total_seconds, 3),
                "hours": round(self.total_seconds / 3600, 4),
            },
            "shards": [asdict(shard) for shard in self.shards],
        }

    @classmethod
    def load(cls, folder: str | Path) -> Manifest:
        path = Path(folder) / MANIFEST_FILE
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"no {MANIFEST_FILE} in {folder}: is this a make-shards output folder?") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: invalid JSON: {error}") from None
        if raw.get("version") != MANIFEST_VERSION:
            raise ValueError(f"{path}: unsupported manifest version {raw.get('version')!r}")
        return cls(shards=[ShardEntry(**shard) for shard in raw["shards"]], num_entries=raw["totals"]["num_entries"],
                   num_failed=raw["totals"]["num_failed"], options=raw.get("options", {}),
                   source=raw.get("source", {}), command=raw.get("command", []),
                   created_by=raw.get("created_by", "make-shards"))


def write_manifest(out_dir: Path, manifest: Manifest, *, failures: list[dict]) -> None:
    lines = "".join(json.dumps(failure, sort_keys=True) + "\n" for failure in failures)
    atomic_write_bytes(out_dir / FAILURES_FILE, lines.encode())
    sizes = {shard.name: shard.num_samples for shard in manifest.shards}
    atomic_write_bytes(out_dir / SIZES_FILE, (json.dumps(sizes, indent=1) + "\n").encode())
    atomic_write_bytes(out_dir / MANIFEST_FILE, (json.dumps(manifest.to_dict(), indent=1) + "\n").encode())
