"""Stage-wise routing (bench.routing): exact equivalence with static pruning, switching at stage
boundaries, shared weights, stage-weighted costs and budgets, fine-tuning through a routed model;
per-stage width (heads / MLP channels selected from the shared weights, thin output projections
per stage from a bank)."""
from __future__ import annotations

import copy
from functools import partial

import pytest
import torch

from bench import routing, stage_bank, surgery
from bench.api import BenchError, Budget, Plan
from bench.metrics import cost
from tests.conftest import F64_TOL, as_float64, make_net as _make_net


pytestmark = pytest.mark.usefixtures("one_thread")
make_net = partial(_make_net, seed_at=("weights",))  # as this module always built them: seeded before the redraw only


def stage_plan(sets, edges=None, weights=None):
    edges = edges or [k / len(sets) for k in range(len(sets) + 1)]
    stages = [{"u_range": [edges[k], edges[k + 1]], "keep": {"blocks": list(s)}} for k, s in enumerate(sets)]
    if weights:
        for s, w in zip(stages, weights):
            s["weight"] = w
    union = sorted(set().union(*map(set, sets)))
    return Plan(granularity="stage", keep={"blocks": union}, stages=stages)


def static(net, keep):
    return surgery.apply(copy.deepcopy(net), Plan(granularity="block", keep={"blocks": list(keep)}))


def inputs(net, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    u = torch.rand(n, generator=g)  # every stage present: the batch is split by stage
    return x, net.process.t_from_u(u), torch.randint(10, (n,), generator=g)


@pytest.mark.parametrize("family", ["dit", "sit"])
def test_same_keep_set_in_every_stage_is_exactly_the_static_model(family):
    net = make_net(family)
    keep = [0, 2, 3]
    routed = surgery.apply(copy.deepcopy(net), stage_plan([keep] * 4))
    ref = static(net, keep)
    x, t, y = inputs(net, 16)
    with torch.no_grad():
        assert torch.equal(routed(x, t, y), ref(x, t, y))
    # the training loss too (label dropout drawn from the same generator), and its gradients
    routed.net.train()
    ref.net.train()
    la = routed.loss(x, y, generator=torch.Generator().manual_seed(3))
    lb = ref.loss(x, y, generator=torch.Generator().manual_seed(3))
    assert torch.equal(la, lb)
    la.backward()
    lb.backward()
    for (na, pa), (nb, pb) in zip(routed.net.named_parameters(), ref.net.named_parameters()):
        assert na == nb and (pa.grad is None) == (pb.grad is None)
        if pa.grad is not None:
            assert torch.equal(pa.grad, pb.grad), na
    assert surgery.measure(routed)["macs"] == surgery.measure(ref)["macs"]
    assert surgery.measure(routed)["params"] == surgery.measure(ref)["params"]


@pytest.mark.parametrize("family", ["dit", "sit"])
def test_different_sets_switch_at_the_stage_boundaries(family):
    net = make_net(family)
    sets = [[0, 1], [1, 2, 3], [3], [0, 3]]
    plan = stage_plan(sets, edges=[0.0, 0.3, 0.5, 0.8, 1.0])
    routed = surgery.apply(copy.deepcopy(net), plan)
    assert routed.kept_blocks == [0, 1, 2, 3] and len(routed.net.blocks) == 4
    refs = [static(net, s) for s in sets]
    r = routing.router(routed)
    # native timesteps on both sides of every boundary, and the two ends of the trajectory
    if family == "dit":
        T = net.process.T
        ts = [0, 299, 300, 499, 500, 799, 800, T - 1]
    else:  # flow: t = 1 - u (data at t = 1)
        ts = [1.0, 0.7 + 1e-4, 0.7, 0.5 + 1e-4, 0.5, 0.2 + 1e-4, 0.2, 0.0]
    expect = [0, 0, 1, 1, 2, 2, 3, 3]
    t = torch.tensor(ts) if family == "sit" else torch.tensor(ts, dtype=torch.long)
    assert r.stage_of(t).tolist() == expect
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(len(ts), 1, 8, 8, generator=g), torch.randint(10, (len(ts),), generator=g)
    (x,) = as_float64(net, routed, *refs, inputs=(x,))  # batch of 8 vs batch of 1: see as_float64
    with torch.no_grad():
        mixed = routed(x, t, y)  # one batch across all four stages
        for i, s in enumerate(expect):
            one = routed(x[i:i + 1], t[i:i + 1], y[i:i + 1])
            want = refs[s](x[i:i + 1], t[i:i + 1], y[i:i + 1])
            assert torch.equal(one, want), (i, s)
            torch.testing.assert_close(mixed[i:i + 1], want, **F64_TOL)
        # and the stage's own set differs from its neighbour's (the switch is real)
        assert not torch.allclose(refs[0](x[1:2], t[1:2], y[1:2]), refs[1](x[1:2], t[1:2], y[1:2]))


def test_weights_are_shared_not_copied():
    net = make_net()
    routed = surgery.apply(copy.deepcopy(net), stage_plan([[0, 1], [1, 2], [2, 3], [0, 3]]))
    ptrs = [p.data_ptr() for p in routed.net.parameters()]
    assert len(ptrs) == len(set(ptrs))
    assert surgery.measure(routed)["params"] == surgery.measure(net)["params"]  # the union is all 4 blocks
    # a union of fewer blocks stores fewer
    small = surgery.apply(copy.deepcopy(net), stage_plan([[0], [0, 2], [2], [0]]))
    assert small.kept_blocks == [0, 2] and len(small.net.blocks) == 2
    assert surgery.measure(small)["params"] == surgery.measure(static(net, [0, 2]))["params"]
    assert set(small.net.state_dict()) == set(static(net, [0, 2]).net.state_dict())  # official layout kept


def test_costs_are_stage_weighted_and_budget_is_checked_on_them():
    net = make_net()
    dense = surgery.measure(net)
    fixed, per = surgery.block_costs(net)
    sets = [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3]]
    w = [0.4, 0.3, 0.2, 0.1]
    routed = surgery.apply(copy.deepcopy(net), stage_plan(sets, weights=w))
    m = surgery.measure(routed)
    assert m["stage_blocks"] == [1, 2, 3, 4] and m["stage_weights"] == pytest.approx(w)
    assert m["blocks"] == pytest.approx(0.4 * 1 + 0.3 * 2 + 0.2 * 3 + 0.1 * 4)
    for k, s in enumerate(sets):
        assert m["stage_macs"][k] == pytest.approx(fixed["macs"] + len(s) * per["macs"], rel=1e-9)
    assert m["macs"] == pytest.approx(sum(a * b for a, b in zip(w, m["stage_macs"])))
    # 2.0 weighted blocks of 4: meets blocks 0.5, misses 0.45; params count the stored union (all 4)
    keep = surgery.check_budget(dense, m, Budget("blocks", 0.5))
    assert keep["keep_blocks"] == pytest.approx(0.5) and keep["keep_params"] == pytest.approx(1.0)
    with pytest.raises(BenchError, match="over the budget"):
        surgery.check_budget(dense, m, Budget("blocks", 0.45))
    # without weights, stages weigh by the width of their u range
    m2 = surgery.measure(surgery.apply(copy.deepcopy(net), stage_plan(sets, edges=[0, 0.5, 0.75, 0.875, 1])))
    assert m2["stage_weights"] == pytest.approx([0.5, 0.25, 0.125, 0.125])


def test_plan_round_trip_and_replay_give_the_same_model():
    net = make_net("sit")
    plan = stage_plan([[0, 1], [1, 3], [2, 3], [0, 3]], weights=[0.25, 0.25, 0.25, 0.25])
    a = surgery.apply(copy.deepcopy(net), plan)
    b = surgery.apply(copy.deepcopy(net), Plan.from_json(plan.to_json()))
    x, t, y = inputs(net, 12, seed=5)
    with torch.no_grad():
        assert torch.equal(a(x, t, y), b(x, t, y))


def test_nfe_weights_count_sampler_evaluations():
    net = make_net()
    edges = [0.0, 0.25, 0.5, 0.75, 1.0]
    w = routing.nfe_weights(net.process, edges, "ddpm", 25)
    from bench.processes.ddpm import space_timesteps
    ts = torch.tensor(space_timesteps(1000, 25))
    counts = [int(((ts >= 250 * k) & (ts < 250 * (k + 1))).sum()) for k in range(4)]
    assert w == pytest.approx([c / 25 for c in counts]) and sum(w) == pytest.approx(1.0)
    flow = make_net("sit").process
    wf = routing.nfe_weights(flow, edges, "heun", 10)  # 20 evaluations, t = 0 .. 1
    assert sum(wf) == pytest.approx(1.0) and len(wf) == 4 and min(wf) > 0


def test_routed_model_fine_tunes_with_mixed_timesteps(tmp_path):
    from bench.data import digits
    from bench.finetune import FinetuneConfig, finetune

    net = make_net()
    routed = surgery.apply(copy.deepcopy(net), stage_plan([[0, 1], [2], [3], [1, 3]]))
    before = {k: v.clone() for k, v in routed.net.state_dict().items()}
    cfg = FinetuneConfig(steps=3, batch=16, lr=1e-3, ckpt_every=100, log_every=100)
    out = finetune(routed, digits("train"), cfg, tmp_path / "ft", seed=0)
    assert routing.is_routed(out)
    after = out.net.state_dict()
    for i in range(4):  # every stored block got gradient from the stages that use it
        k = f"blocks.{i}.attn.qkv.weight"
        assert not torch.equal(before[k], after[k]), k
    # the finished weights reload into a freshly routed model (resume path)
    again = surgery.apply(copy.deepcopy(net), stage_plan([[0, 1], [2], [3], [1, 3]]))
    again = finetune(again, digits("train"), cfg, tmp_path / "ft", seed=0)
    x, t, y = inputs(net, 8)
    with torch.no_grad():
        assert torch.equal(again(x, t, y), out(x, t, y))


def test_hidden_states_and_pinning():
    net = make_net()
    routed = surgery.apply(copy.deepcopy(net), stage_plan([[0, 1], [2], [3], [1, 3]]))
    x, _, y = inputs(net, 4)
    t = torch.full((4,), 900, dtype=torch.long)  # last stage: blocks 1, 3
    with torch.no_grad():
        h = routed.hidden_states(x, t, y)
        assert len(h) == 3
        with pytest.raises(BenchError, match="one stage"):
            routed.hidden_states(x, torch.tensor([0, 900, 0, 900]), y)
        r = routing.router(routed)
        with r.pin(0):  # stage 0's blocks whatever t is
            assert torch.equal(routed(x, t, y), static(net, [0, 1])(x, t, y))


def test_stage_latency_reports_every_stage():
    net = make_net()
    routed = surgery.apply(copy.deepcopy(net), stage_plan([[0], [0, 1, 2, 3], [1], [2]], weights=[0.1, 0.2, 0.3, 0.4]))
    r = cost.stage_latency(routed, 4, "cpu", warmup=1, reps=3, allow_few=True)
    assert len(r["records"]) == 4 and all(rec["median_ms"] > 0 for rec in r["records"])
    assert r["median_ms"] == pytest.approx(sum(w * rec["median_ms"] for w, rec in zip(r["weights"], r["records"])))


@pytest.mark.parametrize("stages,match", [
    ([{"u_range": [0, 0.5], "keep": {"blocks": [0]}}, {"u_range": [0.6, 1], "keep": {"blocks": [1]}}], "contiguous"),
    ([{"u_range": [0, 0.5], "keep": {"blocks": [0]}}, {"u_range": [0.5, 0.9], "keep": {"blocks": [1]}}], "end at u = 1"),
    ([{"u_range": [0, 1], "keep": {"blocks": [0], "blocks.1.attn.heads": [0]}}], "which that stage drops"),
    ([{"u_range": [0, 1], "keep": {"blocks": [0], "blocks.0.attn.heads": [5]}}], "does not store"),
    ([{"u_range": [0, 1], "keep": {"blocks": [0], "blocks.0.attn.gates": [0]}}], "unknown unit group"),
    ([{"u_range": [0, 1], "keep": {"blocks": [0], "blocks.0.mlp.hidden": []}}], "non-empty"),
    ([{"u_range": [0, 1], "keep": {"blocks": [7]}}], "invalid block plan"),
    ([{"u_range": [0, 1], "keep": {"blocks": []}}], "non-empty"),
])
def test_bad_stage_plans_are_refused(stages, match):
    net = make_net()
    with pytest.raises(BenchError, match=match):
        surgery.apply(copy.deepcopy(net), Plan(granularity="stage", keep={}, stages=stages))


def test_routed_model_refuses_a_second_plan():
    net = surgery.apply(make_net(), stage_plan([[0], [1]]))
    with pytest.raises(BenchError, match="routed already"):
        surgery.apply(net, Plan(granularity="block", keep={"blocks": [0]}))


# --------------------------------------------------------------------------------------------
# Per-stage width: shared q/k/v and fc1 rows, thin output projections per stage (the bank)
# --------------------------------------------------------------------------------------------

HEADS, CHANNELS = "attn.heads", "mlp.hidden"


def width_keep(heads, channels, blocks=range(4)):
    """A stage keep set: the same kept heads / channels in every block."""
    keep = {"blocks": list(blocks)}
    for b in blocks:
        keep[f"blocks.{b}.{HEADS}"] = list(heads)
        keep[f"blocks.{b}.{CHANNELS}"] = list(channels)
    return keep


def thin_weights(net, keep, seed):
    """Some output projections for a keep set (stand-ins for compensated ones): the dense
    columns plus a seeded perturbation, per width group."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, ids in keep.items():
        if name == "blocks":
            continue
        W = routing.consumer_columns(net, name, ids).detach()
        out[name] = W + 0.1 * torch.randn(W.shape, generator=g)
    return out


def static_width(net, keep, thin):
    """The static width-pruned model with these output projections written in."""
    pruned = surgery.apply(copy.deepcopy(net), Plan(granularity="width", keep={k: v for k, v in keep.items()
                                                                              if k != "blocks"}))
    with torch.no_grad():
        for name, W in thin.items():
            b = int(name.split(".")[1])
            block = pruned.net.blocks[pruned.kept_blocks.index(b)]
            layer = block.attn.proj if name.endswith(HEADS) else block.mlp.fc2
            layer.weight.copy_(W)
    return pruned


def width_plan(net, keeps, thins, tmp_path, edges=None):
    edges = edges or [k / len(keeps) for k in range(len(keeps) + 1)]
    stages = [{"u_range": [edges[k], edges[k + 1]], "keep": keep} for k, keep in enumerate(keeps)]
    thin = {(s, g): w for s, t in enumerate(thins) for g, w in t.items()}
    union, tensors = routing.pack_bank(net, stages, thin)
    ref = stage_bank.save_bank(tensors, tmp_path)
    blocks = sorted(set().union(*(k["blocks"] for k in keeps)))
    return Plan(granularity="stage", keep={"blocks": blocks, **union}, stages=stages, meta={"bank": ref}), tensors


@pytest.mark.parametrize("family", ["dit", "sit"])
def test_width_plan_with_one_keep_set_and_weights_is_the_static_compensated_model(family, tmp_path):
    net = make_net(family)
    keep = width_keep([1], [0, 3, 5, 6, 17, 40, 41, 90, 127])
    thin = thin_weights(net, keep, seed=0)
    plan, tensors = width_plan(net, [keep] * 4, [thin] * 4, tmp_path)
    assert all(k.startswith("shared/") for k in tensors)  # one copy, written into the stored projections
    routed = surgery.apply(copy.deepcopy(net), Plan.from_json(plan.to_json()))
    ref = static_width(net, keep, thin)
    x, t, y = inputs(net, 16)
    with torch.no_grad():
        assert torch.equal(routed(x, t, y), ref(x, t, y))
    a, b = surgery.measure(routed), surgery.measure(ref)
    assert a["params"] == b["params"] and a["macs"] == b["macs"] and a["stage_bank_params"] == 0
    assert set(routed.net.state_dict()) == set(ref.net.state_dict())  # no bank module: the official layout


@pytest.mark.parametrize("family", ["dit", "sit"])
def test_width_sets_switch_at_the_stage_boundaries(family, tmp_path):
    net = make_net(family)
    keeps = [width_keep([0], range(0, 128, 2)), width_keep([0, 1], range(64)),
             width_keep([1], range(100, 128)), width_keep([0, 1], range(128))]
    thins = [thin_weights(net, keeps[0], 1), thin_weights(net, keeps[1], 2), {}, {}]  # stage 2: selected columns
    plan, tensors = width_plan(net, keeps, thins, tmp_path, edges=[0.0, 0.3, 0.5, 0.8, 1.0])
    routed = surgery.apply(copy.deepcopy(net), plan)
    refs = [static_width(net, k, th) for k, th in zip(keeps, thins)]
    if family == "dit":
        t = torch.tensor([0, 299, 300, 499, 500, 799, 800, net.process.T - 1], dtype=torch.long)
    else:
        t = torch.tensor([1.0, 0.7 + 1e-4, 0.7, 0.5 + 1e-4, 0.5, 0.2 + 1e-4, 0.2, 0.0])
    expect = [0, 0, 1, 1, 2, 2, 3, 3]
    assert routing.router(routed).stage_of(t).tolist() == expect
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(len(expect), 1, 8, 8, generator=g), torch.randint(10, (len(expect),), generator=g)
    (x,) = as_float64(net, routed, *refs, inputs=(x,))  # batch of 8 vs batch of 1: see as_float64
    with torch.no_grad():
        mixed = routed(x, t, y)  # one batch across all four stages (fine-tuning draws t per sample)
        for i, s in enumerate(expect):
            want = refs[s](x[i:i + 1], t[i:i + 1], y[i:i + 1])
            torch.testing.assert_close(routed(x[i:i + 1], t[i:i + 1], y[i:i + 1]), want, **F64_TOL)
            torch.testing.assert_close(mixed[i:i + 1], want, **F64_TOL)
        assert not torch.allclose(refs[0](x[1:2], t[1:2], y[1:2]), refs[1](x[1:2], t[1:2], y[1:2]))
    # the last stage keeps every unit with the dense weights: exactly the dense model there
    with torch.no_grad():
        assert torch.equal(routed(x[6:], t[6:], y[6:]), net(x[6:], t[6:], y[6:]))


def test_width_bank_stores_each_thin_projection_once_per_stage(tmp_path):
    net = make_net()
    keeps = [width_keep([0], range(32)), width_keep([1], range(32, 96)), width_keep([0], range(32)),
             width_keep([0, 1], range(128))]
    thins = [thin_weights(net, keeps[0], 1), thin_weights(net, keeps[1], 2), thin_weights(net, keeps[0], 3), {}]
    plan, tensors = width_plan(net, keeps, thins, tmp_path)
    assert sorted({k.split("/")[0] for k in tensors}) == ["stage0", "stage1", "stage2"]  # stage 3 selects the stored
    routed = surgery.apply(copy.deepcopy(net), plan)
    union = surgery.apply(copy.deepcopy(net), Plan(granularity="width", keep={k: v for k, v in plan.keep.items()
                                                                             if k != "blocks"}))
    m = surgery.measure(routed)
    thin_params = sum(w.numel() for k, w in tensors.items() if k.startswith("stage"))
    per_stage = [sum(w.numel() for g, w in th.items()) for th in thins]
    assert thin_params == sum(per_stage[:3])
    assert m["stage_bank_params"] == thin_params == plan.meta["bank"]["params"]
    assert m["params"] == surgery.measure(union)["params"] + thin_params  # shared union + thin projections
    ptrs = [p.data_ptr() for p in routed.net.parameters()]
    assert len(ptrs) == len(set(ptrs))  # nothing stored twice
    # MACs of a width stage are those of the static model with the same widths
    for s, (k, th) in enumerate(zip(keeps, thins)):
        assert m["stage_macs"][s] == surgery.measure(static_width(net, k, th))["macs"]


def test_width_routed_model_fine_tunes_its_stage_projections_and_resumes(tmp_path):
    from bench.data import digits
    from bench.finetune import FinetuneConfig, finetune

    net = make_net()
    keeps = [width_keep([0], range(64)), width_keep([1], range(64, 128)), width_keep([0, 1], range(96)),
             width_keep([0], range(128))]
    thins = [thin_weights(net, k, s) for s, k in enumerate(keeps)]
    plan, _ = width_plan(net, keeps, thins, tmp_path / "bank")
    routed = surgery.apply(copy.deepcopy(net), plan)
    before = {k: v.clone() for k, v in routed.net.state_dict().items()}
    assert any(k.startswith("stage_bank.") for k in before)
    cfg = FinetuneConfig(steps=3, batch=16, lr=1e-3, ckpt_every=100, log_every=100)
    out = finetune(routed, digits("train"), cfg, tmp_path / "ft", seed=0)
    after = out.net.state_dict()
    changed = [k for k in before if k.startswith("stage_bank.") and not torch.equal(before[k], after[k])]
    assert changed and not torch.equal(before["blocks.0.attn.qkv.weight"], after["blocks.0.attn.qkv.weight"])
    again = finetune(surgery.apply(copy.deepcopy(net), plan), digits("train"), cfg, tmp_path / "ft", seed=0)
    x, t, y = inputs(net, 8)
    with torch.no_grad():
        assert torch.equal(again(x, t, y), out(x, t, y))


def test_bad_banks_are_refused(tmp_path):
    net = make_net()
    keeps = [width_keep([0], range(64)), width_keep([1], range(64))]
    plan, tensors = width_plan(net, keeps, [thin_weights(net, k, s) for s, k in enumerate(keeps)], tmp_path)
    bad = Plan.from_json(plan.to_json())
    bad.meta["bank"]["sha256"] = "0" * 64
    with pytest.raises(BenchError, match="sha256"):
        surgery.apply(copy.deepcopy(net), bad)
    gone = Plan.from_json(plan.to_json())
    gone.meta["bank"]["path"] = str(tmp_path / "missing.safetensors")
    with pytest.raises(BenchError, match="does not exist"):
        surgery.apply(copy.deepcopy(net), gone)
    wrong = dict(tensors)
    key = next(k for k in wrong if k.startswith("stage1/"))
    wrong[key] = wrong[key][:, :3]
    shaped = Plan.from_json(plan.to_json())
    shaped.meta["bank"] = stage_bank.save_bank(wrong, tmp_path)
    with pytest.raises(BenchError, match="shape"):
        surgery.apply(copy.deepcopy(net), shaped)


# --------------------------------------------------------------------------------------------
# The GPU measurement script bench.gpu.routing_speed, smoke mode on the CPU (tiny DiT, seconds)
# --------------------------------------------------------------------------------------------

def test_routing_speed_smoke(tmp_path):
    from bench.gpu import routing_speed

    res = routing_speed.main(["--smoke", "--out", str(tmp_path / "rs")])
    assert (tmp_path / "rs.json").is_file() and "Stage-wise routing" in (tmp_path / "rs.md").read_text()
    rows = [r for r in res["stages"] if r["mode"] == "eager" and r["dtype"] == "fp32"]
    assert len(rows) == 4 and all(r["routed_ms"] and r["pinned_ms"] and r["same_n_ms"] for r in rows)
    assert all(r["max_abs_diff"] == 0.0 for r in rows) and not res["errors"]
    md = (tmp_path / "rs.md").read_text()
    (tmp_path / "rs.md").unlink()
    routing_speed.main(["--render", "--out", str(tmp_path / "rs")])  # the tables again from the record alone
    assert (tmp_path / "rs.md").read_text() == md


def test_routing_speed_width_smoke(tmp_path):
    from bench.gpu import routing_speed

    res = routing_speed.main(["--smoke", "--width", "0.75,0.5,0.5,0.25", "--out", str(tmp_path / "rsw")])
    m = res["meta"]
    assert m["mode"] == "width" and m["fracs"] == [0.75, 0.5, 0.5, 0.25] and m["stages_distinct"]
    # every stage has its own thin proj and fc2 in every block (stage 0 keeps both tiny heads: its proj is the stored one)
    assert m["bank_tensors"] == 4 * 2 * m["depth"] and m["bank_stage_entries"] == 4 * 2 * m["depth"] - m["depth"]
    assert m["stage_macs_G"] == m["static_macs_G"]  # a routed stage costs what its static model costs
    assert all(c["max_abs_diff"] <= 1e-6 and c["pinned_max_abs_diff"] <= 1e-6 for c in res["check"])
    assert not res["errors"] and not res["skipped"]
    for dtype in ("fp32", "bf16"):
        rows = [r for r in res["stages"] if (r["mode"], r["dtype"]) == ("eager", dtype)]
        assert [r["frac"] for r in rows] == m["fracs"]
        assert all(r["routed_ms"] and r["pinned_ms"] and r["same_frac_ms"] and r["routed_over_same_frac"] > 0
                   for r in rows)
        s = next(s for s in res["summary"] if (s["mode"], s["dtype"]) == ("eager", dtype))
        assert s["routed_mean_ms"] and s["static_mean_ms"] and s["dense_ms"]
    md = (tmp_path / "rsw.md").read_text()
    assert "routed / same-frac" in md and (tmp_path / "rsw.json").is_file()
    # the budget: nothing starts after it, and what was built and checked is still written
    res = routing_speed.main(["--smoke", "--width", "0.5,0.25", "--budget-s", "0", "--out", str(tmp_path / "b0")])
    assert res["skipped"] and not any(r.get("routed_ms") for r in res["stages"])
    assert len(res["check"]) == 2 and "Not measured" in (tmp_path / "b0.md").read_text()


def test_a_routed_model_fine_tunes_without_cuda_graphs():
    """finetune.graph (bench.graphed) cannot record a routed forward: its route is read on the host, per
    sample's timestep. The loop says so and runs the eager step."""
    from bench import graphed

    net = make_net()
    routed = surgery.apply(copy.deepcopy(net), stage_plan([[0, 1], [2], [3], [1, 3]]))
    assert "stage-routed" in graphed.why_not("cuda", None, 0.0, False, routed)
    assert graphed.why_not("cuda", None, 0.0, False, net) is None
