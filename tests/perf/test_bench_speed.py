"""Speed benchmarks (pytest-benchmark): dense vs 50 %-depth DiT forwards.

Skipped unless asked for, so the default test run stays fast:

    pytest tests/perf --benchmark-enable                      # CPU benchmark here; GPU ones on a GPU
    pytest tests/perf --benchmark-only -m gpu --benchmark-save=h200   # GPU only, saved for comparison
    pytest tests/perf --benchmark-only --benchmark-compare --benchmark-compare-fail=median:10%

Regression checks are pytest-benchmark's compare/fail options on saved runs, never asserts on
timings here; speedups (ratios, any GPU) are gated by `python -m bench.gate` (bench/gate). pytest-benchmark times with perf_counter, so every GPU call ends with a
synchronize; `extra_info` carries the suite's own CUDA-event record (bench.metrics.cost) and the
measured MACs, so a saved run states what it measured.
"""
import pytest
import torch

from bench.metrics.cost import benchmark_forward, count_macs, count_params, make_runner, random_inputs


@pytest.fixture(autouse=True, scope="module")  # module scope: decided before xl_pair builds anything
def _only_when_asked(request):
    cfg = request.config
    if not (cfg.getoption("benchmark_enable", False) or cfg.getoption("benchmark_only", False)):
        pytest.skip("speed benchmark: run with --benchmark-enable or --benchmark-only")


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _pair(model, keep_blocks, device, **kw):
    from bench.gpu.speed import build_pair

    dense, pruned = build_pair(model, keep_blocks, **kw)
    for d in (dense, pruned):
        d.net.to(device).eval()
    return {"dense": dense, "pruned": pruned}


def _bench(benchmark, net, device, mode, dtype, batch, warmup, rounds):
    inputs = random_inputs(net, batch, device)
    runner = make_runner(net.net, device, mode, dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def step():
        out = runner(*inputs)
        sync()
        return out

    out = benchmark.pedantic(step, rounds=rounds, warmup_rounds=warmup, iterations=1)
    macs = count_macs(net.net, *random_inputs(net, 1, device))
    benchmark.extra_info.update(mode=mode, dtype=dtype, batch=batch, device=str(device), blocks=len(net.net.blocks),
                                params_M=count_params(net.net) / 1e6, macs_G=macs / 1e9)
    return out, inputs


@pytest.mark.parametrize("which", ["dense", "pruned"])
def test_bench_tiny_dit_cpu(benchmark, one_thread, which):
    nets = _pair("DiT-D8/2", 4, "cpu", input_size=8, in_channels=1, num_classes=10)
    benchmark.group = "DiT-D8/2 cpu eager fp32 batch 16"
    out, _ = _bench(benchmark, nets[which], "cpu", "eager", "fp32", 16, warmup=5, rounds=20)
    assert out.shape == (16, 2, 8, 8) and torch.isfinite(out).all()


@pytest.fixture(scope="module")
def xl_pair():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return _pair("DiT-XL/2", 14, "cuda", input_size=32, in_channels=4, num_classes=1000)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["tf32", "bf16"])
@pytest.mark.parametrize("which", ["dense", "pruned"])
def test_bench_dit_xl2_gpu(benchmark, xl_pair, which, dtype):
    batch = 64  # bench/conf/eval: latency.batch
    net = xl_pair[which]
    benchmark.group = f"DiT-XL/2 cuda eager {dtype} batch {batch}"
    out, inputs = _bench(benchmark, net, "cuda", "eager", dtype, batch, warmup=10, rounds=20)
    assert out.shape == (batch, 8, 32, 32) and torch.isfinite(out).all()
    rec = benchmark_forward(net.net, inputs, "cuda", "eager", dtype, warmup=10, reps=20)
    benchmark.extra_info["cuda_events"] = {k: rec[k] for k in ("median_ms", "iqr_ms", "throughput_img_s",
                                                              "peak_mem_MB", "device", "torch")}
