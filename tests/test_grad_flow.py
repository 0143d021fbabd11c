"""Gradient-flow pruning (methods.grad_flow): the Hessian-vector-product criterion against finite
differences, soft masks (continuity, mask 0 == removal, the budget met exactly at the end of the
schedule), the EMA after hard removal, kill/resume through the shared fine-tune loop, the U-Net."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from bench import registry, surgery
from bench.api import BenchError, Budget, Plan
from bench.data import digits
from bench.finetune import FinetuneConfig, finetune
from bench.models import build
from methods.grad_flow import GradFlow, collect_units, gradient_flow_scores, mask_trace, mask_value, schedule_steps
from methods.grad_flow.criterion import MaskHooks, multipliers
from methods.grad_flow.schedule import GradFlowSchedule, cumulative
from tests.conftest import make_net

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "bench" / "conf"
pytestmark = pytest.mark.usefixtures("one_thread")


def make_unet(seed: int = 0):
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "model" / "unet_tiny.yaml"), resolve=True)
    torch.manual_seed(seed)
    net = build(**cfg)
    with torch.no_grad():  # diffusers zero-initialises some output layers: make every unit matter
        for p in net.net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    net.net.eval()
    return net


def load(name: str, **over):
    return registry.build(name, over)


def grad_norm_sq(net, calib, n: int) -> float:
    """G = ||grad L||^2 of the calibration loss (prediction MSE), computed plainly (reference for the HVP)."""
    params = [p for p in net.net.parameters() if p.requires_grad]
    with net.eval_mode():
        x_t, t = net.noisy(calib.x0[:n], calib.u[:n], calib.noise[:n])
        out = net(x_t, t, calib.y[:n])[:, :1]
        target = calib.x0[:n] - calib.noise[:n] if net.process.kind == "flow" else calib.noise[:n]
        g = torch.autograd.grad(((out - target) ** 2).mean(), params)
    return float(sum(x.double().pow(2).sum() for x in g))


def _double_calib(calib):
    from bench.data import Calib
    return Calib(calib.x0.double(), calib.y, calib.noise.double(), calib.u.double(), calib.ids, calib.bins)


# --------------------------------------------------------------------------------------------
# The criterion
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,units", [("sit", "width"), ("dit", "width"), ("sit", "blocks")])
def test_hvp_criterion_matches_a_finite_difference(family, units, calib):
    """Delta G_u = -2 theta_u . (H g)_u is the derivative of ||g||^2 along theta -> theta - eps theta_u:
    compare with a central difference of a plain ||grad L||^2 in float64."""
    net = make_net(family)
    net.net.double()
    c = _double_calib(calib)
    n = 16
    groups = collect_units(net, units)
    r = gradient_flow_scores(net, groups, c, n_probes=n, batch_size=7)  # 3 uneven batches
    assert r["G"] == pytest.approx(grad_norm_sq(net, c, n), rel=1e-10)
    params = dict(net.net.named_parameters())
    picks = [(g, j) for g in list(groups)[:3] for j in (0, groups[g].size - 1)] if units == "width" \
        else [("blocks", 0), ("blocks", 2)]
    eps = 1e-5
    for gname, j in picks:
        g = groups[gname]
        mask = torch.ones(g.size, dtype=torch.float64)
        mask[j] = 0.0
        direction = {n_: params[n_].detach() * (1 - t) for n_, t in multipliers(params, {gname: g}, {gname: mask}).items()}
        vals = []
        for s in (-eps, eps):  # theta + s * delta with delta = -theta_u
            with torch.no_grad():
                for n_, d in direction.items():
                    params[n_].sub_(s * d)
            vals.append(grad_norm_sq(net, c, n))
            with torch.no_grad():
                for n_, d in direction.items():
                    params[n_].add_(s * d)
        fd = (vals[1] - vals[0]) / (2 * eps)
        got = float(r["delta_G"][gname][j])
        assert got == pytest.approx(fd, rel=1e-5, abs=1e-9 * max(1.0, r["G"])), (gname, j, got, fd)


def test_criterion_at_masked_weights_equals_criterion_of_premultiplied_weights(calib):
    net = make_net("sit")
    groups = collect_units(net, "width")
    masks = {g: torch.linspace(0.3, 1.0, u.size, dtype=torch.float64) for g, u in groups.items()}
    params = dict(net.net.named_parameters())
    mult = multipliers(params, groups, masks)
    before = {k: v.clone() for k, v in net.net.state_dict().items()}
    a = gradient_flow_scores(net, groups, calib, 16, 16, mult)
    assert all(torch.equal(v, before[k]) for k, v in net.net.state_dict().items())  # weights restored exactly
    ref = copy.deepcopy(net)
    rp = dict(ref.net.named_parameters())
    with torch.no_grad():
        for n_, t in mult.items():
            rp[n_].mul_(t)
    b = gradient_flow_scores(ref, collect_units(ref, "width"), calib, 16, 16)
    for g in groups:
        torch.testing.assert_close(a["delta_G"][g], b["delta_G"][g], rtol=1e-5, atol=1e-9)


def test_sign_convention_switch(calib):
    net = make_net("dit")
    most = load("grad_flow", schedule="oneshot").plan(net, Budget("macs", 0.6), calib)
    least = load("grad_flow", schedule="oneshot", prune="least_increase").plan(net, Budget("macs", 0.6), calib)
    g = "blocks.1.mlp.hidden"
    dG = torch.tensor(most.meta["delta_G"][g])
    assert most.scores[g] == pytest.approx((-dG).tolist())            # prune the largest increase
    assert least.scores[g] == pytest.approx(dG.tolist())              # prune the smallest increase
    removed = set(range(len(dG))) - set(most.keep[g])
    kept = set(most.keep[g])
    assert min(dG[i] for i in removed) >= max(dG[i] for i in kept) - 1e-12
    with pytest.raises(BenchError, match="prune"):
        GradFlow(prune="largest")


# --------------------------------------------------------------------------------------------
# Soft masks
# --------------------------------------------------------------------------------------------

def _some_zero_masks(groups, per_group: int = 1):
    masks, keep = {}, {}
    for g, u in groups.items():
        m = torch.ones(u.size, dtype=torch.float64)
        k = min(per_group, u.size - 1)
        drop = list(range(0, u.size, max(1, u.size // max(1, k))))[:k]
        m[drop] = 0.0
        masks[g] = m
        keep[g] = [d for j, d in enumerate(u.dense_ids) if j not in drop]
    return masks, keep


def _masked_forward(net, groups, masks):
    """The model's output on random inputs with the soft masks hooked in (and removed after), and the inputs."""
    mult = multipliers(dict(net.net.named_parameters()), groups, masks)
    hooks = MaskHooks(net.net, sorted(mult), mult)
    x, t, y = net.example_inputs(3)
    x = torch.randn_like(x)
    with torch.no_grad():
        masked = net(x, t, y)
    hooks.remove()
    return masked, (x, t, y)


@pytest.mark.parametrize("family", ["dit", "sit"])
@pytest.mark.parametrize("units", ["width", "blocks"])
def test_mask_zero_equals_hard_removal(family, units):
    net = make_net(family)
    groups = collect_units(net, units)
    masks, keep = _some_zero_masks(groups, 2)
    masked, (x, t, y) = _masked_forward(net, groups, masks)
    plan = Plan("block", keep) if units == "blocks" else Plan("width", keep)
    pruned = surgery.apply(copy.deepcopy(net), plan)
    with torch.no_grad():
        torch.testing.assert_close(masked, pruned(x, t, y), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(masked, net(x, t, y))  # the hooks did something and are gone


def test_masks_reach_gradients_and_leave_parameters_raw(calib):
    net = make_net("dit")
    groups = collect_units(net, "width")
    masks = {g: torch.full((u.size,), 0.5, dtype=torch.float64) for g, u in groups.items()}
    mult = multipliers(dict(net.net.named_parameters()), groups, masks)
    MaskHooks(net.net, sorted(mult), mult)
    ref = copy.deepcopy(net)  # deepcopy carries the hooks' functions; remove them on the copy's side
    for mod in ref.net.modules():
        mod._forward_pre_hooks.clear()
        mod._forward_hooks.clear()
    with torch.no_grad():
        rp = dict(ref.net.named_parameters())
        for n_, t in mult.items():
            rp[n_].mul_(t)
    la = net.loss(calib.x0[:8], calib.y[:8], u=calib.u[:8], noise=calib.noise[:8])
    lb = ref.loss(calib.x0[:8], calib.y[:8], u=calib.u[:8], noise=calib.noise[:8])
    la.backward()
    lb.backward()
    assert torch.isclose(la, lb, rtol=1e-5)
    qkv, rqkv = net.net.blocks[0].attn.qkv.weight, ref.net.blocks[0].attn.qkv.weight
    assert isinstance(qkv, torch.nn.Parameter) and not torch.equal(qkv, rqkv)  # raw weights stay raw
    torch.testing.assert_close(qkv.grad, 0.5 * rqkv.grad, rtol=1e-4, atol=1e-7)  # chain rule through theta * m


def test_schedule_formulas():
    end, rounds = schedule_steps(150, 2 / 3, 25)
    assert end == 100 and rounds == [0, 25, 50, 75]
    assert schedule_steps(4, 2 / 3, 25) == (2, [0])
    assert schedule_steps(1, 2 / 3, 25) == (1, [0])
    lin = mask_trace(150, 2 / 3, 25, "linear", [0, 75])
    assert lin[0][0] == 1.0 and lin[0][50] == pytest.approx(0.5) and lin[0][100] == 0.0
    assert lin[1][75] == 1.0 and lin[1][100] == 0.0 and lin[1][74] == 1.0
    for decay, slope in [("linear", 1.0), ("cosine", torch.pi / 2), ("cubic", 3.0)]:
        tr = mask_trace(150, 2 / 3, 25, decay, [0, 25, 75])
        for a, row in zip([0, 25, 75], tr):
            diffs = [row[i] - row[i + 1] for i in range(len(row) - 1)]
            assert min(diffs) >= -1e-12                                    # monotone
            assert max(diffs) <= slope / (100 - a) + 1e-9                  # continuous: bounded steps
            assert row[-2] > 0 and row[-1] == 0.0                          # reaches 0 exactly at E
    assert mask_value(10, 10, 100, "step") == 0.0 and mask_value(9, 10, 100, "step") == 1.0
    assert [cumulative(10, k, 4, "cubic") for k in range(4)] == [6, 9, 10, 10]
    assert [cumulative(10, k, 4, "linear") for k in range(4)] == [2, 5, 8, 10]
    assert cumulative(10, 0, 4, "all") == 10


class Recorder(GradFlowSchedule):
    """Records the masks of every clock step and, at the hard removal, the masked model's and
    the masked EMA's outputs at mask 0."""

    def __init__(self, *a, probe=None, **kw):
        super().__init__(*a, **kw)
        self.trace, self.probe, self.at_zero = [], probe, None

    def on_ema(self, ema):
        super().on_ema(ema)
        self.ema = ema

    def on_step(self, step, net, loss):
        tau = step + 1
        if not self.state["removed"] and tau >= self.state["end"]:
            self._set_masks(tau)  # every selected mask is 0 now
            self.trace.append((tau, {g: m.clone() for g, m in self.masks(tau).items()}))
            x, t, y = self.probe
            with torch.no_grad():
                self.at_zero = (net(x, t, y), self.ema(x, t, y))
        out = super().on_step(step, net, loss)
        if not self.state["removed"]:
            self.trace.append((tau, {g: m.clone() for g, m in self.masks(tau).items()}))
        return out


@pytest.mark.parametrize("units,budget", [("width", Budget("macs", 0.5)), ("blocks", Budget("blocks", 0.5)),
                                          ("width", Budget("params", 0.7))])
def test_soft_masks_are_continuous_and_meet_the_budget_exactly_at_the_end(units, budget, calib, tmp_path):
    net = make_net("dit")
    dense = surgery.measure(net)
    m = load("grad_flow" if units == "width" else "grad_flow_blocks", period=3, finish_frac=1.0, n_probes=16)
    plan = m.plan(net, budget, calib)
    surgery.apply(net, plan)
    x, t, y = net.example_inputs(2)
    cb = Recorder(m, budget, calib, probe=(torch.randn_like(x), t, y))
    steps = 10
    out = finetune(net, digits("train"), FinetuneConfig(steps=steps, batch=8, ckpt_every=100), tmp_path / "ft",
                   callback=cb, run_dir=tmp_path, device="cpu")
    st = cb.state
    assert st["end"] == steps and st["rounds"] == [0, 3, 6] and st["removed"]
    taus = [tau for tau, _ in cb.trace]
    assert taus == list(range(1, steps + 1))
    for g, n_remove in st["targets"].items():
        sel = dict((int(d), int(a)) for d, a in st["selected"][g])
        assert len(sel) == n_remove                                    # exactly the allocation
        series = torch.stack([masks[g] for _, masks in cb.trace])      # [tau, units]
        assert (series[1:] <= series[:-1] + 1e-12).all()               # monotone
        assert (series[:-1] - series[1:]).max() <= 1.0 / 4 + 1e-9      # linear decay over >= 4 steps
        assert ((series[-1] == 0) | (series[-1] == 1)).all()          # at E: exactly 0 or 1
        assert int((series[-1] == 0).sum()) == n_remove
        assert (series[-2][series[-1] == 0] > 0).all()                 # soft: still > 0 one step before
    # the final model is the hard-pruned EMA and meets the budget (the allocation of width_plan / blocks)
    got = surgery.check_budget(dense, surgery.measure(out), budget, unit_share=0.10 if units == "width" else 0.26)
    assert got[f"keep_{budget.measure}"] <= budget.keep + 1e-6
    if units == "width":
        assert got[f"keep_{budget.measure}"] == pytest.approx(plan.meta["measured_keep"])
    # the final EMA after hard removal computes what the masked EMA computed at mask 0
    with torch.no_grad():
        torch.testing.assert_close(out(*cb.probe), cb.at_zero[1], rtol=1e-5, atol=1e-5)
    log = [json.loads(line) for line in (tmp_path / "grad_flow_decisions.jsonl").read_text().splitlines()]
    assert [r["event"] for r in log] == ["start", "decision", "decision", "decision", "hard_removal"]


def test_callback_refuses_zero_steps_and_blocks_budget_for_width(calib):
    net = make_net("dit")
    m = load("grad_flow")
    with pytest.raises(BenchError, match="MACs or params"):
        m.plan(net, Budget("blocks", 0.5), calib)
    with pytest.raises(BenchError, match="finetune.steps"):
        m.callback(Budget("macs", 0.5), calib).on_start(net, 0, None)


# --------------------------------------------------------------------------------------------
# Kill and resume through the shared loop (checkpoints store and replay the applied plans)
# --------------------------------------------------------------------------------------------

SCRIPT = r"""
import sys, torch
sys.path.insert(0, {root!r})
torch.set_num_threads(1)
from pathlib import Path
from tests.test_grad_flow import make_net, load
from bench import registry, surgery
from bench.api import Budget
from bench.data import calibration, digits
from bench.finetune import FinetuneConfig, finetune
out = Path(sys.argv[1])
data = digits("train")
calib = calibration(data, n=32, seed=0, bins=4)
net = make_net("dit")
budget = Budget("macs", 0.5)
m = load("grad_flow", period=2, n_probes=16)
surgery.apply(net, m.plan(net, budget, calib))
net = finetune(net, data, FinetuneConfig(steps=9, batch=8, ckpt_every=2, lr=1e-3), out / "ft", seed=0,
               callback=m.callback(budget, calib), run_dir=out)
torch.save({{k: v.clone() for k, v in net.net.state_dict().items()}}, out / "final_ema.pt")
"""


def _run(script: Path, out: Path, abort: int | None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("BENCH_TEST_ABORT_AT_STEP", None)
    if abort is not None:
        env["BENCH_TEST_ABORT_AT_STEP"] = str(abort)
    return subprocess.run([sys.executable, str(script), str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def test_killed_run_resumes_masks_and_replays_the_hard_removal(tmp_path):
    """E = 6 of 9 steps, checkpoints every 2: a kill at step 3 resumes mid-decay (masks from the
    callback state), a kill at step 7 resumes after the hard removal (the width plan replayed from
    the checkpoint). The final EMA equals an uninterrupted run's bit for bit."""
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(root=str(ROOT)))
    a, b = tmp_path / "a", tmp_path / "b"
    r = _run(script, a, 3)
    assert r.returncode == 137, r.stderr[-2000:]
    r = _run(script, a, 7)
    assert r.returncode == 137, r.stderr[-2000:]
    ck = torch.load(a / "ft" / "last.pt", weights_only=False)
    assert ck["step"] == 6 and len(ck["plans"]) == 1 and ck["callback"]["removed"]
    r = _run(script, a, None)
    assert r.returncode == 0, r.stderr[-2000:]
    r = _run(script, b, None)
    assert r.returncode == 0, r.stderr[-2000:]
    sa, sb = torch.load(a / "final_ema.pt"), torch.load(b / "final_ema.pt")
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    la = [json.loads(x) for x in (a / "grad_flow_decisions.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (b / "grad_flow_decisions.jsonl").read_text().splitlines()]
    strip = lambda log: [{k: v for k, v in r.items() if k != "seconds"} for r in log]
    assert strip(la) == strip(lb)
    # final.pt replays the structure on a fresh model (the stage-done path of bench.finetune)
    fin = torch.load(b / "ft" / "final.pt", weights_only=False)
    assert len(fin["plans"]) == 1 and Plan.from_json(fin["plans"][0]).granularity == "width"


# --------------------------------------------------------------------------------------------
# The U-Net (width groups through Torch-Pruning's DependencyGraph)
# --------------------------------------------------------------------------------------------

def test_unet_mask_zero_equals_removal_and_the_schedule_runs(calib, tmp_path):
    net = make_unet()
    groups = collect_units(net, "width")
    assert any(u.kind == "heads" for u in groups.values()) and any(u.kind == "channels" for u in groups.values())
    masks, keep = _some_zero_masks(groups, 1)
    masked, (x, t, y) = _masked_forward(net, groups, masks)
    pruned = surgery.apply(copy.deepcopy(net), Plan("width", keep))
    with torch.no_grad():  # GroupNorm statistics leave masked channels out (soft membership)
        torch.testing.assert_close(masked, pruned(x, t, y), rtol=1e-4, atol=1e-4)
    dense = surgery.measure(net)
    budget = Budget("macs", 0.6)
    m = load("grad_flow", period=2, finish_frac=0.75, n_probes=8)
    surgery.apply(net, m.plan(net, budget, calib))
    out = finetune(net, digits("train"), FinetuneConfig(steps=4, batch=4, ckpt_every=100), tmp_path / "ft",
                   callback=m.callback(budget, calib), run_dir=tmp_path, device="cpu")
    got = surgery.check_budget(dense, surgery.measure(out), budget, unit_share=0.10)
    assert got["keep_macs"] <= 0.6 + 1e-6
    with torch.no_grad():
        assert torch.isfinite(out(x, t, y)).all()
