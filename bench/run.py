"""One run: teacher -> calibration -> plan -> surgery -> fine-tune -> sample -> score -> row.

    python -m bench.run method=shortgpt budget.keep=0.5
    python -m bench.run -m method=shortgpt,sensitivity budget.keep=0.75,0.5   # local sweep

Every stage writes one artifact and is skipped when it exists, so a killed or requeued job
resumes; row.json is written last and atomically. The run directory is a pure function of the
resolved config (bench.results.run_relpath).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench import assets, checks, dist, surgery
from bench.api import BenchError, Budget, Method, Plan
from bench.io import atomic_torch_save, atomic_write, atomic_write_text, file_lock, os_error_message, read_state, \
    sha256_file
from bench.launch import guard_requeue_signal
from bench.data import from_config
from bench.metrics.cost import device_name, resolve_precision
from bench.results import Row, append_log, config_hash, git_info, read_row, \
    devices_held, earlier_attempts_wall_s, library_versions, run_relpath, scheduler_job_id, write_failure, write_row


def _log(msg: str):
    print(f"[bench{f' rank {dist.rank()}/{dist.world()}' if dist.world() > 1 else ''}] {msg}", flush=True)


def _progress(cfg):
    if not cfg.get("progress"):
        return None
    from tqdm import tqdm
    return lambda it: tqdm(it, leave=False)


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------

TEACHER_KEYS = ("model", "data", "teacher")  # the config a teacher trained here is a function of


def build_dense(cfg: dict):
    from bench.models import build
    return build(**cfg["model"])


STRUCTURE = "structure.json"  # <run_dir>/structure.json: the final architecture, rebuilt by build_final


def final_structure(plans: list[Plan], kept_blocks: list[int]) -> dict:
    """What rebuilds a run's final architecture from its dense model config: the plans surgery applied,
    in order (the run's plan, then those a progressive callback applied during the fine-tune; their
    scores left out, the run never reads them), and the final kept blocks."""
    from dataclasses import asdict
    return {"schema": 1, "plans": [{k: v for k, v in asdict(p).items() if k != "scores"} for p in plans],
            "kept_blocks": [int(i) for i in kept_blocks]}


def build_final(cfg: dict, structure: dict):
    """The final architecture of the run of `cfg` (a final_structure record) with random weights: the
    dense model without its checkpoint (cost and latency need no weights), the plans replayed through
    bench.surgery (bench.finetune._replay, which checks the blocks against kept_blocks). A record with no
    plans gives the dense model cut to kept_blocks: a depth-pruned row's whole architecture."""
    from bench.finetune import _replay
    net = build_dense({**cfg, "model": {**cfg["model"], "ckpt": None}})
    _replay(net, structure["kept_blocks"], [json.dumps(p) for p in structure.get("plans", [])])
    return net


def teacher_dir(cfg: dict) -> Path:
    """Where `teacher` caches the teacher trained here: <artifacts>/teachers/<hash of model, data, teacher>."""
    return Path(cfg["paths"]["artifacts"]) / "teachers" / config_hash({k: cfg[k] for k in TEACHER_KEYS})[:16]


def teacher_weights(cfg: dict) -> Path:
    """The file the dense model comes from: model.ckpt, or the final.pt of the teacher trained here."""
    return Path(cfg["model"]["ckpt"]) if cfg["model"].get("ckpt") else teacher_dir(cfg) / "final.pt"


def teacher(cfg: dict, data, device: str):
    """(the dense model every method starts from, on `device` in eval mode; seconds): the official
    checkpoint when model.ckpt is set, else a teacher trained here, cached by config hash (a second
    run reuses it)."""
    from bench.finetune import FinetuneConfig, finetune

    net = build_dense(cfg)
    if cfg["model"].get("ckpt"):
        net.net.to(device).eval()
        return net, 0.0
    key = {k: cfg[k] for k in TEACHER_KEYS}
    tdir = teacher_dir(cfg)
    t0 = time.time()
    # concurrent jobs of a sweep train it once; the ranks of one job train it together (rank 0 locks)
    with file_lock(tdir.parent / f"{tdir.name}.lock") if dist.is_main() else contextlib.nullcontext():
        if dist.is_main() and not (tdir / "final.pt").exists():
            _log(f"training the teacher ({cfg['teacher']['steps']} steps) -> {tdir}")
            atomic_write_text(tdir / "teacher.json", json.dumps(key, indent=1, sort_keys=True))
        tc = {k: v for k, v in cfg["teacher"].items() if k != "seed"}
        net = finetune(net, data, FinetuneConfig(**tc), tdir, seed=cfg["teacher"]["seed"], device=device,
                       progress=_progress(cfg), run_dir=tdir)
    net.net.to(device).eval()
    return net, time.time() - t0


def current_row(cfg: dict, run_dir: Path, art_dir: Path, retire: bool) -> Row | None:
    """The run's row when it is finished and was made from the teacher the config names now
    (`teacher_weights`). A row whose teacher_sha256 differs from that file's sha256 (the teacher was
    retrained, model.ckpt was replaced) is stale, and None is returned. With `retire` (rank 0 holding the
    run's lock) its run folder is moved to the hidden sibling `.<name>.teacher-<its sha256[:12]>`, kept for
    the record but never read as a row (bench.results.load_rows skips hidden folders), and the run's
    artifacts (the old teacher's pruned weights, fine-tune checkpoints and samples) are deleted, so the run
    is redone from the start. A row is kept as it is when no teacher file is here to compare with (a fresh
    checkout's committed rows, whose teacher is not trained here yet)."""
    import shutil

    row = read_row(run_dir)
    weights = teacher_weights(cfg)
    if row is None or not row.teacher_sha256 or not weights.is_file():
        return row
    now = assets.sha256_file(weights)
    if now == row.teacher_sha256:
        return row
    if retire:
        dest = run_dir.with_name(f".{run_dir.name}.teacher-{row.teacher_sha256[:12]}")
        if dest.exists():
            dest = dest.with_name(f"{dest.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(run_dir, dest)
        for p in art_dir.iterdir() if art_dir.is_dir() else ():
            if p.name != "run.lock":  # held by this process
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        _log(f"the row of {run_dir} was made from teacher {row.teacher_sha256[:12]}, the teacher is now {now[:12]}: "
             f"moved aside to {dest.name}, redoing the run")
    return None


def make_method(cfg: dict) -> Method:
    from hydra.errors import InstantiationException
    from hydra.utils import get_class, instantiate
    from omegaconf import OmegaConf

    from bench.checks import check_method_kwargs
    kwargs = {k: v for k, v in cfg["method"].items() if not k.startswith("_")}
    target = cfg["method"].get("_target_")
    if not target:
        raise BenchError(f"method={cfg['method_name']}: its config has no _target_ (the Method class to build); add "
                         f"_target_: <module>.<Class> to bench/conf/method/{cfg['method_name']}.yaml")
    try:
        cls = get_class(target)
    except Exception as e:  # a misspelt _target_ or a module that does not import: hydra's first line says which
        why = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise BenchError(f"method._target_={target!r} ({cfg['method_name']}) cannot be imported: {why}; fix "
                         f"bench/conf/method/{cfg['method_name']}.yaml") from None
    check_method_kwargs(cls, kwargs, cfg["method_name"])
    try:
        m = instantiate(OmegaConf.create(cfg["method"]), _convert_="all")
    except InstantiationException as e:  # hydra wraps the constructor's own message; show that one
        cause = e.__cause__
        if isinstance(cause, BenchError):  # the method's own check: name the config key it is about
            import re
            msg = str(cause)
            key = next((k for k in kwargs if re.search(rf"(^|[\s(]){re.escape(k)}=", msg)), None)
            raise BenchError(f"method.{key}={kwargs[key]!r}: {msg}" if key else
                             f"method={cfg['method_name']}: {msg}") from None
        raise BenchError(f"method {cfg['method_name']!r} could not be built: {cause or e}") from None
    if not isinstance(m, Method):
        raise BenchError(f"method {cfg['method_name']!r} does not build a bench.api.Method")
    return m


def cost(net, cfg: dict, device: str) -> dict:
    """Measured params, MACs, and forward latency through the shared harness (warm-up, median of
    >= 20 timed calls, CUDA events on a GPU, random inputs) in the configured mode and dtype.
    Fewer than 20 only with eval.latency.allow_few=true (tests; validate() refuses it otherwise)."""
    from bench.metrics.cost import benchmark_forward, random_inputs

    lat = cfg["eval"]["latency"]
    few = bool(lat.get("allow_few"))
    m = surgery.measure(net)
    net.net.eval()
    if m.get("stage_weights"):  # routed (stage-wise) model: one latency per stage, t inside the stage;
        from bench.metrics.cost import stage_latency  # latency_ms = their mean weighted by the stages' NFE shares
        r = stage_latency(net, lat["batch"], device, lat.get("mode", "eager"), lat["dtype"], warmup=lat["warmup"],
                          reps=lat["reps"], allow_few=few)
        recs = r["records"]
        return {**m, "latency_ms": r["median_ms"], "latency_iqr_ms": r["iqr_ms"],
                "throughput_img_s": r["throughput_img_s"], "peak_mem_MB": r["peak_mem_MB"], "mode": r["mode"],
                "stage_latency_ms": [x["median_ms"] for x in recs],
                "flags": sorted({f for x in recs for f in x["flags"]}),
                "others_cores": max((x["others_cores"] for x in recs if x["others_cores"] is not None), default=None)}
    r = benchmark_forward(net.net, random_inputs(net, lat["batch"], device), device, lat.get("mode", "eager"),
                          lat["dtype"], warmup=lat["warmup"], reps=lat["reps"], allow_few=few)
    return {**m, "latency_ms": r["median_ms"], "latency_iqr_ms": r["iqr_ms"], "throughput_img_s": r["throughput_img_s"],
            "peak_mem_MB": r["peak_mem_MB"], "mode": r["mode"], "flags": r["flags"], "others_cores": r["others_cores"]}


def latency_warnings(c: dict) -> list[str]:
    """The row's words for a timing that cannot be trusted (bench.metrics.cost.latency_flags)."""
    from bench.metrics.cost import SPREAD_MAX, busy_cores_max, shared_device

    out = []
    if "spread" in c["flags"]:
        out.append(f"latency spread: IQR {c['latency_iqr_ms']:.3g} ms is {c['latency_iqr_ms'] / c['latency_ms']:.0%} "
                   f"of the median {c['latency_ms']:.3g} ms (> {SPREAD_MAX:.0%}); no speedup is computed from it")
    if "busy" in c["flags"]:
        out.append(f"latency busy: other processes used {c['others_cores']:.2g} cores while it was timed "
                   f"(> {busy_cores_max():.2g}); rerun the timing on an idle machine (delete row.json: only "
                   "scoring and timing are redone); no speedup is computed from it")
    if "shared" in c["flags"]:
        out.append(f"latency shared: timed while {shared_device()} workers shared the device "
                   "(BENCH_SHARED_DEVICE); no speedup is computed from it: python -m bench.latency_pass times every "
                   "row's architecture in one process")
    return out


def teacher_reference_samples(net, cfg: dict, sampler: str, device: str):
    """The dense teacher's samples for the eval seeds (same noise and labels as every method's),
    cached next to the teacher: the reference of the SSIM-to-teacher consistency metric."""
    from bench.sample import generate

    ev = cfg["eval"]
    key = {"teacher": {k: cfg[k] for k in ("model", "data", "teacher")},
           "eval": {k: ev[k] for k in ("n", "seed", "steps", "cfg_scale", "cfg_convention", "labels", "skip", "eta")
                    + (("precision",) if ev.get("precision") else ())},
           "sampler": sampler, "device": device}
    path = Path(cfg["paths"]["artifacts"]) / "teacher_samples" / f"{config_hash(key)[:16]}.pt"
    if (stored := read_state(path, lambda p: _read_samples(p, ev["n"]), "teacher samples")) is not None:
        return stored
    _log("sampling the teacher once for SSIM-to-teacher (cached)")
    samples, labels = generate(net, ev["n"], ev["seed"], ev["batch"], sampler, ev["steps"], ev["cfg_scale"],
                               ev["cfg_convention"], ev["labels"], ev["skip"], ev["eta"], device,
                               precision=ev.get("precision"), compile=ev.get("compile", False))
    atomic_torch_save({"samples": samples, "labels": labels}, path)
    return samples, labels


# --------------------------------------------------------------------------------------------
# The spine
# --------------------------------------------------------------------------------------------

def execute(cfg: dict) -> Row | None:
    """Run (or resume) one configuration and return its row. `cfg` is the resolved config dict
    with `method_name` set to the method's config-file name. A run that raises after its directory
    exists leaves error.json there (the report lists it as failed; running it again retries), with
    what it cost: wall_s of the finished stages, `unfinished` (the rest of the time up to the
    failure, mostly the stage that raised) and device_hours."""
    wall: dict[str, float] = {}
    t_start = time.time()
    try:
        return _spine(cfg, wall)
    except Exception as e:  # not BaseException: a requeue (SystemExit) or a kill is no failure
        done = sum(v for k, v in wall.items() if k != "earlier_attempts")
        spent = {**wall, "unfinished": max(0.0, time.time() - t_start - done)}
        if dist.is_main():  # one record per run, not one per rank
            write_failure(cfg, e, wall_s=spent, n_devices=devices_held(str(cfg.get("device", "cpu"))))
        raise


def _spine(cfg: dict, wall: dict[str, float]) -> Row | None:
    budget = checks.check(cfg)  # every value, combination and output folder: nothing is written before
    rel = run_relpath(cfg)
    run_dir = Path(cfg["paths"]["results"]) / rel
    art_dir = Path(cfg["paths"]["artifacts"]) / "runs" / rel
    if (row := current_row(cfg, run_dir, art_dir, retire=False)) is not None:
        _log(f"done already: {run_dir}")
        return row
    torch.manual_seed(cfg["seed"])
    method = make_method(cfg)  # unknown or mistyped kwargs, a bad _target_: before the run dir exists
    data = checks.check_inputs(cfg, budget, method)  # data, checkpoint, assets, a budget no block plan meets

    # Several ranks (torchrun, a SLURM job of several tasks: bench.dist): all go through the stages
    # together. Rank 0 alone locks, plans (broadcasting the Plan), writes and scores; the teacher and
    # the fine-tune are data parallel (bench.finetune); every rank draws its share of the sample shards.
    if not dist.is_main():
        if not dist.broadcast(None):  # rank 0: is there work (no row yet)?
            return None
        return _stages(cfg, wall, budget, method, data, rel, run_dir, art_dir, None)

    # One writer per run: a second copy of this config waits here for the first (the lock dies with
    # its holder, so a killed run never blocks its own resume), then finds its row or resumes
    art_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(art_dir / "run.lock", on_wait=lambda who: _log(f"{run_dir} is being run by {who}; waiting")) as held:
        row = current_row(cfg, run_dir, art_dir, retire=True)
        dist.broadcast(row is None)
        if row is not None:
            _log(f"done already (by the other copy): {run_dir}")
            return row
        return _stages(cfg, wall, budget, method, data, rel, run_dir, art_dir, held)


def _stages(cfg: dict, wall: dict[str, float], budget: Budget, method: Method, data, rel: str, run_dir: Path,
            art_dir: Path, lock) -> Row | None:
    """The stages of one run, on every rank; `lock` (rank 0: bench.io.HeldLock of run.lock, else None)
    is let go while a sample part (sample_part=k/n) draws its shards, so the parts of a SLURM array
    sample at once; the stages before sampling and the scoring run under it."""
    device, main = cfg["device"], dist.is_main()
    # Setup the run directory: the resolved config first (EDM's training_options.json); rank 0 writes
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", json.dumps(cfg, indent=1, sort_keys=True))
        append_log(run_dir, "start", run=rel, job=scheduler_job_id(), world=dist.world())
    moved = lambda path, dest: append_log(run_dir, "state_moved_aside", path=str(path), to=str(dest))  # noqa: E731

    # Teacher (cached), on the data checked above:
    net, wall["teacher"] = teacher(cfg, data, device)
    dense_cost = surgery.measure(net)
    per_block = surgery.block_costs(net)[1] if len(net.net.blocks) else None  # the U-Net has no blocks
    ev = cfg["eval"]
    sampler = ev["sampler"] or ("ddpm" if net.process.kind == "ddpm" else "heun")
    ref_samples = teacher_reference_samples(net, cfg, sampler, device) if ev.get("ssim_teacher") and main else None

    # Plan: the method decides on the dense teacher, with the shared calibration probes
    from bench.data import calibration
    plan_path = run_dir / "plan.json"
    t0 = time.time()
    calib = calibration(data, cfg["calib"]["n"], cfg["calib"]["seed"], cfg["calib"]["bins"]).to(device)
    rewrites = method.rewrites_weights  # plan() rewrites surviving weights (OBS)
    pruned_path = art_dir / "pruned.safetensors"
    # a stored plan that cannot be read (or whose rewritten weights are gone) is moved aside and redone;
    # rank 0 alone plans, the other ranks wait for its Plan (broadcast below)
    plan = read_state(plan_path, lambda p: _read_plan(p, pruned_path if rewrites else None), "plan",
                      on_moved=moved) if main else None
    planned_now = plan is None and main
    if planned_now:
        _log(f"planning {cfg['method_name']} at {budget.measure}={budget.keep}")
        method.bank_dir = str(art_dir)  # tensors the plan references (Diff-ES secondorder's stage bank) go here
        plan = method.plan(net, budget, calib)
        if not isinstance(plan, Plan):
            raise BenchError(f"{cfg['method_name']}.plan() returned {type(plan).__name__}, not a Plan")
        if not rewrites:  # a weight-rewriting method's plan is written once its weights are stored (below)
            atomic_write_text(plan_path, plan.to_json())
    wall["plan"] = time.time() - t0

    # Surgery: the only shape change; the measured result must meet the budget (progressive
    # methods meet it by the end of fine-tuning, checked below)
    callback = method.callback(budget, calib)
    dense_teacher = None
    # needs_teacher: an optional callback member (bench.api.TrainCallback), so looked up with a default
    wants_teacher = cfg["finetune"].get("distill", 0) > 0 or getattr(callback, "needs_teacher", False)
    if wants_teacher:
        import copy
        # frozen dense model for KD (finetune.distill); plan() of a rewriting method changed `net`,
        # so that one gets the cached teacher again
        dense_teacher = teacher(cfg, data, device)[0] if rewrites else copy.deepcopy(net)
        dense_teacher.net.to(device).eval().requires_grad_(False)
    if main:
        surgery.apply(net, plan)
    if rewrites and planned_now:  # the Plan cannot rebuild rewritten weights: store them once, reload on resume
        plan.meta["weights_sha256"] = _store_weights(net, pruned_path)
        atomic_write_text(plan_path, plan.to_json())
        append_log(run_dir, "pruned_weights", path=str(pruned_path), sha256=plan.meta["weights_sha256"])
    if dist.world() > 1:  # the other ranks take rank 0's Plan (and its stored weights)
        text = dist.broadcast(plan.to_json() if main else None)
        if not main:
            plan = Plan.from_json(text)
            surgery.apply(net, plan)
    if rewrites and not planned_now:  # _read_plan (rank 0) checked the file's sha256 against the plan
        from safetensors.torch import load_file
        net.net.load_state_dict(load_file(str(pruned_path)))
    # how far below the budget a plan may land: one unit of its granularity (a block's share; width,
    # operator and stage plans state theirs in plan.meta["unit_share"], else 10%: bench.api.Plan)
    if plan.granularity == "block" and per_block:
        unit = per_block[budget.measure] / dense_cost[budget.measure]
    else:
        unit = float(plan.meta.get("unit_share", 0.10))
    keep = surgery.check_budget(dense_cost, surgery.measure(net), budget, unit_share=0 if callback else unit,
                                final=callback is None)
    if main:
        append_log(run_dir, "surgery", kept_blocks=net.kept_blocks, **keep)

    # Fine-tune: the same budget for every method (progressive methods hook in via callback)
    from bench.finetune import FinetuneConfig, finetune
    t0 = time.time()
    ft = FinetuneConfig(**cfg["finetune"])
    if ft.steps > 0 or callback is not None:
        _log(f"fine-tuning {ft.steps} steps")
        net = finetune(net, data, ft, art_dir / "finetune", seed=cfg["seed"], callback=callback,
                       run_dir=run_dir, device=device, progress=_progress(cfg), teacher=dense_teacher)
        if callback is not None:  # progressive methods: the budget is checked on the final model
            keep = surgery.check_budget(dense_cost, surgery.measure(net), budget, unit_share=unit)
    wall["finetune"] = time.time() - t0
    net.net.eval()
    if main:  # the final architecture, for a later one-process latency pass (bench.latency_pass)
        final = [plan] + [Plan.from_json(t) for t in net.finetune_plans]
        atomic_write_text(run_dir / STRUCTURE, json.dumps(final_structure(final, net.kept_blocks), sort_keys=True))
    if cfg.get("stop_after") == "finetune":  # e.g. before a SLURM array of sample parts (sample_part)
        if main:
            _log(f"stopped after fine-tuning (stop_after=finetune): {run_dir}")
            append_log(run_dir, "stop_after", stage="finetune")
        return None

    # Sample: per-sample seeds, identical for every method; shards on disk as they are produced, so
    # a killed run resumes at the first missing shard (bench.shards)
    from bench.sample import generate
    from bench.shards import SampleShards
    shards = SampleShards(art_dir / "samples", ev["n"], ev["seed"])
    t0 = time.time()
    k, parts = checks.sample_part(cfg)  # shard j: part j mod parts, then rank (j div parts) mod world
    todo = shards.missing(k + parts * dist.rank(), parts * dist.world(), on_moved=moved)
    if todo:
        _log(f"sampling {sum(hi - lo for lo, hi in todo)} of {ev['n']} ({sampler}, {ev['steps']} steps, "
             f"cfg {ev['cfg_scale']}) in {len(todo)} shard(s)")
    abort_after = int(os.environ.get("BENCH_TEST_ABORT_AFTER_SHARDS", "0"))  # tests: a kill mid-sampling
    with lock.released() if (lock is not None and parts > 1) else contextlib.nullcontext():
        for i, (lo, hi) in enumerate(todo):
            s, y = generate(net, hi - lo, ev["seed"] + lo, ev["batch"], sampler, ev["steps"], ev["cfg_scale"],
                            ev["cfg_convention"], ev["labels"], ev["skip"], ev["eta"], device, _progress(cfg),
                            precision=ev.get("precision"), compile=ev.get("compile", False))
            check_samples(s, cfg)  # NaN/Inf or collapsed samples are refused, not scored
            shards.write(lo, hi, s, y)
            if i + 1 == abort_after:
                os._exit(137)  # like SIGKILL: no cleanup
        dist.barrier()  # every rank's shards are written
    wall["sample"] = time.time() - t0
    if not main:
        return None
    if parts > 1:  # a sample part: the part that finds every shard drawn scores and writes the row
        if (row := read_row(run_dir)) is not None:
            _log(f"done already (by another part): {run_dir}")
            return row
        if left := shards.missing(0, 1):
            _log(f"sampled part {k}/{parts}; {len(left)} shard(s) of other parts missing: the part that completes "
                 f"them writes the row: {run_dir}")
            append_log(run_dir, "sample_part", part=f"{k}/{parts}", shards_missing=len(left))
            return None
    if cfg.get("stop_after") == "sample":  # run_all.sh phase 1: heavy stages in parallel workers;
        _log(f"stopped after sampling (stop_after=sample): {run_dir}")  # score + timing run later, alone
        append_log(run_dir, "stop_after", stage="sample")
        return None

    # Score: quality of the samples (decoded to images first for latent models: model.vae), then cost.
    # Inception metrics alone (the paper protocols) stream: each shard is decoded and featurised in
    # turn, so 50K decoded images are never in memory; the proxies and SSIM-to-teacher take them all.
    t0 = time.time()
    from bench.vae import decoder
    decode = decoder(cfg, device)
    if ev["scorer"] in (None, "none") and ref_samples is None:
        metrics, impl, ref = score(cfg, None, None)
        fid_metrics, fid_fields = score_inception(cfg, (decode(s) for s, _ in shards.iter_shards()))
    else:
        samples, labels = shards.load_all()
        samples = decode(samples)
        if ref_samples is not None:
            ref_samples = (decode(ref_samples[0]), ref_samples[1])
        metrics, impl, ref = score(cfg, samples, labels)
        fid_metrics, fid_fields = score_inception(cfg, samples)
    metrics.update(fid_metrics)
    notes = list(fid_fields.pop("warnings", []))  # e.g. Inception n < 10k: kept in the row and the log
    if notes:
        append_log(run_dir, "warnings", messages=notes)
        for w in notes:
            _log(f"warning: {w}")
    if ref_samples is not None:  # Diff-Pruning's consistency protocol: same noise and labels as the teacher
        from bench.metrics.consistency import ssim_to_teacher
        ss = ssim_to_teacher(samples, ref_samples[0], student_labels=labels, teacher_labels=ref_samples[1])
        metrics["ssim_teacher"] = float(ss["mean"])
        append_log(run_dir, "ssim_teacher", **{k: v for k, v in ss.items() if k != "impl"})
    wall["score"] = time.time() - t0
    t0 = time.time()
    c = cost(net, cfg, device)
    wall["cost"] = time.time() - t0
    if lat_notes := latency_warnings(c):
        notes += lat_notes
        append_log(run_dir, "warnings", messages=lat_notes)
        for w in lat_notes:
            _log(f"warning: {w}")

    sha, dirty = git_info()
    if earlier := earlier_attempts_wall_s(run_dir):  # killed, requeued or stop_after attempts cost device time too
        wall["earlier_attempts"] = earlier
    total_s, n_devices = sum(wall.values()), devices_held(device)  # 1, or the SLURM job's GPUs
    from bench.models.denoiser import compile_mode

    row = Row(
        run=rel, config_sha=config_hash(cfg)[:16], model=cfg["model"]["name"], dataset=cfg["data"]["name"],
        process=net.process.kind, method=cfg["method_name"], method_version=type(method).version,
        method_variant=" ".join(o.lstrip("+~").removeprefix("method.") for o in cfg.get("method_overrides") or []),
        granularity=plan.granularity, budget_measure=budget.measure, budget_keep=float(budget.keep),
        seed=cfg["seed"], keep_blocks=keep["keep_blocks"], keep_params=keep["keep_params"],
        keep_macs=keep["keep_macs"], depth=len(net.net.blocks), kept_blocks=list(net.kept_blocks),
        params_M=c["params"] / 1e6,
        macs_G=c["macs"] / 1e9, latency_ms=c["latency_ms"], latency_batch=ev["latency"]["batch"],
        latency_dtype=ev["latency"]["dtype"], latency_mode=c["mode"], latency_iqr_ms=c["latency_iqr_ms"],
        latency_reps=int(ev["latency"]["reps"]), latency_flags=c["flags"], latency_others_cores=c["others_cores"],
        warnings=notes,
        peak_mem_MB=c["peak_mem_MB"], throughput_img_s=c["throughput_img_s"],
        nfe=shards.nfe() or net.process.nfe(sampler, ev["steps"], ev["skip"]) * (2 if ev["cfg_scale"] != 1.0 else 1),
        sampler=sampler, cfg_scale=ev["cfg_scale"], cfg_convention=ev["cfg_convention"],
        finetune_steps=ft.steps, finetune_precision=resolve_precision(ft.precision, device),
        finetune_compile=compile_mode(ft.compile), eval_precision=resolve_precision(ev.get("precision"), device),
        eval_compile=compile_mode(ev.get("compile", False)), metrics=metrics, metric_n=int(ev["n"]), metric_ref=ref, metric_impl=impl,
        device=device_name(device), teacher_sha256=assets.sha256_file(teacher_weights(cfg)), git_sha=sha, git_dirty=dirty,
        date=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), versions=library_versions(),
        wall_s={k: round(v, 3) for k, v in wall.items()}, device_hours=total_s * n_devices / 3600,
        n_devices=n_devices, job_id=scheduler_job_id(), **fid_fields,
        **({"stage_latency_ms": c["stage_latency_ms"], "stage_weights": c["stage_weights"],
            "stage_blocks": c["stage_blocks"], "stage_macs_G": [v / 1e9 for v in c["stage_macs"]]}
           if "stage_latency_ms" in c else {}),
    )
    write_row(row, run_dir)
    append_log(run_dir, "row", **metrics)
    _log(f"row: {cfg['method_name']} keep={budget.keep} " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
         + f" latency={c['latency_ms']:.3g}ms -> {run_dir}")
    return row


def _store_weights(net, path: Path) -> str:
    """The pruned model's state (after plan + surgery) as safetensors, atomically; returns its sha256."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in net.net.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp))
    return sha256_file(path)


def _read_plan(path: Path, weights: Path | None) -> Plan:
    """A stored plan; for a weight-rewriting method also its weights file, whose sha256 the plan
    recorded (either one missing or different: the plan is redone)."""
    plan = Plan.from_json(path.read_text())
    if weights is not None:
        want = plan.meta.get("weights_sha256")
        if not weights.is_file() or not want or sha256_file(weights) != want:
            raise ValueError(f"the rewritten weights {weights} are missing or differ from the sha256 the plan recorded")
    return plan


def _read_samples(path: Path, n: int):
    """Stored samples and labels; a file with the wrong keys or count is treated as unfinished."""
    s = torch.load(path, weights_only=True)
    samples, labels = s["samples"], s["labels"]
    if len(samples) != n or len(labels) != n:
        raise ValueError(f"{len(samples)} samples stored, {n} expected")
    return samples, labels


def check_samples(samples: torch.Tensor, cfg: dict) -> None:
    """Refuse samples that cannot be meaningful before anything scores them: non-finite values (a
    diverged model or sampler) or samples that are all alike (a collapsed model: every sample the
    same image)."""
    bad = (~torch.isfinite(samples)).flatten(1).any(1)
    if bad.any():
        raise BenchError(f"{int(bad.sum())} of {len(samples)} samples contain NaN/Inf (the pruned model or the "
                         f"sampler diverged: eval.sampler={cfg['eval']['sampler']}, eval.steps={cfg['eval']['steps']}, "
                         f"eval.cfg_scale={cfg['eval']['cfg_scale']}); fine-tune longer or lower finetune.lr; no row is "
                         "written")
    if len(samples) > 1 and float(samples.flatten(1).std(0).max()) == 0.0:
        raise BenchError(f"all {len(samples)} samples are the same image: the model collapsed; no row is written")


def score(cfg: dict, samples, labels) -> tuple[dict, str, str]:
    """Quality metrics of the protocol named in eval.scorer. Returns (metrics, metric_impl, metric_ref)."""
    ev = cfg["eval"]
    if ev["scorer"] in (None, "none"):  # paper-table protocols score with Inception metrics only
        if not ev.get("inception"):
            raise BenchError("eval.scorer=none leaves no quality metric; add eval=inception or use scorer=classifier")
        return {}, "none", "none"
    if ev["scorer"] != "classifier":
        raise BenchError(f"eval.scorer={ev['scorer']!r} is not available; use 'classifier' or 'none' (with eval=inception)")
    from bench.metrics.classifier import ClassifierScorer, load_or_train
    data_cfg = {k: v for k, v in cfg["data"].items() if k not in ("name", "split")}
    with file_lock(Path(cfg["paths"]["artifacts"]) / "classifiers" / ".lock"):  # trained once per sweep
        clf = load_or_train(Path(cfg["paths"]["artifacts"]) / "classifiers", data_cfg, seed=0)
    ref_x, _ = from_config(cfg, split="all").all()
    scorer = ClassifierScorer(clf, ref_x)
    m = scorer.score(samples, labels)
    metrics = {"cond_acc": float(m["cond_acc"]), "fd_clf": float(m["fd_clf"])}
    return metrics, scorer.impl, f"{cfg['data']['name']}-all"


def score_inception(cfg: dict, samples) -> tuple[dict, dict]:
    """eval=inception: Inception FID/KID with bootstrap intervals (+ sFID, P/R; IS with the
    torch-fidelity extractor), offline weights through bench.assets. Returns (metrics, row fields)."""
    inc = cfg["eval"].get("inception")
    if not inc:
        return {}, {}
    from bench.metrics.fid import evaluate
    m, impl, ref, x = evaluate(samples, lambda: from_config(cfg, split=inc["ref_split"]).all()[0], cfg["eval"],
                               Path(cfg["paths"]["artifacts"]), cfg["data"]["name"], cfg["device"])
    return m, {"fid_impl": impl, "fid_n": int(x["n"]), "fid_ref": ref, "fid_weights": str(x["weights_path"]),
               "fid_weights_sha256": x["weights_sha256"], "warnings": list(x.get("warnings", []))}


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def _hydra_main():
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    @hydra.main(config_path="conf", config_name="run", version_base="1.3")
    def main(cfg) -> None:
        d = OmegaConf.to_container(cfg, resolve=True)
        d["method_name"] = HydraConfig.get().runtime.choices["method"]
        d["method_overrides"] = sorted(o for o in HydraConfig.get().overrides.task if o.lstrip("+~").startswith("method."))
        guard_requeue_signal()  # in a SLURM job: one requeue per SIGUSR2, even when it arrives twice
        cli(d, multirun=HydraConfig.get().mode == RunMode.MULTIRUN)

    main()


def cli(d: dict, multirun: bool = False) -> Row | None:
    """What the command line does with one resolved config: run it. A user's mistake (BenchError)
    or the machine's state (a full disk, an unwritable folder: OSError) ends in one line on stderr
    and exit status 2, never a traceback; in a sweep the error is raised on for hydra to record."""
    try:
        dist.init(str(d.get("device", "cpu")))  # torchrun: join the process group (a no-op for one process)
        return execute(d)
    except (BenchError, OSError) as e:
        print(f"error: {e if isinstance(e, BenchError) else os_error_message(e)}", file=sys.stderr)
        if multirun:
            raise  # in a sweep: hydra records this run's failure and goes on with the others
        sys.exit(2)


if __name__ == "__main__":
    _hydra_main()
