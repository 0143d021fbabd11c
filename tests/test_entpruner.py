"""EntPruner: entropy estimators against closed forms, CED known answers, the adaptive schedule
(budget reached exactly, never overshot, log replays, exact resume), plots and the GPU script's
CPU smoke mode."""
from __future__ import annotations

import copy
import json
import math
from functools import partial

import pytest
import torch

from bench import surgery
from bench.api import BenchError, Budget
from bench.data import digits
from bench.models import build
from methods.entpruner import LOG_NAME, EntPruner, decision_steps, replay
from methods.entpruner import entropy as E
from methods.entpruner.schedule import combine, min_removals, proposals, removal_order, summarize, vote
from tests.conftest import make_net as _make_net

LOG_2PI_E = math.log(2 * math.pi) + 1


pytestmark = pytest.mark.usefixtures("one_thread")
make_net = partial(_make_net, seed_at=("build",))  # as this module always built them: seeded before build only
CALIB_N = 64  # calibration probes (conftest.calib)


@pytest.fixture(scope="module")
def data():
    return digits("train")


def with_cov(n: int, sigma: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """n samples whose maximum-likelihood covariance is exactly sigma (whitened, then coloured)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, sigma.shape[0], generator=g, dtype=torch.float64)
    z = z - z.mean(0)
    w = torch.linalg.cholesky(z.T @ z / n)
    z = torch.linalg.solve_triangular(w, z.T, upper=False).T  # now ML covariance = I
    return z @ torch.linalg.cholesky(sigma).T + 3.0


def spd(d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T + 0.5 * torch.eye(d, dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# Entropy estimators
# --------------------------------------------------------------------------------------------

def test_gaussian_entropy_full_and_diagonal_closed_forms():
    sigma = spd(4)
    z = with_cov(50, sigma)
    closed = 0.5 * 4 * LOG_2PI_E + 0.5 * float(torch.logdet(sigma))
    assert E.gaussian_entropy(z, shrinkage="none") == pytest.approx(closed, abs=1e-9)
    closed_diag = 0.5 * float(torch.log(2 * math.pi * math.e * torch.diagonal(sigma)).sum())
    assert E.gaussian_entropy(z, diagonal=True) == pytest.approx(closed_diag, abs=1e-9)


def test_gaussian_entropy_after_pca_projection():
    """Samples in a 3-dim subspace of R^10, fewer samples (8) than dimensions: projected on the
    top-3 principal directions, the entropy is the closed form of the 3x3 covariance."""
    sigma3 = spd(3, seed=1)
    coeff = with_cov(8, sigma3, seed=2) - 3.0
    q, _ = torch.linalg.qr(torch.randn(10, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    z = coeff @ q.T
    basis = E.pca_basis(z, 3)
    closed = 0.5 * 3 * LOG_2PI_E + 0.5 * float(torch.logdet(sigma3))
    assert E.gaussian_entropy(z @ basis, shrinkage="none") == pytest.approx(closed, abs=1e-9)


def test_gram_path_and_ledoit_wolf_match_dense_computation_and_sklearn():
    from sklearn.covariance import LedoitWolf

    g = torch.Generator().manual_seed(4)
    for n, d in [(12, 30), (40, 6)]:  # d > n (Gram path) and d < n
        z = torch.randn(n, d, generator=g, dtype=torch.float64) @ spd(d, seed=d)
        xc = z - z.mean(0)
        assert torch.allclose(E.covariance_eigenvalues(z), torch.linalg.eigvalsh(xc.T @ xc / n), atol=1e-9)
        lw = LedoitWolf().fit(z.numpy())
        ev, s = E.ledoit_wolf(z)
        assert s == pytest.approx(float(lw.shrinkage_), rel=1e-9)
        want = 0.5 * d * LOG_2PI_E + 0.5 * float(torch.logdet(torch.from_numpy(lw.covariance_)))
        assert E.gaussian_entropy(z) == pytest.approx(want, abs=1e-8)


def test_knn_entropy_against_the_gaussian_closed_form():
    """Kozachenko-Leonenko on 2,000 Gaussian samples in 3-D. Over 20 seeds its error here was
    -0.036 +- 0.030 nats (max 0.078; a small negative finite-sample bias from the tails), so
    0.15 nats is |bias| + ~4 standard deviations, about 3 % of H."""
    a = torch.tensor([[1.0, 0, 0], [0.5, 2.0, 0], [-0.3, 0.4, 0.7]], dtype=torch.float64)
    z = torch.randn(2000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) @ a.T
    closed = 0.5 * 3 * LOG_2PI_E + 0.5 * float(torch.logdet(a @ a.T))
    assert E.knn_entropy(z, k=3) == pytest.approx(closed, abs=0.15)
    with pytest.raises(BenchError):
        E.knn_entropy(z[:3], k=3)


# --------------------------------------------------------------------------------------------
# CED known answers
# --------------------------------------------------------------------------------------------

def make_identity(net, i: int):
    with torch.no_grad():
        net.net.blocks[i].adaLN_modulation[-1].weight.zero_()
        net.net.blocks[i].adaLN_modulation[-1].bias.zero_()


@pytest.mark.parametrize("family", ["dit", "sit"])
@pytest.mark.parametrize("over", [{}, {"estimator": "diagonal"}, {"estimator": "knn"}, {"condition": "pooled"},
                                  {"reduce": "per_group_abs", "pca": "off"}, {"outputs": "x0"}, {"condition": "bin"}])
def test_identity_block_has_zero_ced_and_goes_first(family, over, calib):
    net = make_net(family)
    make_identity(net, 1)
    plan = EntPruner(schedule="oneshot", **over).plan(net, Budget("blocks", 0.75), calib)
    ced = plan.scores["blocks"]
    assert ced[1] == 0.0 and min(ced[i] for i in (0, 2, 3)) > 1e-3, ced
    assert removal_order(ced)[0] == 1 and plan.keep["blocks"] == [0, 2, 3]
    assert all(row[1] == 0.0 for row in plan.meta["scores_per_bin"])


@pytest.mark.parametrize("family", ["dit", "sit"])
def test_x0_outputs_invert_the_process(family):
    """outputs=x0: a perfect prediction (DDPM: the true noise; flow: the velocity x0 - noise) gives
    back the clean probe exactly, at every noise level."""
    from methods.entpruner.ced import x0_from_prediction

    net = make_net(family)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(6, 1, 8, 8, generator=g) * 2 - 1, torch.randn(6, 1, 8, 8, generator=g)
    u = torch.tensor([0.0, 0.1, 0.4, 0.7, 0.9, 0.99])
    x_t, _ = net.noisy(x0, u, noise)
    pred = noise if family == "dit" else x0 - noise
    assert torch.allclose(x0_from_prediction(net, x_t, u, pred), x0, atol=1e-4)


def test_identity_block_on_final_samples(calib):
    net = make_net("dit")
    make_identity(net, 2)
    r = EntPruner(outputs="samples", sample_steps=2).ced(net, calib)
    assert r["ced"][2] == 0.0 and min(r["ced"]) == 0.0 and max(r["ced"]) > 0 and r["ced_per_bin"] is None


@pytest.mark.parametrize("family", ["dit", "sit"])
@pytest.mark.parametrize("over", [{}, {"estimator": "diagonal"}, {"estimator": "knn"}])
def test_block_whose_removal_collapses_the_output_has_the_largest_ced(family, over, calib):
    """A huge constant residual stream (pos_embed x 1e4) makes every LayerNorm see the same
    tokens, so the output is nearly the same for every probe, except for what block 2 writes with
    its gates x 1e5. Bypassing block 2 collapses the output distribution."""
    net = make_net(family)
    with torch.no_grad():
        net.net.pos_embed.mul_(1e4)
        ada = net.net.blocks[2].adaLN_modulation[-1]
        d = ada.weight.shape[1]
        for j in (2, 5):  # the gate_msa and gate_mlp chunks of the modulation
            ada.weight[j * d:(j + 1) * d].mul_(1e5)
            ada.bias[j * d:(j + 1) * d].mul_(1e5)
    plan = EntPruner(schedule="oneshot", **over).plan(net, Budget("blocks", 0.25), calib)
    ced = plan.scores["blocks"]
    assert max(range(4), key=ced.__getitem__) == 2 and ced[2] > 1.0 and ced[2] > 100 * max(ced[0], ced[1], ced[3])
    assert plan.keep["blocks"] == [2]
    assert plan.meta["entropy_ablated"][2] < plan.meta["entropy_full"]  # removal lowers the entropy


def test_needs_bypassable_units_and_valid_options(calib):
    net = make_net("dit")
    empty = copy.deepcopy(net)
    empty.net.blocks = torch.nn.ModuleList()  # nothing to bypass: no blocks, no U-Net operators
    with pytest.raises(BenchError, match="bypass one at a time"):
        EntPruner().ced(empty, calib)
    with pytest.raises(BenchError, match="MACs or params"):
        EntPruner(schedule="oneshot").plan(unet_net(), Budget("blocks", 0.5), calib)
    fresh = build("DiT-T/2", input_size=8, in_channels=1, num_classes=10)  # adaLN-Zero: the output is 0
    with pytest.raises(BenchError, match="do not vary"):
        EntPruner().ced(fresh, calib)
    for bad in ({"estimator": "vonneumann"}, {"schedule": "gradual"}, {"pca": -1}, {"k_max": 0},
                {"vote_weights": {"ntk": 0, "zico": 0}}, {"vote_weights": {"snip": 1.0}}, {"pace": "sometimes"},
                {"vote_rule": "majority"}, {"combine": "median"}, {"outputs": "eps"}, {"condition": "time"}):
        with pytest.raises(BenchError):
            EntPruner(**bad)


# --------------------------------------------------------------------------------------------
# The adaptive schedule
# --------------------------------------------------------------------------------------------

def test_decision_steps_and_vote():
    assert decision_steps(150, 25, 2 / 3, 4, 2) == [24, 49, 74, 99]  # the default: done by step 100
    assert decision_steps(4, 25, 2 / 3, 2, 2) == [1]                  # test_run's tiny run
    assert decision_steps(6, 25, 2 / 3, 5, 1) == [0, 1, 2, 3]         # too short: every step, last one forced
    assert decision_steps(150, 25, 2 / 3, 0, 2) == []
    cands = [{"k": k, "goodness": {"ntk": ntk, "zico": z}} for k, ntk, z in [(0, -5.0, 1.0), (1, -4.0, 0.5), (2, -6.0, 2.0)]]
    # proposals (the default): NTK rates k=1 best, ZiCo k=2; mean 1.5 rounds half down to 1
    assert proposals(cands) == {"ntk": 1, "zico": 2}
    assert [combine({"ntk": 1, "zico": 2}, {"ntk": 1, "zico": 1}, how) for how in ("mean", "min", "max")] == [1, 1, 2]
    assert combine({"ntk": 0, "zico": 1}, {"ntk": 1, "zico": 1}) == 0     # half the weight is no majority
    assert combine({"ntk": 0, "zico": 2}, {"ntk": 1, "zico": 1}) == 1     # NTK worse at every k, ZiCo better: 1
    assert combine({"ntk": 0, "zico": 2}, {"ntk": 1, "zico": 3}) == 1     # (0 * 1 + 2 * 3) / 4 = 1.5 -> 1
    assert combine({"ntk": 0, "zico": 2}, {"ntk": 1, "zico": 4}) == 2     # (0 + 8) / 5 = 1.6 -> 2
    assert combine({"ntk": 0, "zico": 2}, {"ntk": 0, "zico": 1}) == 2     # a zero weight abstains
    assert proposals(cands, tolerance=0.25)["ntk"] == 1 and proposals(cands, tolerance=0.6)["ntk"] == 2
    assert vote(copy.deepcopy(cands), {"ntk": 1, "zico": 1}, 1.0, 0.0) == 0    # nobody approves k=1 and k=2 both
    assert vote(copy.deepcopy(cands), {"ntk": 1, "zico": 1}, 0.5, 0.0) == 2    # one approval is enough
    assert vote(copy.deepcopy(cands), {"ntk": 3, "zico": 1}, 0.5, 0.0) == 1    # NTK outweighs ZiCo
    assert vote(copy.deepcopy(cands), {"ntk": 1, "zico": 1}, 1.0, 0.6) == 2    # 60 % slack: all approve
    # the pace (R12): even spreads 4 removals over 3 decisions as 2, 1, 1; latest waits until forced
    assert [min_removals("even", r, left, 2) for r, left in [(4, 2), (2, 1), (1, 0)]] == [2, 1, 1]
    assert [min_removals("latest", r, left, 2) for r, left in [(4, 2), (4, 1), (2, 0)]] == [0, 2, 2]


def run_adaptive(data, calib, run_dir, budget, steps=12, abort_at=None, ckpt_every=4, **over):
    """Fine-tune a tiny DiT with the adaptive schedule; returns (net, depth seen at every step)."""
    from bench.finetune import FinetuneConfig, finetune

    net = make_net("dit")
    net.net.train()
    method = EntPruner(**{"period": 2, "k_max": 1, "proxy_batch": 8, **over})
    inner = method.callback(budget, calib)
    seen = []

    class Spy:  # records the depth the loop hands over, and can simulate a kill after a step
        def on_start(self, n, total, rd):
            inner.on_start(n, total, rd)

        def on_step(self, step, n, loss):
            seen.append(len(n.kept_blocks))
            out = inner.on_step(step, n, loss)
            if step == abort_at:
                raise KeyboardInterrupt
            return out

        state_dict, load_state_dict, LOG_NAME = inner.state_dict, inner.load_state_dict, inner.LOG_NAME

    cfg = FinetuneConfig(steps=steps, batch=8, lr=1e-3, ckpt_every=ckpt_every, log_every=100)
    net = finetune(net, data, cfg, run_dir / "ckpt", seed=0, callback=Spy(), run_dir=run_dir)
    seen.append(len(net.kept_blocks))
    return net, seen


@pytest.fixture(scope="module")
def adaptive(data, calib, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("adaptive")
    net, seen = run_adaptive(data, calib, run_dir, Budget("blocks", 0.5))
    return net, seen, run_dir


def test_adaptive_reaches_the_block_budget_exactly_and_replays(adaptive):
    net, seen, run_dir = adaptive
    assert min(seen) == 2 and seen[-1] == 2 and seen[0] == 4  # never below the target, ends on it
    assert all(a >= b for a, b in zip(seen, seen[1:]))        # depth only goes down
    log = [json.loads(line) for line in (run_dir / LOG_NAME).read_text().splitlines()]
    assert log[0]["event"] == "start" and log[0]["target"] == 2 and log[0]["decision_steps"] == [1, 3, 5, 7]
    decisions = log[1:]
    assert decisions and all(d["step"] < 8 for d in decisions)  # done by 2/3 of the 12 steps
    for d in decisions:
        assert {"step", "candidates", "voted_k", "chosen_k", "forced", "ced", "removed"} <= set(d)
        assert all({"ntk_cond", "zico", "approve", "support"} <= set(c) for c in d["candidates"])
        assert len(d["removed"]) == d["chosen_k"] <= d["remaining"]
    assert replay(run_dir / LOG_NAME).keep["blocks"] == net.kept_blocks


def test_replay_rederives_every_decision(adaptive, tmp_path):
    """replay() recomputes each choice from the logged CED and proxy values: a log whose choice does
    not follow from them (here: a proxy value edited so the vote comes out differently, or a removal
    swapped) is refused."""
    _, _, run_dir = adaptive
    lines = [json.loads(line) for line in (run_dir / LOG_NAME).read_text().splitlines()]
    d = max(i for i, r in enumerate(lines) if r["event"] == "decision" and r["chosen_k"] > 0)  # the last one
    swapped = copy.deepcopy(lines)
    rec = swapped[d]
    other = next(b for b in rec["kept_before"] if b not in rec["removed"])
    rec["removed"] = sorted(rec["removed"][1:] + [other])
    bad = tmp_path / "swapped.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in swapped))
    with pytest.raises(BenchError, match="does not follow"):
        replay(bad)
    assert replay(bad, verify=False).keep != replay(run_dir / LOG_NAME).keep  # only the check catches it
    voted = copy.deepcopy(lines)
    rec = voted[d]
    for c in rec["candidates"][1:]:  # every proxy now says "much better": the vote would take k_top
        c["goodness"] = {p: v + 1e6 for p, v in c["goodness"].items()}
    if rec["candidates"][-1]["k"] != rec["voted_k"]:
        bad.write_text("".join(json.dumps(r) + "\n" for r in voted))
        with pytest.raises(BenchError, match="(does|do) not follow"):  # the proposals or the choice
            replay(bad)


def test_even_pace_prunes_progressively_when_the_vote_never_passes(data, calib, tmp_path):
    """Approval rule (version 2) with quorum > 1: no vote passes. pace=even still removes an equal share at every decision (4 blocks
    to 2 over decisions at steps 1, 3, 5, 7: one at each of the first two), pace=latest waits and
    removes at the last decisions only."""
    net, seen = run_adaptive(data, calib, tmp_path / "even", Budget("blocks", 0.5), quorum=1.5, k_max=1,
                             vote_rule="approval")
    log = [json.loads(line) for line in (tmp_path / "even" / LOG_NAME).read_text().splitlines()][1:]
    assert [len(d["removed"]) for d in log] == [1, 1] and [d["step"] for d in log] == [1, 3]
    assert seen[-1] == 2 and all(d["voted_k"] == 0 and d["forced"] and d["cause"] == "pace" for d in log)
    net, seen = run_adaptive(data, calib, tmp_path / "late", Budget("blocks", 0.5), quorum=1.5, k_max=1,
                             pace="latest", vote_rule="approval")
    log = [json.loads(line) for line in (tmp_path / "late" / LOG_NAME).read_text().splitlines()][1:]
    assert [(d["step"], len(d["removed"])) for d in log] == [(1, 0), (3, 0), (5, 1), (7, 1)]
    assert seen[-1] == 2
    assert replay(tmp_path / "late" / LOG_NAME).keep["blocks"] == net.kept_blocks


def test_adaptive_reaches_a_macs_budget_with_forced_removals(data, calib, tmp_path):
    budget = Budget("macs", 0.6)
    target = surgery.blocks_to_keep(make_net("dit"), budget)
    # quorum above 1: no vote ever passes, so every removal is forced by the deadline rule
    net, seen, = run_adaptive(data, calib, tmp_path, budget, steps=6, quorum=1.5, pace="latest", vote_rule="approval")
    assert seen[-1] == target and min(seen) == target
    log = [json.loads(line) for line in (tmp_path / LOG_NAME).read_text().splitlines()][1:]
    assert all(d["voted_k"] == 0 for d in log) and any(d["forced"] for d in log)
    assert replay(tmp_path / LOG_NAME).keep["blocks"] == net.kept_blocks


def test_adaptive_resume_after_a_kill_is_exact(adaptive, data, calib, tmp_path):
    """Kill after step 3 (checkpoint at step 2, decision at step 3 already logged), resume:
    same decisions, same final structure and bit-identical weights as the uninterrupted run."""
    ref_net, _, ref_dir = adaptive
    with pytest.raises(KeyboardInterrupt):
        run_adaptive(data, calib, tmp_path, Budget("blocks", 0.5), abort_at=3, ckpt_every=2)
    assert any(json.loads(line).get("step") == 3 for line in (tmp_path / LOG_NAME).read_text().splitlines())
    net, _ = run_adaptive(data, calib, tmp_path, Budget("blocks", 0.5), ckpt_every=2)
    assert net.kept_blocks == ref_net.kept_blocks
    for k, v in ref_net.net.state_dict().items():
        assert torch.equal(v, net.net.state_dict()[k]), k
    strip = lambda p: [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in p.read_text().splitlines()]
    assert strip(tmp_path / LOG_NAME) == strip(ref_dir / LOG_NAME)
    assert replay(tmp_path / LOG_NAME).keep == replay(ref_dir / LOG_NAME).keep == {"blocks": net.kept_blocks}


def test_a_finished_fine_tune_writes_back_a_lost_decision_log(adaptive, data, calib, tmp_path):
    """The run folder is gone (deleted, or not carried to the machine that holds the artifacts) but the
    final weights are there: the fine-tune is not redone and the decision log comes back, equal."""
    import shutil

    from bench.finetune import FinetuneConfig, finetune

    ref_net, _, ref_dir = adaptive
    shutil.copytree(ref_dir / "ckpt", tmp_path / "ckpt")  # the artifacts survive; the log does not
    cb = EntPruner(period=2, k_max=1, proxy_batch=8).callback(Budget("blocks", 0.5), calib)
    cfg = FinetuneConfig(steps=12, batch=8, lr=1e-3, ckpt_every=4, log_every=100)
    net = finetune(make_net("dit"), data, cfg, tmp_path / "ckpt", seed=0, callback=cb, run_dir=tmp_path)
    assert net.kept_blocks == ref_net.kept_blocks and cb.state["history"] == []  # nothing was redone
    assert (tmp_path / LOG_NAME).read_text() == (ref_dir / LOG_NAME).read_text()
    assert replay(tmp_path / LOG_NAME).keep == {"blocks": net.kept_blocks}


def test_adaptive_needs_fine_tune_steps(calib):
    cb = EntPruner().callback(Budget("blocks", 0.5), calib)
    with pytest.raises(BenchError, match="entpruner_oneshot"):
        cb.on_start(make_net("dit"), 0, None)
    assert EntPruner(schedule="oneshot").callback(Budget("blocks", 0.5), calib) is None


class ScriptedProxies:
    """Stands in for AdaptiveSchedule.proxies: hands out (NTK kappa, ZiCo, ZiCo's layers) from a
    script, one per candidate, in the order the schedule evaluates them (k = 0, 1, ... per decision)."""

    def __init__(self, script):
        self.values = [v for decision in script for v in decision]

    def __call__(self, net):
        return self.values.pop(0)


# each decision's (kappa, ZiCo, layers) for k = 0 and k = 1 (4 blocks, 2 go; goodness: -log kappa, ZiCo/layer)
NO = [(100.0, 40.0, 4), (130.0, 27.0, 3)]     # both proxies rate dropping a block worse: K = 0, 0
YES = [(100.0, 40.0, 4), (90.0, 33.0, 3)]     # both rate it better (kappa 90 < 100, ZiCo 11 > 10): K = 1, 1
SPLIT = [(100.0, 40.0, 4), (130.0, 33.0, 3)]  # NTK: worse (K_kappa 0), ZiCo: better (K_ZiCo 1): mean 0.5 -> 0


def scripted_run(calib, run_dir, script, **over):
    """The adaptive schedule's decisions on a tiny DiT (4 blocks -> 2 at decision steps 1, 3, 5, 7)
    with the proxies' values from `script`; the real CED chooses which blocks."""
    net = make_net("dit")
    method = EntPruner(**{"period": 2, "k_max": 1, "pace": "latest", **over})
    sched = method.callback(Budget("blocks", 0.5), calib)
    sched.proxies = ScriptedProxies(script)
    sched.on_start(net, 12, run_dir)
    for step in sched.state["steps"]:
        plan = sched.on_step(step, net, 0.1)
        if plan is not None:
            surgery.apply(net, plan)
    assert sched.proxies.values == []  # every scripted value was used
    return net, [json.loads(line) for line in (run_dir / LOG_NAME).read_text().splitlines()][1:]


def test_the_vote_fires_when_both_proxies_propose_a_removal_and_only_then(calib, tmp_path, capsys):
    """A scripted proxy sequence through the real schedule (pace=latest, so the pace forces only
    the last removal): NO -> nothing removed, YES -> the vote removes one block (an adaptive
    decision), SPLIT -> one proxy is no majority, last decision -> the pace forces the second block.
    The approval rule (version 2) decides the same on this script; summarize and its CLI count it."""
    from methods.entpruner.schedule import main

    net, log = scripted_run(calib, tmp_path / "p", [NO, YES, SPLIT, NO])
    assert [d["proposals"] for d in log] == [{"ntk": 0, "zico": 0}, {"ntk": 1, "zico": 1}, {"ntk": 0, "zico": 1},
                                             {"ntk": 0, "zico": 0}]
    assert [(d["voted_k"], d["chosen_k"], d["cause"]) for d in log] == [(0, 0, "none"), (1, 1, "vote"),
                                                                         (0, 0, "none"), (0, 1, "pace")]
    assert [d["by_vote"] for d in log] == [0, 1, 0, 0] and [d["by_pace"] for d in log] == [0, 0, 0, 1]
    assert len(net.kept_blocks) == 2 and replay(tmp_path / "p" / LOG_NAME).keep["blocks"] == net.kept_blocks
    s = summarize(tmp_path / "p" / LOG_NAME)
    assert (s["adaptive"], s["decisions"], s["paced"], s["idle"], s["removed_by_vote"], s["removed"]) == (1, 4, 1, 2, 1, 2)
    assert main([str(tmp_path / "p" / LOG_NAME)]) == 0  # a log named on its own: read as it is
    assert "adaptive decisions: 1 of 4 (paced 1, idle 2); blocks removed by the vote 1 of 2" in capsys.readouterr().out
    # a folder: finished runs only (row.json), never an unfinished run or one set aside in a hidden folder
    runs = tmp_path / "runs"
    for d in ("m/done", "m/cut", ".m.teacher-0123456789ab/done"):
        (runs / d).mkdir(parents=True)
        (runs / d / LOG_NAME).write_text((tmp_path / "p" / LOG_NAME).read_text())
    (runs / "m/done/row.json").write_text("{}")
    (runs / ".m.teacher-0123456789ab/done/row.json").write_text("{}")
    assert main([str(runs)]) == 0
    out = capsys.readouterr().out
    assert out.count("adaptive decisions: 1 of 4") == 1 and "m/done" in out and "total over" not in out
    assert "left out: 1 unfinished (no row.json), 1 set aside (a hidden folder: another teacher's)" in out
    assert main([str(runs / "m/cut")]) == 2  # nothing finished there
    # combine=max: one proxy is enough, so SPLIT removes the second block by vote and nothing is forced
    _, log = scripted_run(calib, tmp_path / "max", [NO, YES, SPLIT], combine="max")
    assert [d["cause"] for d in log] == ["none", "vote", "vote"]
    # approval rule: SPLIT is no approval by both (quorum 1.0) -> the same as the default here
    _, log = scripted_run(calib, tmp_path / "a", [NO, YES, SPLIT, NO], vote_rule="approval")
    assert [d["cause"] for d in log] == ["none", "vote", "none", "pace"] and all(d["proposals"] is None for d in log)
    # the digits logs' pattern (version 2): NTK worse at every candidate, ZiCo per layer better: the
    # approval rule never fires, the proposals' mean (0 and k_max = 2 -> 1) does
    worse_ntk = [(100.0, 40.0, 4), (110.0, 33.0, 3), (125.0, 26.0, 2)]
    _, log = scripted_run(calib, tmp_path / "k2", [worse_ntk, NO, NO, NO], k_max=2)
    assert log[0]["proposals"] == {"ntk": 0, "zico": 2} and log[0]["voted_k"] == 1 and log[0]["approval_k"] == 0


def test_replay_refuses_a_log_whose_proposals_do_not_follow(calib, tmp_path):
    scripted_run(calib, tmp_path, [NO, YES, SPLIT, NO])
    lines = (tmp_path / LOG_NAME).read_text().splitlines()
    rec = json.loads(lines[2])
    rec["proposals"] = {"ntk": 1, "zico": 0}
    lines[2] = json.dumps(rec)
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(BenchError, match="proposals .* do not follow"):
        replay(tmp_path / "bad.jsonl")


# --------------------------------------------------------------------------------------------
# The U-Net extension (R14): CED over the operators whose skip structure allows a bypass
# --------------------------------------------------------------------------------------------

def unet_net(seed: int = 0):
    """The tiny diffusers U-Net of the unit tests (3 bypassable ResNet blocks, 4 attentions), with
    its zero-initialised output convolutions redrawn so every operator does something."""
    from omegaconf import OmegaConf
    from pathlib import Path

    torch.manual_seed(seed)
    cfg = OmegaConf.to_container(OmegaConf.load(Path(__file__).resolve().parent.parent / "bench/conf/model/unet_tiny.yaml"),
                                 resolve=True)
    net = build(**cfg)
    with torch.no_grad():
        for name, p in net.net.named_parameters():
            if p.ndim >= 2 and float(p.abs().max()) == 0.0:
                p.normal_(0.0, 0.2)
    net.net.eval()
    return net


def make_unet_identity(net, label: str):
    """An operator whose branch writes exactly zero: a ResNet block with conv2 = 0 (output = input
    + 0), an attention with to_out = 0 (output = input + 0)."""
    from methods.entpruner import units as U

    g, i = label.split(":")
    m = net.net._operator(g, int(i))
    lin = m.conv2 if g == "resnets" else m.to_out[0]
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
    assert label in U.labels(net)


@pytest.mark.parametrize("label", ["resnets:1", "attentions:2"])
def test_unet_identity_operator_has_zero_ced_and_goes_first(label, calib):
    net = unet_net()
    make_unet_identity(net, label)
    r = EntPruner(schedule="oneshot").ced(net, calib)
    assert r["units"] == ["attentions:0", "attentions:1", "attentions:2", "attentions:3",
                          "resnets:0", "resnets:1", "resnets:2"]
    ced = dict(zip(r["units"], r["ced"]))
    assert ced[label] == 0.0 and min(v for k, v in ced.items() if k != label) > 1e-4, ced
    assert r["units"][removal_order(r["ced"])[0]] == label


def test_unet_oneshot_meets_a_macs_budget_and_replays(calib):
    net = unet_net()
    make_unet_identity(net, "resnets:0")
    budget = Budget("macs", 0.8)
    plan = EntPruner(schedule="oneshot").plan(net, budget, calib)
    assert plan.granularity == "operator" and plan.meta["removed"][0] == "resnets:0"
    assert set(plan.keep) == {"ops.attentions", "ops.resnets"} and 0 not in plan.keep["ops.resnets"]
    assert set(plan.scores) == {"attentions", "resnets"} and plan.scores["resnets"][0] == 0.0
    dense = surgery.measure(net)
    pruned = surgery.apply(copy.deepcopy(net), plan)
    keep = surgery.check_budget(dense, surgery.measure(pruned), budget, unit_share=plan.meta["unit_share"])
    assert keep["keep_macs"] <= 0.8
    fresh = surgery.apply(unet_net(), type(plan).from_json(plan.to_json()))
    x, t, y = net.example_inputs(2)
    with torch.no_grad():
        assert torch.equal(surgery.apply(copy.deepcopy(net), type(plan).from_json(plan.to_json())).net(x, t, y),
                           pruned.net(x, t, y))
    assert sum(p.numel() for p in fresh.net.parameters()) == sum(p.numel() for p in pruned.net.parameters())


def test_unet_adaptive_reaches_the_macs_budget_and_replays(data, calib, tmp_path):
    from bench.finetune import FinetuneConfig, finetune
    from methods.entpruner import units as U

    net = unet_net()
    budget = Budget("macs", 0.85)  # about 3 of the 7 operators (a ResNet block ~7 %, an attention ~2 % of the MACs)
    method = EntPruner(period=2, k_max=1, proxy_batch=8)
    plan = method.plan(net, budget, calib)
    assert plan.keep["ops.resnets"] == [0, 1, 2] and 0 < plan.meta["unit_share"] < 0.5  # starts dense
    dense = surgery.measure(net)
    net.net.train()
    cfg = FinetuneConfig(steps=12, batch=8, lr=1e-3, ckpt_every=4, log_every=100)
    net = finetune(net, data, cfg, tmp_path / "ckpt", seed=0, callback=method.callback(budget, calib), run_dir=tmp_path)
    keep = surgery.check_budget(dense, surgery.measure(net), budget, unit_share=plan.meta["unit_share"])
    assert keep["keep_macs"] <= 0.85
    log = [json.loads(line) for line in (tmp_path / LOG_NAME).read_text().splitlines()]
    assert log[0]["kind"] == "operators" and all(d["step"] < 8 for d in log[1:])
    assert 2 <= sum(len(d["removed"]) for d in log[1:]) < 7 and all(":" in s for d in log[1:] for s in d["removed"])
    final = replay(tmp_path / LOG_NAME)
    assert final.granularity == "operator" and U.labels(net) == [s for s in log[0]["start_kept"]
                                                                  if s not in {r for d in log[1:] for r in d["removed"]}]
    x, t, y = net.example_inputs(2)
    rebuilt = surgery.apply(unet_net(), final)
    assert U.labels(rebuilt) == U.labels(net)


# --------------------------------------------------------------------------------------------
# Plots and the GPU timing script (CPU smoke)
# --------------------------------------------------------------------------------------------

def test_plots_write_files(adaptive, calib, tmp_path):
    from methods.plots import plot_ced, plot_depth

    _, _, run_dir = adaptive
    plan = EntPruner(schedule="oneshot").plan(make_net("dit"), Budget("blocks", 0.5), calib)
    for out in (plot_ced(plan, tmp_path / "ced.png"), plot_ced(plan.scores["blocks"], tmp_path / "bar.png"),
                plot_depth(run_dir / LOG_NAME, tmp_path / "depth.png")):
        assert out.stat().st_size > 2000 and out.read_bytes()[:4] == b"\x89PNG"


def test_gpu_timing_script_smoke(tmp_path):
    from bench.gpu.entpruner_ced_timing import main

    res = main(["--smoke", "--out", str(tmp_path)])
    assert res["blocks"] == 4 and res["forwards"] == 5 * 2
    assert len(res["runs"]) == 1 and res["runs"][0]["seconds"] > 0 and len(res["runs"][0]["ced"]) == 4
    assert min(res["runs"][0]["ced"]) > 0  # randomised gates: no block is an identity
    assert json.loads((tmp_path / "entpruner_ced_timing.json").read_text())["blocks"] == 4
    assert any(line.startswith("| fp32 ") for line in (tmp_path / "entpruner_ced_timing.md").read_text().splitlines())
