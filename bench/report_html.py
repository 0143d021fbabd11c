"""One self-contained HTML page per results set (bench.report writes it beside the tables).

    reports/<name>.html   opens from the file system, no server, nothing fetched

At the top, the provenance: the commits, devices and protocols the rows come from. Then every
protocol group's table (the same cells as the markdown table), sortable by any column (click a
header; again for the other direction; blank cells stay last), each line linking its runs' files
(config.yaml, plan.json, log.jsonl, row.json) by paths relative to the page. The figures come
first, embedded as data URIs; the failed runs last, with links to their error.json. The page is a pure
function of the rows and the figure files (same bytes on a rebuild).
"""
from __future__ import annotations

import base64
import html
import numbers
import os
import re
from pathlib import Path
from urllib.parse import quote

import pandas as pd

RUN_FILES = ("config.yaml", "plan.json", "log.jsonl", "row.json")

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em auto; max-width: 1500px;
       padding: 0 1em; color: #1b1b1b; }
h1 { font-size: 1.5em; margin-bottom: .2em; } h2 { font-size: 1.15em; margin-top: 2em; }
.prov { color: #444; } dl.prov { display: grid; grid-template-columns: max-content 1fr; gap: .2em 1em; }
dl.prov dt { font-weight: 600; } dl.prov dd { margin: 0; } dl.prov ul { margin: 0; padding-left: 1.2em; }
.note { background: #f6f6f0; border-left: 3px solid #c9b458; padding: .4em .7em; font-size: .92em; }
.wrap { overflow-x: auto; }
table { border-collapse: collapse; font-size: .9em; font-variant-numeric: tabular-nums; }
th, td { padding: .25em .6em; border-bottom: 1px solid #e2e2e2; white-space: nowrap; }
th { background: #f0f0f0; position: sticky; top: 0; cursor: pointer; user-select: none; text-align: left; }
th:hover { background: #e4e4e4; }
th[aria-sort=ascending]::after { content: " \\25B2"; } th[aria-sort=descending]::after { content: " \\25BC"; }
td.num { text-align: right; } td.runs a { margin-right: .35em; }
tbody tr:hover { background: #fafae8; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { color: #555; font-size: .9em; }
"""

# sorts every table.sortable by the clicked column: numbers numerically (data-sort holds the value),
# text by localeCompare; blank cells last in both directions; the sort is stable
SCRIPT = """
(function () {
  "use strict";
  function key(td) { var v = td.getAttribute("data-sort"); return v === null ? td.textContent.trim() : v; }
  function sortBy(table, col, asc) {
    var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a.cells[col]), y = key(b.cells[col]);
      if (x === "" || y === "") { return x === y ? 0 : (x === "" ? 1 : -1); }
      var nx = Number(x), ny = Number(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return asc ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
    var heads = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads, function (th, col) {
      function go() {
        var asc = th.getAttribute("aria-sort") !== "ascending";
        Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", asc ? "ascending" : "descending");
        sortBy(table, col, asc);
      }
      th.addEventListener("click", go);
      th.addEventListener("keydown", function (e) { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); go(); } });
    });
  });
})();
"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _num(x) -> str:
    """A sort key: the number (6 significant digits), '' for a blank or a text that is no number."""
    try:
        return "" if x is None or pd.isna(x) else f"{float(x):.6g}"
    except (TypeError, ValueError):
        return ""


def _href(path: Path, page_dir: Path) -> str:
    return quote(Path(os.path.relpath(os.path.abspath(path), os.path.abspath(page_dir))).as_posix())


def _links(run_dir: str | None, page_dir: Path, files=RUN_FILES) -> str:
    if not run_dir:
        return ""
    from bench.io import stored

    d = Path(run_dir)
    return " ".join(f'<a href="{_href(p, page_dir)}">{_e(f.split(".")[0])}</a>' for f in files if (p := stored(d / f)))


def _run_links(line, rows: pd.DataFrame, keys: list[str], page_dir: Path) -> tuple[str, str]:
    """(html, sort key) of one line's runs: 's<seed>: config plan log row' per run."""
    if rows is None or "path" not in rows.columns:
        return "", ""
    mask = pd.Series(True, index=rows.index)
    for k in keys:
        mask &= rows[k].astype(str) == str(line[k])
    mine = rows[mask].sort_values(["seed", "run"], kind="mergesort")
    parts = [f"<span>s{int(r['seed'])}: {_links(r['path'], page_dir)}</span>" for _, r in mine.iterrows()]
    return " · ".join(parts), (str(mine["run"].iloc[0]) if len(mine) else "")


def _table(head: list[str], body: list[list[tuple[str, str, bool]]]) -> str:
    """head: column titles; body: rows of (cell html, sort key, numeric?)."""
    out = ['<div class="wrap"><table class="sortable"><thead><tr>']
    out += [f'<th scope="col" tabindex="0">{_e(h)}</th>' for h in head]
    out.append("</tr></thead><tbody>")
    for r in body:
        out.append("<tr>" + "".join(f'<td{" class=num" if num else ""} data-sort="{_e(k)}">{c}</td>'
                                    for c, k, num in r) + "</tr>")
    out.append("</tbody></table></div>")
    return "\n".join(out)


def _group_table(lines: pd.DataFrame, vcols: list[str], rows: pd.DataFrame | None, page_dir: Path) -> str:
    from bench.report import LINE_KEYS, VARIANT_KEYS, cells

    head, body = cells(lines, vcols)
    variants = [k for k in VARIANT_KEYS if k in lines.columns]
    keys = LINE_KEYS + variants
    out = []
    for (_, r), texts in zip(lines.iterrows(), body):
        sort = [texts[0], _num(r["budget_keep"]), _num(r["n_seeds"])] + [_num(r[c]) for c in vcols] + [_num(r["speedup"])]
        cells_ = [(_e(t), k, i >= 2) for i, (t, k) in enumerate(zip(texts, sort))]
        links, first = _run_links(r, rows, keys, page_dir)
        out.append(cells_ + [(links, first, False)])
    return _table(head + ["runs"], out)


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{_e(path.stem)}">'
            f"<figcaption>{_e(path.name)}</figcaption></figure>")


def _counts(series: pd.Series) -> str:
    c = series.astype(str).value_counts().sort_index()
    return ", ".join(f"{_e(k)} ({n} row{'s' if n != 1 else ''})" for k, n in c.items())


def _ranking_section(rk: dict) -> list[str]:
    """bench.ranking's tables (numbers sort by the value behind the cell) and verdicts ("- **budget 0.5**: ...")."""
    out = ['<section id="ranking">', f"<h2>Ranking with confidence ({_e(rk['metric'])}, {rk['level']:.0%})</h2>",
           f'<p class="note">{_e(rk["intro"])}</p>']
    for sec in rk["sections"]:
        body = [[(_e(c), _num(k), True) if isinstance(k, numbers.Real) else (_e(c), str(k), False)
                 for c, k in zip(cells, keys)] for cells, keys in zip(sec["cells"], sec["keys"])]
        out += [f"<h3>{_e(sec['title'])}</h3>", _table(sec["head"], body), "<ul>"]
        out += ["<li>" + re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", _e(v.removeprefix("- "))) + "</li>"
                for v in sec["verdicts"]]
        out.append("</ul>")
    return out + ["</section>"]


def render_html(prov: str, name: str, df: pd.DataFrame, groups: list, group_rows: list, failed: pd.DataFrame,
                page: Path, figures: list[Path], intro: str, apart: pd.DataFrame | None = None,
                skipped: list[str] = (), paper: pd.DataFrame | None = None, ranking: dict | None = None) -> str:
    """The page's text. groups: (key, lines, vcols, note) as bench.report builds them; group_rows:
    each group's rows (for the links); page: where the page will be written (links are relative to
    its folder); figures: PNG files to inline; intro: the tables' explanation; ranking: bench.ranking's
    report_ranking (a section of its own: the tables sortable, the verdicts beneath)."""
    from bench.report import title

    page_dir = page.parent
    shas = df.assign(_sha=[f"{s}-dirty" if d else str(s) for s, d in zip(df["git_sha"], df["git_dirty"].astype(bool))])
    dates = sorted(d for d in df.get("date", pd.Series(dtype=str)).dropna().astype(str) if d)
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">', '<link rel="icon" href="data:,">',
           f"<title>Results: {_e(name)}</title>", f"<style>{CSS}</style>", "</head>", "<body>", "<header>",
           f"<h1>Results: {_e(name)}</h1>", f'<p class="prov">{_e(prov)}</p>', '<dl class="prov">',
           f"<dt>commit</dt><dd>{_counts(shas['_sha'])}</dd>",
           f"<dt>device</dt><dd>{_counts(df['device'])}</dd>",
           "<dt>protocol</dt><dd><ul>" + "".join(f'<li><a href="#g{i}">{_e(title(k))}</a></li>'
                                               for i, (k, _, _, _) in enumerate(groups)) + "</ul></dd>"]
    if ranking:
        out.append(f'<dt>ranking</dt><dd><a href="#ranking">{_e(ranking["metric"])} over seeds, against the best '
                   f"baseline of each budget</a></dd>")
    if dates:
        out.append(f"<dt>rows dated</dt><dd>{_e(dates[0])} – {_e(dates[-1])}</dd>")
    out += ["</dl>", f"<p>{_e(intro)} Click a column header to sort.</p>", "</header>"]
    if figures:
        out += ['<section id="figures">', "<h2>Figures</h2>"] + [_img(p) for p in figures] + ["</section>"]
    for i, ((key, lines, vcols, note), rows) in enumerate(zip(groups, group_rows)):
        from bench.report import proxy_note
        out += [f'<section id="g{i}">', f"<h2>{_e(title(key))}</h2>"]
        out += [f'<p class="note">{_e(n)}</p>' for n in (proxy_note(key, vcols), note) if n]
        out += [_group_table(lines, vcols, rows, page_dir), "</section>"]
    if ranking:
        out += _ranking_section(ranking)
    if paper is not None and len(paper):  # bench.paper: every printed number of results/paper.csv beside ours
        cols = ["paper", "table", "row", "column", "method", "paper_value", "ours", "diff", "n_seeds", "status",
                "differences"]
        numeric = {"paper_value", "diff", "n_seeds"}
        body = [[(_e(r[c]), _num(r[c]) if c in numeric else str(r[c]), c in numeric) for c in cols]
                for _, r in paper.iterrows()]
        out += ['<section id="paper">', "<h2>Paper column</h2>",
                "<p>Each printed number of <code>results/paper.csv</code> beside ours (mean ± std over seeds) and the "
                "difference (ours − paper); <em>differences</em>: the protocol items in which our rows differ from the "
                "paper's; <em>not run</em>: the cell exists but needs the paper's weights and data.</p>",
                _table(["paper", "table", "row", "column", "method", "paper", "ours", "ours − paper", "n_seeds",
                        "status", "differences"], body), "</section>"]
    out += ['<section id="failed">', "<h2>Failed runs</h2>"]
    if len(failed):
        body = []
        for _, r in failed.iterrows():
            err = " ".join(str(r.get("error") or "").split())[:300]
            links = _links(r.get("path"), page_dir, ("config.yaml", "error.json", "log.jsonl"))
            body.append([(_e(r["run"]), str(r["run"]), False), (_e(r["method"]), str(r["method"]), False),
                         (_e(f"{r['budget_measure']} {r['budget_keep']:g}"), _num(r["budget_keep"]), True),
                         (_e(r["seed"]), _num(r["seed"]), True), (_e(r["status"]), str(r["status"]), False),
                         (_e(err), err, False), (links, "", False)])
        out.append(_table(["run", "method", "budget", "seed", "status", "error", "files"], body))
    else:
        out.append("<p>None.</p>")
    out.append("</section>")
    if apart is not None and len(apart):
        body = [[(_e(r["run"]), str(r["run"]), False), (_e(r["method"]), str(r["method"]), False),
                 (_e(f"{r['budget_measure']} {r['budget_keep']:g}"), _num(r["budget_keep"]), True),
                 (_e(r["seed"]), _num(r["seed"]), True), (_e(r["config_sha"]), str(r["config_sha"]), False),
                 (_links(r.get("path"), page_dir), "", False)] for _, r in apart.iterrows()]
        out += ['<section id="apart">', "<h2>Runs set apart (not averaged)</h2>",
                "<p>These runs share method, budget and seed with another run but differ in some other setting; "
                "pick one with <code>python -m bench.report --where KEY=VALUE</code>.</p>",
                _table(["run", "method", "budget", "seed", "config_sha", "files"], body), "</section>"]
    if skipped:
        out += ['<section id="skipped">', "<h2>Files skipped (unreadable)</h2>", "<ul>"]
        out += [f"<li>{_e(m)}</li>" for m in skipped] + ["</ul>", "</section>"]
    out += [f"<script>{SCRIPT}</script>", "</body>", "</html>"]
    return "\n".join(out) + "\n"
