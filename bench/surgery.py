"""The only code that changes shapes: apply a Plan, then measure the result against the Budget.

Block plans keep a subset of transformer blocks (the residual stream passes straight through a
removed block, as in TinyFusion's and ShortGPT's layer removal). Operator plans (``ops.<group>``)
bypass or remove whole operators (LD-Pruner). Width plans keep heads and channels per width group
(bench.width: DiT/SiT through Torch-Pruning's pruning functions, the U-Net through its
DependencyGraph), and ``width_plan`` allocates how many units every group keeps for a budget.
Stage-wise plans (Diff-ES) are routed by bench.routing. Every static attribute the new shapes need
is repaired by the code that changes them.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from bench.api import BenchError, Budget, Plan
from bench.metrics.cost import count_macs, count_params, routed_cost
from bench.models.denoiser import Denoiser
from bench.width import canonical_key, group_names, norm_channels_key

TOL = 1e-9


def measure(net: Denoiser) -> dict[str, float]:
    """Measured cost of one forward at batch 1: params, MACs, blocks. A routed (stage-wise) model
    reports params stored and the stage-weighted mean MACs and blocks (bench.metrics.cost.routed_cost)."""
    if getattr(net.net, "stage_router", None) is not None:
        return routed_cost(net)
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
        groups = group_names(net)
        known = {canonical_key(g) for g in groups}   # a plan may name a group in another unit (head dims, norm channels)
        unknown = sorted(k for k in width if canonical_key(k) not in known)
        if unknown:
            raise BenchError(f"plan names width groups the model does not have: {unknown[:4]}; "
                             f"it has e.g. {sorted(groups)[:4]} (was the plan made for another model?)")
        for name, keep in width.items():
            net.prune_width(name, [int(i) for i in keep])
    return net


# Width groups with fewer units than this are "coarse" (the U-Net's GroupNorm-tied channels: a
# 128-channel conv with 32 norm groups has 4 units, a 256-channel one 8); heads are always coarse.
COARSE_UNITS = 32
_ALLOC_MEMO: dict = {}          # structure + budget -> allocation (counts do not depend on scores)


def _largest_fitting(a: float, b: float, fits, iters: int) -> float:
    """Bisection: the largest value in [a, b) (to 2^-iters of the interval) that fits, given that a fits."""
    for _ in range(iters):
        mid = (a + b) / 2
        if fits(mid):
            a = mid
        else:
            b = mid
    return a


def width_plan(net: Denoiser, scores: dict[str, list[float]], budget: Budget, granularity: str = "width",
               round_to: dict[str, int] | None = None, meta: dict | None = None,
               channel_scores: dict[str, list[list[float]]] | None = None) -> Plan:
    """The Diff-Pruning / Torch-Pruning 'local' allocation: every width group keeps (about) the same
    fraction q of its units (its highest-scoring ones), with q the largest value whose *measured*
    cost fits the budget (bisection on a copy of the model: never trust a knob).

    scores: group name -> per-unit score over the group's present units (higher = keep).
    round_to: optional per-kind multiple for kept counts (e.g. {"channels": 8} for tensor cores).

    Counts per group (which units: the scores; how many: the architecture and the budget only,
    as in Torch-Pruning's local pruning, so every method at one budget gets the same counts):

    1. common fraction q: heads and fine channel groups keep floor(q * size) units; *coarse*
       channel groups (< COARSE_UNITS units) keep size - floor((1 - q) * size), i.e. the pruned
       count is rounded down, which is Torch-Pruning's rule for GroupNorm-coupled groups (its
       per-norm-group ``n_pruned // ch_groups``): at Diff-Pruning's ratio 0.3 a 4-unit group
       keeps 3 and an 8-unit group 6, as in the paper's 35.7M -> 19.85M model. Rounding their
       kept count down instead makes every coarse group jump together (3/4 -> 2/4, 6/8 -> 5/8)
       and a budget between two jumps is missed by far (MACs 0.557 of DDPM CIFAR-10 landed at 0.36).
    2. greedy unit fill of the coarse channel groups (water-filling): whole units are added back,
       least-kept group first (the level f = the fraction a group reaches with one more unit;
       the fine channel groups are raised to f before the level's coarse groups), ties in
       data-flow order, while the measured cost stays within the budget. Candidates are screened
       by a lower bound on one unit's cost (``_unit_cost_floor``); every accepted addition is
       measured. The measured result lands within about one coarse unit under the budget.
    3. fill: the fine channel groups' common fraction is raised up to the budget (groups of a few
       heads move in whole heads, so the MLP channels take up the rest).
    The DiT/SiT groups are heads and >= 32-unit MLP channels: step 2 never applies and steps 1, 3
    are the allocation this suite has always used (DiT plans unchanged).

    channel_scores: optional, group name -> per-channel scores [chunk][unit] of U-Net channel groups
    whose units span several norm groups (``WidthGroup.chunks`` > 1). Those groups keep the same
    number of channels per norm group as the unit allocation gives (so shapes and cost are the same),
    but each norm group keeps *its own* best channels: the plan names them under
    ``<root>.norm_channels`` (dense channel ids) instead of ``<root>.channels`` (Diff-Pruning's rule:
    Torch-Pruning <= 1.4 and its vendored copy argsort inside every norm group; Torch-Pruning >= 1.4.3,
    which this suite's unit plans follow, averages the groups and keeps the same positions)."""
    import copy

    groups = net.width_groups()
    missing = sorted(set(groups) - set(scores))
    if missing:
        raise BenchError(f"width scores missing for groups {missing[:4]}")
    if budget.measure == "blocks":
        raise BenchError("width pruning cannot meet a budget in blocks; use budget.measure=macs or params")
    dense = measure(net)
    round_to = round_to or {}
    order = list(groups)
    coarse = [n for n in order if groups[n].kind == "channels" and groups[n].size < COARSE_UNITS]
    fine = {n for n in order if groups[n].kind == "channels" and n not in set(coarse)}

    def step(name: str) -> int:
        return max(1, int(round_to.get(groups[name].kind, 1)))

    def counts(q: float, q_fill: float | None = None, adds: dict | None = None) -> dict[str, int]:
        out = {}
        for name, g in groups.items():
            r = step(name)
            if name in fine and q_fill is not None:
                k = int(math.floor(q_fill * g.size / r + TOL)) * r
            elif name in fine or g.kind != "channels":
                k = int(math.floor(q * g.size / r + TOL)) * r
            else:   # coarse: pruned count rounded down (Torch-Pruning)
                k = int(math.ceil((q * g.size - TOL) / r)) * r + (adds or {}).get(name, 0)
            out[name] = min(g.size, max(r if r <= g.size else 1, k))
        return out

    per_norm = {n: v for n, v in (channel_scores or {}).items() if n in groups and groups[n].chunks > 1}
    for n, v in per_norm.items():
        g = groups[n]
        if len(v) != g.chunks or any(len(row) != g.size for row in v):
            raise BenchError(f"channel scores of {n} must be [{g.chunks} norm groups][{g.size} units]")

    def plan_for(cnt: dict[str, int], extra: dict, final: bool = False) -> Plan:
        keep, sc = {}, {k: [float(x) for x in v] for k, v in scores.items()}
        for name, n in cnt.items():
            g = groups[name]
            if final and name in per_norm:   # same counts, each norm group its own channels (trials: units, same shapes)
                keep[norm_channels_key(name)] = sorted(g.channel_ids[u][j] for j, row in enumerate(per_norm[name])
                                                       for u in keep_top(row, n))
                sc[norm_channels_key(name)] = [float(x) for row in per_norm[name] for x in row]
                continue
            keep[name] = [g.dense_ids[p] for p in keep_top(scores[name], n)]
        return Plan(granularity, keep, scores=sc, meta={**(meta or {}), **extra})

    cache: dict[tuple, float] = {}
    proto = _meta_copy(net, dense)   # trials on the meta device: shapes only, so MACs and params are exact and cheap

    def trial_of(cnt: dict[str, int]) -> Denoiser:
        trial = copy.deepcopy(proto if proto is not None else net)
        apply(trial, plan_for(cnt, {}))
        return trial

    def cost_of(q: float, q_fill: float | None = None, adds: dict | None = None) -> float:
        cnt = counts(q, q_fill, adds)
        key = tuple(sorted(cnt.items()))  # many fractions give the same counts
        if key not in cache:
            trial = trial_of(cnt)
            if budget.measure == "params":  # no forward needed
                cache[key] = count_params(trial.net) / dense["params"]
            else:
                cache[key] = measure(trial)[budget.measure] / dense[budget.measure]
        return cache[key]

    memo_key = (net.name, type(net.net).__name__, tuple((n, g.kind, g.size, tuple(g.dense_ids)) for n, g in groups.items()),
                dense["params"], dense["macs"], budget.measure, float(budget.keep), tuple(sorted(round_to.items())))
    if memo_key in _ALLOC_MEMO:
        lo, q_fill, adds, got = _ALLOC_MEMO[memo_key]
    else:
        lo, q_fill, adds, got = _allocate(budget, groups, coarse, fine, cost_of, counts, trial_of, step, dense)
        if len(_ALLOC_MEMO) > 64:
            _ALLOC_MEMO.clear()
        _ALLOC_MEMO[memo_key] = (lo, q_fill, dict(adds), got)
    extra = {"width_fraction": lo, "channel_fraction": q_fill}
    if coarse:
        extra["coarse_units_added"] = dict(adds)
    if per_norm:
        extra["norm_group_selection"] = sorted(per_norm)
    plan = plan_for(counts(lo, q_fill if fine else None, adds), extra, final=True)
    plan.meta["measured_keep"] = got
    return plan


def _meta_copy(net: Denoiser, dense: dict[str, float]) -> Denoiser | None:
    """A copy of net on the meta device (no weight data: copies, Torch-Pruning's tracing, surgery and
    the FLOP counter cost no arithmetic), or None when the model does not run there; then trials
    are real copies. MACs and params depend on shapes only: the copy must measure as `dense` does."""
    import copy

    memo = {}
    for t in [*net.net.parameters(), *net.net.buffers()]:
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    try:
        trial = copy.deepcopy(net, memo)
        return trial if measure(trial) == dense else None
    except Exception:  # an op without a meta kernel
        return None


def _allocate(budget, groups, coarse, fine, cost_of, counts, trial_of, step, dense):
    """Steps 1-3 of width_plan: (common fraction, fine-group fraction, coarse units added, measured keep)."""
    B = budget.keep + 1e-9
    if cost_of(1e-9) > B:
        raise BenchError(f"budget {budget.measure} keep={budget.keep} cannot be met by width pruning alone: keeping "
                         f"one unit per group costs {cost_of(1e-9):.3f} of the dense model; raise budget.keep")
    # 1. the common fraction
    lo, hi = 0.0, 1.0
    if cost_of(hi) <= B:
        lo = hi
    else:
        for _ in range(11):  # 2^-11: one unit of groups up to 2048 units, ~2 of DiT-XL/2's 4608-channel MLPs
            mid = (lo + hi) / 2
            if cost_of(mid) <= B:
                lo = mid
            else:
                hi = mid
    # 2. coarse channel groups, level by level (a level = the kept fraction f a group would reach
    # with one more unit, lowest first): the fine groups are raised to f first, then the level's
    # groups get their unit, in data-flow order, as many as the measured budget allows (the longest
    # fitting prefix, by bisection; a unit's cost only grows as other groups grow, so a group that
    # does not fit once never fits later)
    adds: dict[str, int] = {}
    q_fill, capped = lo, False
    if lo < 1.0 and coarse:
        closed: set[str] = set()
        max_fine = max((groups[n].size for n in fine), default=1)

        def frac_after(n):
            return (counts(lo, None, adds)[n] + step(n)) / groups[n].size

        while True:
            open_ = [n for n in coarse if n not in closed and frac_after(n) <= 1.0 + TOL]
            if not open_:
                break
            f = min(frac_after(n) for n in open_)
            if fine and not capped and q_fill < f:
                if cost_of(lo, f, adds) <= B:
                    q_fill = f
                else:   # the fine groups cannot reach f: what is left fits no fine step, and later
                    capped = True   # coarse units only make fine steps dearer
                    q_fill = _largest_fitting(q_fill, f, lambda q: cost_of(lo, q, adds) <= B,
                                              max(1, math.ceil(math.log2(max(2.0, (f - q_fill) * max_fine)))))
            cur = cost_of(lo, q_fill if fine else None, adds)
            floor = _unit_cost_floor(trial_of(counts(lo, q_fill if fine else None, adds)), open_, budget.measure, dense)
            level = []
            for n in open_:
                if abs(frac_after(n) - f) > TOL:
                    continue
                if cur + floor.get(n, 0.0) > B:
                    closed.add(n)
                else:
                    level.append(n)
            while level:
                def with_first(p):
                    return {**adds, **{n: adds.get(n, 0) + step(n) for n in level[:p]}}
                if cost_of(lo, q_fill if fine else None, with_first(len(level))) <= B:
                    p = len(level)
                else:
                    a, b = 0, len(level)      # the prefix of length a fits, b does not
                    while b - a > 1:
                        mid = (a + b) // 2
                        if cost_of(lo, q_fill if fine else None, with_first(mid)) <= B:
                            a = mid
                        else:
                            b = mid
                    p = a
                    closed.add(level[p])
                adds = with_first(p)
                cur = cost_of(lo, q_fill if fine else None, adds)
                rest, level = level[p + 1:], []
                for n in rest:
                    (level.append if cur + floor.get(n, 0.0) <= B else closed.add)(n)
    # 3. fill: the fine channel groups' common fraction up to the budget (coarse counts fixed)
    if lo < 1.0 and fine and not (coarse and (capped or q_fill >= 1.0)):
        q_fill = _largest_fitting(q_fill, 1.0, lambda q: cost_of(lo, q, adds) <= B, 11)
    return lo, q_fill, adds, cost_of(lo, q_fill if fine else None, adds)


def _unit_cost_floor(trial: Denoiser, names: list[str], what: str, dense: dict) -> dict[str, float]:
    """A lower bound on the cost (fraction of dense) of one more unit of each group in `names`, read
    off a pruned trial model: the unit's weight slices times the outputs each weight element is
    multiplied into (MACs: the conv's output pixels / the linear's tokens; params: 1). Exact for the
    convs and linears whose other dimension is fixed; attention matmuls and the cross terms of a
    layer coupled to the group on both sides only add to it. Costs grow with the other groups'
    counts, so the bound stays valid after later additions."""
    per_elem: dict[int, float] = {}
    if what == "macs":
        hooks = []
        for m in trial.net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                # batch 1: a conv weight element is used once per output pixel, a linear's once per token
                hooks.append(m.register_forward_hook(lambda mod, _i, o: per_elem.__setitem__(
                    id(mod.weight), per_elem.get(id(mod.weight), 0.0) + o.numel() / o.shape[1 if isinstance(
                        mod, nn.Conv2d) else -1])))
        try:
            x, t, y = trial.example_inputs(1)
            with torch.no_grad():
                trial.net.eval()
                trial.net(x, t, y)
        finally:
            for h in hooks:
                h.remove()
    groups = trial.width_groups()
    out = {}
    for n in names:
        g = groups.get(n)
        if g is None:
            continue
        total = 0.0
        for p, dim, idx in g.members:
            elems = idx.shape[1] * p.numel() / max(1, p.shape[dim])
            if what == "params":
                total += elems
            elif id(p) in per_elem and p.ndim >= 2:   # a Conv2d/Linear weight
                total += elems * per_elem[id(p)]
        out[n] = total / dense[what]
    return out


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
