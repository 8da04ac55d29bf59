"""Evaluates folders of generated clips against reference folders and writes one JSON per folder.

`Evaluator` builds the backbones (and the CLAP model) once, and computes a reference folder's
features once however many generated folders are compared with it (every step of a run).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from audioldm_dist.eval.backbones import RANDOM_WARNING, ClapScorer, build_backbones
from audioldm_dist.eval.config import EvalConfig
from audioldm_dist.eval.extract import FolderFeatures, folder_features
from audioldm_dist.eval.files import list_clips, pair_by_name, read_captions_file, sidecar_captions
from audioldm_dist.eval.metrics import compute_metrics
from audioldm_dist.fileio import atomic_write_bytes

log = logging.getLogger("audioldm_dist.eval")


@dataclass(frozen=True, kw_only=True)
class Job:
    """One generated folder, the reference it is compared with, and where its JSON goes."""

    generated: Path
    reference: Path
    out: Path


class Evaluator:
    def __init__(self, config: EvalConfig, *, captions_file: str | Path | None = None) -> None:
        self.config = config
        self.captions_file = captions_file
        self.extra_captions = read_captions_file(captions_file) if captions_file is not None else {}
        self.backbones = build_backbones(config)
        self._references: dict[Path, FolderFeatures] = {}
        self._clap: ClapScorer | None = None
        self._clap_built = False
        self.clap_skip_reason: str | None = None

    def captions_for(self, clips: dict[str, Path]) -> dict[str, str]:
        """Sidecar captions, overridden by the `--captions` file."""
        captions = sidecar_captions(clips)
        captions.update({name: text for name, text in self.extra_captions.items() if name in clips})
        return captions

    def prepare_clap(self, all_captions: list[str]) -> None:
        """Builds the CLAP scorer once (a random one needs every caption up front for its tokenizer)."""
        self._clap_built = True
        if self.config.clap_ckpt is None and not self.config.random_backbones:
            self.clap_skip_reason = "no --clap-ckpt given (a local transformers CLAP folder)"
        elif not all_captions:
            self.clap_skip_reason = ("no captions: no generated clip has a NAME.json sidecar with a caption "
                                     "and no --captions file was given")
        else:
            self._clap = ClapScorer(checkpoint=self.config.clap_ckpt, captions=sorted(set(all_captions)),
                                    device=self.backbones.device, seed=self.config.seed)
        if self.clap_skip_reason:
            log.warning("CLAP score skipped: %s", self.clap_skip_reason)

    def settings(self, job: Job) -> dict:
        """What the numbers depend on besides the clips; a stored JSON with other settings is recomputed."""
        clap = (None if self._clap is None else
                str(Path(self.config.clap_ckpt).resolve()) if self.config.clap_ckpt else "random")
        return {"reference": str(job.reference.resolve()), "backbones": self.backbones.description, "clap": clap,
                "captions_file": None if self.captions_file is None else str(Path(self.captions_file).resolve()),
                "pad_short": self.config.pad_short}

    def reference_features(self, folder: Path) -> FolderFeatures:
        key = folder.resolve()
        if key not in self._references:
            log.info("reference %s: extracting features", folder)
            self._references[key] = folder_features(list_clips(folder), self.backbones, clap=None,
                                                    label=f"reference {folder.name}", pad_short=self.config.pad_short)
        return self._references[key]

    def evaluate(self, job: Job, *, reuse: bool = False) -> dict:
        """Metrics of one folder, written to `job.out`; with `reuse`, a stored result of equal settings."""
        if not self._clap_built:
            self.prepare_clap(list(self.captions_for(list_clips(job.generated)).values()))
        settings = self.settings(job)
        if reuse and job.out.is_file():
            try:
                stored = json.loads(job.out.read_text())
            except json.JSONDecodeError:
                stored = {}
            if stored.get("settings") == settings:
                log.info("%s: reusing %s (same settings; --recompute to redo)", job.generated, job.out)
                return stored
        started = time.perf_counter()
        generated_clips, reference_clips = list_clips(job.generated), list_clips(job.reference)
        captions = self.captions_for(generated_clips)
        reference = self.reference_features(job.reference)
        generated = folder_features(generated_clips, self.backbones, clap=self._clap, label=job.generated.name,
                                    pad_short=self.config.pad_short)
        result = compute_metrics(generated, reference, captions=captions, clap=self._clap,
                                 clap_skip_reason=self.clap_skip_reason)
        pairing = pair_by_name(generated_clips, reference_clips)
        listed = self.config.max_listed
        report = {
            "generated": str(job.generated), "reference": str(job.reference),
            "metrics": result.values, "skipped_metrics": result.skipped,
            "counts": {"generated_files": len(generated_clips), "reference_files": len(reference_clips),
                       **result.counts},
            "unmatched": pairing.report(max_listed=listed),
            "failed_files": {"generated": generated.failed.report(max_listed=listed),
                             "reference": reference.failed.report(max_listed=listed)},
            "settings": settings,
            "seconds": round(time.perf_counter() - started, 3),
        }
        if self.config.random_backbones:
            report["warning"] = RANDOM_WARNING
        _log_report(job, report, pairing_names=(pairing.generated_only[:listed], pairing.reference_only[:listed]))
        job.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(job.out, (json.dumps(report, indent=1, ensure_ascii=False) + "\n").encode())
        return report


def _log_report(job: Job, report: dict, *, pairing_names: tuple[list[str], list[str]]) -> None:
    unmatched = report["unmatched"]
    for side, names in zip(("generated_only", "reference_only"), pairing_names):
        if unmatched[side]["count"]:
            log.warning("%s: %d %s clips have no same-name partner (left out of KL), e.g. %s", job.generated,
                        unmatched[side]["count"], side.split("_")[0], ", ".join(names))
    for side, failed in report["failed_files"].items():
        if failed["count"]:
            log.warning("%s: %d %s files could not be used: %s", job.generated, failed["count"], side,
                        "; ".join(f"{f['path']} ({f['reason']})" for f in failed["files"]))
    for key, reason in report["skipped_metrics"].items():
        log.info("%s: %s not computed: %s", job.generated, key, reason)
    values = ", ".join(f"{k}={v:.4f}" for k, v in report["metrics"].items() if v is not None)
    log.info("%s: %s → %s", job.generated, values, job.out)
