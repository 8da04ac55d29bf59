"""The encode-shards job: audio shards → shards of VAE posteriors and conditioner embeddings, per crop.

Plan: output shard i holds the crops of input shard i in order (`{prefix}-{i:06d}.tar`), so the output is a
pure function of the input shards, the weights, the audio config and the crop rule (byte-identical reruns:
fixed tar headers, `.npy` bytes). With one crop per clip (clips no longer than `audio.duration`) the encoded
set has the same shard sizes as its source, so the trainer's stream plan picks the same samples in the same
batches as on audio shards.

Crop rule (`crop_starts`): a clip of at most `audio.duration` is one crop (zero-padded, as the loader pads);
a longer one gives a window every `crop_hop` seconds (default: `audio.duration`, no overlap) that fits in
the clip, plus one window ending at the clip's end when the hops leave a tail; `crops_per_clip` > 0 keeps
the first that many. The log-mel of each window is the loader's (`data/batch.make_sample` with a fixed
start: resample, normalise, pad, STFT, mel); the loader's random, silence-avoiding crop is replaced by
these fixed windows.

Ranks: each of WORLD_SIZE ranks (RANK, as the trainer reads them: deepspeed, torchrun, srun) writes shards
i ≡ RANK (mod WORLD_SIZE) with `workers` processes (`shards.pool`); whichever rank finds every shard
complete writes the manifest (a rerun after a lost rank writes it too). Restart: complete shards (tar and
record agree, `shards.writer.completed_record`) are reused. Faults: an undecodable clip is skipped and
listed in failures.jsonl (`shards.writer.write_tar`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from audioldm_dist.config import Config, to_dict
from audioldm_dist.data import encoded, schema
from audioldm_dist.data.audio import AudioDecodeError, decode
from audioldm_dist.data.batch import make_sample
from audioldm_dist.data.melspec import MelFeatures
from audioldm_dist.data.sources import ShardInfo, resolve_specs
from audioldm_dist.data.shard_reader import detect_encoding, read_segment
from shards.make import OPTIONS_FILE, check_output_folder, progress_bar
from shards.manifest import Manifest, ShardEntry, write_manifest
from shards.pool import report, task_runner
from shards.writer import STATE_DIR, ShardRecord, completed_record, write_tar

log = logging.getLogger("encode-shards")


CROP_RULE = ("a clip of at most audio.duration is one zero-padded crop; a longer one gives a window every crop_hop "
             "seconds (0: audio.duration) that fits in the clip, plus one ending at the clip's end when the hops leave "
             "a tail; crops_per_clip > 0 keeps the first that many")
"""The crop rule in words, recorded in the manifest."""


@dataclass(frozen=True, kw_only=True)
class EncodeOptions:
    """Everything besides the weights and the audio config that changes encoded shards."""

    prefix: str = "encoded"
    storage: str = "float16"
    """float16 (default: half the bytes) | float32 (the trainer's numbers to 1e-5)."""
    crop_hop: float = 0.0
    """Seconds between the windows of a long clip; 0: audio.duration (no overlap)."""
    crops_per_clip: int = 0
    """At most this many windows per clip; 0: all (see the module docstring)."""

    def __post_init__(self) -> None:
        if self.storage not in encoded.STORAGE_DTYPES:
            raise ValueError(f"--storage {self.storage!r}: expected one of {', '.join(encoded.STORAGE_DTYPES)}")
        if self.crop_hop < 0 or self.crops_per_clip < 0:
            raise ValueError(f"--crop-hop and --crops-per-clip must be >= 0, got {self.crop_hop}, {self.crops_per_clip}")


@dataclass(frozen=True, kw_only=True)
class EncodeSpec:
    name: str
    fingerprint: str
    index: int
    shard: ShardInfo


@dataclass(frozen=True, kw_only=True)
class EncodeResult:
    manifest: Manifest | None
    """None on a rank that finished before the others (the last one writes it)."""
    num_written: int
    num_reused: int
    failed_fraction: float


def crop_starts(num_frames: int, sample_rate: int, *, duration: float, hop: float, max_crops: int) -> list[int]:
    """Window starts (samples at `sample_rate`) of a clip of `num_frames` samples (the module's crop rule)."""
    window = int(sample_rate * duration)  # as waveform_to_features crops at the clip's own rate
    if num_frames <= window:
        return [0]
    step = max(1, int(round((hop or duration) * sample_rate)))
    starts = list(range(0, num_frames - window + 1, step))
    if starts[-1] != num_frames - window:
        starts.append(num_frames - window)
    return starts[:max_crops] if max_crops > 0 else starts


def plan_encode(shards: list[ShardInfo], *, options: EncodeOptions, encoding: dict) -> list[EncodeSpec]:
    specs = []
    for index, shard in enumerate(shards):
        payload = [shard.url, shard.num_samples, encoding["fingerprint"], asdict(options)]
        specs.append(EncodeSpec(name=schema.shard_name(options.prefix, index), index=index, shard=shard,
                                fingerprint=hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]))
    return specs


class ClipEncoder:
    """One source sample → its crops' encoded members, with the frozen VAE and conditioner of `model`."""

    def __init__(self, model, config: Config, options: EncodeOptions, encoding: dict) -> None:
        self.model = model.eval()
        self.config = config
        self.options = options
        self.encoding = encoding
        self.mel = MelFeatures(config.audio)
        self.device = next(model.vae.parameters()).device

    def __call__(self, spec: EncodeSpec, index: int, members: dict | None
                 ) -> tuple[list[tuple[str, dict[str, bytes]]], float]:
        name = f"{spec.shard.url}#{index}"
        if members is None:
            raise AudioDecodeError("unreadable", f"{name}: the tar could not be read here")
        audio_ext = next((ext for ext in schema.AUDIO_EXTENSIONS if ext in members), None)
        if audio_ext is None or schema.JSON_EXTENSION not in members:
            raise AudioDecodeError("incomplete", f"{name}: members {sorted(members)}")
        metadata = json.loads(members[schema.JSON_EXTENSION])
        waveform, rate = decode(members[audio_ext], name=name)
        captions = metadata.get(schema.CAPTIONS) or [metadata.get(schema.CAPTION, "")]
        audio = self.config.audio
        starts = crop_starts(waveform.shape[1], rate, duration=audio.duration, hop=self.options.crop_hop,
                             max_crops=self.options.crops_per_clip)
        crops = [make_sample(waveform, rate, captions=captions, label_mids=[], fname="", key="", config=audio,
                             mel=self.mel, labels=None, rng=None, start_seconds=start / rate) for start in starts]
        tensors = self._encode(crops, captions)
        samples = []
        for crop, start in enumerate(starts):
            info = metadata | {encoded.CROP_INDEX: crop, encoded.CROP_START: start, encoded.SOURCE: name,
                               encoded.ENCODING: self.encoding}
            key = f"{self.options.prefix}{spec.index:06d}_{index:06d}_{crop:03d}"
            samples.append((key, {**{member: values[crop] for member, values in tensors.items()},
                                  schema.JSON_EXTENSION: json.dumps(info, sort_keys=True).encode()}))
        return samples, waveform.shape[1] / rate

    @torch.no_grad()
    def _encode(self, crops: list[dict], captions: list[str]) -> dict[str, list[bytes]]:
        """Per member, one .npy per crop: posterior, text encodings of every caption, CLAP audio embedding."""
        dtype = self.options.storage
        posterior = self.model.posterior({"log_mel_spec": torch.stack([c["log_mel_spec"] for c in crops])})
        text, mask = self.model.conditioner.encode_text(captions, device=self.device).stored()
        tensors = {encoded.MEAN: [encoded.array_bytes(m, dtype=dtype) for m in posterior.mean],
                   encoded.LOGVAR: [encoded.array_bytes(v, dtype=dtype) for v in posterior.logvar],
                   encoded.TEXT: [encoded.array_bytes(text, dtype=dtype)] * len(crops)}
        if mask is not None:
            tensors[encoded.TEXT_MASK] = [encoded.array_bytes(mask.bool(), dtype=dtype)] * len(crops)
        if self.config.conditioner.kind == "clap":
            waveforms = torch.stack([c["waveform"] for c in crops]).to(self.device)  # (K, 1, T)
            film = self.model.conditioner.encode_audio(waveforms, sample_rate=self.config.audio.sampling_rate).film
            tensors[encoded.CLAP_AUDIO] = [encoded.array_bytes(e, dtype=dtype) for e in film]
        return tensors


# --- worker side -------------------------------------------------------------------------------
_encoder: ClipEncoder | None = None


def build_encoder(config: Config, ckpt: str | None, captions: list[str] | None, options: EncodeOptions,
                  encoding: dict | None) -> ClipEncoder:
    """The model on this process's device; refuses to encode if its fingerprint is not `encoding` (a build that
    is not deterministic would otherwise write shards no trainer accepts)."""
    from audioldm_dist.build import build_model_with_weights
    from audioldm_dist.encoding import model_encoding

    model, _ = build_model_with_weights(config, captions=captions, reload_from_ckpt=ckpt, resuming=False)
    mine = model_encoding(model, config)
    if encoding is not None:
        encoded.check_encoding(mine, encoding, where=f"encode-shards worker {os.getpid()}")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else "cpu"
    return ClipEncoder(model.to(device), config, options, mine)


def _init_worker(*args) -> None:
    global _encoder
    _encoder = build_encoder(*args)


def _encode_shard_task(args: tuple[EncodeSpec, Path]) -> ShardRecord:
    spec, out_dir = args
    assert _encoder is not None, "encode worker not initialised"

    def failure(item: tuple[int, dict | None], error: AudioDecodeError) -> dict:
        return {"key": f"{spec.shard.url}#{item[0]}", "shard": spec.shard.url, "index": item[0],
                "reason": error.reason, "detail": error.detail}

    return write_tar(spec.name, fingerprint=spec.fingerprint, out_dir=out_dir,
                     items=read_segment(spec.shard.url, 0, spec.shard.num_samples),
                     encode=lambda item: _encoder(spec, *item),
                     failure=failure, progress=report)


# --- parent side -------------------------------------------------------------------------------
def encode_shards(*, config: Config, sources: list[str], out_dir: str | Path, options: EncodeOptions,
                  ckpt: str | None = None, workers: int = 1, rank: int = 0, world_size: int = 1,
                  overwrite: bool = False, command: list[str] | None = None, show_progress: bool = True,
                  wait_seconds: float = 600.0) -> EncodeResult:
    """Runs this rank's part of the job (see the module docstring); safe to rerun after a kill."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if overwrite and world_size > 1:
        raise ValueError("--overwrite with several ranks: run it once with one rank (it deletes every shard)")
    shards = resolve_specs(sources, cache_dir=out_dir)
    if detect_encoding(shards) is not None:
        raise ValueError(f"{sources[0]}: already encoded (encode-shards output); give the audio shards")
    from audioldm_dist.build import tokenizer_captions

    captions = tokenizer_captions(config, shards, reload_from_ckpt=ckpt)
    encoding = build_encoder(config, ckpt, captions, options, None).encoding
    source = {"specs": list(sources), "shards": [[shard.url, shard.num_samples] for shard in shards],
              "ckpt": ckpt or "", "encoding": encoding}
    _claim_output_folder(out_dir, options=options, source=source, overwrite=overwrite, rank=rank,
                         wait_seconds=wait_seconds)
    specs = plan_encode(shards, options=options, encoding=encoding)
    mine = specs[rank::world_size]
    todo = [spec for spec in mine if completed_record(spec, out_dir=out_dir) is None]
    for spec in todo:  # temp files of this rank's shards left by a killed run
        for stale in out_dir.glob(f".{spec.name}.tmp-*"):
            stale.unlink()
    log.info("rank %d/%d: %d of %d shards to encode (%d complete)", rank, world_size, len(todo), len(mine),
             len(mine) - len(todo))
    with progress_bar(total=sum(spec.shard.num_samples for spec in todo), desc=f"encoding {len(todo)} shards",
                      show=show_progress) as tick, \
            task_runner(workers=workers, preload=["shards.encode"], progress=tick, initializer=_init_worker,
                        initargs=(config, ckpt, captions, options, encoding)) as run:
        for _ in run(_encode_shard_task, [(spec, out_dir) for spec in todo]):
            pass
    records = [completed_record(spec, out_dir=out_dir) for spec in specs]
    failures = [failure for record in records if record is not None for failure in record.failures]
    num_entries = sum(shard.num_samples for shard in shards)
    result = dict(num_written=len(todo), num_reused=len(mine) - len(todo),
                  failed_fraction=len(failures) / max(1, num_entries))
    if any(record is None for record in records):  # another rank is still at work; the last one writes it
        return EncodeResult(manifest=None, **result)
    manifest = Manifest(
        shards=[ShardEntry(name=r.name, num_samples=r.num_samples, bytes=r.bytes, sha256=r.sha256, seconds=r.seconds)
                for r in records],
        num_entries=num_entries, num_failed=len(failures), created_by="encode-shards", command=command or [],
        options=asdict(options) | {"crop_rule": CROP_RULE, "config": to_dict(config)},
        source=source)
    write_manifest(out_dir, manifest, failures=sorted(failures, key=lambda failure: failure["key"]))
    return EncodeResult(manifest=manifest, **result)


def _claim_output_folder(out_dir: Path, *, options: EncodeOptions, source: dict, overwrite: bool, rank: int,
                         wait_seconds: float) -> None:
    """Rank 0 checks (or claims) the folder as make-shards does; the other ranks wait until it has."""
    if rank == 0:
        check_output_folder(out_dir, options=options, source=source, overwrite=overwrite, remove_stale=False)
        return
    wanted = {"options": asdict(options), "source": source}
    path = out_dir / STATE_DIR / OPTIONS_FILE
    deadline = time.monotonic() + wait_seconds
    while time.monotonic() < deadline:
        try:
            if json.loads(path.read_text()) == wanted:
                return
        except (OSError, ValueError):
            pass
        time.sleep(1.0)
    raise ValueError(f"rank {rank}: {path} does not describe this job after {wait_seconds:.0f}s: rank 0 failed, "
                     f"or the folder holds shards made with other settings (see rank 0's error)")
