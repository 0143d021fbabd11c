"""EntPruner's adaptive progressive schedule as a fine-tune callback, its decision log and replay.

Every decision step: CED of the current model's units (transformer blocks, or the U-Net's
bypassable operators: methods.entpruner.units) -> candidates that drop the k lowest-CED units
(k = 0..k_max) -> NTK condition number and ZiCo of each candidate on a fixed proxy batch ->
the vote (vote_rule=proposals: each proxy proposes a count K_p, the proposals are combined;
vote_rule=approval: the largest k every proxy approves) -> remove the voted units, at least the
pace's share of what is left (never past the target). Each decision is one JSON line in
``<run_dir>/entpruner_decisions.jsonl`` saying what the vote asked for, what the pace forced and which
of the two removed the blocks (``cause``: vote | pace | none); ``replay(path)`` re-derives every
decision from the logged CED and proxy values and rebuilds the final plan from it, and
``summarize(path)`` (``python -m methods.entpruner.schedule <log or run dir> ...``) counts them:
"adaptive decisions: k of n".
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from bench.api import BenchError, Budget, Plan
from bench.io import read_text, stored
from bench.surgery import blocks_to_keep, measure
from methods import proxies
from methods.decision_log import LoggedSchedule
from methods.entpruner import units as U

LOG_NAME = "entpruner_decisions.jsonl"
PROXIES = ("ntk", "zico")
PACES = ("even", "latest")
VOTE_RULES = ("proposals", "approval")
COMBINES = ("mean", "min", "max")


def min_removals(pace: str, remaining: int, left_after: int, k_max: int) -> int:
    """What this decision must remove whatever the vote says (R12). even: an equal share of what is
    left over this and the remaining decisions, so pruning stays progressive when the proxies
    never approve; latest: only what the remaining decisions (k_max each) could no longer remove
    (a vote that never passes then prunes everything at the last decisions, a late one-shot)."""
    if pace == "even":
        return math.ceil(remaining / (left_after + 1))
    if pace == "latest":
        return max(0, remaining - k_max * left_after)
    raise BenchError(f"entpruner pace={pace!r} is unknown; use one of {', '.join(PACES)}")


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


def proposals(candidates: list[dict], tolerance: float = 0.0) -> dict[str, int]:
    """Each proxy's proposal K_p (R11, vote_rule=proposals): the number of blocks whose removal it
    rates best among the candidates k = 0..k_top (NTK: the best-conditioned candidate, lowest
    kappa; ZiCo: the highest), the largest k within a relative `tolerance` of that best."""
    out = {}
    for p in PROXIES:
        best = max(float(c["goodness"][p]) for c in candidates)
        out[p] = max(c["k"] for c in candidates if float(c["goodness"][p]) >= best - tolerance * abs(best))
    return out


def combine(props: dict[str, int], weights: dict, how: str = "mean") -> int:
    """One count from the proxies' proposals: mean = their weighted mean rounded half down (a removal
    needs more than half of the weight behind it: proposals 0 and 1 give 0, 0 and 2 give 1), min =
    the count every proxy agrees to, max = the count any proxy asks for. Zero-weight proxies abstain."""
    active = {p: float(weights.get(p, 0.0)) for p in PROXIES if float(weights.get(p, 0.0)) > 0}
    if not active:
        raise BenchError("vote_weights must give a positive weight to at least one proxy (ntk, zico)")
    if how == "min":
        return min(props[p] for p in active)
    if how == "max":
        return max(props[p] for p in active)
    if how == "mean":
        mean = sum(w * props[p] for p, w in active.items()) / sum(active.values())
        return max(0, math.ceil(mean - 0.5 - 1e-9))
    raise BenchError(f"entpruner combine={how!r} is unknown; use one of {', '.join(COMBINES)}")


def cast_vote(candidates: list[dict], settings: dict) -> tuple[int, dict | None, int]:
    """(voted k, the proxies' proposals or None, the approval rule's k) under the logged or live
    settings; the approval rule always runs, to fill in each candidate's approvals for the log."""
    approval_k = vote(candidates, settings["vote_weights"], settings["quorum"], settings["tolerance"])
    if settings.get("vote_rule", "approval") == "approval":  # version-2 logs have no vote_rule: approval
        return approval_k, None, approval_k
    props = proposals(candidates, settings["tolerance"])
    return combine(props, settings["vote_weights"], settings.get("combine", "mean")), props, approval_k


def cause_of(voted: int, chosen: int) -> str:
    """Why a decision removed what it removed: 'vote' when the vote alone asked for at least that
    many (an adaptive decision), 'pace' when the pace's minimum forced more, 'none' when nothing went."""
    return "none" if chosen == 0 else ("vote" if voted >= chosen else "pace")


class AdaptiveSchedule(LoggedSchedule):
    """The TrainCallback. State (for exact resume): target depth, decision steps, the start
    structure and every decision made so far."""

    LOG_NAME = LOG_NAME

    def __init__(self, method, budget: Budget, calib):
        self.m, self.budget, self.calib = method, budget, calib
        self.state = {"target": None, "total_steps": None, "steps": [], "start_kept": None, "history": [],
                      "kind": None, "dense": None}

    # ---- TrainCallback --------------------------------------------------------------------
    def on_start(self, net, total_steps: int, run_dir) -> None:
        if total_steps < 1:
            raise BenchError("adaptive EntPruner prunes during fine-tuning and needs finetune.steps >= 1; "
                             "use method=entpruner_oneshot for a run without fine-tuning")
        st = self.state
        if st["target"] is None:  # fresh start: the plan kept the dense model
            kind = U.kind_of(net)
            kept = U.labels(net)
            if kind == U.BLOCKS and kept != list(range(len(kept))):
                raise BenchError(f"adaptive EntPruner starts from the dense model, got blocks {kept}")
            st["kind"], st["start_kept"], st["total_steps"] = kind, kept, int(total_steps)
            st["dense"] = measure(net)[self.budget.measure]
            if kind == U.BLOCKS:
                st["target"] = blocks_to_keep(net, self.budget)
                removals = len(kept) - st["target"]
            else:  # operators differ in cost: the target is the measured budget; plan the decisions
                st["target"] = {self.budget.measure: self.budget.keep}  # for the count of a CED-order removal
                removals = U.needed(net, kept, self.budget, kept, st["dense"], None)
            st["steps"] = decision_steps(total_steps, self.m.period, self.m.finish_frac, removals, self.m.k_max)
        elif U.labels(net) != self.kept_now():
            raise BenchError(f"resumed model has units {U.labels(net)}, the schedule's state says "
                             f"{self.kept_now()}; delete the run's fine-tune checkpoint and rerun")
        self.start_log(run_dir, {"event": "start", "kind": st["kind"], "target": st["target"],
                                 "start_kept": st["start_kept"], "total_steps": st["total_steps"],
                                 "decision_steps": st["steps"],
                                 "budget": {"measure": self.budget.measure, "keep": self.budget.keep},
                                 "settings": self.m.settings()})

    def on_step(self, step: int, net, loss: float):
        st = self.state
        if step not in st["steps"] or any(h["step"] == step for h in st["history"]):
            return None
        kind = st.get("kind") or U.BLOCKS
        if kind == U.BLOCKS and len(net.kept_blocks) <= st["target"]:
            return None
        if kind == U.OPERATORS and measure(net)[self.budget.measure] / st["dense"] <= self.budget.keep + 1e-9:
            return None
        rec = self.decide(step, net, loss)
        self.record(rec)
        if not rec["removed"]:
            return None
        return U.plan_for(kind, rec["kept_after"], st["start_kept"],
                          {"method": "entpruner", "step": step, "removed": rec["removed"]})

    # ---- one decision ----------------------------------------------------------------------
    def kept_now(self) -> list[int]:
        st = self.state
        return st["history"][-1]["kept_after"] if st["history"] else list(st["start_kept"])

    def decide(self, step: int, net, loss: float) -> dict:
        t0 = time.perf_counter()
        m, st = self.m, self.state
        kept = U.labels(net)
        ced = m.ced(net, self.calib)
        order = removal_order(ced["ced"])
        remaining = U.needed(net, [kept[i] for i in order], self.budget, st["start_kept"], st["dense"],
                             st["target"])                          # fewest removals (CED order) that meet the budget
        left_after = sum(1 for s in st["steps"] if s > step)
        k_min = min(remaining, min_removals(m.pace, remaining, left_after, m.k_max))  # R12
        k_top = min(remaining, max(m.k_max, k_min))                # never past the target
        cands = []
        with net.eval_mode():
            for k in range(k_top + 1):
                drop = sorted(order[:k])
                with U.ablate(net, drop):
                    ntk, zico, layers = self.proxies(net)
                cands.append({"k": k, "remove": [kept[i] for i in drop], "ntk_cond": ntk, "zico": zico,
                              "zico_layers": layers,
                              "goodness": {"ntk": -math.log(ntk),
                                           "zico": zico / max(layers, 1) if m.zico_per_layer else zico}})
        voted, props, approval_k = cast_vote(cands, m.settings())
        chosen = max(voted, k_min)
        removed = [kept[i] for i in sorted(order[:chosen])]
        return {"event": "decision", "step": step, "loss": round(float(loss), 6), "kept_before": kept,
                "ced": ced["ced"], "ced_per_bin": ced["ced_per_bin"], "order": [kept[i] for i in order],
                "remaining": remaining, "left_after": left_after, "k_min": k_min, "candidates": cands,
                "vote_rule": m.vote_rule, "proposals": props, "approval_k": approval_k,
                "voted_k": voted, "chosen_k": chosen, "forced": chosen > voted, "cause": cause_of(voted, chosen),
                "by_vote": min(voted, chosen), "by_pace": chosen - min(voted, chosen),
                "removed": removed, "kept_after": [b for b in kept if b not in removed],
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


def read_log(decisions_path) -> tuple[dict, list[dict]]:
    """(start record, decisions in order) of an EntPruner decision log; a decision logged again
    after a resume supersedes the ones at its step and later."""
    p = stored(decisions_path)
    if p is None:
        raise BenchError(f"no EntPruner decision log at {decisions_path}")
    start, decisions = None, []
    for line in read_text(p).splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        if r["event"] == "start":
            start = r
        elif r["event"] == "decision":
            decisions = [d for d in decisions if d["step"] < r["step"]] + [r]
    if start is None:
        raise BenchError(f"{p} has no start record; it is not an EntPruner decision log")
    return start, decisions


def replay(decisions_path, verify: bool = True) -> Plan:
    """The final plan recorded in a decision log (read_log): the start structure minus every
    decision's removals, in order. verify: re-derive every decision from its logged values with
    the logged settings (removal order from the CED, the vote from the candidates' proxy values,
    the pace's minimum) and raise if the logged choice or removals differ."""
    p = Path(decisions_path)
    start, decisions = read_log(p)
    kind = start.get("kind", U.BLOCKS)
    kept = list(start["start_kept"])
    for d in decisions:
        if d["kept_before"] != kept:
            raise BenchError(f"{p}: decision at step {d['step']} starts from {d['kept_before']}, replay has {kept}")
        if verify:
            _verify(p, d, start["settings"])
        kept = [b for b in kept if b not in set(d["removed"])]
    return U.plan_for(kind, kept, start["start_kept"],
                      {"method": "entpruner", "replayed_from": str(p), "decisions": len(decisions),
                       "target": start["target"]})


def _verify(p: Path, d: dict, settings: dict) -> None:
    order = removal_order(d["ced"])
    if [d["kept_before"][i] for i in order] != d["order"]:
        raise BenchError(f"{p}: step {d['step']}: the logged removal order does not follow the logged CED")
    cands = [{"k": c["k"], "goodness": c["goodness"]} for c in d["candidates"]]
    voted, props, _ = cast_vote(cands, settings)
    if props is not None and props != d.get("proposals"):
        raise BenchError(f"{p}: step {d['step']}: the logged proposals {d.get('proposals')} do not follow from the "
                         f"logged proxy values ({props})")
    k_min = d["remaining"]
    if "left_after" in d:  # logs of version 1 did not record it
        k_min = min(d["remaining"], min_removals(settings.get("pace", "latest"), d["remaining"], d["left_after"],
                                                 settings["k_max"]))
        if k_min != d["k_min"]:
            raise BenchError(f"{p}: step {d['step']}: k_min {d['k_min']} does not follow the pace rule ({k_min})")
    chosen = max(voted, d["k_min"])
    removed = [d["kept_before"][i] for i in sorted(order[:chosen])]
    if voted != d["voted_k"] or chosen != d["chosen_k"] or removed != d["removed"]:
        raise BenchError(f"{p}: step {d['step']}: the logged choice (voted {d['voted_k']}, chose {d['chosen_k']}, "
                         f"removed {d['removed']}) does not follow from the logged values (voted {voted}, "
                         f"chose {chosen}, removed {removed})")


# --------------------------------------------------------------------------------------------
# Summary of a run's decisions: how often the vote, not the pace, decided
# --------------------------------------------------------------------------------------------

def summarize(decisions_path) -> dict:
    """Counts of a decision log (read_log): decisions, adaptive ones (the vote alone removed what was
    removed), paced ones (the pace forced more than the vote asked), idle ones (nothing removed), and
    the blocks removed by the vote and by the pace. Logs of version 2 (no `cause`) are classified
    from their voted and chosen counts the same way."""
    start, decisions = read_log(decisions_path)
    causes = [d.get("cause") or cause_of(d["voted_k"], d["chosen_k"]) for d in decisions]
    by_vote = sum(min(d["voted_k"], d["chosen_k"]) for d in decisions)
    removed = sum(d["chosen_k"] for d in decisions)
    settings = start.get("settings", {})
    return {"path": str(decisions_path), "decisions": len(decisions), "adaptive": causes.count("vote"),
            "paced": causes.count("pace"), "idle": causes.count("none"), "removed": removed,
            "removed_by_vote": by_vote, "removed_by_pace": removed - by_vote,
            "vote_rule": settings.get("vote_rule", "approval"), "pace": settings.get("pace", "latest"),
            "steps": [d["step"] for d in decisions], "causes": causes}


def summary_line(s: dict) -> str:
    return (f"adaptive decisions: {s['adaptive']} of {s['decisions']} (paced {s['paced']}, idle {s['idle']}); "
            f"blocks removed by the vote {s['removed_by_vote']} of {s['removed']} "
            f"[vote_rule={s['vote_rule']}, pace={s['pace']}] {s['path']}")


def main(argv=None) -> int:
    """python -m methods.entpruner.schedule <decision log or folder> ...: one summary line per log
    (folders are searched for entpruner_decisions.jsonl), then the total over all of them."""
    import argparse

    from bench.results import set_aside

    ap = argparse.ArgumentParser(prog="python -m methods.entpruner.schedule", description=main.__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+", help="entpruner_decisions.jsonl files or folders holding them")
    args = ap.parse_args(argv)
    logs, left = [], {"unfinished (no row.json)": 0, "set aside (a hidden folder: another teacher's)": 0}
    for p in map(Path, args.paths):
        if p.is_file():  # a log named on its own is read as it is
            logs.append(p)
            continue
        for q in sorted([*p.rglob(LOG_NAME), *p.rglob(LOG_NAME + ".gz")]):  # a folder: finished runs' logs only
            if set_aside(q, p):
                left["set aside (a hidden folder: another teacher's)"] += 1
            elif not (q.parent / "row.json").is_file():
                left["unfinished (no row.json)"] += 1
            else:
                logs.append(q)
    if not logs:
        print(f"error: no {LOG_NAME} of a finished run under {' '.join(args.paths)}", file=sys.stderr)
        return 2
    try:
        sums = [summarize(q) for q in logs]
    except (BenchError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for s in sums:
        print(summary_line(s))
    if len(sums) > 1:
        tot = {k: sum(s[k] for s in sums) for k in ("adaptive", "decisions", "paced", "idle", "removed_by_vote",
                                                     "removed")}
        print(f"total over {len(sums)} runs: adaptive decisions: {tot['adaptive']} of {tot['decisions']} (paced "
              f"{tot['paced']}, idle {tot['idle']}); blocks removed by the vote {tot['removed_by_vote']} of "
              f"{tot['removed']}")
    if any(left.values()):
        print("left out: " + ", ".join(f"{n} {why}" for why, n in left.items() if n))
    return 0


if __name__ == "__main__":
    sys.exit(main())
