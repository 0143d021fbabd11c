"""Load official checkpoints, strictly, with errors that name the fix: DiT / SiT into
bench.models.dit, the DDPM U-Net (diffusers layout) into bench.models.unet.

Provenance of the accepted DiT / SiT formats:
  * raw state dict saved with ``torch.save``: the released ``DiT-XL-2-256x256.pt`` (facebookresearch/DiT)
    and ``SiT-XL-2-256x256.pt`` (willisma/SiT);
  * training checkpoint ``{"model", "ema", "opt", "args"}`` written by both repos' train.py; like their
    ``find_model`` we take ``"ema"`` when present (the weights the papers sample from), else ``"model"``;
  * ``.safetensors`` (e.g. re-exports on the Hugging Face Hub), read with the ``safetensors`` package.
Keys saved from a DDP-wrapped model carry a leading ``module.``; it is stripped.

The U-Net's: a diffusers ``UNet2DModel`` folder (``google/ddpm-cifar10-32``; ``load_unet_checkpoint``)
or one state-dict file in any of the formats above.

Files are read with ``weights_only=True`` (no arbitrary unpickling). ``argparse.Namespace`` is allowed
because train.py stores its ``args`` as one; anything else non-tensor is refused with the fix spelled out.
"""
from __future__ import annotations

import argparse
import json
import math
import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from bench.api import BenchError
from bench.models.dit import _SIZES, _TINY

if TYPE_CHECKING:
    from bench.models.unet import UNetBackbone


def load_state_dict_file(path) -> dict[str, torch.Tensor]:
    """Read ``path`` (any accepted format) into a flat ``{name: tensor}`` dict on the CPU."""
    p = Path(path)
    if not p.is_file():
        raise BenchError(f"checkpoint not found: {p}; put the official file there or pass model.ckpt=...")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            obj = load_file(str(p), device="cpu")
        except Exception as e:  # safetensors' own error type: bad header, truncation
            raise _corrupt(p, e) from None
    else:
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(p, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if "Unsupported global" not in str(e):
                raise _corrupt(p, e) from None
            # refused, not broken: the pickle names classes we will not execute unless told the file is trusted
            raise BenchError(
                f"checkpoint {p} holds Python objects besides tensors, which weights_only loading refuses. "
                "If you trust its source, re-save just the weights once: "
                f"c = torch.load('{p}', weights_only=False); torch.save(c.get('ema', c.get('model', c)), 'weights.pt')"
            ) from None
        except Exception as e:  # truncated zip (RuntimeError), garbage bytes (KeyError from the legacy reader)
            raise _corrupt(p, e) from None

    if isinstance(obj, dict) and isinstance(obj.get("ema"), dict):
        obj = obj["ema"]
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BenchError(f"checkpoint {p} is not a state dict (expected name -> tensor, or a training "
                         "checkpoint with 'ema'/'model'); pass the official DiT/SiT weights file")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_official(model: torch.nn.Module, path, strict: bool = True):
    """Load an official checkpoint into ``model``; returns torch's (missing_keys, unexpected_keys).

    We compare keys and shapes ourselves before ``load_state_dict`` so that a wrong model size fails
    with one readable message (and a suggestion of the matching model) instead of torch's key dump.
    Shape mismatches are errors even with ``strict=False`` (torch cannot copy them either).
    """
    sd = load_state_dict_file(path)
    own = model.state_dict()
    missing, unexpected, shapes = _key_mismatch(sd, own)
    if shapes or (strict and (missing or unexpected)):
        raise BenchError(_mismatch_message(path, model, sd, own, missing, unexpected, shapes))
    return model.load_state_dict(sd, strict=strict)


# --------------------------------------------------------------------------------------------
# Diagnosis of a mismatch: read the architecture off the tensors (official layout)
# --------------------------------------------------------------------------------------------

def infer_config(sd: dict) -> dict | None:
    """Architecture implied by an official-layout state dict, or None if it is not DiT/SiT-shaped.
    The number of heads cannot be read from the weights (qkv is 3D x D); it follows the size table."""
    if "pos_embed" not in sd or "x_embedder.proj.weight" not in sd:
        return None
    w = sd["x_embedder.proj.weight"]                     # (D, C_in, p, p)
    hidden, in_ch, patch = w.shape[0], w.shape[1], w.shape[-1]
    tokens = sd["pos_embed"].shape[1]                    # (1, T, D), T = (input_size / p)^2
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    cfg = dict(depth=depth, hidden_size=hidden, patch_size=patch,
               input_size=math.isqrt(tokens) * patch, in_channels=in_ch)
    if "y_embedder.embedding_table.weight" in sd:        # +1 row: the CFG null label
        cfg["num_classes"] = sd["y_embedder.embedding_table.weight"].shape[0] - 1
    if "final_layer.linear.weight" in sd:
        cfg["learn_sigma"] = sd["final_layer.linear.weight"].shape[0] == patch * patch * 2 * in_ch
    return cfg


def _model_name(cfg: dict, family: str) -> str | None:
    for size, kw in {**_SIZES, **_TINY}.items():
        if (kw["depth"], kw["hidden_size"]) == (cfg["depth"], cfg["hidden_size"]):
            return f"{family}-{size}/{cfg['patch_size']}"
    return None


def _key_mismatch(sd: dict, own: dict) -> tuple[list[str], list[str], list[tuple]]:
    """(model keys the checkpoint lacks, checkpoint keys the model lacks, (key, checkpoint shape,
    model shape) of the keys both have with different shapes)."""
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in own if k in sd and sd[k].shape != own[k].shape]
    return missing, unexpected, shapes


def _mismatch_lines(path, what: str, missing, unexpected, shapes) -> list[str]:
    """The counts and the first keys of each kind, the start of every mismatch message."""
    def listed(keys):
        return ", ".join(keys[:5]) + (f", ... (+{len(keys) - 5} more)" if len(keys) > 5 else "")

    lines = [f"checkpoint {path} does not match the {what}: {len(missing)} missing, "
             f"{len(unexpected)} unexpected, {len(shapes)} shape-mismatched keys"]
    if missing:
        lines.append(f"missing: {listed(missing)}")
    if unexpected:
        lines.append(f"unexpected: {listed(unexpected)}")
    for k, s_ckpt, s_model in shapes[:5]:
        lines.append(f"shape: {k} checkpoint {s_ckpt} vs model {s_model}")
    if len(shapes) > 5:
        lines.append(f"... (+{len(shapes) - 5} more shape mismatches)")
    return lines


def _mismatch_message(path, model, sd, own, missing, unexpected, shapes) -> str:
    lines = _mismatch_lines(path, "model", missing, unexpected, shapes)
    ckpt_cfg, model_cfg = infer_config(sd), infer_config(own)
    if ckpt_cfg is None:
        lines.append("the checkpoint does not look like DiT/SiT (no pos_embed / x_embedder.proj.weight); "
                     "pass an official DiT/SiT weights file")
        return "; ".join(lines)
    family = type(model).__name__ if type(model).__name__ in ("DiT", "SiT") else "DiT"
    ckpt_desc = _describe(ckpt_cfg, family)
    model_desc = f" but the model is {_describe(model_cfg, family)}" if model_cfg else ""
    lines.append(f"the checkpoint is {ckpt_desc}{model_desc}; build the model it was made for with "
                 f"{_overrides(ckpt_cfg, family)}, or pass the checkpoint made for this model")
    return "; ".join(lines)


def _overrides(cfg: dict, family: str) -> str:
    """Command-line overrides that build the architecture `cfg` describes (every key below is in
    each DiT/SiT model config; a size outside the table adds its depth and width with +)."""
    name = _model_name(cfg, family)
    out = [f"model.name={name or family + '-XL/' + str(cfg['patch_size'])}"]
    out += [f"model.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in cfg.items()
            if k in ("input_size", "in_channels", "num_classes", "learn_sigma")]
    if not name:
        out += [f"+model.depth={cfg['depth']}", f"+model.hidden_size={cfg['hidden_size']}"]
    return " ".join(out)


def _describe(cfg: dict, family: str) -> str:
    """'DiT-XL/2(input_size=32, ...)' when (depth, hidden) is a known size, else 'DiT(depth=..., ...)'."""
    name = _model_name(cfg, family)
    skip = ("depth", "hidden_size", "patch_size") if name else ()
    return f"{name or family}(" + ", ".join(f"{k}={v}" for k, v in cfg.items() if k not in skip) + ")"


def _corrupt(p: Path, e: Exception) -> BenchError:
    msg = str(e).split("WeightsUnpickler error:")[-1].strip()  # skip torch's weights_only preamble
    msg = msg.splitlines()[0][:120] if msg else ""
    return BenchError(f"checkpoint {p} is corrupt or not a checkpoint ({type(e).__name__}{': ' + msg if msg else ''}); "
                      "re-download it (a partial download looks like this)")


# --------------------------------------------------------------------------------------------
# The U-Net (bench.models.unet): a diffusers model folder or a state-dict file, loaded strictly
# --------------------------------------------------------------------------------------------

# UNet2DModel config keys that change the weights or the function they compute
_ARCH_KEYS = ("sample_size", "in_channels", "out_channels", "center_input_sample", "time_embedding_type",
              "time_embedding_dim", "freq_shift", "flip_sin_to_cos", "down_block_types", "mid_block_type",
              "up_block_types", "block_out_channels", "layers_per_block", "mid_block_scale_factor",
              "downsample_padding", "downsample_type", "upsample_type", "act_fn", "attention_head_dim",
              "norm_num_groups", "attn_norm_num_groups", "norm_eps", "resnet_time_scale_shift",
              "add_attention", "class_embed_type", "num_class_embeds")
# pre-0.15 diffusers attention names (google/ddpm-* on the Hub), renamed as diffusers' own loader does
_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def _model_dir(p: Path) -> Path:
    if not (p / "config.json").exists() and (p / "unet").is_dir():
        return p / "unet"                   # a pipeline folder: the U-Net lives in unet/
    return p


def checkpoint_files(path) -> tuple[Path, Path | None]:
    """(weights file, config.json or None) of a U-Net checkpoint, or a BenchError naming the fix."""
    p = Path(path)
    if p.is_dir():
        d = _model_dir(p)
        files = [d / f for f in _WEIGHT_FILES if (d / f).is_file()]
        if not files:
            raise BenchError(f"no weights in {d}: expected {' or '.join(_WEIGHT_FILES)}; download the whole model "
                             f"folder (e.g. `huggingface-cli download google/ddpm-cifar10-32 --local-dir {p}`)")
        cfg = d / "config.json"
        return files[0], (cfg if cfg.is_file() else None)
    if p.is_file():
        return p, None
    raise BenchError(f"U-Net checkpoint not found: {p}; pass model.ckpt=<diffusers model folder or weights file> "
                     "(DDPM CIFAR-10: `huggingface-cli download google/ddpm-cifar10-32 --local-dir <dir>`, then "
                     "DDPM_CIFAR10_DIR=<dir>), or model.ckpt=null to train the teacher here")


def load_unet_checkpoint(net: UNetBackbone, path) -> None:
    """Load ``path`` into ``net.unet`` strictly: a diffusers model folder (``config.json`` +
    ``diffusion_pytorch_model.safetensors`` or ``.bin``, optionally under ``unet/``), or one state-dict
    file (``.safetensors``, ``.pt``/``.bin``, also our own checkpoints with ``unet.``-prefixed keys).
    A folder's config.json must describe the same architecture; pre-0.15 diffusers attention names
    (``query``/``key``/``value``/``proj_attn``, as in google/ddpm-*) are renamed as diffusers does."""
    weights, cfg = checkpoint_files(path)
    if cfg is not None:
        _check_config(net, cfg)
    sd = _normalise_keys(load_state_dict_file(weights))
    missing, unexpected, shapes = _key_mismatch(sd, net.unet.state_dict())
    if missing or unexpected or shapes:
        raise BenchError("; ".join(_mismatch_lines(weights, "U-Net", missing, unexpected, shapes) + [
            "build the model with the checkpoint's architecture (block_out_channels, layers_per_block, block types, "
            "num_classes) or pass the checkpoint made for this model"]))
    net.unet.load_state_dict(sd, strict=True)


def _normalise_keys(sd: dict) -> dict:
    if sd and all(k.startswith("unet.") for k in sd):
        sd = {k[len("unet."):]: v for k, v in sd.items()}      # our own UNetBackbone state dict
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if len(parts) >= 3 and parts[-2] in _LEGACY_ATTN and "attentions" in parts:
            k = ".".join(parts[:-2] + [_LEGACY_ATTN[parts[-2]], parts[-1]])
        out[k] = v
    return out


def _check_config(net: UNetBackbone, cfg_file: Path) -> None:
    import inspect

    from diffusers import UNet2DModel

    try:
        ck = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise BenchError(f"{cfg_file} is not a readable JSON config ({e}); re-download the model folder") from None
    if ck.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise BenchError(f"{cfg_file} describes a {ck['_class_name']}, not a UNet2DModel; point model.ckpt at a "
                         "UNet2DModel folder (a pipeline folder's unet/)")
    defaults = {k: v.default for k, v in inspect.signature(UNet2DModel.__init__).parameters.items()}
    own = net.unet.config

    def norm(v):
        return list(v) if isinstance(v, (list, tuple)) else v

    diffs = []
    for k in _ARCH_KEYS:
        want = norm(ck.get(k, defaults.get(k)))
        have = norm(own.get(k, defaults.get(k)))
        if k == "attention_head_dim" and want is None and have is None:
            continue
        if want != have:
            diffs.append(f"{k}: checkpoint {want!r} vs model {have!r}")
    if diffs:
        raise BenchError(f"checkpoint config {cfg_file} does not match the model: " + "; ".join(diffs[:6])
                         + (f"; ... (+{len(diffs) - 6} more)" if len(diffs) > 6 else "")
                         + ". Set these in the model config (bench/conf/model/*.yaml) or pass the matching checkpoint")
