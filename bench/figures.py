"""The report's figure: quality against measured speedup and against MACs kept.

One row of two panels per protocol group (axes never mix protocols): quality vs speedup (dense
latency / latency) and quality vs keep MACs (measured, fraction of the dense model; axis reversed,
so cheaper is to the right in both panels). One point per table line (method x budget x variant),
coloured by method (a method's variant, method.k=v: its colour, a marker of its own, its own legend entry); the
dense model is the black star. Error bars: quality = std over seeds, or with
one seed the metric's own bootstrap interval where the row has one (Inception FID/KID); speedup = its
95 % interval (bench.speedup). A speedup whose interval contains 1 is drawn hollow; launch-bound or
flagged speedups are left out of the speedup panel (which says why), never out of the MACs panel.
The dashed staircase is the Pareto front (no other point is both faster/cheaper and better).

The quality axis is one metric that every line of the group has (FID where every line has it, else
the classifier-feature FD of the CPU suite, whose FID exists for the dense row only); it is
logarithmic when the values span a factor of LOG_SPAN or more.

`quality_figure(groups)` returns the matplotlib Figure (tests read the plotted data from it: each
method's points are the PathCollection with gid "points:<method>", its error bars the container
labelled "_err:<method>", the front the Line2D with gid "pareto"); `save(fig, base)` writes PNG and
PDF without version or time stamps.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from bench.speedup import INDISTINGUISHABLE

QUALITY_PREF = ["m_fid", "m_fd_clf"]  # y axis: real FID when every line has it
DENSE = "dense"
MARKERS = "osD^v<>ph"
VARIANT_MARKERS = "XPd8"  # a method's variants: its colour, one of these markers (none of MARKERS)
LOG_SPAN = 5.0  # quality values spanning this factor or more get a log axis


def quality_column(lines: pd.DataFrame) -> str | None:
    return next((c for c in QUALITY_PREF if c in lines and lines[c].notna().all()), None)


def figure_points(lines: pd.DataFrame, q: str) -> pd.DataFrame:
    """One point per line: method, label, x values (speedup with its interval and note, keep_macs)
    and y with its error-bar ends (y_lo <= y <= y_hi)."""
    series = _series(lines)
    pts = pd.DataFrame({
        "method": lines["method"].astype(str),
        "series": series,
        "label": [f"{r['method']} {r['budget_keep']:g}{name[len(str(r['method'])):]}"  # method keep (variant)
                  for (_, r), name in zip(lines.iterrows(), series)],
        "budget_keep": lines["budget_keep"].astype(float),
        "keep_macs": lines["keep_macs"].astype(float),
        "speedup": lines.get("speedup", pd.Series(np.nan, index=lines.index)).astype(float),
        "speedup_lo": lines.get("speedup_lo", pd.Series(np.nan, index=lines.index)).astype(float),
        "speedup_hi": lines.get("speedup_hi", pd.Series(np.nan, index=lines.index)).astype(float),
        "speedup_note": lines.get("speedup_note", pd.Series("", index=lines.index)).fillna("").astype(str),
        "y": lines[q].astype(float),
    }, index=lines.index)
    std = lines.get(f"{q}_std", pd.Series(np.nan, index=lines.index)).astype(float)
    lo = lines.get(f"{q}_ci_lo", pd.Series(np.nan, index=lines.index)).astype(float)
    hi = lines.get(f"{q}_ci_hi", pd.Series(np.nan, index=lines.index)).astype(float)
    one = lines["n_seeds"].astype(int) == 1
    use_ci = one & lo.notna() & hi.notna()
    use_std = ~one & std.notna()
    pts["y_lo"] = np.where(use_ci, lo, np.where(use_std, pts["y"] - std, pts["y"]))
    pts["y_hi"] = np.where(use_ci, hi, np.where(use_std, pts["y"] + std, pts["y"]))
    return pts.reset_index(drop=True)


def _series(lines: pd.DataFrame) -> list[str]:
    """Each line's series: its name as the table gives it (the method, with its variant's suffix)."""
    from bench.report import line_suffixes  # here: bench.report imports this module

    return [f"{m}{sfx}" for m, sfx in zip(lines["method"].astype(str), line_suffixes(lines))]


def pareto_front(x, y, x_higher_better: bool, y_lower_better: bool) -> list[int]:
    """Indices of the points no other point dominates (at least as good in both, better in one),
    sorted by x ascending. NaN points take no part."""
    x = np.asarray(x, dtype=float) * (1 if x_higher_better else -1)
    y = np.asarray(y, dtype=float) * (-1 if y_lower_better else 1)  # both now: higher is better
    ok = [i for i in range(len(x)) if math.isfinite(x[i]) and math.isfinite(y[i])]
    front = [i for i in ok if not any((x[j] >= x[i] and y[j] >= y[i]) and (x[j] > x[i] or y[j] > y[i]) for j in ok)]
    sign = 1 if x_higher_better else -1
    return sorted(front, key=lambda i: (sign * x[i], i))


def _styles(groups: list) -> dict:
    """(colour, marker) per series: a method's usual line, and each of its variants (method.k=v overrides,
    e.g. the GPU tier's entpruner (condition=bin outputs=x0)) in the method's colour with a marker of its
    own (VARIANT_MARKERS), so that the legend tells them apart; the dense model's lines are black stars."""
    import matplotlib as mpl

    methods = sorted({m for _, lines, _, _ in groups for m in lines["method"] if m != DENSE})
    # ten strong colours; past ten methods each block of ten takes the next marker, so two methods that
    # share a marker have two different tab10 colours and two that share a colour have two markers
    # (tab20's light/dark pairs made near-twins of e.g. diffes and taylor_width)
    colors = mpl.colormaps["tab10"]
    few = len(methods) <= colors.N
    style = {m: (colors(i % colors.N), MARKERS[(i if few else i // colors.N) % len(MARKERS)])
             for i, m in enumerate(methods)}
    style[DENSE] = ("black", "*")
    series = sorted({(name, m) for _, lines, _, _ in groups
                     for name, m in zip(_series(lines), lines["method"].astype(str)) if name != m})
    for m in sorted({m for _, m in series}):
        for k, name in enumerate(n for n, mm in series if mm == m):
            style[name] = (style[m][0], "*" if m == DENSE else VARIANT_MARKERS[k % len(VARIANT_MARKERS)])
    return style


def _panel(ax, pts: pd.DataFrame, x: str, style: dict, y_lower_better: bool, why: str | None) -> None:
    """Scatter + error bars per method, the Pareto front, labels of the front's points."""
    d = pts[pts[x].notna() & pts["y"].notna()]
    if d.empty:
        ax.text(0.5, 0.5, why or "nothing to plot", ha="center", va="center", wrap=True, fontsize=8,
                transform=ax.transAxes, gid="why")
        ax.set_xticks([])
        ax.set_yticks([])
        return
    for m, g in d.groupby("series" if "series" in d else "method", sort=True):  # a variant: its own series
        c, mk = style[m]
        xerr = None
        if x == "speedup" and g["speedup_lo"].notna().any():
            lo = (g["speedup"] - g["speedup_lo"]).clip(lower=0).fillna(0)
            hi = (g["speedup_hi"] - g["speedup"]).clip(lower=0).fillna(0)
            xerr = np.vstack([lo.to_numpy(), hi.to_numpy()])
        yerr = np.vstack([(g["y"] - g["y_lo"]).to_numpy(), (g["y_hi"] - g["y"]).to_numpy()])
        ax.errorbar(g[x], g["y"], xerr=xerr, yerr=yerr, fmt="none", ecolor=c, elinewidth=0.8, capsize=2,
                    alpha=0.8, label=f"_err:{m}")
        hollow = (g["speedup_note"] == INDISTINGUISHABLE) if x == "speedup" else pd.Series(False, index=g.index)
        ax.scatter(g[x], g["y"], marker=mk, s=120 if g["method"].iloc[0] == DENSE else 36, zorder=3, linewidths=1.2,
                   facecolors=["none" if h else c for h in hollow], edgecolors=[c] * len(g), gid=f"points:{m}")
    front = pareto_front(d[x], d["y"], x_higher_better=(x == "speedup"), y_lower_better=y_lower_better)
    f = d.iloc[front]
    ax.plot(f[x], f["y"], linestyle="--", color="0.4", linewidth=1, drawstyle="steps-pre" if x == "speedup"
            else "steps-post", zorder=2, gid="pareto")
    placed: list[tuple[float, float]] = []
    for (px, py), same in f.groupby([x, "y"], sort=False):  # methods at one point (one plan): one label
        pos = _unit(px, d[x]), _unit(py, d["y"], log=_log_axis(d["y"]))
        near = [b for a, b in placed if abs(pos[0] - a) < LABEL_NEAR[0] and abs(pos[1] - b) < LABEL_NEAR[1]]
        placed.append(pos)  # a label near earlier ones moves a line per neighbour, away from the first (no overlap)
        away = (1 if pos[1] >= near[0] else -1) if near else 0
        ax.annotate(" = ".join(same["label"]), (px, py), textcoords="offset points", xytext=(4, 4 + 9 * away * len(near)),
                    fontsize=6.5, color="0.2")


LABEL_NEAR = (0.12, 0.05)  # two front labels closer than this (fractions of the panel's data span) would overlap


def _log_axis(v) -> bool:
    """The quality axis is logarithmic when its values are all positive and span LOG_SPAN or more."""
    v = np.asarray(v, dtype=float)
    v = v[np.isfinite(v)]
    return len(v) > 0 and v.min() > 0 and v.max() / v.min() >= LOG_SPAN


def _unit(value: float, values, log: bool = False) -> float:
    """value's place in the span of `values`, 0..1 (log scale when asked); 0 for a span of one value."""
    v = np.asarray(values, dtype=float)
    f = np.log if log else (lambda a: a)
    lo, hi = f(np.nanmin(v)), f(np.nanmax(v))
    return 0.0 if hi <= lo else float((f(value) - lo) / (hi - lo))


def quality_figure(groups: list, label=lambda c: c):
    """groups: (key, lines, vcols, note) per protocol group, as bench.report.summarize gives them;
    label(column) -> axis text. Returns a matplotlib Figure (no pyplot: no global state)."""
    import matplotlib as mpl
    import matplotlib.style  # noqa: F401  (submodule, not loaded by "import matplotlib")
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    from bench.report import scored  # here: bench.report imports this module

    style = _styles(groups)
    with mpl.style.context("default"):  # ignore the user's matplotlibrc: same bytes everywhere
        n = max(len(groups), 1)
        fig = Figure(figsize=(12, 4.4 * n), layout="constrained")
        axes = fig.subplots(n, 2, squeeze=False)
        if not groups:
            axes[0][0].text(0.5, 0.5, "no successful runs", ha="center", transform=axes[0][0].transAxes)
            for ax in axes[0]:
                ax.set_axis_off()
        for (ax_s, ax_m), (key, lines, _, note) in zip(axes, groups):
            scorer = f", {key['metric_impl']} n={key['metric_n']}" if scored(key) else ""  # none: Inception only
            head = (f"{key['model']} {key['dataset']} {key['process']}, NFE {key['nfe']}, cfg {key['cfg_scale']:g}{scorer}\n"
                    f"{key['device']}, {key['latency_mode']} {key['latency_dtype']}, batch {key['latency_batch']}")
            ax_s.set_title(head, fontsize=8)
            ax_m.set_title(head, fontsize=8)
            q = quality_column(lines)
            if q is None:
                for ax in (ax_s, ax_m):
                    ax.text(0.5, 0.5, "no quality metric every line has (FID, FD (clf))", ha="center",
                            transform=ax.transAxes)
                continue
            pts = figure_points(lines, q)
            lower = "↓" in label(q)
            why = lines.attrs.get("speedup_why") or "no speedup in this group (see the table's note)"
            _panel(ax_s, pts, "speedup", style, lower, why)
            _panel(ax_m, pts, "keep_macs", style, lower, None)
            ax_s.set_xlabel("speedup = dense latency / latency (95% interval) ↑")
            ax_m.set_xlabel("MACs kept, fraction of dense (reversed: cheaper →)")
            if pts["keep_macs"].notna().any():
                ax_m.invert_xaxis()
            y = pts["y"].dropna()
            for ax in (ax_s, ax_m):
                ax.set_ylabel(label(q))
                ax.grid(alpha=0.3, which="both")
                if _log_axis(y) and ax.has_data():
                    ax.set_yscale("log")  # a few collapsed models would squeeze every other point flat
                    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        shown = {name for _, lines, _, _ in groups for name in _series(lines)}
        present = [m for m in [DENSE] + sorted(k for k in style if k != DENSE) if m in shown]
        handles = [Line2D([], [], color=style[m][0], marker=style[m][1], linestyle="none", label=m) for m in present]
        handles += [Line2D([], [], color="0.3", marker="o", markerfacecolor="none", linestyle="none",
                           label="hollow: speedup ≈1\n(interval contains 1)"),
                    Line2D([], [], color="0.4", linestyle="--", label="Pareto front")]
        fig.legend(handles=handles, loc="outside right upper", fontsize=7, title="method (front: method keep)",
                   title_fontsize=7)
    return fig


def save(fig, base: Path) -> list[Path]:
    """base.png (150 dpi) and base.pdf, without version or time stamps (same bytes on a rebuild)."""
    base.parent.mkdir(parents=True, exist_ok=True)
    png, pdf = base.with_suffix(".png"), base.with_suffix(".pdf")
    fig.savefig(png, dpi=150, metadata={"Software": None})
    fig.savefig(pdf, metadata={"Creator": None, "Producer": None, "CreationDate": None})
    return [png, pdf]
