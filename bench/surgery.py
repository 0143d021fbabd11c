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
    """Measured cost of one forward at batch 1: params, MACs, blocks. A routed (stage-wise) model
    reports params stored and the stage-weighted mean MACs and blocks (bench.routing.measure)."""
    if getattr(net.net, "stage_router", None) is not None:
        from bench import routing
        return routing.measure(net)
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
    """Apply a plan in place: block removal first, then operator removal (``ops.<group>`` keys),
    then width surgery (every other key names a width group, bench.width). Returns net."""
    if plan.stages or getattr(net.net, "stage_router", None) is not None:
        from bench import routing  # stage-wise plans: keep the union of the stages' blocks, then route
        return routing.apply_stages(net, plan)
    ops = {k[4:]: v for k, v in plan.keep.items() if k.startswith("ops.")}
    width = {k: v for k, v in plan.keep.items() if k != "blocks" and not k.startswith("ops.")}
    if "blocks" in plan.keep:
        keep = sorted(int(i) for i in plan.keep["blocks"])
        present = list(net.kept_blocks)
        if not keep or len(set(keep)) != len(keep) or not set(keep) <= set(present):
            raise BenchError(f"invalid block plan {keep}: the model has blocks {present} (dense indices)")
        pos = [present.index(i) for i in keep]
        net.net.blocks = nn.ModuleList([net.net.blocks[p] for p in pos])
        net.kept_blocks = keep
    if ops:
        have = net.units("operator")
        for group, keep in ops.items():
            if group not in have:
                raise BenchError(f"plan removes operators of group {group!r}; {net.name} has {sorted(have)}")
            net.remove_operators(group, [int(i) for i in keep])
    if width:
        groups = net.width_groups()
        unknown = sorted(set(width) - set(groups))
        if unknown:
            raise BenchError(f"plan names width groups the model does not have: {unknown[:4]}; "
                             f"it has e.g. {sorted(groups)[:4]} (was the plan made for another model?)")
        for name, keep in width.items():
            net.prune_width(name, [int(i) for i in keep])
    return net


def width_plan(net: Denoiser, scores: dict[str, list[float]], budget: Budget, granularity: str = "width",
               round_to: dict[str, int] | None = None, meta: dict | None = None) -> Plan:
    """The Diff-Pruning / Torch-Pruning 'local' allocation: every width group keeps the same
    fraction q of its units (its highest-scoring ones), with q the largest value whose *measured*
    cost fits the budget (bisection on a copy of the model: never trust a knob).

    scores: group name -> per-unit score over the group's present units (higher = keep).
    round_to: optional per-kind multiple for kept counts (e.g. {"channels": 8} for tensor cores)."""
    import copy

    groups = net.width_groups()
    missing = sorted(set(groups) - set(scores))
    if missing:
        raise BenchError(f"width scores missing for groups {missing[:4]}")
    if budget.measure == "blocks":
        raise BenchError("width pruning cannot meet a budget in blocks; use budget.measure=macs or params")
    dense = measure(net)
    round_to = round_to or {}

    def counts(q: float, q_fill: float | None = None) -> dict[str, int]:
        out = {}
        for name, g in groups.items():
            qq = q_fill if (q_fill is not None and g.kind == "channels") else q
            r = max(1, int(round_to.get(g.kind, 1)))
            k = int(math.floor(qq * g.size / r + TOL)) * r
            out[name] = min(g.size, max(r if r <= g.size else 1, k))
        return out

    def plan_for(q: float, q_fill: float | None = None) -> Plan:
        keep = {}
        for name, n in counts(q, q_fill).items():
            g = groups[name]
            pos = keep_top(scores[name], n)
            keep[name] = [g.dense_ids[p] for p in pos]
        return Plan(granularity, keep, scores={k: [float(x) for x in v] for k, v in scores.items()},
                    meta={**(meta or {}), "width_fraction": q, "channel_fraction": q if q_fill is None else q_fill})

    cache: dict[tuple, float] = {}

    def cost_of(q: float, q_fill: float | None = None) -> float:
        key = tuple(sorted(counts(q, q_fill).items()))  # many fractions give the same counts
        if key not in cache:
            trial = copy.deepcopy(net)
            apply(trial, plan_for(q, q_fill))
            if budget.measure == "params":  # no forward needed
                cache[key] = count_params(trial.net) / dense["params"]
            else:
                cache[key] = measure(trial)[budget.measure] / dense[budget.measure]
        return cache[key]

    if cost_of(1e-9) > budget.keep + 1e-9:
        raise BenchError(f"budget {budget.measure} keep={budget.keep} cannot be met by width pruning alone: keeping "
                         f"one unit per group costs {cost_of(1e-9):.3f} of the dense model; raise budget.keep")
    lo, hi = 0.0, 1.0
    if cost_of(hi) <= budget.keep + 1e-9:
        lo = hi
    else:
        for _ in range(11):  # 2^-11: one unit of groups up to 2048 units, ~2 of DiT-XL/2's 4608-channel MLPs
            mid = (lo + hi) / 2
            if cost_of(mid) <= budget.keep + 1e-9:
                lo = mid
            else:
                hi = mid
    # Fill: coarse groups (a few heads) make the common fraction jump; keep their count and raise
    # the channel groups' common fraction up to the budget (still one fraction per kind)
    q_fill = lo
    if lo < 1.0 and any(g.kind == "channels" for g in groups.values()):
        a, b = lo, 1.0
        for _ in range(11):
            mid = (a + b) / 2
            if cost_of(lo, mid) <= budget.keep + 1e-9:
                a = mid
            else:
                b = mid
        q_fill = a
    plan = plan_for(lo, q_fill)
    plan.meta["measured_keep"] = cost_of(lo, q_fill)
    return plan


def check_budget(dense: dict[str, float], pruned: dict[str, float], budget: Budget, unit_share: float = 0.0,
                 final: bool = True) -> dict[str, float]:
    """Measured keep fractions; raise if the budget is exceeded, or undershot by more than one unit
    (a plan that removes more than the budget asks is not comparable either). final=False only
    measures (a progressive method's starting point)."""
    keep = {f"keep_{k}": pruned[k] / dense[k] if dense[k] else 1.0 for k in ("params", "macs", "blocks")}
    got = keep[f"keep_{budget.measure}"]
    if final and got > budget.keep + 1e-6:
        raise BenchError(f"pruned model keeps {got:.4f} of dense {budget.measure}, over the budget {budget.keep}; "
                         "the method's plan does not meet the budget")
    if unit_share and got < budget.keep - unit_share - 1e-6:
        raise BenchError(f"pruned model keeps {got:.4f} of dense {budget.measure}, more than one unit below the "
                         f"budget {budget.keep}; the method pruned too much")
    return keep
