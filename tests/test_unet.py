"""The U-Net backbone (bench.models.unet, its width surgery in bench.width, its checkpoints in
bench.models.checkpoints): forward and CFG dropout, the DDPM CIFAR-10 checkpoint layout,
width groups and their Torch-Pruning surgery, operator bypass and removal. CPU, tiny models.

The hand-written coupling of ``conv_in``'s channels in the tiny U-Net below is read off the
architecture (diffusers UNet2DModel: the first skip tensors are concatenated *after* the up path's
tensor), not from Torch-Pruning, so a wrong index mapping fails the test.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from bench.api import BenchError, Plan
from bench.metrics.cost import count_macs, count_params
from bench.models import build
from bench.models.unet import SegmentGroupNorm, drop_labels
from bench.width import _DG_CACHE

CONF = Path(__file__).resolve().parent.parent / "bench" / "conf" / "model"


def model_cfg(name: str, **over) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"), resolve=True)
    cfg.update(over)
    return cfg


def tiny(seed: int = 0, **over):
    torch.manual_seed(seed)
    net = build(**model_cfg("unet_tiny", **over))
    net.net.eval()
    return net


def inputs(n=4, c=1, s=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, s, s, generator=g), torch.randint(0, 1000, (n,), generator=g),
            torch.randint(0, 10, (n,), generator=g))


@pytest.fixture(scope="module")
def ddpm():
    torch.manual_seed(0)
    net = build(**model_cfg("ddpm_cifar10", ckpt=None))
    net.net.eval()
    return net


# --------------------------------------------------------------------------------------------
# Forward, conditioning, CFG dropout
# --------------------------------------------------------------------------------------------

def test_forward_conditional_and_unconditional():
    net = tiny()
    x, t, y = inputs()
    out = net(x, t, y)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.allclose(net(x, t, (y + 1) % 10), out)               # labels condition the output
    assert net.units("block") == {"blocks": 0} and net.net.learn_sigma is False
    assert net.net.out_channels == 1 and net.net.input_size == 8 and net.null_label == 10
    with pytest.raises(BenchError, match="transformer-only"):
        net.hidden_states(x, t, y)
    # our attention processor is diffusers' AttnProcessor2_0 on the dense model (scale pinned for pruning)
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0
    ref = copy.deepcopy(net)
    for m in ref.net.unet.modules():
        if isinstance(m, Attention):
            m.set_processor(AttnProcessor2_0())
    assert torch.equal(ref(x, t, y), out)
    # the hydra config group composes to the same model arguments
    from tests.conftest import compose
    assert compose(["model=unet_tiny"])["model"] == model_cfg("unet_tiny")
    net.net.train()
    loss = net.loss(x, y, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and net.net.unet.conv_in.weight.grad is not None

    unc = tiny(num_classes=0)
    assert unc.net.unet.class_embedding is None
    o1 = unc(x, t, None)
    assert o1.shape == x.shape and torch.equal(o1, unc(x, t, y))           # labels ignored
    assert build(**model_cfg("unet_digits")).net.unet.class_embedding.num_embeddings == 11


def test_cfg_label_dropout():
    net = tiny()
    x, t, y = inputs()
    null = torch.full_like(y, 10)
    ref_null, ref_y = net(x, t, null), net(x, t, y)
    # forced drop: exactly the null-label prediction, in eval mode too
    assert torch.equal(net(x, t, y, force_drop_ids=torch.ones_like(y)), ref_null)
    assert torch.equal(net(x, t, y, force_drop_ids=torch.zeros_like(y)), ref_y)
    # training mode drops labels with class_dropout_prob, reproducibly from a generator (train mode
    # may pick other conv kernels: equal up to float rounding)
    net.net.train()
    net.net.class_dropout_prob = 1.0
    assert torch.allclose(net(x, t, y), ref_null, atol=1e-5)
    net.net.class_dropout_prob = 0.0
    assert torch.allclose(net(x, t, y), ref_y, atol=1e-5)
    net.net.class_dropout_prob = 0.5
    a = net(x, t, y, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, net(x, t, y, generator=torch.Generator().manual_seed(3)))
    net.net.eval()
    assert torch.equal(net(x, t, y), ref_y)                                 # eval: no dropout
    # the same draws as DiT's LabelEmbedder (one rand per label)
    from bench.models.dit import LabelEmbedder
    emb = LabelEmbedder(10, 4, 0.5)
    labels = torch.arange(10).repeat(3)
    assert torch.equal(drop_labels(labels, 10, 0.5, True, generator=torch.Generator().manual_seed(5)),
                       emb.token_drop(labels, generator=torch.Generator().manual_seed(5)))


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

def test_ddpm_cifar10_layout_roundtrip(ddpm, tmp_path):
    unet = ddpm.net.unet
    assert abs(count_params(ddpm.net) / 1e6 - 35.7) < 0.1
    cfg = unet.config
    assert list(cfg.block_out_channels) == [128, 256, 256, 256] and cfg.layers_per_block == 2
    assert list(cfg.down_block_types) == ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"]
    assert list(cfg.up_block_types) == ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]
    assert ddpm.num_classes == 0 and ddpm.process.T == 1000 and not ddpm.process.learn_sigma
    unet.save_pretrained(tmp_path / "pipe" / "unet")                        # a pipeline folder: unet/
    loaded = build(**model_cfg("ddpm_cifar10", ckpt=str(tmp_path / "pipe")))
    loaded.net.eval()
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([700])
    with torch.no_grad():
        assert torch.equal(loaded(x, t), ddpm(x, t))
    # a folder made for another architecture is refused by its config, before any weight is read
    small = tiny()
    small.net.unet.save_pretrained(tmp_path / "tiny")
    with pytest.raises(BenchError, match="does not match the model: .*block_out_channels"):
        build(**model_cfg("ddpm_cifar10", ckpt=str(tmp_path / "tiny")))


def test_checkpoint_errors_and_formats(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(BenchError, match="not found.*DDPM_CIFAR10_DIR"):
        build(**model_cfg("ddpm_cifar10", ckpt=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(BenchError, match="no weights in"):
        build(**model_cfg("unet_tiny", ckpt=str(tmp_path / "empty")))
    src = tiny(seed=3)
    x, t, y = inputs()
    # legacy diffusers attention names (google/ddpm-*: query/key/value/proj_attn) in one state-dict file
    legacy = {}
    for k, v in src.net.unet.state_dict().items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            k = k.replace(f".{new}.", f".{old}.")
        legacy[k] = v.contiguous()
    assert any(".proj_attn." in k for k in legacy)
    save_file(legacy, str(tmp_path / "legacy.safetensors"))
    dst = build(**model_cfg("unet_tiny", ckpt=str(tmp_path / "legacy.safetensors")))
    dst.net.eval()
    assert torch.equal(dst(x, t, y), src(x, t, y))
    # a diffusers folder with the pickled .bin weights
    src.net.unet.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "diffusion_pytorch_model.bin").is_file()
    assert torch.equal(build(**model_cfg("unet_tiny", ckpt=str(tmp_path / "bin"))).net.eval()(x, t, y), src(x, t, y))
    # our own backbone state dict (unet.-prefixed keys)
    torch.save(src.net.state_dict(), tmp_path / "own.pt")
    assert torch.equal(build(**model_cfg("unet_tiny", ckpt=str(tmp_path / "own.pt"))).net.eval()(x, t, y), src(x, t, y))
    # shapes that do not match: one readable error
    torch.save(tiny(block_out_channels=[8, 16]).net.state_dict(), tmp_path / "narrow.pt")
    with pytest.raises(BenchError, match="does not match the U-Net: 0 missing, 0 unexpected, [1-9][0-9]* shape"):
        build(**model_cfg("unet_tiny", ckpt=str(tmp_path / "narrow.pt")))
    with pytest.raises(BenchError, match="learn_sigma: false"):
        build(**model_cfg("unet_tiny", learn_sigma=True))


# --------------------------------------------------------------------------------------------
# Width groups
# --------------------------------------------------------------------------------------------

def _snapshot(groups):
    return {k: (g.kind, g.size, list(g.dense_ids),
                [(tuple(p.shape), d, i.tolist()) for p, d, i in g.members]) for k, g in groups.items()}


def test_width_groups_half_prune_and_replay():
    net = tiny()
    fresh = copy.deepcopy(net)
    x, t, y = inputs()
    groups = net.width_groups()
    kinds = {g.kind for g in groups.values()}
    assert kinds == {"channels", "heads"} and "conv_in.channels" in groups and "mid_block.attentions.0.heads" in groups
    assert "conv_out.channels" not in groups                                # ignored, as in Diff-Pruning
    assert groups["conv_in.channels"].size == 4                             # 16 channels / 4 norm groups
    assert groups["mid_block.attentions.0.heads"].size == 4                 # 32 channels / head dim 8
    x1, t1, y1 = net.example_inputs(1)
    macs0, params0 = count_macs(net, x1, t1, y1), count_params(net.net)
    plan = {k: g.dense_ids[1::2] for k, g in groups.items()}                # half of every group
    for k, keep in plan.items():
        net.prune_width(k, keep)
    out = net(x, t, y)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert count_macs(net, x1, t1, y1) < 0.35 * macs0 and count_params(net.net) < 0.35 * params0
    after = net.width_groups()
    assert set(after) == set(groups)
    for k, g in after.items():
        assert g.size == groups[k].size // 2 and g.dense_ids == plan[k]
        for p, dim, idx in g.members:                                       # members cover the pruned tensors
            assert idx.shape[0] == g.size and int(idx.max()) < p.shape[dim]
    assert net.net.unet.mid_block.attentions[0].heads == 2
    # the cached graph after pruning says what a freshly traced graph says
    _DG_CACHE.pop(net.net, None)
    assert _snapshot(net.width_groups()) == _snapshot(after)
    # replay the dense-id plan on a fresh dense model (through bench.surgery): bit-identical
    from bench import surgery
    surgery.apply(fresh, Plan("width", {k: list(v) for k, v in plan.items()}))
    assert torch.equal(fresh(x, t, y), out)


def test_per_unit_matches_hand_computation():
    net = tiny()
    net.net.train()
    net.loss(*inputs()[::2], generator=torch.Generator().manual_seed(0)).backward()
    g = net.width_groups()["conv_in.channels"]
    u = net.net.unet
    # conv_in's 16 channels: its rows, the first down ResNet (norm1, conv1 columns, conv2 rows: the
    # residual add), the downsampler's columns, and both skips in the last up block: after the
    # 32 upsampled channels in up_blocks.1.resnets.0, after 16 channels in up_blocks.1.resnets.1
    r0, r10, r11 = u.down_blocks[0].resnets[0], u.up_blocks[1].resnets[0], u.up_blocks[1].resnets[1]
    slices = [(u.conv_in.weight, 0, 0), (u.conv_in.bias, 0, 0), (r0.norm1.weight, 0, 0), (r0.norm1.bias, 0, 0),
              (r0.conv1.weight, 1, 0), (r0.conv2.weight, 0, 0), (r0.conv2.bias, 0, 0),
              (u.down_blocks[0].downsamplers[0].conv.weight, 1, 0)]
    for r, off in ((r10, 32), (r11, 16)):
        slices += [(r.norm1.weight, 0, off), (r.norm1.bias, 0, off), (r.conv1.weight, 1, off),
                   (r.conv_shortcut.weight, 1, off)]
    assert {(id(p), d) for p, d, _ in g.members} == {(id(p), d) for p, d, _ in slices}
    # a unit = one channel of each of the 4 norm groups (4 channels apart)
    hand = torch.zeros(4, dtype=torch.float64)
    for unit in range(4):
        for p, d, off in slices:
            ch = torch.tensor([off + unit + 4 * j for j in range(4)])
            w, gr = p.detach().index_select(d, ch).double(), p.grad.index_select(d, ch).double()
            hand[unit] += (w * gr).abs().sum()
    score = g.per_unit(lambda w, gr: (w * gr).abs().sum(1))
    assert torch.allclose(score, hand, rtol=1e-9, atol=0) and (hand > 0).all()


def test_keep_subset_sizes_heads_and_errors():
    net = tiny()
    x, t, y = inputs()
    name = "down_blocks.1.resnets.0.conv2.channels"                        # 32 channels: 8 units of 4
    net.prune_width(name, [1, 5])
    g = net.width_groups()[name]
    assert (g.size, g.dense_ids) == (2, [1, 5])
    assert net.net.unet.down_blocks[1].resnets[0].conv2.out_channels == 8
    net.prune_width(name, [5])
    assert (net.width_groups()[name].size, net.width_groups()[name].dense_ids) == (1, [5])
    with pytest.raises(BenchError, match="not a non-empty subset"):
        net.prune_width(name, [1])                                          # already pruned
    with pytest.raises(BenchError, match="unknown width group"):
        net.prune_width("nope.channels", [0])
    heads = "up_blocks.0.attentions.1.heads"
    net.prune_width(heads, [0, 3])
    attn = net.net.unet.up_blocks[0].attentions[1]
    assert (attn.heads, attn.to_q.out_features, attn.to_out[0].in_features) == (2, 16, 16)
    assert net.width_groups()[heads].dense_ids == [0, 3]
    assert net(x, t, y).shape == x.shape


def test_uneven_groupnorm_is_exact():
    net = tiny()
    x, t, y = inputs()
    # conv_in's channels enter up_blocks.1.resnets.0.norm1 (4 groups of 12 over 32 + 16 channels)
    # after the upsampled ones: keeping 1 of 4 conv_in units leaves groups of 12, 12, 9, 3 channels
    net.prune_width("conv_in.channels", [2])
    gn = net.net.unet.up_blocks[1].resnets[0].norm1
    assert isinstance(gn, SegmentGroupNorm) and gn.num_channels == 36
    assert [gn.channel_group.count(k) for k in range(4)] == [12, 12, 9, 3]
    h = torch.randn(3, 36, 4, 4)
    ref = torch.empty_like(h)
    gid = torch.tensor(gn.channel_group)
    for k in range(4):
        m = gid == k
        z = h[:, m]
        mu = z.mean(dim=(1, 2, 3), keepdim=True)
        var = z.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
        ref[:, m] = (z - mu) / torch.sqrt(var + gn.eps) * gn.weight[m, None, None] + gn.bias[m, None, None]
    assert torch.allclose(gn(h), ref, atol=1e-5)
    assert net(x, t, y).shape == x.shape
    # a repaired norm whose groups stay equal is plain GroupNorm
    gn2 = net.net.unet.down_blocks[0].resnets[0].norm1
    assert isinstance(gn2, SegmentGroupNorm) and gn2.num_channels == 4 and gn2.num_groups == 4
    h = torch.randn(2, 4, 3, 3)
    assert torch.equal(gn2(h), F.group_norm(h, 4, gn2.weight, gn2.bias, gn2.eps))


def test_ddpm_cifar10_prunes(ddpm):
    net = copy.deepcopy(ddpm)
    groups = net.width_groups()
    assert "conv_in.channels" in groups and groups["conv_in.channels"].size == 4     # 128 ch / 32 groups
    assert groups["down_blocks.1.attentions.0.to_q.channels"].size == 256             # one head: head-dim units
    p0 = count_params(net.net)
    for k in ("conv_in.channels", "down_blocks.1.attentions.0.to_q.channels", "mid_block.resnets.0.conv1.channels"):
        net.prune_width(k, groups[k].dense_ids[: groups[k].size // 2])
    assert [net.width_groups()[k].size for k in ("conv_in.channels", "mid_block.resnets.0.conv1.channels")] == [2, 4]
    assert net.net.unet.down_blocks[1].attentions[0].to_q.out_features == 128
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([10])
    with torch.no_grad():
        out = net(x, t)
    assert out.shape == x.shape and torch.isfinite(out).all() and count_params(net.net) < p0


def test_ddpm_cifar10_checkpoint_folder_loads_and_prunes(ddpm, tmp_path):
    """A DDPM CIFAR-10 checkpoint folder as google/ddpm-cifar10-32 ships it (config.json and the
    pickled diffusion_pytorch_model.bin with diffusers' pre-0.15 attention names), written here with
    random weights, loaded as a user loads it (experiment=diffpruning_cifar10 model.ckpt=<folder>,
    bench.run's loader), pruned by a width method's plan at the experiment's budget through
    bench.surgery (run.py's path: plan, apply, measure, check_budget); the forward works and the plan
    replays exactly on a fresh load. magnitude_width: a cheap score, the allocation every method gets."""
    import json

    from bench import surgery
    from bench.checks import check_config
    from bench.run import build_dense, make_method
    from tests.test_configs import hydra_compose

    folder = tmp_path / "ddpm-cifar10-32"
    ddpm.net.unet.save_pretrained(folder, safe_serialization=False)
    sd = torch.load(folder / "diffusion_pytorch_model.bin", weights_only=True)
    legacy = {}
    for k, v in sd.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            k = k.replace(f".{new}.", f".{old}.")
        legacy[k] = v
    assert sum(k.endswith(".proj_attn.weight") for k in legacy) == 6                 # 2 down, 1 middle, 3 up attentions
    torch.save(legacy, folder / "diffusion_pytorch_model.bin")
    assert json.loads((folder / "config.json").read_text())["_class_name"] == "UNet2DModel"

    d, _ = hydra_compose(["experiment=diffpruning_cifar10", "method=magnitude_width", f"model.ckpt={folder}"])
    assert d["model"]["ckpt"] == str(folder)
    budget = check_config(d)
    net = build_dense(d)
    net.net.eval()
    x, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)), torch.tensor([3, 900])
    with torch.no_grad():
        assert torch.equal(net(x, t), ddpm(x, t))                          # loaded exactly
    dense = surgery.measure(net)
    plan = make_method(d).plan(net, budget, None)
    surgery.apply(net, plan)
    keep = surgery.check_budget(dense, surgery.measure(net), budget, unit_share=float(plan.meta.get("unit_share", 0.1)))
    assert budget.keep - 0.002 <= keep[f"keep_{budget.measure}"] <= budget.keep
    assert keep["keep_macs"] < 0.6
    with torch.no_grad():
        out = net(x, t)
    assert out.shape == x.shape and torch.isfinite(out).all()
    fresh = build_dense(d)
    fresh.net.eval()
    surgery.apply(fresh, Plan.from_json(plan.to_json()))
    with torch.no_grad():
        assert torch.equal(fresh(x, t), out)
    assert {k: g.dense_ids for k, g in fresh.width_groups().items()} == plan.keep


# --------------------------------------------------------------------------------------------
# Operators (LD-Pruner)
# --------------------------------------------------------------------------------------------

def test_operators_bypass_and_remove():
    net = tiny()
    x, t, y = inputs()
    assert net.units("operator") == {"resnets": 3, "attentions": 4}
    ref = net(x, t, y)
    with net.ablate("resnets", [0]):
        bypassed = net(x, t, y)
    assert not torch.allclose(bypassed, ref)
    assert torch.equal(net(x, t, y), ref)                                   # restored exactly
    net.net.set_bypass("attentions", [1], True)
    assert not torch.allclose(net(x, t, y), ref)
    net.net.set_bypass("attentions", [1], False)
    assert torch.equal(net(x, t, y), ref)
    with pytest.raises(BenchError, match="unknown operator group"):
        net.net.set_bypass("mlp", [0], True)

    x1, t1, y1 = net.example_inputs(1)
    p0, m0 = count_params(net.net), count_macs(net, x1, t1, y1)
    r0 = net.net.unet.down_blocks[0].resnets[0]
    n_r0 = sum(p.numel() for p in r0.parameters())
    net.remove_operators("resnets", [1, 2])
    assert count_params(net.net) == p0 - n_r0 and count_macs(net, x1, t1, y1) < m0
    assert torch.equal(net(x, t, y), bypassed)                              # removal = the bypass, for good
    assert net.units("operator") == {"resnets": 2, "attentions": 4}
    assert net.net.operator_ids()["resnets"] == [1, 2]
    assert net.net._operator_paths["attentions"] == [                      # data-flow order
        "down_blocks.1.attentions.0", "mid_block.attentions.0", "up_blocks.0.attentions.0", "up_blocks.0.attentions.1"]
    net.remove_operators("attentions", [0, 2])
    assert net.units("operator")["attentions"] == 2 and net(x, t, y).shape == x.shape
    # width groups outside the removed operators keep their names and still prune
    groups = net.width_groups()
    assert "conv_in.channels" in groups and "down_blocks.0.resnets.0.conv1.channels" not in groups
    assert "mid_block.attentions.0.heads" not in groups and "up_blocks.0.attentions.0.heads" in groups
    net.prune_width("conv_in.channels", [0, 1])
    assert net(x, t, y).shape == x.shape
