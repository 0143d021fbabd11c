"""`python -m bench.latents build`: a small image folder through a tiny AutoencoderKL into a
memory-mapped latent cache, killed after its first chunk and resumed, equal to a build in one go
and to encoding the images directly; the manifest's sha256s; settings that differ are refused."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bench import latents
from bench.api import BenchError
from bench.data import ImageFolder, LatentCache
from tests.test_data import _folder
from tests.test_vae import tiny_vae_folder

pytestmark = pytest.mark.usefixtures("one_thread")
ARGS = ["--size", "16", "--chunk", "2", "--batch", "2", "--workers", "0", "--device", "cpu"]


@pytest.fixture
def setup(tmp_path):
    images = _folder(tmp_path / "train", classes=("cat", "ant"), per_class=3)  # 6 images, 3 chunks of 2
    vae, _ = tiny_vae_folder(tmp_path)
    return images, vae, tmp_path


def _build(images, vae, out, *extra):
    return latents.main(["build", "--images", str(images), "--vae", str(vae), "--out", str(out), *ARGS, *extra])


def test_a_killed_build_resumes_to_the_cache_of_one_go(setup, monkeypatch):
    images, vae, tmp = setup
    assert _build(images, vae, tmp / "once", "--hflip-both") == 0
    real, calls = latents.encode_chunk, []

    def killed_after_the_first(*a, **kw):
        if calls:
            raise KeyboardInterrupt("killed")
        calls.append(kw["k"])
        return real(*a, **kw)

    monkeypatch.setattr(latents, "encode_chunk", killed_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        _build(images, vae, tmp / "cache", "--hflip-both")
    assert sorted(p.name for p in (tmp / "cache" / "chunks").glob("chunk_*")) == ["chunk_00000.npz"]
    with pytest.raises(BenchError, match="unfinished build"):
        LatentCache(str(tmp / "cache"), num_classes=2)
    monkeypatch.setattr(latents, "encode_chunk", lambda *a, **kw: calls.append(kw["k"]) or real(*a, **kw))
    assert _build(images, vae, tmp / "cache", "--hflip-both") == 0
    assert calls == [0, 1, 2]  # the resume encoded only the missing chunks

    ds, ref = LatentCache(str(tmp / "cache"), num_classes=2), LatentCache(str(tmp / "once"), num_classes=2)
    assert isinstance(ds.x, np.memmap) and ds.shape == (4, 8, 8) and len(ds) == 6
    assert ds.y.tolist() == [0, 0, 0, 1, 1, 1]  # ant, ant, ant, cat, cat, cat
    assert np.array_equal(ds.x, ref.x) and np.array_equal(ds.x_flip, ref.x_flip)
    m = json.loads((tmp / "cache" / "manifest.json").read_text())
    assert not (tmp / "cache" / "chunks").exists() and len(m["chunks"]) == 3 and m["classes"] == ["ant", "cat"]
    assert all(len(c["sha256"]) == 64 for c in m["chunks"]) and set(m["files"]) == {
        "latents.npy", "labels.npy", "latents_flip.npy"}
    assert latents.verify(str(tmp / "cache"))["sha256"] == m["sha256"]
    with open(tmp / "cache" / "labels.npy", "r+b") as f:  # a changed file is named
        f.seek(-1, 2)
        f.write(b"\x07")
    with pytest.raises(BenchError, match="labels.npy is missing or differs"):
        latents.verify(str(tmp / "cache"))


def test_mean_latents_equal_encoding_the_images(setup):
    images, vae, tmp = setup
    assert _build(images, vae, tmp / "mean", "--mode", "mean", "--hflip-both") == 0
    from bench.vae import load_vae
    model = load_vae(str(vae))
    x, y = ImageFolder(str(images), image_size=16).all()
    with torch.no_grad():
        want = model.encode(x).latent_dist.mean * 0.18215
        want_flip = model.encode(x.flip(-1)).latent_dist.mean * 0.18215
    ds = LatentCache(str(tmp / "mean"), num_classes=2)
    torch.testing.assert_close(ds.get(torch.arange(6))[0], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(np.array(ds.x_flip)), want_flip, rtol=1e-5, atol=1e-5)
    assert torch.equal(ds.y, y)


def test_a_resume_with_other_settings_is_refused(setup, monkeypatch, capsys):
    images, vae, tmp = setup
    monkeypatch.setattr(latents, "encode_chunk", lambda *a, **kw: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        _build(images, vae, tmp / "c")
    assert _build(images, vae, tmp / "c", "--mode", "mean") == 2
    assert "mode='sample', not 'mean'" in capsys.readouterr().err
