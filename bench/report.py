"""Results tables, the quality-vs-speedup figure and one HTML page, built from results/runs/**/row.json.

    python -m bench.report [--runs results/runs] [--out reports] [--name default]

A table never holds numbers of two protocols: rows are grouped by everything that changes what a
quality number means (model, data, process, sampler, NFE, cfg, metric impl / n / reference) or what
a latency means (device, dtype, batch), and each group gets its own table. The output is a pure
function of the rows (no clock, no git call), so rebuilding from the same runs gives the same bytes.

Speedups carry a 95 % interval and follow bench/speedup.py's rules: "≈1" marks one whose interval
contains 1, and a GPU group whose dense forward is launch-bound gets none. When the runs folder holds a
latency_pass.json (bench.latency_pass: the dense model and every row's architecture timed interleaved in
one process), a line's speedup comes from it: the geometric mean of its rows' paired ratios, with the
envelope [min lo, max hi] of their 95 % intervals; lines the pass skipped keep the rows' own. Figures: bench/figures.py;
the HTML page (sortable tables, figures inlined, links to each run's files): bench/report_html.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
from pathlib import Path

import pandas as pd

from bench import figures, speedup as sp
from bench.io import atomic_write_text
from bench.report_html import render_html
from bench.results import Row, load_rows
from bench.tables import markdown_table

GROUP_KEYS = ["model", "dataset", "process", "device", "latency_mode", "latency_dtype", "latency_batch", "sampler", "nfe",
              "cfg_scale", "eval_precision", "metric_impl", "metric_n", "metric_ref"]
# Inception metrics are optional per row (costly on a CPU): rows without them leave the cells blank,
# and the rows that have them must share one Inception protocol (checked in inception_note)
FID_KEYS = ["fid_impl", "fid_n", "fid_ref"]
LINE_KEYS = ["method", "budget_measure", "budget_keep"]
# settings that make rows of one method and budget different lines (not seeds of one setting)
VARIANT_KEYS = ["finetune_steps", "method_version", "method_variant"]
DENSE = "dense"  # the method name of the unpruned reference; speedups are relative to it
TEACHER_LINE_NOTE = "The dense line with finetune_steps 0 is the teacher itself: not pruned, not fine-tuned."
# samplers whose NFE is measured per model (adaptive step size): their rows share a group whatever
# NFE each model took (the row keeps its own)
ADAPTIVE = ("dopri5",)
# metric name -> (label, better direction); this is also the column order of known metrics
METRICS = {"fid": ("FID", "↓"), "sfid": ("sFID", "↓"), "is": ("IS", "↑"), "precision": ("precision", "↑"),
           "recall": ("recall", "↑"), "kid": ("KID", "↓"), "fd_clf": ("FD (clf)", "↓"),
           "cond_acc": ("cond. acc (%)", "↑"), "ssim_teacher": ("SSIM (teacher)", "↑")}
COSTS = {"params_M": "params (M)", "macs_G": "MACs (G)", "keep_macs": "keep MACs", "latency_ms": "latency (ms) ↓"}
QUALITY_PREF = figures.QUALITY_PREF  # y axis of the figure: real FID when every line has it
PROXY_NOTE = "classifier-feature Frechet distance, not Inception FID"
FLAGGED_DENSE_NOTE = ("speedup is blank: the dense row's latency is flagged (spread, busy machine or shared device, see "
                      "its warnings); rerun its timing on an idle machine, or time every row in one process (the latency pass)")
FLAGGED_NOTE = ("speedup is blank where the latency is flagged (spread, busy machine or shared device, see the rows' "
                "warnings): ")
NO_DENSE_NOTE = ("speedup is blank: this group has no dense row with a latency on the same device, mode, dtype and batch "
                 "to divide by (the figure uses keep MACs instead)")
LAUNCH_NOTE = ("speedup is blank: the dense forward takes {ms:.3g} ms on {device}, under {limit:g} ms, so the GPU mostly "
               "waits on kernel launches and a ratio measures launch overhead, not the work pruning removed "
               "(bench/speedup.py); time at a larger eval.latency.batch or compiled, and read keep MACs meanwhile")
INDIST_NOTE = "≈1: the speedup's 95% interval contains 1; the timings cannot tell it from the dense model"
SAME_NOTE = "Lines with every metric equal (one pruned model: the methods chose the same units): "
INTRO = ("Cells are mean ± std over seeds (sample std; omitted for one seed), or with one seed a metric's own 95% "
         "bootstrap interval [lo, hi] where it has one. ↑/↓ = better direction.")
PASS_NOTE = ("latency and speedup: dense and every architecture timed interleaved in one process (bench.latency_pass, "
             "{device}, {date}); a line's latency is the mean of its rows' medians there, its speedup the geometric "
             "mean of their paired ratios (dense / pruned), its interval the envelope [min lo, max hi] of their 95% "
             "intervals")
PASS_SKIPPED_NOTE = "lines the pass did not time keep their rows' separate-run speedup: "
SPEEDUP_TEXT = ("speedup = dense latency / latency within one group (same device, mode, dtype, batch), with its 95% "
                "interval from the rows' repeated timings; ≈1 marks an interval that contains 1; a GPU group whose dense "
                f"forward takes under {sp.LAUNCH_BOUND_MS:g} ms is launch-bound and gets no speedup (bench/speedup.py).")


# ---------------------------------------------------------------- numbers
def _decimals(x: float, sig: int = 3) -> int:
    return sig - 1 if x == 0 or not math.isfinite(x) else sig - 1 - math.floor(math.log10(abs(x)))


def _fixed(x: float, d: int) -> str:
    return f"{round(x, d):.0f}" if d < 0 else f"{x:.{d}f}"  # d < 0: 118.6 -> "119", 1234 -> "1230"


def fmt_num(x, sig: int = 3) -> str:
    """3 significant digits without scientific notation: 0.0123 -> '0.0123', 118.6 -> '119'."""
    return "" if pd.isna(x) else _fixed(float(x), _decimals(float(x), sig))


def fmt_pm(mean, std=float("nan")) -> str:
    """'mean ± std', both to the decimals of the mean's 3 significant digits; std NaN (1 seed) -> mean."""
    if pd.isna(mean):
        return ""
    d = _decimals(float(mean))
    if pd.isna(std):
        return _fixed(float(mean), d)
    if std > 0 and round(std, d) == 0:  # a real spread must not print as "± 0"
        d = _decimals(float(std), 1)
    return f"{_fixed(float(mean), d)} ± {_fixed(float(std), d)}"


def label(col: str, arrow: bool = True) -> str:
    if col in COSTS:
        return COSTS[col]
    if col == "speedup":
        return "speedup ↑"
    name = col[2:] if col.startswith("m_") else col
    if name not in METRICS:
        return name  # unknown metrics keep their raw names
    text, better = METRICS[name]
    return f"{text} {better}" if arrow else text


def order_metrics(cols) -> list[str]:
    """Known metrics in METRICS order, then unknown ones alphabetically."""
    cols = set(cols)
    known = [f"m_{k}" for k in METRICS if f"m_{k}" in cols]
    return known + sorted(cols - set(known))


COMPANIONS = ("_std", "_ci_lo", "_ci_hi")  # a metric's own spread / interval columns, shown beside it


def metric_cols(df: pd.DataFrame) -> list[str]:
    return order_metrics(c for c in df.columns if c.startswith("m_") and df[c].notna().any()
                         and not c.endswith(COMPANIONS))


def ci_cols(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.startswith("m_") and c.endswith(("_ci_lo", "_ci_hi")) and df[c].notna().any()]


# ---------------------------------------------------------------- grouping
def check_single_protocol(df: pd.DataFrame) -> None:
    """Refuse a table whose rows differ in any protocol key (metric_impl, metric_n, device, ...)."""
    mixed = {k: sorted(map(str, df[k].unique())) for k in GROUP_KEYS
             if k in df.columns and df[k].nunique(dropna=False) > 1}
    if mixed:
        what = "; ".join(f"{k} = {v}" for k, v in mixed.items())
        raise ValueError(f"one table would mix protocols ({what}); build one table per protocol group")


def variant_keys(g: pd.DataFrame) -> list[str]:
    """The VARIANT_KEYS on which rows of one method and budget differ (each value becomes a line of
    its own); a key that only differs between methods (one method's version 2) is no variant."""
    return [k for k in VARIANT_KEYS
            if k in g.columns and (g.groupby(LINE_KEYS, dropna=False)[k].nunique(dropna=False) > 1).any()]


def set_apart(g: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows to average, rows set apart): runs that share a line (method, budget, variant) and a
    seed differ in something else of their config, so they are not seeds of one setting. None of
    them is averaged; they are listed with their runs, to be picked with --where."""
    keys = LINE_KEYS + variant_keys(g) + ["seed"]
    dup = g.duplicated(keys, keep=False)
    return g[~dup], g[dup]


def _flagged(g: pd.DataFrame) -> pd.Series:
    """Rows whose latency carries a flag (bench.metrics.cost.latency_flags: spread, busy)."""
    if "latency_flags" not in g.columns:
        return pd.Series(False, index=g.index)
    return g["latency_flags"].map(lambda f: isinstance(f, list) and len(f) > 0)


def summarize(g: pd.DataFrame, latency_pass: dict | None = None) -> tuple[pd.DataFrame, list[str], str | None]:
    """One protocol group's ok rows -> one line per (method, budget, variant): mean, std (ddof=1),
    n_seeds, speedup. Rows whose latency is flagged give no speedup (nor does a flagged dense row
    give any). With a latency pass record (bench.latency_pass.load), the lines it timed take their
    speedup from it instead (pass_speedups). Returns (lines, value columns, note or None)."""
    check_single_protocol(g)
    keys = LINE_KEYS + variant_keys(g)
    vcols = metric_cols(g) + list(COSTS)
    by = g.groupby(keys, sort=True)
    lines = by[vcols].mean().join(by[vcols].std(ddof=1).add_suffix("_std")).join(by[ci_cols(g)].mean())
    lines["n_seeds"] = by.size()
    lines["_flagged"] = g.assign(_f=_flagged(g)).groupby(keys, sort=True)["_f"].any()
    lines = lines.reset_index()
    lines["_order"] = (lines["method"] != DENSE).astype(int)  # dense first, then keep desc, then name
    lines = lines.sort_values(["_order", "budget_keep", "method", "budget_measure"] + keys[len(LINE_KEYS):],
                              ascending=[True, False, True, True] + [True] * (len(keys) - len(LINE_KEYS)),
                              kind="mergesort")
    dense = g[g["method"] == DENSE]
    dense_ms = dense["latency_ms"].mean()  # NaN when the group has no dense row
    notes = []
    if pd.isna(dense_ms):
        notes.append(NO_DENSE_NOTE)
    elif _flagged(dense).any():
        dense_ms = float("nan")
        notes.append(FLAGGED_DENSE_NOTE)
    device = str(g["device"].iloc[0])
    why = None
    if pd.isna(dense_ms):
        why = "no speedup: " + ("no dense row" if NO_DENSE_NOTE in notes else "the dense row's latency is flagged")
    elif sp.launch_bound(dense_ms, device):
        notes.append(LAUNCH_NOTE.format(ms=dense_ms, device=device, limit=sp.LAUNCH_BOUND_MS))
        why = f"no speedup: launch-bound\n(dense forward {dense_ms:.3g} ms < {sp.LAUNCH_BOUND_MS:g} ms on a GPU)"
        dense_ms = float("nan")
    lines["speedup"] = (dense_ms / lines["latency_ms"]).where(~lines["_flagged"].astype(bool))
    lines = add_speedup_intervals(lines, g, keys)
    lines, covered, skipped = pass_speedups(lines, g, keys, latency_pass)
    if covered.any():  # the separate-run notes concern only the lines the pass did not time
        if not skipped:
            notes, why = [], None
        ms = float(lines.attrs.pop("pass_dense_ms"))
        if sp.launch_bound(ms, device):
            lines.loc[covered, ["speedup", "speedup_lo", "speedup_hi"]] = float("nan")
            lines.loc[covered, "speedup_note"] = ""
            notes = [n for n in notes if not n.startswith(LAUNCH_NOTE[:30])]
            notes.append(LAUNCH_NOTE.format(ms=ms, device=device, limit=sp.LAUNCH_BOUND_MS))
            if not skipped:
                why = f"no speedup: launch-bound\n(dense forward {ms:.3g} ms < {sp.LAUNCH_BOUND_MS:g} ms on a GPU)"
        else:
            notes.append(PASS_NOTE.format(device=latency_pass["device"], date=latency_pass["date"]) + ".")
            why = None
        if skipped:
            notes.append(PASS_SKIPPED_NOTE + "; ".join(f"{', '.join(sorted(v))} ({k})" for k, v in skipped.items())
                         + ".")
    flagged = lines["_flagged"].astype(bool) & ~covered
    if pd.notna(dense_ms) and flagged.any():
        notes.append(FLAGGED_NOTE + ", ".join(sorted({f"{m} {k:g}" for m, k in
                                                      zip(lines.loc[flagged, "method"],
                                                          lines.loc[flagged, "budget_keep"])})) + ".")
    if (lines["speedup_note"] == sp.INDISTINGUISHABLE).any():
        notes.append(INDIST_NOTE + ".")
    lines = lines.drop(columns=["_order", "_flagged"]).reset_index(drop=True)
    if unsuffixed := usual_note(lines, keys[len(LINE_KEYS):]):
        notes.append(unsuffixed)
    if "finetune_steps" in g and ((g["method"] == DENSE) & (g["finetune_steps"] == 0)).any():
        notes.append(TEACHER_LINE_NOTE)
    if same := identical_lines(lines, metric_cols(g)):
        notes.append(SAME_NOTE + "; ".join(same) + ".")
    lines.attrs["speedup_why"] = why
    return lines, vcols, " ".join(n if n.endswith(".") else n + "." for n in notes) or None


def identical_lines(lines: pd.DataFrame, mcols: list[str]) -> list[str]:
    """Lines of one budget and seed count whose every metric mean is equal ("a = b at 0.75"): the same
    pruned model reached by two methods, which a ranking must not count as two findings."""
    out = []
    if not mcols:
        return out
    for (keep, _), g in lines.groupby(["budget_keep", "n_seeds"], sort=False):
        for _, same in g.groupby([g[c].round(12) for c in mcols], sort=False, dropna=False):
            if len(same) > 1 and same[mcols].notna().all(axis=None):
                out.append(" = ".join(same["method"]) + f" at {keep:g}")
    return out


def pass_speedups(lines: pd.DataFrame, g: pd.DataFrame, keys: list[str], latency_pass: dict | None
                   ) -> tuple[pd.DataFrame, pd.Series, dict[str, list[str]]]:
    """(lines, which lines the pass timed, {reason: lines it did not time}): a line whose every row has
    a record in the latency pass takes latency_ms = the mean of the rows' medians there (pruned_ms) and
    speedup = the geometric mean of the rows' paired ratios,
    speedup_lo / _hi = the envelope [min lo, max hi] of their intervals, "≈1" when that contains 1; the
    dense line 1. lines.attrs["pass_dense_ms"]: the median dense forward the pass timed (launch-bound rule)."""
    covered = pd.Series(False, index=lines.index)
    runs = (latency_pass or {}).get("runs", {})
    if not runs or "run" not in g.columns or not g["run"].isin(list(runs)).any():
        return lines, covered, {}
    lines = lines.copy()
    per_line = {k: list(d["run"]) for k, d in g.groupby(keys, sort=True, dropna=False)}
    skipped: dict[str, list[str]] = {}
    dense_ms = []
    for i, r in lines.iterrows():
        names = per_line.get(tuple(r[k] for k in keys), [])
        got = [runs[n] for n in names if n in runs]
        if not names or len(got) < len(names):
            why = next(((latency_pass.get("skipped") or {}).get(n) for n in names if n not in runs), None)
            skipped.setdefault(why or "not in the pass", []).append(f"{r['method']} {r['budget_keep']:g}")
            continue
        covered[i] = True
        dense_ms += [q["dense_ms"] for q in got]
        if all(q.get("pruned_ms") is not None for q in got):
            ms = [q["pruned_ms"] for q in got]
            lines.at[i, "latency_ms"] = statistics.fmean(ms)
            if "latency_ms_std" in lines.columns:
                lines.at[i, "latency_ms_std"] = statistics.stdev(ms) if len(ms) > 1 else float("nan")
        if r["method"] == DENSE:
            s, lo, hi = 1.0, float("nan"), float("nan")
        else:
            s = math.exp(sum(math.log(q["speedup"]) for q in got) / len(got))
            lo, hi = min(q["lo"] for q in got), max(q["hi"] for q in got)
        lines.at[i, "speedup"], lines.at[i, "speedup_lo"], lines.at[i, "speedup_hi"] = s, lo, hi
        lines.at[i, "speedup_note"] = sp.INDISTINGUISHABLE if sp.contains_one(lo, hi) else ""
    lines.attrs["pass_dense_ms"] = statistics.median(dense_ms) if dense_ms else float("nan")
    return lines, covered, skipped


def add_speedup_intervals(lines: pd.DataFrame, g: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """speedup_lo / speedup_hi (95 %) and speedup_note ("≈1" when the interval contains 1) from each
    line's latency noise (bench.speedup.line_rel_se: the rows' own timings, or the spread over seeds)
    and the dense line's. The dense line is the reference: no interval."""
    reps = g["latency_reps"] if "latency_reps" in g.columns else pd.Series(0, index=g.index)
    rse = {k: sp.line_rel_se(d["latency_ms"], d["latency_iqr_ms"], reps.loc[d.index])
           for k, d in g.groupby(keys, sort=True, dropna=False)}
    rse = [rse.get(tuple(r[k] for k in keys), float("nan")) for _, r in lines.iterrows()]
    is_dense = (lines["method"] == DENSE).to_numpy()
    dense_rse = next((v for v, d in zip(rse, is_dense) if d), float("nan"))
    lo, hi, note = [], [], []
    for s, r, d in zip(lines["speedup"], rse, is_dense):
        a, b = (float("nan"), float("nan")) if d or pd.isna(s) else sp.ratio_interval(s, dense_rse, r)
        lo.append(a)
        hi.append(b)
        note.append(sp.INDISTINGUISHABLE if sp.contains_one(a, b) else "")
    return lines.assign(speedup_lo=lo, speedup_hi=hi, speedup_note=note)


def scored(key: dict) -> bool:
    """Whether a group has a classifier scorer's protocol to name; not one scored by Inception alone
    (eval.scorer=none: its protocol is in the group's Inception note)."""
    return str(key["metric_impl"]) not in ("none", "None", "nan", "")


def title(key: dict) -> str:
    scorer = f"{key['metric_impl']}, n={key['metric_n']}, ref {key['metric_ref']}" if scored(key) else ""
    return (f"{key['model']} · {key['dataset']} · {key['process']} — {key['sampler']}, NFE {key['nfe']}, "
            f"cfg {key['cfg_scale']:g}, sampled in {key['eval_precision']} " + (f"— {scorer} " if scorer else "")
            + f"— {key['device']}, {key['latency_mode']}, {key['latency_dtype']}, batch {key['latency_batch']}")


def made_on_note(g: pd.DataFrame) -> str | None:
    """Where a group's rows were made, when the latency pass pooled another GPU's rows into it
    (bench.latency_pass.pool_devices): their quality is this table's, their latencies the pass's."""
    if "made_on" not in g.columns or g["made_on"].isna().all():
        return None
    made = g["made_on"].fillna(g["device"]).astype(str).value_counts()
    return ("Rows made on " + ", ".join(f"{d} ({n})" for d, n in sorted(made.items())) + f"; every latency and "
            f"speedup is from the latency pass on {g['device'].iloc[0]} (bench.latency_pass --also).")


def proxy_note(key: dict, vcols: list[str]) -> str | None:
    if not str(key["metric_impl"]).startswith("smallcnn"):
        return None
    names = ", ".join(label(c, arrow=False) for c in vcols if c in ("m_fd_clf", "m_cond_acc"))
    return f"Proxy metrics ({key['metric_impl']}): {names} — {PROXY_NOTE}."


def inception_note(g: pd.DataFrame) -> str:
    """Which rows of a group carry Inception metrics, and under which one protocol (never mixed)."""
    if "fid_n" not in g.columns:
        return "No row of this table has Inception metrics (eval=inception adds them)."
    has = g[g["fid_n"].fillna(0) > 0]
    if has.empty:
        return "No row of this table has Inception metrics (eval=inception adds them)."
    protos = has[FID_KEYS].drop_duplicates()
    if len(protos) > 1:
        what = "; ".join(f"{k} = {sorted(map(str, has[k].unique()))}" for k in FID_KEYS if has[k].nunique() > 1)
        raise ValueError(f"one table would mix Inception protocols ({what}); use one eval.inception setting per table")
    p = protos.iloc[0]
    which = ("every row" if len(has) == len(g) else
             "rows " + ", ".join(sorted({f"{m} {k:g}" for m, k in zip(has["method"], has["budget_keep"])})) +
             " only (blank elsewhere)")
    def low_n(w) -> bool:  # bench.metrics.fid's n < 10,000 warning, kept in the row's `warnings`
        return isinstance(w, list) and any("< 10,000" in x for x in w)
    warned = "warnings" in has and bool(has["warnings"].map(low_n).any())
    small = " Below 10,000 samples FID is biased upward: compare only at this n; read KID beside it." if warned else ""
    return f"Inception metrics ({p['fid_impl']}, n={int(p['fid_n'])}, ref {p['fid_ref']}): {which}.{small}"


def teacher_note(g: pd.DataFrame) -> str | None:
    """Which dense weights the rows of a group started from (Row.teacher_sha256); rows from two teachers
    do not compare, so a table that mixes them says so (rows before the field: unknown)."""
    if "teacher_sha256" not in g.columns:
        return None
    sha = g["teacher_sha256"].fillna("").astype(str)
    known = sorted(set(sha[sha != ""]))
    if not known:
        return None
    n_unknown = int((sha == "").sum())
    unknown = f" ({n_unknown} older rows do not record it)" if n_unknown else ""
    if len(known) == 1:
        return f"Teacher sha256 {known[0][:12]}: " + (f"{len(g) - n_unknown} rows{unknown}." if n_unknown else "every row.")
    per = "; ".join(f"{k[:12]}: {int((sha == k).sum())} rows" for k in known)
    return f"WARNING: these rows come from {len(known)} different teachers ({per}){unknown}; rows of different teachers do not compare."


def fmt_cell(r, c: str) -> str:
    """mean ± std over seeds; with one seed, the metric's own bootstrap interval when it has one."""
    lo, hi = r.get(f"{c}_ci_lo"), r.get(f"{c}_ci_hi")
    if int(r["n_seeds"]) == 1 and lo is not None and pd.notna(lo) and pd.notna(hi):
        return f"{fmt_num(r[c])} [{fmt_num(lo)}, {fmt_num(hi)}]"
    return fmt_pm(r[c], r[f"{c}_std"])


def fmt_speedup(r) -> str:
    """'1.97 [1.93, 2.01]', '1.02 [0.97, 1.07] ≈1' (interval contains 1), '1.00' (dense), '' (none)."""
    s = r["speedup"]
    if pd.isna(s):
        return ""
    lo, hi = r.get("speedup_lo"), r.get("speedup_hi")
    if lo is None or pd.isna(lo) or pd.isna(hi):
        return fmt_num(s)
    note = r.get("speedup_note") or ""
    return f"{fmt_num(s)} [{fmt_num(lo)}, {fmt_num(hi)}]" + (f" {note}" if note else "")


def usual_variants(lines: pd.DataFrame, variants: list[str]) -> dict:
    """Each variant key's most common value over a table's lines (the smallest on a tie): the setting
    of most lines, which their names leave out (a tier's 300 fine-tune steps; its teacher rows, at 0
    steps, are named so)."""
    return {k: lines[k].mode(dropna=False).sort_values().iloc[0] for k in variants if k != "method_variant"}


def variant_suffix(r, variants: list[str], usual: dict) -> str:
    """What tells a line from the method's other lines: " (finetune_steps 80)" where it differs from the
    table's usual value (usual_variants), and a method.* variant as itself, " (outputs=x0)" (none for
    the method as configured)."""
    return "".join((f" ({r[k]})" if r[k] else "") if k == "method_variant" else
                   ("" if k in usual and _same(r[k], usual[k]) else f" ({k} {r[k]})") for k in variants)


def _same(a, b) -> bool:
    return bool(a == b) or (pd.isna(a) and pd.isna(b))


def usual_note(lines: pd.DataFrame, variants: list[str]) -> str | None:
    """What a line without a suffix has, when some line of the table carries one."""
    usual = usual_variants(lines, variants)
    named = [k for k, v in usual.items() if not all(_same(x, v) for x in lines[k])]
    return ("A line without a suffix has " + ", ".join(f"{k} {usual[k]}" for k in named) + ".") if named else None


def line_suffixes(lines: pd.DataFrame) -> list[str]:
    """Each line's variant suffix as the table names it (a line's name is method + suffix; "" for the method as usual):
    the one naming rule of the table, the ranking (bench.ranking) and the figure's series (bench.figures)."""
    variants = variant_keys(lines)  # the keys on which one method's lines at one budget differ (not method_version 2)
    usual = usual_variants(lines, variants)
    return [variant_suffix(r, variants, usual) for _, r in lines.iterrows()]


def cells(lines: pd.DataFrame, vcols: list[str]) -> tuple[list[str], list[list[str]]]:
    head = ["method", "budget", "n_seeds"] + [label(c) for c in vcols] + [label("speedup")]
    body = [[r["method"] + sfx, f"{r['budget_measure']} {r['budget_keep']:g}", str(int(r["n_seeds"]))]
            + [fmt_cell(r, c) for c in vcols] + [fmt_speedup(r)]
            for (_, r), sfx in zip(lines.iterrows(), line_suffixes(lines))]
    return head, body


def _runs(n: int, what: str) -> str:
    return f"{n} {what} run{'' if n == 1 else 's'}"


def provenance(df: pd.DataFrame) -> str:
    """The header line of every output: how many runs finished (their rows are the tables) and how
    many failed (listed, never averaged), and the commits that produced them."""
    shas = []
    for sha, g in df.groupby("git_sha", sort=True):
        shas.append(f"{sha}-dirty" if g["git_dirty"].astype(bool).any() else str(sha))
    n_failed = int(df["status"].ne("ok").sum())
    counts = _runs(len(df) - n_failed, "finished") + (f" and {_runs(n_failed, 'failed')}" if n_failed else "")
    return f"generated by bench/report.py from {counts} @ {', '.join(shas)}"


def _failed_cells(failed: pd.DataFrame) -> list[list[str]]:
    err = failed["error"].fillna("").astype(str).str.replace(r"\s+", " ", regex=True).str.slice(0, 300)
    return [[r["run"], r["method"], f"{r['budget_measure']} {r['budget_keep']:g}", str(r["seed"]),
             r["status"], e] for (_, r), e in zip(failed.iterrows(), err)]


# ---------------------------------------------------------------- renderers
def _md_table(head: list[str], body: list[list[str]], left: int) -> list[str]:
    return markdown_table(head, body, left=left).split("\n")


def render_md(prov: str, name: str, groups: list, failed: pd.DataFrame, apart: pd.DataFrame | None = None,
              skipped: list[str] = ()) -> str:
    out = [f"<!-- {prov} -->", f"# Results: {name}", "",
           INTRO + " " + SPEEDUP_TEXT, ""]
    for key, lines, vcols, note in groups:
        out += [f"## {title(key)}", ""]
        out += [f"*{n}*\n" for n in (proxy_note(key, vcols), note) if n]
        out += _md_table(*cells(lines, vcols), left=2) + [""]
    out += ["## Failed runs", ""]
    out += _md_table(["run", "method", "budget", "seed", "status", "error"], _failed_cells(failed), left=6) \
        if len(failed) else ["None."]
    if apart is not None and len(apart):
        out += ["", "## Runs set apart (not averaged)", "",
                "These runs share method, budget and seed with another run but differ in some other setting, so "
                "they are not seeds of one setting; pick one with `python -m bench.report --where KEY=VALUE`.", ""]
        out += _md_table(["run", "method", "budget", "seed", "config_sha"],
                         [[r["run"], r["method"], f"{r['budget_measure']} {r['budget_keep']:g}", str(r["seed"]),
                           str(r["config_sha"])] for _, r in apart.iterrows()], left=5)
    if skipped:
        out += ["", "## Files skipped (unreadable)", ""] + [f"- {m}" for m in skipped]
    return "\n".join(out) + "\n"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "↑": r"$\uparrow$",
        "≈": r"$\approx$", "→": r"$\rightarrow$",
        "↓": r"$\downarrow$", "·": r"$\cdot$", "—": "---"}


def tex_escape(s) -> str:
    return "".join(_TEX.get(c, c) for c in str(s))


def render_tex(prov: str, groups: list, failed: pd.DataFrame) -> str:
    out = [f"% {prov}", "% one table per protocol group; needs \\usepackage{booktabs}", ""]
    for key, lines, vcols, note in groups:
        head, body = cells(lines, vcols)
        caption = " ".join(n for n in (title(key) + ".", proxy_note(key, vcols), note) if n)
        out += ["\\begin{table}[ht]", "\\centering", f"\\caption{{{tex_escape(caption)}}}",
                "\\begin{tabular}{ll" + "r" * (len(head) - 2) + "}", "\\toprule",
                " & ".join(map(tex_escape, head)) + " \\\\", "\\midrule"]
        out += [" & ".join(map(tex_escape, r)) + " \\\\" for r in body]
        out += ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]
    if len(failed):
        out += ["\\paragraph{Failed runs} (not averaged into any table)", "\\begin{itemize}"]
        out += [f"\\item \\texttt{{{tex_escape(c[0])}}} ({tex_escape(c[4])}): {tex_escape(c[5])}"
                for c in _failed_cells(failed)]
        out += ["\\end{itemize}", ""]
    return "\n".join(out)


def render_csv(prov: str, groups: list) -> str:
    parts = [lines.assign(**key)[GROUP_KEYS + list(lines.columns)] for key, lines, _, _ in groups]
    df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=GROUP_KEYS + LINE_KEYS)
    vcols = order_metrics(c for _, _, vc, _ in groups for c in vc if c.startswith("m_")) + list(COSTS)
    cols = GROUP_KEYS + LINE_KEYS + ["n_seeds"] + [c for v in vcols for c in (v, f"{v}_std")] + \
        ["speedup", "speedup_lo", "speedup_hi", "speedup_note"]
    return f"# {prov}\n" + df.reindex(columns=cols).to_csv(index=False, float_format="%.6g", lineterminator="\n")


def runs_csv(prov: str, df: pd.DataFrame) -> str:
    fields = [f.name for f in dataclasses.fields(Row) if f.name not in ("metrics", "wall_s", "versions")]
    rest = sorted(c for c in df.columns if c not in fields)
    cols = [c for c in fields if c in df.columns] + sorted(c for c in rest if c.startswith("m_")) \
        + sorted(c for c in rest if c.startswith("wall_")) + [c for c in rest if not c.startswith(("m_", "wall_"))]
    df = df.sort_values(GROUP_KEYS + LINE_KEYS + ["seed", "run"], kind="mergesort", na_position="last")
    return f"# {prov}\n" + df[cols].to_csv(index=False, lineterminator="\n")


# ---------------------------------------------------------------- figure
def plot(groups: list, base: Path) -> list[Path]:
    """Quality vs speedup and vs keep MACs, one row of panels per protocol group (bench/figures.py)."""
    return figures.save(figures.quality_figure(groups, label=label), base)


# ---------------------------------------------------------------- entry points
def where(df: pd.DataFrame, conditions: list[str]) -> pd.DataFrame:
    """Rows whose column KEY equals VALUE for every 'KEY=VALUE' (compared as text: finetune_steps=80)."""
    for c in conditions:
        key, sep, value = c.partition("=")
        if not sep or key not in df.columns:
            known = ", ".join(sorted(c for c in df.columns if not c.startswith(("m_", "wall_"))))
            raise ValueError(f"--where {c!r}: use KEY=VALUE with a row field as KEY ({known})")
        df = df[df[key].astype(str) == value]
    return df


def report_groups(df: pd.DataFrame, latency_pass: dict | None = None
                  ) -> tuple[list, list[pd.DataFrame], pd.DataFrame, pd.DataFrame]:
    """(groups, their rows, rows set apart, failed rows) of a results set: one (key, lines, value
    columns, note) per protocol group, as every renderer and the figure take them; `latency_pass`:
    the record of bench.latency_pass over these rows (bench.latency_pass.load), or None."""
    from bench.latency_pass import pooled

    df = pooled(df, latency_pass)  # rows of the GPUs the pass pooled (--also) join its device's tables
    bad = df["status"].ne("ok")  # failed (or unfinished) rows are listed, never averaged
    ok, failed = df[~bad], df[bad].sort_values(["run"], kind="mergesort")
    if "sampler" in ok.columns and ok["sampler"].isin(ADAPTIVE).any():  # an adaptive solver's measured NFE
        ok = ok.assign(nfe=ok["nfe"].astype(object).where(~ok["sampler"].isin(ADAPTIVE), "adaptive"))  # is no protocol
    groups, group_rows, apart = [], [], []
    for key, g in ok.groupby(GROUP_KEYS, dropna=False, sort=True):
        g, a = set_apart(g)
        apart.append(a)
        if g.empty:
            continue
        lines, vcols, note = summarize(g, latency_pass)
        note = " ".join(n for n in (inception_note(g), teacher_note(g), made_on_note(g), note) if n)
        groups.append((dict(zip(GROUP_KEYS, key)), lines, vcols, note))
        group_rows.append(g)
    apart = pd.concat(apart).sort_values(["run"], kind="mergesort") if apart else ok.iloc[:0]
    return groups, group_rows, apart, failed


def build_report(df: pd.DataFrame, out_dir, name: str = "default", skipped: list[str] | None = None,
                 latency_pass: dict | None = None) -> list[Path]:
    """Write tables, figure and runs.csv for the rows in df (as from load_rows); return the paths.
    `skipped`: files load_rows could not read, listed in the tables' text; `latency_pass`: the runs
    folder's one-process latency record (bench.latency_pass.load), whose speedups the lines take."""
    if df.empty:
        raise ValueError("no rows to report; point --runs at a folder with row.json files")
    out = Path(out_dir)
    prov = provenance(df)
    groups, group_rows, apart, failed = report_groups(df, latency_pass)
    texts = {out / "tables" / f"{name}.md": render_md(prov, name, groups, failed, apart, skipped or []),
             out / "tables" / f"{name}.tex": render_tex(prov, groups, failed),
             out / "tables" / f"{name}.csv": render_csv(prov, groups),
             out / f"{name}_runs.csv": runs_csv(prov, df)}
    # ---- hook: ranking with confidence over seeds (bench.ranking, the GPU tier's module): <name>_ranking.md and
    # a section of the page, only when two or more methods share a budget with >= 2 seeds each
    from bench.ranking import report_ranking
    ranking = report_ranking(df[df["status"].eq("ok")], latency_pass=latency_pass)
    if ranking:
        texts[out / "tables" / f"{name}_ranking.md"] = ranking["markdown"]
    # ---- paper column (bench/paper.py): every number of results/paper.csv beside ours, in files of its own
    from bench import paper
    comp = paper.comparison(df)
    texts.update(paper.report_texts(df, out, name, prov, comp=comp))
    # ---- end paper column
    for path, text in texts.items():
        atomic_write_text(path, text)
    figs = plot(groups, out / "figures" / f"{name}_quality_vs_speedup")
    # the page inlines this figure and EntPruner's plots of these rows (run_all.sh: <name>_entpruner_*.png), not
    # the figures of another report whose name starts with this one's (gpu_tier's beside gpu's)
    pngs = [figs[0]] + sorted((out / "figures").glob(f"{name}_entpruner_*.png"))
    page = out / f"{name}.html"
    atomic_write_text(page, render_html(prov, name, df, groups, group_rows, failed, page, pngs, INTRO + " " + SPEEDUP_TEXT,
                                        apart, skipped or [], paper=comp, ranking=ranking))
    return list(texts) + figs + [page]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="results/runs", help="folder searched for **/row.json")
    ap.add_argument("--out", default="reports",
                    help="writes <out>/tables, <out>/figures, <out>/<name>_runs.csv and <out>/<name>.html")
    ap.add_argument("--name", default="default", help="file stem of the tables and figure")
    ap.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                    help="only rows whose field KEY equals VALUE (repeatable), e.g. --where finetune_steps=80")
    args = ap.parse_args(argv)
    skipped: list[str] = []
    try:
        df = load_rows(args.runs, skipped=skipped)
        if df.empty:
            print(f"error: no readable row.json under {args.runs}", file=sys.stderr)
            return 1
        from bench.latency_pass import load as load_latency_pass
        paths = build_report(where(df, args.where), args.out, args.name, skipped, load_latency_pass(args.runs))
    except (ValueError, OSError) as e:  # mixed protocols, a bad --where, a full disk: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
