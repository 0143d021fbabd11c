"""Scaling of the data-parallel paths over the GPUs of one host: fine-tune step time (DDP, a fixed
global batch) and sampler throughput (shards over ranks) on N = 1, 2, 4, 8 GPUs, as efficiency.

    torchrun --standalone --nproc-per-node=N -m bench.gpu.scaling measure --out DIR   # N GPUs (NCCL)
    torchrun --standalone --nproc-per-node=2 -m bench.gpu.scaling measure --out DIR --smoke  # CPU, gloo, tiny DiT
    python -m bench.gpu.scaling report DIR          # DIR/scaling.md + scaling.json from DIR/scaling_N*.json
    bash bench/gpu/scaling.sh [measure options]     # N = 1, 2, 4, 8 (the GPUs present), then report

What is timed is the suite's own code (bench.steptime, S1/S2 difference after a warm-up, `repeats`
pairs, median), on a DiT-XL/2-shaped model with random weights, 14 blocks (TinyDiT-D14, the shape of
bench.gpu.ddp_speed and of most of TinyFusion Table 1's fine-tunes):
  fine-tune  bench.finetune under torchrun: DDP, global batch 256 split over the N ranks, bf16
             autocast (fp32 master weights, AdamW, EMA), eager (finetune.compile's default)
  sampling   bench.sample.generate, bf16 + torch.compile, DDPM with cfg 1.5: a fixed total of 2048
             samples in shards of 256 (8 shards: the same share per rank at N = 1, 2, 4, 8), shard k
             on rank k mod N as bench.run draws them; samples/s quoted at 250 sampler steps (TinyFusion
             Table 1's DDPM) = total / (250 x one step's seconds)
A run starts on every rank together (a barrier) and counts as long as its slowest rank
(bench.steptime.slowest). S2 - S1 grows with N (x N) so every N times a window of the same length.
Rank 0 writes DIR/scaling_N<N>.json (atomically): N, every rank's device, torch, commit, command,
the settings and the two records (per-step seconds: median and every repeat; samples/s; peak GPU
memory per rank). `report` refuses files of other devices, commits, torch versions or settings, and
a DIR without N = 1. Efficiency: fine-tune t1 / (N tN) (strong scaling of the fixed global batch),
sampling thrN / (N thr1); targets at 8 GPUs (the multi-GPU issue): >= 90 % sampling, >= 80 % fine-tune.
If the global batch of 256 does not fit one GPU (N = 1 stops with out-of-memory), measure every N
with --ft-batch 128 into a new DIR.

On the project's GPU machine (torch only, nothing can be fetched; no .git travels, so name the
commit): carry the wheels (.whl, README "GPU results") and run, in calls of at most 10 minutes,

    BENCH_GIT_SHA=<sha> bash bench/gpu/scaling.sh          carry [".whl"], kind nvidia-h100-x8

It sources bench/gpu/wheels.sh (the carried wheels into /tmp/site on PYTHONPATH, as
bench/gpu/device_suite.sh), keeps NVLink multicast off (NCCL_NVLS_ENABLE=0 ...), runs each N under
the call's time left (SCALING_CHUNK_S, default 540 s; an N starts only with SCALING_MIN_S, default
240 s, left), skips an N whose json exists in SCALING_OUT (default results/gpu/scaling), reports, and
copies the jsons and the report to $OUT. Put the jsons that came back into results/gpu/scaling/ of
the checkout before the next call (they travel with the tree) until every N is there; then commit
them with the report and project Table 1's cost on 8 GPUs with the measured efficiencies:

    python -m bench.cost experiment=tinyfusion_table1 --timings results/gpu/cost/cost_tinyfusion_table1.json \\
        --gpus 1 8 --scaling results/gpu/scaling/scaling.json --out results/gpu/scaling
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from bench.api import BenchError

GPU = dict(model="DiT-XL/2", input_size=32, in_channels=4, num_classes=1000, depth=14, ft_batch=256,
           ft_precision="bf16", ft_compile=False, ft_steps=(5, 45),  # 40 steps x N: ~20 s a run on an H100
           sample_total=2048, sample_shard=256, sample_batch=256, sample_precision="bf16", sample_compile=True,
           sample_steps=(2, 8), sampler="ddpm", cfg_scale=1.5, at_steps=250, repeats=3)
SMOKE = dict(model="DiT-T/2", input_size=8, in_channels=4, num_classes=10, depth=2, ft_batch=8,
             ft_precision="fp32", ft_compile=False, ft_steps=(1, 3), sample_total=8, sample_shard=2, sample_batch=2,
             sample_precision="fp32", sample_compile=False, sample_steps=(1, 2), sampler="ddpm", cfg_scale=1.5,
             at_steps=250, repeats=2)
TARGETS = {"sample": 0.90, "finetune": 0.80}  # at 8 GPUs (the multi-GPU issue)
TARGET_N = 8
FILE = re.compile(r"scaling_N(\d+)\.json$")


def _error(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    return 2


# --------------------------------------------------------------------------------------------
# measure (every rank)
# --------------------------------------------------------------------------------------------

def settings(smoke: bool, ft_batch: int | None) -> dict:
    p = dict(SMOKE if smoke else GPU)
    if ft_batch:
        p["ft_batch"] = ft_batch
    return {k: list(v) if isinstance(v, tuple) else v for k, v in p.items()}


def _window(steps, n: int) -> tuple[int, int]:
    """(S1, S1 + (S2 - S1) N): the same wall time a run at every N."""
    return steps[0], steps[0] + (steps[1] - steps[0]) * n


def finetune_record(net, p: dict, device: str, n: int) -> dict:
    """The DDP fine-tune's step at the global batch (bench.steptime.finetune_step_s) and each rank's
    peak GPU memory."""
    import torch

    from bench import dist, steptime

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rec = steptime.finetune_step_s(net, p["ft_batch"], device, p["ft_precision"], p["ft_compile"],
                                   _window(p["ft_steps"], n), repeats=p["repeats"])
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else None
    return {**rec, "world": n, "per_rank_batch": p["ft_batch"] // n,
            "peak_mem_gib": [None if g is None else round(g, 2) for g in dist.gather_all(peak)]}


def sample_record(net, p: dict, device: str, n: int) -> dict:
    """The sampler's step over the fixed total (bench.steptime.sample_shares_step_s) and samples/s at
    `at_steps` sampler steps."""
    from bench import steptime

    rec = steptime.sample_shares_step_s(net, p["sample_total"], p["sample_shard"], p["sample_batch"], device,
                                        p["sample_precision"], p["sample_compile"], _window(p["sample_steps"], n),
                                        p["repeats"], p["sampler"], p["cfg_scale"])
    per = lambda s: p["sample_total"] / (s * p["at_steps"])  # noqa: E731
    return {**rec, "at_steps": p["at_steps"], "samples_per_s": per(rec["per_step_s"]),
            **({"samples_per_s_all": [per(s) for s in rec["per_step_all_s"]]} if "per_step_all_s" in rec else {})}


def measure(argv: list[str]) -> int:
    import torch

    from bench import dist, steptime
    from bench.gpu import script
    from bench.io import atomic_write_text
    from bench.metrics.cost import device_name

    args, device, meta = script(__doc__, "bench.gpu.scaling measure", argv, lambda ap: ap.add_argument(
        "--ft-batch", type=int, default=None, help="global fine-tune batch (default 256; --smoke 8)"))
    if device is None:
        return 2
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return _error("measure runs as the ranks of torchrun: torchrun --standalone --nproc-per-node=N "
                      "-m bench.gpu.scaling measure --out DIR (N = 1 too: the baseline is the DDP path with one rank)")
    n = int(os.environ["WORLD_SIZE"])
    if device == "cuda" and int(os.environ.get("LOCAL_WORLD_SIZE", n)) > torch.cuda.device_count():
        return _error(f"{os.environ.get('LOCAL_WORLD_SIZE', n)} ranks on this host but {torch.cuda.device_count()} "
                      "GPU(s) visible: one rank per GPU (--nproc-per-node at most `nvidia-smi -L | wc -l`)")
    if device == "cuda" and meta["commit"].startswith("unknown"):
        return _error("no git commit (no .git here): name it, BENCH_GIT_SHA=<sha> (bench.results.git_info)")
    p = settings(args.smoke, args.ft_batch)
    if p["ft_batch"] % n:
        return _error(f"--ft-batch {p['ft_batch']} does not split over {n} ranks; use a multiple of 8 (every N)")
    dist.init(device)
    try:
        net = steptime.random_model({k: p[k] for k in ("input_size", "in_channels", "num_classes", "depth")}
                                    | {"name": p["model"]}, device)
        try:
            ft = finetune_record(net, p, device, n)
        except torch.cuda.OutOfMemoryError:
            print(f"error: out of memory in the fine-tune at global batch {p['ft_batch']} on {n} GPU(s) "
                  f"({p['ft_batch'] // n} a GPU): measure every N with --ft-batch {p['ft_batch'] // 2} into a new "
                  "--out folder (report refuses mixed settings)", file=sys.stderr, flush=True)
            os._exit(2)  # torchrun stops the other ranks
        if device == "cuda":  # the fine-tune's DDP wrappers, optimizer and EMA go before sampling
            import gc

            gc.collect()
            torch.cuda.empty_cache()
        sm = sample_record(net, p, device, n)
        devices = dist.gather_all(device_name(device))
        if dist.is_main():
            rest = " ".join(["measure", *argv])
            meta.update(devices=devices, device=devices[0],
                        command=f"torchrun --standalone --nproc-per-node={n} -m bench.gpu.scaling {rest}".strip())
            out = Path(args.out) / f"scaling_N{n}.json"
            atomic_write_text(out, json.dumps({"N": n, "meta": meta, "settings": p, "records": [ft, sm]}, indent=1))
            print(f"[scaling] N={n}: fine-tune {1e3 * ft['per_step_s']:.1f} ms/step, sampling "
                  f"{sm['samples_per_s']:.2f} samples/s ({p['at_steps']} steps); wrote {out}", flush=True)
        dist.barrier()
    finally:
        dist.close()
    return 0


# --------------------------------------------------------------------------------------------
# report (one process)
# --------------------------------------------------------------------------------------------

def load(folder) -> dict[int, dict]:
    """{N: file} of every scaling_N*.json in `folder`, refused unless they agree on device, commit,
    torch and settings and N = 1 is there."""
    folder = Path(folder)
    files = {int(m.group(1)): f for f in sorted(folder.glob("scaling_N*.json")) if (m := FILE.search(f.name))}
    if not files:
        raise BenchError(f"no scaling_N*.json in {folder}: run torchrun --nproc-per-node=N -m bench.gpu.scaling "
                         f"measure --out {folder} first")
    got = {}
    for n, f in sorted(files.items()):
        try:
            d = json.loads(f.read_text())
            recs = {r["path"]: r for r in d["records"]}
            d["finetune"], d["sample"] = recs["finetune"], recs["sample"]
            if not isinstance(d["meta"]["devices"], list) or not isinstance(d["settings"], dict):
                raise TypeError("meta.devices is no list or settings no dict")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise BenchError(f"{f} is not a scaling measurement ({type(e).__name__}: {e}); measure it again") from None
        if d.get("N") != n or len(d["meta"]["devices"]) != n:
            raise BenchError(f"{f} holds N={d.get('N')} with {len(d['meta']['devices'])} device(s); its name says "
                             f"N={n}: measure it again")
        if len(set(d["meta"]["devices"])) != 1:
            raise BenchError(f"{f}: its ranks ran on different devices {sorted(set(d['meta']['devices']))}")
        got[n] = d
    if 1 not in got:
        raise BenchError(f"no scaling_N1.json in {folder} (have N = {', '.join(map(str, got))}): efficiency is "
                         f"against one GPU; torchrun --nproc-per-node=1 -m bench.gpu.scaling measure --out {folder}")
    base = got[1]
    for n, d in got.items():
        for what, a, b in (("device", base["meta"]["device"], d["meta"]["device"]),
                           ("commit", base["meta"]["commit"], d["meta"]["commit"]),
                           ("torch", base["meta"]["torch"], d["meta"]["torch"]),
                           ("settings", base["settings"], d["settings"])):
            if a != b:
                if what == "settings":
                    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
                    a, b = {k: a.get(k) for k in keys}, {k: b.get(k) for k in keys}
                raise BenchError(f"scaling_N{n}.json and scaling_N1.json differ in {what} ({b} vs {a}): a report "
                                 "compares one device, commit, torch and settings; measure every N into one folder")
    return got


def efficiencies(got: dict[int, dict]) -> list[dict]:
    """Per N: fine-tune strong-scaling efficiency t1 / (N tN), sampling thrN / (N thr1), each against
    its target (at 8 GPUs)."""
    t1, thr1 = got[1]["finetune"]["per_step_s"], got[1]["sample"]["samples_per_s"]
    rows = []
    for n, d in sorted(got.items()):
        ft, sm = d["finetune"], d["sample"]
        fe, se = t1 / (n * ft["per_step_s"]), sm["samples_per_s"] / (n * thr1)
        rows.append({"N": n, "finetune_step_s": ft["per_step_s"],
                     "finetune_step_all_s": ft.get("per_step_all_s", [ft["per_step_s"]]), "finetune_eff": fe,
                     "finetune_meets_target": fe >= TARGETS["finetune"], "samples_per_s": sm["samples_per_s"],
                     "sample_step_s": sm["per_step_s"],
                     "sample_step_all_s": sm.get("per_step_all_s", [sm["per_step_s"]]),
                     "sample_eff": se, "sample_meets_target": se >= TARGETS["sample"],
                     "peak_mem_gib": max((g for g in ft.get("peak_mem_gib") or [] if g is not None), default=None),
                     "noisy": bool(ft.get("noisy") or sm.get("noisy")), "command": d["meta"]["command"]})
    return rows


def render(meta: dict, p: dict, rows: list[dict], verdict: dict) -> str:
    from bench.tables import markdown_table

    ms = lambda xs: ", ".join(f"{1e3 * x:.1f}" for x in xs)  # noqa: E731
    pc = lambda x: f"{100 * x:.1f} %"  # noqa: E731
    body = [[str(r["N"]), f"{1e3 * r['finetune_step_s']:.1f} ({ms(r['finetune_step_all_s'])})", pc(r["finetune_eff"]),
             "yes" if r["finetune_meets_target"] else "no", f"{r['samples_per_s']:.2f}",
             f"{1e3 * r['sample_step_s']:.1f} ({ms(r['sample_step_all_s'])})", pc(r["sample_eff"]),
             "yes" if r["sample_meets_target"] else "no",
             "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}"] for r in rows]
    words = {True: "met", False: "missed", None: f"not measured (no N = {TARGET_N})"}
    return "\n".join([
        f"# Data-parallel scaling on {meta['device']} ({p['model']} shape, {p['depth']} blocks)", "",
        f"Commit {meta['commit']}, torch {meta['torch']}; each N: `torchrun --standalone --nproc-per-node=N -m "
        f"bench.gpu.scaling measure` (commands below), report `python -m bench.gpu.scaling report`.", "",
        f"Fine-tune: bench.finetune under DDP, global batch {p['ft_batch']} split over the N GPUs, {p['ft_precision']}"
        f"{' + compile' if p['ft_compile'] else ''}; efficiency t1 / (N tN). Sampling: bench.sample.generate, "
        f"{p['sample_precision']}{' + torch.compile' if p['sample_compile'] else ' eager'}, {p['sampler']} cfg "
        f"{p['cfg_scale']}, {p['sample_total']} samples in shards of {p['sample_shard']} (shard k on rank k mod N, "
        f"batch {p['sample_batch']}); samples/s at {p['at_steps']} sampler steps; efficiency thrN / (N thr1). "
        f"Per-step ms: median of {p['repeats']} S1/S2 differences (each in brackets, bench.steptime), the slowest "
        "rank's.", "",
        markdown_table(["N", "fine-tune ms/step", "fine-tune eff.", f">= {pc(TARGETS['finetune'])}",
                        f"samples/s ({p['at_steps']} steps)",
                        "sampler ms/step (all samples)", "sampling eff.", f">= {pc(TARGETS['sample'])}",
                        "peak GiB/GPU (fine-tune)"], body), "",
        f"Targets at {TARGET_N} GPUs: fine-tune >= {pc(TARGETS['finetune'])}: {words[verdict['finetune']]}; "
        f"sampling >= {pc(TARGETS['sample'])}: {words[verdict['sample']]}.", "",
        *(["Noisy (a difference that was not positive, replaced by an upper bound): N = " +
           ", ".join(str(r["N"]) for r in rows if r["noisy"]), ""] if any(r["noisy"] for r in rows) else []),
        "Commands:", "", *(f"- N = {r['N']}: `{r['command']}`" for r in rows), ""])


def report(folder) -> int:
    from bench.io import atomic_write_text

    try:
        got = load(folder)
    except BenchError as e:
        return _error(str(e))
    rows = efficiencies(got)
    at = next((r for r in rows if r["N"] == TARGET_N), None)
    verdict = {k: None if at is None else at[f"{k}_meets_target"] for k in ("finetune", "sample")}
    meta = {k: got[1]["meta"][k] for k in ("device", "device_type", "commit", "torch")}
    p = got[1]["settings"]
    atomic_write_text(Path(folder) / "scaling.json", json.dumps(
        {"meta": meta, "settings": p, "targets": {"at_N": TARGET_N, **TARGETS}, "verdict": verdict, "rows": rows},
        indent=1))
    md = render(meta, p, rows, verdict)
    atomic_write_text(Path(folder) / "scaling.md", md)
    print(md)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["measure"]:
        return measure(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m bench.gpu.scaling", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("measure", help="as the ranks of torchrun: measure N = WORLD_SIZE (--out DIR [--smoke])")
    sub.add_parser("report", help="DIR/scaling.md + scaling.json from DIR/scaling_N*.json").add_argument("dir")
    args = ap.parse_args(argv)
    return report(args.dir)


if __name__ == "__main__":
    sys.exit(main())
