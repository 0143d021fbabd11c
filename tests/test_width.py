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


def test_head_dim_pruning_keeps_heads_and_equals_masking_those_dims():
    """Head-dimension pruning (VainF's DiT recipe, Torch-Pruning issue #300: every head kept, the same
    in-head positions removed from q, k, v and proj): the pruned layer equals the dense layer with
    those q, k, v rows zeroed (the softmax keeps the dense 1/sqrt(head_dim)), and the group is listed
    by head dimension from then on."""
    from bench.width import attention_units

    net = make_net("dit")
    attn0 = net.net.blocks[1].attn
    h, hd = attn0.num_heads, attn0.head_dim
    with attention_units(net, "head_dims"):
        g = net.width_groups()["blocks.1.attn.head_dims"]
        assert (g.kind, g.size, g.dense_ids) == ("head_dims", hd, list(range(hd)))
        # unit d owns q, k, v row d of every head and proj column d of every head
        D = attn0.qkv.in_features
        got = g.per_unit(lambda w, _: w.abs().sum(1), roles=("weight",))
        rows = [s * D + hh * hd + 3 for s in range(3) for hh in range(h)]
        cols = [hh * hd + 3 for hh in range(h)]
        want = attn0.qkv.weight[rows].abs().sum() + attn0.proj.weight[:, cols].abs().sum()
        assert torch.isclose(got[3], want.double(), rtol=1e-6)
    assert "blocks.1.attn.heads" in net.width_groups()      # the context is gone: heads again
    keep = [d for d in range(hd) if d % 3 != 1]
    drop = [d for d in range(hd) if d % 3 == 1]
    masked = copy.deepcopy(net)
    a = masked.net.blocks[1].attn
    with torch.no_grad():
        for s in range(3):
            for hh in range(h):
                for d in drop:
                    a.qkv.weight[s * D + hh * hd + d] = 0
                    a.qkv.bias[s * D + hh * hd + d] = 0
    surgery.apply(net, Plan("width", {"blocks.1.attn.head_dims": keep}))
    attn = net.net.blocks[1].attn
    assert (attn.num_heads, attn.head_dim, attn.proj.in_features) == (h, len(keep), h * len(keep))
    assert attn.scale == pytest.approx(hd ** -0.5)
    x, t, y = net.example_inputs(3)
    x, t = as_float64(net, masked, inputs=(x, t))
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, y), masked(x, t, y), **F64_TOL)
    groups = net.width_groups()
    assert "blocks.1.attn.heads" not in groups and groups["blocks.1.attn.head_dims"].dense_ids == keep
    with pytest.raises(BenchError, match="invalid width plan"):
        surgery.apply(net, Plan("width", {"blocks.1.attn.head_dims": [drop[0]]}))


def test_diff_pruning_head_dims_plan_keeps_every_head(calib):
    net = make_net("dit")
    m = load_method("diff_pruning", t_stride=250, attn_unit="head_dims")
    plan = m.plan(net, Budget("macs", 0.6), calib)
    assert plan.meta["attn_unit"] == "head_dims"
    assert {k.rsplit(".", 1)[1] for k in plan.keep if ".attn." in k} == {"head_dims"}
    pruned = surgery.apply(copy.deepcopy(net), Plan.from_json(plan.to_json()))
    heads = [b.attn.num_heads for b in net.net.blocks]
    assert [b.attn.num_heads for b in pruned.net.blocks] == heads
    assert any(b.attn.head_dim < net.net.blocks[0].attn.head_dim for b in pruned.net.blocks)
    got = surgery.measure(pruned)["macs"] / surgery.measure(net)["macs"]
    assert got <= 0.6 + 1e-9 and got == pytest.approx(plan.meta["measured_keep"])
    assert "blocks.0.attn.heads" in net.width_groups()     # planning left the dense model's units alone


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

    def fake_loss(net_, x0, y, noise, u, reduction="mean"):  # the constructed curve, with a gradient of 1 per visit
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
    """abs_mean = pip Torch-Pruning TaylorImportance(multivariable=False): mean over the coupled weights
    of sum |theta G|, normalised, no bias; squared = Diff-Pruning's vendored TaylorImportance: sum of
    (theta G)^2 over the weights, no bias (version 1 summed the fc1 bias into both: fails there)."""
    net = make_net("dit")
    m_abs = load_method("diff_pruning", t_stride=250)
    m_sq = load_method("diff_pruning", t_stride=250, score="squared")
    s_abs, meta, _ = m_abs.scores(net, calib)
    s_sq, _, _ = m_sq.scores(net, calib)
    assert meta["steps_used"] >= 1 and meta["T"] == 1000
    # recompute one group by hand from the accumulated gradients
    from baselines.width import accumulate_gradients, timestep_grid
    accumulate_gradients(net, calib, m_abs.batch, timestep_grid(net, 250), m_abs.thr, m_abs.check)
    g = net.width_groups()["blocks.1.mlp.hidden"]
    fc1, fc2 = net.net.blocks[1].mlp.fc1, net.net.blocks[1].mlp.fc2
    tg = lambda p: (p * p.grad).double()
    per = tg(fc1.weight).abs().sum(1) + tg(fc2.weight).abs().sum(0)
    want = per / 2
    want = want / want.mean()
    assert torch.allclose(torch.tensor(s_abs["blocks.1.mlp.hidden"], dtype=torch.float64), want, rtol=1e-6)
    sq = tg(fc1.weight).pow(2).sum(1) + tg(fc2.weight).pow(2).sum(0)
    assert torch.allclose(torch.tensor(s_sq["blocks.1.mlp.hidden"], dtype=torch.float64), sq, rtol=1e-6)
    assert g.size == fc1.out_features
    net.net.zero_grad(set_to_none=True)


def test_diff_pruning_rejects_bad_settings():
    from methods.diff_pruning import DiffPruning
    with pytest.raises(BenchError, match="score"):
        DiffPruning(score="cubic")
    with pytest.raises(BenchError, match="thr"):
        DiffPruning(thr=1.5)


# ---- Diff-Pruning's ddpm_exp path (issue "Paper protocols", item 5) ------------------------

GROUP = "down_blocks.0.resnets.0.conv1.channels"   # unet_tiny: conv1 -> norm2 -> conv2, + time_emb_proj rows


def _hand_grads(net):
    """Hand-made gradients on the U-Net: every grad zero except the group's conv1 weight (1), its
    time_emb_proj rows (0.5), its norm2 weight (d_c chosen so that |theta_c d_c| = 100 at in-chunk
    position u = chunk j, small elsewhere) and huge bias grads (no official importance reads biases).
    Returns the hand-computed ddpm_exp importance per channel: sum (theta g)^2 over the weights +
    |theta g| of the norm weight."""
    r = net.net.unet.down_blocks[0].resnets[0]
    for p in net.net.parameters():
        p.grad = torch.zeros_like(p)
    r.conv1.weight.grad.fill_(1.0)
    r.time_emb_proj.weight.grad.fill_(0.5)
    for b in (r.conv1.bias, r.time_emb_proj.bias, r.norm2.bias):
        b.grad.fill_(1e6)
    C, k = r.conv1.out_channels, 4
    n = C // k
    gn = r.norm2.weight.detach()
    target = torch.tensor([100.0 if c % n == c // n else 0.01 * (c % n + 1) for c in range(C)], dtype=gn.dtype)
    r.norm2.weight.grad.copy_(target / gn)
    w = r.conv1.weight.detach().double()
    imp = w.pow(2).flatten(1).sum(1) + (0.5 * r.time_emb_proj.weight.detach().double()).pow(2).sum(1) \
        + (gn.double() * r.norm2.weight.grad.double()).abs()
    return imp, n, k


def test_ddpm_exp_importance_is_squared_for_weights_unsquared_for_norms_and_skips_biases():
    """Diff-Pruning's vendored TaylorImportance on hand-made gradients: (theta g)^2 summed over Conv
    weights, |theta g| for the GroupNorm weight, biases ignored; pip Torch-Pruning's abs_mean reads
    the Conv/Linear weights only. Version 1 squared the norm term and added the (huge) bias terms."""
    from baselines.width import taylor_scores
    from tests.test_unet import tiny

    net = tiny()
    imp, n, k = _hand_grads(net)
    units, chans = taylor_scores(net, "squared")
    got = torch.tensor(chans[GROUP], dtype=torch.float64)          # [chunk][unit]
    want = imp.reshape(k, n)
    assert torch.allclose(got, want, rtol=1e-9)
    assert torch.allclose(torch.tensor(units[GROUP], dtype=torch.float64), want.sum(0), rtol=1e-9)
    # abs_mean: weights only, mean over the coupled weight members (conv1 rows, conv2 cols, temb rows)
    r = net.net.unet.down_blocks[0].resnets[0]
    a = (r.conv1.weight.detach().double().abs().flatten(1).sum(1)
         + (0.5 * r.time_emb_proj.weight.detach().double()).abs().sum(1)) / 3
    a_units = torch.tensor(taylor_scores(net, "abs_mean")[0][GROUP], dtype=torch.float64)
    want_a = a.reshape(k, n).sum(0)
    assert torch.allclose(a_units, want_a / want_a.mean(), rtol=1e-9)
    # the loss's C*H*W factor scales g: (theta g)^2 grows by s^2, |theta g| by s, so the ranking inside a
    # norm group is not scale invariant (why ddpm_exp's summed loss matters)
    for p in net.net.parameters():
        p.grad.mul_(3072.0)
    scaled = torch.tensor(taylor_scores(net, "squared")[1][GROUP], dtype=torch.float64)
    assert not torch.equal(scaled.argsort(dim=1), got.argsort(dim=1))


def test_diff_pruning_picks_channels_inside_each_norm_group(monkeypatch, calib):
    """ddpm_exp's metapruner (and Torch-Pruning <= 1.4): the same count per norm group, each group's own
    lowest channels. On hand-made gradients the plan keeps exactly the hand-computed top channels of
    every chunk, which differs from the unit rule (one in-chunk position across every chunk: today's
    Torch-Pruning 1.6 rule, select=unit); the plan replays on a fresh model, same shapes as the unit plan."""
    import methods.diff_pruning as D
    from bench.width import norm_channels_key
    from tests.test_unet import tiny

    def fake_accumulate(net, *a, **kw):
        _hand_grads(net)
        return {"steps_used": 1, "losses": [1.0], "l_max": 1.0}

    monkeypatch.setattr(D, "accumulate_gradients", fake_accumulate)
    net = tiny()
    imp, n, k = _hand_grads(net)
    budget = Budget("params", 0.6)
    plan = load_method("diff_pruning", score="squared").plan(net, budget, calib)
    key = norm_channels_key(GROUP)
    assert GROUP not in plan.keep and key in plan.keep and plan.meta["norm_group_selection"]
    kept = plan.keep[key]
    m = len(kept) // k
    assert 1 <= m < n
    hand = sorted(j * n + u for j in range(k) for u in sorted(range(n), key=lambda u: -float(imp[j * n + u]))[:m])
    assert kept == hand
    unit = load_method("diff_pruning", score="squared", select="unit").plan(net, budget, calib)
    unit_channels = sorted(j * n + u for j in range(k) for u in unit.keep[GROUP])
    assert len(unit_channels) == len(kept) and unit_channels != kept
    # replay on fresh dense models: identical weights, the unit plan's shapes and cost, a finite forward
    a, b, c = (surgery.apply(tiny(), p) for p in (Plan.from_json(plan.to_json()), plan, unit))
    assert all(torch.equal(x, y) for x, y in zip(a.net.state_dict().values(), b.net.state_dict().values()))
    assert [v.shape for v in a.net.state_dict().values()] == [v.shape for v in c.net.state_dict().values()]
    assert surgery.measure(a) == surgery.measure(c)
    x, t, y = a.example_inputs(2)
    assert torch.isfinite(a(x, t, y)).all()
    # the kept conv1 outputs are the dense outputs of the kept channels (bias: its inputs were pruned too)
    dense = tiny().net.unet.down_blocks[0].resnets[0]
    assert torch.equal(a.net.unet.down_blocks[0].resnets[0].conv1.bias, dense.conv1.bias[kept])
    assert torch.equal(a.net.unet.down_blocks[0].resnets[0].norm2.weight, dense.norm2.weight[kept])
    # a unit plan on a group pruned per norm group is refused (its units have no dense ids any more)
    with pytest.raises(BenchError, match="norm_channels"):
        surgery.apply(a, Plan("width", {GROUP: [0]}))
    with pytest.raises(BenchError, match="same number"):
        surgery.apply(tiny(), Plan("width", {key: [0, 1, 4]}))


def test_summed_loss_is_the_mean_times_chw(calib):
    from baselines.width import diffusion_loss_at
    from tests.test_unet import tiny

    net = tiny()
    x0, y, noise = calib.x0[:4], calib.y[:4], calib.noise[:4]
    with torch.no_grad():
        m = diffusion_loss_at(net, x0, y, noise, 0.3, "mean")
        s = diffusion_loss_at(net, x0, y, noise, 0.3, "sum")
    assert float(s) == pytest.approx(float(m) * x0[0].numel(), rel=1e-6)


def test_paper_configs_take_the_ddpm_exp_path():
    dp, tw = load_method("diff_pruning_paper"), load_method("taylor_width_paper")
    assert (dp.score, dp.select, dp.loss, dp.check, dp.t_stride, dp.batch) == (
        "squared", "per_norm_group", "sum", "before", 1, 128)
    assert (tw.score, tw.select, tw.loss, tw.t_stride, tw.batch) == ("squared", "per_norm_group", "sum", 1, 128)


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
