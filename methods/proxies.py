"""Zero-shot trainability proxies used by EntPruner's schedule (arXiv 2511.21122 names NTK condition
number and ZiCo; how it uses them is not public, see methods/entpruner for our reading).

NTK condition number (TE-NAS: Chen, Gong & Wang, "Neural Architecture Search on ImageNet in Four
GPU Hours: A Theoretically Inspired Perspective", ICLR 2021, arXiv 2102.11535, Sec. 3.1):
    J[n] = d( sum_c f_c(x_n) ) / d theta,    Theta = J J^T (n x n),    kappa = lambda_max / lambda_min.
    Lower kappa = better conditioned = more trainable. Per-sample gradients of the summed outputs
    come from torch.func (functional_call + vmap + grad), w.r.t. the weights of the Linear/Conv
    layers by default (params="all": every trainable parameter). For a linear model f(x) = w.x,
    J = X and Theta = X X^T (tested). torch.func's first call in a process imports torch._dynamo
    (~2-3 s of CPU, once).

ZiCo (Li, Chen, Hu, Mahdavi & Marculescu, "ZiCo: Zero-shot NAS via Inverse Coefficient of
Variation on Gradients", ICLR 2023, arXiv 2301.11300, the ZiCo equation of Sec. 3.3 / Theorem 3.2):
    ZiCo = sum_layers log( sum_{theta in layer} mean_b |g_b(theta)| / std_b(g_b(theta)) ),
    g_b the gradient of the loss on mini-batch b (here: the diffusion model's own training loss on
    fixed probes). Higher = better. As in the reference implementation, a layer is the weight of a
    Linear/Conv module, std is the population std over the mini-batches, parameters with zero std
    are left out, and a layer whose sum is 0 adds nothing.
    Reference-code quirk (methods.md 1g): the official compute_zico.py calls backward() per
    mini-batch without zero_grad(), so the b-th recorded gradient is the running sum g_1 + ... + g_b.
    ``accumulate=False`` (our default) uses independent per-batch gradients, the paper's definition;
    ``accumulate=True`` reproduces the reference code's running sums.
Neither proxy touches ``.grad`` of the model (torch.autograd.grad / torch.func), so calling them
inside a training loop leaves the optimizer's state alone.
Backbone-specific (``net.backbone``): both proxies are functions of the backbone's Linear / Conv
layers (torch.func.functional_call over its named parameters and buffers).
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Sequence

import torch
import torch.nn as nn

from bench.api import BenchError

PARAM_SETS = ("weights", "all")


def layer_params(model: nn.Module, which: str = "weights") -> list[tuple[str, list[tuple[str, nn.Parameter]]]]:
    """[(layer name, [(param name, param), ...]), ...] of trainable parameters.
    'weights': the weight of every Linear / Conv layer (TE-NAS and ZiCo reference code);
    'all': every trainable parameter, grouped by the module that owns it."""
    if which not in PARAM_SETS:
        raise BenchError(f"proxy params={which!r} is unknown; use one of {PARAM_SETS}")
    out = []
    for mname, mod in model.named_modules():
        if which == "weights":
            if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and mod.weight.requires_grad:
                out.append((mname, [(f"{mname}.weight" if mname else "weight", mod.weight)]))
        else:
            ps = [(f"{mname}.{n}" if mname else n, p) for n, p in mod.named_parameters(recurse=False) if p.requires_grad]
            if ps:
                out.append((mname, ps))
    if not out:
        raise BenchError(f"the model has no trainable {which} parameters for the proxy")
    return out


def ntk_matrix(model: nn.Module, inputs: Sequence[torch.Tensor], output_fn: Callable | None = None,
               params: str = "weights", chunk_size: int | None = None) -> torch.Tensor:
    """Empirical NTK Theta = J J^T (n x n, float64) of the scalar sum of each sample's outputs.
    ``inputs`` are the model's positional inputs, each with the sample dimension first;
    ``output_fn`` post-processes the model output (e.g. keep the prediction channels)."""
    from torch.func import functional_call, grad, vmap

    names = [n for _, ps in layer_params(model, params) for n, _ in ps]
    base = {n: p.detach() for n, p in model.named_parameters()}
    base.update({n: b for n, b in model.named_buffers()})
    sel = {n: base.pop(n) for n in names}
    post = output_fn or (lambda o: o)

    def f(theta, *sample):
        out = functional_call(model, {**base, **theta}, tuple(s.unsqueeze(0) for s in sample))
        return post(out).sum()

    with warnings.catch_warnings():  # CPU attention has no vmap batching rule yet: correct, only slower
        warnings.filterwarnings("ignore", message="There is a performance drop")
        g = vmap(grad(f), in_dims=(None, *([0] * len(inputs))), chunk_size=chunk_size)(sel, *inputs)
    jac = torch.cat([g[n].reshape(inputs[0].shape[0], -1).to(torch.float64) for n in names], dim=1)
    return jac @ jac.T


def condition_number(k: torch.Tensor) -> float:
    """lambda_max / lambda_min of a symmetric PSD matrix (lambda_min floored at 1e-15 lambda_max,
    so a singular NTK gives a large finite number that JSON can hold)."""
    ev = torch.linalg.eigvalsh(k.to(torch.float64))
    lmax = float(ev[-1])
    if lmax <= 0:
        raise BenchError("the NTK is zero (no gradient reaches the selected weights); check the model")
    return lmax / max(float(ev[0]), 1e-15 * lmax)


def ntk_condition(model, inputs, output_fn=None, params: str = "weights", chunk_size=None) -> float:
    return condition_number(ntk_matrix(model, inputs, output_fn, params, chunk_size))


def zico(model: nn.Module, loss_fn: Callable, batches: Sequence, params: str = "weights",
         accumulate: bool = False) -> tuple[float, int]:
    """(ZiCo, number of layers that contributed). ``loss_fn(batch) -> scalar`` for each mini-batch;
    mean |g| and std g over mini-batches are accumulated online (Welford), float64."""
    if len(batches) < 2:
        raise BenchError("ZiCo needs at least 2 mini-batches (a standard deviation over batches)")
    layers = layer_params(model, params)
    flat = [p for _, ps in layers for _, p in ps]
    sum_abs = [torch.zeros(p.shape, dtype=torch.float64, device=p.device) for p in flat]
    mean = [torch.zeros_like(s) for s in sum_abs]
    m2 = [torch.zeros_like(s) for s in sum_abs]
    run = [torch.zeros_like(s) for s in sum_abs] if accumulate else None
    for b, batch in enumerate(batches, start=1):
        grads = torch.autograd.grad(loss_fn(batch), flat, allow_unused=True)
        for j, g in enumerate(grads):
            g = torch.zeros_like(sum_abs[j]) if g is None else g.detach().to(torch.float64)
            if accumulate:  # the reference code's missing zero_grad(): record the running sum
                run[j] += g
                g = run[j]
            sum_abs[j] += g.abs()
            delta = g - mean[j]
            mean[j] += delta / b
            m2[j] += delta * (g - mean[j])
    nb = len(batches)
    total, used, j = 0.0, 0, 0
    for _, ps in layers:
        s = 0.0
        for _ in ps:
            std = (m2[j] / nb).sqrt()
            nz = std > 0
            s += float((sum_abs[j][nz] / nb / std[nz]).sum())
            j += 1
        if s > 0:
            total += math.log(s)
            used += 1
    return total, used


# --------------------------------------------------------------------------------------------
# The two proxies on a Denoiser, with fixed probes (x0, y, noise, u)
# --------------------------------------------------------------------------------------------

def denoiser_ntk_condition(net, x0, y, noise, u, params: str = "weights", chunk_size=None) -> float:
    """TE-NAS condition number of the prediction (eps / velocity channels) at x_t = noisy(x0, u, noise)."""
    C = net.in_channels
    x_t, t = net.noisy(x0, u, noise)
    return ntk_condition(net.backbone, (x_t, t, y), lambda o: o[:, :C], params, chunk_size)


def denoiser_zico(net, x0, y, noise, u, splits: int = 2, params: str = "weights",
                  accumulate: bool = False) -> tuple[float, int]:
    """ZiCo of the model's own training loss over `splits` equal mini-batches of the probes."""
    n = x0.shape[0]
    if splits < 2 or n < splits:
        raise BenchError(f"ZiCo needs 2 <= splits <= probes (splits={splits}, probes={n})")
    cuts = [(i * n // splits, (i + 1) * n // splits) for i in range(splits)]
    batches = [tuple(a[s:e] for a in (x0, y, noise, u)) for s, e in cuts]
    loss = lambda b: net.loss(b[0], b[1], u=b[3], noise=b[2])
    return zico(net.backbone, loss, batches, params, accumulate)
