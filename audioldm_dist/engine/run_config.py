"""A run directory belongs to one experiment: resuming it with another model or data layout is refused.

Checked by the trainer on start and by `launch/slurm.py` before anything is submitted. Fields that
may change between restarts of one run (max_steps, save/log/val intervals, logger, the whole `data`
section: the stream resumes across a new layout) are not compared.
"""
from __future__ import annotations

import json
from pathlib import Path

from audioldm_dist.config import Config, to_dict

MAY_CHANGE = {"train.max_steps", "train.save_every", "train.keep_last", "train.log_every", "train.logger",
              "train.val_every", "train.val_batches", "train.val_num_samples", "data.train", "data.val",
              "data.num_workers", "data.shuffle_buffer", "data.features_in_loader", "data.max_failed_fraction",
              "data.allow_shard_sharing"}


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def check_run_config(run_dir: Path, config: Config, *, config_path: str) -> None:
    """ValueError naming the differing fields when `run_dir/config.json` is another experiment's."""
    saved_path = Path(run_dir) / "config.json"
    if not saved_path.is_file():
        return
    saved = _flatten(json.loads(saved_path.read_text()))
    current = _flatten(to_dict(config))
    differing = sorted(key for key in set(saved) | set(current)
                       if key not in MAY_CHANGE and saved.get(key) != current.get(key))
    if differing:
        details = "; ".join(f"{key}: run has {saved.get(key)!r}, {config_path} gives {current.get(key)!r}"
                            for key in differing[:5])
        more = f" (and {len(differing) - 5} more)" if len(differing) > 5 else ""
        raise ValueError(f"{run_dir} belongs to a different config: {details}{more}. Use another --run-dir, "
                         f"or the config it was started with ({saved_path}).")
