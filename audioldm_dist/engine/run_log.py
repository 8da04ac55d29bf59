"""metrics.jsonl (always), wandb (optional, offline by default) and a tqdm bar, all on rank 0."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger(__name__)


class MetricsLogger:
    def __init__(self, run_dir: Path, *, enabled: bool, use_wandb: bool, start_step: int, max_steps: int,
                 wandb_id: str | None, config: dict) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.wandb_run = None
        self.wandb_id = wandb_id
        self.bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step", disable=not enabled,
                        dynamic_ncols=True)
        if enabled and use_wandb:
            try:
                import wandb

                os.environ.setdefault("WANDB_MODE", "offline")
                self.wandb_run = wandb.init(project="audioldm-dist", dir=str(run_dir), id=wandb_id, resume="allow",
                                            config=config, name=run_dir.name)
                self.wandb_id = self.wandb_run.id
            except Exception as error:  # logging must never stop training
                log.warning("wandb unavailable (%s); metrics.jsonl only", error)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: (float(f"{v:.7g}") if isinstance(v, float) else v) for k, v in metrics.items()}}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        self._to_wandb(lambda run: run.log(metrics, step=step), step)
        if "loss" in metrics:
            self.bar.set_postfix_str(f"loss {metrics['loss']:.4f} lr {metrics['lr']:.2e}", refresh=False)

    def log_samples(self, step: int, wav_paths: list[Path], *, captions: list[str], sample_rate: int) -> None:
        """Validation samples (wav + its spectrogram PNG beside it, with their captions) to wandb, the same
        audio and pictures as the run report; the files stay in the run."""
        if not self.enabled or self.wandb_run is None or not wav_paths:
            return
        import wandb

        self._to_wandb(lambda run: run.log(
            {"val/audio": [wandb.Audio(str(p), sample_rate=sample_rate, caption=f"{p.stem}: {c}")
                           for p, c in zip(wav_paths, captions)],
             "val/spectrogram": [wandb.Image(str(p.with_suffix(".png")), caption=f"{p.stem}: {c}")
                                 for p, c in zip(wav_paths, captions)]},
            step=step), step)

    def _to_wandb(self, call, step: int | None) -> None:
        """wandb failing must not stop training: SLURM's SIGTERM (preemption, scancel) reaches every process
        of the step, wandb's `wandb-core` service among them, and every later call then raises. From the
        first failure on, metrics go to metrics.jsonl only."""
        if self.wandb_run is None:
            return
        try:
            call(self.wandb_run)
        except Exception as error:
            log.warning("wandb stopped working at step %s (%s: %s); metrics.jsonl only from here on",
                        step, type(error).__name__, error)
            self.wandb_run = None

    def advance(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
        self._to_wandb(lambda run: run.finish(), None)
