"""Ranking with confidence: mean and 95 % interval over seeds per (method, budget), and whether each
method differs from the best baseline at that budget, by a paired test over seeds.

    python -m bench.ranking --runs results/gpu/tier [--metric fid] [--out reports/tables/gpu_tier_ranking.md]

The statistics, and why these:

* Per line (method, budget, and the variant keys of bench.report: fine-tune steps, method version, method.* variant):
  the mean of the metric over seeds and a Student-t interval, mean +- t(0.975, n-1) s / sqrt(n)
  (s the sample standard deviation over the n seeds). One seed: no interval.
* The best baseline of a budget: among the baselines (methods whose config's ``_target_`` lives in
  ``baselines.*``; dense is the unpruned reference, no baseline) at that budget fraction
  (``budget_keep``; block and MAC budgets of one fraction are one cost point), the one with the best
  mean (lowest FID).
* The test is paired over seeds, not a bootstrap over samples. Rows of one seed share their
  fine-tune seed (data order and noise), the calibration probes and the evaluation noise (the same
  per-sample seeds for every method), so whatever those seeds do to a row, they do alike to both
  rows of a pair and it cancels in the per-seed difference d_s = metric(method, s) - metric(best
  baseline, s). On the n seeds both have: t = mean(d) / (sd(d) / sqrt(n)), n - 1 degrees of
  freedom, two-sided p; the method differs at 95 % when p < 0.05, i.e. when the 95 % interval of
  mean(d) excludes 0. A bootstrap over a row's 10,000 samples (the FID intervals in each row) sees
  only the sampling noise of one fine-tuned model, not how much the fine-tune itself varies from
  seed to seed, which is what decides whether a ranking repeats.
* Caveats, printed with the table: with 3 seeds (2 degrees of freedom, t = 4.30) only large and
  consistent differences are detected; the best baseline is picked on the same rows (its mean is
  optimistic, which makes "better than the best baseline" harder, "worse" easier); the tests are
  uncorrected per method (about 1 in 20 methods that do not differ comes out "differs"), so Holm's
  step-down correction over the methods of a budget is given beside.

Student-t quantiles and p-values come from scipy.stats.t.
"""
from __future__ import annotations

import argparse
import math
import sys
from functools import lru_cache
from pathlib import Path

import pandas as pd

from bench.report import LINE_KEYS as _REPORT_LINE_KEYS, VARIANT_KEYS, line_suffixes

# what makes two rows' numbers incomparable (bench.report.GROUP_KEYS): one ranking per such group
PROTOCOL_KEYS = ["model", "dataset", "process", "device", "latency_mode", "latency_dtype", "latency_batch", "sampler",
                 "nfe", "cfg_scale", "eval_precision", "metric_impl", "metric_n", "metric_ref", "fid_impl", "fid_n",
                 "fid_ref"]
LINE_KEYS = [*_REPORT_LINE_KEYS, *VARIANT_KEYS]  # a line of bench.report: method, budget and its variant keys
DENSE = "dense"
LOWER_IS_BETTER = {"fid": True, "kid": True, "sfid": True, "fd_clf": True, "precision": False, "recall": False,
                   "cond_acc": False, "is": False, "ssim_teacher": False}
SHOWN = ["fid", "kid", "precision", "recall"]  # columns of the table beside the ranked metric


# ---------------------------------------------------------------- Student t (scipy.stats)
def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom."""
    from scipy.stats import t as student

    return 0.0 if math.isinf(t) else float(2.0 * student.sf(abs(t), df))


@lru_cache(maxsize=None)
def t_quantile(level: float, df: int) -> float:
    """The two-sided critical value: P(|T| <= q) = level (0.95, df 2 -> 4.3027)."""
    from scipy.stats import t as student

    return float(student.ppf(0.5 + level / 2.0, df))


# ---------------------------------------------------------------- the statistics
def mean_ci(values, level: float = 0.95) -> tuple[float, float, int]:
    """(mean, half-width of the Student-t interval, n); half-width NaN for fewer than 2 values."""
    v = [float(x) for x in values if pd.notna(x)]
    n = len(v)
    if n == 0:
        return float("nan"), float("nan"), 0
    mean = sum(v) / n
    if n < 2:
        return mean, float("nan"), n
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1))
    return mean, t_quantile(level, n - 1) * sd / math.sqrt(n), n


def paired_test(a: dict, b: dict, level: float = 0.95) -> dict:
    """Paired t-test of a - b over the seeds both have (dicts seed -> value). Returns n, diff (mean
    of the differences), lo / hi (its interval), t and p (two-sided); n < 2 gives NaNs."""
    seeds = sorted(s for s in set(a) & set(b) if pd.notna(a[s]) and pd.notna(b[s]))
    d = [float(a[s]) - float(b[s]) for s in seeds]
    n = len(d)
    out = {"n": n, "seeds": seeds, "diff": float("nan"), "lo": float("nan"), "hi": float("nan"),
           "t": float("nan"), "p": float("nan")}
    if n < 2:
        return out
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    half = t_quantile(level, n - 1) * sd / math.sqrt(n)
    if sd == 0.0:  # every seed moved by exactly the same amount
        t = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
    else:
        t = mean / (sd / math.sqrt(n))
    return {**out, "diff": mean, "lo": mean - half, "hi": mean + half, "t": t, "p": t_two_sided_p(t, n - 1)}


def holm(pvalues: list[float], alpha: float = 0.05) -> list[bool]:
    """Holm's step-down rejections (family-wise error <= alpha); NaN p-values are never rejected."""
    idx = sorted((i for i, p in enumerate(pvalues) if pd.notna(p)), key=lambda i: pvalues[i])
    out, m = [False] * len(pvalues), len(idx)
    for rank, i in enumerate(idx):
        if pvalues[i] * (m - rank) >= alpha:
            break
        out[i] = True
    return out


@lru_cache(maxsize=None)
def _is_baseline(name: str) -> bool:
    """A method whose config's _target_ is a class in baselines.* (dense excluded)."""
    if name == DENSE:
        return False
    from bench import registry
    from bench.api import BenchError

    try:
        return str(registry.load(name).get("_target_", "")).startswith("baselines.")
    except (BenchError, Exception):  # a method of another checkout: not known here, so no baseline
        return False


# ---------------------------------------------------------------- the ranking of one protocol group
def rank(rows: pd.DataFrame, metric: str = "fid", baselines=None, level: float = 0.95,
         latency_pass: dict | None = None) -> pd.DataFrame:
    """One line per (method, budget, variant) of rows that share one protocol: mean and interval of
    `metric` (and of SHOWN), the seeds, the best baseline of its budget and the paired test against
    it. `baselines`: method names (None: from the configs). The speedup: from the one-process latency
    pass (bench.latency_pass.load) where it timed every row of the line, else the rows' own timings
    (a flagged one gives none). Sorted by budget (largest first), then by the mean, best first."""
    col = f"m_{metric}"
    if col not in rows.columns:
        raise ValueError(f"no rows carry metric {metric!r}; metrics present: "
                         f"{', '.join(sorted(c[2:] for c in rows.columns if c.startswith('m_') and '_ci_' not in c))}")
    low = LOWER_IS_BETTER.get(metric, True)
    keys = [k for k in LINE_KEYS if k in rows.columns]
    is_base = (lambda m: m in set(baselines)) if baselines is not None else _is_baseline
    dense_ms = rows.loc[rows["method"] == DENSE, "latency_ms"].mean() if "latency_ms" in rows.columns else float("nan")
    lines = []
    for key, g in rows.groupby(keys, dropna=False, sort=True):
        k = dict(zip(keys, key))
        dup = g["seed"].duplicated(keep=False)
        per_seed = dict(zip(g.loc[~dup, "seed"], g.loc[~dup, col]))
        rec = {**k, "baseline": is_base(k["method"]), "seeds": sorted(per_seed), "per_seed": per_seed,
               "duplicate_seeds": sorted(set(g.loc[dup, "seed"]))}
        for m in dict.fromkeys([metric, *SHOWN]):
            if f"m_{m}" in g.columns:
                rec[m], rec[f"{m}_ci"], _ = mean_ci(g.loc[~dup, f"m_{m}"], level)
        timed = (latency_pass or {}).get("runs", {})
        if timed and "run" in g.columns and g.loc[~dup, "run"].isin(list(timed)).all():
            rec["speedup"], rec["speedup_ci"], _ = mean_ci([timed[r]["speedup"] for r in g.loc[~dup, "run"]], level)
        elif "latency_ms" in g.columns and pd.notna(dense_ms):
            sp = dense_ms / g.loc[~dup, "latency_ms"]
            if "latency_flags" in g.columns:  # a flagged timing gives no speedup (bench.report)
                sp = sp[~g.loc[~dup, "latency_flags"].map(lambda f: isinstance(f, list) and len(f) > 0)]
            rec["speedup"], rec["speedup_ci"], _ = mean_ci(sp, level)
        lines.append(rec)
    out = pd.DataFrame(lines)
    if out.empty:
        return out
    out["best_baseline"], out["diff"], out["diff_lo"], out["diff_hi"], out["p"], out["n_paired"], out["holm"] = \
        None, float("nan"), float("nan"), float("nan"), float("nan"), 0, False
    for keep, g in out.groupby("budget_keep"):
        base = g[g["baseline"] & g[metric].notna()]
        if base.empty or keep >= 1.0:
            continue
        best = base.loc[base[metric].idxmin() if low else base[metric].idxmax()]
        for i in g.index:
            if out.at[i, "method"] == DENSE:
                continue
            out.at[i, "best_baseline"] = best["method"]
            if i == best.name:
                continue
            r = paired_test(out.at[i, "per_seed"], best["per_seed"], level)
            out.at[i, "diff"], out.at[i, "diff_lo"], out.at[i, "diff_hi"] = r["diff"], r["lo"], r["hi"]
            out.at[i, "p"], out.at[i, "n_paired"] = r["p"], r["n"]
        tested = [i for i in g.index if pd.notna(out.at[i, "p"])]
        for i, rej in zip(tested, holm([out.at[i, "p"] for i in tested], 1.0 - level)):
            out.at[i, "holm"] = rej
    out["differs"] = out["p"] < 1.0 - level
    out["_dense"] = (out["method"] != DENSE).astype(int)
    out = out.sort_values(["_dense", "budget_keep", metric, "method"], ascending=[True, False, low, True],
                          kind="mergesort").drop(columns="_dense")
    return out.reset_index(drop=True)


# ---------------------------------------------------------------- markdown
def _num(x, sig: int = 3) -> str:
    if x is None or pd.isna(x):
        return ""
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    d = max(0, sig - 1 - math.floor(math.log10(abs(x))))
    return f"{x:.{d}f}"


def _pm(mean, half) -> str:
    if pd.isna(mean):
        return ""
    if pd.isna(half):
        return _num(mean)
    d = max(0, 2 - math.floor(math.log10(abs(mean)))) if mean else 3
    if half > 0:
        d = max(d, 1 - math.floor(math.log10(half)))
    return f"{mean:.{d}f} ± {half:.{d}f}"


def _p(p) -> str:
    if pd.isna(p):
        return ""
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def ranking_sections(rows: pd.DataFrame, metric: str = "fid", baselines=None, level: float = 0.95,
                     latency_pass: dict | None = None) -> tuple[str, list[dict]]:
    """(the explanation, one section per protocol group of the ok rows): a section's title, head, cells
    (the table's text, a list per line), keys (per cell a sort key: the number behind it, or its text)
    and verdicts (one per budget). The one computation behind the markdown file and the HTML page."""
    from bench.latency_pass import pooled

    rows = pooled(rows, latency_pass)  # rows of the GPUs the pass pooled (--also) rank with its device's
    ok = rows[rows["status"].eq("ok")] if "status" in rows.columns else rows
    keys = [k for k in PROTOCOL_KEYS if k in ok.columns]
    pct = f"{level:.0%}"
    intro = (f"Mean ± {pct} Student-t interval over seeds per method and budget. Each method is compared with the best "
             f"baseline of its budget (lowest mean {metric}) by a paired t-test over the seeds both have (rows of one "
             f"seed share the fine-tune seed, the calibration probes and the evaluation noise); Δ is method − best "
             f"baseline with its {pct} interval; 'differs' = p < {1 - level:.2f}, uncorrected; 'Holm' = still "
             f"significant after Holm's correction over the methods of the budget. With 3 seeds only large, "
             f"consistent differences show; the best baseline is chosen on the same rows. bench/ranking.py says why.")
    sections = []
    for gkey, g in ok.groupby(keys, dropna=False, sort=True):
        if metric not in [c[2:] for c in g.columns if c.startswith("m_") and g[c].notna().any()]:
            continue
        lines = rank(g, metric, baselines, level, latency_pass)
        if lines.empty:
            continue
        k = dict(zip(keys, gkey if isinstance(gkey, tuple) else (gkey,)))
        inception = metric in ("fid", "kid", "sfid")
        title = (f"{k.get('model')} · {k.get('dataset')} — {k.get('sampler')}, NFE {k.get('nfe')}, cfg "
                 f"{k.get('cfg_scale')} — {k.get('fid_impl') if inception else k.get('metric_impl')}, "
                 f"n={k.get('fid_n') if inception else k.get('metric_n')} — {k.get('device')}")
        shown = [m for m in dict.fromkeys([metric, *SHOWN]) if m in lines.columns]
        speed = ["speedup"] if "speedup" in lines.columns else []
        head = ["budget", "method", "kind", "seeds"] + shown + speed \
            + ["best baseline", f"Δ {metric} [{pct}]", "p", "differs", "Holm"]
        name_of = _namer(lines)
        cells, sort_keys = [], []
        for _, r in lines.iterrows():
            kind = "dense" if r["method"] == DENSE else ("baseline" if r["baseline"] else "method")
            budget = "1" if r["method"] == DENSE else f"{r['budget_measure']} {r['budget_keep']:g}"
            seeds = ",".join(str(int(s)) for s in r["seeds"]) + (" (dup!)" if r["duplicate_seeds"] else "")
            is_best = r["best_baseline"] == r["method"]
            delta = ("(best)" if is_best else
                     f"{_num(r['diff'])} [{_num(r['diff_lo'])}, {_num(r['diff_hi'])}]" if pd.notna(r["diff"]) else "")
            tested = pd.notna(r["p"])
            cells.append([budget, name_of(r), kind, seeds] + [_pm(r[m], r[f"{m}_ci"]) for m in [*shown, *speed]]
                         + [r["best_baseline"] or "", delta, _p(r["p"]),
                            ("yes" if r["differs"] else "no") if tested else "",
                            ("yes" if r["holm"] else "no") if tested else ""])
            sort_keys.append([r["budget_keep"], name_of(r), kind, len(r["seeds"])] + [r[m] for m in [*shown, *speed]]
                             + [r["best_baseline"] or "", r["diff"], r["p"], cells[-1][-2], cells[-1][-1]])
        sections.append({"title": title, "head": head, "cells": cells, "keys": sort_keys,
                         "verdicts": verdicts(lines, metric, level)})
    return intro, sections


def render_markdown(metric: str, level: float, intro: str, sections: list[dict]) -> str:
    """The markdown of ranking_sections: one table per protocol group, its verdicts below."""
    out = [f"# Ranking with confidence ({metric}, {level:.0%})", "", intro, ""]
    for sec in sections:
        out += [f"## {sec['title']}", "", "| " + " | ".join(sec["head"]) + " |",
                "|" + "|".join(["---"] * len(sec["head"])) + "|"]
        out += ["| " + " | ".join(map(str, c)) + " |" for c in sec["cells"]]
        out += ["", *sec["verdicts"], ""]
    return "\n".join(out)


def ranking_markdown(rows: pd.DataFrame, metric: str = "fid", baselines=None, level: float = 0.95,
                     latency_pass: dict | None = None) -> str:
    """One markdown table per protocol group of the ok rows (status 'ok' or no status column)."""
    return render_markdown(metric, level, *ranking_sections(rows, metric, baselines, level, latency_pass))


def _namer(lines: pd.DataFrame):
    """A line's name as bench.report's table gives it (bench.report.line_suffixes): the method, its method.*
    variant, and a variant key where the line differs from the table's usual value: "dense (finetune_steps 0)"
    beside "dense". Called with a row of `lines` (its index label)."""
    names = {i: r["method"] + sfx for (i, r), sfx in zip(lines.iterrows(), line_suffixes(lines))}
    return lambda r: names[r.name]


def verdicts(lines: pd.DataFrame, metric: str = "fid", level: float = 0.95) -> list[str]:
    """One line per budget fraction of `rank`'s lines: which methods the paired test separates from the best
    baseline, or that none is and why (every Δ interval contains 0; the nearest miss, and the seeds behind it)."""
    low, pct, out, name_of = LOWER_IS_BETTER.get(metric, True), f"{level:.0%}", [], _namer(lines)
    for keep, g in lines[lines["method"] != DENSE].groupby("budget_keep", sort=False):
        best = g["best_baseline"].dropna()
        tested = g[g["p"].notna()]
        head = f"- **budget {keep:g}**"
        if best.empty or tested.empty:
            out.append(f"{head}: no paired test (no baseline, or fewer than 2 seeds in common with it).")
            continue
        sep = tested[tested["differs"]]
        if len(sep):
            words = [f"{name_of(r)} "
                     f"{'better' if (r['diff'] < 0) == low else 'worse'} (Δ {_num(r['diff'])} [{_num(r['diff_lo'])}, "
                     f"{_num(r['diff_hi'])}], p {_p(r['p'])}{', Holm too' if r['holm'] else ''})" for _, r in sep.iterrows()]
            out.append(f"{head}: {len(sep)} of {len(tested)} methods differ from the best baseline {best.iloc[0]} at "
                       f"{pct}: " + "; ".join(words) + ".")
            continue
        half = (tested["diff_hi"] - tested["diff_lo"]) / 2
        near = tested.loc[(tested["diff"].abs() / half).idxmax()]
        n = int(near["n_paired"])
        out.append(f"{head}: none of {len(tested)} methods differs from the best baseline {best.iloc[0]} at {pct}: "
                   f"every Δ interval contains 0. The nearest is {name_of(near)} (Δ {_num(near['diff'])} "
                   f"[{_num(near['diff_lo'])}, {_num(near['diff_hi'])}] over {n} seeds): with {n} seeds a mean "
                   f"difference must exceed {t_quantile(level, max(n - 1, 1)):.2f} standard errors of the per-seed "
                   f"differences, and the seed-to-seed spread of these differences is larger than that allows.")
    return out


def has_seeds_to_compare(rows: pd.DataFrame) -> bool:
    """True when two or more pruning methods share a budget with >= 2 seeds each: something to test."""
    ok = rows[rows["status"].eq("ok")] if "status" in rows.columns else rows
    ok = ok[ok["method"] != DENSE]
    if ok.empty:
        return False
    n = ok.groupby(["budget_keep", "method"])["seed"].nunique()
    return bool((n[n >= 2].groupby(level=0).size() >= 2).any())


def report_ranking(rows: pd.DataFrame, metric: str | None = None, latency_pass: dict | None = None,
                   level: float = 0.95) -> dict | None:
    """bench.report's hook: None when the rows hold no seeds to compare, else the ranking (metric, level,
    intro, sections: ranking_sections; markdown) that the tables' <name>_ranking.md and the HTML page show.
    The metric: Inception FID where the rows have it, else the classifier-feature distance.
    `latency_pass`: the rows folder's one-process latency record, whose speedups the lines take."""
    if not has_seeds_to_compare(rows):
        return None
    if metric is None:
        metric = "fid" if "m_fid" in rows.columns and rows["m_fid"].notna().any() else "fd_clf"
    if f"m_{metric}" not in rows.columns:
        return None
    intro, sections = ranking_sections(rows, metric, level=level, latency_pass=latency_pass)
    return {"metric": metric, "level": level, "intro": intro, "sections": sections,
            "markdown": render_markdown(metric, level, intro, sections) + "\n"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ranking", description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="results/runs", help="folder searched for **/row.json")
    ap.add_argument("--metric", default="fid", help="metric to rank by (fid, kid, precision, recall, fd_clf, ...)")
    ap.add_argument("--level", type=float, default=0.95)
    ap.add_argument("--out", default=None, help="write the markdown here (default: print it)")
    args = ap.parse_args(argv)
    from bench.io import atomic_write_text
    from bench.results import load_rows

    df = load_rows(args.runs)
    if df.empty:
        print(f"error: no readable row.json under {args.runs}", file=sys.stderr)
        return 1
    from bench.latency_pass import load as load_latency_pass

    try:
        text = ranking_markdown(df, args.metric, level=args.level, latency_pass=load_latency_pass(args.runs)) + "\n"
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.out:
        atomic_write_text(Path(args.out), text)
        print(args.out)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
