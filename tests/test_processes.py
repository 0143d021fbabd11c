"""Known-answer tests for bench.processes: samplers driven by the exact optimal predictor of
Gaussian data must reproduce that data's mean and variance.

Data: x ~ N(MU, S^2) per dimension (d = 2, different means and scales, one scale < 1 and one > 1).
Optimal predictors (Gaussian conditioning, written here independently of the process code):
  DDPM:  x_t = a x0 + b eps, a = sqrt(alphabar_t), b = sqrt(1 - alphabar_t)
         E[eps | x_t] = b (x_t - a MU) / (a^2 S^2 + b^2)
  Flow:  x_t = t x1 + (1 - t) x0, x1 data, x0 ~ N(0, 1); Var(x_t) = t^2 S^2 + (1 - t)^2,
         Cov(x1 - x0, x_t) = t S^2 - (1 - t), E[x1 - x0 | x_t] = MU + Cov / Var * (x_t - t MU)

Tolerances: 4 standard errors of the estimator (mean S/sqrt(n), variance S^2 sqrt(2/n)) plus the
sampler's own discretisation bias with this exact predictor. The biases were obtained offline by
propagating the exact mean/variance through each (linear-Gaussian) recursion; the relative
variance errors per dim [0, 1] are noted next to each case. They are properties of the algorithms
(e.g. fixed_small under-disperses at few steps, Euler is first order), not slack for bugs.
The start noise is moment-matched (zero mean, unit variance exactly), so deterministic samplers
(DDIM eta=0, Euler, Heun) have no Monte-Carlo error at all: their output is a linear map of it.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bench.processes import create_process, guided
from bench.processes.ddpm import GaussianDiffusion, ddim_timesteps, space_timesteps
from bench.processes.flow import LinearFlow

MU = torch.tensor([1.0, -0.5])
S = torch.tensor([0.5, 1.5])
N = 20_000   # samples per dimension
K = 16       # samples are laid out (N/K, 2, K): i.i.d. along K, so per-sample lookups cost N/K

# DDPM Sec. 4 schedule, computed here rather than taken from the code under test
ALPHABAR = torch.from_numpy(np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))).float()


pytestmark = pytest.mark.usefixtures("one_thread")


def _per_channel(v, x):  # (C,) -> broadcastable over (n, C, ...)
    return v.view(1, -1, *([1] * (x.ndim - 2)))


def _per_sample(v, x):  # (n,) -> broadcastable over (n, C, ...)
    return v.view(-1, *([1] * (x.ndim - 1)))


def eps_star(x, t, v=None):
    mu, s = _per_channel(MU, x), _per_channel(S, x)
    ab = _per_sample(ALPHABAR[t], x)
    a, b = ab.sqrt(), (1 - ab).sqrt()
    eps = b * (x - a * mu) / (a * a * s * s + b * b)
    return eps if v is None else torch.cat([eps, torch.full_like(eps, v)], dim=1)  # + variance channels


def v_star(x, t):
    mu, s, t = _per_channel(MU, x), _per_channel(S, x), _per_sample(t, x)
    var = t * t * s * s + (1 - t) ** 2
    return mu + (t * s * s - (1 - t)) / var * (x - t * mu)


def sample(proc, model_fn, n=N, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n // K, 2, K, generator=g)
    z = (z - z.mean((0, 2), keepdim=True)) / z.std((0, 2), keepdim=True)  # moment-matched (see docstring)
    randn = lambda x: torch.randn(x.shape, generator=g)  # noqa: E731  per-step noise, same stream
    x = proc.sample(model_fn, z, randn, **kw)
    return x.transpose(1, 2).reshape(-1, 2)  # (n, 2): one row per sample


def assert_moments(x, var_bias, mean_bias=0.0):
    n = x.shape[0]
    mean, var = x.mean(0), x.var(0)
    mean_tol = 4 * S / math.sqrt(n) + mean_bias
    var_tol = (4 * math.sqrt(2 / n) + var_bias) * S ** 2
    assert torch.all((mean - MU).abs() <= mean_tol), f"mean {mean.tolist()} vs {MU.tolist()} (tol {mean_tol.tolist()})"
    assert torch.all((var - S ** 2).abs() <= var_tol), f"var {var.tolist()} vs {(S ** 2).tolist()} (tol {var_tol.tolist()})"
    return mean, var


# ---- DDPM ancestral ------------------------------------------------------------------------

def _ddpm(var):
    if isinstance(var, str):
        return GaussianDiffusion(learn_sigma=False, var_type=var), eps_star
    return GaussianDiffusion(learn_sigma=True), lambda x, t: eps_star(x, t, v=var)


@pytest.mark.parametrize("steps,var,var_bias", [
    # var: "fixed_small" (posterior), "fixed_large" (beta), or a fixed learned-range output v
    (1000, "fixed_small", 0.02),   # -1.6%, -0.7%
    (1000, "fixed_large", 0.01),   # +0.3%, -0.2%
    (1000, 0.0, 0.01),             # -0.6%, -0.4%
    (250, "fixed_small", 0.06),    # -5.6%, -2.7%
    (250, "fixed_large", 0.02),    # +1.3%, -0.6%
    (250, 0.5, 0.02),              # -0.5%, -1.1%
    (50, "fixed_small", 0.22),     # -21%, -12%
    (50, "fixed_large", 0.08),     # +7.2%, -2.9%
    (50, 0.5, 0.06),               # -2.3%, -5.6%
])
def test_ddpm_ancestral_gaussian(steps, var, var_bias):
    proc, fn = _ddpm(var)
    assert_moments(sample(proc, fn, sampler="ddpm", steps=steps), var_bias)


def test_learned_range_endpoints_are_the_fixed_variances():
    # Improved DDPM Eq. 15: v = -1 is the posterior variance, v = +1 is beta (same noise -> same samples)
    for v, fixed in ((-1.0, "fixed_small"), (1.0, "fixed_large")):
        a = sample(GaussianDiffusion(learn_sigma=True), lambda x, t: eps_star(x, t, v=v), n=2000, sampler="ddpm", steps=50)
        b = sample(GaussianDiffusion(learn_sigma=False, var_type=fixed), eps_star, n=2000, sampler="ddpm", steps=50)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # and the sample variance grows monotonically with v at few steps (where the two differ most)
    var = [sample(*_ddpm(v), n=2000, sampler="ddpm", steps=50).var(0) for v in (-1.0, 0.0, 1.0)]
    assert torch.all(var[0] < var[1]) and torch.all(var[1] < var[2])


# ---- DDIM ------------------------------------------------------------------------------------

@pytest.mark.parametrize("skip,steps,eta,mean_bias,var_bias", [
    ("uniform", 1000, 0.0, 0.01, 0.01),   # converged ODE: -0.6%, -0.3%; mean off 0.005 (x_T != N(0,1) exactly)
    ("uniform", 100, 0.0, 0.01, 0.06),    # -5.5%, -3.1%
    ("quad", 100, 0.0, 0.035, 0.04),      # -2.9%, -3.1%; starts at t=800 (alphabar 1.6e-3): mean off 0.02-0.03
    ("uniform", 100, 1.0, 0.0, 0.13),     # -12%, -6.5%
    ("quad", 100, 1.0, 0.005, 0.07),      # -6.3%, -5.3%
])
def test_ddim_gaussian(skip, steps, eta, mean_bias, var_bias):
    proc = GaussianDiffusion(learn_sigma=False)
    assert_moments(sample(proc, eps_star, sampler="ddim", steps=steps, skip=skip, eta=eta), var_bias, mean_bias)


def test_ddim_eta1_full_chain_is_ddpm_fixed_small():
    # DDIM Eq. 16 with eta=1 on all T steps is the DDPM posterior: identical samples from identical noise
    a = sample(GaussianDiffusion(learn_sigma=False), eps_star, n=1000, sampler="ddim", steps=1000, eta=1.0)
    b = sample(GaussianDiffusion(learn_sigma=False, var_type="fixed_small"), eps_star, n=1000, sampler="ddpm", steps=1000)
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


# ---- flow ------------------------------------------------------------------------------------

def test_flow_heun_is_second_order():
    # 10 steps: Euler -26%, -24% variance; Heun +0.7%, -0.6% (no Monte-Carlo error: deterministic)
    euler = sample(LinearFlow(), v_star, sampler="euler", steps=10)
    heun = sample(LinearFlow(), v_star, sampler="heun", steps=10)
    err_e, err_h = (euler.var(0) - S ** 2).abs(), (heun.var(0) - S ** 2).abs()
    assert torch.all(err_h * 10 < err_e), (err_h, err_e)
    assert_moments(heun, var_bias=0.01)


@pytest.mark.parametrize("sampler,steps,var_bias", [
    ("heun", 50, 0.005),    # +0.04%, -0.02%
    ("euler", 100, 0.03),   # -2.9%, -2.7%
    ("sde", 100, 0.025),    # -2.0%, -2.0%
    ("sde", 250, 0.015),    # -1.2%, -0.9%
])
def test_flow_gaussian(sampler, steps, var_bias):
    assert_moments(sample(LinearFlow(), v_star, sampler=sampler, steps=steps), var_bias)


def test_flow_score_from_velocity_is_the_marginal_score():
    # p_t = N(t MU, t^2 S^2 + (1-t)^2): its score is known, and the SDE drift relies on it
    x = torch.randn(64, 2)
    for t in (0.0, 0.3, 0.9):
        tt = torch.full((64,), t)
        expected = -(x - t * MU) / (t * t * S * S + (1 - t) ** 2)
        torch.testing.assert_close(LinearFlow().score(x, tt, v_star(x, tt)), expected)


# ---- training loss -------------------------------------------------------------------------

def test_hybrid_loss_stops_vlb_gradient_into_eps():
    torch.manual_seed(0)
    gd = GaussianDiffusion(learn_sigma=True)
    x0 = torch.rand(8, 4, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 1, 10, 100, 400, 700, 998, 999])
    out = torch.randn(8, 8, 4, 4, requires_grad=True)  # stands in for the network output
    loss = gd.training_loss(lambda x, t_: out, x0, t, noise)
    assert torch.isfinite(loss)
    (g,) = torch.autograd.grad(loss, out)
    mse = ((noise - out[:, :4]) ** 2).mean()
    (g_mse,) = torch.autograd.grad(mse, out)
    torch.testing.assert_close(g[:, :4], g_mse[:, :4])   # eps channels see L_simple only
    assert g[:, 4:].abs().sum() > 0                       # the VLB trains the variance channels

    # known answer: true eps and v = -1 (posterior variance) make the KL term vanish for t > 0
    exact = torch.cat([noise, -torch.ones_like(noise)], dim=1)
    per = gd.training_loss(lambda x, t_: exact, x0, t, noise, reduction="none")
    assert torch.all(per[1:].abs() < 1e-4), per
    assert torch.isfinite(per[0]) and per[0] > 0         # t = 0: discretised decoder NLL (bits/dim)


# ---- timestep grids --------------------------------------------------------------------------

def test_space_timesteps():
    ts = space_timesteps(1000, 250)
    assert len(ts) == 250 and len(set(ts)) == 250
    assert ts == sorted(ts) and ts[0] == 0 and ts[-1] == 999


def test_ddim_timesteps():
    assert ddim_timesteps(1000, 100, "uniform") == list(range(0, 1000, 10))  # DDIM's range(0, T, T // n)
    for count in (30, 300, 400):  # counts that do not divide T still start near T, with `count` steps
        ts = ddim_timesteps(1000, count, "uniform")
        assert len(ts) == count and ts[0] == 0 and ts[-1] >= 1000 - 1000 / count - 1
    quad = ddim_timesteps(1000, 100, "quad")
    assert quad[0] == 0 and quad == sorted(set(quad))
    assert 790 <= quad[-1] <= 800  # DDIM App. D.2: the quadratic sequence reaches 0.8 T
    with pytest.raises(ValueError):
        ddim_timesteps(1000, 10, "cubic")


def test_respaced_betas_reproduce_alphabar():
    gd = GaussianDiffusion(learn_sigma=False)
    for count in (250, 50, 7):
        s = gd.respaced(count)
        np.testing.assert_allclose(np.cumprod(1 - s.betas), ALPHABAR.double().numpy()[s.timestep_map], rtol=1e-6)
        np.testing.assert_allclose(s.alphas_cumprod, gd.base.alphas_cumprod[s.timestep_map], rtol=1e-12)


def test_create_process():
    assert create_process("ddpm").kind == "ddpm" and create_process("flow").kind == "flow"
    with pytest.raises(ValueError):
        create_process("edm")


# ---- classifier-free guidance -----------------------------------------------------------------

def _cfg_model(calls):
    w = torch.randn(8, 4)

    def model_fn(x, t, y):  # 4 prediction + 4 variance channels, class-dependent
        calls.append(x.shape[0])
        return torch.einsum("oc,nchw->nohw", w, x) + (y.float() + 1)[:, None, None, None] * torch.arange(1.0, 9.0)[None, :, None, None]
    return model_fn


@pytest.mark.parametrize("convention,guided_channels", [("dit3", 3), ("all", 4)])
def test_cfg_conventions(convention, guided_channels):
    torch.manual_seed(0)
    calls = []
    model_fn = _cfg_model(calls)
    x, t, y = torch.randn(5, 4, 2, 2), torch.full((5,), 10), torch.arange(5)
    cond, uncond = model_fn(x, t, y), model_fn(x, t, torch.full_like(y, 10))
    calls.clear()
    out = guided(model_fn, y, scale=4.0, null_label=10, convention=convention, channels=4)(x, t)
    assert calls == [10]  # one forward over [cond; null]
    g = guided_channels
    torch.testing.assert_close(out[:, :g], uncond[:, :g] + 4.0 * (cond[:, :g] - uncond[:, :g]))
    torch.testing.assert_close(out[:, g:], cond[:, g:])  # dit3: channel 3 too; both: variance channels
    assert not torch.allclose(out[:, :g], cond[:, :g])


def test_cfg_scale_one_is_conditional():
    calls = []
    model_fn = _cfg_model(calls)
    x, t, y = torch.randn(3, 4, 2, 2), torch.full((3,), 10), torch.arange(3)
    for convention in ("all", "dit3"):
        out = guided(model_fn, y, scale=1.0, null_label=10, convention=convention, channels=4)(x, t)
        torch.testing.assert_close(out, model_fn(x, t, y))
