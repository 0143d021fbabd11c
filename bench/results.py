"""Run directories, the Row schema, atomic writes, and loading rows into pandas.

A run directory is a pure function of the resolved config (never of the time or of hydra's
output dir), so a requeued or re-launched job finds its own earlier stages. `config.yaml` is
written first, `row.json` last and atomically: a row that exists is complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.io import atomic_write_text, gzip_file, read_text, slug, stored

SCHEMA = 1
# config keys that do not change a run's results (where files go, how it is launched)
# method_overrides: the command line's method.* overrides (bench.run), a label of what the resolved
# method config (hashed) already holds
NON_RESULT_KEYS = ("paths", "cluster", "hydra", "progress", "stop_after", "sample_part", "method_overrides")


# settings of a group that change how a result is computed, not what it is: not hashed either (a run made with
# finetune.graph on or off is one run: bench.graphed replays the eager step's kernels)
EXECUTION_KEYS = {"finetune": ("graph",)}


def config_hash(cfg: dict) -> str:
    clean = {k: v for k, v in cfg.items() if k not in NON_RESULT_KEYS}
    for group, keys in EXECUTION_KEYS.items():
        if isinstance(clean.get(group), dict):
            clean[group] = {k: v for k, v in clean[group].items() if k not in keys}
    return hashlib.sha256(json.dumps(clean, sort_keys=True, default=str).encode()).hexdigest()


def run_relpath(cfg: dict) -> str:
    """<model>-<data>-<process>/<method>/<measure><keep>-s<seed>-<device>-<hash8>"""
    m = cfg["model"]
    b = cfg["budget"]
    head = f"{slug(m['name'])}-{slug(cfg['data']['name'])}-{m['process']['kind']}"
    tail = f"{b['measure']}{float(b['keep']):.3g}-s{cfg['seed']}-{cfg['device']}-{config_hash(cfg)[:8]}"
    return f"{head}/{slug(cfg['method_name'])}/{tail}"


def git_info() -> tuple[str, bool]:
    """(short sha, dirty) of the checkout (dirty: tracked code or configs differ from HEAD; the committed
    outputs under results/ and reports/ do not count); BENCH_GIT_SHA (e.g. "3c0d85d1a2b4" or "...-dirty") names it
    on a machine that received the tree without its .git (the GPU runs)."""
    if env := os.environ.get("BENCH_GIT_SHA"):
        return env.removesuffix("-dirty"), env.endswith("-dirty")
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        # the committed outputs (results/, reports/) are what runs write: they do not make the code dirty
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                     ":(exclude)results", ":(exclude)reports"], cwd=root,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
        return sha or "unknown", dirty
    except (OSError, subprocess.SubprocessError):
        return "unknown", False


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "numpy", "scipy", "hydra-core", "torch-pruning", "diffusers", "scikit-learn", "torchdiffeq"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


@dataclass
class Row:
    """One finished run. Column names carry their units; `metrics` holds the quality numbers of
    the protocol named by metric_impl / metric_n / metric_ref."""

    run: str
    config_sha: str
    model: str
    dataset: str
    process: str
    method: str
    method_version: int
    granularity: str
    budget_measure: str
    budget_keep: float
    seed: int
    # measured after surgery ("measure, don't trust the knob")
    keep_blocks: float
    keep_params: float
    keep_macs: float
    depth: int
    params_M: float
    macs_G: float
    latency_ms: float
    latency_batch: int
    latency_dtype: str
    latency_mode: str          # eager | compile: speedups only between rows of the same mode
    latency_iqr_ms: float
    peak_mem_MB: float | None  # GPU only (None on the CPU)
    throughput_img_s: float
    nfe: int | float           # network evaluations per sample (x2 with CFG), measured; an adaptive solver's is a mean
    sampler: str
    cfg_scale: float
    cfg_convention: str
    finetune_steps: int
    metrics: dict[str, float]
    metric_n: int
    metric_ref: str
    metric_impl: str
    device: str
    # Inception metrics (eval=inception), a protocol of their own: backend/extractor/weights sha8,
    # sample count, reference; empty when the run has none
    fid_impl: str = ""
    fid_n: int = 0
    fid_ref: str = ""
    fid_weights: str = ""
    fid_weights_sha256: str = ""
    latency_reps: int = 0      # timed calls behind latency_ms (>= 20 unless eval.latency.allow_few); 0: older row
    # how the fine-tune and the sampler ran (rows before these fields: fp32, eager); a table never
    # puts two sampling precisions in one quality column (bench.report groups by eval_precision)
    finetune_precision: str = "fp32"
    finetune_compile: bool | str = False  # false | true | "blocks" (regional: bench.models.denoiser.compile_mode)
    eval_precision: str = "fp32"
    eval_compile: bool | str = False
    latency_flags: list[str] = field(default_factory=list)  # "spread" / "busy" / "shared": no speedup from it
    latency_others_cores: float | None = None  # CPU cores other processes used while it was timed (None: unknown)
    warnings: list[str] = field(default_factory=list)  # protocol caveats, e.g. Inception n < 10k (also in log.jsonl)
    # sha256 of the dense weights every method started from (model.ckpt's file, or the final.pt of the
    # teacher trained here, which a config hash names but a retraining on another machine changes);
    # "" in rows before this field. bench.report warns when one table mixes teachers.
    teacher_sha256: str = ""
    # the method's settings a command line changed from its config file (method.* overrides, e.g. "outputs=x0"):
    # a variant of the method, its own line in a report; "" for the method as configured (and older rows)
    method_variant: str = ""
    git_sha: str = "unknown"
    git_dirty: bool = False
    date: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    wall_s: dict[str, float] = field(default_factory=dict)   # per stage: teacher, plan, finetune, sample, score
    device_hours: float = 0.0  # sum(wall_s) x n_devices / 3600 (wall_s["earlier_attempts"]: killed, requeued, stop_after)
    n_devices: int = 1         # devices held: 1 (a run uses cfg.device), or a SLURM job's allocated GPUs
    job_id: str = ""           # scheduler job that wrote the row (SLURM "<array>_<task>"), "" in process
    # stage-wise (routed) models only: per timestep stage, in stage order (u ascending); the row's
    # latency_ms / macs_G / keep_* are their means weighted by stage_weights (share of sampler NFEs)
    stage_latency_ms: list[float] = field(default_factory=list)
    stage_weights: list[float] = field(default_factory=list)
    stage_blocks: list[int] = field(default_factory=list)
    stage_macs_G: list[float] = field(default_factory=list)
    # dense index of every block the final model has (a progressive method's are known only after its
    # fine-tune, not from plan.json); empty in rows written before this field (final_kept_blocks reads the log)
    kept_blocks: list[int] = field(default_factory=list)
    status: str = "ok"
    error: str | None = None
    schema: int = SCHEMA

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)


def parse_row(path: Path) -> Row:
    """A row.json as a Row; raises ValueError naming the file when it is cut short, not JSON, of
    another schema, or missing fields (a row that does not parse is not a finished run)."""
    try:
        d = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict) or d.get("schema") != SCHEMA:
        raise ValueError(f"{path}: row schema {d.get('schema') if isinstance(d, dict) else None!r} is not {SCHEMA}")
    try:
        return Row(**d)
    except TypeError as e:
        raise ValueError(f"{path}: {e}") from None


def read_row(run_dir: Path) -> Row | None:
    """The run's row if it is finished; a row.json that does not parse is moved aside (the run then
    redoes what is missing: its stored stages are kept) and None is returned."""
    from bench.io import read_state

    return read_state(Path(run_dir) / "row.json", parse_row, "row")


def write_row(row: Row, run_dir: Path) -> Path:
    path = Path(run_dir) / "row.json"
    atomic_write_text(path, row.to_json())
    (Path(run_dir) / ERROR_FILE).unlink(missing_ok=True)  # an earlier failure is superseded
    return path


ERROR_FILE = "error.json"  # a run that started and raised: listed by the report as failed; a rerun retries it


def write_failure(cfg: dict, err: BaseException, wall_s: dict[str, float] | None = None,
                  n_devices: int = 1) -> Path | None:
    """Record why a started run failed (<run dir>/error.json, atomically) so that a sweep's report
    lists it beside the runs that finished, and what it cost: wall_s per stage (bench.run passes
    the finished stages and `unfinished`; earlier attempts are added from log.jsonl), device_hours
    = sum(wall_s) x n_devices / 3600. Bad input refused before the run directory exists leaves
    nothing; a run killed from outside (SIGKILL, scancel) leaves nothing either and resumes."""
    import traceback
    from datetime import datetime, timezone

    try:
        run_dir = Path(cfg["paths"]["results"]) / run_relpath(cfg)
    except (KeyError, TypeError, ValueError):
        return None
    if not (run_dir / "config.yaml").exists():
        return None
    b = cfg["budget"]
    sha, dirty = git_info()
    wall = dict(wall_s or {})
    if "earlier_attempts" not in wall and (earlier := earlier_attempts_wall_s(run_dir)):
        wall["earlier_attempts"] = earlier
    rec = {"run": run_relpath(cfg), "config_sha": config_hash(cfg)[:16], "model": cfg["model"]["name"],
           "dataset": cfg["data"]["name"], "method": cfg["method_name"], "budget_measure": b["measure"],
           "budget_keep": float(b["keep"]), "seed": cfg["seed"], "status": "failed",
           "error": f"{type(err).__name__}: {err}", "traceback": "".join(traceback.format_exception(err, limit=-8)),
           "job_id": scheduler_job_id(), "git_sha": sha, "git_dirty": dirty, "schema": SCHEMA,
           "wall_s": {k: round(float(v), 3) for k, v in wall.items()},
           "device_hours": sum(wall.values()) * n_devices / 3600, "n_devices": int(n_devices),
           "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    path = run_dir / ERROR_FILE
    atomic_write_text(path, json.dumps(rec, indent=1, sort_keys=True, default=str))
    return path


def scheduler_job_id() -> str:
    """The SLURM job (array task) this process runs in, e.g. "1234_5"; "" outside SLURM."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID", "")


def devices_held(device: str) -> int:
    """Devices a run holds, for device_hours: 1 on the CPU; on CUDA one per rank (bench.dist: torchrun
    or a SLURM job of several tasks), and inside a SLURM job at least what the job was allocated
    (SLURM_GPUS_ON_NODE, else the ids in SLURM_JOB_GPUS / SLURM_STEP_GPUS, times its nodes), so that
    is what it costs."""
    if not str(device).startswith("cuda"):
        return 1
    from bench import dist
    env, held = os.environ, 0
    if env.get("SLURM_JOB_ID"):
        n = env.get("SLURM_GPUS_ON_NODE", "").strip()
        if n.isdigit() and int(n) > 0:
            held = int(n)
        else:
            for key in ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS"):
                ids = [x for x in env.get(key, "").split(",") if x.strip()]
                if ids:
                    held = len(ids)
                    break
        nodes = env.get("SLURM_JOB_NUM_NODES", "1").strip()
        held *= int(nodes) if nodes.isdigit() else 1
    return max(1, dist.world(), held)


def earlier_attempts_wall_s(run_dir: Path) -> float:
    """Seconds spent in earlier attempts of this run (killed, cancelled, requeued, stop_after):
    for each `start` event in log.jsonl but the last, the span to that attempt's last event. A lower
    bound (an attempt's time after its last event is unknown); 0.0 for a run started once."""
    path = Path(run_dir) / "log.jsonl"
    if not path.exists():
        return 0.0
    attempts: list[list[float]] = []
    for line in path.read_text().splitlines():
        try:
            e = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        if e.get("event") == "start":
            attempts.append([e["time"], e["time"]])
        elif attempts:
            attempts[-1][1] = e["time"]
    return float(sum(end - start for start, end in attempts[:-1]))


def append_log(run_dir: Path, event: str, **data: Any) -> None:
    """MAE-style JSON lines: one event per line (appends are atomic for short lines)."""
    import time

    rec = {"time": round(time.time(), 3), "event": event, **data}
    with open(Path(run_dir) / "log.jsonl", "a") as f:
        f.write(json.dumps(rec, default=str) + "\n")


def final_kept_blocks(run_dir: str | Path) -> list[int] | None:
    """Dense indices of the blocks the run's final model keeps, or None when unknown. A progressive
    method (EntPruner, gradient flow) removes blocks during fine-tuning, so its plan.json keeps more
    than the final model: the row's `kept_blocks` says it; for rows written before that field, the
    log's last `surgery` event made during fine-tuning (one with a step; a resumed attempt logs the
    plan's surgery again after them), else its last `surgery` event, else plan.json. A list whose
    length differs from the row's depth is not trusted (None)."""
    run_dir = Path(run_dir)
    row = json.loads((run_dir / "row.json").read_text()) if (run_dir / "row.json").exists() else {}
    if row.get("kept_blocks"):
        return [int(i) for i in row["kept_blocks"]]
    kept = None
    if (log := run_dir / "log.jsonl").exists():
        events = []
        for line in log.read_text().splitlines():
            try:
                e = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            if isinstance(e, dict) and e.get("event") == "surgery" and isinstance(e.get("kept_blocks"), list):
                events.append(e)
        stepped = [e for e in events if "step" in e]
        if stepped or events:
            kept = (stepped or events)[-1]["kept_blocks"]
    if kept is None and (plan := stored(run_dir / "plan.json")):
        kept = json.loads(read_text(plan)).get("keep", {}).get("blocks")
    if kept is None or ("depth" in row and len(kept) != int(row["depth"])):
        return None
    return [int(i) for i in kept]


def final_plan(run_dir: str | Path) -> dict:
    """The run's plan.json as a dict, its block keep-set replaced by the final model's
    (final_kept_blocks), so a plot of kept and removed blocks shows what the model ended with;
    meta["kept_blocks_source"] says so. Raises ValueError when the final blocks are unknown."""
    run_dir = Path(run_dir)
    plan = json.loads(read_text(run_dir / "plan.json"))
    kept = final_kept_blocks(run_dir)
    if kept is None:
        raise ValueError(f"{run_dir}: the final model's blocks are unknown (no row kept_blocks, no surgery event "
                         "matching the row's depth)")
    if plan.get("keep", {}).get("blocks") != kept:
        plan.setdefault("meta", {})["kept_blocks_source"] = "final model (row / log.jsonl surgery events)"
    plan.setdefault("keep", {})["blocks"] = kept
    return plan


# A finished run's records above this size are kept gzip-compressed (<name>.gz; bench.io.read_text reads
# either): a width method's per-channel plan, structure and decision log run to megabytes of JSON, and the
# committed GPU rows travel with every device call (64 MiB in all). Never the files a later pass appends to
# or rewrites (row.json, log.jsonl) nor the config.
COMPACT_BYTES = 256_000
COMPACT_SUFFIXES = (".json", ".jsonl")
NEVER_COMPACT = ("row.json", "log.jsonl", "config.yaml")


def compact(run_dir: str | Path, limit: int = COMPACT_BYTES, unfinished: bool = False) -> list[Path]:
    """gzip the finished run's JSON records above `limit` bytes (COMPACT_SUFFIXES, not NEVER_COMPACT);
    a run without row.json (running, cut short, failed: a resume reads its records) is left as it is unless
    `unfinished` (an archived run, never resumed). Returns the new .gz paths."""
    run_dir = Path(run_dir)
    if not unfinished and not (run_dir / "row.json").is_file():
        return []
    return [gzip_file(f) for f in sorted(run_dir.iterdir())
            if f.is_file() and f.suffix in COMPACT_SUFFIXES and f.name not in NEVER_COMPACT
            and f.stat().st_size > limit]


def set_aside(path: Path, root: Path) -> bool:
    """Whether `path` lies in a hidden folder under `root` (a name starting with '.'): where
    bench.run.current_row moves a stale run; no reader of a results folder takes it as a run."""
    return any(part.startswith(".") for part in Path(path).relative_to(root).parts)


def load_rows(root: str | Path = "results/runs", skipped: list[str] | None = None):
    """All row.json files under root -> a pandas DataFrame, metrics flattened to `m_<name>` columns,
    plus the error.json of runs that failed (status "failed"). A file that does not parse (cut
    short, corrupt, another schema) is skipped with a warning naming it, appended to `skipped`. Hidden
    folders (a name starting with '.') are not read: bench.run.current_row moves stale rows there."""
    import sys

    import pandas as pd

    recs, root = [], Path(root)
    rows = [p for p in sorted(root.rglob("row.json")) if not set_aside(p, root)]
    done = {p.parent for p in rows}
    failed = [p for p in sorted(root.rglob(ERROR_FILE)) if p.parent not in done and not set_aside(p, root)]
    for p in rows + failed:  # failed runs (status "failed", error) are listed by the report, never averaged
        try:
            d = asdict(parse_row(p)) if p.name == "row.json" else json.loads(p.read_text())
            if not isinstance(d, dict):
                raise ValueError(f"{p}: not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            msg = f"skipped {p}: {str(e).removeprefix(str(p) + ': ')}"
            print(f"warning: {msg}", file=sys.stderr)
            if skipped is not None:
                skipped.append(msg)
            continue
        d.pop("traceback", None)
        for k, v in (d.pop("metrics", None) or {}).items():
            d[f"m_{k}"] = v
        for k, v in (d.pop("wall_s", None) or {}).items():
            d[f"wall_{k}_s"] = v
        d.pop("versions", None)
        d["path"] = str(p.parent)
        recs.append(d)
    return pd.DataFrame.from_records(recs)


if __name__ == "__main__":
    # python -m bench.results final-plan RUN_DIR OUT.json: plan.json with the final model's blocks
    # (what run_all.sh hands methods.plots for a progressive method's kept/removed bar chart)
    import sys

    if len(sys.argv) != 4 or sys.argv[1] != "final-plan":
        sys.exit("usage: python -m bench.results final-plan RUN_DIR OUT.json")
    try:
        atomic_write_text(Path(sys.argv[3]), json.dumps(final_plan(sys.argv[2]), indent=1))
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
