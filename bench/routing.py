"""Stage-wise routing: one copy of the dense block weights, a different subset of blocks per
timestep stage (the routed model of stage-wise plans; only bench.surgery installs it).

Source: Diff-ES (Liu, Tang, Wu, Yuan, Shen, "Stage-wise Structural Diffusion Pruning via
Evolutionary Search", arXiv 2603.05105, abstract: stage-conditioned weights are "activated
dynamically without duplicating model parameters"; methods.md 6a). A stage-wise Plan holds

    stages = [{"u_range": [lo, hi], "keep": {"blocks": [dense ids]}, "weight": w}, ...]

with u the suite's noise level (0 clean, 1 noise), ranges contiguous and covering [0, 1]. The
model keeps the *union* of the stages' blocks (that is what is stored and what `params` counts);
the forward maps t to u, u to its stage, and runs only that stage's blocks, selected by index from
the shared ModuleList (no weight is copied).

Choices (ours):
  * t -> u: DDPM u = (t + 1/2) / T, the exact inverse of ``t_from_u`` (floor(u T)); flow u = 1 - t.
    Stage k holds lo_k <= u < hi_k; u = 1 belongs to the last stage.
  * Batches with several stages (fine-tuning draws t per sample) are split into per-stage
    subgroups that share the embedding; stages with the same block list run as one group, so a
    plan with one keep set everywhere is bit-identical to the static pruned model. Sampling
    batches share t and run as one group.
  * The routing decision reads the stage on the host (one device sync per forward).
    ``StageRouter.pin(s)`` fixes the stage instead (no decision, traceable by torch.compile): the
    compiled latency path and MAC counting use it.
  * Costs: params = the stored model; MACs and blocks = the mean over stages weighted by each
    stage's share of the sampler's network evaluations (``weight``; defaults to the width of the
    u range), which is what budgets are checked against; latency likewise per stage.
  * Per-stage *width* keep sets (Diff-ES's second-order backend: q/k/v and fc1 rows selected from
    the shared weights, thin OBS-compensated attn.proj / mlp.fc2 stored per stage) are not routed
    here yet; methods.obs_diff has the layer routine (obs_prune_columns) they would use.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch

from bench.api import BenchError

EPS = 1e-9


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
# The router
# --------------------------------------------------------------------------------------------

class StageRouter:
    """Plain data plus the routed forward; deliberately not an nn.Module, so the backbone's state
    dict (official layout) is unchanged. ``positions[s]`` index the backbone's current ``blocks``."""

    def __init__(self, edges: list[float], positions: list[list[int]], dense_ids: list[list[int]],
                 weights: list[float], kind: str, T: int | None):
        self.edges = [float(e) for e in edges]
        self.positions = [list(map(int, p)) for p in positions]
        self.dense_ids = [list(map(int, d)) for d in dense_ids]
        self.weights = [float(w) for w in weights]
        self.kind, self.T = kind, T
        self.pinned: int | None = None
        self._inner: dict = {}  # device -> inner edges tensor (no host-to-device copy per forward)

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

    def forward(self, m, x, t, y, return_hidden: bool = False, force_drop_ids=None, generator=None):
        """DiT.forward with the blocks of each sample's stage (called by DiT.forward)."""
        h, c = m.embed(x, t, y, force_drop_ids, generator)
        if self.pinned is not None:
            groups = {tuple(self.positions[self.pinned]): None}
        else:
            st = self.stage_of(t)
            groups: dict[tuple, list[int]] = {}
            for s in torch.unique(st).tolist():  # the one host sync of a routed forward
                groups.setdefault(tuple(self.positions[s]), []).append(s)
        if len(groups) == 1:
            pos = next(iter(groups))
            hidden = [h]
            for p in pos:
                h = m.blocks[p](h, c)
                if return_hidden:
                    hidden.append(h)
        else:
            if return_hidden:
                raise BenchError("hidden states of a routed model need a batch from one stage (one t for all samples)")
            sels, outs = [], []
            for pos, ss in groups.items():
                sel = torch.nonzero(torch.isin(st, torch.tensor(ss, device=st.device))).flatten()
                hs, cs = h.index_select(0, sel), c.index_select(0, sel)
                for p in pos:
                    hs = m.blocks[p](hs, cs)
                sels.append(sel)
                outs.append(hs)
            order = torch.cat(sels)
            h = torch.cat(outs)[torch.argsort(order)]
        out = m.unpatchify(m.final_layer(h, c))
        return (out, hidden) if return_hidden else out


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
        other = sorted(set(keep) - {"blocks"})
        if other:
            raise BenchError(f"plan.stages[{k}] keeps width groups {other[:3]} per stage: per-stage width routing "
                             "(Diff-ES's second-order backend: heads/channels selected from the shared weights, "
                             "OBS-compensated thin projections per stage from methods.obs_diff) is not implemented "
                             "in bench.routing yet; use block keep sets per stage")
        ids = sorted(int(i) for i in keep["blocks"])
        if not ids or len(set(ids)) != len(ids):
            raise BenchError(f"plan.stages[{k}] keeps blocks {ids}: need a non-empty set of distinct dense indices")
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


def make_router(net, stages: list[dict]) -> StageRouter:
    """A router for the model's current blocks (positions from ``net.kept_blocks``)."""
    edges = stage_edges(stages)
    sets = _stage_sets(stages)
    present = list(net.kept_blocks)
    missing = sorted(set().union(*sets) - set(present))
    if missing:
        raise BenchError(f"plan.stages keep blocks {missing} that the model does not have (it has {present})")
    pos = [[present.index(i) for i in ids] for ids in sets]
    return StageRouter(edges, pos, sets, _weights(stages, edges), net.process.kind, getattr(net.process, "T", None))


def apply_stages(net, plan) -> Any:
    """Surgery for a stage-wise plan: keep the union of the stages' blocks (plus any static width
    groups of plan.keep), then install the router. Called by bench.surgery.apply."""
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
    static = Plan(plan.granularity, {**plan.keep, "blocks": union}, plan.scores, [], plan.meta)
    surgery.apply(net, static)
    net.net.stage_router = make_router(net, plan.stages)
    return net


@contextlib.contextmanager
def routed(net, stages: list[dict]):
    """Route the model's current blocks by `stages` for the duration (no surgery, no copy):
    searches evaluate many stage-wise candidates on the one dense model this way."""
    _check_backbone(net)
    if is_routed(net):
        raise BenchError("the model is routed already")
    net.net.stage_router = make_router(net, stages)
    try:
        yield net
    finally:
        net.net.stage_router = None


# --------------------------------------------------------------------------------------------
# Costs
# --------------------------------------------------------------------------------------------

def measure(net) -> dict:
    """Params stored, and per stage MACs (batch 1) and blocks; 'macs' and 'blocks' are the
    stage-weighted means (what budgets check), 'params' is what the routed model stores."""
    from bench.metrics.cost import count_macs, count_params

    r = router(net)
    x, _, y = net.example_inputs(1)
    was = net.net.training
    net.net.eval()
    macs = []
    try:
        for s in range(r.num_stages):
            t = t_in_stage(net.process, r.edges, s, 1, x.device)
            with r.pin(s):
                macs.append(count_macs(net.net, x, t, y))
    finally:
        net.net.train(was)
    blocks = [len(p) for p in r.positions]
    w = r.weights
    return {"params": count_params(net.net), "macs": sum(a * b for a, b in zip(w, macs)),
            "blocks": sum(a * b for a, b in zip(w, blocks)), "stage_macs": macs, "stage_blocks": blocks,
            "stage_weights": list(w), "stored_blocks": len(net.net.blocks)}


def stage_latency(net, batch: int, device, mode: str = "eager", dtype: str = "fp32", warmup: int = 5,
                  reps: int = 20, allow_few: bool = False) -> dict:
    """Forward latency of each stage (every sample's t in that stage), through the suite's
    harness. Eager runs the routed forward as sampling does (routing decision included);
    compile pins the stage so each stage is one static graph. Returns the per-stage records and
    the trajectory-weighted mean median (weights = the stages' shares of the sampler's NFEs)."""
    from bench.metrics.cost import benchmark_forward, random_inputs

    r = router(net)
    recs = []
    for s in range(r.num_stages):
        x, _, y = random_inputs(net, batch, device)
        t = t_in_stage(net.process, r.edges, s, batch, device)
        with r.pin(s if mode == "compile" else None):
            recs.append(benchmark_forward(net.net, (x, t, y), device, mode, dtype, warmup=warmup, reps=reps,
                                          allow_few=allow_few))
    w = r.weights
    mean = sum(a * rec["median_ms"] for a, rec in zip(w, recs))
    return {"records": recs, "weights": list(w), "median_ms": mean,
            "iqr_ms": sum(a * rec["iqr_ms"] for a, rec in zip(w, recs)),
            "throughput_img_s": batch / mean * 1e3,
            "peak_mem_MB": max((rec["peak_mem_MB"] for rec in recs if rec["peak_mem_MB"] is not None), default=None),
            "mode": mode}
