"""Cost measurement: the latency harness (keys, precision, refusals), MACs against an analytic
count, params of DiT-XL/2 on the meta device, and bench.gpu.speed --smoke. CPU only; no test
asserts on a timing (numbers only need to be positive and finite)."""
import json
import math

import pytest
import torch

from bench.metrics import cost
from bench.metrics.cost import benchmark_forward, count_macs, count_params, make_runner, random_inputs, speedup
from bench.models import build
from bench.models.dit import DiT_models


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny():
    from bench.gpu.speed import randomize_zero_init_

    torch.manual_seed(0)
    net = build("DiT-T/2", input_size=8, in_channels=4, num_classes=10)
    randomize_zero_init_(net.net)  # adaLN-Zero would make the output 0 and every comparison vacuous
    net.net.eval()
    return net


# ------------------------------------------------------------------ the harness

def test_benchmark_forward_keys_and_types():
    net = _tiny()
    inp = random_inputs(net, 3, "cpu")
    r = benchmark_forward(net.net, inp, "cpu", "eager", "fp32", warmup=2, reps=20)
    floats = ["median_ms", "iqr_ms", "p10_ms", "p90_ms", "mean_ms", "min_ms", "throughput_img_s", "first_call_s"]
    for k in floats:
        assert isinstance(r[k], float) and math.isfinite(r[k]) and r[k] >= 0, k
    assert r["p10_ms"] <= r["median_ms"] <= r["p90_ms"] and r["median_ms"] > 0
    assert r["throughput_img_s"] == pytest.approx(3 / r["median_ms"] * 1e3)
    assert (r["reps"], r["warmup"], r["batch"]) == (20, 2, 3)
    assert (r["mode"], r["dtype"], r["device_type"]) == ("eager", "fp32", "cpu")
    assert r["device"] == cost.device_name("cpu") and r["torch"] == torch.__version__
    assert r["peak_mem_MB"] is None and r["act_mem_MB"] is None  # CPU: documented as not measured
    assert r["out_finite"] is True
    assert not net.net.training  # eval mode restored as it was


def test_module_training_mode_is_restored():
    net = _tiny()
    net.net.train()
    benchmark_forward(net.net, random_inputs(net, 2, "cpu"), "cpu", warmup=1, reps=2, allow_few=True)
    assert net.net.training


def test_bf16_runner_matches_fp32():
    net = _tiny()
    inp = random_inputs(net, 4, "cpu")
    a = make_runner(net.net, "cpu", "eager", "fp32")(*inp).float()
    b = make_runner(net.net, "cpu", "eager", "bf16")(*inp)
    assert b.dtype == torch.bfloat16  # autocast really ran the forward in bf16
    rel = ((b.float() - a).norm() / a.norm()).item()
    assert 0 < rel < 1e-2
    assert torch.equal(make_runner(net.net, "cpu", "eager", "fp32")(*inp), net.net(*inp))  # fp32 is the plain forward


def test_runner_output_is_inference_mode():
    net = _tiny()
    out = make_runner(net.net, "cpu")(*random_inputs(net, 1, "cpu"))
    assert out.is_inference() and not out.requires_grad


@pytest.mark.parametrize("enabled", [False, True])
@pytest.mark.parametrize("setup", ["as_is", "legacy_on", "precision_medium", "new_api_tf32", "cudnn_off"])
def test_tf32_context_restores_state(setup, enabled):
    b = torch.backends
    outer = cost.tf32_state()
    with cost.tf32(not enabled):  # restores the test process's own state afterwards
        if setup == "legacy_on":
            b.cuda.matmul.allow_tf32 = True
        elif setup == "precision_medium":
            torch.set_float32_matmul_precision("medium")
        elif setup == "new_api_tf32":
            b.cuda.matmul.fp32_precision = "tf32"  # legacy reads now raise ("mix of legacy and new APIs")
        elif setup == "cudnn_off":
            b.cudnn.allow_tf32 = False
        before = cost.tf32_state()
        with cost.tf32(enabled):
            inside = cost.tf32_state()
            assert inside["matmul.allow_tf32"] is enabled and inside["cudnn.allow_tf32"] is enabled
            assert inside["float32_matmul_precision"] == ("high" if enabled else "highest")
        assert cost.tf32_state() == before
    assert cost.tf32_state() == outer


def test_precision_contexts_restore_on_error():
    before = cost.tf32_state()
    with pytest.raises(KeyError):
        with cost.precision("tf32", "cuda"):
            raise KeyError
    assert cost.tf32_state() == before
    with cost.precision("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu")
    assert not torch.is_autocast_enabled("cpu")


def test_refusals():
    net = _tiny()
    inp = random_inputs(net, 2, "cpu")
    with pytest.raises(ValueError, match="reps=19 < 20"):
        benchmark_forward(net.net, inp, "cpu", reps=19)
    with pytest.raises(ValueError, match="all zeros"):
        benchmark_forward(net.net, net.example_inputs(2, "cpu"), "cpu")  # zeros can take fast paths
    with pytest.raises(ValueError, match="batch=3"):
        benchmark_forward(net.net, inp, "cpu", batch=3)
    with pytest.raises(ValueError, match="tf32"):
        benchmark_forward(net.net, inp, "cpu", dtype="tf32")
    with pytest.raises(ValueError, match="unknown mode"):
        benchmark_forward(net.net, inp, "cpu", mode="jit")
    with pytest.raises(ValueError, match="unknown dtype"):
        benchmark_forward(net.net, inp, "cpu", dtype="fp16")


def _rec(**kw):
    r = {"device": "NVIDIA H200", "mode": "eager", "dtype": "bf16", "batch": 64, "median_ms": 10.0}
    r.update(kw)
    return r


def test_speedup_only_within_device_mode_dtype_batch():
    assert speedup(_rec(), _rec(median_ms=4.0)) == pytest.approx(2.5)
    for k, v in [("device", "NVIDIA H100 80GB HBM3"), ("mode", "compile"), ("dtype", "tf32"), ("batch", 16)]:
        with pytest.raises(ValueError, match=k):
            speedup(_rec(), _rec(**{k: v}))


def test_measure_latency_is_unchanged():
    r = cost.measure_latency(lambda: None, warmup=1, reps=2)  # bench.run's tiny config uses reps=2
    assert set(r) == {"median_ms", "iqr_ms", "reps", "warmup"} and r["reps"] == 2


@pytest.mark.slow
def test_compile_mode_on_cpu(request):
    if "slow" not in (request.config.option.markexpr or ""):
        pytest.skip("torch.compile on the CPU takes ~40 s cold (inductor C++ codegen); run with -m slow")
    net = _tiny()
    inp = random_inputs(net, 2, "cpu")
    r = benchmark_forward(net.net, inp, "cpu", "compile", "fp32", warmup=2, reps=20)
    assert r["mode"] == "compile" and r["out_finite"] and r["first_call_s"] > 0
    out = make_runner(net.net, "cpu", "compile")(*inp)
    assert torch.allclose(out, net.net(*inp), atol=1e-5)


# ------------------------------------------------------------------ params and MACs

def _analytic_macs(size, input_size, in_channels, learn_sigma=True, freq_dim=256, mlp_ratio=4):
    """DiT forward MACs per image, from the config: patch embed conv, t-embedder MLP, per block
    adaLN + qkv + q k^T + attn v + proj + fc1 + fc2, final adaLN + linear (label embedding is a
    lookup; norms, softmax, modulation and residuals are elementwise)."""
    from bench.models.dit import _SIZES, _TINY

    s, p = size.split("/")
    cfg = {**_SIZES, **_TINY}[s.split("-")[1]]
    p, D, L = int(p), cfg["hidden_size"], cfg["depth"]
    T = (input_size // p) ** 2
    out = in_channels * (2 if learn_sigma else 1)
    block = D * 6 * D + T * D * 3 * D + T * T * D + T * T * D + T * D * D + 2 * T * D * mlp_ratio * D
    return T * D * in_channels * p * p + freq_dim * D + D * D + L * block + D * 2 * D + T * D * p * p * out


@pytest.mark.parametrize("batch", [1, 3])
def test_macs_of_dit_t2_match_analytic_count(batch):
    net = DiT_models["DiT-T/2"](input_size=8, in_channels=4, num_classes=10).eval()
    x, t, y = torch.randn(batch, 4, 8, 8), torch.rand(batch) * 999, torch.randint(10, (batch,))
    assert count_macs(net, x, t, y) == batch * _analytic_macs("DiT-T/2", 8, 4)


def test_attention_matmuls_are_counted():
    """The two attention matmuls are what the CPU SDPA kernel hid from FlopCounterMode."""
    q = torch.randn(2, 3, 16, 8)
    assert count_macs(torch.nn.functional.scaled_dot_product_attention, q, q, q) == 2 * 2 * 3 * 16 * 16 * 8


def test_dit_xl2_params_on_meta():
    with torch.device("meta"):
        net = DiT_models["DiT-XL/2"]()
    assert next(net.parameters()).is_meta
    assert count_params(net) == 675_129_632  # DiT paper Table 1: 675M (pos_embed included)
    assert round(count_params(net) / 1e6, 2) == 675.13


# ------------------------------------------------------------------ bench.gpu.speed --smoke

def test_speed_smoke(tmp_path):
    from bench.gpu import speed

    res = speed.main(["--out", str(tmp_path), "--smoke"])
    data = json.loads((tmp_path / "speed.json").read_text())
    md = (tmp_path / "speed.md").read_text()
    assert data["meta"]["dense_blocks"] == 4 and data["meta"]["pruned_blocks"] == 2
    assert data["meta"]["pruned_kept"] == [0, 2]
    assert 0.5 < data["meta"]["mac_ratio"] < 0.6  # half the blocks plus the fixed embed/final cost
    assert len(res["records"]) == 8 and not res["errors"]
    assert {(s["mode"], s["dtype"], s["batch"]) for s in res["speedups"]} == \
        {("eager", d, b) for d in ("fp32", "bf16") for b in (1, 4)}
    for s in res["speedups"]:
        assert s["speedup"] > 0 and s["mac_speedup"] == pytest.approx(1 / data["meta"]["mac_ratio"])
    head = next(line for line in md.splitlines() if line.startswith("| mode "))  # a tabulate table
    assert [c.strip() for c in head.split("|")[1:7]] == ["mode", "dtype", "batch", "dense ms", "pruned ms", "speedup"]
    assert torch.get_num_threads() == 1  # the smoke run restored the fixture's thread count


def test_eval_speed_config_composes():
    from tests.conftest import compose

    lat = compose(["eval=speed"])["eval"]["latency"]
    assert lat["mode"] in cost.MODES and lat["dtype"] in cost.DTYPES and lat["reps"] >= cost.MIN_REPS
    assert compose([])["eval"]["n"] == compose(["eval=speed"])["eval"]["n"]  # only latency keys change
