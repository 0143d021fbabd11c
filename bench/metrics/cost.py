"""Cost measurement: parameters, MACs (torch's FLOP counter) and latency.

MACs are counted by running the model once under torch.utils.flop_counter.FlopCounterMode
(matmul, conv and scaled-dot-product attention are counted; MACs = FLOPs / 2), so a pruned
model's cost is measured, never derived from the knob that produced it.
"""
from __future__ import annotations

import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_params(module: torch.nn.Module, trainable_only: bool = False) -> int:
    # frozen buffers-as-parameters (DiT's fixed pos_embed) count, as in the DiT paper's 675M
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def count_macs(fn, *args, **kwargs) -> int:
    """Multiply-accumulates of one call fn(*args, **kwargs)."""
    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops() // 2


@torch.no_grad()
def measure_latency(fn, warmup: int = 5, reps: int = 20, device: str | torch.device = "cpu") -> dict:
    """Median (and IQR) wall time of fn() in ms: warm-up first, then `reps` timed calls.
    On CUDA each call is bracketed by CUDA events (device time, asynchronous launches included)."""
    device = torch.device(device)
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
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median_ms": statistics.median(times), "iqr_ms": q[2] - q[0], "reps": reps, "warmup": warmup}
