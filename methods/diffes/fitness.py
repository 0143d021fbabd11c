"""Diff-ES trajectory fitness: sample a fixed probe set with the dense teacher once and with every
candidate (a routed student), and compare the final samples.

Provenance: Diff-ES `FitnessOnTrajectory` as summarised in methods.md 6c [V]: K fixed noises and
labels (`--traj-probe-batch` 64, seed 1234), teacher and student sampled with DDIM
(`--num-sampling-steps` 20) at the CFG scale of the run (DiT 2.1); default metric `latent_mse`
(minus the MSE of the final latents); options latent cosine / SNR and image metrics.
Guidance as the code's: DiT's ``forward_with_cfg`` guides only the first three latent channels and
takes the rest from the conditional half (``cfg_convention="dit3"``, bench.processes.guided; on a
model with at most three channels it is the ordinary rule); "all" guides every channel.
Ours: noises from per-probe generators (seed probe_seed + k, as bench.sample draws them), labels
k mod K (class balanced), our samplers (DDIM eta=0 for DDPM, Euler for flow by default); metrics
  latent_mse   -mean (student - teacher)^2                       (default, Diff-ES's)
  latent_cos   mean over probes of cos(student, teacher)
  snr_db       10 log10(sum teacher^2 / sum (student - teacher)^2)
  frechet      -Frechet distance of Gaussians fitted to the flattened samples (teacher vs student;
               the distribution-level option; few probes make it noisy)
  ssim         mean SSIM to the teacher's sample (bench.metrics.consistency, Diff-Pruning's protocol)
Higher is better for all of them.
"""
from __future__ import annotations

import torch

from bench.api import BenchError
from bench.processes import guided
from bench.sample import PerSampleNoise

METRICS = ("latent_mse", "latent_cos", "snr_db", "frechet", "ssim")


class TrajectoryFitness:
    def __init__(self, net, metric: str = "latent_mse", probes: int = 64, probe_seed: int = 1234,
                 sampler: str | None = None, steps: int = 10, cfg_scale: float = 1.5, batch_size: int = 128,
                 cfg_convention: str = "dit3"):
        if metric not in METRICS:
            raise BenchError(f"diffes fitness={metric!r} is unknown; use one of {', '.join(METRICS)}")
        if cfg_convention not in ("all", "dit3"):
            raise BenchError(f"diffes fitness CFG convention {cfg_convention!r}: use dit3 (the code's) or all")
        self.cfg_convention = cfg_convention
        if probes < 2:
            raise BenchError("diffes needs probes >= 2")
        self.metric, self.steps, self.cfg_scale, self.batch = metric, int(steps), float(cfg_scale), int(batch_size)
        self.sampler = sampler or ("ddim" if net.process.kind == "ddpm" else "euler")
        seeds = [int(probe_seed) + k for k in range(int(probes))]
        self.seeds = seeds
        self.y = torch.tensor([k % net.num_classes for k in range(len(seeds))])
        shape = (net.in_channels, net.input_size, net.input_size)
        self.x_T = PerSampleNoise([10 * s for s in seeds])(torch.empty(len(seeds), *shape))
        self.teacher = self.sample(net)

    @torch.no_grad()
    def sample(self, net) -> torch.Tensor:
        """Final samples of the current (possibly routed) model from the fixed probes."""
        dev, out = net.device, []
        with net.eval_mode():
            for i in range(0, len(self.seeds), self.batch):
                s = slice(i, i + self.batch)
                y = self.y[s].to(dev)
                fn = guided(lambda x, t, yy: net(x, t, yy), y, self.cfg_scale, net.null_label, self.cfg_convention,
                            net.in_channels)
                step_noise = PerSampleNoise([10 * k + 1 for k in self.seeds[s]])  # same stream for every candidate
                x = net.process.sample(fn, self.x_T[s].to(dev), step_noise, sampler=self.sampler, steps=self.steps,
                                       skip="uniform", eta=0.0)
                out.append(x.float().cpu())
        return torch.cat(out)

    def score(self, student: torch.Tensor) -> float:
        t, s = self.teacher.double(), student.double()
        if not torch.isfinite(s).all():
            return float("-inf")
        if self.metric == "latent_mse":
            return -float((s - t).pow(2).mean())
        if self.metric == "latent_cos":
            return float(torch.nn.functional.cosine_similarity(s.flatten(1), t.flatten(1), dim=1).mean())
        if self.metric == "snr_db":
            err = float((s - t).pow(2).sum())
            return 10.0 * torch.log10(torch.tensor(float(t.pow(2).sum()) / max(err, 1e-30))).item()
        if self.metric == "frechet":
            from bench.metrics.stats import FrechetRef, feature_stats
            return -FrechetRef(*feature_stats(t.flatten(1).numpy())).fid(s.flatten(1))  # the teacher's sqrt is memoised
        from bench.metrics.consistency import ssim_to_teacher
        return float(ssim_to_teacher(student.clamp(-1, 1), self.teacher.clamp(-1, 1))["mean"])

    def __call__(self, net) -> float:
        return self.score(self.sample(net))
