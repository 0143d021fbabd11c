"""DiT and SiT backbones, written from the papers, in the official state-dict layout.

References:
  DiT: Peebles & Xie, "Scalable Diffusion Models with Transformers", ICCV 2023 (arXiv 2212.09748),
       Sec. 3.2 (patchify, adaLN-Zero block, fixed sin-cos position embedding), Table 1 (model sizes).
  SiT: Ma et al., "SiT: Exploring Flow and Diffusion-based Generative Models with Scalable
       Interpolant Transformers", ECCV 2024 (arXiv 2401.08740): the same network; with learned
       sigma the second half of the output is dropped in forward().
  adaLN-Zero: modulation MLP initialised to zero so every block starts as the identity (DiT Sec. 3.2).
  Frequency embedding of t: "Attention Is All You Need", Sec. 3.5; classifier-free guidance label
  dropout: Ho & Salimans 2022 (arXiv 2207.12598).

Parameter names follow the official checkpoints (``x_embedder.proj``, ``t_embedder.mlp.{0,2}``,
``y_embedder.embedding_table``, ``blocks.{i}.attn.qkv``, ``blocks.{i}.mlp.fc{1,2}``,
``blocks.{i}.adaLN_modulation.1``, ``final_layer.{linear,adaLN_modulation.1}``, ``pos_embed``), so
``DiT-XL-2-256x256.pt`` and ``SiT-XL-2-256x256.pt`` load with ``strict=True``.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def modulate(x, shift, scale):
    # adaLN: per-sample affine from the conditioning vector (DiT Sec. 3.2)
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# --------------------------------------------------------------------------------------------
# Embedders
# --------------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """Image -> tokens with a p x p stride-p convolution ("patchify", DiT Fig. 4)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size, self.patch_size = img_size, patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # N, T, D


class TimestepEmbedder(nn.Module):
    """Scalar t -> D via sinusoidal frequencies then a 2-layer SiLU MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        # cos first, then sin (the order the official checkpoints were trained with)
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t):
        freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label -> D. One extra row (index num_classes) is the null label for CFG, present
    iff dropout_prob > 0, as in the official checkpoints (1001 rows for ImageNet)."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def token_drop(self, labels, force_drop_ids=None, generator=None):
        if force_drop_ids is None:
            r = torch.rand(labels.shape[0], generator=generator) if generator is not None else torch.rand(labels.shape[0])
            drop = r.to(labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels, train: bool, force_drop_ids=None, generator=None):
        if (train and self.dropout_prob > 0) or (force_drop_ids is not None):
            labels = self.token_drop(labels, force_drop_ids, generator)
        return self.embedding_table(labels)


# --------------------------------------------------------------------------------------------
# Transformer block
# --------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head self-attention with fused qkv (timm layout: ``qkv``, ``proj``)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        assert dim % num_heads == 0, "hidden size must be divisible by the number of heads"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = None  # softmax temperature; None = 1/sqrt(head_dim) (a head-dim surgery keeps the dense one)
        self.qkv = nn.Linear(dim, 3 * num_heads * self.head_dim, bias=qkv_bias)
        self.proj = nn.Linear(num_heads * self.head_dim, dim)

    def forward(self, x):
        # static attributes (num_heads, head_dim) are repaired by bench.surgery after head pruning
        return self.proj(self.attend(self.qkv(x), self.num_heads))

    def attend(self, qkv, num_heads: int):
        """Per-head softmax(q k^T / sqrt(head_dim)) v of a fused projection [B, N, 3 * num_heads *
        head_dim] (q, k, v, each head by head: ``qkv``'s layout) -> [B, N, num_heads * head_dim].
        A routed stage passes the q/k/v rows of its kept heads (bench.routing)."""
        B, N, _ = qkv.shape
        qkv = qkv.reshape(B, N, 3, num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return x.transpose(1, 2).reshape(B, N, num_heads * self.head_dim)


class Mlp(nn.Module):
    """Two-layer MLP with tanh-approximated GELU (timm layout: ``fc1``, ``fc2``)."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero block: x + g1*Attn(mod(LN(x))) + g2*MLP(mod(LN(x))), gates from c (DiT Fig. 3)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))
        # branch switches used by operator-level ablation (LD-Pruner); never change shapes
        self.skip_attn = False
        self.skip_mlp = False

    def forward(self, x, c, attn=None, mlp=None):
        """attn, mlp: stand-ins for the block's own branches (a routed stage's thin attention / MLP,
        bench.routing); None runs the block's own."""
        attn = self.attn if attn is None else attn
        mlp = self.mlp if mlp is None else mlp
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        if not self.skip_attn:
            x = x + gate_msa.unsqueeze(1) * attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if not self.skip_mlp:
            x = x + gate_mlp.unsqueeze(1) * mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# --------------------------------------------------------------------------------------------
# DiT / SiT
# --------------------------------------------------------------------------------------------

class DiT(nn.Module):
    """Diffusion Transformer. ``forward(x, t, y)`` returns the raw prediction; with
    ``learn_sigma`` the output has 2*in_channels channels (prediction, variance interpolation)."""

    stage_router = None  # stage-wise plans: a bench.routing.StageRouter picks each stage's blocks
    block_fn = None      # regional compile (compile=blocks, bench.models.denoiser.regional): a compiled
    #                      call(block, h, c) that every block runs through; None: the blocks run eagerly

    def __init__(
        self,
        input_size: int = 32,            # latent side (256px images / VAE factor 8)
        patch_size: int = 2,
        in_channels: int = 4,            # SD-VAE latent channels
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,  # CFG training label dropout (DiT default)
        num_classes: int = 1000,
        learn_sigma: bool = True,         # DiT: learned variance (Improved DDPM); SiT keeps it for the ckpt layout
    ):
        super().__init__()
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size, self.num_heads, self.input_size = patch_size, num_heads, input_size
        self.num_classes = num_classes

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # fixed sin-cos embedding, stored as a frozen Parameter so it is in the official state dict
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)
        pos = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], int(self.x_embedder.num_patches ** 0.5))
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data  # init patch embed like nn.Linear, not nn.Conv2d
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every block starts as the identity
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def unpatchify(self, x):
        c, p = self.out_channels, self.x_embedder.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def embed(self, x, t, y, force_drop_ids=None, generator=None):
        """Tokens and conditioning vector c = t_emb + y_emb (shared by forward and probes)."""
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids, generator)
        return x, c

    def forward(self, x, t, y, return_hidden: bool = False, force_drop_ids=None, generator=None):
        h, c = self.embed(x, t, y, force_drop_ids, generator)
        hidden = [h]
        if self.stage_router is not None:  # routed model (bench.routing): the blocks of each sample's stage
            h = self.stage_router.run(self, h, c, t, hidden if return_hidden else None)
        else:
            for block in self.blocks:
                h = block(h, c) if self.block_fn is None else self.block_fn(block, h, c)
                if return_hidden:
                    hidden.append(h)
        out = self.unpatchify(self.final_layer(h, c))
        return (out, hidden) if return_hidden else out


class SiT(DiT):
    """SiT: DiT's network for interpolant (flow) models. With ``learn_sigma`` (the released
    checkpoints) the extra channels exist but are dropped, as in the official forward()."""

    def forward(self, x, t, y, return_hidden: bool = False, force_drop_ids=None, generator=None):
        out = super().forward(x, t, y, return_hidden, force_drop_ids, generator)
        if return_hidden:
            out, hidden = out
        if self.learn_sigma:
            out = out[:, : self.in_channels]
        return (out, hidden) if return_hidden else out


# --------------------------------------------------------------------------------------------
# Fixed 2-D sin-cos position embedding (MAE, arXiv 2111.06377; used by DiT)
# --------------------------------------------------------------------------------------------

def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # w goes first
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    emb_h = _1d_sincos(embed_dim // 2, grid[0])
    emb_w = _1d_sincos(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def _1d_sincos(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


# --------------------------------------------------------------------------------------------
# Paper sizes (DiT Table 1; SiT uses the same) and tiny sizes for tests and the embedded default
# --------------------------------------------------------------------------------------------

_SIZES = {"S": dict(depth=12, hidden_size=384, num_heads=6),
          "B": dict(depth=12, hidden_size=768, num_heads=12),
          "L": dict(depth=24, hidden_size=1024, num_heads=16),
          "XL": dict(depth=28, hidden_size=1152, num_heads=16)}
_TINY = {"T": dict(depth=4, hidden_size=32, num_heads=2),      # unit tests
         "D8": dict(depth=8, hidden_size=64, num_heads=4),     # embedded default (digits)
         "D28": dict(depth=28, hidden_size=96, num_heads=4)}   # GPU tier (Fashion-MNIST): XL's depth, small width


def _factory(cls, size: dict, patch: int):
    def make(**kwargs):
        return cls(patch_size=patch, **{**size, **kwargs})
    make.__name__ = f"{cls.__name__}_{patch}"
    return make


DiT_models = {f"DiT-{s}/{p}": _factory(DiT, kw, p) for s, kw in {**_SIZES, **_TINY}.items() for p in (2, 4, 8)}
SiT_models = {f"SiT-{s}/{p}": _factory(SiT, kw, p) for s, kw in {**_SIZES, **_TINY}.items() for p in (2, 4, 8)}
