"""The HTML report in a real headless browser (Debian's chromium + chromium-driver, driven by Selenium):
the page loads from the file system without console errors, every figure renders, every column
sorts, the run links point at files that exist.

The browser comes from apt (scripts/browser/install.sh: needs root). BENCH_BROWSER=0 skips these
tests; unset, they are skipped only where no browser can be had (not root, no apt-get, no selenium);
BENCH_BROWSER=1 (what .ci/run sets) makes that a failure, so CI never passes without them.
BENCH_CHROMIUM / BENCH_CHROMEDRIVER point at other binaries (default /usr/bin/chromium, /usr/bin/chromedriver).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from tests.conftest import ROOT

CHROMIUM = os.environ.get("BENCH_CHROMIUM", "/usr/bin/chromium")
DRIVER = os.environ.get("BENCH_CHROMEDRIVER", "/usr/bin/chromedriver")


def _unavailable() -> str | None:
    if os.environ.get("BENCH_BROWSER") == "0":
        return "BENCH_BROWSER=0"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    if Path(CHROMIUM).exists() and Path(DRIVER).exists():
        return None
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "no chromium/chromedriver, and installing them (scripts/browser/install.sh) needs root"
    if not shutil.which("apt-get"):
        return "no chromium/chromedriver and no apt-get to install them"
    p = subprocess.run(["bash", str(ROOT / "scripts/browser/install.sh")], capture_output=True, text=True,
                       timeout=900, start_new_session=True)
    if p.returncode != 0 or "BROWSER_READY" not in p.stdout:
        return "scripts/browser/install.sh failed: " + (p.stdout + p.stderr)[-2000:]
    return None


@pytest.fixture(scope="module")
def driver():
    why = _unavailable()
    if why:
        if os.environ.get("BENCH_BROWSER") == "1":  # CI (.ci/run): the browser tests are required
            pytest.fail(f"BENCH_BROWSER=1 but no headless browser: {why}", pytrace=False)
        pytest.skip(f"no headless browser: {why}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(DRIVER), options=opts)  # an explicit driver: no Selenium Manager download
    d.set_page_load_timeout(30)
    try:
        yield d
    finally:
        d.quit()


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    """The report of tests/test_report.py's rows, with a second figure beside the report's own (as
    EntPruner's plots are), so the page inlines two; a figure of another report whose name starts with this
    one's is not inlined."""
    from matplotlib.figure import Figure

    from bench.report import build_report
    from bench.results import load_rows, write_row
    from tests.test_report import ROWS, row

    runs = tmp_path_factory.mktemp("runs")
    blank = row("random", 0.5, 0, 40.0, float("nan"), 5.5, 0.5)  # no cond. acc: a blank cell to sort
    blank.metrics = {"fd_clf": 40.0}
    seeds = [row("taylor", 0.5, s, fd, 81.0, 4.0, 0.5) for s, fd in ((1, 29.0), (2, 33.0))]  # a ranking to show
    for r in ROWS + [blank] + seeds:
        (runs / r.run).mkdir(parents=True)
        for f in ("config.yaml", "plan.json", "log.jsonl"):
            (runs / r.run / f).write_text("{}\n")
        write_row(r, runs / r.run)
    out = tmp_path_factory.mktemp("reports")
    fig = Figure(figsize=(3, 2))
    fig.subplots().plot([0, 1], [1, 0])
    (out / "figures").mkdir()
    fig.savefig(out / "figures" / "t_entpruner_blocks0.5_ced.png")
    fig.savefig(out / "figures" / "t_tier_quality_vs_speedup.png")  # report "t_tier"'s figure
    paths = build_report(load_rows(runs), out, "t")
    return next(p for p in paths if p.suffix == ".html")


def _column(table, col: int) -> list[str]:
    return [tr.find_elements("tag name", "td")[col].get_attribute("data-sort")
            for tr in table.find_elements("css selector", "tbody tr")]


@pytest.mark.timeout(120)
def test_page_loads_renders_sorts_and_links(driver, page):
    driver.get(page.as_uri())
    assert driver.execute_script("return document.readyState") == "complete"
    assert driver.title == "Results: t"
    # every figure renders (the report's and the extra one), from data URIs
    imgs = driver.execute_script("return Array.from(document.images).map(i => [i.complete, i.naturalWidth, "
                                 "i.src.slice(0, 22)])")
    assert len(imgs) == 2 and all(ok and w > 0 and src == "data:image/png;base64," for ok, w, src in imgs), imgs

    table = driver.find_elements("css selector", "table.sortable")[0]
    heads = table.find_elements("css selector", "thead th")
    names = [h.text for h in heads]
    lat = names.index("latency (ms) ↓")
    before = [r.text for r in table.find_elements("css selector", "tbody tr")]
    heads[lat].click()
    asc = [float(v) for v in _column(table, lat)]
    assert asc == sorted(asc) and heads[lat].get_attribute("aria-sort") == "ascending"
    heads[lat].click()
    desc = [float(v) for v in _column(table, lat)]
    assert desc == sorted(desc, reverse=True) and asc != desc
    heads[names.index("method")].click()
    methods = _column(table, names.index("method"))
    assert methods == sorted(methods)
    heads[names.index("speedup ↑")].click()
    sp = [float(v) for v in _column(table, names.index("speedup ↑"))]
    assert sp == sorted(sp) and sp[0] == 1.0  # dense first
    after = [r.text for r in table.find_elements("css selector", "tbody tr")]
    assert sorted(after) == sorted(before)  # the same rows, only reordered

    acc = names.index("cond. acc (%) ↑")  # random 0.5 has none: blank cells stay last both ways
    for order in ("ascending", "descending"):
        heads[acc].click()
        vals = _column(table, acc)
        assert heads[acc].get_attribute("aria-sort") == order and vals[-1] == "" and "" not in vals[:-1]
        nums = [float(v) for v in vals[:-1]]
        assert nums == sorted(nums, reverse=order == "descending")

    # the ranking over seeds (bench.ranking) is a sortable table of its own, numbers sorted by value
    ranking = driver.find_elements("css selector", "section#ranking table.sortable")  # one per protocol group
    assert ranking
    rheads = ranking[0].find_elements("css selector", "thead th")
    fd = [h.text for h in rheads].index("fd_clf")
    rheads[fd].click()
    means = [float(v) for v in _column(ranking[0], fd)]
    assert means == sorted(means) and len(means) >= 3

    links = driver.execute_script("return Array.from(document.querySelectorAll('td a')).map(a => a.href)")
    assert links
    for href in links:
        u = urlparse(href)
        assert u.scheme == "file" and Path(unquote(u.path)).is_file(), href

    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []
