"""Folder-level metrics from per-clip features: FD, FAD, KL, IS and the CLAP score.

Unpaired metrics (FD, FAD, IS) use every clip that was read; KL uses the clips whose name is in both
folders. A metric that cannot be computed is `None` with the reason in `skipped`, never NaN.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from audioldm_dist.eval.backbones import ClapScorer
from audioldm_dist.eval.extract import FolderFeatures
from audioldm_dist.eval.frechet import frechet_distance_of_embeddings
from audioldm_dist.eval.scores import inception_score, inception_splits, kl_divergences

METRIC_KEYS = ("frechet_distance", "frechet_audio_distance", "kullback_leibler_divergence_softmax",
               "kullback_leibler_divergence_sigmoid", "inception_score_mean", "inception_score_std", "clap_score")
"""audioldm_eval's names (its JSON has the same keys), plus the CLAP score."""


@dataclass
class MetricResult:
    values: dict[str, float | None] = field(default_factory=lambda: dict.fromkeys(METRIC_KEYS))
    skipped: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)


def compute_metrics(generated: FolderFeatures, reference: FolderFeatures, *, captions: dict[str, str],
                    clap: ClapScorer | None, clap_skip_reason: str | None) -> MetricResult:
    result = MetricResult()
    gen_names, ref_names = generated.names, reference.names
    result.counts.update(generated_used=len(gen_names), reference_used=len(ref_names))

    if len(gen_names) >= 2 and len(ref_names) >= 2:
        result.values["frechet_distance"] = frechet_distance_of_embeddings(
            np.stack([generated.panns_embedding[n] for n in gen_names]),
            np.stack([reference.panns_embedding[n] for n in ref_names]))
    else:
        result.skipped["frechet_distance"] = f"needs ≥ 2 clips per side, have {len(gen_names)} and {len(ref_names)}"

    gen_patches = np.concatenate([generated.vggish[n] for n in gen_names]) if gen_names else np.zeros((0, 128))
    ref_patches = np.concatenate([reference.vggish[n] for n in ref_names]) if ref_names else np.zeros((0, 128))
    result.counts.update(vggish_patches_generated=len(gen_patches), vggish_patches_reference=len(ref_patches))
    if len(gen_patches) >= 2 and len(ref_patches) >= 2:
        result.values["frechet_audio_distance"] = frechet_distance_of_embeddings(gen_patches, ref_patches)
    else:
        result.skipped["frechet_audio_distance"] = (f"needs ≥ 2 VGGish patches per side, have {len(gen_patches)} "
                                                    f"and {len(ref_patches)}")

    paired = sorted(set(gen_names) & set(ref_names))
    result.counts["paired"] = len(paired)
    if paired:
        result.values.update(kl_divergences(np.stack([generated.panns_logits[n] for n in paired]),
                                            np.stack([reference.panns_logits[n] for n in paired])))
    else:
        for key in ("kullback_leibler_divergence_softmax", "kullback_leibler_divergence_sigmoid"):
            result.skipped[key] = "no generated clip has a reference clip of the same name"

    if gen_names:
        result.values.update(inception_score(np.stack([generated.panns_logits[n] for n in gen_names])))
        result.counts["inception_score_splits"] = inception_splits(len(gen_names))
    else:
        for key in ("inception_score_mean", "inception_score_std"):
            result.skipped[key] = "no generated clip could be read"

    scored = [n for n in gen_names if n in captions and n in generated.clap_audio]
    result.counts["clap_scored"] = len(scored)
    if clap is None:
        result.skipped["clap_score"] = clap_skip_reason or "no CLAP model"
    elif not scored:
        result.skipped["clap_score"] = ("no captions: no generated clip has a NAME.json sidecar with a caption "
                                        "or an entry in --captions")
    else:
        text = clap.text_embeddings([captions[n] for n in scored])  # (N, D), unit norm
        audio = np.stack([generated.clap_audio[n] for n in scored])  # (N, D), unit norm
        result.values["clap_score"] = float(np.mean(np.sum(text.astype(np.float64) * audio, axis=1)))
        result.counts["clap_missing_captions"] = len(gen_names) - len(scored)
    return result
