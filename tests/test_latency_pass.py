"""bench.latency_pass: every run records its final structure; one process rebuilds and times them all
interleaved with the dense model; the report takes its speedups from that record."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from bench import latency_pass
from bench.report import DENSE, report_groups
from bench.results import load_rows
from tests.conftest import TINY, compose

# dense, depth (block plan), width (MAC plan), progressive width (plans applied during the fine-tune)
RUNS = [("dense", ["budget.keep=1.0"]), ("shortgpt", ["budget.keep=0.5"]),
        ("magnitude_width", ["budget.measure=macs", "budget.keep=0.5"]),
        ("grad_flow", ["budget.measure=macs", "budget.keep=0.5"])]
FAST = ["--device", "cpu", "--budget-s", "5", "--reps", "2", "--min-rounds", "2", "--max-rounds", "3"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, artifacts):
    """A tiny results set of four rows, made by bench.run on the CPU."""
    from bench.run import execute

    root = tmp_path_factory.mktemp("lp") / "runs"
    for method, over in RUNS:
        execute(compose(TINY + [f"paths.results={root}", f"paths.artifacts={artifacts}", "eval.ssim_teacher=false",
                                *over], method))
    return root


@pytest.fixture(scope="module")
def passed(runs):
    assert latency_pass.main(["--runs", str(runs), *FAST]) == 0
    return latency_pass.load(runs)


def _rows(root: Path) -> dict[str, dict]:
    df = load_rows(root)
    return {r["method"]: r for _, r in df.iterrows()}


def _copy(runs: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "runs"
    shutil.copytree(runs, dest, ignore=shutil.ignore_patterns(latency_pass.FILE))
    return dest


def test_every_run_records_a_structure_that_rebuilds_its_row(runs):
    from bench import surgery
    from bench.run import STRUCTURE, build_final

    rows = _rows(runs)
    assert set(rows) == {m for m, _ in RUNS}
    for method, r in rows.items():
        structure = json.loads((Path(r["path"]) / STRUCTURE).read_text())
        cfg = json.loads((Path(r["path"]) / "config.yaml").read_text())
        net = build_final(cfg, structure)
        m = surgery.measure(net)
        assert (m["params"] / 1e6, m["macs"] / 1e9) == (r["params_M"], r["macs_G"]), method
        assert net.kept_blocks == list(r["kept_blocks"]) == structure["kept_blocks"]
        assert all("scores" not in p for p in structure["plans"])  # small: the run never reads scores
    progressive = json.loads((Path(rows["grad_flow"]["path"]) / STRUCTURE).read_text())["plans"]
    assert len(progressive) >= 2  # its plan, then what the callback applied during the fine-tune
    assert rows["shortgpt"]["depth"] == 2 and rows["magnitude_width"]["keep_macs"] <= 0.5


def test_the_pass_times_every_row_in_one_process(runs, passed):
    from bench.metrics.cost import device_name

    rows = _rows(runs)
    assert passed["device"] == device_name("cpu") and passed["commit"] and passed["torch"] == str(torch.__version__)
    assert passed["command"].startswith("python -m bench.latency_pass --runs") and passed["date"]
    assert passed["skipped"] == {}
    [g] = passed["groups"]
    assert (g["mode"], g["dtype"], g["batch"]) == ("eager", "fp32", 4)
    assert g["rounds"] >= 2 and g["seconds"] > 0 and g["key"]["device"] == passed["device"]
    got = passed["runs"]
    assert set(got) == {r["run"] for r in rows.values()}
    for method, r in rows.items():
        q = got[r["run"]]
        assert q["dense_ms"] > 0 and q["pruned_ms"] > 0 and q["rounds"] >= 2, method
        if method == DENSE:
            assert q["reference"] and q["speedup"] == 1.0
            continue
        assert 0 < q["lo"] <= q["speedup"] <= q["hi"], method
        assert 2 <= q["rounds"] <= 3  # --min-rounds 2 --max-rounds 3
    keys = {m: got[r["run"]]["structure"] for m, r in rows.items()}
    assert len({keys[DENSE], keys["shortgpt"], keys["magnitude_width"]}) == 3  # dense, depth, width
    # grad_flow may end at magnitude_width's widths (the allocation is a function of the budget): timed once
    assert g["architectures"] == len(set(keys.values()) - {keys[DENSE]})
    assert got[rows["shortgpt"]["run"]]["rebuilt_from"] == "structure.json"


def test_the_pass_refuses_another_device(runs, capsys):
    n = torch.get_num_threads()
    torch.set_num_threads(n + 1)  # a CPU's device name counts torch threads: cpu-<arch>-<n>t
    try:
        assert latency_pass.main(["--runs", str(runs), *FAST]) == 2
    finally:
        torch.set_num_threads(n)
    err = capsys.readouterr().err
    assert f"-{n}t" in err and f"-{n + 1}t" in err and "OMP_NUM_THREADS" in err


def test_the_report_takes_its_speedups_from_the_pass(runs, passed, tmp_path):
    from bench import report

    df = load_rows(runs)
    rows = _rows(runs)
    [(key, lines, _, note)], *_ = report_groups(df, passed)
    for _, line in lines.iterrows():
        q = passed["runs"][rows[line["method"]]["run"]]
        if line["method"] == DENSE:
            assert line["speedup"] == 1.0
            continue
        assert (line["speedup"], line["speedup_lo"], line["speedup_hi"]) == pytest.approx((q["speedup"], q["lo"], q["hi"]))
    assert f"bench.latency_pass, {passed['device']}, {passed['date']}" in note and "envelope" in note
    # without the record: today's speedups, dense latency / the row's latency from their separate runs
    [(_, before, _, note0)], *_ = report_groups(df)
    dense_ms = rows[DENSE]["latency_ms"]
    for _, line in before.iterrows():
        if pd_notna(line["speedup"]):
            assert line["speedup"] == pytest.approx(dense_ms / rows[line["method"]]["latency_ms"])
    assert "latency_pass" not in (note0 or "")
    # the command line finds the record in the runs folder: the CSV's speedups are the pass's
    assert report.main(["--runs", str(runs), "--out", str(tmp_path / "out"), "--name", "lp"]) == 0
    csv = (tmp_path / "out" / "tables" / "lp.csv").read_text()
    import io

    import pandas as pd
    table = pd.read_csv(io.StringIO(csv), comment="#")
    for _, line in table[table["method"] != DENSE].iterrows():
        assert line["speedup"] == pytest.approx(passed["runs"][rows[line["method"]]["run"]]["speedup"], rel=1e-5)


def pd_notna(x) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def test_an_older_row_is_rebuilt_from_its_kept_blocks_and_a_width_row_is_skipped(runs, tmp_path):
    from bench.run import STRUCTURE

    root = _copy(runs, tmp_path)
    rows = _rows(root)
    for m in ("shortgpt", "magnitude_width"):  # rows from before runs recorded their structure
        (Path(rows[m]["path"]) / STRUCTURE).unlink()
    assert latency_pass.main(["--runs", str(root), *FAST]) == 0
    rec = latency_pass.load(root)
    assert rec["runs"][rows["shortgpt"]["run"]]["rebuilt_from"] == "kept_blocks"
    assert rows["magnitude_width"]["run"] not in rec["runs"]
    assert "no structure.json" in rec["skipped"][rows["magnitude_width"]["run"]]
    [(_, lines, _, note)], *_ = report_groups(load_rows(root), rec)
    assert "did not time keep their rows' separate-run speedup: magnitude_width 0.5 (no structure.json" in note
    width = lines[lines["method"] == "magnitude_width"].iloc[0]
    [(_, before, _, _)], *_ = report_groups(load_rows(root))
    was = before[before["method"] == "magnitude_width"].iloc[0]
    assert (pd_notna(width["speedup"]), pd_notna(was["speedup"])) == (pd_notna(was["speedup"]),) * 2
    if pd_notna(was["speedup"]):
        assert width["speedup"] == was["speedup"]


def test_a_row_whose_structure_does_not_give_its_cost_is_refused(runs, tmp_path, capsys):
    root = _copy(runs, tmp_path)
    r = _rows(root)["shortgpt"]
    path = Path(r["path"]) / "row.json"
    d = json.loads(path.read_text())
    d["macs_G"] *= 0.9
    path.write_text(json.dumps(d))
    assert latency_pass.main(["--runs", str(root), *FAST]) == 2
    err = capsys.readouterr().err
    assert f"run {r['run']}" in err and "macs_G" in err and not (root / latency_pass.FILE).exists()


def _made_on(root: Path, method: str, gpu: str) -> str:
    """Say that a row was made on another GPU model (as bench.metrics.cost.device_name names it)."""
    r = _rows(root)[method]
    path = Path(r["path"]) / "row.json"
    d = json.loads(path.read_text())
    d["device"] = gpu
    path.write_text(json.dumps(d))
    return r["run"]


def test_also_pools_another_gpus_rows_into_the_pass_and_the_report_says_where_each_was_made(runs, tmp_path, capsys):
    from bench.ranking import ranking_markdown

    root = _copy(runs, tmp_path)
    other = _made_on(root, "magnitude_width", "NVIDIA H200")
    # without --also: that row is another device's, skipped, and its own table has no dense row
    assert latency_pass.main(["--runs", str(root), *FAST]) == 0
    rec = latency_pass.load(root)
    assert other not in rec["runs"] and "timed on NVIDIA H200" in rec["skipped"][other] and rec["also"] == []
    groups, *_ = report_groups(load_rows(root), rec)
    assert sorted(str(k["device"]) for k, *_ in groups) == sorted([rec["device"], "NVIDIA H200"])
    # with --also: one table on the pass's device, every row retimed there, the note names where rows were made
    assert latency_pass.main(["--runs", str(root), *FAST, "--also", "NVIDIA H200"]) == 0
    rec = latency_pass.load(root)
    assert rec["also"] == ["NVIDIA H200"] and other in rec["runs"] and rec["skipped"] == {}
    [(key, lines, _, note)], *_ = report_groups(load_rows(root), rec)
    assert key["device"] == rec["device"]
    assert f"Rows made on NVIDIA H200 (1), {rec['device']} (3)" in note and "latency pass on" in note
    width = lines.set_index("method").loc["magnitude_width"]
    q = rec["runs"][other]
    assert (width["speedup"], width["latency_ms"]) == pytest.approx((q["speedup"], q["pruned_ms"]))
    # the ranking pools them the same way: one protocol group on the pass's device, not one per GPU
    heads = [t for t in ranking_markdown(load_rows(root), "fd_clf", latency_pass=rec).splitlines() if t.startswith("## ")]
    assert len(heads) == 1 and heads[0].endswith(rec["device"])
    assert sum(t.startswith("## ") for t in ranking_markdown(load_rows(root), "fd_clf").splitlines()) == 2


def test_a_table_of_the_dense_model_alone_gets_the_pass_latency_too(runs, tmp_path, capsys):
    """A table whose only row is dense (the GPU tier's teacher at cfg 1.5; here a dense row at another cfg
    scale), made on another GPU and pooled
    (--also): the pass times the dense model against itself, so the line keeps a latency of this device."""
    root = _copy(runs, tmp_path)
    src = Path(_rows(root)["dense"]["path"])
    alone = src.parent / (src.name + "-cfg")
    shutil.copytree(src, alone)
    d = json.loads((alone / "row.json").read_text())
    name = d["run"] + "-cfg"
    d.update(run=name, cfg_scale=d["cfg_scale"] + 1.0, device="NVIDIA H200")
    (alone / "row.json").write_text(json.dumps(d))
    assert latency_pass.main(["--runs", str(root), *FAST, "--also", "NVIDIA H200"]) == 0
    rec = latency_pass.load(root)
    said = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("[latency_pass]")]
    assert "dense + 2 architectures of 3 rows (4 s)" in said[0]  # the budget goes by rows: 4 of 5 rows here
    assert "the dense model alone (1 dense row)" in said[1]
    q = rec["runs"][name]
    assert q["reference"] and q["speedup"] == 1.0 and q["pruned_ms"] == q["dense_ms"] > 0
    assert len(rec["groups"]) == 2 and rec["groups"][q["group"]]["architectures"] == 0
    lines = {float(k["cfg_scale"]): ln for k, ln, _, _ in report_groups(load_rows(root), rec)[0]}
    teacher = lines[d["cfg_scale"]].set_index("method").loc[DENSE]
    assert teacher["latency_ms"] == pytest.approx(q["pruned_ms"]) and teacher["speedup"] == 1.0


def test_a_routed_row_is_timed_stage_by_stage_and_weighed_as_its_row(runs, tmp_path, artifacts):
    """A Diff-ES row (a routed, stage-wise model): the pass rebuilds it, times each stage's forward with a
    timestep inside the stage interleaved with the dense model, and gives dense over the stages' NFE-weighted
    mean, the weights its row's; the report's line takes that speedup."""
    from bench.run import execute

    root = _copy(runs, tmp_path)
    execute(compose(TINY + [f"paths.results={root}", f"paths.artifacts={artifacts}", "eval.ssim_teacher=false",
                            "budget.keep=0.5", "method.generations=2", "method.probes=8", "method.fitness_steps=3"],
                    "diffes"))
    row = _rows(root)["diffes"]
    assert len(row["stage_latency_ms"]) == 4  # routed: its own latency is a mean over its 4 stages
    assert latency_pass.main(["--runs", str(root), *FAST]) == 0
    rec = latency_pass.load(root)
    q = rec["runs"][row["run"]]
    assert rec["skipped"] == {} and q["rebuilt_from"] == "structure.json"
    assert q["stage_weights"] == pytest.approx(list(row["stage_weights"])) and len(q["stage_ms"]) == 4
    assert q["pruned_ms"] == pytest.approx(sum(w * t for w, t in zip(q["stage_weights"], q["stage_ms"])))
    assert 0 < q["lo"] <= q["speedup"] <= q["hi"] and 2 <= q["rounds"] <= 3
    g = rec["groups"][q["group"]]
    assert g["routed"] and g["stages"] == 4 and g["architectures"] == 1
    # its key holds its routes: a routed model storing the dense model's blocks is not the dense model
    others = {rec["runs"][r["run"]]["structure"] for m, r in _rows(root).items() if m != "diffes"}
    assert q["structure"] not in others
    [(_, lines, _, _)], *_ = report_groups(load_rows(root), rec)
    line = lines.set_index("method").loc["diffes"]
    assert (line["speedup"], line["latency_ms"]) == pytest.approx((q["speedup"], q["pruned_ms"]))


def test_a_pooled_row_the_pass_did_not_retime_loses_its_own_latency():
    """A row made on another GPU that the pass skipped (a routed model in compile mode, say) must not give a speedup
    that divides that GPU's time by the pass device's dense time."""
    import pandas as pd

    df = pd.DataFrame({"run": ["a", "b", "c"], "device": ["H100", "H200", "H200"], "latency_ms": [10.0, 8.0, 9.0]})
    out = latency_pass.pool_devices(df, "H100", ["H200"], timed={"a": {}, "b": {}})
    assert list(out["device"]) == ["H100"] * 3 and list(out["made_on"]) == ["H100", "H200", "H200"]
    assert out["latency_ms"].tolist()[:2] == [10.0, 8.0] and math.isnan(out["latency_ms"].iloc[2])
    assert latency_pass.pool_devices(df, "H100", []) is df  # nothing pooled: the rows as they are
    assert latency_pass.pooled(df, {"device": "H100", "also": [], "runs": {}}) is df


def test_check_rebuilds_every_devices_rows_on_the_cpu_without_timing_or_a_record(runs, tmp_path, capsys):
    root = _copy(runs, tmp_path)
    _made_on(root, "shortgpt", "NVIDIA H100 80GB HBM3")  # a GPU's rows: the CPU check rebuilds them all the same
    assert latency_pass.main(["--runs", str(root), "--check"]) == 0
    out = capsys.readouterr().out
    assert f"check: {len(RUNS)} of {len(RUNS)} rows rebuild to their params and MACs in 2 tables; 0 would be skipped" in out
    assert not (root / latency_pass.FILE).exists()  # no timing, no record: the GPU pass still owns it
    r = _rows(root)["magnitude_width"]
    path = Path(r["path"]) / "row.json"
    d = json.loads(path.read_text())
    d["params_M"] *= 1.1
    path.write_text(json.dumps(d))
    assert latency_pass.main(["--runs", str(root), "--check"]) == 2
    err = capsys.readouterr().err
    assert f"run {r['run']}" in err and "params_M" in err and "rerun that row" in err
