"""Cost measurement: parameters, MACs (torch's FLOP counter) and latency.

MACs are counted by running the model once under torch.utils.flop_counter.FlopCounterMode
(matmul, conv and scaled-dot-product attention are counted; MACs = FLOPs / 2), so a pruned
model's cost is measured, never derived from the knob that produced it.

Latency (`benchmark_forward`) follows the suite's protocol (research/evaluation.md 3.5): explicit
mode (eager | torch.compile) and precision (fp32 | tf32 | bf16), warm-up that covers compilation,
the median of at least 20 timed calls (CUDA events on a GPU), IQR and p10/p90, throughput at the
measured batch, peak GPU memory, and the device / torch version that produced it. A speedup is a
ratio of two such records and only exists between records of the same device, mode, dtype and
batch (`speedup`).

A routed model (bench.routing, stage-wise plans) is measured stage by stage with the stage pinned:
params = what it stores (shared union + stage bank); MACs and blocks = the mean over stages
weighted by each stage's share of the sampler's network evaluations (the plan's ``weight``;
defaults to the width of the u range), which is what budgets are checked against; latency
likewise per stage (`routed_cost`, `stage_latency`). Its width stages gather the selected rows
per forward (Diff-ES does the same), which costs memory traffic but no MACs.
"""
from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from typing import Any, Callable, Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode

MODES = ("eager", "compile")
DTYPES = ("fp32", "tf32", "bf16")
MIN_REPS = 20          # protocol minimum of timed calls (evaluation.md 3.5: ">= 20 replicates")
MiB = 2 ** 20          # the *_MB fields are MiB, as torch.cuda.memory_summary prints them


def count_params(module: torch.nn.Module, trainable_only: bool = False) -> int:
    # frozen buffers-as-parameters (DiT's fixed pos_embed) count, as in the DiT paper's 675M;
    # works on meta tensors too (only shapes are read)
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # q k^T and attn v, as torch's own formula for the CUDA SDPA kernels (softmax not counted)
    from torch.utils.flop_counter import sdpa_flop_count
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _extra_formulas() -> dict:
    """SDPA kernels torch 2.14's FlopCounterMode has no formula for: on the CPU,
    F.scaled_dot_product_attention runs `_scaled_dot_product_flash_attention_for_cpu` and was
    counted as 0 (DiT-XL/2: 114.39 instead of 118.62 GMACs). Formulas torch already has win."""
    from torch.utils.flop_counter import flop_registry
    aten = torch.ops.aten
    ops = [getattr(aten, n, None) for n in ("_scaled_dot_product_flash_attention_for_cpu",
                                            "_scaled_dot_product_fused_attention_overrideable")]
    return {op: _sdpa_flops for op in ops if op is not None and op not in flop_registry}


@torch.no_grad()
def count_macs(fn, *args, **kwargs) -> int:
    """Multiply-accumulates of one call fn(*args, **kwargs) (matmuls, convolutions and attention's
    two matmuls on every device; elementwise ops, norms and softmax are not counted)."""
    with FlopCounterMode(display=False, custom_mapping=_extra_formulas()) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops() // 2


def _time_calls(fn: Callable[[], Any], warmup: int, reps: int, device: torch.device) -> list[float]:
    """Per-call times in ms after `warmup` untimed calls. CUDA: events around each call (device
    time of everything the call launched); CPU: perf_counter."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def interleave(fns: dict[str, Callable[[], Any]], device: str | torch.device, reps: int,
               shift: int = 0) -> dict[str, list[float]]:
    """One round of interleaved timings: `reps` timed calls of each fn in turn, through the same
    timer as benchmark_forward, the order rotated by `shift` (pass the round number) so that no fn
    always runs right after the same other one. Comparing fns within a round, round after round,
    cancels the drift (clock boost, heat, another job) that separate measurements put into a ratio
    (bench.speedup.paired_ratio). Returns {name: times in ms}; warm-up is the caller's."""
    names = list(fns)
    k = shift % len(names)
    device = torch.device(device)
    return {n: _time_calls(fns[n], 0, reps, device) for n in names[k:] + names[:k]}


@torch.no_grad()
def measure_latency(fn, warmup: int = 5, reps: int = 20, device: str | torch.device = "cpu") -> dict:
    """Median (and IQR) wall time of fn() in ms: warm-up first, then `reps` timed calls.
    On CUDA each call is bracketed by CUDA events (device time, asynchronous launches included).
    The caller owns precision, mode and inputs; `benchmark_forward` is the full protocol."""
    times = _time_calls(fn, warmup, reps, torch.device(device))
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median_ms": statistics.median(times), "iqr_ms": q[2] - q[0], "reps": reps, "warmup": warmup}


# --------------------------------------------------------------------------------------------
# Precision
# --------------------------------------------------------------------------------------------

def _fp32_precision_nodes():
    """(object, attribute) of every fp32-precision switch of torch's new API (torch >= 2.9),
    parents before children."""
    b = torch.backends
    nodes = [(b, "fp32_precision")]
    for backend in ("cuda", "cudnn", "mkldnn"):
        mod = getattr(b, backend, None)
        if backend != "cuda" and mod is not None and hasattr(mod, "fp32_precision"):
            nodes.append((mod, "fp32_precision"))
        for op in ("matmul", "conv", "rnn"):
            sub = getattr(mod, op, None) if mod is not None else None
            if sub is not None and hasattr(sub, "fp32_precision"):
                nodes.append((sub, "fp32_precision"))
    return [n for n in nodes if hasattr(*n)]


def _try(getter):
    try:
        return getter()
    except RuntimeError:  # torch >= 2.9 refuses to read a legacy flag after a mixed legacy/new set
        return None


def tf32_state() -> dict:
    """Every switch that decides whether fp32 matmuls/convs may use TF32 (for tests and records):
    the legacy flags (None where torch refuses to read them) and the new-API strings."""
    return {"matmul.allow_tf32": _try(lambda: torch.backends.cuda.matmul.allow_tf32),
            "cudnn.allow_tf32": _try(lambda: torch.backends.cudnn.allow_tf32),
            "float32_matmul_precision": _try(torch.get_float32_matmul_precision),
            **{f"{type(o).__name__}.{a}": getattr(o, a) for o, a in _fp32_precision_nodes()}}


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 for fp32 matmuls and cuDNN convolutions on (DiT's sample.py default) or off (strict
    IEEE fp32: note cuDNN convs default to TF32 *on*), restoring every switch on exit.

    Set through the legacy setters (allow_tf32, set_float32_matmul_precision), which keep the
    legacy and the new (torch >= 2.9 `fp32_precision`) API consistent; setting only the new API
    makes later reads of the legacy flags, which inductor still does, raise "mix of the legacy and
    new APIs". On exit the legacy values are restored first, then the new-API strings."""
    b = torch.backends
    legacy_mm = _try(torch.get_float32_matmul_precision)
    legacy_cudnn = _try(lambda: b.cudnn.allow_tf32)
    new = [(o, a, getattr(o, a)) for o, a in _fp32_precision_nodes()]
    saved = {o: v for o, a, v in new}
    try:
        torch.set_float32_matmul_precision("high" if enabled else "highest")
        b.cuda.matmul.allow_tf32 = enabled
        b.cudnn.allow_tf32 = enabled
        if not enabled and hasattr(b.cudnn, "conv"):  # legacy False means "inherit" (NONE): pin IEEE
            b.cudnn.conv.fp32_precision = b.cudnn.rnn.fp32_precision = "ieee"
        yield
    finally:
        # a legacy value torch refused to read contradicted the new API (a mixed state): the
        # contradiction is restored as it was, so the caller sees exactly what it had
        def effective(*chain):  # a "none" string inherits from its parent, then the global switch
            return next((saved[o] for o in chain if saved.get(o, "none") != "none"), "none")
        if legacy_mm is None:
            legacy_mm = "highest" if effective(b.cuda.matmul, b) == "tf32" else "high"
        torch.set_float32_matmul_precision(legacy_mm)
        if legacy_cudnn is None and hasattr(b.cudnn, "conv"):
            conv, rnn = effective(b.cudnn.conv, b.cudnn, b), effective(b.cudnn.rnn, b.cudnn, b)
            legacy_cudnn = (conv != "tf32") if conv == rnn else None
        if legacy_cudnn is not None:
            b.cudnn.allow_tf32 = legacy_cudnn
        for o, a, v in new:
            setattr(o, a, v)


def resolve_precision(dtype: str | None, device: str | torch.device) -> str:
    """A config's precision (fine-tune, sampling): null means DiT's own setting, TF32 on CUDA
    (DiT's train.py and sample_ddp.py enable it), strict fp32 elsewhere."""
    if dtype is None:
        return "tf32" if torch.device(device).type == "cuda" else "fp32"
    if dtype not in DTYPES:
        raise ValueError(f"unknown precision {dtype!r}; use one of {DTYPES}")
    return dtype


@contextlib.contextmanager
def precision(dtype: str, device: str | torch.device) -> Iterator[None]:
    """fp32: strict IEEE fp32 (TF32 off for matmuls and convs); tf32: TF32 on; bf16: autocast to
    bfloat16, with the ops autocast keeps in fp32 (norms, softmax) run at strict fp32."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {DTYPES}")
    device_type = torch.device(device).type
    with tf32(dtype == "tf32"), torch.autocast(device_type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
        yield


# --------------------------------------------------------------------------------------------
# The latency harness
# --------------------------------------------------------------------------------------------

def device_name(device: str | torch.device) -> str:
    """What a latency is comparable across: the GPU model, or the CPU arch and thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}-{torch.get_num_threads()}t"


def random_inputs(net, batch: int, device=None, seed: int = 0) -> tuple:
    """(x, t, y) for timing a Denoiser: Gaussian x, noise levels u ~ U(0, 1) in the process's own
    time, random labels; drawn on the CPU from `seed` so every method is timed on the same data.
    Never time on zeros (Denoiser.example_inputs): zero inputs can take fast paths."""
    g = torch.Generator().manual_seed(seed)
    n = net.net
    device = device or net.device
    x = torch.randn(batch, n.in_channels, n.input_size, n.input_size, generator=g)
    t = net.process.t_from_u(torch.rand(batch, generator=g).clamp(0.01, 0.99))
    y = torch.randint(max(1, net.num_classes), (batch,), generator=g)
    return x.to(device), t.to(device), y.to(device)


def _check_inputs(example_inputs: tuple, device: torch.device) -> int:
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise ValueError("example_inputs must be a non-empty tuple of tensors, e.g. (x, t, y)")
    for i, a in enumerate(example_inputs):
        if not isinstance(a, torch.Tensor):
            continue
        if a.device.type != device.type:
            raise ValueError(f"example_inputs[{i}] is on {a.device} but device={device}; move the inputs there")
        if a.is_floating_point() and a.numel() > 1 and not bool(a.ne(0).any()):
            raise ValueError(f"example_inputs[{i}] is all zeros: time on random inputs (torch.randn, "
                             "bench.metrics.cost.random_inputs); zeros can take fast paths")
    first = example_inputs[0]
    if not isinstance(first, torch.Tensor) or first.dim() == 0:
        raise ValueError("example_inputs[0] must be a batched tensor (its first dim is the batch)")
    return first.shape[0]


def make_runner(fn: Callable | torch.nn.Module, device: str | torch.device, mode: str = "eager",
                dtype: str = "fp32", compile_kwargs: dict | None = None) -> Callable:
    """runner(*inputs) = fn(*inputs) under inference_mode and `precision(dtype)`, compiled with
    torch.compile (mode="default", static shapes, one graph) when mode == "compile". Every call is
    self-contained: global precision flags are restored when it returns. The first call of a
    compiled runner compiles (seconds to minutes); later calls recompile on new shapes."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {DTYPES}")
    device = torch.device(device)
    if dtype == "tf32" and device.type != "cuda":
        raise ValueError("dtype='tf32' is a CUDA (Ampere or newer) mode; on the CPU use 'fp32' or 'bf16'")
    target = fn
    if mode == "compile":
        # dynamic=False: one static-shape graph per batch size (automatic dynamic shapes would
        # switch to a slower symbolic-shape graph at the second batch size); fullgraph=True: a
        # graph break fails loudly instead of timing a half-compiled model
        kw = {"mode": "default", "dynamic": False, "fullgraph": True, **(compile_kwargs or {})}
        target = torch.compile(fn, **kw)

    def runner(*inputs):
        with torch.inference_mode(), precision(dtype, device):
            return target(*inputs)

    runner.mode, runner.dtype, runner.device = mode, dtype, device
    return runner


def benchmark_forward(fn: Callable | torch.nn.Module, example_inputs: tuple, device: str | torch.device = "cpu",
                      mode: str = "eager", dtype: str = "fp32", batch: int | None = None,
                      warmup: int = 10, reps: int = MIN_REPS, *, allow_few: bool = False,
                      compile_kwargs: dict | None = None, fresh_compile: bool = True) -> dict:
    """Latency of one forward `fn(*example_inputs)` under the suite's protocol.

    fn:            an nn.Module (put in eval mode for the measurement, restored after) or a callable,
                   already on `device`; example_inputs: its (random, never all-zero) inputs on `device`.
    mode:          "eager" | "compile" (torch.compile mode="default", static shapes, fullgraph).
    dtype:         "fp32" (strict IEEE) | "tf32" (CUDA only) | "bf16" (autocast).
    batch:         images per call; defaults to example_inputs[0].shape[0] and must equal it.
    warmup, reps:  untimed then timed calls; the first warm-up call includes compilation (its
                   time is `first_call_s`); reps >= 20 unless allow_few=True (tests only).
    fresh_compile: torch._dynamo.reset() before compiling, so earlier compilations of the same
                   forward() (another model or batch) can't exhaust dynamo's recompile limit,
                   where it silently falls back to eager. Global: it drops every compiled graph.

    Returns median_ms, iqr_ms, p10_ms, p90_ms, mean_ms, min_ms, reps, warmup, batch,
    throughput_img_s (batch / median), peak_mem_MB and act_mem_MB (CUDA, MiB: max_memory_allocated
    during the timed calls, after a reset: every live allocation on the device, so weights and any
    other tensors the process holds there are included; act_mem_MB subtracts what was allocated
    before the timed calls, i.e. the transient activations and outputs;
    CPU: None, because RSS is neither resettable nor attributable to one call under a caching
    allocator), first_call_s, out_finite, mode, dtype, device (device_name), device_type,
    torch, cuda, and on CUDA the enabled SDPA backends.
    """
    if reps < MIN_REPS and not allow_few:
        raise ValueError(f"reps={reps} < {MIN_REPS}: the protocol times at least {MIN_REPS} calls "
                         "(allow_few=True is for tests only)")
    if reps < 1 or warmup < 1:
        raise ValueError("reps and warmup must be >= 1 (the first warm-up call compiles in compile mode)")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    n = _check_inputs(example_inputs, device)
    if batch is None:
        batch = n
    elif batch != n:
        raise ValueError(f"batch={batch} but example_inputs[0] has batch {n}")
    if mode == "compile" and fresh_compile:
        torch._dynamo.reset()
    runner = make_runner(fn, device, mode, dtype, compile_kwargs)

    module = fn if isinstance(fn, torch.nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    try:
        t0 = time.perf_counter()
        try:
            first = runner(*example_inputs)  # compiles in compile mode
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except Exception as e:
            if mode == "compile":
                raise RuntimeError(f"torch.compile failed on {device_name(device)}: {type(e).__name__}: {e}\n"
                                   "use mode='eager', or compile_kwargs={'fullgraph': False} if the model has "
                                   "graph breaks") from e
            raise
        first_call_s = time.perf_counter() - t0
        out_finite = bool(torch.isfinite(first).all()) if isinstance(first, torch.Tensor) else None
        del first
        base = 0
        if device.type == "cuda":
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        with OtherLoad() as load:
            times = _time_calls(lambda: runner(*example_inputs), warmup - 1, reps, device)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    finally:
        if module is not None:
            module.train(was_training)
    times_sorted = sorted(times)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    d = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    med = statistics.median(times)
    rec = {
        "median_ms": med, "iqr_ms": q[2] - q[0], "p10_ms": d[0], "p90_ms": d[8],
        "mean_ms": statistics.fmean(times), "min_ms": times_sorted[0],
        "reps": reps, "warmup": warmup, "batch": int(batch), "throughput_img_s": batch / med * 1e3,
        "peak_mem_MB": peak / MiB if peak is not None else None,
        "act_mem_MB": (peak - base) / MiB if peak is not None else None,
        "first_call_s": first_call_s, "out_finite": out_finite,
        "mode": mode, "dtype": dtype, "device": device_name(device), "device_type": device.type,
        "torch": torch.__version__, "cuda": torch.version.cuda if device.type == "cuda" else None,
        "others_cores": load.cores,
        "shared_device": shared_device(),
    }
    rec["flags"] = latency_flags(rec)
    if device.type == "cuda":
        cb = torch.backends.cuda
        rec["sdpa_enabled"] = [k for k, on in (("flash", cb.flash_sdp_enabled()),
                                               ("mem_efficient", cb.mem_efficient_sdp_enabled()),
                                               ("cudnn", cb.cudnn_sdp_enabled()),
                                               ("math", cb.math_sdp_enabled())) if on]
    return rec


SPREAD_MAX = 0.20  # IQR / median above this: the timings disagree too much to compare (CPU suite rows: <= 0.15)


def busy_cores_max() -> float:
    """Cores other processes may use during a timing before it is flagged busy: half a core, or a
    quarter of a large machine (a shared node always has some background)."""
    return max(0.5, 0.25 * (os.cpu_count() or 1))


class OtherLoad:
    """CPU used by *other* processes while the block runs, in cores (Linux /proc/stat minus this
    process's own user+system time); None where /proc/stat is unavailable. A timing taken while
    another job computes is not a clean timing (a model measured at 6.4 ms alone took 830 ms beside
    another job), and the 1-minute load average lags by minutes, so it is measured over the block."""

    def __enter__(self):
        self.cores = None
        self._t0, self._busy0, self._own0 = time.perf_counter(), self._busy(), self._own()
        return self

    def __exit__(self, *exc):
        busy1 = self._busy()
        wall = time.perf_counter() - self._t0
        if self._busy0 is not None and busy1 is not None and wall > 0:
            others = (busy1 - self._busy0) - (self._own() - self._own0)
            self.cores = max(0.0, others / wall)
        return False

    @staticmethod
    def _busy() -> float | None:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        # user nice system idle iowait irq softirq steal: everything but idle and iowait
        return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system


def shared_device() -> int:
    """How many processes share this device by design ($BENCH_SHARED_DEVICE: bench/gpu/tier.sh's
    TIER_WORKERS runs rows concurrently on one GPU); 1 when unset."""
    from bench.api import BenchError

    v = os.environ.get("BENCH_SHARED_DEVICE", "1")
    try:
        return max(1, int(v))
    except ValueError:
        raise BenchError(f"BENCH_SHARED_DEVICE={v!r}: give the number of processes sharing the device (1: none)") from None


def latency_flags(rec: dict) -> list[str]:
    """Why a timing cannot be trusted: "spread" (IQR / median > SPREAD_MAX), "busy" (other processes
    used more than busy_cores_max() cores while it ran) and/or "shared" (taken while other workers
    shared the device by design: BENCH_SHARED_DEVICE > 1, whose load on the GPU no CPU probe sees).
    Reports compute no speedup from a flagged timing (the one-process latency pass replaces it)."""
    flags = []
    if rec["median_ms"] > 0 and rec["iqr_ms"] / rec["median_ms"] > SPREAD_MAX:
        flags.append("spread")
    if rec.get("others_cores") is not None and rec["others_cores"] > busy_cores_max():
        flags.append("busy")
    if (rec.get("shared_device") or 1) > 1:
        flags.append("shared")
    return flags


COMPARABLE = ("device", "mode", "dtype", "batch")


def speedup(base: dict, other: dict) -> float:
    """How many times faster `other` runs than `base` (base median / other median). Refuses
    records that differ in device, mode, dtype or batch: such a ratio measures the setting, not
    the pruning."""
    diff = [k for k in COMPARABLE if base.get(k) != other.get(k)]
    if diff:
        raise ValueError("speedup needs records of the same " + ", ".join(COMPARABLE) + "; these differ in "
                         + ", ".join(f"{k} ({base.get(k)!r} vs {other.get(k)!r})" for k in diff))
    return base["median_ms"] / other["median_ms"]


# --------------------------------------------------------------------------------------------
# Routed (stage-wise) models: one measurement per stage, weighted by the stages' NFE shares
# --------------------------------------------------------------------------------------------

def routed_cost(net) -> dict:
    """Params stored (shared union + stage bank), and per stage MACs (batch 1) and blocks; 'macs'
    and 'blocks' are the stage-weighted means (what budgets check), 'params' is what the routed
    model stores (bench.surgery.measure of a routed model)."""
    from bench.routing import router, t_in_stage

    r = router(net)
    x, _, y = net.example_inputs(1)
    was = net.net.training
    net.net.eval()
    macs = []
    try:
        for s in range(r.num_stages):
            t = t_in_stage(net.process, r.edges, s, 1, x.device)
            with r.pin(s):
                macs.append(count_macs(net.net, x, t, y))
    finally:
        net.net.train(was)
    blocks = [len(p) for p in r.positions]
    w = r.weights
    bank = getattr(net.net, "stage_bank", None)
    return {"params": count_params(net.net), "macs": sum(a * b for a, b in zip(w, macs)),
            "blocks": sum(a * b for a, b in zip(w, blocks)), "stage_macs": macs, "stage_blocks": blocks,
            "stage_weights": list(w), "stored_blocks": len(net.net.blocks),
            "stage_bank_params": count_params(bank) if bank is not None else 0}


def stage_latency(net, batch: int, device, mode: str = "eager", dtype: str = "fp32", warmup: int = 5,
                  reps: int = 20, allow_few: bool = False) -> dict:
    """Forward latency of each stage (every sample's t in that stage), through the suite's
    harness. Eager runs the routed forward as sampling does (routing decision included);
    compile pins the stage so each stage is one static graph. Returns the per-stage records and
    the trajectory-weighted mean median (weights = the stages' shares of the sampler's NFEs)."""
    from bench.routing import router, t_in_stage

    r = router(net)
    recs = []
    for s in range(r.num_stages):
        x, _, y = random_inputs(net, batch, device)
        t = t_in_stage(net.process, r.edges, s, batch, device)
        with r.pin(s if mode == "compile" else None):
            recs.append(benchmark_forward(net.net, (x, t, y), device, mode, dtype, warmup=warmup, reps=reps,
                                          allow_few=allow_few))
    w = r.weights
    mean = sum(a * rec["median_ms"] for a, rec in zip(w, recs))
    return {"records": recs, "weights": list(w), "median_ms": mean,
            "iqr_ms": sum(a * rec["iqr_ms"] for a, rec in zip(w, recs)),
            "throughput_img_s": batch / mean * 1e3,
            "peak_mem_MB": max((rec["peak_mem_MB"] for rec in recs if rec["peak_mem_MB"] is not None), default=None),
            "mode": mode}
