"""Reading WebDataset tars sample by sample, with no decoding: the one tar reader of the package.

`read_segment` yields samples `start..end-1` of one shard (a local path or a `pipe:` command, opened with
webdataset's `gopen`) as raw members; where the tar is missing, truncated or unreadable it yields
placeholders (None) for the rest of the segment instead of raising, so that the streaming loader
(`stream.py`) keeps every rank's batch count and a bad shard costs samples, not the run. The two
whole-shard questions asked before training are answered here too: are the shards encoded
(`detect_encoding`), and which captions do they hold (`captions_for_tokenizer`, the vocabulary of a
random_init text encoder). Warnings are rate-limited per process (`warn_rate_limited`).
"""
from __future__ import annotations

import json
import logging
import tarfile
from typing import Iterator

from webdataset.gopen import gopen

from audioldm_dist.data import schema
from audioldm_dist.data.encoded import ENCODING, is_encoded
from audioldm_dist.data.sources import ShardInfo

log = logging.getLogger(__name__)


class _RateLimitedWarnings:
    """The first 10 warnings of a process, then one every 100: a bad shard must not flood the log."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, message: str, *args, logger: logging.Logger = log) -> None:
        self.count += 1
        if self.count <= 10 or self.count % 100 == 0:
            logger.warning(message + (" (warning %d)" % self.count if self.count > 10 else ""), *args)


warn_rate_limited = _RateLimitedWarnings()
"""`warn_rate_limited(message, *args, logger=...)`: one count per process, shared by the reader and the stream."""


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the member name up to the first dot of its base name."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension


def read_segment(url: str, start: int, end: int) -> Iterator[tuple[int, dict | None]]:
    """Samples `start..end-1` of one tar as raw members; placeholders (None) where the tar fails."""
    next_index = start
    stream = None
    try:
        stream = gopen(url, "rb")
        index, key, members = -1, None, {}
        with tarfile.open(fileobj=stream, mode="r|*") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                member_key, extension = _split_key(member.name)
                if member_key != key:
                    if key is not None and index >= start:
                        yield index, members
                        next_index = index + 1
                    index, key, members = index + 1, member_key, {}
                    if index >= end:
                        break
                if index >= start:
                    members[extension] = archive.extractfile(member).read()
            else:
                if key is not None and start <= index < end:
                    yield index, members
                    next_index = index + 1
    except Exception as error:  # a missing, truncated or unreadable shard is reported, not fatal
        warn_rate_limited("shard %s unreadable after sample %d: %s: %s", url, next_index, type(error).__name__,
                          error)
    finally:
        if stream is not None:
            try:
                stream.close()
            except Exception:  # a pipe closed early reports SIGPIPE; nothing is lost
                pass
    for index in range(next_index, end):
        yield index, None


def detect_encoding(shards: list[ShardInfo]) -> dict | None:
    """The encoding fingerprints of encoded shards (from the first sample of the first shard), None for audio
    shards. Every sample is checked again as it is read (`StreamOptions.encoding`)."""
    for _, members in read_segment(shards[0].url, 0, 1):
        if members is None:
            raise ValueError(f"{shards[0].url}: unreadable, cannot tell audio from encoded shards")
        if not is_encoded(members):
            return None
        return json.loads(members[schema.JSON_EXTENSION]).get(ENCODING, {})
    return None


def captions_for_tokenizer(shards: list[ShardInfo]) -> list[str]:
    """Captions of the training shards: the vocabulary of a random_init (offline, tiny) text encoder."""
    captions: list[str] = []
    for shard in shards:
        for _, members in read_segment(shard.url, 0, shard.num_samples):
            if members and "json" in members:
                captions.extend(json.loads(members["json"]).get("captions", []))
    return sorted(set(captions))
