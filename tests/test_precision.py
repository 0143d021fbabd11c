"""Precision and compilation as config (fine-tune, sampling); the sampler's noise without per-step host loops."""
from __future__ import annotations

import pytest
import torch

from bench.data import TensorDataset
from bench.finetune import FinetuneConfig, finetune
from bench.models import build
from bench.sample import PerSampleNoise, generate


def _net(seed=0):
    from bench.gpu.speed import randomize_zero_init_

    torch.manual_seed(seed)
    net = build("DiT-T/2", input_size=8, in_channels=1, num_classes=10)
    randomize_zero_init_(net.net)  # adaLN-Zero gates are 0 at init: the output would not depend on the math
    return net


def _data(n=32):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.randint(10, (n,), generator=g), 10, "r")


@pytest.mark.parametrize("shape", [(1, 8, 8), (4, 32, 32), (1, 7, 7)])
def test_chunked_noise_is_the_per_step_stream(shape):
    """Drawing 32 steps at once per sample gives exactly the per-step draws (16-aligned sizes), and
    other sizes fall back to per-step draws: sample i's noise never depends on the chunking."""
    x = torch.empty(3, *shape)
    a, b = PerSampleNoise([5, 6, 7], chunk=32), PerSampleNoise([5, 6, 7], chunk=1)
    for _ in range(40):  # across a chunk boundary
        assert torch.equal(a(x), b(x))


def test_sample_i_is_the_same_whatever_the_batch():
    net = _net()
    a, ya = generate(net, 6, 0, 6, "ddpm", 4, 1.5)
    b, yb = generate(net, 6, 0, 4, "ddpm", 4, 1.5)
    assert torch.equal(ya, yb)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # batch 6 vs 4+2: GEMM summation order only


def test_bf16_sampling_changes_the_network_not_the_noise():
    """bf16 autocast runs the forward in bfloat16 (outputs differ slightly), same labels and x_T."""
    net = _net()
    a, ya = generate(net, 4, 0, 4, "ddpm", 3, 1.5, precision="fp32")
    b, yb = generate(net, 4, 0, 4, "ddpm", 3, 1.5, precision="bf16")
    assert torch.equal(ya, yb) and a.dtype == b.dtype == torch.float32
    rel = ((a - b).abs().max() / a.abs().max()).item()  # a random model's samples are far outside [-1, 1]
    assert 0 < rel < 1e-2, rel


def test_bf16_finetune_keeps_fp32_master_weights_and_ema(tmp_path):
    data = _data()
    fp32 = finetune(_net(), data, FinetuneConfig(steps=3, batch=8, precision="fp32"), tmp_path / "a")
    bf16 = finetune(_net(), data, FinetuneConfig(steps=3, batch=8, precision="bf16"), tmp_path / "b")
    assert all(p.dtype == torch.float32 for p in bf16.net.parameters())
    state = torch.load(tmp_path / "b" / "final.pt", weights_only=False)
    assert all(v.dtype == torch.float32 for v in state["ema"].values() if v.is_floating_point())
    moved = max((p - q).abs().max().item() for p, q in zip(fp32.net.parameters(), bf16.net.parameters()))
    assert 0 < moved < 1e-2  # the same updates up to bfloat16 rounding of the forward


def test_rows_record_precision_and_compile(tiny_cfg, monkeypatch):
    from bench.models import denoiser
    from bench.run import execute

    row = execute(tiny_cfg("first_k", ["finetune.precision=bf16", "eval.precision=bf16"]))
    assert (row.finetune_precision, row.eval_precision, row.finetune_compile, row.eval_compile) == \
        ("bf16", "bf16", False, False)
    monkeypatch.setattr(denoiser, "_BLOCK_CALL", lambda block, h, c: block(h, c))  # no inductor on the CPU here
    row = execute(tiny_cfg("last_k", ["finetune.compile=blocks", "eval.compile=blocks"]))
    assert (row.finetune_compile, row.eval_compile) == ("blocks", "blocks")
    default = execute(tiny_cfg("first_k"))
    assert (default.finetune_precision, default.eval_precision) == ("fp32", "fp32")  # null on the CPU: fp32


def test_resolve_precision_defaults_to_tf32_on_cuda_only():
    from bench.metrics.cost import resolve_precision

    assert resolve_precision(None, "cuda") == "tf32" and resolve_precision(None, "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16", "cpu")


@pytest.mark.slow
@pytest.mark.parametrize("mode", [True, "blocks"])
def test_compiled_sampling_equals_eager(request, mode):
    """torch.compile of the backbone (true) or of each block (blocks, regional): the same samples within
    float tolerance (CPU inductor, slow)."""
    if not request.config.getoption("-m") or "slow" not in request.config.getoption("-m"):
        pytest.skip("torch.compile on the CPU takes ~40 s cold; run with -m slow")
    from torch._dynamo.utils import counters

    from bench.api import Plan
    from bench.surgery import apply

    net = _net()
    a, _ = generate(net, 4, 0, 4, "ddpm", 3, 1.5)
    counters.clear()
    b, _ = generate(net, 4, 0, 4, "ddpm", 3, 1.5, compile=mode)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    if mode == "blocks":  # one graph serves every block, and a depth-pruned model compiles nothing new
        assert counters["stats"]["unique_graphs"] == 1
        apply(net, Plan("block", {"blocks": [0, 2]}))
        generate(net, 4, 0, 4, "ddpm", 3, 1.5, compile=mode)
        assert counters["stats"]["unique_graphs"] == 1


def test_regional_compile_routes_every_block_through_one_call(monkeypatch, tmp_path):
    """compile=blocks: the DiT's blocks run through one shared call (bench.models.denoiser.regional_call,
    here a recording stand-in for torch.compile's function) during sampling and fine-tuning, with the same
    outputs, and the backbone is eager again afterwards. The block is the call's argument, so a deepcopy
    (EMA, a method's candidate) runs its own weights."""
    import copy

    from bench.api import BenchError
    from bench.models import denoiser

    seen = []

    def call(block, h, c):
        seen.append(block)
        return block(h, c)

    monkeypatch.setattr(denoiser, "_BLOCK_CALL", call)
    net = _net()
    a, _ = generate(net, 4, 0, 4, "ddim", 3, 1.5)
    assert seen == []
    b, _ = generate(net, 4, 0, 4, "ddim", 3, 1.5, compile="blocks")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert len(seen) == 3 * len(net.net.blocks)  # 3 steps x blocks (guidance: cond and uncond in one forward)
    assert net.net.block_fn is None
    seen.clear()
    with net.compiled("blocks"):
        twin = copy.deepcopy(net.net)
        x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 9]), torch.tensor([1, 2])
        twin(x, t, y)
    assert seen == list(twin.blocks) and all(s is not o for s, o in zip(seen, net.net.blocks))
    seen.clear()
    finetune(net, _data(), FinetuneConfig(steps=2, batch=8, ckpt_every=10, log_every=10, compile="blocks"), tmp_path)
    assert len(seen) == 2 * len(net.net.blocks) and net.net.block_fn is None
    with pytest.raises(BenchError, match="give false, true .*or blocks"):
        denoiser.compile_mode("block")


def test_the_compile_setting_is_checked_early():
    from bench.checks import COMPILE

    assert [COMPILE.problem(v) for v in (False, True, "blocks")] == [None] * 3
    assert all(COMPILE.problem(v) for v in ("block", 1, 0, "true"))


def test_finetune_graph_says_where_it_does_not_apply_and_runs_the_eager_step(tmp_path):
    """finetune.graph (bench.graphed) needs CUDA, one process, no callback, no distillation, no compile; elsewhere
    the loop runs the eager step (the same weights as without the switch) and its log says why. The recorded
    graphs themselves need a GPU: `python -m bench.gpu.tier measure --graph` compares them with eager there."""
    import json

    from bench import graphed

    data = _data()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    on = finetune(_net(), data, FinetuneConfig(steps=3, batch=8, graph=True), tmp_path / "a", run_dir=run_dir)
    off = finetune(_net(), data, FinetuneConfig(steps=3, batch=8), tmp_path / "b")
    assert all(torch.equal(a, b) for a, b in zip(on.net.state_dict().values(), off.net.state_dict().values()))
    [ev] = [e for e in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if e["event"] == "finetune_graph"]
    assert ev["used"] is False and "not CUDA" in ev["why"]
    assert graphed.why_not("cuda", None, 0.0, False) is None
    assert "callback" in graphed.why_not("cuda", object(), 0.0, False)
    assert "distillation" in graphed.why_not("cuda", None, 0.7, False)
    assert "compile" in graphed.why_not("cuda", None, 0.0, "blocks")


def test_finetune_graph_is_not_in_the_runs_config_hash():
    """How a step runs is not what it computes: a run made with finetune.graph on or off is one run (its folder
    and the tier's done rows stay), while a setting that changes the result changes the hash."""
    from bench.results import config_hash

    cfg = {"seed": 0, "finetune": {"steps": 300, "lr": 5e-4, "graph": False}}
    assert config_hash(cfg) == config_hash({**cfg, "finetune": {**cfg["finetune"], "graph": True}})
    assert config_hash(cfg) == config_hash({**cfg, "finetune": {"steps": 300, "lr": 5e-4}})
    assert config_hash(cfg) != config_hash({**cfg, "finetune": {**cfg["finetune"], "lr": 1e-4}})


def test_graph_agreement_compares_whole_fine_tunes_weight_for_weight():
    """bench.gpu.tier's check of finetune.graph: on the CPU both runs are eager, so every weight is equal."""
    from bench.gpu.tier import graph_agreement

    net = _net()
    got = graph_agreement(net, _data(), FinetuneConfig(batch=8, precision="fp32"), "cpu", steps=2)
    n = len(net.net.state_dict())
    assert got["eager_vs_eager"] == got["graph_vs_eager"] == {"equal": n, "of": n, "max_abs_diff": 0.0}
