"""Every config composes: each experiment at every point of its sweep (the hydra sweeper params that
``-m`` launches) and each method config, resolved and checked by the run's own validation
(``bench.checks.check_config`` and ``make_method``), the fine-tune config, the model factory (on the meta
device: shapes only) and the run directory. A config that does not compose, names a missing
method, passes a keyword its class does not take or gives a width method a block budget fails here.

The Diff-Pruning CIFAR-10 experiment is also planned for real: plan + surgery at its budget on the
DDPM CIFAR-10 U-Net (random weights) with every width method it sweeps.
"""
from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import pytest
import torch

from bench import surgery
from bench.api import Method

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "bench" / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))


def hydra_compose(overrides: list[str]) -> tuple[dict, dict]:
    """(resolved run config with method_name, the sweeper's params) for these overrides, composed
    as bench.run's entry point composes them (no method= added: an experiment cell may pick it)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf, open_dict

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="bench.conf", version_base="1.3"):
        cfg = compose("run", overrides=overrides, return_hydra_config=True)
    method = cfg.hydra.runtime.choices.method
    # resolved: ${tagged:<tag>} lists the methods whose config has the tag (bench.registry)
    sweep = OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=True) if cfg.hydra.sweeper.get("params") else {}
    with open_dict(cfg):
        del cfg["hydra"]
    d = OmegaConf.to_container(cfg, resolve=True)
    d["method_name"] = method
    return d, sweep or {}


def sweep_points(sweep: dict) -> list[list[str]]:
    """The cartesian product of a sweeper's comma-separated params, as override lists."""
    keys = sorted(sweep)
    values = [str(sweep[k]).split(",") for k in keys]
    return [[f"{k}={v.strip()}" for k, v in zip(keys, combo)] for combo in itertools.product(*values)]


_ARCH: dict[str, object] = {}


def arch_of(model_cfg: dict):
    """The model's architecture from its config, weights not loaded (meta device where it can)."""
    from bench.models import build

    key = json.dumps({**model_cfg, "ckpt": None}, sort_keys=True)
    if key not in _ARCH:
        spec = {**model_cfg, "ckpt": None}
        with torch.random.fork_rng(devices=[]):
            try:
                with torch.device("meta"):
                    _ARCH[key] = build(**spec)
            except Exception:
                _ARCH[key] = build(**spec)
    return _ARCH[key]


def check_run_config(d: dict) -> Method:
    """What bench.run checks before a run starts, plus the factories' keyword arguments."""
    from bench.finetune import FinetuneConfig
    from bench.results import run_relpath
    from bench.checks import check_config
    from bench.run import make_method

    budget = check_config(d)  # the device and the folders are the launcher's business
    method = make_method(d)
    assert isinstance(method, Method)
    FinetuneConfig(**d["finetune"])
    assert isinstance(run_relpath(d), str) and run_relpath(d)
    arch = arch_of(d["model"])
    assert arch.net is not None
    if type(method).granularity == "width":
        assert budget.measure in ("macs", "params"), f"{d['method_name']}: a width method needs a macs/params budget"
    if type(method).granularity == "block" and budget.measure == "blocks" and len(getattr(arch.net, "blocks", ())):
        key = (json.dumps({**d["model"], "ckpt": None}, sort_keys=True), budget.keep)  # measuring costs ~1 s a model
        if key not in _KEEP:
            _KEEP[key] = surgery.blocks_to_keep(arch, budget)
        assert _KEEP[key] >= 1
    return method


_KEEP: dict[tuple, int] = {}  # (model config, keep) -> blocks kept: one measurement per architecture and budget


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_at_every_sweep_point(experiment):
    _, sweep = hydra_compose([f"experiment={experiment}"])
    assert sweep, f"experiment {experiment} sweeps nothing"
    points = sweep_points(sweep)
    for point in points:
        d, _ = hydra_compose([f"experiment={experiment}", *point])
        assert (CONF / "method" / f"{d['method_name']}.yaml").exists(), point
        method = check_run_config(d)
        if "method" in sweep:  # the swept method is the one built
            want = dict(p.split("=", 1) for p in point)["method"]
            assert d["method_name"] == want and type(method).__module__.split(".")[0] in ("methods", "baselines")


@pytest.mark.parametrize("name", METHODS)
def test_every_method_config_composes_and_builds(name):
    d, _ = hydra_compose([f"method={name}", "model=dit_tiny"])
    assert d["method_name"] == name
    method = check_run_config({**d, "budget": {"measure": "macs", "keep": 0.5}})
    # paper settings are data: every key of the file reaches the constructor (no silent extra key)
    from omegaconf import OmegaConf
    keys = set(OmegaConf.load(CONF / "method" / f"{name}.yaml")) - {"_target_", "defaults"}
    assert keys <= set(d["method"]), name
    assert type(method).__name__ in d["method"]["_target_"]


def test_diff_pruning_paper_configs_follow_the_card():
    """diff_pruning_paper is the paper's ddpm_exp variant (methods.md 2b: squared score, threshold
    checked before the backward pass); the CIFAR-10 experiment fine-tunes with dropout 0.1."""
    d, sweep = hydra_compose(["experiment=diffpruning_cifar10"])
    assert set(str(sweep["method"]).split(",")) == {"random_width", "magnitude_width_l2", "taylor_width_paper",
                                                      "diff_pruning_paper"}
    assert d["model"]["name"] == "DDPM-CIFAR10" and d["model"]["dropout"] == 0.1
    assert d["budget"] == {"measure": "params", "keep": 0.5554}
    p, _ = hydra_compose(["experiment=diffpruning_cifar10", "method=diff_pruning_paper"])
    m = p["method"]
    assert (m["score"], m["check"], m["thr"], m["t_stride"], m["batch"]) == ("squared", "before", 0.05, 1, 128)
    import methods.diff_pruning as card
    assert "``diff_pruning_paper`` uses it" in card.__doc__


# --------------------------------------------------------------------------------------------
# The Diff-Pruning CIFAR-10 experiment's budget on the real U-Net layout
# --------------------------------------------------------------------------------------------

def test_diffpruning_cifar10_budget_is_met_by_every_swept_method():
    """Plan + surgery at experiment=diffpruning_cifar10's budget (params 0.5554 = 19.85M / 35.75M)
    on the DDPM CIFAR-10 U-Net with random weights, for every width method the experiment sweeps
    (the Taylor scans shortened: 2 timesteps of 2 images). The measured result meets the budget,
    is within the run's unit_share of it, and is the paper's ratio-0.3 model: 4-unit groups keep
    3, 8-unit groups 6, the 256/512-channel groups 179/358 (Torch-Pruning's counts)."""
    from bench.data import TensorDataset, calibration
    from bench.checks import check_config
    from bench.run import build_dense, make_method
    from bench.width import canonical_key

    d, sweep = hydra_compose(["experiment=diffpruning_cifar10"])
    budget = check_config(d)
    torch.manual_seed(0)
    net = build_dense({**d, "model": {**d["model"], "ckpt": None}})
    net.net.eval()
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(8, 3, 32, 32, generator=g) * 2 - 1, torch.zeros(8, dtype=torch.long), 0, "rand")
    calib = calibration(data, n=4, seed=0, bins=2)
    dense = surgery.measure(net)
    x, t = torch.randn(1, 3, 32, 32, generator=g), torch.tensor([10])
    counts = {}
    for name in str(sweep["method"]).split(","):
        over = ["method.t_stride=500", "method.batch=2"] if name.startswith(("taylor", "diff_pruning")) else []
        md, _ = hydra_compose(["experiment=diffpruning_cifar10", f"method={name}", *over])
        plan = make_method(md).plan(net, budget, calib)
        pruned = surgery.apply(copy.deepcopy(net), plan)
        got = surgery.check_budget(dense, surgery.measure(pruned), budget,
                                   unit_share=float(plan.meta.get("unit_share", 0.10)))
        assert budget.keep - 0.002 <= got["keep_params"] <= budget.keep
        assert got["keep_params"] == pytest.approx(plan.meta["measured_keep"])
        with torch.no_grad():
            out = pruned(x, t)
        assert out.shape == x.shape and torch.isfinite(out).all()
        # units kept per group; a per-norm-group plan (<root>.norm_channels: Diff-Pruning's own rule, the
        # Taylor row's too) names channels, the same count in each of the group's norm groups
        groups = net.width_groups()
        counts[name] = {canonical_key(k): len(v) // (groups[canonical_key(k)].chunks if k != canonical_key(k) else 1)
                        for k, v in plan.keep.items()}
        assert any(k.endswith(".norm_channels") for k in plan.keep) == name.endswith("_paper")
    first = next(iter(counts.values()))
    assert all(c == first for c in counts.values())     # the allocation is the architecture's, not the score's
    sizes = {k: grp.size for k, grp in net.width_groups().items()}
    tp = {4: 3, 8: 6, 256: 179, 512: 358}                # Torch-Pruning, ratio 0.3 (methods.md 2b, 2f)
    assert {k: tp[sizes[k]] for k in first} == first
    assert surgery.measure(surgery.apply(copy.deepcopy(net), plan))["params"] == 19_851_157   # "19.85M"
