"""bench.report: tables, protocol grouping, failed runs, figure, determinism."""
from __future__ import annotations

import pandas as pd
import pytest

from bench.report import GROUP_KEYS, build_report, check_single_protocol, fmt_num, fmt_pm, main, summarize
from bench.results import Row, load_rows, write_row

BASE = dict(model="dit-xs", dataset="toy", process="flow", method_version=1, granularity="block",
            keep_blocks=1.0, keep_params=1.0, depth=4, latency_batch=8, latency_dtype="fp32", latency_mode="eager", latency_iqr_ms=0.1, peak_mem_MB=None,
            throughput_img_s=100.0, nfe=10, sampler="euler", cfg_scale=1.0, cfg_convention="uncond+s*(c-u)",
            finetune_steps=0, metric_n=256, metric_ref="train", metric_impl="smallcnn-v1", device="cpu",
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
        write_row(r, root / r.run)
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
        "| method | budget | n_seeds | FD (clf) ↓ | cond. acc (%) ↑ | params (M) | MACs (G) | keep MACs "
        "| latency (ms) ↓ | speedup ↑ |",
        "|:---|:---|---:|---:|---:|---:|---:|---:|---:|---:|",
        "| dense | blocks 1 | 1 | 20.0 | 90.0 | 5.00 | 0.0123 | 1.00 | 10.0 | 1.00 |",
        "| magnitude | blocks 0.75 | 1 | 25.0 | 85.0 | 3.75 | 0.00923 | 0.750 | 8.00 | 1.25 |",
        "| taylor | blocks 0.75 | 1 | 24.0 | 86.0 | 3.75 | 0.00923 | 0.750 | 7.50 | 1.33 |",
        "| magnitude | blocks 0.5 | 3 | 32.0 ± 2.0 | 82.0 ± 2.0 | 2.50 ± 0.00 | 0.00615 ± 0.00000 "
        "| 0.500 ± 0.000 | 5.00 ± 0.00 | 2.00 |",
        "| taylor | blocks 0.5 | 1 | 28.0 | 81.0 | 2.50 | 0.00615 | 0.500 | 4.00 | 2.50 |",
    ]
    assert "classifier-feature Frechet distance, not Inception FID" in cpu
    assert "FD (clf), cond. acc (%)" in cpu
    assert "speedup is blank" not in cpu
    # the cuda group has no dense row: blank speedup and a note saying why
    cuda = next(v for k, v in secs.items() if k.endswith("cuda, eager, fp32, batch 8"))
    assert "speedup is blank" in cuda
    assert "| taylor | blocks 0.5 | 1 | 28.0 | 81.0 | 2.50 | 0.00615 | 0.500 | 2.00 |  |" in cuda


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
    assert "| taylor-0.25-s0-cpu | taylor | blocks 0.25 | 0 | failed | CUDA out of memory at step 3 |" in failed
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
    for p in ("figures/t_quality_vs_speedup.png", "figures/t_quality_vs_speedup.pdf"):
        assert (out / p).stat().st_size > 1000
    assert sorted(p.relative_to(out).as_posix() for p in paths) == sorted(
        ["tables/t.md", "tables/t.tex", "tables/t.csv", "t_runs.csv",
         "figures/t_quality_vs_speedup.png", "figures/t_quality_vs_speedup.pdf"])


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


def test_byte_identical_rebuild(report, tmp_path):
    out, paths, df = report
    first = {p.relative_to(out): p.read_bytes() for p in paths}
    # rows in another order must not change a byte either
    paths2 = build_report(df.iloc[::-1].reset_index(drop=True), tmp_path / "again", "t")
    second = {p.relative_to(tmp_path / "again"): p.read_bytes() for p in paths2}
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
        "latency_ms", "latency_ms_std", "speedup"]
    mag = csv[(csv.method == "magnitude") & (csv.budget_keep == 0.5)].iloc[0]
    assert (mag.n_seeds, mag.m_fd_clf, mag.m_fd_clf_std, mag.speedup) == (3, 32.0, 2.0, 2.0)


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
