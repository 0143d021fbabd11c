"""Process families behind one factory shape (cf. DiT's create_diffusion, SiT's create_transport).

Both families expose: kind, t_from_u(u), sample_t(n), q_sample(x0, t, noise),
training_loss(model_fn, x0, t, noise), sample(model_fn, noise, randn, sampler=..., steps=...), and
nfe(sampler, steps, skip): network evaluations per sample, None for an adaptive solver (flow 'dopri5'),
whose count bench.sample.generate measures. u in [0, 1] is the suite's one noise-level convention
(0 clean, 1 pure noise); each family maps it to its native timestep (DDPM integer index, flow
continuous t with data at t=1).
"""
from __future__ import annotations

import torch

from bench.processes.ddpm import GaussianDiffusion
from bench.processes.flow import LinearFlow


PROCESSES = {"ddpm": GaussianDiffusion, "flow": LinearFlow}


def create_process(kind: str = "ddpm", **kwargs):
    if kind not in PROCESSES:
        raise ValueError(f"unknown process {kind!r}; use 'ddpm' or 'flow'")
    return PROCESSES[kind](**kwargs)


def guided(model_fn, y, scale: float, null_label: int, convention: str = "all", channels: int | None = None):
    """Classifier-free guidance (Ho & Salimans 2022, Eq. 6): out = u + s * (c - u).

    convention='all' guides every prediction channel (the standard rule; diffusers' DiT);
    convention='dit3' guides only the first three channels and takes the rest from the conditional
    half, exactly as the official DiT/SiT forward_with_cfg does "for exact reproducibility".
    `channels` = number of prediction channels, so learned-variance channels are never guided;
    None means every output channel is a prediction channel.
    Returns fn(x, t) evaluating the conditional and null batches together in one forward.
    """
    if scale == 1.0:
        return lambda x, t: model_fn(x, t, y)
    if convention not in ("all", "dit3"):
        raise ValueError(f"unknown CFG convention {convention!r}; use 'all' or 'dit3'")
    y_null = torch.full_like(y, null_label)

    def fn(x, t):
        out = model_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null]))
        cond, uncond = out.chunk(2)
        C = channels if channels is not None else out.shape[1]
        g = 3 if convention == "dit3" else C
        g = min(g, C)
        guided_part = uncond[:, :g] + scale * (cond[:, :g] - uncond[:, :g])
        return torch.cat([guided_part, cond[:, g:]], dim=1)

    return fn
