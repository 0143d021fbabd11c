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

U-Net width groups (``unet_width_groups``)
------------------------------------------
Diff-Pruning (Fang, Ma & Wang, NeurIPS 2023, arXiv 2305.10924, Sec. 3 / code ``ddpm_prune.py``):
width units are the output channels of every Conv/Linear with all layers coupled to them
(Torch-Pruning's DepGraph, Fang et al. CVPR 2023, arXiv 2301.12900), ``conv_out`` ignored.
One group per DepGraph group (``DependencyGraph.get_all_groups`` with ``conv_out`` ignored): the
output channels of a root Conv2d/Linear and every parameter slice coupled to them (the conv's
rows and bias, ``time_emb_proj`` rows added to them, GroupNorm weight/bias, the consumers' input
columns, at their offsets inside the ``torch.cat`` skip connections of the up path, the class
embedding's columns for the time-embedding group...). Names and units:

* ``<root path>.channels`` (kind "channels"). The root is the first module (in data-flow order:
  stem, down path, middle, up path) whose output channels belong to the group, preferring modules outside bypassable
  operators so that names survive an operator plan (e.g. ``conv_in.channels``,
  ``down_blocks.0.resnets.1.conv1.channels``, ``time_embedding.linear_2.channels``).
  **GroupNorm.** As Torch-Pruning's MetaPruner does for GroupNorm-coupled groups (its
  ``channel_groups`` = the largest ``num_groups`` of the coupled norms), the root's C channels are
  cut into K = that ``num_groups`` contiguous chunks of C/K channels and *one unit = one in-chunk
  position across all K chunks* (channels {u, u + C/K, u + 2C/K, ...}). Removing a unit removes
  one channel from every norm group, so the norms keep K equal groups and a per-unit score is
  Torch-Pruning's chunk-averaged score (summed instead of averaged: the same ranking). Groups with
  no GroupNorm (time embedding, attention inner channels) have K = 1: a unit is one channel.
  Where a norm spans a ``torch.cat`` of two groups (the up path) the two groups may keep different
  counts; the norm is then repaired to normalise every surviving channel with the surviving members
  of its *original* norm group (``SegmentGroupNorm``; exact, where Torch-Pruning would silently
  re-chunk the channels or fail on ``num_channels % num_groups``).
* ``<attention path>.heads`` (kind "heads") for a multi-head attention: the coupled
  ``to_q``/``to_k``/``to_v`` rows and ``to_out.0`` columns, one unit = one head; ``attn.heads``
  is repaired. A single-head attention (the DDPM layout: ``attention_head_dim=None``) has no
  head to remove, so its inner channels are an ordinary channels group rooted at ``to_q``
  (head-dimension pruning, Diff-Pruning's behaviour).
* Attention and DepGraph: Torch-Pruning 1.6 traces ``F.scaled_dot_product_attention`` as an
  element-wise op that couples q, k, v and the attention output index by index, which is exactly
  the coupling we need (Diff-Pruning issue #4, the AttnProcessor2_0 failure, was torch-pruning
  1.3 on torch 2.x). The only thing the SDPA path gets wrong after pruning is the softmax
  temperature (SDPA defaults to 1/sqrt(current head dim)); every attention therefore runs
  ``DenseScaleAttnProcessor``, diffusers' AttnProcessor2_0 computation with ``scale=attn.scale``
  (1/sqrt(dense head dim)), as diffusers' classic AttnProcessor and Diff-Pruning's torch-1.13
  runs use.

``dense_ids`` are the ids of the present units in the dense model (stored on the root module as
``kept_units``), so a plan made on the dense model replays on a fresh dense model.

Limits: the graph is traced once per structure at batch 1 (not under ``torch.inference_mode``);
pooling down/up-samplers (``downsample_type="resnet"``/``"pool"``-style variants) are not
repaired after width surgery (the layouts here use conv resamplers, as DDPM); the pruned GroupNorm
channel groups and head counts are Python attributes, not state-dict entries, so a pruned
checkpoint is rebuilt by replaying its plan on the dense model (the suite's rule).
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from bench.api import BenchError
from bench.models.unet import Bypassed, SegmentGroupNorm, UNetBackbone, flow_order


@dataclass
class WidthGroup:
    name: str                     # the plan key
    kind: str                     # "heads" | "channels"
    size: int                     # units present now
    dense_ids: list[int]          # dense id of each present unit (plans speak these)
    members: list[tuple[nn.Parameter, int, torch.Tensor]] = field(default_factory=list)
    # (param, dim, idx) with idx a LongTensor [size, w]: unit j owns param.index_select(dim, idx[j])
    block: int | None = None      # dense block index for transformer groups (None for the U-Net)
    roles: list[str] = field(default_factory=list)
    # one per member: "weight" (a Conv/Linear weight, output rows or input columns), "bias",
    # "norm_weight" / "norm_bias" (GroupNorm affine), "embedding" (a class-embedding column); scorers
    # that follow an official importance pick the roles it reads (Diff-Pruning: weights and norms, no biases)
    chunks: int = 1
    # norm groups a unit spans (U-Net channels: the K GroupNorm-aligned chunks, one channel in each;
    # 1 elsewhere); a member's idx row lists its entries chunk by chunk, so [size, chunks, -1] splits it
    channel_ids: list[list[int]] | None = None
    # channel_ids[u][j]: the dense root channel of unit u in chunk j (U-Net channels groups), for
    # plans that choose channels inside each norm group (``<root>.norm_channels`` keys)

    def unit_slices(self, param: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
        """[size, w * rest] view of one member's values grouped by unit (works for .grad too)."""
        x = param.movedim(dim, 0)[idx.reshape(-1)]          # [size * w, ...]
        return x.reshape(self.size, -1)

    def _selected(self, roles):
        for i, (p, dim, idx) in enumerate(self.members):
            if roles is None or (self.roles[i] if i < len(self.roles) else "weight") in roles:
                yield p, dim, idx

    def per_unit(self, fn, roles=None) -> torch.Tensor:
        """Sum over members (those of the given roles; None: all) of fn(param_slice [size, k],
        grad_slice or None) -> [size]."""
        out = torch.zeros(self.size, dtype=torch.float64)
        for p, dim, idx in self._selected(roles):
            w = self.unit_slices(p.detach(), dim, idx).double()
            g = self.unit_slices(p.grad.detach(), dim, idx).double() if p.grad is not None else None
            out += fn(w, g).cpu()
        return out

    def per_channel(self, fn, roles=None) -> torch.Tensor:
        """[size, chunks]: per_unit's sum kept apart for each chunk (the unit's channel in each norm
        group): fn(param_slice [size * chunks, k], grad_slice or None) -> [size * chunks]."""
        out = torch.zeros(self.size, self.chunks, dtype=torch.float64)
        for p, dim, idx in self._selected(roles):
            w = self.unit_slices(p.detach(), dim, idx).double().reshape(self.size * self.chunks, -1)
            g = (self.unit_slices(p.grad.detach(), dim, idx).double().reshape(self.size * self.chunks, -1)
                 if p.grad is not None else None)
            out += fn(w, g).cpu().reshape(self.size, self.chunks)
        return out

    def n_members(self, roles=None) -> int:
        return sum(1 for _ in self._selected(roles))


def _kept(module: nn.Module, attr: str, n: int) -> list[int]:
    if not hasattr(module, attr):
        setattr(module, attr, list(range(n)))
    return getattr(module, attr)


def _rows(offsets, w: int, size: int) -> torch.Tensor:
    """idx[j] = concat over offsets o of o + j*w + arange(w)."""
    j = torch.arange(size).unsqueeze(1) * w
    r = torch.arange(w).unsqueeze(0)
    return torch.cat([o + j + r for o in offsets], dim=1)


ATTN_UNITS = ("heads", "head_dims")


def dit_width_groups(net, kept_blocks: list[int]) -> dict[str, WidthGroup]:
    """Heads of every attention layer (qkv rows of q, k and v by head + the matching proj columns)
    and hidden channels of every MLP (fc1 rows + fc2 columns). The residual stream (hidden size),
    adaLN, embedders and final layer are never width units.

    An attention whose ``width_unit`` is "head_dims" (``attention_units``; set for good by a
    head-dim surgery) offers its head *dimensions* instead (``blocks.<b>.attn.head_dims``): unit d =
    position d inside every head, i.e. q, k and v row d of each of the h heads and proj column d of
    each head, so every head keeps the same positions and the head count stays (Torch-Pruning's
    ``num_heads={qkv: h}, prune_num_heads=False``, VainF's DiT recipe in Torch-Pruning issue 300)."""
    groups = {}
    for b, block in zip(kept_blocks, net.blocks):
        attn = getattr(block, "attn", None)
        if attn is not None:
            h, hd = attn.num_heads, attn.head_dim
            if getattr(attn, "width_unit", "heads") == "head_dims":
                rows = torch.cat([torch.arange(hd).unsqueeze(1) + o + hh * hd
                                  for o in (0, h * hd, 2 * h * hd) for hh in range(h)], dim=1)
                cols = torch.cat([torch.arange(hd).unsqueeze(1) + hh * hd for hh in range(h)], dim=1)
                name, kind, size, ids = f"blocks.{b}.attn.head_dims", "head_dims", hd, _kept(attn, "kept_dims", hd)
            else:
                rows = _rows([0, h * hd, 2 * h * hd], hd, h)
                cols = _rows([0], hd, h)
                name, kind, size, ids = f"blocks.{b}.attn.heads", "heads", h, _kept(attn, "kept_units", h)
            mem, roles = [(attn.qkv.weight, 0, rows), (attn.proj.weight, 1, cols)], ["weight", "weight"]
            if attn.qkv.bias is not None:
                mem.append((attn.qkv.bias, 0, rows))
                roles.append("bias")
            groups[name] = WidthGroup(name, kind, size, list(ids), mem, b, roles)
        mlp = getattr(block, "mlp", None)
        if mlp is not None:
            n = mlp.fc1.out_features
            idx = torch.arange(n).unsqueeze(1)
            mem, roles = [(mlp.fc1.weight, 0, idx), (mlp.fc2.weight, 1, idx)], ["weight", "weight"]
            if mlp.fc1.bias is not None:
                mem.append((mlp.fc1.bias, 0, idx))
                roles.append("bias")
            groups[f"blocks.{b}.mlp.hidden"] = WidthGroup(f"blocks.{b}.mlp.hidden", "channels", n,
                                                          list(_kept(mlp, "kept_units", n)), mem, b, roles)
    return groups


class attention_units:
    """Context: the model's attention layers offer ``unit`` ("heads" or "head_dims") as their width
    group while it lasts (a method scores and plans in it; the plan's keys then say which, and
    surgery sets it for good on the layers it prunes). The U-Net's attentions are unaffected."""

    def __init__(self, net, unit: str = "heads"):
        if unit not in ATTN_UNITS:
            raise BenchError(f"attention width unit {unit!r} is unknown; use one of {', '.join(ATTN_UNITS)}")
        self.unit = unit
        self.mods = [m for m in getattr(net.net, "blocks", []) if getattr(m, "attn", None) is not None]

    def __enter__(self):
        self.was = [m.attn.__dict__.get("width_unit") for m in self.mods]
        for m in self.mods:
            m.attn.width_unit = self.unit
        return self

    def __exit__(self, *exc):
        for m, w in zip(self.mods, self.was):
            if w is None:
                m.attn.__dict__.pop("width_unit", None)
            else:
                m.attn.width_unit = w
        return False


def dit_prune_width(net, kept_blocks: list[int], name: str, keep_dense: list[int]) -> None:
    """Keep the units whose dense ids are `keep_dense` in group `name` (Torch-Pruning functions)."""
    import torch_pruning as tp

    parts = name.split(".")
    if len(parts) != 4 or parts[0] != "blocks" or (parts[2], parts[3]) not in (
            ("attn", "heads"), ("attn", "head_dims"), ("mlp", "hidden")):
        raise BenchError(f"unknown width group {name!r}; DiT groups are blocks.<i>.attn.heads / "
                         "blocks.<i>.attn.head_dims / blocks.<i>.mlp.hidden")
    b = int(parts[1])
    if b not in kept_blocks:
        raise BenchError(f"width group {name!r} names block {b}, which the model no longer has ({kept_blocks})")
    block = net.blocks[kept_blocks.index(b)]
    mod = getattr(block, parts[2])
    if mod is None:
        raise BenchError(f"width group {name!r}: that branch was removed by an operator plan")
    if parts[3] == "head_dims":
        return _dit_prune_head_dims(mod, name, keep_dense)
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


def _dit_prune_head_dims(attn, name: str, keep_dense) -> None:
    """Keep head-dimension positions `keep_dense` (dense ids) in every head of `attn`: q, k, v rows
    and proj columns of each head (Torch-Pruning's head-dim pruning, heads kept). The softmax keeps
    the dense temperature 1/sqrt(dense head_dim) (``Attention.scale``), so the pruned layer computes
    the dense attention logits without the removed terms [A: with SDPA's default the temperature
    would follow the smaller head; the suite's U-Net attentions keep the dense one too]."""
    import torch_pruning as tp

    h, hd = attn.num_heads, attn.head_dim
    present = list(_kept(attn, "kept_dims", hd))
    keep_set = {int(i) for i in keep_dense}
    if not keep_set or not keep_set <= set(present):
        raise BenchError(f"invalid width plan for {name}: keep {sorted(keep_set)[:8]}... not a non-empty subset "
                         f"of the present head dims {present[:8]}...")
    drop_pos = [p for p, d in enumerate(present) if d not in keep_set]
    attn.width_unit = "head_dims"
    if not drop_pos:
        return
    rows = sorted(o + hh * hd + p for o in (0, h * hd, 2 * h * hd) for hh in range(h) for p in drop_pos)
    cols = sorted(hh * hd + p for hh in range(h) for p in drop_pos)
    if getattr(attn, "scale", None) is None:
        attn.scale = hd ** -0.5                  # the dense temperature (first head-dim surgery: hd is dense)
    tp.prune_linear_out_channels(attn.qkv, rows)
    tp.prune_linear_in_channels(attn.proj, cols)
    attn.head_dim = hd - len(drop_pos)           # static attribute the forward reshapes with
    attn.kept_dims = [d for d in present if d in keep_set]


def width_groups(net) -> dict[str, WidthGroup]:
    """name -> WidthGroup for every prunable width group of a Denoiser's current backbone."""
    if isinstance(net.net, UNetBackbone):
        return unet_width_groups(net.net)
    return dit_width_groups(net.net, net.kept_blocks)


def group_names(net) -> list[str]:
    """The names of width_groups(net); the U-Net's without building the groups' members."""
    if isinstance(net.net, UNetBackbone):
        return unet_width_group_names(net.net)
    return list(dit_width_groups(net.net, net.kept_blocks))


def prune_width(net, name: str, keep_dense) -> None:
    """Keep the units whose dense ids are `keep_dense` in group `name` of a Denoiser's backbone
    (a ``<root>.norm_channels`` key: the dense root channels kept, chosen inside each norm group)."""
    if isinstance(net.net, UNetBackbone):
        if name.endswith(NORM_CHANNELS):
            return unet_prune_norm_channels(net.net, name, keep_dense)
        return unet_prune_width(net.net, name, keep_dense)
    dit_prune_width(net.net, net.kept_blocks, name, keep_dense)


NORM_CHANNELS = ".norm_channels"
# plan keys that name a width group in another unit: the group's name in width_groups() -> the alias
_ALIASES = {".attn.heads": ".attn.head_dims", ".channels": NORM_CHANNELS}


def canonical_key(key: str) -> str:
    """The width group a plan key prunes, whatever its unit: ``blocks.3.attn.head_dims`` and
    ``blocks.3.attn.heads`` are one attention, ``<root>.norm_channels`` and ``<root>.channels`` one
    U-Net channel group (bench.surgery.apply checks a plan's keys with it)."""
    for base, alias in _ALIASES.items():
        if key.endswith(alias):
            return key[: -len(alias)] + base
    return key


def norm_channels_key(name: str) -> str:
    """``<root>.channels`` -> ``<root>.norm_channels`` (the plan key of a per-norm-group choice)."""
    if not name.endswith(".channels"):
        raise BenchError(f"width group {name!r} is no U-Net channel group: only those choose inside norm groups")
    return name[: -len(".channels")] + NORM_CHANNELS


# --------------------------------------------------------------------------------------------
# The U-Net (bench.models.unet): groups and surgery through Torch-Pruning's DependencyGraph
# --------------------------------------------------------------------------------------------

_DG_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _unet_graph(net) -> tuple:
    """(Torch-Pruning DependencyGraph of the current U-Net traced at batch 1, group index).
    Cached until the module structure changes (operators bypassed or removed); width pruning
    keeps a graph valid, as in Torch-Pruning's own pruners, so one graph serves a whole plan."""
    import torch_pruning as tp

    # bypassed operators (an instance forward) and removed ones (Bypassed) change the traced graph
    key = tuple(sorted((path, isinstance(m, Bypassed)) for path, m in net.unet.named_modules()
                       if "forward" in m.__dict__ or isinstance(m, Bypassed)))
    hit = _DG_CACHE.get(net)
    if hit is not None and hit[0] == key:
        return hit[1], hit[2]
    dev = next(net.unet.parameters()).device
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, net.in_channels, net.input_size, net.input_size, generator=g).to(dev)
    t = torch.full((1,), 500, dtype=torch.long, device=dev)
    y = torch.zeros(1, dtype=torch.long, device=dev) if net.num_classes > 0 else None
    flags = [(p, p.requires_grad) for p in net.unet.parameters()]
    was = net.unet.training
    try:
        for p, _ in flags:
            p.requires_grad_(True)       # the graph is traced through autograd
        net.unet.eval()
        with torch.enable_grad():
            # conv_out is ignored as a root (get_all_groups below), not in the graph: its input
            # columns must follow the last group's channels
            dg = tp.DependencyGraph().build_dependency(
                net.unet, example_inputs=(x, t, y), verbose=False,
                forward_fn=lambda m, inp: m(inp[0], inp[1], class_labels=inp[2]).sample)
    finally:
        for p, r in flags:
            p.requires_grad_(r)
        net.unet.train(was)
    index = _unet_index(net, dg)
    _DG_CACHE[net] = (key, dg, index)
    return dg, index


def _unet_index(net, dg) -> dict:
    """name -> (root module, its out-channel pruning fn, kind, unit holder, attention or None),
    one entry per DepGraph group, in data-flow order of the holder."""
    from diffusers.models.attention_processor import Attention

    order = {m: i for i, (_, m) in enumerate(flow_order(net.unet))}
    names = {m: p for p, m in net.unet.named_modules()}
    in_op = set()
    for group_paths in net._operator_paths.values():
        for p in group_paths:
            in_op.update(net.unet.get_submodule(p).modules())
    q_of = {m.to_q: m for m in net.unet.modules() if isinstance(m, Attention)}
    index = {}
    for grp in dg.get_all_groups(ignored_layers=[net.unet.conv_out], root_module_types=[nn.Conv2d, nn.Linear]):
        outs = [it.dep.target.module for it in grp if dg.is_out_channel_pruning_fn(it.dep.handler)
                and isinstance(it.dep.target.module, (nn.Conv2d, nn.Linear))]
        if not outs:
            continue
        # the name-giving root: first in data-flow order, outside bypassable operators if possible
        root = min(outs, key=lambda m: (m in in_op, order.get(m, 1 << 30)))
        fn = dg.get_pruner_of_module(root).prune_out_channels
        attn = q_of.get(root)
        if attn is not None and getattr(attn, "dense_heads", attn.heads) > 1:
            attn.dense_heads = getattr(attn, "dense_heads", attn.heads)
            index[names[attn] + ".heads"] = (root, fn, "heads", attn, attn)
        else:
            if not hasattr(root, "unit_chunks"):
                root.unit_chunks = _chunks(_out_channels(root), grp)
            if not hasattr(root, "kept_channels"):   # the first index sees the dense model
                root.kept_channels = list(range(_out_channels(root)))
            index[names[root] + ".channels"] = (root, fn, "channels", root, None)
    return dict(sorted(index.items(), key=lambda kv: order.get(kv[1][3], 0)))


def _unet_layout(name: str, entry) -> list[list[int]]:
    """Root channels of each present unit: a head = its contiguous channels; a channel unit =
    one in-chunk position across the group's K GroupNorm-aligned chunks."""
    root, _, kind, holder, attn = entry
    c = _out_channels(root)
    if kind == "heads":
        n, w = attn.heads, c // attn.heads
        chans = [[u * w + r for r in range(w)] for u in range(n)]
    else:
        k = root.unit_chunks
        n = c // k
        chans = [[j * n + u for j in range(k)] for u in range(n)]
    if not hasattr(holder, "kept_units"):
        holder.kept_units = list(range(n))
    if len(holder.kept_units) != n:
        raise BenchError(f"width group {name}: {n} units present but {len(holder.kept_units)} recorded; "
                         "the model was changed outside bench.surgery")
    return chans


def unet_width_group_names(net) -> list[str]:
    """The names of unet_width_groups() without building their members (bench.surgery.apply checks
    a plan's keys with these: one pruning group per name is not needed for that)."""
    return list(_unet_graph(net)[1])


def unet_width_groups(net) -> dict[str, WidthGroup]:
    """name -> bench.width.WidthGroup for every prunable width group of the current U-Net."""
    dg, index = _unet_graph(net)
    out = {}
    for name, entry in index.items():
        root, fn, kind, holder, _ = entry
        chans = _unet_layout(name, entry)
        full = dg.get_pruning_group(root, fn, list(range(_out_channels(root))))
        members, roles = _members(full, chans, name)
        k, ids = 1, None
        if kind == "channels":
            k = root.unit_chunks
            ids = [[root.kept_channels[c] for c in unit] for unit in chans]
        out[name] = WidthGroup(name, kind, len(chans), list(holder.kept_units), members, None, roles, k, ids)
    return out


def unet_prune_width(net, name: str, keep_dense) -> None:
    """Keep the units whose dense ids are ``keep_dense`` in group ``name``: one Torch-Pruning
    group prune (``DependencyGraph.get_pruning_group(root, prune_out_channels, idxs).prune()``),
    then the static attributes are repaired (``attn.heads``, GroupNorm channel groups,
    diffusers' Downsample2D/Upsample2D/ResnetBlock2D channel counts)."""
    dg, index = _unet_graph(net)
    if name not in index:
        raise BenchError(f"unknown width group {name!r}; the U-Net has e.g. {', '.join(list(index)[:4])}, ... "
                         "(width_groups() lists them all)")
    root, fn, kind, holder, attn = index[name]
    if getattr(root, "norm_pruned", False) and kind == "channels":
        raise BenchError(f"width group {name} was pruned inside each norm group (a .norm_channels plan): its units no "
                         f"longer have dense ids; prune it again with {norm_channels_key(name)!r}")
    chans = _unet_layout(name, index[name])
    present = list(holder.kept_units)
    keep = sorted({int(i) for i in keep_dense})
    if not keep or not set(keep) <= set(present):
        raise BenchError(f"invalid width plan for {name}: keep {keep[:8]} is not a non-empty subset of the "
                         f"present units {present[:8]}{'...' if len(present) > 8 else ''}")
    drop = [p for p, d in enumerate(present) if d not in set(keep)]
    if not drop:
        return
    _prune_root_channels(net, dg, name, root, fn, sorted(c for p in drop for c in chans[p]))
    if kind == "heads":
        attn.heads -= len(drop)
    holder.kept_units = [d for d in present if d in set(keep)]
    _repair_static(net.unet)


def unet_prune_norm_channels(net, key: str, keep_dense) -> None:
    """Keep the dense root channels ``keep_dense`` of the channel group behind ``<root>.norm_channels``,
    chosen inside each GroupNorm-aligned chunk (Diff-Pruning's rule: Torch-Pruning <= 1.4 and its
    vendored copy prune the n lowest-scoring channels of every norm group independently); every
    chunk must keep the same number, so the norms keep equal groups. The group's units are then
    renumbered 0..m-1 (unit u = the u-th kept channel of each chunk): a later unit plan on it is refused."""
    name = canonical_key(key)
    dg, index = _unet_graph(net)
    if name not in index or index[name][2] != "channels":
        raise BenchError(f"unknown width group {key!r}: .norm_channels keys name a U-Net channel group "
                         f"(e.g. {norm_channels_key(next(n for n in index if n.endswith('.channels')))})")
    root, fn, _, holder, _ = index[name]
    _unet_layout(name, index[name])
    k, present = root.unit_chunks, list(root.kept_channels)
    keep_set = {int(c) for c in keep_dense}
    if not keep_set or not keep_set <= set(present):
        raise BenchError(f"invalid width plan for {key}: keep {sorted(keep_set)[:8]}... is not a non-empty subset of "
                         f"the present channels {present[:8]}{'...' if len(present) > 8 else ''}")
    n = len(present) // k
    per_chunk = [sum(1 for c in present[j * n:(j + 1) * n] if c in keep_set) for j in range(k)]
    if len(set(per_chunk)) != 1:
        raise BenchError(f"invalid width plan for {key}: every norm group must keep the same number of channels "
                         f"(kept per group: {per_chunk})")
    drop = [r for r, c in enumerate(present) if c not in keep_set]
    if not drop:
        return
    _prune_root_channels(net, dg, name, root, fn, drop)
    root.norm_pruned = True
    holder.kept_units = list(range(per_chunk[0]))
    _repair_static(net.unet)


def _prune_root_channels(net, dg, name: str, root, fn, drop: list[int]) -> None:
    """Remove the root's present channels at positions ``drop`` with everything coupled to them (one
    Torch-Pruning group prune), repair the GroupNorms and track the root's dense channel ids."""
    grp = dg.get_pruning_group(root, fn, drop)
    norms = [(it.dep.target.module, list(it.idxs)) for it in grp if isinstance(it.dep.target.module, nn.GroupNorm)]
    for gn, _ in norms:
        if not isinstance(gn, SegmentGroupNorm):
            size = gn.num_channels // gn.num_groups
            gn.dense_num_groups = gn.num_groups
            gn.__class__ = SegmentGroupNorm        # same object, same parameters (the graph stays valid)
            gn.channel_group = [ch // size for ch in range(gn.num_channels)]
    grp.prune()
    for gn, gi in norms:
        gone = set(gi)
        gn.channel_group = [g for ch, g in enumerate(gn.channel_group) if ch not in gone]
        gn.num_groups = len(set(gn.channel_group))
        if gn.num_channels != len(gn.channel_group):
            raise BenchError(f"internal: GroupNorm repair out of step in {name}")
    if hasattr(root, "kept_channels"):
        gone = set(drop)
        root.kept_channels = [c for r, c in enumerate(root.kept_channels) if r not in gone]


def _repair_static(unet: nn.Module) -> None:
    """Static channel counts that diffusers' forward asserts on (Downsample2D / Upsample2D
    ``channels``) or that describe the module, re-read from the pruned weights."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.upsampling import Upsample2D

    for m in unet.modules():
        if isinstance(m, (Downsample2D, Upsample2D)):
            conv = getattr(m, "conv", None) or getattr(m, "Conv2d_0", None)
            if isinstance(conv, nn.Conv2d):
                m.channels, m.out_channels = conv.in_channels, conv.out_channels
        elif isinstance(m, ResnetBlock2D):
            m.in_channels, m.out_channels = m.conv1.in_channels, m.conv2.out_channels
        elif isinstance(m, Attention):
            m.inner_dim = m.to_q.out_features


def _out_channels(m: nn.Module) -> int:
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features


def _chunks(c: int, group) -> int:
    """Torch-Pruning's channel grouping for a group: the largest ``num_groups`` of its GroupNorms
    (1 without any), reduced to a divisor of the root's channels."""
    k = 1
    for it in group:
        m = it.dep.target.module
        if isinstance(m, nn.GroupNorm):
            k = max(k, getattr(m, "dense_num_groups", m.num_groups))
    return math.gcd(c, k)


def _members(group, chans: list[list[int]], name: str) -> list:
    """(param, dim, idx[size, w]) for every parameter slice of the group, from Torch-Pruning's
    index mapping (``root_idxs``: the root channel behind each target index; concat offsets included)."""
    dg = group._DG
    members, roles, seen = [], [], set()
    for it in group:
        m = it.dep.target.module
        if not isinstance(m, nn.Module) or not any(True for _ in m.parameters(recurse=False)):
            continue
        out = dg.is_out_channel_pruning_fn(it.dep.handler)
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if isinstance(m, nn.Conv2d) and m.groups != 1:
                raise BenchError(f"width group {name}: grouped convolution {m} is not supported")
            slots = [(m.weight, 0, "weight"), (m.bias, 0, "bias")] if out else [(m.weight, 1, "weight")]
        elif isinstance(m, nn.GroupNorm):
            slots = [(m.weight, 0, "norm_weight"), (m.bias, 0, "norm_bias")]
        elif isinstance(m, nn.Embedding):
            slots = [(m.weight, 1, "embedding")]
        else:
            raise BenchError(f"width group {name}: layer {type(m).__name__} has no width mapping; extend bench.width")
        pos = {}      # root channel -> its indices in this layer (two when a cat joins a group with itself)
        for i, r in zip(it.idxs, it.root_idxs):
            pos.setdefault(r, []).append(i)
        if len({len(v) for v in pos.values()}) > 1 or set(pos) != {c for unit in chans for c in unit}:
            raise BenchError(f"width group {name}: {type(m).__name__} is coupled unevenly to the root's channels")
        idx = torch.tensor([[i for c in unit for i in pos[c]] for unit in chans], dtype=torch.long)
        for p, dim, role in slots:
            if p is None or (id(p), dim) in seen:
                continue
            seen.add((id(p), dim))
            members.append((p, dim, idx))
            roles.append(role)
    return members, roles
