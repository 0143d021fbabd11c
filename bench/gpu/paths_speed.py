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
The timing helpers are bench.steptime's (shared with bench.cost); paths_speed.json is a timings file
for `python -m bench.cost --timings` (records carry MACs per image and per step).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


GPU = dict(model="DiT-XL/2", input_size=32, in_channels=4, num_classes=1000, sample_n=256, sample_steps=(3, 9),
           ft_depth=14, ft_batch=64, ft_steps=(4, 14))
SMOKE = dict(model="DiT-T/2", input_size=8, in_channels=4, num_classes=10, sample_n=8, sample_steps=(2, 4),
             ft_depth=2, ft_batch=4, ft_steps=(2, 4))
SAMPLE_PATHS = [("fp32", False), ("tf32", False), ("bf16", False), ("bf16", True)]
FT_PATHS = [("fp32", False), ("tf32", False), ("bf16", False)]


def _net(p: dict, depth: int | None, device: str):
    from bench.steptime import random_model

    return random_model({"name": p["model"], "input_size": p["input_size"], "in_channels": p["in_channels"],
                         "num_classes": p["num_classes"], **({"depth": depth} if depth else {})}, device)


def sample_step_s(net, p: dict, device: str, prec: str, compile: bool) -> dict:
    from bench import steptime

    return steptime.sample_step_s(net, p["sample_n"], device, prec, compile, p["sample_steps"], "ddpm", 1.5)


def finetune_step_s(p: dict, device: str, prec: str, compile: bool) -> dict:
    from bench import steptime

    return steptime.finetune_step_s(_net(p, p["ft_depth"], device), p["ft_batch"], device, prec, compile, p["ft_steps"])


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
        what = (f"sampling {rows[0]['batch']} samples, cfg 1.5 ({rows[0]['forward_batch']}-image forward), DDPM"
                if path == "sample" else f"fine-tune step, {rows[0]['depth']} blocks, batch {rows[0]['batch']}")
        out += [f"## {what}", ""]
        body = [[r["precision"] + (" + compile" if r["compile"] else " eager"), f"{1e3 * r['per_step_s']:.1f}",
                 f"{base / r['per_step_s']:.2f}x" if base else "", f"{tf / r['per_step_s']:.2f}x" if tf else "",
                 f"{r['warmup_s']:.1f}"] for r in rows]
        out += [markdown_table(["path", "ms / step", f"vs {base_label}", "vs tf32 eager", "warm-up run (s)"], body), ""]
    return "\n".join(out)


def main(argv=None) -> int:
    from bench.gpu import script
    from bench.io import atomic_write_text

    args, device, meta = script(__doc__, "bench.gpu.paths_speed", argv,
                                lambda ap: ap.add_argument("--only", choices=["sample", "finetune"], default=None))
    if device is None:
        return 2
    p = SMOKE if args.smoke else GPU
    out = Path(args.out)
    meta = {"model": p["model"], **meta}
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
