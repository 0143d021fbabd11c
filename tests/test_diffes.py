"""Diff-ES (methods.diffes): budgeted level space, level-switch mutation, elitist search, the
trajectory fitness, per-stage scorers, and the plan -> routed surgery -> budget path."""
from __future__ import annotations

import copy
import itertools
import random
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from bench import routing, surgery
from bench.api import BenchError, Budget, Plan
from bench.data import calibration, digits
from bench.models import build
from methods.blockscores import SCORERS
from methods.diffes import DiffES
from methods.diffes.backends import LayerDrop
from methods.diffes.search import PATTERNS, LevelSpace, evolve, pattern_shape

CONF = Path(__file__).resolve().parents[1] / "bench" / "conf" / "method"
FAST = dict(probes=16, fitness_steps=4, generations=4, offspring=6, n_random=2, batch_size=64)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def calib():
    return calibration(digits("train"), n=64, seed=0, bins=4)


def make_net(family="dit", seed=0):
    kw = dict(input_size=8, in_channels=1, num_classes=10, learn_sigma=True)
    net = build("DiT-T/2", **kw) if family == "dit" else build("SiT-T/2", **kw, process={"kind": "flow"})
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in net.net.parameters():
            if p.ndim == 2:
                p.normal_(0.0, p.shape[1] ** -0.5)
    net.net.eval()
    return net


@pytest.fixture(scope="module")
def teacher():
    """A tiny teacher trained on the digits for a few hundred steps (the default teacher, shrunk)."""
    net = make_net("dit")
    data = digits("train")
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(net.net.parameters(), lr=2e-3)
    net.net.train()
    for _ in range(80):
        x0, y = data.get(torch.randint(len(data), (32,), generator=g))
        loss = net.loss(x0, y, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.net.eval()
    return net


def load(**over) -> DiffES:
    cfg = OmegaConf.create({"seed": 0, "method": OmegaConf.load(CONF / "diffes.yaml")})
    for k, v in over.items():
        cfg.method[k] = v
    return instantiate(cfg.method)


# --------------------------------------------------------------------------------------------
# The level space and the search
# --------------------------------------------------------------------------------------------

def linear_cost(depth):
    return [(depth - L) / depth for L in range(depth)]  # blocks kept, at least one


def test_equal_weights_feasible_and_tight_is_the_fixed_level_sum():
    space = LevelSpace([0.25] * 4, linear_cost(8), keep=0.5)  # target: 16 levels of 28
    for L in itertools.product(range(8), repeat=4):
        ok = space.feasible(L) and not space.slack(L)
        assert ok == (sum(L) == 16), L


def test_patterns_project_onto_the_budget_and_mutation_keeps_it():
    w = [0.28, 0.24, 0.24, 0.24]  # unequal stage weights (a 25-step sampler over 4 stages)
    space = LevelSpace(w, linear_cost(8), keep=0.5)
    rng = random.Random(0)
    seen = set()
    for name in PATTERNS:
        L = space.project(pattern_shape(name, 4, rng))
        assert space.feasible(L) and not space.slack(L), (name, L)
        seen.add(L)
    assert len(seen) >= 6  # the patterns are different schedules
    assert space.project([1, 1, 1, 1]) in {(4, 4, 4, 4), (3, 4, 4, 5), (4, 4, 4, 5), (5, 4, 4, 3)}
    for _ in range(300):
        parent = rng.choice(sorted(seen))
        child = space.mutate(parent, rng, max_levels=3, n_valid=2)
        assert space.feasible(child) and not space.slack(child) and max(child) <= 7 and min(child) >= 0
    with pytest.raises(BenchError, match="cannot be met"):
        LevelSpace(w, linear_cost(8), keep=0.1)


def test_search_is_elitist_improves_and_is_reproducible():
    space = LevelSpace([0.25] * 4, linear_cost(8), keep=0.5)
    target = (7, 5, 3, 1)  # optimum of the synthetic fitness; no initial pattern is it
    fit = lambda L: -float(sum((a - b) ** 2 for a, b in zip(L, target)))
    kw = dict(patterns=["flat", "back"], n_random=0, survivors=3, offspring=6, generations=12, max_levels=2,
              n_valid=1, seed=5)
    res = evolve(space, fit, **kw)
    best = [g["best_fitness"] for g in res["history"]]
    assert all(b2 >= b1 for b1, b2 in zip(best, best[1:]))
    assert best[-1] > best[0]
    assert res["levels"] == target
    strip = lambda r: {**r, "history": [{k: v for k, v in g.items() if k != "seconds"} for g in r["history"]]}
    assert strip(evolve(space, fit, **kw)) == strip(res)
    assert {e["pattern"] for e in res["initial"]} == {"flat", "back"}


# --------------------------------------------------------------------------------------------
# On a model: scorers, fitness, plans
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scorer", SCORERS)
def test_every_scorer_gives_per_stage_drop_orders(scorer, teacher, calib):
    kw = {"entpruner": {"condition": "pooled"}, "tinyfusion": {"steps": 10, "batch": 8, "lora_rank": 2}}
    be = LayerDrop(scorer, kw.get(scorer, {}), batch_size=64)
    edges = [0, 0.25, 0.5, 0.75, 1.0]
    be.prepare(teacher, calib, edges)
    assert len(be.orders) == 4 and all(sorted(o) == [0, 1, 2, 3] for o in be.orders)
    assert be.probes == [16, 16, 16, 16]  # 64 probes, stratified noise levels
    assert be.stage_keep(0, 0) == {"blocks": [0, 1, 2, 3]}
    assert be.stage_keep(2, 3) == {"blocks": [be.orders[2][-1]]}


def test_identity_block_is_dropped_first_in_every_stage(teacher, calib):
    net = copy.deepcopy(teacher)
    with torch.no_grad():
        net.net.blocks[2].adaLN_modulation[-1].weight.zero_()
        net.net.blocks[2].adaLN_modulation[-1].bias.zero_()
    be = LayerDrop("cosine")
    be.prepare(net, calib, [0, 0.5, 1.0])
    assert all(o[0] == 2 for o in be.orders)
    assert all(abs(sc[2]) < 1e-9 for sc in be.scores)


def test_full_schedule_has_zero_latent_mse(teacher, calib):
    m = load(**FAST)
    plan = m.plan(teacher, Budget("blocks", 1.0), calib)
    assert all(s["level"] == 0 for s in plan.stages) and plan.meta["final_best_fitness"] == 0.0


@pytest.mark.parametrize("family", ["dit", "sit"])
def test_plan_meets_the_trajectory_budget_and_replays(family, teacher, calib):
    net = teacher if family == "dit" else make_net("sit")
    dense = surgery.measure(net)
    fixed, per = surgery.block_costs(net)
    for budget in (Budget("blocks", 0.5), Budget("macs", 0.6)):
        plan = load(**FAST).plan(net, budget, calib)
        assert plan.granularity == "stage" and len(plan.stages) == 4
        assert Plan.from_json(plan.to_json()) == plan
        routed = surgery.apply(copy.deepcopy(net), plan)
        m = surgery.measure(routed)
        share = per[budget.measure] / dense[budget.measure]
        keep = surgery.check_budget(dense, m, budget, unit_share=share)
        assert keep[f"keep_{budget.measure}"] == pytest.approx(plan.meta["trajectory_cost"], abs=1e-9)
        assert m["stage_weights"] == pytest.approx(plan.meta["stage_weights"])
        # the routed model samples exactly what the search scored
        from methods.diffes.fitness import TrajectoryFitness
        fit = TrajectoryFitness(net, probes=FAST["probes"], steps=FAST["fitness_steps"], batch_size=64)
        assert fit(routed) == pytest.approx(plan.meta["fitness"], rel=1e-9, abs=1e-12)


def test_search_on_a_trained_teacher_improves_and_is_seeded(teacher, calib):
    """From the flat schedule alone (the 4-block model's space is small enough that the default
    patterns already hold its optimum), the search must climb; twice with one seed, the same run."""
    kw = {**FAST, "generations": 6, "patterns": ["flat"], "n_random": 0}
    plan = load(**kw).plan(teacher, Budget("blocks", 0.5), calib)
    gens = plan.meta["generations"]
    best = [g["best_fitness"] for g in gens]
    assert len(gens) == 7 and all(b2 >= b1 for b1, b2 in zip(best, best[1:]))
    assert plan.meta["final_best_fitness"] > plan.meta["initial_best_fitness"]
    assert plan.meta["fitness"] == best[-1] == max(v for _, v in plan.meta["evaluations"])
    again = load(**kw).plan(teacher, Budget("blocks", 0.5), calib)
    assert again.stages == plan.stages
    assert [{k: v for k, v in g.items() if k != "seconds"} for g in again.meta["generations"]] == \
        [{k: v for k, v in g.items() if k != "seconds"} for g in gens]
    # the default start (every pattern) ends at least as high
    full = load(**{**FAST, "generations": 6}).plan(teacher, Budget("blocks", 0.5), calib)
    assert full.meta["final_best_fitness"] >= plan.meta["final_best_fitness"] - 1e-12


def test_params_budget_is_a_static_plan_over_the_stored_blocks(teacher, calib):
    plan = load(**FAST).plan(teacher, Budget("params", 0.6), calib)
    n = surgery.blocks_to_keep(teacher, Budget("params", 0.6))
    assert all(s["keep"]["blocks"] == plan.keep["blocks"] for s in plan.stages) and len(plan.keep["blocks"]) == n
    routed = surgery.apply(copy.deepcopy(teacher), plan)
    assert surgery.measure(routed)["params"] / surgery.measure(teacher)["params"] <= 0.6


def test_dividers_and_stage_weights_follow_the_sampler(teacher, calib):
    m = load(**FAST, dividers=[0.1, 0.4, 0.7], traj_sampler="ddim", traj_steps=10)
    plan = m.plan(teacher, Budget("blocks", 0.5), calib)
    assert [s["u_range"] for s in plan.stages] == [[0.0, 0.1], [0.1, 0.4], [0.4, 0.7], [0.7, 1.0]]
    assert plan.meta["stage_weights"] == pytest.approx(routing.nfe_weights(teacher.process, plan.meta["edges"], "ddim", 10))


def test_bad_options_and_the_missing_second_order_backend(teacher, calib):
    for kw in ({"backend": "wanda"}, {"scorer": "taylor"}, {"fitness": "topiq"}, {"patterns": ["spiral"]},
               {"dividers": [0.5, 0.2]}):
        with pytest.raises(BenchError):
            DiffES(**kw)
    with pytest.raises(BenchError, match="methods.obs_diff"):
        load(backend="secondorder").plan(teacher, Budget("macs", 0.6), calib)
