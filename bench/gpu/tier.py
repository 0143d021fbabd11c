"""The GPU tier's bookkeeping around bench.run (driven by bench/gpu/tier.sh): its rows, its teacher's
transport between machines, its cost.

    python -m bench.gpu.tier status                     rows done / to do, in run order; the teacher
    python -m bench.gpu.tier plan [--timings FILE]      projected GPU minutes of the teacher and the tier
    python -m bench.gpu.tier measure --out DIR          time the tier model's steps on this GPU (~2 min);
                                                        --regional: compile=blocks against eager on a row's paths
    python -m bench.gpu.tier teacher-dir                the teacher's cache folder (under $BENCH_ARTIFACTS)
    python -m bench.gpu.tier export-teacher --out DIR   sha256 + teacher.json, final.pt split into < 16 MiB parts
    python -m bench.gpu.tier import-teacher [DIR]       join the parts (results/gpu/tier_teacher), check the
                                                        sha256, put final.pt in place
    python -m bench.gpu.tier export-resume --out DIR    a teacher cut short: last.pt (its resume point) in parts
    python -m bench.gpu.tier import-resume DIR          join them into the teacher folder's last.pt
    python -m bench.gpu.tier archive --to NAME          move the rows of no planned run (an older config of
                                                        the tier) to results/gpu/tier_archive/NAME/

Rows: three commands of bench.run, in this order (a chunk that runs out of time leaves every finished
row behind and the next chunk skips it): the teacher rows (dense, fine-tuned 0 steps: the teacher's
FID at the tier protocol, and at cfg 1.5), then per seed 0, 1, 2: dense, experiment=gpu_tier (depth
methods, block budgets) and experiment=gpu_tier_width (width and operator methods, MAC budgets).

The teacher (model=dit_fmnist, 18.2 MiB of fp32 EMA weights) is trained once. Its parts, as the teacher
call returned them, are committed in results/gpu/tier_teacher/ (tracked, so they travel with the code and
outlive every machine; results/gpu/tier/teacher.json records their sha256, checked before a fresh machine
uses them). A row made from another teacher (row.json's teacher_sha256) is stale: `status` counts it as not
done and bench.run moves it aside and redoes it once this teacher is in place (bench.run.current_row).
A row of no planned run (its config hash is not a cell's: the tier's configs changed since) is obsolete:
`status` counts it, and `archive` moves it out of the tier's folder so the report does not set it beside
the current rows.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
RESULTS = os.environ.get("TIER_RESULTS", "results/gpu/tier")  # bench/gpu/tier.sh passes its own on
TEACHER_JSON = (ROOT / RESULTS if not Path(RESULTS).is_absolute() else Path(RESULTS)) / "teacher.json"
TEACHER_PARTS = ROOT / os.environ.get("TIER_PARTS", "results/gpu/tier_teacher")  # the committed teacher.part-* (not packed)
PART_BYTES = 15 * 2 ** 20  # files come back from the GPU machine at <= 16 MiB each
# every run's common overrides: the device, the rows' folder, and TIER_OVERRIDES (tier.sh's; a smoke test's shrink)
BASE = [f"device={os.environ.get('TIER_DEVICE', 'cuda')}", f"paths.results={RESULTS}",
        *os.environ.get("TIER_OVERRIDES", "").split()]
TEACHER_ROWS = [["experiment=gpu_tier", "method=dense", "budget.keep=1.0", "finetune.steps=0", "seed=0"],
                ["experiment=gpu_tier", "method=dense", "budget.keep=1.0", "finetune.steps=0", "seed=0",
                 "eval.cfg_scale=1.5"]]


CED_SCREEN = ["experiment=gpu_tier_ced", "seed=0"]  # EntPruner's CED variants at seed 0 (its yaml says why)


def sweeps(best: list[str] | None = None) -> list[list[str]]:
    """bench.run -m commands of the tier (overrides), in run order: seed-major, so that a tier cut
    short has whole seeds of every method; the CED screen after seed 0, and its best variant at seeds
    1 and 2 once known (`best`: its method.* overrides, [] when the default won, None while unknown)."""
    out = []
    for s in (0, 1, 2):
        out += [["experiment=gpu_tier", "method=dense", "budget.keep=1.0", f"seed={s}"],
                ["experiment=gpu_tier", f"seed={s}"], ["experiment=gpu_tier_width", f"seed={s}"]]
        if s == 0:
            out.append(CED_SCREEN)
        elif best:
            out.append(["experiment=gpu_tier", "method=entpruner", *best, f"seed={s}"])
    return out


def commands() -> list[list[str]]:
    """The tier's commands as they stand now (the best CED variant's once the screen is done)."""
    best = ced_best()
    return sweeps(best["overrides"] if best else None)


def jobs(cmd: list[str]) -> list[list[str]]:
    """The runs of one command as bench.run -m would sweep them (each run's overrides), from one compose."""
    return [list(j) for j in _jobs(tuple(cmd))]


@lru_cache(maxsize=None)
def _jobs(cmd: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    from bench.cost import sweep_jobs

    return tuple(tuple(j) for j in sweep_jobs([*cmd, *BASE])[3])


def method_of(job: list[str]) -> str:
    return [o.split("=", 1)[1] for o in job if o.startswith("method=")][-1]


def share(commands: list[list[str]], workers: int, worker: int) -> list[list[str]]:
    """Worker `worker`'s share of the commands when `workers` processes run the tier together (tier.sh
    TIER_WORKERS): each command's methods are dealt out in turn (a `method=a,c,...` override), a one-method
    command goes whole, and where the dealing starts is a function of the command's text only, so a command
    keeps its split when the list grows (the CED screen's winner joins at seeds 1 and 2). Every method is
    dealt out: rows timed on a shared GPU are retimed by the latency pass (routed Diff-ES ones too)."""
    import zlib

    if workers == 1:
        return [list(c) for c in commands]
    out = []
    for cmd in commands:
        start = zlib.crc32(" ".join(cmd).encode()) % workers
        methods = list(dict.fromkeys(method_of(job) for job in jobs(cmd)))
        if any(o.startswith("method=") for o in cmd):  # the command names its method itself: it goes whole
            out += [list(cmd)] if methods and start == worker else []
            continue
        mine = [m for i, m in enumerate(methods) if (start + i) % workers == worker]
        out += [[*cmd, "method=" + ",".join(mine)]] if mine else []
    return out


def todo(commands: list[list[str]]) -> list[list[str]]:
    """The commands that still have a run to do: a command whose every run has a row of the recorded teacher
    (`tier_row` "done") is left out, the others go unchanged (bench.run skips their finished runs itself). Each
    bench.run -m starts a process and composes its sweep (~7 s on the GPU machine) even when all its runs are
    done: a call that skips them reaches its first new row a minute sooner."""
    from bench.results import run_relpath

    return [cmd for cmd in commands if any(tier_row(run_relpath(c.cfg))[0] != "done" for c in cells([cmd]))]


def ced_best() -> dict | None:
    """The CED screen's winner once all its rows and gpu_tier's default EntPruner rows at seed 0 exist (else
    None): the variant (the screen's method.* keys at their resolved values) with the lowest geometric mean
    of FID over the budgets; overrides [] when it is the default."""
    import math

    from bench.results import run_relpath

    screen = cells([CED_SCREEN])
    keys = sorted({o.split("=", 1)[0] for c in screen for o in c.overrides if o.startswith("method.")})
    base = cells([["experiment=gpu_tier", "method=entpruner", "seed=0"]])
    fids: dict[tuple[str, ...], list[float]] = {}
    for c in base + screen:
        state, row = tier_row(run_relpath(c.cfg))
        if state != "done":
            return None
        variant = tuple(f"{k}={c.cfg['method'][k.split('.', 1)[1]]}" for k in keys)
        fids.setdefault(variant, []).append(float(row["metrics"]["fid"]))
    default = tuple(f"{k}={base[0].cfg['method'][k.split('.', 1)[1]]}" for k in keys)
    score = {v: math.exp(sum(map(math.log, f)) / len(f)) for v, f in fids.items()}
    best = min(score, key=score.get)
    return {"overrides": [] if best == default else list(best), "variant": list(best),
            "geomean_fid": {" ".join(v): round(g, 3) for v, g in sorted(score.items(), key=lambda kv: kv[1])}}


def cells(commands: list[list[str]]) -> list:
    """Every run (bench.cost's cells: the sweep expanded as bench.run -m would) of the commands."""
    from bench.cost import expand

    return [c for cmd in commands for c in expand([*cmd, *BASE])[1]]


def teacher_dir(artifacts: str | None = None) -> Path:
    """Where bench.run caches the tier's teacher: <artifacts>/teachers/<config hash of model, data, teacher>."""
    from bench.run import teacher_dir as run_teacher_dir

    cfg = cells([TEACHER_ROWS[0]])[0].cfg
    art = artifacts or os.environ.get("BENCH_ARTIFACTS") or cfg["paths"]["artifacts"]
    return run_teacher_dir({**cfg, "paths": {**cfg["paths"], "artifacts": art}})


def export_teacher(out: Path, if_new: bool = False) -> dict | None:
    """teacher.json (sha256, size, hash folder, config) into results/gpu/tier and the out folder, and
    final.pt in parts of PART_BYTES (teacher.part-00, ...) into the out folder. if_new: nothing when
    results/gpu/tier/teacher.json already records this final.pt (it came back and was committed)."""
    from bench.api import BenchError
    from bench.run import TEACHER_KEYS

    tdir = teacher_dir()
    final = tdir / "final.pt"
    if not final.is_file():
        raise BenchError(f"no trained teacher at {final}; run bash bench/gpu/tier.sh teacher first")
    data = final.read_bytes()
    if if_new and TEACHER_JSON.is_file() and json.loads(TEACHER_JSON.read_text())["sha256"] == \
            hashlib.sha256(data).hexdigest():
        return None
    cfg = cells([TEACHER_ROWS[0]])[0].cfg
    rec = {"file": "final.pt", "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
           "folder": f"teachers/{tdir.name}", "parts": _split(data, out, "teacher"),
           "config": {k: cfg[k] for k in TEACHER_KEYS}}
    log = tdir / "log.jsonl"  # the teacher's training log (loss, seconds per logged step)
    if log.is_file():
        rec["log_tail"] = log.read_text().splitlines()[-3:]
    text = json.dumps(rec, indent=1, sort_keys=True) + "\n"
    TEACHER_JSON.parent.mkdir(parents=True, exist_ok=True)
    TEACHER_JSON.write_text(text)  # comes back with the rows; commit it
    (out / "teacher.json").write_text(text)
    return rec


def _split(data: bytes, out: Path, stem: str) -> list[dict]:
    """data into out/<stem>.part-00, -01, ... of at most PART_BYTES; their names, sizes and sha256."""
    out.mkdir(parents=True, exist_ok=True)
    parts = []
    for i in range(0, len(data), PART_BYTES):
        name, chunk = f"{stem}.part-{i // PART_BYTES:02d}", data[i:i + PART_BYTES]
        (out / name).write_bytes(chunk)
        parts.append({"name": name, "bytes": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
    return parts


def compact_resume(state: dict) -> dict:
    """A fine-tune resume point (bench.finetune's last.pt) small enough to travel: weights and EMA as they
    are, AdamW's second moment in bf16 and its first moment left out (76.5 MB -> ~48 MB for the tier's
    teacher; a call returns at most 64 MiB and carries 64 MiB with the code). expand_resume restores it."""
    import torch

    opt = {**state["opt"], "state": {k: {n: v for n, v in st.items() if n != "exp_avg"} | (
        {"exp_avg_sq": st["exp_avg_sq"].to(torch.bfloat16)} if "exp_avg_sq" in st else {})
        for k, st in state["opt"]["state"].items()}}
    return {**state, "opt": opt, "compact": True}


def expand_resume(state: dict) -> dict:
    """compact_resume's inverse, as far as it goes: the second moment back in fp32, the first moment zero
    (AdamW rebuilds it within ~10 steps at beta1 = 0.9; the step count, and so its bias correction, is kept).
    So a resume across machines continues the run closely but not bit-identically (a resume on the same
    machine, from the full last.pt, is exact)."""
    import torch

    opt = {**state["opt"], "state": {k: {**st, "exp_avg_sq": st["exp_avg_sq"].float(),
                                         "exp_avg": torch.zeros_like(st["exp_avg_sq"], dtype=torch.float32)}
                                     for k, st in state["opt"]["state"].items()}}
    return {k: v for k, v in state.items() if k != "compact"} | {"opt": opt}


def export_resume(out: Path) -> dict | None:
    """A teacher cut short (no final.pt yet): its resume point (compact_resume of last.pt) in parts into out/
    (teacher-resume.part-*, teacher-resume.json), so that a session whose GPU time or machine ends between
    the teacher's two calls keeps the steps it trained. None when there is nothing to export."""
    tdir = teacher_dir()
    last = tdir / "last.pt"
    if (tdir / "final.pt").is_file() or not last.is_file():
        return None
    import io

    import torch

    state = torch.load(last, map_location="cpu", weights_only=False)
    buf = io.BytesIO()
    torch.save(compact_resume(state), buf)
    data = buf.getvalue()
    rec = {"file": "last.pt", "compact": True, "step": int(state["step"]), "sha256": hashlib.sha256(data).hexdigest(),
           "bytes": len(data), "folder": f"teachers/{tdir.name}", "parts": _split(data, out, "teacher-resume")}
    (out / "teacher-resume.json").write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")
    return rec


def _joined(rec: dict, files: list[Path], record: Path, what: str) -> bytes:
    """The bytes of `files` once `rec` (the record at `record`) is for this tier's teacher folder and their
    sha256 is the one it records: import-teacher's and import-resume's one check."""
    from bench.api import BenchError

    tdir = teacher_dir()
    if f"teachers/{tdir.name}" != rec["folder"]:
        raise BenchError(f"{record} is for {rec['folder']}, the tier's teacher folder is teachers/{tdir.name}: the "
                         "model, data or teacher config changed since it was trained")
    data = b"".join(f.read_bytes() for f in files)
    if hashlib.sha256(data).hexdigest() != rec["sha256"]:
        where = files[0].parent if files else record.parent
        raise BenchError(f"the {what} parts in {where} ({len(files)} files, {len(data)} bytes) do not give the sha256 "
                         f"{rec['sha256'][:12]}... of {record.name}; carry all of {[p['name'] for p in rec['parts']]}")
    return data


def import_resume(src: Path) -> Path | None:
    """Join teacher-resume.part-* from src (checked against src's teacher-resume.json) into the teacher
    folder's last.pt (expand_resume), unless the folder has a teacher or a resume point at least as far along."""
    import io

    import torch

    from bench.io import atomic_torch_save

    meta = src / "teacher-resume.json"
    if not meta.is_file():
        return None
    rec = json.loads(meta.read_text())
    files = [src / p["name"] for p in rec["parts"] if (src / p["name"]).is_file()]
    data = _joined(rec, files, meta, "resume")
    tdir = teacher_dir()
    dest = tdir / "last.pt"
    if (tdir / "final.pt").is_file():
        return None
    if dest.is_file() and int(torch.load(dest, map_location="cpu", weights_only=False)["step"]) >= rec["step"]:
        return None
    tdir.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(expand_resume(torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)), dest)
    return dest


def import_teacher(src: Path) -> Path | None:
    """Join teacher.part-* from `src` into the teacher folder, once their sha256 equals teacher.json's.
    Returns the path, or None when it is there already or no parts were carried."""
    from bench.api import BenchError
    from bench.io import atomic_write

    dest = teacher_dir() / "final.pt"
    if dest.is_file():
        return None
    parts = sorted(src.glob("teacher.part-*")) if src.is_dir() else []
    if not parts:
        return None
    if not TEACHER_JSON.is_file():
        raise BenchError(f"teacher parts in {src} but no {TEACHER_JSON} to check them against; "
                         "commit the teacher.json that came back with them")
    rec = json.loads(TEACHER_JSON.read_text())
    data = _joined(rec, parts, TEACHER_JSON, "teacher")
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(dest, lambda tmp: Path(tmp).write_bytes(data))
    (dest.parent / "teacher.json").write_text(json.dumps(rec["config"], indent=1, sort_keys=True))
    return dest


def recorded_teacher() -> str | None:
    """The sha256 of the tier's teacher as teacher.json records it (None before the teacher call)."""
    return json.loads(TEACHER_JSON.read_text())["sha256"] if TEACHER_JSON.is_file() else None


def tier_row(rel: str) -> tuple[str, dict | None]:
    """("done", row) for the run folder `rel` under the tier's rows, ("stale", row) when that row was made
    from another teacher than teacher.json's, ("todo", None) when it has no row."""
    path = ROOT / RESULTS / rel / "row.json"  # absolute RESULTS: itself
    if not path.is_file():
        return "todo", None
    row = json.loads(path.read_text())
    want = recorded_teacher()
    return ("stale" if want and row.get("teacher_sha256") and row["teacher_sha256"] != want else "done"), row


def _seedless(rel: str) -> str:
    """A run folder without its seed and config hash (<model>/<method>/<budget>-s<seed>-<device>-<hash>):
    the rows of one method and budget over seeds."""
    return re.sub(r"-s\d+-[^/]*$", "", rel)


def status() -> dict:
    """Rows done (row.json in results/gpu/tier, of the recorded teacher) and to do, per command; rows of
    another teacher (stale: redone by the next call); the teacher."""
    from bench.results import run_relpath

    out = {"commands": [], "done": 0, "total": 0, "stale": 0}
    seen: set[str] = set()  # a run in two commands (the CED screen's default cells are gpu_tier's) counts once
    stages: dict[str, float] = {}  # the done rows' own wall seconds per stage (row.json's wall_s)
    own: dict[str, list[float]] = {}  # a done row's own seconds, by method and budget (its folder, seed aside)
    todo_runs: list[str] = []
    done_runs: set[str] = set()
    for cmd in [*TEACHER_ROWS, *commands()]:
        runs = [run_relpath(c.cfg) for c in cells([cmd])]
        got = [tier_row(r) for r in runs]
        out["commands"].append({"overrides": cmd, "done": sum(st == "done" for st, _ in got), "total": len(runs)})
        for r, (st, row) in zip(runs, got):
            if r in seen:
                continue
            seen.add(r)
            out["total"] += 1
            out["done"] += st == "done"
            if st == "done":
                done_runs.add(r)
            out["stale"] += st == "stale"
            walls = (row.get("wall_s") or {}) if st == "done" else {}
            for k, v in walls.items():
                stages[k] = stages.get(k, 0.0) + float(v)
            if walls:
                own.setdefault(_seedless(r), []).append(sum(float(v) for v in walls.values()))
            elif st != "done":
                todo_runs.append(r)
    out["rows_minutes"] = {k: round(v / 60, 1) for k, v in sorted(stages.items(), key=lambda kv: -kv[1])}
    # the rows to do, each at the mean own time of its method and budget's done rows (other seeds)
    est = [sum(own[k]) / len(own[k]) for k in map(_seedless, todo_runs) if k in own]
    out["left"] = {"rows": len(todo_runs), "estimated": len(est), "minutes": round(sum(est) / 60, 1)}
    tdir = teacher_dir()
    out["teacher"] = {"folder": str(tdir), "trained_here": (tdir / "final.pt").is_file(),
                      "recorded": recorded_teacher(),
                      "parts_committed": sorted(p.name for p in TEACHER_PARTS.glob("teacher.part-*"))}
    out["gpu_time"] = gpu_time(TEACHER_JSON.parent / "calls.jsonl")
    out["ced_best"] = ced_best()
    out["obsolete"] = obsolete(seen)
    out["latency_pass"] = latency_state(done_runs)
    return out


def latency_state(done: set[str]) -> dict | None:
    """The latency pass's record beside the rows (bench.latency_pass) against the done rows (run folders):
    None when the pass has not run; else its device and date, how many done rows it timed, the done rows it
    has not (made after it: the pass runs again) and how many it skipped."""
    from bench import latency_pass

    rec = latency_pass.load(TEACHER_JSON.parent)
    if rec is None:
        return None
    timed = {str(v.get("dir")) for v in rec["runs"].values()}
    return {"device": rec.get("device"), "date": rec.get("date"), "timed": len(done & timed),
            "untimed": sorted(done - timed), "skipped": len(rec.get("skipped") or {})}


def obsolete(planned: set[str] | None = None) -> list[str]:
    """The run folders under the tier's rows (<model>/<method>/<run>, finished, failed or cut short; not
    set aside) that no planned run names (`planned`: those run folders, when the caller has them): runs of
    an older config of the tier, which its report would otherwise set beside the current ones and which no
    call will finish."""
    from bench.results import run_relpath, set_aside

    root = ROOT / RESULTS
    if planned is None:
        planned = {run_relpath(c.cfg) for c in cells([*TEACHER_ROWS, *commands()])}
    found = [f for f in root.glob("*/*/*") if f.is_dir() and not set_aside(f, root)]
    return sorted(r for r in (str(f.relative_to(root)) for f in found) if r not in planned)


def archive(name: str) -> list[Path]:
    """Move the obsolete run folders to results/gpu/tier_archive/<name>/, keeping their paths, their large
    records compacted (compact_runs); a name already used is refused (nothing is overwritten)."""
    from bench.api import BenchError

    if not name or "/" in name or name.startswith("."):
        raise BenchError(f"archive --to {name!r}: give a plain folder name, e.g. eager-eval")
    dest = ROOT / "results" / "gpu" / "tier_archive" / name
    runs = obsolete()
    if runs and dest.exists():
        raise BenchError(f"{dest} exists: give another --to name")
    moved = []
    for rel in runs:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        moved.append((ROOT / RESULTS / rel).rename(dest / rel))
    compact_runs(dest, unfinished=True)
    return moved


def compact_runs(root: Path, unfinished: bool = False) -> list[Path]:
    """bench.results.compact on every run folder <model>/<method>/<run> under `root` (the tier's finished
    rows before they are packed; every run of an archive, `unfinished`): the committed rows travel with
    every GPU call."""
    from bench.results import compact

    return [p for d in sorted(root.glob("*/*/*")) if d.is_dir() for p in compact(d, unfinished=unfinished)]


def gpu_time(ledger: Path) -> dict:
    """The GPU time of tier.sh's calls from its ledger (one JSON line per call): wall time x the machine's GPUs,
    in minutes, summed over the calls that recorded it, per command (teacher, tier, measure, latency), and how
    many did not."""
    calls = [json.loads(line) for line in ledger.read_text().splitlines() if line.strip()] if ledger.is_file() else []
    known = [c for c in calls if c.get("wall_s") is not None]
    by: dict[str, float] = {}
    for c in known:  # a call holds every GPU of its machine (`gpus`; lines before 2026-12-07 had one)
        by[str(c.get("command"))] = by.get(str(c.get("command")), 0.0) + float(c["wall_s"]) * int(c.get("gpus") or 1)
    return {"calls": len(calls), "minutes": round(sum(by.values()) / 60, 1),
            "by_command": {k: round(v / 60, 1) for k, v in by.items()}, "unrecorded_calls": len(calls) - len(known)}


# --------------------------------------------------------------------------------------------
# Cost: the arithmetic of bench/conf/experiment/gpu_tier.yaml, from estimated or measured step times
# --------------------------------------------------------------------------------------------

# Estimates for an H100 in bf16 eager (no measurement of this model exists yet; `measure` replaces them).
# The model is memory-bound (hidden 96): time ~ bytes moved, ~160 B per token, block and hidden unit in
# eager bf16 (fp32 residual stream and LayerNorms) -> 110 MB per forward of one 256-token sample, 39 us at
# 2.8 TB/s, + ~10 us of small-head attention; x1.2, the ratio of measured to this model's estimate on
# results/gpu/paths_speed (DiT-XL/2: 1.11 for sampling, 1.40 for a fine-tune step).
EST = {
    "fwd_s": 60e-6,         # one sample's forward through the 28-block model (large batch)
    "train_factor": 3.25,   # a training step per sample, in forwards (backward ~2x, AdamW + EMA on 4.8M params)
    "compile_gain": 1.0,    # teacher steps compiled vs eager (pessimistic: no gain; measure says)
    "compile_s": 120.0,     # torch.compile of the teacher's training graph (cold) + a warm second chunk
    "fid_s": 9.0,           # Inception features of 10k 32x32 images (4.4 s at 2,300 img/s) + FID/sFID/KID/P/R + 100 bootstraps
    "ref_s": 6.0,           # the 10k test images' reference statistics, once
    "row_s": 6.0,           # per row: compose + checks, data load and sha256, teacher load, calibration, latency, MACs
    "chunk_s": 40.0,        # per GPU call: staging, 2-3 bench.run starts (python, torch, CUDA, data), report, packing
    "chunk_len_s": 540.0,   # one call's work (bench/gpu/tier.sh: 9 minutes)
    # compile=blocks (regional) in a row's fine-tune and sampling: gains over eager and the compile a row pays
    # (the first row of a process compiles cold, later rows of the same block shapes reuse it); until
    # `measure --regional` has run: no gain, and the configs keep eager
    "ft_regional_gain": 1.0, "sample_regional_gain": 1.0, "regional_row_s": 0.0,
}
# a method's own work beyond the shared stages (plan(), or its fine-tune callback), seconds per row
PLAN_S = {"entpruner": 35.0, "diffes": 10.0, "tinyfusion": 6.0, "ld_pruner": 6.0, "obs_diff": 5.0, "grad_flow": 10.0,
          "sensitivity": 2.0, "entpruner_oneshot": 3.0, "taylor_width": 2.0, "diff_pruning": 2.0}
PLAN_DEFAULT_S = 1.0


def depth_factor(keep_blocks: float) -> float:
    """Forward time of a block-pruned model / the dense one (patch embedding and final layer stay)."""
    return 0.04 + 0.96 * keep_blocks


def width_factor(keep_macs: float) -> float:
    """Forward time of a width-pruned model / the dense one in eager mode: the residual stream, its
    LayerNorms and adaLN modulations keep their full width (~35 % of the bytes moved)."""
    return 0.35 + 0.65 * keep_macs


def project(t: dict | None = None, cfg_scale: float | None = None) -> dict:
    """GPU seconds of the teacher and of every tier row from per-step times `t` (EST's keys; measured
    values override), by the configs' own numbers (steps, batch, samples, sampler steps)."""
    from bench.results import run_relpath

    t = {**EST, **(t or {})}
    teach = cells([TEACHER_ROWS[0]])[0].cfg
    tc, ev = teach["teacher"], teach["eval"]
    cfg = ev["cfg_scale"] if cfg_scale is None else cfg_scale
    nfe = ev["steps"] * (2 if cfg != 1.0 else 1)
    fwd = t["fwd_s"]
    teacher_step = fwd * t["train_factor"] * tc["batch"] / t["compile_gain"]
    teacher = {"steps_s": tc["steps"] * teacher_step, "compile_s": t["compile_s"], "chunks_s": 2 * t["chunk_s"],
               "eval_s": sum(ev["n"] * ev["steps"] * (2 if c != 1.0 else 1) * fwd + t["fid_s"] for c in (1.0, 1.5))
               + t["ref_s"], "step_s": teacher_step}
    teacher["total_s"] = sum(v for k, v in teacher.items() if k != "step_s")
    rows = []
    best = ced_best()  # until the CED screen names its winner, cost one non-default variant's 4 rows
    seen: set[str] = set()
    for c in cells(sweeps(best["overrides"] if best else ["method.outputs=x0"])):
        if (rel := run_relpath(c.cfg)) in seen:  # the screen's default cells are gpu_tier's own
            continue
        seen.add(rel)
        d = c.cfg
        keep, measure = float(d["budget"]["keep"]), d["budget"]["measure"]
        f = depth_factor(keep) if measure == "blocks" else width_factor(keep)
        ft = d["finetune"]
        e = d["eval"]
        r_nfe = e["steps"] * (2 if (cfg if cfg_scale is not None else e["cfg_scale"]) != 1.0 else 1)
        ft_gain = t["ft_regional_gain"] if ft.get("compile") == "blocks" else 1.0
        s_gain = t["sample_regional_gain"] if e.get("compile") == "blocks" else 1.0
        regional = "blocks" in (ft.get("compile"), e.get("compile"))
        rec = {"method": d["method_name"], "keep": keep, "measure": measure, "seed": d["seed"],
               "finetune_s": ft["steps"] * ft["batch"] * fwd * t["train_factor"] * f / ft_gain,
               "sample_s": e["n"] * r_nfe * fwd * f / s_gain, "score_s": t["fid_s"],
               "row_s": t["row_s"] + (t["regional_row_s"] if regional else 0.0),
               "method_s": PLAN_S.get(d["method_name"], PLAN_DEFAULT_S)}
        rec["total_s"] = sum(v for k, v in rec.items() if k.endswith("_s"))
        rows.append(rec)
    work = sum(r["total_s"] for r in rows) + t["ref_s"]
    chunks = max(1, round(work / (t["chunk_len_s"] - t["chunk_s"]) + 0.5))
    tier = {"rows": len(rows), "work_s": work, "chunks": chunks, "total_s": work + chunks * t["chunk_s"],
            "finetune_s": sum(r["finetune_s"] for r in rows), "sample_s": sum(r["sample_s"] for r in rows),
            "score_s": sum(r["score_s"] for r in rows), "overhead_s": sum(r["row_s"] for r in rows),
            "method_s": sum(r["method_s"] for r in rows), "nfe": nfe}
    return {"timings": t, "teacher": teacher, "tier": tier, "rows": rows}


def plan_text(p: dict) -> str:
    t, te, ti = p["timings"], p["teacher"], p["tier"]
    lines = [f"per-sample forward (28 blocks) {t['fwd_s'] * 1e6:.0f} us; training step per sample "
             f"{t['train_factor']:.2f} forwards; teacher step {te['step_s'] * 1e3:.1f} ms",
             f"teacher: {te['steps_s'] / 60:.1f} min of steps + {te['compile_s'] / 60:.1f} compile + "
             f"{te['chunks_s'] / 60:.1f} starts + {te['eval_s'] / 60:.1f} eval = {te['total_s'] / 60:.1f} GPU-min",
             f"tier: {ti['rows']} rows: fine-tune {ti['finetune_s'] / 60:.1f} + sample {ti['sample_s'] / 60:.1f} + "
             f"score {ti['score_s'] / 60:.1f} + per-row overhead {ti['overhead_s'] / 60:.1f} + methods' own "
             f"{ti['method_s'] / 60:.1f} + {ti['chunks']} starts = {ti['total_s'] / 60:.1f} GPU-min"]
    by = {}
    for r in p["rows"]:
        by.setdefault((r["measure"], r["keep"]), []).append(r["total_s"])
    lines += [f"  {m} {k:g}: {len(v)} rows, {sum(v) / len(v):.1f} s each" for (m, k), v in sorted(by.items())]
    return "\n".join(lines)


def measure(out: Path, budget_s: float = 150.0, device: str = "cuda", compile_too: bool = True) -> dict:
    """Per-step times of the tier model on this GPU (bench.steptime, the suite's own loops): a
    training step at the teacher's batch in bf16 eager and compiled, and one sampler step of the
    tier's eval at 28, 21 and 14 blocks; written to out/tier_measure.json with the projection."""
    import time

    import torch

    from bench import steptime
    from bench.api import Plan
    from bench.surgery import apply

    t0 = time.time()
    cfg = cells([TEACHER_ROWS[0]])[0].cfg
    dev = device
    recs = []
    full = len(steptime.random_model(cfg["model"], "cpu").net.blocks)
    for depth in (full, full * 3 // 4, full // 2):  # 28, 21, 14: dense and the two block budgets
        net = steptime.random_model(cfg["model"], dev)
        if depth < full:
            apply(net, Plan("block", {"blocks": list(range(depth))}))
        r = steptime.sample_step_s(net, cfg["eval"]["batch"], dev, "bf16", False, steps=(2, 6), sampler="ddim",
                                   cfg_scale=1.0)
        recs.append({**r, "per_sample_forward_s": r["per_step_s"] / r["forward_batch"]})
        print(json.dumps(recs[-1]), flush=True)
    for compile_ in (False, True) if compile_too else (False,):
        if time.time() - t0 > budget_s:
            break
        net = steptime.random_model(cfg["model"], dev)
        r = steptime.finetune_step_s(net, cfg["teacher"]["batch"], dev, "bf16", compile_, steps=(5, 20))
        recs.append(r)
        print(json.dumps(r), flush=True)
    fwd = recs[0]["per_sample_forward_s"]
    eager = next(r for r in recs if r["path"] == "finetune" and not r["compile"])
    comp = next((r for r in recs if r["path"] == "finetune" and r["compile"]), None)
    t = {"fwd_s": fwd, "train_factor": eager["per_step_s"] / cfg["teacher"]["batch"] / fwd}
    if comp is not None:
        t["compile_gain"] = eager["per_step_s"] / comp["per_step_s"]
        t["compile_s"] = comp["warmup_s"] + 30.0
    p = project(t)
    res = {"device": torch.cuda.get_device_name(0) if dev == "cuda" else dev, "torch": torch.__version__, "records": recs, "timings": p["timings"],
           "teacher": p["teacher"], "tier": p["tier"], "depth_ratio": [r["per_sample_forward_s"] / fwd for r in recs[:3]]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "tier_measure.json").write_text(json.dumps(res, indent=1) + "\n")
    print(plan_text(p))
    return res


def measure_regional(out: Path, device: str = "cuda") -> dict:
    """compile=blocks (regional) against eager on the tier's own paths (bench.steptime): a fine-tune step at the
    tier's fine-tune batch and a sampler step at its eval batch, dense (28 blocks) then half depth (14 blocks:
    a later row of the same block shapes, whose compile the first one's cache serves), in bf16. warmup_s is
    the untimed first run, compile included. -> out/tier_measure_regional.json, whose timings (ft_regional_gain,
    sample_regional_gain, regional_row_s) `plan --timings` merges; then set finetune/eval compile: blocks in the
    tier's configs if they pay."""
    import torch

    from bench import steptime
    from bench.api import Plan
    from bench.surgery import apply

    cfg = cells([TEACHER_ROWS[0]])[0].cfg
    ft_batch = int(cells([["experiment=gpu_tier", "method=dense", "budget.keep=1.0", "seed=0"]])[0].cfg["finetune"]["batch"])
    recs = []
    full = len(steptime.random_model(cfg["model"], "cpu").net.blocks)
    for depth in (full, full // 2):
        for mode in (False, "blocks"):
            net = steptime.random_model(cfg["model"], device)
            if depth < full:
                apply(net, Plan("block", {"blocks": list(range(depth))}))
            for r in (steptime.finetune_step_s(net, ft_batch, device, "bf16", mode, steps=(5, 20)),
                      steptime.sample_step_s(net, cfg["eval"]["batch"], device, "bf16", mode, steps=(2, 6),
                                             sampler="ddim", cfg_scale=1.0)):
                recs.append({**r, "depth": depth})
                print(json.dumps(recs[-1]), flush=True)

    def get(path, depth, mode):
        return next(r for r in recs if r["path"] == path and r["depth"] == depth and r["compile"] == mode)

    gains = {p: [get(p, d, False)["per_step_s"] / get(p, d, "blocks")["per_step_s"] for d in (full, full // 2)]
             for p in ("finetune", "sample")}
    # a later row pays the warm-up of a cached compile: half depth's, over its eager warm-up
    warm = sum(get(p, full // 2, "blocks")["warmup_s"] - get(p, full // 2, False)["warmup_s"] for p in ("finetune", "sample"))
    t = {"ft_regional_gain": min(gains["finetune"]), "sample_regional_gain": min(gains["sample"]),
         "regional_row_s": max(0.0, warm)}
    res = {"device": torch.cuda.get_device_name(0) if device == "cuda" else device, "torch": torch.__version__,
           "records": recs, "gains": gains, "timings": t,
           "cold_compile_s": {p: get(p, full, "blocks")["warmup_s"] for p in ("finetune", "sample")}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "tier_measure_regional.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: res[k] for k in ("gains", "timings", "cold_compile_s")}))
    return res


def graph_agreement(net, data, cfg, device, steps: int = 20) -> dict:
    """Fine-tune copies of `net` for `steps` steps from the same weights and seed: eager twice (the GPU's own
    run-to-run spread) and with finetune.graph (bench.graphed). Per pair: weight tensors bitwise equal, of
    how many, and the largest absolute difference of the final (EMA) weights."""
    import copy
    import dataclasses
    import tempfile

    import torch

    from bench.finetune import finetune

    def run(graph: bool):
        m = copy.deepcopy(net)
        with tempfile.TemporaryDirectory() as d:
            finetune(m, data, dataclasses.replace(cfg, steps=steps, graph=graph, ckpt_every=10 ** 9,
                                                   log_every=10 ** 9), Path(d), device=device)
        return {k: v.detach().float().cpu() for k, v in m.net.state_dict().items()}

    def compare(a, b):
        return {"equal": sum(bool(torch.equal(a[k], b[k])) for k in a), "of": len(a),
                "max_abs_diff": max(float((a[k] - b[k]).abs().max()) for k in a)}

    eager = run(False)
    return {"steps": steps, "eager_vs_eager": compare(eager, run(False)), "graph_vs_eager": compare(run(True), eager)}


def measure_graph(out: Path, device: str = "cuda") -> dict:
    """finetune.graph (bench.graphed) against eager on the tier's fine-tune (its batch, bf16, this model): the
    step time (bench.steptime, S1/S2 difference) and whether a graphed fine-tune gives the eager one's weights
    (graph_agreement), at 28 and 14 blocks and at 0.5 of the MACs in width (heads and MLP channels halved,
    rounded to 8). -> out/tier_measure_graph.json. Set finetune.graph: true in bench/conf/finetune/gpu_tier.yaml
    when graph_vs_eager is as close as eager_vs_eager and the step is faster."""
    import dataclasses

    import torch

    from bench import steptime
    from bench.api import Plan
    from bench.finetune import FinetuneConfig
    from bench.surgery import apply
    from bench.width import width_groups

    cfg = cells([["experiment=gpu_tier", "method=dense", "budget.keep=1.0", "seed=0"]])[0].cfg
    ft = dataclasses.replace(FinetuneConfig(**cfg["finetune"]), graph=False)
    full = len(steptime.random_model(cfg["model"], "cpu").net.blocks)
    recs = []
    for shape in ("blocks 1.0", "blocks 0.5", "width 0.5"):
        net = steptime.random_model(cfg["model"], device)
        if shape == "blocks 0.5":
            apply(net, Plan("block", {"blocks": list(range(full // 2))}))
        elif shape == "width 0.5":
            keep = {name: list(range(max(1, (g.size // 2) // 8 * 8 if g.size >= 16 else g.size // 2)))
                    for name, g in width_groups(net).items()}
            apply(net, Plan("width", keep))
        data = steptime.random_data(net, 4 * ft.batch)
        agree = graph_agreement(net, data, ft, device)
        for graph in (False, True):
            r = steptime.finetune_step_s(net, ft.batch, device, "bf16", False, steps=(10, 40), lr=ft.lr, graph=graph)
            recs.append({**r, "shape": shape, **({"agreement": agree} if graph else {})})
            print(json.dumps(recs[-1]), flush=True)
    gains = {r["shape"]: next(q for q in recs if q["shape"] == r["shape"] and not q["graph"])["per_step_s"]
             / r["per_step_s"] for r in recs if r["graph"]}
    res = {"device": torch.cuda.get_device_name(0) if device == "cuda" else device, "torch": torch.__version__,
           "records": recs, "graph_gain": gains}
    out.mkdir(parents=True, exist_ok=True)
    (out / "tier_measure_graph.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({"graph_gain": gains, "agreement": {r["shape"]: r["agreement"] for r in recs if r["graph"]}}))
    return res


GRAPH_MIN_GAIN = 1.2  # finetune.graph goes on only where it makes every measured shape's step this much faster
# ... and where its weights are no farther from eager than this many times eager's own run-to-run distance (0 when
# eager repeats itself bitwise: then bitwise; otherwise two chaotic 20-step runs differ by chance in size)
GRAPH_MAX_SPREAD = 4.0


def graph_decision(rec: dict) -> tuple[bool, str]:
    """(on, why) from a tier_measure_graph.json record: on when, at every measured shape, the graphed fine-tune
    ends within GRAPH_MAX_SPREAD times the distance of a second eager run from eager (bitwise equal where eager
    repeats itself bitwise) and the step is at least GRAPH_MIN_GAIN times faster."""
    for r in (q for q in rec["records"] if q.get("graph")):
        a = r["agreement"]
        if a["graph_vs_eager"]["max_abs_diff"] > GRAPH_MAX_SPREAD * a["eager_vs_eager"]["max_abs_diff"]:
            return False, (f"{r['shape']}: the graphed fine-tune's weights differ from eager by up to "
                           f"{a['graph_vs_eager']['max_abs_diff']:.3g}, more than {GRAPH_MAX_SPREAD:g}x eager's "
                           f"distance from itself ({a['eager_vs_eager']['max_abs_diff']:.3g})")
        if rec["graph_gain"][r["shape"]] < GRAPH_MIN_GAIN:
            return False, f"{r['shape']}: the graphed step is only {rec['graph_gain'][r['shape']]:.2f}x faster"
    gains = ", ".join(f"{k} {v:.2f}x" for k, v in rec["graph_gain"].items())
    return True, f"as eager, weight for weight, and faster ({gains}) on {rec['device']}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu.tier", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("status")
    sub.add_parser("teacher-dir")
    p = sub.add_parser("commands", help="the bench.run -m overrides of the tier's commands, one line each, in run order")
    p.add_argument("--workers", type=int, default=1, help="processes that run the tier together (on one GPU, or "
                   "one GPU each)")
    p.add_argument("--worker", type=int, default=0, help="this worker's index, 0 .. workers - 1: its share")
    p.add_argument("--teacher", action="store_true", help="instead: the teacher's rows (dense, no fine-tune)")
    p.add_argument("--todo", action="store_true", help="only the commands with a run still to do (`todo`)")
    p = sub.add_parser("plan")
    p.add_argument("--timings", action="append", default=[], help="a tier_measure.json (from `measure`) instead of "
                   "the estimates; again for tier_measure_regional.json (measure --regional)")
    p.add_argument("--cfg-scale", type=float, default=None, help="project another guidance scale (1.5: twice the NFE)")
    p = sub.add_parser("measure")
    p.add_argument("--out", required=True)
    p.add_argument("--budget-s", type=float, default=150.0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled teacher step")
    p.add_argument("--regional", action="store_true", help="instead: compile=blocks against eager on a row's "
                   "fine-tune and sampling (-> tier_measure_regional.json)")
    p.add_argument("--graph", action="store_true", help="instead: finetune.graph (CUDA graphs) against eager on a "
                   "row's fine-tune: step time and the weights it ends at (-> tier_measure_graph.json)")
    p = sub.add_parser("graph-decision", help="'on' or 'off' for finetune.graph from a tier_measure_graph.json, "
                       "with the reason on stderr")
    p.add_argument("record")
    p = sub.add_parser("export-teacher")
    p.add_argument("--out", required=True)
    p.add_argument("--if-new", action="store_true", help="nothing when teacher.json already records this teacher")
    p = sub.add_parser("export-resume", help="a teacher cut short: its resume point in parts (teacher-resume.*)")
    p.add_argument("--out", required=True)
    p = sub.add_parser("import-resume", help="join carried teacher-resume.* into the teacher's last.pt")
    p.add_argument("src")
    p = sub.add_parser("archive", help="move rows of no planned run to results/gpu/tier_archive/NAME/")
    p.add_argument("--to", required=True, help="the archive folder's name (say what changed: eager-eval)")
    p = sub.add_parser("compact", help="gzip the finished rows' records above 256 kB (bench.results.compact)")
    p.add_argument("root", nargs="?", default=str(RESULTS), help="folder of <model>/<method>/<run> (default: %(default)s)")
    p.add_argument("--unfinished", action="store_true", help="also runs without row.json (an archive: never resumed)")
    p = sub.add_parser("import-teacher")
    p.add_argument("src", nargs="?", default=str(TEACHER_PARTS), help="folder of teacher.part-* (default: %(default)s)")
    a = ap.parse_args(argv)
    from bench.api import BenchError

    try:
        if a.cmd == "status":
            s = status()
            for c in s["commands"]:
                print(f"{c['done']:3d} / {c['total']:3d}  {' '.join(c['overrides'])}")
            print(f"rows done: {s['done']} of {s['total']}; teacher: {json.dumps(s['teacher'])}")
            if s["stale"]:
                print(f"stale: {s['stale']} rows were made from another teacher than teacher.json's; "
                      "bench.run moves them aside and redoes them once that teacher is in place")
            if s["obsolete"]:
                print(f"obsolete: {len(s['obsolete'])} rows of no planned run (an older config), e.g. "
                      f"{s['obsolete'][0]}; move them out with `python -m bench.gpu.tier archive --to NAME`")
            b = s["ced_best"]
            print("CED screen: " + (f"best {' '.join(b['variant'])} (geometric mean FID {b['geomean_fid']})" if b
                                    else "not done; its winner runs at seeds 1 and 2 after it"))
            g = s["gpu_time"]
            print(f"GPU time: {g['minutes']} min in {g['calls']} calls (calls.jsonl)"
                  + (f", {g['unrecorded_calls']} without a wall time" if g["unrecorded_calls"] else "")
                  + "".join(f"; {k} {v}" for k, v in g["by_command"].items()))
            rm = s["rows_minutes"]
            print(f"the {s['done']} done rows' own work: {round(sum(rm.values()), 1)} min ("
                  + ", ".join(f"{k} {v}" for k, v in rm.items()) + "); the rest of the calls' time is each "
                  "call's staging, process starts (python, torch, CUDA, data, Inception), compiles and the unused "
                  "tail of its chunk")
            left = s["left"]
            if left["rows"]:
                tier_min, own_min = g["by_command"].get("tier", 0.0), sum(rm.values())
                scale = f" (x{tier_min / own_min:.2f}, the tier calls' minutes over the rows' own so far: about " \
                    f"{left['minutes'] * tier_min / own_min:.0f} GPU-minutes of calls)" if own_min and tier_min else ""
                print(f"left: {left['rows']} rows; {left['estimated']} of them at their method and budget's mean "
                      f"over the done seeds: {left['minutes']} min of their own work{scale}; then the latency pass")
            lp = s["latency_pass"]
            if lp is None:
                print("latency pass: not run yet (after the last row: `bash bench/gpu/tier.sh latency`; on a fresh "
                      "machine one call that carries data/wheels, which prep prints)")
            elif lp["untimed"]:
                print(f"latency pass ({lp['device']}, {lp['date']}): {lp['timed']} of {s['done']} done rows; "
                      f"{len(lp['untimed'])} made after it (e.g. {lp['untimed'][0]}): run it again")
            else:
                print(f"latency pass ({lp['device']}, {lp['date']}): every done row timed ({lp['skipped']} skipped)")
        elif a.cmd == "teacher-dir":
            print(teacher_dir())
        elif a.cmd == "commands":
            if not 0 <= a.worker < a.workers:
                raise BenchError(f"--worker {a.worker} of --workers {a.workers}: give 0 <= worker < workers")
            if a.teacher:
                cmds = [list(c) for c in TEACHER_ROWS]
            else:
                cmds = share(commands(), a.workers, a.worker)
            cmds = todo(cmds) if a.todo else cmds
            print("\n".join(" ".join(c) for c in cmds))
        elif a.cmd == "plan":
            t = {k: v for f in a.timings for k, v in json.loads(Path(f).read_text())["timings"].items()} or None
            print(plan_text(project(t, a.cfg_scale)))
        elif a.cmd == "measure":
            if a.graph:
                measure_graph(Path(a.out), a.device)
            elif a.regional:
                measure_regional(Path(a.out), a.device)
            else:
                measure(Path(a.out), a.budget_s, a.device, not a.no_compile)
        elif a.cmd == "graph-decision":
            on, why = graph_decision(json.loads(Path(a.record).read_text()))
            print("on" if on else "off")
            print(f"finetune.graph {'on' if on else 'off'}: {why}", file=sys.stderr)
        elif a.cmd == "export-teacher":
            rec = export_teacher(Path(a.out), a.if_new)
            print("teacher: recorded in results/gpu/tier/teacher.json already" if rec is None else
                  f"teacher {rec['folder']}/final.pt sha256 {rec['sha256']} ({rec['bytes']} bytes) -> "
                  f"{', '.join(p['name'] for p in rec['parts'])} + teacher.json in {a.out}")
        elif a.cmd == "export-resume":
            rec = export_resume(Path(a.out))
            print("teacher resume: nothing to export (trained, or not started)" if rec is None else
                  f"teacher resume point at step {rec['step']} ({rec['bytes']} bytes) -> "
                  f"{', '.join(p['name'] for p in rec['parts'])} + teacher-resume.json in {a.out}")
        elif a.cmd == "import-resume":
            dest = import_resume(Path(a.src))
            print(f"teacher resume: {dest} (sha256 checked)" if dest else "teacher resume: nothing to import")
        elif a.cmd == "archive":
            moved = archive(a.to)
            print(f"archived {len(moved)} obsolete rows to results/gpu/tier_archive/{a.to}/")
        elif a.cmd == "compact":
            done = compact_runs(Path(a.root), a.unfinished)
            print(f"compacted {len(done)} records under {a.root}" + "".join(f"\n  {p}" for p in done))
        elif a.cmd == "import-teacher":
            dest = import_teacher(Path(a.src))
            print(f"teacher: {dest} (sha256 checked)" if dest else "teacher: nothing to import (in place, or no parts)")
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
