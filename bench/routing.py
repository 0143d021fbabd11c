"""Stage-wise routing: one copy of the dense weights, a different subset of blocks and (for
Diff-ES's second-order backend) of attention heads and MLP channels per timestep stage (the
routed model of stage-wise plans; only bench.surgery installs it).

Source: Diff-ES (Liu, Tang, Wu, Yuan, Shen, "Stage-wise Structural Diffusion Pruning via
Evolutionary Search", arXiv 2603.05105, abstract: stage-conditioned weights are "activated
dynamically without duplicating model parameters"; code `dit/models.py::_forward_block_struct` as
summarised in methods.md 6a). A stage-wise Plan holds

    stages = [{"u_range": [lo, hi], "weight": w,
               "keep": {"blocks": [dense ids],                            # depth (layer drop)
                        "blocks.<b>.attn.heads": [dense head ids], ...    # width (optional)
                        "blocks.<b>.mlp.hidden": [dense channel ids], ...}}, ...]

with u the suite's noise level (0 clean, 1 noise), ranges contiguous and covering [0, 1]. The
model stores the *union* over stages of the blocks and, per width group, of the kept units (that
is what `params` counts); the forward maps t to u, u to its stage, and runs only that stage's
blocks, selected by index from the shared ModuleList (no weight is copied).

Width routing (Diff-ES `--prune-method secondorder`): in a stage that keeps a subset K of a
block's stored heads, the q/k/v rows of K are ``index_select``-ed from the shared ``attn.qkv``
(likewise the fc1 rows of kept channels from the shared ``mlp.fc1``), and the output projection
is the stage's *own thin, OBS-compensated* ``attn.proj`` / ``mlp.fc2`` weight [out, |K| x width]
from the stage bank (bench.stage_bank: its entries, file and module); the biases stay shared (OBS
changes weights only).

``pack_bank`` decides what is stored: the stored projection of a group holds the model's own
columns or the weights of a stage that keeps exactly the union, whichever leaves the fewest bank
parameters (so a plan with one keep set and one set of weights in every stage is exactly the
static width-pruned, compensated model, with no stage entry), and a stage gets an entry only where
its weights differ from the stored columns it would select (an uncompensated stage selects
columns of the stored projection).

Choices (ours):
  * t -> u: DDPM u = (t + 1/2) / T, the exact inverse of ``t_from_u`` (floor(u T)); flow u = 1 - t.
    Stage k holds lo_k <= u < hi_k; u = 1 belongs to the last stage.
  * Batches with several stages (fine-tuning draws t per sample) are split into per-stage
    subgroups that share the embedding; stages with the same route (blocks and width specs) run
    as one group, so a plan with one keep set everywhere is bit-identical to the static pruned
    model. Sampling batches share t and run as one group.
  * Every block runs its own forward (DiTBlock); where its stage keeps a subset of the stored
    units or has its own weights, a thin attention / MLP stands in for the branch: the selected
    rows, the block's own attention math (``Attention.attend``) and activation, the thin
    projection (the same operations, so equal weights give equal outputs).
  * The routing decision reads the stage on the host (one device sync per forward).
    ``StageRouter.pin(s)`` fixes the stage instead (no decision, traceable by torch.compile): the
    compiled latency path and MAC counting use it.
  * Costs are measured stage by stage (bench.metrics.cost: ``routed_cost``, ``stage_latency``).
"""
from __future__ import annotations

import contextlib
from functools import partial
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.api import BenchError
from bench.stage_bank import StageBank, bank_key, load_bank

WIDTH_KINDS = ("attn.heads", "mlp.hidden")  # plan keys blocks.<b>.<kind>; consumers attn.proj / mlp.fc2


# --------------------------------------------------------------------------------------------
# Time conventions
# --------------------------------------------------------------------------------------------

def u_from_t(process, t: torch.Tensor) -> torch.Tensor:
    """Native timestep -> shared noise level u in [0, 1] (0 clean, 1 noise)."""
    if hasattr(process, "u_from_t"):
        return process.u_from_t(t)
    return _u_from_t(process.kind, getattr(process, "T", None), t)


def _u_from_t(kind: str, T: int | None, t: torch.Tensor) -> torch.Tensor:
    if kind == "ddpm":
        return (t.double() + 0.5) / T  # exact inverse of t_from_u = floor(u T): t_from_u(u_from_t(t)) == t
    if kind == "flow":  # in t's own precision, like t_from_u (1 - u): edges then map back exactly
        return 1.0 - (t if t.is_floating_point() else t.double())
    raise BenchError(f"stage routing does not know the time convention of process kind {kind!r}")


def stage_edges(stages: list[dict]) -> list[float]:
    """[0, e_1, ..., 1] from a plan's stages; checks the ranges are sorted, contiguous and cover [0, 1]."""
    if not isinstance(stages, list) or not stages:
        raise BenchError("plan.stages must be a non-empty list of {'u_range': [lo, hi], 'keep': {...}}")
    edges = [0.0]
    for k, s in enumerate(stages):
        try:
            lo, hi = (float(v) for v in s["u_range"])
        except (KeyError, TypeError, ValueError):
            raise BenchError(f"plan.stages[{k}] needs 'u_range': [lo, hi]") from None
        if abs(lo - edges[-1]) > 1e-6 or not hi > lo:
            raise BenchError(f"plan.stages u_ranges must be sorted, contiguous and cover [0, 1]; stage {k} is "
                             f"[{lo}, {hi}] after an edge at {edges[-1]}")
        edges.append(hi)
    if abs(edges[-1] - 1.0) > 1e-6:
        raise BenchError(f"plan.stages must end at u = 1, not {edges[-1]}")
    edges[-1] = 1.0
    return edges


def stage_index(process, edges: list[float], t: torch.Tensor) -> torch.Tensor:
    """Stage of each native timestep (LongTensor like t)."""
    u = u_from_t(process, t)
    inner = torch.tensor(edges[1:-1], dtype=u.dtype, device=u.device)
    return torch.bucketize(u, inner, right=True)  # edge_k <= u < edge_{k+1} -> k


def t_in_stage(process, edges: list[float], s: int, n: int = 1, device=None) -> torch.Tensor:
    """n copies of a native timestep in the middle of stage s (for measuring one stage)."""
    u = torch.full((n,), (edges[s] + edges[s + 1]) / 2, device=device)
    t = process.t_from_u(u)
    got = stage_index(process, edges, t)
    if not bool((got == s).all()):
        raise BenchError(f"stage {s} ({edges[s]:.4f} <= u < {edges[s + 1]:.4f}) holds no timestep of this process; "
                         "use wider stages")
    return t


@torch.no_grad()
def nfe_weights(process, edges: list[float], sampler: str, steps: int, skip: str = "uniform") -> list[float]:
    """Share of a sampler's network evaluations that fall in each stage, found by running the
    sampler once with a recording stand-in model (exact for any sampler and step selection)."""
    if process.nfe(sampler, steps, skip) is None:
        raise BenchError(f"stage weights need a sampler with a fixed time grid; {sampler!r} is adaptive (its steps "
                         "depend on the model): use euler, heun, sde or sde_heun")
    ts = []

    def record(x, t):
        ts.append(t[:1].clone())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])  # room for learned-variance channels

    x = torch.zeros(1, 1, 1, 1)
    process.sample(record, x, lambda a: torch.zeros_like(a), sampler=sampler, steps=steps, skip=skip)
    st = stage_index(process, edges, torch.cat(ts))
    counts = torch.bincount(st, minlength=len(edges) - 1).double()
    return (counts / counts.sum()).tolist()


# --------------------------------------------------------------------------------------------
# Width groups: names, units, consumer layers
# --------------------------------------------------------------------------------------------

def _split_group(name: str) -> tuple[int, str]:
    parts = name.split(".")
    if len(parts) != 4 or parts[0] != "blocks" or f"{parts[2]}.{parts[3]}" not in WIDTH_KINDS:
        raise BenchError(f"plan.stages keep an unknown unit group {name!r}; stage keep sets name 'blocks' and "
                         "width groups blocks.<b>.attn.heads / blocks.<b>.mlp.hidden")
    try:
        return int(parts[1]), f"{parts[2]}.{parts[3]}"
    except ValueError:
        raise BenchError(f"plan.stages keep {name!r}: the block index must be an integer") from None


def _module(block, kind: str):
    mod = getattr(block, "attn" if kind == "attn.heads" else "mlp", None)
    if mod is None:
        raise BenchError(f"width routing of {kind}: that branch was removed by an operator plan")
    return mod


def _stored_units(mod, kind: str) -> list[int]:
    """Dense ids of the units the stored layer has (bench.width keeps them in ``kept_units``)."""
    n = mod.num_heads if kind == "attn.heads" else mod.fc1.out_features
    return list(getattr(mod, "kept_units", range(n)))


def _consumer(mod, kind: str) -> nn.Linear:
    return mod.proj if kind == "attn.heads" else mod.fc2


def _unit_width(mod, kind: str) -> int:
    return mod.head_dim if kind == "attn.heads" else 1


def _cols(units, width: int) -> list[int]:
    """Input columns of the consumer (and, for width 1, rows of the producer) of these unit positions."""
    return [u * width + j for u in units for j in range(width)]


def consumer_columns(net, group: str, keep_dense: list[int]) -> torch.Tensor:
    """The current consumer weight's columns of the given dense units of `group` ([out, |keep| x width])."""
    b, kind = _split_group(group)
    mod = _module(net.net.blocks[list(net.kept_blocks).index(b)], kind)
    stored = _stored_units(mod, kind)
    where = {d: i for i, d in enumerate(stored)}  # not list.index per unit (quadratic in the group size)
    pos = [where[int(d)] for d in sorted(keep_dense)]
    W = _consumer(mod, kind).weight
    return W[:, torch.tensor(_cols(pos, _unit_width(mod, kind)), dtype=torch.long, device=W.device)]


# --------------------------------------------------------------------------------------------
# What a width-routed model stores
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def pack_bank(net, stages: list[dict], thin: dict[tuple[int, str], torch.Tensor]) -> tuple[dict, dict]:
    """What a width-routed model stores, from each stage's keep sets and its thin compensated
    projections ``thin[(s, group)]`` ([out, kept units x width]; absent = the model's own columns,
    uncompensated), on the model the plan will be applied to (the dense one).
    Returns (union keep per width group, bank tensors) (the rules: module docstring)."""
    sets = [s["keep"] for s in stages]
    tensors: dict[str, torch.Tensor] = {}
    union: dict[str, list[int]] = {}
    groups = sorted({g for k in sets for g in k if g != "blocks"}, key=lambda g: (_split_group(g)[0], g))
    for g in groups:
        b, kind = _split_group(g)
        mod = _module(net.net.blocks[list(net.kept_blocks).index(b)], kind)
        present = _stored_units(mod, kind)
        per = [sorted(int(i) for i in k.get(g, present)) for k in sets]
        u = sorted(set().union(*per))
        union[g] = u
        raw = consumer_columns(net, g, u).detach().cpu()
        width = _unit_width(mod, kind)
        at = {d: i for i, d in enumerate(u)}
        cols = [torch.tensor(_cols([at[i] for i in ids], width), dtype=torch.long) for ids in per]
        want = [raw[:, c] if thin.get((s, g)) is None else thin[(s, g)].detach().cpu().to(raw.dtype).contiguous()
                for s, c in enumerate(cols)]
        for s, (w, c) in enumerate(zip(want, cols)):
            if w.shape != (raw.shape[0], len(c)):
                raise BenchError(f"stage {s} weights for {g} have shape {tuple(w.shape)}, its keep set needs "
                                 f"{(raw.shape[0], len(c))}")

        def entries(stored):  # the stages whose weights are not the stored columns they would select
            return [s for s, (w, c) in enumerate(zip(want, cols)) if not torch.equal(w, stored[:, c])]

        # the stored projection: the model's own columns or a union-keeping stage's weights, whichever
        # leaves the fewest bank parameters (ties: own columns, then the earliest stage)
        cands = [raw] + [want[s] for s, ids in enumerate(per) if ids == u]
        stored = min(cands, key=lambda c: sum(want[s].numel() for s in entries(c)))
        if not torch.equal(stored, raw):
            tensors[bank_key("shared", g)] = stored
        for s in entries(stored):
            tensors[bank_key(s, g)] = want[s]
    return union, tensors


# --------------------------------------------------------------------------------------------
# The router
# --------------------------------------------------------------------------------------------

class Thin(NamedTuple):
    """A stage's width route through one attention or MLP: ``units`` = positions of the kept
    units in the stored layer (ascending), ``weight`` = bank key of its own output projection
    (None: the stored projection's columns of those units)."""
    units: tuple[int, ...]
    weight: str | None


class StageRouter:
    """Plain data plus the routed forward; deliberately not an nn.Module, so the backbone's state
    dict (official layout) is unchanged. ``positions[s]`` index the backbone's current ``blocks``;
    ``routes[s]`` = ((position, attention Thin or None, MLP Thin or None), ...)."""

    def __init__(self, edges: list[float], positions: list[list[int]], dense_ids: list[list[int]],
                 weights: list[float], kind: str, T: int | None, widths: list[dict] | None = None):
        self.edges = [float(e) for e in edges]
        self.positions = [list(map(int, p)) for p in positions]
        self.dense_ids = [list(map(int, d)) for d in dense_ids]
        self.weights = [float(w) for w in weights]
        self.kind, self.T = kind, T
        widths = widths or [{} for _ in self.positions]  # per stage: position -> (attn Thin | None, mlp Thin | None)
        self.routes = [tuple((p, *widths[s].get(p, (None, None))) for p in pos) for s, pos in enumerate(self.positions)]
        self.pinned: int | None = None
        self._inner: dict = {}  # device -> inner edges tensor (no host-to-device copy per forward)
        self._index: dict = {}  # (kind, units, stored count, width, device) -> LongTensor of rows / columns

    @property
    def num_stages(self) -> int:
        return len(self.positions)

    def stage_of(self, t: torch.Tensor) -> torch.Tensor:
        u = _u_from_t(self.kind, self.T, t)
        inner = self._inner.get((u.device, u.dtype))
        if inner is None:
            inner = self._inner[(u.device, u.dtype)] = torch.tensor(self.edges[1:-1], dtype=u.dtype, device=u.device)
        return torch.bucketize(u, inner, right=True)

    @contextlib.contextmanager
    def pin(self, s: int | None):
        """Run stage s's blocks whatever t is (no routing decision; torch.compile-friendly)."""
        old, self.pinned = self.pinned, s
        try:
            yield self
        finally:
            self.pinned = old

    def run(self, m, h, c, t, hidden: list | None = None) -> torch.Tensor:
        """The blocks (and widths) of each sample's stage on the tokens h with conditioning c: what
        DiT.forward runs between its embedding and its final layer. Appends every block's output
        to `hidden` when given."""
        if self.pinned is not None:
            groups = {self.routes[self.pinned]: None}
        else:
            st = self.stage_of(t)
            groups: dict[tuple, list[int]] = {}
            for s in torch.unique(st).tolist():  # the one host sync of a routed forward
                groups.setdefault(self.routes[s], []).append(s)
        if len(groups) == 1:
            return self._run(m, h, c, next(iter(groups)), hidden)
        if hidden is not None:
            raise BenchError("hidden states of a routed model need a batch from one stage (one t for all samples)")
        sels, outs = [], []
        for route, ss in groups.items():
            sel = torch.nonzero(torch.isin(st, torch.tensor(ss, device=st.device))).flatten()
            sels.append(sel)
            outs.append(self._run(m, h.index_select(0, sel), c.index_select(0, sel), route))
        return torch.cat(outs)[torch.argsort(torch.cat(sels))]

    # ---- one stage's blocks ------------------------------------------------------------------
    def _run(self, m, h, c, route, hidden=None):
        for p, a, f in route:
            block = m.blocks[p]
            # the block's own forward (DiTBlock: adaLN-Zero, gates, residuals) with the stage's thin
            # attention / MLP standing in for a branch that keeps a subset of the stored units
            h = block(h, c, attn=None if a is None else partial(self._thin_attn, m, block.attn, a=a),
                      mlp=None if f is None else partial(self._thin_mlp, m, block.mlp, f=f))
            if hidden is not None:
                hidden.append(h)
        return h

    def _idx(self, kind: str, units: tuple, n: int, width: int, device) -> torch.Tensor:
        key = (kind, units, n, width, device)
        idx = self._index.get(key)
        if idx is None:
            if kind == "qkv":  # q rows of the kept heads, then their k rows, then their v rows (Attention's layout)
                rows = [o * n * width + r for o in range(3) for r in _cols(units, width)]
            else:
                rows = _cols(units, width)
            idx = self._index[key] = torch.tensor(rows, dtype=torch.long, device=device)
        return idx

    def _weight(self, m, layer: nn.Linear, thin: Thin, n: int, width: int) -> torch.Tensor:
        if thin.weight is not None:
            return m.stage_bank.get(thin.weight)
        return layer.weight.index_select(1, self._idx("cols", thin.units, n, width, layer.weight.device))

    def _thin_attn(self, m, attn, x, a: Thin):
        """Attention.forward with the kept heads' q/k/v rows of the shared qkv and the thin proj."""
        H, hd = attn.num_heads, attn.head_dim
        rows = self._idx("qkv", a.units, H, hd, x.device)
        b = attn.qkv.bias.index_select(0, rows) if attn.qkv.bias is not None else None
        o = attn.attend(F.linear(x, attn.qkv.weight.index_select(0, rows), b), len(a.units))
        return F.linear(o, self._weight(m, attn.proj, a, H, hd), attn.proj.bias)

    def _thin_mlp(self, m, mlp, x, f: Thin):
        """Mlp.forward with the kept channels' fc1 rows of the shared fc1 and the thin fc2."""
        n = mlp.fc1.out_features
        rows = self._idx("cols", f.units, n, 1, x.device)
        b = mlp.fc1.bias.index_select(0, rows) if mlp.fc1.bias is not None else None
        hid = mlp.act(F.linear(x, mlp.fc1.weight.index_select(0, rows), b))
        return F.linear(hid, self._weight(m, mlp.fc2, f, n, 1), mlp.fc2.bias)


def router(net):
    """The StageRouter of a Denoiser's backbone, or None for a static model."""
    return getattr(net.net, "stage_router", None)


def is_routed(net) -> bool:
    return router(net) is not None


def _check_backbone(net):
    from bench.models.dit import DiT
    if not isinstance(net.net, DiT):
        raise BenchError(f"stage-wise plans route DiT/SiT blocks; {net.name} ({type(net.net).__name__}) has no "
                         "stage routing yet")


def _stage_sets(stages: list[dict]) -> list[list[int]]:
    sets = []
    for k, s in enumerate(stages):
        keep = s.get("keep")
        if not isinstance(keep, dict) or "blocks" not in keep:
            raise BenchError(f"plan.stages[{k}] needs 'keep': {{'blocks': [...]}}")
        ids = sorted(int(i) for i in keep["blocks"])
        if not ids or len(set(ids)) != len(ids):
            raise BenchError(f"plan.stages[{k}] keeps blocks {ids}: need a non-empty set of distinct dense indices")
        for g, units in keep.items():
            if g == "blocks":
                continue
            b, _ = _split_group(g)
            if b not in ids:
                raise BenchError(f"plan.stages[{k}] keeps width group {g} of block {b}, which that stage drops")
            u = [int(i) for i in units]
            if not u or len(set(u)) != len(u):
                raise BenchError(f"plan.stages[{k}] keeps {g} = {u[:8]}: need a non-empty set of distinct dense ids")
        sets.append(ids)
    return sets


def _weights(stages: list[dict], edges: list[float]) -> list[float]:
    if all("weight" in s for s in stages):
        w = [float(s["weight"]) for s in stages]
        if min(w) < 0 or sum(w) <= 0:
            raise BenchError(f"plan.stages weights {w} must be >= 0 and not all 0")
    else:  # no sampler given: the width of each u range
        w = [b - a for a, b in zip(edges[:-1], edges[1:])]
    total = sum(w)
    return [x / total for x in w]


def make_router(net, stages: list[dict], bank: dict[str, torch.Tensor] | None = None) -> StageRouter:
    """A router for the model's current blocks (positions from ``net.kept_blocks``) and, for width
    keep sets, its stored units; `bank` holds the stage entries (``stage<s>/<group>`` -> thin weight)."""
    edges = stage_edges(stages)
    sets = _stage_sets(stages)
    present = list(net.kept_blocks)
    missing = sorted(set().union(*sets) - set(present))
    if missing:
        raise BenchError(f"plan.stages keep blocks {missing} that the model does not have (it has {present})")
    pos = [[present.index(i) for i in ids] for ids in sets]
    bank = bank or {}
    widths = []
    for s, st in enumerate(stages):
        w: dict[int, list] = {}
        for g, units in st["keep"].items():
            if g == "blocks":
                continue
            b, kind = _split_group(g)
            p = present.index(b)
            mod = _module(net.net.blocks[p], kind)
            stored = _stored_units(mod, kind)
            ids = sorted(int(i) for i in units)
            if not set(ids) <= set(stored):
                raise BenchError(f"plan.stages[{s}] keeps {g} units {sorted(set(ids) - set(stored))[:8]} that the "
                                 f"model does not store (it has {stored[:8]}...)")
            key = bank_key(s, g)
            at = {d: i for i, d in enumerate(stored)}
            thin = Thin(tuple(at[i] for i in ids), key if key in bank else None)
            if key in bank:
                want = (_consumer(mod, kind).out_features, len(ids) * _unit_width(mod, kind))
                if tuple(bank[key].shape) != want:
                    raise BenchError(f"stage bank entry {key} has shape {tuple(bank[key].shape)}, the stage's keep set "
                                     f"needs {want}")
            if thin.weight is None and len(ids) == len(stored):
                thin = None  # all stored units with the stored weights: the block's own forward
            w.setdefault(p, [None, None])[WIDTH_KINDS.index(kind)] = thin
        widths.append({p: tuple(v) for p, v in w.items()})
    named = {bank_key(s, g) for s, st in enumerate(stages) for g in st["keep"] if g != "blocks"}
    stray = sorted(set(bank) - named)
    if stray:
        raise BenchError(f"stage bank entries {stray[:3]} name no (stage, width group) of the plan")
    return StageRouter(edges, pos, sets, _weights(stages, edges), net.process.kind, getattr(net.process, "T", None),
                       widths)


def _width_union(net, stages: list[dict]) -> dict[str, list[int]]:
    """Per width group named by any stage: the union of the stages' kept units (a stage that does
    not name a group keeps all the model's units of it)."""
    groups = sorted({g for s in stages for g in s["keep"] if g != "blocks"})
    out = {}
    for g in groups:
        b, kind = _split_group(g)
        if b not in net.kept_blocks:
            raise BenchError(f"plan.stages keep width group {g} of block {b}, which the model does not have")
        stored = _stored_units(_module(net.net.blocks[list(net.kept_blocks).index(b)], kind), kind)
        out[g] = sorted(set().union(*(set(int(i) for i in s["keep"].get(g, stored)) for s in stages)))
        if not set(out[g]) <= set(stored):
            raise BenchError(f"plan.stages keep {g} units {sorted(set(out[g]) - set(stored))[:8]} that the model does "
                             f"not store (it has {stored[:8]}...)")
    return out


def apply_stages(net, plan) -> Any:
    """Surgery for a stage-wise plan: keep the union of the stages' blocks and width units (plus
    any static width groups of plan.keep), write the bank's shared projections into the stored
    layers, register its stage entries (``net.net.stage_bank``), then install the router. Called
    by bench.surgery.apply."""
    from bench import surgery
    from bench.api import Plan

    _check_backbone(net)
    if is_routed(net):
        raise BenchError("this model is routed already; apply a stage-wise plan to the dense (or statically "
                         "pruned) model")
    sets = _stage_sets(plan.stages)
    stage_edges(plan.stages)
    union = sorted(set().union(*sets))
    if "blocks" in plan.keep and sorted(int(i) for i in plan.keep["blocks"]) != union:
        raise BenchError(f"plan.keep['blocks'] {sorted(plan.keep['blocks'])} must be the union of the stages' "
                         f"blocks {union} (what the routed model stores)")
    width = _width_union(net, plan.stages)
    for g, u in width.items():
        if g in plan.keep and sorted(int(i) for i in plan.keep[g]) != u:
            raise BenchError(f"plan.keep[{g!r}] must be the union of the stages' kept units {u[:8]}... (what the "
                             "routed model stores)")
    bank = load_bank(plan.meta["bank"]) if plan.meta.get("bank") else {}
    static = Plan(plan.granularity, {**plan.keep, **width, "blocks": union}, plan.scores, [], plan.meta)
    surgery.apply(net, static)
    stage_entries = {}
    with torch.no_grad():
        for key, w in bank.items():
            where, g = key.split("/", 1)
            if where != "shared":
                stage_entries[key] = w
                continue
            b, kind = _split_group(g)
            layer = _consumer(_module(net.net.blocks[net.kept_blocks.index(b)], kind), kind)
            if tuple(w.shape) != tuple(layer.weight.shape):
                raise BenchError(f"stage bank entry {key} has shape {tuple(w.shape)}, the stored layer "
                                 f"{tuple(layer.weight.shape)}")
            layer.weight.copy_(w)
    dev = next(net.net.parameters()).device
    r = make_router(net, plan.stages, stage_entries)
    if stage_entries:
        net.net.stage_bank = StageBank({k: v.to(dev) for k, v in stage_entries.items()})
    net.net.stage_router = r
    return net


@contextlib.contextmanager
def routed(net, stages: list[dict], bank: dict[str, torch.Tensor] | None = None):
    """Route the model's current blocks and widths by `stages` for the duration (no surgery, no
    copy of shared weights): searches evaluate many stage-wise candidates on the one dense model
    this way. `bank`: stage entries ``stage<s>/<group>`` -> thin projection (used as given)."""
    _check_backbone(net)
    if is_routed(net):
        raise BenchError("the model is routed already")
    if "stage_bank" in net.net._modules:
        raise BenchError("the model holds a stage bank already")
    bank = bank or {}
    r = make_router(net, stages, bank)
    if bank:
        net.net.stage_bank = StageBank(bank, trainable=False)
    net.net.stage_router = r
    try:
        yield net
    finally:
        net.net.stage_router = None
        if bank:
            del net.net.stage_bank
