"""Per-step time of the project's own evaluation sampler and fine-tune loop, by precision and mode.

    python -m bench.gpu.paths_speed --out results/gpu/paths_speed          # cuda, DiT-XL/2 shape, ~6 min
    python -m bench.gpu.paths_speed --out /tmp/paths --smoke               # tiny DiT on the CPU, seconds

What is timed is the suite's code, not a kernel: `bench.sample.generate` (DDPM ancestral sampling,
cfg 1.5, so a batch of 256 samples is a 512-image forward, per-sample noise) and
`bench.finetune.finetune` (Denoiser.loss + AdamW + grad clip + EMA, the loop every method gets), on a
DiT-XL/2-shaped model with random weights (adaLN-Zero gates randomised so every block computes).

Per step = (time of a run with S2 steps - time with S1 steps) / (S2 - S1), each after an untimed
warm-up run of the same settings (which compiles in compile mode): setup, the final EMA save and the
host-device copies of the samples cancel out. Paths:
  sample   fp32 eager (today's default on a CPU), tf32 eager (DiT's sample.py), bf16 eager,
           bf16 + torch.compile
  finetune fp32, tf32, bf16 (autocast, fp32 master weights / AdamW / EMA), 14-block XL/2 (TinyDiT-D14), batch 64
Output: paths_speed.json (every timing) and paths_speed.md, rewritten after each measurement.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

GPU = dict(model="DiT-XL/2", input_size=32, in_channels=4, num_classes=1000, sample_n=256, sample_steps=(3, 9),
           ft_depth=14, ft_batch=64, ft_steps=(4, 14))
SMOKE = dict(model="DiT-T/2", input_size=8, in_channels=4, num_classes=10, sample_n=8, sample_steps=(2, 4),
             ft_depth=2, ft_batch=4, ft_steps=(2, 4))
SAMPLE_PATHS = [("fp32", False), ("tf32", False), ("bf16", False), ("bf16", True)]
FT_PATHS = [("fp32", False), ("tf32", False), ("bf16", False)]


def _net(p: dict, depth: int | None, device: str):
    from bench.gpu.speed import randomize_zero_init_
    from bench.models import build

    torch.manual_seed(0)
    net = build(p["model"], input_size=p["input_size"], in_channels=p["in_channels"], num_classes=p["num_classes"],
                **({"depth": depth} if depth else {}))
    randomize_zero_init_(net.net)
    net.net.to(device).eval()
    return net


def _timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def sample_step_s(net, p: dict, device: str, prec: str, compile: bool) -> dict:
    from bench.sample import generate

    def run(steps):
        return generate(net, p["sample_n"], 0, p["sample_n"], "ddpm", steps, 1.5, "all", "balanced", "uniform", 0.0,
                        device, precision=prec, compile=compile)

    s1, s2 = p["sample_steps"]
    warm = _timed(lambda: run(s1))  # compiles in compile mode
    t1, t2 = _timed(lambda: run(s1)), _timed(lambda: run(s2))
    return {"path": "sample", "precision": prec, "compile": compile, "per_step_s": (t2 - t1) / (s2 - s1),
            "warmup_s": warm, "steps": [s1, s2], "n": p["sample_n"], "forward_batch": 2 * p["sample_n"]}


def finetune_step_s(p: dict, device: str, prec: str, compile: bool) -> dict:
    from bench.data import TensorDataset
    from bench.finetune import FinetuneConfig, finetune

    g = torch.Generator().manual_seed(0)
    n = 4 * p["ft_batch"]
    data = TensorDataset(torch.randn(n, p["in_channels"], p["input_size"], p["input_size"], generator=g),
                         torch.randint(p["num_classes"], (n,), generator=g), p["num_classes"], "random")

    def run(steps):
        net = _net(p, p["ft_depth"], device)
        cfg = FinetuneConfig(steps=steps, batch=p["ft_batch"], lr=1e-4, ema_decay=0.9999, ckpt_every=10 ** 9,
                             log_every=10 ** 9, precision=prec, compile=compile)
        with tempfile.TemporaryDirectory() as d:
            return _timed(lambda: finetune(net, data, cfg, Path(d), device=device))

    s1, s2 = p["ft_steps"]
    warm = run(s1)
    t1, t2 = run(s1), run(s2)
    return {"path": "finetune", "precision": prec, "compile": compile, "per_step_s": (t2 - t1) / (s2 - s1),
            "warmup_s": warm, "steps": [s1, s2], "batch": p["ft_batch"], "depth": p["ft_depth"]}


def render(meta: dict, recs: list[dict]) -> str:
    from bench.tables import markdown_table

    out = [f"# Per-step time of the suite's sampler and fine-tune loop ({meta['model']} shape, {meta['device']})", "",
           f"`{meta['command']}` at commit {meta['commit']}, torch {meta['torch']}. Random weights; per step = "
           "difference of two runs of S1 and S2 steps (each after a warm-up run), so setup cancels.", ""]
    for path, base_label in (("sample", "fp32 eager"), ("finetune", "fp32")):
        rows = [r for r in recs if r["path"] == path]
        if not rows:
            continue
        base = next((r["per_step_s"] for r in rows if r["precision"] == "fp32" and not r["compile"]), None)
        tf = next((r["per_step_s"] for r in rows if r["precision"] == "tf32" and not r["compile"]), None)
        what = (f"sampling {rows[0]['n']} samples, cfg 1.5 ({rows[0]['forward_batch']}-image forward), DDPM"
                if path == "sample" else f"fine-tune step, {rows[0]['depth']} blocks, batch {rows[0]['batch']}")
        out += [f"## {what}", ""]
        body = [[r["precision"] + (" + compile" if r["compile"] else " eager"), f"{1e3 * r['per_step_s']:.1f}",
                 f"{base / r['per_step_s']:.2f}x" if base else "", f"{tf / r['per_step_s']:.2f}x" if tf else "",
                 f"{r['warmup_s']:.1f}"] for r in rows]
        out += [markdown_table(["path", "ms / step", f"vs {base_label}", "vs tf32 eager", "warm-up run (s)"], body), ""]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny DiT on the CPU (tests)")
    ap.add_argument("--only", choices=["sample", "finetune"], default=None)
    args = ap.parse_args(argv)
    from bench.io import atomic_write_text
    from bench.metrics.cost import device_name
    from bench.results import git_info

    p = SMOKE if args.smoke else GPU
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; use --smoke on the CPU", file=sys.stderr)
        return 2
    out = Path(args.out)
    sha, dirty = git_info()
    meta = {"model": p["model"], "device": device_name(device), "torch": torch.__version__,
            "commit": sha + ("-dirty" if dirty else ""), "command": "python -m bench.gpu.paths_speed " + " ".join(argv or sys.argv[1:])}
    recs: list[dict] = []

    def save():
        atomic_write_text(out / "paths_speed.json", json.dumps({"meta": meta, "records": recs}, indent=1))
        atomic_write_text(out / "paths_speed.md", render(meta, recs))

    if args.only in (None, "sample"):
        net = _net(p, None, device)
        for prec, comp in SAMPLE_PATHS:
            if device == "cpu" and prec == "tf32":
                continue
            recs.append(sample_step_s(net, p, device, prec, comp))
            print(json.dumps(recs[-1]), flush=True)
            save()
        del net
    if args.only in (None, "finetune"):
        for prec, comp in FT_PATHS:
            if device == "cpu" and prec == "tf32":
                continue
            recs.append(finetune_step_s(p, device, prec, comp))
            print(json.dumps(recs[-1]), flush=True)
            save()
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
