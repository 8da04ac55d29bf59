"""Checkpoints: DeepSpeed's sharded model/optimizer state plus our own small files, and `latest`.

    RUN/checkpoints/global_step{N}/   DeepSpeed's files (every rank writes its shards)
        meta.json                      step, world size, ZeRO stage, the trained weights' dtype as the
                                       engine holds them (bf16/fp16 JSONs: bfloat16/float16), written
                                       last by rank 0
        client_state.pt                EMA, VAE scale, data stream state, config, wandb id (rank 0)
        rng_rank{R}.pt                 each rank's RNG states
        discriminator/                 train.target=vae: the discriminator engine's DeepSpeed files
    RUN/checkpoints/latest             the newest complete tag: replaced atomically after a barrier,
                                       so it never names a tag that some rank is still writing.

A checkpoint from another world size is converted with DeepSpeed's universal checkpoint tool
(`python -m deepspeed.checkpoint.ds_to_universal`) automatically on resume, into
`global_step{N}_universal`, and loaded with `load_universal`.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from audioldm_dist.fileio import (atomic_torch_save, atomic_write_bytes, disk_full_error,
                                  folder_bytes, free_bytes, human_bytes, is_out_of_space)

log = logging.getLogger(__name__)

LATEST = "latest"
META = "meta.json"
CLIENT_STATE = "client_state.pt"
TAG_PATTERN = re.compile(r"^global_step(\d+)$")


def tag_for(step: int) -> str:
    return f"global_step{step}"


@dataclass(frozen=True, kw_only=True)
class ResumePoint:
    load_dir: Path
    """Folder DeepSpeed loads from (holds the tag folder)."""
    tag: str
    """Tag DeepSpeed loads (…_universal after a conversion)."""
    our_dir: Path
    """The original tag folder with our meta, client state and RNG files."""
    meta: dict


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def latest_tag(run_dir: Path) -> str | None:
    latest = checkpoint_dir(run_dir) / LATEST
    return latest.read_text().strip() if latest.is_file() else None


def check_room(run_dir: Path, *, rank: int, stop: bool) -> int:
    """Free space against the last complete checkpoint's size: a warning (or, with `stop`, a DiskFullError
    before anything is written). Returns the bytes the next checkpoint is expected to need (0: unknown)."""
    previous = latest_tag(run_dir)
    needed = folder_bytes(checkpoint_dir(run_dir) / previous) if previous else 0
    free = free_bytes(checkpoint_dir(run_dir))
    if needed and free < needed:
        message = (f"rank {rank}: {checkpoint_dir(run_dir)} has {human_bytes(free)} free but the last checkpoint "
                   f"({previous}) took {human_bytes(needed)}: the next save may not fit")
        if stop:
            raise disk_full_error(checkpoint_dir(run_dir), what="the next checkpoint (train.stop_on_low_disk)",
                                  needed=needed)
        log.warning(message)
    return needed


def save(engine, *, run_dir: Path, step: int, client_state: dict, rng_state: dict, rank: int, world_size: int,
         zero_stage: int, keep_last: int, stop_on_low_disk: bool = False,
         save_extra: Callable[[Path], None] | None = None) -> Path:
    """All ranks call this. Returns the tag folder once every rank has written and `latest` points at it.
    `save_extra(tag_dir)` (all ranks) writes more engines' files before the checkpoint counts as complete.

    Out of space: the partial tag folder is removed (`latest` never named it) and a DiskFullError names the
    folder, the bytes needed and free, and the checkpoint `latest` still names."""
    folder = checkpoint_dir(run_dir)
    tag = tag_for(step)
    tag_dir = folder / tag
    needed = check_room(run_dir, rank=rank, stop=stop_on_low_disk)
    try:
        engine.save_checkpoint(str(folder), tag=tag, save_latest=False,
                               client_state={"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}})
        if save_extra is not None:
            save_extra(tag_dir)
        atomic_torch_save(tag_dir / f"rng_rank{rank}.pt", rng_state)
        if rank == 0:
            atomic_torch_save(tag_dir / CLIENT_STATE, client_state)
    except (OSError, RuntimeError) as error:
        if not is_out_of_space(error, folder, needed=needed):
            raise
        shutil.rmtree(tag_dir, ignore_errors=True)
        raise disk_full_error(folder, what=f"checkpoint {tag}", needed=needed,
                              advice=f"; `latest` still names {latest_tag(run_dir) or 'nothing'} (complete); free "
                                     f"space or move the run directory, then resume") from None
    _barrier()  # every rank has written its shards and RNG file
    if rank == 0:
        meta = {"step": step, "world_size": world_size, "zero_stage": zero_stage,
                "dtype": str(next(engine.module.parameters()).dtype).removeprefix("torch.")}
        atomic_write_bytes(tag_dir / META, json.dumps(meta).encode())
        atomic_write_bytes(folder / LATEST, tag.encode())
        _prune(folder, keep_last=keep_last)
        log.info("rank 0: checkpoint %s complete (all %d ranks written)", tag, world_size)
    _barrier()
    return tag_dir


def _prune(folder: Path, *, keep_last: int) -> None:
    tags = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := TAG_PATTERN.match(p.name)))
    for _, old in tags[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(old.with_name(old.name + "_universal"), ignore_errors=True)


def find_resume_point(run_dir: Path, resume: str) -> ResumePoint | None:
    """`auto`: the tag `latest` names, if any; `none`: None; a path: that tag folder."""
    if resume == "none":
        return None
    if resume == "auto":
        latest = checkpoint_dir(run_dir) / LATEST
        if not latest.is_file():
            return None
        tag_dir = checkpoint_dir(run_dir) / latest.read_text().strip()
    else:
        tag_dir = Path(resume)
    meta_path = tag_dir / META
    if not meta_path.is_file():
        raise ValueError(f"--resume {resume}: {tag_dir} is not a complete checkpoint (no {META}); "
                         f"complete ones are listed in {checkpoint_dir(run_dir) / LATEST}")
    meta = json.loads(meta_path.read_text())
    return ResumePoint(load_dir=tag_dir.parent, tag=tag_dir.name, our_dir=tag_dir, meta=meta)


def universal_for(point: ResumePoint, *, rank: int) -> ResumePoint:
    """Converts a checkpoint of another world size (rank 0 runs the tool once; others wait)."""
    universal = point.our_dir.with_name(point.our_dir.name + "_universal")
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(point.our_dir),
               "--output_folder", str(universal)]
    if rank == 0 and not (universal / "zero").is_dir():
        log.info("rank 0: checkpoint from %d ranks: converting to a universal checkpoint: %s",
                 point.meta["world_size"], " ".join(command))
        partial = universal.with_name(universal.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        result = subprocess.run([*command[:-1], str(partial)], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"universal checkpoint conversion failed; run it by hand:\n  {' '.join(command)}\n"
                               f"{result.stderr[-2000:]}")
        partial.rename(universal)
    _barrier()
    return ResumePoint(load_dir=universal.parent, tag=universal.name, our_dir=point.our_dir, meta=point.meta)


def load_client_state(point: ResumePoint) -> dict:
    return torch.load(point.our_dir / CLIENT_STATE, map_location="cpu", weights_only=False)


def load_rng_state(point: ResumePoint, *, rank: int) -> dict | None:
    path = point.our_dir / f"rng_rank{rank}.pt"
    current_world_size = dist.get_world_size() if dist.is_initialized() else 1
    if point.meta["world_size"] != current_world_size:
        return None  # other ranks: the caller reseeds deterministically
    return torch.load(path, map_location="cpu", weights_only=False) if path.is_file() else None


FROZEN_PARTS = "frozen_parts.pt"
"""The run directory's copy of the parts that do not train (`save_frozen_parts`), read by `export`."""


def save_frozen_parts(model, path: Path, *, trained: str) -> None:
    """The parts that do not train (all but `trained`) never change and are not in DeepSpeed's files;
    kept once per run so `export` writes a complete model (random_init ones cannot be rebuilt elsewhere)."""
    from audioldm_dist.fileio import atomic_torch_save
    from audioldm_dist.pretrained import PARTS

    state = {part: getattr(model, part).state_dict() for part in PARTS if part != trained}
    state["trained"] = trained
    state["captions"] = getattr(model, "captions", None)
    atomic_torch_save(path, state)
