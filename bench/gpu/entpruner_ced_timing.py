"""Seconds to score every block of a DiT-XL/2-shaped model with EntPruner's CED, on one GPU.

    python -m bench.gpu.entpruner_ced_timing --out results/gpu            # cuda, DiT-XL/2, ~3 min
    python -m bench.gpu.entpruner_ced_timing --out /tmp/ced --smoke       # tiny DiT on the CPU, seconds

Model: DiT-XL/2 (28 blocks, hidden 1152, 32x32x4 latents, 1000 classes), random weights; the
adaLN-Zero modulations and the final layer (zero at init, which would make every block the identity
and the output 0) get N(0, 0.02^2) values. Probes: `--probes` (256) random latents x0 ~ N(0, I),
labels cycling through `--classes` (8) classes (32 probes a class, so the per-class entropy is
defined; ImageNet's 1000 classes would need >= 2000 probes), fixed noise, noise levels stratified
in 8 bins, exactly the shape of bench.data.Calib.
Scoring: one CED scoring = (depth + 1) x ceil(probes / batch) forwards (the full model, then each
block bypassed) + the entropy estimates (per class and per bin, Gaussian + Ledoit-Wolf + PCA in
float64: the `entpruner_oneshot` config's defaults). The method is built from that config by hydra
(bench never imports methods/), with dtype and batch_size overridden. Each dtype: one warm-up
scoring, then `--reps` timed ones (wall clock, CUDA synchronised); median reported.
dtypes: fp32 (TF32 off), tf32 (TF32 matmuls), bf16 (autocast).
Writes entpruner_ced_timing.json and entpruner_ced_timing.md to --out (rewritten after each dtype).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.tables import markdown_table

GPU = dict(model="DiT-XL/2", input_size=32, in_channels=4, num_classes=1000, probes=256, batch=64, classes=8,
           bins=8, dtypes=("bf16", "tf32", "fp32"), reps=2, device="cuda")
SMOKE = dict(model="DiT-T/2", input_size=8, in_channels=4, num_classes=10, probes=32, batch=16, classes=4,
             bins=4, dtypes=("fp32",), reps=1, device="cpu")


def build_model(cfg: dict, seed: int = 0):
    from bench.models import build

    torch.manual_seed(seed)
    net = build(cfg["model"], input_size=cfg["input_size"], in_channels=cfg["in_channels"],
                num_classes=cfg["num_classes"], learn_sigma=True)
    g = torch.Generator().manual_seed(seed)
    mods = [b.adaLN_modulation[-1] for b in net.net.blocks]
    mods += [net.net.final_layer.adaLN_modulation[-1], net.net.final_layer.linear]
    with torch.no_grad():  # adaLN-Zero leaves these 0: every block would be the identity
        for m in mods:
            for p in (m.weight, m.bias):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    net.net.to(cfg["device"]).eval()
    return net


def probes(cfg: dict, seed: int = 0):
    from bench.data import Calib

    n, g = cfg["probes"], torch.Generator().manual_seed(seed)
    shape = (n, cfg["in_channels"], cfg["input_size"], cfg["input_size"])
    x0 = torch.randn(shape, generator=g)
    noise = torch.randn(shape, generator=g)
    b = torch.arange(n) % cfg["bins"]
    u = (b.float() + torch.rand(n, generator=g)) / cfg["bins"]
    y = (torch.arange(n) // cfg["bins"]) % cfg["classes"]  # every class sees every bin
    return Calib(x0, y, noise, u, torch.arange(n), cfg["bins"]).to(cfg["device"])


def method(dtype: str, batch: int):
    from bench import registry

    return registry.build("entpruner_oneshot", {"dtype": "fp32" if dtype == "tf32" else dtype, "batch_size": batch})


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def write(out: Path, result: dict):
    out.mkdir(parents=True, exist_ok=True)
    (out / "entpruner_ced_timing.json").write_text(json.dumps(result, indent=1))
    c = result["config"]
    lines = [f"# EntPruner CED scoring time: {c['model']} ({result['blocks']} blocks, random weights)", "",
             f"device: {result['device']}; torch {result['torch']}; {c['probes']} probes "
             f"({c['in_channels']}x{c['input_size']}x{c['input_size']}, {c['classes']} classes x "
             f"{c['probes'] // c['classes']}, {c['bins']} noise bins), batch {c['batch']}; one scoring = "
             f"{result['forwards']} forwards + entropies (Gaussian, Ledoit-Wolf, PCA, float64); "
             f"median of {c['reps']} after 1 warm-up.", "",
             markdown_table(["dtype", f"seconds (all {result['blocks']} blocks)", "ms / forward (incl. entropies)",
                             "peak GPU mem GiB"],
                            [[r["dtype"], f"{r['seconds']:.2f}", f"{1e3 * r['seconds'] / result['forwards']:.1f}",
                              str(r["peak_mem_gib"]) if r["peak_mem_gib"] is not None else "-"]
                             for r in result["runs"]], left=1)]
    (out / "entpruner_ced_timing.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for entpruner_ced_timing.{json,md}")
    ap.add_argument("--smoke", action="store_true", help="tiny DiT on the CPU (tests)")
    ap.add_argument("--probes", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--reps", type=int)
    ap.add_argument("--dtypes", help="comma-separated subset of fp32,tf32,bf16")
    a = ap.parse_args(argv)
    cfg = dict(SMOKE if a.smoke else GPU)
    for k in ("probes", "batch", "reps"):
        if getattr(a, k):
            cfg[k] = getattr(a, k)
    if a.dtypes:
        cfg["dtypes"] = tuple(a.dtypes.split(","))
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device is visible; run with --smoke on the CPU")
    net = build_model(cfg)
    calib = probes(cfg)
    depth = len(net.net.blocks)
    dev_name = torch.cuda.get_device_name() if cfg["device"] == "cuda" else f"cpu-{platform.machine()}-{torch.get_num_threads()}t"
    result = {"device": dev_name, "torch": torch.__version__, "config": {**cfg, "dtypes": list(cfg["dtypes"])},
              "blocks": depth, "params_M": sum(p.numel() for p in net.net.parameters()) / 1e6,
              "forwards": (depth + 1) * -(-cfg["probes"] // cfg["batch"]), "runs": []}
    for dtype in cfg["dtypes"]:
        m = method(dtype, cfg["batch"])
        if cfg["device"] == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
            torch.backends.cudnn.allow_tf32 = dtype == "tf32"
            torch.cuda.reset_peak_memory_stats()
        r = m.ced(net, calib)  # warm-up (kernels, allocator)
        times = []
        for _ in range(cfg["reps"]):
            sync(cfg["device"])
            t0 = time.perf_counter()
            r = m.ced(net, calib)
            sync(cfg["device"])
            times.append(time.perf_counter() - t0)
        peak = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if cfg["device"] == "cuda" else None
        result["runs"].append({"dtype": dtype, "seconds": statistics.median(times), "all_seconds": times,
                               "peak_mem_gib": peak, "ced": r["ced"], "entropy_full": r["H"], "groups": r["groups"]})
        write(Path(a.out), result)
        print(f"[ced-timing] {cfg['model']} {dtype}: {statistics.median(times):.2f} s for {depth} blocks", flush=True)
    return result


if __name__ == "__main__":
    main()
