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


class WidthMethod(Method):
    """Common part: score units (``scores``), then the local allocation to the budget."""

    granularity = "width"
    label = "width"

    def __init__(self, round_to: int = 1):
        self.round_to = int(round_to)  # kept channels per group rounded to a multiple (heads never rounded)

    def scores(self, net, calib) -> tuple[dict[str, list[float]], dict]:
        raise NotImplementedError

    def plan(self, net, budget: Budget, calib) -> Plan:
        if budget.measure == "blocks":
            raise BenchError(f"{self.label} prunes width; give the budget in MACs or params "
                             "(budget.measure=macs budget.keep=0.5)")
        with net.eval_mode():
            scores, meta = self.scores(net, calib)
        return width_plan(net, scores, budget, round_to={"channels": self.round_to},
                          meta={"method": self.label, **meta})


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


def diffusion_loss_at(net, x0, y, noise, u: float):
    """Mean diffusion loss of the fixed batch at one noise level (eps MSE for DDPM, velocity MSE
    for flow; the learned-sigma term is left out, as Diff-Pruning's loss is the eps MSE)."""
    uu = torch.full((x0.shape[0],), float(u), device=x0.device)
    x_t, t = net.noisy(x0, uu, noise)
    out = net(x_t, t, y)
    C = x0.shape[1]
    if net.process.kind == "flow":
        return ((out[:, :C] - (x0 - noise)) ** 2).mean()
    return ((out[:, :C] - noise) ** 2).mean()


def accumulate_gradients(net, calib, batch: int, u_grid: list[float], thr: float = 0.0,
                         check: str = "after") -> dict:
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
        loss = diffusion_loss_at(net, x0, y, noise, u)
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


class WidthTaylor(WidthMethod):
    label = "taylor_width"

    def __init__(self, batch: int = 64, t_stride: int = 20, round_to: int = 1):
        super().__init__(round_to)
        self.batch, self.t_stride = int(batch), int(t_stride)

    def scores(self, net, calib):
        info = accumulate_gradients(net, calib, self.batch, timestep_grid(net, self.t_stride), thr=0.0)
        out = {}
        for name, g in net.width_groups().items():  # multivariable: |sum theta g| over the unit
            out[name] = g.per_unit(lambda w, gr: (w * gr).sum(1)).abs().tolist()
        net.zero_grad()
        return out, {"steps_used": info["steps_used"], "t_stride": self.t_stride}
