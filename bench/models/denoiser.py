"""Denoiser: the model as pruning methods see it (the members of the ``bench.api.Denoiser`` protocol).

It pairs a backbone (DiT, SiT, later the U-Net) with its process (DDPM or flow) and speaks the
suite's shared noise-level convention u in [0, 1] (0 clean, 1 pure noise), so a method written
once works on diffusion and flow models alike.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from bench.api import BenchError


REGIONAL = "blocks"  # compile=blocks: regional compilation (below)


def compile_mode(value) -> bool | str:
    """A `compile` setting: false (eager), true (torch.compile of the whole backbone: one graph of every
    block, ~1 min cold for DiT-D28 and again for every new shape) or "blocks" (regional: the blocks share one
    compiled call, so a cold compile traces one block and a pruned model of the same block shapes reuses it)."""
    if value is None or isinstance(value, bool):
        return bool(value)
    if value == REGIONAL:
        return REGIONAL
    raise BenchError(f"compile={value!r}: give false, true (the whole backbone) or {REGIONAL} (each block, regional)")


def _call_block(block, h, c):
    return block(h, c)


_BLOCK_CALL = None  # one compiled function for the process: dynamo's cache (per block shape) outlives a model


def regional_call():
    """The compiled call(block, h, c) of regional compilation. The block is an argument, not a closure:
    a deepcopy of a model (EMA, a method's candidate) that carries it runs its own weights through it."""
    global _BLOCK_CALL
    if _BLOCK_CALL is None:
        _BLOCK_CALL = torch.compile(_call_block)
    return _BLOCK_CALL


def use_regional(backbone: nn.Module) -> None:
    """Route every block of `backbone` through regional_call() until its block_fn is set back to None
    (backbones with a `block_fn`: DiT and SiT; a routed model, Diff-ES' stage router, runs its own loop
    and stays eager)."""
    if not hasattr(backbone, "block_fn"):
        raise BenchError(f"compile={REGIONAL} needs a backbone whose blocks share one signature (DiT, SiT); "
                         f"{type(backbone).__name__} has none: use compile=true or false")
    backbone.block_fn = regional_call()


@contextlib.contextmanager
def regional(backbone: nn.Module):
    """use_regional for the duration of the block."""
    use_regional(backbone)
    try:
        yield
    finally:
        backbone.block_fn = None


class Denoiser:
    def __init__(self, net: nn.Module, process, name: str, num_classes: int, null_label: int | None = None):
        self.net, self.process, self.name = net, process, name
        self.num_classes = num_classes
        self.null_label = num_classes if null_label is None else null_label
        # original (dense) index of each block still present; Plans always speak dense indices
        self.kept_blocks: list[int] = list(range(len(net.blocks)))
        # a compiled forward of `net` (torch.compile; bench.finetune / bench.sample set it for the
        # duration of a loop and drop it after any surgery); None: `net` itself
        self.forward_fn = None
        # the plans a progressive callback applied during the last fine-tune (JSON, in order; bench.finetune
        # sets it): with the run's plan and kept_blocks they rebuild the final structure (bench.run.STRUCTURE)
        self.finetune_plans: list[str] = []

    # ---- prediction ------------------------------------------------------------------------
    def __call__(self, x_t, t, y=None, **kw):
        """Raw prediction (eps [+ variance] for DDPM, velocity for flow) at the native timestep t."""
        return (self.net if self.forward_fn is None else self.forward_fn)(x_t, t, y, **kw)

    @contextlib.contextmanager
    def compiled(self, mode: bool | str = True):
        """Run the block with `self(...)` and `loss()` compiled (compile_mode): true, torch.compile of the
        backbone (static shapes; one graph per batch shape); "blocks", each block through one compiled call
        (regional). The parameters are shared, nothing is copied."""
        mode = compile_mode(mode)
        if not mode:
            yield
            return
        if mode == REGIONAL:
            with regional(self.net):
                yield
            return
        self.forward_fn = torch.compile(self.net)
        try:
            yield
        finally:
            self.forward_fn = None

    @property
    def backbone(self) -> nn.Module:
        """The wrapped module (``net``), for backbone-specific methods only (bench.api.Denoiser)."""
        return self.net

    @property
    def in_channels(self) -> int:
        return self.net.in_channels

    @property
    def input_size(self) -> int:
        return self.net.input_size

    @property
    def depth(self) -> int:
        """Transformer blocks present now (0 for the U-Net, which has none)."""
        return len(self.net.blocks)

    @property
    def label_dropout(self) -> float:
        """Probability that training replaces a label by the null label (CFG); 0: never."""
        emb = getattr(self.net, "y_embedder", None)  # DiT/SiT; the U-Net drops labels itself
        if emb is not None:
            return float(emb.dropout_prob)
        return float(getattr(self.net, "class_dropout_prob", 0.0)) if self.net.num_classes > 0 else 0.0

    def named_parameters(self):
        return self.net.named_parameters()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.net.zero_grad(set_to_none=set_to_none)

    @property
    def device(self):
        return next(self.net.parameters()).device

    def example_inputs(self, batch: int = 1, device=None) -> tuple:
        device = device or self.device
        n = self.net
        x = torch.zeros(batch, n.in_channels, n.input_size, n.input_size, device=device)
        t = self.process.t_from_u(torch.full((batch,), 0.5, device=device))
        y = torch.zeros(batch, dtype=torch.long, device=device)
        return x, t, y

    def noisy(self, x0, u, noise):
        """x_t and native t for clean x0 at noise level u (shared convention)."""
        t = self.process.t_from_u(u)
        return self.process.q_sample(x0, t, noise), t

    def draws(self, shape: tuple, generator: torch.Generator, device=None):
        """One training batch's random draws (bench.api.Draws) from a CPU generator, in the order the
        loss has always taken them: timesteps, noise, then one uniform per label when training drops
        labels (DiT's LabelEmbedder.token_drop, the U-Net's drop_labels). Moved to `device`."""
        from bench.api import Draws

        n, device = shape[0], device or self.device
        t = self.process.sample_t(n, generator, device)
        noise = torch.randn(shape, generator=generator).to(device)
        p = self.label_dropout if self.net.training and self.num_classes > 0 else 0.0
        drop = (torch.rand(n, generator=generator) < p).long().to(device) if p > 0 else None
        return Draws(t, noise, drop)

    def loss(self, x0, y, u=None, noise=None, generator=None, reduction: str = "mean", force_drop_ids=None,
             teacher: "Denoiser | None" = None, distill: float = 0.0, draws=None):
        """The model's own training loss. u pins noise levels (else sampled); noise pins eps;
        `draws` (bench.api.Draws) pins the timesteps, the noise and the dropped labels at once.

        With a teacher and 0 < distill <= 1: (1 - distill) * own loss + distill * MSE between the
        teacher's and the student's predictions on the same x_t, t and labels (Diff-Pruning's
        optional KD, ddpm_exp/functions/losses.py: 0.7 teacher-output MSE + 0.3 noise MSE; the
        student's own loss keeps the learned-sigma term when there is one)."""
        n = x0.shape[0]
        if draws is None:
            t = self.process.sample_t(n, generator, x0.device) if u is None else self.process.t_from_u(u)
            if noise is None:
                noise = torch.randn(x0.shape, generator=generator).to(x0.device) if generator is not None else torch.randn_like(x0)
        else:
            t, noise = draws.t, draws.noise
            force_drop_ids = draws.drop  # None: this batch drops no labels (no dropout, or eval mode)
        if teacher is None or distill <= 0:
            model_fn = lambda x_t, t_: self(x_t, t_, y, force_drop_ids=force_drop_ids, generator=generator)
            return self.process.training_loss(model_fn, x0, t, noise, reduction=reduction)
        if force_drop_ids is None and draws is not None:
            force_drop_ids = torch.zeros(n, dtype=torch.long, device=x0.device)
        if force_drop_ids is None:  # the same label dropout for student and teacher
            p = getattr(getattr(self.net, "y_embedder", None), "dropout_prob", 0.0) if self.net.training else 0.0
            r = torch.rand(n, generator=generator) if generator is not None else torch.rand(n)
            force_drop_ids = (r < p).long().to(x0.device)
        held = {}

        def model_fn(x_t, t_):
            out = self(x_t, t_, y, force_drop_ids=force_drop_ids)
            with torch.no_grad():
                held["teacher"] = teacher.net(x_t, t_, y, force_drop_ids=force_drop_ids)
            held["student"] = out
            return out
        own = self.process.training_loss(model_fn, x0, t, noise, reduction="none")
        C = x0.shape[1]
        kd = ((held["student"][:, :C] - held["teacher"][:, :C]) ** 2).mean(dim=tuple(range(1, x0.ndim)))
        loss = (1 - distill) * own + distill * kd
        return loss.mean() if reduction == "mean" else loss

    def hidden_states(self, x_t, t, y):
        """Residual stream before block 0 and after every block: list of depth+1 tensors (N, T, D)."""
        _, hidden = self.net(x_t, t, y, return_hidden=True)
        return hidden

    # ---- prunable units --------------------------------------------------------------------
    def units(self, granularity: str = "block") -> dict[str, int]:
        if granularity == "block":
            return {"blocks": len(self.net.blocks)}
        if granularity == "operator":
            if hasattr(self.net, "operator_units"):  # the U-Net: ResNet blocks and attentions
                return self.net.operator_units()
            return {"attn": len(self.net.blocks), "mlp": len(self.net.blocks)}
        if granularity == "width":
            return {k: g.size for k, g in self.width_groups().items()}
        raise BenchError(f"granularity {granularity!r} is not supported by {self.name} (block, operator, width)")

    # ---- width units (bench.width) -------------------------------------------------------
    def width_groups(self):
        """name -> bench.width.WidthGroup for every prunable width group of the current model."""
        from bench.width import width_groups
        return width_groups(self)

    def prune_width(self, name: str, keep_dense: list[int]) -> None:
        """Shape surgery (Torch-Pruning) keeping the given dense unit ids of one group; only
        bench.surgery calls this."""
        from bench.width import prune_width
        prune_width(self, name, keep_dense)

    def remove_operators(self, group: str, keep: list[int]) -> None:
        """Remove bypassed operators for good (LD-Pruner plans): DiT attention / MLP branches by
        dense block index; the U-Net's ResNet blocks and attentions by its own operator ids."""
        if hasattr(self.net, "remove_operators"):
            return self.net.remove_operators(group, keep)
        if group not in ("attn", "mlp"):
            raise BenchError(f"unknown operator group {group!r}; {self.name} has attn, mlp")
        keep = set(int(i) for i in keep)
        for b, block in zip(self.kept_blocks, self.net.blocks):
            if b not in keep:
                setattr(block, "skip_" + group, True)
                setattr(block, group, None)     # the branch's weights are gone, not just skipped

    @contextlib.contextmanager
    def eval_mode(self):
        """Score in eval mode (no label dropout), then restore the mode the model was given in."""
        was = self.net.training
        self.net.eval()
        try:
            yield
        finally:
            self.net.train(was)

    @contextlib.contextmanager
    def ablate(self, group: str, idx):
        """Temporarily bypass units; the residual stream passes through unchanged."""
        idx = set(int(i) for i in idx)
        blocks = self.net.blocks
        if group == "blocks":
            self.net.blocks = nn.ModuleList([b for i, b in enumerate(blocks) if i not in idx])
            try:
                yield
            finally:
                self.net.blocks = blocks
        elif hasattr(self.net, "set_bypass") and group != "blocks":  # the U-Net's operators
            self.net.set_bypass(group, idx, True)
            try:
                yield
            finally:
                self.net.set_bypass(group, idx, False)
        elif group in ("attn", "mlp"):
            flag = "skip_attn" if group == "attn" else "skip_mlp"
            old = [getattr(blocks[i], flag) for i in idx]
            for i in idx:
                setattr(blocks[i], flag, True)
            try:
                yield
            finally:
                for i, o in zip(idx, old):
                    setattr(blocks[i], flag, o)
        else:
            raise BenchError(f"unknown unit group {group!r}; {self.name} has {list(self.units('block'))} and attn/mlp")

    def block_params(self) -> list[list[torch.nn.Parameter]]:
        return [list(b.parameters()) for b in self.net.blocks]

    def operator_ids(self) -> dict[str, list[int]]:
        """Operator group -> dense ids of the operators present, for a backbone whose operators are
        units of their own (the U-Net: ResNet blocks, attentions; its groups stay listed once every
        operator is gone). {} for DiT/SiT, whose attention and MLP branches belong to blocks."""
        return self.net.operator_ids() if hasattr(self.net, "operator_ids") else {}
