"""TinyFusion (methods.tinyfusion): N:M groups, the learned decision (an exact-identity block is the
one its group drops), no trace on the model, priors from other scorers, masked KD recovery."""
from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
import torch.nn as nn

from bench import surgery
from bench.api import BenchError, Budget, Plan
from bench.data import Calib, TensorDataset, digits
from methods.tinyfusion import MaskedKD, TinyFusion
from methods.tinyfusion.kd import masked_mse
from methods.tinyfusion.learn import candidates, make_groups
from tests.conftest import fit_to_calib, make_net as _make_net

FAST = dict(steps=60, batch=16, lora_rank=4, lora_alpha=8.0)


pytestmark = pytest.mark.usefixtures("one_thread")
make_net = partial(_make_net, seed_at=("build",))  # as this module always built them: seeded before build only
CALIB_N = 64  # calibration probes (conftest.calib)


@pytest.fixture(scope="module")
def trained(calib):
    """Tiny models fitted to the calibration loss (every block useful, as in test_methods)."""
    return {f: fit_to_calib(make_net(f), calib) for f in ("dit", "sit")}


def make_identity(net, i):
    with torch.no_grad():  # both adaLN gates 0: the block returns its input exactly
        net.net.blocks[i].adaLN_modulation[-1].weight.zero_()
        net.net.blocks[i].adaLN_modulation[-1].bias.zero_()


def test_groups_and_candidates():
    assert make_groups(8, 2, 4) == [([0, 1], 1), ([2, 3], 1), ([4, 5], 1), ([6, 7], 1)]      # 1:2
    assert make_groups(8, 4, 4) == [([0, 1, 2, 3], 2), ([4, 5, 6, 7], 2)]                    # 2:4
    g = make_groups(8, 2, 6)
    assert [n for _, n in g] == [1, 2, 1, 2] and sum(n for _, n in g) == 6                 # remainder spread
    assert sum(n for _, n in make_groups(7, 2, 3)) == 3 and make_groups(7, 2, 3)[-1][0] == [6]
    assert make_groups(4, 2, 1) in ([([0, 1], 1), ([2, 3], 0)], [([0, 1], 0), ([2, 3], 1)])
    c = candidates(4, 2)
    assert c.shape == (6, 4) and torch.equal(c.sum(1), torch.full((6,), 2.0)) and len({tuple(r) for r in c.tolist()}) == 6
    assert candidates(3, 0).shape == (1, 3) and candidates(2, 2).tolist() == [[1.0, 1.0]]


@pytest.mark.parametrize("family", ["dit", "sit"])
@pytest.mark.parametrize("identity", [1, 2])
def test_learned_decision_drops_the_identity_block(family, identity, trained, calib):
    """Groups {0, 1} and {2, 3} at 1:2: the group holding the identity block drops exactly it."""
    net = copy.deepcopy(trained[family])
    make_identity(net, identity)
    plan = TinyFusion(**FAST).plan(net, Budget("blocks", 0.5), calib)
    assert identity not in plan.keep["blocks"]
    partner = identity ^ 1
    assert partner in plan.keep["blocks"], plan.meta["ema_logits"]
    assert len(plan.keep["blocks"]) == 2 and plan.scores["blocks"][identity] < 0.5


def test_plan_leaves_no_trace_and_is_seeded(trained, calib):
    net = copy.deepcopy(trained["dit"])
    net.net.train()
    before = {k: v.clone() for k, v in net.net.state_dict().items()}
    flags = [p.requires_grad for p in net.net.parameters()]
    a = TinyFusion(**FAST, seed=3).plan(net, Budget("blocks", 0.5), calib)
    assert net.net.training and flags == [p.requires_grad for p in net.net.parameters()]
    for k, v in net.net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(not m._forward_hooks for m in net.net.modules() if isinstance(m, nn.Linear))  # LoRA discarded
    b = TinyFusion(**FAST, seed=3).plan(net, Budget("blocks", 0.5), calib)
    a.meta.pop("seconds"), b.meta.pop("seconds")
    assert a == b
    assert Plan.from_json(a.to_json()) == a


@pytest.mark.parametrize("update", ["full", "frozen"])
def test_other_update_modes(update, trained, calib):
    net = copy.deepcopy(trained["dit"])
    make_identity(net, 3)
    before = {k: v.clone() for k, v in net.net.state_dict().items()}
    plan = TinyFusion(**FAST, update=update).plan(net, Budget("blocks", 0.5), calib)
    assert 3 not in plan.keep["blocks"] and 2 in plan.keep["blocks"]
    assert all(torch.equal(v, before[k]) for k, v in net.net.state_dict().items())


def test_prior_from_another_scorer_sets_the_start(calib):
    """With no learning steps the decision is the prior: block magnitude, one block scaled up per group."""
    net = make_net("dit")
    with torch.no_grad():
        for i in (1, 2):
            for p in net.net.blocks[i].parameters():
                p.mul_(3.0)
    plan = TinyFusion(steps=0, prior="magnitude").plan(net, Budget("blocks", 0.5), calib)
    assert plan.keep["blocks"] == [1, 2] and len(plan.meta["prior_scores"]) == 4
    plan = TinyFusion(steps=0).plan(net, Budget("blocks", 0.5), calib)  # no prior: ties, the first candidate
    assert plan.keep["blocks"] == [0, 2]


def test_budgets_in_macs_and_params_and_two_four_groups(trained, calib):
    net = trained["dit"]
    for budget in (Budget("macs", 0.6), Budget("params", 0.6), Budget("blocks", 0.75)):
        plan = TinyFusion(**{**FAST, "steps": 10}).plan(net, budget, calib)
        assert len(plan.keep["blocks"]) == surgery.blocks_to_keep(net, budget)
        pruned = surgery.apply(copy.deepcopy(net), plan)
        dense = surgery.measure(net)
        assert surgery.check_budget(dense, surgery.measure(pruned), budget)[f"keep_{budget.measure}"] <= budget.keep
    plan = TinyFusion(**{**FAST, "steps": 10}, group_size=4).plan(net, Budget("blocks", 0.5), calib)
    assert len(plan.meta["candidates"]) == 1 and len(plan.meta["candidates"][0]) == 6  # one 2:4 group


def test_masked_mse_ignores_outliers():
    s = torch.zeros(2, 16, 8)
    t = torch.zeros(2, 16, 8)
    t[0, 3, 5] = 1000.0  # a massive activation of the teacher: outside its 2-sigma band
    assert masked_mse(s, t, 2.0) == 0.0
    t[1] += 0.1 * torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    assert masked_mse(s, t, 2.0) > 0


def test_layer_maps():
    kd = MaskedKD(group_size=2)
    assert kd.layer_map([1, 3, 5, 7], 8) == [1, 3, 5, 7]
    assert kd.layer_map([0, 2, 5, 6], 8) == [1, 3, 5, 7]  # 1:2: student i <-> teacher 2i+1
    assert MaskedKD(group_size=4).layer_map([0, 2, 5, 6], 8) == [0, 3, 5, 7]
    assert MaskedKD(group_size=2, rep_map="same_block").layer_map([0, 2, 5, 6], 8) == [0, 2, 5, 6]


@pytest.mark.parametrize("family", ["dit", "sit"])
def test_masked_kd_loss(family, trained):
    teacher = copy.deepcopy(trained[family])
    student = surgery.apply(copy.deepcopy(teacher), Plan("block", {"blocks": [0, 3]}))
    student.net.train()
    x0, y = digits("train").get(torch.arange(16))
    # alpha = 0, beta = 0: exactly the student's own training loss on the same draws
    draws = lambda: student.draws(x0.shape, torch.Generator().manual_seed(0))  # noqa: E731
    plain = MaskedKD(2, alpha=0.0, beta=0.0).loss(student, x0, y, draws(), teacher)
    own = student.loss(x0, y, generator=torch.Generator().manual_seed(0))  # draws in the same order
    assert plain.item() == pytest.approx(own.item(), rel=1e-5)
    assert student.loss(x0, y, draws=draws()).item() == own.item()
    kd = MaskedKD(2)
    kd.on_start(student, 10, None)
    loss = kd.loss(student, x0, y, draws(), teacher)
    loss.backward()
    assert torch.isfinite(loss) and student.net.blocks[0].attn.qkv.weight.grad is not None
    assert all(p.grad is None for p in teacher.net.parameters())
    with pytest.raises(BenchError, match="teacher"):
        kd.loss(student, x0, y, draws(), None)
    kd.on_step(9, student, 0.0)
    assert kd.state_dict() == {"step": 10}


def test_official_masked_feature_loss_on_small_tensors():
    """training_losses_kd_rep: mean_flat((mask_s * s - mask_t * t)^2), every position counted, each
    tensor zeroed outside |x - mu| < 2 sigma (unbiased, per sample over tokens x channels). Version 1
    (both_bands) kept only positions inside both bands and divided by their count."""
    from methods.tinyfusion.kd import official_masked_mse

    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 3, generator=g)
    t = torch.randn(2, 5, 3, generator=g)
    t[0, 1, 2] = 50.0                       # a teacher outlier: masked in t only
    s[1, 4, 0] = -40.0                      # a student outlier: masked in s only
    want = []
    for n in range(2):
        def inside(x):
            flat = x[n].flatten().tolist()
            mu = sum(flat) / len(flat)
            sd = (sum((v - mu) ** 2 for v in flat) / (len(flat) - 1)) ** 0.5
            return [[abs(v - mu) < 2 * sd for v in row] for row in x[n].tolist()]
        ms, mt = inside(s), inside(t)
        tot = sum((ms[i][j] * s[n, i, j].item() - mt[i][j] * t[n, i, j].item()) ** 2 for i in range(5) for j in range(3))
        want.append(tot / 15)
    got = official_masked_mse(s, t, 2.0)
    assert got.shape == (2,) and torch.allclose(got, torch.tensor(want), rtol=1e-6)
    assert got[0] > 0 and not torch.isclose(got.mean(), masked_mse(s, t, 2.0))   # not version 1's rule


def test_official_vb_kd_is_the_kl_from_the_teachers_reverse_step(trained):
    """_vb_terms_bpd_kd: KL(N(mu_T, var_T) || N(mu_S, var_S)) in bits per element for t > 0 (the
    student's eps detached), the student's decoder NLL at t = 0; zero when the student is the teacher."""
    import math

    from bench.processes.ddpm import discretized_gaussian_log_likelihood
    from methods.tinyfusion.kd import vb_kd

    net = trained["dit"]
    proc = net.process
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 1, 8, 8, generator=g).clamp(-1, 1)
    t = torch.tensor([0, 10, 600])
    x_t = proc.q_sample(x0, t, torch.randn(x0.shape, generator=g))
    s_out = torch.randn(3, 2, 8, 8, generator=g, requires_grad=True)
    t_out = torch.randn(3, 2, 8, 8, generator=g).clamp(-0.9, 0.9)
    got = vb_kd(proc, s_out, t_out, x0, x_t, t)
    ms, _, ls, _ = proc._p_mean_variance(s_out.detach(), x_t, t, proc.base, clip=False)
    mt, _, lt, _ = proc._p_mean_variance(t_out, x_t, t, proc.base, clip=False)
    kl = 0.5 * (-1.0 + ls - lt + torch.exp(lt - ls) + (mt - ms) ** 2 * torch.exp(-ls))   # KL(teacher || student)
    want = kl.mean(dim=(1, 2, 3)) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, ms, 0.5 * ls).mean(dim=(1, 2, 3)) / math.log(2.0)
    torch.testing.assert_close(got[1:], want[1:].float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got[0], nll[0].float(), rtol=1e-4, atol=1e-6)
    got.sum().backward()                     # only the variance channels learn from it
    assert s_out.grad[:, :1].abs().sum() == 0 and s_out.grad[:, 1:].abs().sum() > 0
    assert torch.allclose(vb_kd(proc, t_out, t_out, x0, x_t, t)[1:], torch.zeros(2), atol=1e-6)


def test_masked_kd_loss_is_the_official_formula(trained):
    """The whole recovery loss on a small student: mean over the batch of
    0.9 (mean_flat((s - t)^2) + VB_KD) + 0.1 (mean_flat((eps - s)^2) + VB) + beta_t L_Rep,
    assembled here from the two models' outputs and hidden states on the same draws."""
    from methods.tinyfusion.kd import official_masked_mse, vb_kd

    teacher = copy.deepcopy(trained["dit"])
    student = surgery.apply(copy.deepcopy(teacher), Plan("block", {"blocks": [0, 3]}))
    student.net.train()
    x0, y = digits("train").get(torch.arange(8))
    d = student.draws(x0.shape, torch.Generator().manual_seed(3))
    kd = MaskedKD(2, beta=0.5)
    kd.on_start(student, 4, None)
    kd.on_step(0, student, 0.0)              # beta_t = 0.5 * (1 - 1/4)
    got = kd.loss(student, x0, y, d, teacher)
    drop = d.drop if d.drop is not None else torch.zeros(8, dtype=torch.long)
    proc = student.process
    x_t = proc.q_sample(x0, d.t, d.noise)
    s_out, hs = student.backbone(x_t, d.t, y, return_hidden=True, force_drop_ids=drop)
    with torch.no_grad():
        t_out, ths = teacher.backbone(x_t, d.t, y, return_hidden=True, force_drop_ids=drop)
    mse = (d.noise - s_out[:, :1]).pow(2).mean(dim=(1, 2, 3))
    vb = proc._vb_terms_bpd(torch.cat([s_out[:, :1].detach(), s_out[:, 1:]], 1), x0, x_t, d.t, proc.base)
    kd_mse = (s_out[:, :1] - t_out[:, :1]).pow(2).mean(dim=(1, 2, 3))
    rep = (official_masked_mse(hs[1], ths[2], 2.0) + official_masked_mse(hs[2], ths[4], 2.0)) / 2  # 0->1, 3->3
    want = (0.9 * (kd_mse + vb_kd(proc, s_out, t_out, x0, x_t, d.t)) + 0.1 * (mse + vb) + 0.375 * rep).mean()
    assert kd.layer_map([0, 3], 4) == [1, 3]
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    v1 = MaskedKD(2, beta=0.5, rule="both_bands")
    v1.on_start(student, 4, None)
    v1.on_step(0, student, 0.0)
    assert v1.loss(student, x0, y, d, teacher).item() != pytest.approx(got.item(), rel=1e-4)
    with pytest.raises(BenchError, match="kd_rule"):
        MaskedKD(2, rule="nope")


def test_table1_kd_cell_uses_the_official_rule():
    from tests.test_configs import hydra_compose
    d, _ = hydra_compose(["experiment=tinyfusion_table1", "+experiment/tinyfusion_table1_cells=tinyfusion_kd_d14"])
    assert (d["method"]["recovery"], d["method"]["kd_rule"]) == ("masked_kd", "official")


def test_kd_config_is_a_callback_that_asks_for_the_teacher(calib):
    from bench import registry
    m = registry.build("tinyfusion_kd")
    cb = m.callback(Budget("blocks", 0.5), calib)
    assert isinstance(cb, MaskedKD) and cb.needs_teacher
    plain = registry.build("tinyfusion")
    assert plain.callback(Budget("blocks", 0.5), calib) is None


class CountingSet(TensorDataset):
    """A training set that records the size of every batch read from it."""

    def __init__(self, base):
        super().__init__(base.x, base.y, base.num_classes, "counting")
        self.reads = []

    def get(self, idx):
        self.reads.append(len(idx))
        return super().get(idx)


def test_pruning_phase_draws_from_the_training_set(calib):
    """learn_data=train (default, the paper's recipe): every step's batch is read from the training
    set the probes came from (calib.source), through bench.loader; learn_data=calib: the probes only."""
    net = make_net("dit")
    train = CountingSet(digits("train"))
    probes = Calib(calib.x0, calib.y, calib.noise, calib.u, calib.ids, calib.bins, train)
    plan = TinyFusion(steps=3, batch=8, lora_rank=2).plan(net, Budget("blocks", 0.5), probes)
    assert train.reads == [8, 8, 8] and plan.meta["learn_n"] == len(train)
    train.reads.clear()
    plan = TinyFusion(steps=3, batch=8, lora_rank=2, learn_data="calib").plan(net, Budget("blocks", 0.5), probes)
    assert train.reads == [] and "learn_n" not in plan.meta
    hand_made = Calib(calib.x0, calib.y, calib.noise, calib.u, calib.ids, calib.bins)  # no source
    with pytest.raises(BenchError, match="learn_data=calib"):
        TinyFusion(steps=3).plan(net, Budget("blocks", 0.5), hand_made)
    assert calib.source is not None and calib.to("cpu").source is calib.source  # bench.data.calibration sets it


def test_bad_options():
    for kw in ({"update": "adapter"}, {"recovery": "distill"}, {"prior": "taylor"}, {"prior": "tinyfusion"}, {"rep_map": "any"},
               {"u_range": [0.5, 0.2]}, {"group_size": 0}, {"learn_data": "epoch"}):
        with pytest.raises(BenchError):
            TinyFusion(**kw)
