"""EntPruner: entropy-guided adaptive depth pruning of DiT / SiT during fine-tuning.

Paper: Changlin Li, Jiawei Zhang, Zeyi Shi, Zongxin Yang, Zhihui Li, Xiaojun Chang, "Which Layer
Causes Distribution Deviation? Entropy-Guided Adaptive Pruning for Diffusion and Flow Models",
arXiv 2511.21122 (2025); earlier version: ICLR 2026 withdrawn submission "Entropy-Guided Automated
Progressive Pruning for Diffusion and Flow Models" (openreview pNvm002gkE). No code is public
(methods.md section 1), so everything below that is not in the abstract is a reconstruction.

What the paper states [V]:
  * block-level (depth) pruning of transformer blocks of DiT and SiT while transferring to a
    downstream dataset;
  * block importance = Conditional Entropy Deviation, CED_i = |H - H_-i| (H: entropy of the
    model's output distribution, conditional, data-dependent; H_-i: with block i removed);
  * a zero-shot adaptive schedule that decides when and how much to prune during training, with
    the NAS proxies NTK condition number and ZiCo [S: third-party summaries], progressive to avoid
    one-shot pruning's collapse.

Reconstruction choices [A] (each a keyword argument; default in brackets):
  R1  outputs        what "the output distribution" is: the network's prediction (eps for DDPM,
                     velocity for flow; learned-variance channels dropped) on the fixed calibration
                     probes x_t = noisy(x0, u, noise) [prediction]; the clean image that prediction
                     implies (x0: eps and velocity rescaled to image units, so the high-noise probes,
                     where eps barely depends on the model, weigh like the others); or final samples
                     of a short deterministic sampler from per-probe seeded noise (samples, sample_steps=10).
  R2  bypass         block i removed = the residual stream passes through it unchanged
                     (Denoiser.ablate), the same operation surgery performs.
  R3  condition      H(out | y) = sum_y p(y) H(out | y) over the probes' classes [class]; bin =
                     H(out | noise-level bin), one distribution per noise bin instead of one pooled
                     over all noise levels; pooled = one distribution over all probes. reduce:
                     |H - H_-i| of the conditional entropies [entropy], or sum_g p(g) |H_g - H_-i,g|
                     over the groups (per_group_abs).
  R4  estimator      Gaussian differential entropy d/2 log(2 pi e) + 1/2 log det S in float64 [gaussian],
                     its diagonal version (diagonal), or the Kozachenko-Leonenko kNN estimator (knn,
                     knn_k=3; Kraskov et al. 2004 Eq. 20) for the paper's open Gaussian assumption.
  R5  shrinkage      Ledoit-Wolf 2004 shrinkage of S [ledoit_wolf] or none; pca: project on the
                     top n-1 principal directions of the *full* model's outputs of a group (the
                     same basis for every ablation) when d >= n, for the full-covariance and kNN
                     estimators [auto]; off; or an int dimension (always projected).
                     eps_floor [1e-8] x the group's mean variance is added to eigenvalues /
                     variances / squared kNN distances so a collapsed output stays finite.
  R6  per bin        per-noise-level-bin CED from the probes of each bin, pooled over classes
                     (meta["scores_per_bin"]); prediction outputs only.
  R7  schedule       adaptive [adaptive] (progressive, a fine-tune callback) or oneshot (prune to
                     the budget by CED at once, then the shared fine-tune: the ablation).
  R8  when           decide every `period` [25; 15 in the 80-step default suite] steps; every decision before finish_frac [2/3] of
                     the fine-tune steps so the rest recovers the final model; the period shrinks
                     when a short run needs more decisions than fit.
  R9  how much       candidates drop the k lowest-CED blocks of the current model (CED recomputed
                     on the current weights at every decision), k = 0..k_max [2].
  R10 proxies        on the first proxy_batch [16] probes: TE-NAS NTK condition number of the summed
                     prediction, ZiCo of the training loss over zico_splits [2] mini-batches (ZiCo's
                     reference default); weights of Linear/Conv layers [proxy_params=weights];
                     independent per-batch gradients [zico_accumulate=false] (the reference code
                     accumulates them without zero_grad: true reproduces that).
  R11 vote           goodness of a candidate: -log kappa_NTK, ZiCo per layer [zico_per_layer=true]
                     because ZiCo's sum over layers shrinks with every removed block (false: the raw
                     sum). vote_rule [proposals]: the paper's voting read as each proxy proposing how
                     many blocks to remove, K_kappa from the NTK condition number and K_ZiCo from ZiCo
                     (its proposal = the candidate k = 0..k_top it rates best; the largest k within a
                     relative `tolerance` [0.0] of that best), the proposals combined into one count
                     [combine=mean: the vote_weights-weighted mean, rounded half down, so a removal needs
                     more than half of the weight behind it; min: what both agree to; max: what
                     either asks for]. Why this is the default: it is the reading whose vote can fire.
                     vote_rule=approval is version 2's rule (kept as the switch): proxy p approves
                     candidate k if its goodness is no worse than k=0's within `tolerance`; the
                     largest k whose weighted approval sum_p w_p approve_p / sum_p w_p reaches `quorum`
                     is accepted [quorum=1.0: both must approve, methods.md 1h]. Under it the vote
                     never fired: in every decision log of the default suite and the GPU digits runs
                     the NTK condition number of each candidate that drops a block was 1-30 % above
                     dropping none, so all decisions were voted_k=0, forced=True and the pace decided
                     everything. The log records both (`voted_k` under the rule in force,
                     `approval_k` under the approval rule, each proxy's `proposals`).
  R12 pace           the least a decision removes whatever the vote says (logged as forced when
                     it overrides the vote; each decision's `cause` says whether the vote or the pace
                     removed its blocks, `by_vote` / `by_pace` how many; ``python -m
                     methods.entpruner.schedule <run dir>`` prints "adaptive decisions: k of n"):
                     pace=even [even] an equal share of what is still to
                     go over this and the remaining decisions (ceil(remaining / decisions left));
                     pace=latest only what the remaining decisions (k_max each) could no longer
                     remove. The last decision removes all that is left; never past the target
                     (bench.surgery.blocks_to_keep; U-Net: the fewest operators, in CED order, whose
                     measured removal meets the budget). Why even is the default: on the default
                     suite the NTK condition number of every candidate that drops a block is
                     1-30 % above that of dropping none, at every decision, so with quorum 1.0 the
                     vote never passes; under pace=latest the schedule then removes everything at
                     its last decisions, a late one-shot with the least recovery (it scored far
                     below one-shot CED in our 80- and 150-step suites). pace=even keeps the
                     pruning progressive, as the paper's motivation has it, and lets the vote
                     move removals earlier than the pace (a decision is adaptive when the vote asks
                     for at least the pace's share).
  R13 weights        CED and proxies on the current (non-EMA) weights, in eval mode.
  R14 U-Net          the paper's first open question (does CED carry over to U-Nets?): the units
                     are the U-Net's operators whose skip structure allows a bypass (ResNet blocks
                     whose input and output shapes agree, residual attention blocks:
                     methods.entpruner.units; the up path's skip concatenations still carry the
                     down path's features). CED per operator exactly as for blocks; one-shot
                     removes the lowest-CED operators until the measured MACs / params meet the
                     budget (operators differ in cost, so each removal is measured); the adaptive
                     schedule counts, at every decision, the fewest CED-ordered removals that meet
                     the budget and paces those. Budgets in blocks are refused on the U-Net.
Not reproduced: the paper's fine-tune recipe, data and numbers (not available).
Observed on the default suite (DiT-D8/2 digits teacher, 2026-12-01; rows in results/runs): CED keeps the
late blocks (keep 0.5: [0, 3, 6, 7]; blocks 1 and 2 have the lowest CED) where the best block baselines
keep early ones (sensitivity [0, 2, 3, 4], ShortGPT [0, 1, 2, 3]), and scores below them (FD 174 vs 90-105
one-shot). The ranking is the same for outputs=samples, estimator=diagonal, condition=pooled and
reduce=per_group_abs (identical plans at both budgets); only estimator=knn changes it (keep 0.75: FD 55.9
vs 78.8, keep 0.5: 244 vs 174). An entropy-only criterion does not see a removal that shifts the output
distribution without changing its spread; that is a property of CED as defined, not of these switches.
Version 3 on the default suite (2026-12-06, the two entpruner rows in results/runs, teacher retrained on
that session's machine): the proposals vote fired in 1 of 5 decisions (keep 0.5, step 29: K_kappa 0,
K_ZiCo 2 -> 1, the pace's share too); NTK proposed 0 at every decision, as it never approved under
version 2, and ZiCo per layer proposed 0-2. At keep 0.75 the plan is version 2's ([0, 3, 4, 5, 6, 7]) and
yet FD (clf) is 101.6 against 78.8 (keep 0.5: [0, 5, 6, 7], 260 against 174 for [0, 3, 6, 7]): a teacher
that differs in its last bits and one seed's fine-tune move a row that much, so rank only over seeds
(bench.ranking; the GPU tier runs 3).
On the GPU tier (DiT-D28/2 Fashion-MNIST teacher, H100, seeds 0-2, 2026-12-06/07; results/gpu/tier,
reports/tables/gpu_tier_ranking.md): over 14 adaptive runs (default and CED variants) the proposals vote made
92 of 107 decisions and removed 131 of 147 blocks (`python -m methods.entpruner results/gpu/tier`), so the
schedule adapts. FID, mean ± std over seeds 0-2: 29.9 ± 1.9 at keep 0.75 and 59.3 ± 5.3 at 0.5, against
one-shot CED's 22.5 ± 0.6 / 45.3 ± 0.4 and last_k's 16.2 ± 0.3 / 19.5 ± 0.6; both differ from last_k at 95 %
(paired t-test over seeds). The adaptive schedule, which re-scores after each removal, does worse than
removing the lowest-CED blocks at once: re-scored on the partly pruned model, CED ranks more early blocks
low (keep 0.5, seed 2: the adaptive run removed blocks 2, 10 and 12 where one-shot removed 7, 23 and 25; the
other 11 are shared), and the last removals have less of the fine-tune to recover in (that run's last came
at step 149 of 300; finish_frac allows up to 194) where one-shot's model has all 300 steps. Default CED removes early and middle blocks (0.75, seeds 0-2: 3-6, 11,
13, 14, 16, with small changes between seeds, since the probes are seeded) where the best baselines drop the
last ones. What the default CED measures on the tier's teacher (methods.entpruner.inspect,
results/gpu/tier/ced_inspect; the first teacher's, results/gpu/tier_archive/teacher-4ead973a/ced_inspect,
agrees): on eps outputs every Ledoit-Wolf intensity is 1.000, H equals the isotropic Gaussian's of the same
total variance (81.56 nats) and nearly that of the same estimator on N(0, I) noise (82.03), and CED follows
the share of total variance a bypass changes (Spearman 0.99): a log ratio of total variances. On x0 outputs
the estimator sees structure (intensity 0.41, H 4.9 nats under the isotropic Gaussian's), CED ranks blocks
almost the other way (Spearman -0.44 with the default) and removes late blocks; experiment=gpu_tier_ced screens x0 per class and per noise bin on the GPU, and the tier
runs the better one at 3 seeds beside the default. The screen (seed 0) chose x0 per noise bin
(`method.outputs=x0 method.condition=bin`: geometric mean FID 24.5 against 35.7 for x0 per class and 43.3 for
the default). Over seeds 0-2 it gives 21.3 ± 1.9 at 0.75 and 32.7 ± 2.6 at 0.5 (mean ± std), the best
EntPruner line but still behind last_k at 95 % (paired t-test over seeds: Δ 5.1 [1.3, 8.9] and 13.2
[6.4, 20.1]). It removes middle and late blocks (0.75, seed 0: 8, 11, 12, 14, 17, 23, 24; seed 1: 7-9, 11,
12, 19, 23; seed 2: 8, 9, 11-14, 23).

Outputs: plan.scores["blocks"] (U-Net: scores["resnets"], scores["attentions"]) = CED on the dense model, meta["scores_per_bin"] per noise bin;
the adaptive schedule logs every decision (step, CED, candidates, proxy values, proposals, votes, choice,
cause) to <run_dir>/entpruner_decisions.jsonl; ``replay(path)`` rebuilds the final plan from it,
``summarize(path)`` / ``python -m methods.entpruner <run dir> ...`` counts the adaptive decisions; plots in
methods/plots.py. ``python -m methods.entpruner.inspect --out DIR <bench.run overrides>`` shows what CED measures
on a trained teacher (H against N(0, I) and the isotropic Gaussian of the same size and total variance, the
Ledoit-Wolf intensity, every outputs x condition x estimator variant's CED, one-shot removals and rank
correlations; the GPU tier's teacher: results/gpu/tier/ced_inspect).
Backbone-specific only through its adaptive schedule's proxies (methods.proxies: NTK and ZiCo over
``net.backbone``'s layers); CED and the removals use protocol members only.

Under several ranks (torchrun, a SLURM job of several tasks): plan() runs on rank 0 and its Plan
is broadcast; the fine-tune callback runs on every rank with the same weights and the global mean
loss (its calibration forwards and proxies are not split over ranks), and rank 0's Plan is applied
on every rank (bench.finetune).
"""
from __future__ import annotations

import torch

from bench import surgery
from bench.api import BenchError, Budget, Method, Plan
from bench.surgery import blocks_to_keep, keep_top
from methods.entpruner import units as U
from methods.entpruner.ced import CONDITIONS, OUTPUTS, REDUCES, ced_scores
from methods.entpruner.schedule import COMBINES, LOG_NAME, PACES, VOTE_RULES, AdaptiveSchedule, decision_steps, \
    removal_order, replay, summarize

__all__ = ["EntPruner", "replay", "summarize", "ced_scores", "decision_steps", "LOG_NAME"]

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class EntPruner(Method):
    granularity = "block"
    version = 3  # 2: pace (R12), U-Net operators (R14); 3: vote_rule=proposals by default (R11), outputs=x0, condition=bin
    needs_grad = True  # the adaptive schedule's proxies backpropagate; CED itself does not

    def __init__(
        self,
        schedule: str = "adaptive",        # R7: adaptive (prune during fine-tuning) | oneshot (ablation)
        outputs: str = "prediction",       # R1: prediction (per-step eps/velocity) | x0 (implied clean image) | samples
        condition: str = "class",          # R3: class (H(out|y), averaged with p(y)) | bin (per noise bin) | pooled
        reduce: str = "entropy",           # R3: entropy (|H - H_-i|) | per_group_abs (sum_y p(y)|H_y - H_-i,y|)
        estimator: str = "gaussian",       # R4: gaussian | diagonal | knn (Kozachenko-Leonenko)
        shrinkage: str = "ledoit_wolf",    # R5: ledoit_wolf | none (Gaussian covariance)
        pca="auto",                        # R5: auto (when d >= n) | off | an int dimension
        knn_k: int = 3,                    # R4: neighbour order of the kNN estimator (Kraskov et al. use 3)
        eps_floor: float = 1e-8,           # R5: relative floor that keeps collapsed outputs finite
        per_bin: bool = True,              # R6: also score each noise-level bin (plots)
        sample_steps: int = 10,            # R1: sampler steps for outputs=samples
        sample_seed: int = 0,              # R1: first per-probe noise seed for outputs=samples
        batch_size: int = 64,              # memory only; outputs are per probe
        dtype: str = "fp32",               # fp32 | bf16 | fp16 autocast of the CED forwards (GPU)
        period: int = 25,                  # R8: steps between decisions (scaled to 150 fine-tune steps)
        finish_frac: float = 2 / 3,        # R8: all pruning before this fraction of the fine-tune
        k_max: int = 2,                    # R9: most blocks one decision may remove voluntarily
        pace: str = "even",                # R12: even (equal share per decision) | latest (only when forced)
        proxy_batch: int = 16,             # R10: probes for NTK and ZiCo
        proxy_params: str = "weights",     # R10: weights (Linear/Conv, TE-NAS/ZiCo code) | all
        zico_splits: int = 2,              # R10: ZiCo mini-batches (reference default split_data=2)
        zico_accumulate: bool = False,     # R10: true = reference code's missing zero_grad()
        zico_per_layer: bool = True,       # R11: compare ZiCo per layer (depth-neutral)
        vote_weights: dict | None = None,  # R11: {"ntk": w, "zico": w}; None = equal weights
        vote_rule: str = "proposals",      # R11: proposals (each proxy proposes K, combined) | approval (version 2)
        combine: str = "mean",             # R11: proposals -> one count: weighted mean (half down) | min | max
        quorum: float = 1.0,               # R11: approval rule: approval share needed (1.0 = every proxy)
        tolerance: float = 0.0,            # R11: relative slack (proposals: of the best candidate; approval: of k=0)
    ):
        def one_of(name, value, options):
            if value not in options:
                raise BenchError(f"entpruner {name}={value!r} is unknown; use one of {', '.join(map(str, options))}")
        one_of("schedule", schedule, ("adaptive", "oneshot"))
        one_of("outputs", outputs, OUTPUTS)
        one_of("condition", condition, CONDITIONS)
        one_of("reduce", reduce, REDUCES)
        one_of("estimator", estimator, ("gaussian", "diagonal", "knn"))
        one_of("shrinkage", shrinkage, ("ledoit_wolf", "none"))
        one_of("dtype", dtype, tuple(_DTYPES))
        one_of("proxy_params", proxy_params, ("weights", "all"))
        one_of("pace", pace, PACES)
        one_of("vote_rule", vote_rule, VOTE_RULES)
        one_of("combine", combine, COMBINES)
        if not (pca in ("auto", "off") or (isinstance(pca, int) and pca >= 1)):
            raise BenchError(f"entpruner pca={pca!r} is unknown; use auto, off or a positive int")
        if period < 1 or k_max < 1 or proxy_batch < 2 or zico_splits < 2 or not 0 < finish_frac <= 1:
            raise BenchError("entpruner needs period >= 1, k_max >= 1, proxy_batch >= 2, zico_splits >= 2 "
                             "and 0 < finish_frac <= 1")
        weights = {"ntk": 1.0, "zico": 1.0} if vote_weights is None else {k: float(v) for k, v in vote_weights.items()}
        if set(weights) - {"ntk", "zico"} or sum(weights.values()) <= 0 or min(weights.values()) < 0:
            raise BenchError(f"entpruner vote_weights={vote_weights} must map ntk/zico to weights >= 0, not all 0")
        self.schedule, self.outputs, self.condition, self.reduce = schedule, outputs, condition, reduce
        self.estimator, self.shrinkage, self.pca, self.knn_k = estimator, shrinkage, pca, int(knn_k)
        self.eps_floor, self.per_bin, self.sample_steps = float(eps_floor), bool(per_bin), int(sample_steps)
        self.sample_seed, self.batch_size, self.dtype = int(sample_seed), int(batch_size), dtype
        self.period, self.finish_frac, self.k_max, self.pace = int(period), float(finish_frac), int(k_max), pace
        self.proxy_batch, self.proxy_params, self.zico_splits = int(proxy_batch), proxy_params, int(zico_splits)
        self.zico_accumulate, self.zico_per_layer = bool(zico_accumulate), bool(zico_per_layer)
        self.vote_weights, self.quorum, self.tolerance = weights, float(quorum), float(tolerance)
        self.vote_rule, self.combine = vote_rule, combine
        self.needs_grad = schedule == "adaptive"

    def settings(self) -> dict:
        """Every knob, for the plan's meta and the decision log."""
        keys = ("schedule", "outputs", "condition", "reduce", "estimator", "shrinkage", "pca", "knn_k", "eps_floor",
                "sample_steps", "sample_seed", "dtype", "period", "finish_frac", "k_max", "pace", "proxy_batch",
                "proxy_params", "zico_splits", "zico_accumulate", "zico_per_layer", "vote_weights", "vote_rule",
                "combine", "quorum", "tolerance")
        return {k: getattr(self, k) for k in keys}

    def ced(self, net, calib, per_bin: bool | None = None) -> dict:
        """CED of every block of the current model (see methods.entpruner.ced.ced_scores)."""
        return ced_scores(net, calib, outputs=self.outputs, condition=self.condition, reduce=self.reduce,
                          estimator=self.estimator, shrinkage=self.shrinkage, pca=self.pca, knn_k=self.knn_k,
                          eps_floor=self.eps_floor, batch_size=self.batch_size, amp_dtype=_DTYPES[self.dtype],
                          sample_steps=self.sample_steps, sample_seed=self.sample_seed,
                          per_bin=self.per_bin if per_bin is None else per_bin)

    def plan(self, net, budget: Budget, calib) -> Plan:
        kind = U.kind_of(net)
        if kind == U.OPERATORS and budget.measure == "blocks":
            raise BenchError("the U-Net has no transformer blocks; give EntPruner's budget in MACs or params "
                             "(budget.measure=macs)")
        r = self.ced(net, calib)
        meta = {"method": "entpruner", "schedule": self.schedule, "calib_n": len(calib),
                "entropy_full": r["H"], "entropy_ablated": r["H_ablated"], "groups": r["groups"], "dim": r["dim"],
                "ced_seconds": r["seconds"], "settings": self.settings()}
        if r["ced_per_bin"] is not None:
            meta["scores_per_bin"] = r["ced_per_bin"]
        if kind == U.BLOCKS:
            depth = len(r["ced"])
            n_keep = blocks_to_keep(net, budget)
            kept = keep_top(r["ced"], n_keep) if self.schedule == "oneshot" else list(range(depth))
            return Plan(granularity="block", keep={"blocks": kept}, scores={"blocks": [float(c) for c in r["ced"]]},
                        meta={**meta, "target_blocks": n_keep})
        # the U-Net (R14): bypassable operators, removed lowest CED first until the measured cost fits
        labels, dense = r["units"], surgery.measure(net)[budget.measure]
        if self.schedule == "oneshot":
            order = [labels[i] for i in removal_order(r["ced"])]
            k = U.needed(net, order, budget, labels, dense, None)
            kept = [s for s in labels if s not in set(order[:k])]
            before = U.frac_without(net, order[:k - 1], labels, budget, dense) if k else 1.0
            share = before - U.frac_without(net, order[:k], labels, budget, dense)
            meta["removed"] = order[:k]
        else:
            kept, share = labels, U.largest_share(net, budget, dense)
        plan = U.plan_for(U.OPERATORS, kept, labels, {**meta, "unit_share": share + 1e-6, "units": labels})
        groups = sorted({s.split(":")[0] for s in labels})
        plan.scores = {g: [float(c) for s, c in zip(labels, r["ced"]) if s.split(":")[0] == g] for g in groups}
        return plan

    def callback(self, budget: Budget, calib):
        return AdaptiveSchedule(self, budget, calib) if self.schedule == "adaptive" else None
