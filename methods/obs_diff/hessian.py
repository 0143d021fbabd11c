"""Layer Hessians from inputs collected along the teacher's sampling trajectory (card: methods.obs_diff, O1-O2).

The probes' noise is integrated by the model itself (a short deterministic sampler, CFG as in the
evaluation protocol); a forward pre-hook on every layer of the current module package adds the
layer's input X_t at sampling step t with weight alpha_t: H = 2 sum_t alpha_t X_t X_t^T / sum_t
alpha_t n_t. With CFG the conditional and the null-label halves both contribute (methods.md 5g).
"""
from __future__ import annotations

import torch

from bench.api import BenchError
from bench.processes import guided
from methods.obs_diff.obs import HessianAccumulator, timestep_weights


def default_sampler(net) -> str:
    """One network call per step, deterministic: DDIM (eta 0) for DDPM, Euler for flow."""
    return "ddim" if net.process.kind == "ddpm" else "euler"


def trajectory_hessians(net, layers: dict[str, torch.nn.Module], x_T: torch.Tensor, y: torch.Tensor,
                        sampler: str = "auto", steps: int = 10, cfg_scale: float = 1.5, cfg_convention: str = "all",
                        weighting: str = "log_decrease", w_min: float = 0.8, w_max: float = 1.2,
                        batch_size: int = 64, seed: int = 0) -> tuple[dict[str, torch.Tensor], list[float]]:
    """name -> H (float64, [in, in]) for every nn.Linear in `layers`, and the step weights used.
    x_T: the probes' starting noise, y: their labels."""
    sampler = default_sampler(net) if sampler == "auto" else sampler
    per_call = 2 if sampler == "heun" else 1                    # network calls per sampling step
    n_steps = max(1, net.process.nfe(sampler, steps) // per_call)
    alpha = timestep_weights(n_steps, weighting, w_min, w_max)
    accs = {n: HessianAccumulator(m.in_features, device=m.weight.device) for n, m in layers.items()}
    ctx = {"w": 1.0, "call": 0}
    handles = []
    for n, m in layers.items():
        if not isinstance(m, torch.nn.Linear):
            raise BenchError(f"OBS-Diff collects inputs of linear layers; {n} is a {type(m).__name__}")
        handles.append(m.register_forward_pre_hook(
            lambda mod, args, n=n: accs[n].add(args[0], ctx["w"], count=args[0].shape[0])))

    def model_fn(x, t, yy):
        ctx["w"] = alpha[min(ctx["call"] // per_call, n_steps - 1)]   # step 1 = the first, noisiest
        ctx["call"] += 1
        return net(x, t, yy)

    gen = torch.Generator().manual_seed(int(seed))
    randn = lambda x: torch.randn(x.shape, generator=gen).to(x)
    try:
        with net.eval_mode(), torch.no_grad():
            for a in range(0, x_T.shape[0], batch_size):
                ctx["call"] = 0
                yb = y[a:a + batch_size]
                fn = guided(model_fn, yb, cfg_scale, net.null_label, cfg_convention, net.in_channels)
                net.process.sample(fn, x_T[a:a + batch_size], randn, sampler=sampler, steps=steps)
    finally:
        for h in handles:
            h.remove()
    return {n: a.H for n, a in accs.items()}, alpha
