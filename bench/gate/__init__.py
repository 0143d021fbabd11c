"""Speedup regression gate: each pruned model's measured speedup against a committed expectation.

    python -m bench.gate bench/gate/expectations/dit_xl2.yaml --out gate.json     # one GPU, ~5 min
    python -m bench.gate bench/gate/expectations/tiny_cpu.yaml --out /tmp/g.json  # CPU, seconds (the tests')
    python -m bench.gate bench/gate/expectations/dit_xl2.yaml --write-expectations --margin 0.10

An expectations file (YAML, format below) names a dense model built from the suite's configs
(bench.models, random weights: timing needs no checkpoint) and pruned variants of it made by
bench.surgery (depth: evenly spaced blocks kept; width: a fraction of every block's heads and MLP
channels), each in a mode (eager | compile) and dtype (fp32 | tf32 | bf16) at a batch. In one process
on the current device, every (mode, dtype, batch) group times its dense model and its pruned models
interleaved (bench.metrics.cost.interleave: `reps` calls of each per round, the order rotated),
round after round, until the 95 % interval of every pruned model's speedup (dense / pruned, from
the per-round ratios: bench.speedup.paired_ratio) is within +-`rel_tol` or the group's share of what
is left of `budget_s` (wall seconds, building and compiling included) is spent. A pair FAILS when its whole interval lies below its expectation, i.e. it is
slower than expected by more than the measured noise allows; the exit status is then 1 and the
table names it. Expectations are ratios, so one file serves an H100 and an H200.

Output: a table (tabulate) on stdout and a JSON record (--out) that describes itself: device,
torch / CUDA versions, commit, settings, and per pair the dense and pruned medians, the speedup and
its interval, the rounds, the MAC ratio, compile time, the launch-bound flag (bench.speedup: a GPU
dense forward under 20 ms measures launch overhead; such a pair is reported, and warned about).
--write-expectations rewrites the file with expect = measured speedup x (1 - margin), rounded down
to 0.01, and each pair's measurement (ratio, interval, device, torch, commit, date) beside it.

Expectations file:

    about: what the file gates and why (free text)
    model: DiT-XL/2                 # a bench.models name
    model_kw: {input_size: 32, in_channels: 4, num_classes: 1000}
    device: cuda                    # cuda | cpu
    batch: 64                       # images per forward (a pair may override it)
    warmup: 10                      # untimed calls per model before timing (the first compiles)
    threads: null                   # CPU only: torch threads (null: torch's default)
    margin: 0.1                     # --write-expectations: expect = measured x (1 - margin)
    pairs:
    - name: depth50-eager-bf16
      prune: {keep_blocks: 14}      # or {width: 0.5}
      mode: eager
      dtype: bf16
      expect: 1.77                  # null: measured and reported, never failed
      slowdown: 1                   # optional, a regression on purpose: the pruned model's forward runs
                                    # this many times per call (tests and demos that the gate fails)
      source: where the number comes from (free text)
      measured: {...}               # written by --write-expectations

Exit status: 0 every gated pair holds, 1 a pair fails, 2 bad input (a line naming the fix).
pytest-benchmark (tests/perf) keeps the absolute timings; this gate checks ratios only.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench.api import BenchError

SCHEMA = 1
FILE_KEYS = {"about", "model", "model_kw", "device", "batch", "warmup", "threads", "margin", "pairs"}
PAIR_KEYS = {"name", "prune", "mode", "dtype", "batch", "expect", "source", "measured", "slowdown"}
EXPECTATIONS = Path(__file__).parent / "expectations"
HEADER = """\
# Speedup expectations for the gate: python -m bench.gate <this file> (format: bench/gate/__init__.py).
# A pair fails when the 95% interval of its measured speedup (dense / pruned latency, same device,
# mode, dtype and batch, timed interleaved in one process) lies wholly below `expect`.
# Rewritten by --write-expectations (expect = measured x (1 - margin)); edit `about`/`source` freely.
"""


# ---------------------------------------------------------------- the expectations file
@dataclass
class Pair:
    name: str
    keep_blocks: int | None      # depth pruning: blocks kept (evenly spaced)
    width: float | None          # width pruning: kept fraction of every block's heads and MLP channels
    mode: str                    # eager | compile
    dtype: str                   # fp32 | tf32 | bf16
    batch: int
    expect: float | None         # None: reported, never failed
    slowdown: int = 1            # the pruned forward runs this many times per call (a regression on purpose)

    @property
    def group(self) -> tuple[str, str, int]:
        return self.mode, self.dtype, self.batch


def _fail(where: str, msg: str) -> BenchError:
    return BenchError(f"{where}: {msg}")


def load(path: str | Path) -> tuple[dict, list[Pair]]:
    """The file's settings and its pairs, checked: unknown keys, modes, dtypes, prune specs and
    duplicate names stop with a message naming the key and the fix."""
    import yaml

    from bench.metrics.cost import DTYPES, MODES
    from bench.models import MODELS

    path = Path(path)
    if not path.is_file():
        have = ", ".join(sorted(p.name for p in EXPECTATIONS.glob("*.yaml")))
        raise BenchError(f"{path}: no such expectations file (committed ones in {EXPECTATIONS}: {have})")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise BenchError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(spec, dict):
        raise BenchError(f"{path}: expected a mapping with model, pairs, ... (see bench/gate/__init__.py)")
    if unknown := sorted(set(spec) - FILE_KEYS):
        raise _fail(str(path), f"unknown key {unknown[0]!r}; the keys are {', '.join(sorted(FILE_KEYS))}")
    if spec.get("model") not in MODELS:
        raise _fail(str(path), f"model={spec.get('model')!r} is no bench.models name; e.g. model: DiT-XL/2")
    spec.setdefault("model_kw", {})
    spec.setdefault("device", "cuda")
    if spec["device"] not in ("cuda", "cpu"):
        raise _fail(str(path), f"device={spec['device']!r}; use cuda or cpu")
    spec.setdefault("warmup", 10)
    spec.setdefault("threads", None)
    spec.setdefault("margin", 0.10)
    if not isinstance(spec.get("batch", 1), int) or spec.get("batch", 1) < 1:
        raise _fail(str(path), f"batch={spec.get('batch')!r}; use a positive integer, e.g. batch: 64")
    pairs, seen = [], set()
    if not isinstance(spec.get("pairs"), list) or not spec["pairs"]:
        raise _fail(str(path), "pairs: give a list of pruned models to gate (name, prune, mode, dtype, expect)")
    for i, p in enumerate(spec["pairs"]):
        where = f"{path} pairs[{i}]"
        if not isinstance(p, dict):
            raise _fail(where, "each pair is a mapping (name, prune, mode, dtype, expect)")
        if unknown := sorted(set(p) - PAIR_KEYS):
            raise _fail(where, f"unknown key {unknown[0]!r}; a pair's keys are {', '.join(sorted(PAIR_KEYS))}")
        name = str(p.get("name", ""))
        if not name or name in seen:
            raise _fail(where, f"name={name!r}: every pair needs a name of its own")
        seen.add(name)
        prune = p.get("prune") or {}
        if not isinstance(prune, dict) or len(prune) != 1 or not set(prune) <= {"keep_blocks", "width"}:
            raise _fail(where, f"prune={prune!r}; use {{keep_blocks: N}} (depth) or {{width: F}} (0 < F < 1)")
        kb, w = prune.get("keep_blocks"), prune.get("width")
        if kb is not None and (not isinstance(kb, int) or kb < 1):
            raise _fail(where, f"prune.keep_blocks={kb!r}; use a positive number of blocks")
        if w is not None and not (isinstance(w, (int, float)) and 0 < w < 1):
            raise _fail(where, f"prune.width={w!r}; use a kept fraction between 0 and 1, e.g. 0.5")
        mode, dtype = p.get("mode", "eager"), p.get("dtype", "fp32")
        if mode not in MODES:
            raise _fail(where, f"mode={mode!r}; use one of {', '.join(MODES)}")
        if dtype not in DTYPES or (dtype == "tf32" and spec["device"] != "cuda"):
            raise _fail(where, f"dtype={dtype!r}; use one of {', '.join(DTYPES)} (tf32 on cuda only)")
        expect = p.get("expect")
        if expect is not None and not (isinstance(expect, (int, float)) and expect > 0):
            raise _fail(where, f"expect={expect!r}; use a speedup > 0 (e.g. 1.8) or null to only report")
        batch = p.get("batch", spec.get("batch", 1))
        if not isinstance(batch, int) or batch < 1:
            raise _fail(where, f"batch={batch!r}; use a positive integer")
        slow = p.get("slowdown", 1)
        if not isinstance(slow, int) or slow < 1:
            raise _fail(where, f"slowdown={slow!r}; use a whole number of forwards per call >= 1 (1: none)")
        pairs.append(Pair(name, kb, None if w is None else float(w), mode, dtype, batch,
                          None if expect is None else float(expect), slow))
    return spec, pairs


def dump(spec: dict) -> str:
    """The expectations file's text (HEADER, then the data in a fixed key order)."""
    import yaml

    order = ["about", "model", "model_kw", "device", "batch", "warmup", "threads", "margin", "pairs"]
    pair_order = ["name", "prune", "mode", "dtype", "batch", "slowdown", "expect", "source", "measured"]
    data = {k: spec[k] for k in order if k in spec}
    data["pairs"] = [{k: p[k] for k in pair_order if k in p} for p in spec["pairs"]]
    return HEADER + yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)


# ---------------------------------------------------------------- measuring
def _models(spec: dict, pairs: list[Pair]):
    from bench.gpu.speed import build_dense, prune_copy

    dense = build_dense(spec["model"], **spec["model_kw"])
    depth = len(dense.net.blocks)
    for p in pairs:
        if p.keep_blocks is not None and p.keep_blocks > depth:
            raise BenchError(f"pair {p.name}: prune.keep_blocks={p.keep_blocks} but {spec['model']} has {depth} blocks")
    pruned = {p.name: prune_copy(dense, p.keep_blocks, p.width) for p in pairs}
    for p in pairs:
        if p.slowdown > 1:
            pruned[p.name].net = Repeated(pruned[p.name].net, p.slowdown)
    return dense, pruned


class Repeated(torch.nn.Module):
    """A model made slower on purpose: its forward runs `n` times per call (the last output is
    returned), so the gate's failure path can be shown on a real measurement."""

    def __init__(self, net: torch.nn.Module, n: int):
        super().__init__()
        self.inner, self.n = net, n
        self.blocks = net.blocks  # what the gate reports (kept blocks) reads

    def forward(self, *args, **kw):
        for _ in range(self.n - 1):
            self.inner(*args, **kw)
        return self.inner(*args, **kw)


def measure_group(dense, pruned: dict, mode: str, dtype: str, batch: int, device, warmup: int, reps: int,
                  min_rounds: int, max_rounds: int, rel_tol: float, deadline: float, log=print) -> dict:
    """Time `dense` and every model of `pruned` interleaved (module docstring) until every interval
    is within +-rel_tol or time.perf_counter() passes `deadline` (after min_rounds either way);
    returns per pruned name: the paired speedup (bench.speedup.paired_ratio) and what it came from."""
    import torch

    from bench.metrics.cost import OtherLoad, _check_inputs, interleave, make_runner, random_inputs
    from bench.speedup import paired_ratio

    if mode == "compile":
        torch._dynamo.reset()  # every group compiles afresh: earlier groups can't exhaust the recompile limit
    x = random_inputs(dense, batch, device)
    _check_inputs(x, torch.device(device))
    nets = {"dense": dense.net, **{n: p.net for n, p in pruned.items()}}
    runners = {n: make_runner(net, device, mode, dtype) for n, net in nets.items()}
    sync = (lambda: torch.cuda.synchronize(device)) if torch.device(device).type == "cuda" else (lambda: None)
    first, finite = {}, {}
    for n, r in runners.items():  # warm-up: the first call compiles (mode=compile) and is timed apart
        t0 = time.perf_counter()
        out = r(*x)
        sync()
        first[n] = time.perf_counter() - t0
        finite[n] = bool(torch.isfinite(out).all())
        for _ in range(warmup - 1):
            r(*x)
        sync()
    fns = {n: (lambda r=r: r(*x)) for n, r in runners.items()}
    rounds: dict[str, list[list[float]]] = {n: [] for n in runners}
    stats: dict[str, dict] = {}
    t0 = time.perf_counter()
    with OtherLoad() as load:
        for i in range(max_rounds):
            for n, t in interleave(fns, device, reps, shift=i).items():
                rounds[n].append(t)
            if i + 1 < min_rounds:
                continue
            stats = {n: paired_ratio(rounds["dense"], rounds[n]) for n in pruned}
            tight = all(math.sqrt(s["hi"] / s["lo"]) - 1 <= rel_tol for s in stats.values())
            if tight or time.perf_counter() > deadline:
                break
    if not stats:  # fewer rounds than min_rounds fit max_rounds
        stats = {n: paired_ratio(rounds["dense"], rounds[n]) for n in pruned}
    flat = {n: [v for r in rs for v in r] for n, rs in rounds.items()}
    out = {}
    for n, s in stats.items():
        out[n] = {**{k: s[k] for k in ("ratio", "lo", "hi", "rounds")},
                  "half_width": math.sqrt(s["hi"] / s["lo"]) - 1 if s["lo"] > 0 else float("inf"),
                  "round_ratios": s["round_ratios"], "reps_per_round": reps,
                  "dense_ms": statistics.median(flat["dense"]), "pruned_ms": statistics.median(flat[n]),
                  "dense_first_call_s": first["dense"], "pruned_first_call_s": first[n],
                  "out_finite": finite["dense"] and finite[n], "timing_s": time.perf_counter() - t0,
                  "others_cores": load.cores}
    log(f"[gate] {mode} {dtype} batch {batch}: {len(rounds['dense'])} rounds of {reps} calls each in "
        f"{time.perf_counter() - t0:.1f} s")
    return out


def run(path: str | Path, *, budget_s: float = 300.0, reps: int = 5, min_rounds: int = 10, max_rounds: int = 400,
        rel_tol: float = 0.01, device: str | None = None, log=print) -> dict:
    """Measure every pair of the file; returns the self-describing record (see main)."""
    import torch

    from bench.metrics.cost import busy_cores_max, count_macs, count_params, device_name, random_inputs
    from bench.results import git_info, library_versions
    from bench.speedup import CONF, LAUNCH_BOUND_MS, launch_bound

    spec, pairs = load(path)
    device = device or spec["device"]
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"{path} is for a GPU (device: cuda) but no CUDA device is visible; on a CPU use "
                         f"{EXPECTATIONS / 'tiny_cpu.yaml'}")
    threads = torch.get_num_threads()
    if spec["threads"] and torch.device(device).type == "cpu":
        torch.set_num_threads(int(spec["threads"]))
    try:
        t_start = time.perf_counter()
        dense, pruned = _models(spec, pairs)
        x1 = random_inputs(dense, 1, "cpu")
        macs = {"dense": count_macs(dense.net.eval(), *x1), **{n: count_macs(p.net.eval(), *x1) for n, p in pruned.items()}}
        params = {"dense": count_params(dense.net), **{n: count_params(p.net) for n, p in pruned.items()}}
        for d in [dense, *pruned.values()]:
            d.net.to(device).eval()
        groups: dict[tuple, list[Pair]] = {}
        for p in pairs:
            groups.setdefault(p.group, []).append(p)
        results = {}
        for gi, ((mode, dtype, batch), ps) in enumerate(groups.items()):
            # each group gets an equal share of the wall time left, its warm-up (compilation) included
            share = max(0.0, budget_s - (time.perf_counter() - t_start)) / (len(groups) - gi)
            log(f"[gate] {mode} {dtype} batch {batch}: {', '.join(p.name for p in ps)} ({share:.0f} s)")
            results.update(measure_group(dense, {p.name: pruned[p.name] for p in ps}, mode, dtype, batch, device,
                                         spec["warmup"], reps, min_rounds, max_rounds, rel_tol,
                                         time.perf_counter() + share, log))
        dev = device_name(device)
        sha, dirty = git_info()
        rec = {"schema": SCHEMA, "tool": "bench.gate", "expectations": str(path),
               "expectations_sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(),
               "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
               "device": dev, "device_type": torch.device(device).type,
               "torch": str(torch.__version__),
               "cuda": torch.version.cuda if torch.device(device).type == "cuda" else None,
               "cudnn": torch.backends.cudnn.version() if torch.device(device).type == "cuda" else None,
               "threads": torch.get_num_threads(), "commit": sha, "git_dirty": dirty, "versions": library_versions(),
               "model": spec["model"], "model_kw": spec["model_kw"],
               "settings": {"warmup": spec["warmup"], "reps_per_round": reps, "min_rounds": min_rounds,
                            "max_rounds": max_rounds, "rel_tol": rel_tol, "budget_s": budget_s, "conf": CONF,
                            "launch_bound_ms": LAUNCH_BOUND_MS},
               "rule": "fail when the speedup's 95% interval lies wholly below expect (hi < expect)",
               "dense": {"blocks": len(dense.net.blocks), "params_M": params["dense"] / 1e6,
                         "macs_G": macs["dense"] / 1e9},
               "pairs": []}
        for p in pairs:
            r = results[p.name]
            verdict = "no expectation" if p.expect is None else ("fail" if r["hi"] < p.expect else "pass")
            warn = []
            if launch_bound(r["dense_ms"], dev):
                warn.append(f"launch-bound: dense forward {r['dense_ms']:.3g} ms < {LAUNCH_BOUND_MS:g} ms")
            if r["half_width"] > rel_tol:
                warn.append(f"loose: interval +-{r['half_width']:.1%} > {rel_tol:.1%} (time or --max-rounds ran out)")
            if r["others_cores"] is not None and r["others_cores"] > busy_cores_max():
                warn.append(f"busy: other processes used {r['others_cores']:.2g} cores while it was timed")
            if not r["out_finite"]:
                warn.append("non-finite output")
            rec["pairs"].append({"name": p.name, "prune": {"keep_blocks": p.keep_blocks} if p.width is None
                                 else {"width": p.width}, "mode": p.mode, "dtype": p.dtype, "batch": p.batch,
                                 "blocks": len(pruned[p.name].net.blocks), "params_M": params[p.name] / 1e6,
                                 "macs_G": macs[p.name] / 1e9, "mac_speedup": macs["dense"] / macs[p.name],
                                 **r, "expect": p.expect, "verdict": verdict, "warnings": warn})
        rec["failed"] = [q["name"] for q in rec["pairs"] if q["verdict"] == "fail"]
        rec["passed"] = not rec["failed"]
        rec["elapsed_s"] = time.perf_counter() - t_start
        return rec
    finally:
        torch.set_num_threads(threads)


def table(rec: dict) -> str:
    from tabulate import tabulate

    rows = [[q["name"], q["mode"], q["dtype"], q["batch"], f"{q['dense_ms']:.3f}", f"{q['pruned_ms']:.3f}",
             f"{q['ratio']:.3f} [{q['lo']:.3f}, {q['hi']:.3f}]", f"{q['mac_speedup']:.2f}",
             "-" if q["expect"] is None else f"{q['expect']:.2f}", q["rounds"], q["verdict"].upper(),
             "; ".join(q["warnings"])] for q in rec["pairs"]]
    head = ["pair", "mode", "dtype", "batch", "dense ms", "pruned ms", "speedup [95%]", "MAC speedup", "expect",
            "rounds", "verdict", "warnings"]
    return tabulate(rows, headers=head, tablefmt="github", disable_numparse=True)


def write_expectations(path: str | Path, rec: dict, margin: float, out: str | Path | None = None) -> Path:
    """The file again, every measured pair's expect = floor((speedup x (1 - margin)) / 0.01) x 0.01
    and its measurement beside it."""
    import yaml

    from bench.io import atomic_write_text

    spec = yaml.safe_load(Path(path).read_text())
    spec["margin"] = margin
    got = {q["name"]: q for q in rec["pairs"]}
    for p in spec["pairs"]:
        q = got.get(p["name"])
        if q is None:
            continue
        p["expect"] = math.floor(q["ratio"] * (1 - margin) * 100 + 1e-9) / 100
        p["measured"] = {"ratio": round(q["ratio"], 4), "lo": round(q["lo"], 4), "hi": round(q["hi"], 4),
                         "dense_ms": round(q["dense_ms"], 4), "pruned_ms": round(q["pruned_ms"], 4),
                         "rounds": q["rounds"], "device": rec["device"], "torch": rec["torch"],
                         "commit": rec["commit"] + ("-dirty" if rec["git_dirty"] else ""), "date": rec["date"]}
        p["source"] = f"--write-expectations on {rec['device']}, {rec['date'][:10]}, margin {margin:g}"
    dest = Path(out or path)
    atomic_write_text(dest, dump(spec))
    return dest


# ---------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gate", description=__doc__.splitlines()[0])
    ap.add_argument("expectations", nargs="?", default=str(EXPECTATIONS / "dit_xl2.yaml"),
                    help="expectations file (default: the DiT-XL/2 GPU file)")
    ap.add_argument("--out", default=None, help="JSON record (default: gate-<file stem>.json here)")
    ap.add_argument("--budget-s", type=float, default=300.0,
                    help="wall seconds for the gate (building, compiling, timing): each group times until its "
                         "interval is tight or its share of what is left is spent (it always runs --min-rounds)")
    ap.add_argument("--reps", type=int, default=5, help="timed calls of each model per round")
    ap.add_argument("--min-rounds", type=int, default=10)
    ap.add_argument("--max-rounds", type=int, default=400)
    ap.add_argument("--rel-tol", type=float, default=0.01,
                    help="stop a group once every speedup's 95%% interval is within +- this fraction")
    ap.add_argument("--device", default=None, help="override the file's device (cuda | cpu | cuda:1)")
    ap.add_argument("--write-expectations", action="store_true",
                    help="rewrite the file: expect = measured speedup x (1 - margin); never fails on the old ones")
    ap.add_argument("--margin", type=float, default=None, help="for --write-expectations (default: the file's)")
    ap.add_argument("--write-to", default=None, help="write the expectations here instead of over the file")
    a = ap.parse_args(argv)
    try:
        if a.reps < 1 or a.min_rounds < 2 or a.max_rounds < a.min_rounds or not 0 < a.rel_tol < 1:
            raise BenchError("--reps >= 1, --min-rounds >= 2 (an interval needs two rounds), --max-rounds >= "
                             "--min-rounds and 0 < --rel-tol < 1")
        rec = run(a.expectations, budget_s=a.budget_s, reps=a.reps, min_rounds=a.min_rounds,
                  max_rounds=a.max_rounds, rel_tol=a.rel_tol, device=a.device,
                  log=lambda m: print(m, file=sys.stderr, flush=True))
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from bench.io import atomic_write_text

    out = Path(a.out or f"gate-{Path(a.expectations).stem}.json")
    atomic_write_text(out, json.dumps(rec, indent=1))
    print(f"speedup gate: {rec['model']} on {rec['device']} (torch {rec['torch']}, commit {rec['commit']}"
          f"{'-dirty' if rec['git_dirty'] else ''}); {rec['rule']}")
    print(table(rec))
    print(f"record: {out}")
    if a.write_expectations:
        spec, _ = load(a.expectations)
        margin = spec["margin"] if a.margin is None else a.margin
        dest = write_expectations(a.expectations, rec, margin, a.write_to)
        print(f"expectations written: {dest} (expect = measured x (1 - {margin:g}))")
        return 0
    if rec["failed"]:
        for q in rec["pairs"]:
            if q["verdict"] == "fail":
                print(f"FAIL {q['name']}: speedup {q['ratio']:.3f} [{q['lo']:.3f}, {q['hi']:.3f}] is below the "
                      f"expected {q['expect']:.2f} by more than its 95% interval allows", file=sys.stderr)
        return 1
    print("all gated speedups hold")
    return 0
