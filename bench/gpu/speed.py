"""Forward latency of a DiT-XL/2-shaped model, dense vs 50 % depth (14 of 28 blocks), on one GPU.

    python -m bench.gpu.speed --out reports/speed              # cuda, the default plan, ~5 min
    python -m bench.gpu.speed --out /tmp/speed --smoke         # tiny DiT on the CPU, seconds
    python -m bench.gpu.speed --out results/gpu/speed_dit_xl2_width --width 0.5 \
        --modes eager,compile --dtypes bf16 --batches 1,64,256    # 50 % width (heads + MLP channels)

Random weights (the adaLN-Zero modulations and the final layer, zero at init, get random values so
no gate is 0), random inputs, `bench.metrics.cost.benchmark_forward` for every (mode, dtype, batch)
of the plan: dense then pruned back to back, so each pair shares the machine's state. The pruned
model is made by bench.surgery from a block Plan (every other block; which blocks does not change
the cost). Output: speed.json (every record + the measured speedup of each pair against the
measured MAC ratio) and speed.md, rewritten after every measurement so a killed run leaves what it
measured.

Default GPU plan (mode, dtype: batches), sized from the H200 anchors of research/evaluation.md 3.4
to fit ~5 minutes with 10 warm-up + 20 timed calls:
  eager   fp32: 1, 16, 64       batch 256 skipped: ~1.4 s a forward -> ~1 min for a precision
                                nobody samples with (DiT's sample.py runs TF32)
  eager   tf32: 1, 16, 64, 256
  eager   bf16: 1, 16, 64, 256
  compile bf16: 256, 16, 1      each compile is ~0.5-1 min (dense + pruned: two per batch)
  compile tf32: 256
  compile fp32: skipped         (fp32 GEMMs dominate; compiling them changes little for two more
                                 compilations)
Eager runs first, then the compiled ones in the order above; a measurement that would start after
--budget-s is skipped (and listed as such), so the run stays inside one 10-minute job.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from bench.metrics.cost import benchmark_forward, count_macs, count_params, device_name, random_inputs, speedup
from bench.tables import markdown_table

GPU_PLAN = [("eager", "fp32", (1, 16, 64)), ("eager", "tf32", (1, 16, 64, 256)), ("eager", "bf16", (1, 16, 64, 256)),
            ("compile", "bf16", (256,)), ("compile", "tf32", (256,)), ("compile", "bf16", (16, 1))]
GPU_SKIPPED = ["eager fp32 batch 256: ~1.4 s a forward on an H200, ~1 min for dense + pruned",
               "compile fp32: fp32 GEMMs dominate; two more compilations for little change",
               "compile tf32 batches 1/16/64 and compile bf16 batch 64: compile time (~0.5-1 min each)"]
SMOKE = dict(model="DiT-T/2", input_size=8, in_channels=4, num_classes=10, keep_blocks=2,
             plan=[("eager", "fp32", (1, 4)), ("eager", "bf16", (1, 4))], warmup=2, reps=20)


def randomize_zero_init_(net: torch.nn.Module, std: float = 0.02, seed: int = 0) -> torch.nn.Module:
    """Random values for what adaLN-Zero initialises to zero (every block's and the final layer's
    modulation, the final linear), so gates are not 0 and the output depends on every block."""
    g = torch.Generator().manual_seed(seed)
    mods = [b.adaLN_modulation[-1] for b in net.blocks] + [net.final_layer.adaLN_modulation[-1], net.final_layer.linear]
    with torch.no_grad():
        for m in mods:
            for p in (m.weight, m.bias):
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return net


def build_dense(model: str, **model_kw):
    """The dense Denoiser on the CPU, seeded, with random weights where adaLN-Zero puts zeros."""
    from bench.models import build

    torch.manual_seed(0)
    dense = build(model, **model_kw)
    randomize_zero_init_(dense.net)
    return dense


def prune_copy(dense, keep_blocks: int | None = None, width: float | None = None):
    """A pruned copy of `dense` (unchanged). Depth: keep `keep_blocks` evenly spaced blocks.
    Width (`width` = kept fraction): every block keeps that fraction of its attention heads and MLP
    hidden channels (Torch-Pruning surgery through bench.surgery; which units does not change the
    cost), the residual stream, adaLN and embedders stay dense."""
    from bench import surgery
    from bench.api import Plan

    pruned = copy.deepcopy(dense)
    if width is not None:
        if not 0 < width <= 1:
            raise SystemExit("--width must be in (0, 1]")
        keep = {n: list(range(max(1, round(width * g.size)))) for n, g in dense.width_groups().items()}
        surgery.apply(pruned, Plan(granularity="width", keep=keep))
        return pruned
    depth = len(dense.net.blocks)
    if keep_blocks is None or not 1 <= keep_blocks <= depth:
        raise SystemExit(f"--keep-blocks must be in [1, {depth}]")
    keep = sorted({round(i * depth / keep_blocks) for i in range(keep_blocks)})
    surgery.apply(pruned, Plan(granularity="block", keep={"blocks": keep}))
    return pruned


def build_pair(model: str, keep_blocks: int, width: float | None = None, **model_kw):
    """(dense, pruned) Denoisers on the CPU (build_dense, prune_copy)."""
    dense = build_dense(model, **model_kw)
    return dense, prune_copy(dense, None if width is not None else keep_blocks, width)


def _md(res: dict) -> str:
    m = res["meta"]
    what = (f"dense ({m['dense_blocks']} blocks) vs pruned ({m['pruned_blocks']} blocks)" if not m.get("width") else
            f"dense ({m['dense_heads']} heads, MLP {m['dense_mlp_hidden']}) vs {m['width']:.0%} width "
            f"({m['pruned_heads']} heads, MLP {m['pruned_mlp_hidden']}, every block)")
    lines = [f"# Forward latency: {m['model']} {what}",
             "", f"device: {m['device']} · torch {m['torch']} · CUDA {m['cuda'] or '-'} · {m['warmup']} warm-up + median of "
             f"{m['reps']} timed calls · {'CUDA events' if m['device_type'] == 'cuda' else 'perf_counter'} · "
             "random weights and inputs · inference_mode", "",
             f"params: dense {m['dense_params_M']:.2f} M, pruned {m['pruned_params_M']:.2f} M · MACs per image-forward: "
             f"dense {m['dense_macs_G']:.4g} G, pruned {m['pruned_macs_G']:.4g} G (ratio {m['mac_ratio']:.3f})", "",
             markdown_table(
                 ["model", "mode", "dtype", "batch", "median ms", "IQR ms", "p10-p90 ms", "img/s", "TFLOP/s", "peak MiB",
                  "act. MiB", "first call s"],
                 [[r["model"], r["mode"], r["dtype"], str(r["batch"]), f"{r['median_ms']:.3f}", f"{r['iqr_ms']:.3f}",
                   f"{r['p10_ms']:.3f}-{r['p90_ms']:.3f}", f"{r['throughput_img_s']:.1f}", f"{r['tflop_s']:.3g}",
                   "" if r["peak_mem_MB"] is None else f"{r['peak_mem_MB']:.0f}",
                   "" if r["peak_mem_MB"] is None else f"{r['act_mem_MB']:.0f}", f"{r['first_call_s']:.1f}"]
                  for r in res["records"]], left=3)]
    lines += ["", "peak MiB: torch.cuda.max_memory_allocated during the timed calls (weights, inputs and "
              "activations; one model on the GPU at a time); act. MiB: peak minus what was allocated before them.",
              "", "Speedup = dense median / pruned median, same device, mode, dtype and batch; MAC speedup = "
              "dense MACs / pruned MACs (the ideal); efficiency = speedup / MAC speedup.", "",
              markdown_table(["mode", "dtype", "batch", "dense ms", "pruned ms", "speedup", "MAC speedup", "efficiency"],
                             [[s["mode"], s["dtype"], str(s["batch"]), f"{s['dense_ms']:.3f}", f"{s['pruned_ms']:.3f}",
                               f"{s['speedup']:.3f}", f"{s['mac_speedup']:.3f}", f"{s['efficiency']:.3f}"]
                              for s in res["speedups"]], left=2)]
    if res["skipped"]:
        lines += ["", "Not measured:", ""] + [f"- {s}" for s in res["skipped"]]
    return "\n".join(lines) + "\n"


def _write(out: Path, res: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("speed.json", json.dumps(res, indent=1)), ("speed.md", _md(res))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)


def _parse_ints(s: str) -> tuple[int, ...]:
    return tuple(int(v) for v in s.split(",") if v)


def run(out: Path, device: str, model: str, keep_blocks: int, plan: list, warmup: int, reps: int,
        budget_s: float, skipped: list[str], model_kw: dict, log=print, width: float | None = None) -> dict:
    t_start = time.perf_counter()
    dense, pruned = build_pair(model, keep_blocks, width, **model_kw)
    # one model on the device at a time: peak memory counts every allocation there
    nets = {"dense": dense.net.eval(), "pruned": pruned.net.eval()}
    x1 = random_inputs(dense, 1, "cpu")
    macs = {k: count_macs(n, *x1) for k, n in nets.items()}
    meta = {"model": model, "model_kw": model_kw, "device": device_name(device), "device_type": torch.device(device).type,
            "torch": torch.__version__, "cuda": torch.version.cuda if torch.device(device).type == "cuda" else None,
            "warmup": warmup, "reps": reps,
            "dense_blocks": len(dense.net.blocks), "pruned_blocks": len(pruned.net.blocks),
            "pruned_kept": pruned.kept_blocks, "width": width,
            "pruned_heads": pruned.net.blocks[0].attn.num_heads, "dense_heads": dense.net.blocks[0].attn.num_heads,
            "pruned_mlp_hidden": pruned.net.blocks[0].mlp.fc1.out_features,
            "dense_mlp_hidden": dense.net.blocks[0].mlp.fc1.out_features, "dense_params_M": count_params(nets["dense"]) / 1e6,
            "pruned_params_M": count_params(nets["pruned"]) / 1e6, "dense_macs_G": macs["dense"] / 1e9,
            "pruned_macs_G": macs["pruned"] / 1e9, "mac_ratio": macs["pruned"] / macs["dense"],
            "plan": [[m, d, list(b)] for m, d, b in plan], "budget_s": budget_s}
    res = {"meta": meta, "records": [], "speedups": [], "skipped": list(skipped), "errors": []}
    for mode, dtype, batches in plan:
        for batch in batches:
            tag = f"{mode} {dtype} batch {batch}"
            if time.perf_counter() - t_start > budget_s:
                res["skipped"].append(f"{tag}: time budget ({budget_s:.0f} s) spent")
                continue
            inputs = random_inputs(dense, batch, device, seed=batch)
            pair = {}
            for name, net in nets.items():
                try:
                    net.to(device)
                    r = benchmark_forward(net, inputs, device, mode, dtype, warmup=warmup, reps=reps)
                except Exception as e:  # one failing setting (OOM, compile error) must not lose the others
                    msg = f"{tag} {name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    res["errors"].append(msg)
                    log(f"[speed] {msg}")
                    break
                finally:
                    net.to("cpu")
                    if torch.device(device).type == "cuda":
                        torch.cuda.empty_cache()
                r.update(model=name, macs_G=macs[name] / 1e9,
                         tflop_s=2 * macs[name] * batch / (r["median_ms"] / 1e3) / 1e12)
                res["records"].append(r)
                pair[name] = r
                log(f"[speed] {tag} {name}: {r['median_ms']:.3f} ms (IQR {r['iqr_ms']:.3f}), "
                    f"{r['throughput_img_s']:.1f} img/s, first call {r['first_call_s']:.1f} s")
            if len(pair) == 2:
                sp = speedup(pair["dense"], pair["pruned"])
                res["speedups"].append({"mode": mode, "dtype": dtype, "batch": batch, "dense_ms": pair["dense"]["median_ms"],
                                        "pruned_ms": pair["pruned"]["median_ms"], "speedup": sp,
                                        "mac_speedup": 1 / meta["mac_ratio"], "efficiency": sp * meta["mac_ratio"]})
            meta["elapsed_s"] = time.perf_counter() - t_start
            _write(out, res)
    meta["elapsed_s"] = time.perf_counter() - t_start
    _write(out, res)
    return res


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="folder for speed.json and speed.md")
    p.add_argument("--smoke", action="store_true", help="tiny DiT on the CPU (a test of this script)")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    p.add_argument("--model", default="DiT-XL/2")
    p.add_argument("--keep-blocks", type=int, default=14, help="blocks of the pruned model (DiT-XL/2 has 28)")
    p.add_argument("--width", type=float, default=None,
                   help="prune width instead of depth: kept fraction of heads and MLP channels in every block")
    p.add_argument("--modes", default=None, help="comma list; with --dtypes/--batches replaces the plan by a grid")
    p.add_argument("--dtypes", default=None)
    p.add_argument("--batches", default=None)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--budget-s", type=float, default=300.0, help="start no measurement after this many seconds")
    a = p.parse_args(argv)

    model_kw = dict(input_size=32, in_channels=4, num_classes=1000)  # DiT-XL/2 at 256 px (32x32 latents)
    plan, skipped, model, keep, warmup, reps = GPU_PLAN, GPU_SKIPPED, a.model, a.keep_blocks, a.warmup, a.reps
    device = a.device or ("cpu" if a.smoke else "cuda")
    if a.smoke:
        s = SMOKE
        model_kw = dict(input_size=s["input_size"], in_channels=s["in_channels"], num_classes=s["num_classes"])
        plan, skipped, model, keep, warmup, reps = s["plan"], [], s["model"], s["keep_blocks"], s["warmup"], s["reps"]
    if a.modes or a.dtypes or a.batches:
        modes = a.modes.split(",") if a.modes else sorted({m for m, _, _ in plan})
        dtypes = a.dtypes.split(",") if a.dtypes else sorted({d for _, d, _ in plan})
        batches = _parse_ints(a.batches) if a.batches else tuple(sorted({b for _, _, bs in plan for b in bs}))
        plan, skipped = [(m, d, batches) for m in modes for d in dtypes], []
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device is visible; use --smoke (CPU) or --device cpu")
    if torch.device(device).type != "cuda":
        bad = [f"{m} tf32" for m, d, _ in plan if d == "tf32"]
        plan = [(m, d, b) for m, d, b in plan if d != "tf32"]
        skipped = skipped + [f"{b}: TF32 is a CUDA mode" for b in bad]
    threads = torch.get_num_threads()
    if a.smoke:  # a check of this script, not a measurement: don't compete for shared CPU cores
        torch.set_num_threads(1)
    try:
        return run(a.out, device, model, keep, plan, warmup, reps, a.budget_s, skipped, model_kw, width=a.width)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main(sys.argv[1:])
