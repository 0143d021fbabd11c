"""The only code that changes shapes: apply a Plan, then measure the result against the Budget.

Block plans keep a subset of transformer blocks (the residual stream passes straight through a
removed block, as in TinyFusion's and ShortGPT's layer removal). Width plans (heads, channels via
Torch-Pruning) and stage routing arrive with later issues and live here too, with every
static-attribute repair they need.
"""
from __future__ import annotations

import math

import torch.nn as nn

from bench.api import BenchError, Budget, Plan
from bench.metrics.cost import count_macs, count_params
from bench.models.denoiser import Denoiser

TOL = 1e-9


def measure(net: Denoiser) -> dict[str, float]:
    """Measured cost of one forward at batch 1: params, MACs, blocks."""
    x, t, y = net.example_inputs(1)
    was_training = net.net.training
    net.net.eval()
    macs = count_macs(net.net, x, t, y)
    net.net.train(was_training)
    return {"params": count_params(net.net), "macs": macs, "blocks": len(net.net.blocks)}


def block_costs(net: Denoiser) -> tuple[dict[str, float], dict[str, float]]:
    """(fixed cost, cost of one block) for each measure, from two measurements. DiT/SiT blocks are
    identical, so cost(n blocks) = fixed + n * per_block exactly."""
    full = measure(net)
    with net.ablate("blocks", [0]):
        less = measure(net)
    per = {k: full[k] - less[k] for k in full}
    fixed = {k: full[k] - full["blocks"] * per[k] for k in full}
    return fixed, per


def blocks_to_keep(net: Denoiser, budget: Budget) -> int:
    """Largest number of blocks whose measured cost fits the budget. Raises if none does."""
    fixed, per = block_costs(net)
    depth = len(net.net.blocks)
    dense = fixed[budget.measure] + depth * per[budget.measure]
    n = int(math.floor((budget.keep * dense - fixed[budget.measure]) / per[budget.measure] + TOL))
    n = min(n, depth)
    if n < 1:
        raise BenchError(
            f"budget {budget.measure} keep={budget.keep} cannot be met by removing blocks: even one block "
            f"costs {(fixed[budget.measure] + per[budget.measure]) / dense:.3f} of the dense model; raise budget.keep")
    return n


def keep_top(scores, n_keep: int) -> list[int]:
    """Indices of the n_keep highest scores (higher = more important), in model order.
    Ties break toward the earlier block so plans are deterministic."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:n_keep])


def apply(net: Denoiser, plan: Plan) -> Denoiser:
    """Apply a plan in place (block removal). Returns net for chaining."""
    if plan.stages:
        raise BenchError("stage-wise plans need the routed model (not available yet); use a static plan")
    unknown = set(plan.keep) - {"blocks"}
    if unknown:
        raise BenchError(f"plan groups {sorted(unknown)} need width surgery, which this build does not have yet")
    if "blocks" in plan.keep:
        keep = sorted(int(i) for i in plan.keep["blocks"])
        present = list(net.kept_blocks)
        if not keep or len(set(keep)) != len(keep) or not set(keep) <= set(present):
            raise BenchError(f"invalid block plan {keep}: the model has blocks {present} (dense indices)")
        pos = [present.index(i) for i in keep]
        net.net.blocks = nn.ModuleList([net.net.blocks[p] for p in pos])
        net.kept_blocks = keep
    return net


def check_budget(dense: dict[str, float], pruned: dict[str, float], budget: Budget, unit_share: float = 0.0,
                 final: bool = True) -> dict[str, float]:
    """Measured keep fractions; raise if the budget is exceeded, or undershot by more than one unit
    (a plan that removes more than the budget asks is not comparable either). final=False only
    measures (a progressive method's starting point)."""
    keep = {f"keep_{k}": pruned[k] / dense[k] for k in ("params", "macs", "blocks")}
    got = keep[f"keep_{budget.measure}"]
    if final and got > budget.keep + 1e-6:
        raise BenchError(f"pruned model keeps {got:.4f} of dense {budget.measure}, over the budget {budget.keep}; "
                         "the method's plan does not meet the budget")
    if unit_share and got < budget.keep - unit_share - 1e-6:
        raise BenchError(f"pruned model keeps {got:.4f} of dense {budget.measure}, more than one unit below the "
                         f"budget {budget.keep}; the method pruned too much")
    return keep
