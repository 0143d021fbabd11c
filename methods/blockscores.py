"""Block importance scores on any set of calibration probes, by name: the one table of block
scorers, which the stage-wise (Diff-ES) and learnable (TinyFusion prior) depth pruning run over.

    block_scores(net, calib, name, **kw) -> list[float]   # one per current block, higher = keep

Scorers (each the statistic of an existing adapter, computed by that adapter's own function, so a
stage-wise or learned schedule over a name ranks blocks exactly as the adapter does):
  cosine       1 - cos(flatten(h_out), flatten(h_in)) per sample (Diff-ES's layer-drop calibration,
               `calibrate_layerdrop_orders`, methods.md 6b; baselines.block_influence.flat_cosine)
  shortgpt     1 - cos per token, averaged (ShortGPT block influence, arXiv 2403.03853; the
               `shortgpt` baseline)
  flux_lite    mean (h_out - h_in)^2 (Flux-Lite as TinyFusion describes it; Diff-ES's
               `--calib-importance mse` up to a constant factor; the `flux_lite` baseline)
  magnitude    mean |theta| of the block (Li et al. 2017 depth analogue; data-free; `magnitude_l1`)
  sensitivity  calibration-loss increase when the block alone is bypassed (TinyFusion Table 1;
               the `sensitivity` baseline)
  entpruner    Conditional Entropy Deviation |H - H_-i| (EntPruner, arXiv 2511.21122; kwargs go to
               methods.entpruner.ced.ced_scores, e.g. condition=pooled for small probe sets)
  tinyfusion   each block's keep probability after TinyFusion's mask learning (arXiv 2412.01199) on
               these probes' images, t drawn over the probes' noise-level range, keeping half the
               blocks in groups of 2 (kwargs go to methods.tinyfusion.TinyFusion, e.g. steps=50)
The probes are used as given (x_t = noisy(x0, u, noise)); callers restrict them to a stage.
"""
from __future__ import annotations

import torch

from baselines.block_influence import flat_cosine, mse, residual_stat, token_cosine
from baselines.magnitude import block_magnitude
from baselines.sensitivity import loss_increase
from bench.api import BenchError
from bench.data import Calib


def subset(calib: Calib, mask: torch.Tensor) -> Calib:
    """The probes where mask is true (same order)."""
    idx = torch.nonzero(mask.cpu()).flatten()
    return Calib(calib.x0[idx.to(calib.x0.device)], calib.y[idx.to(calib.y.device)],
                 calib.noise[idx.to(calib.noise.device)], calib.u[idx.to(calib.u.device)], calib.ids[idx], calib.bins,
                 calib.source)


def _residual(stat):
    return lambda net, calib, batch_size: residual_stat(net, calib, stat, "noised", batch_size).mean(0).tolist()


def _entpruner(net, calib, batch_size: int, **kw) -> list[float]:
    from methods.entpruner.ced import ced_scores
    return ced_scores(net, calib, per_bin=False, batch_size=batch_size, **kw)["ced"]


def _tinyfusion(net, calib, batch_size: int, group_size: int = 2, keep_fraction: float = 0.5, **kw) -> list[float]:
    # batch_size is unused: mask learning draws its own batches (TinyFusion's `batch` option)
    from methods.tinyfusion import TinyFusion
    from methods.tinyfusion.learn import make_groups

    depth = net.depth
    u = calib.u.double().cpu()
    lo, hi = float(u.min()), float(u.max())
    kw.setdefault("learn_data", "calib")  # a score of these probes (a stage's), not of the training set
    m = TinyFusion(group_size=group_size, u_range=(lo, hi) if hi > lo else (0.0, 1.0), **kw)
    groups = make_groups(depth, group_size, max(1, int(round(keep_fraction * depth))))
    return m.learn(net, calib, groups)[0]["marginals"]


# name -> f(net, calib, batch_size, **kw) -> one score per block; only entpruner and tinyfusion take options
SCORERS = {
    "cosine": _residual(flat_cosine),
    "shortgpt": _residual(token_cosine),
    "flux_lite": _residual(mse),
    "magnitude": lambda net, calib, batch_size: block_magnitude(net, p=1),
    "sensitivity": lambda net, calib, batch_size: loss_increase(net, calib, batch_size).mean(0).tolist(),
    "entpruner": _entpruner,
    "tinyfusion": _tinyfusion,
}


def block_scores(net, calib: Calib, name: str = "cosine", batch_size: int = 64, **kw) -> list[float]:
    """One score per present block (in model order), higher = more important."""
    if name not in SCORERS:
        raise BenchError(f"block scorer {name!r} is unknown; use one of {', '.join(SCORERS)}")
    if kw and name not in ("entpruner", "tinyfusion"):
        raise BenchError(f"block scorer {name!r} takes no options (got {sorted(kw)})")
    if name != "magnitude" and len(calib) < 1:
        raise BenchError(f"block scorer {name!r} got no calibration probes (a stage without probes: raise "
                         "calib.n or use fewer stages)")
    scores = [float(s) for s in SCORERS[name](net, calib, batch_size, **kw)]
    if not all(s == s and abs(s) != float("inf") for s in scores):
        raise BenchError(f"block scorer {name!r} gave non-finite scores {scores}")
    return scores
