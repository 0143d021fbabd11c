"""CIFAR-10 in the official python-version layout, written by the test, read without download."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from bench.api import BenchError
from bench.data import build_dataset


def write_cifar10(root, n_per_batch: int = 4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
             b"labels": list(rng.integers(0, 10, n_per_batch)), b"batch_label": name.encode()}
        with open(folder / name, "wb") as fh:
            pickle.dump(d, fh)
    return folder


def test_cifar10_official_layout_loads(tmp_path):
    folder = write_cifar10(tmp_path)
    ds = build_dataset(kind="cifar", root=str(tmp_path), split="train", dataset="CIFAR10")
    x, y = ds.all()
    assert x.shape == (20, 3, 32, 32) and y.shape == (20,)
    assert x.min() >= -1 and x.max() <= 1
    with open(folder / "data_batch_1", "rb") as fh:  # CHW order, first pixel of the first image
        raw = pickle.load(fh, encoding="bytes")[b"data"]
    assert x[0, 1, 0, 0].item() == pytest.approx(raw[0, 1024] / 127.5 - 1.0)
    assert len(build_dataset(kind="cifar", root=str(tmp_path), split="test")) == 4


def test_cifar10_missing_or_corrupt_stops_with_the_fix(tmp_path):
    with pytest.raises(BenchError, match="not found"):
        build_dataset(kind="cifar", root=str(tmp_path / "nothing"))
    folder = write_cifar10(tmp_path)
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(BenchError, match="not an official CIFAR batch"):
        build_dataset(kind="cifar", root=str(tmp_path))
