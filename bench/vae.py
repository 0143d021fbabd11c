"""Latent models' decoder: the Stable Diffusion VAE (diffusers ``AutoencoderKL``) that DiT and SiT
sample in (Peebles & Xie 2023, Sec. 3.1: latents = 0.18215 x the VAE encoder's mean; DiT's
sample.py decodes ``vae.decode(z / 0.18215).sample``).

The weights come from a local diffusers folder (config.json + diffusion_pytorch_model.safetensors),
resolved through bench.assets by name (``sd-vae-ft-ema``, ``sd-vae-ft-mse``; $BENCH_SD_VAE_EMA or
the Hugging Face cache) or given as a path. Nothing is downloaded inside a run.
"""
from __future__ import annotations

from pathlib import Path

import torch

from bench.api import BenchError


def vae_folder(spec: str) -> Path:
    """A diffusers AutoencoderKL folder from an asset name or a path (folder or its weights file)."""
    p = Path(spec).expanduser()
    if p.exists():
        folder = p if p.is_dir() else p.parent
    else:
        from bench import assets
        try:
            assets.get(spec)
        except BenchError:
            raise BenchError(f"model.vae={spec!r} is neither a folder nor a known asset (sd-vae-ft-ema, "
                             "sd-vae-ft-mse); point it at a diffusers AutoencoderKL folder") from None
        folder = assets.resolve(spec, config_key="model.vae").parent
    if not (folder / "config.json").is_file():
        raise BenchError(f"{folder} has no config.json: model.vae must be a diffusers AutoencoderKL folder "
                         "(config.json + diffusion_pytorch_model.safetensors)")
    return folder


def load_vae(spec: str, device="cpu"):
    from diffusers import AutoencoderKL
    folder = vae_folder(spec)
    try:
        vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # missing / mismatched weights
        raise BenchError(f"could not load the VAE from {folder}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def decode(vae, latents: torch.Tensor, scale: float = 0.18215, batch: int = 64, device=None) -> torch.Tensor:
    """Images in [-1, 1] (float32, CPU) from model latents."""
    device = device or next(vae.parameters()).device
    out = []
    for i in range(0, latents.shape[0], batch):
        z = latents[i:i + batch].to(device, torch.float32) / scale
        out.append(vae.decode(z).sample.clamp(-1, 1).float().cpu())
    return torch.cat(out)


def decoder(cfg: dict, device):
    """samples -> images for the run: the VAE decode when the model has one (model.vae; loaded once,
    here), else the identity."""
    spec = cfg["model"].get("vae")
    if not spec:
        return lambda samples: samples
    vae = load_vae(spec, device)
    scale = float(cfg["model"].get("latent_scale", 0.18215))
    return lambda samples: decode(vae, samples, scale, device=device)

