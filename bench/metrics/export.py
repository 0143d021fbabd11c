"""Samples as files the official evaluators read: the ADM npz layout and a PNG folder.

    export_npz(samples, "samples.npz")        -> arr_0: uint8 N x H x W x 3 (DiT sample_ddp.py)
    export_png_folder(samples, "samples/")    -> 000000.png, 000001.png, ...

so ``python evaluator.py VIRTUAL_imagenet256_labeled.npz samples.npz`` (openai/guided-diffusion),
torch-fidelity (``fidelity --gpu 0 --fid --input1 samples/ --input2 ...``) and clean-fid
(``fid.compute_fid("samples/", ...)``) can score our samples too.

Float samples in [-1, 1] become uint8 exactly as DiT's sample_ddp.py does it:
``clamp(127.5 * x + 128, 0, 255).to(uint8)`` (truncation, not rounding). One-channel images are
repeated to RGB, because the Inception networks (and ADM's evaluator) take 3 channels.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from bench.api import BenchError
from bench.io import atomic_savez


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float N,C,H,W in [-1, 1] -> uint8 N,3,H,W (DiT's truncating conversion; C=1 repeated to 3).
    uint8 input is passed through (grey repeated)."""
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise BenchError(f"images must be N x C x H x W with C = 1 or 3, got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        if not torch.isfinite(x).all():
            raise BenchError("samples contain NaN or inf; the model diverged (check the fine-tune loss)")
        x = torch.clamp(127.5 * x.float() + 128.0, 0, 255).to(torch.uint8)
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x.contiguous()


def to_nhwc_uint8(samples) -> np.ndarray:
    """float N,C,H,W in [-1, 1], uint8 N,C,H,W, or uint8 N,H,W,3 (numpy or torch) -> uint8 N,H,W,3."""
    if isinstance(samples, np.ndarray):
        if samples.dtype == np.uint8 and samples.ndim == 4 and samples.shape[-1] == 3:
            return np.ascontiguousarray(samples)
        samples = torch.from_numpy(samples)
    return to_uint8(samples).permute(0, 2, 3, 1).contiguous().numpy()


def export_npz(samples, path) -> Path:
    """Write samples in the ADM reference-batch layout (``arr_0``: uint8 N,H,W,3), atomically."""
    arr = to_nhwc_uint8(samples)
    return atomic_savez(path, arr_0=arr)


def export_png_folder(samples, folder) -> Path:
    """Write samples as 000000.png, 000001.png, ... (RGB, 8-bit), like DiT's sample folder."""
    from PIL import Image

    arr = to_nhwc_uint8(samples)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(arr):
        Image.fromarray(a).save(folder / f"{i:06d}.png")
    return folder


def read_adm_npz(path) -> dict:
    """An ADM-layout npz as a dict: arr_0 (uint8 N,H,W,3) if present, and mu/sigma, mu_s/sigma_s
    if present (float64). Unknown keys are kept as they are."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise BenchError(f"{path} is not a readable npz ({e}); pass an ADM reference batch "
                         "(arr_0 images and/or mu, sigma, mu_s, sigma_s)") from None
    for k in ("mu", "sigma", "mu_s", "sigma_s"):
        if k in out:
            out[k] = out[k].astype(np.float64)
    if "arr_0" in out:
        a = out["arr_0"]
        if a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] != 3:
            raise BenchError(f"{path}: arr_0 must be uint8 N x H x W x 3 (ADM layout), got {a.dtype} {a.shape}")
    if "mu" not in out and "arr_0" not in out:
        raise BenchError(f"{path} has neither mu/sigma nor arr_0 images; keys: {sorted(out)}")
    return out


def main(argv=None) -> int:
    """python -m bench.metrics.export RUN [--npz FILE] [--png DIR]

    RUN is a run directory under results/runs (its sample shards live at the same relative path
    under the artifacts folder) or a shard folder written by bench.run (bench.shards)."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m bench.metrics.export", description=main.__doc__.splitlines()[0])
    ap.add_argument("run", help="results/runs/... run directory, or a sample shard folder")
    ap.add_argument("--artifacts", default=os.environ.get("BENCH_ARTIFACTS", "artifacts"))
    ap.add_argument("--results", default="results/runs")
    ap.add_argument("--npz", help="write the ADM npz (arr_0 uint8 NHWC) here")
    ap.add_argument("--png", help="write a PNG folder here")
    a = ap.parse_args(argv)
    from bench.shards import SampleShards

    src = Path(a.run)
    if not (src / "manifest.json").exists():
        try:
            rel = src.resolve().relative_to(Path(a.results).resolve())
        except ValueError:
            print(f"error: {src} is neither a shard folder nor under {a.results}; pass --results or the shard folder",
                  file=sys.stderr)
            return 2
        src = Path(a.artifacts) / "runs" / rel / "samples"
    try:
        samples = SampleShards.open(src).load_all()[0]
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not (a.npz or a.png):
        a.npz = str(src / "samples.npz")
    if a.npz:
        print(export_npz(samples, a.npz))
    if a.png:
        print(export_png_folder(samples, a.png))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
