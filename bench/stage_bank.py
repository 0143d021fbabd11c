"""The stage bank of a width-routed model (bench.routing): each stage's own thin, OBS-compensated
output projections (Diff-ES's "OBS bank"), as a file and as parameters of the routed backbone.

The bank is a safetensors file named in ``plan.meta["bank"]`` ({"path", "sha256", ...}) with
entries

    stage<s>/<group>   the thin output projection of width group <group> in stage s
    shared/<group>     the weights written into the *stored* projection (the union's columns)

(which entries exist: ``bench.routing.pack_bank``). The file is named by its content
(stage_bank-<sha256[:16]>.safetensors), so plans that store different banks never share a file,
and a plan records the hash that ``load_bank`` checks. Installed, the stage entries are the
parameters of ``net.net.stage_bank`` (``StageBank``: counted, saved with the model and fine-tuned
like the rest, each by its own stage's samples); the official layout gains only those
``stage_bank.*`` keys.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from bench.api import BenchError
from bench.io import atomic_write, sha256_file


def bank_key(s: int | str, group: str) -> str:
    """'stage<s>/<group>' (s an int) or 'shared/<group>'."""
    return f"{'shared' if s == 'shared' else f'stage{int(s)}'}/{group}"


def _param_name(key: str) -> str:  # nn.Module attribute names cannot hold '.' or '/'
    return key.replace("/", "__").replace(".", "_")


class StageBank(nn.Module):
    """The stage entries of a bank as parameters of the routed backbone (``net.net.stage_bank``),
    so they are counted, saved with the model and fine-tuned like the rest."""

    def __init__(self, tensors: dict[str, torch.Tensor], trainable: bool = True):
        super().__init__()
        self.names = sorted(tensors)
        for k in self.names:
            self.register_parameter(_param_name(k), nn.Parameter(tensors[k], requires_grad=trainable))

    def get(self, key: str) -> torch.Tensor:
        return getattr(self, _param_name(key))


def save_bank(tensors: dict[str, torch.Tensor], directory) -> dict:
    """Write the bank as safetensors, named by its content (stage_bank-<sha256[:16]>.safetensors),
    atomically; returns the plan's reference {"path", "sha256", "tensors" (entries in the file),
    "stage_tensors", "params", "shared_tensors", "shared_params"}. "params" counts the stage entries
    only: what the routed model stores beyond the union (``net.net.stage_bank``, routed_cost's
    ``stage_bank_params``); the shared entries are written into the stored projections, add no
    parameter, and are counted apart ("shared_params")."""
    from safetensors.torch import save_file

    d = Path(directory)
    cpu = {k: v.detach().cpu().contiguous() for k, v in sorted(tensors.items())}
    # the name needs the content's hash: the complete file is written under a per-process name,
    # then renamed to its content name (one folder: a reader never sees half a bank)
    staged = atomic_write(d / f".stage_bank-{os.getpid()}.safetensors", lambda tmp: save_file(cpu, tmp))
    sha = sha256_file(staged)
    path = staged.replace(d / f"stage_bank-{sha[:16]}.safetensors")
    shared = {k for k in tensors if k.split("/", 1)[0] == "shared"}
    count = lambda keys: int(sum(tensors[k].numel() for k in keys))
    return {"path": str(path), "sha256": sha, "tensors": len(tensors), "stage_tensors": len(tensors) - len(shared),
            "params": count(set(tensors) - shared), "shared_tensors": len(shared), "shared_params": count(shared)}


def load_bank(ref: dict) -> dict[str, torch.Tensor]:
    """The bank a plan names (``plan.meta["bank"]``), after checking its sha256."""
    from safetensors.torch import load_file

    path = Path(str(ref.get("path", "")))
    if not path.is_file():
        raise BenchError(f"the plan's stage bank {path} (per-stage thin projections) does not exist; it is written "
                         "next to the run's artifacts when the plan is made: delete plan.json to plan again")
    got = sha256_file(path)
    if ref.get("sha256") and got != ref["sha256"]:
        raise BenchError(f"stage bank {path} has sha256 {got[:12]}..., the plan recorded {ref['sha256'][:12]}...; "
                         "delete plan.json to plan again")
    return load_file(str(path))
