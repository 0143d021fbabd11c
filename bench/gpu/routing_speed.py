"""Per-stage latency of a stage-wise (routed) DiT-XL/2-shaped model against static pruned models.

    python -m bench.gpu.routing_speed                              # cuda, DiT-XL/2 shape, ~5 min
    python -m bench.gpu.routing_speed --smoke --out /tmp/rs        # tiny DiT on the CPU, seconds
    python -m bench.gpu.routing_speed --render [--width ...]       # rewrite the .md from the .json, no measurement

The routed model (bench.routing, the model a Diff-ES plan gives) stores the union of its stages'
blocks once and runs, for each timestep stage, only that stage's blocks. Default plan: 4 equal u
stages keeping 10, 12, 16, 18 of the 28 blocks (evenly spaced sets with different offsets, so all
28 are stored; mean 14 per stage = the same trajectory-average MACs as the static 14-block
model). Random weights (adaLN-Zero parts randomised, bench.gpu.speed), random inputs, every sample
of a batch at a timestep inside the measured stage, `bench.metrics.cost.benchmark_forward`.

Measured, one model on the device at a time, batch 64 (--batches), bf16 (--dtypes):
  routed     eager, the routed forward as sampling runs it (routing decision: one host sync)
  pinned     eager, the stage fixed beforehand (StageRouter.pin: no decision)
  same_n     a static model with the stage's number of blocks (what routing costs over static)
  static14   the static 14-block model; dense28 the dense model (references)
  compile    pinned stages and static14 under torch.compile (--compile; compilation ~0.5-1 min each)
Per stage: latency, its ratio to same_n (routing overhead) and to static14; the routed model's
trajectory-weighted mean (uniform stage weights) against static14. Also a check that each stage's
output equals the static model of that stage's block set (max abs difference). Writes
<out>.json and <out>.md (rewritten after every measurement, so a killed run keeps what it has).

Width mode (Diff-ES second-order backend's routed model, bench.routing width routing):

    python -m bench.gpu.routing_speed --width 0.75,0.5,0.5,0.25     # cuda, DiT-XL/2 shape, ~4 min
    python -m bench.gpu.routing_speed --width 0.75,0.5,0.5,0.25 --smoke --out /tmp/rsw   # CPU, seconds

4 equal-u stages keep those fractions of every block's heads and MLP hidden channels (all 28
blocks), each stage a different window of one seeded random permutation per width group (stages of
one fraction keep different units; the windows cover every unit, so the model stores all of
them); every stage has its own thin attn.proj / mlp.fc2 (the dense columns of its units plus a
0.05 std random perturbation) in a stage bank, written as the plan's bank file and read back by
bench.surgery. Before timing (fp32, CPU): each stage's routed (and pinned) output against the
static width-pruned model (a width Plan through bench.surgery, i.e. Torch-Pruning surgery) with
that stage's keep set and thin weights. Measured per stage: routed eager, pinned eager, same_frac
= that static model (one per distinct width); compiled: the pinned stage and same_frac (a new width
first, a repeated one last). Per stage routed / same_frac (routing overhead); the weighted mean
against the static model of the trajectory-mean width; dense eager. Default out
results/gpu/routing_speed_width; budget 210 s, and no measurement starts that would end after it
(expected = the longest of its mode so far; a compiled stage reserves its static partner's time),
so the run, compiles included, ends within ~4 min on an H200 (--no-compile: ~2 min).
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from bench.io import atomic_write_text
from bench.metrics.cost import benchmark_forward, count_macs, count_params, device_name, random_inputs
from bench.tables import markdown_table


def stage_sets(depth: int, counts: list[int]) -> list[list[int]]:
    """Evenly spaced keep sets of the given sizes, each shifted so the stages differ."""
    out = []
    for s, n in enumerate(counts):
        base = [int(i * depth / n) for i in range(n)]
        shift = s % max(1, depth // n)
        out.append(sorted({(b + shift) % depth for b in base}))
    return out


def build(model: str, counts: list[int], keep: int, **model_kw):
    from bench import routing, surgery
    from bench.api import Plan
    from bench.gpu.speed import randomize_zero_init_
    from bench.models import build as build_model

    torch.manual_seed(0)
    dense = build_model(model, **model_kw)
    randomize_zero_init_(dense.net)
    depth = len(dense.net.blocks)
    sets = stage_sets(depth, counts)
    S = len(sets)
    stages = [{"u_range": [s / S, (s + 1) / S], "keep": {"blocks": b}, "weight": 1.0 / S} for s, b in enumerate(sets)]
    plan = Plan("stage", {"blocks": sorted(set().union(*map(set, sets)))}, stages=stages)
    routed = surgery.apply(copy.deepcopy(dense), plan)
    static = lambda ids: surgery.apply(copy.deepcopy(dense), Plan("block", {"blocks": list(ids)}))
    static_keep = static(sorted({round(i * depth / keep) for i in range(keep)}))
    return dense, routed, static, static_keep, sets, routing.router(routed)


def _f(v, p: int = 3) -> str:
    return "-" if v is None else f"{v:.{p}f}"


def _table(cols: list[tuple[str, object]], rows: list[dict]) -> list[str]:
    """Markdown table lines; cols = (header, cell): a row key (a float, 3 decimals) or a function
    of the row giving the cell's text."""
    cell = lambda c, r: c(r) if callable(c) else _f(r.get(c))
    return markdown_table([h for h, _ in cols], [[cell(c, r) for _, c in cols] for r in rows]).split("\n")


_SETTING = [("mode", lambda r: str(r["mode"])), ("dtype", lambda r: str(r["dtype"])), ("batch", lambda r: str(r["batch"]))]


def _failed(res: dict, tag: str, e: Exception, log, who: str) -> None:
    """Record a measurement that raised (its first line) in res["errors"] and go on."""
    msg = f"{tag}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    res["errors"].append(msg)
    log(f"[{who}] {msg}")


def _notes(res: dict) -> list[str]:
    out = []
    if res["errors"]:
        out += ["", "Errors:", ""] + [f"- {e}" for e in res["errors"]]
    if res["skipped"]:
        out += ["", "Not measured:", ""] + [f"- {e}" for e in res["skipped"]]
    return out


def _md(res: dict) -> str:
    m = res["meta"]
    lines = [f"# Stage-wise routing: per-stage latency, {m['model']} ({m['depth']} blocks)", "",
             f"device: {m['device']} · torch {m['torch']} · CUDA {m['cuda'] or '-'} · {m['warmup']} warm-up + median "
             f"of {m['reps']} timed calls · random weights and inputs · every sample's t inside the stage", "",
             f"routed model: {m['stages']} stages (equal u ranges, weight 1/{m['stages']} each) keeping "
             f"{m['stage_blocks']} blocks (mean {m['mean_blocks']:.2f}); stores {m['routed_stored_blocks']} blocks, "
             f"{m['routed_params_M']:.1f} M params (static {m['static_blocks']}: {m['static_params_M']:.1f} M, dense "
             f"{m['dense_params_M']:.1f} M). MACs per image: stages {', '.join(f'{v:.4g}' for v in m['stage_macs_G'])} G, "
             f"weighted mean {m['routed_macs_G']:.4g} G vs static {m['static_macs_G']:.4g} G.", "",
             "Stage keep sets: " + "; ".join(f"{s}: {b}" for s, b in enumerate(m["stage_sets"])), ""]
    diff = lambda r: _f(r.get("max_abs_diff"), 2) if r.get("max_abs_diff") is not None else "-"
    lines += _table(_SETTING + [("stage", lambda r: str(r["stage"])), ("blocks", lambda r: str(r["blocks"])),
                                ("routed ms", "routed_ms"), ("pinned ms", "pinned_ms"), ("same-n static ms", "same_n_ms"),
                                ("routed / same-n", "routed_over_same_n"), ("routed / static", "routed_over_static"),
                                ("out max abs diff", diff)], res["stages"])
    lines += [""] + _table(_SETTING + [("routed weighted mean ms", "routed_mean_ms"), ("static ms", "static_ms"),
                                       ("dense ms", "dense_ms"), ("speedup vs dense: routed", "routed_speedup"),
                                       ("static", "static_speedup"), ("MAC ratio routed/static", "mac_ratio")],
                           res["summary"])
    lines += ["", "routed: the routed forward picks the stage from t (one device-to-host sync per call); pinned: the "
              "stage fixed beforehand, as a sampler that knows its step could (and the compiled graphs); same-n: a "
              "static model with the stage's number of blocks; routed / static: against the static model with the "
              "trajectory-average number of blocks. In compile mode the routed column is the pinned graph."]
    return "\n".join(lines + _notes(res)) + "\n"


def _write(out: Path, res: dict, md=None) -> None:
    atomic_write_text(out.with_suffix(".json"), json.dumps(res, indent=1))
    atomic_write_text(out.with_suffix(".md"), (md or _md)(res))


def run(out: Path, device: str, model: str, counts: list[int], keep: int, settings: list, warmup: int, reps: int,
        budget_s: float, model_kw: dict, log=print) -> dict:
    from bench import routing

    t_start = time.perf_counter()
    dense, routed, static, static_keep, sets, r = build(model, counts, keep, **model_kw)
    proc = dense.process
    x1, _, y1 = random_inputs(dense, 1, "cpu")
    stage_macs = []
    for s in range(len(sets)):
        with r.pin(s):
            stage_macs.append(count_macs(routed.net.eval(), x1, routing.t_in_stage(proc, r.edges, s, 1), y1))
    t1 = random_inputs(dense, 1, "cpu")
    meta = {"model": model, "model_kw": model_kw, "depth": len(dense.net.blocks), "device": device_name(device),
            "device_type": torch.device(device).type, "torch": torch.__version__,
            "cuda": torch.version.cuda if torch.device(device).type == "cuda" else None, "warmup": warmup, "reps": reps,
            "stages": len(sets), "stage_sets": sets, "stage_blocks": [len(b) for b in sets],
            "mean_blocks": sum(map(len, sets)) / len(sets), "routed_stored_blocks": len(routed.net.blocks),
            "routed_params_M": count_params(routed.net) / 1e6, "static_params_M": count_params(static_keep.net) / 1e6,
            "dense_params_M": count_params(dense.net) / 1e6, "static_blocks": len(static_keep.net.blocks),
            "stage_macs_G": [v / 1e9 for v in stage_macs], "routed_macs_G": sum(stage_macs) / len(sets) / 1e9,
            "static_macs_G": count_macs(static_keep.net.eval(), *t1) / 1e9,
            "dense_macs_G": count_macs(dense.net.eval(), *t1) / 1e9, "settings": [list(map(str, s)) for s in settings],
            "budget_s": budget_s}
    res = {"meta": meta, "stages": [], "summary": [], "errors": [], "skipped": []}
    same_n = {}

    def bench(net, inputs, mode, dtype, tag):
        try:
            net.net.to(device)
            return benchmark_forward(net.net, inputs, device, mode, dtype, warmup=warmup, reps=reps)
        except Exception as e:  # an OOM or a compile error must not lose the other measurements
            return _failed(res, tag, e, log, "routing")
        finally:
            net.net.to("cpu")
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()

    for mode, dtype, batch in settings:
        head = f"{mode} {dtype} batch {batch}"
        if time.perf_counter() - t_start > budget_s:
            res["skipped"].append(f"{head}: time budget ({budget_s:.0f} s) spent")
            continue
        x, _, y = random_inputs(dense, batch, device, seed=batch)
        summ = {"mode": mode, "dtype": dtype, "batch": batch, "mac_ratio": meta["routed_macs_G"] / meta["static_macs_G"]}
        rows = []
        for s, ids in enumerate(sets):
            t = routing.t_in_stage(proc, r.edges, s, batch, device)
            row = {"mode": mode, "dtype": dtype, "batch": batch, "stage": s, "blocks": len(ids)}
            if mode == "eager":
                rec = bench(routed, (x, t, y), mode, dtype, f"{head} stage {s} routed")
                row["routed_ms"] = rec and rec["median_ms"]
            with r.pin(s):
                rec = bench(routed, (x, t, y), mode, dtype, f"{head} stage {s} pinned")
            row["pinned_ms"] = rec and rec["median_ms"]
            if mode == "compile":
                row["routed_ms"] = row["pinned_ms"]
            n = len(ids)
            if (mode, dtype, batch, n) not in same_n:
                net_n = static(sorted({round(i * meta["depth"] / n) for i in range(n)}))
                rec = bench(net_n, (x, t, y), mode, dtype, f"{head} static {n} blocks")
                same_n[(mode, dtype, batch, n)] = rec and rec["median_ms"]
            row["same_n_ms"] = same_n[(mode, dtype, batch, n)]
            if (mode, dtype, batch) == settings[0]:
                with torch.no_grad():  # correctness (fp32, CPU): the stage's output is the static model of its set
                    ref = static(ids)
                    xs, ts, ys = x[:2].cpu(), t[:2].cpu(), y[:2].cpu()
                    row["max_abs_diff"] = float((routed.net.eval()(xs, ts, ys) - ref.net.eval()(xs, ts, ys)).abs().max())
            rows.append(row)
            log(f"[routing] {head} stage {s} ({n} blocks): routed {row.get('routed_ms')} ms, pinned {row['pinned_ms']} ms, "
                f"same-n {row['same_n_ms']} ms")
        rec = bench(static_keep, (x, routing.t_in_stage(proc, r.edges, 0, batch, device), y), mode, dtype, f"{head} static")
        summ["static_ms"] = rec and rec["median_ms"]
        if mode == "eager":
            rec = bench(dense, (x, routing.t_in_stage(proc, r.edges, 0, batch, device), y), mode, dtype, f"{head} dense")
            summ["dense_ms"] = rec and rec["median_ms"]
        for row in rows:
            if row.get("routed_ms") and row.get("same_n_ms"):
                row["routed_over_same_n"] = row["routed_ms"] / row["same_n_ms"]
            if row.get("routed_ms") and summ.get("static_ms"):
                row["routed_over_static"] = row["routed_ms"] / summ["static_ms"]
        if all(row.get("routed_ms") for row in rows):
            summ["routed_mean_ms"] = sum(row["routed_ms"] for row in rows) / len(rows)  # uniform stage weights
        if summ.get("dense_ms"):
            for k, v in (("routed_speedup", summ.get("routed_mean_ms")), ("static_speedup", summ.get("static_ms"))):
                if v:
                    summ[k] = summ["dense_ms"] / v
        res["stages"] += rows
        res["summary"].append(summ)
        meta["elapsed_s"] = time.perf_counter() - t_start
        _write(out, res)
    meta["elapsed_s"] = time.perf_counter() - t_start
    _write(out, res)
    return res


# --------------------------------------------------------------------------------------------
# Width mode (--width): per-stage heads / MLP channels (Diff-ES second-order backend)
# --------------------------------------------------------------------------------------------

def kept_count(n: int, frac: float) -> int:
    """Units a group of n keeps at fraction frac (bench.gpu.speed's rule: round, at least one)."""
    return max(1, min(n, round(frac * n)))


def width_keep_sets(dense, fracs: list[float], seed: int = 0) -> list[dict]:
    """Per stage, a keep set naming every block and, in every width group, that stage's fraction of
    the group's units: a cyclic window of one seeded random permutation per group, the window of
    stage s starting at s n / S, so stages keep different (scattered) units, stages of one fraction
    differ too, and the union of the default windows is every unit."""
    S = len(fracs)
    groups = dense.width_groups()
    perms = {}
    for i, (name, g) in enumerate(groups.items()):
        perm = torch.randperm(g.size, generator=torch.Generator().manual_seed(seed * 100_003 + i)).tolist()
        perms[name] = [g.dense_ids[p] for p in perm]
    out = []
    for s, f in enumerate(fracs):
        keep = {"blocks": list(dense.kept_blocks)}
        for name, g in groups.items():
            n, off = g.size, s * g.size // S
            keep[name] = sorted(perms[name][(off + j) % n] for j in range(kept_count(n, f)))
        out.append(keep)
    return out


def perturbed_thin(dense, keeps: list[dict], scale: float = 0.05, seed: int = 0) -> dict:
    """Each stage's own thin output projections {(stage, group): [out, kept x width]}: the dense
    projection's columns of the stage's units plus a seeded Gaussian perturbation (scale x the
    columns' std), stand-ins for OBS-compensated weights, so every stage has separate weights."""
    from bench import routing

    thin = {}
    for s, keep in enumerate(keeps):
        g = torch.Generator().manual_seed(seed * 1_000_003 + s)
        for name, ids in keep.items():
            if name == "blocks":
                continue
            W = routing.consumer_columns(dense, name, ids).detach().float()
            thin[(s, name)] = W + scale * float(W.std()) * torch.randn(W.shape, generator=g)
    return thin


def static_width(dense, keep: dict, thin_s: dict | None = None):
    """The static width-pruned model of one keep set (a width Plan through bench.surgery, i.e.
    Torch-Pruning's pruning functions), with the given thin projections written into its
    attn.proj / mlp.fc2 (absent: the dense columns)."""
    from bench import routing, surgery
    from bench.api import Plan

    net = surgery.apply(copy.deepcopy(dense), Plan("width", {k: v for k, v in keep.items() if k != "blocks"}))
    with torch.no_grad():
        for name, W in (thin_s or {}).items():
            b, kind = routing._split_group(name)
            mod = routing._module(net.net.blocks[list(net.kept_blocks).index(b)], kind)
            routing._consumer(mod, kind).weight.copy_(W)
    return net


def build_width(model: str, fracs: list[float], bank_dir, scale: float = 0.05, **model_kw) -> dict:
    """Dense model, the width-routed model of a stage plan (4 equal-u stages, weight 1/S, bank of
    per-stage thin projections written to bank_dir and read back by bench.surgery), the keep sets
    and each stage's thin weights."""
    from bench import routing, stage_bank, surgery
    from bench.api import Plan
    from bench.gpu.speed import randomize_zero_init_
    from bench.models import build as build_model

    torch.manual_seed(0)
    dense = build_model(model, **model_kw)
    randomize_zero_init_(dense.net)
    keeps = width_keep_sets(dense, fracs)
    thin = perturbed_thin(dense, keeps, scale)
    S = len(fracs)
    stages = [{"u_range": [s / S, (s + 1) / S], "keep": k, "weight": 1.0 / S} for s, k in enumerate(keeps)]
    union, tensors = routing.pack_bank(dense, stages, thin)
    ref = stage_bank.save_bank(tensors, bank_dir)
    del tensors
    plan = Plan("stage", {"blocks": list(dense.kept_blocks), **union}, stages=stages, meta={"bank": ref})
    routed = surgery.apply(copy.deepcopy(dense), plan)
    return {"dense": dense, "routed": routed, "router": routing.router(routed), "keeps": keeps, "thin": thin,
            "plan": plan, "bank": ref, "union": union}


def _md_width(res: dict) -> str:
    m = res["meta"]
    lines = [f"# Stage-wise width routing: per-stage latency, {m['model']} ({m['depth']} blocks, {m['heads']} heads, "
             f"MLP {m['mlp_hidden']})", "",
             f"device: {m['device']} · torch {m['torch']} · CUDA {m['cuda'] or '-'} · {m['warmup']} warm-up + median "
             f"of {m['reps']} timed calls · random weights and inputs · every sample's t inside the stage", "",
             f"routed model (Diff-ES second-order backend's, bench.routing): {m['stages']} stages (equal u ranges, "
             f"weight 1/{m['stages']} each) keeping width fractions {m['fracs']} of every block's heads and MLP hidden "
             f"channels ({', '.join(f'{h} heads / {c} ch' for h, c in zip(m['stage_heads'], m['stage_mlp_hidden']))}); "
             f"the q/k/v and fc1 rows are selected per stage from the shared weights, and every stage has its own thin "
             f"attn.proj / mlp.fc2 (the dense columns + a {m['perturbation']:g} std random perturbation) from the bank "
             f"({m['bank_tensors']} tensors, {m['bank_params_M']:.1f} M params). Stores {m['routed_params_M']:.1f} M "
             f"params (shared union {m['routed_params_M'] - m['bank_params_M']:.1f} M + bank; dense "
             f"{m['dense_params_M']:.1f} M). MACs per image: stages "
             f"{', '.join(f'{v:.4g}' for v in m['stage_macs_G'])} G (static same-fraction "
             f"{', '.join(f'{v:.4g}' for v in m['static_macs_G'])} G), weighted mean {m['routed_macs_G']:.4g} G vs "
             f"static {m['mean_frac']:g} width {m['static_mean_macs_G']:.4g} G, dense {m['dense_macs_G']:.4g} G.", "",
             f"Keep sets: every stage's units are a different window of one random permutation per group (stages of "
             f"one fraction differ: {m['stages_distinct']}); block 0 heads per stage: "
             + "; ".join(f"{s}: {h}" for s, h in enumerate(m["block0_heads"])), "",
             "Check (fp32, CPU, 2 samples, before timing): each stage's routed output against the static model with "
             "the same keep set and that stage's thin weights: max abs diff "
             + ", ".join(f"stage {c['stage']} {c['max_abs_diff']:.3g} (pinned {c['pinned_max_abs_diff']:.3g}, output "
                         f"max {c['out_max_abs']:.3g})" for c in res["check"]), ""]
    diff = {c["stage"]: c["max_abs_diff"] for c in res["check"]}
    lines += _table(_SETTING + [("stage", lambda r: str(r["stage"])), ("width", lambda r: f"{r['frac']:g}"),
                                ("routed ms", "routed_ms"), ("pinned ms", "pinned_ms"),
                                ("same-frac static ms", "same_frac_ms"), ("routed / same-frac", "routed_over_same_frac"),
                                ("pinned / same-frac", "pinned_over_same_frac"),
                                ("routed / static mean", "routed_over_static_mean"),
                                ("out max abs diff", lambda r: f"{diff[r['stage']]:.2g}")], res["stages"])
    lines += [""] + _table(_SETTING + [("routed weighted mean ms", "routed_mean_ms"),
                                       (f"static {m['mean_frac']:g} width ms", "static_mean_ms"), ("dense ms", "dense_ms"),
                                       ("speedup vs dense: routed", "routed_speedup"), ("static", "static_speedup"),
                                       ("MAC ratio routed/static", "mac_ratio")], res["summary"])
    lines += ["", "routed: the routed forward picks the stage from t (one device-to-host sync per call) and gathers "
              "the stage's q/k/v and fc1 rows from the shared weights; pinned: the stage fixed beforehand "
              "(StageRouter.pin, as a sampler that knows its step could, and the compiled graphs); same-frac: the "
              "static width-pruned model (Torch-Pruning surgery) with the stage's keep set and thin weights, the "
              "routing-overhead reference; static mean: the static model with the trajectory-mean width. In compile "
              "mode the routed column is the pinned graph. "
              f"Setup (CPU: models, bank, check) {_f(m.get('setup_s'), 1)} s; whole run {_f(m.get('elapsed_s'), 1)} s "
              f"of a {m['budget_s']:g} s budget."]
    return "\n".join(lines + _notes(res)) + "\n"


def _width_derived(res: dict) -> None:
    """Ratios and per-setting summaries from the rows measured so far."""
    m = res["meta"]
    w = m["stage_weights"]
    for s in res["summary"]:
        rows = [r for r in res["stages"] if (r["mode"], r["dtype"], r["batch"]) == (s["mode"], s["dtype"], s["batch"])]
        for r in rows:
            for k in ("routed", "pinned"):
                if r.get(f"{k}_ms") and r.get("same_frac_ms"):
                    r[f"{k}_over_same_frac"] = r[f"{k}_ms"] / r["same_frac_ms"]
            if r.get("routed_ms") and s.get("static_mean_ms"):
                r["routed_over_static_mean"] = r["routed_ms"] / s["static_mean_ms"]
        if len(rows) == m["stages"] and all(r.get("routed_ms") for r in rows):
            s["routed_mean_ms"] = sum(a * r["routed_ms"] for a, r in zip(w, rows))
        if s.get("dense_ms"):
            for k, v in (("routed_speedup", s.get("routed_mean_ms")), ("static_speedup", s.get("static_mean_ms"))):
                if v:
                    s[k] = s["dense_ms"] / v


def run_width(out: Path, device: str, model: str, fracs: list[float], settings: list, warmup: int, reps: int,
              budget_s: float, model_kw: dict, log=print) -> dict:
    """Build, check (fp32, CPU), then time every setting; models move to the device one at a time.
    Budget: no measurement starts after budget_s, nor one expected to end after it (expected = the
    longest measurement of its mode so far; a compiled stage reserves room for its static partner)."""
    import tempfile

    from bench import routing

    t_start = time.perf_counter()
    elapsed = lambda: time.perf_counter() - t_start
    with tempfile.TemporaryDirectory(prefix="routing_speed_bank_") as tmp:
        W = build_width(model, fracs, tmp, **model_kw)
    dense, routed, r, keeps, thin = W["dense"], W["routed"], W["router"], W["keeps"], W["thin"]
    S, proc = len(fracs), dense.process
    blk0 = dense.net.blocks[0]
    H, hidden = blk0.attn.num_heads, blk0.mlp.fc1.out_features
    key_of = lambda f: (kept_count(H, f), kept_count(hidden, f))  # what a static model's shapes depend on
    mean_frac = sum(fracs) / S
    # one static same-fraction model per distinct shape: the first stage of that shape's exact model
    first_of = {}
    for s, f in enumerate(fracs):
        first_of.setdefault(key_of(f), s)

    x1, _, y1 = random_inputs(dense, 1, "cpu")
    stage_macs, static_macs, check, statics = [], [], [], {}
    xs, _, ys = random_inputs(dense, 2, "cpu", seed=2)
    for s in range(S):
        ref = static_width(dense, keeps[s], {g: w for (k, g), w in thin.items() if k == s})
        ts = routing.t_in_stage(proc, r.edges, s, 2)
        with torch.no_grad():  # correctness (fp32, CPU) before any timing
            want = ref.net.eval()(xs, ts, ys)
            got = routed.net.eval()(xs, ts, ys)
            with r.pin(s):
                got_pin = routed.net(xs, ts, ys)
        check.append({"stage": s, "max_abs_diff": float((got - want).abs().max()),
                      "pinned_max_abs_diff": float((got_pin - want).abs().max()), "out_max_abs": float(want.abs().max())})
        with r.pin(s):
            stage_macs.append(count_macs(routed.net.eval(), x1, routing.t_in_stage(proc, r.edges, s, 1), y1))
        static_macs.append(count_macs(ref.net.eval(), x1, routing.t_in_stage(proc, r.edges, s, 1), y1))
        if first_of[key_of(fracs[s])] == s:
            statics[key_of(fracs[s])] = ref
        del ref
        log(f"[routing-width] stage {s} (width {fracs[s]:g}): routed vs static max abs diff {check[-1]['max_abs_diff']:.3g}")
    if key_of(mean_frac) not in statics:  # the trajectory-mean reference, when no stage has its width
        statics[key_of(mean_frac)] = static_width(dense, width_keep_sets(dense, [mean_frac], seed=1)[0])
    static_mean = statics[key_of(mean_frac)]
    t1 = random_inputs(dense, 1, "cpu")
    bank = getattr(routed.net, "stage_bank", None)
    pairs = [(keeps[a][g], keeps[b][g]) for a in range(S) for b in range(a + 1, S) if fracs[a] == fracs[b]
             for g in keeps[a] if g != "blocks"]
    meta = {"mode": "width", "model": model, "model_kw": model_kw, "depth": len(dense.net.blocks), "heads": H,
            "mlp_hidden": hidden, "device": device_name(device), "device_type": torch.device(device).type,
            "torch": torch.__version__, "cuda": torch.version.cuda if torch.device(device).type == "cuda" else None,
            "warmup": warmup, "reps": reps, "stages": S, "fracs": fracs, "stage_weights": list(r.weights),
            "stage_heads": [kept_count(H, f) for f in fracs], "stage_mlp_hidden": [kept_count(hidden, f) for f in fracs],
            "block0_heads": [k.get(f"blocks.{dense.kept_blocks[0]}.attn.heads") for k in keeps],
            "stages_distinct": all(a != b for a, b in pairs) if pairs else None,
            "perturbation": 0.05, "bank_tensors": W["bank"]["tensors"], "bank_params_M": W["bank"]["params"] / 1e6,
            "bank_sha256": W["bank"]["sha256"], "bank_stage_entries": sum(1 for n in (bank.names if bank else [])
                                                                          if n.startswith("stage")),
            "routed_params_M": count_params(routed.net) / 1e6, "dense_params_M": count_params(dense.net) / 1e6,
            "static_params_M": {f"{k[0]}h/{k[1]}c": count_params(v.net) / 1e6 for k, v in statics.items()},
            "stage_macs_G": [v / 1e9 for v in stage_macs], "static_macs_G": [v / 1e9 for v in static_macs],
            "routed_macs_G": sum(a * v for a, v in zip(r.weights, stage_macs)) / 1e9, "mean_frac": mean_frac,
            "static_mean_macs_G": count_macs(static_mean.net.eval(), *t1) / 1e9,
            "dense_macs_G": count_macs(dense.net.eval(), *t1) / 1e9, "settings": [list(map(str, s)) for s in settings],
            "budget_s": budget_s, "setup_s": elapsed()}
    del thin, W
    res = {"meta": meta, "check": check, "stages": [], "summary": [], "errors": [], "skipped": []}
    _write(out, res, _md_width)
    log(f"[routing-width] setup {meta['setup_s']:.1f} s; bank {meta['bank_params_M']:.1f} M params")

    longest = {}  # mode -> longest measurement so far (s): what the budget expects of the next one
    resident = [None]

    def place(net):  # one model on the device at a time
        if resident[0] is not net:
            if resident[0] is not None:
                resident[0].net.to("cpu")
                if torch.device(device).type == "cuda":
                    torch.cuda.empty_cache()
            net.net.to(device)
            resident[0] = net

    def fits(tag, mode, n=1):
        need = n * longest.get(mode, 0.0)
        if elapsed() + need > budget_s:
            res["skipped"].append(f"{tag}: time budget ({budget_s:.0f} s) spent" if need == 0 or elapsed() > budget_s
                                  else f"{tag}: would end after the time budget ({budget_s:.0f} s; at "
                                       f"{elapsed():.0f} s, needs ~{need:.0f} s)")
            log(f"[routing-width] skip {res['skipped'][-1]}")
            return False
        return True

    def bench(net, inputs, mode, dtype, tag):
        t0 = time.perf_counter()
        try:
            place(net)
            return benchmark_forward(net.net, inputs, device, mode, dtype, warmup=warmup, reps=reps)["median_ms"]
        except Exception as e:  # an OOM or a compile error must not lose the other measurements
            return _failed(res, tag, e, log, "routing-width")
        finally:
            longest[mode] = max(longest.get(mode, 0.0), time.perf_counter() - t0)

    def save():
        meta["elapsed_s"] = elapsed()
        _width_derived(res)
        _write(out, res, _md_width)

    for mode, dtype, batch in settings:
        head = f"{mode} {dtype} batch {batch}"
        if not fits(head, mode):
            continue
        x, _, y = random_inputs(dense, batch, device, seed=batch)
        ts = [routing.t_in_stage(proc, r.edges, s, batch, device) for s in range(S)]
        rows = [{"mode": mode, "dtype": dtype, "batch": batch, "stage": s, "frac": fracs[s],
                 "heads": kept_count(H, fracs[s]), "mlp_hidden": kept_count(hidden, fracs[s])} for s in range(S)]
        summ = {"mode": mode, "dtype": dtype, "batch": batch, "mac_ratio": meta["routed_macs_G"] / meta["static_mean_macs_G"]}
        res["stages"] += rows
        res["summary"].append(summ)
        same = {}  # shape key -> static latency (ms) in this setting

        def static_of(s, tag):
            k = key_of(fracs[s])
            if k not in same and fits(f"{head} {tag}", mode):
                same[k] = bench(statics[k], (x, ts[s], y), mode, dtype, f"{head} {tag}")
            return same.get(k)

        if mode == "eager":  # grouped by model: the routed model stays on the device for all its stages
            for s in range(S):
                if fits(f"{head} stage {s} routed", mode):
                    rows[s]["routed_ms"] = bench(routed, (x, ts[s], y), mode, dtype, f"{head} stage {s} routed")
                if fits(f"{head} stage {s} pinned", mode):
                    with r.pin(s):
                        rows[s]["pinned_ms"] = bench(routed, (x, ts[s], y), mode, dtype, f"{head} stage {s} pinned")
                save()
            for s in range(S):
                rows[s]["same_frac_ms"] = static_of(s, f"static width {fracs[s]:g}")
                save()
        else:  # compiled: a stage and its static partner together; a new width first (a repeated width last)
            order = sorted(range(S), key=lambda s: (first_of[key_of(fracs[s])] != s, s))
            for s in order:
                n = 1 + (key_of(fracs[s]) not in same)
                if not fits(f"{head} stage {s} pinned + static", mode, n):
                    continue
                with r.pin(s):
                    rows[s]["pinned_ms"] = rows[s]["routed_ms"] = bench(routed, (x, ts[s], y), mode, dtype,
                                                                        f"{head} stage {s} pinned")
                rows[s]["same_frac_ms"] = static_of(s, f"static width {fracs[s]:g}")
                save()
                log(f"[routing-width] {head} stage {s}: pinned {rows[s]['pinned_ms']} ms, same-frac "
                    f"{rows[s]['same_frac_ms']} ms")
        k = key_of(mean_frac)
        if k not in same and fits(f"{head} static width {mean_frac:g}", mode):
            same[k] = bench(static_mean, (x, ts[0], y), mode, dtype, f"{head} static width {mean_frac:g}")
        summ["static_mean_ms"] = same.get(k)
        if mode == "eager" and fits(f"{head} dense", mode):
            summ["dense_ms"] = bench(dense, (x, ts[0], y), mode, dtype, f"{head} dense")
        for row in rows:
            if mode == "eager":
                log(f"[routing-width] {head} stage {row['stage']} (width {row['frac']:g}): routed "
                    f"{row.get('routed_ms')} ms, pinned {row.get('pinned_ms')} ms, same-frac {row.get('same_frac_ms')} ms")
        save()
    if resident[0] is not None:
        resident[0].net.to("cpu")
    save()
    return res


def _timing_settings(a) -> tuple[str, list, int, int]:
    """(device, [(mode, dtype, batch)], warmup, reps) from the command line; --smoke: a CPU check
    of the script (batch 4, fp32 and bf16, eager only unless --compile)."""
    batches = [int(v) for v in a.batches.split(",")]
    dtypes = a.dtypes.split(",")
    warmup, reps, device = a.warmup, a.reps, a.device or ("cpu" if a.smoke else "cuda")
    if a.smoke:
        batches, warmup, reps = [4], 2, 20
        dtypes = ["fp32", "bf16"] if a.dtypes == "bf16" else dtypes
    settings = [("eager", d, b) for d in dtypes for b in batches]
    if a.compile if a.compile is not None else not a.smoke:
        settings += [("compile", d, b) for d in dtypes for b in batches]
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; use --smoke (CPU) or --device cpu")
    return device, settings, warmup, reps


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None,
                   help="path prefix: writes <out>.json and <out>.md (default results/gpu/routing_speed, "
                        "results/gpu/routing_speed_width with --width)")
    p.add_argument("--width", default=None,
                   help="width mode: kept fraction of every block's heads and MLP channels per stage, e.g. "
                        "0.75,0.5,0.5,0.25 (equal u ranges); --stage-blocks / --static-blocks are then unused")
    p.add_argument("--smoke", action="store_true", help="tiny DiT on the CPU (a test of this script)")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    p.add_argument("--model", default="DiT-XL/2")
    p.add_argument("--stage-blocks", default="10,12,16,18", help="blocks per stage (equal u ranges)")
    p.add_argument("--static-blocks", type=int, default=14, help="blocks of the static reference")
    p.add_argument("--batches", default="64")
    p.add_argument("--dtypes", default="bf16")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the pinned stages and the static model under torch.compile (default: on, "
                        "off with --smoke)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no setting after this many seconds (default 420; width mode: 210, and no "
                        "measurement that would end after it)")
    p.add_argument("--render", action="store_true",
                   help="rewrite <out>.md from <out>.json and measure nothing (after a change to the tables)")
    a = p.parse_args(argv)

    out = a.out or Path("results/gpu/routing_speed_width" if a.width is not None else "results/gpu/routing_speed")
    a.out = out = out.with_suffix("") if out.suffix in (".json", ".md") else out
    if a.render:
        return _render(out)
    if a.width is not None:
        return _main_width(a)
    a.budget_s = 420.0 if a.budget_s is None else a.budget_s
    model, counts, keep = a.model, [int(v) for v in a.stage_blocks.split(",")], a.static_blocks
    model_kw = dict(input_size=32, in_channels=4, num_classes=1000)  # DiT-XL/2 at 256 px (32x32 latents)
    if a.smoke:
        model, counts, keep = "DiT-T/2", [1, 2, 2, 3], 2
        model_kw = dict(input_size=8, in_channels=4, num_classes=10)
    device, settings, warmup, reps = _timing_settings(a)
    res = run(out, device, model, counts, keep, settings, warmup, reps, a.budget_s, model_kw)
    print(f"[routing] wrote {out}.json and {out}.md")
    return res


def _render(out: Path) -> dict:
    """<out>.md again from <out>.json (block or width mode, as the record says)."""
    res = json.loads(out.with_suffix(".json").read_text())
    atomic_write_text(out.with_suffix(".md"), (_md_width if res["meta"].get("mode") == "width" else _md)(res))
    print(f"[routing] wrote {out}.md from {out}.json")
    return res


def _main_width(a) -> dict:
    try:
        fracs = [float(v) for v in a.width.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"--width {a.width!r}: give kept fractions, e.g. 0.75,0.5,0.5,0.25") from None
    if not fracs or not all(0 < f <= 1 for f in fracs):
        raise SystemExit(f"--width {a.width!r}: every fraction must be in (0, 1]")
    out = a.out
    budget_s = 210.0 if a.budget_s is None else a.budget_s
    model, model_kw = a.model, dict(input_size=32, in_channels=4, num_classes=1000)  # DiT-XL/2 at 256 px
    if a.smoke:
        model, model_kw = "DiT-T/2", dict(input_size=8, in_channels=4, num_classes=10)
    device, settings, warmup, reps = _timing_settings(a)
    threads = torch.get_num_threads()
    if a.smoke:  # a check of this script, not a measurement: don't compete for shared CPU cores
        torch.set_num_threads(1)
    try:
        res = run_width(out, device, model, fracs, settings, warmup, reps, budget_s, model_kw)
    finally:
        torch.set_num_threads(threads)
    print(f"[routing-width] wrote {out}.json and {out}.md")
    return res


if __name__ == "__main__":
    main()
