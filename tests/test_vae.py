"""The SD-VAE decode of latent models' samples, on a tiny AutoencoderKL written in diffusers' layout."""
from __future__ import annotations

import pytest
import torch

from bench.api import BenchError
from bench.vae import decoder, load_vae


def tiny_vae_folder(tmp_path):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    return tmp_path / "vae", vae


def test_latents_are_decoded_with_the_scale(tmp_path):
    folder, vae = tiny_vae_folder(tmp_path)
    z = torch.randn(3, 4, 4, 4)
    cfg = {"model": {"vae": str(folder), "latent_scale": 0.18215}}
    img = decoder(cfg, "cpu")(z)
    assert img.shape == (3, 3, 8, 8) and img.min() >= -1 and img.max() <= 1
    with torch.no_grad():
        want = vae.eval().decode(z / 0.18215).sample.clamp(-1, 1)
    torch.testing.assert_close(img, want, rtol=1e-5, atol=1e-5)
    assert decoder({"model": {"vae": None}}, "cpu")(z) is z  # pixel models: as they are


def test_missing_or_broken_vae_stops_with_the_fix(tmp_path):
    with pytest.raises(BenchError, match="neither a folder nor a known asset"):
        load_vae("no-such-vae")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BenchError, match="no config.json"):
        load_vae(str(tmp_path / "empty"))
    folder, _ = tiny_vae_folder(tmp_path)
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"broken")
    with pytest.raises(BenchError, match="could not load the VAE"):
        load_vae(str(folder))
