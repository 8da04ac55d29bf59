"""Who reads which samples, in which order: the streaming loader's plan, computed in index space.

An epoch is a seeded permutation of the shards, read as one sequence of (shard, index) items. The
sequence is cut into contiguous chunks, one per consumer (rank × DataLoader worker, rank-major), each
exactly as long as that consumer's share of the epoch's batches: every rank gets
`floor(samples / (batch_size × world_size))` batches, worker `w` of a rank yields the rank's batches
`w, w + W, ...` (the order in which the DataLoader collects them). A consumer reads its chunk in order
through a shuffle buffer whose RNG is a function of (seed, epoch, generation, rank, worker).

The state the trainer checkpoints is small: seed, epoch, how many batches of the current plan were
consumed, and, after a restart with other ranks/workers/batch size, the items left in the epoch.
- Same ranks, workers, batch size and shuffle buffer: every consumer replays its chunk and skips what was consumed
  (raw bytes only, no decoding), so the continuation is identical to an uninterrupted run.
- Anything changed: the consumed items are recomputed here (the plan is deterministic), the epoch's
  remaining items are re-planned over the new consumers ("generation" + 1), and every sample of the
  epoch is still seen exactly once; only the order of the rest differs.
Per epoch, the last `samples mod (batch_size × world_size)` items in plan order are not seen (drop
last); the permutation changes every epoch, so they differ each time.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator, TypeVar

import numpy as np

Segment = tuple[int, int, int]  # (read id, first index, end index); read id = copy × num_shards + shard
T = TypeVar("T")


@dataclass(kw_only=True)
class StreamState:
    """What the trainer checkpoints to resume the stream exactly."""

    seed: int
    epoch: int = 0
    steps_done: int = 0
    """Rank batches of the current plan already consumed (the same on every rank)."""
    generation: int = 0
    """Re-plans within this epoch (after restarts with a different layout)."""
    remaining: list[Segment] | None = None
    """Items of the epoch left at the start of this plan; None = the whole epoch."""
    layout: tuple[int, int, int, int] | None = None
    """(world_size, readers per rank, batch_size, shuffle buffer) the current plan was made for."""
    shards_fingerprint: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> StreamState:
        raw = dict(raw)
        if raw.get("remaining") is not None:
            raw["remaining"] = [tuple(segment) for segment in raw["remaining"]]
        if raw.get("layout") is not None:
            raw["layout"] = tuple(raw["layout"])
        return cls(**raw)


@dataclass(frozen=True, kw_only=True)
class Plan:
    epoch: int
    generation: int
    steps: int
    """Batches every rank yields in this plan."""
    chunks: dict[tuple[int, int], list[Segment]] = field(default_factory=dict)
    """(rank, worker) → its items, in reading order."""
    num_items: dict[tuple[int, int], int] = field(default_factory=dict)
    """(rank, worker) → real items in its chunk (fewer than quota only when padding)."""


def epoch_segments(shard_sizes: list[int], *, seed: int, epoch: int, shuffle: bool,
                   weights: list[float] | None = None) -> list[Segment]:
    """The epoch's reads in order; each read has its own id so copies of a shard are told apart.

    A shard of weight w is read w times on average: systematic sampling over a seeded permutation
    reads it floor(w) or floor(w) + 1 times, so the epoch holds sum(w) reads (±1) and a source of
    weight 0.5 contributes half of its shards, a different half each epoch."""
    num_shards = len(shard_sizes)
    weights = weights or [1.0] * num_shards
    rng = np.random.default_rng([seed, epoch, 0xC0FFEE])
    offset = rng.random()
    cumulative = 0.0
    copies = [0] * num_shards
    for shard in rng.permutation(num_shards):
        before = cumulative
        cumulative += weights[shard]
        copies[shard] = int(np.floor(cumulative + offset) - np.floor(before + offset))
    reads = [copy * num_shards + shard for shard in range(num_shards) if shard_sizes[shard] > 0
             for copy in range(copies[shard])]
    if shuffle:
        reads = [reads[i] for i in np.random.default_rng([seed, epoch]).permutation(len(reads))]
    return [(read, 0, shard_sizes[read % num_shards]) for read in reads]


def worker_batches(steps: int, *, worker: int, num_workers: int) -> int:
    """How many of a rank's first `steps` batches come from `worker` (round-robin)."""
    return len(range(worker, steps, num_workers))


def make_plan(segments: list[Segment], *, epoch: int, generation: int, world_size: int, num_workers: int,
              batch_size: int, drop_last: bool) -> Plan:
    """Cuts the item sequence into one contiguous chunk per consumer."""
    total = sum(end - start for _, start, end in segments)
    global_batch = batch_size * world_size
    steps = total // global_batch if drop_last else -(-total // global_batch)
    chunks: dict[tuple[int, int], list[Segment]] = {}
    num_items: dict[tuple[int, int], int] = {}
    cursor = iter(segments)
    carry: list[Segment] = []
    for rank in range(world_size):
        for worker in range(num_workers):
            quota = worker_batches(steps, worker=worker, num_workers=num_workers) * batch_size
            chunk, carry = _take(carry, cursor, quota)
            chunks[(rank, worker)] = chunk
            num_items[(rank, worker)] = sum(end - start for _, start, end in chunk)
    return Plan(epoch=epoch, generation=generation, steps=steps, chunks=chunks, num_items=num_items)


def _take(carry: list[Segment], cursor: Iterator[Segment], quota: int) -> tuple[list[Segment], list[Segment]]:
    taken: list[Segment] = []
    need = quota
    pending = list(carry)
    while need > 0:
        if not pending:
            try:
                pending.append(next(cursor))
            except StopIteration:
                break
        shard, start, end = pending.pop(0)
        length = end - start
        if length <= need:
            taken.append((shard, start, end))
            need -= length
        else:
            taken.append((shard, start, start + need))
            pending.insert(0, (shard, start + need, end))
            need = 0
    return taken, pending


def shuffled(items: Iterable[T], *, buffer_size: int, rng: np.random.Generator) -> Iterator[T]:
    """A deterministic shuffle buffer: the output order depends only on the input order and the rng."""
    if buffer_size <= 1:
        yield from items
        return
    buffer: list[T] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        j = int(rng.integers(len(buffer)))
        buffer[j], item = item, buffer[j]
        yield item
    for j in rng.permutation(len(buffer)):
        yield buffer[int(j)]


def consumer_rng(*, seed: int, epoch: int, generation: int, rank: int, worker: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, generation, rank, worker, 0x5EED])


def chunk_index_items(chunk: list[Segment]) -> Iterator[tuple[int, int]]:
    for shard, start, end in chunk:
        for index in range(start, end):
            yield shard, index


def consumed_items(plan: Plan, *, seed: int, steps_done: int, batch_size: int, buffer_size: int,
                   num_workers: int) -> set[tuple[int, int]]:
    """The (shard, index) items every consumer had handed out after `steps_done` rank batches."""
    consumed: set[tuple[int, int]] = set()
    for (rank, worker), chunk in plan.chunks.items():
        count = worker_batches(steps_done, worker=worker, num_workers=num_workers) * batch_size
        rng = consumer_rng(seed=seed, epoch=plan.epoch, generation=plan.generation, rank=rank, worker=worker)
        for position, item in enumerate(shuffled(chunk_index_items(chunk), buffer_size=buffer_size, rng=rng)):
            if position >= count:
                break
            consumed.add(item)
    return consumed


def subtract(segments: list[Segment], consumed: set[tuple[int, int]]) -> list[Segment]:
    """`segments` without the consumed items, order kept, as maximal runs."""
    result: list[Segment] = []
    for shard, start, end in segments:
        run_start = None
        for index in range(start, end):
            if (shard, index) in consumed:
                if run_start is not None:
                    result.append((shard, run_start, index))
                    run_start = None
            elif run_start is None:
                run_start = index
        if run_start is not None:
            result.append((shard, run_start, end))
    return result
