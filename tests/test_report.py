"""bench.report: tables, protocol grouping, failed runs, figure, determinism."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from bench.report import GROUP_KEYS, build_report, check_single_protocol, fmt_num, fmt_pm, main, summarize
from bench.results import Row, load_rows, write_row

BASE = dict(model="dit-xs", dataset="toy", process="flow", method_version=1, granularity="block",
            keep_blocks=1.0, keep_params=1.0, depth=4, latency_batch=8, latency_dtype="fp32", latency_mode="eager", latency_iqr_ms=0.1, peak_mem_MB=None,
            throughput_img_s=100.0, nfe=10, sampler="euler", cfg_scale=1.0, cfg_convention="uncond+s*(c-u)",
            finetune_steps=100, metric_n=256, metric_ref="train", metric_impl="smallcnn-v1", device="cpu",
            git_sha="abc123def456", config_sha="0" * 64)


def row(method, keep, seed, fd, acc, lat, macs, **kw) -> Row:
    d = dict(BASE, run=f"{method}-{keep}-s{seed}-{kw.get('device', 'cpu')}", method=method,
             budget_measure="blocks", budget_keep=keep, seed=seed, keep_macs=macs, params_M=5.0 * keep,
             macs_G=0.0123 * macs, latency_ms=lat,
             metrics={"fd_clf": fd, "cond_acc": acc})
    d.update(kw)
    return Row(**d)


ROWS = [
    row("dense", 1.0, 0, 20.0, 90.0, 10.0, 1.0),
    # magnitude: 3 seeds at keep 0.5 (fd 30/32/34 -> 32.0 ± 2.0), 1 seed at 0.75
    row("magnitude", 0.5, 0, 30.0, 80.0, 5.0, 0.5),
    row("magnitude", 0.5, 1, 32.0, 82.0, 5.0, 0.5),
    row("magnitude", 0.5, 2, 34.0, 84.0, 5.0, 0.5),
    row("magnitude", 0.75, 0, 25.0, 85.0, 8.0, 0.75),
    row("taylor", 0.5, 0, 28.0, 81.0, 4.0, 0.5),
    row("taylor", 0.75, 0, 24.0, 86.0, 7.5, 0.75),
    # a failed run: listed, never averaged
    row("taylor", 0.25, 0, float("nan"), float("nan"), float("nan"), 0.25, status="failed",
        error="CUDA out of memory\n at step 3"),
    # another device without a dense row: its own group, blank speedup
    row("taylor", 0.5, 0, 28.0, 81.0, 2.0, 0.5, device="cuda", git_sha="fff000fff000", git_dirty=True),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for r in ROWS:
        d = root / r.run
        d.mkdir(parents=True)
        for f in ("config.yaml", "plan.json", "log.jsonl"):  # what a run directory holds beside its row
            (d / f).write_text("{}\n")
        write_row(r, d)
    return root


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    """Built once per module (the figure is the slow part); tests only read it."""
    df = load_rows(runs)
    out = tmp_path_factory.mktemp("reports")
    return out, build_report(df, out, "t"), df


def md_sections(md: str) -> dict[str, str]:
    parts = md.split("\n## ")
    return {p.split("\n", 1)[0]: p for p in parts[1:]}


def test_formatting():
    assert fmt_num(0.0123) == "0.0123"
    assert fmt_num(118.6) == "119"
    assert fmt_num(1234.5) == "1230"
    assert fmt_num(float("nan")) == ""
    assert fmt_pm(32.0, 2.0) == "32.0 ± 2.0"
    assert fmt_pm(32.0, float("nan")) == "32.0"
    assert fmt_pm(12.3, 0.001) == "12.300 ± 0.001"  # a real spread never prints as ± 0


def test_markdown_table(report):
    out, _, _ = report
    md = (out / "tables" / "t.md").read_text()
    secs = md_sections(md)
    cpu = secs["dit-xs · toy · flow — euler, NFE 10, cfg 1, sampled in fp32 — smallcnn-v1, n=256, ref train — cpu, eager, fp32, batch 8"]
    table = [line for line in cpu.splitlines() if line.startswith("|")]
    assert table == [
        "| method    | budget      |   n_seeds |   FD (clf) ↓ |   cond. acc (%) ↑ |   params (M) |          MACs (G) "
        "|     keep MACs |   latency (ms) ↓ |         speedup ↑ |",
        "|:----------|:------------|----------:|-------------:|------------------:|-------------:|------------------:"
        "|--------------:|-----------------:|------------------:|",
        "| dense     | blocks 1    |         1 |         20.0 |              90.0 |         5.00 |            0.0123 "
        "|          1.00 |             10.0 |              1.00 |",
        "| magnitude | blocks 0.75 |         1 |         25.0 |              85.0 |         3.75 |           0.00923 "
        "|         0.750 |             8.00 | 1.25 [1.24, 1.26] |",
        "| taylor    | blocks 0.75 |         1 |         24.0 |              86.0 |         3.75 |           0.00923 "
        "|         0.750 |             7.50 | 1.33 [1.32, 1.34] |",
        "| magnitude | blocks 0.5  |         3 |   32.0 ± 2.0 |        82.0 ± 2.0 |  2.50 ± 0.00 | 0.00615 ± 0.00000 "
        "| 0.500 ± 0.000 |      5.00 ± 0.00 | 2.00 [1.99, 2.01] |",
        "| taylor    | blocks 0.5  |         1 |         28.0 |              81.0 |         2.50 |           0.00615 "
        "|         0.500 |             4.00 | 2.50 [2.47, 2.53] |",
    ]
    assert "classifier-feature Frechet distance, not Inception FID" in cpu
    assert "FD (clf), cond. acc (%)" in cpu
    assert "speedup is blank" not in cpu
    # the cuda group has no dense row: blank speedup and a note saying why
    cuda = next(v for k, v in secs.items() if k.endswith("cuda, eager, fp32, batch 8"))
    assert "speedup is blank" in cuda
    assert [c.strip() for c in next(line for line in cuda.splitlines() if line.startswith("| taylor")).split("|")] \
        == ["", "taylor", "blocks 0.5", "1", "28.0", "81.0", "2.50", "0.00615", "0.500", "2.00", "", ""]


def test_speedup_is_dense_over_latency(report):
    _, _, df = report
    ok = df[(df.status == "ok") & (df.device == "cpu")]
    lines, _, note = summarize(ok)
    assert note is None
    for _, r in lines.iterrows():
        assert r.speedup == pytest.approx(10.0 / r.latency_ms)


def test_failed_rows_listed_not_averaged(report):
    out, _, _ = report
    md = (out / "tables" / "t.md").read_text()
    failed = md_sections(md)["Failed runs"]
    assert "| taylor-0.25-s0-cpu | taylor   | blocks 0.25 | 0      | failed   | CUDA out of memory at step 3 |" in failed
    before = md.split("## Failed runs")[0]
    assert "0.25" not in before  # the failed budget appears in no table
    csv = pd.read_csv(out / "tables" / "t.csv", comment="#")
    assert 0.25 not in set(csv.budget_keep)
    assert "CUDA out of memory" in (out / "tables" / "t.tex").read_text()


def test_provenance_and_files(report):
    out, paths, _ = report
    prov = "generated by bench/report.py from 8 finished runs and 1 failed run @ abc123def456, fff000fff000-dirty"
    assert (out / "tables" / "t.md").read_text().splitlines()[0] == f"<!-- {prov} -->"
    assert (out / "tables" / "t.tex").read_text().splitlines()[0] == f"% {prov}"
    assert (out / "tables" / "t.csv").read_text().splitlines()[0] == f"# {prov}"
    assert (out / "t_runs.csv").read_text().splitlines()[0] == f"# {prov}"
    assert len(pd.read_csv(out / "t_runs.csv", comment="#")) == 9
    assert (out / "figures/t_quality_vs_speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "figures/t_quality_vs_speedup.pdf").read_bytes()[:5] == b"%PDF-"
    assert sorted(p.relative_to(out).as_posix() for p in paths) == sorted(
        ["tables/t.md", "tables/t.tex", "tables/t.csv", "t_runs.csv",
         "figures/t_quality_vs_speedup.png", "figures/t_quality_vs_speedup.pdf", "t.html",
         "tables/t_paper.md", "tables/t_paper.csv"])   # the paper column (bench/paper.py, tests/test_paper.py)


def test_provenance_counts_finished_and_failed_runs(report):
    """The header says how many runs finished (their rows fill the tables) apart from the failed ones
    (listed, never averaged), so a sweep whose runs failed never reads as a complete one."""
    from bench.report import provenance

    _, _, df = report
    ok, failed = df[df.status == "ok"], df[df.status != "ok"]
    assert provenance(ok).startswith("generated by bench/report.py from 8 finished runs @ ")
    assert provenance(df).startswith("generated by bench/report.py from 8 finished runs and 1 failed run @ ")
    assert provenance(ok.iloc[:1]).startswith("generated by bench/report.py from 1 finished run @ ")
    two_failed = pd.concat([failed, failed.assign(run="x")])
    assert provenance(two_failed).startswith("generated by bench/report.py from 0 finished runs and 2 failed runs @ ")


def test_byte_identical_rebuild(report, tmp_path_factory):
    out, paths, df = report
    first = {p.relative_to(out): p.read_bytes() for p in paths}
    # rows in another order must not change a byte either (a folder beside the first: the page's
    # links to the runs are relative, so they are the same only from the same depth)
    again = tmp_path_factory.mktemp("again")
    paths2 = build_report(df.iloc[::-1].reset_index(drop=True), again, "t")
    second = {p.relative_to(again): p.read_bytes() for p in paths2}
    assert first.keys() == second.keys()
    for k in first:
        assert first[k] == second[k], k


def test_mixed_protocol_refused(report):
    _, _, df = report
    ok = df[df.status == "ok"].copy()
    check_single_protocol(ok[ok.device == "cpu"])  # one protocol: fine
    mixed = ok[ok.device == "cpu"].copy()
    mixed.loc[mixed.method == "taylor", "metric_impl"] = "inception-fid"
    with pytest.raises(ValueError, match=r"metric_impl = \['inception-fid', 'smallcnn-v1'\]"):
        check_single_protocol(mixed)
    mixed_n = ok[ok.device == "cpu"].copy()
    mixed_n.loc[mixed_n.seed == 1, "metric_n"] = 1000
    with pytest.raises(ValueError, match=r"metric_n = \['1000', '256'\]"):
        summarize(mixed_n)


def test_cli(runs, tmp_path):
    assert main(["--runs", str(runs), "--out", str(tmp_path / "cli"), "--name", "x"]) == 0
    assert (tmp_path / "cli" / "tables" / "x.md").exists()
    assert main(["--runs", str(tmp_path / "empty"), "--out", str(tmp_path / "cli2")]) == 1


def test_tables_csv_columns(report):
    out, _, _ = report
    csv = pd.read_csv(out / "tables" / "t.csv", comment="#")
    assert list(csv.columns)[len(GROUP_KEYS):] == [
        "method", "budget_measure", "budget_keep", "n_seeds", "m_fd_clf", "m_fd_clf_std", "m_cond_acc",
        "m_cond_acc_std", "params_M", "params_M_std", "macs_G", "macs_G_std", "keep_macs", "keep_macs_std",
        "latency_ms", "latency_ms_std", "speedup", "speedup_lo", "speedup_hi", "speedup_note"]
    mag = csv[(csv.method == "magnitude") & (csv.budget_keep == 0.5)].iloc[0]
    assert (mag.n_seeds, mag.m_fd_clf, mag.m_fd_clf_std, mag.speedup) == (3, 32.0, 2.0, 2.0)
    assert mag.speedup_lo < 2.0 < mag.speedup_hi and pd.isna(mag.speedup_note)


def test_inception_note_names_the_rows_and_refuses_mixed_protocols():
    from bench.report import inception_note

    g = pd.DataFrame({"method": ["dense", "shortgpt"], "budget_keep": [1.0, 0.5],
                      "fid_impl": ["adm-pt/x", ""], "fid_n": [100, 0], "fid_ref": ["digits-test", ""]})
    note = inception_note(g)
    assert "n=100" in note and "dense 1" in note and "blank elsewhere" in note
    assert "No row" in inception_note(g.assign(fid_n=0))
    mixed = g.assign(fid_impl=["adm-pt/x", "adm-pt/x"], fid_n=[100, 500], fid_ref=["digits-test"] * 2)
    with pytest.raises(ValueError, match="mix Inception protocols"):
        inception_note(mixed)


def test_teacher_note_names_the_teacher_and_warns_when_a_table_mixes_two():
    """A tier gathered over several sessions: a teacher retrained elsewhere has the same config hash but
    other weights, so rows record the sha256 of the dense weights they started from (Row.teacher_sha256)."""
    from bench.report import teacher_note

    a, b = "a" * 64, "b" * 64
    g = pd.DataFrame({"method": ["dense", "shortgpt", "last_k"], "budget_keep": [1.0, 0.5, 0.5], "seed": [0, 0, 1],
                      "teacher_sha256": [a, a, a]})
    assert teacher_note(g) == "Teacher sha256 aaaaaaaaaaaa: every row."
    assert teacher_note(g.assign(teacher_sha256=[a, "", a])) == \
        "Teacher sha256 aaaaaaaaaaaa: 2 rows (1 older rows do not record it)."
    mixed = teacher_note(g.assign(teacher_sha256=[a, b, b]))
    assert mixed.startswith("WARNING: these rows come from 2 different teachers") and "bbbbbbbbbbbb: 2 rows" in mixed
    assert teacher_note(g.assign(teacher_sha256=["", "", ""])) is None and teacher_note(g.drop(columns="teacher_sha256")) is None


# ------------------------------------------------------------------------------------------------
# The figure: asserted on the plotted data, not on the file
# ------------------------------------------------------------------------------------------------

def _collections(ax) -> dict:
    return {c.get_gid().split(":", 1)[1]: c.get_offsets().data.tolist()
            for c in ax.collections if (c.get_gid() or "").startswith("points:")}


def _pareto(ax) -> list:
    line, = [ln for ln in ax.lines if ln.get_gid() == "pareto"]
    return [list(p) for p in zip(line.get_xdata(), line.get_ydata())]


def test_figure_plots_one_point_per_line_with_the_pareto_front(report):
    from bench import figures
    from bench.report import label, report_groups

    _, _, df = report
    groups, _, _, _ = report_groups(df)
    fig = figures.quality_figure(groups, label=label)
    axes = fig.axes[:4]  # two groups x (speedup, keep MACs); the legend is the figure's
    cpu_s, cpu_m, cuda_s, cuda_m = axes
    assert cpu_s.get_xlabel().startswith("speedup") and cpu_m.get_xlabel().startswith("MACs kept")
    assert cpu_s.get_ylabel() == cpu_m.get_ylabel() == "FD (clf) ↓"  # the metric every line has
    pts = _collections(cpu_s)
    assert set(pts) == {"dense", "magnitude", "taylor"}
    assert pts["dense"] == [[1.0, 20.0]]
    assert sorted(map(tuple, pts["magnitude"])) == [(1.25, 25.0), (2.0, 32.0)]
    assert sorted(map(tuple, pts["taylor"])) == [(pytest.approx(10 / 7.5), 24.0), (2.5, 28.0)]
    # faster and better: dense, taylor 0.75, taylor 0.5 (magnitude is dominated by taylor at both budgets)
    assert _pareto(cpu_s) == [[1.0, 20.0], [pytest.approx(10 / 7.5), 24.0], [2.5, 28.0]]
    assert sorted(map(tuple, _collections(cpu_m)["magnitude"])) == [(0.5, 32.0), (0.75, 25.0)]
    assert _pareto(cpu_m) == [[0.5, 28.0], [0.75, 24.0], [1.0, 20.0]]
    assert cpu_m.xaxis_inverted()  # cheaper to the right, as faster is in the speedup panel
    # error bars: magnitude 0.5 has 3 seeds (fd 32 ± 2); its speedup interval brackets 2.0
    err, = [c for c in cpu_s.containers if c.get_label() == "_err:magnitude"]
    xsegs, ysegs = (lc.get_segments() for lc in err.lines[2])
    y_bar = next(s for s in ysegs if s[0][0] == 2.0)
    assert sorted(p[1] for p in y_bar) == [30.0, 34.0]
    x_bar = next(s for s in xsegs if s[0][1] == 32.0)
    assert x_bar[0][0] < 2.0 < x_bar[1][0]
    # the cuda group has no dense row: no speedup panel points, a reason instead; its MACs panel has the point
    assert _collections(cuda_s) == {} and any(t.get_gid() == "why" for t in cuda_s.texts)
    assert _collections(cuda_m) == {"taylor": [[0.5, 28.0]]}


def test_methods_at_one_point_share_one_label():
    """Methods whose plans coincide (shortgpt, flux_lite and sensitivity pick the same blocks) sit on one
    point: the front labels it once with every name, not with labels drawn over each other."""
    from matplotlib.figure import Figure

    from bench import figures

    pts = pd.DataFrame({"method": ["dense", "shortgpt", "flux_lite", "taylor"],
                        "label": ["dense", "shortgpt 0.5", "flux_lite 0.5", "taylor 0.5"],
                        "speedup": [1.0, 1.9, 1.9, 1.5], "speedup_lo": math.nan, "speedup_hi": math.nan,
                        "speedup_note": None, "keep_macs": [1.0, 0.5, 0.5, 0.6],
                        "y": [20.0, 25.0, 25.0, 30.0], "y_lo": [20.0, 25.0, 25.0, 30.0], "y_hi": [20.0, 25.0, 25.0, 30.0]})
    ax = Figure().subplots()
    figures._panel(ax, pts, "speedup", figures._styles([(None, pts, None, None)]), True, None)
    assert sorted(t.get_text() for t in ax.texts) == ["dense", "shortgpt 0.5 = flux_lite 0.5"]


def test_front_labels_of_nearby_points_go_one_line_apart():
    """Two front points close together (last_k and shortgpt at 0.75 of the GPU tier: speedup 1.31 vs 1.34,
    FID 15.8 vs 15.8 drew over each other) get labels on different lines, the later one moved away from the
    earlier (up when its point is higher, down when lower); points far from the others keep the usual place."""
    from matplotlib.figure import Figure

    from bench import figures

    pts = pd.DataFrame({"method": ["dense", "last_k", "shortgpt", "diffes"],
                        "label": ["dense", "last_k 0.75", "shortgpt 0.75", "diffes 0.5"],
                        "speedup": [1.0, 1.31, 1.34, 1.95], "speedup_lo": math.nan, "speedup_hi": math.nan,
                        "speedup_note": None, "keep_macs": [1.0, 0.75, 0.75, 0.5],
                        "y": [14.8, 15.7, 15.8, 19.7], "y_lo": math.nan, "y_hi": math.nan})
    pts[["y_lo", "y_hi"]] = pts[["y", "y"]].to_numpy()
    ax = Figure().subplots()
    figures._panel(ax, pts, "speedup", figures._styles([(None, pts, None, None)]), True, None)
    at = {t.get_text(): tuple(t.xyann) for t in ax.texts}
    assert set(at) == {"dense", "last_k 0.75", "shortgpt 0.75", "diffes 0.5"}  # all four on the front
    assert at["last_k 0.75"] == (4, 4) and at["shortgpt 0.75"] == (4, 13)  # the second a line away, on its side
    # the MACs panel walks its front from cheap to costly, so there the later of two near points is the lower
    # one (random at 0.752 of the MACs after random_width at 0.749, the default suite's figure): a line lower
    near = pd.DataFrame({"method": ["random_width", "random", "dense"],
                         "label": ["random_width 0.75", "random 0.75", "dense"], "speedup": math.nan,
                         "speedup_lo": math.nan, "speedup_hi": math.nan, "speedup_note": None,
                         "keep_macs": [0.749, 0.752, 1.0], "y": [49.16, 48.75, 62.0]})
    near["y_lo"], near["y_hi"] = near["y"], near["y"]
    ax = Figure().subplots()
    figures._panel(ax, near, "keep_macs", figures._styles([(None, near, None, None)]), True, None)
    assert {t.get_text(): tuple(t.xyann) for t in ax.texts} == {"random_width 0.75": (4, 4), "random 0.75": (4, -5)}
    assert at["dense"] == (4, 4) and at["diffes 0.5"] == (4, 4)


def test_a_variant_has_its_methods_colour_a_marker_of_its_own_and_a_legend_entry():
    """A method's variant (the GPU tier's entpruner with method.condition=bin method.outputs=x0) is a series of
    its own: the method's colour, another marker, its own legend entry, so that it can be told from the
    method's usual point where no front label names it."""
    from matplotlib.colors import to_rgba

    from bench import figures

    lines = pd.DataFrame({"method": ["dense", "entpruner", "entpruner", "last_k"], "budget_measure": "blocks",
                          "budget_keep": [1.0, 0.75, 0.75, 0.75],
                          "method_variant": ["", "", "condition=bin outputs=x0", ""], "keep_macs": [1.0, 0.76, 0.76, 0.76],
                          "n_seeds": 2, "m_fid": [16.0, 30.7, 19.1, 16.1], "m_fid_std": 0.5,
                          "speedup": [1.0, 1.29, 1.28, 1.30]})
    pts = figures.figure_points(lines, "m_fid")
    variant = "entpruner (condition=bin outputs=x0)"
    assert list(pts["series"]) == ["dense", "entpruner", variant, "last_k"]
    assert pts.loc[2, "label"] == "entpruner 0.75 (condition=bin outputs=x0)"
    key = {"model": "m", "dataset": "d", "process": "ddpm", "nfe": 20, "cfg_scale": 1.0, "metric_impl": "none",
           "metric_n": 0, "device": "H100", "latency_mode": "eager", "latency_dtype": "bf16", "latency_batch": 512}
    fig = figures.quality_figure([(key, lines, [], None)], label=lambda c: "FID ↓")
    ax_s = fig.axes[0]
    drawn = {c.get_gid(): c for c in ax_s.collections if str(c.get_gid()).startswith("points:")}
    usual, var = drawn["points:entpruner"], drawn[f"points:{variant}"]
    assert [tuple(o) for o in usual.get_offsets()] == [(1.29, 30.7)] and [tuple(o) for o in var.get_offsets()] == [(1.28, 19.1)]
    assert to_rgba(usual.get_edgecolor()[0]) == to_rgba(var.get_edgecolor()[0])  # one colour
    style = figures._styles([(key, lines, [], None)])
    assert style[variant][0] == style["entpruner"][0] and style[variant][1] != style["entpruner"][1]
    assert style[variant][1] in figures.VARIANT_MARKERS
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "entpruner" in legend and variant in legend


def _gpu_rows(dense_ms, lat=None, iqr=0.05):
    lat = lat or {0.5: dense_ms / 1.9}
    rows = [row("dense", 1.0, 0, 20.0, 90.0, dense_ms, 1.0, device="NVIDIA H100", latency_iqr_ms=iqr)]
    rows += [row("taylor", k, 0, 25.0, 85.0, v, k, device="NVIDIA H100", latency_iqr_ms=iqr) for k, v in lat.items()]
    return pd.DataFrame([{**{k: v for k, v in r.__dict__.items() if k != "metrics"},
                          **{f"m_{k}": v for k, v in r.metrics.items()}} for r in rows])


def test_launch_bound_gpu_speedups_are_left_out():
    """A GPU group whose dense forward is under 20 ms (bench.speedup.LAUNCH_BOUND_MS) gets no speedup
    in the table, a note that says why, and a speedup panel with that reason instead of points."""
    from bench import figures
    from bench.report import cells, label

    fast = _gpu_rows(5.71)  # the default suite's tiny DiT on an H200
    lines, vcols, note = summarize(fast)
    assert lines["speedup"].isna().all() and "launch" in note and "5.71 ms" in note and "20 ms" in note
    assert [r[-1] for r in cells(lines, vcols)[1]] == ["", ""]
    fig = figures.quality_figure([({"model": "m", "dataset": "d", "process": "p", "nfe": 1, "cfg_scale": 1.0, "metric_impl": "i",
                                    "metric_n": 1, "device": "NVIDIA H100", "latency_mode": "eager",
                                    "latency_dtype": "bf16", "latency_batch": 64}, lines, vcols, note)], label=label)
    ax_s, ax_m = fig.axes[:2]
    assert _collections(ax_s) == {} and "launch-bound" in next(t.get_text() for t in ax_s.texts if t.get_gid() == "why")
    assert len(_collections(ax_m)) == 2
    slow = _gpu_rows(66.3)  # DiT-XL/2, batch 64, bf16 eager
    lines, _, note = summarize(slow)
    assert lines.loc[lines.method == "taylor", "speedup"].item() == pytest.approx(1.9)
    assert note is None or "launch" not in note
    # the same timings on a CPU are never launch-bound
    lines, _, _ = summarize(_gpu_rows(5.71).assign(device="cpu-x86_64-2t"))
    assert lines["speedup"].notna().all()


def test_speedup_whose_interval_contains_one_is_marked():
    from bench import figures
    from bench.report import cells, label

    df = _gpu_rows(100.0, {0.75: 98.0, 0.5: 60.0}, iqr=8.0)  # 1.02x with an IQR of 8 % of the median
    lines, vcols, note = summarize(df)
    t = lines.set_index("budget_keep")
    assert t.loc[0.75, "speedup_lo"] < 1 < t.loc[0.75, "speedup_hi"] and t.loc[0.75, "speedup_note"] == "≈1"
    assert t.loc[0.5, "speedup_lo"] > 1 and t.loc[0.5, "speedup_note"] == ""
    assert "contains 1" in note
    speed = {r[1]: r[-1] for r in cells(lines, vcols)[1]}
    assert speed["blocks 0.75"].endswith(" ≈1") and speed["blocks 0.5"].startswith("1.67 [")
    fig = figures.quality_figure([({"model": "m", "dataset": "d", "process": "p", "nfe": 1, "cfg_scale": 1.0, "metric_impl": "i",
                                    "metric_n": 1, "device": "NVIDIA H100", "latency_mode": "eager",
                                    "latency_dtype": "bf16", "latency_batch": 64}, lines, vcols, note)], label=label)
    pts, = [c for c in fig.axes[0].collections if c.get_gid() == "points:taylor"]
    xy = pts.get_offsets().data.tolist()
    hollow = [x for (x, _), fc in zip(xy, pts.get_facecolors()) if fc[3] == 0]  # facecolor "none": alpha 0
    assert hollow == [pytest.approx(100 / 98)]


def test_speedup_interval_from_the_rows_timings():
    """One seed: the rows' own timing noise (IQR over the timed calls); several seeds: their spread."""
    from bench.speedup import line_rel_se, median_rel_se, ratio_interval

    se = median_rel_se(10.0, 0.1, 20)
    assert se == pytest.approx(1.2533 * (0.1 / 1.349) / 20 ** 0.5 / 10.0, rel=1e-3)
    lo, hi = ratio_interval(2.0, se, se)
    assert lo == pytest.approx(2.0 * math.exp(-1.96 * se * 2 ** 0.5), rel=1e-3) and hi > 2.0
    # identical seeds: the pooled timing noise over sqrt(n); spread seeds: their std / mean / sqrt(n)
    assert line_rel_se([10.0] * 4, [0.1] * 4, [20] * 4) == pytest.approx(se / 2)
    assert line_rel_se([9.0, 11.0], [0.1, 0.1], [20, 20]) == pytest.approx(2 ** 0.5 / 10 / 2 ** 0.5)
    assert line_rel_se([10.0], [0.1], [0]) == pytest.approx(se)  # rows before latency_reps: 20 calls


# ------------------------------------------------------------------------------------------------
# The HTML page (its behaviour in a browser: tests/test_report_browser.py)
# ------------------------------------------------------------------------------------------------

def test_html_page_is_self_contained_with_provenance_and_run_links(report):
    import re
    from urllib.parse import unquote

    out, _, df = report
    page = out / "t.html"
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>")
    assert "generated by bench/report.py from 8 finished runs and 1 failed run @ abc123def456, fff000fff000-dirty" in text
    assert "abc123def456 (8 rows)" in text and "fff000fff000-dirty (1 row)" in text  # commit
    assert "cpu (8 rows)" in text and "cuda (1 row)" in text  # device
    assert "smallcnn-v1, n=256, ref train — cpu, eager, fp32, batch 8" in text  # protocol
    # nothing is fetched: the only src= are data URIs, no stylesheet or script comes from elsewhere
    assert re.findall(r'src="([^"]+)"', text) and all(s.startswith("data:image/png;base64,")
                                                       for s in re.findall(r'src="([^"]+)"', text))
    assert not re.search(r'<(link|script)[^>]+(href|src)="(?!data:)', text)
    assert text.count('<table class="sortable">') == 4  # two groups, the paper column and the failed runs
    # every run's files are linked relative to the page, and the links resolve
    hrefs = [unquote(h) for h in re.findall(r'href="([^"#][^"]*)"', text) if not h.startswith("data:")]
    assert hrefs and all(not h.startswith("/") for h in hrefs)
    assert all((page.parent / h).resolve().is_file() for h in hrefs)
    ok_runs = df[df.status == "ok"]["path"]
    for d in ok_runs:
        for f in ("config.yaml", "row.json"):
            target = (Path(d) / f).resolve()
            assert any((page.parent / h).resolve() == target for h in hrefs), target
    assert "s0:" in text and "s2:" in text  # magnitude 0.5 links its three seeds


def test_final_kept_blocks_of_a_progressive_run(tmp_path):
    """A progressive run's plan.json keeps every block; its final model has fewer. The blocks come
    from the row (kept_blocks) or, for older rows, from the log's surgery events during fine-tuning,
    never from plan.json; `python -m bench.results final-plan` writes the plan with them."""
    import json
    import subprocess
    import sys

    from bench.results import final_kept_blocks, final_plan

    d = tmp_path / "run"
    d.mkdir()
    (d / "plan.json").write_text(json.dumps({"granularity": "block", "keep": {"blocks": list(range(8))},
                                             "scores": {"blocks": [1.0] * 8}, "meta": {}}))
    events = [{"event": "start"}, {"event": "surgery", "kept_blocks": list(range(8)), "keep_blocks": 1.0},
              {"event": "surgery", "step": 14, "kept_blocks": [0, 3, 4, 5, 6, 7]},
              {"event": "surgery", "step": 44, "kept_blocks": [0, 5, 6, 7]},
              {"event": "start"},  # a resumed attempt replays the plan's surgery after the fine-tune's
              {"event": "surgery", "kept_blocks": list(range(8)), "keep_blocks": 1.0}]
    (d / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events) + '{"event": "surg')  # a cut line
    r = row("entpruner", 0.5, 0, 1.0, 1.0, 1.0, 0.5, depth=4)
    write_row(r, d)
    assert final_kept_blocks(d) == [0, 5, 6, 7]
    plan = final_plan(d)
    assert plan["keep"]["blocks"] == [0, 5, 6, 7] and plan["scores"]["blocks"] == [1.0] * 8
    assert "final model" in plan["meta"]["kept_blocks_source"]
    out = tmp_path / "final.json"
    subprocess.run([sys.executable, "-m", "bench.results", "final-plan", str(d), str(out)], check=True)
    assert json.loads(out.read_text())["keep"]["blocks"] == [0, 5, 6, 7]
    write_row(row("entpruner", 0.5, 0, 1.0, 1.0, 1.0, 0.5, depth=4, kept_blocks=[1, 2, 6, 7]), d)
    assert final_kept_blocks(d) == [1, 2, 6, 7]  # the row's own field wins
    write_row(row("entpruner", 0.5, 0, 1.0, 1.0, 1.0, 0.5, depth=3), d)
    assert final_kept_blocks(d) is None  # nothing matches the row's depth: unknown, not a guess
    with pytest.raises(ValueError, match="unknown"):
        final_plan(d)


def test_adaptive_solver_rows_share_a_group_whatever_nfe_each_took(tmp_path):
    """dopri5 measures each model's NFE (it varies per model): the rows are one protocol group, not
    one group per NFE; fixed-step rows still group by their NFE."""
    from bench.report import report_groups

    rows = [row("dense", 1.0, 0, 20.0, 90.0, 10.0, 1.0, sampler="dopri5", nfe=131.0),
            row("magnitude", 0.5, 0, 30.0, 80.0, 5.0, 0.5, sampler="dopri5", nfe=118.5),
            row("taylor", 0.5, 0, 28.0, 81.0, 4.0, 0.5, sampler="dopri5", nfe=124.0),
            row("dense", 1.0, 0, 21.0, 90.0, 10.0, 1.0, sampler="heun", nfe=50, run="dense-heun"),
            row("taylor", 0.5, 0, 29.0, 81.0, 4.0, 0.5, sampler="heun", nfe=50, run="taylor-heun")]
    for r in rows:
        write_row(r, tmp_path / r.run)
    groups, group_rows, _, _ = report_groups(load_rows(tmp_path))
    assert sorted((k["sampler"], k["nfe"], len(g)) for (k, *_), g in zip(groups, group_rows)) == \
        [("dopri5", "adaptive", 3), ("heun", 50, 2)]


def test_speedups_from_a_latency_pass_record(report):
    """With bench.latency_pass's record, a line's speedup is the geometric mean of its rows' paired
    ratios and its interval their envelope; lines the record lacks keep the separate-run speedup and
    are named; a GPU group whose dense forward in the pass is launch-bound gets none."""
    _, _, df = report
    ok = df[(df.status == "ok") & (df.device == "cpu")]
    runs = {r: {"speedup": s, "lo": lo, "hi": hi, "dense_ms": 9.0, "pruned_ms": 9.0 / s}
            for r, s, lo, hi in [("dense-1.0-s0-cpu", 1.0, 1.0, 1.0), ("magnitude-0.5-s0-cpu", 1.8, 1.7, 1.9),
                                 ("magnitude-0.5-s1-cpu", 2.0, 1.9, 2.1), ("magnitude-0.5-s2-cpu", 2.2, 2.1, 2.3),
                                 ("taylor-0.75-s0-cpu", 1.01, 0.95, 1.08)]}
    rec = {"device": "cpu", "date": "2026-12-07T10:00:00Z", "runs": runs,
           "skipped": {"taylor-0.5-s0-cpu": "no structure.json (a row from before runs recorded it)"}}
    before, _, _ = summarize(ok)
    lines, _, note = summarize(ok, rec)
    t, b = lines.set_index(["method", "budget_keep"]), before.set_index(["method", "budget_keep"])
    assert t.loc[("magnitude", 0.5), "speedup"] == pytest.approx((1.8 * 2.0 * 2.2) ** (1 / 3))
    assert (t.loc[("magnitude", 0.5), "speedup_lo"], t.loc[("magnitude", 0.5), "speedup_hi"]) == (1.7, 2.3)
    assert t.loc[("taylor", 0.75), "speedup_note"] == "≈1" and t.loc[("dense", 1.0), "speedup"] == 1.0
    # the latency column comes from the pass too (the mean of the rows' medians there), not from the rows' runs
    ms = [9.0 / 1.8, 9.0 / 2.0, 9.0 / 2.2]
    assert t.loc[("magnitude", 0.5), "latency_ms"] == pytest.approx(sum(ms) / 3) and t.loc[("dense", 1.0), "latency_ms"] == 9.0
    assert t.loc[("magnitude", 0.5), "latency_ms_std"] == pytest.approx(pd.Series(ms).std())
    assert t.loc[("magnitude", 0.75), "latency_ms"] == b.loc[("magnitude", 0.75), "latency_ms"]  # not in the pass
    for line in [("taylor", 0.5), ("magnitude", 0.75)]:  # not in the record: the rows' own speedups
        assert t.loc[line, "speedup"] == b.loc[line, "speedup"] and t.loc[line, "speedup_lo"] == b.loc[line, "speedup_lo"]
    assert "bench.latency_pass, cpu, 2026-12-07T10:00:00Z" in note and "envelope [min lo, max hi]" in note
    assert "magnitude 0.75 (not in the pass)" in note and "taylor 0.5 (no structure.json" in note
    assert summarize(ok, {"device": "cpu", "date": "d", "runs": {"elsewhere": runs["dense-1.0-s0-cpu"]}})[2] is None
    fast = _gpu_rows(66.3)  # separate runs: 66 ms, not launch-bound; the pass timed 5 ms
    rec = {"device": "NVIDIA H100", "date": "d", "runs": {r: {"speedup": 1.5, "lo": 1.4, "hi": 1.6, "dense_ms": 5.0}
                                                          for r in fast["run"]}, "skipped": {}}
    lines, _, note = summarize(fast, rec)
    assert lines["speedup"].isna().all() and "5 ms on NVIDIA H100" in note and "latency_pass" not in note


def test_a_method_override_is_a_variant_with_its_own_line_in_the_report_and_the_ranking(tmp_path):
    """`method=X method.k=v` on the command line: the row records method_variant "k=v" (the config hash
    already differs; the label says how), and the report and the ranking give it its own line instead of
    setting the method's runs apart as clashing seeds."""
    import json

    from bench.ranking import rank
    from bench.report import report_groups
    from bench.results import load_rows
    from tests.conftest import TINY, run_cli

    runs, art = tmp_path / "runs", tmp_path / "art"
    common = TINY + ["method=entpruner_oneshot", "budget.keep=0.5", f"paths.results={runs}",
                     f"paths.artifacts={art}"]
    for extra in ([], ["method.outputs=x0"]):
        r = run_cli(common + extra)
        assert r.returncode == 0, r.stderr[-2000:]
    rows = {json.loads(p.read_text())["method_variant"] for p in runs.rglob("row.json")}
    assert rows == {"", "outputs=x0"}
    df = load_rows(runs)
    groups, _, apart, _ = report_groups(df)
    (_, lines, _, _), = groups
    assert apart.empty and sorted(lines["method_variant"]) == ["", "outputs=x0"]
    from bench.report import cells
    assert sorted(row[0] for row in cells(lines, [])[1]) == ["entpruner_oneshot", "entpruner_oneshot (outputs=x0)"]
    ranked = rank(df[df["status"].eq("ok")].assign(m_fid=[10.0, 12.0]), "fid", baselines=[])
    assert sorted(ranked["method_variant"]) == ["", "outputs=x0"] and list(ranked["seeds"]) == [[0], [0]]


def test_a_group_scored_by_inception_alone_has_no_classifier_protocol_in_its_title():
    """eval.scorer=none (the GPU tier): the title leaves out the scorer's "none, n=…, ref none"; a classifier-
    scored group keeps its protocol."""
    from bench.report import title

    key = {"model": "DiT-D28/2", "dataset": "fashion-mnist", "process": "ddpm", "sampler": "ddim", "nfe": 20,
           "cfg_scale": 1.0, "eval_precision": "bf16", "metric_impl": "none", "metric_n": 10000, "metric_ref": "none",
           "device": "H100", "latency_mode": "eager", "latency_dtype": "bf16", "latency_batch": 512}
    assert title(key) == "DiT-D28/2 · fashion-mnist · ddpm — ddim, NFE 20, cfg 1, sampled in bf16 — H100, eager, bf16, batch 512"
    key.update(metric_impl="smallcnn-abc", metric_n=256, metric_ref="digits-all")
    assert "— smallcnn-abc, n=256, ref digits-all —" in title(key)


def test_the_figure_heads_name_the_guidance_scale_and_leave_out_an_absent_scorer():
    """Two groups that differ in cfg (the tier's teacher at cfg 1 and 1.5) have heads that say so; a group
    scored by Inception alone has no "none n=…" in its head."""
    import pandas as pd

    from bench import figures
    from bench.report import label

    lines = pd.DataFrame({"method": ["dense"], "budget_measure": ["blocks"], "budget_keep": [1.0], "n_seeds": [1],
                          "keep_macs": [1.0], "m_fid": [12.0], "speedup": [1.0], "latency_ms": [40.0]})
    key = {"model": "m", "dataset": "d", "process": "p", "nfe": 40, "cfg_scale": 1.5, "metric_impl": "none",
           "metric_n": 10000, "device": "H100", "latency_mode": "eager", "latency_dtype": "bf16", "latency_batch": 512}
    fig = figures.quality_figure([(key, lines, ["m_fid"], None)], label=label)
    head = fig.axes[0].get_title()
    assert head == "m d p, NFE 40, cfg 1.5\nH100, eager bf16, batch 512"


def test_twenty_one_methods_get_styles_that_no_two_share_in_both_colour_and_marker():
    """The GPU tier's 21 methods: two that share a marker have different tab10 colours, two that share a
    colour have different markers, so no two legend entries look alike (tab20's light/dark pairs did)."""
    from bench import figures

    methods = [f"m{i:02d}" for i in range(21)]
    lines = pd.DataFrame({"method": ["dense", *methods]})
    style = figures._styles([(None, lines, [], None)])
    assert style["dense"] == ("black", "*")
    seen = [style[m] for m in methods]
    assert len(set(seen)) == 21
    for i, (ci, mi) in enumerate(seen):
        for cj, mj in seen[i + 1:]:
            if ci == cj:
                assert mi != mj
            if mi == mj:  # same marker: colours far apart (tab10's closest pair is > 0.25 apart in RGB)
                assert sum((a - b) ** 2 for a, b in zip(ci[:3], cj[:3])) ** 0.5 > 0.25
