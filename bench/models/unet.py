"""The DDPM U-Net (diffusers ``UNet2DModel``) as a Denoiser backbone, with width surgery through
Torch-Pruning's DependencyGraph and operator bypass / removal; its checkpoints load through
bench.models.checkpoints (``load_unet_checkpoint``).

References:
  DDPM: Ho et al. 2020 (arXiv 2006.11239), Sec. 4 / Appendix B: the CIFAR-10 U-Net (PixelCNN++
      backbone, 4 resolutions 32..4 with channel multipliers (1, 2, 2, 2), 2 residual blocks per
      resolution, self-attention at 16x16, GroupNorm, sinusoidal time embedding; 35.7M params) and
      the linear betas 1e-4..0.02 over T = 1000, eps prediction with the simple loss (Eq. 14).
      The weights layout is diffusers' port ``google/ddpm-cifar10-32`` (``UNet2DModel``).
  Classifier-free guidance label dropout: Ho & Salimans 2022 (arXiv 2207.12598); the null label is
      index ``num_classes`` exactly as in DiT's LabelEmbedder (bench.models.dit).
  Diff-Pruning: Fang, Ma & Wang, NeurIPS 2023 (arXiv 2305.10924), Sec. 3 / code ``ddpm_prune.py``:
      width units are the output channels of every Conv/Linear with all layers coupled to them
      (Torch-Pruning's DepGraph, Fang et al. CVPR 2023, arXiv 2301.12900), ``conv_out`` ignored.
  LD-Pruner: Castells et al., CVPRW 2024 (arXiv 2404.11936): operators of the U-Net (ResNet blocks,
      attentions) are bypassed one at a time and the least significant ones removed.

Width groups (``width_groups()`` -> name -> bench.width.WidthGroup)
--------------------------------------------------------------------
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

Operators (``operator_units()``): ``resnets`` = ResnetBlock2D whose input and output shapes are equal
(in == out channels, no up/down sampling: bypassing keeps the shapes valid), ``attentions`` = the
(residual) attention blocks; dense ids in data-flow order (down path, middle, up path). ``set_bypass`` swaps the
operator's forward for the identity, ``remove_operators`` replaces it with a parameter-free
``Bypassed`` module (its weights are gone from ``parameters()``, params and MACs drop).

Limits: the graph is traced once per structure at batch 1 (not under ``torch.inference_mode``);
pooling down/up-samplers (``downsample_type="resnet"``/``"pool"``-style variants) are not
repaired after width surgery (the layouts here use conv resamplers, as DDPM); the pruned GroupNorm
channel groups and head counts are Python attributes, not state-dict entries, so a pruned
checkpoint is rebuilt by replaying its plan on the dense model (the suite's rule).
"""
from __future__ import annotations

import math
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.api import BenchError

OPERATOR_GROUPS = ("resnets", "attentions")


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------

class DenseScaleAttnProcessor:
    """diffusers' AttnProcessor2_0 for the U-Net's spatial self-attention (no mask, no cross
    attention), with the softmax scale pinned to ``attn.scale`` (1/sqrt(dense head dim)).

    Identical outputs to AttnProcessor2_0 on the dense model; after head-dimension pruning it keeps
    the dense temperature (as diffusers' classic AttnProcessor does) instead of SDPA's default
    1/sqrt(pruned head dim). Head count and head dim are read off the tensors each call, so a
    pruned attention needs only ``attn.heads`` repaired."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise BenchError("the U-Net backbone's attention is self-attention only (no mask, no context)")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        ndim = hidden_states.ndim
        if ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        b = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        hd = k.shape[-1] // attn.heads
        q, k, v = (z.view(b, -1, attn.heads, hd).transpose(1, 2) for z in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * hd).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class SegmentGroupNorm(nn.GroupNorm):
    """GroupNorm whose channels keep their *original* norm groups after channel pruning (Wu & He
    2018, Eq. 1 with the set S_i = the surviving members of channel i's dense group).

    ``channel_group[c]`` is the dense norm group of present channel c. When every group has the same
    number of channels, contiguously, it is plain ``F.group_norm`` with ``num_groups`` groups (the
    common case: a width unit removes one channel per norm group); otherwise (a norm over a
    ``torch.cat`` of two groups pruned to different counts) the statistics are taken per segment."""

    channel_group: list[int]

    def forward(self, x):
        if _uniform(self.channel_group):
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        n, c = x.shape[:2]
        ranks = _dense_ranks(self.channel_group)      # group sizes from the Python list: no data-dependent
        ng = max(ranks) + 1                           # ops, so the norm also runs on the meta device
        gid = torch.as_tensor(ranks, device=x.device)
        xf = x.reshape(n, c, -1).float()
        sizes = [0] * ng
        for r in ranks:
            sizes[r] += 1
        cnt = torch.tensor(sizes, device=x.device).to(xf) * xf.shape[-1]           # elements per group
        mean = torch.zeros(n, ng, device=x.device, dtype=xf.dtype).index_add_(1, gid, xf.sum(-1)) / cnt
        xc = xf - mean[:, gid, None]
        var = torch.zeros(n, ng, device=x.device, dtype=xf.dtype).index_add_(1, gid, xc.pow(2).sum(-1)) / cnt
        y = (xc * torch.rsqrt(var[:, gid, None] + self.eps)).to(x.dtype).reshape_as(x)
        if self.affine:
            shape = (1, c) + (1,) * (x.ndim - 2)
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        return y


def _dense_ranks(ids: list[int]) -> list[int]:
    order = {g: i for i, g in enumerate(sorted(set(ids)))}
    return [order[g] for g in ids]


def _uniform(ids: list[int]) -> bool:
    """Contiguous, equally sized groups (what F.group_norm computes)."""
    if any(a > b for a, b in zip(ids, ids[1:])):
        return False
    counts = {}
    for g in ids:
        counts[g] = counts.get(g, 0) + 1
    return len(set(counts.values())) == 1


class Bypassed(nn.Module):
    """A removed operator: output = input (its residual branch is gone); no parameters."""

    def __init__(self, group: str, dense_id: int):
        super().__init__()
        self.group, self.dense_id = group, dense_id

    def forward(self, x, *args, **kwargs):
        return x

    def extra_repr(self) -> str:
        return f"group={self.group}, dense_id={self.dense_id}"


def _passthrough(x, *args, **kwargs):
    return x


def drop_labels(labels, num_classes: int, p: float, train: bool, force_drop_ids=None, generator=None):
    """CFG label dropout (Ho & Salimans 2022): replace a label by the null label ``num_classes``
    with probability p while training, or where ``force_drop_ids == 1``; the same draws as DiT's
    LabelEmbedder.token_drop (one torch.rand per label on the generator's device)."""
    if not ((train and p > 0) or force_drop_ids is not None):
        return labels
    if force_drop_ids is None:
        r = torch.rand(labels.shape[0], generator=generator) if generator is not None else torch.rand(labels.shape[0])
        drop = r.to(labels.device) < p
    else:
        drop = force_drop_ids == 1
    return torch.where(drop, torch.full_like(labels, num_classes), labels)


# --------------------------------------------------------------------------------------------
# The backbone
# --------------------------------------------------------------------------------------------

_DG_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


class UNetBackbone(nn.Module):
    """``forward(x, t, y)`` -> eps prediction (N, C, H, W) of a diffusers ``UNet2DModel`` (``self.unet``).

    Class-conditional when ``num_classes > 0`` (``num_class_embeds = num_classes + 1``: the last
    row is the CFG null label), unconditional when 0 (``y`` ignored). ``blocks`` is empty: the
    U-Net has no transformer blocks, so block-depth methods see depth 0."""

    learn_sigma = False

    def __init__(self, unet_kwargs: dict, num_classes: int = 0, class_dropout_prob: float = 0.1):
        super().__init__()
        from diffusers import UNet2DModel

        kw = dict(unet_kwargs)
        if num_classes > 0:
            kw["num_class_embeds"] = num_classes + 1     # + the null label (index num_classes)
        self.unet = UNet2DModel(**kw)
        cfg = self.unet.config
        self.in_channels, self.out_channels = cfg.in_channels, cfg.out_channels
        self.input_size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        self.num_classes, self.class_dropout_prob = num_classes, class_dropout_prob
        self.blocks = nn.ModuleList()
        from diffusers.models.attention_processor import Attention
        for m in self.unet.modules():
            if isinstance(m, Attention):
                m.set_processor(DenseScaleAttnProcessor())
        self._operator_paths = self._find_operators()

    # ---- prediction ----------------------------------------------------------------------
    def forward(self, x, t, y=None, return_hidden: bool = False, force_drop_ids=None, generator=None):
        if return_hidden:
            raise BenchError("hidden states (the residual stream after every block) are a transformer-only "
                             "feature; the U-Net backbone has no blocks: use a DiT/SiT model for block methods")
        labels = None
        if self.num_classes > 0:
            if y is None:
                raise BenchError("this U-Net is class-conditional: pass labels y (the null label is num_classes)")
            labels = drop_labels(y, self.num_classes, self.class_dropout_prob, self.training, force_drop_ids, generator)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        return self.unet(x, t, class_labels=labels).sample

    # ---- operators (LD-Pruner) ----------------------------------------------------------
    def _find_operators(self) -> dict[str, list[str]]:
        from diffusers.models.attention_processor import Attention
        from diffusers.models.resnet import ResnetBlock2D

        ops = {"resnets": [], "attentions": []}
        for path, m in _flow_order(self.unet):
            if isinstance(m, ResnetBlock2D):
                if m.in_channels == m.out_channels and not m.up and not m.down and m.conv_shortcut is None:
                    ops["resnets"].append(path)
            elif isinstance(m, Attention) and m.residual_connection:
                ops["attentions"].append(path)
        return ops

    def _operator(self, group: str, i: int) -> nn.Module:
        if group not in self._operator_paths:
            raise BenchError(f"unknown operator group {group!r}; the U-Net has {', '.join(OPERATOR_GROUPS)}")
        paths = self._operator_paths[group]
        if not 0 <= int(i) < len(paths):
            raise BenchError(f"operator {group}[{i}] does not exist; the dense U-Net has ids 0..{len(paths) - 1}")
        return self.unet.get_submodule(paths[int(i)])

    def operator_ids(self) -> dict[str, list[int]]:
        """Dense ids of the operators still present, per group."""
        return {g: [i for i in range(len(p)) if not isinstance(self._operator(g, i), Bypassed)]
                for g, p in self._operator_paths.items()}

    def operator_units(self) -> dict[str, int]:
        """Number of operators present per group (their ids are dense ids: ``operator_ids``)."""
        return {g: len(ids) for g, ids in self.operator_ids().items()}

    def set_bypass(self, group: str, idx, flag: bool) -> None:
        """Temporarily bypass (flag=True: output = input) or restore operators by dense id."""
        for i in idx:
            m = self._operator(group, i)
            if isinstance(m, Bypassed):
                continue
            if flag:
                m.forward = _passthrough          # instance attribute: shadows the class forward
            else:
                m.__dict__.pop("forward", None)

    def remove_operators(self, group: str, keep_ids) -> None:
        """Replace every present operator of ``group`` whose dense id is not in ``keep_ids`` with a
        parameter-free ``Bypassed`` module (the weights are gone for good)."""
        if group not in self._operator_paths:
            raise BenchError(f"unknown operator group {group!r}; the U-Net has {', '.join(OPERATOR_GROUPS)}")
        keep = {int(i) for i in keep_ids}
        n = len(self._operator_paths[group])
        bad = sorted(i for i in keep if not 0 <= i < n)
        if bad:
            raise BenchError(f"operator plan keeps {group} ids {bad[:5]} the U-Net does not have (0..{n - 1})")
        for i, path in enumerate(self._operator_paths[group]):
            if i in keep or isinstance(self.unet.get_submodule(path), Bypassed):
                continue
            parent_path, _, child = path.rpartition(".")
            parent = self.unet.get_submodule(parent_path)
            if isinstance(parent, (nn.ModuleList, nn.Sequential)):
                parent[int(child)] = Bypassed(group, i)
            else:
                setattr(parent, child, Bypassed(group, i))
        _DG_CACHE.pop(self, None)

    # ---- width groups (Diff-Pruning / Torch-Pruning) -------------------------------------
    def _graph(self) -> tuple:
        """(Torch-Pruning DependencyGraph of the current U-Net traced at batch 1, group index).
        Cached until the module structure changes (operators bypassed or removed); width pruning
        keeps a graph valid, as in Torch-Pruning's own pruners, so one graph serves a whole plan."""
        import torch_pruning as tp

        key = tuple(sorted(path for path, m in self.unet.named_modules() if "forward" in m.__dict__ or isinstance(m, Bypassed)))
        hit = _DG_CACHE.get(self)
        if hit is not None and hit[0] == key:
            return hit[1], hit[2]
        dev = next(self.unet.parameters()).device
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, self.in_channels, self.input_size, self.input_size, generator=g).to(dev)
        t = torch.full((1,), 500, dtype=torch.long, device=dev)
        y = torch.zeros(1, dtype=torch.long, device=dev) if self.num_classes > 0 else None
        flags = [(p, p.requires_grad) for p in self.unet.parameters()]
        was = self.unet.training
        try:
            for p, _ in flags:
                p.requires_grad_(True)       # the graph is traced through autograd
            self.unet.eval()
            with torch.enable_grad():
                # conv_out is ignored as a root (get_all_groups below), not in the graph: its input
                # columns must follow the last group's channels
                dg = tp.DependencyGraph().build_dependency(
                    self.unet, example_inputs=(x, t, y), verbose=False,
                    forward_fn=lambda m, inp: m(inp[0], inp[1], class_labels=inp[2]).sample)
        finally:
            for p, r in flags:
                p.requires_grad_(r)
            self.unet.train(was)
        index = self._index(dg)
        _DG_CACHE[self] = (key, dg, index)
        return dg, index

    def _index(self, dg) -> dict:
        """name -> (root module, its out-channel pruning fn, kind, unit holder, attention or None),
        one entry per DepGraph group, in data-flow order of the holder."""
        from diffusers.models.attention_processor import Attention

        order = {m: i for i, (_, m) in enumerate(_flow_order(self.unet))}
        names = {m: p for p, m in self.unet.named_modules()}
        in_op = set()
        for group_paths in self._operator_paths.values():
            for p in group_paths:
                in_op.update(self.unet.get_submodule(p).modules())
        q_of = {m.to_q: m for m in self.unet.modules() if isinstance(m, Attention)}
        index = {}
        for grp in dg.get_all_groups(ignored_layers=[self.unet.conv_out], root_module_types=[nn.Conv2d, nn.Linear]):
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
                index[names[root] + ".channels"] = (root, fn, "channels", root, None)
        return dict(sorted(index.items(), key=lambda kv: order.get(kv[1][3], 0)))

    def _layout(self, name: str, entry) -> list[list[int]]:
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

    def width_group_names(self) -> list[str]:
        """The names of width_groups() without building their members (bench.surgery.apply checks
        a plan's keys with these: one pruning group per name is not needed for that)."""
        return list(self._graph()[1])

    def width_groups(self) -> dict:
        """name -> bench.width.WidthGroup for every prunable width group of the current U-Net."""
        from bench.width import WidthGroup

        dg, index = self._graph()
        out = {}
        for name, entry in index.items():
            root, fn, kind, holder, _ = entry
            chans = self._layout(name, entry)
            full = dg.get_pruning_group(root, fn, list(range(_out_channels(root))))
            out[name] = WidthGroup(name, kind, len(chans), list(holder.kept_units), _members(full, chans, name), None)
        return out

    def prune_width(self, name: str, keep_dense) -> None:
        """Keep the units whose dense ids are ``keep_dense`` in group ``name``: one Torch-Pruning
        group prune (``DependencyGraph.get_pruning_group(root, prune_out_channels, idxs).prune()``),
        then the static attributes are repaired (``attn.heads``, GroupNorm channel groups,
        diffusers' Downsample2D/Upsample2D/ResnetBlock2D channel counts)."""
        dg, index = self._graph()
        if name not in index:
            raise BenchError(f"unknown width group {name!r}; the U-Net has e.g. {', '.join(list(index)[:4])}, ... "
                             "(width_groups() lists them all)")
        root, fn, kind, holder, attn = index[name]
        chans = self._layout(name, index[name])
        present = list(holder.kept_units)
        keep = sorted({int(i) for i in keep_dense})
        if not keep or not set(keep) <= set(present):
            raise BenchError(f"invalid width plan for {name}: keep {keep[:8]} is not a non-empty subset of the "
                             f"present units {present[:8]}{'...' if len(present) > 8 else ''}")
        drop = [p for p, d in enumerate(present) if d not in set(keep)]
        if not drop:
            return
        grp = dg.get_pruning_group(root, fn, sorted(c for p in drop for c in chans[p]))
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
        if kind == "heads":
            attn.heads -= len(drop)
        holder.kept_units = [d for d in present if d in set(keep)]
        self._repair_static()

    def _repair_static(self) -> None:
        """Static channel counts that diffusers' forward asserts on (Downsample2D / Upsample2D
        ``channels``) or that describe the module, re-read from the pruned weights."""
        from diffusers.models.attention_processor import Attention
        from diffusers.models.downsampling import Downsample2D
        from diffusers.models.resnet import ResnetBlock2D
        from diffusers.models.upsampling import Upsample2D

        for m in self.unet.modules():
            if isinstance(m, (Downsample2D, Upsample2D)):
                conv = getattr(m, "conv", None) or getattr(m, "Conv2d_0", None)
                if isinstance(conv, nn.Conv2d):
                    m.channels, m.out_channels = conv.in_channels, conv.out_channels
            elif isinstance(m, ResnetBlock2D):
                m.in_channels, m.out_channels = m.conv1.in_channels, m.conv2.out_channels
            elif isinstance(m, Attention):
                m.inner_dim = m.to_q.out_features


def _flow_order(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """named_modules in data-flow order: stem and embeddings, down path, middle, up path, head
    (UNet2DModel registers ``up_blocks`` before ``mid_block``)."""
    stage = {"down_blocks": 1, "mid_block": 2, "up_blocks": 3, "conv_norm_out": 4, "conv_act": 4, "conv_out": 4}
    items = list(unet.named_modules())
    return [it for _, it in sorted(enumerate(items), key=lambda e: (stage.get(e[1][0].split(".")[0], 0), e[0]))]


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
    members, seen = [], set()
    for it in group:
        m = it.dep.target.module
        if not isinstance(m, nn.Module) or not any(True for _ in m.parameters(recurse=False)):
            continue
        out = dg.is_out_channel_pruning_fn(it.dep.handler)
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if isinstance(m, nn.Conv2d) and m.groups != 1:
                raise BenchError(f"width group {name}: grouped convolution {m} is not supported")
            slots = [(m.weight, 0), (m.bias, 0)] if out else [(m.weight, 1)]
        elif isinstance(m, nn.GroupNorm):
            slots = [(m.weight, 0), (m.bias, 0)]
        elif isinstance(m, nn.Embedding):
            slots = [(m.weight, 1)]
        else:
            raise BenchError(f"width group {name}: layer {type(m).__name__} has no width mapping; extend bench.models.unet")
        pos = {}      # root channel -> its indices in this layer (two when a cat joins a group with itself)
        for i, r in zip(it.idxs, it.root_idxs):
            pos.setdefault(r, []).append(i)
        if len({len(v) for v in pos.values()}) > 1 or set(pos) != {c for unit in chans for c in unit}:
            raise BenchError(f"width group {name}: {type(m).__name__} is coupled unevenly to the root's channels")
        idx = torch.tensor([[i for c in unit for i in pos[c]] for unit in chans], dtype=torch.long)
        for p, dim in slots:
            if p is None or (id(p), dim) in seen:
                continue
            seen.add((id(p), dim))
            members.append((p, dim, idx))
    return members



# --------------------------------------------------------------------------------------------
# Builder
# --------------------------------------------------------------------------------------------

def unet_kwargs(input_size: int, in_channels: int, block_out_channels, layers_per_block: int,
                attention_levels=(1,), down_block_types=None, up_block_types=None,
                attention_head_dim: int | None = None, norm_num_groups: int = 32, norm_eps: float = 1e-6,
                flip_sin_to_cos: bool = False, freq_shift: int = 1, downsample_padding: int = 0,
                dropout: float = 0.0, add_attention: bool = True) -> dict:
    """UNet2DModel arguments; block types follow from ``attention_levels`` (resolution levels with
    self-attention, 0 = full resolution) unless given. Defaults: the DDPM CIFAR-10 layout."""
    n = len(block_out_channels)
    att = {int(a) for a in (attention_levels or ())}
    if any(not 0 <= a < n for a in att):
        raise BenchError(f"attention_levels {sorted(att)} outside 0..{n - 1} (one level per block_out_channels entry)")
    down = list(down_block_types or ["AttnDownBlock2D" if i in att else "DownBlock2D" for i in range(n)])
    up = list(up_block_types or ["AttnUpBlock2D" if (n - 1 - i) in att else "UpBlock2D" for i in range(n)])
    if len(down) != n or len(up) != n:
        raise BenchError(f"{n} block_out_channels need {n} down and {n} up block types (got {len(down)}, {len(up)})")
    if any(c % norm_num_groups for c in block_out_channels):
        raise BenchError(f"block_out_channels {list(block_out_channels)} must be multiples of norm_num_groups={norm_num_groups}")
    return dict(sample_size=input_size, in_channels=in_channels, out_channels=in_channels,
                block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                down_block_types=tuple(down), up_block_types=tuple(up), attention_head_dim=attention_head_dim,
                norm_num_groups=norm_num_groups, norm_eps=norm_eps, flip_sin_to_cos=flip_sin_to_cos,
                freq_shift=freq_shift, downsample_padding=downsample_padding, dropout=dropout,
                add_attention=add_attention, act_fn="silu", time_embedding_type="positional")


def build_unet(name: str, input_size: int = 32, in_channels: int = 3, num_classes: int = 0,
               class_dropout_prob: float = 0.1, block_out_channels=(128, 256, 256, 256), layers_per_block: int = 2,
               attention_levels=(1,), down_block_types=None, up_block_types=None,
               attention_head_dim: int | None = None, norm_num_groups: int = 32, norm_eps: float = 1e-6,
               flip_sin_to_cos: bool = False, freq_shift: int = 1, downsample_padding: int = 0,
               dropout: float = 0.0, add_attention: bool = True, learn_sigma: bool = False,
               ckpt: str | None = None, process: dict | None = None, **_):
    """A Denoiser around ``UNetBackbone`` with the DDPM process (eps prediction, fixed variance).
    Defaults: DDPM CIFAR-10 (Ho et al. 2020; diffusers ``google/ddpm-cifar10-32``)."""
    from bench.models.checkpoints import checkpoint_files, load_unet_checkpoint
    from bench.models.denoiser import Denoiser
    from bench.processes import create_process

    if learn_sigma:
        raise BenchError("the U-Net backbone predicts eps only: set learn_sigma: false in the model config")
    if ckpt:
        checkpoint_files(ckpt)           # a missing checkpoint stops before the model is built
    kw = unet_kwargs(input_size, in_channels, block_out_channels, layers_per_block, attention_levels,
                     down_block_types, up_block_types, attention_head_dim, norm_num_groups, norm_eps,
                     flip_sin_to_cos, freq_shift, downsample_padding, dropout, add_attention)
    net = UNetBackbone(kw, num_classes=num_classes, class_dropout_prob=class_dropout_prob)
    proc_kw = dict(process or {})
    kind = proc_kw.pop("kind", "ddpm")
    if kind != "ddpm":
        raise BenchError(f"the U-Net runs the DDPM process (eps prediction); process.kind={kind!r} is not supported")
    proc_kw["learn_sigma"] = False
    proc = create_process("ddpm", **proc_kw)
    if ckpt:
        load_unet_checkpoint(net, ckpt)
    return Denoiser(net, proc, name, num_classes)


