"""Per-sample seeded generation: sample i always gets the same label and noise, for every method.

As in EDM's StackedRandomGenerator (Karras et al. 2022), each sample owns a generator seeded with
its index, so a sample does not depend on the batch size, on how many samples are drawn, or on the
device (noise is drawn on the CPU and moved). Pruned and dense models therefore start from the
same x_T and see the same per-step noise, which also makes teacher-consistency metrics meaningful.
"""
from __future__ import annotations

import torch

from bench.processes import guided


class PerSampleNoise:
    """randn(x) -> a tensor shaped like x whose row i comes from sample i's own generator.

    The per-sample loop runs once per `chunk` calls, not at every sampler step: each generator
    draws `chunk` steps' worth at once, and the block moves to the device in one copy. torch's CPU
    normal sampler fills 16 values at a time, so one draw of k*n values equals k draws of n values
    when n is a multiple of 16 (every image shape here: 1x8x8, 3x32x32, 4x32x32): the samples are
    exactly those of one draw per step. Other sizes draw per step. chunk=1 (the default) draws
    per call: for x_T, drawn once."""

    def __init__(self, seeds: list[int], chunk: int = 1):
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.chunk = chunk
        self._buf, self._next = None, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = tuple(x.shape[1:])
        numel = x[0].numel() if len(x) else 0
        if self._buf is None or self._next == self._buf.shape[0] or self._buf.shape[2:] != shape \
                or self._buf.device != x.device:
            k = self.chunk if numel % 16 == 0 else 1
            rows = [torch.randn((k, *shape), generator=g) for g in self.gens]
            self._buf, self._next = torch.stack(rows, 1).to(x.device, non_blocking=True), 0
        out = self._buf[self._next]
        self._next += 1
        return out.to(dtype=x.dtype)


def sample_labels(seeds: list[int], num_classes: int, mode: str = "balanced") -> torch.Tensor:
    """'balanced': label = seed mod K (MAR-style class balance); 'random': drawn from the seed
    (DiT/ADM draw uniform random labels, so per-class counts vary)."""
    if num_classes <= 0:  # unconditional model (DDPM CIFAR-10): labels are ignored
        return torch.zeros(len(seeds), dtype=torch.long)
    if mode == "balanced":
        return torch.tensor([int(s) % num_classes for s in seeds])
    if mode == "random":
        return torch.tensor([int(torch.randint(num_classes, (1,), generator=torch.Generator().manual_seed(10_000_019 + int(s))))
                             for s in seeds])
    raise ValueError(f"unknown label mode {mode!r}; use 'balanced' or 'random'")


@torch.no_grad()
def generate(net, n: int, seed0: int = 0, batch: int = 250, sampler: str = "ddpm", steps: int = 250,
             cfg_scale: float = 1.0, cfg_convention: str = "all", labels: str = "balanced",
             skip: str = "uniform", eta: float = 0.0, device=None, progress=None, precision: str | None = None,
             compile: bool = False):
    """Generate n samples with seeds seed0..seed0+n-1. Returns (samples float32 on CPU, labels).
    `precision` (fp32 | tf32 | bf16; null: tf32 on CUDA, fp32 elsewhere) and `compile`
    (torch.compile of the backbone) change how the network runs, never the noise or the labels.

    The network evaluations are counted, not assumed: the returned samples carry `samples.nfe`, a
    float64 tensor [n] with each sample's count (the calls its batch made, x2 under guidance, whose
    forward evaluates the conditional and the null row of every sample). For a fixed-step sampler
    it equals `process.nfe(...)`; an adaptive one (flow 'dopri5') picks its own steps per batch.
    `bench.shards.SampleShards.write` stores it with the samples, and the row's `nfe` is its mean."""
    from bench.metrics.cost import precision as run_in, resolve_precision

    device = device or net.device
    seeds = list(range(seed0, seed0 + n))
    ys = sample_labels(seeds, net.num_classes, labels)
    was_training = net.net.training
    net.net.eval()
    shape = (net.in_channels, net.net.input_size, net.net.input_size)
    out, nfe = [], []
    rows_per_call = 2 if cfg_scale != 1.0 else 1  # guided(): [cond; null] in one forward
    with run_in(resolve_precision(precision, device), device), net.compiled(compile):
        for i in range(0, n, batch):
            s = seeds[i: i + batch]
            noise = PerSampleNoise([10 * k for k in s])      # x_T stream
            step_noise = PerSampleNoise([10 * k + 1 for k in s], chunk=32)  # per-step noise stream
            x_T = noise(torch.empty(len(s), *shape, device=device))
            y = ys[i: i + batch].to(device)
            calls = [0]

            def counted(x, t, yy):
                calls[0] += 1
                return net(x, t, yy)

            fn = guided(counted, y, cfg_scale, net.null_label, cfg_convention, net.in_channels)
            x0 = net.process.sample(fn, x_T, step_noise, sampler=sampler, steps=steps, skip=skip, eta=eta,
                                    progress=progress)
            out.append(x0.float().cpu())
            nfe += [calls[0] * rows_per_call] * len(s)
    net.net.train(was_training)
    samples = torch.cat(out)
    samples.nfe = torch.tensor(nfe, dtype=torch.float64)
    return samples, ys


def mean_nfe(per_sample) -> int | float:
    """The row's `nfe`: mean network evaluations per sample; an int when every sample took the same
    whole number (every fixed-step sampler), else rounded to 2 decimals."""
    m = round(float(torch.as_tensor(per_sample, dtype=torch.float64).mean()), 6)
    return int(m) if m.is_integer() else round(m, 2)
