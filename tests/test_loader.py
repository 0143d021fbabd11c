"""The fine-tune loop's batch source (bench.loader) and the memory-mapped latent cache: today's
batches for the same seed, per-step seeded flips and streams that resume exactly, rank slices that
add up to the global batch (the loop itself: tests/test_run.py, killed and resumed with workers and
flips; TinyFusion's pruning phase: tests/test_tinyfusion.py)."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.api import BenchError
from bench.data import LatentCache, build_dataset, digits
from bench.loader import FLIPS, batches, derived_generator

pytestmark = pytest.mark.usefixtures("one_thread")
B = 16


@pytest.fixture(scope="module")
def data():
    return digits("train")


def _loop_draws(data, gen, steps: int, start: int = 0, **kw):
    """Batches as the fine-tune loop consumes them: each followed by the loss's noise draw from `gen`."""
    it = batches(data, B, gen, seed=0, start=start, steps=steps, **kw)
    out = []
    for _ in range(start, steps):
        x, y = next(it)
        out.append((x, y, torch.randn(x.shape, generator=gen)))
    return out


def test_workers_0_gives_the_batches_the_loop_drew_before(data):
    """The loop before the DataLoader: idx = torch.randint(len(data), (batch,), generator=gen);
    data.get(idx); then the loss's noise from the same generator. Same seed, same tensors."""
    gen = torch.Generator().manual_seed(0)
    before = []
    for _ in range(6):
        idx = torch.randint(len(data), (B,), generator=gen)
        x, y = data.get(idx)
        before.append((x, y, torch.randn(x.shape, generator=gen)))
    now = _loop_draws(data, torch.Generator().manual_seed(0), 6)
    for a, b in zip(before, now):
        assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_a_resumed_loop_draws_the_same_batches(data):
    """Resume as bench.finetune does: the generator's state from the checkpoint, a new source at the step."""
    gen = torch.Generator().manual_seed(0)
    ref = _loop_draws(data, gen, 6)
    for hflip in (False, True):
        data.hflip = hflip
        try:
            gen = torch.Generator().manual_seed(0)
            head = _loop_draws(data, gen, 3)
            tail = _loop_draws(data, torch.Generator().set_state(gen.get_state()), 6, start=3)
            full = _loop_draws(data, torch.Generator().manual_seed(0), 6)
        finally:
            data.hflip = False
        assert all(torch.equal(u, v) for a, b in zip(head + tail, full) for u, v in zip(a, b))
        if not hflip:
            assert all(torch.equal(u, v) for a, b in zip(full, ref) for u, v in zip(a, b))


def test_flips_are_seeded_per_sample_and_leave_the_loop_generator_alone(data):
    plain = _loop_draws(data, torch.Generator().manual_seed(0), 3)
    flipped = _loop_draws(data, torch.Generator().manual_seed(0), 3, hflip=True)
    for step, ((x, y, n), (xf, yf, nf)) in enumerate(zip(plain, flipped)):
        flip = torch.rand(B, generator=derived_generator(0, step, FLIPS)) < 0.5
        assert torch.equal(y, yf) and torch.equal(n, nf)  # same indices, same noise: only the flips differ
        assert torch.equal(xf[flip], x[flip].flip(-1)) and torch.equal(xf[~flip], x[~flip])
        assert 0 < int(flip.sum()) < B


def test_worker_processes_and_ranks_share_one_per_step_stream(data):
    """workers > 0 prefetch, so their indices come from (seed, step): a resume needs only the step,
    and the ranks of a world of 2 read the two halves of the same global batch."""
    one = [b for b in batches(data, B, torch.Generator(), seed=3, steps=4, workers=1, hflip=True)]
    late = [b for b in batches(data, B, torch.Generator(), seed=3, start=2, steps=4, workers=1, hflip=True)]
    assert all(torch.equal(u, v) for a, b in zip(one[2:], late) for u, v in zip(a, b))
    ranks = [list(batches(data, B, torch.Generator(), seed=3, steps=4, hflip=True, rank=r, world=2)) for r in (0, 1)]
    for k in range(4):
        for i in (0, 1):
            assert torch.equal(torch.cat([ranks[0][k][i], ranks[1][k][i]]), one[k][i])
    with pytest.raises(BenchError, match="split evenly"):
        next(batches(data, 15, torch.Generator(), seed=3, steps=1, rank=0, world=2))


def test_loader_keys_are_data_keys():
    ds = build_dataset(kind="digits", workers=2, hflip=True)
    assert ds.workers == 2 and ds.hflip is True
    assert build_dataset(kind="digits").workers == 0
    with pytest.raises(BenchError, match="data.workers=-1"):
        build_dataset(kind="digits", workers=-1)
    with pytest.raises(BenchError, match="data.hflip='yes'"):
        build_dataset(kind="digits", hflip="yes")
    with pytest.raises(BenchError, match="it takes .*workers, hflip"):
        build_dataset(kind="digits", flip=True)


def test_paper_data_configs_flip():
    from tests.conftest import compose
    assert compose(["data=imagenet_latents"])["data"]["hflip"] is True
    assert compose(["data=cifar10"])["data"]["hflip"] is True
    assert "hflip" not in compose([])["data"] and "workers" not in compose([])["data"]  # default hashes kept


# ------------------------------------------------------------------ the memory-mapped cache

def _cache_folder(root: Path, n: int = 10, flips: bool = True) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    np.save(root / "latents.npy", rng.normal(size=(n, 4, 4, 4)).astype(np.float32))
    np.save(root / "labels.npy", np.arange(n) % 3)
    if flips:
        np.save(root / "latents_flip.npy", rng.normal(size=(n, 4, 4, 4)).astype(np.float32))
    return root


def test_a_latent_folder_is_memory_mapped_and_reads_flipped_encodings(tmp_path):
    root = _cache_folder(tmp_path / "z")
    ds = LatentCache(str(root), num_classes=3)
    assert isinstance(ds.x, np.memmap) and len(ds) == 10 and ds.shape == (4, 4, 4)
    x, y = ds.get(torch.tensor([7, 2, 7]))
    lat = np.load(root / "latents.npy")
    assert x.dtype == torch.float32 and torch.equal(x, torch.from_numpy(lat[[7, 2, 7]])) and y.tolist() == [1, 2, 1]
    xf, _ = ds.get_flipped(torch.tensor([7, 2]), torch.tensor([True, False]))
    assert torch.equal(xf[0], torch.from_numpy(np.load(root / "latents_flip.npy")[7])) and torch.equal(xf[1], x[1])
    assert len(pickle.dumps(ds)) < lat.nbytes  # spawned workers reopen the map, never copy the rows
    again = pickle.loads(pickle.dumps(ds))
    assert torch.equal(again.get(torch.tensor([7]))[0], x[:1])
    plain = LatentCache(str(_cache_folder(tmp_path / "p", flips=False)), num_classes=3)  # no mirrored encodings:
    xp, _ = plain.get_flipped(torch.tensor([1]), torch.tensor([True]))                    # the latent is mirrored
    assert torch.equal(xp, plain.get(torch.tensor([1]))[0].flip(-1))


@pytest.mark.parametrize("case,match", [
    ("no_labels", "lacks key 'labels'"),
    ("nan", "NaN or inf"),
    ("unfinished", "unfinished build"),
    ("flip_shape", "latents_flip"),
])
def test_bad_latent_folder(tmp_path, case, match):
    root = _cache_folder(tmp_path / "z")
    if case == "no_labels":
        (root / "labels.npy").unlink()
    elif case == "nan":
        lat = np.load(root / "latents.npy")
        lat[9, 0, 0, 0] = np.inf
        np.save(root / "latents.npy", lat)
    elif case == "unfinished":
        (root / "chunks").mkdir()
    else:
        np.save(root / "latents_flip.npy", np.zeros((9, 4, 4, 4), np.float32))
    with pytest.raises(BenchError, match=match):
        LatentCache(str(root), num_classes=3)
