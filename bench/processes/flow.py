"""Flow matching with the linear interpolant and velocity prediction (SiT's default transport).

References:
  SiT: Ma et al. 2024 (arXiv 2401.08740), Sec. 2: x_t = alpha_t x_* + sigma_t eps with the
       linear path alpha_t = t, sigma_t = 1 - t (t=0 noise, t=1 data, the released checkpoints'
       convention; the model is called with continuous t), velocity target x_* - eps (Eq. 3),
       and the reverse SDE with the same marginals, dX = [v + w_t/2 * s] dt + sqrt(w_t) dW, whose
       w_t = 0 case is the probability-flow ODE dX = v dt.
  SiT's official sampler (willisma/SiT@947f95b transport/transport.py `Sampler.sample_sde`,
       `sample_ode`, `check_interval`; transport/integrators.py `sde`, `ode`; transport/path.py
       `ICPlan`; defaults of sample.py / sample_ddp.py from train_utils.py), matched here:
    * SDE: the code's diffusion coefficient D_t ("diffusion form" x "diffusion norm"; CLI default
      form "sigma": D_t = norm * sigma_t) enters as drift v + D_t s and noise sqrt(2 D_t dt) z, i.e.
      the paper's equation with w_t = 2 D_t. Euler-Maruyama on t = linspace(t0, 1 - h, N) (N - 1
      steps of dt = (1 - h - t0) / (N - 1)), then one noise-free last step of size h = 0.04:
      "Mean" x + (v + D s) h (the full SDE drift; the CLI default), "Tweedie" x / t + (1 - t)^2 / t * s,
      "Euler" x + v h, or None (no last step: the grid ends at t = 1). SDE Heun: the noise first,
      then a trapezoid step of the drift (integrators.py `__Heun_step`).
      The library function's own default form "SBDM" (D_t = (1-t)^2/t + (1-t), the score-based
      diffusion's) is infinite at t = 0 and gives NaN on the linear path (sample_eps = 0); it is refused.
    * ODE: default `dopri5` of torchdiffeq (Dormand-Prince 5(4), adaptive) from t = 0 to 1 with
      atol 1e-6, rtol 1e-3; fixed-step solvers on t = linspace(0, 1, num_steps).
    * train_eps = sample_eps = 0 for Linear + velocity (transport/__init__.py): the ODE runs on
      [0, 1] and the SDE on [0, 1 - h].
  Rectified flow / flow matching: Liu et al. 2022 (arXiv 2209.03003), Lipman et al. 2022 (arXiv 2210.02747).
  Dormand & Prince 1980 (J. Comp. Appl. Math. 6(1)) for dopri5, solved by torchdiffeq (Chen et al. 2018).

Step convention (`steps`): the number of integration steps, the SDE's last step included. Official
`--num-sampling-steps N` counts *time-grid points* (torch.linspace(t0, t1, N)), so
  * ODE euler/heun:  official N  <->  steps = N - 1 (N - 1 steps; Heun: 2 (N - 1) evaluations);
  * SDE, last step Mean/Tweedie/Euler: official N  <->  steps = N (N - 1 Euler-Maruyama steps + the last);
  * SDE, last step None: official N  <->  steps = N - 1;
  * dopri5: N only picks the output points it interpolates; `steps` is ignored (the solver picks its own).
Network evaluations per sample: euler steps, heun 2 steps, sde steps, sde_heun 2 steps - 1 (2 steps
without a last step), dopri5 measured (bench.sample.generate counts them). Official code evaluates the
network twice per SDE drift (once for v, once inside the score); both see the same input, so one
evaluation here gives the same numbers at half the cost.

Derivation used for the score (written here so it can be checked): with x_t = t x1 + (1-t) x0,
v = x1 - x0 gives x0 = x_t - t v, and since x0 is the Gaussian noise with scale sigma_t = 1 - t,
score(x_t) = -E[x0 | x_t] / (1 - t) = -(x_t - t v) / (1 - t)  (SiT path.py get_score_from_velocity).
"""
from __future__ import annotations

import math

import torch

from bench.api import BenchError

SAMPLERS = ("euler", "heun", "dopri5", "sde", "sde_heun")
ADAPTIVE = ("dopri5",)              # network evaluations are measured, not known in advance
DIFFUSION_FORMS = ("sigma", "linear", "constant", "decreasing", "increasing-decreasing")
LAST_STEPS = ("Mean", "Tweedie", "Euler", None)
SBDM_NAN = ("diffusion form 'SBDM' (SiT's library default) has D_t = (1-t)^2/t + (1-t), infinite at t = 0 where the "
            "linear path's sampler starts (sample_eps = 0): NaN samples; SiT's sample.py default is 'sigma'")


class LinearFlow:
    """``model_fn(x_t, t) -> velocity`` with t in [0, 1] (float), data at t = 1."""

    kind = "flow"

    def __init__(
        self,
        t_eps: float = 0.0,              # SiT: train_eps = sample_eps = 0 for Linear + velocity
        diffusion_form: str = "sigma",   # SDE: D_t = norm * sigma_t (SiT sample.py --diffusion-form sigma)
        diffusion_norm: float = 1.0,     # SDE: its scale (--diffusion-norm 1.0)
        last_step: str | None = "Mean",  # SDE: final noise-free step (--last-step Mean): Mean|Tweedie|Euler|None
        last_step_size: float = 0.04,    # SDE: its size h; Euler-Maruyama stops at t = 1 - h (--last-step-size 0.04)
        atol: float = 1e-6,              # dopri5 absolute tolerance (SiT --atol)
        rtol: float = 1e-3,              # dopri5 relative tolerance (SiT --rtol)
    ):
        if diffusion_form == "SBDM":
            raise BenchError(SBDM_NAN)
        if diffusion_form not in DIFFUSION_FORMS:
            raise BenchError(f"unknown diffusion form {diffusion_form!r}; use one of {', '.join(DIFFUSION_FORMS)}")
        if last_step not in LAST_STEPS:
            raise BenchError(f"unknown last step {last_step!r}; use Mean, Tweedie, Euler or None (null)")
        if last_step is not None and not 0 < last_step_size < 1:
            raise BenchError(f"last_step_size={last_step_size} must lie in (0, 1)")
        self.t_eps, self.diffusion_form, self.diffusion_norm = t_eps, diffusion_form, diffusion_norm
        self.last_step, self.last_step_size = last_step, last_step_size
        self.atol, self.rtol = atol, rtol

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

    # ---- SDE coefficients (official sampler's parametrisation) --------------------------------
    def diffusion(self, t: float) -> float:
        """D_t of SiT's `compute_diffusion` (path.py ICPlan): the SDE drift is v + D_t s and its noise
        sqrt(2 D_t dt) z. The paper's w_t is 2 D_t."""
        n, f = self.diffusion_norm, self.diffusion_form
        if f in ("sigma", "linear"):  # sigma_t = 1 - t on the linear path: the two forms coincide
            return n * (1.0 - t)
        if f == "constant":
            return n
        if f == "decreasing":
            return 0.25 * (n * math.cos(math.pi * t) + 1) ** 2
        return n * math.sin(math.pi * t) ** 2  # increasing-decreasing (official's dict misspells the key)

    def sde_drift(self, x, t: float, v):
        """v + D_t * score(x, t): the drift of the official SDE (`Sampler.__get_sde_diffusion_and_drift`)."""
        s = self.score(x, torch.full((x.shape[0],), t, device=x.device), v)
        return v + self.diffusion(t) * s

    def sde_grid(self, steps: int) -> torch.Tensor:
        """Euler-Maruyama time points, official `check_interval(sde=True)` + `sde.__init__`: linspace
        from t0 = 0 to 1 - h (to 1 - sample_eps without a last step), as float32 like the official grid."""
        if self.last_step is None:
            return torch.linspace(0.0, 1.0 - self.t_eps, steps + 1)
        if steps < 2:
            raise BenchError(f"the SDE sampler with last step {self.last_step} needs steps >= 2 "
                             "(one Euler-Maruyama step and the last step)")
        return torch.linspace(0.0, 1.0 - self.last_step_size, steps)

    # ---- sampling --------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, model_fn, noise, randn, sampler: str = "heun", steps: int = 50, progress=None, **_):
        """Integrate from noise (t=0) to data (t=1). sampler: 'euler' | 'heun' (fixed-step ODE on
        linspace(0, 1, steps + 1)) | 'dopri5' (adaptive ODE, torchdiffeq; `steps` unused) | 'sde'
        (Euler-Maruyama) | 'sde_heun' (SiT's stochastic Heun); the SDEs end with `last_step`."""
        x = noise
        n = x.shape[0]
        C = x.shape[1]
        vel = lambda x_, t_: model_fn(x_, torch.full((n,), float(t_), device=x.device))[:, :C]
        if sampler in ("euler", "heun"):
            t0, t1 = self.t_eps, 1.0 - self.t_eps
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
        if sampler == "dopri5":
            return self._dopri5(vel, x)
        if sampler in ("sde", "sde_heun"):
            if sampler == "sde_heun" and self.last_step is None:
                raise BenchError("the SDE Heun sampler without a last step evaluates the score at t = 1 (NaN, as in "
                                 "SiT's code); use last step Mean")
            ts = self.sde_grid(steps)
            dt = float(ts[1] - ts[0])
            for t in _progress(ts[:-1].tolist(), progress):
                D = self.diffusion(t)
                if sampler == "sde":  # integrators.py __Euler_Maruyama_step
                    x = x + self.sde_drift(x, t, vel(x, t)) * dt + math.sqrt(2 * D * dt) * randn(x)
                else:                 # integrators.py __Heun_step: noise first, then the drift's trapezoid
                    x = x + math.sqrt(2 * D * dt) * randn(x)
                    k1 = self.sde_drift(x, t, vel(x, t))
                    x_p = x + dt * k1
                    k2 = self.sde_drift(x_p, t + dt, vel(x_p, t + dt))
                    x = x + 0.5 * dt * (k1 + k2)
            return self._last_step(vel, x, float(ts[-1]))
        raise ValueError(f"unknown flow sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")

    def _last_step(self, vel, x, t: float):
        """transport.py `__get_last_step` at t = 1 - h: one noise-free step to the data."""
        h = self.last_step_size
        if self.last_step is None:
            return x
        v = vel(x, t)
        if self.last_step == "Mean":     # the mean of one more Euler-Maruyama step: full SDE drift
            return x + self.sde_drift(x, t, v) * h
        if self.last_step == "Euler":    # the probability-flow drift only
            return x + v * h
        # Tweedie: E[x1 | x_t] = (x_t + sigma_t^2 s) / alpha_t with alpha_t = t, sigma_t = 1 - t; on the
        # linear path this equals x + (1 - t) v, i.e. "Euler" (h = 1 - t): kept in the official form
        s = self.score(x, torch.full((x.shape[0],), t, device=x.device), v)
        return x / t + (1 - t) ** 2 / t * s

    def _dopri5(self, vel, x):
        """SiT's default ODE sampler: torchdiffeq.odeint(method='dopri5', atol, rtol) from 0 to 1
        (integrators.py `ode.sample`). One step-size sequence for the whole batch (torchdiffeq's RMS
        error norm over every element), as in the official code over its per-GPU batch: a sample
        depends on the samples it is drawn with, and the batch's network evaluations are counted
        by the caller. The official call asks for num_steps output points; they are interpolated
        from the solver's own steps and never change them, so only the end point is asked for."""
        from torchdiffeq import odeint

        def f(t, y):
            return vel(y, t).to(y.dtype)

        ts = torch.tensor([0.0, 1.0], device=x.device)  # t0 = 0, t1 = 1 - sample_eps (check_interval, ODE)
        return odeint(f, x, ts, method="dopri5", atol=self.atol, rtol=self.rtol)[-1]

    def nfe(self, sampler: str, steps: int, skip: str = "uniform") -> int | None:
        """Network evaluations per sample (without CFG's doubling); None for an adaptive solver,
        whose count is only known once it has run (bench.sample.generate measures it)."""
        if sampler in ADAPTIVE:
            return None
        if sampler == "heun":
            return 2 * steps
        if sampler == "sde_heun":
            return 2 * steps - 1 if self.last_step is not None else 2 * steps
        return steps  # euler; sde (steps - 1 Euler-Maruyama steps + the last, or steps without one)


def _progress(it, progress):
    return progress(it) if progress is not None else it
