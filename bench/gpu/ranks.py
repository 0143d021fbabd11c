"""The same tier cell made on one GPU and on N GPUs (data parallel): FID equal within its interval and the
fine-tune's loss trajectory equal within a tolerance (the multi-GPU issue's second check).

    torchrun --standalone --nproc-per-node=N -m bench.run <cell> device=cuda paths.results=DIR_N
    python -m bench.gpu.ranks --one results/gpu/tier --many DIR_N --out results/gpu/tier_ranks
    bash bench/gpu/tier.sh ranks            # GPU: both steps for one cell (TIER_RANKS_CELL) on every visible GPU

A run's folder does not depend on the world size (bench.dist), so every run under --many (row.json) is
compared with the run of the same relative path under --one, which must have been made by one process.
What N ranks share with one (README "Scale"): the global batch, its indices, timesteps, noise and dropped
labels drawn from (seed, step); DDP averages the gradients; sample i is the same whatever N is. What differs
is the order of the floating-point sums (the gradient all-reduce, the batch split), so the weights drift
apart by rounding, bf16's most of all, and the samples with them.

Checks, per run:
  fid    each FID lies inside the other's 95 % bootstrap interval (bench.metrics: over the generated
         samples): the two rows cannot be told apart at the precision the tier reports.
  loss   at every logged fine-tune step both runs logged (log.jsonl `finetune` events: the global batch's
         loss; the last attempt's value where a run resumed), |loss_N - loss_1| <= loss_rtol x loss_1. The
         default 0.05 is this choice: the step-0 loss is of the same weights and batch, so it agrees to bf16
         rounding (~1e-3); after 300 AdamW steps the weights differ by rounding only, and a logged loss is one
         batch's, so rounding should stay within a few per cent, while a broken split (a rank's rows dropped or
         counted twice, another batch) moves it by far more: the tier's last_k rows at keep 0.5 of two seeds
         differ by 0.21 to 0.85 at their worst logged step (tests/test_ranks.py). How far N bf16 ranks drift
         from one is not measured yet (no multi-GPU machine so far); --loss-rtol sets the tolerance.
Output: <out>/ranks_n<N>.json (atomically: per run both FIDs and intervals, the loss steps, their relative
differences and each check's verdict, the rows' devices and commits) and ranks_n<N>.md. Exit status 0 when
every check passes, 1 when one fails (the record says which), 2 bad input (a line naming the fix).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.api import BenchError

LOSS_RTOL = 0.05


def runs_under(root: Path) -> dict[str, Path]:
    """{relative path: folder} of the finished runs (row.json) under `root`."""
    return {str(p.parent.relative_to(root)): p.parent for p in sorted(root.rglob("row.json"))}


def _log(run_dir: Path) -> list[dict]:
    path = run_dir / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def losses(run_dir: Path) -> dict[int, float]:
    """The fine-tune's logged loss by step (log.jsonl `finetune` events; a resumed run's later value wins)."""
    return {int(e["step"]): float(e["loss"]) for e in _log(run_dir) if e.get("event") == "finetune" and "loss" in e}


def world(run_dir: Path) -> int:
    """How many ranks made the run: the largest `world` of its log's `start` events (every attempt's)."""
    return max((int(e.get("world") or 1) for e in _log(run_dir) if e.get("event") == "start"), default=1)


def _row(run_dir: Path) -> dict:
    row = json.loads((run_dir / "row.json").read_text())
    m = row.get("metrics") or {}
    if not all(isinstance(m.get(k), (int, float)) for k in ("fid", "fid_ci_lo", "fid_ci_hi")):
        raise BenchError(f"{run_dir}/row.json has no FID with its interval (fid, fid_ci_lo, fid_ci_hi): compare rows "
                         "scored with bootstrap intervals (eval.bootstrap, as the tier's)")
    return row


def compare_run(one: Path, many: Path, loss_rtol: float = LOSS_RTOL) -> dict:
    """One run's checks (module docstring): `one` made by one process, `many` by several."""
    r1, rn = _row(one), _row(many)
    if (w1 := world(one)) != 1:
        raise BenchError(f"{one} was made by {w1} ranks: --one takes the runs of one process")
    m1, mn = r1["metrics"], rn["metrics"]
    fid_ok = m1["fid_ci_lo"] <= mn["fid"] <= m1["fid_ci_hi"] and mn["fid_ci_lo"] <= m1["fid"] <= mn["fid_ci_hi"]
    l1, ln = losses(one), losses(many)
    steps = sorted(set(l1) & set(ln))
    rel = [abs(ln[s] - l1[s]) / abs(l1[s]) if l1[s] else float(ln[s] != l1[s]) for s in steps]
    if not steps and (l1 or ln):
        raise BenchError(f"{one} and {many} logged no fine-tune step in common: compare runs of one config")
    return {"one": str(one), "many": str(many), "world": world(many),
            "devices": [r1.get("device"), rn.get("device")], "commits": [r1.get("git_sha"), rn.get("git_sha")],
            "fid": [m1["fid"], mn["fid"]], "fid_ci": [[m1["fid_ci_lo"], m1["fid_ci_hi"]], [mn["fid_ci_lo"], mn["fid_ci_hi"]]],
            "fid_equal": bool(fid_ok), "loss_steps": steps, "loss": [[l1[s] for s in steps], [ln[s] for s in steps]],
            "loss_rel_diff": rel, "loss_max_rel_diff": max(rel, default=0.0), "loss_rtol": loss_rtol,
            "loss_equal": all(d <= loss_rtol for d in rel)}


def compare(one: Path, many: Path, loss_rtol: float = LOSS_RTOL) -> dict:
    """Every run under `many` against the run of the same path under `one`."""
    got = runs_under(many)
    if not got:
        raise BenchError(f"no finished run (row.json) under {many}: make the N-rank run first (torchrun "
                         "--nproc-per-node=N -m bench.run <cell> paths.results=...)")
    runs = {}
    for rel, d in got.items():
        if not (one / rel / "row.json").is_file():
            raise BenchError(f"{one / rel} has no row.json: --one must hold the same run made by one process "
                             "(the same overrides; a run's folder does not depend on the world size)")
        runs[rel] = compare_run(one / rel, d, loss_rtol)
    worlds = sorted({r["world"] for r in runs.values()})
    return {"schema": 1, "tool": "bench.gpu.ranks", "world": worlds[-1], "runs": runs,
            "passed": all(r["fid_equal"] and r["loss_equal"] for r in runs.values())}


def markdown(rec: dict) -> str:
    lines = [f"# The same cell on 1 and {rec['world']} GPUs", "",
             f"`python -m bench.gpu.ranks` (bench/gpu/ranks.py says what is compared and why): "
             f"{'every check passed' if rec['passed'] else 'a check FAILED'}.", "",
             "| run | devices | FID, 1 GPU [95%] | FID, N GPUs [95%] | FID equal | loss steps | max rel. loss diff | loss equal |",
             "|---|---|---|---|---|---|---|---|"]
    for rel, r in rec["runs"].items():
        (f1, fn), ((a1, b1), (an, bn)) = r["fid"], r["fid_ci"]
        lines.append(f"| {rel} | {r['devices'][0]} / {r['world']} x {r['devices'][1]} | {f1:.2f} [{a1:.2f}, {b1:.2f}] | "
                     f"{fn:.2f} [{an:.2f}, {bn:.2f}] | {'yes' if r['fid_equal'] else 'NO'} | {len(r['loss_steps'])} | "
                     f"{r['loss_max_rel_diff']:.4f} (tol {r['loss_rtol']}) | {'yes' if r['loss_equal'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu.ranks", description=__doc__.splitlines()[0])
    ap.add_argument("--one", required=True, help="results folder with the runs made by one process")
    ap.add_argument("--many", required=True, help="results folder with the same runs made by N ranks")
    ap.add_argument("--out", required=True, help="folder for ranks_n<N>.json and .md")
    ap.add_argument("--loss-rtol", type=float, default=LOSS_RTOL, help="relative tolerance of a logged loss")
    a = ap.parse_args(argv)
    from bench.io import atomic_write_text

    try:
        if not 0 < a.loss_rtol < 1:
            raise BenchError(f"--loss-rtol {a.loss_rtol}: give a fraction between 0 and 1")
        rec = compare(Path(a.one), Path(a.many), a.loss_rtol)
    except (BenchError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"ranks_n{rec['world']}.json", json.dumps(rec, indent=1))
    atomic_write_text(out / f"ranks_n{rec['world']}.md", markdown(rec))
    print(markdown(rec), end="")
    return 0 if rec["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
