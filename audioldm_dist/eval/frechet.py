"""Fréchet distance between the Gaussians fitted to two sets of embeddings (FD on PANNs, FAD on VGGish).

    d² = |μ₁ − μ₂|² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁^½ Σ₂ Σ₁^½)^½

audioldm_eval (after pytorch-fid) takes `scipy.linalg.sqrtm(Σ₁ Σ₂)`: a non-symmetric product whose
square root goes complex or infinite when the covariances are singular, which they always are with
fewer clips than dimensions (2048-d PANNs embeddings, a few hundred validation clips), and then
retries with 1e-6 added to the diagonal. The trace is the same for the symmetric form above, whose
pieces are PSD: both square roots come from a symmetric eigendecomposition in float64 with the
round-off eigenvalues (negative, or below the rank tolerance) set to 0, so the result is finite for
any rank and needs no offset.

From embeddings with fewer clips than dimensions the same trace is cheaper and exact without any
D×D root: with centred data A₁ (N₁×D), A₂ (N₂×D), Σᵢ = AᵢᵀAᵢ/(Nᵢ−1), the nonzero eigenvalues of Σ₁Σ₂
are the squared singular values of A₁A₂ᵀ/√((N₁−1)(N₂−1)), so tr (Σ₁Σ₂)^½ is that matrix's nuclear norm.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, kw_only=True)
class Gaussian:
    """Mean `(D,)` and covariance `(D, D)` of a set of embeddings, float64."""

    mean: np.ndarray
    cov: np.ndarray
    num_samples: int


def fit_gaussian(embeddings: np.ndarray) -> Gaussian:
    """`(N, D)` embeddings → their mean and unbiased covariance (N − 1), as np.cov computes it."""
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need at least 2 embeddings of shape (N, D) for a covariance, got shape {x.shape}")
    mean = x.mean(axis=0)
    centred = x - mean
    cov = centred.T @ centred / (x.shape[0] - 1)
    return Gaussian(mean=mean, cov=cov, num_samples=x.shape[0])


def _clip_round_off(eigenvalues: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with round-off zeroed: negatives, and positives below the rank
    tolerance (numpy's matrix_rank rule), whose square roots would otherwise add up to a bias."""
    tolerance = max(float(eigenvalues.max(initial=0.0)), 0.0) * len(eigenvalues) * np.finfo(np.float64).eps
    return np.where(eigenvalues > tolerance, eigenvalues, 0.0)


def psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a (numerically) positive semi-definite matrix."""
    matrix = np.asarray(matrix, dtype=np.float64)
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(_clip_round_off(eigenvalues))) @ eigenvectors.T


def trace_sqrt_product(cov1: np.ndarray, cov2: np.ndarray) -> float:
    """tr (Σ₁ Σ₂)^½, computed as tr (Σ₁^½ Σ₂ Σ₁^½)^½ (a PSD matrix, so its root is real)."""
    root1 = psd_sqrt(cov1)
    inner = root1 @ np.asarray(cov2, dtype=np.float64) @ root1
    return float(np.sqrt(_clip_round_off(np.linalg.eigvalsh((inner + inner.T) / 2))).sum())


def frechet_distance(first: Gaussian, second: Gaussian) -> float:
    """The squared Fréchet (2-Wasserstein) distance between two Gaussians; ≥ 0 (round-off clipped)."""
    if first.mean.shape != second.mean.shape:
        raise ValueError(f"embedding sizes differ: {first.mean.shape[0]} and {second.mean.shape[0]}")
    diff = first.mean - second.mean
    distance = (diff @ diff + np.trace(first.cov) + np.trace(second.cov)
                - 2.0 * trace_sqrt_product(first.cov, second.cov))
    return max(float(distance), 0.0)


def frechet_distance_of_embeddings(first: np.ndarray, second: np.ndarray) -> float:
    """`(N₁, D)` and `(N₂, D)` embeddings → the Fréchet distance of their fitted Gaussians."""
    x, y = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    for name, data in (("first", x), ("second", y)):
        if data.ndim != 2 or data.shape[0] < 2:
            raise ValueError(f"{name} set: need at least 2 embeddings of shape (N, D), got shape {data.shape}")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"embedding sizes differ: {x.shape[1]} and {y.shape[1]}")
    if min(len(x), len(y)) >= x.shape[1]:
        return frechet_distance(fit_gaussian(x), fit_gaussian(y))
    centred_x, centred_y = x - x.mean(axis=0), y - y.mean(axis=0)
    scale = np.sqrt((len(x) - 1) * (len(y) - 1))
    trace_sqrt = np.linalg.svd(centred_x @ centred_y.T / scale, compute_uv=False).sum()  # nuclear norm
    diff = x.mean(axis=0) - y.mean(axis=0)
    distance = (diff @ diff + (centred_x ** 2).sum() / (len(x) - 1) + (centred_y ** 2).sum() / (len(y) - 1)
                - 2.0 * trace_sqrt)
    return max(float(distance), 0.0)
