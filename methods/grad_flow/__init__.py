"""Gradient-flow pruning: progressive soft structured pruning of DiT / SiT / U-Net during fine-tuning.

Paper: Ben Wan, Tianyi Zheng, Zhaoyu Chen, Yuxiao Wang, Jia Wang, "Pruning for Sparse Diffusion
Models based on Gradient Flow", ICASSP 2025, arXiv 2501.09464 (journal version: "Gradient
flow-based iterative pruning for efficient and high-quality lightweight diffusion models", Neural
Networks 2025). No code is public and only the abstract could be read (research notes,
methods.md section 4), so everything below that is not marked [V] is our reconstruction [A]:
label results "GF-reconstruction", not the paper's numbers.

What the paper states [V, abstract]:
  * structured ("structure prune"), soft and progressive pruning of diffusion models;
  * criterion: "prune parameters whose removal increases the gradient norm of the loss", so that
    the pruned model keeps converging fast in the iterative stage;
  * a progressive soft pruning strategy that keeps the mask matrix continuous and guides it
    "along the gradient flow of the energy function" in sparse space, avoiding the information
    loss of one-shot pruning.

Reconstruction [A] (each a keyword argument; default in brackets):
  G1 units     [width] the width units of ``net.width_groups()`` (DiT/SiT attention heads and MLP
               hidden channels; the U-Net's coupled channel and head groups), budget in MACs or
               params, or whole transformer blocks (method ``grad_flow_blocks``), any budget.
  G2 masks     a continuous mask m_u in [0, 1] per unit multiplies *every* parameter slice the unit
               owns: theta_eff = theta * m (bench.width members; a block owns all its parameters).
               For DiT/SiT m_u = 0 is exactly the removed unit (zero q/k/v rows and proj columns;
               zero fc1 row/bias into a zero fc2 column; a block with zero adaLN-Zero gates is the
               identity), so hard removal at m = 0 changes nothing. U-Net: a GroupNorm over masked
               channels weights each channel's share of its group statistics by m (soft membership;
               m = 0 leaves it out, as the pruned SegmentGroupNorm does), so m = 0 equals removal
               there too. Implemented as forward hooks that compute with theta * m
               (criterion.MaskHooks): parameters, optimizer state, checkpoints and EMA averages stay
               the raw theta.
  G3 criterion with L the diffusion loss on the first ``n_probes`` [64] calibration probes (fixed
               x0, label, noise, noise level; eval mode), g = grad L and G = ||g||^2 (the "gradient
               norm"). ``loss`` [simple]: the prediction MSE (eps for DDPM, velocity for flow);
               training: the model's own training loss, whose learned-variance term stops the
               gradient through the predicted mean, which the double backward then holds fixed
               (H g of that frozen loss, 1e-3 off the finite difference on a DiT). Removing unit u is delta = -theta_u, so to first
               order (GraSP: Wang, Zhang & Grosse, ICLR 2020, arXiv 2002.07376, Sec. 4)
                   Delta G_u = grad G . delta = 2 (H g) . delta = -2 theta_u . (H g)_u
               with H g one Hessian-vector product (double backward; Pearlmutter 1994), taken at the
               current effective weights theta_eff. tests/test_grad_flow.py checks it against a
               central finite difference of G in float64.
  G4 sign      ``prune`` [most_increase]: prune the units whose removal raises ||g||^2 the most
               (the abstract's "removal increases the gradient norm", and GraSP's rule of
               removing the top scores -theta . Hg). least_increase: the reverse ranking;
               least_change: prune the smallest |Delta G| (removal leaves the gradient flow as is).
  G5 allocation width: every group loses the same fraction of units (bench.surgery.width_plan,
               the suite's local allocation, measured against the MACs/params budget); blocks:
               bench.surgery.blocks_to_keep. The criterion chooses *which* units, per group.
  G6 rounds    decisions every ``period`` [25] steps before E = floor(``finish_frac`` [2/3] x
               fine-tune steps): K = round(E / period) rounds at floor(k E / K), k = 0..K-1;
               the criterion is recomputed at every round on the current (masked, non-EMA) weights.
  G7 counts    ``count`` [cubic]: units selected by round k = round(N c((k+1)/K)) per group, with
               c(x) = 1 - (1 - x)^3 (Zhu & Gupta 2017, Eq. 1, the cubic sparsity schedule of the
               methods.md reconstruction), linear c(x) = x, or all (every unit at round 0).
               Selection is monotone: a selected unit is never restored.
  G8 decay     ``decay`` [linear]: a unit selected at round step a has m(tau) = 1 - rho((tau - a) /
               (E - a)) with rho linear | cosine | cubic; ``step`` zeroes it at once (the hard,
               non-soft ablation). Every selected mask is exactly 0 at E, every other is 1.
  G9 removal   at E the loop hard-removes the units with m = 0 (a Plan through bench.surgery, on the
               model and its EMA), then fine-tunes the remaining T - E steps; the final model meets
               the budget exactly (what G5 allocated).
  G10 EMA      the EMA copy runs the same masks (``on_ema``), so at every step it is the soft-
               pruned model of its averaged weights, and after the removal it is the pruned model.
  G11 schedule ``schedule`` [progressive]; ``oneshot`` removes the dense model's lowest-ranked units
               to the budget at once before the shared fine-tune (ablation of "progressive").
Not reproduced: the paper's mask "gradient flow of the energy function" dynamics (the abstract
does not define them; G6-G8 are a schedule, not a learned flow), its data, recipe and numbers.

Outputs: plan.scores = importance on the dense model (higher = keep), plan.meta["delta_G"] the
first-order Delta G per unit, every decision in ``<run_dir>/grad_flow_decisions.jsonl``.
Cost on the embedded default (DiT-D8/2, 64 probes, one CPU thread): one criterion evaluation is
one backward and one double backward (about 1 s); plan() adds the width allocation (about 5 s).
Backbone-specific (``net.backbone``): the soft masks are forward hooks on the backbone's modules
(criterion.MaskHooks, the U-Net's GroupNorms included); the scores themselves use only protocol members.

Under several ranks (torchrun, a SLURM job of several tasks): plan() runs on rank 0 and its Plan
is broadcast; the fine-tune callback runs on every rank with the same weights and the global mean
loss (its calibration forwards and proxies are not split over ranks), and rank 0's Plan is applied
on every rank (bench.finetune).
"""
from __future__ import annotations

import torch

from bench.api import BenchError, Budget, Method, Plan
from bench.surgery import blocks_to_keep, keep_top, width_plan
from methods.grad_flow.criterion import (LOSSES, collect_units, gradient_flow_scores, grad_and_hvp, importance,
                                         multipliers, unit_dot)
from methods.grad_flow.schedule import COUNTS, DECAYS, LOG_NAME, GradFlowSchedule, mask_trace, mask_value, \
    schedule_steps

__all__ = ["GradFlow", "GradFlowBlocks", "gradient_flow_scores", "grad_and_hvp", "collect_units", "multipliers",
           "unit_dot", "mask_value", "mask_trace", "schedule_steps", "LOG_NAME"]

PRUNE = ("most_increase", "least_increase", "least_change")


class GradFlow(Method):
    granularity = "width"
    label = "grad_flow"
    units = "width"
    version = 1
    needs_grad = True

    def __init__(
        self,
        prune: str = "most_increase",     # G4: which end of the Delta ||g||^2 ranking goes
        schedule: str = "progressive",    # G11: progressive (soft masks during fine-tuning) | oneshot
        decay: str = "linear",            # G8: linear | cosine | cubic | step (hard, the ablation)
        count: str = "cubic",             # G7: cubic | linear | all (cumulative selections per round)
        period: int = 25,                 # G6: steps between criterion rounds
        finish_frac: float = 2 / 3,       # G6: masks reach 0 at this fraction of the fine-tune
        n_probes: int = 64,               # G3: calibration probes of the criterion
        loss: str = "simple",             # G3: simple (prediction MSE) | training (the model's own loss)
        batch_size: int = 64,             # memory only
        round_to: int = 1,                # G5: kept channels per group rounded to a multiple
    ):
        def one_of(name, value, options):
            if value not in options:
                raise BenchError(f"{self.label} {name}={value!r} is unknown; use one of {', '.join(options)}")
        one_of("prune", prune, PRUNE)
        one_of("schedule", schedule, ("progressive", "oneshot"))
        one_of("decay", decay, DECAYS)
        one_of("count", count, COUNTS)
        one_of("loss", loss, LOSSES)
        if period < 1 or not 0 < finish_frac <= 1 or n_probes < 1 or batch_size < 1 or round_to < 1:
            raise BenchError(f"{self.label} needs period >= 1, 0 < finish_frac <= 1, n_probes >= 1, batch_size >= 1 "
                             "and round_to >= 1")
        self.prune, self.schedule, self.decay, self.count = prune, schedule, decay, count
        self.period, self.finish_frac = int(period), float(finish_frac)
        self.n_probes, self.batch_size, self.round_to = int(n_probes), int(batch_size), int(round_to)
        self.loss = loss
        self._targets: dict = {}   # budget + structure -> units to remove per group (plan() -> callback)

    def settings(self) -> dict:
        keys = ("units", "prune", "schedule", "decay", "count", "period", "finish_frac", "n_probes", "loss",
                "batch_size", "round_to")
        return {k: getattr(self, k) for k in keys}

    # ---- budget -> units to remove per group ------------------------------------------------
    def _key(self, budget: Budget, groups) -> str:
        return repr((budget.measure, float(budget.keep), sorted((g, tuple(u.dense_ids)) for g, u in groups.items())))

    def _allocate(self, net, budget: Budget, groups, imp: dict) -> Plan:
        if self.units == "blocks":
            n_keep = blocks_to_keep(net, budget)
            return Plan("block", {"blocks": [net.kept_blocks[i] for i in keep_top(imp["blocks"].tolist(), n_keep)]})
        if budget.measure == "blocks":
            raise BenchError(f"{self.label} prunes width units; give the budget in MACs or params "
                             "(budget.measure=macs budget.keep=0.5), or use method=grad_flow_blocks")
        return width_plan(net, {g: imp[g].tolist() for g in groups}, budget, round_to={"channels": self.round_to})

    def removal_targets(self, net, budget: Budget, groups) -> dict[str, int]:
        """Units each group loses by the end of the schedule (cached from plan() when it ran)."""
        key = self._key(budget, groups)
        if key not in self._targets:
            ones = {g: torch.ones(u.size, dtype=torch.float64) for g, u in groups.items()}
            alloc = self._allocate(net, budget, groups, ones)
            self._targets[key] = {g: u.size - len(alloc.keep[g]) for g, u in groups.items()}
        return dict(self._targets[key])

    # ---- Method -----------------------------------------------------------------------------
    def plan(self, net, budget: Budget, calib) -> Plan:
        if self.units == "width" and budget.measure == "blocks":
            raise BenchError(f"{self.label} prunes width units; give the budget in MACs or params "
                             "(budget.measure=macs budget.keep=0.5), or use method=grad_flow_blocks")
        groups = collect_units(net, self.units)
        r = gradient_flow_scores(net, groups, calib, self.n_probes, self.batch_size, loss=self.loss)
        imp = {g: importance(v, self.prune) for g, v in r["delta_G"].items()}
        alloc = self._allocate(net, budget, groups, imp)
        self._targets[self._key(budget, groups)] = {g: u.size - len(alloc.keep[g]) for g, u in groups.items()}
        keep = alloc.keep if self.schedule == "oneshot" else {g: list(u.dense_ids) for g, u in groups.items()}
        meta = {"method": self.label, "settings": self.settings(), "G": r["G"], "calib_n": min(self.n_probes, len(calib)),
                "delta_G": {g: [float(x) for x in v] for g, v in r["delta_G"].items()},
                "targets_removed": self._targets[self._key(budget, groups)],
                "oneshot_keep": alloc.keep}
        if "measured_keep" in alloc.meta:
            meta["measured_keep"] = alloc.meta["measured_keep"]
        return Plan(granularity=self.granularity, keep=keep, scores={g: [float(x) for x in v] for g, v in imp.items()},
                    meta=meta)

    def callback(self, budget: Budget, calib):
        return GradFlowSchedule(self, budget, calib) if self.schedule == "progressive" else None


class GradFlowBlocks(GradFlow):
    """The same method on whole transformer blocks (G1): budget in blocks, MACs or params."""

    granularity = "block"
    label = "grad_flow_blocks"
    units = "blocks"
