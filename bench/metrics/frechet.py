"""Frechet distance between two Gaussians fitted to feature sets (the formula behind FID).

Generic over the feature extractor: the default's small-classifier proxy uses it now, Inception
FID reuses it later. Everything is computed in float64.
"""
from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg


def feature_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, np.cov with rowvar=False) of an (N, D) feature array."""
    f = np.asarray(feats, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {f.shape}")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def _sqrtm(a: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        # scipy warns on (near-)singular input; the result is checked below (finite, ~real)
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        return scipy.linalg.sqrtm(a)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}).

    Provenance: Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a
    Local Nash Equilibrium" (arXiv 1706.08500), Eq. 6; Frechet/Wasserstein-2 distance of Gaussians.

    If sqrtm of the product is not finite (a singular product), eps*I is added to both
    covariances and it is retried. A negligible imaginary part (numerical noise: S1 S2 is similar
    to a PSD matrix, so its square root is real in exact arithmetic) is dropped; a large one
    raises ValueError.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu {mu1.shape}/{mu2.shape}, sigma {s1.shape}/{s2.shape}")

    covmean = _sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        off = eps * np.eye(d)
        covmean = _sqrtm((s1 + off) @ (s2 + off))
        if not np.isfinite(covmean).all():
            raise ValueError("sqrtm(S1 S2) is not finite even after adding eps*I; check the features")
    if np.iscomplexobj(covmean):
        # tolerance scales with the matrix (features of any magnitude); 1e-3 for unit-scale ones
        tol = 1e-3 * max(1.0, float(np.abs(covmean.real).max()))
        imag = float(np.abs(np.diagonal(covmean).imag).max())
        if imag > tol:
            raise ValueError(f"sqrtm(S1 S2) has a large imaginary component ({imag:.3g} > {tol:.3g})")
        covmean = covmean.real

    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))
