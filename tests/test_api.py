"""The method-facing contract (bench.api): the concrete Denoiser satisfies the protocol, the worked
example in the module docstring runs as written, and methods reach the backbone only where their
card says they are backbone-specific."""
from __future__ import annotations

import re
import textwrap
import typing
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from bench import api, surgery
from bench.api import Budget, Plan
from bench.models import build
from tests.conftest import make_net

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def unet():
    torch.manual_seed(0)
    net = build(**OmegaConf.to_container(OmegaConf.load(ROOT / "bench/conf/model/unet_tiny.yaml"), resolve=True))
    net.net.eval()
    return net


def example_method():
    """The worked example of bench.api's docstring, executed as written."""
    doc = api.__doc__
    start = doc.index("    import torch\n")
    block = []
    for line in doc[start:].splitlines():
        if line.strip() and not line.startswith("    "):
            break
        block.append(line)
    scope: dict = {}
    exec(compile(textwrap.dedent("\n".join(block)), "bench.api docstring", "exec"), scope)
    return scope["OutputChange"]()


def test_the_denoiser_satisfies_the_protocol():
    members = set(api.Denoiser.__annotations__) | {k for k, v in vars(api.Denoiser).items()
                                                   if callable(v) and not k.startswith("_")}
    assert {"depth", "input_size", "label_dropout", "backbone", "named_parameters", "zero_grad",
            "operator_ids", "noisy", "hidden_states", "ablate", "width_groups"} <= members
    for net in (make_net("dit"), make_net("sit"), unet()):
        assert isinstance(net, api.Denoiser)
        assert all(hasattr(net, m) for m in members | {"__call__"})
        assert net.backbone is net.net
        assert net.depth == len(net.net.blocks) and net.input_size == 8
        assert net.label_dropout == pytest.approx(0.1)  # tiny DiT/SiT/U-Net: class_dropout_prob 0.1
        assert dict(net.named_parameters()).keys() == net.net.state_dict().keys() - {
            k for k, _ in net.net.named_buffers()}
    assert not isinstance(object(), api.Denoiser)


def test_operator_ids():
    assert make_net("dit").operator_ids() == {}  # DiT/SiT branches belong to blocks ("attn"/"mlp" by block)
    u = unet()
    ids = u.operator_ids()
    assert u.depth == 0 and ids == u.net.operator_ids() and set(ids) == {"resnets", "attentions"}
    surgery.apply(u, Plan("operator", {f"ops.{g}": [] for g in ids}))
    assert u.operator_ids() == {"resnets": [], "attentions": []}  # the groups stay listed once all are gone


def test_granularity_lists_what_the_methods_declare():
    from bench import registry

    allowed = set(typing.get_args(api.Granularity))
    for name in registry.names():
        assert registry.method_class(registry.load(name)["_target_"]).granularity in allowed, name


@pytest.mark.parametrize("family", ["dit", "sit"])
def test_the_worked_example_plans(family, calib):
    from baselines.block_influence import residual_stat

    net = make_net(family)
    before = {k: v.clone() for k, v in net.net.state_dict().items()}
    method = example_method()
    budget = Budget("blocks", 0.5)
    plan = method.plan(net, budget, calib)
    assert plan.granularity == "block" and len(plan.keep["blocks"]) == surgery.blocks_to_keep(net, budget)
    assert Plan.from_json(plan.to_json()) == plan
    want = residual_stat(net, calib, lambda a, b: (b - a).flatten(1).norm(dim=1), "noised", 64).mean(0)
    assert plan.scores["blocks"] == pytest.approx(want.tolist(), rel=1e-9)
    assert plan.keep["blocks"] == surgery.keep_top(plan.scores["blocks"], len(plan.keep["blocks"]))
    assert all(torch.equal(v, before[k]) for k, v in net.net.state_dict().items())


def _card(path: Path) -> str:
    """The method card a file belongs to: its own docstring and, inside a method package
    (methods/<name>/), the package's."""
    import ast

    doc = lambda p: ast.get_docstring(ast.parse(p.read_text())) or ""  # noqa: E731
    in_package = path.parent.parent.name in ("methods", "baselines")
    return doc(path) + ("\n" + doc(path.parent / "__init__.py") if in_package else "")


def test_methods_use_the_protocol_and_name_their_backbone_use():
    files = sorted((ROOT / "methods").rglob("*.py")) + sorted((ROOT / "baselines").rglob("*.py"))
    inside = [f"{p.relative_to(ROOT)}:{i}" for p in files for i, line in enumerate(p.read_text().splitlines(), 1)
              if re.search(r"\b(net|teacher)\.net\b", line)]
    assert not inside, f"use net.<member>, or net.backbone in a backbone-specific method: {inside}"
    for p in files:
        if re.search(r"\.backbone\b", p.read_text()):
            assert "Backbone-specific" in _card(p), f"{p.relative_to(ROOT)} uses net.backbone; say why in its card"
