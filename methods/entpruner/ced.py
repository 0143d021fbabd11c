"""Conditional Entropy Deviation (CED) of every bypassable unit (DiT/SiT blocks; U-Net ResNet blocks and
attentions, methods.entpruner.units): CED_i = |H - H_-i| (EntPruner, arXiv 2511.21122).

H is the entropy of the model's output distribution on the fixed calibration probes, conditional on
the class label: H = sum_y p(y) H(out | y) over the probe classes (condition=class), or on the
noise-level bin, H = sum_b p(b) H(out | b) (condition=bin), or pooled over all probes (condition=pooled);
H_-i the same with block i bypassed (``Denoiser.ablate``: the residual stream passes through).
Every block sees exactly the same (x0, y, noise, u) probes, so differences come from the block.
Per-noise-level-bin scores (meta, plots) use the probes of each bin, pooled over classes (a bin holds about
n/bins probes, too few to split further by class).
The forwards (``model_outputs`` of the full model, ``ablated_outputs``) and the scoring (``ced_from_outputs``)
are separate, so one set of forwards can be scored under several settings (methods.entpruner.inspect).
"""
from __future__ import annotations

import time

import torch

from bench.api import BenchError
from methods.entpruner import units as U
from methods.entpruner.entropy import entropy, pca_basis

OUTPUTS = ("prediction", "x0", "samples")
CONDITIONS = ("class", "pooled", "bin")
REDUCES = ("entropy", "per_group_abs")


@torch.no_grad()
def model_outputs(net, calib, outputs: str = "prediction", batch_size: int = 64, amp_dtype=None,
                  sample_steps: int = 10, sample_seed: int = 0) -> torch.Tensor:
    """(n, d) float32 outputs of the current model on the probes.

    prediction: the network's prediction (eps or velocity; learned-variance channels dropped) at
                x_t = noisy(x0, u, noise), flattened per probe;
    x0:         the clean image that prediction implies (x_t = a x0 + b noise, a and b read off
                net.noisy: DDPM eps -> (x_t - b eps) / a; flow velocity v = x0 - noise ->
                (x_t + b v) / (a + b)), clipped to [-1, 1] for pixel models (process.clip_denoised),
                so every noise level speaks in image units instead of eps units;
    samples:    final samples of a short deterministic sampler (DDIM eta=0 / Euler) from per-probe
                seeded noise (seed k = sample_seed + probe index, drawn like bench.sample.generate:
                x_T from seed 10k, step noise from 10k+1), conditioned on the probe's label."""
    dev, C = net.device, net.in_channels
    rows = []
    use_amp = amp_dtype is not None
    with net.eval_mode(), torch.autocast(device_type=torch.device(dev).type, dtype=amp_dtype or torch.float32,
                                         enabled=use_amp):
        if outputs in ("prediction", "x0"):
            for x0, y, noise, u in calib.batches(batch_size):
                x0, y, noise, u = x0.to(dev), y.to(dev), noise.to(dev), u.to(dev)
                x_t, t = net.noisy(x0, u, noise)
                rows.append(net(x_t, t, y)[:, :C].float().flatten(1))
        elif outputs == "samples":
            from bench.sample import PerSampleNoise
            sampler = "ddim" if net.process.kind == "ddpm" else "euler"
            for start in range(0, len(calib), batch_size):
                y = calib.y[start: start + batch_size].to(dev)
                seeds = [sample_seed + i for i in range(start, start + len(y))]  # bench.sample's streams:
                x_T = PerSampleNoise([10 * s for s in seeds])(torch.empty(len(y), *calib.x0.shape[1:], device=dev))
                fn = lambda x, t: net(x, t, y)
                x = net.process.sample(fn, x_T, PerSampleNoise([10 * s + 1 for s in seeds]), sampler=sampler,
                                       steps=sample_steps, eta=0.0)
                rows.append(x.float().flatten(1))
        else:
            raise BenchError(f"outputs={outputs!r} is unknown; use one of {OUTPUTS}")
    out = torch.cat(rows)
    if outputs == "x0":
        out = implied_x0(net, calib, out)
    if not torch.isfinite(out).all():
        raise BenchError("model outputs are not finite on the calibration probes; check the checkpoint")
    return out


def implied_x0(net, calib, pred: torch.Tensor) -> torch.Tensor:
    """outputs=x0 from the outputs=prediction (n, d) of the same probes, without a forward (so one set
    of forwards gives both: methods.entpruner.inspect)."""
    dev = pred.device
    u = calib.u.to(dev)
    x_t, _ = net.noisy(calib.x0.to(dev), u, calib.noise.to(dev))
    return x0_from_prediction(net, x_t.float(), u, pred.view(x_t.shape)).flatten(1)


def x0_from_prediction(net, x_t: torch.Tensor, u: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """The clean sample a prediction implies at noise level u (outputs=x0). The interpolation
    coefficients come from the process itself: a = noisy(1, u, 0), b = noisy(0, u, 1)."""
    one, zero = torch.ones_like(x_t), torch.zeros_like(x_t)
    a = net.noisy(one, u, zero)[0].float()
    b = net.noisy(zero, u, one)[0].float()
    if net.process.kind == "flow":  # v = x0 - noise (data at t = 1): x_t = (a + b) x0 - b v
        x0 = (x_t + b * pred) / (a + b)
    else:                           # eps prediction: x_t = a x0 + b eps
        x0 = (x_t - b * pred) / a
    return x0.clamp(-1.0, 1.0) if getattr(net.process, "clip_denoised", False) else x0


class Group:
    """One conditioning group (a class, a noise bin, or all probes): its probe indices, its
    projection basis and floor fixed by the full model's outputs, and the full model's entropy."""

    def __init__(self, idx: torch.Tensor, ref: torch.Tensor, est: dict, pca, eps_floor: float):
        self.idx = idx
        z = ref[idx].to(torch.float64)
        n, d = z.shape
        needs = est["estimator"] != "diagonal"
        if pca == "auto":
            dim = min(d, n - 1) if (needs and d >= n) else None
        elif pca in ("off", None, False):
            dim = None
        else:
            dim = min(int(pca), d, n - 1)
        self.basis = pca_basis(z, dim) if dim is not None else None
        z = self.project(z)
        scale = float(z.var(0, unbiased=False).mean())
        if scale <= 0.0:
            raise BenchError("the full model's outputs do not vary across the probes of a group (an untrained "
                             "adaLN-Zero model outputs 0); CED needs a trained or randomised model")
        self.floor = eps_floor * scale
        self.est = est
        self.h_full = self.entropy(z)

    def project(self, z):
        return z if self.basis is None else z @ self.basis

    def entropy(self, z_proj) -> float:
        return entropy(z_proj, self.est["estimator"], self.est["shrinkage"], self.est["knn_k"], self.floor)

    def h_of(self, out: torch.Tensor) -> float:
        return self.entropy(self.project(out[self.idx].to(torch.float64)))


def _check(condition: str, reduce: str = "entropy") -> None:
    for name, value, options in (("condition", condition, CONDITIONS), ("reduce", reduce, REDUCES)):
        if value not in options:
            raise BenchError(f"{name}={value!r} is unknown; use one of {options}")


def _estimator(estimator: str, shrinkage: str, knn_k: int) -> tuple[dict, int]:
    """(the estimator's settings, the fewest probes a group needs for it)."""
    return ({"estimator": estimator, "shrinkage": shrinkage, "knn_k": int(knn_k)},
            max(2, int(knn_k) + 1 if estimator == "knn" else 2))


def conditioning_groups(ref: torch.Tensor, calib, condition: str = "class", estimator: str = "gaussian",
                        shrinkage: str = "ledoit_wolf", pca="auto", knn_k: int = 3,
                        eps_floor: float = 1e-8) -> list[Group]:
    """The groups H is conditioned on (R3), fixed by the full model's outputs `ref`; a group with
    fewer probes than the estimator needs is left out."""
    _check(condition)
    est, min_n = _estimator(estimator, shrinkage, knn_k)
    y = calib.y.to(ref.device)
    # condition: class = H(out | y); bin = H(out | noise-level bin), each bin its own distribution
    # instead of one pooled over all noise levels; pooled = one distribution over every probe
    keys = {"class": y, "bin": calib.bin_of().to(ref.device), "pooled": torch.zeros_like(y)}[condition]
    groups = []
    for k in torch.unique(keys).tolist():
        idx = torch.nonzero(keys == k).flatten().to(ref.device)
        if len(idx) >= min_n:
            groups.append(Group(idx, ref, est, pca, eps_floor))
    if not groups:
        raise BenchError(f"no conditioning group has {min_n}+ probes; raise calib.n or use condition=pooled")
    return groups


def combine(sizes, h_full, h_ablated, reduce: str) -> tuple[float, float, float]:
    """(H_full, H_ablated, CED) from per-group entropies, the groups weighted by their probe counts
    `sizes` (p(y) of the probes)."""
    w = torch.tensor(sizes, dtype=torch.float64)
    w = w / w.sum()
    hf = torch.tensor(h_full, dtype=torch.float64)
    ha = torch.tensor(h_ablated, dtype=torch.float64)
    if reduce == "entropy":  # |H(X|Y) - H_-i(X|Y)|: deviation of the conditional entropy
        ced = abs(float((w * hf).sum() - (w * ha).sum()))
    else:                    # sum_y p(y) |H_y - H_-i,y|: no cancellation between groups
        ced = float((w * (hf - ha).abs()).sum())
    return float((w * hf).sum()), float((w * ha).sum()), ced


def ablated_outputs(net, calib, **kw):
    """model_outputs(net, calib, **kw) with each unit of ``units.labels(net)`` bypassed in turn, one
    ablation at a time (a generator: ced_scores holds one ablation's outputs at once)."""
    for i in range(len(U.labels(net))):
        with U.ablate(net, [i]):
            out = model_outputs(net, calib, **kw)
        yield out


def ced_from_outputs(ref: torch.Tensor, ablated, calib, *, condition: str = "class", reduce: str = "entropy",
                     estimator: str = "gaussian", shrinkage: str = "ledoit_wolf", pca="auto", knn_k: int = 3,
                     eps_floor: float = 1e-8, per_bin: bool = False) -> dict:
    """CED from the full model's outputs `ref` and the outputs with each unit bypassed (`ablated`:
    a list, or ablated_outputs' generator), so one set of forwards can be scored several ways.
    Returns ced (units,), ced_per_bin (bins x units, or None), H, H_ablated (units,), groups, probes, dim."""
    _check(condition, reduce)
    settings = dict(estimator=estimator, shrinkage=shrinkage, pca=pca, knn_k=knn_k, eps_floor=eps_floor)
    groups = conditioning_groups(ref, calib, condition, **settings)
    bins = []
    if per_bin:
        est, min_n = _estimator(estimator, shrinkage, knn_k)
        b = calib.bin_of().to(ref.device)  # one pooled group per noise-level bin
        bins = [[Group(idx, ref, est, pca, eps_floor)] if len(idx := torch.nonzero(b == k).flatten()) >= min_n
                else [] for k in range(calib.bins)]

    def score(gs, out):
        return combine([len(g.idx) for g in gs], [g.h_full for g in gs], [g.h_of(out) for g in gs], reduce)

    ced, h_abl, ced_bin, h_full = [], [], [], float("nan")
    for out in ablated:
        h_full, h_i, c = score(groups, out)
        ced.append(c)
        h_abl.append(h_i)
        ced_bin.append([score(gs, out)[2] if gs else 0.0 for gs in bins])
    if not all(map(lambda v: v == v and abs(v) != float("inf"), ced)):
        raise BenchError("CED is not finite; use estimator=diagonal or a larger eps_floor")
    return {"ced": ced, "ced_per_bin": [list(r) for r in zip(*ced_bin)] if bins else None, "H": h_full,
            "H_ablated": h_abl, "groups": len(groups), "probes": len(calib), "dim": int(ref.shape[1])}


def ced_scores(net, calib, *, outputs: str = "prediction", condition: str = "class", reduce: str = "entropy",
               estimator: str = "gaussian", shrinkage: str = "ledoit_wolf", pca="auto", knn_k: int = 3,
               eps_floor: float = 1e-8, batch_size: int = 64, amp_dtype=None, sample_steps: int = 10,
               sample_seed: int = 0, per_bin: bool = True) -> dict:
    """CED of every bypassable unit of the current model (transformer blocks, or the U-Net's
    ResNet blocks and attentions: methods.entpruner.units), in the order of ``units.labels(net)``.
    Returns a JSON-able dict: ced (units,), units (their labels), ced_per_bin (bins x units,
    per-probe outputs only: prediction, x0), H (full model), H_ablated (units,), groups (count), seconds."""
    _check(condition, reduce)  # before any forward
    labels = U.labels(net)  # raises for a model with nothing to bypass
    t0 = time.perf_counter()
    kw = dict(outputs=outputs, batch_size=batch_size, amp_dtype=amp_dtype, sample_steps=sample_steps,
              sample_seed=sample_seed)
    r = ced_from_outputs(model_outputs(net, calib, **kw), ablated_outputs(net, calib, **kw), calib,
                         condition=condition, reduce=reduce, estimator=estimator, shrinkage=shrinkage, pca=pca,
                         knn_k=knn_k, eps_floor=eps_floor, per_bin=per_bin and outputs != "samples")
    return {"ced": r["ced"], "units": labels, **r, "seconds": round(time.perf_counter() - t0, 4)}
