"""Differential-entropy estimators for EntPruner's CED, in float64 and in nats.

Every estimator takes samples ``z`` of shape (n, d) (one row per probe) and returns H(z):

  gaussian   H = d/2 log(2 pi e) + 1/2 log det S, with S the Ledoit-Wolf shrunk covariance
             (Ledoit & Wolf 2004, "A well-conditioned estimator for large-dimensional covariance
             matrices", J. Multivariate Anal. 88, Lemmas 3.2-3.4 with the sample estimates of
             Sec. 3.3) or the plain maximum-likelihood covariance (divides by n).
             When d > n the d x d matrix is never formed: the non-zero eigenvalues of S are those
             of the n x n Gram matrix, the other d - n are 0 before shrinkage.
  diagonal   H = sum_j 1/2 log(2 pi e var_j): the Gaussian with a diagonal covariance.
  knn        Kozachenko & Leonenko (1987), in the form of Kraskov, Stoegbauer & Grassberger 2004
             (Phys. Rev. E 69, 066138), Eq. 20 with the Euclidean norm:
             H = psi(n) - psi(k) + log V_d + d/n sum_i log r_i,
             r_i the distance from z_i to its k-th nearest neighbour and V_d = pi^(d/2)/Gamma(d/2+1)
             the volume of the unit d-ball (Eq. 20's c_d eps^d = V_d r^d, with eps = 2r).

``floor`` (>= 0) is added to every eigenvalue / variance / squared distance, so that a collapsed
output (all probes equal) gives a large finite entropy drop instead of -inf; callers scale it to the
reference outputs and use the same value for the full and the ablated model, so identical inputs
still give identical entropies.
``pca_basis`` gives the top principal directions of reference samples; projecting the full and the
ablated model's outputs on the *same* basis keeps their entropies comparable when d >= n.
"""
from __future__ import annotations

import math

import torch

from bench.api import BenchError

LOG_2PI_E = math.log(2 * math.pi) + 1.0


def _centered(z: torch.Tensor) -> torch.Tensor:
    z = z.to(torch.float64)
    if z.ndim != 2 or z.shape[0] < 2:
        raise BenchError(f"entropy needs at least 2 samples as an (n, d) array, got {tuple(z.shape)}")
    return z - z.mean(0, keepdim=True)


def covariance_eigenvalues(z: torch.Tensor) -> torch.Tensor:
    """All d eigenvalues of the ML covariance S = Xc^T Xc / n, ascending, from the smaller of the
    d x d covariance and the n x n Gram matrix (which share their non-zero eigenvalues)."""
    xc = _centered(z)
    n, d = xc.shape
    if d <= n:
        ev = torch.linalg.eigvalsh(xc.T @ xc / n)
    else:
        ev = torch.linalg.eigvalsh(xc @ xc.T / n)
        ev = torch.cat([ev.new_zeros(d - n), ev])
    return ev.clamp(min=0.0)


def ledoit_wolf(z: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(eigenvalues of the Ledoit-Wolf covariance, shrinkage intensity).

    LW 2004 with the normalised Frobenius norm ||A||^2 = tr(A A^T)/d: target m I with m = tr(S)/d;
    d2 = ||S - m I||^2; b2 = min(1/n^2 sum_k ||x_k x_k^T - S||^2, d2); S* = (b2/d2) m I + (1 - b2/d2) S.
    sum_k ||x_k x_k^T - S||_F^2 = sum_k ||x_k||^4 - n ||S||_F^2, so everything follows from the row
    norms and the eigenvalues (equal to scikit-learn's LedoitWolf, checked in the tests)."""
    xc = _centered(z)
    n, d = xc.shape
    ev = covariance_eigenvalues(z)
    m = ev.sum() / d
    fro2 = (ev ** 2).sum()                               # ||S||_F^2
    d2 = fro2 / d - m ** 2                               # ||S - m I||^2 (normalised)
    b2 = ((xc ** 2).sum(1) ** 2).sum() / n ** 2 / d - fro2 / (n * d)
    if float(d2) <= 0.0:                                 # S is already a multiple of I
        return ev, 0.0
    s = float(torch.clamp(b2, min=0.0).minimum(d2) / d2)
    return (1.0 - s) * ev + s * m, s


def gaussian_entropy(z: torch.Tensor, diagonal: bool = False, shrinkage: str = "ledoit_wolf",
                     floor: float = 0.0) -> float:
    """Entropy of the Gaussian fitted to z (ML mean and covariance, optionally shrunk)."""
    d = z.shape[1]
    if diagonal:
        ev = (_centered(z) ** 2).mean(0)  # shrinkage is moot: a diagonal covariance is invertible
    elif shrinkage == "ledoit_wolf":
        ev, _ = ledoit_wolf(z)
    elif shrinkage == "none":
        ev = covariance_eigenvalues(z)
    else:
        raise BenchError(f"shrinkage={shrinkage!r} is unknown; use 'ledoit_wolf' or 'none'")
    return 0.5 * d * LOG_2PI_E + 0.5 * float(torch.log(ev + floor).sum())


def knn_entropy(z: torch.Tensor, k: int = 3, floor: float = 0.0) -> float:
    """Kozachenko-Leonenko k-nearest-neighbour entropy (Kraskov et al. 2004, Eq. 20, Euclidean)."""
    z = z.to(torch.float64)
    n, d = z.shape
    if not 1 <= k < n:
        raise BenchError(f"knn entropy needs 1 <= k < n samples (k={k}, n={n}); lower knn_k or add probes")
    d2 = torch.cdist(z, z).pow(2)
    d2.fill_diagonal_(float("inf"))
    rk2 = d2.topk(k, dim=1, largest=False).values[:, -1]
    log_r = 0.5 * torch.log(rk2 + floor)
    log_vd = 0.5 * d * math.log(math.pi) - math.lgamma(0.5 * d + 1.0)
    psi = lambda x: float(torch.special.digamma(torch.tensor(float(x), dtype=torch.float64)))
    return psi(n) - psi(k) + log_vd + d * float(log_r.mean())


def pca_basis(z_ref: torch.Tensor, dim: int) -> torch.Tensor:
    """(d, dim) orthonormal top principal directions of the reference samples."""
    xc = _centered(z_ref)
    _, _, vh = torch.linalg.svd(xc, full_matrices=False)
    return vh[:dim].T.contiguous()


def entropy(z: torch.Tensor, estimator: str = "gaussian", shrinkage: str = "ledoit_wolf", knn_k: int = 3,
            floor: float = 0.0) -> float:
    """Dispatch: 'gaussian' (full covariance), 'diagonal' or 'knn'."""
    if estimator == "gaussian":
        return gaussian_entropy(z, False, shrinkage, floor)
    if estimator == "diagonal":
        return gaussian_entropy(z, True, shrinkage, floor)
    if estimator == "knn":
        return knn_entropy(z, knn_k, floor)
    raise BenchError(f"estimator={estimator!r} is unknown; use 'gaussian', 'diagonal' or 'knn'")
