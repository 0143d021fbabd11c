"""One-process latency pass: every row's final architecture timed interleaved with the dense model.

    python -m bench.latency_pass --runs results/gpu/tier --device cuda [--budget-s 300]
    python -m bench.latency_pass --runs /tmp/runs --device cpu --budget-s 20      # the CPU suite, seconds
    python -m bench.latency_pass --runs results/gpu/tier --check    # CPU: every row rebuilds? (no timing)

Each row of a results set timed its own pruned model in its own run (bench.run `cost`), so a speedup
the report divides out of two rows holds whatever changed between their processes (clocks, heat,
another job). This pass, run once after the rows exist, rebuilds every row's final architecture from
its run folder (<run>/structure.json, written by bench.run: the plans surgery applied and the final
kept blocks; bench.run.build_final) with random weights, checks that its params and MACs equal the
row's, and times the dense model and every distinct architecture (deduplicated by the shapes of its
modules and tensors) interleaved in one process, group by group, with the speedup gate's harness
(bench.gate.measure_group: rounds of `reps` calls each, order rotated, bench.speedup.paired_ratio
intervals; a table of dense rows alone times the dense model against itself, for its latency). A
group is one table of the report (bench.report.report_groups: same device, latency mode, dtype,
batch and quality protocol); every group gets a share of what is left of --budget-s in proportion
to its rows (a one-row table needs little more than its min-rounds). Groups are timed only on the
device their rows name (bench.metrics.cost.device_name); the pass refuses to run when no group was
timed on this one. `--also GPU` (repeatable) pools the rows made on another GPU model into this
device's tables (`pool_devices`): a tier whose quality rows were made on either of two GPUs whose
samples agree (results/gpu/tier_h200: H100 and H200 sample and score alike to 5 digits) gets every
latency and speedup from this one process, and the report names where each row was made.

A routed (stage-wise, Diff-ES) model is timed stage by stage (`time_routed`): each stage's forward with
every sample's timestep inside it, interleaved with the dense model, its speedup the dense time over the
stages' NFE-weighted mean (bench.speedup.weighted_ratio), as its row's own latency is that mean.

Skipped, with the reason in the record (their report lines keep the separate-run speedup): routed
models in compile mode (a stage's graph is compiled pinned; the pass times them eagerly only); rows
whose folder has no structure.json (older rows) unless their plan is a block plan (the kept blocks
then define the architecture); rows set apart by the report; rows of another device.

Output: <runs>/latency_pass.json (atomically): per run (Row.run, its relpath) the paired speedup
(dense / pruned), its 95 % interval lo / hi, dense_ms and pruned_ms (medians of the interleaved
calls), rounds and the structure key (a routed model's: also stage_ms and stage_weights); per group its key, device, mode, dtype, batch, rounds and
seconds; the commit, torch version, command and date; `also`, the GPU models it pooled; the skipped runs
with their reasons. bench.report reads it (`load`, then `pooled`) and takes each line's speedup from it.
Exit status: 0 written, 2 bad input (a line naming the fix: a device mismatch, a rebuilt model whose cost differs from its row).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from bench.api import BenchError

SCHEMA = 1
FILE = "latency_pass.json"
MATCH_REL = 1e-6  # rebuilt params / MACs against the row's (both measured by bench.surgery.measure): relative tolerance
DENSE = "dense"   # the reference method (bench.report.DENSE)
SELF = "dense (self)"  # the name under which a table of dense rows alone times its dense model


def load(runs: str | Path) -> dict | None:
    """<runs>/latency_pass.json, or None when the folder has none (the report's one reader)."""
    path = Path(runs) / FILE
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); rerun python -m bench.latency_pass --runs {runs}") from None
    if not isinstance(rec, dict) or rec.get("schema") != SCHEMA or not isinstance(rec.get("runs"), dict):
        raise ValueError(f"{path}: not a latency pass record of schema {SCHEMA}; rerun python -m bench.latency_pass "
                         f"--runs {runs}")
    return rec


def pool_devices(df, device: str, also, timed: dict | None = None):
    """The rows made on a GPU model of `also` as rows of `device`: their `device` becomes `device` (the
    report groups by it) and `made_on` keeps where they were made. Their own latencies were measured on that
    other GPU, so with `timed` (a pass's runs) a pooled row the pass did not retime (one it skipped) loses its
    latency: no speedup divides one GPU's time by another's."""
    foreign = df["device"].astype(str).isin([str(d) for d in also]) & df["device"].astype(str).ne(device)
    if not foreign.any():
        return df
    df = df.assign(made_on=df["device"].astype(str), device=df["device"].astype(str).where(~foreign, device))
    if timed is not None and "latency_ms" in df.columns:
        df.loc[foreign & ~df["run"].isin(list(timed)), "latency_ms"] = float("nan")
    return df


def pooled(df, rec: dict | None):
    """`df` as a latency pass record sees it: the rows of the GPUs it pooled (`--also`) counted as its own."""
    if not rec or not rec.get("also"):
        return df
    return pool_devices(df, str(rec["device"]), rec["also"], rec.get("runs") or {})


def structure_of(row: dict) -> tuple[dict | None, str]:
    """(the row's final structure or None, where it came from or why there is none)."""
    from bench.run import STRUCTURE

    from bench.io import read_text, stored

    if path := stored(Path(row["path"]) / STRUCTURE):
        return json.loads(read_text(path)), STRUCTURE
    if row.get("granularity") == "block" and isinstance(row.get("kept_blocks"), list) and row["kept_blocks"]:
        return {"plans": [], "kept_blocks": row["kept_blocks"]}, "kept_blocks"
    return None, (f"no {STRUCTURE} (a row from before runs recorded it) and a {row.get('granularity')} plan, which "
                  "kept_blocks cannot rebuild; rerun the row to get one")


def arch_key(net) -> str:
    """The architecture of a Denoiser as a short hash: every module's name and type, every tensor's
    name and shape (models that differ only in which blocks or channels they kept share it), and a
    routed model's stages (each stage's edges, weight and route: which stored blocks and widths it
    runs; its stored blocks alone can look like a static model's)."""
    from bench.routing import router

    mods = [(n, type(m).__name__) for n, m in net.net.named_modules()]
    shapes = [(n, list(t.shape)) for n, t in net.net.state_dict().items()]
    r = router(net)
    parts = [mods, shapes] + ([] if r is None else [[r.edges, r.weights, r.routes]])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:12]


def _plain(v):
    """A pandas / numpy scalar as a JSON value."""
    if hasattr(v, "item"):
        v = v.item()
    return None if isinstance(v, float) and math.isnan(v) else v


def _check_cost(net, row: dict, what: str) -> None:
    from bench import surgery

    m = surgery.measure(net)
    got, want = {"params_M": m["params"] / 1e6, "macs_G": m["macs"] / 1e9}, {k: float(row[k]) for k in ("params_M", "macs_G")}
    bad = [k for k in got if not math.isclose(got[k], want[k], rel_tol=MATCH_REL, abs_tol=1e-12)]
    if bad:
        raise BenchError(f"run {row['run']}: the rebuilt {what} has " + ", ".join(f"{k} {got[k]:.6g}" for k in bad)
                         + " but its row says " + ", ".join(f"{k} {want[k]:.6g}" for k in bad)
                         + f"; its structure does not give the row's model (folder {row['path']}): rerun that row, "
                         "or move it out of the results set")


def finished_rows(runs: Path):
    """The rows of a results folder (bench.results.load_rows); bad input when none finished."""
    from bench.results import load_rows

    df = load_rows(runs)
    if df.empty or not df["status"].eq("ok").any():
        raise BenchError(f"no finished row.json under {runs}; point --runs at a results folder")
    return df


def by_model(rows: list[dict]) -> tuple[dict[str, dict], list[list[dict]]]:
    """(each row's config.yaml by run, the rows grouped by their model config): one dense model per model
    config (a table's rows share it; bench.report groups by the model's name)."""
    cfgs = {r["run"]: json.loads((Path(r["path"]) / "config.yaml").read_text()) for r in rows}
    groups: dict[str, list[dict]] = {}
    for r in rows:
        arch = {k: v for k, v in cfgs[r["run"]]["model"].items() if k != "ckpt"}
        groups.setdefault(json.dumps(arch, sort_keys=True), []).append(r)
    return cfgs, list(groups.values())


def rebuild(mrows: list[dict], cfgs: dict[str, dict], device: str, skipped: dict[str, str]):
    """(dense, nets, members, refs) for the rows of one model config: the dense model with random weights,
    every distinct final architecture the rows rebuild to (by arch_key), the rows of each with where their
    structure came from, and the dense rows; each model's params and MACs checked against its row
    (_check_cost: bad input names the row); rows that cannot be rebuilt go to `skipped` with the reason."""
    from bench.run import build_dense, build_final

    cfg = cfgs[mrows[0]["run"]]
    dense = build_dense({**cfg, "model": {**cfg["model"], "ckpt": None}})
    dense.net.to(device).eval()
    nets, members, refs = {}, {}, []
    for r in mrows:
        if r["method"] == DENSE:
            _check_cost(dense, r, "dense model")
            refs.append(r)
            continue
        structure, source = structure_of(r)
        if structure is None:
            skipped[r["run"]] = source
            continue
        try:
            net = build_final(cfgs[r["run"]], structure)
        except BenchError as e:
            raise BenchError(f"run {r['run']}: its structure does not rebuild ({e})") from None
        net.net.to(device).eval()
        _check_cost(net, r, "model")
        k = arch_key(net)
        nets.setdefault(k, net)
        members.setdefault(k, []).append((r, source))
    return dense, nets, members, refs


def check(runs: str | Path, log=print) -> dict:
    """The pass without its timing, on the CPU, over every device's rows: rebuild every row's final
    architecture and check its params and MACs against the row (what the pass does before it times), so
    that a results set is known to rebuild before GPU time is spent on it. Returns per table (report group)
    its device, rows, distinct architectures and rebuilt rows, and the skipped runs with the reason."""
    from bench.report import report_groups

    runs = Path(runs)
    groups, group_rows, apart, _ = report_groups(finished_rows(runs))
    skipped = {r["run"]: "set apart by the report (shares method, budget and seed with another run)"
               for _, r in apart.iterrows()}
    out = []
    for (key, *_), g in zip(groups, group_rows):
        rows = [{c: _plain(v) for c, v in r.items()} for _, r in g.iterrows()]
        cfgs, models = by_model(rows)
        archs = rebuilt = 0
        for mrows in models:
            _, nets, members, refs = rebuild(mrows, cfgs, "cpu", skipped)
            archs += len(nets)
            rebuilt += sum(len(v) for v in members.values()) + len(refs)
        out.append({"device": str(key["device"]), "rows": len(rows), "architectures": archs, "rebuilt": rebuilt})
        log(f"[latency_pass --check] {key['device']}: {rebuilt} of {len(rows)} rows rebuild to their params and "
            f"MACs ({archs} architectures beside the dense model)")
    return {"groups": out, "skipped": dict(sorted(skipped.items()))}


def time_routed(dense, net, mode: str, dtype: str, batch: int, device, warmup: int, reps: int, min_rounds: int,
                max_rounds: int, rel_tol: float, deadline: float, log=print) -> dict:
    """A routed (stage-wise, Diff-ES) model against the dense model, in one process: each stage's forward
    with every sample's timestep inside that stage (the routing decision included, as
    bench.metrics.cost.stage_latency times the row in eager mode), the stages and the dense model interleaved
    in rounds (bench.gate.measure_group); the speedup is dense over the stages' NFE-weighted mean
    (bench.speedup.weighted_ratio), pruned_ms that mean of the stages' medians."""
    from types import SimpleNamespace

    from bench.gate import measure_group
    from bench.routing import router, t_in_stage
    from bench.speedup import weighted_ratio

    r = router(net)
    views = {}
    for s in range(r.num_stages):  # the stage's timestep replaces the harness's random one
        t_s = t_in_stage(net.process, r.edges, s, batch, device)
        views[f"stage {s}"] = SimpleNamespace(net=lambda x, t, y, t_s=t_s: net.net(x, t_s, y))
    res = measure_group(dense, views, mode, dtype, batch, device, warmup, reps, min_rounds, max_rounds, rel_tol,
                        deadline, log)
    w = [float(a) for a in r.weights]
    got = weighted_ratio([res[v]["round_ratios"] for v in views], w)
    stage_ms = [res[v]["pruned_ms"] for v in views]
    return {"speedup": got["ratio"], "lo": got["lo"], "hi": got["hi"], "rounds": got["rounds"],
            "dense_ms": res["stage 0"]["dense_ms"], "pruned_ms": sum(a * b for a, b in zip(w, stage_ms)) / sum(w),
            "stage_ms": stage_ms, "stage_weights": w}


def run(runs: str | Path, device: str = "cuda", budget_s: float = 300.0, reps: int = 5, min_rounds: int = 10,
        max_rounds: int = 400, rel_tol: float = 0.01, command: str = "", log=print, also: tuple[str, ...] = ()
        ) -> dict:
    """Rebuild, check and time every row of `runs` (module docstring); returns the record."""
    import torch

    from bench.gate import measure_group
    from bench.metrics.cost import device_name
    from bench.report import GROUP_KEYS, report_groups
    from bench.results import git_info
    from bench.routing import is_routed, router

    runs = Path(runs)
    df = finished_rows(runs)
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device {device} but no CUDA device is visible; run the pass on the GPU the rows were "
                         "timed on, or give --device cpu for rows timed on the CPU")
    this = device_name(device)
    df = pool_devices(df, this, also)
    groups, group_rows, apart, _ = report_groups(df)
    skipped = {r["run"]: "set apart by the report (shares method, budget and seed with another run)"
               for _, r in apart.iterrows()}
    mine = [(k, g) for (k, *_), g in zip(groups, group_rows) if str(k["device"]) == this]
    if not mine:
        devs = sorted({str(k["device"]) for k, *_ in groups})
        raise BenchError(f"the rows of {runs} were timed on {', '.join(devs)} but this process runs on {this}: run "
                         "the pass on that device (--device cuda on that GPU; a CPU name counts torch threads, so "
                         "set OMP_NUM_THREADS to its thread count)")
    for k, g in zip((k for k, *_ in groups), group_rows):
        if str(k["device"]) != this:
            skipped.update({r: f"timed on {k['device']}, the pass ran on {this}" for r in g["run"]})

    t_start = time.perf_counter()
    out_runs: dict[str, dict] = {}
    out_groups: list[dict] = []
    units = []  # (group index, key, configs, the rows of one model config): one timed set each
    for gi, (key, g) in enumerate(mine):
        cfgs, models = by_model([{c: _plain(v) for c, v in r.items()} for _, r in g.iterrows()])
        units += [(gi, key, cfgs, mrows) for mrows in models]
    todo = sum(len(u[3]) for u in units)  # rows not yet timed: what is left of the budget goes by rows
    for gi, key, cfgs, mrows in units:
        share = max(0.0, budget_s - (time.perf_counter() - t_start)) * len(mrows) / todo
        todo -= len(mrows)
        cfg = cfgs[mrows[0]["run"]]
        dense, nets, members, refs = rebuild(mrows, cfgs, device, skipped)
        dense_key = arch_key(dense)
        lat = cfg["eval"]["latency"]
        mode, dtype, batch = str(key["latency_mode"]), str(key["latency_dtype"]), int(key["latency_batch"])
        warmup = int(lat.get("warmup", 5))
        routed = {k: n for k, n in nets.items() if is_routed(n)}
        nets = {k: n for k, n in nets.items() if k not in routed}
        if routed and mode == "compile":  # a stage's graph is compiled pinned (stage_latency): not interleaved here
            for k in routed:
                skipped.update({r["run"]: "routed (stage-wise) model timed in compile mode: the pass times routed "
                                "models eagerly only (its row's own stage timings stay)" for r, _ in members.pop(k)})
            routed = {}
        if not nets and not refs and not routed:
            log(f"[latency_pass] group {gi}: nothing to time")
            continue
        # the unit's share of the budget goes to its static timing and each routed model by their rows
        n_rows = len(refs) + sum(len(members[k]) for k in nets) + sum(len(members[k]) for k in routed)
        for k, net in routed.items():
            part = share * len(members[k]) / n_rows
            log(f"[latency_pass] {this} {mode} {dtype} batch {batch}: dense + the {router(net).num_stages} stages "
                f"of a routed model of {len(members[k])} row{'' if len(members[k]) == 1 else 's'} ({part:.0f} s)")
            t0 = time.perf_counter()
            m = time_routed(dense, net, mode, dtype, batch, device, warmup, reps, min_rounds, max_rounds, rel_tol,
                            time.perf_counter() + part, log)
            gid = len(out_groups)
            out_groups.append({"key": {k2: _plain(key[k2]) for k2 in GROUP_KEYS}, "device": this, "mode": mode,
                               "dtype": dtype, "batch": batch, "model": cfg["model"], "rounds": m["rounds"],
                               "reps_per_round": reps, "seconds": round(time.perf_counter() - t0, 3),
                               "dense_ms": m["dense_ms"], "dense_structure": dense_key, "architectures": 1,
                               "routed": True, "stages": len(m["stage_ms"])})
            for r, source in members[k]:
                out_runs[r["run"]] = {"group": gid, "method": r["method"], "budget_keep": r["budget_keep"],
                                      "seed": r["seed"], "structure": k, "rebuilt_from": source,
                                      **{f: m[f] for f in ("speedup", "lo", "hi", "dense_ms", "pruned_ms", "rounds",
                                                           "stage_ms", "stage_weights")},
                                      "dir": str(Path(r["path"]).relative_to(runs))}
        if not nets and not refs:
            continue
        share *= (n_rows - sum(len(members[k]) for k in routed)) / n_rows
        what = (f"dense + {len(nets)} architectures of {sum(len(members[k]) for k in nets)} rows" if nets
                else f"the dense model alone ({len(refs)} dense row{'' if len(refs) == 1 else 's'})")
        log(f"[latency_pass] {this} {mode} {dtype} batch {batch}: {what} ({share:.0f} s)")
        t0 = time.perf_counter()
        # a table of dense rows alone (the GPU tier's cfg-1.5 teacher line) is timed against itself, so
        # that its latency too is this process's (a row pooled from another GPU keeps no latency of its own)
        res = measure_group(dense, nets or {SELF: dense}, mode, dtype, batch, device, warmup,
                            reps, min_rounds, max_rounds, rel_tol, time.perf_counter() + share, log)
        seconds = time.perf_counter() - t0
        rounds = max(v["rounds"] for v in res.values())
        dense_ms = res[next(iter(res))]["dense_ms"]
        gid = len(out_groups)
        out_groups.append({"key": {k: _plain(key[k]) for k in GROUP_KEYS}, "device": this, "mode": mode,
                           "dtype": dtype, "batch": batch, "model": cfg["model"], "rounds": rounds,
                           "reps_per_round": reps, "seconds": round(seconds, 3), "dense_ms": dense_ms,
                           "dense_structure": dense_key, "architectures": len(nets)})
        for k in nets:
            m = res[k]
            for r, source in members[k]:
                out_runs[r["run"]] = {"group": gid, "method": r["method"], "budget_keep": r["budget_keep"],
                                      "seed": r["seed"], "structure": k, "rebuilt_from": source,
                                      "speedup": m["ratio"], "lo": m["lo"], "hi": m["hi"],
                                      "dense_ms": m["dense_ms"], "pruned_ms": m["pruned_ms"],
                                      "rounds": m["rounds"], "dir": str(Path(r["path"]).relative_to(runs))}
        for r in refs:  # the dense rows: the reference of their group
            out_runs[r["run"]] = {"group": gid, "method": r["method"], "budget_keep": r["budget_keep"],
                                  "seed": r["seed"], "structure": dense_key, "rebuilt_from": "model config",
                                  "speedup": 1.0, "lo": 1.0, "hi": 1.0, "dense_ms": dense_ms,
                                  "pruned_ms": dense_ms, "rounds": rounds, "reference": True,
                                  "dir": str(Path(r["path"]).relative_to(runs))}
    sha, dirty = git_info()
    is_cuda = torch.device(device).type == "cuda"
    return {"schema": SCHEMA, "tool": "bench.latency_pass", "command": command,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "device": this,
            "torch": str(torch.__version__), "cuda": torch.version.cuda if is_cuda else None,
            "commit": sha, "git_dirty": dirty, "also": sorted(set(also) - {this}),
            "settings": {"budget_s": budget_s, "reps_per_round": reps, "min_rounds": min_rounds,
                         "max_rounds": max_rounds, "rel_tol": rel_tol, "match_rel": MATCH_REL},
            "elapsed_s": round(time.perf_counter() - t_start, 3), "groups": out_groups, "runs": out_runs,
            "skipped": dict(sorted(skipped.items()))}


def table(rec: dict) -> str:
    from tabulate import tabulate

    rows = [[run, q["method"], q["budget_keep"], q["seed"], f"{q['dense_ms']:.4g}", f"{q['pruned_ms']:.4g}",
             f"{q['speedup']:.3f} [{q['lo']:.3f}, {q['hi']:.3f}]", q["rounds"], q["structure"]]
            for run, q in rec["runs"].items()]
    return tabulate(rows, headers=["run", "method", "keep", "seed", "dense ms", "pruned ms", "speedup [95%]", "rounds",
                                   "structure"], tablefmt="github", disable_numparse=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.latency_pass", description=__doc__.splitlines()[0])
    ap.add_argument("--runs", required=True, help="the results folder (searched for **/row.json); the record goes there")
    ap.add_argument("--device", default=None, help="cuda | cpu | cuda:1 (default: cuda when visible, else cpu)")
    ap.add_argument("--also", action="append", default=[], metavar="GPU",
                    help="pool the rows made on this GPU model (its name as the rows give it, e.g. 'NVIDIA H200') "
                         "into this device's tables and time them here (repeatable)")
    ap.add_argument("--budget-s", type=float, default=300.0,
                    help="wall seconds for the timing; each group gets an equal share of what is left")
    ap.add_argument("--reps", type=int, default=5, help="timed calls of each model per round")
    ap.add_argument("--min-rounds", type=int, default=10)
    ap.add_argument("--max-rounds", type=int, default=400)
    ap.add_argument("--rel-tol", type=float, default=0.01,
                    help="stop a group once every speedup's 95%% interval is within +- this fraction")
    ap.add_argument("--check", action="store_true",
                    help="no timing and no record: rebuild every row (any device's) on the CPU and check its params "
                         "and MACs, before GPU time is spent on the pass")
    a = ap.parse_args(argv)
    import torch

    from bench.io import atomic_write_text

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    command = "python -m bench.latency_pass " + " ".join(sys.argv[1:] if argv is None else argv)
    if a.check:
        try:
            res = check(a.runs, log=lambda m: print(m, file=sys.stderr, flush=True))
        except (BenchError, ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for run_, why in res["skipped"].items():
            print(f"would skip {run_}: {why}")
        print(f"check: {sum(g['rebuilt'] for g in res['groups'])} of {sum(g['rows'] for g in res['groups'])} rows "
              f"rebuild to their params and MACs in {len(res['groups'])} tables; {len(res['skipped'])} would be "
              "skipped")
        return 0
    try:
        if a.reps < 1 or a.min_rounds < 2 or a.max_rounds < a.min_rounds or not 0 < a.rel_tol < 1:
            raise BenchError("--reps >= 1, --min-rounds >= 2 (an interval needs two rounds), --max-rounds >= "
                             "--min-rounds and 0 < --rel-tol < 1")
        rec = run(a.runs, device, a.budget_s, a.reps, a.min_rounds, a.max_rounds, a.rel_tol, command,
                  log=lambda m: print(m, file=sys.stderr, flush=True), also=tuple(a.also))
    except (BenchError, ValueError, OSError) as e:  # bad input, rows the report refuses to group, a missing file
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(a.runs) / FILE
    atomic_write_text(out, json.dumps(rec, indent=1))
    print(f"latency pass on {rec['device']} (torch {rec['torch']}, commit {rec['commit']}"
          f"{'-dirty' if rec['git_dirty'] else ''}): {len(rec['runs'])} runs in {len(rec['groups'])} groups, "
          f"{rec['elapsed_s']:.0f} s")
    print(table(rec))
    for run_, why in rec["skipped"].items():
        print(f"skipped {run_}: {why}")
    print(f"record: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
