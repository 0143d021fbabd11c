"""LD-Pruner — "Efficient Pruning of Latent Diffusion Models using Task-Agnostic Insights"
(Castells, Song, Kim, Choi; CVPR Workshops 2024, arXiv 2404.11936). Method card.

No official code. What the paper states (methods.md section 3): operators of the denoiser are
scored by how much the distribution of the *final generated latents* changes when that one
operator is modified, the score being the sum of the changes of the latents' mean and variance;
the least significant operators are pruned to the budget, the rest keep their weights, then the
model is fine-tuned.

Our reconstruction (each choice a switch where it could change rankings):

* Operators: DiT/SiT — whole block, attention branch, MLP branch of every block (methods.md §3b
  [A]); U-Net — the ResNet blocks whose bypass keeps shapes valid, and the attention blocks
  (the paper's own operator list for the LDM U-Net). ``operators`` picks the families.
* Modification: bypass (the residual stream passes through unchanged; the paper's "removal").
* Score (Hybrid-SD's concrete form of the paper's words, methods.md §3b):
      s(op) = || mean_n Z - mean_n Z_op ||_2 + || std_n Z - std_n Z_op ||_2
  with Z the final latents (samples) of ``n_probes`` fixed (noise, label) pairs from the suite's
  seeds, mean/std element-wise over the sample axis n. ``spread`` = std (default) | var (the
  paper says "variance").
* Sampler for Z: deterministic DDIM (eta = 0) for DDPM models, Euler ODE for flow models, with
  ``steps`` steps and the run's guidance scale; the same probes for every operator.
* Selection: operators in ascending score; each is removed unless a block containing it is
  already gone (a block's branch scores stay valid only for the one-operator change, as in the
  paper's one-shot ranking); stop as soon as the measured cost fits the budget. A budget in
  blocks uses whole-block operators only.
Cost: one generation per operator (O(#ops x n x steps), the paper's complexity).

Under several ranks (torchrun, a SLURM job of several tasks): plan() runs on rank 0 alone and
the run broadcasts the Plan to the others (bench.run); its forwards over the calibration probes
are not split over ranks.
"""
from __future__ import annotations

import copy

import torch

from bench.api import BenchError, Budget, Method, Plan
from bench.sample import generate
from bench import surgery


class LDPruner(Method):
    granularity = "operator"

    def __init__(self, n_probes: int = 64, steps: int = 10, seed: int = 0, cfg_scale: float = 1.5,
                 spread: str = "std", operators: list[str] | None = None, batch: int = 64):
        if spread not in ("std", "var"):
            raise BenchError(f"ld_pruner spread={spread!r}: use std (Hybrid-SD) or var (the paper's word)")
        self.n_probes, self.steps, self.seed, self.cfg_scale = int(n_probes), int(steps), int(seed), float(cfg_scale)
        self.spread, self.batch = spread, int(batch)
        self.operators = list(operators) if operators else None

    def _latents(self, net) -> torch.Tensor:
        sampler = "ddim" if net.process.kind == "ddpm" else "euler"
        z, _ = generate(net, self.n_probes, 10_000 + self.seed, self.batch, sampler, self.steps, self.cfg_scale,
                        "all", "balanced", "uniform", 0.0, net.device)
        return z.double().flatten(1)

    def _score(self, z0, z) -> float:
        d_mean = (z0.mean(0) - z.mean(0)).norm()
        s0, s = (z0.std(0), z.std(0)) if self.spread == "std" else (z0.var(0), z.var(0))
        return float(d_mean + (s0 - s).norm())

    def candidates(self, net, budget: Budget) -> list[tuple[str, int]]:
        if net.depth:  # DiT / SiT
            fams = self.operators or (["blocks"] if budget.measure == "blocks" else ["blocks", "attn", "mlp"])
            bad = set(fams) - {"blocks", "attn", "mlp"}
        else:                    # the U-Net: its own operator groups
            have = net.units("operator")
            if budget.measure == "blocks":
                raise BenchError("the U-Net has no transformer blocks; give the budget in MACs or params")
            fams = self.operators or sorted(have)
            bad = set(fams) - set(have)
        if bad:
            raise BenchError(f"ld_pruner operators {sorted(bad)} unknown for {net.name}")
        if budget.measure == "blocks" and set(fams) != {"blocks"}:
            raise BenchError("a budget in blocks can only be met by whole-block operators; use operators=[blocks] "
                             "or budget.measure=macs")
        sizes = {"blocks": net.depth, "attn": net.depth, "mlp": net.depth} if net.depth else net.units("operator")
        return [(f, i) for f in fams for i in range(sizes[f])]

    @torch.no_grad()
    def plan(self, net, budget: Budget, calib) -> Plan:
        cands = self.candidates(net, budget)
        with net.eval_mode():
            z0 = self._latents(net)
            scores = {}
            for fam, i in cands:
                with net.ablate(fam, [i]):
                    scores[(fam, i)] = self._score(z0, self._latents(net))
        order = sorted(cands, key=lambda c: (scores[c], c))
        dense = surgery.measure(net)
        removed: list[tuple[str, int]] = []
        plan = self._plan(net, removed, scores)
        for c in order:
            if self._covered(c, removed):
                continue
            removed.append(c)
            plan = self._plan(net, removed, scores)
            trial = surgery.apply(copy.deepcopy(net), plan)
            got = surgery.measure(trial)[budget.measure] / dense[budget.measure]
            if got <= budget.keep + 1e-9:
                plan.meta["measured_keep"] = got
                return plan
        raise BenchError(f"ld_pruner could not reach {budget.measure} keep={budget.keep} by removing operators; "
                         "raise budget.keep")

    @staticmethod
    def _covered(c, removed) -> bool:
        fam, i = c
        if ("blocks", i) in removed and fam in ("attn", "mlp"):
            return True
        return False

    def _plan(self, net, removed, scores) -> Plan:
        fams = sorted({f for f, _ in scores})
        sizes = {f: 1 + max(i for g, i in scores if g == f) for f in fams}
        keep = {}
        for f in fams:
            kept = [i for i in range(sizes[f]) if (f, i) not in removed]
            if f == "blocks":
                if not kept:
                    raise BenchError("ld_pruner would remove every block; raise budget.keep")
                keep["blocks"] = kept
            else:
                keep[f"ops.{f}"] = kept
        if "blocks" in keep:  # branches of removed blocks are gone with them
            for f in ("attn", "mlp"):
                if f"ops.{f}" in keep:
                    keep[f"ops.{f}"] = [i for i in keep[f"ops.{f}"] if i in keep["blocks"]]
        return Plan("operator", keep, scores={f: [scores[(f, i)] for i in range(sizes[f])] for f in fams},
                    meta={"method": "ld_pruner", "removed": [f"{f}:{i}" for f, i in removed], "spread": self.spread,
                          "n_probes": self.n_probes, "steps": self.steps, "unit_share": 0.15})
