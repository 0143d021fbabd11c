"""Diff-ES backends: what a sparsity level means in one stage, what it costs, and how a stage-wise
candidate is routed on the dense model for its fitness.

    prepare(net, calib, edges)         per-stage calibration (orders of removal, layer Hessians)
    max_level, cost(measure)           cost[level] as a fraction of the dense model, measured
    stage_keep(s, level)               the stage's keep set (Plan data, dense indices)
    routed(net, levels, edges, w)      context: the model routed by these levels (fitness evaluation)
    unit_share(measure, w)             how far below the budget a tight plan may land (bench.run's check)
    plan_scores(w)                     plan.scores
    result(levels, edges, w)           (plan.keep, plan.stages, meta) of the chosen levels
    static_plan(net, budget, edges, w) the same, for a params budget (every stage alike, R2)

LayerDrop (Diff-ES `--prune-method layerdrop`, methods.md 6b): level L of stage s removes the L
least important blocks of that stage, ranked by a block scorer on the calibration probes whose
noise level lies in the stage (Diff-ES: 1 - cos(flatten(out), flatten(in)) per sample, ascending =
drop order; any scorer of methods.blockscores). `protect_ends` blocks at each end never go. With
`cfg_calib` (a class-conditional model with label dropout) the per-sample scorers see the
CFG-doubled batch, every probe once with its label and once with the null label, summed as the
code's hooks do on its ``forward_with_cfg`` batch (``calibrate_layerdrop_orders``).

SecondOrder (Diff-ES `--prune-method secondorder`, methods.md 6b; written from that description,
the group-OBS routine and the Hessian accumulator are methods.obs_diff's):
  * per stage s, the layer Hessian H_s = 2 E[X X^T] of every block's attn.proj and mlp.fc2 input,
    from the calibration probes whose noise level lies in stage s (x_t = the probe noised at its
    u; Diff-ES `calibration.py`: noised data per stage), with the conditional and the null-label
    forward both entering H (Diff-ES's CFG-doubled forward; `cfg_calib`). Weights *uniform*
    within a stage [A: Diff-ES's H = (2/n) sum X X^T; OBS-Diff's log-decrease alpha_t is defined
    over the steps of a whole trajectory, and inside one stage it would vary by a few percent];
  * level L removes the fraction L/levels of every block's heads and MLP channels
    (round(L n / levels) units of a group of n, at least one kept) [A: Diff-ES removes k of the
    H heads and k/H of the fc2 columns at level k, i.e. levels = H; `levels` decouples the grid
    from the head count, so a 2- or 4-head model still has a fine grid, carried by the MLP];
  * which units go: methods.obs_diff.obs_prune_columns on the consumer (attn.proj in groups of
    head_dim columns, mlp.fc2 in single columns) with H_s, greedy group-OBS removal (saliency
    w_S^T (Hinv_SS)^-1 w_S, Diff-ES's `score_j`) with exact downdates of Hinv, run per (stage,
    level) from the dense layer down to removed(L) groups (greedy steps are sequential, so level
    L's removals are the first removed(L) of any deeper level's: levels nest) [V: the code saves
    the whole trajectory of k = 1..H removals]. The compensated thin weights of level L are that
    run's updated columns, the least-squares optimum on the kept columns W_K' = W H_:K H_KK^-1
    (tested against it), cached per (stage, level); damping `percdamp` x
    mean(diag H) always [A: Diff-ES damps only when the Cholesky fails];
  * kept q/k/v rows and fc1 rows are selected from the shared dense weights; only the thin
    compensated projections are stored per stage (bench.stage_bank, written as a safetensors
    file named by its sha256 and referenced by plan.meta["bank"]: bench.run writes it to the
    run's artifacts folder, a bare plan() to the temp folder); computed lazily and cached per
    (stage, level), so the search pays for the levels it visits [A: storage and caching ours];
  * cost(macs)[L] is the measured MACs of a model routed at level L (bench.metrics.cost.routed_cost,
    the FLOP counter), cost(params)[L] the measured params of the static width-pruned model;
    unit_share = one level of the heaviest stage (what a tight plan may leave unspent).
A params budget counts what is stored (the union of the stages' units + every stage's thin
projections): stage-wise width can only add to a static model, so a params budget gets one level
for every stage, OBS on the trajectory-weighted Hessian sum_s w_s H_s, and the compensated weights
written into the stored projections (a static plan; no stage entries).
"""
from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path

import torch

import abc

from bench import routing, stage_bank, surgery
from bench.api import BenchError, Plan
from bench.data import Calib
from methods.blockscores import block_scores, subset


class Backend(abc.ABC):
    """What a sparsity level means per stage (the interface the search and the run use)."""
    name = ""
    max_level: int

    @abc.abstractmethod
    def prepare(self, net, calib, edges: list[float]) -> None:
        """Per-stage calibration on the dense model (orders of removal, Hessians), once."""

    @abc.abstractmethod
    def cost(self, measure: str) -> list[float]:
        """cost[level]: the measured cost of one stage at that level, a fraction of the dense model."""

    @abc.abstractmethod
    def stage_keep(self, s: int, level: int) -> dict[str, list[int]]:
        """Stage s's keep set at this level (Plan data, dense indices)."""

    def stages(self, levels, edges: list[float], weights: list[float]) -> list[dict]:
        return [{"u_range": [edges[s], edges[s + 1]], "keep": self.stage_keep(s, int(L)), "weight": weights[s],
                 "level": int(L)} for s, L in enumerate(levels)]

    def routed(self, net, levels, edges, weights):
        return routing.routed(net, self.stages(levels, edges, weights))

    @abc.abstractmethod
    def unit_share(self, measure: str, weights: list[float]) -> float:
        """How far below the budget a tight plan may land: one unit's (one level step's) share of the cost."""

    @abc.abstractmethod
    def plan_scores(self, weights: list[float]) -> dict[str, list[float]]:
        """Per-unit scores for plan.scores (higher = kept), pooled over the stages' weights."""

    @abc.abstractmethod
    def result(self, levels, edges, weights) -> tuple[dict, list[dict], dict]:
        """(union keep, stages, meta) of the plan that these per-stage levels give."""

    @abc.abstractmethod
    def static_plan(self, net, budget, edges, weights) -> tuple[dict, list[dict], dict]:
        """The same keep set in every stage (budgets that stage-wise routing cannot lower, e.g. params)."""

    def meta(self) -> dict:
        return {}


# block scorers that, like Diff-ES's calibrate_layerdrop_orders, read each sample's block input and
# output: with cfg_calib their probes are the CFG-doubled batch (the conditional and the null label)
CFG_DOUBLED_SCORERS = ("cosine", "shortgpt", "flux_lite")


def cfg_doubled(calib: Calib, null_label: int) -> Calib:
    """The probes twice, the second copy with the null label: Diff-ES's calibration forward (its
    ``forward_with_cfg`` on ``cat([x, x])``, ``cat([y, null])``), whose hooks score both halves."""
    cat = torch.cat
    return Calib(cat([calib.x0, calib.x0]), cat([calib.y, torch.full_like(calib.y, null_label)]),
                 cat([calib.noise, calib.noise]), cat([calib.u, calib.u]), cat([calib.ids, calib.ids]), calib.bins,
                 calib.source)


class LayerDrop(Backend):
    name = "layerdrop"

    def __init__(self, scorer: str = "cosine", scorer_kwargs: dict | None = None, protect_ends: int = 0,
                 batch_size: int = 64, cfg_calib: bool = True):
        self.scorer, self.scorer_kwargs = scorer, dict(scorer_kwargs or {})
        self.protect_ends, self.batch_size, self.cfg_calib = int(protect_ends), int(batch_size), bool(cfg_calib)

    def prepare(self, net, calib, edges):
        self.present = list(net.kept_blocks)
        depth = len(self.present)
        p = self.protect_ends
        if depth - 2 * p < 1:
            raise BenchError(f"diffes protect_ends={p} protects every block of a {depth}-block model")
        st = routing.stage_index(net.process, edges, net.process.t_from_u(calib.u))
        self.scores, self.orders, self.probes = [], [], []
        self.doubled = self.cfg_calib and net.label_dropout > 0 and self.scorer in CFG_DOUBLED_SCORERS
        for s in range(len(edges) - 1):
            sub = subset(calib, (st == s).cpu())
            self.probes.append(len(sub))   # distinct probes (the doubled batch scores each twice)
            if self.doubled and len(sub):
                sub = cfg_doubled(sub, net.null_label)
            sc = block_scores(net, sub, self.scorer, batch_size=self.batch_size, **self.scorer_kwargs)
            self.scores.append(sc)
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

    def unit_share(self, measure, weights):  # one block's share of the dense model
        return self.per[measure] / (self.fixed[measure] + self.depth * self.per[measure])

    def plan_scores(self, weights):  # trajectory-weighted mean of the stages' block scores
        return {"blocks": [float(sum(w * sc[i] for w, sc in zip(weights, self.scores))) for i in range(self.depth)]}

    def result(self, levels, edges, weights):
        stages = self.stages(levels, edges, weights)
        union = sorted(set().union(*(s["keep"]["blocks"] for s in stages)))
        return {"blocks": union}, stages, {}

    def static_plan(self, net, budget, edges, weights):
        mean = self.plan_scores(weights)["blocks"]
        pool = [net.kept_blocks[i] for i in surgery.keep_top(mean, surgery.blocks_to_keep(net, budget))]
        stages = [{"u_range": [edges[s], edges[s + 1]], "keep": {"blocks": pool}, "weight": weights[s], "level": None}
                  for s in range(len(weights))]
        note = ("a params budget counts the stored union of the stages' blocks; every stage keeps the blocks with "
                "the best trajectory-mean scores (a static plan)")
        return {"blocks": pool}, stages, {"params_budget": note}

    def meta(self):
        return {"scorer": self.scorer, "scorer_kwargs": self.scorer_kwargs, "protect_ends": self.protect_ends,
                "cfg_doubled_calibration": self.doubled, "stage_scores": self.scores, "stage_drop_orders": [[self.present[i] for i in o] for o in self.orders],
                "stage_probes": self.probes}


def removed_units(n: int, level: int, levels: int) -> int:
    """Units of a group of n removed at `level` of `levels`: round(level n / levels), at least one kept."""
    return min(n - 1, int(math.floor(level * n / levels + 0.5)))


class SecondOrder(Backend):
    name = "secondorder"

    def __init__(self, levels: int = 8, percdamp: float = 0.01, compensate: bool = True, saliency: str = "block",
                 chunk: int = 1, cfg_calib: bool = True, batch_size: int = 64, bank_dir: str | None = None):
        from methods.obs_diff import width_layers  # noqa: F401  (fails early if OBS-Diff is missing)
        if levels < 2 or percdamp < 0 or chunk < 1 or saliency not in ("block", "chol_diag"):
            raise BenchError("diffes secondorder needs levels >= 2, percdamp >= 0, obs_chunk >= 1 and saliency "
                             "block | chol_diag")
        self.levels, self.percdamp, self.compensate = int(levels), float(percdamp), bool(compensate)
        self.saliency, self.chunk, self.cfg_calib = saliency, int(chunk), bool(cfg_calib)
        self.batch_size, self.bank_dir = int(batch_size), bank_dir

    # ---- calibration: per-stage layer Hessians -------------------------------------------------
    def prepare(self, net, calib, edges):
        from methods.obs_diff import width_layers

        routing._check_backbone(net)
        if routing.is_routed(net):
            raise BenchError("diffes secondorder plans on a static model, not a routed one")
        self.net, self.present = net, list(net.kept_blocks)
        self.targets = width_layers(net)  # consumer layer (attn.proj / mlp.fc2) of every width group
        self.max_level = self.levels - 1
        self.removed = [{t["group"]: removed_units(len(t["dense_ids"]), L, self.levels) for t in self.targets}
                        for L in range(self.levels)]
        st = routing.stage_index(net.process, edges, net.process.t_from_u(calib.u))
        self.H, self.probes = [], []
        for s in range(len(edges) - 1):
            sub = subset(calib, (st == s).cpu())
            if len(sub) == 0:
                raise BenchError(f"diffes secondorder: no calibration probe lies in stage {s} "
                                 f"[{edges[s]:.3f}, {edges[s + 1]:.3f}); raise calib.n or use fewer stages")
            self.H.append(self._hessians(net, sub))
            self.probes.append(len(sub))
        self._cache: dict = {}   # (stage | "pooled", level) -> kept ids, thin weights, errors per group
        self._costs: dict = {}
        self._pooled = None

    @torch.no_grad()
    def _hessians(self, net, calib) -> dict[str, torch.Tensor]:
        """group -> H = 2 E[X X^T] of its consumer's input over these probes (uniform weights)."""
        from methods.obs_diff import HessianAccumulator

        accs = {t["group"]: HessianAccumulator(t["layer"].in_features, device=t["layer"].weight.device)
                for t in self.targets}
        hooks = [t["layer"].register_forward_pre_hook(
            lambda mod, args, g=t["group"]: accs[g].add(args[0], 1.0, count=args[0].shape[0])) for t in self.targets]
        cfg = self.cfg_calib and net.label_dropout > 0
        dev = net.device
        try:
            with net.eval_mode():
                for x0, y, noise, u in calib.batches(self.batch_size):
                    x_t, t = net.noisy(x0.to(dev), u.to(dev), noise.to(dev))
                    y = y.to(dev)
                    net(x_t, t, y)
                    if cfg:  # the null-label half of a CFG forward
                        net(x_t, t, torch.full_like(y, net.null_label))
        finally:
            for h in hooks:
                h.remove()
        return {g: a.H for g, a in accs.items()}

    def _hessian(self, s, g: str) -> torch.Tensor:
        if s == "pooled":
            return self._pooled[g]
        return self.H[s][g]

    # ---- one (stage, level): OBS on every consumer ------------------------------------------
    @torch.no_grad()
    def level(self, s, L: int) -> dict:
        """{"keep": group -> kept dense ids, "thin": group -> [out, kept x width] compensated weight
        (groups that lose units), "rel_error": group -> relative output error of the layer}."""
        key = (s, int(L))
        if key in self._cache:
            return self._cache[key]
        from methods.obs_diff import obs_prune_columns

        keep, thin, err = {}, {}, {}
        for t in self.targets:
            g, gs, W = t["group"], t["group_size"], t["layer"].weight
            k = self.removed[L][g]
            if k == 0:
                keep[g] = list(t["dense_ids"])
                continue
            H = self._hessian(s, g)
            kept, W_new = obs_prune_columns(W, H, k, gs, self.percdamp, self.compensate, self.saliency, self.chunk)
            cols = torch.tensor([j * gs + i for j in kept for i in range(gs)], dtype=torch.long, device=W.device)
            thin[g] = W_new.index_select(1, cols).contiguous()
            keep[g] = [t["dense_ids"][j] for j in kept]
            dW = W_new.double() - W.double()
            Hd = H.to(dW.device)
            ref = float(torch.einsum("ri,ij,rj->", W.double(), Hd, W.double()))
            err[g] = float(torch.einsum("ri,ij,rj->", dW, Hd, dW)) / ref if ref > 0 else 0.0
        self._cache[key] = out = {"keep": keep, "thin": thin, "rel_error": err}
        return out

    def stage_keep(self, s, level):
        return {"blocks": list(self.present), **self.level(s, level)["keep"]}

    def _bank(self, levels) -> dict[str, torch.Tensor]:
        return {stage_bank.bank_key(s, g): w for s, L in enumerate(levels)
                for g, w in self.level(s, int(L))["thin"].items()}

    def routed(self, net, levels, edges, weights):
        return routing.routed(net, self.stages(levels, edges, weights), self._bank(levels))

    # ---- costs: measured per level ----------------------------------------------------------
    def _first_units(self, L: int) -> dict[str, list[int]]:  # counts are all a cost depends on
        return {t["group"]: list(t["dense_ids"])[:len(t["dense_ids"]) - self.removed[L][t["group"]]]
                for t in self.targets}

    def cost(self, measure: str) -> list[float]:
        if measure == "blocks":
            raise BenchError("diffes backend=secondorder removes heads and MLP channels, not blocks; give the budget "
                             "in MACs or params (budget.measure=macs budget.keep=0.5)")
        if measure not in self._costs:
            net = self.net
            dense = surgery.measure(net)[measure]
            if measure == "macs":  # one routed stage per level, each measured by the FLOP counter
                n = self.levels
                stages = [{"u_range": [L / n, (L + 1) / n],
                           "keep": {"blocks": list(self.present), **self._first_units(L)}} for L in range(n)]
                with routing.routed(net, stages):
                    got = surgery.measure(net)["stage_macs"]
            else:  # what a static width-pruned model stores
                got = []
                for L in range(self.levels):
                    trial = surgery.apply(copy.deepcopy(net), Plan("width", self._first_units(L)))
                    got.append(surgery.measure(trial)[measure])
            self._costs[measure] = [float(v) / dense for v in got]
        return self._costs[measure]

    def unit_share(self, measure, weights):
        c = self.cost(measure)
        step = max((a - b for a, b in zip(c, c[1:])), default=0.0)
        return step * (max(weights) if measure == "macs" else 1.0)  # a tight plan is within one level of one stage

    # ---- plan data ----------------------------------------------------------------------------
    @torch.no_grad()
    def plan_scores(self, weights):
        """Per width group, the trajectory-weighted mean over stages of each unit's OBS saliency
        before any removal (methods.obs_diff.group_saliency through obs_prune_columns)."""
        from methods.obs_diff import obs_prune_columns

        out = {}
        for t in self.targets:
            acc = None
            for s, w in enumerate(weights):
                sal = torch.tensor(obs_prune_columns(t["layer"].weight, self.H[s][t["group"]], 0, t["group_size"],
                                                     self.percdamp, self.compensate, self.saliency,
                                                     return_info=True)[2]["saliency"], dtype=torch.float64)
                acc = w * sal if acc is None else acc + w * sal
            out[t["group"]] = [float(v) for v in acc]
        return out

    def _finish(self, stages: list[dict], thin: dict, rel_errors: list[dict]) -> tuple[dict, list[dict], dict]:
        union, tensors = routing.pack_bank(self.net, stages, thin)
        ref = stage_bank.save_bank(tensors, self.bank_dir or Path(tempfile.gettempdir()) / "diffprune-stage-banks")
        mean = lambda d, kind: (sum(v for g, v in d.items() if g.endswith(kind)) /
                                max(1, sum(1 for g in d if g.endswith(kind))))
        meta = {"bank": ref, "stage_rel_error": [{"attn": mean(e, "attn.heads"), "mlp": mean(e, "mlp.hidden")}
                                                 for e in rel_errors]}
        return {"blocks": list(self.present), **union}, stages, meta

    def result(self, levels, edges, weights):
        stages = self.stages(levels, edges, weights)
        thin = {(s, g): w for s, L in enumerate(levels) for g, w in self.level(s, int(L))["thin"].items()}
        return self._finish(stages, thin, [self.level(s, int(L))["rel_error"] for s, L in enumerate(levels)])

    def static_plan(self, net, budget, edges, weights):
        c = self.cost("params")
        L = next((L for L, v in enumerate(c) if v <= budget.keep + 1e-9), None)
        if L is None:
            raise BenchError(f"budget params keep={budget.keep} cannot be met by removing heads and MLP channels: the "
                             f"highest level keeps {c[-1]:.3f} of the dense params; raise budget.keep")
        self._pooled = {t["group"]: sum(w * self.H[s][t["group"]] for s, w in enumerate(weights)) for t in self.targets}
        lv = self.level("pooled", L)
        stages = [{"u_range": [edges[s], edges[s + 1]], "keep": {"blocks": list(self.present), **lv["keep"]},
                   "weight": weights[s], "level": L} for s in range(len(weights))]
        thin = {(s, g): w for s in range(len(weights)) for g, w in lv["thin"].items()}
        keep, stages, meta = self._finish(stages, thin, [lv["rel_error"]] * len(weights))
        meta["params_budget"] = ("a params budget counts what the routed model stores (the union of the stages' units "
                                 "and every stage's thin projection), so every stage keeps the same units, chosen and "
                                 "compensated by OBS on the trajectory-weighted Hessian (a static plan)")
        meta["static_level"] = L
        return keep, stages, meta

    def meta(self):
        first = {kind: next(t for t in self.targets if t["group"].endswith(kind))["group"]
                 for kind in ("attn.heads", "mlp.hidden") if any(t["group"].endswith(kind) for t in self.targets)}
        return {"width_levels": self.levels, "percdamp": self.percdamp, "compensate": self.compensate,
                "saliency": self.saliency, "obs_chunk": self.chunk, "cfg_calib": self.cfg_calib,
                "stage_probes": self.probes, "hessian_weights": "uniform within a stage",
                "level_removed": [{kind: self.removed[L][g] for kind, g in first.items()} for L in range(self.levels)]}


BACKENDS = {"layerdrop": LayerDrop, "secondorder": SecondOrder}


def make_backend(name: str, **kw) -> Backend:
    if name not in BACKENDS:
        raise BenchError(f"diffes backend={name!r} is unknown; use one of {', '.join(BACKENDS)}")
    return BACKENDS[name](**kw)
