"""Datasets, latent caches and calibration probes with fixed ids and seeds.

Every dataset yields (x, y) with x a float tensor in [-1, 1] (pixels) or a latent, and y an int
class label. Access is by index (``get(idx) -> (x, y)`` for a batch of indices), so the fine-tune
loop draws batches from a seeded generator and resumes exactly after a kill.

  digits        the embedded default: scikit-learn's bundled 8x8 handwritten digits (1,797 images,
                10 classes), no download. Fixed train/test split by seed.
  image_folder  ImageNet-style class sub-folders (train/n01440764/*.JPEG ...), ADM/DiT center crop.
  latents       a latent cache, already scaled by the VAE factor: a folder written by
                `python -m bench.latents build` (latents.npy, labels.npy, memory-mapped), or a small
                .npz / .safetensors file with `latents` N,C,H,W and `labels` N (loaded into memory).
  fashion_mnist Zalando's Fashion-MNIST (60,000 train / 10,000 test, 10 classes, 28x28 grey) read from
                its official IDX files (the Debian package dataset-fashion-mnist), sizes and sha256
                checked, padded to 32x32: the GPU tier's real data.

Two keys of the `data` group say how the fine-tune loop reads a set, not what it is: `workers`
(DataLoader worker processes, default 0) and `hflip` (random horizontal flips, default false).
build_dataset accepts them for every kind and sets them on the data set; bench.loader reads them.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import os
import struct
import zlib
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
    workers: int = 0       # data.workers: DataLoader worker processes of the fine-tune loop (bench.loader)
    hflip: bool = False    # data.hflip: mirror each sample left-right with probability 1/2, seeded (bench.loader)

    def __len__(self) -> int:
        raise NotImplementedError

    def get(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def get_flipped(self, idx: torch.Tensor, flip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """get(idx) with the samples where `flip` (bool, per sample) is true mirrored left-right (the
        width axis; for latents see LatentCache.get_flipped)."""
        x, y = self.get(idx)
        return torch.where(flip.view(-1, *([1] * (x.ndim - 1))), x.flip(-1), x), y

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


def _check_image(path: Path) -> str | None:
    """None if PIL reads the file's header (and a JPEG is complete), else why not."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            fmt = im.format
            im.verify()  # header / chunk checks, no decode
        if fmt == "JPEG":
            with open(path, "rb") as fh:
                fh.seek(-2, os.SEEK_END)
                complete = fh.read(2) == b"\xff\xd9"
            if not complete:  # no EOI marker: truncated, or trailing bytes after a valid image; decode to tell
                with Image.open(path) as im:
                    im.load()
    except Exception as e:  # UnidentifiedImageError, OSError (truncated), SyntaxError (PIL's bad-header error)
        return f"{type(e).__name__}: {e}"
    return None


def verify_images(files: list[Path], verify: str | int = "all", root: Path | None = None) -> None:
    """Stop with the unreadable files named (see ImageFolder). verify: "all" | "none" | N (a sample)."""
    from concurrent.futures import ThreadPoolExecutor

    if verify in (None, "none", False):
        return
    if verify != "all":
        try:
            k = int(verify)
        except (TypeError, ValueError):
            raise BenchError(f"data.verify={verify!r}; use all, none or a number of files to sample") from None
        if k < 1:
            raise BenchError(f"data.verify={verify!r}; use all, none or a number of files (>= 1) to sample")
        if k < len(files):
            idx = np.random.default_rng(0).choice(len(files), size=k, replace=False)
            files = [files[i] for i in sorted(idx)]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # I/O bound on cold disks
        why = list(pool.map(_check_image, files, chunksize=256))
    bad = [(f, w) for f, w in zip(files, why) if w]
    if bad:
        shown = "; ".join(f"{f} ({w})" for f, w in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise BenchError(f"{len(bad)} unreadable image(s) under {root or files[0].parent}: {shown}{more}; "
                         "remove or replace them")


class ImageFolder(Dataset):
    """root/<class_name>/<image>, classes sorted by name (torchvision ImageFolder's order; hidden
    folders are skipped).

    Bad input stops at construction, not mid fine-tune: a missing or empty folder, images with no
    class sub-folders, a class folder without images, and unreadable images. `verify` says how many
    files are checked: "all" (default) opens every file's header with PIL (``Image.verify()``;
    ~25 us per JPEG from a warm cache, so ~30 s for ImageNet's 1.28M files, in threads for cold
    disks), plus a full decode of any JPEG that does not end with its EOI marker (a truncated
    download); an integer N checks a fixed random sample of N files (seed 0) for folders where even
    that is too slow (``data.verify=5000`` on the command line); "none" skips the check. A file that fails later, when loaded, still stops the
    run with its name."""

    def __init__(self, root: str, image_size: int = 256, name: str | None = None, verify: str | int = "all"):
        root_p = Path(os.path.expanduser(str(root)))
        if not root_p.is_dir():
            raise BenchError(f"data folder not found: {root_p}; set data.root=/path/to/train (or BENCH_DATA_ROOT), "
                             "a folder with one sub-folder of images per class")
        if int(image_size) < 1:
            raise BenchError(f"data.image_size={image_size}; give the training resolution in pixels, e.g. 32 or 256")
        entries = [p for p in root_p.iterdir() if not p.name.startswith(".")]
        if not entries:
            raise BenchError(f"data folder {root_p} is empty; put one sub-folder of images per class in it "
                             "(root/<class>/<image>.png)")
        classes = sorted(p.name for p in entries if p.is_dir())
        if not classes:
            loose = sum(p.suffix.lower() in IMG_EXTS for p in entries)
            raise BenchError(f"data folder {root_p} has no class sub-folders ({loose} images at its top level); move "
                             "the images into one folder per class (root/<class>/<image>; one class: root/0/)")
        per_class = [[f for f in sorted((root_p / c).rglob("*")) if f.suffix.lower() in IMG_EXTS]
                     for c in classes]
        files = [(f, ci) for ci, fs in enumerate(per_class) for f in fs]
        if not files:
            raise BenchError(f"no images under {root_p}: expected class sub-folders of {sorted(IMG_EXTS)} files")
        empty = [c for c, fs in zip(classes, per_class) if not fs]
        if empty:
            raise BenchError(f"class folders without images under {root_p}: {', '.join(empty[:5])}"
                             f"{' ...' if len(empty) > 5 else ''}; add images or remove the folders")
        verify_images([f for f, _ in files], verify, root_p)
        self.root, self.files, self.classes, self.image_size = root_p, files, classes, int(image_size)
        self.num_classes = len(classes)
        self.shape = (3, self.image_size, self.image_size)
        self.name = name or root_p.name

    def __len__(self):
        return len(self.files)

    def _load(self, i: int) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError

        path = self.files[i][0]
        try:
            with Image.open(path) as im:
                arr = center_crop_arr(im.convert("RGB"), self.image_size)
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise BenchError(f"corrupt image {path}: {e}; remove or replace it") from None
        return torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1.0

    def get(self, idx):
        idx = idx.tolist()
        return torch.stack([self._load(i) for i in idx]), torch.tensor([self.files[i][1] for i in idx])


class LatentCache(Dataset):
    """Pre-extracted VAE latents (already x the VAE factor) with their class labels.

    A folder, as `python -m bench.latents build` writes it: latents.npy (N, C, H, W), labels.npy (N,),
    optionally latents_flip.npy (the encodings of the mirrored images, TinyFusion's extraction) and
    manifest.json (sha256s). The latents are memory-mapped (np.load(mmap_mode="r")): a batch reads its
    rows from disk (the page cache), the cache is never loaded whole (ImageNet-256: ~21 GB in fp32).
    Or a small .npz / .safetensors file with `latents` and `labels` (optional `latents_flip`), loaded
    into memory. Labels are checked whole; latents are checked for NaN/inf in chunks, except in a
    folder whose manifest records that the builder checked them."""

    def __init__(self, path: str, num_classes: int = 1000, name: str | None = None):
        p = Path(os.path.expanduser(str(path)))
        if not (p.is_file() or p.is_dir()):
            raise BenchError(f"latent cache not found: {p}; build it first (python -m bench.latents build "
                             "--images ... --vae ... --out ...) or pass data.path=...")
        self.path, self.num_classes, self.name = p, int(num_classes), name or p.stem
        self.manifest = None
        try:
            d = self._open_folder(p) if p.is_dir() else self._load_file(p)
            missing = [k for k in ("latents", "labels") if k not in d]
            if missing:
                raise KeyError(missing[0])
        except KeyError as e:
            raise BenchError(f"latent cache {p} lacks key {e}; it needs 'latents' (N,C,H,W) and 'labels' (N,): "
                             "re-extract it with both") from None
        except BenchError:
            raise
        except Exception as e:  # zip/header errors from numpy or safetensors
            raise BenchError(f"latent cache {p} is unreadable ({type(e).__name__}: {e}); re-extract it") from None
        x, y, xf = d["latents"], torch.as_tensor(np.asarray(d["labels"])), d.get("latents_flip")
        if x.ndim != 4 or y.ndim != 1 or len(x) != len(y) or len(x) == 0:
            raise BenchError(f"latent cache {p}: latents {tuple(x.shape)} / labels {tuple(y.shape)} do not match "
                             "(N,C,H,W) / (N,) with N > 0; re-extract it")
        if xf is not None and tuple(xf.shape) != tuple(x.shape):
            raise BenchError(f"latent cache {p}: latents_flip {tuple(xf.shape)} differs from latents "
                             f"{tuple(x.shape)}; re-extract it")
        if y.is_floating_point() and not torch.equal(y, y.round()):
            raise BenchError(f"latent cache {p}: labels are not integers (dtype {y.dtype}); store class ids")
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= num_classes:
            raise BenchError(f"latent cache {p}: labels span [{lo}, {hi}] but data.num_classes={num_classes}; "
                             "set data.num_classes (and model.num_classes) to the number of classes")
        checked = bool(self.manifest and self.manifest.get("finite"))  # the builder checked every chunk
        if isinstance(x, torch.Tensor):
            x, xf = x.float(), None if xf is None else torch.as_tensor(xf).float()
        if not checked and not all(_finite(a) for a in (x, xf) if a is not None):
            raise BenchError(f"latent cache {p} holds NaN or inf latents; re-extract it")
        self.x, self.x_flip, self.y = x, xf, y.long()
        self.shape = tuple(int(v) for v in x.shape[1:])

    @staticmethod
    def _load_file(p: Path) -> dict:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(p))
        with np.load(p) as z:
            return {k: torch.from_numpy(z[k]) for k in ("latents", "labels", "latents_flip") if k in z.files}

    def _open_folder(self, p: Path) -> dict:
        import json

        if (p / "manifest.json").is_file():
            self.manifest = json.loads((p / "manifest.json").read_text())
        elif (p / "chunks").is_dir():
            raise BenchError(f"latent cache {p} is an unfinished build (chunks/, no manifest.json); rerun "
                             "python -m bench.latents build with the same arguments to resume it")
        return {k: np.load(p / f"{k}.npy", mmap_mode="r" if k != "labels" else None)
                for k in ("latents", "labels", "latents_flip") if (p / f"{k}.npy").is_file()}

    def __len__(self):
        return len(self.y)

    def _rows(self, a, idx: torch.Tensor) -> torch.Tensor:
        if isinstance(a, torch.Tensor):
            return a[idx]
        return torch.from_numpy(np.ascontiguousarray(a[idx.numpy()], dtype=np.float32))  # reads only these rows

    def get(self, idx):
        return self._rows(self.x, idx), self.y[idx]

    def get_flipped(self, idx, flip):
        """With latents_flip a flipped sample is read from there: the official pipelines mirror the
        image before the VAE encodes it, never the latent (facebookresearch/DiT train.py:
        RandomHorizontalFlip, then encode, every step; chuanyangjin/fast-DiT extract_features.py: one
        random flip per image baked into its cache; VainF/TinyFusion extract_features.py encodes
        torch.cat([x, x.flip(3)]) and its prune_by_learning.py / train.py CustomDataset(flip=0.5)
        picks one of the two). Without it, the latent's width axis is mirrored: an approximation,
        since the SD-VAE's encoder is equivariant to mirroring only approximately."""
        if self.x_flip is None:
            return super().get_flipped(idx, flip)
        x = self._rows(self.x, idx)
        if flip.any():
            x[flip] = self._rows(self.x_flip, idx[flip])
        return x, self.y[idx]

    def __getstate__(self):  # DataLoader workers started by spawn: reopen the maps, never pickle their rows
        d = dict(self.__dict__)
        if isinstance(self.x, np.memmap):
            d["x"] = d["x_flip"] = None
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        if self.x is None:
            self.x = np.load(self.path / "latents.npy", mmap_mode="r")
            f = self.path / "latents_flip.npy"
            self.x_flip = np.load(f, mmap_mode="r") if f.is_file() else None


def _finite(a, rows: int = 4096) -> bool:
    """No NaN/inf, read in chunks of `rows` (a memory-mapped array is streamed, never held whole)."""
    if isinstance(a, torch.Tensor):
        return bool(torch.isfinite(a).all())
    return all(bool(np.isfinite(a[i:i + rows]).all()) for i in range(0, len(a), rows))


def build_dataset(kind: str = "digits", workers: int = 0, hflip: bool = False, **kw) -> Dataset:
    """The data set of `kind` from its keys; `workers` and `hflip` (every kind) say how the fine-tune
    loop reads it (bench.loader) and are set on the returned data set."""
    from bench.checks import factory

    build = factory("data", kind, {"digits": digits, "image_folder": ImageFolder, "latents": LatentCache,
                                   "torchvision": torchvision_dataset, "cifar": cifar_batches,
                                   "fashion_mnist": fashion_mnist}, kw, ("workers", "hflip"))
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise BenchError(f"data.workers={workers!r}; use 0 (batches read in the main process) or a number of "
                         "DataLoader worker processes")
    if not isinstance(hflip, bool):
        raise BenchError(f"data.hflip={hflip!r}; use true or false")
    ds = build(**kw)
    ds.workers, ds.hflip = workers, hflip
    return ds


SPLIT_KINDS = ("digits", "fashion_mnist")  # kinds whose split a scorer may change (train | test | all)


def from_config(cfg: dict, split: str | None = None) -> Dataset:
    """The run's data set from its config (`data` group); `split` overrides the split of the kinds
    that have train / test / all (digits, fashion_mnist): the scorers' reference images."""
    d = {k: v for k, v in cfg["data"].items() if k != "name"}
    if split is not None and d.get("kind") in SPLIT_KINDS:
        d["split"] = split
    return build_dataset(**d)


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


# --------------------------------------------------------------------------------------------
# IDX files (LeCun's MNIST format) and Fashion-MNIST
# --------------------------------------------------------------------------------------------

# IDX type byte -> numpy dtype (big-endian), http://yann.lecun.com/exdb/mnist/ "THE IDX FILE FORMAT"
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path, want_dims: tuple[int, ...] | None = None, sha256: str | None = None) -> np.ndarray:
    """An IDX file (gzip-compressed when its name ends in .gz) as a numpy array.

    Layout: magic = two zero bytes, a type byte (0x08 unsigned byte, ...), the number of dimensions;
    then one big-endian uint32 per dimension; then the data, row-major. Every way a file can be bad
    (not gzip, cut short, wrong magic, a size that disagrees with its header, other dimensions than
    `want_dims`, a `sha256` of the decompressed bytes that differs) stops with one line naming the file."""
    p = Path(path)
    try:
        raw = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
    except (EOFError, OSError, zlib.error) as e:  # a cut download: "Compressed file ended before ..."
        raise BenchError(f"{p} cannot be read ({type(e).__name__}: {e}); the file is truncated or not gzip: "
                         "reinstall it (apt-get install --reinstall dataset-fashion-mnist)") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES or raw[3] == 0:
        raise BenchError(f"{p} is not an IDX file (magic {raw[:4].hex() or 'empty'}; IDX starts with 0000 followed "
                         "by a type byte such as 08 and the number of dimensions); use the official files")
    ndim = raw[3]
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise BenchError(f"{p} ends inside its IDX header ({len(raw)} bytes); the file is truncated: reinstall it")
    dims = struct.unpack(f">{ndim}I", raw[4:head])
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    size = head + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != size:
        raise BenchError(f"{p} holds {len(raw)} bytes but its IDX header (dims {list(dims)}) needs {size}; the file "
                         f"is {'truncated' if len(raw) < size else 'longer than its header says'}: reinstall it")
    if want_dims is not None and tuple(dims) != tuple(want_dims):
        raise BenchError(f"{p} has dims {list(dims)}, expected {list(want_dims)}; it is not the official file: "
                         "reinstall it (apt-get install --reinstall dataset-fashion-mnist)")
    if sha256 is not None and hashlib.sha256(raw).hexdigest() != sha256:
        raise BenchError(f"{p}: the sha256 of its content differs from the official file's ({sha256[:12]}...); "
                         "reinstall it (apt-get install --reinstall dataset-fashion-mnist)")
    return np.frombuffer(raw, dtype, offset=head).reshape(dims).astype(dtype.newbyteorder("="))


FASHION_MNIST_DEBIAN = "/usr/share/datasets/fashion-mnist"  # where dataset-fashion-mnist installs them
# name -> (dims, sha256 of the decompressed IDX bytes): the Debian package re-gzips the files, so the
# .gz files' md5s differ from the upstream README's while their contents are the same
FASHION_MNIST_FILES = {
    "train-images-idx3-ubyte": ((60000, 28, 28), "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
    "train-labels-idx1-ubyte": ((60000,), "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
    "t10k-images-idx3-ubyte": ((10000, 28, 28), "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
    "t10k-labels-idx1-ubyte": ((10000,), "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
}


def _fmnist_file(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise BenchError(f"Fashion-MNIST file {stem}.gz not found in {root}; install the Debian package "
                     f"dataset-fashion-mnist (apt-get install -y dataset-fashion-mnist: {FASHION_MNIST_DEBIAN}) and "
                     f"copy its four .gz files there (bash bench/gpu/tier.sh prep), or set data.root / FASHION_MNIST_DIR")


@functools.lru_cache(maxsize=4)  # a sweep's runs share one process: read and check the files once
def _fmnist_arrays(root: str, split: str, verify: bool) -> tuple[np.ndarray, np.ndarray]:
    base = Path(os.path.expanduser(root))
    xs, ys = [], []
    for part in {"train": ("train",), "test": ("t10k",), "all": ("train", "t10k")}[split]:
        arrays = []
        for kind in ("images", "labels"):
            stem = f"{part}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"
            dims, sha = FASHION_MNIST_FILES[stem]
            path = _fmnist_file(base, stem)
            a = read_idx(path, dims if verify else None, sha if verify else None)
            if a.shape[1:] != dims[1:]:
                raise BenchError(f"{path} has dims {list(a.shape)}, expected [N, {', '.join(map(str, dims[1:]))}]")
            arrays.append(a)
        if len(arrays[0]) != len(arrays[1]):
            raise BenchError(f"{base}: {part} has {len(arrays[0])} images but {len(arrays[1])} labels; reinstall "
                             "the files (dataset-fashion-mnist)")
        xs.append(arrays[0])
        ys.append(arrays[1])
    return np.concatenate(xs), np.concatenate(ys)


def fashion_mnist(root: str, split: str = "train", image_size: int = 32, fit: str = "pad",
                  verify: bool = True) -> TensorDataset:
    """Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, arXiv 1708.07747) from its four official IDX files
    (.gz or decompressed) in `root`: split train (60,000), test (10,000) or all; pixels in [-1, 1].

    fit: pad (default) puts the 28x28 image in the middle of a 32x32 one with 2 pixels of the
    background value (-1, black) on every side, as LeNet-5 did for MNIST: no pixel is interpolated,
    every value stays one of the 256 grey levels, and the objects keep their size, so the samples and
    the reference images that Inception FID compares are exactly the data; resize: bilinear
    (antialiased) to image_size. verify: the official dims and the sha256 of every file's content (off:
    any number of 28x28 images with one label each, e.g. a test's small files)."""
    if split not in ("train", "test", "all"):
        raise BenchError(f"data.split={split!r}; Fashion-MNIST has train, test and all")
    if fit not in ("pad", "resize"):
        raise BenchError(f"data.fit={fit!r}; use pad (28x28 in the middle of a black 32x32) or resize")
    if fit == "pad" and int(image_size) < 28:
        raise BenchError(f"data.image_size={image_size} with data.fit=pad; padding needs >= 28 (use fit=resize)")
    xa, ya = _fmnist_arrays(str(root), split, bool(verify))
    x = torch.from_numpy(xa.copy()).float().div_(127.5).sub_(1.0).unsqueeze(1)
    if fit == "pad":
        lo = (int(image_size) - 28) // 2
        x = torch.nn.functional.pad(x, (lo, int(image_size) - 28 - lo) * 2, value=-1.0)
    elif int(image_size) != 28:
        x = torch.nn.functional.interpolate(x, size=(int(image_size),) * 2, mode="bilinear", antialias=True,
                                            align_corners=False)
    return TensorDataset(x, torch.from_numpy(ya.astype(np.int64)), 10, f"fashion-mnist-{split}")


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
    except (RuntimeError, OSError) as e:  # "Dataset not found or corrupted", a missing folder
        raise BenchError(f"{name} not found under {root} ({e}); place the official files there") from None
    xs, ys = [], []
    try:
        for img, lab in ds:
            arr = center_crop_arr(img.convert("RGB"), image_size)
            xs.append(torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1.0)
            ys.append(int(lab))
    except (OSError, SyntaxError, ValueError) as e:  # PIL: unreadable or truncated image files
        raise BenchError(f"{name} under {root}: image {len(xs)} is unreadable ({type(e).__name__}: {e}); "
                         "re-extract the official archive") from None
    if not xs:
        raise BenchError(f"{name} {split} under {root} has no images; check data.split and the files")
    return TensorDataset(torch.stack(xs), torch.tensor(ys), len(set(ys)), f"{name.lower()}-{split}")


# --------------------------------------------------------------------------------------------
# Calibration probes: the same (x0, y, noise, u) for every method
# --------------------------------------------------------------------------------------------

@dataclass
class Calib:
    """Fixed probes. u in [0, 1] is the shared noise level (0 clean, 1 noise), stratified in
    `bins` equal bins so every noise range is represented; `ids` are indices into `source`, the
    training set they were drawn from (None for hand-made probes): methods that learn over the
    training data (TinyFusion's pruning phase) draw their batches from it through bench.loader."""

    x0: torch.Tensor
    y: torch.Tensor
    noise: torch.Tensor
    u: torch.Tensor
    ids: torch.Tensor
    bins: int
    source: Dataset | None = None

    def __len__(self):
        return self.x0.shape[0]

    def batches(self, batch_size: int):
        for i in range(0, len(self), batch_size):
            s = slice(i, i + batch_size)
            yield self.x0[s], self.y[s], self.noise[s], self.u[s]

    def to(self, device):
        return Calib(self.x0.to(device), self.y.to(device), self.noise.to(device), self.u.to(device), self.ids, self.bins,
                     self.source)

    def bin_of(self) -> torch.Tensor:
        return (self.u * self.bins).long().clamp(max=self.bins - 1)


def calibration(dataset: Dataset, n: int = 256, seed: int = 0, bins: int = 8) -> Calib:
    if len(dataset) == 0:
        raise BenchError(f"the calibration data set {getattr(dataset, 'name', '')!r} is empty; point data.* at a "
                         "folder or cache with images (calibration probes are drawn from the training data)")
    if n < 1 or bins < 1:
        raise BenchError(f"calib.n={n}, calib.bins={bins}: both must be >= 1 (defaults 256 and 8)")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(len(dataset), generator=g)[:n]
    if len(ids) < n:  # small sets: cycle through the permutation
        ids = ids.repeat((n + len(ids) - 1) // len(ids))[:n]
    x0, y = dataset.get(ids)
    noise = torch.randn(x0.shape, generator=g)
    b = torch.arange(n) % bins  # stratified noise levels: bin k covers [k/bins, (k+1)/bins)
    u = (b.float() + torch.rand(n, generator=g)) / bins
    return Calib(x0.float(), y, noise, u, ids, bins, dataset)
