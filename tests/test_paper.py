"""The paper column (bench.paper): every number of results/paper.csv in the report, beside ours with the
difference and the protocol items that differ, "not run" / "no cell" where we have no row; paper.csv's
cells are cells of their experiments."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from bench import paper
from bench.results import Row, load_rows, write_row
from tests.test_configs import hydra_compose, sweep_points

ROOT = Path(__file__).resolve().parent.parent


def _row(**kw) -> Row:
    d = dict(run="x/y/z", config_sha="0" * 16, model="DiT-XL/2", dataset="imagenet256", process="ddpm",
             method="shortgpt_tinyfusion", method_version=1, granularity="block", budget_measure="blocks",
             budget_keep=19 / 28, seed=0, keep_blocks=19 / 28, keep_params=0.68, keep_macs=0.68, depth=19,
             params_M=459.6, macs_G=80.0, latency_ms=10.0, latency_batch=64, latency_dtype="tf32",
             latency_mode="eager", latency_iqr_ms=0.1, peak_mem_MB=None, throughput_img_s=100.0, nfe=500,
             sampler="ddpm", cfg_scale=1.5, cfg_convention="dit3", finetune_steps=100000,
             metrics={"fid": 8.43, "is": 120.0}, metric_n=50000, metric_ref="none", metric_impl="none",
             device="NVIDIA H100", fid_impl="adm-pt/abc", fid_n=10000,
             fid_ref="npz:VIRTUAL_imagenet256_labeled@1234abcd(arr_0 n=10000)", git_sha="abc")
    d.update(kw)
    return Row(**d)


def test_report_shows_the_paper_column_for_every_paper_csv_row(tmp_path):
    """python -m bench.report on the committed rows: its <name>_paper.md holds every line of paper.csv
    (row, column, printed value); none of the committed (digits) rows reproduces a paper cell, so each
    says "not run" (its cell exists) or "no cell"."""
    from bench.report import main

    assert main(["--runs", str(ROOT / "results/runs"), "--out", str(tmp_path), "--name", "committed"]) == 0
    md = (tmp_path / "tables" / "committed_paper.md").read_text()
    lines = {tuple(c.strip() for c in l.strip("|").split("|")) for l in md.splitlines() if l.startswith("| ")}
    want = paper.read_paper(paper.PAPER_CSV)
    assert len(want) > 60
    for _, p in want.iterrows():
        status = paper.NOT_RUN if p["cell"] else paper.NO_CELL
        assert (p["row"], p["column"], p["method"], p["value"], "", "", "", status, "") in lines, (p["row"], p["column"])
    csv = pd.read_csv(tmp_path / "tables" / "committed_paper.csv", comment="#", dtype=str)
    assert len(csv) == len(want)
    assert "TinyFusion (arXiv 2412.01199), Table 1 — experiment=tinyfusion_table1" in md
    # the HTML page carries the same column: one sortable table row per paper.csv line
    import re
    page = (tmp_path / "committed.html").read_text()
    section = page[page.index('<section id="paper">'):]
    section = section[:section.index("</section>")]
    assert len(re.findall(r"<tr><td", section)) == len(want)
    assert "Paper column" in section
    assert section.count(f">{paper.NOT_RUN}</td>") + section.count(f">{paper.NO_CELL}</td>") == len(want)


def test_a_reproduced_cell_shows_ours_the_difference_and_the_protocol_items_that_differ(tmp_path):
    rows = [
        _row(run="a/b/s0"),                                             # ShortGPT 28=>19, 10K samples
        _row(run="a/b/s1", seed=1, metrics={"fid": 8.63, "is": 122.0}),
        _row(run="dp/ok", method="diff_pruning", granularity="width", budget_measure="params", budget_keep=0.5,
             depth=28, params_M=337.4, metrics={"fid": 4.0}, nfe=100, sampler="ddim", finetune_steps=20000,
             fid_n=50000),
        _row(run="dp/other", method="diff_pruning", granularity="width", budget_measure="params", budget_keep=0.3,
             depth=28, params_M=203.0, metrics={"fid": 9.0}),           # another size: not the printed cell
        _row(run="dense", method="dense", depth=28, params_M=675.1, finetune_steps=0, metrics={"fid": 2.21},
             fid_n=50000),                                              # the released checkpoint: no fine-tune gap
    ]
    for r in rows:
        write_row(r, tmp_path / "runs" / r.run)
    comp = paper.compare(load_rows(tmp_path / "runs"), paper.read_paper(paper.PAPER_CSV))
    tf = comp[comp["paper"] == "TinyFusion"].set_index(["row", "column"])
    sg = tf.loc[("ShortGPT 28=>19", "FID")]
    assert (sg["status"], sg["paper_value"], sg["ours"], sg["diff"], sg["n_seeds"]) == (
        "ran", "7.93", "8.53 ± 0.14", "+0.600", 2)
    assert sg["differences"] == ("samples 10000 (paper 50000); evaluator adm-pt/abc (paper adm-tf)")
    assert tf.loc[("ShortGPT 28=>19", "#Params (M)")]["ours"] == "460"
    assert tf.loc[("ShortGPT 28=>19", "#Params (M)")]["differences"] == "none"
    assert tf.loc[("ShortGPT 28=>19", "sFID")]["status"] == "not run"        # we have no sFID for it
    dp = tf.loc[("Diff-Pruning-50%", "FID")]
    assert (dp["ours"], dp["diff"]) == ("4.00", "+0.150")
    assert dp["differences"] == ("steps: NFE 100 ddim (paper NFE 500 ddpm); evaluator adm-pt/abc (paper adm-tf); "
                                 "fine-tune 20000 steps (paper 100000)")
    dense = tf.loc[("DiT-XL/2 (7000K)", "FID")]
    assert (dense["ours"], dense["diff"], dense["differences"]) == ("2.21", "-0.0600", "evaluator adm-pt/abc (paper adm-tf)")
    assert tf.loc[("Oracle (BK-SDM) 28=>14", "FID")]["status"] == "no cell"
    assert tf.loc[("Flux-Lite 28=>14", "FID")]["status"] == "not run"
    # the Markdown says the same
    md = paper.render_md("p", "t", comp)
    assert "| ShortGPT 28=>19" in md and "8.53 ± 0.14" in md and "samples 10000 (paper 50000)" in md


def test_paper_csv_cells_are_cells_of_their_experiments():
    """Every `cell` of paper.csv composes, with its experiment, to a run of the line's method (and, for a
    width method, the printed size as its params budget); every cell of the two paper-table sweeps has
    printed numbers."""
    df = paper.read_paper(paper.PAPER_CSV)
    assert set(df.columns) >= set(paper.COLUMNS)
    for (exp, cell), g in df[df["cell"] != ""].groupby(["experiment", "cell"]):
        d, _ = hydra_compose([f"experiment={exp}", cell])
        assert set(g["method"]) == {d["method_name"]}, cell
        assert d["model"]["name"] == g["model"].iloc[0] and d["data"]["name"] == g["dataset"].iloc[0]
    for exp in ("tinyfusion_table1", "diffpruning_cifar10"):
        _, sweep = hydra_compose([f"experiment={exp}"])
        cells = {" ".join(p for p in point if not p.startswith("seed=")) for point in sweep_points(sweep)}
        assert cells <= set(df.loc[df["experiment"] == exp, "cell"]), exp


def test_a_missing_or_broken_paper_csv(tmp_path):
    from bench.results import load_rows as _lr  # noqa: F401  (the report imports it too)

    assert paper.report_texts(pd.DataFrame(columns=["status"]), tmp_path, "t", "p", tmp_path / "none.csv") == {}
    bad = tmp_path / "bad.csv"
    bad.write_text("# a comment\npaper,row\nX,y\n")
    with pytest.raises(ValueError, match="missing columns"):
        paper.read_paper(bad)
