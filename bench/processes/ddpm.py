"""Gaussian diffusion (DDPM) with epsilon prediction, learned variance, respacing, DDPM and DDIM sampling.

References (formulas written from the papers; equation numbers are the papers'):
  DDPM: Ho et al. 2020 (arXiv 2006.11239): forward q(x_t|x_0) Eq. 4, posterior q(x_{t-1}|x_t,x_0)
        Eqs. 6-7, eps-parameterised mean Eq. 11, simple loss Eq. 14, linear betas 1e-4..0.02, T=1000.
  Improved DDPM: Nichol & Dhariwal 2021 (arXiv 2102.09672): learned variance interpolation Eq. 15,
        hybrid loss L_simple + L_vlb with a stop-gradient on the mean (Sec. 3.1), timestep respacing
        (Sec. 4: K evenly spaced steps, betas recomputed from alpha_bar), fixed variances.
  DDIM: Song et al. 2021 (arXiv 2010.02502): update Eq. 12, sigma_t(eta) Eq. 16, "linear" and
        "quadratic" sub-sequence selection (Appendix D.2).
  Step selection as the official code does it (openai/improved-diffusion and guided-diffusion
        respace.py `space_timesteps`, copied by DiT's diffusion/respace.py): the respacing's rounded
        running sum, and "ddimN"'s integer stride (`space_timesteps` and `ddim_timesteps` below).
  DiT (arXiv 2212.09748) trains with learn_sigma=True and the hybrid loss, samples with 250
  respaced ancestral steps; that is this module's default.

Timestep convention: integer t in [0, T-1], t=0 nearly clean (the training index). The model is
always called with the *original* index, also on a respaced grid.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from bench.api import BenchError


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    # DDPM Sec. 4 / Appendix B; scaled so other T keep the same total noise (Improved DDPM code convention)
    scale = 1000 / num_timesteps
    return np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, count: int) -> list[int]:
    """Improved DDPM Sec. 4 respacing, as its code does it for one section (openai/improved-diffusion
    and guided-diffusion respace.py `space_timesteps`, DiT diffusion/respace.py): a real stride
    (T - 1) / (count - 1) *accumulated* from 0 and rounded at each step (Python's round, half to
    even), so the summed float error decides the ties: T=1000, count 21 (stride 49.95) sums to
    499.49999999999994 at step 10 and takes 499 where 10 * 49.95 would round to 500 (also 23, 31,
    ...); a count of 1 keeps [0] (stride 1 from 0), not T - 1. Ascending."""
    if not 1 <= count <= num_timesteps:
        raise ValueError(f"cannot respace {num_timesteps} steps to {count}")
    stride = 1 if count <= 1 else (num_timesteps - 1) / (count - 1)
    taken, cur = [], 0.0
    for _ in range(count):
        taken.append(round(cur))
        cur += stride
    return sorted(set(taken))


def ddim_uniform_counts(num_timesteps: int) -> list[int]:
    """Step counts the integer-stride DDIM selection can give: len(range(0, T, k)) for k in 1..T-1."""
    return sorted({len(range(0, num_timesteps, k)) for k in range(1, num_timesteps)})


DDIM_SKIPS = ("uniform", "uniform_real", "quad", "respace")


def ddim_timesteps(num_timesteps: int, count: int, skip: str = "uniform") -> list[int]:
    """DDIM sub-sequences (ascending):
    'uniform'      improved-diffusion/guided-diffusion `space_timesteps(T, "ddim<count>")`: the first
                   integer stride k = 1, 2, ... with len(range(0, T, k)) == count, i.e. range(0, T, k);
                   other counts are refused, as there (T=1000: 30 -> stride 34, 0..986);
    'uniform_real' tau_i = floor(c i) with a real c = T / count (DDIM App. D.2's "close to T" for any
                   count; the suite's earlier 'uniform': 30 -> 0..966);
    'quad'         tau_i = floor(c i^2) reaching 0.8 T (DDIM App. D.2, ermongroup/ddim `skip_type quad`,
                   Diff-Pruning's CIFAR-10 protocol);
    'respace'      the ancestral sampler's respacing (`space_timesteps(T, count)`: 0 .. T-1): DDIM on
                   DiT's `create_diffusion(str(count))`, i.e. `ddim_sample_loop` of a SpacedDiffusion."""
    if skip == "uniform":
        for k in range(1, num_timesteps):
            if len(range(0, num_timesteps, k)) == count:
                return list(range(0, num_timesteps, k))
        valid = ddim_uniform_counts(num_timesteps)
        near = sorted(valid, key=lambda c: (abs(c - count), c))[:2]
        raise BenchError(f"DDIM skip 'uniform' takes an integer stride (improved-diffusion 'ddim{count}'): no "
                         f"stride gives {count} of {num_timesteps} steps; nearest valid counts "
                         f"{' and '.join(map(str, sorted(near)))} (skip 'uniform_real' takes any count)")
    if skip == "uniform_real":
        # real-valued c = T / count so tau_{-1} = T - c is "close to T" (App. D.2) for any count
        c = num_timesteps / count
        steps = [int(c * i) for i in range(count)]
    elif skip == "quad":
        steps = (np.linspace(0, np.sqrt(num_timesteps * 0.8), count) ** 2).astype(int).tolist()
    elif skip == "respace":
        steps = space_timesteps(num_timesteps, count)
    else:
        raise ValueError(f"unknown DDIM skip {skip!r}; use one of {', '.join(DDIM_SKIPS)}")
    return sorted(set(steps))


def normal_kl(mean1, logvar1, mean2, logvar2):
    # KL(N1 || N2) between diagonal Gaussians, elementwise (nats)
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x):
    # tanh approximation of the standard normal CDF (Page 1977), as used for DDPM's decoder L_0
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log p(x) of 8-bit data in [-1, 1] under a Gaussian discretised to 256 bins (DDPM Eq. 13)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


@dataclass
class _Schedule:
    """Arrays of one (possibly respaced) chain; `timestep_map[i]` is step i's original index."""

    betas: np.ndarray
    timestep_map: np.ndarray

    def __post_init__(self):
        b = self.betas
        self.num_timesteps = len(b)
        self.alphas_cumprod = np.cumprod(1.0 - b)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        # posterior q(x_{t-1} | x_t, x_0), DDPM Eqs. 6-7
        self.posterior_variance = b * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # log clipped because the posterior variance is 0 at t=0
        pv = self.posterior_variance
        self.posterior_log_variance_clipped = np.log(np.append(pv[1], pv[1:])) if len(pv) > 1 else np.log(b)
        self.posterior_mean_coef1 = b * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(1.0 - b) / (1.0 - self.alphas_cumprod)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)  # q(x_t | x_0), DDPM Eq. 4
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_betas = np.log(b)  # the learned range's upper end (Improved DDPM Eq. 15)
        # the fixed-large variance: beta_t, with the posterior's at t = 1 (DDPM's sigma^2 = beta)
        self.log_variance_large = np.log(np.append(pv[1], b[1:])) if len(b) > 1 else np.log(b)
        self._on: dict = {}  # (array name, device) -> that array as a tensor there

    def at(self, name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """The array `name` at step indices t, float32, shaped (N, 1, ...) to broadcast over a batch of `ndim`
        dims, on t's device. Each array goes to a device once: a host-to-device copy from pageable memory
        waits for the device's queue, so copying at every call synchronised every training and sampler step
        with the GPU (and cannot be recorded in a CUDA graph: bench.graphed). Same values as the copy."""
        key = (name, t.device)
        if (arr := self._on.get(key)) is None:
            arr = self._on[key] = torch.from_numpy(getattr(self, name)).to(t.device)
        return arr[t].float().reshape(-1, *([1] * (ndim - 1)))


class GaussianDiffusion:
    """Epsilon-prediction diffusion. ``model_fn(x_t, t) -> output`` where output has C channels,
    or 2C with ``learn_sigma`` (second half: variance interpolation v in [-1, 1], Improved DDPM Eq. 15)."""

    kind = "ddpm"

    def __init__(
        self,
        num_timesteps: int = 1000,     # DDPM T
        beta_start: float = 1e-4,      # DDPM linear schedule
        beta_end: float = 0.02,
        learn_sigma: bool = True,      # DiT: learned range variance + hybrid loss
        var_type: str = "learned_range",  # with learn_sigma=False: "fixed_small" (posterior) | "fixed_large" (beta)
        clip_denoised: bool = False,   # DiT samples latents unclipped; pixel models clip x0 to [-1, 1]
    ):
        self.T = num_timesteps
        self.learn_sigma = learn_sigma
        self.var_type = "learned_range" if learn_sigma else (var_type if var_type != "learned_range" else "fixed_small")
        self.clip_denoised = clip_denoised
        self.base = _Schedule(linear_betas(num_timesteps, beta_start, beta_end), np.arange(num_timesteps))

    # ---- shared noise-level convention: u in [0, 1], 0 clean, 1 pure noise -------------------
    def t_from_u(self, u: torch.Tensor) -> torch.Tensor:
        return (u * self.T).long().clamp(0, self.T - 1)

    def sample_t(self, n: int, generator=None, device="cpu") -> torch.Tensor:
        # drawn on the generator's device (the CPU) and moved: the same draws on every device
        return torch.randint(0, self.T, (n,), generator=generator).to(device)

    def q_sample(self, x0, t, noise):
        s = self.base
        return s.at("sqrt_alphas_cumprod", t, x0.ndim) * x0 + s.at("sqrt_one_minus_alphas_cumprod", t, x0.ndim) * noise

    # ---- training loss ---------------------------------------------------------------------
    def training_loss(self, model_fn, x0, t, noise, reduction: str = "mean"):
        """L_simple (DDPM Eq. 14), plus L_vlb with a stop-gradient mean when learning sigma
        (Improved DDPM Sec. 3.1, lambda = 1 as in DiT's non-rescaled MSE). Per-sample if reduction='none'."""
        x_t = self.q_sample(x0, t, noise)
        out = model_fn(x_t, t)
        C = x0.shape[1]
        eps = out[:, :C]
        mse = ((noise - eps) ** 2).mean(dim=tuple(range(1, x0.ndim)))
        loss = mse
        if self.learn_sigma:
            frozen = torch.cat([eps.detach(), out[:, C:]], dim=1)
            loss = loss + self._vb_terms_bpd(frozen, x0, x_t, t, self.base)
        return loss.mean() if reduction == "mean" else loss

    def _vb_terms_bpd(self, out, x0, x_t, t, s: _Schedule):
        true_mean = s.at("posterior_mean_coef1", t, x0.ndim) * x0 + s.at("posterior_mean_coef2", t, x0.ndim) * x_t
        true_logvar = s.at("posterior_log_variance_clipped", t, x0.ndim)
        mean, _, logvar, _ = self._p_mean_variance(out, x_t, t, s, clip=False)
        kl = normal_kl(true_mean, true_logvar, mean, logvar).mean(dim=tuple(range(1, x0.ndim))) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar).mean(dim=tuple(range(1, x0.ndim))) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    # ---- reverse process ---------------------------------------------------------------------
    def _p_mean_variance(self, out, x_t, i, s: _Schedule, clip: bool):
        """Mean/variance of p(x_{i-1} | x_i) on schedule s (i indexes s)."""
        C = x_t.shape[1]
        eps = out[:, :C]
        if self.var_type == "learned_range":
            frac = (out[:, C:2 * C] + 1) / 2  # Improved DDPM Eq. 15
            min_log = s.at("posterior_log_variance_clipped", i, x_t.ndim)
            max_log = s.at("log_betas", i, x_t.ndim)
            logvar = frac * max_log + (1 - frac) * min_log
        elif self.var_type == "fixed_large":
            logvar = s.at("log_variance_large", i, x_t.ndim) * torch.ones_like(x_t)
        else:
            logvar = s.at("posterior_log_variance_clipped", i, x_t.ndim) * torch.ones_like(x_t)
        pred_x0 = s.at("sqrt_recip_alphas_cumprod", i, x_t.ndim) * x_t - s.at("sqrt_recipm1_alphas_cumprod", i, x_t.ndim) * eps
        if clip:
            pred_x0 = pred_x0.clamp(-1, 1)
        mean = s.at("posterior_mean_coef1", i, x_t.ndim) * pred_x0 + s.at("posterior_mean_coef2", i, x_t.ndim) * x_t
        return mean, torch.exp(logvar), logvar, pred_x0

    def respaced(self, count: int) -> _Schedule:
        """Improved DDPM Sec. 4: keep `count` of the T steps and recompute betas from alpha_bar."""
        use = space_timesteps(self.T, count)
        acp = self.base.alphas_cumprod
        last, betas = 1.0, []
        for t in use:
            betas.append(1 - acp[t] / last)
            last = acp[t]
        return _Schedule(np.array(betas), np.array(use))

    @torch.no_grad()
    def sample(self, model_fn, noise, randn, sampler: str = "ddpm", steps: int = 250,
               skip: str = "uniform", eta: float = 0.0, progress=None):
        """Generate from x_T = ``noise``. ``randn(x)`` draws per-step noise shaped like x (per-sample
        seeded by bench.sample). sampler: 'ddpm' (ancestral, respaced to `steps`: space_timesteps) or
        'ddim' (the `steps` that `skip` selects: ddim_timesteps)."""
        if sampler == "ddpm":
            return self._ancestral(model_fn, noise, randn, self.respaced(steps), progress)
        if sampler == "ddim":
            return self._ddim(model_fn, noise, randn, ddim_timesteps(self.T, steps, skip), eta, progress)
        raise ValueError(f"unknown DDPM-family sampler {sampler!r}; use 'ddpm' or 'ddim'")

    def _ancestral(self, model_fn, x, randn, s: _Schedule, progress):
        n = x.shape[0]
        for i in _maybe_progress(range(s.num_timesteps - 1, -1, -1), progress):
            idx = torch.full((n,), i, dtype=torch.long, device=x.device)
            t_orig = torch.full((n,), int(s.timestep_map[i]), dtype=torch.long, device=x.device)
            out = model_fn(x, t_orig)
            mean, _, logvar, _ = self._p_mean_variance(out, x, idx, s, clip=self.clip_denoised)
            x = mean + (torch.exp(0.5 * logvar) * randn(x) if i > 0 else 0.0)
        return x

    def _ddim(self, model_fn, x, randn, seq: list[int], eta: float, progress):
        acp = self.base.alphas_cumprod
        n = x.shape[0]
        C = x.shape[1]
        prev_seq = [-1] + seq[:-1]
        for t, t_prev in _maybe_progress(list(zip(reversed(seq), reversed(prev_seq))), progress):
            a_t = float(acp[t])
            a_prev = float(acp[t_prev]) if t_prev >= 0 else 1.0
            eps = model_fn(x, torch.full((n,), t, dtype=torch.long, device=x.device))[:, :C]
            x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
            if self.clip_denoised:
                x0 = x0.clamp(-1, 1)
                eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
            sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))  # DDIM Eq. 16
            x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma ** 2, 0.0)) * eps
            if sigma > 0 and t_prev >= 0:
                x = x + sigma * randn(x)
        return x

    def nfe(self, sampler: str, steps: int, skip: str = "uniform") -> int:
        """Network evaluations per sample (without CFG's doubling)."""
        if sampler == "ddpm":
            return len(space_timesteps(self.T, steps))
        return len(ddim_timesteps(self.T, steps, skip))


def _maybe_progress(it, progress):
    return progress(it) if progress is not None else it
