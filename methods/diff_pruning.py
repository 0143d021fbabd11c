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
  False)`` (1.3.1 in the author's environment, Diff-Pruning issue #4): I_c = norm_mean( mean over the
  coupled Conv/Linear layers of sum_{k in c} |theta_k G_k| ) over *weights* only (``bias=False``;
  GroupNorm is not among its ``target_types``).
* ``squared`` — ``ddpm_exp`` (the paper's experiments), vendored ``TaylorImportance``:
  I_c = sum over the coupled Conv/Linear weights of sum_{k in c} (theta_k G_k)^2, plus the
  *unsquared* |theta_c G_c| of every coupled GroupNorm weight; no biases, not normalised.
  (``baselines.width.taylor_scores`` computes both.)

How the official code differs from a first reading, point by point (each a switch; where our first
version differed by mistake the official behaviour is now the default, and the old one a switch):

* which slices the importance reads — both official importances skip biases, and pip Torch-Pruning
  skips GroupNorm. Version 1 summed every coupled slice (biases, GroupNorm weights and biases) in both
  variants: a mistake, fixed in version 2 (no switch: nothing official read them).
* D1 ``select`` = per_norm_group [default] | unit. In a GroupNorm-coupled U-Net group both official
  paths (the vendored metapruner's ``prune_local`` and pip Torch-Pruning <= 1.4, i.e. the root
  script's 1.3.1) argsort the channels *inside each norm group* and prune the n lowest of every group
  independently (``n_pruned // ch_groups`` per group). Version 1 followed Torch-Pruning >= 1.4.3 (this
  suite pins 1.6.1), which averages the groups' scores and removes the same in-group positions
  everywhere: a mistake for this method, kept as ``select=unit``. The plan then names the kept dense
  channels under ``<root>.norm_channels`` (bench.width); the counts are the suite's allocation, the
  same for both. DiT/SiT have no GroupNorm: unaffected.
* D2 ``check`` = after [default: root, backward then threshold, the first sub-threshold step is
  included] | before (``ddpm_exp/finetune_simple.py``).
* D3 ``loss`` = mean [default, deliberate: the root script's ``F.mse_loss``] | sum (``ddpm_exp``'s
  ``noise_estimation_loss``: summed over C x H x W, averaged over the batch). The constant C*H*W scales
  G; ``abs_mean`` ranks the same either way, but ``squared`` mixes (theta G)^2 with |theta G|, so the
  sum changes which channels go: the paper config sets it.
* D4 ``attn_unit`` = heads [default] | head_dims: whole heads, or head dimensions with all heads kept
  (VainF's DiT recipe, Torch-Pruning issue #300: ``num_heads[qkv] = heads``, ``prune_num_heads=False``;
  the same positions in every head, as Torch-Pruning's head-grouped pruning does; bench.width).

Not reproduced (documented, no switch): Torch-Pruning prunes the groups one after another, so a
group scored later sees the earlier groups' channels already gone from its layers' rows (a conv's
row sum loses the input columns an earlier group removed); here every group is scored on the dense
model. The vendored importance sums only the layers whose index count equals the root's
(``aligned_group_imp``); a layer that receives a group twice through a skip concatenation is summed
here [not checked whether that case arises there]. ``ddpm_exp`` runs the DDIM codebase's U-Net,
this suite diffusers' UNet2DModel of the same architecture (google/ddpm-cifar10-32). TinyFusion's
DiT-XL/2 rows (Table 1, Diff-Pruning-50 % / -75 %: 338M / 169M of 675M) imply that the hidden size was
pruned too (169M is below what the adaLN layers alone keep when only heads and MLPs shrink) [A]; this
suite never prunes the residual stream (experiment cell ``diff_pruning_p50`` says so).

Other choices: ``thr`` = 0.05 (CIFAR-10 script; 0.01 LSUN, 0.1 LDM; 0 visits every step and equals
the "Taylor" row's data without its |sum|); ``t_stride`` = 1 in the paper, 20 for the embedded
default (the loss of an eps-model on 8x8 digits decays slowly with t, so the truncation lands late
and the scan must stay cheap); ``batch`` = 64 of the shared calibration probes (paper: 128 CIFAR
training images). Conditional models are scored with their labels (no label dropout). Flow models
use the velocity loss on the same u grid (an extension: the paper is DDPM-only).
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

from baselines.width import LOSSES, WidthMethod, accumulate_gradients, taylor_scores, timestep_grid
from bench.api import BenchError


class DiffPruning(WidthMethod):
    label = "diff_pruning"
    needs_grad = True
    version = 2  # 2: biases and norms as the official importances read them, per-norm-group choice, loss, head dims

    def __init__(self, thr: float = 0.05, score: str = "abs_mean", check: str = "after", batch: int = 64,
                 t_stride: int = 20, round_to: int = 1,
                 select: str = "per_norm_group",  # D1: both official paths (Torch-Pruning <= 1.4, vendored)
                 loss: str = "mean",              # D3: mean (root, F.mse_loss) | sum over C*H*W (ddpm_exp)
                 attn_unit: str = "heads"):       # D4: heads | head_dims (VainF's DiT recipe, TP issue 300)
        super().__init__(round_to)
        if score not in ("abs_mean", "squared"):
            raise BenchError(f"diff_pruning score={score!r}: use abs_mean (root/pip torch_pruning) or squared (ddpm_exp)")
        if not 0.0 <= thr < 1.0:
            raise BenchError(f"diff_pruning thr={thr} must be in [0, 1) (paper: 0.05 CIFAR-10, 0.01 LSUN)")
        if loss not in LOSSES:
            raise BenchError(f"diff_pruning loss={loss!r}: use mean (root ddpm_prune.py) or sum (ddpm_exp)")
        self._set_units(select, attn_unit)
        self.thr, self.score, self.check, self.loss = float(thr), score, check, loss
        self.batch, self.t_stride = int(batch), int(t_stride)

    def scores(self, net, calib):
        info = accumulate_gradients(net, calib, self.batch, timestep_grid(net, self.t_stride), self.thr, self.check,
                                    self.loss)
        units, chans = taylor_scores(net, self.score)
        net.zero_grad()
        T = int(getattr(net.process, "T", 1000))
        return units, {"thr": self.thr, "score": self.score, "check": self.check, "loss": self.loss,
                       "steps_used": info["steps_used"],
                       "t_stop": (info["steps_used"] - 1) * self.t_stride if info["steps_used"] else None,
                       "T": T, "losses": [round(x, 6) for x in info["losses"]]}, chans


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

