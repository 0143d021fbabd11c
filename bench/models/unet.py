"""The DDPM U-Net (diffusers ``UNet2DModel``) as a Denoiser backbone, with operator bypass / removal.

References:
  DDPM: Ho et al. 2020 (arXiv 2006.11239), Sec. 4 / Appendix B: the CIFAR-10 U-Net (PixelCNN++
      backbone, 4 resolutions 32..4 with channel multipliers (1, 2, 2, 2), 2 residual blocks per
      resolution, self-attention at 16x16, GroupNorm, sinusoidal time embedding; 35.7M params) and
      the linear betas 1e-4..0.02 over T = 1000, eps prediction with the simple loss (Eq. 14).
      The weights layout is diffusers' port ``google/ddpm-cifar10-32`` (``UNet2DModel``).
  Classifier-free guidance label dropout: Ho & Salimans 2022 (arXiv 2207.12598); the null label is
      index ``num_classes`` exactly as in DiT's LabelEmbedder (bench.models.dit).
  LD-Pruner: Castells et al., CVPRW 2024 (arXiv 2404.11936): operators of the U-Net (ResNet blocks,
      attentions) are bypassed one at a time and the least significant ones removed.

Pruned layers: every attention runs ``DenseScaleAttnProcessor`` (the softmax temperature of the
dense head dim, which width surgery must keep), and a GroupNorm whose channels width surgery
prunes becomes a ``SegmentGroupNorm`` (the survivors keep their dense norm groups); the width
groups and their Torch-Pruning surgery are bench.width's (``unet_width_groups``), the checkpoints
bench.models.checkpoints' (``load_unet_checkpoint``).

Operators (``operator_units()``): ``resnets`` = ResnetBlock2D whose input and output shapes are equal
(in == out channels, no up/down sampling: bypassing keeps the shapes valid), ``attentions`` = the
(residual) attention blocks; dense ids in data-flow order (down path, middle, up path). ``set_bypass`` swaps the
operator's forward for the identity, ``remove_operators`` replaces it with a parameter-free
``Bypassed`` module (its weights are gone from ``parameters()``, params and MACs drop).
"""
from __future__ import annotations

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
        for path, m in flow_order(self.unet):
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


def flow_order(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """named_modules in data-flow order: stem and embeddings, down path, middle, up path, head
    (UNet2DModel registers ``up_blocks`` before ``mid_block``)."""
    stage = {"down_blocks": 1, "mid_block": 2, "up_blocks": 3, "conv_norm_out": 4, "conv_act": 4, "conv_out": 4}
    items = list(unet.named_modules())
    return [it for _, it in sorted(enumerate(items), key=lambda e: (stage.get(e[1][0].split(".")[0], 0), e[0]))]


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


