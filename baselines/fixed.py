"""Fixed depth patterns: remove the first k, the last k, or k evenly spaced blocks.

k = depth - surgery.blocks_to_keep(net, budget). Patterns (model order, 0-based):
  first   remove blocks 0 .. k-1
  last    remove blocks depth-k .. depth-1
  stride  split the depth into k equal segments and remove the block at each segment's centre:
          removed_j = floor((j + 1/2) * depth / k), j = 0..k-1, i.e. the floor of
          np.linspace(depth/(2k), depth - depth/(2k), k), computed in integer arithmetic
          ((2j+1)*depth // (2k)) so centres that fall on an integer never round the wrong way.
          Depth 8 keep 4 removes [1, 3, 5, 7] (every other block, a fixed 1:2 pattern as in
          TinyFusion's 1:2 groups); depth 4 keep 2 removes [1, 3]; depth 8 keep 6 removes [2, 6].
          Segments are >= 1 block wide, so the removed blocks are always distinct.

Source: methods.md section 8 ("First-k removed / last-k removed", "Uniform-stride", [A]); the
fixed references a learned or scored depth pattern must beat (TinyFusion, arXiv 2412.01199, finds
DiT's first and last blocks sensitive, so first/last-k are expected to be poor). Data-free.
Scores are a ranking that encodes the pattern (removed blocks 0..k-1, kept blocks k..depth-1,
each in model order), so keep_top reproduces the plan and plots still show the decision.

Under several ranks (torchrun, a SLURM job of several tasks): plan() runs on rank 0 alone and
the run broadcasts the Plan to the others (bench.run); its forwards over the calibration probes
are not split over ranks.
"""
from __future__ import annotations

from bench.api import BenchError, Budget, Method, Plan
from bench.surgery import blocks_to_keep, keep_top

PATTERNS = ("first", "last", "stride")


def removed_blocks(pattern: str, depth: int, k: int) -> list[int]:
    if pattern == "first":
        return list(range(k))
    if pattern == "last":
        return list(range(depth - k, depth))
    return [(2 * j + 1) * depth // (2 * k) for j in range(k)]


class FixedPattern(Method):
    granularity = "block"

    def __init__(self, pattern: str = "stride"):
        if pattern not in PATTERNS:
            raise BenchError(f"pattern={pattern!r} is unknown; use one of {', '.join(PATTERNS)}")
        self.pattern = pattern  # which k blocks go: first | last | stride (evenly spaced)

    def plan(self, net, budget: Budget, calib) -> Plan:
        depth = net.units("block")["blocks"]
        n = blocks_to_keep(net, budget)
        removed = removed_blocks(self.pattern, depth, depth - n)
        order = removed + [i for i in range(depth) if i not in removed]  # least important first
        scores = [0.0] * depth
        for rank, i in enumerate(order):
            scores[i] = float(rank)
        kept = keep_top(scores, n)
        return Plan(granularity="block", keep={"blocks": kept}, scores={"blocks": scores},
                    meta={"method": f"fixed_{self.pattern}", "pattern": self.pattern, "removed": removed})
