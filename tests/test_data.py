"""Bad data input stops early, at dataset construction (before a run directory exists), with a
concise BenchError that names the fix: image folders, latent caches, torchvision sets, the
calibration set, a data set that does not fit the model, and the CLI's exit."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bench.api import BenchError
from bench.data import ImageFolder, LatentCache, TensorDataset, calibration, torchvision_dataset
from bench.run import execute
from tests.conftest import TINY, run_cli


def _png(path: Path, seed: int = 0, size: int = 12, fmt: str = "PNG") -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format=fmt)
    return path


def _folder(root: Path, classes=("a", "b"), per_class: int = 2) -> Path:
    for ci, c in enumerate(classes):
        for i in range(per_class):
            _png(root / c / f"{i}.png", seed=10 * ci + i)
    return root


def _short(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400, msg  # concise: one line
    return msg


# ------------------------------------------------------------------ image folders

def test_a_good_image_folder_loads_in_class_order(tmp_path):
    root = _folder(tmp_path / "train", classes=("cat", "ant"))
    (tmp_path / "train" / ".hidden").mkdir()  # hidden folders are no class
    ds = ImageFolder(str(root), image_size=8)
    assert ds.classes == ["ant", "cat"] and ds.num_classes == 2 and len(ds) == 4 and ds.shape == (3, 8, 8)
    x, y = ds.get(torch.arange(4))
    assert x.shape == (4, 3, 8, 8) and -1 <= x.min() and x.max() <= 1 and y.tolist() == [0, 0, 1, 1]


def test_missing_folder(tmp_path):
    with pytest.raises(BenchError) as e:
        ImageFolder(str(tmp_path / "nope"))
    assert "not found" in _short(e) and "data.root=" in str(e.value)


def test_empty_folder(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(BenchError) as e:
        ImageFolder(str(tmp_path / "train"))
    assert "is empty" in _short(e) and "sub-folder of images per class" in str(e.value)


def test_images_without_class_folders(tmp_path):
    for i in range(3):
        _png(tmp_path / "train" / f"{i}.png", seed=i)
    with pytest.raises(BenchError) as e:
        ImageFolder(str(tmp_path / "train"))
    msg = _short(e)
    assert "no class sub-folders" in msg and "3 images" in msg and "root/<class>/<image>" in msg


def test_class_folders_without_images(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "notes.txt").write_text("no image")
    with pytest.raises(BenchError, match="no images under"):
        ImageFolder(str(tmp_path / "train"))
    _png(tmp_path / "train" / "b" / "0.png")
    with pytest.raises(BenchError) as e:
        ImageFolder(str(tmp_path / "train"))
    assert "class folders without images" in _short(e) and ": a;" in str(e.value)


@pytest.mark.parametrize("damage", ["junk", "empty", "truncated_png", "truncated_jpeg"])
def test_corrupt_image_fails_at_construction(tmp_path, damage):
    root = _folder(tmp_path / "train")
    bad = root / "b" / ("bad.jpg" if damage == "truncated_jpeg" else "bad.png")
    if damage == "junk":
        bad.write_bytes(b"this is not an image")
    elif damage == "empty":
        bad.write_bytes(b"")
    else:
        good = _png(tmp_path / "whole" / bad.name, size=64, fmt="JPEG" if damage == "truncated_jpeg" else "PNG")
        data = good.read_bytes()
        bad.write_bytes(data[: len(data) // 2])  # a download cut in half
    with pytest.raises(BenchError) as e:
        ImageFolder(str(root))
    msg = _short(e)
    assert "1 unreadable image(s)" in msg and str(bad) in msg and "remove or replace" in msg


def test_verify_sample_and_none(tmp_path):
    root = _folder(tmp_path / "train", per_class=5)
    bad = root / "a" / "3.png"
    bad.write_bytes(b"junk")
    with pytest.raises(BenchError, match="unreadable"):
        ImageFolder(str(root), verify=10)  # a sample as large as the folder: every file
    with pytest.raises(BenchError, match="data.verify"):
        ImageFolder(str(root), verify="some")
    ds = ImageFolder(str(root), verify="none")  # the check skipped: the load still names the file
    i = [str(f) for f, _ in ds.files].index(str(bad))
    with pytest.raises(BenchError, match="corrupt image .*3.png"):
        ds.get(torch.tensor([i]))


# ------------------------------------------------------------------ latent caches

def _latents(path: Path, n: int = 6, shape=(4, 8, 8), labels=True, num_classes: int = 10, **over) -> Path:
    arrays = {"latents": np.random.default_rng(0).normal(size=(n, *shape)).astype(np.float32)}
    if labels:
        arrays["labels"] = np.arange(n) % num_classes
    arrays.update(over)
    np.savez(path, **arrays)
    return path


def test_a_good_latent_cache_loads(tmp_path):
    ds = LatentCache(str(_latents(tmp_path / "z.npz")), num_classes=10)
    assert len(ds) == 6 and ds.shape == (4, 8, 8) and ds.get(torch.tensor([5]))[1].item() == 5
    from safetensors.torch import save_file
    save_file({"latents": torch.zeros(3, 4, 8, 8), "labels": torch.tensor([0, 1, 2])}, str(tmp_path / "z.safetensors"))
    assert len(LatentCache(str(tmp_path / "z.safetensors"), num_classes=3)) == 3


@pytest.mark.parametrize("case,match", [
    ("missing_file", "latent cache not found"),
    ("missing_labels", "lacks key 'labels'"),
    ("not_a_cache", "unreadable"),
    ("wrong_ndim", r"do not match \(N,C,H,W\) / \(N,\)"),
    ("length_mismatch", "do not match"),
    ("labels_out_of_range", r"labels span \[0, 5\] but data.num_classes=3"),
    ("nan", "NaN or inf"),
])
def test_bad_latent_cache(tmp_path, case, match):
    p = tmp_path / "z.npz"
    if case == "missing_labels":
        _latents(p, labels=False)
    elif case == "not_a_cache":
        p.write_bytes(b"PK\x03\x04 not really a zip")
    elif case == "wrong_ndim":
        _latents(p, shape=(64,))
    elif case == "length_mismatch":
        np.savez(p, latents=np.zeros((6, 4, 8, 8)), labels=np.zeros(5, dtype=np.int64))
    elif case == "labels_out_of_range":
        _latents(p)
    elif case == "nan":
        z = np.zeros((2, 4, 8, 8), np.float32)
        z[1, 0, 0, 0] = np.nan
        np.savez(p, latents=z, labels=np.array([0, 1]))
    with pytest.raises(BenchError, match=match) as e:
        LatentCache(str(p), num_classes=3 if case == "labels_out_of_range" else 10)
    _short(e)


def test_torchvision_set_not_on_disk(tmp_path):
    with pytest.raises(BenchError, match="not found under .*place the official files there"):
        torchvision_dataset("CIFAR10", str(tmp_path / "none"))
    with pytest.raises(BenchError, match="torchvision has no dataset 'NoSuchSet'"):
        torchvision_dataset("NoSuchSet", str(tmp_path))


# ------------------------------------------------------------------ calibration

def test_empty_calibration_set():
    empty = TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long), 10, "empty")
    with pytest.raises(BenchError) as e:
        calibration(empty, n=8)
    assert "'empty' is empty" in _short(e) and "data.*" in str(e.value)
    one = TensorDataset(torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long), 10, "one")
    with pytest.raises(BenchError, match="calib.n=0"):
        calibration(one, n=0)
    assert len(calibration(one, n=4, bins=2)) == 4  # a small set is cycled


# ------------------------------------------------------------------ through the run spine and the CLI

def test_bad_data_stops_the_run_before_its_directory_exists(tmp_path, tiny_cfg):
    root = _folder(tmp_path / "train")
    (root / "a" / "bad.png").write_bytes(b"junk")
    cfg = tiny_cfg("dense", ["budget.keep=1.0", "data=image_folder", f"data.root={root}", "data.image_size=8",
                             "model.in_channels=3"])
    with pytest.raises(BenchError, match="unreadable image"):
        execute(cfg)
    assert not Path(cfg["paths"]["results"]).exists()  # no config.yaml, no error.json, no row


@pytest.mark.parametrize("over,match", [
    (["model.in_channels=1"], r"gives \(3, 8, 8\) inputs .* takes \(1, 8, 8\).*model.in_channels"),
    (["model.in_channels=3", "model.num_classes=1"], "has 2 classes but model.num_classes=1"),
])
def test_data_that_does_not_fit_the_model(tmp_path, tiny_cfg, over, match):
    root = _folder(tmp_path / "train")
    cfg = tiny_cfg("dense", ["budget.keep=1.0", "data=image_folder", f"data.root={root}", "data.image_size=8", *over])
    with pytest.raises(BenchError, match=match):
        execute(cfg)
    assert not Path(cfg["paths"]["results"]).exists()


def test_mismatched_latent_cache_through_the_spine(tmp_path, tiny_cfg):
    path = _latents(tmp_path / "z.npz", shape=(4, 8, 8))  # SD-VAE-like 4 channels; dit_tiny takes 1
    cfg = tiny_cfg("dense", ["budget.keep=1.0", "data=imagenet_latents", f"data.path={path}", "data.num_classes=10"])
    with pytest.raises(BenchError, match=r"gives \(4, 8, 8\) inputs"):
        execute(cfg)
    assert not Path(cfg["paths"]["results"]).exists()


@pytest.mark.parametrize("bad", ["missing", "corrupt"])
def test_cli_bad_image_folder_exits_nonzero_without_a_row(tmp_path, bad):
    root = tmp_path / "train"
    if bad == "corrupt":
        _folder(root)
        (root / "b" / "bad.png").write_bytes(b"junk")
    r = run_cli(TINY + ["method=dense", "budget.keep=1.0", "data=image_folder", f"data.root={root}",
                        "data.image_size=8", "model.in_channels=3", f"paths.results={tmp_path / 'r'}",
                        f"paths.artifacts={tmp_path / 'a'}"])
    assert r.returncode == 2, r.stderr
    assert ("not found" if bad == "missing" else "unreadable image") in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 3 and "Traceback" not in r.stderr
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------ IDX files and Fashion-MNIST

def write_idx(path: Path, a: np.ndarray, gz: bool = True, magic: bytes | None = None) -> Path:
    """`a` (uint8) in LeCun's IDX layout: 00 00 08 <ndim>, big-endian uint32 dims, the bytes."""
    import gzip
    import struct

    raw = (magic or bytes([0, 0, 0x08, a.ndim])) + struct.pack(f">{a.ndim}I", *a.shape) + a.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def write_fmnist(root: Path, n_train: int = 40, n_test: int = 20, seed: int = 0) -> Path:
    """A small Fashion-MNIST-shaped folder (random 28x28 images, labels cycling 0..9) in the official names."""
    g = np.random.default_rng(seed)
    for part, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{part}-images-idx3-ubyte.gz", g.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(root / f"{part}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8))
    return root


def test_idx_reader_reads_header_dims_and_values(tmp_path):
    from bench.data import read_idx

    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = write_idx(tmp_path / "a-idx3-ubyte", a, gz=False)
    assert raw.read_bytes()[:4] == bytes([0, 0, 8, 3]) and raw.stat().st_size == 4 + 3 * 4 + 24
    for p in (raw, write_idx(tmp_path / "a-idx3-ubyte.gz", a)):
        b = read_idx(p, (2, 3, 4))
        assert b.dtype == np.uint8 and b.shape == (2, 3, 4) and b[1, 2, 3] == 23 and (b == a).all()
    with pytest.raises(BenchError, match=r"has dims \[2, 3, 4\], expected \[2, 12\]"):
        read_idx(raw, (2, 12))


@pytest.mark.parametrize("damage,match", [
    ("cut_gz", "truncated or not gzip.*dataset-fashion-mnist"),
    ("cut_raw", r"holds 30 bytes but its IDX header \(dims \[2, 3, 4\]\) needs 40.*truncated"),
    ("magic", "is not an IDX file .*magic 00000103"),
    ("empty", "is not an IDX file .*magic empty"),
    ("not_gzip", "truncated or not gzip"),
])
def test_bad_idx_file_is_one_line_naming_the_fix(tmp_path, damage, match):
    from bench.data import read_idx

    a = np.zeros((2, 3, 4), dtype=np.uint8)
    gz = damage in ("cut_gz", "not_gzip")
    p = write_idx(tmp_path / ("x.gz" if gz else "x"), a, gz=gz, magic=bytes([0, 0, 1, 3]) if damage == "magic" else None)
    data = p.read_bytes()
    p.write_bytes({"cut_gz": data[: len(data) // 2], "cut_raw": data[:30], "empty": b"",
                   "not_gzip": b"plain text, no gzip"}.get(damage, data))
    with pytest.raises(BenchError, match=match) as e:
        read_idx(p)
    _short(e)


def test_fashion_mnist_pads_to_32_and_keeps_the_grey_levels(tmp_path):
    from bench.data import build_dataset, fashion_mnist

    root = write_fmnist(tmp_path / "fm")
    ds = fashion_mnist(str(root), "train", verify=False)
    assert len(ds) == 40 and ds.shape == (1, 32, 32) and ds.num_classes == 10 and ds.name == "fashion-mnist-train"
    x, y = ds.all()
    assert (x[:, :, :2] == -1).all() and (x[:, :, -2:] == -1).all() and (x[..., :2] == -1).all()  # 2-px black border
    raw = np.random.default_rng(0).integers(0, 256, (40, 28, 28), dtype=np.uint8)  # write_fmnist's first draw
    assert torch.equal(x[:, 0, 2:30, 2:30], torch.from_numpy(raw).float() / 127.5 - 1)  # no interpolation
    assert y.tolist() == [i % 10 for i in range(40)]
    assert len(build_dataset("fashion_mnist", root=str(root), split="all", verify=False)) == 60
    assert fashion_mnist(str(root), "test", image_size=16, fit="resize", verify=False).shape == (1, 16, 16)


def test_fashion_mnist_missing_or_not_official(tmp_path):
    from bench.data import fashion_mnist

    with pytest.raises(BenchError) as e:
        fashion_mnist(str(tmp_path / "none"), "train")
    msg = _short(e)
    assert "train-images-idx3-ubyte.gz not found" in msg and "apt-get install -y dataset-fashion-mnist" in msg
    root = write_fmnist(tmp_path / "fm")
    with pytest.raises(BenchError, match=r"dims \[40, 28, 28\], expected \[60000, 28, 28\].*dataset-fashion-mnist"):
        fashion_mnist(str(root), "train", verify=True)  # verify: the official dims ...
    from bench.data import FASHION_MNIST_FILES, read_idx
    dims, sha = FASHION_MNIST_FILES["t10k-labels-idx1-ubyte"]
    fake = write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(dims, dtype=np.uint8))
    with pytest.raises(BenchError, match="sha256 of its content differs from the official.*dataset-fashion-mnist"):
        read_idx(fake, dims, sha)  # ... and the content's sha256
    with pytest.raises(BenchError, match="data.split='val'"):
        fashion_mnist(str(root), "val", verify=False)


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").is_file(),
                    reason="the Debian package dataset-fashion-mnist is not installed")
def test_the_installed_fashion_mnist_test_split_is_the_official_one():
    from bench.data import fashion_mnist

    ds = fashion_mnist("/usr/share/datasets/fashion-mnist", "test")  # sizes and content sha256 checked
    assert len(ds) == 10_000 and torch.bincount(ds.y).tolist() == [1000] * 10 and ds.y[0].item() == 9
