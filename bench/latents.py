"""Build a latent cache: an ImageNet-layout folder -> SD-VAE latents x 0.18215, in resumable chunks.

    python -m bench.latents build --images /data/imagenet/train --vae sd-vae-ft-ema \\
        --out /data/imagenet256_latents [--size 256] [--chunk 1000] [--hflip-both] [--mode sample|mean]
    python -m bench.latents verify /data/imagenet256_latents     # re-hash the files against the manifest

The images are read as bench.data.ImageFolder reads them (classes sorted by name, ADM/DiT center
crop to --size, pixels in [-1, 1]) and encoded by the diffusers AutoencoderKL (bench.vae: an asset
name or a folder) as the official extractions do: ``vae.encode(x).latent_dist.sample().mul_(0.18215)``
(facebookresearch/DiT train.py per step; chuanyangjin/fast-DiT and VainF/TinyFusion
extract_features.py once); --mode mean stores the posterior mean instead. --hflip-both also stores the
encodings of the mirrored images (TinyFusion's extract_features.py: ``torch.cat([x, x.flip(3)])``),
which data.hflip then reads for a flipped sample. Samples are drawn from a CPU generator seeded per
chunk (--seed, chunk index), so a resumed build equals one run in one go.

Layout of --out (read by bench.data.LatentCache, data.kind=latents, data.path=<out>):
    chunks/build.json              the build's settings; a resume with other settings is refused
    chunks/chunk_00000.npz ...     --chunk images each (latents, labels[, latents_flip]), written
                                   atomically: a killed build resumes at the first missing chunk
    latents.npy, labels.npy        the assembled cache (float32 N,C,H,W / int64 N), memory-mapped when read
    latents_flip.npy               with --hflip-both
    manifest.json                  written last: settings, classes, each chunk's and file's sha256 and
                                   the cache's sha256 (over the files' sha256s); then chunks/ is removed
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.api import BenchError
from bench.io import atomic_savez, atomic_write, atomic_write_text, read_state, sha256_file

FORMAT = "bench.latents/1"
ARRAYS = ("latents", "labels", "latents_flip")


def _files_sha256(ds) -> str:
    """The image list's identity: relative paths and labels, in order."""
    h = hashlib.sha256()
    for f, label in ds.files:
        h.update(f"{f.relative_to(ds.root)}\t{label}\n".encode())
    return h.hexdigest()


def _folder_sha256(folder: Path) -> str:
    """The VAE's identity: its files' names and sha256s."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        h.update(f"{f.relative_to(folder)}\t{sha256_file(f)}\n".encode())
    return h.hexdigest()


def _chunk_name(k: int) -> str:
    return f"chunk_{k:05d}.npz"


def encode_chunk(vae, ds, lo: int, hi: int, *, batch: int, mode: str, scale: float, hflip_both: bool, seed: int,
                 k: int, workers: int, device) -> dict[str, np.ndarray]:
    """Images lo..hi-1 of `ds` encoded (and their mirrors with hflip_both), float32 latents x scale."""
    from torch.utils.data import DataLoader

    from bench.loader import CHUNKS, WholeBatches, derived_generator

    gen = derived_generator(seed, k, CHUNKS)  # one stream per chunk: a resume draws what one go would
    items = [(torch.arange(i, min(i + batch, hi)), None) for i in range(lo, hi, batch)]
    loader = DataLoader(WholeBatches(ds), sampler=items, batch_size=None, num_workers=workers)
    out: dict[str, list] = {"latents": [], "labels": [], "latents_flip": []}
    with torch.no_grad():
        for x, y in loader:
            x = x.to(device)
            n = len(x)
            if hflip_both:  # TinyFusion extract_features.py: both orientations through the encoder together
                x = torch.cat([x, x.flip(-1)])
            dist = vae.encode(x).latent_dist
            z = (dist.sample(generator=gen) if mode == "sample" else dist.mean).float().mul_(scale).cpu().numpy()
            out["latents"].append(z[:n])
            if hflip_both:
                out["latents_flip"].append(z[n:])
            out["labels"].append(y.numpy().astype(np.int64))
    arrays = {key: np.concatenate(v) for key, v in out.items() if v}
    if not all(np.isfinite(arrays[key]).all() for key in ("latents", "latents_flip") if key in arrays):
        raise BenchError(f"the VAE gave NaN or inf latents for images {lo}..{hi - 1} (chunk {k}); check the "
                         "VAE weights (--vae) and the images")
    return arrays


def _read_chunk(path: Path, rows: int, keys: tuple[str, ...]) -> Path:
    """A stored chunk that has its keys and rows (else read_state moves it aside and it is redone)."""
    with np.load(path) as z:
        if sorted(z.files) != sorted(keys) or any(len(z[key]) != rows for key in keys):
            raise ValueError(f"keys {sorted(z.files)}, rows {[len(z[key]) for key in z.files]}; want {rows} of {keys}")
    return path


def build(images: str, vae: str, out: str, size: int = 256, chunk: int = 1000, batch: int = 32,
          hflip_both: bool = False, mode: str = "sample", scale: float = 0.18215, seed: int = 0,
          device: str | None = None, workers: int = 4, verify: str | int = "all", keep_chunks: bool = False,
          log=print) -> dict:
    """Encode `images` into the cache folder `out` (see the module doc); returns its manifest.
    A finished cache (manifest.json) is left as it is; an unfinished one resumes."""
    from bench.data import ImageFolder, LatentCache
    from bench.vae import load_vae, vae_folder

    if mode not in ("sample", "mean"):
        raise BenchError(f"--mode {mode!r}: use sample (DiT, fast-DiT, TinyFusion) or mean")
    if chunk < 1 or batch < 1 or size < 8 or size % 8:
        raise BenchError(f"--chunk {chunk}, --batch {batch}, --size {size}: chunk and batch >= 1, size a multiple "
                         "of 8 (the SD-VAE downsamples by 8)")
    out_p = Path(os.path.expanduser(out))
    if (out_p / "manifest.json").is_file():
        log(f"{out_p} is a finished cache (manifest.json); nothing to do")
        if (out_p / "chunks").is_dir() and not keep_chunks:  # killed between the manifest and the clean-up
            shutil.rmtree(out_p / "chunks")
        return json.loads((out_p / "manifest.json").read_text())
    ds = ImageFolder(images, image_size=size, verify=verify)
    folder = vae_folder(vae)
    n, n_chunks = len(ds), (len(ds) + chunk - 1) // chunk
    settings = {"format": FORMAT, "images": str(ds.root.resolve()), "n": n, "files_sha256": _files_sha256(ds),
                "classes": ds.classes, "image_size": size, "vae": str(folder.resolve()),
                "vae_sha256": _folder_sha256(folder), "mode": mode, "scale": scale, "hflip_both": hflip_both,
                "seed": seed, "chunk": chunk, "batch": batch}
    chunks = out_p / "chunks"
    stored = read_state(chunks / "build.json", lambda p: json.loads(p.read_text()), "latent build settings")
    if stored is not None and stored != settings:
        diff = next(k for k in settings if stored.get(k) != settings[k])
        raise BenchError(f"{out_p} holds an unfinished build with {diff}={stored.get(diff)!r}, not {settings[diff]!r}; "
                         "rerun with its settings to resume it, or use another --out (or delete it)")
    atomic_write_text(chunks / "build.json", json.dumps(settings, indent=1))

    keys = ("latents", "labels", "latents_flip") if hflip_both else ("latents", "labels")
    todo = [k for k in range(n_chunks)
            if read_state(chunks / _chunk_name(k), lambda p, k=k: _read_chunk(p, min(chunk, n - k * chunk), keys),
                          "latent chunk") is None]
    if todo:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = load_vae(str(folder), device)
        log(f"encoding {n} images in {n_chunks} chunks of {chunk}: {len(todo)} to do (first {todo[0]}), on {device}")
        for k in todo:
            t0 = time.time()
            lo, hi = k * chunk, min(n, (k + 1) * chunk)
            arrays = encode_chunk(model, ds, lo, hi, batch=batch, mode=mode, scale=scale, hflip_both=hflip_both,
                                  seed=seed, k=k, workers=workers, device=device)
            atomic_savez(chunks / _chunk_name(k), **arrays)
            log(f"chunk {k + 1}/{n_chunks}: images {lo}..{hi - 1} in {time.time() - t0:.1f} s")
    manifest = _assemble(out_p, settings, n_chunks, keys)
    LatentCache(str(out_p), num_classes=max(1, len(ds.classes)))  # reads back as the runs will read it
    if not keep_chunks:
        shutil.rmtree(chunks)
    log(f"latent cache {out_p}: {n} x {tuple(manifest['shape'])}, sha256 {manifest['sha256']}")
    return manifest


def _assemble(out: Path, settings: dict, n_chunks: int, keys: tuple[str, ...]) -> dict:
    """The chunks concatenated into one .npy per array (written through a memory map: constant
    memory), then the manifest, last."""
    chunks = [out / "chunks" / _chunk_name(k) for k in range(n_chunks)]
    with np.load(chunks[0]) as z:
        shape, dtype = tuple(z["latents"].shape[1:]), {key: z[key].dtype for key in keys}
    for key in keys:
        def write(tmp, key=key):
            rows = (settings["n"], *shape) if key != "labels" else (settings["n"],)
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype[key], shape=rows)
            at = 0
            for c in chunks:
                with np.load(c) as z:
                    part = z[key]
                arr[at: at + len(part)] = part
                at += len(part)
            arr.flush()
            del arr
        atomic_write(out / f"{key}.npy", write)
    files = {f"{key}.npy": sha256_file(out / f"{key}.npy") for key in keys}
    manifest = {**settings, "shape": list(shape), "dtype": str(dtype["latents"]), "finite": True,
                "chunks": [{"file": c.name, "start": k * settings["chunk"],
                            "stop": min(settings["n"], (k + 1) * settings["chunk"]), "sha256": sha256_file(c)}
                           for k, c in enumerate(chunks)],
                "files": files,
                "sha256": hashlib.sha256("".join(f"{k}\t{v}\n" for k, v in sorted(files.items())).encode()).hexdigest(),
                "versions": _versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1))
    return manifest


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "diffusers", "numpy", "pillow"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def verify(out: str) -> dict:
    """Re-hash the cache's files against its manifest; raises BenchError naming a file that differs."""
    p = Path(os.path.expanduser(out))
    if not (p / "manifest.json").is_file():
        raise BenchError(f"{p} has no manifest.json: not a finished cache of bench.latents build")
    manifest = json.loads((p / "manifest.json").read_text())
    for name, want in manifest["files"].items():
        if not (p / name).is_file() or sha256_file(p / name) != want:
            raise BenchError(f"{p / name} is missing or differs from the sha256 its manifest records; "
                             "rebuild the cache")
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.latents", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="encode an ImageNet-layout folder into a latent cache (resumable)")
    b.add_argument("--images", required=True, help="root/<class>/<image> folder (ImageNet train/)")
    b.add_argument("--vae", required=True,
                   help="diffusers AutoencoderKL folder or asset (sd-vae-ft-ema, sd-vae-ft-mse)")
    b.add_argument("--out", required=True, help="the cache folder (data.path of data=imagenet_latents)")
    b.add_argument("--size", type=int, default=256, help="image resolution (DiT: 256 -> 32x32 latents)")
    b.add_argument("--chunk", type=int, default=1000, help="images per resumable chunk")
    b.add_argument("--batch", type=int, default=32, help="images per encoder call")
    b.add_argument("--hflip-both", action="store_true", help="also store the mirrored images' encodings (TinyFusion)")
    b.add_argument("--mode", choices=("sample", "mean"), default="sample",
                   help="latent_dist.sample() (DiT, fast-DiT, TinyFusion) or its mean")
    b.add_argument("--scale", type=float, default=0.18215, help="the SD-VAE latent scale")
    b.add_argument("--seed", type=int, default=0, help="posterior samples, seeded per chunk")
    b.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    b.add_argument("--workers", type=int, default=4, help="image decoding processes (fast-DiT --num-workers 4)")
    b.add_argument("--verify", default="all", help="image check up front: all | none | N (bench.data.ImageFolder)")
    b.add_argument("--keep-chunks", action="store_true", help="keep chunks/ after the cache is assembled")
    v = sub.add_parser("verify", help="re-hash a cache's files against its manifest")
    v.add_argument("out")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "build":
            build(a.images, a.vae, a.out, size=a.size, chunk=a.chunk, batch=a.batch, hflip_both=a.hflip_both,
                  mode=a.mode, scale=a.scale, seed=a.seed, device=a.device, workers=a.workers,
                  verify=a.verify, keep_chunks=a.keep_chunks)
        else:
            m = verify(a.out)
            print(f"{a.out}: {len(m['files'])} files match the manifest (sha256 {m['sha256']})")
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
