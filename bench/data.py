"""Datasets, latent caches and calibration probes with fixed ids and seeds.

Every dataset yields (x, y) with x a float tensor in [-1, 1] (pixels) or a latent, and y an int
class label. Access is by index (``get(idx) -> (x, y)`` for a batch of indices), so the fine-tune
loop draws batches from a seeded generator and resumes exactly after a kill.

  digits        the embedded default: scikit-learn's bundled 8x8 handwritten digits (1,797 images,
                10 classes), no download. Fixed train/test split by seed.
  image_folder  ImageNet-style class sub-folders (train/n01440764/*.JPEG ...), ADM/DiT center crop.
  latents       a latent cache (.npz or .safetensors with `latents` N,C,H,W and `labels` N), as made by
                fast-DiT-style feature extraction; already scaled by the VAE factor.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.api import BenchError

IMG_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


class Dataset:
    """Random-access dataset: `len`, `num_classes`, `shape` (C, H, W) and `get(idx)`."""

    name: str = "dataset"
    num_classes: int
    shape: tuple[int, int, int]

    def __len__(self) -> int:
        raise NotImplementedError

    def get(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def all(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.get(torch.arange(len(self)))


class TensorDataset(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor, num_classes: int, name: str):
        self.x, self.y, self.num_classes, self.name = x, y.long(), num_classes, name
        self.shape = tuple(x.shape[1:])

    def __len__(self):
        return self.x.shape[0]

    def get(self, idx):
        return self.x[idx], self.y[idx]


def digits(split: str = "train", test_fraction: float = 0.2, split_seed: int = 0, size: int = 8) -> TensorDataset:
    """scikit-learn's digits (UCI optdigits test set), 8x8 grey levels 0..16 scaled to [-1, 1].
    The split is stratified by class with a fixed seed, so every run sees the same images."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0 * 2.0 - 1.0).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    if size != 8:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    g = np.random.default_rng(split_seed)
    test = np.zeros(len(y), dtype=bool)
    for c in range(10):  # stratified hold-out
        ids = np.flatnonzero(d.target == c)
        test[g.choice(ids, size=int(round(test_fraction * len(ids))), replace=False)] = True
    mask = {"train": ~test, "test": test, "all": np.ones_like(test)}[split]
    ids = torch.from_numpy(np.flatnonzero(mask))
    return TensorDataset(x[ids], y[ids], 10, f"digits-{split}")


def center_crop_arr(img, image_size: int):
    """ADM/DiT preprocessing: BOX-downsample by 2 while large, BICUBIC resize, then center crop."""
    from PIL import Image

    while min(*img.size) >= 2 * image_size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = image_size / min(*img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    arr = np.array(img)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top: top + image_size, left: left + image_size]


class ImageFolder(Dataset):
    """root/<class_name>/<image>, classes sorted by name (torchvision ImageFolder's order)."""

    def __init__(self, root: str, image_size: int = 256, name: str | None = None):
        root_p = Path(os.path.expanduser(root))
        if not root_p.is_dir():
            raise BenchError(f"data folder not found: {root_p}; pass data.root=/path/to/train (class sub-folders)")
        classes = sorted(p.name for p in root_p.iterdir() if p.is_dir())
        files = [(f, ci) for ci, c in enumerate(classes) for f in sorted((root_p / c).rglob("*"))
                 if f.suffix.lower() in IMG_EXTS]
        if not files:
            raise BenchError(f"no images under {root_p}: expected class sub-folders of {sorted(IMG_EXTS)} files")
        self.files, self.classes, self.image_size = files, classes, image_size
        self.num_classes = len(classes)
        self.shape = (3, image_size, image_size)
        self.name = name or root_p.name

    def __len__(self):
        return len(self.files)

    def _load(self, i: int) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError

        path = self.files[i][0]
        try:
            with Image.open(path) as im:
                arr = center_crop_arr(im.convert("RGB"), self.image_size)
        except (UnidentifiedImageError, OSError) as e:
            raise BenchError(f"corrupt image {path}: {e}; remove or replace it") from None
        return torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1.0

    def get(self, idx):
        idx = idx.tolist()
        return torch.stack([self._load(i) for i in idx]), torch.tensor([self.files[i][1] for i in idx])


class LatentCache(TensorDataset):
    """Pre-extracted VAE latents: an .npz or .safetensors file with `latents` and `labels`."""

    def __init__(self, path: str, num_classes: int = 1000, name: str | None = None):
        p = Path(os.path.expanduser(path))
        if not p.is_file():
            raise BenchError(f"latent cache not found: {p}; extract latents first or pass data.path=...")
        try:
            if p.suffix == ".safetensors":
                from safetensors.torch import load_file
                d = load_file(str(p))
                x, y = d["latents"], d["labels"]
            else:
                with np.load(p) as d:
                    x, y = torch.from_numpy(d["latents"]), torch.from_numpy(d["labels"])
        except KeyError as e:
            raise BenchError(f"latent cache {p} lacks key {e}; it needs 'latents' (N,C,H,W) and 'labels' (N,)") from None
        except Exception as e:  # zip/header errors from numpy or safetensors
            raise BenchError(f"latent cache {p} is unreadable ({type(e).__name__}: {e}); re-extract it") from None
        if x.ndim != 4 or y.ndim != 1 or len(x) != len(y) or len(x) == 0:
            raise BenchError(f"latent cache {p}: latents {tuple(x.shape)} / labels {tuple(y.shape)} do not match (N,C,H,W)/(N,)")
        super().__init__(x.float(), y.long(), num_classes, name or p.stem)


def build_dataset(kind: str = "digits", **kw) -> Dataset:
    if kind == "digits":
        return digits(**kw)
    if kind == "image_folder":
        return ImageFolder(**kw)
    if kind == "latents":
        return LatentCache(**kw)
    if kind == "torchvision":
        return torchvision_dataset(**kw)
    if kind == "cifar":
        return cifar_batches(**kw)
    raise BenchError(f"unknown data.kind={kind!r}; use digits, image_folder, latents, cifar or torchvision")


def cifar_batches(root: str, split: str = "train", image_size: int = 32, dataset: str = "CIFAR10") -> TensorDataset:
    """CIFAR-10 / CIFAR-100 in the official "python version" layout (cifar-10-batches-py/data_batch_1..5
    + test_batch, or cifar-100-python/train + test: pickled dicts with b"data" [N, 3072] uint8 in
    CHW order and b"labels" / b"fine_labels"), read directly: no download and no md5 gate, so a
    user's copy and a test's small file load the same way. Pixels in [-1, 1]."""
    import pickle

    import numpy as np

    base = Path(os.path.expanduser(root))
    sub = {"CIFAR10": "cifar-10-batches-py", "CIFAR100": "cifar-100-python"}.get(dataset)
    if sub is None:
        raise BenchError(f"data.dataset={dataset!r}: cifar reads CIFAR10 or CIFAR100")
    folder = base / sub if (base / sub).is_dir() else base
    if dataset == "CIFAR10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    else:
        files = ["train"] if split == "train" else ["test"]
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise BenchError(f"{dataset} {split} files {missing} not found in {folder}; unpack the official "
                         f"python-version archive there (set CIFAR10_DIR / data.root)")
    xs, ys = [], []
    for f in files:
        try:
            with open(folder / f, "rb") as fh:
                d = pickle.load(fh, encoding="bytes")
            data = np.asarray(d[b"data"], dtype=np.uint8)
            labels = d.get(b"labels", d.get(b"fine_labels"))
            if data.ndim != 2 or data.shape[1] != 3072 or labels is None or len(labels) != len(data):
                raise ValueError(f"data {data.shape}, labels {None if labels is None else len(labels)}")
        except Exception as e:  # truncated, not a pickle, wrong keys
            raise BenchError(f"{folder / f} is not an official CIFAR batch ({type(e).__name__}: {e}); "
                             "re-extract the archive") from None
        xs.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        ys.extend(int(v) for v in labels)
    x = torch.cat(xs).float() / 127.5 - 1.0
    if image_size != 32:
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True,
                                            align_corners=False)
    y = torch.tensor(ys)
    return TensorDataset(x, y, 10 if dataset == "CIFAR10" else 100, f"{dataset.lower()}-{split}")


def torchvision_dataset(dataset: str, root: str, split: str = "train", image_size: int = 32) -> TensorDataset:
    """A torchvision set already on disk (download=False: nothing is fetched inside a run).
    `dataset` is the torchvision class name (CIFAR10, Flowers102, ...)."""
    import torchvision

    name = dataset
    cls = getattr(torchvision.datasets, name, None)
    if cls is None:
        raise BenchError(f"torchvision has no dataset {name!r}")
    kwargs = {"train": split == "train"} if name in ("CIFAR10", "CIFAR100", "MNIST", "FashionMNIST") else {"split": split}
    try:
        ds = cls(root=os.path.expanduser(root), download=False, **kwargs)
    except RuntimeError as e:
        raise BenchError(f"{name} not found under {root} ({e}); place the official files there") from None
    xs, ys = [], []
    for img, lab in ds:
        arr = center_crop_arr(img.convert("RGB"), image_size)
        xs.append(torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1.0)
        ys.append(int(lab))
    return TensorDataset(torch.stack(xs), torch.tensor(ys), len(set(ys)), f"{name.lower()}-{split}")


# --------------------------------------------------------------------------------------------
# Calibration probes: the same (x0, y, noise, u) for every method
# --------------------------------------------------------------------------------------------

@dataclass
class Calib:
    """Fixed probes. u in [0, 1] is the shared noise level (0 clean, 1 noise), stratified in
    `bins` equal bins so every noise range is represented; `ids` are dataset indices."""

    x0: torch.Tensor
    y: torch.Tensor
    noise: torch.Tensor
    u: torch.Tensor
    ids: torch.Tensor
    bins: int

    def __len__(self):
        return self.x0.shape[0]

    def batches(self, batch_size: int):
        for i in range(0, len(self), batch_size):
            s = slice(i, i + batch_size)
            yield self.x0[s], self.y[s], self.noise[s], self.u[s]

    def to(self, device):
        return Calib(self.x0.to(device), self.y.to(device), self.noise.to(device), self.u.to(device), self.ids, self.bins)

    def bin_of(self) -> torch.Tensor:
        return (self.u * self.bins).long().clamp(max=self.bins - 1)


def calibration(dataset: Dataset, n: int = 256, seed: int = 0, bins: int = 8) -> Calib:
    if len(dataset) == 0:
        raise BenchError("calibration dataset is empty")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(len(dataset), generator=g)[:n]
    if len(ids) < n:  # small sets: cycle through the permutation
        ids = ids.repeat((n + len(ids) - 1) // len(ids))[:n]
    x0, y = dataset.get(ids)
    noise = torch.randn(x0.shape, generator=g)
    b = torch.arange(n) % bins  # stratified noise levels: bin k covers [k/bins, (k+1)/bins)
    u = (b.float() + torch.rand(n, generator=g)) / bins
    return Calib(x0.float(), y, noise, u, ids, bins)
