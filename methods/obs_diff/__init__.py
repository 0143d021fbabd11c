"""OBS-Diff: one-shot, training-free pruning of diffusion models with layer-wise Optimal Brain Surgeon
and a timestep-aware Hessian, structured (attention heads + MLP neurons) on DiT / SiT.

Paper: Junhan Zhu, Hesong Wang, Mingluo Su, Zefang Wang, Huan Wang, "OBS-Diff: Accurate Pruning For
Diffusion Models in One-Shot", ICLR 2026, arXiv 2510.06751 (v3 read in full; research notes
methods.md section 5). The paper prunes MMDiT / U-Net text-to-image models; DiT/SiT results do
not exist, so the mapping onto DiT/SiT below is ours [A]. Written from the paper and the notes; no
code copied.

What the paper specifies [V]:
  * per linear layer, min_W' sum_t alpha_t ||W X_t - W' X_t||^2 over calibration inputs collected
    along the sampling trajectory -> H = 2 sum_t alpha_t E[X_t X_t^T] (Sec. 4);
  * timestep weights, log-decrease: alpha_t = a_min + (a_max - a_min) ln(T - t + 1) / ln T with
    t = 1 the first (noisiest) step, a_max = 1.2, a_min = 0.8 (the best of its weighting ablation);
  * damping lambda = percdamp * mean(diag H), percdamp = 0.01;
  * structured: a group's saliency and compensating update from the inverse Hessian (OBS),
    greedy removal with the inverse Hessian updated after every removal; ``--no_compensate``
    skips the update (ablation);
  * module packages: the target layers split into ``num_pruned_groups`` (4) packages calibrated and
    pruned in sequence, each with the earlier ones already pruned;
  * unstructured (SparseGPT machinery, blocks of 128 columns) and N:M semi-structured variants.

Our choices [A] (keyword arguments; default in brackets):
  O1 trajectory  ``n_probes`` [32] of the shared calibration probes: their noise is x_T and their
                 label the class; ``sampler`` [auto: DDIM eta 0 for DDPM, Euler for flow; one call
                 per step], ``steps`` [10], ``cfg_scale`` [1.5] and ``cfg_convention`` [all] as the
                 suite's evaluation (both CFG halves enter H). Paper: 100 prompts, 25 steps, cfg 7.
  O2 weights     ``weighting`` [log_decrease] | log_increase | linear_decrease | linear_increase |
                 uniform (the paper's ablation), ``w_min`` [0.8], ``w_max`` [1.2]; step t of the
                 sampler (t = 1 noisiest) gets alpha_t; H is the alpha-weighted mean over rows.
  O3 units       DiT/SiT heads = groups of head_dim input columns of ``attn.proj`` (+ the head's
                 q/k/v rows of ``attn.qkv``, removed by surgery); MLP neurons = input columns of
                 ``mlp.fc2`` (+ ``fc1`` rows). OBS acts on the consumer (proj / fc2): its
                 surviving columns get the compensation, the producer rows of removed units are
                 simply dropped. The first and last blocks are *not* excluded (the paper excludes
                 them on SD3; on an 8-block model that would be a quarter of the depth).
  O4 counts      per layer from bench.surgery.width_plan (the suite's local allocation to the MACs /
                 params budget, measured); OBS chooses which units within each layer.
  O5 saliency    ``saliency`` [block]: L_S = 1/2 sum_rows w_S^T (Hinv_SS)^-1 w_S, exact OBS for a
                 group; chol_diag: sum over the group's columns of w^2 / U_kk^2 with U the Cholesky
                 factor of Hinv_SS (the public code's head rule). Identical for single neurons.
  O6 greedy      ``chunk`` [1] groups removed per step (the paper removes large FFNs in chunks for
                 speed; at our sizes one at a time is cheap); the inverse Hessian is downdated
                 exactly after each removal (the same as zeroing H's rows/columns and inverting).
  O7 packages    ``packages`` [4]: the ordered target layers (block 0 proj, block 0 fc2, block 1
                 proj, ...) that lose units, split into contiguous packages; each package's
                 Hessians come from a fresh trajectory of the model with the earlier packages
                 already pruned (zeroed consumer columns = removed units, until surgery).
  O8 compensate  ``compensate`` [true]; false = the no-compensation ablation (same choices, columns
                 zeroed), method ``obs_diff_nocomp``.
  O9 mode        ``mode`` [structured]; unstructured (``sparsity``) and nm (``nm`` "2:4") zero
                 weights of qkv, proj, fc1 and fc2 in place: **masks, no speedup and no measured
                 params/MACs saving without sparse kernels**, so they only run with budget.keep=1.0
                 and, as in the paper, without fine-tuning (finetune=none: the shared loop does not
                 keep masks); bench.run refuses anything else before the run starts (``mask_only``).
                 Configs: obs_diff_unstructured (sparsity 0.5), obs_diff_nm (2:4).
Training-free as in the paper (its DDPM-CIFAR comparison fine-tunes afterwards); in the suite the
shared fine-tune follows like for every other method.

plan() rewrites the consumer weights (``rewrites_weights``): bench.run stores the pruned model
(artifacts ``pruned.safetensors``, sha256 in plan.meta) and reloads it on resume. The Plan's keep
sets replay the *shapes* on a fresh dense model, not the compensated weights.
``obs_prune_columns`` (methods.obs_diff.obs) is the layer routine other methods call (Diff-ES's
second-order width backend).
Backbone-specific (``net.backbone``): the per-layer Hessians hook the nn.Linear layers of the
DiT/SiT ``backbone.blocks[i].attn`` / ``.mlp`` and OBS rewrites their weights.

Under several ranks (torchrun, a SLURM job of several tasks): plan() (calibration Hessians and the
OBS weight updates) runs on rank 0 alone; the run stores the rewritten weights and the other ranks
load them with the broadcast Plan (bench.run).
"""
from __future__ import annotations

import time

import torch

from bench.api import BenchError, Budget, Method, Plan
from bench.surgery import width_plan
from methods.obs_diff.hessian import default_sampler, trajectory_hessians
from methods.obs_diff.obs import (HessianAccumulator, WEIGHTINGS, group_saliency, obs_prune_columns,
                                  obs_prune_unstructured, reconstruction_error, timestep_weights)

__all__ = ["ObsDiff", "obs_prune_columns", "obs_prune_unstructured", "timestep_weights", "trajectory_hessians",
           "HessianAccumulator", "group_saliency", "reconstruction_error", "split_packages", "width_layers"]

MASK_NOTE = "mask only: zeros in dense weights, no speedup or params/MACs saving without sparse kernels"


def split_packages(items: list, n: int) -> list[list]:
    """`items` in order, cut into min(n, len) contiguous packages whose sizes differ by at most one."""
    n = max(1, min(int(n), len(items)))
    q, r = divmod(len(items), n)
    out, i = [], 0
    for k in range(n):
        size = q + (1 if k < r else 0)
        out.append(items[i:i + size])
        i += size
    return [p for p in out if p]


def width_layers(net) -> list[dict]:
    """The consumer layer of every DiT/SiT width group, in model order: heads -> attn.proj
    (group_size = head_dim), MLP hidden channels -> mlp.fc2 (group_size 1)."""
    groups = net.width_groups()
    out = []
    for pos, b in enumerate(net.kept_blocks):
        block = net.backbone.blocks[pos]
        for key, attr in (("attn.heads", "attn"), ("mlp.hidden", "mlp")):
            name = f"blocks.{b}.{key}"
            mod = getattr(block, attr, None)
            if name not in groups or mod is None:
                continue
            layer = mod.proj if attr == "attn" else mod.fc2
            gs = mod.head_dim if attr == "attn" else 1
            out.append({"group": name, "path": f"blocks.{pos}.{attr}.{'proj' if attr == 'attn' else 'fc2'}",
                        "layer": layer, "group_size": gs, "dense_ids": list(groups[name].dense_ids)})
    if not out:
        raise BenchError(f"OBS-Diff needs a DiT/SiT backbone (attention heads and MLPs in transformer blocks); "
                         f"{net.name} has none")
    return out


class ObsDiff(Method):
    granularity = "width"
    label = "obs_diff"
    version = 1
    rewrites_weights = True

    def __init__(
        self,
        mode: str = "structured",          # O9: structured | unstructured | nm (the last two are masks)
        compensate: bool = True,           # O8: false = the no-compensation ablation
        percdamp: float = 0.01,            # paper default: lambda = 0.01 * mean(diag H)
        weighting: str = "log_decrease",   # O2: the paper's best; its ablation's other four
        w_min: float = 0.8,                # O2: alpha at the last (cleanest) step
        w_max: float = 1.2,                # O2: alpha at the first (noisiest) step
        packages: int = 4,                 # O7: module packages (paper: num_pruned_groups 4)
        n_probes: int = 32,                # O1: probes whose trajectories calibrate (paper: 100 prompts)
        sampler: str = "auto",             # O1: auto (ddim | euler), or ddpm / ddim / euler / heun
        steps: int = 10,                   # O1: sampling steps (paper: 25)
        cfg_scale: float = 1.5,            # O1: as the suite's evaluation (paper: 7.0 for text)
        cfg_convention: str = "all",       # O1: all | dit3
        saliency: str = "block",           # O5: block (exact group OBS) | chol_diag (public code's heads)
        chunk: int = 1,                    # O6: groups removed per greedy step
        sparsity: float = 0.5,             # O9: unstructured fraction of zero weights
        nm: str = "2:4",                   # O9: N:M pattern (N zeros in every M)
        blocksize: int = 128,              # O9: SparseGPT column block
        batch_size: int = 64,              # memory only
        seed: int = 0,                     # per-step noise of a stochastic sampler (ddpm)
        round_to: int = 1,                 # O4: kept channels per group rounded to a multiple
    ):
        def one_of(name, value, options):
            if value not in options:
                raise BenchError(f"obs_diff {name}={value!r} is unknown; use one of {', '.join(map(str, options))}")
        one_of("mode", mode, ("structured", "unstructured", "nm"))
        one_of("weighting", weighting, WEIGHTINGS)
        one_of("saliency", saliency, ("block", "chol_diag"))
        one_of("sampler", sampler, ("auto", "ddpm", "ddim", "euler", "heun"))
        one_of("cfg_convention", cfg_convention, ("all", "dit3"))
        try:
            n_, m_ = (int(v) for v in str(nm).split(":"))
        except ValueError:
            raise BenchError(f"obs_diff nm={nm!r}: write N:M, e.g. 2:4") from None
        if percdamp < 0 or packages < 1 or n_probes < 1 or steps < 1 or chunk < 1 or blocksize < 1 \
                or not 0 <= sparsity < 1 or not 0 < n_ < m_ or batch_size < 1 or round_to < 1:
            raise BenchError("obs_diff needs percdamp >= 0, packages, n_probes, steps, chunk, blocksize, batch_size, "
                             "round_to >= 1, 0 <= sparsity < 1 and N:M with 0 < N < M")
        self.mode, self.compensate, self.percdamp = mode, bool(compensate), float(percdamp)
        self.weighting, self.w_min, self.w_max = weighting, float(w_min), float(w_max)
        self.packages, self.n_probes, self.sampler, self.steps = int(packages), int(n_probes), sampler, int(steps)
        self.cfg_scale, self.cfg_convention, self.saliency, self.chunk = float(cfg_scale), cfg_convention, saliency, int(chunk)
        self.sparsity, self.nm, self.blocksize = float(sparsity), (n_, m_), int(blocksize)
        self.mask_only = mode != "structured"  # zeros, no shape change: the run refuses a fine-tune that refills them
        self.batch_size, self.seed, self.round_to = int(batch_size), int(seed), int(round_to)

    def settings(self) -> dict:
        keys = ("mode", "compensate", "percdamp", "weighting", "w_min", "w_max", "packages", "n_probes", "sampler",
                "steps", "cfg_scale", "cfg_convention", "saliency", "chunk", "sparsity", "blocksize", "batch_size",
                "seed", "round_to")
        return {**{k: getattr(self, k) for k in keys}, "nm": f"{self.nm[0]}:{self.nm[1]}"}

    def _hessians(self, net, layers: dict, calib):
        n = min(self.n_probes, len(calib))
        dev = net.device
        return trajectory_hessians(net, layers, calib.noise[:n].to(dev), calib.y[:n].to(dev), self.sampler, self.steps,
                                   self.cfg_scale, self.cfg_convention, self.weighting, self.w_min, self.w_max,
                                   self.batch_size, self.seed)

    def plan(self, net, budget: Budget, calib) -> Plan:
        t0 = time.perf_counter()
        with net.eval_mode(), torch.no_grad():
            if self.mode == "structured":
                plan = self._structured(net, budget, calib)
            else:
                plan = self._masks(net, budget, calib)
        plan.meta["seconds"] = round(time.perf_counter() - t0, 3)
        return plan

    # ---- structured: heads + neurons --------------------------------------------------------
    def _structured(self, net, budget: Budget, calib) -> Plan:
        if budget.measure == "blocks":
            raise BenchError("obs_diff prunes heads and MLP neurons; give the budget in MACs or params "
                             "(budget.measure=macs budget.keep=0.5)")
        targets = width_layers(net)
        groups = net.width_groups()
        alloc = width_plan(net, {g: [1.0] * u.size for g, u in groups.items()}, budget,
                           round_to={"channels": self.round_to})
        for t in targets:
            t["n_remove"] = len(t["dense_ids"]) - len(alloc.keep[t["group"]])
        todo = [t for t in targets if t["n_remove"] > 0]
        keep = {g: list(u.dense_ids) for g, u in groups.items()}
        scores = {g: [0.0] * u.size for g, u in groups.items()}
        layers_meta, pkg_names, alpha = {}, [], []
        for pkg in split_packages(todo, self.packages):
            pkg_names.append([t["group"] for t in pkg])
            H, alpha = self._hessians(net, {t["path"]: t["layer"] for t in pkg}, calib)
            for t in pkg:  # calibrated together, pruned one after the other (independent layers)
                W = t["layer"].weight
                kept, W_new, info = obs_prune_columns(W, H[t["path"]], t["n_remove"], t["group_size"], self.percdamp,
                                                      self.compensate, self.saliency, self.chunk, return_info=True)
                Hd = H[t["path"]]
                dW = (W_new.double() - W.double())
                err = 0.5 * float(torch.einsum("ri,ij,rj->", dW, Hd, dW))
                ref = 0.5 * float(torch.einsum("ri,ij,rj->", W.double(), Hd, W.double()))
                W.copy_(W_new)  # compensated surviving columns, removed columns exactly 0
                keep[t["group"]] = [t["dense_ids"][j] for j in kept]
                scores[t["group"]] = [float(s) for s in info["saliency"]]
                layers_meta[t["group"]] = {"removed_order": [t["dense_ids"][j] for j in info["order"]],
                                           "rel_output_error": err / ref if ref > 0 else 0.0}
        return Plan(granularity=self.granularity, keep=keep, scores=scores,
                    meta={"method": self.label, "settings": self.settings(), "packages": pkg_names,
                          "sampler": self._sampler(net), "timestep_weights": alpha,
                          "layers": layers_meta, "measured_keep": alloc.meta.get("measured_keep"),
                          "calib_n": min(self.n_probes, len(calib))})

    def _sampler(self, net) -> str:
        return default_sampler(net) if self.sampler == "auto" else self.sampler

    # ---- unstructured / N:M: masks -----------------------------------------------------------
    def _masks(self, net, budget: Budget, calib) -> Plan:
        if budget.keep < 1.0:
            raise BenchError(f"obs_diff mode={self.mode} gives a {MASK_NOTE}: the measured cost stays the dense one, "
                             f"so run it with budget.keep=1.0 (the sparsity is method.sparsity / method.nm) and "
                             "finetune=none")
        targets = []
        for pos, b in enumerate(net.kept_blocks):
            block = net.backbone.blocks[pos]
            for path in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
                try:
                    targets.append((f"blocks.{pos}.{path}", f"blocks.{b}.{path}", block.get_submodule(path)))
                except AttributeError:
                    continue
        if not targets:
            raise BenchError(f"OBS-Diff needs a DiT/SiT backbone; {net.name} has no transformer blocks")
        zeros, total, pkg_names = 0, 0, []
        for pkg in split_packages(targets, self.packages):
            pkg_names.append([d for _, d, _ in pkg])
            H, _ = self._hessians(net, {p: m for p, _, m in pkg}, calib)
            for p, _, m in pkg:
                mask, W_new = obs_prune_unstructured(m.weight, H[p], self.sparsity,
                                                     self.nm if self.mode == "nm" else None, self.percdamp,
                                                     self.blocksize, self.compensate)
                m.weight.copy_(W_new)
                zeros += int(mask.sum())
                total += mask.numel()
        groups = net.width_groups()
        return Plan(granularity=self.granularity, keep={g: list(u.dense_ids) for g, u in groups.items()},
                    meta={"method": self.label, "settings": self.settings(), "mask_only": True, "note": MASK_NOTE,
                          "target_sparsity": zeros / max(1, total), "packages": pkg_names})
