"""Classifier-based scores on PANNs Cnn14 logits (527 AudioSet classes), as audioldm_eval defines them.

- KL: for each generated clip paired by name with a reference clip, KL(reference ‖ generated) between
  their class distributions, summed over classes and averaged over pairs. `softmax` treats the
  logits as one 527-way distribution (the AudioGen formulation); `sigmoid` sums
  σ(r)·(log σ(r) − log(σ(g) + ε)) over classes, exactly as audioldm_eval does (without the 1 − σ
  terms, so it is not a per-class Bernoulli KL; kept as is so numbers compare with the papers).
  ε = 1e-6 inside the log of the generated side, as there.
- Inception score: exp(E_x KL(p(y|x) ‖ p(y))) on softmax class probabilities, over `splits` random
  chunks (seeded permutation, seed 2020 as there); mean and std across chunks. Below 10 clips, one
  chunk (audioldm_eval gives NaN there).
"""
from __future__ import annotations

import numpy as np
from scipy.special import expit, log_softmax, softmax, xlogy

KL_EPS = 1e-6
IS_SEED = 2020
IS_SPLITS = 10


def _kl_sum(target: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """Σ_c t·(log t − log(p + ε)) per row, with 0·log 0 = 0 (torch.nn.functional.kl_div's convention)."""
    return (xlogy(target, target) - target * np.log(prediction + KL_EPS)).sum(axis=1)


def kl_divergences(generated_logits: np.ndarray, reference_logits: np.ndarray) -> dict[str, float]:
    """Paired `(N, C)` logits (row i of both is the same file name) → mean KL, softmax and sigmoid."""
    generated = np.asarray(generated_logits, dtype=np.float64)
    reference = np.asarray(reference_logits, dtype=np.float64)
    if generated.shape != reference.shape or generated.ndim != 2 or generated.shape[0] == 0:
        raise ValueError(f"paired logits must have the same (N>0, C) shape, got {generated.shape} and "
                         f"{reference.shape}")
    kl_softmax = _kl_sum(softmax(reference, axis=1), softmax(generated, axis=1))
    kl_sigmoid = _kl_sum(expit(reference), expit(generated))
    return {"kullback_leibler_divergence_softmax": float(kl_softmax.mean()),
            "kullback_leibler_divergence_sigmoid": float(kl_sigmoid.mean())}


def inception_splits(num_clips: int, *, splits: int = IS_SPLITS) -> int:
    """Chunks actually used: `splits`, or one chunk of every clip when there are fewer clips than chunks
    (audioldm_eval's fixed 10 leaves empty chunks there and reports NaN; one-clip chunks always give 1)."""
    return splits if num_clips >= splits else 1


def inception_score(logits: np.ndarray, *, splits: int = IS_SPLITS, seed: int = IS_SEED) -> dict[str, float]:
    """`(N, C)` logits → mean and std of the inception score over `min(splits, N)` shuffled chunks."""
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"need (N>0, C) logits, got shape {x.shape}")
    num = x.shape[0]
    splits = inception_splits(num, splits=splits)
    x = x[np.random.RandomState(seed).permutation(num)]
    probs, log_probs = softmax(x, axis=1), log_softmax(x, axis=1)
    scores = []
    for index in range(splits):
        chunk = slice(index * num // splits, (index + 1) * num // splits)
        p, log_p = probs[chunk], log_probs[chunk]
        marginal = p.mean(axis=0, keepdims=True)
        scores.append(float(np.exp((p * (log_p - np.log(marginal))).sum(axis=1).mean())))
    return {"inception_score_mean": float(np.mean(scores)), "inception_score_std": float(np.std(scores))}
