"""OBS-Diff (methods.obs_diff): the timestep weights, the Hessian accumulation along the sampling
trajectory, the OBS update against no compensation and against the least-squares optimum, module
packages in sequence, the mask variants, and the run's store / reload of rewritten weights."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

import methods.obs_diff as od
from bench import registry, surgery
from bench.api import BenchError, Budget
from methods.obs_diff import (HessianAccumulator, obs_prune_columns, obs_prune_unstructured, reconstruction_error,
                              split_packages, timestep_weights, trajectory_hessians)
from tests.conftest import F64_TOL, as_float64, comparable, make_net

def load(name: str, **over):
    return registry.build(name, over)


pytestmark = pytest.mark.usefixtures("one_thread")


def layer_problem(out=12, n=24, samples=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(samples, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    W = torch.randn(out, n, generator=g, dtype=torch.float64)
    acc = HessianAccumulator(n)
    acc.add(X, 1.0, count=samples)
    return W, X, acc.H


# --------------------------------------------------------------------------------------------
# Timestep weights and the Hessian
# --------------------------------------------------------------------------------------------

def test_timestep_weights_follow_the_log_decrease_formula():
    T = 10
    w = timestep_weights(T)
    for t in range(1, T + 1):
        assert w[t - 1] == pytest.approx(0.8 + 0.4 * math.log(T - t + 1) / math.log(T), abs=1e-15)
    assert w[0] == pytest.approx(1.2) and w[-1] == pytest.approx(0.8)
    assert all(a > b for a, b in zip(w, w[1:]))                  # the noisiest step weighs most
    inc = timestep_weights(T, "log_increase")
    assert inc[0] == pytest.approx(0.8) and inc[-1] == pytest.approx(1.2)
    assert timestep_weights(T, "linear_decrease")[4] == pytest.approx(1.2 - 0.4 * 4 / 9)
    assert timestep_weights(5, "uniform") == [1.0] * 5
    assert timestep_weights(1) == [1.2]
    assert timestep_weights(25, w_min=0.5, w_max=2.0)[12] == pytest.approx(0.5 + 1.5 * math.log(13) / math.log(25))
    with pytest.raises(BenchError):
        timestep_weights(10, "exp_decrease")


def test_hessian_accumulator_is_the_weighted_mean_of_2_x_xt():
    g = torch.Generator().manual_seed(0)
    parts = [(torch.randn(3, 5, 4, generator=g), 1.2), (torch.randn(2, 5, 4, generator=g), 0.8),
             (torch.randn(4, 5, 4, generator=g), 1.0)]
    acc = HessianAccumulator(4)
    for x, a in parts:
        acc.add(x, a, count=x.shape[0])
    want = sum(2 * a * x.reshape(-1, 4).double().T @ x.reshape(-1, 4).double() for x, a in parts)
    want /= sum(a * x.shape[0] for x, a in parts)
    torch.testing.assert_close(acc.H, want)


@pytest.mark.parametrize("family,sampler,per_call", [("dit", "auto", 1), ("sit", "auto", 1), ("sit", "heun", 2)])
def test_trajectory_hessians_weight_each_sampling_step(family, sampler, per_call, calib):
    """Record the inputs of one layer call by call: H must be 2 sum_t alpha_t X_t^T X_t / sum alpha_t n_t
    with the weights of the step each call belongs to (first = noisiest = 1.2)."""
    net = make_net(family)
    layer = net.net.blocks[1].mlp.fc2
    seen = []
    h = layer.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    steps = 4
    H, alpha = trajectory_hessians(net, {"fc2": layer}, calib.noise[:6], calib.y[:6], sampler=sampler, steps=steps,
                                   cfg_scale=1.5, batch_size=4)
    h.remove()
    assert alpha == pytest.approx(timestep_weights(steps))
    calls = len(seen)
    assert calls == 2 * steps * per_call                            # two probe batches (4 + 2)
    num, den = 0, 0
    for i, x in enumerate(seen):
        a = alpha[(i % (steps * per_call)) // per_call]
        X = x.reshape(-1, x.shape[-1]).double()
        num = num + 2 * a * X.T @ X
        den += a * x.shape[0]
        assert x.shape[0] == 2 * (4 if i < steps * per_call else 2)  # CFG doubles the batch
    torch.testing.assert_close(H["fc2"], num / den)


# --------------------------------------------------------------------------------------------
# The layer routine
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("group_size,n_remove", [(1, 8), (4, 2), (6, 3)])
def test_obs_update_lowers_the_reconstruction_error(group_size, n_remove):
    W, X, H = layer_problem()
    kept, W_c, info = obs_prune_columns(W, H, n_remove, group_size, damp=0.01, compensate=True, return_info=True)
    kept_n, W_n = obs_prune_columns(W, H, n_remove, group_size, damp=0.01, compensate=False)
    assert len(kept) == 24 // group_size - n_remove and len(info["order"]) == n_remove
    cols = lambda groups: [g * group_size + k for g in groups for k in range(group_size)]
    removed = sorted(set(range(24 // group_size)) - set(kept))
    assert (W_c[:, cols(removed)] == 0).all()
    assert (W_n[:, cols(sorted(set(range(24 // group_size)) - set(kept_n)))] == 0).all()
    # no compensation: surviving columns untouched
    assert torch.equal(W_n[:, cols(kept_n)], W[:, cols(kept_n)])
    e_c, e_n = reconstruction_error(W, W_c, X), reconstruction_error(W, W_n, X)
    assert e_c < e_n
    # the same removed set without compensation is worse too (the update, not the choice, helps)
    W_same = W.clone()
    W_same[:, cols(removed)] = 0
    assert e_c < reconstruction_error(W, W_same, X)


def test_greedy_obs_reaches_the_least_squares_optimum_of_its_kept_columns():
    """With exact inverse-Hessian downdates (no damping), after any number of removals the kept
    columns are the least-squares fit of W X from the kept inputs."""
    W, X, H = layer_problem()
    kept, W_c = obs_prune_columns(W, H, 10, 1, damp=0.0, compensate=True)
    Xk = X[:, kept]
    sol = torch.linalg.lstsq(Xk, X @ W.T).solution.T            # [out, kept]
    torch.testing.assert_close(W_c[:, kept], sol, rtol=1e-7, atol=1e-9)


def test_greedy_removes_the_lowest_saliency_and_chol_diag_agrees_for_single_columns():
    W, X, H = layer_problem()
    Hd = H + 0.01 * torch.diag(H).mean() * torch.eye(24, dtype=torch.float64)
    Hinv = torch.linalg.inv(Hd)
    first = (W ** 2).sum(0) / (2 * torch.diag(Hinv))
    _, _, info = obs_prune_columns(W, H, 1, 1, return_info=True)
    assert info["order"] == [int(first.argmin())]
    torch.testing.assert_close(torch.tensor(info["saliency"], dtype=torch.float64), first)
    _, _, info_c = obs_prune_columns(W, H, 1, 1, saliency="chol_diag", return_info=True)
    torch.testing.assert_close(torch.tensor(info_c["saliency"], dtype=torch.float64), first)
    with pytest.raises(BenchError):
        obs_prune_columns(W, H, 24, 1)        # at least one group stays
    with pytest.raises(BenchError):
        obs_prune_columns(W, H, 1, 5)         # 24 columns are not groups of 5


def test_unstructured_and_nm_masks():
    W, X, H = layer_problem(n=32)
    mask, W_u = obs_prune_unstructured(W, H, sparsity=0.5, blocksize=16)
    assert (W_u[mask] == 0).all()
    assert mask.float().mean().item() == pytest.approx(0.5, abs=0.02)
    _, W_u_nc = obs_prune_unstructured(W, H, sparsity=0.5, blocksize=16, compensate=False)
    assert reconstruction_error(W, W_u, X) < reconstruction_error(W, W_u_nc, X)
    mask, W_nm = obs_prune_unstructured(W, H, nm=(2, 4), blocksize=16)
    assert (mask.reshape(W.shape[0], -1, 4).sum(-1) == 2).all()  # exactly 2 zeros in every 4
    assert (W_nm[mask] == 0).all()
    masked_only = W.clone()
    masked_only[mask] = 0
    assert reconstruction_error(W, W_nm, X) < reconstruction_error(W, masked_only, X)


def test_split_packages():
    assert split_packages(list(range(10)), 4) == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert split_packages([1, 2], 4) == [[1], [2]]
    assert split_packages([], 4) == []


# --------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["dit", "sit"])
def test_structured_plan_compensates_and_surgery_keeps_the_function(family, calib):
    net = make_net(family)
    dense = surgery.measure(net)
    nocomp = copy.deepcopy(net)
    before = {k: v.clone() for k, v in net.net.state_dict().items()}
    budget = Budget("macs", 0.6)
    m = load("obs_diff", n_probes=8, steps=4)
    plan = m.plan(net, budget, calib)
    plan_nc = load("obs_diff_nocomp", n_probes=8, steps=4).plan(nocomp, budget, calib)
    assert not net.net.training
    x, t, y = net.example_inputs(3)
    x = torch.randn_like(x)
    pruned = surgery.apply(copy.deepcopy(net), plan)
    got = surgery.check_budget(dense, surgery.measure(pruned), budget, unit_share=0.10)
    x, t = as_float64(net, pruned, inputs=(x, t))  # different GEMM shapes: compare in float64
    with torch.no_grad():  # removed units' consumer columns are exactly 0: surgery changes nothing
        torch.testing.assert_close(pruned(x, t, y), net(x, t, y), **F64_TOL)
    assert got["keep_macs"] == pytest.approx(plan.meta["measured_keep"])
    after = net.net.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(k.endswith(("attn.proj.weight", "mlp.fc2.weight")) for k in changed)
    # the ablation keeps every surviving weight and only zeroes the removed columns
    for pos, blk in enumerate(nocomp.net.blocks):
        w0, w1 = before[f"blocks.{pos}.mlp.fc2.weight"], blk.mlp.fc2.weight
        zero = (w1 == 0).all(0)
        assert torch.equal(w1[:, ~zero], w0[:, ~zero])
    # compensation lowers each layer's weighted output error (same Hessians for the first package)
    first = plan.meta["packages"][0]
    for g in first:
        assert plan.meta["layers"][g]["rel_output_error"] <= plan_nc.meta["layers"][g]["rel_output_error"] + 1e-12
    assert plan.meta["timestep_weights"][0] == pytest.approx(1.2)


def test_packages_are_calibrated_with_the_earlier_ones_pruned(calib, monkeypatch):
    net = make_net("dit")
    seen = []
    real = od.trajectory_hessians

    def spy(net_, layers, *a, **kw):  # which consumer layers already have zeroed columns
        seen.append({p: int((l.weight == 0).all(0).sum()) for p, l in
                     ((f"blocks.{i}.mlp.fc2", b.mlp.fc2) for i, b in enumerate(net_.net.blocks))})
        return real(net_, layers, *a, **kw)

    monkeypatch.setattr(od, "trajectory_hessians", spy)
    plan = load("obs_diff", n_probes=4, steps=3, packages=4).plan(net, Budget("macs", 0.6), calib)
    assert len(plan.meta["packages"]) == 4 == len(seen)
    assert plan.meta["packages"][0] == ["blocks.0.attn.heads", "blocks.0.mlp.hidden"]
    assert seen[0]["blocks.0.mlp.fc2"] == 0
    assert seen[1]["blocks.0.mlp.fc2"] > 0 and seen[1]["blocks.1.mlp.fc2"] == 0   # package 1 already pruned
    assert seen[3]["blocks.2.mlp.fc2"] > 0 and seen[3]["blocks.3.mlp.fc2"] == 0


def test_mask_modes_refuse_a_cost_budget_and_zero_weights_at_budget_one(calib):
    net = make_net("dit")
    with pytest.raises(BenchError, match="no speedup"):
        load("obs_diff", mode="unstructured").plan(net, Budget("macs", 0.5), calib)
    plan = load("obs_diff", mode="nm", n_probes=4, steps=3).plan(net, Budget("macs", 1.0), calib)
    assert plan.meta["mask_only"] and plan.meta["target_sparsity"] == pytest.approx(0.5)
    w = net.net.blocks[0].mlp.fc1.weight
    assert ((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all()
    assert all(len(v) == len(net.width_groups()[k].dense_ids) for k, v in plan.keep.items())  # no unit removed


def test_bad_options_and_blocks_budget(calib):
    with pytest.raises(BenchError, match="weighting"):
        od.ObsDiff(weighting="cosine")
    with pytest.raises(BenchError, match="N:M"):
        od.ObsDiff(nm="2-4")
    with pytest.raises(BenchError, match="MACs or params"):
        load("obs_diff").plan(make_net("dit"), Budget("blocks", 0.5), calib)


# --------------------------------------------------------------------------------------------
# The run stores the rewritten weights and reloads them on resume
# --------------------------------------------------------------------------------------------

def test_run_stores_and_reloads_the_rewritten_weights(tiny_cfg, monkeypatch):
    from bench.results import run_relpath
    from bench.run import execute

    cfg = tiny_cfg("obs_diff", ["budget.measure=macs", "budget.keep=0.6", "method.n_probes=8", "method.steps=4"])
    first = execute(cfg)
    run_dir = Path(cfg["paths"]["results"]) / run_relpath(cfg)
    art = Path(cfg["paths"]["artifacts"]) / "runs" / run_relpath(cfg)
    plan = json.loads((run_dir / "plan.json").read_text())
    import hashlib
    assert plan["meta"]["weights_sha256"] == hashlib.sha256((art / "pruned.safetensors").read_bytes()).hexdigest()
    # resume from the plan: plan() must not run again, the stored weights give the same row
    import shutil
    for p in [run_dir / "row.json", art / "finetune" / "final.pt"]:
        p.unlink()
    shutil.rmtree(art / "samples")
    monkeypatch.setattr(od.ObsDiff, "plan", lambda *a, **k: pytest.fail("plan() ran again on resume"))
    second = execute(cfg)
    assert comparable(first) == comparable(second)
    # a tampered weights file is not trusted: the plan is moved aside and made again, same row
    (run_dir / "row.json").unlink()
    (art / "finetune" / "final.pt").unlink()
    data = bytearray((art / "pruned.safetensors").read_bytes())
    data[-1] ^= 1
    (art / "pruned.safetensors").write_bytes(bytes(data))
    monkeypatch.undo()
    third = execute(cfg)
    assert comparable(first) == comparable(third)
    moved = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [e["path"] for e in moved if e["event"] == "state_moved_aside"] == [str(run_dir / "plan.json")]
