"""Inception metrics on a GPU: feature throughput, and a 10k-sample FID of a tiny model end to end.

    python -m bench.gpu.fid_throughput --out reports/fid_gpu             # cuda, ~3-6 min
    python -m bench.gpu.fid_throughput --out reports/fid_gpu --teacher artifacts/teachers/<hash>/final.pt
    python -m bench.gpu.fid_throughput --out /tmp/fid --smoke            # tiny, CPU, seconds

1. Throughput of the default extractor (fid-helper TorchScript Inception, fp32, TF1 bilinear
   resize to 299 included) on random uint8 images at the digits' 8x8 and at ImageNet's 256x256,
   batches 256 and 500: images/s from a synchronized wall clock after warm-up, median of reps.
2. A 10k-sample FID end to end: the default DiT-D8/2 trained on the digits (the teacher's recipe,
   --train-steps, on --train-device; or the suite's trained teacher via --teacher), 10,000 class-balanced samples (25-step DDPM, CFG 1.5: eval/default.yaml), then
   bench.metrics.fid.evaluate (eval/inception.yaml: adm backend, fid-helper weights, bootstrap
   intervals) against all 1,797 digits. Wall times of every stage are recorded.

Writes fid_throughput.json and fid_throughput.md to --out (rewritten after each part, so a killed
run keeps what it measured). Nothing is downloaded: the weights come through bench.assets.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def throughput(ex, batch: int, res: int, reps: int, warmup: int, device: str) -> dict:
    """images/s of ex() (resize + Inception) on one batch of random uint8 images, already on the device."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch, 3, res, res), generator=g, dtype=torch.uint8).to(device)
    for _ in range(warmup):
        ex(x)
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        ex(x)
        _sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2]
    return {"batch": batch, "resolution": res, "reps": reps, "median_s": med, "images_per_s": batch / med,
            "s_per_1000": 1000 * med / batch}


def _model_cfg(name: str) -> dict:
    from omegaconf import OmegaConf
    return OmegaConf.to_container(OmegaConf.load(ROOT / "bench" / "conf" / "model" / f"{name}.yaml"), resolve=True)


def tiny_model_fid(n: int, train_steps: int, sample_steps: int, sample_batch: int, work: Path, device: str,
                   model: str = "dit_digits", ref_n: int | None = None, inception: dict | None = None,
                   teacher: Path | None = None, train_device: str = "cpu") -> dict:
    """Train (or load `teacher`, a bench.finetune final.pt), sample n, and score them with
    evaluate(); returns metrics and wall times. Training runs on `train_device`: the tiny model
    is CPU-sized, and bench.finetune draws noise levels from a CPU generator."""
    from bench.assets import sha256_file
    from bench.data import digits
    from bench.finetune import FinetuneConfig, finetune
    from bench.metrics.fid import evaluate
    from bench.models import build
    from bench.sample import generate

    wall = {}
    torch.manual_seed(0)
    net = build(**_model_cfg(model))
    t0 = time.perf_counter()
    if teacher:  # e.g. the default suite's teacher: artifacts/teachers/<hash>/final.pt (3000 steps)
        net.net.load_state_dict(torch.load(teacher, map_location="cpu", weights_only=False)["ema"])
        source = {"teacher": str(teacher), "teacher_sha256": sha256_file(teacher)}
    else:  # the teacher's recipe (bench/conf/teacher/digits.yaml)
        ft = FinetuneConfig(steps=train_steps, batch=64, lr=2e-3, ema_decay=0.999, ckpt_every=max(train_steps, 1),
                            log_every=max(train_steps, 1))
        net = finetune(net, digits("train"), ft, work / f"teacher-{model}-{train_steps}", seed=0, device=train_device)
        source = {"trained_steps": train_steps, "train_device": train_device}
    net.net.to(device).eval()
    wall["train"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    samples, _ = generate(net, n, 0, sample_batch, "ddpm", sample_steps, 1.5, "all", "balanced", "uniform", 0.0, device)
    _sync(device)
    wall["sample"] = time.perf_counter() - t0

    ref_x = digits("all").all()[0]
    ref_x = ref_x[:ref_n] if ref_n else ref_x
    t0 = time.perf_counter()
    metrics, impl, ref, extra = evaluate(samples, lambda: ref_x, {"inception": inception or {}}, work, "digits", device)
    wall["evaluate"] = time.perf_counter() - t0
    return {"model": net.name, **source, "n": n, "sample_steps": sample_steps, "cfg_scale": 1.5,
            "metrics": metrics, "metric_impl": impl, "metric_ref": ref, "metric_n": extra["n"],
            "weights_path": extra["weights_path"], "weights_sha256": extra["weights_sha256"],
            "evaluate_wall_s": extra["wall_s"], "wall_s": {k: round(v, 2) for k, v in wall.items()}}


def _markdown(rep: dict) -> str:
    lines = [f"# Inception metrics on {rep['device']}", "",
             f"torch {rep['torch']}, extractor {rep.get('extractor', '?')} (weights sha256 {rep.get('weights_sha256', '?')[:16]}...), "
             f"{rep['date']}", "", "## Feature throughput (fp32, resize to 299 included)", "",
             "| input | batch | images/s | s per 1,000 |", "| --- | --- | --- | --- |"]
    for r in rep.get("throughput", []):
        lines.append(f"| {r['resolution']}x{r['resolution']} | {r['batch']} | {r['images_per_s']:.0f} | {r['s_per_1000']:.2f} |")
    f = rep.get("fid")
    if f:
        m = f["metrics"]
        how = f"loaded from {Path(f['teacher']).name} (sha256 {f['teacher_sha256'][:8]})" if "teacher" in f \
            else f"trained {f['trained_steps']} steps on the {f['train_device']}"
        lines += ["", f"## {f['n']:,}-sample FID, {f['model']} {how}, digits", "",
                  f"{f['sample_steps']}-step DDPM, CFG {f['cfg_scale']}, class-balanced labels", "",
                  f"metric_impl `{f['metric_impl']}`, metric_ref `{f['metric_ref']}`, metric_n {f['metric_n']}", "",
                  "| metric | value | 95% bootstrap interval |", "| --- | --- | --- |"]
        for k in ("fid", "kid", "sfid", "precision", "recall"):
            if k in m:
                ci = f"[{m[k + '_ci_lo']:.4g}, {m[k + '_ci_hi']:.4g}]" if k + "_ci_lo" in m else ""
                lines.append(f"| {k} | {m[k]:.4g} | {ci} |")
        lines += ["", "wall s: " + ", ".join(f"{k} {v}" for k, v in f["wall_s"].items())
                  + "; evaluate: " + ", ".join(f"{k} {v}" for k, v in f["evaluate_wall_s"].items())]
    return "\n".join(lines) + "\n"


def _write(rep: dict, out: Path):
    from bench.io import atomic_write_text
    atomic_write_text(out / "fid_throughput.json", json.dumps(rep, indent=1, sort_keys=True))
    atomic_write_text(out / "fid_throughput.md", _markdown(rep))


def main(argv=None) -> dict:
    from datetime import datetime, timezone

    from bench.metrics.cost import device_name
    from bench.metrics.inception import make_extractor

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--smoke", action="store_true", help="tiny everything on the CPU (checks the script)")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    ap.add_argument("--n", type=int, default=10_000, help="samples for the end-to-end FID")
    ap.add_argument("--train-steps", type=int, default=3000, help="the default teacher's steps")
    ap.add_argument("--work", type=Path, default=None, help="artifacts (teacher, refstats); default: --out/work")
    ap.add_argument("--teacher", type=Path, default=None,
                    help="load this bench.finetune final.pt (e.g. artifacts/teachers/<hash>/final.pt) instead of training")
    ap.add_argument("--train-device", default="cpu", help="where to train when no --teacher is given")
    a = ap.parse_args(argv)
    device = a.device or ("cpu" if a.smoke else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device visible; use --smoke (CPU) or --device cpu")
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 features, as the TF graph
        torch.backends.cudnn.allow_tf32 = False
    a.out.mkdir(parents=True, exist_ok=True)
    work = a.work or a.out / "work"
    ex = make_extractor("fid-helper", device)
    rep = {"device": device_name(device), "torch": torch.__version__, "extractor": ex.id,
           "weights_path": str(ex.path), "weights_sha256": ex.sha256,
           "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "smoke": a.smoke, "throughput": []}
    if a.smoke:
        plan, reps, warmup = [(4, 8)], 1, 1
        fid_kw = dict(n=8, train_steps=2, sample_steps=3, sample_batch=8, model="dit_tiny", ref_n=10,
                      inception={"bootstrap": 5, "batch": 8})
    else:
        plan, reps, warmup = [(256, 8), (500, 8), (256, 256), (500, 256)], 5, 2
        fid_kw = dict(n=a.n, train_steps=a.train_steps, sample_steps=25, sample_batch=2000, model="dit_digits",
                      inception={"bootstrap": 100, "batch": 500}, teacher=a.teacher, train_device=a.train_device)
    for batch, res in plan:
        rep["throughput"].append(throughput(ex, batch, res, reps, warmup, device))
        _write(rep, a.out)
        print(f"[fid_throughput] {res}px batch {batch}: {rep['throughput'][-1]['images_per_s']:.0f} images/s", flush=True)
    del ex
    rep["fid"] = tiny_model_fid(work=work, device=device, **fid_kw)
    _write(rep, a.out)
    print(f"[fid_throughput] FID-{rep['fid']['n']}: {rep['fid']['metrics']['fid']:.4g} "
          f"({rep['fid']['metric_impl']}) -> {a.out}", flush=True)
    return rep


if __name__ == "__main__":
    main()
