"""What EntPruner can bypass one at a time: transformer blocks (DiT/SiT) or, on the U-Net, the
operators whose skip structure allows it (the paper's first open question; card R14).

A *label* names a unit by its dense id, so plans and decision logs replay on a fresh dense model:
an int (the dense block index) for transformers, ``"group:id"`` (``"resnets:2"``,
``"attentions:0"``) for U-Net operators (bench.models.unet: ``resnets`` = ResNet blocks whose input
and output shapes agree, ``attentions`` = residual attention blocks; bypassing one leaves every
shape valid, and the skip connections of the U-Net's up path still carry the down path's
features).
"""
from __future__ import annotations

import contextlib
import copy

from bench import surgery
from bench.api import BenchError, Budget, Plan

BLOCKS, OPERATORS = "blocks", "operators"


def kind_of(net) -> str:
    if net.depth > 0:
        return BLOCKS
    if net.operator_ids():
        return OPERATORS  # the U-Net (also once every operator is gone: labels() is then empty)
    raise BenchError(f"EntPruner needs units it can bypass one at a time: transformer blocks (DiT/SiT) or "
                     f"U-Net ResNet blocks / attentions; {net.name} has units {sorted(net.units('block'))}")


def labels(net) -> list:
    """The present units' labels, in model order (dense block ids, or "group:id" in data-flow order
    within each operator group)."""
    if kind_of(net) == BLOCKS:
        return list(net.kept_blocks)
    return [f"{g}:{i}" for g, ids in sorted(net.operator_ids().items()) for i in ids]


def _split(label: str) -> tuple[str, int]:
    g, _, i = str(label).partition(":")
    return g, int(i)


@contextlib.contextmanager
def ablate(net, positions):
    """Bypass the units at these positions of ``labels(net)`` (the residual stream / the skip passes
    the input through unchanged)."""
    positions = list(positions)
    if kind_of(net) == BLOCKS:
        with net.ablate("blocks", positions):
            yield
        return
    labs = labels(net)
    groups: dict[str, list[int]] = {}
    for p in positions:
        g, i = _split(labs[p])
        groups.setdefault(g, []).append(i)
    with contextlib.ExitStack() as stack:
        for g, ids in groups.items():
            stack.enter_context(net.ablate(g, ids))
        yield


def plan_for(kind: str, kept: list, start: list, meta: dict | None = None) -> Plan:
    """The plan that keeps exactly the labelled units (``start``: every label of the dense model)."""
    if kind == BLOCKS:
        return Plan(granularity="block", keep={"blocks": [int(b) for b in kept]}, meta=dict(meta or {}))
    keep: dict[str, list[int]] = {f"ops.{_split(s)[0]}": [] for s in start}
    for s in kept:
        g, i = _split(s)
        keep[f"ops.{g}"].append(i)
    return Plan(granularity="operator", keep={k: sorted(v) for k, v in sorted(keep.items())}, meta=dict(meta or {}))


def frac_without(net, removed: list, start: list, budget: Budget, dense: float) -> float:
    """Measured cost (budget measure, fraction of the dense model) with the labelled units removed."""
    kept = [s for s in labels(net) if s not in set(removed)]
    trial = surgery.apply(copy.deepcopy(net), plan_for(kind_of(net), kept, start))
    return surgery.measure(trial)[budget.measure] / dense


def needed(net, order: list, budget: Budget, start: list, dense: float, target: int | None) -> int:
    """Fewest units, taken in ``order`` (labels, least important first), whose removal meets the
    budget. Blocks are identical, so that is just depth - target; operators differ in cost, so it
    is measured (surgery on a copy), one more unit at a time."""
    if kind_of(net) == BLOCKS:
        return max(0, len(net.kept_blocks) - int(target))
    if budget.measure == "blocks":
        raise BenchError("the U-Net has no transformer blocks; give EntPruner's budget in MACs or params")
    for k in range(len(order) + 1):
        if frac_without(net, order[:k], start, budget, dense) <= budget.keep + 1e-9:
            return k
    raise BenchError(f"entpruner cannot reach {budget.measure} keep={budget.keep} by bypassing U-Net operators "
                     f"(removing all {len(order)} leaves {frac_without(net, order, start, budget, dense):.3f}); "
                     "raise budget.keep")


def largest_share(net, budget: Budget, dense: float) -> float:
    """The largest cost share of one unit (how far below the budget one removal may land)."""
    start = labels(net)
    return max(1.0 - frac_without(net, [s], start, budget, dense) for s in start)
