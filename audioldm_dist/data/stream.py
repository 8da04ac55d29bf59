"""The streaming loader: WebDataset shards → AudioLDM batches, split over ranks and workers, resumable.

Which consumer reads which samples in which order is decided in `stream_plan` (read its docstring for
the guarantees). This module does the I/O: it streams each consumer's segments of tar files (local
paths or `pipe:` commands, through `shard_reader.read_segment`), passes the raw samples through the seeded
shuffle buffer, decodes after the buffer, and yields ready batches; the DataLoader is used with
`batch_size=None`. Faults never stop the run: a sample that fails to decode is replaced in its batch by
another sample of the same batch, an unreadable tar member or a missing/truncated shard turns the rest
of that shard's segment into placeholders that are skipped the same way, so every rank still yields
the same number of batches (no hang). All of it is counted, with rate-limited warnings; the loader
stops with an error only when the failed fraction exceeds `max_failed_fraction` (data.max_failed_fraction).
Encoded shards (encode-shards, `StreamOptions.encoding`) go through the same plan, shuffle, resume and fault
handling; only the per-sample decode differs (`data/encoded.py`: stored posterior and embeddings, no audio).
"""
from __future__ import annotations

import copy
import gc
import json
import logging
import multiprocessing
import multiprocessing.forkserver
import signal
import threading
from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from audioldm_dist.config import AudioConfig, DataConfig
from audioldm_dist.data import schema
from audioldm_dist.data.audio import AudioDecodeError, decode
from audioldm_dist.data.batch import collate, make_sample, padding_sample
from audioldm_dist.data.encoded import EncodingMismatchError, encoded_sample, is_encoded
from audioldm_dist.data.melspec import MelFeatures
from audioldm_dist.data.metadata import LabelIndex
from audioldm_dist.data.shard_reader import read_segment, warn_rate_limited
from audioldm_dist.data.sources import ShardInfo, shards_fingerprint
from audioldm_dist.data.stream_plan import (Plan, Segment, StreamState, consumed_items, consumer_rng, epoch_segments,
                                            make_plan, shuffled, subtract, worker_batches)

log = logging.getLogger(__name__)

Item = tuple[int, int, dict | None]  # (shard id, index in shard, raw members or None when unreadable)


@dataclass(frozen=True, kw_only=True)
class StreamOptions:
    batch_size: int
    """Samples per batch on one rank (the micro-batch)."""
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0
    """DataLoader workers of each rank; 0 reads in the main process."""
    seed: int = 0
    shuffle: bool = True
    shuffle_buffer: int = 256
    drop_last: bool = True
    """Training: drop the epoch's last partial global batch. Evaluation (False): pad and mark `valid`."""
    max_epochs: int | None = None
    """Stop after this many epochs (evaluation: 1); None streams forever."""
    max_failed_fraction: float = 0.05
    features_in_loader: bool = True
    """Compute STFT and log-mel in the loader (the original way); False ships waveforms only and leaves
    the features to the trainer's device (`MelFeatures.batch`), which frees the loader's CPU."""
    allow_shard_sharing: bool = False
    """Allow fewer shards than ranks × workers: consumers then share shards, each reading past the part
    before its range."""
    encoding: dict | None = None
    """Encoded shards (encode-shards): the model's encoding fingerprints (`encoding.model_encoding`) that every
    sample must carry; samples then come from `data/encoded.py` (no audio decode, no features). None: audio."""

    @property
    def consumers_per_rank(self) -> int:
        return max(1, self.num_workers)

    @property
    def layout(self) -> tuple[int, int, int, int]:
        """What the plan and the reading order depend on: (ranks, readers per rank, batch, buffer)."""
        return (self.world_size, self.consumers_per_rank, self.batch_size, self.shuffle_buffer if self.shuffle else 0)


def loader_options(data: DataConfig, *, device: torch.device) -> dict:
    """The `StreamOptions` fields that the config's `data` section sets (features on the trainer when it
    is a GPU unless `data.features_in_loader` says otherwise)."""
    in_loader = data.features_in_loader if data.features_in_loader is not None else device.type == "cpu"
    return {"num_workers": data.num_workers, "shuffle_buffer": data.shuffle_buffer, "features_in_loader": in_loader,
            "max_failed_fraction": data.max_failed_fraction, "allow_shard_sharing": data.allow_shard_sharing}


class ShardStream(IterableDataset):
    """Batches for one rank. Give it to `make_loader` (or a DataLoader with `batch_size=None`)."""

    def __init__(self, shards: list[ShardInfo], *, audio: AudioConfig, options: StreamOptions,
                 labels: LabelIndex | None = None, state: StreamState | None = None) -> None:
        super().__init__()
        if not shards:
            raise ValueError("no shards to stream")
        num_consumers = options.world_size * options.consumers_per_rank
        if len(shards) < num_consumers and not options.allow_shard_sharing:
            raise ValueError(
                f"{len(shards)} shards for {options.world_size} ranks × {options.consumers_per_rank} workers = "
                f"{num_consumers} readers: every reader needs at least one shard. Make more, smaller shards "
                f"(make-shards --max-count), use fewer workers (data.num_workers), or set "
                f"data.allow_shard_sharing=true")
        total = sum(shard.num_samples for shard in shards)
        if options.drop_last and total < options.batch_size * options.world_size:
            raise ValueError(f"{total} samples are fewer than one global batch "
                             f"({options.batch_size} × {options.world_size} ranks)")
        self.shards = shards
        self.audio = audio
        self.options = options
        self.labels = labels
        fingerprint = shards_fingerprint(shards)
        if state is None:
            state = StreamState(seed=options.seed, layout=options.layout, shards_fingerprint=fingerprint)
        elif state.shards_fingerprint and state.shards_fingerprint != fingerprint:
            raise ValueError("the checkpointed data state belongs to another list of shards; "
                             "resume with the same --train-data, or start the data stream afresh")
        self.state = self._adapt_to_layout(replace(state, shards_fingerprint=fingerprint))

    # --- planning --------------------------------------------------------------------------------
    def epoch_items(self, state: StreamState) -> list[Segment]:
        """What is left to read of the state's epoch, in plan order."""
        if state.remaining is not None:
            return state.remaining
        return epoch_segments([shard.num_samples for shard in self.shards], seed=state.seed, epoch=state.epoch,
                              shuffle=self.options.shuffle, weights=[shard.weight for shard in self.shards])

    def plan(self, state: StreamState) -> Plan:
        segments = self.epoch_items(state)
        world_size, num_workers, batch_size, _ = state.layout or self.options.layout
        return make_plan(segments, epoch=state.epoch, generation=state.generation, world_size=world_size,
                         num_workers=num_workers, batch_size=batch_size, drop_last=self.options.drop_last)

    def _adapt_to_layout(self, state: StreamState) -> StreamState:
        """After a restart with other ranks/workers/batch size: re-plan what is left of the epoch."""
        if state.layout in (None, self.options.layout):
            return replace(state, layout=self.options.layout)
        old_plan = self.plan(state)
        _, old_workers, old_batch, old_buffer = state.layout
        consumed = consumed_items(old_plan, seed=state.seed, steps_done=state.steps_done, batch_size=old_batch,
                                  buffer_size=old_buffer, num_workers=old_workers)
        segments = self.epoch_items(state)
        log.info("data layout changed from %s to %s (ranks, workers, batch, buffer): re-planning the %d samples left "
                 "of epoch %d", state.layout, self.options.layout,
                 sum(e - s for _, s, e in segments) - len(consumed), state.epoch)
        return replace(state, remaining=subtract(segments, consumed), generation=state.generation + 1,
                       steps_done=0, layout=self.options.layout)

    @property
    def _buffer_size(self) -> int:
        return self.options.shuffle_buffer if self.options.shuffle else 0

    def steps_in_plan(self, state: StreamState) -> int:
        return self.plan(state).steps

    def next_epoch_state(self, state: StreamState) -> StreamState:
        return replace(state, epoch=state.epoch + 1, steps_done=0, generation=0, remaining=None,
                       layout=self.options.layout)

    # --- reading ---------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        num_workers = info.num_workers if info is not None else 1
        if num_workers != self.options.consumers_per_rank:
            raise ValueError(f"the DataLoader has {num_workers} workers but the stream was planned for "
                             f"{self.options.consumers_per_rank}: build the loader with make_loader")
        torch.set_num_threads(1)
        counters = {"items": 0, "failed": 0, "replaced": 0}
        state = copy.deepcopy(self.state)
        epochs = 0
        num_yielded = 0  # batches this loader yielded before the current plan
        while self.options.max_epochs is None or epochs < self.options.max_epochs:
            plan = self.plan(state)
            # The DataLoader collects batch k from worker k mod W; plan step s belongs to consumer s mod W.
            consumer = (worker - num_yielded + state.steps_done) % num_workers
            yield from self._consumer_batches(plan, state, consumer=consumer, worker=worker, counters=counters)
            num_yielded += plan.steps - state.steps_done
            state = self.next_epoch_state(state)
            epochs += 1

    def _consumer_batches(self, plan: Plan, state: StreamState, *, consumer: int, worker: int,
                          counters: dict) -> Iterator[dict]:
        options = self.options
        rank = options.rank
        chunk = plan.chunks[(rank, consumer)]
        num_workers = options.consumers_per_rank
        num_batches = worker_batches(plan.steps, worker=consumer, num_workers=num_workers)
        first_batch = worker_batches(state.steps_done, worker=consumer, num_workers=num_workers)
        rng = consumer_rng(seed=state.seed, epoch=plan.epoch, generation=plan.generation, rank=rank, worker=consumer)
        items = shuffled(self._read_chunk(chunk), buffer_size=self._buffer_size, rng=rng)
        for _ in range(first_batch * options.batch_size):  # resume: skip what was consumed, undecoded
            next(items, None)
        last_good: list[dict] = []
        for batch_number in range(first_batch, num_batches):
            raw = [item for _, item in zip(range(options.batch_size), items)]
            samples = [self._decode(item, epoch=plan.epoch, counters=counters) for item in raw]
            samples = self._fill(samples, last_good=last_good, counters=counters)
            last_good = [sample for sample in samples if sample["valid"]] or last_good
            self._check_failures(counters)
            batch = collate(samples)
            batch["stream"] = {"epoch": plan.epoch, "generation": plan.generation,
                               "step": consumer + batch_number * num_workers, "steps": plan.steps,
                               "rank": rank, "worker": worker, **counters}
            yield batch

    def _read_chunk(self, chunk: list[Segment]) -> Iterator[Item]:
        for read, start, end in chunk:
            for index, members in read_segment(self.shards[read % len(self.shards)].url, start, end):
                yield read, index, members

    def _decode(self, item: Item, *, epoch: int, counters: dict) -> dict | None:
        read, index, members = item
        counters["items"] += 1
        url = self.shards[read % len(self.shards)].url
        if members is None:
            counters["failed"] += 1
            return None
        rng = np.random.default_rng([self.state.seed, epoch, read, index])
        key = f"{url.rsplit('/', 1)[-1]}/{index}"
        if is_encoded(members) != (self.options.encoding is not None):
            raise EncodingMismatchError(
                f"{url}#{index}: {'an encoded' if is_encoded(members) else 'an audio'} sample in a stream of "
                f"{'encoded' if self.options.encoding is not None else 'audio'} shards: do not mix encode-shards "
                f"output with audio shards in one --train-data / --val-data")
        try:
            if self.options.encoding is not None:
                return encoded_sample(members, name=f"{url}#{index}", key=key, config=self.audio, labels=self.labels,
                                      rng=rng, expected=self.options.encoding)
            audio_ext = next((ext for ext in schema.AUDIO_EXTENSIONS if ext in members), None)
            if audio_ext is None or schema.JSON_EXTENSION not in members:
                raise AudioDecodeError("incomplete", f"members {sorted(members)}")
            metadata = json.loads(members[schema.JSON_EXTENSION])
            waveform, rate = decode(members[audio_ext], name=f"{url}#{index}")
            captions = metadata.get(schema.CAPTIONS) or [metadata.get(schema.CAPTION, "")]
            return make_sample(waveform, rate, captions=captions, label_mids=metadata.get(schema.LABELS, []),
                               fname=metadata.get(schema.SOURCE_PATH, key), key=key, config=self.audio,
                               mel=self._mel, labels=self.labels, rng=rng)
        except (AudioDecodeError, ValueError, KeyError) as error:
            counters["failed"] += 1
            warn_rate_limited("skipping sample %d of shard %s: %s", index, url, error, logger=log)
            return None

    @property
    def _mel(self) -> MelFeatures | None:
        if not self.options.features_in_loader:
            return None
        if not hasattr(self, "_mel_features"):
            self._mel_features = MelFeatures(self.audio)
        return self._mel_features

    def _fill(self, samples: list[dict | None], *, last_good: list[dict], counters: dict) -> list[dict]:
        """Keeps the batch size: failed samples are replaced by good ones, missing ones padded."""
        good = [sample for sample in samples if sample is not None]
        donors = good or last_good
        filled = []
        for position, sample in enumerate(samples):
            if sample is None:
                if not donors:
                    raise RuntimeError(f"rank {self.options.rank}: no decodable sample in a whole batch and "
                                       f"none before it; check the shards ({counters})")
                sample = donors[position % len(donors)]
                counters["replaced"] += 1
            filled.append(sample)
        while len(filled) < self.options.batch_size:  # evaluation: the epoch ran out on this reader
            if self.options.encoding is not None:  # no audio to make silence from: a copy, marked invalid
                filled.append({**(donors or filled)[0], "valid": False})
            else:
                filled.append(padding_sample(config=self.audio, mel=self._mel, labels=self.labels))
        return filled

    def _check_failures(self, counters: dict) -> None:
        if counters["items"] >= 20 and counters["failed"] > self.options.max_failed_fraction * counters["items"]:
            raise RuntimeError(
                f"rank {self.options.rank}: {counters['failed']} of {counters['items']} samples failed, more than "
                f"data.max_failed_fraction={self.options.max_failed_fraction}; see the warnings above for shards and "
                f"keys")


class StreamTracker:
    """Trainer-side: advances the stream state with every batch the training loop consumed."""

    def __init__(self, stream: ShardStream) -> None:
        self.stream = stream
        self.state = copy.deepcopy(stream.state)
        self.failures: dict[tuple[int, int], dict] = {}

    def advance(self, batch: dict) -> None:
        info = batch["stream"]
        assert info["epoch"] == self.state.epoch and info["step"] == self.state.steps_done, \
            f"batch {info} out of order with the stream state {self.state.epoch}/{self.state.steps_done}"
        self.failures[(info["rank"], info["worker"])] = {k: info[k] for k in ("items", "failed", "replaced")}
        if info["step"] + 1 == info["steps"]:
            self.state = self.stream.next_epoch_state(self.state)
        else:
            self.state = replace(self.state, steps_done=info["step"] + 1)

    def counters(self) -> dict[str, int]:
        """Items read, failed and replaced by this rank's workers so far (since the loader started)."""
        totals = {"items": 0, "failed": 0, "replaced": 0}
        for values in self.failures.values():
            for key in totals:
                totals[key] += values[key]
        return totals


JOB_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
"""What SLURM sends to every process of a job step before its time limit or on preemption. The trainer's
main process handles them (agree, save, stop); the loader's processes must live on until it has."""


def _worker_init(_worker_id: int | None = None) -> None:
    """Workers ignore the job signals and die with their forkserver (`lifeline`)."""
    from audioldm_dist.data.lifeline import die_with_parent

    for signum in JOB_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    die_with_parent()


def _start_forkserver_ignoring_job_signals() -> None:
    """The forkserver (and the resource tracker it starts) inherit SIG_IGN across exec, and so do the
    workers forked from it; without this a `--signal=USR2@N` kills them before the trainer can save.
    The forkserver preloads `lifeline`, so it dies with this process.
    A job signal arriving in the instant the forkserver starts is lost (the main process ignores it too).
    A forkserver already started by other code in this process is kept as it is: `train.py` starts none."""
    if threading.current_thread() is not threading.main_thread():
        return
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in JOB_SIGNALS}
    # Importing `lifeline` in the forkserver makes it die with this rank (a SIGKILLed rank leaves no orphans).
    multiprocessing.forkserver.set_forkserver_preload(["__main__", "audioldm_dist.data.lifeline"])
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def end_loader_workers() -> int:
    """Ends every loader worker this process still has; returns how many had to be killed.

    The workers ignore SIGTERM (`JOB_SIGNALS`), so one whose iterator is still alive when Python exits (kept by
    a reference cycle until the final collection) would make multiprocessing's exit hook, which terminates
    and then joins it, wait forever: a rank that finished its work would hang. Collecting first lets such an
    iterator shut its workers down cleanly; what is left is killed."""
    gc.collect()
    left = [child for child in multiprocessing.active_children() if child.is_alive()]
    for child in left:
        child.kill()
        child.join(timeout=10)
    return len(left)


def make_loader(stream: ShardStream, *, prefetch_factor: int = 2) -> DataLoader:
    """A DataLoader over ready batches; forkserver workers because torch threads deadlock after fork.
    The workers ignore the job signals (see `JOB_SIGNALS`)."""
    num_workers = stream.options.num_workers
    if num_workers > 0:
        _start_forkserver_ignoring_job_signals()
    return DataLoader(stream, batch_size=None, num_workers=num_workers,
                      multiprocessing_context="forkserver" if num_workers > 0 else None,
                      prefetch_factor=prefetch_factor if num_workers > 0 else None,
                      worker_init_fn=_worker_init if num_workers > 0 else None,
                      persistent_workers=False)
