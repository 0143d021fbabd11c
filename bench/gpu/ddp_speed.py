"""Is the data-parallel code path with one rank as fast as the plain one? Per-step time of the suite's
fine-tune loop (bench.finetune through bench.steptime's S1/S2 difference) without a process group
(the plain loop) and with one (DDP around the backbone, a one-rank all-reduce per step, the
global-loss all-reduce), alternated in one process on one device so drift shows:

    plain, DDP, plain, DDP, ...     (the group is joined before each DDP round and left after it)

    python -m bench.gpu.ddp_speed --out results/gpu/ddp_speed          # cuda, DiT-XL/2 shape (14 blocks), batch 64
    python -m bench.gpu.ddp_speed --out /tmp/ddp --smoke               # tiny DiT on the CPU (gloo), seconds

Output: ddp_speed.json (every timing) and ddp_speed.md (median per path and the DDP / plain ratio).
"""
from __future__ import annotations

import json
import os
import socket
import statistics
import sys
from pathlib import Path


# S2 - S1 = 40 steps (~8 s at tf32): a run's setup and final EMA save (1.4 GB, ~0.5 s +- 0.3 s) cancel
# in the difference only on average, so a 10-step difference was +-30 % on the H100
GPU = dict(model="DiT-XL/2", input_size=32, in_channels=4, num_classes=1000, depth=14, batch=64, steps=(5, 45),
           precisions=("tf32", "bf16"), rounds=3)
SMOKE = dict(model="DiT-T/2", input_size=8, in_channels=4, num_classes=10, depth=2, batch=4, steps=(2, 4),
             precisions=("fp32",), rounds=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_round(p: dict, device: str, precision: str, ddp: bool) -> dict:
    from bench import dist, steptime

    if ddp:  # a one-rank group, as `torchrun --nproc-per-node=1` makes it
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
        dist.init(device)
        assert dist.active() and dist.world() == 1
    try:
        net = steptime.random_model({"name": p["model"], "input_size": p["input_size"],
                                     "in_channels": p["in_channels"], "num_classes": p["num_classes"],
                                     "depth": p["depth"]}, device)
        rec = steptime.finetune_step_s(net, p["batch"], device, precision, False, p["steps"])
    finally:
        if ddp:
            dist.close()
            for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
                os.environ.pop(k, None)
    return {**rec, "ddp": ddp}


def render(meta: dict, recs: list[dict]) -> str:
    from bench.tables import markdown_table

    rows = []
    for prec in dict.fromkeys(r["precision"] for r in recs):
        med = {d: statistics.median(r["per_step_s"] for r in recs if r["precision"] == prec and r["ddp"] == d)
               for d in (False, True)}
        each = {d: ", ".join(f"{1e3 * r['per_step_s']:.1f}" for r in recs if r["precision"] == prec and r["ddp"] == d)
                for d in (False, True)}
        rows.append([prec, f"{1e3 * med[False]:.1f} ({each[False]})", f"{1e3 * med[True]:.1f} ({each[True]})",
                     f"{med[True] / med[False]:.3f}"])
    return "\n".join([f"# The data-parallel fine-tune path with one rank vs the plain loop ({meta['model']}, "
                      f"{meta['depth']} blocks, batch {meta['batch']}, {meta['device']})", "",
                      f"commit {meta['commit']}, torch {meta['torch']}; `{meta['command']}`", "",
                      "Per-step ms of bench.finetune (S1/S2 difference, bench.steptime), median of the rounds "
                      "(each round in brackets, in the order run: plain and DDP alternate in one process).", "",
                      markdown_table(["precision", "plain ms/step", "DDP N=1 ms/step", "DDP / plain"], rows), ""])


def main(argv=None) -> int:
    from bench.gpu import script
    from bench.io import atomic_write_text

    args, device, meta = script(__doc__, "bench.gpu.ddp_speed", argv)
    if device is None:
        return 2
    p = SMOKE if args.smoke else GPU
    out = Path(args.out)
    meta = {"model": p["model"], "depth": p["depth"], "batch": p["batch"], **meta}
    recs: list[dict] = []
    for prec in p["precisions"]:
        for _ in range(p["rounds"]):
            for ddp in (False, True):
                recs.append({k: v for k, v in one_round(p, device, prec, ddp).items()})
                print(json.dumps(recs[-1]), flush=True)
                atomic_write_text(out / "ddp_speed.json", json.dumps({"meta": meta, "records": recs}, indent=1))
    atomic_write_text(out / "ddp_speed.md", render(meta, recs))
    print(render(meta, recs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
