"""Block importance scores on any set of calibration probes, by name: the shared ranking component
that stage-wise (Diff-ES) and learnable (TinyFusion prior) depth pruning run over.

    block_scores(net, calib, name, **kw) -> list[float]   # one per current block, higher = keep

Scorers (each the statistic of an existing adapter, so a stage-wise or learned schedule can run
over any of them):
  cosine       1 - cos(flatten(h_out), flatten(h_in)) per sample (Diff-ES's layer-drop calibration,
               `calibrate_layerdrop_orders`, methods.md 6b)
  shortgpt     1 - cos per token, averaged (ShortGPT block influence, arXiv 2403.03853; the
               `shortgpt` baseline)
  flux_lite    mean (h_out - h_in)^2 (Flux-Lite as TinyFusion describes it; Diff-ES's
               `--calib-importance mse` up to a constant factor; the `flux_lite` baseline)
  magnitude    mean |theta| of the block (Li et al. 2017 depth analogue; data-free)
  sensitivity  calibration-loss increase when the block alone is bypassed (TinyFusion Table 1)
  entpruner    Conditional Entropy Deviation |H - H_-i| (EntPruner, arXiv 2511.21122; kwargs go to
               methods.entpruner.ced.ced_scores, e.g. condition=pooled for small probe sets)
  tinyfusion   each block's keep probability after TinyFusion's mask learning (arXiv 2412.01199) on
               these probes' images, t drawn over the probes' noise-level range, keeping half the
               blocks in groups of 2 (kwargs go to methods.tinyfusion.TinyFusion, e.g. steps=50)
The probes are used as given (x_t = noisy(x0, u, noise)); callers restrict them to a stage.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.api import BenchError
from bench.data import Calib

SCORERS = ("cosine", "shortgpt", "flux_lite", "magnitude", "sensitivity", "entpruner", "tinyfusion")


def subset(calib: Calib, mask: torch.Tensor) -> Calib:
    """The probes where mask is true (same order)."""
    idx = torch.nonzero(mask.cpu()).flatten()
    return Calib(calib.x0[idx.to(calib.x0.device)], calib.y[idx.to(calib.y.device)],
                 calib.noise[idx.to(calib.noise.device)], calib.u[idx.to(calib.u.device)], calib.ids[idx], calib.bins)


def _flat_cosine(a, b):
    return 1.0 - F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)


def _token_cosine(a, b):
    return 1.0 - F.cosine_similarity(a, b, dim=-1).mean(dim=1)


def _mse(a, b):
    return (b - a).pow(2).mean(dim=(1, 2))


_RESIDUAL = {"cosine": _flat_cosine, "shortgpt": _token_cosine, "flux_lite": _mse}


@torch.no_grad()
def _residual(net, calib, stat, batch_size: int) -> list[float]:
    rows, dev = [], net.device
    with net.eval_mode():
        for x0, y, noise, u in calib.batches(batch_size):
            x_t, t = net.noisy(x0.to(dev), u.to(dev), noise.to(dev))
            h = [a.double() for a in net.hidden_states(x_t, t, y.to(dev))]
            rows.append(torch.stack([stat(a, b) for a, b in zip(h[:-1], h[1:])], dim=1).cpu())
    return torch.cat(rows).mean(0).tolist()


@torch.no_grad()
def _sensitivity(net, calib, batch_size: int) -> list[float]:
    depth, dev, rows = len(net.net.blocks), net.device, []
    with net.eval_mode():
        for x0, y, noise, u in calib.batches(batch_size):
            x0, y, noise, u = x0.to(dev), y.to(dev), noise.to(dev), u.to(dev)
            loss = lambda: net.loss(x0, y, u=u, noise=noise, reduction="none").double().cpu()
            dense = loss()
            delta = []
            for i in range(depth):
                with net.ablate("blocks", [i]):
                    delta.append(loss() - dense)
            rows.append(torch.stack(delta, dim=1))
    return torch.cat(rows).mean(0).tolist()


@torch.no_grad()
def _magnitude(net) -> list[float]:
    out = []
    for params in net.block_params():
        total = sum(p.detach().double().abs().sum() for p in params)
        out.append(float(total / sum(p.numel() for p in params)))
    return out


def _tinyfusion(net, calib, group_size: int = 2, keep_fraction: float = 0.5, **kw) -> list[float]:
    from methods.tinyfusion import TinyFusion
    from methods.tinyfusion.learn import make_groups

    depth = len(net.net.blocks)
    u = calib.u.double().cpu()
    lo, hi = float(u.min()), float(u.max())
    m = TinyFusion(group_size=group_size, u_range=(lo, hi) if hi > lo else (0.0, 1.0), **kw)
    groups = make_groups(depth, group_size, max(1, int(round(keep_fraction * depth))))
    return m.learn(net, calib, groups)[0]["marginals"]


def block_scores(net, calib: Calib, name: str = "cosine", batch_size: int = 64, **kw) -> list[float]:
    """One score per current block (positions of net.net.blocks), higher = more important."""
    if name not in SCORERS:
        raise BenchError(f"block scorer {name!r} is unknown; use one of {', '.join(SCORERS)}")
    if kw and name not in ("entpruner", "tinyfusion"):
        raise BenchError(f"block scorer {name!r} takes no options (got {sorted(kw)})")
    if name == "magnitude":
        scores = _magnitude(net)
    elif len(calib) < 1:
        raise BenchError(f"block scorer {name!r} got no calibration probes (a stage without probes: raise "
                         "calib.n or use fewer stages)")
    elif name in _RESIDUAL:
        scores = _residual(net, calib, _RESIDUAL[name], batch_size)
    elif name == "sensitivity":
        scores = _sensitivity(net, calib, batch_size)
    elif name == "entpruner":
        from methods.entpruner.ced import ced_scores
        scores = ced_scores(net, calib, per_bin=False, batch_size=batch_size, **kw)["ced"]
    else:
        scores = _tinyfusion(net, calib, **kw)
    scores = [float(s) for s in scores]
    if not all(s == s and abs(s) != float("inf") for s in scores):
        raise BenchError(f"block scorer {name!r} gave non-finite scores {scores}")
    return scores
