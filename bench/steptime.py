"""Per-step time of the suite's own code paths, by the difference of two runs (the S1/S2 method).

    per step = (T(S2) - T(S1)) / (S2 - S1)

T(S) is the wall time (synchronised on CUDA) of the suite's own code run for S steps, each after an
untimed warm-up run of the same settings (which compiles in compile mode), so setup, the final EMA
save and the host-device copies of the samples cancel. Paths:

  sample_step_s    bench.sample.generate: one sampler step over `batch` samples (cfg != 1 doubles
                   the forward: a batch of 256 is a 512-image forward)
  finetune_step_s  bench.finetune.finetune: Denoiser.loss (or a callback's own recovery loss, with
                   the frozen teacher) + AdamW + grad clip + EMA, at `batch`
  plan_step_s      a method's own training phase: its plan() built with S1 and S2 steps
  sample_shares_step_s  bench.sample.generate over a fixed total of samples in bench.run's shards,
                   each rank of a process group drawing its own (bench.gpu.scaling)

Under a process group (torchrun: bench.dist) every rank times the same runs, which start together
(a barrier), and a run's time is the slowest rank's (`slowest`); the fine-tune then is the DDP path
with `batch` the global batch. `repeats` repeats the S1/S2 pair after the one warm-up (the median).

Every record carries the timed model's measured MACs per image and its `work_macs`: the
forward-equivalent MACs of one step (a forward = 1x its MACs, a training step = 3x: forward and
backward; a teacher's forward in KD = 1x), the unit bench.cost scales unmeasured shapes by.
Models have random weights (adaLN-Zero gates randomised so every block computes).
Used by bench.gpu.paths_speed (fixed DiT-XL/2 paths), bench.gpu.ddp_speed and bench.gpu.scaling (the
data-parallel paths) and bench.cost (the shapes an experiment needs).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

TRAIN_FACTOR = 3  # forward + backward of a training step, in forwards (backward ~ 2 forwards)


def synced(fn) -> float:
    """Wall seconds of fn(), with the CUDA queue drained before and after."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def difference(run: Callable[[int], float], steps: tuple[int, int], repeats: int = 1) -> dict:
    """Warm-up run(s1) untimed, then t1 = run(s1), t2 = run(s2) (run returns its wall seconds),
    `repeats` times: per_step_s is the median of the repeats' differences (each one in
    per_step_all_s when repeats > 1). A difference that is not positive (a noisy machine, a tiny
    model) is replaced by t2 / s2, an upper bound that includes setup, and flagged."""
    import statistics

    s1, s2 = steps
    if not 0 < s1 < s2:
        raise ValueError(f"steps must be 0 < S1 < S2, got {steps}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    warm = run(s1)
    pairs = [(run(s1), run(s2)) for _ in range(repeats)]
    pers = [(t2 - t1) / (s2 - s1) if t2 > t1 else t2 / s2 for t1, t2 in pairs]
    noisy = any(t2 <= t1 for t1, t2 in pairs)
    rec = {"per_step_s": statistics.median(pers), "warmup_s": warm, "steps": [s1, s2], "t_s": list(pairs[0])}
    if repeats > 1:
        rec.update(per_step_all_s=pers, t_s=[list(p) for p in pairs])
    return {**rec, **({"noisy": True} if noisy else {})}


def slowest(fn: Callable[[], float]) -> float:
    """fn()'s seconds on the slowest rank of the process group (bench.dist): the ranks start
    together (a barrier) and every rank gets the maximum over ranks. One process: fn()."""
    from bench import dist

    dist.barrier()
    return max(dist.gather_all(fn()))


def random_model(model_cfg: dict, device, seed: int = 0):
    """The configured architecture with random weights (no checkpoint, no VAE), on `device`. DiT/SiT
    adaLN-Zero modulations and the final layer get random values, so every block computes."""
    from bench.gpu.speed import randomize_zero_init_
    from bench.models import build

    kw = {k: v for k, v in model_cfg.items() if k not in ("ckpt", "vae", "latent_scale")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build(**kw)
        if hasattr(net.net, "final_layer") and len(getattr(net.net, "blocks", ())):
            randomize_zero_init_(net.net, seed=seed)
    net.net.to(device).eval()
    return net


def random_data(net, n: int, seed: int = 0):
    """n random images/latents of the model's shape with labels (a TensorDataset on the CPU, as the
    run's data and latent caches are)."""
    from bench.data import TensorDataset

    g = torch.Generator().manual_seed(seed)
    s = net.net.input_size
    k = max(1, net.num_classes)
    return TensorDataset(torch.randn(n, net.in_channels, s, s, generator=g), torch.randint(k, (n,), generator=g),
                         net.num_classes, "random")


def random_calib(net, n: int, bins: int = 8, seed: int = 0):
    """Calibration probes (bench.data.calibration) drawn from random_data."""
    from bench.data import calibration

    return calibration(random_data(net, n, seed), n, seed, bins)


def macs_per_image(net) -> int:
    from bench.surgery import measure

    return int(measure(net)["macs"])


def sample_step_s(net, batch: int, device, precision: str, compile: bool, steps: tuple[int, int] = (3, 9),
                  sampler: str = "ddpm", cfg_scale: float = 1.5, cfg_convention: str = "all", skip: str = "uniform",
                  eta: float = 0.0) -> dict:
    """One sampler step of bench.sample.generate over `batch` samples."""
    from bench.sample import generate

    def run(s):
        return synced(lambda: generate(net, batch, 0, batch, sampler, s, cfg_scale, cfg_convention, "balanced", skip,
                                       eta, device, precision=precision, compile=compile))

    guided = cfg_scale != 1.0
    if net.process.nfe(sampler, steps[1], skip) is None:
        raise ValueError(f"sampler {sampler!r} is adaptive: one step has no fixed cost; time a fixed-step sampler")
    nfe = net.process.nfe(sampler, steps[1], skip) / steps[1]
    macs = macs_per_image(net)
    fwd = batch * (2 if guided else 1)
    return {"path": "sample", "precision": precision, "compile": compile, **difference(run, steps), "batch": batch,
            "forward_batch": fwd, "sampler": sampler, "cfg_scale": cfg_scale, "nfe_per_step": nfe,
            "macs_per_image": macs, "work_macs": fwd * nfe * macs, **_shape(net)}


def finetune_step_s(net, batch: int, device, precision: str, compile: bool, steps: tuple[int, int] = (4, 14),
                    callback=None, teacher=None, distill: float = 0.0, lr: float = 1e-4, repeats: int = 1,
                    graph: bool = False) -> dict:
    """One step of the shared fine-tune loop at `batch` on `net` (trained in place: a few steps of
    random data change no timing). `callback` (a method's recovery objective) and `teacher` (the
    frozen dense model) are passed on as bench.run does. Under a process group (bench.dist) every
    rank calls this: `batch` is the global batch (DDP, bench.finetune) and a run's time is the
    slowest rank's."""
    from bench.finetune import FinetuneConfig, finetune

    data = random_data(net, 4 * batch)
    scratch = _scratch(sum(t.numel() * t.element_size() for t in net.net.state_dict().values()))

    def run(s):
        cfg = FinetuneConfig(steps=s, batch=batch, lr=lr, ema_decay=0.9999, ckpt_every=10 ** 9, log_every=10 ** 9,
                             distill=distill, precision=precision, compile=compile, graph=graph)
        with tempfile.TemporaryDirectory(dir=scratch) as d:
            return slowest(lambda: synced(lambda: finetune(net, data, cfg, Path(d), device=device, callback=callback,
                                                           teacher=teacher)))

    rec = difference(run, steps, repeats)
    net.net.eval()
    macs = macs_per_image(net)
    t_macs = macs_per_image(teacher) if teacher is not None else 0
    return {"path": "finetune", "precision": precision, "compile": compile, "graph": graph, **rec, "batch": batch,
            "teacher": teacher is not None, "callback": type(callback).__name__ if callback is not None else None,
            "macs_per_image": macs, "work_macs": batch * (TRAIN_FACTOR * macs + t_macs), **_shape(net)}


def sample_shares_step_s(net, total: int, shard: int, batch: int, device, precision: str, compile: bool,
                         steps: tuple[int, int] = (2, 8), repeats: int = 1, sampler: str = "ddpm",
                         cfg_scale: float = 1.5, cfg_convention: str = "all", skip: str = "uniform",
                         eta: float = 0.0) -> dict:
    """One sampler step over `total` samples drawn by every rank of the process group together, as
    bench.run's sample stage draws them: shards of `shard` samples (bench.shards), shard k on rank
    k mod N (SampleShards.missing of an empty folder), each through bench.sample.generate in batches
    of `batch`. A run's time is the slowest rank's. One process with total = shard = batch times what
    sample_step_s times."""
    from bench import dist
    from bench.sample import generate
    from bench.shards import SampleShards

    with tempfile.TemporaryDirectory() as d:
        mine = SampleShards(Path(d) / "none", total, 0, shard).missing(dist.rank(), dist.world())

    def run(s):
        def draw():
            for lo, hi in mine:
                generate(net, hi - lo, lo, batch, sampler, s, cfg_scale, cfg_convention, "balanced", skip, eta, device,
                         precision=precision, compile=compile)
        return slowest(lambda: synced(draw))

    if net.process.nfe(sampler, steps[1], skip) is None:
        raise ValueError(f"sampler {sampler!r} is adaptive: one step has no fixed cost; time a fixed-step sampler")
    nfe = net.process.nfe(sampler, steps[1], skip) / steps[1]
    rows = 2 if cfg_scale != 1.0 else 1
    macs = macs_per_image(net)
    return {"path": "sample", "precision": precision, "compile": compile, **difference(run, steps, repeats),
            "batch": batch, "total": total, "shard": shard, "world": dist.world(),
            "samples_per_rank": dist.gather_all(sum(hi - lo for lo, hi in mine)), "forward_batch": batch * rows,
            "sampler": sampler, "cfg_scale": cfg_scale, "nfe_per_step": nfe, "macs_per_image": macs,
            "work_macs": total * rows * nfe * macs, **_shape(net)}


def plan_step_s(make_method: Callable[[int], object], net, budget, calib, batch: int,
                steps: tuple[int, int] = (2, 5)) -> dict:
    """One step of a method's own training phase: `make_method(s)` builds the method with s steps,
    whose plan(net, budget, calib) is timed (at torch's default precision, as bench.run calls it)."""
    rec = difference(lambda s: (lambda m: synced(lambda: m.plan(net, budget, calib)))(make_method(s)), steps)
    macs = macs_per_image(net)
    return {"path": "method", "precision": "fp32", "compile": False, **rec, "batch": batch, "macs_per_image": macs,
            "work_macs": batch * TRAIN_FACTOR * macs, **_shape(net)}


def _scratch(state_bytes: int) -> str | None:
    """Where the loop's final EMA save goes: /dev/shm when it holds three copies (the save cancels in
    the difference, but a slow disk makes every run of a 1-2 GB model seconds longer), else the temp
    folder."""
    import shutil

    try:
        return "/dev/shm" if shutil.disk_usage("/dev/shm").free > 3 * state_bytes else None
    except OSError:
        return None


def _shape(net) -> dict:
    return {"model": net.name, "depth": len(getattr(net.net, "blocks", ()))}
