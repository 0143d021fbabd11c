"""Sensitivity analysis: remove the blocks whose individual removal raises the loss least.

score_i = L_calib(model with block i bypassed) - L_calib(dense model)

Source: TinyFusion (Fang et al., CVPR 2025, arXiv 2412.01199), the "Sensitivity Analysis"
baseline of Tables 1 and 3 ("loss increase when removing one layer"; not in its repo, methods.md
7g). Our choices: L_calib is the model's own training loss (DDPM: L_simple + L_vlb with learned
sigma; flow: velocity MSE) on the shared calibration probes with the *same* fixed noise and
stratified noise levels for every block (``net.loss(x0, y, u=calib.u, noise=calib.noise)``), so
score differences come from the block alone; a block is bypassed with ``net.ablate`` (the
residual stream passes through). Signed, not absolute: a block whose removal lowers the loss is
the first to go. ``meta["scores_per_bin"]`` holds the loss increase per noise-level bin.

Under several ranks (torchrun, a SLURM job of several tasks): plan() runs on rank 0 alone and
the run broadcasts the Plan to the others (bench.run); its forwards over the calibration probes
are not split over ranks.
"""
from __future__ import annotations

import torch

from baselines.block_influence import by_bin
from bench.api import Budget, Method, Plan
from bench.surgery import blocks_to_keep, keep_top


@torch.no_grad()
def loss_increase(net, calib, batch_size: int) -> torch.Tensor:
    """L(block i bypassed) - L(dense) for every calibration sample: an (n, depth) tensor."""
    depth, dev, rows = net.units("block")["blocks"], net.device, []
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
    return torch.cat(rows)


class Sensitivity(Method):
    granularity = "block"

    def __init__(self, batch_size: int = 16):
        self.batch_size = int(batch_size)  # memory only; losses are per sample, so scores do not depend on it

    def plan(self, net, budget: Budget, calib) -> Plan:
        scores, per_bin = by_bin(loss_increase(net, calib, self.batch_size), calib)
        kept = keep_top(scores, blocks_to_keep(net, budget))
        return Plan(granularity="block", keep={"blocks": kept}, scores={"blocks": scores},
                    meta={"method": "sensitivity", "calib_n": len(calib), "scores_per_bin": per_bin})
