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
    ("heun", 50, 0.005),      # +0.04%, -0.02%
    ("euler", 100, 0.03),     # -2.9%, -2.7%
    # SiT's SDE (D_t = 1 - t, last step Mean of 0.04): most of the bias is the one large last step
    ("sde", 100, 0.03),       # -2.6%, -1.7%
    ("sde", 250, 0.025),      # -2.2%, -0.8%
    ("sde_heun", 100, 0.025),  # -2.1%, +0.04%
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


# ---- flow: SiT's official sampler formulation ---------------------------------------------------

def _toy_v(x, t):  # v = 2 x + t (one channel): simple enough to step by hand
    return 2 * x + t.view(-1, *([1] * (x.ndim - 1)))


def _const_noise(value):
    return lambda x: torch.full_like(x, value)


def test_sde_step_by_hand():
    """steps=2: one Euler-Maruyama step on t = linspace(0, 0.96, 2) (dt = 0.96), then the last step at
    t = 0.96 of size 0.04. x = 0.5, noise z = 0.3. Official (SiT transport.py / integrators.py):
    drift = v + D s, D_t = 1 - t (form sigma, norm 1), s = (t v - x) / (1 - t), noise sqrt(2 D dt) z.
      t = 0:    v = 1, s = -0.5, D = 1, drift = 0.5
                x = 0.5 + 0.5 * 0.96 + sqrt(1.92) * 0.3 = 1.395692194
      t = 0.96: v = 2 * 1.395692194 + 0.96 = 3.751384388, s = (0.96 v - x) / 0.04 = 55.14092045
        Mean:    x + (v + 0.04 s) * 0.04 = 1.395692194 + 5.957021206 * 0.04 = 1.633973042
        Euler:   x + v * 0.04 = 1.545747570
        Tweedie: x / 0.96 + 0.04^2 / 0.96 * s = 1.545747570 (on the linear path this is x + (1 - t) v)
    The suite's earlier drift v + D s / 2 with noise sqrt(D dt) z and an Euler last step gave 1.673454."""
    x = torch.full((1, 1, 1, 1), 0.5)
    want = {"Mean": 1.633973042, "Euler": 1.545747570, "Tweedie": 1.545747570}
    for last, value in want.items():
        got = LinearFlow(last_step=last).sample(_toy_v, x, _const_noise(0.3), sampler="sde", steps=2)
        assert abs(got.item() - value) < 1e-5, (last, got.item(), value)
    # no last step: Euler-Maruyama on linspace(0, 1, 3): t = 0 (dt 0.5) then t = 0.5
    #   x1 = 0.5 + 0.5 * 0.5 + sqrt(2 * 1 * 0.5) * 0.3 = 1.05
    #   t = 0.5: v = 2.6, s = (1.3 - 1.05) / 0.5 = 0.5, D = 0.5: x2 = 1.05 + (2.6 + 0.25) * 0.5 + sqrt(0.5) * 0.3
    got = LinearFlow(last_step=None).sample(_toy_v, x, _const_noise(0.3), sampler="sde", steps=2)
    assert abs(got.item() - (1.05 + 2.85 * 0.5 + 0.5 ** 0.5 * 0.3)) < 1e-5
    flow = LinearFlow()
    assert flow.diffusion(0.25) == 0.75 and LinearFlow(diffusion_norm=2.0).diffusion(0.25) == 1.5
    assert LinearFlow(diffusion_form="constant").diffusion(0.9) == 1.0


def _official_sde(v_fn, x, steps, last="Mean", h=0.04, heun=False):
    """SiT's Euler-Maruyama / Heun SDE with zero noise, transcribed from its algorithm (the sde class
    of integrators.py with Sampler.sample_sde's drift v + (1 - t) s and last step): grid
    linspace(0, 1 - h, steps), fixed dt = t[1] - t[0]."""
    n = x.shape[0]

    def drift(x_, t_):  # v + D_t * score, D_t = 1 - t, score = (t v - x) / (1 - t)
        v = v_fn(x_, torch.full((n,), t_))
        return v + (1 - t_) * (t_ * v - x_) / (1 - t_)

    ts = torch.linspace(0, 1 - h, steps)
    dt = float(ts[1] - ts[0])
    for t in ts[:-1].tolist():
        if heun:
            k1 = drift(x, t)
            k2 = drift(x + dt * k1, t + dt)
            x = x + 0.5 * dt * (k1 + k2)
        else:
            x = x + drift(x, t) * dt
    t = float(ts[-1])
    if last == "Mean":
        return x + drift(x, t) * h
    return x + v_fn(x, torch.full((n,), t)) * h


@pytest.mark.parametrize("sampler", ["sde", "sde_heun"])
def test_sde_without_noise_is_the_official_formulation(sampler):
    x = torch.randn(6, 2, 3)
    zero = lambda a: torch.zeros_like(a)  # noqa: E731
    for last in ("Mean", "Euler"):
        got = LinearFlow(last_step=last).sample(v_star, x, zero, sampler=sampler, steps=20)
        want = _official_sde(v_star, x, 20, last, heun=sampler == "sde_heun")
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the suite's earlier drift (v + D s / 2, last step Euler) is a different sampler: far apart
    old = x.clone()
    ts = torch.linspace(0, 0.96, 20).tolist()
    for a, b in zip(ts[:-1], ts[1:]):
        tt = torch.full((6,), a)
        v = v_star(old, tt)
        old = old + (v + 0.5 * (1 - a) * (a * v - old) / (1 - a)) * (b - a)
    old = old + v_star(old, torch.full((6,), 0.96)) * 0.04
    new = LinearFlow().sample(v_star, x, zero, sampler="sde", steps=20)
    assert (new - old).norm() / new.norm() > 0.05


def test_sde_with_zero_diffusion_is_the_probability_flow_ode():
    """D = 0 leaves dX = v dt: Euler-Maruyama + the Mean last step is then Euler on the SDE's grid
    (linspace(0, 0.96, N) and 1), which torchdiffeq's fixed-grid Euler integrates independently."""
    from torchdiffeq import odeint

    x = torch.randn(5, 2, 3)
    got = LinearFlow(diffusion_norm=0.0).sample(v_star, x, lambda a: torch.randn_like(a), sampler="sde", steps=30)
    grid = torch.cat([torch.linspace(0, 0.96, 30), torch.tensor([1.0])])
    want = odeint(lambda t, y: v_star(y, t.expand(y.shape[0])), x, grid, method="euler")[-1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ours,theirs", [("euler", "euler"), ("heun", "heun2")])
def test_fixed_step_ode_is_the_official_grid(ours, theirs):
    """Official `ode` with a fixed-grid torchdiffeq method integrates on linspace(0, 1, num_steps):
    num_steps = N is eval.steps = N - 1 here, with the same evaluations."""
    from torchdiffeq import odeint

    x = torch.randn(4, 2, 3)
    calls = []
    fn = lambda x_, t_: calls.append(1) or v_star(x_, t_)  # noqa: E731
    got = LinearFlow().sample(fn, x, None, sampler=ours, steps=9)
    assert len(calls) == LinearFlow().nfe(ours, 9) == (9 if ours == "euler" else 18)
    want = odeint(lambda t, y: v_star(y, t.expand(y.shape[0])), x, torch.linspace(0, 1, 10), method=theirs)[-1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_dopri5_is_sit_default_ode_and_counts_its_evaluations():
    """SiT's default: torchdiffeq dopri5 from 0 to 1, atol 1e-6, rtol 1e-3, asked for num_steps output
    points (integrators.py passes t = linspace(t0, t1, num_steps) and list tolerances). Same end point
    and the same network evaluations when only the end point is asked for."""
    from torchdiffeq import odeint

    torch.manual_seed(0)
    w = torch.randn(2, 2) * 0.5
    nonlin = lambda x_, t_: torch.tanh(torch.einsum("oc,ncl->nol", w, x_)) + v_star(x_, t_)  # noqa: E731
    x = torch.randn(3, 2, 4)
    ours, theirs = [], []
    got = LinearFlow().sample(lambda x_, t_: ours.append(1) or nonlin(x_, t_), x, None, sampler="dopri5")

    def official_fn(t, y):
        theirs.append(1)
        return nonlin(y, torch.ones(y.shape[0]) * t)

    want = odeint(official_fn, x, torch.linspace(0, 1, 250), method="dopri5", atol=[1e-6], rtol=[1e-3])[-1]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert len(ours) == len(theirs) > 6
    assert LinearFlow().nfe("dopri5", 250) is None  # not known in advance: bench.sample measures it
    # tighter tolerances cost more evaluations
    tight = []
    LinearFlow(rtol=1e-6).sample(lambda x_, t_: tight.append(1) or nonlin(x_, t_), x, None, sampler="dopri5")
    assert len(tight) > len(ours)


def test_flow_settings_are_refused_early():
    from bench.api import BenchError

    with pytest.raises(BenchError, match="NaN"):
        LinearFlow(diffusion_form="SBDM")
    with pytest.raises(BenchError):
        LinearFlow(last_step="mean")
    with pytest.raises(BenchError, match="steps >= 2"):
        LinearFlow().sample(v_star, torch.zeros(1, 2, 1), None, sampler="sde", steps=1)
    with pytest.raises(BenchError, match="t = 1"):
        LinearFlow(last_step=None).sample(v_star, torch.zeros(1, 2, 1), None, sampler="sde_heun", steps=3)
    assert LinearFlow().nfe("sde", 250) == 250 and LinearFlow(last_step=None).nfe("sde", 249) == 249
    assert LinearFlow().nfe("sde_heun", 250) == 499


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

# Official respacing (improved-diffusion / guided-diffusion / DiT respace.py `space_timesteps`, one
# section): stride (T-1)/(count-1) added step by step from 0.0, each partial sum rounded (round half
# to even); count 1: stride 1, so [0]. Values below worked out by hand from that rule for T = 1000.
RESPACED = {
    1: [0],
    # stride 49.95: 50 i - 0.05 i; i = 10 is the tie 499.5, and the summed floats land just below it -> 499
    21: [0, 50, 100, 150, 200, 250, 300, 350, 400, 450, 499, 549, 599, 649, 699, 749, 799, 849, 899, 949, 999],
    # stride 999/22 = 45.409...; i = 11 is the tie 499.5 (summed: just below) -> 499
    23: [0, 45, 91, 136, 182, 227, 272, 318, 363, 409, 454, 499, 545, 590, 636, 681, 727, 772, 817, 863, 908, 954,
         999],
    # stride 41.625 is exact in binary: ties (166.5, 499.5, 832.5) go to the even neighbour
    25: [0, 42, 83, 125, 166, 208, 250, 291, 333, 375, 416, 458, 500, 541, 583, 624, 666, 708, 749, 791, 832, 874,
         916, 957, 999],
    # stride 33.3; i = 15 is the tie 499.5 (summed: just above) -> 500
    31: [0, 33, 67, 100, 133, 166, 200, 233, 266, 300, 333, 366, 400, 433, 466, 500, 533, 566, 599, 633, 666, 699,
         733, 766, 799, 832, 866, 899, 932, 966, 999],
    # stride 999/49 = 20.387...: no ties
    50: [0, 20, 41, 61, 82, 102, 122, 143, 163, 183, 204, 224, 245, 265, 285, 306, 326, 347, 367, 387, 408, 428, 449,
         469, 489, 510, 530, 550, 571, 591, 612, 632, 652, 673, 693, 714, 734, 754, 775, 795, 816, 836, 856, 877, 897,
         917, 938, 958, 979, 999],
    # stride 999/249 = 4 + 3/249: 4 i + round(3 i / 249), which steps up after i = 41, 124, 207 (no ties)
    250: [4 * i + (0 if i <= 41 else 1 if i <= 124 else 2 if i <= 207 else 3) for i in range(250)],
    1000: list(range(1000)),  # stride 1
}


@pytest.mark.parametrize("count", sorted(RESPACED))
def test_space_timesteps_are_the_official_ones(count):
    assert space_timesteps(1000, count) == RESPACED[count]


# improved-diffusion "ddimN": the first integer stride k with len(range(0, T, k)) == N
DDIM = {10: range(0, 1000, 100), 25: range(0, 1000, 40), 30: range(0, 1000, 34), 50: range(0, 1000, 20)}


@pytest.mark.parametrize("count", sorted(DDIM))
def test_ddim_uniform_is_improved_diffusion_ddimN(count):
    ts = ddim_timesteps(1000, count, "uniform")
    assert ts == list(DDIM[count]) and len(ts) == count
    assert ddim_timesteps(1000, 30, "uniform")[-1] == 986  # the real-valued stride ended at 966


def test_ddim_timesteps_other_selections():
    from bench.api import BenchError

    with pytest.raises(BenchError, match=r"nearest valid counts 334 and 500 .*uniform_real"):
        ddim_timesteps(1000, 400, "uniform")  # no integer stride gives 400 steps (3 -> 334, 2 -> 500)
    with pytest.raises(BenchError, match="nearest valid counts 36 and 38"):
        ddim_timesteps(1000, 37, "uniform")
    with pytest.raises(BenchError):
        ddim_timesteps(1000, 1, "uniform")   # as officially: range(1, T) has no stride >= T
    # uniform_real: floor(i T / count), any count (the suite's earlier 'uniform')
    assert ddim_timesteps(1000, 30, "uniform_real") == [int(1000 / 30 * i) for i in range(30)]
    assert ddim_timesteps(1000, 30, "uniform_real")[-1] == 966
    assert len(ddim_timesteps(1000, 400, "uniform_real")) == 400
    # respace: DiT's ddim_sample_loop on create_diffusion(str(count)) = the ancestral respacing
    assert ddim_timesteps(1000, 21, "respace") == RESPACED[21]
    quad = ddim_timesteps(1000, 100, "quad")
    assert quad[0] == 0 and quad == sorted(set(quad))
    assert 790 <= quad[-1] <= 800  # DDIM App. D.2: the quadratic sequence reaches 0.8 T
    with pytest.raises(ValueError):
        ddim_timesteps(1000, 10, "cubic")
    # the network is evaluated once per selected step
    gd = GaussianDiffusion(learn_sigma=False)
    assert gd.nfe("ddim", 30, "uniform") == 30 and gd.nfe("ddpm", 21) == 21


def test_one_respaced_step_is_timestep_zero():
    # official respacing of 1 step keeps t = 0 (beta_0): one ancestral step from the noise, called with t = 0
    gd = GaussianDiffusion(learn_sigma=False, var_type="fixed_small")
    seen = []
    gd.sample(lambda x, t: seen.append(t.tolist()) or torch.zeros_like(x), torch.ones(2, 1, 1, 1),
              lambda x: torch.zeros_like(x), sampler="ddpm", steps=1)
    assert seen == [[0, 0]]


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


@pytest.mark.parametrize("sampler,steps,tol,kw", [
    ("dopri5", 250, 1e-2, {}),                           # SiT's tolerances: 0.75 % of S at worst
    ("dopri5", 250, 1e-5, {"rtol": 1e-6, "atol": 1e-8}),  # the solver itself is exact to its tolerance
    ("heun", 50, 2e-3, {}), ("euler", 250, 2e-2, {})])
def test_flow_ode_follows_the_exact_transport_of_gaussian_data(sampler, steps, tol, kw):
    """Gaussian data N(MU, S^2) per channel: the linear path's probability-flow ODE moves noise z to
    x_t = t MU + sqrt(t^2 S^2 + (1 - t)^2) z (its velocity is v_star), so every sample has a closed-form
    end point MU + S z; each solver must land there (dopri5 at SiT's atol 1e-6, rtol 1e-3)."""
    z = torch.randn(64, 2, K, generator=torch.Generator().manual_seed(3))
    x = LinearFlow(**kw).sample(v_star, z, None, sampler=sampler, steps=steps)
    exact = _per_channel(MU, z) + _per_channel(S, z) * z
    assert (x - exact).abs().max() <= tol * float(S.max())


def _official_space_timesteps(T: int, count: int) -> list[int]:
    """improved-diffusion / DiT `space_timesteps(T, [count])` (respace.py), one section: a float
    cursor that adds (T - 1) / (count - 1) per step and rounds (1 for count <= 1)."""
    stride = 1 if count <= 1 else (T - 1) / (count - 1)
    cur, out = 0.0, []
    for _ in range(count):
        out.append(round(cur))
        cur += stride
    return sorted(set(out))


def _official_ddim(T: int, count: int) -> list[int] | None:
    """improved-diffusion `space_timesteps(T, "ddim<count>")`: the first integer stride i in 1..T-1 with
    len(range(0, T, i)) == count; None where it raises (no such stride)."""
    for i in range(1, T):
        if len(range(0, T, i)) == count:
            return list(range(0, T, i))
    return None


def test_respacing_and_ddim_match_the_official_lists_for_every_count():
    """Every count 1..1000: respaced DDPM timesteps, and DDIM's `ddimN` where the official code accepts
    N (an exact integer stride); the counts it refuses are refused here too, with the valid ones named."""
    from bench.api import BenchError

    refused = 0
    for count in range(1, 1001):
        assert space_timesteps(1000, count) == _official_space_timesteps(1000, count), count
        want = _official_ddim(1000, count)
        if want is None:
            refused += 1
            with pytest.raises(BenchError):
                ddim_timesteps(1000, count, "uniform")
        else:
            assert ddim_timesteps(1000, count, "uniform") == want, count
    assert 0 < refused < 1000
