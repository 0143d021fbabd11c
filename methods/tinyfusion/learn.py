"""TinyFusion's learnable depth pruning: local N:M layer groups, a categorical distribution over
each group's candidate masks sampled by hard Gumbel-softmax, a jointly trained low-rank update
for recoverability, the decision from an EMA of the logits (arXiv 2412.01199 Sec. 3.2; methods.md 7b-7c).

    learn_masks(net, calib, groups, ..., data=None) -> dict(kept, ema_logits, logits, candidates, log)

Batches come from the training set `data` through bench.loader (the shared fine-tune loop's batch
source, with the set's flips and workers), or, with data=None, from the calibration probes' images.

Nothing of `net` changes: the low-rank update lives in forward hooks on the nn.Linear layers and
is discarded with them; the dense weights are frozen while the masks learn (update="lora").
"""
from __future__ import annotations

import itertools
import math
import time
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.api import BenchError
from bench.loader import batches


# --------------------------------------------------------------------------------------------
# Groups and candidate masks
# --------------------------------------------------------------------------------------------

def make_groups(depth: int, group_size: int, n_keep: int) -> list[tuple[list[int], int]]:
    """Consecutive groups of `group_size` positions (the last one may be shorter) and how many
    blocks each keeps, summing to n_keep: proportional to the group size, the remainder going to
    evenly spaced groups (equal-size groups with n_keep = K N give the paper's uniform N:M)."""
    if group_size < 1:
        raise BenchError("tinyfusion group_size must be >= 1")
    if not 0 <= n_keep <= depth:
        raise BenchError(f"tinyfusion cannot keep {n_keep} of {depth} blocks")
    groups = [list(range(i, min(i + group_size, depth))) for i in range(0, depth, group_size)]
    K = len(groups)
    exact = [n_keep * len(g) / depth for g in groups]
    n = [int(math.floor(e + 1e-9)) for e in exact]
    rest = n_keep - sum(n)
    # largest fractional part first; among equals, evenly spaced positions (round((j + 1/2) K / rest))
    spread = {int((j + 0.5) * K / rest): j for j in range(rest)} if rest else {}
    order = sorted(range(K), key=lambda k: (-(exact[k] - n[k]), 0 if k in spread else 1, k))
    for k in order[:rest]:
        n[k] += 1
    return [(g, min(len(g), nk)) for g, nk in zip(groups, n)]


def candidates(m: int, n: int) -> torch.Tensor:
    """All C(m, n) binary keep masks of a group, as rows (C, m), in lexicographic order."""
    rows = [[1.0 if i in c else 0.0 for i in range(m)] for c in itertools.combinations(range(m), n)]
    return torch.tensor(rows)


# --------------------------------------------------------------------------------------------
# The low-rank update (LoRA, Hu et al. 2021, arXiv 2106.09685: W + (alpha / r) B A, B = 0 at init)
# --------------------------------------------------------------------------------------------

class LoRAHooks:
    """Adds (alpha / r) x A^T B^T to the output of every targeted nn.Linear through a forward
    hook: no module or weight of the model is replaced, and remove() restores it exactly."""

    def __init__(self, module: nn.Module, rank: int, alpha: float, targets: str, generator: torch.Generator):
        self.params: list[nn.Parameter] = []
        self.handles = []
        scale = alpha / rank
        for name, lin in module.named_modules():
            if not isinstance(lin, nn.Linear) or (targets == "blocks" and not name.startswith("blocks.")):
                continue
            dev = lin.weight.device
            a = torch.empty(rank, lin.in_features)
            bound = 1.0 / math.sqrt(lin.in_features)  # kaiming-uniform(a=sqrt 5) bound, as nn.Linear / peft
            a.uniform_(-bound, bound, generator=generator)
            A = nn.Parameter(a.to(dev))
            B = nn.Parameter(torch.zeros(lin.out_features, rank, device=dev))
            self.params += [A, B]
            self.handles.append(lin.register_forward_hook(
                lambda mod, inp, out, A=A, B=B: out + F.linear(F.linear(inp[0], A), B) * scale))
        if not self.params:
            raise BenchError(f"tinyfusion found no nn.Linear to adapt (lora_targets={targets!r})")

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


@contextmanager
def frozen(module: nn.Module):
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)


# --------------------------------------------------------------------------------------------
# Gated forward: x_{i+1} = m_i phi_i(x_i) + (1 - m_i) x_i, per sample
# --------------------------------------------------------------------------------------------

def gated_forward(dit, x, t, y, mask: torch.Tensor, generator=None):
    """DiT/SiT forward with a per-sample, per-block gate mask (N, depth) in [0, 1]."""
    h, c = dit.embed(x, t, y, None, generator)
    for i, block in enumerate(dit.blocks):
        m = mask[:, i].view(-1, 1, 1).to(h.dtype)
        h = h + m * (block(h, c) - h)
    out = dit.unpatchify(dit.final_layer(h, c))
    from bench.models.dit import SiT
    if isinstance(dit, SiT) and dit.learn_sigma:
        out = out[:, : dit.in_channels]
    return out


def _gumbel(shape, generator) -> torch.Tensor:
    u = torch.rand(shape, generator=generator).clamp_(1e-10, 1.0 - 1e-10)
    return -torch.log(-torch.log(u))


def learn_masks(net, calib, groups: list[tuple[list[int], int]], *, steps: int = 150, batch: int = 32,
                update: str = "lora", lora_rank: int = 8, lora_alpha: float = 16.0, lora_targets: str = "all",
                lr: float = 1e-3, gate_lr: float = 1e-2, tau: tuple[float, float] = (4.0, 0.1),
                scaling: float = 100.0, logit_init: float = 0.02, ema_decay: float = 0.99,
                grad_clip: float = 1.0, u_range: tuple[float, float] = (0.0, 1.0),
                prior: list[list[float]] | None = None, seed: int = 0, log_every: int = 25, data=None) -> dict:
    """Learn the keep masks of `groups` (positions in net.backbone.blocks, keep counts). Returns the
    decision (argmax of the EMA logits per group), logits, candidates and a training log.
    `data`: the training set (bench.data.Dataset) the batches are drawn from, as the fine-tune loop
    draws them (bench.loader, from this phase's generator); None: the calibration probes."""
    if update not in ("lora", "full", "frozen"):
        raise BenchError(f"tinyfusion update={update!r} is unknown; use lora | full | frozen")
    import copy

    dev = net.device
    gen = torch.Generator().manual_seed(seed)
    cands = [candidates(len(g), n) for g, n in groups]
    logits = []
    for k, c in enumerate(cands):
        init = torch.full((c.shape[0],), float(logit_init))
        if prior is not None:
            init = init + torch.tensor(prior[k], dtype=torch.float32) / scaling  # prior on the scaled logits
        logits.append(nn.Parameter(init.to(dev)))
    ema = [g.detach().clone() for g in logits]
    learn = [k for k, c in enumerate(cands) if c.shape[0] > 1]  # single-candidate groups are decided
    if not learn:
        return _decision(groups, cands, logits, ema, [], 0.0, scaling)
    model = copy.deepcopy(net.backbone) if update == "full" else net.backbone
    was = model.training
    hooks = None
    weights: list[nn.Parameter] = []
    t0 = time.perf_counter()
    log = []
    with frozen(net.backbone):
        if update == "lora":
            hooks = LoRAHooks(model, int(lora_rank), float(lora_alpha), lora_targets, gen)
            weights = hooks.params
        elif update == "full":
            model.requires_grad_(True)
            weights = [p for n_, p in model.named_parameters() if n_ != "pos_embed"]
        groups_opt = [{"params": [logits[k] for k in learn], "lr": gate_lr}]
        if weights:
            groups_opt.append({"params": weights, "lr": lr})
        opt = torch.optim.AdamW(groups_opt, weight_decay=0.0)
        model.train()  # DiT training: label dropout for CFG, as in the pruning phase of the paper
        depth = len(model.blocks)
        pos_of = [torch.tensor(g, device=dev) for g, _ in groups]
        lo, hi = float(u_range[0]), float(u_range[1])
        train = None if data is None else batches(data, batch, gen, seed, steps=int(steps), device=dev)
        try:
            for step in range(int(steps)):
                tau_t = tau[0] + (tau[1] - tau[0]) * step / max(1, steps - 1)  # linear 4 -> 0.1 (paper)
                if train is not None:  # the training set (the paper: one epoch of ImageNet latents, flipped)
                    x0, y = (v.to(dev) for v in next(train))
                else:
                    idx = torch.randint(len(calib), (batch,), generator=gen)
                    x0, y = calib.x0[idx.to(calib.x0.device)].to(dev), calib.y[idx.to(calib.y.device)].to(dev)
                if (lo, hi) == (0.0, 1.0):
                    t = net.process.sample_t(batch, gen, dev)
                else:
                    t = net.process.t_from_u((lo + (hi - lo) * torch.rand(batch, generator=gen)).to(dev))
                noise = torch.randn(x0.shape, generator=gen).to(dev)
                mask = torch.ones(batch, depth, device=dev)
                for k, (c, pos) in enumerate(zip(cands, pos_of)):
                    if c.shape[0] == 1:
                        m = c.to(dev).expand(batch, -1)
                    else:  # hard Gumbel-softmax with straight-through gradients, one draw per sample
                        z = (logits[k] * scaling + _gumbel((batch, c.shape[0]), gen).to(dev)) / tau_t
                        soft = z.softmax(-1)
                        hard = F.one_hot(soft.argmax(-1), c.shape[0]).to(soft.dtype)
                        m = (hard - soft.detach() + soft) @ c.to(dev)
                    mask = mask.index_copy(1, pos, m)
                fn = lambda x_t, t_: gated_forward(model, x_t, t_, y, mask, gen)
                loss = net.process.training_loss(fn, x0, t, noise)
                if not torch.isfinite(loss):  # the paper's script skips such steps
                    continue
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_([logits[k] for k in learn] + weights, grad_clip)
                opt.step()
                with torch.no_grad():
                    for k in learn:
                        ema[k].mul_(ema_decay).add_(logits[k].detach(), alpha=1 - ema_decay)
                if step % log_every == 0 or step == steps - 1:
                    log.append({"step": step, "loss": round(float(loss.detach()), 6), "tau": round(tau_t, 4),
                                "choice": [int(ema[k].argmax()) for k in range(len(cands))]})
        finally:
            if hooks is not None:
                hooks.remove()  # the low-rank update is discarded with its hooks
            model.train(was)
    return _decision(groups, cands, logits, ema, log, time.perf_counter() - t0, scaling)


def _decision(groups, cands, logits, ema, log, seconds, scaling) -> dict:
    kept, marginals = [], []
    for (g, _), c, e in zip(groups, cands, ema):
        pick = int(torch.argmax(e.detach().cpu()))
        kept += [g[i] for i in range(len(g)) if c[pick, i] > 0]
        marginals += ((e.detach().cpu() * scaling).softmax(-1) @ c).tolist()  # keep probability of each block
    return {"kept": sorted(kept), "marginals": marginals, "ema_logits": [e.detach().cpu().tolist() for e in ema],
            "logits": [g.detach().cpu().tolist() for g in logits], "candidates": [c.tolist() for c in cands],
            "log": log, "seconds": round(seconds, 3)}
