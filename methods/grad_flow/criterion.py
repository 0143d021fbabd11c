"""Prunable units as parameter slices, soft masks on them, and the gradient-flow criterion.

A unit (an attention head, an MLP hidden channel, a U-Net channel or head, a whole transformer
block) owns slices of parameters. Its soft mask m_u in [0, 1] multiplies every slice it owns, so
the forward sees theta_eff = theta * m (m = 1: untouched, m = 0: every weight of the unit is zero).
For DiT/SiT, m = 0 is exactly the removed unit: a head with zero q/k/v rows and zero proj columns
adds nothing, an MLP channel with zero fc1 row and bias gives GELU(0) = 0 into a zero fc2 column,
and a block with zero adaLN modulation has zero gates (adaLN-Zero) so it returns its input.

Criterion (card, methods.grad_flow, G1-G3): with g = grad_theta L on the calibration batch and
G = ||g||^2, removing unit u moves theta by delta = -theta_u (its slices), so to first order

    Delta G_u  ~=  grad G . delta  =  2 (H g) . delta  =  -2 theta_u . (H g)_u

H g is one Hessian-vector product (double backward, Pearlmutter 1994), computed in batches:
pass 1 accumulates g, pass 2 accumulates H g = grad_theta( grad_theta L_b . g ) over batches.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from bench.api import BenchError


@dataclass
class UnitGroup:
    """One plan key's units. Width groups: ``members`` = (param name, dim, idx[size, w]) shared by
    all units (unit j owns param.index_select(dim, idx[j])), as bench.width.WidthGroup but by name
    so that the same group addresses the EMA copy. Blocks: ``unit_params[j]`` = names of every
    parameter of block j (the unit owns them whole)."""

    name: str
    kind: str                       # "heads" | "channels" | "blocks"
    dense_ids: list[int]
    members: list[tuple[str, int, torch.Tensor]] = field(default_factory=list)
    unit_params: list[list[str]] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.dense_ids)


def collect_units(net, units: str) -> dict[str, UnitGroup]:
    """name -> UnitGroup of the current model: ``units="width"`` (net.width_groups(): DiT/SiT heads
    and MLP channels, U-Net channels and heads) or ``"blocks"`` (DiT/SiT transformer blocks)."""
    names = {id(p): n for n, p in net.named_parameters()}
    if units == "width":
        out = {}
        for gname, g in net.width_groups().items():
            out[gname] = UnitGroup(gname, g.kind, list(g.dense_ids),
                                   members=[(names[id(p)], dim, idx) for p, dim, idx in g.members])
        if not out:
            raise BenchError(f"{net.name} has no width groups to prune")
        return out
    if units == "blocks":
        if net.depth == 0:
            raise BenchError(f"{net.name} has no transformer blocks; block-level gradient flow needs DiT/SiT "
                             "(use method=grad_flow for width units, which also covers the U-Net)")
        per = [[names[id(p)] for p in ps] for ps in net.block_params()]
        return {"blocks": UnitGroup("blocks", "blocks", list(net.kept_blocks), unit_params=per)}
    raise BenchError(f"grad_flow units={units!r} is unknown; use width or blocks")


# --------------------------------------------------------------------------------------------
# Soft masks
# --------------------------------------------------------------------------------------------

def multipliers(params: dict[str, torch.Tensor], groups: dict[str, UnitGroup],
                masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-parameter multiplier tensors for the given unit masks (group -> [size] values); only
    parameters that some mask below 1 touches appear. A parameter in two groups (a U-Net conv:
    its output channels in one group, its input channels in another) gets the product."""
    vec: dict[tuple[str, int], torch.Tensor] = {}
    whole: dict[str, float] = {}
    for gname, g in groups.items():
        m = masks.get(gname)
        if m is None or bool((m >= 1).all()):
            continue
        m = m.detach().double().cpu()
        if g.kind == "blocks":
            for j, pnames in enumerate(g.unit_params):
                if m[j] < 1:
                    for n in pnames:
                        whole[n] = whole.get(n, 1.0) * float(m[j])
            continue
        for n, dim, idx in g.members:
            key = (n, dim)
            if key not in vec:
                vec[key] = torch.ones(params[n].shape[dim], dtype=torch.float64)
            v = vec[key]
            v[idx.reshape(-1)] = v[idx.reshape(-1)] * m.repeat_interleave(idx.shape[1])
    out: dict[str, torch.Tensor] = {}
    for (n, dim), v in vec.items():
        p = params[n]
        shape = [1] * p.ndim
        shape[dim] = p.shape[dim]
        t = v.reshape(shape)
        out[n] = t if n not in out else out[n] * t
    for n, s in whole.items():
        out[n] = out.get(n, torch.ones([1] * params[n].ndim, dtype=torch.float64)) * s
    return {n: t.to(device=params[n].device, dtype=params[n].dtype) for n, t in out.items()}


def soft_group_norm(gn: torch.nn.GroupNorm, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """GroupNorm whose channel c counts in its group's statistics with weight m_c (Wu & He 2018,
    Eq. 1 with weighted sets): m = 1 everywhere is F.group_norm, m_c = 0 leaves channel c out,
    exactly as removing it does (bench.models.unet.SegmentGroupNorm normalises the survivors of each
    original group). The affine parameters are the module's current ones (already masked)."""
    n, c = x.shape[:2]
    groups = getattr(gn, "channel_group", None)
    if groups is None:
        gid = torch.arange(c, device=x.device) // (c // gn.num_groups)
    else:
        order = {g: i for i, g in enumerate(sorted(set(groups)))}
        gid = torch.tensor([order[g] for g in groups], device=x.device)
    ng = int(gid.max()) + 1
    xf = x.reshape(n, c, -1).float()
    mw = m.reshape(-1).to(xf)
    cnt = torch.zeros(ng, device=x.device, dtype=xf.dtype).index_add_(0, gid, mw).clamp_min(1e-12) * xf.shape[-1]
    mean = torch.zeros(n, ng, device=x.device, dtype=xf.dtype).index_add_(1, gid, xf.sum(-1) * mw) / cnt
    xc = xf - mean[:, gid, None]
    var = torch.zeros(n, ng, device=x.device, dtype=xf.dtype).index_add_(1, gid, xc.pow(2).sum(-1) * mw) / cnt
    y = (xc * torch.rsqrt(var[:, gid, None] + gn.eps)).to(x.dtype).reshape_as(x)
    if gn.affine:
        shape = (1, c) + (1,) * (x.ndim - 2)
        y = y * gn.weight.reshape(shape) + gn.bias.reshape(shape)
    return y


class MaskHooks:
    """Soft masks in the forward of one module tree (the training model, and the EMA copy).

    A forward pre-hook on every module that owns a masked parameter swaps the parameter for
    ``param * multiplier`` (a non-leaf tensor: gradients reach the parameter, scaled by the mask)
    and a forward hook (always_call: also after an exception) puts the parameter back, so
    parameters(), state_dict(), the optimizer and the EMA only ever see the raw parameters.
    A GroupNorm whose channels are masked also weights them in its statistics (soft_group_norm),
    so that mask 0 equals removal on the U-Net too.
    ``mult`` is shared: the callback rewrites it when the masks move; an empty dict is a no-op."""

    def __init__(self, module: torch.nn.Module, names: list[str], mult: dict[str, torch.Tensor]):
        self.mult, self.active, self.handles = mult, True, []
        by_mod: dict[str, list[str]] = {}
        for n in names:
            path, _, attr = n.rpartition(".")
            by_mod.setdefault(path, []).append(attr)
        for path, attrs in by_mod.items():
            mod = module.get_submodule(path)
            full = [f"{path}.{a}" if path else a for a in attrs]
            saved: dict[str, torch.Tensor] = {}
            if isinstance(mod, torch.nn.GroupNorm) and "weight" in attrs:
                wname = full[attrs.index("weight")]

                def norm(m, args, out, wname=wname):  # runs before the restore hook below
                    t = self.mult.get(wname)
                    return None if t is None else soft_group_norm(m, args[0], t)
                self.handles.append(mod.register_forward_hook(norm))

            def pre(m, args, attrs=attrs, full=full, saved=saved):
                if not self.active:
                    return
                for a, n in zip(attrs, full):
                    t = self.mult.get(n)
                    if t is not None:
                        p = m._parameters[a]
                        saved[a] = p
                        m._parameters[a] = p * t   # the module computes with theta * m

            def post(m, args, out, saved=saved):
                for a, p in saved.items():
                    m._parameters[a] = p
                saved.clear()

            self.handles.append(mod.register_forward_pre_hook(pre))
            self.handles.append(mod.register_forward_hook(post, always_call=True))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


@contextlib.contextmanager
def masked_weights(net, mult: dict[str, torch.Tensor], hooks: list[MaskHooks] = ()):
    """Write theta * m into the parameters in place (hooks paused), restore them bit-exactly after:
    the criterion differentiates with respect to the effective weights theta_eff."""
    params = dict(net.named_parameters())
    saved = {n: params[n].detach().clone() for n in mult}
    for h in hooks:
        h.active = False
    try:
        with torch.no_grad():
            for n, t in mult.items():
                params[n].mul_(t)
        yield
    finally:
        with torch.no_grad():
            for n, v in saved.items():
                params[n].copy_(v)
        for h in hooks:
            h.active = True


# --------------------------------------------------------------------------------------------
# The criterion: first-order change of ||grad L||^2 through a Hessian-vector product
# --------------------------------------------------------------------------------------------

def _math_sdpa():
    """Double backward needs the math attention kernel (the fused CPU/CUDA kernels' backward is
    not differentiable)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel(SDPBackend.MATH)
    except ImportError:  # pragma: no cover - older torch
        return contextlib.nullcontext()


LOSSES = ("simple", "training")


def calib_loss(net, x0, y, noise, u, loss: str = "simple"):
    """The diffusion loss on fixed probes (deterministic: eval mode, no label dropout).
    simple: the mean squared error of the prediction (eps for DDPM, velocity for flow; DDPM's
    "L_simple", Ho et al. 2020 Eq. 14) -- a smooth function of theta, so the double backward gives
    the exact Hessian-vector product. training: the model's own training loss (DiT's learned-variance
    term included); its stop-gradient on the predicted mean is held fixed by the double backward,
    so H g is then that of the loss with the stop-gradient frozen."""
    if loss == "training":
        return net.loss(x0, y, u=u, noise=noise)
    x_t, t = net.noisy(x0, u, noise)
    out = net(x_t, t, y)
    C = x0.shape[1]
    target = (x0 - noise) if net.process.kind == "flow" else noise
    return ((out[:, :C] - target) ** 2).mean()


def grad_and_hvp(net, calib, n_probes: int, batch_size: int, loss: str = "simple") -> tuple[dict, dict, float]:
    """(g, H g, G = ||g||^2) on the first n_probes calibration probes, by parameter name.
    The caller sets eval mode and the (effective) weights."""
    params = {n: p for n, p in net.named_parameters() if p.requires_grad}
    names, plist = list(params), list(params.values())
    n = min(int(n_probes), len(calib))
    if n < 1:
        raise BenchError("grad_flow needs at least one calibration probe")
    dev = net.device
    batches = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    probe = lambda a, b: tuple(t[a:b].to(dev) for t in (calib.x0, calib.y, calib.noise, calib.u))
    with torch.enable_grad(), _math_sdpa():
        g = [torch.zeros_like(p) for p in plist]
        for a, b in batches:  # pass 1: g = grad of the mean loss over all probes
            lv = calib_loss(net, *probe(a, b), loss) * ((b - a) / n)
            if not torch.isfinite(lv):
                raise BenchError(f"calibration loss is {lv.item()} while computing the gradient-flow criterion")
            for acc, gi in zip(g, torch.autograd.grad(lv, plist, allow_unused=True)):
                if gi is not None:
                    acc.add_(gi)
        hv = [torch.zeros_like(p) for p in plist]
        for a, b in batches:  # pass 2: H g = grad( grad L_b . g ), batch by batch
            lv = calib_loss(net, *probe(a, b), loss) * ((b - a) / n)
            gb = torch.autograd.grad(lv, plist, create_graph=True, allow_unused=True)
            dot = sum((x * y).sum() for x, y in zip(gb, g) if x is not None)
            if not dot.requires_grad:
                continue
            for acc, hi in zip(hv, torch.autograd.grad(dot, plist, allow_unused=True)):
                if hi is not None:
                    acc.add_(hi.detach())
    G = float(sum(x.double().pow(2).sum() for x in g))
    return dict(zip(names, g)), dict(zip(names, hv)), G


def unit_dot(groups: dict[str, UnitGroup], a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per unit: sum over the unit's slices of a * b (float64). Parameters missing from `a` or
    `b` (frozen ones) contribute 0."""
    out = {}
    for gname, g in groups.items():
        s = torch.zeros(g.size, dtype=torch.float64)
        if g.kind == "blocks":
            for j, pnames in enumerate(g.unit_params):
                s[j] = sum(float((a[n].double() * b[n].double()).sum()) for n in pnames if n in a and n in b)
        else:
            for n, dim, idx in g.members:
                if n not in a or n not in b:
                    continue
                prod = (a[n].double() * b[n].double()).movedim(dim, 0)[idx.reshape(-1).to(a[n].device)]
                s += prod.reshape(g.size, -1).sum(1).cpu()
        out[gname] = s
    return out


def gradient_flow_scores(net, groups: dict[str, UnitGroup], calib, n_probes: int = 64, batch_size: int = 64,
                         mult: dict | None = None, hooks: list[MaskHooks] = (), loss: str = "simple") -> dict:
    """Delta G_u ~= -2 theta_eff,u . (H g)_u for every unit, at the effective (masked) weights.
    Returns {"delta_G": {group: [size] float64}, "G": ||g||^2}."""
    mult = mult or {}
    with net.eval_mode(), masked_weights(net, mult, hooks):
        _, hv, G = grad_and_hvp(net, calib, n_probes, batch_size, loss)
        theta = {n: p.detach() for n, p in net.named_parameters() if n in hv}
        s = unit_dot(groups, theta, hv)
    return {"delta_G": {k: -2.0 * v for k, v in s.items()}, "G": G}


def importance(delta_G: torch.Tensor, prune: str) -> torch.Tensor:
    """Higher = keep. ``most_increase``: prune the units whose removal raises ||g||^2 the most
    (GraSP's rule, the abstract's wording); ``least_increase``: prune those whose removal raises it
    the least (or lowers it most); ``least_change``: prune those that change it least (|Delta G|)."""
    if prune == "most_increase":
        return -delta_G
    if prune == "least_increase":
        return delta_G.clone()
    if prune == "least_change":
        return delta_G.abs()
    raise BenchError(f"grad_flow prune={prune!r} is unknown; use most_increase, least_increase or least_change")
