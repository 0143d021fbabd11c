"""TinyFusion: learnable depth pruning of diffusion transformers.

Paper: Gongfan Fang, Kunjun Li, Xinyin Ma, Xinchao Wang, "TinyFusion: Diffusion Transformers
Learned Shallow", CVPR 2025, arXiv 2412.01199; code VainF/TinyFusion @a147de7
(`prune_by_learning.py`, `models_with_layer_pruning.py`, `train_masked_kd.py`), summarised in
research/methods.md section 7 [V]; written here from that description, not from the code.

What it does [V]:
  * local N:M layer groups: the L blocks are split into groups of M, each keeping N (Sec. 3.2);
  * each group has a categorical distribution over its C(M, N) candidate masks (logits initialised
    to 0.02), sampled per sample with a hard Gumbel-softmax (straight-through) of logits x scaling
    (100, from MaskLLM) at temperature tau, linear 4 -> 0.1 over the pruning phase; a block with
    mask m computes x + m (phi(x) - x);
  * recoverability: a weight update (LoRA rank 8, alpha 16, on the Linear layers) is trained jointly
    with the logits on the diffusion loss, min_p min_dW E_{x, m ~ p} L(x, W + dW, m) (Eq. 5-7), then
    discarded: the decision is the argmax of the EMA (0.999) of each group's logits, and the original
    weights keep the chosen blocks;
  * recovery: fine-tuning, best with masked representation distillation (Table 5; methods/tinyfusion/kd.py).

Reconstruction choices [A] (keyword arguments; defaults in brackets, paper values in the config):
  T1 data       learn_data [train]: the pruning phase draws its batches from the training set (the
                one the calibration probes come from, calib.source) through the fine-tune loop's
                batch source (bench.loader), with its flips (data.hflip) and workers: the paper's
                recipe, one epoch of ImageNet latents with flips (prune_by_learning.py's
                CustomDataset(flip=0.5) over extract_features.py's encodings of each image and its
                mirror), here i.i.d. batches drawn with replacement for `steps` steps (steps x batch
                / N epochs); fresh seeded noise and t. learn_data=calib: the 256 shared calibration
                probes' clean images instead (version 1's behaviour).
  T2 schedule   steps [100] at batch [32], lr [1e-3] for the update and gate_lr [1e-2] for the logits
                (paper: 1e-4 and 10x for ~10K steps; scaled to a ~10 s pruning phase on one CPU
                thread for the 8-block default), EMA decay [0.99] (paper 0.999 over 10K steps), grad
                clip 1.0, tau 4 -> 0.1, scaling 100, logit init 0.02 as the paper.
  T3 groups     group_size M [2]; N follows from the budget (blocks_to_keep): with n_keep = K N the
                paper's uniform N:M, otherwise proportional to the group sizes with the remainder
                to evenly spaced groups (make_groups; the last group is shorter when M does not
                divide the depth). keep 0.5 with M=2 is the paper's 1:2, M=4 its 2:4, M=14 its 7:14.
  T4 update     update [lora] | full (a copy of the model is fine-tuned jointly) | frozen (Table 4);
                LoRA rank [8], alpha [16] on lora_targets [all] Linear layers (or blocks only),
                through forward hooks (B = 0 at init), removed after the decision.
  T5 prior      optional: another scorer's block ranking (methods.blockscores: cosine, shortgpt,
                flux_lite, magnitude, sensitivity, entpruner) initialises the logits, candidate c of a
                group getting prior_strength x the mean z-scored score of the blocks it keeps (in
                units of the scaled logits): learnable depth pruning warm-started from a ranking.
  T6 recovery   finetune [the shared fine-tune] | masked_kd (a fine-tune callback whose loss is
                0.9 KD + 0.1 GT + beta_t masked representation loss, kd.py); kd_alpha [0.9], rep_beta
                [1e-2, SiT paper 2e-4] decaying linearly to 0, rep_sigma [2], rep_map [group_end],
                kd_rule [official: the code's mean_flat((mask_s s - mask_t t)^2) over every position and
                0.9 VB_KD + 0.1 VB; both_bands: version 1's reconstruction, kd.py says how it differs].
  T7 u_range    noise levels the pruning phase draws t from [[0, 1]]; a stage's range makes the
                learned masks a per-stage ranking.
Not reproduced: the paper's ImageNet-scale phases and numbers (Table 1: DiT-XL/2 28 -> 14 blocks
at FID 5.73 / 3.73 with KD after 100K steps), MAR and SiT experiments, iterative D14 -> D7.

Outputs: keep["blocks"] (dense indices), scores["blocks"] = each block's keep probability under
the final EMA distribution, meta: groups with their keep counts, candidates, logits and EMA
logits, the learning log (loss, tau, current choice every 25 steps), settings.
Backbone-specific (``net.backbone``): the learnable depth gates a forward over the DiT/SiT
``backbone.blocks``, LoRA hooks its nn.Linear layers, and masked KD reads its hidden states.
"""
from __future__ import annotations

import torch

from bench.api import BenchError, Budget, Method, Plan
from bench.surgery import blocks_to_keep
from methods.blockscores import SCORERS, block_scores
from methods.tinyfusion.kd import KD_RULES, REP_MAPS, MaskedKD
from methods.tinyfusion.learn import candidates, learn_masks, make_groups

__all__ = ["TinyFusion", "MaskedKD", "learn_masks", "make_groups"]


class TinyFusion(Method):
    granularity = "block"
    version = 3  # 3: masked KD as train_masked_kd.py (kd_rule=official); 2: learn_data=train
    needs_grad = True

    def __init__(
        self,
        group_size: int = 2,            # T3: M of the local N:M groups (paper 1:2, 2:4, 7:14)
        steps: int = 100,               # T2: pruning-phase steps (paper ~10K: 1 epoch at batch 128)
        batch: int = 32,                # T2: (paper global batch 128)
        update: str = "lora",           # T4: lora | full | frozen (paper Table 4)
        lora_rank: int = 8,             # T4: paper --lora-rank 8
        lora_alpha: float = 16.0,       # T4: paper alpha 16
        lora_targets: str = "all",      # T4: all | blocks (Linear layers that get the update)
        lr: float = 1e-3,               # T2: update lr (paper 1e-4)
        gate_lr: float = 1e-2,          # T2: logit lr (paper 10x the update lr)
        tau_start: float = 4.0,         # paper --tau-range 4 0.1, linear
        tau_end: float = 0.1,
        scaling: float = 100.0,         # paper --scaling-range 100 100 (MaskLLM)
        logit_init: float = 0.02,       # paper: constant 0.02
        ema_decay: float = 0.99,        # T2: paper 0.999 over ~10K steps
        grad_clip: float = 1.0,         # paper 1.0
        u_range: list | tuple = (0.0, 1.0),  # T7
        prior: str | None = None,       # T5: a methods.blockscores scorer to warm-start the logits
        prior_strength: float = 1.0,    # T5: scaled-logit units per z-score
        prior_kwargs: dict | None = None,
        recovery: str = "finetune",     # T6: finetune | masked_kd
        kd_alpha: float = 0.9,          # T6: paper 0.9 KD + 0.1 GT
        rep_beta: float = 1e-2,         # T6: paper 1e-2 (SiT 2e-4), linearly to 0
        rep_sigma: float = 2.0,         # T6: paper 2 sigma (Table 5)
        rep_map: str = "group_end",     # T6: group_end (paper's i <-> 2i+1) | same_block
        kd_rule: str = "official",      # T6: official (train_masked_kd.py) | both_bands (version 1's reconstruction)
        learn_data: str = "train",      # T1: train (the paper: the training set) | calib (the shared probes)
        seed: int = 0,                  # Gumbel noise, LoRA init, batches
    ):
        if update not in ("lora", "full", "frozen"):
            raise BenchError(f"tinyfusion update={update!r} is unknown; use lora | full | frozen")
        if lora_targets not in ("all", "blocks"):
            raise BenchError(f"tinyfusion lora_targets={lora_targets!r} is unknown; use all | blocks")
        if recovery not in ("finetune", "masked_kd"):
            raise BenchError(f"tinyfusion recovery={recovery!r} is unknown; use finetune | masked_kd")
        if prior is not None and (prior not in SCORERS or prior == "tinyfusion"):
            raise BenchError(f"tinyfusion prior={prior!r} is unknown; use null or one of "
                             f"{', '.join(s for s in SCORERS if s != 'tinyfusion')}")
        if learn_data not in ("train", "calib"):
            raise BenchError(f"tinyfusion learn_data={learn_data!r} is unknown; use train | calib")
        if rep_map not in REP_MAPS:
            raise BenchError(f"tinyfusion rep_map={rep_map!r} is unknown; use one of {', '.join(REP_MAPS)}")
        if kd_rule not in KD_RULES:
            raise BenchError(f"tinyfusion kd_rule={kd_rule!r} is unknown; use one of {', '.join(KD_RULES)}")
        lo, hi = (float(v) for v in u_range)
        if not 0 <= lo < hi <= 1 or group_size < 1 or steps < 0 or batch < 1 or lora_rank < 1 or tau_end <= 0:
            raise BenchError("tinyfusion needs 0 <= u_range[0] < u_range[1] <= 1, group_size >= 1, steps >= 0, "
                             "batch >= 1, lora_rank >= 1 and tau_end > 0")
        self.group_size, self.steps, self.batch, self.update = int(group_size), int(steps), int(batch), update
        self.lora_rank, self.lora_alpha, self.lora_targets = int(lora_rank), float(lora_alpha), lora_targets
        self.lr, self.gate_lr, self.tau_start, self.tau_end = float(lr), float(gate_lr), float(tau_start), float(tau_end)
        self.scaling, self.logit_init, self.ema_decay = float(scaling), float(logit_init), float(ema_decay)
        self.grad_clip, self.u_range = float(grad_clip), [lo, hi]
        self.prior, self.prior_strength, self.prior_kwargs = prior, float(prior_strength), dict(prior_kwargs or {})
        self.recovery, self.kd_alpha, self.rep_beta = recovery, float(kd_alpha), float(rep_beta)
        self.rep_sigma, self.rep_map, self.kd_rule, self.seed = float(rep_sigma), rep_map, kd_rule, int(seed)
        self.learn_data = learn_data
        self.needs_grad = True

    def settings(self) -> dict:
        keys = ("group_size", "steps", "batch", "update", "lora_rank", "lora_alpha", "lora_targets", "lr", "gate_lr",
                "tau_start", "tau_end", "scaling", "logit_init", "ema_decay", "grad_clip", "u_range", "prior",
                "prior_strength", "prior_kwargs", "recovery", "kd_alpha", "rep_beta", "rep_sigma", "rep_map", "kd_rule",
                "learn_data", "seed")
        return {k: getattr(self, k) for k in keys}

    def prior_logits(self, net, calib, groups) -> tuple[list[list[float]] | None, list[float] | None]:
        """T5: candidate c of a group gets strength x mean z-score of the blocks it keeps."""
        if self.prior is None:
            return None, None
        s = torch.tensor(block_scores(net, calib, self.prior, **self.prior_kwargs), dtype=torch.float64)
        z = (s - s.mean()) / s.std().clamp_min(1e-12) if len(s) > 1 else s * 0
        out = []
        for g, n in groups:
            c = candidates(len(g), n).double()
            zg = z[g]
            out.append((self.prior_strength * (c @ zg) / max(1, n)).tolist())
        return out, s.tolist()

    def train_data(self, calib):
        """T1: the training set the pruning phase draws from (None: the calibration probes)."""
        if self.learn_data == "calib":
            return None
        if getattr(calib, "source", None) is None:
            raise BenchError("tinyfusion learn_data=train needs the training set the probes came from "
                             "(calib.source, set by bench.data.calibration); pass learn_data=calib to learn "
                             "over the probes")
        return calib.source

    def learn(self, net, calib, groups, u_range=None) -> tuple[dict, list[float] | None]:
        """Learn the masks of `groups` (positions, keep counts); returns (result, prior scores)."""
        prior, prior_scores = self.prior_logits(net, calib, groups)
        res = learn_masks(net, calib, groups, data=self.train_data(calib), steps=self.steps, batch=self.batch, update=self.update,
                          lora_rank=self.lora_rank, lora_alpha=self.lora_alpha, lora_targets=self.lora_targets,
                          lr=self.lr, gate_lr=self.gate_lr, tau=(self.tau_start, self.tau_end), scaling=self.scaling,
                          logit_init=self.logit_init, ema_decay=self.ema_decay, grad_clip=self.grad_clip,
                          u_range=tuple(u_range or self.u_range), prior=prior, seed=self.seed)
        return res, prior_scores

    def plan(self, net, budget: Budget, calib) -> Plan:
        depth = net.depth
        n_keep = blocks_to_keep(net, budget)
        groups = make_groups(depth, self.group_size, n_keep)
        res, prior_scores = self.learn(net, calib, groups)
        dense = list(net.kept_blocks)
        kept = [dense[p] for p in res["kept"]]
        meta = {"method": "tinyfusion", "settings": self.settings(), "target_blocks": n_keep,
                "groups": [{"blocks": [dense[p] for p in g], "keep": n} for g, n in groups],
                "candidates": res["candidates"], "logits": res["logits"], "ema_logits": res["ema_logits"],
                "log": res["log"], "seconds": res["seconds"], "calib_n": len(calib)}
        if (data := self.train_data(calib)) is not None:
            meta["learn_n"], meta["learn_hflip"] = len(data), bool(getattr(data, "hflip", False))
        if prior_scores is not None:
            meta["prior_scores"] = prior_scores
        return Plan(granularity="block", keep={"blocks": kept}, scores={"blocks": [float(v) for v in res["marginals"]]},
                    meta=meta)

    def callback(self, budget: Budget, calib):
        if self.recovery != "masked_kd":
            return None
        return MaskedKD(self.group_size, self.kd_alpha, self.rep_beta, self.rep_sigma, self.rep_map, self.kd_rule)
