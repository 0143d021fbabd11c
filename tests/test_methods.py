"""Conformance sweep over every method config, plus known-answer tests for the block baselines.

The sweep globs ``bench/conf/method/*.yaml``, so a new method is tested as soon as its config
exists: hydra-instantiate -> plan -> JSON round trip -> no shape/weight change -> surgery ->
measured budget -> forward and finite loss, on tiny DiT (DDPM) and SiT (flow) models.
"""
from __future__ import annotations

import copy
from functools import cache, partial
from pathlib import Path

import pytest
import torch

from bench import registry, surgery
from bench.api import BenchError, Budget, Plan
from bench.models import build
from tests.conftest import fit_to_calib, make_net as _make_net

CONF = Path(__file__).resolve().parents[1] / "bench" / "conf" / "method"
# *_paper configs are a method at its paper's full scale (e.g. 1000 timesteps): the same class as the
# config without the suffix, which the sweep covers at test scale
METHODS = sorted(p.stem for p in CONF.glob("*.yaml") if not p.stem.endswith("_paper"))
FAMILIES = ["dit", "sit"]
CALIB_METHODS = ["shortgpt", "flux_lite", "sensitivity"]  # calibration-based: per-bin scores expected
pytestmark = pytest.mark.usefixtures("one_thread")
make_net = partial(_make_net, seed_at=("weights",))  # as this module always built them: seeded before the redraw only


@cache
def method_config(name: str, seed: int = 0) -> dict:
    """The method's config as a run builds it: its defaults list followed, ${default:} resolved."""
    return registry.load(name, seed)


def load_method(name: str, seed: int = 0, **over):
    from hydra.utils import instantiate
    return instantiate({**copy.deepcopy(method_config(name, seed)), **over}, _convert_="all")


def snapshot(net):
    return {k: v.detach().clone() for k, v in net.net.state_dict().items()}


@pytest.fixture(scope="module")
def nets():
    return {f: make_net(f) for f in FAMILIES}


@pytest.fixture(scope="module")
def trained(calib):
    """Tiny models fitted to the calibration loss (the sensitivity known answer needs it)."""
    return {f: fit_to_calib(make_net(f), calib) for f in FAMILIES}


# --------------------------------------------------------------------------------------------
# Conformance sweep: every config x every model family
# --------------------------------------------------------------------------------------------

def granularity(name: str) -> str:
    return type(load_method(name)).granularity


BLOCK_METHODS = [m for m in METHODS if granularity(m) == "block"]
OTHER_METHODS = [m for m in METHODS if granularity(m) != "block"]


def budget_for(name: str, keep: float = 0.5) -> Budget:
    """Block methods take a budget in blocks; width / operator methods one in MACs; mask-only methods
    (OBS-Diff unstructured / N:M: zeros, no shape change) keep the dense cost."""
    if getattr(load_method(name), "mask_only", False):
        return Budget("macs", 1.0)
    return Budget("blocks", 1.0 if name == "dense" else keep) if granularity(name) == "block" else Budget("macs", keep)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", OTHER_METHODS)
def test_width_and_operator_conformance(name, family, nets, calib):
    """Width / operator methods: JSON plan, score-only, measured MACs/params within the budget
    (not over; under by at most the plan's stated unit share), exact replay, the model runs.
    Methods that rewrite surviving weights (``rewrites_weights``: OBS compensation) skip the
    weights-unchanged check (shapes must still be unchanged) and plan on a copy of the shared model;
    progressive ones (a callback) may keep more than the budget (checked on their final model)."""
    method = load_method(name)
    rewrites = type(method).rewrites_weights
    dense_cost = surgery.measure(nets[family])
    masks = getattr(method, "mask_only", False)  # OBS-Diff unstructured / N:M: zeros at the dense cost
    for budget in [Budget("macs", 1.0), Budget("params", 1.0)] if masks else [Budget("macs", 0.6), Budget("params", 0.7)]:
        net = copy.deepcopy(nets[family]) if rewrites else nets[family]
        before = snapshot(net)
        plan = method.plan(net, budget, calib)
        if masks:
            assert plan.meta["mask_only"] and plan.meta["target_sparsity"] == pytest.approx(0.5, abs=0.01)
            zeros = sum(int((net.net.blocks[i].mlp.fc1.weight == 0).sum()) for i in range(len(net.net.blocks)))
            assert zeros >= 0.49 * sum(net.net.blocks[i].mlp.fc1.weight.numel() for i in range(len(net.net.blocks)))
        progressive = method.callback(budget, calib) is not None
        assert isinstance(plan, Plan) and plan.granularity == type(method).granularity
        assert Plan.from_json(plan.to_json()) == plan
        after = snapshot(net)
        assert after.keys() == before.keys()
        for k in before:
            assert after[k].shape == before[k].shape, k
            assert rewrites or torch.equal(after[k], before[k]), f"{name} changed weights of {k}"
        assert not net.net.training
        pruned = surgery.apply(copy.deepcopy(net), plan)
        share = float(plan.meta.get("unit_share", 0.10))
        got = surgery.check_budget(dense_cost, surgery.measure(pruned), budget, unit_share=0 if progressive else share,
                                   final=not progressive)
        assert progressive or got[f"keep_{budget.measure}"] <= budget.keep + 1e-6
        replay = surgery.apply(copy.deepcopy(net), Plan.from_json(plan.to_json()))
        x, t, y = pruned.example_inputs(2)
        with torch.no_grad():
            out = pruned(x, t, y)
            assert torch.equal(out, replay(x, t, y))
        assert out.shape[0] == 2 and torch.isfinite(out).all()
        loss = pruned.loss(calib.x0, calib.y, u=calib.u, noise=calib.noise)
        assert torch.isfinite(loss)


UNET_METHODS = [m for m in OTHER_METHODS if granularity(m) in ("width", "operator")
                and not m.startswith("obs_diff")] + ["entpruner", "entpruner_oneshot"]
# OBS-Diff: DiT/SiT only; EntPruner on the U-Net: CED over its bypassable operators (card R14)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    net = build("UNet-T", input_size=8, in_channels=1, num_classes=10, block_out_channels=[16, 32],
                layers_per_block=1, attention_levels=[1], norm_num_groups=4, learn_sigma=False)
    with torch.no_grad():  # no zero-initialised output: every unit matters
        for p in net.net.parameters():
            if p.ndim >= 2 and float(p.abs().max()) == 0.0:
                p.normal_(0.0, 0.05)
    net.net.eval()
    return net


@pytest.mark.parametrize("name", UNET_METHODS)
def test_width_methods_on_the_unet(name, unet, calib):
    """The width and operator sweep on the U-Net: plan, Torch-Pruning surgery through the
    DependencyGraph, measured MACs within the budget, exact replay, the model runs."""
    net = copy.deepcopy(unet)
    dense_cost = surgery.measure(net)
    # LD-Pruner can only bypass shape-preserving ResNet blocks and attentions: less to remove
    keep = 0.85 if name in ("ld_pruner", "entpruner", "entpruner_oneshot") else 0.6
    budget = Budget("macs", keep)
    plan = load_method(name).plan(net, budget, calib)
    pruned = surgery.apply(copy.deepcopy(unet), plan)
    got = surgery.check_budget(dense_cost, surgery.measure(pruned), budget,
                               unit_share=float(plan.meta.get("unit_share", 0.10)),
                               final=load_method(name).callback(budget, calib) is None)
    if load_method(name).callback(budget, calib) is None:
        assert got["keep_macs"] <= keep + 1e-6
    replay = surgery.apply(copy.deepcopy(unet), Plan.from_json(plan.to_json()))
    x, t, y = unet.example_inputs(2)
    with torch.no_grad():
        out = pruned(x, t, y)
        torch.testing.assert_close(out, replay(x, t, y), rtol=0, atol=0)
    assert torch.isfinite(out).all()
    assert torch.isfinite(pruned.loss(calib.x0, calib.y, u=calib.u, noise=calib.noise))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", BLOCK_METHODS)
def test_method_conformance(name, family, nets, calib):
    net = nets[family]
    method = load_method(name)
    depth = net.units("block")["blocks"]
    keep = 1.0 if name == "dense" else None
    budgets = [Budget("blocks", keep or 0.5), Budget("macs", keep or 0.6), Budget("params", keep or 0.6)]
    dense_cost = surgery.measure(net)
    fixed, per = surgery.block_costs(net)
    for budget in budgets:
        before = snapshot(net)
        plan = method.plan(net, budget, calib)
        # progressive methods (a callback) prune during fine-tuning: plan() may keep more than the
        # budget, which is then checked on the final model (bench.run; their own tests cover it)
        progressive = method.callback(budget, calib) is not None

        # a well-formed, JSON-round-tripping block plan
        assert isinstance(plan, Plan) and plan.granularity == "block"
        kept = plan.keep["blocks"]
        assert kept == sorted(set(kept)) and 0 <= kept[0] and kept[-1] < depth
        if progressive:
            assert len(kept) >= surgery.blocks_to_keep(net, budget)
        else:
            assert len(kept) == surgery.blocks_to_keep(net, budget)
        scores = plan.scores["blocks"]
        assert len(scores) == depth and all(isinstance(s, float) for s in scores)
        assert Plan.from_json(plan.to_json()) == plan
        if "scores_per_bin" in plan.meta:
            assert len(plan.meta["scores_per_bin"]) == calib.bins
            assert all(len(row) == depth for row in plan.meta["scores_per_bin"])

        # score-only: no shape, no weight and no mode changed
        after = snapshot(net)
        assert after.keys() == before.keys()
        for k in before:
            assert after[k].shape == before[k].shape, k
            assert torch.equal(after[k], before[k]), f"{name} changed weights of {k}"
        assert not net.net.training

        # surgery meets the measured budget (not over, not more than one block under)
        pruned = surgery.apply(copy.deepcopy(net), plan)
        share = per[budget.measure] / dense_cost[budget.measure]
        got = surgery.check_budget(dense_cost, surgery.measure(pruned), budget, unit_share=0 if progressive else share,
                                   final=not progressive)
        assert progressive or got[f"keep_{budget.measure}"] <= budget.keep + 1e-6
        assert len(pruned.net.blocks) == len(kept)

        # the pruned model still runs
        x, t, y = pruned.example_inputs(2)
        out = pruned(x, t, y)
        assert out.shape[0] == 2 and torch.isfinite(out).all()
        loss = pruned.loss(calib.x0, calib.y, u=calib.u, noise=calib.noise)
        assert torch.isfinite(loss)


@pytest.mark.parametrize("name", METHODS)
def test_method_keeps_train_mode(name, nets, calib):
    net = copy.deepcopy(nets["dit"])
    net.net.train()
    load_method(name).plan(net, budget_for(name), calib)
    assert net.net.training, f"{name} left the model in eval mode"


@pytest.mark.parametrize("name", CALIB_METHODS)
def test_calibration_methods_report_per_bin_scores(name, nets, calib):
    plan = load_method(name).plan(nets["sit"], Budget("blocks", 0.5), calib)
    per_bin = torch.tensor(plan.meta["scores_per_bin"], dtype=torch.float64)
    assert per_bin.shape == (calib.bins, 4)
    # bins are equal-sized here (32 % 4 == 0), so the overall score is the mean of the bins
    assert torch.allclose(per_bin.mean(0), torch.tensor(plan.scores["blocks"], dtype=torch.float64), atol=1e-10)


# --------------------------------------------------------------------------------------------
# Known answers
# --------------------------------------------------------------------------------------------

def make_identity(net, i: int):
    """Zero block i's adaLN output layer: both gates are 0, so the block returns its input exactly."""
    with torch.no_grad():
        net.net.blocks[i].adaLN_modulation[-1].weight.zero_()
        net.net.blocks[i].adaLN_modulation[-1].bias.zero_()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name,over", [
    ("shortgpt", {}), ("shortgpt", {"inputs": "clean_low_t"}), ("flux_lite", {}),
    ("flux_lite", {"inputs": "clean_low_t"}), ("sensitivity", {}),
])
def test_identity_block_is_removed_first(name, over, family, trained, calib):
    net = copy.deepcopy(trained[family])
    make_identity(net, 1)
    plan = load_method(name, **over).plan(net, Budget("blocks", 0.5), calib)
    scores = plan.scores["blocks"]
    assert min(range(4), key=scores.__getitem__) == 1, scores
    assert abs(scores[1]) < 1e-9  # cos = 1, MSE = 0, removal changes no loss
    assert 1 not in plan.keep["blocks"]
    assert all(abs(row[1]) < 1e-9 for row in plan.meta["scores_per_bin"])


@pytest.mark.parametrize("family", FAMILIES)
def test_shortgpt_protect_last(family, trained, calib):
    net = copy.deepcopy(trained[family])
    make_identity(net, 3)  # the last block is the most removable ...
    plain = load_method("shortgpt").plan(net, Budget("blocks", 0.5), calib)
    assert 3 not in plain.keep["blocks"]
    protected = load_method("shortgpt", protect_last=True).plan(net, Budget("blocks", 0.5), calib)
    assert protected.scores["blocks"][3] == max(protected.scores["blocks"]) and 3 in protected.keep["blocks"]  # ... unless protected
    assert Plan.from_json(protected.to_json()) == protected
    assert plain.scores["blocks"][:3] == protected.scores["blocks"][:3]


@pytest.mark.parametrize("name", ["magnitude_l1", "magnitude_l2"])
def test_scaled_block_has_largest_magnitude(name, calib):
    net = make_net("dit")
    with torch.no_grad():
        for p in net.net.blocks[2].parameters():
            p.mul_(3.0)
    plan = load_method(name).plan(net, Budget("blocks", 0.5), calib)
    scores = plan.scores["blocks"]
    assert max(range(4), key=scores.__getitem__) == 2 and 2 in plan.keep["blocks"]


def test_magnitude_formula(calib):
    net = make_net("sit")
    params = list(net.net.blocks[0].parameters())
    flat = torch.cat([p.detach().flatten().double() for p in params])
    s1 = load_method("magnitude_l1").plan(net, Budget("blocks", 0.5), calib).scores["blocks"][0]
    s2 = load_method("magnitude_l2").plan(net, Budget("blocks", 0.5), calib).scores["blocks"][0]
    assert s1 == pytest.approx(flat.abs().mean().item(), rel=1e-9)
    assert s2 == pytest.approx(flat.pow(2).mean().sqrt().item(), rel=1e-9)


@pytest.mark.parametrize("size,keep,expected", [
    ("T", 0.5, {"first_k": [2, 3], "last_k": [0, 1], "stride": [0, 2]}),
    ("D8", 0.5, {"first_k": [4, 5, 6, 7], "last_k": [0, 1, 2, 3], "stride": [0, 2, 4, 6]}),
    ("D8", 0.75, {"first_k": [2, 3, 4, 5, 6, 7], "last_k": [0, 1, 2, 3, 4, 5], "stride": [0, 1, 3, 4, 5, 7]}),
    ("D8", 0.375, {"first_k": [5, 6, 7], "last_k": [0, 1, 2], "stride": [1, 3, 6]}),
])
def test_fixed_patterns(size, keep, expected, calib):
    net = make_net("dit", size)
    for name, kept in expected.items():
        plan = load_method(name).plan(net, Budget("blocks", keep), calib)
        assert plan.keep["blocks"] == kept, name
        assert surgery.keep_top(plan.scores["blocks"], len(kept)) == kept
        assert sorted(plan.scores["blocks"]) == [float(i) for i in range(len(net.net.blocks))]


def test_bad_options_raise_bench_error():
    from baselines.block_influence import BlockInfluence
    from baselines.fixed import FixedPattern
    from baselines.magnitude import BlockMagnitude

    for make in (lambda: FixedPattern("middle"), lambda: BlockInfluence(inputs="clean"), lambda: BlockMagnitude(0)):
        with pytest.raises(BenchError):
            make()


def test_random_is_seeded(calib):
    net = make_net("dit", "D8")
    budget = Budget("blocks", 0.5)
    a = load_method("random", seed=3).plan(net, budget, calib)
    b = load_method("random", seed=3).plan(net, budget, calib)
    assert a == b
    others = [load_method("random", seed=s).plan(net, budget, calib) for s in (4, 5, 6)]
    assert all(o.scores != a.scores for o in others)
    assert any(o.keep != a.keep for o in others)
    assert a.meta["seed"] == 3


def test_dense_rejects_partial_budget(nets, calib):
    with pytest.raises(BenchError, match="budget.keep=1.0"):
        load_method("dense").plan(nets["dit"], Budget("blocks", 0.5), calib)
    plan = load_method("dense").plan(nets["dit"], Budget("macs", 1.0), calib)
    assert plan.keep["blocks"] == [0, 1, 2, 3]
