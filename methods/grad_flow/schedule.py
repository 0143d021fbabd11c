"""Gradient flow's progressive soft pruning as a fine-tune callback (card: methods.grad_flow, G4-G9).

Clock: tau = the number of finished optimizer steps, i.e. the forward of fine-tune step `tau`
sees the masks m(tau). Decisions at rounds r_0 = 0 < r_1 < ... < r_{K-1} < E; at E (the end of
the schedule) every selected unit's mask is exactly 0 and the loop hard-removes them (a Plan),
then fine-tunes the rest of the budget. A unit selected at round a decays as

    m(tau) = 1 - rho((tau - a) / (E - a)),   rho(0) = 0, rho(1) = 1   (linear | cosine | cubic)

(``step``: rho = 1 at once, the hard-pruning ablation). Round k selects, per group, the next
units by the criterion on the current (masked) weights, up to the cumulative count
round(N * c((k + 1) / K)) with c = cubic (Zhu & Gupta 2017) | linear | all (everything at round 0).
Selection is monotone: a unit once selected decays to 0.

Every decision is one JSON line in ``<run_dir>/grad_flow_decisions.jsonl``; the callback state
(targets, rounds, selection steps, tau) makes a resumed run reproduce the masks exactly.
"""
from __future__ import annotations

import math
import time

import torch

from bench.api import BenchError, Budget, Plan
from methods.decision_log import LoggedSchedule
from methods.grad_flow.criterion import MaskHooks, collect_units, gradient_flow_scores, importance, multipliers

LOG_NAME = "grad_flow_decisions.jsonl"
DECAYS = ("linear", "cosine", "cubic", "step")
COUNTS = ("cubic", "linear", "all")


def rho(x: float, decay: str) -> float:
    """Decay progress in [0, 1] at schedule position x in [0, 1] (0 at selection, 1 at the end)."""
    x = min(1.0, max(0.0, float(x)))
    if decay == "linear":
        return x
    if decay == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * x))
    if decay == "cubic":  # fast at first, like the cubic sparsity schedule (Zhu & Gupta 2017, Eq. 1)
        return 1.0 - (1.0 - x) ** 3
    if decay == "step":
        return 1.0
    raise BenchError(f"grad_flow decay={decay!r} is unknown; use one of {', '.join(DECAYS)}")


def mask_value(tau: int, selected_at: int, end: int, decay: str) -> float:
    """m(tau) of a unit selected at round `selected_at`; exactly 0 from `end` on."""
    if tau < selected_at:
        return 1.0
    if tau >= end:
        return 0.0
    return 1.0 - rho((tau - selected_at) / (end - selected_at), decay)


def cumulative(n: int, k: int, rounds: int, count: str) -> int:
    """Units selected by the end of round k (0-based) of `rounds`, out of n; exactly n at the last."""
    if count == "all" or k >= rounds - 1:
        return n
    x = (k + 1) / rounds
    c = x if count == "linear" else 1.0 - (1.0 - x) ** 3
    return min(n, int(round(n * c)))


def schedule_steps(total_steps: int, finish_frac: float, period: int) -> tuple[int, list[int]]:
    """(E, rounds): the end of the schedule and the decision steps. E = floor(finish_frac * T),
    at least 1 and at most T; K = max(1, round(E / period)) rounds at floor(k E / K)."""
    end = min(int(total_steps), max(1, int(math.floor(finish_frac * total_steps + 1e-9))))
    k = max(1, int(round(end / max(1, period))))
    return end, sorted({int(math.floor(i * end / k)) for i in range(k)})


class GradFlowSchedule(LoggedSchedule):
    """The TrainCallback (bench.api): soft masks during fine-tuning, hard removal at the end of
    the schedule. State (JSON) = targets, clock, rounds and every selection with its step."""

    LOG_NAME = LOG_NAME

    def __init__(self, method, budget: Budget, calib):
        self.m, self.budget, self.calib = method, budget, calib
        self.net = None
        self.groups = {}
        self.mult: dict[str, torch.Tensor] = {}
        self.hooks: list[MaskHooks] = []
        self.state = {"targets": None, "total_steps": None, "end": None, "rounds": [], "tau": 0,
                      "selected": {}, "removed": False, "history": []}

    # ---- TrainCallback --------------------------------------------------------------------
    def on_start(self, net, total_steps: int, run_dir) -> None:
        if total_steps < 1:
            raise BenchError("gradient-flow pruning prunes during fine-tuning and needs finetune.steps >= 1")
        st = self.state
        self.net = net
        fresh = st["targets"] is None
        if fresh:
            self.groups = collect_units(net, self.m.units)
            st["targets"] = self.m.removal_targets(net, self.budget, self.groups)
            st["total_steps"] = int(total_steps)
            st["end"], st["rounds"] = schedule_steps(total_steps, self.m.finish_frac, self.m.period)
            st["start_ids"] = {g: list(u.dense_ids) for g, u in self.groups.items()}
            st["selected"] = {g: [] for g in self.groups}
            st["tau"] = 0
        elif not st["removed"]:
            self.groups = collect_units(net, self.m.units)
            if {g: list(u.dense_ids) for g, u in self.groups.items()} != st["start_ids"]:
                raise BenchError("the resumed model's units do not match the gradient-flow schedule's state; "
                                 "delete the run's fine-tune checkpoint and rerun")
        else:
            self.groups = {}  # after the hard removal: nothing is masked any more
        self.start_log(run_dir, {"event": "start", "targets": st["targets"], "total_steps": st["total_steps"],
                                 "end": st["end"], "rounds": st["rounds"],
                                 "budget": {"measure": self.budget.measure, "keep": self.budget.keep},
                                 "settings": self.m.settings()})
        if not st["removed"]:
            self.hooks = [MaskHooks(net.backbone, self._masked_names(), self.mult)]
            if fresh and 0 in st["rounds"]:
                self._decide(0, loss=None)
            self._set_masks(st["tau"])

    def on_ema(self, ema) -> None:
        """The loop's EMA copy gets the same masks (the same multipliers, by parameter name)."""
        if not self.state["removed"] and self.hooks:
            self.hooks.append(MaskHooks(ema, self._masked_names(), self.mult))

    def on_step(self, step: int, net, loss: float):
        st = self.state
        if st["removed"]:
            return None
        tau = step + 1  # the next forward's clock
        st["tau"] = tau
        if tau >= st["end"]:
            return self._hard_removal(tau)
        self._set_masks(tau)
        if tau in st["rounds"] and not any(h["tau"] == tau and h["event"] == "decision" for h in st["history"]):
            self._decide(tau, loss)    # on the current weights with the masks of this clock
            self._set_masks(tau)       # units selected now start their decay here (m = 1 at tau)
        return None

    # ---- masks ----------------------------------------------------------------------------
    def _masked_names(self) -> list[str]:
        names = []
        for g in self.groups.values():
            names += [n for n, _, _ in g.members] if g.kind != "blocks" else [n for u in g.unit_params for n in u]
        return sorted(set(names))

    def masks(self, tau: int) -> dict[str, torch.Tensor]:
        """group -> mask values of the present units at clock tau."""
        st = self.state
        out = {}
        for gname, g in self.groups.items():
            sel = {int(d): int(a) for d, a in st["selected"].get(gname, [])}
            out[gname] = torch.tensor([mask_value(tau, sel[d], st["end"], self.m.decay) if d in sel else 1.0
                                       for d in g.dense_ids], dtype=torch.float64)
        return out

    def _set_masks(self, tau: int) -> None:
        params = dict(self.net.named_parameters())
        new = multipliers(params, self.groups, self.masks(tau))
        self.mult.clear()
        self.mult.update(new)

    # ---- decisions ------------------------------------------------------------------------
    def _decide(self, tau: int, loss) -> None:
        t0 = time.perf_counter()
        st, m = self.state, self.m
        k = st["rounds"].index(tau)
        r = gradient_flow_scores(self.net, self.groups, self.calib, m.n_probes, m.batch_size, dict(self.mult),
                                 self.hooks, m.loss)
        chosen = {}
        for gname, g in self.groups.items():
            sel = {int(d) for d, _ in st["selected"][gname]}
            want = cumulative(st["targets"][gname], k, len(st["rounds"]), m.count)
            imp = importance(r["delta_G"][gname], m.prune)
            cand = sorted((float(imp[j]), j) for j, d in enumerate(g.dense_ids) if d not in sel)
            new = [g.dense_ids[j] for _, j in cand[:max(0, want - len(sel))]]
            st["selected"][gname] += [[d, tau] for d in new]
            chosen[gname] = sorted(new)
        rec = {"event": "decision", "tau": tau, "round": k, "loss": None if loss is None else round(float(loss), 6),
               "G": r["G"], "delta_G": {g: [float(x) for x in v] for g, v in r["delta_G"].items()},
               "dense_ids": {g: u.dense_ids for g, u in self.groups.items()}, "selected": chosen,
               "seconds": round(time.perf_counter() - t0, 3)}
        self.record(rec)

    def final_plan(self) -> Plan:
        """The hard-removal plan: every unit not selected, in dense ids."""
        st = self.state
        keep = {}
        for gname, ids in st["start_ids"].items():
            sel = {int(d) for d, _ in st["selected"][gname]}
            keep[gname] = [d for d in ids if d not in sel]
        return Plan(granularity=self.m.granularity, keep=keep,
                    meta={"method": self.m.label, "tau": st["end"], "removed": {g: sorted(int(d) for d, _ in s)
                                                                          for g, s in st["selected"].items()}})

    def _hard_removal(self, tau: int) -> Plan:
        st = self.state
        for h in self.hooks:  # masks are exactly 0 (selected) or 1 (the rest): dropping them and
            h.remove()        # removing the zero units leaves the function unchanged
        self.hooks = []
        self.mult.clear()
        st["removed"] = True
        plan = self.final_plan()
        rec = {"event": "hard_removal", "tau": tau, "keep_counts": {g: len(v) for g, v in plan.keep.items()}}
        self.record(rec)
        self.groups = {}
        return plan


def mask_trace(total_steps: int, finish_frac: float, period: int, decay: str, selected_at: list[int]) -> list[list[float]]:
    """Mask values over the clock tau = 0..E for units selected at the given steps (tests, plots)."""
    end, _ = schedule_steps(total_steps, finish_frac, period)
    return [[mask_value(t, a, end, decay) for t in range(end + 1)] for a in selected_at]
