"""Diff-ES: stage-wise structural pruning of diffusion models by evolutionary search.

Paper: Zongfang Liu, Shengkun Tang, Zongliang Wu, Xin Yuan, Zhiqiang Shen, "Stage-wise Structural
Diffusion Pruning via Evolutionary Search", arXiv 2603.05105 (2026); code ZongfangLiu/Diff-ES
@71c9af0 (`dit/evo_search.py`, `dit/evo_pruning_utils.py`, `dit/calibration.py`, `dit/models.py`).
Only the abstract of the paper was reachable; the rest follows the code as summarised in
research/methods.md section 6 [V], written here in our own words.

What it does [V]:
  * the sampling trajectory is split into S stages of the noise level; each stage s gets its own
    sparsity level L_s in [0, H]; the model switches keep sets with the timestep at inference and
    shares one copy of the dense weights (bench.routing);
  * per-stage calibration: probes noised inside the stage rank the units of each stage
    (layer drop: 1 - cos(flatten(block out), flatten(block in)) per sample, ascending = drop order;
    second order: structured OBS on attn.proj / mlp.fc2 with that stage's layer Hessians, the
    compensated thin projections stored per stage, q/k/v and fc1 rows selected from the shared
    dense weights: the "OBS bank", methods.diffes.backends);
  * the level vector is searched by an EvoPress-style evolution (methods.diffes.search): fixed
    and random initial allocations under the budget, level-switch mutation, elitist survivors,
    fitness cached per level vector;
  * fitness: a fixed probe set of noises and labels sampled by the dense teacher and by the
    candidate with DDIM at the run's CFG scale; default -MSE of the final latents
    (methods.diffes.fitness; Frechet distance, SSIM, cosine, SNR as options);
  * no fine-tuning in the code (training-free); here the shared fine-tune follows, as for every
    method (it trains the routed model: each sample updates the blocks, and with the second-order
    backend the thin projections, of its own stage).

Reconstruction choices [A] (keyword arguments; defaults in brackets):
  R1 stages      num_stages [4] stages uniform in u (= uniform in DDPM training t, the code's
                 default; paper code 20, README 10: 4 suits an 8-block model), or `dividers` (inner
                 u edges). Stage 0 is the least noisy (u ascending).
  R2 budget      on the trajectory average: sum_s w_s cost(L_s) <= keep, w_s = the stage's share of
                 the *deployed* sampler's network evaluations (traj_sampler/steps/skip [the run's
                 eval sampler: 25-step DDPM ancestral]; bench.routing.nfe_weights); the code's fixed
                 level sum is the equal-weight case (search.py). A params budget counts what the
                 routed model stores (the union of the stages' blocks; for second order also every
                 stage's thin projections), so stage-wise pruning has nothing to search there: every
                 stage keeps the budget's number of blocks with the best trajectory-mean scores, or
                 (second order) the same OBS-chosen and compensated width, from the trajectory-weighted
                 Hessian (a static plan, meta["params_budget"] says so).
  R3 backend     layerdrop [layerdrop]: level = blocks removed in that stage (H = depth - 1, at least
                 one block runs). secondorder (method diffes_obs): level = width removed in that
                 stage, heads and MLP channels of every block, chosen and compensated by OBS
                 (methods.obs_diff) on that stage's probes (details R9 and methods.diffes.backends);
                 a MACs budget (blocks: refused).
  R4 scorer      per-stage block ranking on the calibration probes whose noise level lies in the stage
                 [cosine = Diff-ES's flattened cosine]; shortgpt (per-token), flux_lite, magnitude,
                 sensitivity, entpruner (CED), tinyfusion (keep probabilities of TinyFusion's mask
                 learning on the stage's probes and noise range) make Diff-ES the stage-wise schedule
                 over those rankings (scorer_kwargs go to the scorer). protect_ends [0] as the code's.
                 cfg_calib [true]: on a class-conditional model with label dropout (and fitness_cfg > 1,
                 the code's `cfg_scale > 1`) the per-sample scorers (cosine, shortgpt, flux_lite) score
                 the CFG-doubled batch, each probe with its label and with the null label, both halves
                 summed (the code's `calibrate_layerdrop_orders` hooks its `forward_with_cfg` batch);
                 version 1 scored the conditional half only (a mistake: false keeps it).
  R5 population  the code's patterns front/back/middle/ramp_up/ramp_down/zigzag/ends plus flat (the
                 uniform schedule: the search starts from at least it) and n_random [4] random
                 (gamma) allocations, all projected on the budget; survivors [4] (code default),
                 offspring [8] (code 16), generations [5] (diffes.yaml; code 100, README 50: on the
                 default teacher no unseen neighbour is left after ~5), sized so plan() takes ~10-20 s
                 on one CPU thread for the default model.
  R6 mutation    level switch of m <= mutation_max_levels [2] (README DiT 5 of 16 levels) levels,
                 min(U{1..M}, U{1..M}) moves with M = mutation_n_valid [1] (README 1); unequal stage
                 weights: random single-level repair to feasible and tight (search.py).
  R7 fitness     probes [32] (code 64) with seeds probe_seed + k [1234, code's seed], labels k mod K,
                 fitness_sampler [DDIM eta 0 for DDPM, Euler for flow], fitness_steps [10] (code 20),
                 fitness_cfg [1.5 = the suite's eval CFG; code 2.1 for DiT], metric fitness [latent_mse];
                 fitness_cfg_convention [dit3]: guidance on the first three latent channels only, the
                 rest from the conditional half (DiT's `forward_with_cfg`, which the code samples with;
                 version 1 guided all channels: a mistake on 4-channel DiT latents, "all" keeps it;
                 identical on models with at most three channels, e.g. the digits and the U-Net).
  R8 seed        the search's RNG (mutations, random patterns) [the run's seed]; probes are fixed.
  R9 second      levels [8]: level L removes round(L n / levels) units of each group of n (every
     order       block's heads, its MLP channels; at least one kept; the code has levels = H heads, one
                 head per level: ours keeps a fine grid on few-head models, the MLP carrying it); H_s = 2 E[X X^T] of each consumer's
                 input over the stage's probes, uniform within the stage (the code's; OBS-Diff's
                 log-decrease weights are per step of a whole trajectory), cfg_calib [true]: the
                 null-label forward enters H too (the code's CFG-doubled batch); percdamp [0.01] always
                 (code: only when the Cholesky fails); saliency [block] = w_S^T (Hinv_SS)^-1 w_S (the
                 code's score_j; chol_diag = OBS-Diff's head rule); obs_chunk [1]; compensate [true]
                 (false: selected columns, the ablation). A greedy OBS run per (stage, level) from the
                 dense layer gives the kept units (levels nest: greedy steps are sequential) and the
                 compensated weights (the least-squares optimum W H_:K H_KK^-1); cached per (stage, level). cost() is
                 measured per level: MACs of a model routed at that level, params of the static one.
     storage     the chosen stages' thin projections go to a safetensors bank named by its sha256
                 (plan.meta["bank"]: path, sha256, params = the stage entries' params, i.e. what the
                 routed model stores beyond the union, = measure's stage_bank_params; shared_params =
                 the weights written into the stored projections, which add nothing; bench.run puts it
                 in the run's artifacts folder, tests elsewhere); bench.routing.apply_stages rebuilds the
                 routed model from a fresh dense model, the plan and the bank, exactly (recomputing
                 instead would need the calibration set and every stage's Hessians at surgery). Params
                 reported = the shared union + the stage entries: above the dense model's when stages
                 differ (Diff-ES's trade).
Not reproduced: SDXL, image-quality fitness metrics needing pyiqa, the multi-GPU orchestration,
the code's wanda / magnitude / activation first-order width backends, and a disk cache of the
per-(stage, level) weights (they live in memory: fine for the suite's models, not for DiT-XL/2's
10 stages x 16 levels).

Outputs: plan.stages (u range, keep set, weight, level per stage), keep["blocks"] (and, second
order, every width group) = the union stored; scores["blocks"] = trajectory-weighted mean stage
scores (second order: per width group, the units' trajectory-weighted OBS saliencies; meta["bank"]
and per-stage relative layer errors `stage_rel_error`); meta: the per-generation log
(`generations`: best/mean fitness, best levels, evaluations, seconds), every evaluated schedule,
the initial patterns' fitness, per-stage scores and drop orders, stage weights, settings.
"""
from __future__ import annotations

import time

from bench import routing
from bench.api import BenchError, Budget, Method, Plan
from methods.blockscores import SCORERS
from methods.diffes.backends import BACKENDS, make_backend
from methods.diffes.fitness import METRICS, TrajectoryFitness
from methods.diffes.search import PATTERNS, LevelSpace, evolve

__all__ = ["DiffES", "LevelSpace", "evolve", "TrajectoryFitness"]


class DiffES(Method):
    granularity = "stage"
    version = 2  # 2: layer-drop calibration on the CFG-doubled batch; fitness guides DiT's first three channels

    def __init__(
        self,
        backend: str = "layerdrop",            # R3: layerdrop | secondorder (OBS width per stage)
        num_stages: int = 4,                   # R1: code default 20, README 10
        dividers: list | None = None,          # R1: inner u edges; None = uniform in u
        traj_sampler: str | None = None,       # R2: the deployed sampler (None: ddpm / heun by process)
        traj_steps: int = 25,                  # R2: its steps (the suite's eval default)
        traj_skip: str = "uniform",            # R2: its DDIM step selection
        scorer: str = "cosine",                # R4: per-stage block ranking (methods.blockscores.SCORERS)
        scorer_kwargs: dict | None = None,     # R4: e.g. {condition: pooled} for entpruner
        protect_ends: int = 0,                 # R4: blocks at each end that never go (code: 0 in search)
        patterns: list | tuple = PATTERNS,     # R5: initial allocations
        n_random: int = 4,                     # R5: random (gamma) initial allocations
        survivors: int = 4,                    # R5: code --survivors-per-selection 4
        offspring: int = 8,                    # R5: code --offspring 16
        generations: int = 5,                  # R5: code 100, README 50
        mutation_max_levels: int = 2,          # R6: README DiT 5 (of 16 levels)
        mutation_n_valid: int = 1,             # R6: README 1
        fitness: str = "latent_mse",           # R7: latent_mse | latent_cos | snr_db | frechet | ssim
        probes: int = 32,                      # R7: code --traj-probe-batch 64
        probe_seed: int = 1234,                # R7: code's probe seed
        fitness_sampler: str | None = None,    # R7: None = ddim (DDPM) / euler (flow)
        fitness_steps: int = 10,               # R7: code 20
        fitness_cfg: float = 1.5,              # R7: code 2.1 (DiT); the suite's eval CFG
        fitness_cfg_convention: str = "dit3",  # R7: the code's forward_with_cfg (3 channels) | all
        batch_size: int = 128,                 # memory only
        seed: int = 0,                         # R8: search RNG
        levels: int = 8,                       # R9 secondorder: level L removes L/levels of the width (code: H)
        percdamp: float = 0.01,                # R9: OBS damping (OBS-Diff's; code: only if Cholesky fails)
        compensate: bool = True,               # R9: OBS update of the thin projections (false: the ablation)
        saliency: str = "block",               # R9: group OBS (Diff-ES's score_j) | chol_diag (OBS-Diff's head rule)
        obs_chunk: int = 1,                    # R9: groups removed per greedy OBS step
        cfg_calib: bool = True,                # R4/R9: the CFG-doubled calibration batch (code: cond + null label)
    ):
        if backend not in BACKENDS:
            raise BenchError(f"diffes backend={backend!r} is unknown; use one of {', '.join(BACKENDS)}")
        if scorer not in SCORERS:
            raise BenchError(f"diffes scorer={scorer!r} is unknown; use one of {', '.join(SCORERS)}")
        if fitness not in METRICS:
            raise BenchError(f"diffes fitness={fitness!r} is unknown; use one of {', '.join(METRICS)}")
        bad = [p for p in patterns if p not in PATTERNS]
        if bad:
            raise BenchError(f"diffes patterns {bad} are unknown; use {', '.join(PATTERNS)}")
        if num_stages < 1 or survivors < 1 or offspring < 0 or generations < 0 or mutation_max_levels < 1 \
                or mutation_n_valid < 1 or (not patterns and n_random < 1):
            raise BenchError("diffes needs num_stages >= 1, survivors >= 1, offspring >= 0, generations >= 0, "
                             "mutation_max_levels >= 1, mutation_n_valid >= 1 and some initial pattern")
        if dividers is not None:
            d = [float(v) for v in dividers]
            if not d or not all(0 < v < 1 for v in d) or any(b <= a for a, b in zip(d, d[1:])):
                raise BenchError(f"diffes dividers={dividers} must be increasing inner edges in (0, 1)")
        self.backend, self.num_stages, self.dividers = backend, int(num_stages), dividers
        self.traj_sampler, self.traj_steps, self.traj_skip = traj_sampler, int(traj_steps), traj_skip
        self.scorer, self.scorer_kwargs, self.protect_ends = scorer, dict(scorer_kwargs or {}), int(protect_ends)
        self.patterns, self.n_random = list(patterns), int(n_random)
        self.survivors, self.offspring, self.generations = int(survivors), int(offspring), int(generations)
        self.mutation_max_levels, self.mutation_n_valid = int(mutation_max_levels), int(mutation_n_valid)
        self.fitness, self.probes, self.probe_seed = fitness, int(probes), int(probe_seed)
        self.fitness_sampler, self.fitness_steps, self.fitness_cfg = fitness_sampler, int(fitness_steps), float(fitness_cfg)
        if fitness_cfg_convention not in ("dit3", "all"):
            raise BenchError(f"diffes fitness_cfg_convention={fitness_cfg_convention!r}: use dit3 (the code's) or all")
        self.fitness_cfg_convention = fitness_cfg_convention
        self.batch_size, self.seed = int(batch_size), int(seed)
        if levels < 2 or percdamp < 0 or obs_chunk < 1 or saliency not in ("block", "chol_diag"):
            raise BenchError("diffes needs levels >= 2, percdamp >= 0, obs_chunk >= 1 and saliency block | chol_diag")
        self.levels, self.percdamp, self.compensate = int(levels), float(percdamp), bool(compensate)
        self.saliency, self.obs_chunk, self.cfg_calib = saliency, int(obs_chunk), bool(cfg_calib)
        self.bank_dir = None  # where the secondorder bank is written; bench.run sets the run's artifacts folder

    def settings(self) -> dict:
        keys = ("backend", "num_stages", "dividers", "traj_sampler", "traj_steps", "traj_skip", "scorer",
                "scorer_kwargs", "protect_ends", "patterns", "n_random", "survivors", "offspring", "generations",
                "mutation_max_levels", "mutation_n_valid", "fitness", "probes", "probe_seed", "fitness_sampler",
                "fitness_steps", "fitness_cfg", "fitness_cfg_convention", "cfg_calib", "seed")
        if self.backend == "secondorder":  # the block scorer is layer drop's; R9 are second-order's
            keys = tuple(k for k in keys if k not in ("scorer", "scorer_kwargs", "protect_ends"))
            keys += ("levels", "percdamp", "compensate", "saliency", "obs_chunk")
        return {k: getattr(self, k) for k in keys}

    def make_backend(self):
        if self.backend == "secondorder":
            return make_backend("secondorder", levels=self.levels, percdamp=self.percdamp, compensate=self.compensate,
                                saliency=self.saliency, chunk=self.obs_chunk,
                                cfg_calib=self.cfg_calib and self.fitness_cfg > 1.0,
                                batch_size=self.batch_size, bank_dir=self.bank_dir)
        return make_backend(self.backend, scorer=self.scorer, scorer_kwargs=self.scorer_kwargs,
                            protect_ends=self.protect_ends, batch_size=self.batch_size,
                            cfg_calib=self.cfg_calib and self.fitness_cfg > 1.0)

    def edges(self) -> list[float]:
        if self.dividers is not None:
            return [0.0, *(float(v) for v in self.dividers), 1.0]
        return [k / self.num_stages for k in range(self.num_stages)] + [1.0]

    def stage_weights(self, net, edges) -> list[float]:
        sampler = self.traj_sampler or ("ddpm" if net.process.kind == "ddpm" else "heun")
        return routing.nfe_weights(net.process, edges, sampler, self.traj_steps, self.traj_skip)

    def plan(self, net, budget: Budget, calib) -> Plan:
        t0 = time.perf_counter()
        edges = self.edges()
        weights = self.stage_weights(net, edges)
        be = self.make_backend()
        be.prepare(net, calib, edges)
        meta = {"method": "diffes", "settings": self.settings(), "edges": edges, "stage_weights": weights,
                "trajectory_sampler": self.traj_sampler or ("ddpm" if net.process.kind == "ddpm" else "heun"),
                "unit_share": be.unit_share(budget.measure, weights), "calib_n": len(calib), **be.meta()}
        scores = be.plan_scores(weights)

        if budget.measure == "params":  # R2: stored params; nothing stage-wise to search
            keep, stages, extra = be.static_plan(net, budget, edges, weights)
            meta.update(extra)
            meta["seconds"] = round(time.perf_counter() - t0, 3)
            return Plan("stage", keep, scores, stages, meta)

        space = LevelSpace(weights, be.cost(budget.measure), budget.keep)
        fit = TrajectoryFitness(net, self.fitness, self.probes, self.probe_seed, self.fitness_sampler,
                                self.fitness_steps, self.fitness_cfg, self.batch_size, self.fitness_cfg_convention)

        def fitness(levels) -> float:
            with be.routed(net, levels, edges, weights):
                return fit(net)

        res = evolve(space, fitness, patterns=self.patterns, n_random=self.n_random, survivors=self.survivors,
                     offspring=self.offspring, generations=self.generations, max_levels=self.mutation_max_levels,
                     n_valid=self.mutation_n_valid, seed=self.seed)
        keep, stages, extra = be.result(res["levels"], edges, weights)
        hist = res["history"]
        meta.update({"levels": list(res["levels"]), "fitness": res["fitness"], "fitness_metric": self.fitness,
                     "initial_best_fitness": hist[0]["best_fitness"], "final_best_fitness": hist[-1]["best_fitness"],
                     "generations": hist, "initial": res["initial"], "evaluations": res["evaluations"],
                     "trajectory_cost": space.total(res["levels"]), "max_level": space.max_level,
                     "fitness_sampler": fit.sampler, **extra, "seconds": round(time.perf_counter() - t0, 3)})
        return Plan("stage", keep, scores, stages, meta)
