"""Flow matching with the linear interpolant and velocity prediction (SiT's default transport).

References:
  SiT: Ma et al. 2024 (arXiv 2401.08740), Sec. 2: x_t = alpha_t x_* + sigma_t eps with the
       linear path alpha_t = t, sigma_t = 1 - t (t=0 noise, t=1 data, the released checkpoints'
       convention; the model is called with continuous t), velocity target x_* - eps (Eq. 3),
       and the SDE with the same marginals, dx = [v + w_t/2 * s] dt + sqrt(w_t) dW (Eq. 7-8),
       with the score s recovered from v for the linear path (Eq. 10 family).
  Rectified flow / flow matching: Liu et al. 2022 (arXiv 2209.03003), Lipman et al. 2022 (arXiv 2210.02747).

Derivation used for the score (written here so it can be checked): with x_t = t x1 + (1-t) x0,
v = x1 - x0 gives x0 = x_t - t v, and since x0 is the Gaussian noise with scale sigma_t = 1 - t,
score(x_t) = -E[x0 | x_t] / (1 - t) = -(x_t - t v) / (1 - t).
"""
from __future__ import annotations

import torch


class LinearFlow:
    """``model_fn(x_t, t) -> velocity`` with t in [0, 1] (float), data at t = 1."""

    kind = "flow"

    def __init__(
        self,
        t_eps: float = 0.0,            # SiT: train_eps = sample_eps = 0 for Linear + velocity
        diffusion_norm: float = 1.0,   # SDE: w_t = norm * sigma_t (SiT --diffusion-form sigma)
        last_step_size: float = 0.04,  # SDE: stop at 1 - h, then one mean (noise-free) step (SiT --last-step Mean)
    ):
        self.t_eps, self.diffusion_norm, self.last_step_size = t_eps, diffusion_norm, last_step_size

    # ---- shared noise-level convention: u in [0, 1], 0 clean, 1 pure noise -------------------
    def t_from_u(self, u: torch.Tensor) -> torch.Tensor:
        return (1.0 - u).float()

    def sample_t(self, n: int, generator=None, device="cpu") -> torch.Tensor:
        # drawn on the generator's device (the CPU) and moved: the same draws on every device
        return (self.t_eps + (1 - 2 * self.t_eps) * torch.rand(n, generator=generator)).to(device)

    def q_sample(self, x1, t, noise):
        t = t.reshape(-1, *([1] * (x1.ndim - 1)))
        return t * x1 + (1 - t) * noise

    def training_loss(self, model_fn, x1, t, noise, reduction: str = "mean"):
        """Velocity regression ||v_theta(x_t, t) - (x1 - x0)||^2 (SiT Eq. 3, mean over dims)."""
        v = model_fn(self.q_sample(x1, t, noise), t)
        loss = ((v[:, : x1.shape[1]] - (x1 - noise)) ** 2).mean(dim=tuple(range(1, x1.ndim)))
        return loss.mean() if reduction == "mean" else loss

    def score(self, x, t, v):
        tt = t.reshape(-1, *([1] * (x.ndim - 1)))
        return -(x - tt * v) / (1 - tt)

    # ---- sampling --------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, model_fn, noise, randn, sampler: str = "heun", steps: int = 50, progress=None, **_):
        """Integrate from noise (t=0) to data (t=1). sampler: 'euler' | 'heun' (ODE) | 'sde'
        (Euler-Maruyama, w_t = norm * (1 - t), last step deterministic)."""
        x = noise
        n = x.shape[0]
        C = x.shape[1]
        vel = lambda x_, t_: model_fn(x_, torch.full((n,), float(t_), device=x.device))[:, :C]
        t0, t1 = self.t_eps, 1.0 - self.t_eps
        if sampler in ("euler", "heun"):
            ts = torch.linspace(t0, t1, steps + 1).tolist()
            for a, b in _progress(list(zip(ts[:-1], ts[1:])), progress):
                h = b - a
                d = vel(x, a)
                if sampler == "heun":
                    x_e = x + h * d
                    x = x + h * 0.5 * (d + vel(x_e, b))
                else:
                    x = x + h * d
            return x
        if sampler == "sde":
            t_end = t1 - self.last_step_size
            ts = torch.linspace(t0, t_end, steps).tolist()
            for a, b in _progress(list(zip(ts[:-1], ts[1:])), progress):
                h = b - a
                v = vel(x, a)
                w = self.diffusion_norm * (1 - a)
                s = self.score(x, torch.full((n,), a), v)
                x = x + (v + 0.5 * w * s) * h + (w * h) ** 0.5 * randn(x)
            # last step: the mean of the Euler step, no noise (SiT last_step="Mean")
            x = x + vel(x, t_end) * (t1 - t_end)
            return x
        raise ValueError(f"unknown flow sampler {sampler!r}; use 'euler', 'heun' or 'sde'")

    def nfe(self, sampler: str, steps: int, skip: str = "uniform") -> int:
        return {"euler": steps, "heun": 2 * steps, "sde": steps}.get(sampler, steps)


def _progress(it, progress):
    return progress(it) if progress is not None else it
