"""Sweeps as SLURM job arrays (hydra-submitit-launcher), requeue and resume, failed runs, concurrent
row writers, cost accounting.

The first tests need no cluster. The SLURM tests bring a real single-node cluster up with
scripts/slurm/up.sh (Debian packages, loopback only; needs root and apt-get) and stop it by PID with
scripts/slurm/down.sh when the module ends. BENCH_SLURM=0 skips them (e.g. on a workstation where
installing slurm is unwanted); CI runs them.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from bench.results import ERROR_FILE, Row, earlier_attempts_wall_s, load_rows, run_relpath, write_row
from tests.conftest import ROOT, TINY, compose, run_cli

STAGES = {"teacher", "plan", "finetune", "sample", "score", "cost"}


# ------------------------------------------------------------------------------------------------
# Without a cluster
# ------------------------------------------------------------------------------------------------

def _hydra(overrides):
    from hydra import compose as hcompose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="bench.conf", version_base="1.3"):
        return hcompose("run", overrides=overrides, return_hydra_config=True)


def test_cluster_choices_select_their_launcher():
    assert "BasicLauncher" in _hydra([]).hydra.launcher._target_
    s = _hydra(["cluster=slurm", "cluster.partition=gpu", "cluster.timeout_min=90", "cluster.gpus_per_node=2",
                "cluster.cpus_per_task=6", "cluster.mem_gb=40", "cluster.array_parallelism=8"]).hydra.launcher
    assert s._target_.endswith("SlurmLauncher")
    assert (s.partition, s.timeout_min, s.gpus_per_node, s.cpus_per_task, s.mem_gb, s.array_parallelism) == \
        ("gpu", 90, 2, 6, 40, 8)
    assert s.max_num_timeout >= 1  # a timed-out job requeues (the plugin's default, 0, would not)
    assert "export OMP_NUM_THREADS=6" in list(s.setup)
    assert _hydra(["cluster=submitit_local"]).hydra.launcher._target_.endswith("LocalLauncher")


def test_launcher_settings_do_not_change_the_run_dir(tmp_path):
    """A requeued or resubmitted job must land in the directory of its first attempt."""
    base = TINY + [f"paths.results={tmp_path}"]
    a = compose(base, "shortgpt")
    b = compose(base + ["cluster=slurm", "cluster.partition=other", "cluster.timeout_min=7",
                        "hydra.launcher.array_parallelism=3"], "shortgpt")
    c = compose(base + ["cluster=submitit_local", "stop_after=sample"], "shortgpt")
    assert a["cluster"]["name"] == "local" and b["cluster"]["name"] == "slurm"
    assert run_relpath(a) == run_relpath(b) == run_relpath(c)
    assert run_relpath(a) != run_relpath(compose(base + ["seed=1"], "shortgpt"))


def test_tinyfusion_table1_cells_are_rows_of_the_paper():
    """experiment=tinyfusion_table1 launches one run per printed row the suite has a method for."""
    import csv

    sweep = _hydra(["experiment=tinyfusion_table1"]).hydra.sweeper.params
    (key, cells), = sweep.items()
    printed = {(r["method"], int(r["depth"])) for r in csv.DictReader(
        l for l in (ROOT / "results/paper.csv").open() if not l.startswith("#"))
        if r["paper"] == "TinyFusion" and r["table"] == "1"}
    seen = set()
    for cell in cells.split(","):
        cfg = _hydra(["experiment=tinyfusion_table1", f"{key}={cell}"])
        method = cfg.hydra.runtime.choices.method
        assert (ROOT / "bench/conf/method" / f"{method}.yaml").exists()
        depth = int(28 * cfg.budget.keep + 1e-6)  # DiT-XL/2 has 28 blocks
        assert (method, depth) in printed, f"{cell}: no Table 1 row for {method} at depth {depth}"
        assert cfg.model.name == "DiT-XL/2" and cfg.model.ckpt and cfg.data.kind == "latents"
        assert (cfg.eval.n, cfg.eval.steps, cfg.eval.cfg_scale, cfg.eval.inception.backend) == (50000, 250, 1.5, "adm")
        assert cfg.finetune.steps == (0 if method == "dense" else 100000)
        seen.add((method, depth))
    assert seen == {("dense", 28), ("shortgpt", 19), ("shortgpt", 14), ("flux_lite", 14), ("sensitivity", 14)}


def _row(seed: int, **kw) -> Row:
    d = dict(run=f"m/shortgpt/blocks0.5-s{seed}-cpu-{seed:08x}", config_sha=f"{seed:016x}", model="DiT-T/2",
             dataset="digits", process="ddpm", method="shortgpt", method_version=1, granularity="block",
             budget_measure="blocks", budget_keep=0.5, seed=seed, keep_blocks=0.5, keep_params=0.57, keep_macs=0.51,
             depth=2, params_M=0.05, macs_G=0.0005, latency_ms=3.0 + seed, latency_batch=4, latency_dtype="fp32",
             latency_mode="eager", latency_iqr_ms=0.1, peak_mem_MB=None, throughput_img_s=1000.0, nfe=6,
             sampler="ddpm", cfg_scale=1.5, cfg_convention="all", finetune_steps=4,
             metrics={"cond_acc": 50.0 + seed, "fd_clf": 100.0 - seed}, metric_n=20, metric_ref="digits-all",
             metric_impl="smallcnn-test", device="cpu-test", wall_s={"plan": 1.0, "finetune": 2.0},
             device_hours=3.0 / 3600)
    d.update(kw)
    return Row(**d)


def _write(args):
    """One writer process: wait for all the others, then write its row (a finished run's last act)."""
    root, seed, barrier = args
    barrier.wait(timeout=60)
    row = _row(seed)
    write_row(row, Path(root) / row.run)
    return row.run


def test_sixteen_concurrent_writers_give_sixteen_rows(tmp_path):
    from bench.report import build_report

    ctx = mp.get_context("fork")
    for seeds in (range(16), [7] * 8):  # 16 runs at once; then 8 writers of one and the same run
        root = tmp_path / f"runs{len(set(seeds))}"
        barrier = ctx.Manager().Barrier(len(seeds))
        with ctx.Pool(len(seeds)) as pool:
            pool.map(_write, [(str(root), s, barrier) for s in seeds])
        files = sorted(root.rglob("row.json"))
        assert len(files) == len(set(seeds))
        assert not [p for p in root.rglob("*") if p.is_file() and p.name != "row.json"]  # no temp files left
        df = load_rows(root)
        assert len(df) == len(set(seeds)) and df["run"].is_unique and set(df["seed"]) == set(seeds)
        build_report(df, tmp_path / "rep", "c")
        assert f"from {len(set(seeds))} runs" in (tmp_path / "rep/tables/c.md").read_text()


def _train_teacher(args):
    """One job's teacher stage (spawned: a fresh interpreter, as on a cluster node)."""
    artifacts, barrier = args
    from bench.run import load_data, teacher

    cfg = compose(TINY + [f"paths.artifacts={artifacts}"])
    barrier.wait(timeout=120)
    teacher(cfg, load_data(cfg), "cpu")


def test_concurrent_jobs_train_a_missing_teacher_once(tmp_path):
    """Two jobs of a sweep start on an empty artifacts folder: one trains the shared teacher, the
    other waits for the lock and loads it (bench.launch.file_lock)."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Manager().Barrier(2)
    with ctx.Pool(2) as pool:
        pool.map(_train_teacher, [(str(tmp_path), barrier)] * 2)
    (log,) = (tmp_path / "teachers").glob("*/log.jsonl")
    steps = [e["step"] for e in map(json.loads, log.read_text().splitlines()) if e["event"] == "finetune"]
    assert steps.count(0) == 1 and steps == sorted(steps), steps  # one training, never restarted
    assert len(list((tmp_path / "teachers").glob("*/final.pt"))) == 1


def test_old_rows_load_with_the_new_fields_defaulted(tmp_path):
    old = asdict(_row(0))
    for k in ("n_devices", "job_id"):
        old.pop(k)
    (tmp_path / "r").mkdir()
    (tmp_path / "r/row.json").write_text(json.dumps(old))
    row = Row(**json.loads((tmp_path / "r/row.json").read_text()))
    assert row.n_devices == 1 and row.job_id == ""
    assert len(load_rows(tmp_path)) == 1


def test_earlier_attempts_are_charged(tmp_path):
    log = [{"time": 100.0, "event": "start"}, {"time": 130.0, "event": "finetune"},       # killed after 30 s
           {"time": 200.0, "event": "start"}, {"time": 210.0, "event": "finetune_resume"},  # requeued after 12 s
           {"time": 212.0, "event": "finetune"},
           {"time": 300.0, "event": "start"}, {"time": 350.0, "event": "row"}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log) + '{"time": 3')  # cut line
    assert earlier_attempts_wall_s(tmp_path) == pytest.approx(42.0)
    assert earlier_attempts_wall_s(tmp_path / "nowhere") == 0.0


def test_requeue_signal_is_handled_once_per_job():
    """slurmstepd can deliver one SIGUSR2 twice; submitit's handler must run once (bench.launch)."""
    import signal

    from bench.launch import guard_requeue_signal

    calls = []
    old = signal.signal(signal.SIGUSR2, lambda *a: calls.append(a[0]))
    try:
        assert guard_requeue_signal() and not guard_requeue_signal()  # wraps once
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.05)
        assert calls == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, old)
    assert not guard_requeue_signal()  # no Python handler (not in a submitit job): nothing to wrap


@pytest.mark.slow
def test_a_failed_run_in_a_local_sweep_is_recorded_and_the_others_finish(tmp_path, artifacts):
    r = run_cli(["-m", *TINY, "method=dense,first_k", "budget.keep=0.5", f"paths.results={tmp_path / 'runs'}",
                 f"paths.artifacts={artifacts}", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert r.returncode != 0  # the sweep says that a run failed ...
    df = load_rows(tmp_path / "runs")
    assert sorted(zip(df["method"], df["status"])) == [("dense", "failed"), ("first_k", "ok")]  # ... and ran the rest
    err = df.set_index("method").loc["dense", "error"]
    assert err.startswith("BenchError:") and "budget.keep=1.0" in err
    assert set(json.loads(next((tmp_path / "runs").rglob(ERROR_FILE)).read_text())) >= {"traceback", "run", "seed"}


# ------------------------------------------------------------------------------------------------
# A real SLURM cluster
# ------------------------------------------------------------------------------------------------

def _cluster_unavailable() -> str | None:
    if os.environ.get("BENCH_SLURM") == "0":
        return "BENCH_SLURM=0"
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "scripts/slurm/up.sh needs root (it installs and starts the SLURM daemons)"
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        return "neither slurm nor apt-get is installed (up.sh installs Debian's slurm packages)"
    return None


@pytest.fixture(scope="module")
def slurm():
    """A running single-node cluster for this module; stopped by PID (down.sh) afterwards."""
    why = _cluster_unavailable()
    if why:
        pytest.skip(f"no SLURM cluster: {why}")
    up = subprocess.run(["bash", str(ROOT / "scripts/slurm/up.sh")], capture_output=True, text=True, timeout=600)
    try:
        assert up.returncode == 0 and "SLURM_READY" in up.stdout, up.stdout[-3000:] + up.stderr[-3000:]
        yield
    finally:
        down = subprocess.run(["bash", str(ROOT / "scripts/slurm/down.sh")], capture_output=True, text=True,
                              timeout=300)
        assert down.returncode == 0 and "SLURM_DOWN" in down.stdout, down.stdout + down.stderr


@pytest.fixture(scope="module")
def area(slurm, tmp_path_factory, artifacts):
    """Rows of the SLURM sweeps. The tiny teacher, scorer and teacher samples (the session's shared
    artifacts) are made here, in process, if no earlier test made them: the jobs only read them."""
    from bench.run import execute

    d = tmp_path_factory.mktemp("slurm")
    (d / "art").symlink_to(artifacts)
    execute(compose(TINY + [f"paths.results={d / 'warm'}", f"paths.artifacts={artifacts}", "budget.keep=1.0"]))
    return d


def _sweep_args(area: Path, name: str, *overrides: str) -> list[str]:
    return ["-m", "cluster=slurm", "cluster.timeout_min=10", "cluster.cpus_per_task=1", *TINY,
            f"paths.results={area / 'runs'}", f"paths.artifacts={area / 'art'}", f"hydra.sweep.dir={area / name}",
            *overrides]


def _job_logs(sweep_dir: Path) -> str:
    return "".join(f"\n--- {p}\n{p.read_text()[-1500:]}" for p in sorted(sweep_dir.rglob("*_log.*")))[-8000:]


def _events(run_dir: Path) -> list[dict]:
    p = run_dir / "log.jsonl"
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()] if p.exists() else []


def _run_dir(area: Path, method: str, seed: int) -> Path | None:
    hits = list((area / "runs").glob(f"*/{method}/blocks0.5-s{seed}-*"))
    return hits[0] if hits else None


def _queue_empty(timeout: float = 60):
    end = time.time() + timeout
    while time.time() < end:
        if not subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip():
            return
        time.sleep(0.5)
    raise AssertionError("jobs still queued: " + subprocess.run(["squeue"], capture_output=True, text=True).stdout)


@pytest.mark.slow
def test_slurm_sweep_gives_every_row_once(area):
    """3 methods x 2 seeds become one job array of 6 tasks; every run writes its row once, with its
    per-stage wall seconds and device-hours."""
    r = run_cli(_sweep_args(area, "sweep6", "method=shortgpt,flux_lite,first_k", "seed=0,1", "budget.keep=0.5"),
                timeout=400)
    assert r.returncode == 0, r.stderr[-3000:] + _job_logs(area / "sweep6")
    df = load_rows(area / "runs")
    assert len(df) == 6 and df["run"].is_unique and set(df["status"]) == {"ok"}
    assert sorted(zip(df["method"], df["seed"])) == sorted((m, s) for m in ("shortgpt", "flux_lite", "first_k")
                                                         for s in (0, 1))
    arrays = {j.split("_")[0] for j in df["job_id"]}
    assert len(arrays) == 1 and df["job_id"].is_unique, df["job_id"].tolist()  # one array, one task per run
    for p in (area / "runs").rglob("row.json"):
        row = Row(**json.loads(p.read_text()))
        assert STAGES <= set(row.wall_s) and all(v >= 0 for v in row.wall_s.values())
        assert row.n_devices == 1
        assert row.device_hours == pytest.approx(sum(row.wall_s.values()) / 3600, rel=1e-3, abs=1e-6)
    acct = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", arrays.pop()],
                          capture_output=True, text=True).stdout.split()
    assert len(acct) == 6, acct
    from bench.report import build_report
    build_report(df, area / "report", "slurm")
    assert "from 6 runs" in (area / "report/tables/slurm.md").read_text()  # the report counts the finished runs


@pytest.mark.slow
def test_preempted_and_cancelled_jobs_resume_to_unique_rows(area):
    """Run 0 gets SIGUSR2 mid fine-tune (what SLURM sends before a time limit or preemption): submitit
    checkpoints the launcher's call and requeues it, and it resumes from its stored stages by itself.
    Run 1 is cancelled mid fine-tune (scancel): it leaves no row; the same sweep command submitted
    again skips every finished run and resumes run 1. The dense runs fail (a pruning budget):
    each records its error, and never hides the other runs."""
    before = {p.parent: p.read_text() for p in (area / "runs").rglob("row.json")}
    sweep = _sweep_args(area, "sweep_rq", "method=shortgpt,dense", "seed=0,1", "budget.keep=0.5",
                        "finetune.steps=600", "finetune.ckpt_every=25", "finetune.log_every=10")
    out = open(area / "sweep_rq.out", "w")
    launcher = subprocess.Popen([sys.executable, "-m", "bench.run", *sweep], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    signalled = {}
    try:
        end = time.time() + 180
        while len(signalled) < 2 and time.time() < end and launcher.poll() is None:
            for seed in (0, 1):
                d = _run_dir(area, "shortgpt", seed)
                ev = _events(d) if d else []
                steps = [e["step"] for e in ev if e["event"] == "finetune"]
                if seed in signalled or not steps or max(steps) < 50:  # past the step-50 checkpoint
                    continue
                job = [e["job"] for e in ev if e["event"] == "start"][-1]
                assert not (d / "row.json").exists()
                if seed == 0:  # the job step's tasks get SIGUSR2 (the raw job id addresses the array task)
                    raw = subprocess.run(["squeue", "-h", "-j", job, "-o", "%A"], capture_output=True,
                                         text=True).stdout.strip()
                    subprocess.run(["scancel", "--signal=USR2", f"{raw}.0"], check=True, timeout=30)
                else:
                    subprocess.run(["scancel", job], check=True, timeout=30)
                signalled[seed] = (job, max(steps))
            time.sleep(0.2)
        assert len(signalled) == 2, f"runs not seen mid fine-tune: {signalled}\n" + _job_logs(area / "sweep_rq")
        # every task leaves the queue: run 0 after its requeued attempt, run 1 cancelled, the dense runs
        # failed. The launcher would now wait 15 s more for run 1's result, which never comes: stop it.
        _queue_empty(timeout=240)
    finally:
        if launcher.poll() is None:
            launcher.terminate()
            launcher.wait(timeout=30)
        out.close()
    log = (area / "sweep_rq.out").read_text()

    # run 0 was requeued by submitit and finished on its own, resuming its fine-tune
    d0, d1 = _run_dir(area, "shortgpt", 0), _run_dir(area, "shortgpt", 1)
    ev0 = _events(d0)
    assert (d0 / "row.json").exists(), log[-2000:] + _job_logs(area / "sweep_rq")
    starts = [e["job"] for e in ev0 if e["event"] == "start"]
    assert starts == [signalled[0][0]] * 2, starts  # same job, same run dir, second attempt
    resumed = [e["step"] for e in ev0 if e["event"] == "finetune_resume"]
    assert len(resumed) == 1 and signalled[0][1] // 25 * 25 <= resumed[0] < 600, resumed  # from a checkpoint
    row0 = Row(**json.loads((d0 / "row.json").read_text()))
    assert row0.wall_s.get("earlier_attempts", 0) > 0  # the preempted attempt is charged too
    # run 1 was cancelled: nothing that looks finished
    assert not (d1 / "row.json").exists() and not (d1 / ERROR_FILE).exists()
    # the same command again: finished runs skip, run 1 resumes, the dense runs fail again
    first_row0 = (d0 / "row.json").read_text()
    again = run_cli(sweep, timeout=400)
    assert again.returncode != 0 and "the dense baseline keeps every block" in again.stderr + again.stdout
    assert (d0 / "row.json").read_text() == first_row0  # skipped, not redone
    ev1 = _events(d1)
    assert [e["event"] for e in ev1].count("start") == 2 and any(e["event"] == "finetune_resume" for e in ev1), \
        _job_logs(area / "sweep_rq")
    assert (d1 / "row.json").exists()

    df = load_rows(area / "runs")
    assert df["run"].is_unique and len(df) == len(before) + 4
    assert sorted(zip(df["method"], df["status"])).count(("dense", "failed")) == 2
    assert (df["status"] == "ok").sum() == len(before) + 2
    assert all(p.read_text() == before[p.parent] for p in (area / "runs").rglob("row.json") if p.parent in before)
    errs = df[df["status"] == "failed"]["error"]
    assert all(e.startswith("BenchError:") and "budget.keep=1.0" in e for e in errs)
    assert re.search(r"\d+_\d+", str(df[df["status"] == "failed"]["job_id"].iloc[0]))
