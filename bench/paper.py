"""The paper column: the papers' printed numbers (``results/paper.csv``) beside ours.

    python -m bench.report            # writes reports/tables/<name>_paper.{md,csv} with the other tables
    python -m bench.paper [--runs results/runs] [--paper results/paper.csv]   # the comparison alone, to stdout

Every line of ``paper.csv`` is one printed number: a paper, a table, a row and a column, with the
experiment cell that reproduces it (empty when the suite has none) and the paper's protocol. For
each line the comparison shows the paper's value, ours (mean over the seeds of the rows that
reproduce that cell: same model, data set and method, the printed depth, and for width methods
the printed parameter count within 3 %), their difference (ours - paper) and the protocol items in
which our rows differ from the paper's: sampling steps (NFE and sampler), guidance scale, sample
count, reference batch, fine-tune steps and evaluator. A printed number without a row of ours says
"not run" (its cell exists: it needs the paper's weights and data, see the README) or "no cell"
(the suite has no method or cell for that printed row).

This is the one place where numbers of different protocols stand side by side, on purpose: the
differences column says how far apart the protocols are, and a difference in quality between
protocols is not a reproduction gap. A pure function of the rows and the CSV (no clock, no git).
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
PAPER_CSV = ROOT / "results" / "paper.csv"
COLUMNS = ["paper", "arxiv", "table", "row", "column", "experiment", "cell", "model", "dataset", "method", "depth",
           "params_M", "finetune_iters", "sampler", "nfe", "cfg_scale", "metric", "value", "metric_impl", "metric_n",
           "metric_ref", "source"]
PARAMS_TOL = 0.03          # a width row reproduces a printed size within 3 % of its parameters
NOT_RUN, NO_CELL, RAN = "not run", "no cell", "ran"
# metric -> the row field that holds ours (Inception metrics: m_<name>; cost: the measured column)
OURS = {"params_M": "params_M", "macs_G": "macs_G"}


def read_paper(path: str | Path = PAPER_CSV) -> pd.DataFrame:
    """paper.csv as text columns (numbers as printed), comment lines skipped; value as float too."""
    path = Path(path)
    with path.open(newline="") as f:
        recs = list(csv.DictReader(line for line in f if not line.startswith("#")))
    if not recs:
        raise ValueError(f"{path}: no paper numbers")
    missing = [c for c in ("paper", "table", "row", "column", "model", "dataset", "method", "metric", "value")
               if c not in recs[0]]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; expected {', '.join(COLUMNS)}")
    df = pd.DataFrame.from_records(recs).fillna("")
    df["value_f"] = df["value"].map(float)
    return df


def _num(s) -> float | None:
    try:
        x = float(s)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def matching(rows: pd.DataFrame, p: pd.Series) -> pd.DataFrame:
    """Our finished rows that reproduce the printed cell p: same model, data set and method, the
    printed depth (block counts), and for width plans the printed parameter count within PARAMS_TOL."""
    if rows.empty or not {"model", "dataset", "method"} <= set(rows.columns):
        return rows.iloc[:0]
    m = rows[(rows["model"] == p["model"]) & (rows["dataset"] == p["dataset"]) & (rows["method"] == p["method"])]
    depth, params = _num(p.get("depth")), _num(p.get("params_M"))
    if depth is not None and "depth" in m:
        m = m[m["depth"] == int(depth)]
    if params is not None and "granularity" in m and "params_M" in m:
        width = m["granularity"] != "block"
        m = m[~width | ((m["params_M"] - params).abs() <= PARAMS_TOL * params)]
    return m


def _fmt(x, sig: int = 3) -> str:
    """3 significant digits, no scientific notation (as the report's cells)."""
    if x is None or not math.isfinite(float(x)):
        return ""
    x = float(x)
    d = sig - 1 if x == 0 else sig - 1 - math.floor(math.log10(abs(x)))
    return f"{round(x, d):.0f}" if d < 0 else f"{x:.{d}f}"


def _fmt_pm(mean: float, std: float) -> str:
    return _fmt(mean) if not math.isfinite(std) or std == 0 else f"{_fmt(mean)} ± {_fmt(std, 2)}"


def differences(m: pd.DataFrame, p: pd.Series) -> list[str]:
    """The protocol items in which our rows m differ from the paper's line p (empty: none found)."""
    out = []
    if p["metric"] in OURS:        # a measured size: no sampling or training protocol behind it
        return out

    def vals(col):
        return sorted({str(v) for v in m[col].dropna()}) if col in m else []

    inception = p["metric"] in ("fid", "sfid", "is", "precision", "recall", "kid")
    nfe, sampler = _num(p.get("nfe")), p.get("sampler", "")
    if nfe is not None or sampler:
        ours = sorted({(int(r["nfe"]), str(r["sampler"])) for _, r in m.iterrows()})
        want = (int(nfe) if nfe is not None else None, sampler)
        if any((want[0] is not None and n != want[0]) or (sampler and s != sampler) for n, s in ours):
            out.append("steps: " + ", ".join(f"NFE {n} {s}" for n, s in ours) + f" (paper NFE {want[0]} {sampler})")
    cfg = _num(p.get("cfg_scale"))
    if cfg is not None and any(abs(float(v) - cfg) > 1e-9 for v in m["cfg_scale"]):
        out.append(f"cfg {', '.join(vals('cfg_scale'))} (paper {p['cfg_scale']})")
    n = _num(p.get("metric_n"))
    if n is not None:
        col = "fid_n" if inception else "metric_n"
        if col in m and any(int(v) != int(n) for v in m[col].dropna()):
            out.append(f"samples {', '.join(vals(col))} (paper {int(n)})")
    ref = p.get("metric_ref", "")
    if ref and inception and "fid_ref" in m:
        other = [v for v in vals("fid_ref") if ref not in v]
        if other:
            out.append(f"reference {', '.join(other)} (paper {ref})")
    impl = p.get("metric_impl", "")
    if impl and inception and "fid_impl" in m:
        out.append(f"evaluator {', '.join(vals('fid_impl'))} (paper {impl})")
    iters = _num(p.get("finetune_iters"))
    if iters is not None:
        steps = sorted({int(v) for v in m["finetune_steps"]})
        released = p["method"] == "dense" and steps == [0]   # the released checkpoint is the paper's trained model
        if not released and steps != [int(iters)]:
            out.append(f"fine-tune {', '.join(map(str, steps))} steps (paper {int(iters)})")
    return out


def compare(rows: pd.DataFrame, paper: pd.DataFrame) -> pd.DataFrame:
    """One line per (paper number, protocol group of our matching rows); a printed number without
    rows of ours gets one line with status "not run" or "no cell"."""
    ok = rows[rows["status"] == "ok"] if "status" in rows else rows
    lines = []
    for _, p in paper.iterrows():
        base = {c: p.get(c, "") for c in ("paper", "arxiv", "table", "row", "column", "experiment", "cell", "method",
                                           "metric", "source")}
        base["paper_value"] = p["value"]
        m = matching(ok, p)
        col = OURS.get(p["metric"], f"m_{p['metric']}")
        if col in m:
            m = m[m[col].notna()]
        if m.empty or col not in m:
            lines.append({**base, "ours": "", "diff": "", "n_seeds": 0,
                          "status": NOT_RUN if p.get("cell") else NO_CELL, "differences": ""})
            continue
        keys = [k for k in ("finetune_steps", "nfe", "sampler", "cfg_scale", "fid_n", "fid_ref", "fid_impl",
                            "metric_n", "method_version") if k in m]
        for _, g in m.groupby(keys, dropna=False, sort=True):
            mean, std = float(g[col].mean()), float(g[col].std(ddof=1)) if len(g) > 1 else float("nan")
            diff = mean - p["value_f"]
            lines.append({**base, "ours": _fmt_pm(mean, std), "diff": ("+" if diff > 0 else "") + _fmt(diff),
                          "n_seeds": len(g), "status": RAN, "differences": "; ".join(differences(g, p)) or "none"})
    return pd.DataFrame(lines, columns=["paper", "arxiv", "table", "row", "column", "experiment", "cell", "method", "metric",
                                        "paper_value", "ours", "diff", "n_seeds", "status", "differences", "source"])


def render_md(prov: str, name: str, comp: pd.DataFrame) -> str:
    from bench.tables import markdown_table

    out = [f"<!-- {prov} -->", f"# Paper column: {name}", "",
           "Each printed number of `results/paper.csv` beside ours (mean ± std over seeds) and the difference "
           "(ours − paper). *differences* lists the protocol items in which our rows differ from the paper's "
           "(steps, guidance, samples, reference batch, fine-tune steps, evaluator): numbers of different protocols "
           "are not a reproduction gap. *not run*: the cell exists (it needs the paper's weights and data: README, "
           "\"Reproduce a paper table\"); *no cell*: the suite has no method or cell for that printed row.", ""]
    for (paper, arxiv, table), g in comp.groupby(["paper", "arxiv", "table"], sort=False):
        exp = ", ".join(sorted({e for e in g["experiment"] if e}))
        where = f"Table {table}" if str(table).isdigit() else str(table)
        out += [f"## {paper} (arXiv {arxiv}), {where}" + (f" — experiment={exp}" if exp else ""), ""]
        body = [[r["row"], r["column"], r["method"], r["paper_value"], r["ours"], r["diff"],
                 str(r["n_seeds"]) if r["n_seeds"] else "", r["status"], r["differences"]] for _, r in g.iterrows()]
        out += [markdown_table(["row", "column", "method", "paper", "ours", "ours − paper", "n_seeds", "status",
                                "differences"], body), ""]
        out += [f"Source: {s}." for s in sorted(set(g["source"])) if s] + [""]
    return "\n".join(out)


def comparison(df: pd.DataFrame, paper_csv: str | Path | None = None) -> pd.DataFrame | None:
    """compare() of the rows with results/paper.csv (or `paper_csv`); None when there is no such file."""
    path = Path(paper_csv) if paper_csv is not None else PAPER_CSV
    return compare(df, read_paper(path)) if path.exists() else None


def report_texts(df: pd.DataFrame, out: Path, name: str, prov: str,
                 paper_csv: str | Path | None = None, comp: pd.DataFrame | None = None) -> dict[Path, str]:
    """{path: text} of the paper column for bench.report: <out>/tables/<name>_paper.md and .csv.
    Nothing when there is no paper.csv (a fresh suite without papers). `comp`: comparison() already made."""
    comp = comparison(df, paper_csv) if comp is None else comp
    if comp is None:
        return {}
    return {Path(out) / "tables" / f"{name}_paper.md": render_md(prov, name, comp),
            Path(out) / "tables" / f"{name}_paper.csv": f"# {prov}\n" + comp.to_csv(index=False, lineterminator="\n")}


def main(argv=None) -> int:
    from bench.results import load_rows

    ap = argparse.ArgumentParser(prog="python -m bench.paper", description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="results/runs", help="folder searched for **/row.json")
    ap.add_argument("--paper", default=str(PAPER_CSV), help="the papers' numbers (results/paper.csv)")
    args = ap.parse_args(argv)
    try:
        df = load_rows(args.runs)
        comp = compare(df if not df.empty else pd.DataFrame(columns=["status"]), read_paper(args.paper))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(render_md(f"bench/paper.py from {args.runs}", "paper", comp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
