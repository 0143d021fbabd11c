"""Layer-wise Optimal Brain Surgeon for one linear layer y = W x (card: methods.obs_diff, O3-O7).

Objective (OBS-Diff, arXiv 2510.06751, Sec. 4): keep the layer's outputs on the calibration inputs,
min ||W X - W' X||_F^2 subject to the pruning constraint, whose Hessian in each row of W' is
H = 2 X X^T (the same for every output row). For a set S of input columns removed together
(one MLP neuron: one column; one attention head: its head_dim columns of attn.proj), with
Hinv = H^-1 (Hassibi & Stork 1993, "Optimal Brain Surgeon", Eq. 5, written for a set of weights as
OBS-Diff's structured variant does, arXiv 2510.06751 Sec. 4):

    saliency  L_S = 1/2 sum_rows  w_S^T (Hinv_SS)^-1 w_S        (output error added by removing S)
    update    dW  = - W_S (Hinv_SS)^-1 Hinv_{S,:}               (zeroes W_S, compensates the rest)
    downdate  Hinv <- Hinv - Hinv_{:,S} (Hinv_SS)^-1 Hinv_{S,:} (the inverse Hessian of the columns
                                                                 left, Schur complement)

Greedy: remove the lowest-saliency group, update W and Hinv, repeat. With exact downdates the
result after any number of removals is the least-squares optimum over the columns that are left.

Unstructured and N:M (SparseGPT, Frantar & Alistarh 2023, arXiv 2301.00774, Alg. 1; OBS-Diff uses
it with its timestep-weighted H): columns in blocks of `blocksize`, Cholesky factor U of Hinv
(upper), mask by w^2 / U_qq^2, the error of every pruned weight pushed into the later columns.
These are *masks*: zeros in dense weights, no speedup and no params/MACs saving without sparse
kernels (N:M needs 2:4 tensor-core kernels).
"""
from __future__ import annotations

import math

import torch

from bench.api import BenchError

WEIGHTINGS = ("log_decrease", "log_increase", "linear_decrease", "linear_increase", "uniform")


def timestep_weights(steps: int, strategy: str = "log_decrease", w_min: float = 0.8, w_max: float = 1.2) -> list[float]:
    """alpha_t for sampling steps t = 1..T (t = 1 the first, noisiest step). OBS-Diff's default
    log_decrease: alpha_t = w_min + (w_max - w_min) ln(T - t + 1) / ln T, so alpha_1 = w_max and
    alpha_T = w_min (methods.md 5b, ``--timestep_weight_strategy log_decrease``). The other four are
    the paper's ablation (Sec. 5, weighting study): log_increase mirrors it (ln t / ln T), linear_*
    interpolate linearly, uniform is 1."""
    T = int(steps)
    if T < 1:
        raise BenchError("timestep weights need at least one sampling step")
    if strategy not in WEIGHTINGS:
        raise BenchError(f"timestep weighting {strategy!r} is unknown; use one of {', '.join(WEIGHTINGS)}")
    if strategy == "uniform":
        return [1.0] * T
    if T == 1:
        return [float(w_max) if strategy.endswith("decrease") else float(w_min)]
    out = []
    for t in range(1, T + 1):
        if strategy == "log_decrease":
            f = math.log(T - t + 1) / math.log(T)
        elif strategy == "log_increase":
            f = math.log(t) / math.log(T)
        elif strategy == "linear_decrease":
            f = (T - t) / (T - 1)
        else:
            f = (t - 1) / (T - 1)
        out.append(w_min + (w_max - w_min) * f)
    return out


class HessianAccumulator:
    """H = 2 sum_i a_i x_i x_i^T / sum_i a_i n_i as a running weighted mean (OBS-Diff's code: the
    inputs scaled by sqrt(alpha_t), H rescaled by old/new total weight). x: [..., n] rows; `count`
    = samples in the batch (the normaliser; the scale of H does not change OBS's choices)."""

    def __init__(self, n: int, device="cpu"):
        self.H = torch.zeros(n, n, dtype=torch.float64, device=device)
        self.total = 0.0

    def add(self, x: torch.Tensor, weight: float = 1.0, count: int | None = None) -> None:
        X = x.detach().reshape(-1, x.shape[-1]).to(self.H.device, torch.float64)
        w = float(weight) * float(count if count is not None else x.shape[0])
        if w <= 0:
            return
        new = self.total + w
        self.H.mul_(self.total / new)
        self.H.add_(X.T @ X, alpha=2.0 * float(weight) / new)
        self.total = new


def _prepare(W: torch.Tensor, H: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 copies; dead inputs (H_ii = 0) get H_ii = 1 and zero weights (SparseGPT), then
    damping lambda = damp * mean(diag H) on the diagonal."""
    Wd, Hd = W.detach().double().clone(), H.detach().double().clone()
    if Hd.shape != (Wd.shape[1], Wd.shape[1]):
        raise BenchError(f"Hessian {tuple(Hd.shape)} does not match the layer's {Wd.shape[1]} input columns")
    dead = torch.diag(Hd) == 0
    Hd[dead, dead] = 1.0
    Wd[:, dead] = 0.0
    Hd += float(damp) * torch.diag(Hd).mean() * torch.eye(Hd.shape[0], dtype=Hd.dtype, device=Hd.device)
    return Wd, Hd


def _inverse(Hd: torch.Tensor) -> torch.Tensor:
    try:
        return torch.cholesky_inverse(torch.linalg.cholesky(Hd))
    except RuntimeError:
        raise BenchError("the layer Hessian is not positive definite even after damping; raise percdamp "
                         "or use more calibration probes") from None


def group_saliency(W: torch.Tensor, Hinv: torch.Tensor, groups: torch.Tensor, mode: str = "block") -> torch.Tensor:
    """L_j for column groups `groups` [n, g] (indices into W's columns). block: 1/2 sum_rows
    w_S^T (Hinv_SS)^-1 w_S (exact OBS); chol_diag: 1/2 sum_{k in S} sum_rows W_:k^2 / U_kk^2 with
    U the Cholesky factor of Hinv_SS (the public code's head saliency); for g = 1 both are
    W_:q^2 / (2 [Hinv]_qq)."""
    if groups.shape[1] == 1:  # single columns: both rules are W_:q^2 / (2 [Hinv]_qq)
        q = groups[:, 0]
        return 0.5 * (W[:, q] ** 2).sum(0) / torch.diagonal(Hinv)[q]
    Hs = Hinv[groups[:, :, None], groups[:, None, :]]            # [n, g, g]
    Ws = W[:, groups].permute(1, 0, 2)                            # [n, rows, g]
    if mode == "block":
        Hs_inv = torch.linalg.inv(Hs)
        return 0.5 * torch.einsum("nrg,ngh,nrh->n", Ws, Hs_inv, Ws)
    if mode == "chol_diag":
        U = torch.linalg.cholesky(Hs, upper=True)
        d = torch.diagonal(U, dim1=-2, dim2=-1) ** 2              # [n, g]
        return 0.5 * (Ws ** 2 / d[:, None, :]).sum((1, 2))
    raise BenchError(f"OBS saliency {mode!r} is unknown; use block or chol_diag")


def obs_prune_columns(W: torch.Tensor, H: torch.Tensor, n_remove: int, group_size: int = 1, damp: float = 0.01,
                      compensate: bool = True, saliency: str = "block", chunk: int = 1, return_info: bool = False):
    """Structured OBS on the input columns of one linear layer.

    W [out, in] (the consumer: attn.proj or mlp.fc2), H [in, in] its input Hessian, columns in
    consecutive groups of `group_size` (a head's head_dim columns; 1 for a neuron). Removes
    `n_remove` groups greedily, `chunk` at a time (the lowest saliencies, compensated jointly).
    Returns (kept group indices, new W (removed columns exactly 0; same dtype/device as W)), and
    with return_info=True also info: info["order"] the removal order, info["saliency"] every
    group's saliency before the first removal.
    compensate=False: the same choices, removed columns zeroed without the update (the ablation)."""
    if W.shape[1] % group_size:
        raise BenchError(f"{W.shape[1]} input columns do not split into groups of {group_size}")
    n_groups = W.shape[1] // group_size
    if not 0 <= n_remove < n_groups:
        raise BenchError(f"cannot remove {n_remove} of {n_groups} column groups (at least one must stay)")
    Wd, Hd = _prepare(W, H, damp)
    Hinv = _inverse(Hd)
    cols = torch.arange(W.shape[1], device=Wd.device).reshape(n_groups, group_size)
    alive = list(range(n_groups))
    order, first = [], None
    while len(order) < n_remove:
        idx = torch.tensor(alive, device=Wd.device)
        sal = group_saliency(Wd, Hinv, cols[idx], saliency)
        if first is None:
            first = sal.detach().cpu()
        k = min(max(1, int(chunk)), n_remove - len(order))
        pick = torch.argsort(sal, stable=True)[:k].tolist()   # ties: the lower group index first
        S_groups = [alive[i] for i in pick]
        S = cols[torch.tensor(S_groups, device=Wd.device)].reshape(-1)
        Hss_inv = torch.linalg.inv(Hinv[S][:, S])
        if compensate:
            Wd -= Wd[:, S] @ Hss_inv @ Hinv[S, :]
        Wd[:, S] = 0.0
        Hinv -= Hinv[:, S] @ Hss_inv @ Hinv[S, :]
        Hinv[S, :] = 0.0
        Hinv[:, S] = 0.0
        order += S_groups
        gone = set(S_groups)
        alive = [a for a in alive if a not in gone]
    if first is None:
        first = group_saliency(Wd, Hinv, cols, saliency).detach().cpu()
    out = (sorted(alive), Wd.to(dtype=W.dtype, device=W.device))
    return (*out, {"order": order, "saliency": first.tolist()}) if return_info else out


def obs_prune_unstructured(W: torch.Tensor, H: torch.Tensor, sparsity: float = 0.5, nm: tuple[int, int] | None = None,
                           damp: float = 0.01, blocksize: int = 128, compensate: bool = True
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT-style unstructured (fraction `sparsity` per column block) or N:M (N zeros in
    every M consecutive input weights of a row) pruning. Returns (mask of pruned weights, new W).
    A mask: same shapes, no speedup without sparse kernels."""
    rows, n = W.shape
    if nm is not None:
        N, M = int(nm[0]), int(nm[1])
        if not 0 < N < M or n % M:
            raise BenchError(f"N:M = {N}:{M} needs 0 < N < M and the input width {n} divisible by M")
    elif not 0.0 <= sparsity < 1.0:
        raise BenchError(f"sparsity {sparsity} must be in [0, 1)")
    Wd, Hd = _prepare(W, H, damp)
    U = torch.linalg.cholesky(_inverse(Hd), upper=True)
    mask = torch.zeros_like(Wd, dtype=torch.bool)
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        W1, U1 = Wd[:, i1:i2].clone(), U[i1:i2, i1:i2]
        d = torch.diagonal(U1)
        M1 = torch.zeros_like(W1, dtype=torch.bool)
        if nm is None:
            score = W1 ** 2 / d[None, :] ** 2
            k = int(score.numel() * sparsity)
            if k > 0:
                thr = torch.sort(score.reshape(-1))[0][k - 1]
                M1 = score <= thr
        Err = torch.zeros_like(W1)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                score = W1[:, i:i + nm[1]] ** 2 / d[None, i:i + nm[1]] ** 2
                low = torch.topk(score, nm[0], dim=1, largest=False).indices
                M1[:, i:i + nm[1]].scatter_(1, low, True)
            w = W1[:, i]
            q = torch.where(M1[:, i], torch.zeros_like(w), w)
            err = (w - q) / d[i]
            if compensate:
                W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            W1[:, i] = q
            Err[:, i] = err
        Wd[:, i1:i2] = W1
        mask[:, i1:i2] = M1
        if compensate and i2 < n:
            Wd[:, i2:] -= Err @ U[i1:i2, i2:]
    Wd[mask] = 0.0
    return mask, Wd.to(dtype=W.dtype, device=W.device)


def reconstruction_error(W: torch.Tensor, W_new: torch.Tensor, X: torch.Tensor) -> float:
    """||W X - W_new X||_F^2 for inputs X [samples, in] (tests and diagnostics)."""
    Xd = X.double()
    return float(((Xd @ W.double().T - Xd @ W_new.double().T) ** 2).sum())
