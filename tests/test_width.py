"""Width surgery (heads, MLP channels through Torch-Pruning), the width budget allocation,
Diff-Pruning's truncation and scores, LD-Pruner's operator score, and KD fine-tuning."""
from __future__ import annotations

import copy

import pytest
import torch

from bench import surgery
from bench.api import BenchError, Budget, Plan
from tests.test_methods import load_method, make_net
from tests.conftest import F64_TOL, as_float64


pytestmark = pytest.mark.usefixtures("one_thread")


def test_dit_width_groups_cover_heads_and_mlp_channels():
    net = make_net("dit")
    groups = net.width_groups()
    blk = net.net.blocks[0]
    assert set(groups) == {f"blocks.{i}.{k}" for i in range(4) for k in ("attn.heads", "mlp.hidden")}
    g = groups["blocks.0.attn.heads"]
    assert g.size == blk.attn.num_heads and g.kind == "heads"
    # per_unit over members equals a hand computation: head h owns q, k, v rows and proj columns
    hd, D = blk.attn.head_dim, net.net.blocks[0].attn.qkv.in_features
    got = g.per_unit(lambda w, _: w.abs().sum(1))
    for h in range(g.size):
        rows = torch.cat([torch.arange(s * D + h * hd, s * D + (h + 1) * hd) for s in range(3)])
        want = (blk.attn.qkv.weight[rows].abs().sum() + blk.attn.qkv.bias[rows].abs().sum()
                + blk.attn.proj.weight[:, h * hd:(h + 1) * hd].abs().sum())
        assert torch.isclose(got[h], want.double(), rtol=1e-6)


def test_head_pruning_equals_masking_the_head():
    """Removing head 1 through Torch-Pruning gives the same output as zeroing its proj columns."""
    net = make_net("dit")
    x, t, y = net.example_inputs(3)
    masked = copy.deepcopy(net)
    attn = masked.net.blocks[2].attn
    with torch.no_grad():
        attn.proj.weight[:, attn.head_dim:2 * attn.head_dim] = 0
    surgery.apply(net, Plan("width", {"blocks.2.attn.heads": [0]}))
    assert net.net.blocks[2].attn.num_heads == 1
    assert net.net.blocks[2].attn.qkv.out_features == 3 * net.net.blocks[2].attn.head_dim
    x, t = as_float64(net, masked, inputs=(x, t))  # different GEMM shapes: compare in float64
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, y), masked(x, t, y), **F64_TOL)
    assert net.width_groups()["blocks.2.attn.heads"].dense_ids == [0]


def test_width_plan_replays_exactly_and_speaks_dense_ids():
    net = make_net("dit")
    plan = Plan("width", {"blocks.0.mlp.hidden": list(range(0, 128, 2)), "blocks.3.attn.heads": [1]})
    a = surgery.apply(copy.deepcopy(net), plan)
    b = surgery.apply(copy.deepcopy(net), Plan.from_json(plan.to_json()))
    x, t, y = net.example_inputs(2)
    with torch.no_grad():
        assert torch.equal(a(x, t, y), b(x, t, y))
    g = a.width_groups()
    assert g["blocks.0.mlp.hidden"].dense_ids == list(range(0, 128, 2))
    assert g["blocks.3.attn.heads"].dense_ids == [1]
    # a second plan in dense ids on the pruned model: keep a subset of what is left
    surgery.apply(a, Plan("width", {"blocks.0.mlp.hidden": [2, 4]}))
    assert a.width_groups()["blocks.0.mlp.hidden"].dense_ids == [2, 4]
    with pytest.raises(BenchError, match="invalid width plan"):
        surgery.apply(a, Plan("width", {"blocks.0.mlp.hidden": [1]}))  # already removed
    with pytest.raises(BenchError, match="width groups the model does not have"):
        surgery.apply(copy.deepcopy(net), Plan("width", {"blocks.9.mlp.hidden": [0]}))


def test_width_after_block_removal_uses_dense_block_ids():
    net = make_net("dit")
    surgery.apply(net, Plan("block", {"blocks": [1, 3]}))
    assert sorted(net.width_groups()) == ["blocks.1.attn.heads", "blocks.1.mlp.hidden",
                                          "blocks.3.attn.heads", "blocks.3.mlp.hidden"]
    surgery.apply(net, Plan("width", {"blocks.3.mlp.hidden": [0, 1, 2]}))
    assert net.net.blocks[1].mlp.fc1.out_features == 3


@pytest.mark.parametrize("keep", [0.75, 0.5])
def test_width_plan_meets_a_macs_budget_closely(keep):
    net = make_net("dit")
    groups = net.width_groups()
    scores = {n: torch.rand(g.size, generator=torch.Generator().manual_seed(0)).tolist() for n, g in groups.items()}
    plan = surgery.width_plan(net, scores, Budget("macs", keep))
    dense = surgery.measure(net)
    got = surgery.measure(surgery.apply(copy.deepcopy(net), plan))["macs"] / dense["macs"]
    assert keep - 0.05 <= got <= keep + 1e-9
    assert plan.meta["measured_keep"] == pytest.approx(got)
    with pytest.raises(BenchError, match="cannot be met by width pruning"):
        surgery.width_plan(net, scores, Budget("macs", 0.01))
    with pytest.raises(BenchError, match="macs or params"):
        surgery.width_plan(net, scores, Budget("blocks", 0.5))


@pytest.mark.parametrize("keep", [0.557, 0.4])
def test_coarse_unet_groups_fill_a_macs_budget_unit_by_unit(keep):
    """U-Net channel units are tied to GroupNorm groups (unet_tiny: 4 or 8 units per conv). Rounding
    the kept count down made every coarse group jump together and land far under the budget; the
    allocation rounds their pruned count down (Torch-Pruning) and adds whole units back, so the
    measured MACs land within one coarse unit under the budget, with the same counts for any scores
    and every coarse group within one unit of the least-kept group's fraction."""
    from tests.test_unet import tiny

    net = tiny()
    groups = net.width_groups()
    rnd = {s: {n: torch.rand(g.size, generator=torch.Generator().manual_seed(s)).tolist() for n, g in groups.items()}
           for s in (0, 1)}
    plans = [surgery.width_plan(net, rnd[s], Budget("macs", keep)) for s in (0, 1)]
    dense = surgery.measure(net)
    got = surgery.measure(surgery.apply(copy.deepcopy(net), plans[0]))["macs"] / dense["macs"]
    assert plans[0].meta["measured_keep"] == pytest.approx(got) and got <= keep + 1e-9
    coarse = [n for n, g in groups.items() if g.kind == "channels" and g.size < surgery.COARSE_UNITS]
    assert coarse and set(plans[0].meta["coarse_units_added"]) <= set(coarse)
    # within one unit: no coarse group can take one more unit without missing the budget
    largest_unit = max(surgery._unit_cost_floor(surgery.apply(copy.deepcopy(net), plans[0]), coarse, "macs",
                                                dense).values())
    assert got >= keep - 2 * largest_unit - 0.01
    assert {k: len(v) for k, v in plans[0].keep.items()} == {k: len(v) for k, v in plans[1].keep.items()}
    frac = {n: len(plans[0].keep[n]) / groups[n].size for n in coarse}
    assert max(frac.values()) - min(frac.values()) <= max(1 / groups[n].size for n in coarse) + 1e-9
    # the meta-device trials measure what the real pruned model measures
    real = surgery.measure(surgery.apply(copy.deepcopy(net), plans[1]))["macs"] / dense["macs"]
    assert real == pytest.approx(plans[1].meta["measured_keep"])


# ---- Diff-Pruning ---------------------------------------------------------------------------

def test_truncation_stops_at_the_right_step_on_a_constructed_curve(monkeypatch, calib):
    """Loss curve 1.0, 0.8, 0.5, 0.2, 0.04, 0.03 with thr 0.05: 0.04 < 0.05 * 1.0 is the first
    sub-threshold step; the root script (check after backward) includes it, ddpm_exp does not."""
    from baselines import width as W
    from methods.diff_pruning import truncation_step

    curve = [1.0, 0.8, 0.5, 0.2, 0.04, 0.03]
    assert truncation_step(curve, 0.05, "after") == 5
    assert truncation_step(curve, 0.05, "before") == 4
    assert truncation_step(curve, 0.0, "after") == 6
    net = make_net("dit")
    p = net.net.blocks[0].mlp.fc1.weight
    grid = [0.1 * i for i in range(len(curve))]
    calls = []

    def fake_loss(net_, x0, y, noise, u):  # the constructed curve, with a gradient of 1 per visit
        i = grid.index(u)
        calls.append(i)
        return p.sum() * 0 + p[0, 0] + (curve[i] - p[0, 0].detach())

    monkeypatch.setattr(W, "diffusion_loss_at", fake_loss)
    for check, used in [("after", 5), ("before", 4)]:
        calls.clear()
        info = W.accumulate_gradients(net, calib, 4, grid, thr=0.05, check=check)
        assert info["steps_used"] == used and info["losses"] == pytest.approx(curve[:used])
        assert p.grad[0, 0].item() == pytest.approx(used)  # gradients of exactly the used steps
        assert calls == list(range(5))  # the scan stopped at the first sub-threshold step


def test_diff_pruning_scores_follow_the_two_variants(calib):
    net = make_net("dit")
    m_abs = load_method("diff_pruning", t_stride=250)
    m_sq = load_method("diff_pruning", t_stride=250, score="squared")
    s_abs, meta = m_abs.scores(net, calib)
    s_sq, _ = m_sq.scores(net, calib)
    assert meta["steps_used"] >= 1 and meta["T"] == 1000
    # recompute one group by hand from the accumulated gradients
    from baselines.width import accumulate_gradients, timestep_grid
    accumulate_gradients(net, calib, m_abs.batch, timestep_grid(net, 250), m_abs.thr, m_abs.check)
    g = net.width_groups()["blocks.1.mlp.hidden"]
    fc1, fc2 = net.net.blocks[1].mlp.fc1, net.net.blocks[1].mlp.fc2
    tg = lambda p: (p * p.grad).double()
    per = tg(fc1.weight).abs().sum(1) + tg(fc2.weight).abs().sum(0) + tg(fc1.bias).abs()
    want = per / 3
    want = want / want.mean()
    assert torch.allclose(torch.tensor(s_abs["blocks.1.mlp.hidden"], dtype=torch.float64), want, rtol=1e-6)
    sq = tg(fc1.weight).pow(2).sum(1) + tg(fc2.weight).pow(2).sum(0) + tg(fc1.bias).pow(2)
    assert torch.allclose(torch.tensor(s_sq["blocks.1.mlp.hidden"], dtype=torch.float64), sq, rtol=1e-6)
    assert g.size == fc1.out_features
    net.net.zero_grad(set_to_none=True)


def test_diff_pruning_rejects_bad_settings():
    from methods.diff_pruning import DiffPruning
    with pytest.raises(BenchError, match="score"):
        DiffPruning(score="cubic")
    with pytest.raises(BenchError, match="thr"):
        DiffPruning(thr=1.5)


# ---- LD-Pruner ------------------------------------------------------------------------------

def test_ld_pruner_scores_an_identity_operator_zero_and_removes_it_first(calib):
    net = make_net("dit")
    with torch.no_grad():  # block 2's MLP branch contributes nothing: its gate is zero
        D = net.net.blocks[2].attn.qkv.in_features
        net.net.blocks[2].adaLN_modulation[-1].weight[5 * D:6 * D] = 0
        net.net.blocks[2].adaLN_modulation[-1].bias[5 * D:6 * D] = 0
    m = load_method("ld_pruner", n_probes=16, steps=3)
    plan = m.plan(net, Budget("macs", 0.9), calib)
    assert plan.scores["mlp"][2] == pytest.approx(0.0, abs=1e-12)
    assert min(s for f in plan.scores for s in plan.scores[f]) == plan.scores["mlp"][2]
    assert plan.meta["removed"][0] == "mlp:2"
    pruned = surgery.apply(copy.deepcopy(net), plan)
    assert pruned.net.blocks[2].mlp is None and pruned.net.blocks[2].skip_mlp
    x, t, y = net.example_inputs(2)
    if plan.meta["removed"] == ["mlp:2"]:  # removing an exact no-op changes nothing
        with torch.no_grad():
            torch.testing.assert_close(pruned(x, t, y), net(x, t, y))


def test_ld_pruner_blocks_budget_uses_whole_blocks_only(calib):
    net = make_net("dit")
    plan = load_method("ld_pruner", n_probes=8, steps=2).plan(net, Budget("blocks", 0.5), calib)
    assert set(plan.keep) == {"blocks"} and len(plan.keep["blocks"]) == 2


# ---- KD fine-tuning -------------------------------------------------------------------------

def test_distillation_loss_mixes_teacher_and_noise_terms(calib):
    net = make_net("dit")
    teacher = copy.deepcopy(net)
    x0, y = calib.x0[:8], calib.y[:8]
    g = lambda: torch.Generator().manual_seed(3)
    own = net.loss(x0, y, generator=g(), force_drop_ids=torch.zeros(8, dtype=torch.long))
    same = net.loss(x0, y, generator=g(), teacher=teacher, distill=0.7, force_drop_ids=torch.zeros(8, dtype=torch.long))
    assert torch.isclose(same, 0.3 * own, rtol=1e-5)  # teacher == student: the KD term is 0
    pruned = surgery.apply(copy.deepcopy(net), Plan("width", {"blocks.0.mlp.hidden": [0, 1]}))
    kd = pruned.loss(x0, y, generator=g(), teacher=teacher, distill=1.0, force_drop_ids=torch.zeros(8, dtype=torch.long))
    assert kd > 0 and torch.isfinite(kd)
