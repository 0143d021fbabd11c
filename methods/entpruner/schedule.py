"""EntPruner's adaptive progressive schedule as a fine-tune callback, its decision log and replay.

Every decision step: CED of the current model's blocks -> candidates that drop the k lowest-CED
blocks (k = 0..k_max) -> NTK condition number and ZiCo of each candidate on a fixed proxy batch ->
weighted approval vote -> remove the accepted blocks (never past the target; forced when the
remaining decisions could no longer reach it). Each decision is one JSON line in
``<run_dir>/entpruner_decisions.jsonl``; ``replay(path)`` rebuilds the final plan from it.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from bench.api import BenchError, Budget, Plan
from bench.results import atomic_write_text
from bench.surgery import blocks_to_keep
from methods import proxies
from methods.entpruner.ced import eval_mode

LOG_NAME = "entpruner_decisions.jsonl"
PROXIES = ("ntk", "zico")


def decision_steps(total_steps: int, period: int, finish_frac: float, removals: int, k_max: int) -> list[int]:
    """Steps (0-based, after that step's update) at which the schedule decides. Every `period`
    steps, all before ceil(finish_frac * total) - 1 so the rest of the fine-tune recovers the final
    model; the period shrinks when a short run needs more decisions than it fits (k_max per decision)."""
    if removals <= 0:
        return []
    deadline = max(1, math.floor(finish_frac * total_steps))  # decisions at steps < deadline
    need = math.ceil(removals / max(1, k_max))
    p = max(1, min(period, deadline // need)) if deadline >= need else 1
    return list(range(p - 1, deadline, p))


def removal_order(ced: list[float]) -> list[int]:
    """Current positions, least important first; ties remove the later block first (the mirror
    of bench.surgery.keep_top, which keeps the earlier one)."""
    return sorted(range(len(ced)), key=lambda i: (float(ced[i]), -i))


def vote(candidates: list[dict], weights: dict, quorum: float, tolerance: float) -> int:
    """Largest k whose weighted approval reaches the quorum. Proxy p approves candidate k when its
    goodness (NTK: -log kappa; ZiCo: per layer or total) is no worse than candidate 0's, within a
    relative tolerance. Candidate 0 (prune nothing) is always acceptable. Fills in the votes."""
    total = sum(float(weights.get(p, 0.0)) for p in PROXIES)
    if total <= 0:
        raise BenchError("vote_weights must give a positive weight to at least one proxy (ntk, zico)")
    base = candidates[0]["goodness"]
    chosen = 0
    for c in candidates:
        c["approve"] = {p: bool(c["goodness"][p] >= base[p] - tolerance * abs(base[p])) for p in PROXIES}
        c["support"] = sum(float(weights.get(p, 0.0)) for p in PROXIES if c["approve"][p]) / total
        if c["k"] > 0 and c["support"] >= quorum - 1e-12:
            chosen = max(chosen, c["k"])
    return chosen


class AdaptiveSchedule:
    """The TrainCallback. State (for exact resume): target depth, decision steps, the start
    structure and every decision made so far."""

    def __init__(self, method, budget: Budget, calib):
        self.m, self.budget, self.calib = method, budget, calib
        self.run_dir = None
        self.state = {"target": None, "total_steps": None, "steps": [], "start_kept": None, "history": []}

    # ---- TrainCallback --------------------------------------------------------------------
    def state_dict(self) -> dict:
        return json.loads(json.dumps(self.state))

    def load_state_dict(self, state: dict) -> None:
        self.state = json.loads(json.dumps(state))

    def on_start(self, net, total_steps: int, run_dir) -> None:
        if total_steps < 1:
            raise BenchError("adaptive EntPruner prunes during fine-tuning and needs finetune.steps >= 1; "
                             "use method=entpruner_oneshot for a run without fine-tuning")
        st = self.state
        if st["target"] is None:  # fresh start: the plan kept the dense model
            kept = list(net.kept_blocks)
            if kept != list(range(len(kept))):
                raise BenchError(f"adaptive EntPruner starts from the dense model, got blocks {kept}")
            st["target"] = blocks_to_keep(net, self.budget)
            st["total_steps"] = int(total_steps)
            st["start_kept"] = kept
            st["steps"] = decision_steps(total_steps, self.m.period, self.m.finish_frac,
                                         len(kept) - st["target"], self.m.k_max)
        elif list(net.kept_blocks) != self.kept_now():
            raise BenchError(f"resumed model has blocks {net.kept_blocks}, the schedule's state says "
                             f"{self.kept_now()}; delete the run's fine-tune checkpoint and rerun")
        self.run_dir = Path(run_dir) if run_dir else None
        if self.run_dir is not None:  # (re)write the log from the state: a resumed run drops what it redoes
            head = {"event": "start", "target": st["target"], "start_kept": st["start_kept"],
                    "total_steps": st["total_steps"], "decision_steps": st["steps"],
                    "budget": {"measure": self.budget.measure, "keep": self.budget.keep}, "settings": self.m.settings()}
            lines = [head] + st["history"]
            atomic_write_text(self.run_dir / LOG_NAME, "".join(json.dumps(r) + "\n" for r in lines))

    def on_step(self, step: int, net, loss: float):
        st = self.state
        if step not in st["steps"] or any(h["step"] == step for h in st["history"]):
            return None
        remaining = len(net.kept_blocks) - st["target"]
        if remaining <= 0:
            return None
        rec = self.decide(step, net, remaining, loss)
        st["history"].append(rec)
        if self.run_dir is not None:
            with open(self.run_dir / LOG_NAME, "a") as f:
                f.write(json.dumps(rec) + "\n")
        if not rec["removed"]:
            return None
        return Plan(granularity="block", keep={"blocks": rec["kept_after"]},
                    meta={"method": "entpruner", "step": step, "removed": rec["removed"]})

    # ---- one decision ----------------------------------------------------------------------
    def kept_now(self) -> list[int]:
        st = self.state
        return st["history"][-1]["kept_after"] if st["history"] else list(st["start_kept"])

    def decide(self, step: int, net, remaining: int, loss: float) -> dict:
        t0 = time.perf_counter()
        m, st = self.m, self.state
        kept = list(net.kept_blocks)
        ced = m.ced(net, self.calib)
        order = removal_order(ced["ced"])
        left_after = sum(1 for s in st["steps"] if s > step)
        k_min = max(0, remaining - m.k_max * left_after)          # what must go now to still reach the target
        k_top = min(remaining, max(m.k_max, k_min))                # never past the target
        cands = []
        with eval_mode(net):
            for k in range(k_top + 1):
                drop = sorted(order[:k])
                with net.ablate("blocks", drop):
                    ntk, zico, layers = self.proxies(net)
                cands.append({"k": k, "remove": [kept[i] for i in drop], "ntk_cond": ntk, "zico": zico,
                              "zico_layers": layers,
                              "goodness": {"ntk": -math.log(ntk),
                                           "zico": zico / max(layers, 1) if m.zico_per_layer else zico}})
        voted = vote(cands, m.vote_weights, m.quorum, m.tolerance)
        chosen = max(voted, k_min)
        removed = sorted(kept[i] for i in order[:chosen])
        return {"event": "decision", "step": step, "loss": round(float(loss), 6), "kept_before": kept,
                "ced": ced["ced"], "ced_per_bin": ced["ced_per_bin"], "order": [kept[i] for i in order],
                "remaining": remaining, "k_min": k_min, "candidates": cands, "voted_k": voted, "chosen_k": chosen,
                "forced": chosen > voted, "removed": removed, "kept_after": [b for b in kept if b not in removed],
                "seconds": round(time.perf_counter() - t0, 3)}

    def proxies(self, net) -> tuple[float, float, int]:
        """(NTK condition number, ZiCo, ZiCo's layer count) of the current (ablated) model on the
        first `proxy_batch` probes (the calibration order is stratified by noise level)."""
        m, c = self.m, self.calib
        n = min(m.proxy_batch, len(c))
        dev = net.device
        x0, y, noise, u = (a[:n].to(dev) for a in (c.x0, c.y, c.noise, c.u))
        ntk = proxies.denoiser_ntk_condition(net, x0, y, noise, u, m.proxy_params)
        zico, layers = proxies.denoiser_zico(net, x0, y, noise, u, m.zico_splits, m.proxy_params, m.zico_accumulate)
        return ntk, zico, layers


def replay(decisions_path) -> Plan:
    """The final block plan recorded in a decision log: the start structure minus every decision's
    removals, in order. A decision logged again after a resume supersedes the one it redoes."""
    p = Path(decisions_path)
    if not p.is_file():
        raise BenchError(f"no EntPruner decision log at {p}")
    start, decisions = None, []
    for line in p.read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        if r["event"] == "start":
            start = r
        elif r["event"] == "decision":
            decisions = [d for d in decisions if d["step"] < r["step"]] + [r]
    if start is None:
        raise BenchError(f"{p} has no start record; it is not an EntPruner decision log")
    kept = list(start["start_kept"])
    for d in decisions:
        if d["kept_before"] != kept:
            raise BenchError(f"{p}: decision at step {d['step']} starts from {d['kept_before']}, replay has {kept}")
        kept = [b for b in kept if b not in set(d["removed"])]
    return Plan(granularity="block", keep={"blocks": kept},
                meta={"method": "entpruner", "replayed_from": str(p), "decisions": len(decisions),
                      "target": start["target"]})
