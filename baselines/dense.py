"""Dense: the unpruned model, the reference row of every table.

Source: every pruning paper's first row (e.g. DiT-XL/2 in TinyFusion Table 1, arXiv 2412.01199).
Our choice: it is a Method like any other so the dense row goes through the same
plan -> surgery -> fine-tune -> sample -> score spine; it only accepts budget.keep=1.0, since a
"dense" row that pruned anything would be mislabelled.

Under several ranks (torchrun, a SLURM job of several tasks): rank 0 makes the Plan and the run
broadcasts it (bench.run).
"""
from __future__ import annotations

from bench.api import BenchError, Budget, Method, Plan
from bench.surgery import blocks_to_keep, keep_top


class Dense(Method):
    granularity = "block"

    def plan(self, net, budget: Budget, calib) -> Plan:
        if budget.keep < 1.0:
            raise BenchError(f"the dense baseline keeps every block; it takes budget.keep=1.0, not {budget.keep}")
        depth = net.units("block")["blocks"]
        scores = [1.0] * depth  # all equally important: nothing is removed
        kept = keep_top(scores, blocks_to_keep(net, budget))
        return Plan(granularity="block", keep={"blocks": kept}, scores={"blocks": scores}, meta={"method": "dense"})
