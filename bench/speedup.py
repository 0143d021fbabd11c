"""When a measured speedup says something: its interval, and the launch-bound rule.

A speedup is a ratio of two forward latencies, dense / pruned, on one device, mode, dtype and
batch (bench.metrics.cost.speedup). The reports (bench.report) and the speedup gate (bench.gate)
read it through this module, under two rules:

* **Indistinguishable from 1.** A speedup carries a 95 % interval; when the interval contains 1 the
  timings cannot tell the pruned model from the dense one, and the report marks the speedup "≈1"
  (tables) and draws its point hollow (figures). Rows of a results set were timed in separate runs,
  so their interval comes from each row's own repeated timings (median, IQR and count of the timed
  calls: `interval_from_rows`); the gate times the pair interleaved in one process, round after
  round, and takes the interval of the per-round ratios (`paired_ratio`), which cancels drift that
  separate runs put into their ratio. The report has that option too: bench.latency_pass rebuilds every
  row's final architecture and times them all interleaved with the dense model in one process per
  table (the gate's harness); when its latency_pass.json is in the runs folder, a line's speedup is the
  geometric mean of its rows' paired ratios and its interval the envelope of theirs.
* **Launch-bound.** On a GPU, when the dense forward takes less than LAUNCH_BOUND_MS, the forward
  is dominated by kernel launches and host overhead, not by the work pruning removes: the ratio
  follows the number of launched kernels and the machine's state, not the pruned MACs. The report
  leaves such speedups out (blank cells, a note naming the dense time; the figure's speedup panel
  says why and the keep-MACs panel still shows the group). Anchors, DiT-XL/2 shape, half depth
  (MAC ratio 2.00; results/gpu/speed_dit_xl2_depth.md, H100): bf16 eager with a dense forward of
  17.3 ms (batch 1) gave 2.18x, above the MAC bound; compiled bf16 at 15.0 / 12.0 ms (batch 1 / 16)
  gave 1.39x / 1.31x where batch 256 gives 2.01x; from 20.6 ms on (eager bf16, batch 16) the
  speedups are 1.89-1.99x. The default suite's tiny DiT takes 2-7 ms a forward on an H200 and its
  speedups spread over 0.95-2.7x for models of identical cost. A CPU runs kernels synchronously with
  no launch queue, so the rule applies to GPUs only.
"""
from __future__ import annotations

import math
import statistics

LAUNCH_BOUND_MS = 20.0  # a GPU dense forward shorter than this is launch-bound (anchors above)
CONF = 0.95             # two-sided level of every speedup interval
INDISTINGUISHABLE = "≈1"
LAUNCH_BOUND = "launch-bound"


def _z(conf: float) -> float:
    return statistics.NormalDist().inv_cdf(0.5 + conf / 2)


def is_gpu(device: str) -> bool:
    """A row's `device` (bench.metrics.cost.device_name): 'cpu-<arch>-<n>t' on the CPU, else the GPU's name."""
    return not str(device).startswith("cpu")


def launch_bound(dense_ms: float, device: str) -> bool:
    """The launch-bound rule (module docstring): a GPU dense forward under LAUNCH_BOUND_MS."""
    return is_gpu(device) and math.isfinite(dense_ms) and dense_ms < LAUNCH_BOUND_MS


def median_rel_se(median_ms: float, iqr_ms: float, reps: int) -> float:
    """Relative standard error of the median of `reps` timings, from their IQR: sigma ~ IQR / 1.349
    (normal) and SE(median) ~ sqrt(pi / 2) * sigma / sqrt(n), the median's asymptotic variance."""
    if not (median_ms > 0 and reps > 0) or not math.isfinite(iqr_ms):
        return float("nan")
    return math.sqrt(math.pi / 2) * (iqr_ms / 1.349) / math.sqrt(reps) / median_ms


def ratio_interval(ratio: float, rel_se_a: float, rel_se_b: float, conf: float = CONF) -> tuple[float, float]:
    """Interval of a = b * ratio's ratio a / b from the relative standard errors of a and b
    (independent; normal on the log scale, where a ratio's errors add)."""
    se = math.hypot(rel_se_a, rel_se_b)
    if not (math.isfinite(ratio) and math.isfinite(se)) or ratio <= 0:
        return float("nan"), float("nan")
    h = _z(conf) * se
    return ratio * math.exp(-h), ratio * math.exp(h)


def line_rel_se(latency_ms, iqr_ms, reps) -> float:
    """Relative SE of the mean latency of one table line (one row per seed): the larger of the
    rows' own timing noise (pooled, over sqrt(n)) and the spread between the rows (std / sqrt(n)),
    which also holds what changed between their runs (machine state, clocks)."""
    lat = [float(x) for x in latency_ms]
    n = len(lat)
    mean = sum(lat) / n
    within = [median_rel_se(m, i, int(r) if r and r > 0 else 20)  # rows before latency_reps: 20 calls
              for m, i, r in zip(lat, iqr_ms, reps)]
    se = math.sqrt(sum(w * w for w in within) / n) / math.sqrt(n)
    if n >= 2 and mean > 0:
        se = max(se, statistics.stdev(lat) / mean / math.sqrt(n))
    return se


def paired_ratio(base_rounds: list[list[float]], other_rounds: list[list[float]], conf: float = CONF) -> dict:
    """Speedup of `other` over `base` from interleaved rounds (bench.metrics.cost.interleave): each
    round's ratio of medians (base / other), then a t interval of their mean on the log scale. The
    point estimate is the geometric mean of the per-round ratios. One round gives no interval."""
    if len(base_rounds) != len(other_rounds) or not base_rounds:
        raise ValueError("paired_ratio needs the same number (>= 1) of rounds for both models")
    return _log_interval([math.log(statistics.median(b) / statistics.median(o)) for b, o in zip(base_rounds, other_rounds)],
                         conf)


def weighted_ratio(stage_round_ratios: list[list[float]], weights: list[float], conf: float = CONF) -> dict:
    """Speedup of a routed (stage-wise) model over `base` from each stage's per-round ratios (paired_ratio's
    round_ratios, base / stage, the stages timed in the same rounds): per round, base over the weighted
    mean of the stages' times, 1 / sum_s w_s / r_s (the weights: the stages' shares of the sampler's
    NFEs, which sum to 1, as bench.metrics.cost.stage_latency weighs the row's own stage latencies);
    then paired_ratio's interval over the rounds."""
    if not stage_round_ratios or len(stage_round_ratios) != len(weights):
        raise ValueError("weighted_ratio needs one list of round ratios per stage weight")
    n = {len(r) for r in stage_round_ratios}
    if len(n) != 1 or 0 in n:
        raise ValueError("weighted_ratio needs the same number (>= 1) of rounds for every stage")
    total = sum(weights)
    return _log_interval([-math.log(sum(w / total / r for w, r in zip(weights, rs))) for rs in zip(*stage_round_ratios)],
                         conf)


def _log_interval(logs: list[float], conf: float) -> dict:
    """Geometric mean of per-round ratios (given as logs) and the t interval of their mean on the log scale."""
    n = len(logs)
    mean = sum(logs) / n
    if n < 2:
        return {"ratio": math.exp(mean), "lo": 0.0, "hi": float("inf"), "rounds": n, "round_ratios": [math.exp(mean)]}
    from scipy.stats import t

    h = float(t.ppf(0.5 + conf / 2, n - 1)) * statistics.stdev(logs) / math.sqrt(n)
    return {"ratio": math.exp(mean), "lo": math.exp(mean - h), "hi": math.exp(mean + h), "rounds": n,
            "round_ratios": [math.exp(v) for v in logs]}


def contains_one(lo: float, hi: float) -> bool:
    return math.isfinite(lo) and math.isfinite(hi) and lo <= 1.0 <= hi


def verdict(lo: float, hi: float, dense_ms: float, device: str) -> str:
    """'' (a speedup to read), LAUNCH_BOUND or INDISTINGUISHABLE (its interval contains 1)."""
    if launch_bound(dense_ms, device):
        return LAUNCH_BOUND
    return INDISTINGUISHABLE if contains_one(lo, hi) else ""
