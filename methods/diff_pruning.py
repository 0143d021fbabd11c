"""Diff-Pruning — "Structural Pruning for Diffusion Models" (Fang, Ma, Wang, NeurIPS 2023,
arXiv 2305.10924). Method card.

Algorithm (paper Sec. 3.2, Eq. 7-8; methods.md section 2b):

    one fixed batch x0 and one fixed noise eps;  L_max = 0;  G = 0
    for t = 0, 1, 2, ... (clean first):   L_t = ||eps - eps_theta(x_t, t)||^2
        L_max = max(L_max, L_t);  stop when L_t < thr * L_max  (the high-noise steps carry little
        information about the content, so their gradients are left out)
        G += grad L_t
    unit score from theta and G (two variants, below); in every width group the lowest-scoring
    units go (group-local ratio, Torch-Pruning global_pruning=False), then fine-tune.

Both score variants of the official code (config switch ``score``, since the choice can change
rankings and the paper's numbers came from the second: the README's CIFAR-10 table is the
``ddpm_exp`` DDIM codebase, FID 5.29 with quadratic skips; ``diff_pruning_paper`` uses it):

* ``abs_mean`` — root ``ddpm_prune.py`` with pip torch_pruning ``TaylorImportance(multivariable=
  False)``: I_c = norm_mean( mean over coupled layers of sum_{k in c} |theta_k G_k| ).
* ``squared`` — ``ddpm_exp`` (the paper's experiments), vendored ``TaylorImportance``:
  I_c = sum over coupled layers of sum_{k in c} (theta_k G_k)^2, not normalised.

Choices (each a switch): ``check`` = after (root: backward then threshold, the first
sub-threshold step is included) | before (ddpm_exp); ``thr`` = 0.05 (CIFAR-10 script; 0.01 LSUN,
0.1 LDM; 0 visits every step and equals the "Taylor" row's data without its |sum|);
``t_stride`` = 1 in the paper, 20 for the embedded default (the loss of an eps-model on 8x8
digits decays slowly with t, so the truncation lands late and the scan must stay cheap);
``batch`` = 64 of the shared calibration probes (paper: 128 CIFAR training images).
Conditional models are scored with their labels (no label dropout). Flow models use the velocity
loss on the same u grid (an extension: the paper is DDPM-only).
Allocation (how many units each group keeps): Torch-Pruning's local pruning with one ratio for
every group, as ``bench.surgery.width_plan`` does for all width methods, with the ratio found by
measuring the pruned model against the budget. Its rounding follows Torch-Pruning: a
GroupNorm-coupled U-Net group (a 128-channel conv with 32 norm groups has only 4 units, one channel
of every norm group each) rounds its *pruned* count down (ratio 0.3: 3 of 4 and 6 of 8 units kept),
then whole units are added back, least-kept group first, while the measured cost stays within the
budget. Rounding the kept count down (this suite's first version) made all coarse groups drop
together (3/4 -> 2/4, 6/8 -> 5/8) and the CIFAR-10 experiment's budget fell from 0.557 to 0.357.
The CIFAR-10 experiment (``experiment=diffpruning_cifar10``) gives its budget in params, 0.5554 =
19.85M / 35.75M: the allocation then lands on exactly the paper's ratio-0.3 model; the paper's MAC
ratio (3.4G / 6.1G = 0.557) is Torch-Pruning's counter without attention's matmuls, and this
suite measures that model at 0.563 of its MACs. Fine-tune dropout 0.1 as the paper.
KD fine-tuning (0.7 teacher-output MSE + 0.3 noise MSE, ``*_kd.sh``) is the shared loop's
``finetune.distill=0.7`` (a command-line override, so every method can be given the same KD).
"""
from __future__ import annotations

from baselines.width import WidthMethod, accumulate_gradients, timestep_grid
from bench.api import BenchError


class DiffPruning(WidthMethod):
    label = "diff_pruning"
    needs_grad = True

    def __init__(self, thr: float = 0.05, score: str = "abs_mean", check: str = "after", batch: int = 64,
                 t_stride: int = 20, round_to: int = 1):
        super().__init__(round_to)
        if score not in ("abs_mean", "squared"):
            raise BenchError(f"diff_pruning score={score!r}: use abs_mean (root/pip torch_pruning) or squared (ddpm_exp)")
        if not 0.0 <= thr < 1.0:
            raise BenchError(f"diff_pruning thr={thr} must be in [0, 1) (paper: 0.05 CIFAR-10, 0.01 LSUN)")
        self.thr, self.score, self.check = float(thr), score, check
        self.batch, self.t_stride = int(batch), int(t_stride)

    def scores(self, net, calib):
        info = accumulate_gradients(net, calib, self.batch, timestep_grid(net, self.t_stride), self.thr, self.check)
        out = {}
        for name, g in net.width_groups().items():
            if self.score == "abs_mean":
                s = g.per_unit(lambda w, gr: (w * gr).abs().sum(1)) / max(1, g.n_members())
                s = s / s.mean().clamp_min(1e-30)
            else:
                s = g.per_unit(lambda w, gr: (w * gr).pow(2).sum(1))
            out[name] = s.tolist()
        net.zero_grad()
        T = int(getattr(net.process, "T", 1000))
        return out, {"thr": self.thr, "score": self.score, "check": self.check, "steps_used": info["steps_used"],
                     "t_stop": (info["steps_used"] - 1) * self.t_stride if info["steps_used"] else None,
                     "T": T, "losses": [round(x, 6) for x in info["losses"]]}


def truncation_step(losses: list[float], thr: float, check: str = "after") -> int:
    """Number of steps whose gradients Diff-Pruning accumulates for a given loss curve (the same
    rule as accumulate_gradients, on numbers; used by tests and plots)."""
    l_max, used = 0.0, 0
    for lv in losses:
        l_max = max(l_max, lv)
        stop = thr > 0 and lv < thr * l_max
        if stop and check == "before":
            break
        used += 1
        if stop:
            break
    return used

