"""Official DiT/SiT checkpoint layout and loading (bench.models.checkpoints, bench.models.dit).

The expected key list is written out here from the official layout (facebookresearch/DiT models.py,
willisma/SiT models.py), not read from our model, so a renamed or extra parameter fails the test.
"""
from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from bench.api import BenchError
from bench.models.checkpoints import infer_config, load_official, load_state_dict_file
from bench.models.dit import DiT, DiT_models, SiT_models

TINY = dict(input_size=8, in_channels=4, num_classes=10)  # DiT-T/2: depth 4, hidden 32, 2 heads


def official_shapes(depth=4, D=32, p=2, C=4, input_size=8, num_classes=10, learn_sigma=True, freq=256):
    T = (input_size // p) ** 2
    out = p * p * (2 * C if learn_sigma else C)
    shapes = {
        "pos_embed": (1, T, D),
        "x_embedder.proj.weight": (D, C, p, p), "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, freq), "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (num_classes + 1, D),  # + the CFG null label
        "final_layer.linear.weight": (out, D), "final_layer.linear.bias": (out,),
        "final_layer.adaLN_modulation.1.weight": (2 * D, D), "final_layer.adaLN_modulation.1.bias": (2 * D,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
            b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
            b + "mlp.fc1.weight": (4 * D, D), b + "mlp.fc1.bias": (4 * D,),
            b + "mlp.fc2.weight": (D, 4 * D), b + "mlp.fc2.bias": (D,),
            b + "adaLN_modulation.1.weight": (6 * D, D), b + "adaLN_modulation.1.bias": (6 * D,),
        })
    return shapes


def random_state_dict(seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in official_shapes(**kw).items()}


@pytest.mark.parametrize("models", [DiT_models, SiT_models])
def test_model_has_exactly_the_official_layout(models):
    family = "DiT" if models is DiT_models else "SiT"
    model = models[f"{family}-T/2"](**TINY)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == official_shapes()


def _write(fmt, path, sd):
    if fmt == "raw":                      # DiT-XL-2-256x256.pt, SiT-XL-2-256x256.pt
        torch.save(sd, path)
    elif fmt == "train":                  # train.py: ema is what the papers sample from
        decoy = {k: torch.zeros_like(v) for k, v in sd.items()}
        opt = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
               "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0]}]}
        torch.save({"model": decoy, "ema": sd, "opt": opt,
                    "args": argparse.Namespace(model="DiT-T/2", image_size=64)}, path)
    elif fmt == "model_only":
        torch.save({"model": sd, "opt": {}}, path)
    elif fmt == "ddp":
        torch.save({f"module.{k}": v for k, v in sd.items()}, path)
    elif fmt == "safetensors":
        save_file(sd, str(path))


@pytest.mark.parametrize("family", ["DiT", "SiT"])
@pytest.mark.parametrize("fmt", ["raw", "train", "model_only", "ddp", "safetensors"])
def test_load_official_round_trip(tmp_path, family, fmt):
    sd = random_state_dict()
    path = tmp_path / ("ckpt.safetensors" if fmt == "safetensors" else "ckpt.pt")
    _write(fmt, path, sd)
    model = (DiT_models if family == "DiT" else SiT_models)[f"{family}-T/2"](**TINY).eval()
    load_official(model, path, strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 500]), torch.tensor([1, 10])  # 10 = null label
    out = model(x, t, y)
    assert out.shape == (2, 8 if family == "DiT" else 4, 8, 8)  # SiT drops the learned-sigma half
    assert torch.isfinite(out).all()


def test_dit_xl2_has_the_papers_parameter_count():
    # DiT Table 4: DiT-XL/2 at 256px has 675M parameters (official train.py counts pos_embed too)
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"](input_size=32, in_channels=4, learn_sigma=True, num_classes=1000)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == 675.13
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == official_shapes(
        depth=28, D=1152, p=2, C=4, input_size=32, num_classes=1000)
    assert infer_config(model.state_dict()) == dict(depth=28, hidden_size=1152, patch_size=2, input_size=32,
                                                    in_channels=4, num_classes=1000, learn_sigma=True)


# ---- errors ------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    path = tmp_path / "DiT-XL-2-256x256.pt"
    with pytest.raises(BenchError, match=r"checkpoint not found: .*DiT-XL-2-256x256\.pt; put the official "
                                         r"file there or pass model\.ckpt="):
        load_official(DiT_models["DiT-T/2"](**TINY), path)


@pytest.mark.parametrize("name,content", [
    ("garbage.pt", b"<html>404 Not Found</html>" * 4),   # an error page saved as the checkpoint
    ("empty.pt", b""),
    ("bad.safetensors", b"\x00" * 5),
])
def test_corrupt_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(BenchError, match=r"corrupt or not a checkpoint.*re-download") as e:
        load_state_dict_file(path)
    assert len(str(e.value)) < 400


def test_truncated_file(tmp_path):
    path = tmp_path / "partial.pt"
    torch.save(random_state_dict(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(BenchError, match=r"corrupt.*re-download"):
        load_state_dict_file(path)


class _Pickled:  # an arbitrary class: weights_only loading must refuse it, not execute it
    pass


def test_non_tensor_pickle_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"model": random_state_dict(), "extra": _Pickled()}, path)
    with pytest.raises(BenchError, match=r"weights_only.*trust its source.*torch\.save"):
        load_state_dict_file(path)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(BenchError, match="not a state dict"):
        load_state_dict_file(path)


def test_mismatched_depth_names_the_matching_model(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save(random_state_dict(), path)                       # DiT-T/2: depth 4
    model = DiT(depth=3, hidden_size=32, num_heads=2, patch_size=2, **TINY)
    with pytest.raises(BenchError) as e:
        load_official(model, path)
    msg = str(e.value)
    assert "0 missing, 10 unexpected, 0 shape-mismatched keys" in msg   # 10 tensors per block
    assert "unexpected: blocks.3.attn.qkv.weight" in msg and "(+5 more)" in msg
    assert "DiT-T/2(input_size=8, in_channels=4, num_classes=10, learn_sigma=True)" in msg
    assert "DiT(depth=3, hidden_size=32" in msg
    # strict=False tolerates the extra block; the rest is loaded
    missing, unexpected = load_official(model, path, strict=False)
    assert missing == [] and len(unexpected) == 10


def test_mismatched_shapes_are_listed(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save(random_state_dict(input_size=16, num_classes=20), path)
    with pytest.raises(BenchError) as e:
        load_official(SiT_models["SiT-T/2"](**TINY), path, strict=False)   # shapes fail even non-strict
    msg = str(e.value)
    assert "0 missing, 0 unexpected, 2 shape-mismatched keys" in msg
    assert "pos_embed checkpoint (1, 64, 32) vs model (1, 16, 32)" in msg
    assert "y_embedder.embedding_table.weight checkpoint (21, 32) vs model (11, 32)" in msg
    assert "SiT-T/2(input_size=16, in_channels=4, num_classes=20" in msg


# ---- architecture details ------------------------------------------------------------------

def test_pos_embed_is_the_2d_sincos_of_mae():
    # token n = row * G + col (patches flattened row-major); first D/2 dims encode the column,
    # last D/2 the row (MAE's meshgrid puts w first); each half = [sin(pos w_k), cos(pos w_k)],
    # w_k = 10000^(-k / (D/4)), k < D/4
    D, G = 32, 4
    model = DiT_models["DiT-T/2"](**TINY)
    q = D // 4
    w = [10000 ** (-k / q) for k in range(q)]
    expected = torch.zeros(G * G, D)
    for row in range(G):
        for col in range(G):
            n = row * G + col
            for k in range(q):
                expected[n, k], expected[n, q + k] = math.sin(col * w[k]), math.cos(col * w[k])
                expected[n, 2 * q + k], expected[n, 3 * q + k] = math.sin(row * w[k]), math.cos(row * w[k])
    torch.testing.assert_close(model.pos_embed[0], expected)
    assert not model.pos_embed.requires_grad  # fixed, not learned


def test_adaln_zero_blocks_are_identity_at_init():
    torch.manual_seed(0)
    model = DiT_models["DiT-T/2"](**TINY)
    x, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    for block in model.blocks:
        assert torch.equal(block(x, c), x)
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([0, 999]), torch.tensor([0, 9]))
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised final layer


def test_timestep_embedding_is_cos_then_sin():
    from bench.models.dit import TimestepEmbedder
    t = torch.tensor([0.0, 7.0])
    emb = TimestepEmbedder.timestep_embedding(t, 8)
    freqs = np.exp(-np.log(10000) * np.arange(4) / 4)
    expected = np.concatenate([np.cos(7.0 * freqs), np.sin(7.0 * freqs)])
    np.testing.assert_allclose(emb[1].numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(emb[0].numpy(), [1, 1, 1, 1, 0, 0, 0, 0])
