"""Block magnitude: remove the blocks whose weights are smallest on average.

score_b = ( mean_{theta in block b} |theta|^p )^(1/p)   (p=1: mean |theta|; p=2: RMS of theta)

Source: the depth analogue of Li et al. 2017, "Pruning Filters for Efficient ConvNets"
(arXiv 1608.08710, Sec. 3.1: a filter's importance is the sum of its absolute weights), as listed
in methods.md section 8 ("Block magnitude", [A]). Our choices: every parameter of the block
counts (attention, MLP and the adaLN modulation), pooled into one mean so the score does not
depend on how many tensors a block has; the mean (not the sum) keeps blocks comparable; the
p-th root makes p=1 and p=2 scores the same units. Data-free: ``calib`` is not used.

Under several ranks (torchrun, a SLURM job of several tasks): plan() runs on rank 0 alone and
the run broadcasts the Plan to the others (bench.run); its forwards over the calibration probes
are not split over ranks.
"""
from __future__ import annotations

import torch

from bench.api import BenchError, Budget, Method, Plan
from bench.surgery import blocks_to_keep, keep_top


@torch.no_grad()
def block_magnitude(net, p: int = 1) -> list[float]:
    """(mean over the block's parameters of |theta|^p)^(1/p), one per block."""
    scores = []
    for params in net.block_params():
        total = sum(w.detach().double().abs().pow(p).sum() for w in params)
        count = sum(w.numel() for w in params)
        scores.append(float((total / count) ** (1.0 / p)))
    return scores


class BlockMagnitude(Method):
    granularity = "block"

    def __init__(self, p: int = 1):
        if p <= 0:
            raise BenchError(f"magnitude p={p} must be positive (1 = L1, 2 = L2)")
        self.p = p  # norm order: 1 = Li et al.'s L1, 2 = L2 (Torch-Pruning's default magnitude)

    def plan(self, net, budget: Budget, calib) -> Plan:
        scores = block_magnitude(net, self.p)
        kept = keep_top(scores, blocks_to_keep(net, budget))
        return Plan(granularity="block", keep={"blocks": kept}, scores={"blocks": scores},
                    meta={"method": "magnitude", "p": self.p})
