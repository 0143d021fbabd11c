"""Diff-ES backends: what a sparsity level means in one stage, what it costs, and how a stage-wise
candidate is routed on the dense model for its fitness.

    prepare(net, calib, edges)     per-stage calibration (orders of removal, compensated weights)
    max_level, cost(measure)       cost[level] as a fraction of the dense model in the budget's measure
    stage_keep(s, level)           the stage's keep set (Plan data, dense indices)
    routed(net, levels)            context: the model routed by these levels (fitness evaluation)

LayerDrop (Diff-ES `--prune-method layerdrop`, methods.md 6b): level L of stage s removes the L
least important blocks of that stage, ranked by a block scorer on the calibration probes whose
noise level lies in the stage (Diff-ES: 1 - cos(flatten(out), flatten(in)) per sample, ascending =
drop order; any scorer of methods.blockscores). `protect_ends` blocks at each end never go.

SecondOrder (Diff-ES `--prune-method secondorder`: per stage, OBS-structured removal of heads
and MLP channels with compensated thin output projections stored per stage, q/k/v/fc1 rows
selected from the shared dense weights) is the interface's second backend. methods.obs_diff now
has the layer routine (obs_prune_columns), but bench.routing has no per-stage width routing and
the run has no way yet to store per-stage compensated weight banks with the routed model, so it
stops with a BenchError naming what is missing.
"""
from __future__ import annotations

from bench import routing, surgery
from bench.api import BenchError
from methods.blockscores import block_scores, subset


class Backend:
    name = ""
    max_level: int

    def prepare(self, net, calib, edges: list[float]) -> None:
        raise NotImplementedError

    def cost(self, measure: str) -> list[float]:
        raise NotImplementedError

    def stage_keep(self, s: int, level: int) -> dict[str, list[int]]:
        raise NotImplementedError

    def stages(self, levels, edges: list[float], weights: list[float]) -> list[dict]:
        return [{"u_range": [edges[s], edges[s + 1]], "keep": self.stage_keep(s, int(L)), "weight": weights[s],
                 "level": int(L)} for s, L in enumerate(levels)]

    def routed(self, net, levels, edges, weights):
        return routing.routed(net, self.stages(levels, edges, weights))

    def meta(self) -> dict:
        return {}


class LayerDrop(Backend):
    name = "layerdrop"

    def __init__(self, scorer: str = "cosine", scorer_kwargs: dict | None = None, protect_ends: int = 0,
                 batch_size: int = 64):
        self.scorer, self.scorer_kwargs = scorer, dict(scorer_kwargs or {})
        self.protect_ends, self.batch_size = int(protect_ends), int(batch_size)

    def prepare(self, net, calib, edges):
        self.present = list(net.kept_blocks)
        depth = len(self.present)
        p = self.protect_ends
        if depth - 2 * p < 1:
            raise BenchError(f"diffes protect_ends={p} protects every block of a {depth}-block model")
        st = routing.stage_index(net.process, edges, net.process.t_from_u(calib.u))
        self.scores, self.orders, self.probes = [], [], []
        for s in range(len(edges) - 1):
            sub = subset(calib, (st == s).cpu())
            sc = block_scores(net, sub, self.scorer, batch_size=self.batch_size, **self.scorer_kwargs)
            self.scores.append(sc)
            self.probes.append(len(sub))
            # drop order: lowest score first, ties toward the later block (keep_top keeps the earlier)
            keep_order = sorted(range(depth), key=lambda i: (-sc[i], i))
            order = [i for i in reversed(keep_order) if p <= i < depth - p]
            self.orders.append(order)
        self.max_level = min(depth - 1, depth - 2 * p)
        self.fixed, self.per = surgery.block_costs(net)
        self.depth = depth

    def cost(self, measure: str) -> list[float]:
        dense = self.fixed[measure] + self.depth * self.per[measure]
        return [(self.fixed[measure] + (self.depth - L) * self.per[measure]) / dense for L in range(self.max_level + 1)]

    def stage_keep(self, s, level):
        drop = set(self.orders[s][:level])
        return {"blocks": [self.present[i] for i in range(self.depth) if i not in drop]}

    def meta(self):
        return {"scorer": self.scorer, "scorer_kwargs": self.scorer_kwargs, "protect_ends": self.protect_ends,
                "stage_scores": self.scores, "stage_drop_orders": [[self.present[i] for i in o] for o in self.orders],
                "stage_probes": self.probes}


class SecondOrder(Backend):
    name = "secondorder"

    def __init__(self, **kw):
        try:
            import methods.obs_diff  # noqa: F401  (issue 6)
        except ImportError:
            raise BenchError("diffes backend=secondorder needs methods.obs_diff (OBS-compensated heads/channels, "
                             "issue 6) and per-stage width routing; use backend=layerdrop") from None
        raise BenchError("diffes backend=secondorder: methods.obs_diff has the OBS layer routine, but per-stage "
                         "width routing with compensated projection banks is not in bench.routing yet; use "
                         "backend=layerdrop")


BACKENDS = {"layerdrop": LayerDrop, "secondorder": SecondOrder}


def make_backend(name: str, **kw) -> Backend:
    if name not in BACKENDS:
        raise BenchError(f"diffes backend={name!r} is unknown; use one of {', '.join(BACKENDS)}")
    return BACKENDS[name](**kw)
