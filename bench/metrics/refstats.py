"""Reference statistics: computed once per (dataset, split, resolution, protocol) and cached; an
ADM reference batch given by the user is used as is.

Cache file: <artifacts>/refstats/<dataset>-<split>-<res>px-<protocol>.npz, where <protocol> names
the backend and the extractor's weights (e.g. ``adm-fid-helper-7ff4a85c``: the sha8 of the weights
file). It is an ADM reference batch (openai/guided-diffusion evaluations/README.md):

  arr_0     uint8 N x H x W x 3   the reference images (the first 10,000; ADM keeps 10k for P/R)
  mu, sigma                       pool_3 mean / covariance over ALL reference images (float64)
  mu_s, sigma_s                   mixed_6/conv[..., :7] statistics (when the extractor has them)
plus keys ADM's evaluator ignores: ``pool`` (float32 features of the arr_0 images, for KID and
precision/recall), ``n`` (images behind mu/sigma) and ``meta`` (JSON: dataset, protocol, weights).
So ``python evaluator.py <this file> samples.npz`` also works with the official evaluator (its own
TF features will of course differ from ours).

A user npz (``eval.inception.ref_npz``) is never rewritten: its mu/sigma (and mu_s/sigma_s) are
used as given; features of its arr_0 images (for KID and P/R) are cached beside, in
<artifacts>/refstats/npz-<sha8 of the npz>-<protocol>.npz.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from bench.api import BenchError
from bench.io import atomic_savez, file_lock, read_state, slug
from bench.metrics.export import read_adm_npz, to_uint8
from bench.metrics.stats import FrechetRef, feature_stats

MAX_REF_IMAGES = 10_000  # ADM's reference batches keep 10k images for precision/recall


@dataclass
class Reference:
    """What the metrics need from the reference side."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int                                   # images behind mu/sigma (0: unknown, given by the user)
    label: str                               # metric_ref
    path: Path
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None
    feats: dict[str, torch.Tensor] = field(default_factory=dict)  # features of the stored images
    resolution: int | None = None
    _frechet: dict = field(default_factory=dict, repr=False)

    def frechet(self, which: str = "pool", device="cpu"):
        """FrechetRef for pool (mu, sigma) or spatial (mu_s, sigma_s); its sqrt is computed once."""
        key = (which, str(device))
        if key not in self._frechet:
            mu, sigma = (self.mu, self.sigma) if which == "pool" else (self.mu_s, self.sigma_s)
            self._frechet[key] = FrechetRef(mu, sigma, device)
        return self._frechet[key]


def ref_stats(dataset_name: str, resolution: int, protocol: str, images_fn: Callable[[], torch.Tensor],
              features_fn: Callable[[torch.Tensor], dict], artifacts_dir, split: str = "all",
              max_images: int = MAX_REF_IMAGES, meta: dict | None = None) -> Path:
    """The cached reference npz for (dataset, split, resolution, protocol); computed on first use.

    images_fn() -> the real images, float N,C,H,W in [-1, 1] or uint8 N,C,H,W (C = 1 or 3), the
    same format as the samples. features_fn(uint8 N,3,H,W) -> {"pool": ..., ["spatial": ...]}."""
    path = Path(artifacts_dir) / "refstats" / f"{slug(dataset_name)}-{slug(split)}-{resolution}px-{protocol}.npz"
    def cached() -> bool:  # a cache file cut short or corrupt is moved aside and computed again
        return read_state(path, lambda p: load_cached(p, ""), "reference statistics") is not None

    if cached():
        return path
    with file_lock(path.with_name(path.name + ".lock")):
        if cached():  # another worker finished it while we waited
            return path
        x = to_uint8(images_fn())
        if x.shape[-1] != resolution or x.shape[-2] != resolution:
            raise BenchError(f"reference images are {x.shape[-2]}x{x.shape[-1]} but the samples are "
                             f"{resolution}x{resolution}; pass reference images at the sample resolution")
        feats = features_fn(x)
        pool = feats["pool"].numpy()
        mu, sigma = feature_stats(pool)
        keep = min(max_images, x.shape[0])
        arrays = {"arr_0": x[:keep].permute(0, 2, 3, 1).contiguous().numpy(), "mu": mu, "sigma": sigma,
                  "pool": pool[:keep].astype(np.float32), "n": np.int64(x.shape[0])}
        if "spatial" in feats:
            arrays["mu_s"], arrays["sigma_s"] = feature_stats(feats["spatial"].numpy())
        info = {"dataset": dataset_name, "split": split, "resolution": resolution, "protocol": protocol,
                "n": int(x.shape[0]), **(meta or {})}
        arrays["meta"] = np.array(json.dumps(info, sort_keys=True))
        atomic_savez(path, **arrays)
    return path


def load_cached(path: Path, label: str) -> Reference:
    z = read_adm_npz(path)
    return Reference(mu=z["mu"], sigma=z["sigma"], n=int(z.get("n", 0)), label=label, path=Path(path),
                     mu_s=z.get("mu_s"), sigma_s=z.get("sigma_s"),
                     feats={"pool": torch.from_numpy(z["pool"])} if "pool" in z else {},
                     resolution=int(z["arr_0"].shape[1]) if "arr_0" in z else None)


def user_reference(npz_path, protocol: str, features_fn: Callable[[torch.Tensor], dict], artifacts_dir,
                   sha256: str) -> Reference:
    """An ADM reference batch given by the user, used as is: mu/sigma (mu_s/sigma_s) as stored;
    when it has no mu/sigma they are computed from its arr_0 images. Features of arr_0 (for KID
    and P/R) are computed once and cached beside, never written into the user's file."""
    npz_path = Path(npz_path)
    z = read_adm_npz(npz_path)
    feats: dict[str, torch.Tensor] = {}
    if "arr_0" in z:
        cache = Path(artifacts_dir) / "refstats" / f"npz-{sha256[:8]}-{protocol}.npz"
        with file_lock(cache.with_name(cache.name + ".lock")):
            if read_state(cache, lambda p: dict(np.load(p)), "reference features") is None:
                f = features_fn(torch.from_numpy(z["arr_0"]).permute(0, 3, 1, 2).contiguous())
                arrays = {k: v.numpy().astype(np.float32) for k, v in f.items() if k in ("pool", "spatial")}
                atomic_savez(cache, **arrays)
        with np.load(cache) as c:
            feats = {k: torch.from_numpy(c[k]) for k in c.files}
    if "mu" in z:
        mu, sigma, n_stats = z["mu"], z["sigma"], 0
    elif feats:
        (mu, sigma), n_stats = feature_stats(feats["pool"].numpy()), int(feats["pool"].shape[0])
    else:
        raise BenchError(f"{npz_path} has no mu/sigma and no arr_0 images")
    mu_s, sigma_s = z.get("mu_s"), z.get("sigma_s")
    if mu_s is None and "spatial" in feats:
        mu_s, sigma_s = feature_stats(feats["spatial"].numpy())
    label = f"npz:{npz_path.stem}@{sha256[:8]}" + (f"(arr_0 n={z['arr_0'].shape[0]})" if "arr_0" in z else "")
    return Reference(mu=mu, sigma=sigma, n=n_stats, label=label, path=npz_path, mu_s=mu_s, sigma_s=sigma_s,
                     feats={"pool": feats["pool"]} if "pool" in feats else {},
                     resolution=int(z["arr_0"].shape[1]) if "arr_0" in z else None)
