"""The DeepSpeed JSON, reconciled with our config: one source of truth for batch and schedule.

Values our YAML owns (micro-batch, accumulation, learning rate, warm-up) are written into the JSON
when it leaves them out or says "auto"; a different explicit value is an error that names both.
The shipped JSONs are the original's optimiser: AdamW with torch's defaults (betas 0.9/0.999, eps 1e-8,
weight decay 0.01), no gradient clipping, linear warm-up then constant (ddpm.py:560-578, 1046-1072).
`initialize_engine` aligns DeepSpeed's schedulers with the original's step count (see there).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from audioldm_dist.config import TrainConfig

log = logging.getLogger(__name__)


def _check_or_fill(ds: dict, key: str, value, *, path: Path, ours: str) -> None:
    if ds.get(key, "auto") == "auto":
        ds[key] = value
    elif ds[key] != value:
        raise ValueError(f"{path}: {key}={ds[key]} disagrees with {ours}={value}; set one of them to match "
                         f"(or \"auto\" in the JSON)")


def load_ds_config(path: str | Path, train: TrainConfig, *, world_size: int) -> dict:
    path = Path(path)
    try:
        ds = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"DeepSpeed config not found: {path}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON: {error}") from None
    _check_or_fill(ds, "train_micro_batch_size_per_gpu", train.micro_batch_size, path=path,
                   ours="train.micro_batch_size")
    _check_or_fill(ds, "gradient_accumulation_steps", train.gradient_accumulation_steps, path=path,
                   ours="train.gradient_accumulation_steps")
    _check_or_fill(ds, "train_batch_size", train.micro_batch_size * train.gradient_accumulation_steps * world_size,
                   path=path, ours="micro_batch × accumulation × world size")
    optimizer = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    _check_or_fill(optimizer.setdefault("params", {}), "lr", train.learning_rate, path=path, ours="train.learning_rate")
    scheduler = ds.setdefault("scheduler", {"type": "WarmupLR", "params": {}})
    params = scheduler.setdefault("params", {})
    _check_or_fill(params, "warmup_num_steps", train.warmup_steps, path=path, ours="train.warmup_steps")
    if scheduler["type"] == "WarmupCosineLR":  # peaks at the optimizer's lr; ratios instead of absolute values
        params.setdefault("warmup_min_ratio", 0.0)
    else:
        _check_or_fill(params, "warmup_max_lr", train.learning_rate, path=path, ours="train.learning_rate")
        params.setdefault("warmup_min_lr", 0.0)
    if scheduler["type"] in ("WarmupDecayLR", "WarmupCosineLR"):
        _check_or_fill(params, "total_num_steps", train.max_steps, path=path, ours="train.max_steps")
    if scheduler["type"] == "WarmupLR" and params["warmup_num_steps"] == 0:
        del ds["scheduler"]  # no warm-up: the optimizer's constant lr (DeepSpeed's WarmupLR rejects 0 steps)
    ds.setdefault("steps_per_print", 10**9)  # our logger prints; keep DeepSpeed's quiet
    return ds


def training_dtype(ds: dict):
    import torch

    if ds.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def initialize_engine(module, ds: dict, *, fresh: bool):
    """`deepspeed.initialize` over `module`'s trainable parameters, with the schedule aligned to the original.

    DeepSpeed's schedulers start at iteration -1 and step after each update, so the update with index g
    (0-based) uses the schedule's value at g - 1 (WarmupLR: max(g - 1, 0) / W). The original sets
    lr = base · min(g / W, 1) before update g (ddpm.py:560-578 `warmup_step`). One scheduler step before
    the first update of a fresh run makes them equal; a resumed run restores the scheduler's own state."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=[p for p in module.parameters()
                                                                           if p.requires_grad], config=ds)
    if fresh and engine.lr_scheduler is not None:
        engine.lr_scheduler.step()
    log.info("DeepSpeed engine: %s", describe_engine(engine))
    return engine


def describe_engine(engine) -> str:
    """What the engine really runs, read from it rather than from the JSON: module, ZeRO stage, weights' dtype,
    optimizer class (DeepSpeedCPUAdam when offloaded) and accumulation."""
    dtype = str(next(engine.module.parameters()).dtype).removeprefix("torch.")
    offload = ", offloaded to the CPU" if engine.zero_cpu_offload() else ""
    return (f"{type(engine.module).__name__} in {dtype}, ZeRO stage {engine.zero_optimization_stage()}, "
            f"optimizer {type(engine.basic_optimizer).__name__}{offload}, "
            f"gradient accumulation {engine.gradient_accumulation_steps()}")
