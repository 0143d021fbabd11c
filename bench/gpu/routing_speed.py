"""Per-stage latency of a stage-wise (routed) DiT-XL/2-shaped model against static pruned models.

    python -m bench.gpu.routing_speed                              # cuda, DiT-XL/2 shape, ~5 min
    python -m bench.gpu.routing_speed --smoke --out /tmp/rs        # tiny DiT on the CPU, seconds

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
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from bench.metrics.cost import benchmark_forward, count_macs, count_params, device_name, random_inputs


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
             "Stage keep sets: " + "; ".join(f"{s}: {b}" for s, b in enumerate(m["stage_sets"])), "",
             "| mode | dtype | batch | stage | blocks | routed ms | pinned ms | same-n static ms | routed / same-n | "
             "routed / static | out max abs diff |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda v, p=3: "-" if v is None else f"{v:.{p}f}"
    for r in res["stages"]:
        lines.append(f"| {r['mode']} | {r['dtype']} | {r['batch']} | {r['stage']} | {r['blocks']} | {f(r.get('routed_ms'))} | "
                     f"{f(r.get('pinned_ms'))} | {f(r.get('same_n_ms'))} | {f(r.get('routed_over_same_n'))} | "
                     f"{f(r.get('routed_over_static'))} | {f(r.get('max_abs_diff'), 2) if r.get('max_abs_diff') is not None else '-'} |")
    lines += ["", "| mode | dtype | batch | routed weighted mean ms | static ms | dense ms | speedup vs dense: routed | "
              "static | MAC ratio routed/static |", "|---|---|---|---|---|---|---|---|---|"]
    for s in res["summary"]:
        lines.append(f"| {s['mode']} | {s['dtype']} | {s['batch']} | {f(s.get('routed_mean_ms'))} | {f(s.get('static_ms'))} | "
                     f"{f(s.get('dense_ms'))} | {f(s.get('routed_speedup'))} | {f(s.get('static_speedup'))} | "
                     f"{f(s.get('mac_ratio'))} |")
    lines += ["", "routed: the routed forward picks the stage from t (one device-to-host sync per call); pinned: the "
              "stage fixed beforehand, as a sampler that knows its step could (and the compiled graphs); same-n: a "
              "static model with the stage's number of blocks; routed / static: against the static model with the "
              "trajectory-average number of blocks. In compile mode the routed column is the pinned graph."]
    if res["errors"]:
        lines += ["", "Errors:", ""] + [f"- {e}" for e in res["errors"]]
    if res["skipped"]:
        lines += ["", "Not measured:", ""] + [f"- {e}" for e in res["skipped"]]
    return "\n".join(lines) + "\n"


def _write(out: Path, res: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(res, indent=1)), (".md", _md(res))):
        path = out.with_suffix(suffix)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.replace(path)


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
            msg = f"{tag}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            res["errors"].append(msg)
            log(f"[routing] {msg}")
            return None
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


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("results/gpu/routing_speed"),
                   help="path prefix: writes <out>.json and <out>.md")
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
    p.add_argument("--budget-s", type=float, default=420.0, help="start no setting after this many seconds")
    a = p.parse_args(argv)

    out = a.out.with_suffix("") if a.out.suffix in (".json", ".md") else a.out
    model, counts, keep = a.model, [int(v) for v in a.stage_blocks.split(",")], a.static_blocks
    model_kw = dict(input_size=32, in_channels=4, num_classes=1000)  # DiT-XL/2 at 256 px (32x32 latents)
    batches = [int(v) for v in a.batches.split(",")]
    dtypes = a.dtypes.split(",")
    warmup, reps, device = a.warmup, a.reps, a.device or ("cpu" if a.smoke else "cuda")
    if a.smoke:
        model, counts, keep = "DiT-T/2", [1, 2, 2, 3], 2
        model_kw = dict(input_size=8, in_channels=4, num_classes=10)
        batches, warmup, reps = [4], 2, 20
        dtypes = ["fp32", "bf16"] if a.dtypes == "bf16" else dtypes
    settings = [("eager", d, b) for d in dtypes for b in batches]
    if a.compile if a.compile is not None else not a.smoke:
        settings += [("compile", d, b) for d in dtypes for b in batches]
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; use --smoke (CPU) or --device cpu")
    res = run(out, device, model, counts, keep, settings, warmup, reps, a.budget_s, model_kw)
    print(f"[routing] wrote {out}.json and {out}.md")
    return res


if __name__ == "__main__":
    main()
