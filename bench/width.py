"""Width units (attention heads, MLP hidden channels, U-Net conv channels) as data, and their
surgery through Torch-Pruning.

A *width group* is one set of interchangeable units that are pruned together: the heads of one
attention layer, the hidden channels of one MLP, the output channels of one U-Net conv with every
layer coupled to them (GroupNorm, the next conv's input, residual and skip paths). Each unit owns
a slice of several parameters; ``WidthGroup.members`` lists them as (parameter, dim, index
matrix) so that every width scorer (magnitude, Taylor, Diff-Pruning, OBS) is written once for all
backbones:

    unit j of group g owns  param.index_select(dim, idx[j])  for every (param, dim, idx) member

How many units a group keeps is ``bench.surgery.width_plan``'s allocation (one fraction for every
group, Torch-Pruning's local pruning, found by measuring). Groups differ in granularity: a DiT MLP
has hundreds of channels, an attention a few heads, and a U-Net conv only C / num_groups units (a
unit takes one channel from every GroupNorm group, so a 128-channel conv with 32 groups has 4).
Coarse channel groups (fewer than ``surgery.COARSE_UNITS``) round their pruned count down, as
Torch-Pruning does for GroupNorm-coupled groups, and get whole units back one group at a time up to
the budget; rounding their kept count down made them all jump together and miss a budget by far.

Plans speak *dense* unit ids (``WidthGroup.dense_ids``) so a plan replays on a fresh dense model.
Plan keys: ``blocks.<dense block>.attn.heads`` and ``blocks.<dense block>.mlp.hidden`` for DiT/SiT;
the U-Net names its groups after the root module (``<module path>.channels`` / ``.heads``).

The shape changes go through Torch-Pruning's pruning functions (``tp.prune_linear_out_channels``
and friends for DiT, the DependencyGraph for the U-Net), and every static attribute that must
follow the new shapes (``Attention.num_heads``) is repaired here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from bench.api import BenchError


@dataclass
class WidthGroup:
    name: str                     # the plan key
    kind: str                     # "heads" | "channels"
    size: int                     # units present now
    dense_ids: list[int]          # dense id of each present unit (plans speak these)
    members: list[tuple[nn.Parameter, int, torch.Tensor]] = field(default_factory=list)
    # (param, dim, idx) with idx a LongTensor [size, w]: unit j owns param.index_select(dim, idx[j])
    block: int | None = None      # dense block index for transformer groups (None for the U-Net)

    def unit_slices(self, param: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
        """[size, w * rest] view of one member's values grouped by unit (works for .grad too)."""
        x = param.movedim(dim, 0)[idx.reshape(-1)]          # [size * w, ...]
        return x.reshape(self.size, -1)

    def per_unit(self, fn) -> torch.Tensor:
        """Sum over members of fn(param_slice [size, k], grad_slice or None) -> [size]."""
        out = torch.zeros(self.size, dtype=torch.float64)
        for p, dim, idx in self.members:
            w = self.unit_slices(p.detach(), dim, idx).double()
            g = self.unit_slices(p.grad.detach(), dim, idx).double() if p.grad is not None else None
            out += fn(w, g).cpu()
        return out

    def n_members(self) -> int:
        return len(self.members)


def _kept(module: nn.Module, attr: str, n: int) -> list[int]:
    if not hasattr(module, attr):
        setattr(module, attr, list(range(n)))
    return getattr(module, attr)


def _rows(offsets, w: int, size: int) -> torch.Tensor:
    """idx[j] = concat over offsets o of o + j*w + arange(w)."""
    j = torch.arange(size).unsqueeze(1) * w
    r = torch.arange(w).unsqueeze(0)
    return torch.cat([o + j + r for o in offsets], dim=1)


def dit_width_groups(net, kept_blocks: list[int]) -> dict[str, WidthGroup]:
    """Heads of every attention layer (qkv rows of q, k and v by head + the matching proj columns)
    and hidden channels of every MLP (fc1 rows + fc2 columns). The residual stream (hidden size),
    adaLN, embedders and final layer are never width units."""
    groups = {}
    for b, block in zip(kept_blocks, net.blocks):
        attn = getattr(block, "attn", None)
        if attn is not None:
            h, hd = attn.num_heads, attn.head_dim
            rows = _rows([0, h * hd, 2 * h * hd], hd, h)
            cols = _rows([0], hd, h)
            mem = [(attn.qkv.weight, 0, rows), (attn.proj.weight, 1, cols)]
            if attn.qkv.bias is not None:
                mem.append((attn.qkv.bias, 0, rows))
            groups[f"blocks.{b}.attn.heads"] = WidthGroup(f"blocks.{b}.attn.heads", "heads", h,
                                                          list(_kept(attn, "kept_units", h)), mem, b)
        mlp = getattr(block, "mlp", None)
        if mlp is not None:
            n = mlp.fc1.out_features
            idx = torch.arange(n).unsqueeze(1)
            mem = [(mlp.fc1.weight, 0, idx), (mlp.fc2.weight, 1, idx)]
            if mlp.fc1.bias is not None:
                mem.append((mlp.fc1.bias, 0, idx))
            groups[f"blocks.{b}.mlp.hidden"] = WidthGroup(f"blocks.{b}.mlp.hidden", "channels", n,
                                                          list(_kept(mlp, "kept_units", n)), mem, b)
    return groups


def dit_prune_width(net, kept_blocks: list[int], name: str, keep_dense: list[int]) -> None:
    """Keep the units whose dense ids are `keep_dense` in group `name` (Torch-Pruning functions)."""
    import torch_pruning as tp

    parts = name.split(".")
    if len(parts) != 4 or parts[0] != "blocks" or parts[2] not in ("attn", "mlp"):
        raise BenchError(f"unknown width group {name!r}; DiT groups are blocks.<i>.attn.heads / blocks.<i>.mlp.hidden")
    b = int(parts[1])
    if b not in kept_blocks:
        raise BenchError(f"width group {name!r} names block {b}, which the model no longer has ({kept_blocks})")
    block = net.blocks[kept_blocks.index(b)]
    mod = getattr(block, parts[2])
    if mod is None:
        raise BenchError(f"width group {name!r}: that branch was removed by an operator plan")
    present = list(_kept(mod, "kept_units", mod.num_heads if parts[2] == "attn" else mod.fc1.out_features))
    keep = sorted(set(int(i) for i in keep_dense))
    if not keep or not set(keep) <= set(present):
        raise BenchError(f"invalid width plan for {name}: keep {keep[:8]}... not a non-empty subset of {present[:8]}...")
    keep_set = set(keep)  # built once: a set per unit made surgery quadratic (seconds per DiT-XL MLP)
    drop_pos = [p for p, d in enumerate(present) if d not in keep_set]
    if not drop_pos:
        return
    if parts[2] == "attn":
        h, hd = mod.num_heads, mod.head_dim
        drop = torch.tensor(drop_pos)
        cols = (_rows([0], hd, h)[drop]).reshape(-1).tolist()
        rows = (_rows([0, h * hd, 2 * h * hd], hd, h)[drop]).reshape(-1).tolist()
        tp.prune_linear_out_channels(mod.qkv, sorted(rows))
        tp.prune_linear_in_channels(mod.proj, sorted(cols))
        mod.num_heads = h - len(drop_pos)       # static attribute the forward reshapes with
    else:
        tp.prune_linear_out_channels(mod.fc1, drop_pos)
        tp.prune_linear_in_channels(mod.fc2, drop_pos)
    mod.kept_units = [d for d in present if d in keep_set]
