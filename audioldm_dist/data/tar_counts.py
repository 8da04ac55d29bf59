"""Sample counts of tars that come without a `sizes.json` (LAION-Audio-630K-style or self-made tars).

The epoch is defined by the counts, so they are needed before training starts. A tar's samples are
counted once from its headers, without decoding anything: WebDataset groups consecutive files by their
key (the path up to the first dot of the file name, as `webdataset.tariterators.base_plus_ext`), so the
count is the number of key groups. A local tar is read header by header (its data is seeked over); a
`pipe:` URL is streamed once. The counts are cached as open_clip's `sizes.json`: beside the tars when
that folder is writable, else in the run directory, and read from there next time.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import tarfile
from pathlib import Path

from audioldm_dist.fileio import atomic_write_bytes

log = logging.getLogger(__name__)

_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def count_samples(url: str) -> int:
    """The number of WebDataset samples in one tar (a local path or a `pipe:` command)."""
    try:
        if url.startswith("pipe:"):
            with subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE) as process:
                with tarfile.open(fileobj=process.stdout, mode="r|") as tar:
                    count = _count_keys(tar)
            if process.returncode:
                raise ValueError(f"{url}: the command exited with status {process.returncode}")
            return count
        with tarfile.open(url, mode="r:") as tar:
            return _count_keys(tar)
    except (tarfile.TarError, OSError) as error:
        raise ValueError(f"{url}: cannot count its samples from the tar headers: {error}") from None


def _count_keys(tar: tarfile.TarFile) -> int:
    count, previous = 0, None
    for member in tar:
        match = _KEY.match(member.name) if member.isfile() else None
        if match and match.group(1) != previous:
            count, previous = count + 1, match.group(1)
    return count


def cache_path(spec: str, *, beside: Path | None, cache_dir: Path | None) -> Path | None:
    """Where the counts of `spec` are cached: `beside/sizes.json` if that folder is writable, else a file
    named after the spec in `cache_dir`, else nowhere."""
    if beside is not None and os.access(beside, os.W_OK):
        return beside / "sizes.json"
    if cache_dir is not None:
        return Path(cache_dir) / "tar_counts" / f"sizes-{hashlib.sha256(spec.encode()).hexdigest()[:16]}.json"
    return None


def read_cached(path: Path | None) -> dict[str, int]:
    if path is None or not path.is_file():
        return {}
    try:
        return {Path(name).name: int(count) for name, count in json.loads(path.read_text()).items()}
    except (json.JSONDecodeError, ValueError, AttributeError) as error:
        raise ValueError(f"{path}: invalid sample counts ({error}); delete it to count again") from None


def count_and_cache(spec: str, urls: dict[str, str], *, known: dict[str, int], path: Path | None) -> dict[str, int]:
    """Counts the tars of `urls` (name → url) that `known` lacks, and caches all counts at `path`."""
    missing = {name: url for name, url in urls.items() if name not in known}
    if not missing:
        return known
    log.warning("data spec %r: %d tar(s) have no sample count (no sizes.json): counting their samples from the "
                "tar headers, once%s", spec, len(missing), f"; caching the counts in {path}" if path else "")
    counts = {**known, **{name: count_samples(url) for name, url in missing.items()}}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, (json.dumps(counts, indent=1, sort_keys=True) + "\n").encode())
    return counts
