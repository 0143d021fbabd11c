"""Width baselines: magnitude (L1 / L2 group), random and Taylor over all timesteps.

Units are attention heads and MLP hidden channels of DiT/SiT, and coupled conv channels (and
heads) of the U-Net: ``bench.width.WidthGroup``. Every method here scores each unit, then
``bench.surgery.width_plan`` keeps the same fraction of every group (Torch-Pruning's local,
``global_pruning=False`` allocation that Diff-Pruning uses, methods.md section 2a) with the
fraction found by measuring the pruned model against the budget (MACs or params); coarse U-Net
groups (GroupNorm-tied, 4-8 units) round as Torch-Pruning does and are topped up unit by unit.
The counts depend on the architecture and budget only, so every width method at one budget
prunes to the same per-group counts (only the choice of units differs).

* **Magnitude, L1** (Li et al. 2017, arXiv 1608.08710, Sec. 3.1; OBS-Diff's "L1-norm" baseline):
  I_u = sum over every coupled slice of |theta|.
* **Magnitude, L2 group** (Torch-Pruning ``GroupMagnitudeImportance(p=2, group_reduction="mean",
  normalizer="mean")``, Diff-Pruning's "Magnitude" row): I_u = mean over the group's coupled
  layers of sum theta^2, divided by the mean over the group's units.
* **Random** (Torch-Pruning ``RandomImportance``): U(0, 1) from the run's seed; report >= 3 seeds.
* **Taylor** (Molchanov et al. 2019, arXiv 1906.10771, Eq. 8 "multivariable"; Diff-Pruning's
  "Taylor" row, root ``ddpm_prune.py`` with ``multivariable=True`` and no truncation):
  I_u = |sum_k theta_k g_k| over the unit's coupled slices, with g the gradient of the diffusion
  loss summed over the timestep grid t = 0, s, 2s, ... (one fixed noise and one fixed batch,
  exactly Diff-Pruning's data protocol without its early stop).

  Diff-Pruning's paper runs (``ddpm_exp``, its "Taylor" row) used its vendored Torch-Pruning
  instead: the squared importance sum (theta g)^2 over the weights (|theta g| for GroupNorm
  weights, no biases; ``score=squared``), the loss summed over C x H x W (``loss=sum``) and the
  channels chosen inside each norm group (``select=per_norm_group``): ``taylor_width_paper``.
  The defaults stay as they were, deliberately: this suite's Taylor baseline is Molchanov's group
  definition, and every width baseline here shares the unit rule (Torch-Pruning >= 1.4.3, pinned).
  Not switched: the root script's pip ``TaylorImportance(multivariable=True)`` takes |sum| per layer
  (biases and GroupNorm skipped) and averages the layers, where ``multivariable`` sums over the unit.

Scaled-down choice (config switch ``t_stride``): the papers visit all 1000 steps (stride 1); the
embedded default visits every 20th (50 backward passes) so run_all.sh stays within its budget.

Under several ranks (torchrun, a SLURM job of several tasks): plan() runs on rank 0 alone and
the run broadcasts the Plan to the others (bench.run); its forwards over the calibration probes
are not split over ranks.
"""
from __future__ import annotations

import torch

from bench.api import BenchError, Budget, Method, Plan
from bench.surgery import width_plan
from bench.width import ATTN_UNITS, attention_units

SELECTS = ("unit", "per_norm_group")
LOSSES = ("mean", "sum")


class WidthMethod(Method):
    """Common part: score units (``scores``), then the local allocation to the budget.

    Two choices every width method could make, set by the subclasses that offer them:
    ``select`` = "unit" (a U-Net channel unit is one in-chunk position across all K GroupNorm groups:
    Torch-Pruning >= 1.4.3's rule, chunk scores summed) | "per_norm_group" (the same count per norm
    group, each group its own lowest channels: Torch-Pruning <= 1.4 and Diff-Pruning's vendored copy;
    ``scores`` then also returns per-channel scores); ``attn_unit`` = "heads" | "head_dims" (DiT/SiT
    attentions prune whole heads, or head dimensions with every head kept: bench.width)."""

    granularity = "width"
    label = "width"
    select = "unit"
    attn_unit = "heads"

    def __init__(self, round_to: int = 1):
        self.round_to = int(round_to)  # kept channels per group rounded to a multiple (heads never rounded)

    def _set_units(self, select: str = "unit", attn_unit: str = "heads") -> None:
        if select not in SELECTS:
            raise BenchError(f"{self.label} select={select!r}: use one of {', '.join(SELECTS)}")
        if attn_unit not in ATTN_UNITS:
            raise BenchError(f"{self.label} attn_unit={attn_unit!r}: use one of {', '.join(ATTN_UNITS)}")
        self.select, self.attn_unit = select, attn_unit

    def scores(self, net, calib) -> tuple:
        """(unit scores per group, meta) or (unit scores, meta, per-channel scores [chunk][unit] of the
        groups with chunks > 1, used when select == "per_norm_group")."""
        raise NotImplementedError

    def plan(self, net, budget: Budget, calib) -> Plan:
        if budget.measure == "blocks":
            raise BenchError(f"{self.label} prunes width; give the budget in MACs or params "
                             "(budget.measure=macs budget.keep=0.5)")
        with net.eval_mode(), attention_units(net, self.attn_unit):
            out = self.scores(net, calib)
            scores, meta = out[0], out[1]
            chan = out[2] if len(out) > 2 and self.select == "per_norm_group" else None
            if self.select == "per_norm_group" and chan is None:
                raise BenchError(f"{self.label} has no per-channel scores: select=per_norm_group is not available")
            extra = {"select": self.select, "attn_unit": self.attn_unit} if (
                self.select, self.attn_unit) != ("unit", "heads") else {}
            return width_plan(net, scores, budget, round_to={"channels": self.round_to},
                              meta={"method": self.label, **meta, **extra}, channel_scores=chan)


class WidthMagnitude(WidthMethod):
    label = "magnitude_width"

    def __init__(self, p: int = 1, round_to: int = 1):
        super().__init__(round_to)
        if p not in (1, 2):
            raise BenchError(f"width magnitude p={p}: use 1 (L1, Li et al.) or 2 (L2 group, Torch-Pruning)")
        self.p = p

    @torch.no_grad()
    def scores(self, net, calib):
        out = {}
        for name, g in net.width_groups().items():
            if self.p == 1:
                s = g.per_unit(lambda w, _: w.abs().sum(1))
            else:  # mean over coupled layers of sum w^2, then normalised by the mean over units
                s = g.per_unit(lambda w, _: w.pow(2).sum(1)) / max(1, g.n_members())
                s = s / s.mean().clamp_min(1e-30)
            out[name] = s.tolist()
        return out, {"p": self.p}


class WidthRandom(WidthMethod):
    label = "random_width"

    def __init__(self, seed: int = 0, round_to: int = 1):
        super().__init__(round_to)
        self.seed = int(seed)

    def scores(self, net, calib):
        g = torch.Generator().manual_seed(self.seed)
        groups = net.width_groups()
        return {n: torch.rand(groups[n].size, generator=g, dtype=torch.float64).tolist() for n in sorted(groups)}, \
            {"seed": self.seed}


def timestep_grid(net, stride: int) -> list[float]:
    """Shared noise levels u of training indices t = 0, stride, 2*stride, ... (0 = clean first),
    at bin centres so that process.t_from_u maps them back to exactly those indices (DDPM)."""
    T = int(getattr(net.process, "T", 1000))
    return [(i + 0.5) / T for i in range(0, T, max(1, int(stride)))]


def diffusion_loss_at(net, x0, y, noise, u: float, reduction: str = "mean"):
    """Diffusion loss of the fixed batch at one noise level (eps MSE for DDPM, velocity MSE for
    flow; the learned-sigma term is left out, as Diff-Pruning's loss is the eps MSE).
    reduction "mean": over every element (root ddpm_prune.py, F.mse_loss); "sum": summed over C x H x W
    and averaged over the batch (Diff-Pruning's ddpm_exp ``noise_estimation_loss``, the paper's runs).
    The two differ by the constant C*H*W, which matters to scores that mix powers of the gradient."""
    if reduction not in LOSSES:
        raise BenchError(f"loss reduction {reduction!r}: use one of {', '.join(LOSSES)}")
    uu = torch.full((x0.shape[0],), float(u), device=x0.device)
    x_t, t = net.noisy(x0, uu, noise)
    out = net(x_t, t, y)
    C = x0.shape[1]
    target = (x0 - noise) if net.process.kind == "flow" else noise
    err = (out[:, :C] - target) ** 2
    return err.mean() if reduction == "mean" else err.flatten(1).sum(1).mean()


def accumulate_gradients(net, calib, batch: int, u_grid: list[float], thr: float = 0.0,
                         check: str = "after", reduction: str = "mean") -> dict:
    """Diff-Pruning's truncated gradient accumulation (arXiv 2305.10924, Sec. 3.2, Eq. 7-8; root
    ``ddpm_prune.py``): one fixed batch x0 and one fixed noise; for each u in order, L_u is the
    diffusion loss; L_max the running max; stop when L_u < thr * L_max. ``check="after"`` is the
    root script (backward first, so the first sub-threshold step is included), ``"before"``
    ``ddpm_exp/finetune_simple.py``. thr=0 visits the whole grid. Gradients accumulate in .grad."""
    if check not in ("after", "before"):
        raise BenchError(f"check={check!r}: use after (root ddpm_prune.py) or before (ddpm_exp)")
    x0, y, noise = calib.x0[:batch], calib.y[:batch], calib.noise[:batch]
    net.zero_grad()
    l_max, losses, used = 0.0, [], 0
    for u in u_grid:
        loss = diffusion_loss_at(net, x0, y, noise, u, reduction)
        lv = float(loss.detach())
        if not torch.isfinite(loss):
            raise BenchError(f"diffusion loss is {lv} at u={u:.3f} while scoring; check the checkpoint")
        l_max = max(l_max, lv)
        stop = thr > 0 and lv < thr * l_max
        if stop and check == "before":
            break
        loss.backward()
        losses.append(lv)
        used += 1
        if stop:
            break
    return {"steps_used": used, "losses": losses, "l_max": l_max}


# Taylor importance variants over the accumulated gradient G (.grad) and the weights theta. Which
# member slices each reads (bench.width.WidthGroup.roles) follows the code it reproduces.
TAYLOR_SCORES = ("multivariable", "abs_mean", "squared")
WEIGHTS, NORMS = ("weight",), ("norm_weight",)


def taylor_scores(net, variant: str) -> tuple[dict[str, list[float]], dict[str, list[list[float]]]]:
    """(unit scores per group, per-channel scores [chunk][unit] of the groups with chunks > 1).

    * ``multivariable`` (Molchanov et al. 2019, arXiv 1906.10771, Eq. 8): |sum of theta*G over all the
      unit's coupled slices|, biases and norms included (this suite's Taylor baseline).
    * ``abs_mean`` (Torch-Pruning ``TaylorImportance(multivariable=False)``, the root ``ddpm_prune.py``
      with torch-pruning 1.3.1): per Conv/Linear weight slice sum |theta*G|, averaged over the coupled
      layers and divided by the group mean; no biases (``bias=False``), no GroupNorm (not among its
      ``target_types``), no embedding.
    * ``squared`` (Diff-Pruning's vendored ``ddpm_exp/torch_pruning/importance.py`` TaylorImportance,
      the paper's runs): sum (theta*G)^2 over Conv/Linear weight slices plus the *unsquared* |theta*G|
      of GroupNorm weights, no biases, summed over the coupled layers, not normalised.
    Per-channel scores are the same sums kept apart per norm group (for select=per_norm_group)."""
    if variant not in TAYLOR_SCORES:
        raise BenchError(f"Taylor score {variant!r} is unknown; use one of {', '.join(TAYLOR_SCORES)}")
    units, chans = {}, {}
    for name, g in net.width_groups().items():
        if variant == "multivariable":
            c = g.per_channel(lambda w, gr: (w * gr).sum(1)).abs()
            u = g.per_unit(lambda w, gr: (w * gr).sum(1)).abs()
        elif variant == "abs_mean":
            n = max(1, g.n_members(WEIGHTS))
            c = g.per_channel(lambda w, gr: (w * gr).abs().sum(1), WEIGHTS) / n
            c = c / c.mean().clamp_min(1e-30)
            u = c.sum(1) / c.sum(1).mean().clamp_min(1e-30)
        else:
            c = g.per_channel(lambda w, gr: (w * gr).pow(2).sum(1), WEIGHTS) \
                + g.per_channel(lambda w, gr: (w * gr).abs().sum(1), NORMS)
            u = c.sum(1)
        units[name] = u.tolist()
        if g.chunks > 1:
            chans[name] = c.t().tolist()
    return units, chans


class WidthTaylor(WidthMethod):
    label = "taylor_width"  # version 1: the switches below leave the default's output unchanged

    def __init__(self, batch: int = 64, t_stride: int = 20, round_to: int = 1,
                 score: str = "multivariable",  # Molchanov's |sum theta g| | squared (ddpm_exp, the paper's Taylor row)
                 select: str = "unit",          # unit (Torch-Pruning >= 1.4.3) | per_norm_group (<= 1.4, ddpm_exp)
                 loss: str = "mean"):           # mean (root ddpm_prune.py) | sum over C*H*W (ddpm_exp)
        super().__init__(round_to)
        if score not in TAYLOR_SCORES or loss not in LOSSES:
            raise BenchError(f"taylor_width score={score!r} / loss={loss!r}: use score in {TAYLOR_SCORES}, "
                             f"loss in {LOSSES}")
        self._set_units(select)
        self.batch, self.t_stride, self.score, self.loss = int(batch), int(t_stride), score, loss

    def scores(self, net, calib):
        info = accumulate_gradients(net, calib, self.batch, timestep_grid(net, self.t_stride), thr=0.0,
                                    reduction=self.loss)
        units, chans = taylor_scores(net, self.score)
        net.zero_grad()
        return units, {"steps_used": info["steps_used"], "t_stride": self.t_stride, "score": self.score,
                       "loss": self.loss}, chans
