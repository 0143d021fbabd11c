"""Stored state is never trusted blindly, one writer per run, and the machine's state in words:
a corrupt row/plan/checkpoint/samples file is moved aside and its stage redone; the report names
and skips what it cannot read and sets apart rows that cannot be averaged; a held run lock makes a
second copy wait; a timing taken on a busy machine is flagged; a full disk is one line naming the path."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.results import load_rows, run_relpath
from bench.run import execute
from tests.conftest import ROOT, TINY, comparable, ensure_teacher, run_cli

def _same(a, b) -> None:
    assert comparable(a) == comparable(b)


def _paths(cfg):
    rel = run_relpath(cfg)
    return Path(cfg["paths"]["results"]) / rel, Path(cfg["paths"]["artifacts"]) / "runs" / rel


def test_corrupt_row_is_moved_aside_and_the_run_finishes_again(tiny_cfg, capsys):
    cfg = tiny_cfg("first_k")
    first = execute(cfg)
    run_dir, _ = _paths(cfg)
    (run_dir / "row.json").write_text('{"run": "cut short by a ki')  # a row that does not parse
    second = execute(cfg)
    err = capsys.readouterr().err
    assert "cannot be read" in err and "row.json" in err
    _same(first, second)
    assert json.loads((run_dir / "row.json").read_text())["status"] == "ok"
    assert len(list(run_dir.glob("row.json.corrupt-*"))) == 1  # kept for a post-mortem, never read as state


def test_report_names_and_skips_a_corrupt_row(tiny_cfg, tmp_path, capsys):
    from bench.report import main

    cfg = tiny_cfg("first_k")
    execute(cfg)
    execute(tiny_cfg("last_k"))
    bad = _paths(cfg)[0] / "row.json"
    bad.write_text("{not json")
    assert main(["--runs", cfg["paths"]["results"], "--out", str(tmp_path / "rep"), "--name", "t"]) == 0
    err = capsys.readouterr().err
    assert f"skipped {bad}" in err
    md = (tmp_path / "rep" / "tables" / "t.md").read_text()
    assert "last_k" in md and "| first_k" not in md
    assert "Files skipped (unreadable)" in md and str(bad) in md


def test_corrupt_plan_samples_and_final_weights_are_redone(tiny_cfg):
    """Each stage's artifact cut short (plan.json, a sample shard, finetune/final.pt): the rerun moves it
    aside, redoes the stage and gives the same row."""
    cfg = tiny_cfg("sensitivity")
    first = execute(cfg)
    run_dir, art = _paths(cfg)
    for f in (run_dir / "row.json", ):
        f.unlink()
    (run_dir / "plan.json").write_text('{"granularity": "block", "keep": {"blocks": [0, ')
    shard = next((art / "samples").glob("shard-*.pt"))
    shard.write_bytes(shard.read_bytes()[:100])
    final = art / "finetune" / "final.pt"
    final.write_bytes(final.read_bytes()[: len(final.read_bytes()) // 2])
    second = execute(cfg)
    _same(first, second)
    moved = {json.loads(line)["path"] for line in (run_dir / "log.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "state_moved_aside"}
    assert moved == {str(run_dir / "plan.json"), str(shard), str(final)}


@pytest.mark.slow
def test_corrupt_resume_checkpoint_restarts_the_fine_tune(tmp_path, artifacts):
    """Killed after the step-2 checkpoint; that checkpoint is then cut short (as by a full disk or a
    kill mid-write of a non-atomic copy): the rerun moves it aside, fine-tunes from the start and
    gives the row of an uninterrupted run."""
    common = TINY + ["method=first_k", "finetune.steps=6", "finetune.ckpt_every=2", f"paths.artifacts={artifacts}"]
    ensure_teacher(artifacts)
    killed = run_cli(common + [f"paths.results={tmp_path / 'a'}"], {"BENCH_TEST_ABORT_AT_STEP": "3"})
    assert killed.returncode == 137, killed.stderr
    last = next(artifacts.glob("runs/**/first_k/**/finetune/last.pt"))
    last.write_bytes(b"PK\x03\x04 truncated")
    resumed = run_cli(common + [f"paths.results={tmp_path / 'a'}"])
    assert resumed.returncode == 0, resumed.stderr
    assert "fine-tune checkpoint" in resumed.stderr and "moved aside" in resumed.stderr
    log = [json.loads(line) for p in (tmp_path / "a").rglob("log.jsonl") for line in p.read_text().splitlines()]
    assert not any(e["event"] == "finetune_resume" for e in log)  # restarted, not resumed from garbage
    ra = json.loads(next((tmp_path / "a").rglob("row.json")).read_text())
    import shutil
    for f in artifacts.glob("runs/**/first_k/**/finetune"):
        shutil.rmtree(f)
    for f in artifacts.glob("runs/**/first_k/**/samples"):
        shutil.rmtree(f)
    ref = run_cli(common + [f"paths.results={tmp_path / 'b'}"])
    assert ref.returncode == 0, ref.stderr
    _same(ra, json.loads(next((tmp_path / "b").rglob("row.json")).read_text()))


@pytest.mark.slow
def test_a_second_copy_waits_for_the_run_lock(tiny_cfg, tmp_path):
    """While another process holds the run's lock, a second copy of the config says so and waits
    (writing nothing); when the holder goes, it runs. The lock is the kernel's (flock), so a killed
    holder releases it."""
    from bench.io import file_lock

    cfg = tiny_cfg("first_k")
    execute(tiny_cfg("dense", ["budget.keep=1.0"]))  # the teacher and classifier exist: the copy is quick
    run_dir, art = _paths(cfg)
    art.mkdir(parents=True, exist_ok=True)
    args = [o for o in TINY] + ["method=first_k", f"paths.results={cfg['paths']['results']}",
                                f"paths.artifacts={cfg['paths']['artifacts']}"]
    with file_lock(art / "run.lock"):
        p = subprocess.Popen([sys.executable, "-m", "bench.run", *args], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        out = ""
        deadline = time.time() + 120
        while "waiting" not in out and time.time() < deadline and p.poll() is None:
            out += p.stdout.readline()
        assert "is being run by" in out and f"pid {os.getpid()}" in out, out
        time.sleep(1.0)
        assert not run_dir.exists()  # nothing written while it waits
    rest, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out + rest
    assert (run_dir / "row.json").exists()


def test_file_lock_no_wait_names_the_holder(tmp_path):
    from bench.io import LockHeld, file_lock

    with file_lock(tmp_path / "x.lock"):
        with pytest.raises(LockHeld, match=f"pid {os.getpid()}"):
            with file_lock(tmp_path / "x.lock", wait=False):
                pass
    with file_lock(tmp_path / "x.lock", wait=False):  # released when the block ends
        pass


def _burn(seconds: float, started=None):
    if started is not None:
        started.release()  # burning from now on
    end = time.time() + seconds
    while time.time() < end:
        pass


def test_a_timing_on_a_busy_machine_is_flagged(one_thread):
    """Simulated load: a CPU-bound process per core runs while a forward is timed; the record says
    'busy' and how many cores the others used. (Whether a timing without the burners is clean
    depends on what else the test machine runs, so only the measurement itself is checked there.)"""
    import multiprocessing as mp

    from bench.metrics.cost import benchmark_forward, busy_cores_max

    lin = torch.nn.Linear(64, 64)
    x = (torch.randn(8, 64),)
    alone = benchmark_forward(lin, x, "cpu", warmup=2, reps=20)
    assert alone["others_cores"] is not None and alone["others_cores"] >= 0
    ctx = mp.get_context("spawn")
    started = ctx.Semaphore(0)
    burners = [ctx.Process(target=_burn, args=(8.0, started)) for _ in range(os.cpu_count() or 1)]
    for b in burners:
        b.start()
    try:  # a spawned child imports this module (torch) first: time only once every burner burns
        assert all(started.acquire(timeout=60) for _ in burners), "a burner process did not start"
        time.sleep(0.5)
        busy = benchmark_forward(lambda a: lin(a) + sum(torch.ones(200).cumsum(0)[-1:]), x, "cpu", warmup=2,
                                 reps=200)
    finally:
        for b in burners:
            b.terminate()
            b.join()
    assert "busy" in busy["flags"], busy["others_cores"]
    assert busy["others_cores"] > busy_cores_max()


def test_a_timing_on_a_device_shared_by_design_is_flagged(monkeypatch):
    """BENCH_SHARED_DEVICE=2 (bench/gpu/tier.sh's TIER_WORKERS=2: two workers on one GPU, a load no CPU
    probe sees): the record says 'shared' and the row's warning names the latency pass; a value that is not
    a count stops with the fix."""
    from bench.api import BenchError
    from bench.metrics.cost import benchmark_forward
    from bench.run import latency_warnings

    lin, x = torch.nn.Linear(8, 8), (torch.randn(2, 8),)
    assert "shared" not in benchmark_forward(lin, x, "cpu", warmup=1, reps=20)["flags"]
    monkeypatch.setenv("BENCH_SHARED_DEVICE", "2")
    rec = benchmark_forward(lin, x, "cpu", warmup=1, reps=20)
    assert "shared" in rec["flags"] and rec["shared_device"] == 2
    words = latency_warnings({"flags": ["shared"]})
    assert len(words) == 1 and "2 workers shared the device" in words[0] and "bench.latency_pass" in words[0]
    monkeypatch.setenv("BENCH_SHARED_DEVICE", "two")
    with pytest.raises(BenchError, match="number of processes sharing the device"):
        benchmark_forward(lin, x, "cpu", warmup=1, reps=20)


def _row(method, keep, seed, latency, flags=(), steps=80, run=None):
    from bench.results import Row
    return Row(run=run or f"m/{method}/{keep}-s{seed}-{steps}", config_sha=f"{method}{keep}{seed}{steps}", model="M",
               dataset="D", process="ddpm", method=method, method_version=1, granularity="block",
               budget_measure="blocks", budget_keep=keep, seed=seed, keep_blocks=keep, keep_params=keep,
               keep_macs=keep, depth=4, params_M=1.0, macs_G=1.0, latency_ms=latency, latency_batch=4,
               latency_dtype="fp32", latency_mode="eager", latency_iqr_ms=0.1, peak_mem_MB=None,
               throughput_img_s=1.0, nfe=10, sampler="ddpm", cfg_scale=1.0, cfg_convention="all",
               finetune_steps=steps, metrics={"fd_clf": 10.0 + seed}, metric_n=20, metric_ref="r", metric_impl="i",
               device="cpu", latency_flags=list(flags))


def _write(rows, root: Path):
    from bench.results import write_row
    for r in rows:
        d = root / r.run
        d.mkdir(parents=True)
        write_row(r, d)


def test_report_gives_no_speedup_from_a_flagged_latency(tmp_path):
    from bench.report import build_report

    _write([_row("dense", 1.0, 0, 10.0), _row("a", 0.5, 0, 5.0), _row("b", 0.5, 0, 5.0, flags=["busy"])],
           tmp_path / "runs")
    build_report(load_rows(tmp_path / "runs"), tmp_path / "rep", "t")
    csv = (tmp_path / "rep" / "tables" / "t.csv").read_text()
    import io

    import pandas as pd
    df = pd.read_csv(io.StringIO(csv), comment="#").set_index("method")
    assert df.loc["a", "speedup"] == pytest.approx(2.0) and pd.isna(df.loc["b", "speedup"])
    assert "latency is flagged" in (tmp_path / "rep" / "tables" / "t.md").read_text()
    # a flagged dense row: no speedup at all in its group
    _write([_row("dense", 1.0, 1, 10.0, flags=["spread"], run="x/dense"), _row("a", 0.5, 1, 5.0, run="x/a")],
           tmp_path / "runs2")
    build_report(load_rows(tmp_path / "runs2"), tmp_path / "rep2", "t")
    df = pd.read_csv(tmp_path / "rep2" / "tables" / "t.csv", comment="#")
    assert df["speedup"].isna().all()


def test_rows_that_differ_in_finetune_steps_are_lines_of_their_own(tmp_path):
    """Two runs differing only in finetune.steps: two lines, no traceback; runs that still collide
    (same line and seed, another setting) are set apart, and --where picks a subset."""
    from bench.report import main

    _write([_row("dense", 1.0, 0, 10.0), _row("a", 0.5, 0, 5.0, steps=80), _row("a", 0.5, 0, 5.0, steps=300),
            _row("c", 0.5, 0, 5.0, run="p/c1"), _row("c", 0.5, 0, 5.0, run="p/c2")], tmp_path / "runs")
    assert main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "rep"), "--name", "t"]) == 0
    md = (tmp_path / "rep" / "tables" / "t.md").read_text()
    # most lines have 80 steps: their names leave it out, and the table says so
    assert "| a (finetune_steps 300)" in md and "| a  " in md and "| dense  " in md and "(finetune_steps 80)" not in md
    assert "A line without a suffix has finetune_steps 80." in md
    assert "Runs set apart" in md and "p/c1" in md and "p/c2" in md
    assert "is the teacher itself" not in md  # the dense line here was fine-tuned 80 steps
    _write([_row("dense", 1.0, 0, 10.0, steps=0)], tmp_path / "runs")  # the teacher as it came: its own line, named
    assert main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "rep"), "--name", "t"]) == 0
    md = (tmp_path / "rep" / "tables" / "t.md").read_text()
    assert "| dense (finetune_steps 0) " in md and "The dense line with finetune_steps 0 is the teacher itself" in md
    assert main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "rep"), "--name", "w",
                 "--where", "finetune_steps=300"]) == 0
    md = (tmp_path / "rep" / "tables" / "w.md").read_text()
    assert "| a " in md and "finetune_steps" not in md and "| c " not in md


def test_report_where_with_an_unknown_key_is_one_line(tmp_path, capsys):
    from bench.report import main

    _write([_row("dense", 1.0, 0, 10.0)], tmp_path / "runs")
    assert main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "rep"), "--where", "nope=1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --where 'nope=1'") and "Traceback" not in err


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 256 KiB tmpfs (root only: CI runs as root), unmounted after the test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_torch_save_is_enospc_naming_the_path(tiny_tmpfs):
    """torch's zip writer reports a full disk as 'unexpected pos'; bench.io turns it back into ENOSPC
    with the target's path, and leaves no temp file behind."""
    import errno

    from bench.io import atomic_torch_save, os_error_message

    target = tiny_tmpfs / "ckpt.pt"
    with pytest.raises(OSError) as exc:
        atomic_torch_save({"w": torch.zeros(1 << 20)}, target)  # 4 MiB into 256 KiB
    assert exc.value.errno == errno.ENOSPC and exc.value.filename == str(target)
    assert "no space left" in os_error_message(exc.value) and str(target) in os_error_message(exc.value)
    assert list(tiny_tmpfs.iterdir()) == []


@pytest.mark.slow
def test_full_disk_run_is_one_line_naming_the_path(tiny_tmpfs, tmp_path):
    r = run_cli(TINY + ["method=dense", "budget.keep=1.0", f"paths.results={tmp_path / 'runs'}",
                        f"paths.artifacts={tiny_tmpfs}"])
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "unexpected pos" not in r.stderr
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "no space left" in err[0] and str(tiny_tmpfs) in err[0]


def test_unwritable_results_folder_stops_before_the_run(tmp_path, capsys):
    """A read-only results folder (a read-only tmpfs: root ignores file modes) is refused up front."""
    from bench.run import cli
    from tests.conftest import compose

    if os.geteuid() != 0:
        pytest.skip("mounting a read-only tmpfs needs root")
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        with pytest.raises(SystemExit) as exc:
            cli(compose(TINY + [f"paths.results={ro}/runs", f"paths.artifacts={tmp_path / 'art'}"]))
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "paths.results" in err and "not writable" in err
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)


def test_a_row_of_another_teacher_is_moved_aside_and_redone(tmp_path, artifacts, capsys):
    """The teacher file changes under a finished row (trained again, model.ckpt replaced): the row's
    teacher_sha256 no longer matches, so the run folder is moved to a hidden sibling (kept, not reported),
    the run's artifacts are dropped and the run is redone from the new teacher. With no teacher here to
    compare with, the row stands."""
    import shutil

    from bench.run import teacher_dir
    from tests.conftest import compose

    ensure_teacher(artifacts)
    own = tmp_path / "art"
    cfg = compose(TINY + [f"paths.results={tmp_path / 'runs'}", f"paths.artifacts={own}"], "first_k")
    shared = compose(TINY + [f"paths.artifacts={artifacts}"])
    shutil.copytree(teacher_dir(shared), teacher_dir(cfg))  # this test's own copy of the session's teacher
    first = execute(cfg)
    run_dir, art_dir = _paths(cfg)
    final = teacher_dir(cfg) / "final.pt"
    state = torch.load(final, map_location="cpu", weights_only=False)
    state["ema"] = {k: v * 1.05 if v.is_floating_point() else v for k, v in state["ema"].items()}  # another teacher
    torch.save(state, final)
    capsys.readouterr()
    second = execute(cfg)
    assert "the teacher is now" in capsys.readouterr().out
    assert second.teacher_sha256 != first.teacher_sha256 and second.metrics != first.metrics
    hidden = run_dir.with_name(f".{run_dir.name}.teacher-{first.teacher_sha256[:12]}")
    assert json.loads((hidden / "row.json").read_text())["teacher_sha256"] == first.teacher_sha256
    df = load_rows(tmp_path / "runs")
    assert len(df) == 1 and df.iloc[0]["teacher_sha256"] == second.teacher_sha256
    shutil.rmtree(teacher_dir(cfg))  # no teacher to compare with: the row stands
    assert comparable(execute(cfg)) == comparable(second)
    # nothing else moved aside (a second move would add a -<date> sibling; the sha in the name may hold "-2")
    assert [p.name for p in run_dir.parent.glob(f".{run_dir.name}*")] == [hidden.name]


def test_lines_of_one_model_are_named_as_one(tmp_path):
    """Two methods whose rows agree in every metric (they chose the same units) are named together in the
    table's note; a line that differs in one metric is not, nor is a line of another budget."""
    from bench.report import main

    rows = [_row("dense", 1.0, 0, 10.0), _row("a", 0.5, 0, 5.0), _row("b", 0.5, 0, 5.0), _row("c", 0.5, 0, 5.0),
            _row("d", 0.75, 0, 5.0)]
    rows[3].metrics = {"fd_clf": 11.5}
    _write(rows, tmp_path / "runs")
    assert main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "rep"), "--name", "t"]) == 0
    md = (tmp_path / "rep" / "tables" / "t.md").read_text()
    assert "the methods chose the same units): a = b at 0.5." in md


def test_compact_gzips_a_finished_runs_large_records_and_every_reader_takes_them(tmp_path, capsys):
    """bench.results.compact replaces a finished run's JSON records above the limit by deterministic .gz
    files (row.json, log.jsonl and config.yaml never; an unfinished run not at all), and the readers of
    those records (final plan, latency-pass structure, report links, EntPruner's decision summary) give the
    same as from the plain files."""
    import gzip
    import shutil

    from bench.latency_pass import structure_of
    from bench.report_html import _links
    from bench.results import compact, final_plan
    from methods.entpruner.schedule import main as summarize_logs

    log = next((ROOT / "results" / "gpu" / "tier").rglob("entpruner_decisions.jsonl"))
    run, plain = tmp_path / "run", tmp_path / "plain"
    run.mkdir()
    plan = {"granularity": "block", "keep": {"blocks": [0, 2]}, "scores": {"blocks": [0.5] * 2000}, "meta": {}}
    (run / "plan.json").write_text(json.dumps(plan))
    (run / "structure.json").write_text(json.dumps({"plans": [], "kept_blocks": [0, 2], "pad": "x" * 6000}))
    shutil.copy(log, run / log.name)
    (run / "log.jsonl").write_text("{}\n" * 3000)
    (run / "config.yaml").write_text("a: 1\n" * 3000)
    assert compact(run, limit=5000) == []  # no row.json: a resume still reads these
    (run / "row.json").write_text(json.dumps({"depth": 2, "kept_blocks": [0, 2], "path": str(run)}))
    shutil.copytree(run, plain)
    before = (final_plan(run), structure_of({"path": str(run)}))
    summarize_logs([str(plain)])
    summary = capsys.readouterr().out.replace(str(plain), "RUN")
    done = compact(run, limit=5000)
    assert sorted(p.name for p in done) == ["entpruner_decisions.jsonl.gz", "plan.json.gz", "structure.json.gz"]
    assert not (run / "plan.json").exists() and (run / "log.jsonl").is_file() and (run / "config.yaml").is_file()
    assert gzip.decompress((run / "plan.json.gz").read_bytes()) == (plain / "plan.json").read_bytes()
    again = tmp_path / "again"
    shutil.copytree(plain, again)
    compact(again, limit=5000)
    assert (again / "plan.json.gz").read_bytes() == (run / "plan.json.gz").read_bytes()  # deterministic bytes
    assert (final_plan(run), structure_of({"path": str(run)})) == before
    assert 'href="run/plan.json.gz"' in _links(str(run), tmp_path)
    summarize_logs([str(run)])
    assert capsys.readouterr().out.replace(str(run), "RUN").replace(".jsonl.gz", ".jsonl") == summary
    assert compact(run, limit=5000) == []  # nothing left to do
