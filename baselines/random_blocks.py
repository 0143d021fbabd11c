"""Random block removal: scores drawn uniformly at random.

Source: Torch-Pruning's ``RandomImportance`` (U(0,1) per unit; VainF/Torch-Pruning
``torch_pruning/pruner/importance.py``), used at block granularity as TinyFusion's "random"
depth baselines (arXiv 2412.01199, Table 3). Our choices: scores come from
``torch.Generator().manual_seed(seed)`` so a plan is reproducible from the seed alone (the
config interpolates the run's root seed); report the mean over >= 3 seeds (methods.md section 8).

Under several ranks (torchrun, a SLURM job of several tasks): plan() runs on rank 0 alone and
the run broadcasts the Plan to the others (bench.run); its forwards over the calibration probes
are not split over ranks.
"""
from __future__ import annotations

import torch

from bench.api import Budget, Method, Plan
from bench.surgery import blocks_to_keep, keep_top


class RandomBlocks(Method):
    granularity = "block"

    def __init__(self, seed: int = 0):
        self.seed = int(seed)  # generator seed: the whole plan is a function of it

    def plan(self, net, budget: Budget, calib) -> Plan:
        depth = net.units("block")["blocks"]
        g = torch.Generator().manual_seed(self.seed)
        scores = torch.rand(depth, generator=g, dtype=torch.float64).tolist()  # U(0, 1) per block
        kept = keep_top(scores, blocks_to_keep(net, budget))
        return Plan(granularity="block", keep={"blocks": kept}, scores={"blocks": scores},
                    meta={"method": "random", "seed": self.seed})
