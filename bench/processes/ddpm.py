"""Gaussian diffusion (DDPM) with epsilon prediction, learned variance, respacing, DDPM and DDIM sampling.

References (formulas written from the papers; equation numbers are the papers'):
  DDPM: Ho et al. 2020 (arXiv 2006.11239): forward q(x_t|x_0) Eq. 4, posterior q(x_{t-1}|x_t,x_0)
        Eqs. 6-7, eps-parameterised mean Eq. 11, simple loss Eq. 14, linear betas 1e-4..0.02, T=1000.
  Improved DDPM: Nichol & Dhariwal 2021 (arXiv 2102.09672): learned variance interpolation Eq. 15,
        hybrid loss L_simple + L_vlb with a stop-gradient on the mean (Sec. 3.1), timestep respacing
        (Sec. 4: K evenly spaced steps, betas recomputed from alpha_bar), fixed variances.
  DDIM: Song et al. 2021 (arXiv 2010.02502): update Eq. 12, sigma_t(eta) Eq. 16, "linear" and
        "quadratic" sub-sequence selection (Appendix D.2).
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


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    # DDPM Sec. 4 / Appendix B; scaled so other T keep the same total noise (Improved DDPM code convention)
    scale = 1000 / num_timesteps
    return np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, count: int) -> list[int]:
    """Improved DDPM Sec. 4: `count` evenly spaced steps from 0 to T-1 (rounded), ascending."""
    if not 1 <= count <= num_timesteps:
        raise ValueError(f"cannot respace {num_timesteps} steps to {count}")
    if count == 1:
        return [num_timesteps - 1]
    stride = (num_timesteps - 1) / (count - 1)
    return sorted({int(round(i * stride)) for i in range(count)})


def ddim_timesteps(num_timesteps: int, count: int, skip: str = "uniform") -> list[int]:
    """DDIM Appendix D.2 sub-sequences: 'uniform' tau_i = floor(c*i), 'quad' tau_i = floor(c*i^2)
    reaching 0.8*T (the CIFAR-10 choice also used by Diff-Pruning's --skip_type quad)."""
    if skip == "uniform":
        # real-valued c = T / count so tau_{-1} = T - c is "close to T" (App. D.2) for any count; an
        # integer c = T // count truncated to `count` steps would start at 798 for count=400
        c = num_timesteps / count
        steps = [int(c * i) for i in range(count)]
    elif skip == "quad":
        steps = (np.linspace(0, np.sqrt(num_timesteps * 0.8), count) ** 2).astype(int).tolist()
    else:
        raise ValueError(f"unknown DDIM skip {skip!r}; use 'uniform' or 'quad'")
    return sorted(set(steps))


def _extract(arr: np.ndarray, t: torch.Tensor, ndim: int) -> torch.Tensor:
    out = torch.from_numpy(arr).to(t.device)[t].float()
    return out.reshape(-1, *([1] * (ndim - 1)))


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
        return (_extract(np.sqrt(s.alphas_cumprod), t, x0.ndim) * x0
                + _extract(np.sqrt(1.0 - s.alphas_cumprod), t, x0.ndim) * noise)

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
        true_mean = _extract(s.posterior_mean_coef1, t, x0.ndim) * x0 + _extract(s.posterior_mean_coef2, t, x0.ndim) * x_t
        true_logvar = _extract(s.posterior_log_variance_clipped, t, x0.ndim)
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
            min_log = _extract(s.posterior_log_variance_clipped, i, x_t.ndim)
            max_log = _extract(np.log(s.betas), i, x_t.ndim)
            logvar = frac * max_log + (1 - frac) * min_log
        elif self.var_type == "fixed_large":
            lv = np.log(np.append(s.posterior_variance[1], s.betas[1:])) if s.num_timesteps > 1 else np.log(s.betas)
            logvar = _extract(lv, i, x_t.ndim) * torch.ones_like(x_t)
        else:
            logvar = _extract(s.posterior_log_variance_clipped, i, x_t.ndim) * torch.ones_like(x_t)
        pred_x0 = _extract(s.sqrt_recip_alphas_cumprod, i, x_t.ndim) * x_t - _extract(s.sqrt_recipm1_alphas_cumprod, i, x_t.ndim) * eps
        if clip:
            pred_x0 = pred_x0.clamp(-1, 1)
        mean = _extract(s.posterior_mean_coef1, i, x_t.ndim) * pred_x0 + _extract(s.posterior_mean_coef2, i, x_t.ndim) * x_t
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
        seeded by bench.sample). sampler: 'ddpm' (ancestral, respaced to `steps`) or 'ddim'."""
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
