"""EntPruner plots: CED per block (and per noise-level bin), depth over fine-tune steps.

    python -m methods.plots ced results/runs/.../plan.json out.png
    python -m methods.plots depth results/runs/.../entpruner_decisions.jsonl out.png
"""
from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench.api import BenchError, Plan  # noqa: E402
from bench.io import read_text  # noqa: E402
from methods.entpruner.schedule import read_log  # noqa: E402


def _ced_data(src) -> tuple[list[float], list[list[float]] | None, list[int] | None]:
    """(scores, per-bin scores or None, kept blocks or None) from a Plan, a plan.json path, a
    ced_scores() dict or a plain list of scores."""
    if isinstance(src, (str, Path)):
        src = Plan.from_json(read_text(src))
    if isinstance(src, Plan):
        return src.scores["blocks"], src.meta.get("scores_per_bin"), src.keep.get("blocks")
    if isinstance(src, dict):
        if "ced" in src:
            return src["ced"], src.get("ced_per_bin"), None
        if "scores" in src:
            return src["scores"]["blocks"], src.get("meta", {}).get("scores_per_bin"), src.get("keep", {}).get("blocks")
    if isinstance(src, (list, tuple)):
        return [float(v) for v in src], None, None
    raise BenchError(f"plot_ced cannot read {type(src).__name__}; pass a Plan, plan.json, ced_scores() dict or list")


def _save(fig, out_path) -> Path:
    fig.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_ced(plan_or_scores, out_path, title: str = "EntPruner CED per block") -> Path:
    """Bar per block (kept blocks dark, removed light) and, when available, a heat map of CED per
    noise-level bin (rows: bins from clean u=0 to noise u=1)."""
    scores, per_bin, kept = _ced_data(plan_or_scores)
    depth = len(scores)
    ncols = 2 if per_bin else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5.0 * ncols, 3.4), squeeze=False)
    ax = axes[0][0]
    colors = ["#1f4e79" if kept is None or i in kept else "#9dc3e6" for i in range(depth)]
    ax.bar(range(depth), scores, color=colors)
    ax.set_xlabel("block")
    ax.set_ylabel("CED = |H - H_-i| (nats)")
    ax.set_xticks(range(depth))
    ax.set_title(title + ("" if kept is None else " (light: removed)"), fontsize=9)
    if per_bin:
        ax = axes[0][1]
        im = ax.imshow(per_bin, aspect="auto", origin="lower", cmap="viridis")
        ax.set_xlabel("block")
        ax.set_ylabel("noise-level bin (0 = clean)")
        ax.set_xticks(range(depth))
        ax.set_title("CED per noise-level bin", fontsize=9)
        fig.colorbar(im, ax=ax)
    return _save(fig, out_path)


def plot_depth(decisions_path, out_path, title: str = "EntPruner depth during fine-tuning") -> Path:
    """Model depth over fine-tune steps from the decision log; forced decisions in red, the target
    depth dashed, the pruning deadline dotted."""
    start, decisions = read_log(decisions_path)
    total = start["total_steps"]
    xs, ys = [0], [len(start["start_kept"])]
    for d in decisions:
        xs.append(d["step"] + 1)  # a decision after step s changes the model from step s+1 on
        ys.append(len(d["kept_after"]))
    xs.append(total)
    ys.append(ys[-1])
    fig, ax = plt.subplots(figsize=(5.0, 3.2))
    ax.step(xs, ys, where="post", color="#1f4e79")
    for d in decisions:
        ax.plot(d["step"] + 1, len(d["kept_after"]), "o", color="#c00000" if d["forced"] else "#1f4e79", ms=4)
    ax.axhline(start["target"], ls="--", color="grey", lw=1, label="target depth")
    if start["decision_steps"]:
        ax.axvline(start["decision_steps"][-1] + 1, ls=":", color="grey", lw=1, label="last decision")
    ax.set_xlabel("fine-tune step")
    ax.set_ylabel("blocks")
    ax.set_xlim(0, total)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, out_path)


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("ced", "depth"):
        sys.exit("usage: python -m methods.plots {ced PLAN.json | depth DECISIONS.jsonl} OUT.png")
    (plot_ced if sys.argv[1] == "ced" else plot_depth)(sys.argv[2], sys.argv[3])
