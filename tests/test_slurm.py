"""Sweeps as SLURM job arrays (hydra-submitit-launcher), requeue and resume, failed runs, concurrent
row writers, cost accounting.

The first tests need no cluster. The SLURM tests bring a real single-node cluster up with
scripts/slurm/up.sh (Debian packages, loopback only; needs root and apt-get) and stop it by PID with
scripts/slurm/down.sh when the module ends. BENCH_SLURM=0 skips them (e.g. on a workstation where
installing slurm is unwanted); unset, they are skipped only where the cluster cannot be brought up
(not root, no apt-get); BENCH_SLURM=1 (what .ci/run sets) makes that a failure, so CI never passes
without them.
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

from bench.io import atomic_write_text
from bench.results import ERROR_FILE, Row, append_log, earlier_attempts_wall_s, load_rows, run_relpath, write_row
from tests.conftest import ROOT, TINY, comparable, compose, run_cli

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
    assert "export BENCH_ON_SIGTERM=stop" in list(s.setup)  # scancel stops a run at once (bench.launch)
    assert "export BENCH_ON_SIGTERM=ignore" in list(_hydra(["cluster=slurm", "cluster.on_sigterm=ignore"]).hydra.launcher.setup)
    assert _hydra(["cluster=submitit_local"]).hydra.launcher._target_.endswith("LocalLauncher")


def test_launcher_settings_do_not_change_the_run_dir(tmp_path):
    """A requeued or resubmitted job must land in the directory of its first attempt."""
    base = TINY + [f"paths.results={tmp_path}"]
    a = compose(base, "shortgpt")
    b = compose(base + ["cluster=slurm", "cluster.partition=other", "cluster.timeout_min=7",
                        "cluster.on_sigterm=ignore", "hydra.launcher.array_parallelism=3"], "shortgpt")
    c = compose(base + ["cluster=submitit_local", "stop_after=sample"], "shortgpt")
    assert a["cluster"]["name"] == "local" and b["cluster"]["name"] == "slurm"
    assert run_relpath(a) == run_relpath(b) == run_relpath(c)
    assert run_relpath(a) != run_relpath(compose(base + ["seed=1"], "shortgpt"))


def test_tinyfusion_table1_cells_are_rows_of_the_paper():
    """experiment=tinyfusion_table1 launches one run per printed row the suite has a method for, and
    a printed row whose method has a config but no cell fails here."""
    import csv

    sweep = _hydra(["experiment=tinyfusion_table1"]).hydra.sweeper.params
    (key, cells), = sweep.items()
    printed = {(r["method"], int(r["depth"])): float(r["params_M"]) for r in csv.DictReader(
        l for l in (ROOT / "results/paper.csv").open() if not l.startswith("#"))
        if r["paper"] == "TinyFusion" and r["table"] == "1"}
    seen = set()
    for cell in cells.split(","):
        cfg = _hydra(["experiment=tinyfusion_table1", f"{key}={cell}"])
        method = cfg.hydra.runtime.choices.method
        assert (ROOT / "bench/conf/method" / f"{method}.yaml").exists()
        # DiT-XL/2 has 28 blocks; width methods (a params budget) keep them all
        depth = int(28 * cfg.budget.keep + 1e-6) if cfg.budget.measure == "blocks" else 28
        assert (method, depth) in printed, f"{cell}: no Table 1 row for {method} at depth {depth}"
        if cfg.budget.measure == "params":  # Diff-Pruning-50%: 338M of DiT-XL/2's 675M
            assert cfg.budget.keep == pytest.approx(printed[method, depth] / 675, abs=0.005)
            assert cfg.method.attn_unit == "head_dims"  # the authors' DiT recipe keeps every head (TP issue 300)
        assert cfg.model.name == "DiT-XL/2" and cfg.model.ckpt and cfg.data.kind == "latents"
        assert (cfg.eval.n, cfg.eval.steps, cfg.eval.cfg_scale, cfg.eval.inception.backend) == (50000, 250, 1.5, "adm")
        assert cfg.finetune.steps == (0 if method == "dense" else 100000)
        if method.startswith("tinyfusion"):  # the pruning phase at the paper's settings, not the tiny default
            assert (cfg.method.steps, cfg.method.batch, cfg.method.lr, cfg.method.ema_decay) == (10000, 128, 1e-4, 0.999)
            assert cfg.method.recovery == ("masked_kd" if method == "tinyfusion_kd" else "finetune")
        seen.add((method, depth))
    assert seen == {("dense", 28), ("shortgpt_tinyfusion", 19), ("shortgpt_tinyfusion", 14), ("flux_lite", 14),
                    ("sensitivity", 14), ("tinyfusion", 14), ("tinyfusion_kd", 14), ("diff_pruning", 28)}
    missing = {(m, d) for m, d in printed if (m, d) not in seen and (ROOT / "bench/conf/method" / f"{m}.yaml").exists()}
    assert not missing, f"Table 1 rows with a method config but no cell in tinyfusion_table1_cells/: {missing}"
    assert {m for m, _ in printed} - {m for m, _ in seen} == {"oracle_bksdm"}  # no method for it yet


@pytest.mark.parametrize("cell", ["shortgpt_d19", "shortgpt_d14"])
def test_tinyfusion_shortgpt_cells_score_as_prune_by_score(cell):
    """Table 1's ShortGPT numbers come from TinyFusion's prune_by_score.py (clean latents, t in [0, 250),
    the last block never removed, 128 images; research/methods.md 7g): the cells resolve to the
    shortgpt_tinyfusion config, not shortgpt (noised probes at every noise level)."""
    cfg = _hydra(["experiment=tinyfusion_table1", f"+experiment/tinyfusion_table1_cells={cell}"])
    assert cfg.hydra.runtime.choices.method == "shortgpt_tinyfusion"
    assert (cfg.method.inputs, cfg.method.protect_last, cfg.calib.n) == ("clean_low_t", True, 128)


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
    """One writer process: wait for all the others, then do a run's last acts at once with them:
    append its log event and write its row (a finished run), its error.json (a failed run), or only
    start (a run still going: config and log, no row)."""
    root, kind, d, barrier = args
    run_dir = Path(root) / d["run"]
    barrier.wait(timeout=60)
    run_dir.mkdir(parents=True, exist_ok=True)
    append_log(run_dir, kind, job=d.get("job_id", ""))
    if kind == "row":
        write_row(Row(**d), run_dir)
    elif kind == "failed":
        atomic_write_text(run_dir / ERROR_FILE, json.dumps(d))
    else:
        atomic_write_text(run_dir / "config.yaml", "{}")
    return d["run"]


def test_sixteen_concurrent_writers_give_sixteen_rows(tmp_path):
    """28 processes write into one results tree at the same moment: 16 finished runs, 8 more writers
    racing on one of those runs' directory (a requeued attempt and its original, say, each with its
    own job id), 2 failed runs and 2 runs still going. Exactly 16 complete rows come out, the raced
    run's row is one writer's whole row (never a mix), no temporary file is left, and the report
    counts the 16 finished runs and the 2 failed ones."""
    from bench.report import build_report

    rows = [asdict(_row(s, job_id=f"100_{s}")) for s in range(16)]
    raced = [dict(rows[7], job_id=f"200_{k}") for k in range(8)]  # same run dir, other writers
    failed = [{k: v for k, v in asdict(_row(s, status="failed", error=f"BenchError: boom {s}")).items()
               if k not in ("metrics", "wall_s")} for s in (20, 21)]
    going = [{"run": f"m/shortgpt/blocks0.5-s{s}-cpu-going"} for s in (30, 31)]
    jobs = [("row", d) for d in rows + raced] + [("failed", d) for d in failed] + [("going", d) for d in going]
    root = tmp_path / "runs"
    ctx = mp.get_context("fork")
    barrier = ctx.Manager().Barrier(len(jobs))
    with ctx.Pool(len(jobs)) as pool:  # one process per writer: all of them wait at the barrier
        pool.map(_write, [(str(root), kind, d, barrier) for kind, d in jobs], chunksize=1)

    assert len(list(root.rglob("row.json"))) == 16 and len(list(root.rglob(ERROR_FILE))) == 2
    assert not [p for p in root.rglob("*") if p.name.endswith(".tmp")]  # no temporary files left
    got = json.loads((root / rows[7]["run"] / "row.json").read_text())
    assert got in [json.loads(Row(**d).to_json()) for d in [rows[7], *raced]]  # one writer's whole row
    log7 = [json.loads(l) for l in (root / rows[7]["run"] / "log.jsonl").read_text().splitlines()]
    assert len(log7) == 9 and {e["job"] for e in log7} == {"100_7"} | {d["job_id"] for d in raced}  # no lost append
    df = load_rows(root)
    assert len(df) == 18 and df["run"].is_unique
    ok = df[df["status"] == "ok"]
    assert len(ok) == 16 and set(ok["seed"]) == set(range(16))
    assert sorted(df[df["status"] == "failed"]["seed"]) == [20, 21]
    build_report(df, tmp_path / "rep", "c")
    assert "from 16 finished runs and 2 failed runs @" in (tmp_path / "rep/tables/c.md").read_text()


def _train_teacher(args):
    """One job's teacher stage (spawned: a fresh interpreter, as on a cluster node)."""
    artifacts, barrier = args
    from bench.data import from_config
    from bench.run import teacher

    cfg = compose(TINY + [f"paths.artifacts={artifacts}"])
    barrier.wait(timeout=120)
    teacher(cfg, from_config(cfg), "cpu")


def test_concurrent_jobs_train_a_missing_teacher_once(tmp_path):
    """Two jobs of a sweep start on an empty artifacts folder: one trains the shared teacher, the
    other waits for the lock and loads it (bench.io.file_lock)."""
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


@pytest.fixture
def job_signals():
    """Stand-ins for the handlers submitit installs in a job (a SIGUSR2 that checkpoints and requeues,
    a SIGTERM that is only logged); the test process's own handlers come back afterwards."""
    import signal

    old = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR2, signal.SIGTERM)}
    calls = []

    def install(requeue=lambda: None):
        def checkpoint_and_requeue(signum, frame):
            calls.append("requeue")
            requeue()
            calls.append("requeued")

        signal.signal(signal.SIGUSR2, checkpoint_and_requeue)
        signal.signal(signal.SIGTERM, lambda *a: calls.append("bypass"))

    yield install, calls
    for sig, h in old.items():
        signal.signal(sig, h)


def _deliver(sig):
    """Send `sig` to this process; its Python handler runs before this returns (main thread)."""
    os.kill(os.getpid(), sig)
    time.sleep(0.05)


def test_requeue_signal_is_handled_once_per_job(job_signals):
    """slurmstepd can deliver one SIGUSR2 twice; submitit's handler must run once (bench.launch)."""
    import signal

    from bench.launch import guard_requeue_signal

    install, calls = job_signals
    # slurmstepd signals every process of the job step, so the `scontrol requeue` that submitit's
    # handler runs gets a late second USR2, and the requeue's own SIGTERM, too: it must survive both
    scontrol = "kill -USR2 $$; kill -TERM $$; echo requeued"
    install(requeue=lambda: calls.append(subprocess.run(["sh", "-c", scontrol], capture_output=True,
                                                        text=True).stdout.strip()))
    assert guard_requeue_signal() and not guard_requeue_signal()  # wraps once
    _deliver(signal.SIGUSR2)
    _deliver(signal.SIGUSR2)
    assert calls == ["requeue", "requeued", "requeued"]
    signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    assert not guard_requeue_signal()  # no Python handler (not in a submitit job): nothing to wrap


def test_sigterm_stops_a_job_unless_it_is_requeueing(job_signals, monkeypatch):
    """The job's signal policy (bench.launch): scancel's SIGTERM stops the run at once (SystemExit,
    which bench.run.execute does not record as a failure), and a later SIGUSR2 does not requeue the
    cancelled job; a SIGTERM that arrives while the requeue is handled (`scontrol requeue` sends one)
    is ignored, so the requeue completes; BENCH_ON_SIGTERM=ignore keeps submitit's bypass."""
    import signal

    from bench.launch import STOP_EXIT, guard_requeue_signal

    install, calls = job_signals
    # SIGTERM first: stop now, then ignore the requeue signal
    install()
    assert guard_requeue_signal()
    with pytest.raises(SystemExit) as stop:
        _deliver(signal.SIGTERM)
        pytest.fail("SIGTERM did not stop the run")
    assert stop.value.code == STOP_EXIT == 143 and not isinstance(stop.value, Exception)
    _deliver(signal.SIGUSR2)
    _deliver(signal.SIGTERM)  # a second SIGTERM while stopping: no second exception
    assert calls == []
    # SIGUSR2 first: the SIGTERM sent by the requeue, delivered while the handler runs, is ignored
    install(requeue=lambda: _deliver(signal.SIGTERM))
    assert guard_requeue_signal()
    _deliver(signal.SIGUSR2)
    _deliver(signal.SIGTERM)
    assert calls == ["requeue", "requeued"]
    # the opt-out: submitit's own SIGTERM handler stays
    calls.clear()
    monkeypatch.setenv("BENCH_ON_SIGTERM", "ignore")
    install()
    assert guard_requeue_signal()
    _deliver(signal.SIGTERM)
    assert calls == ["bypass"]
    monkeypatch.setenv("BENCH_ON_SIGTERM", "later")
    install()
    with pytest.raises(ValueError, match="use stop or ignore"):
        guard_requeue_signal()


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


def _script(name: str, timeout: float) -> subprocess.CompletedProcess:
    """Run scripts/slurm/<name> in its own process group; on timeout stop that group (the script
    and what it waits for, e.g. apt-get: the daemons it started detach into sessions of their own
    and are down.sh's to stop) and raise."""
    p = subprocess.Popen(["bash", str(ROOT / "scripts/slurm" / name)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 15)
        try:
            p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            p.communicate()
        raise
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


@pytest.fixture(scope="module")
def slurm():
    """A running single-node cluster for this module; stopped by PID (down.sh) afterwards, also when
    bringing it up failed or timed out half-way."""
    why = _cluster_unavailable()
    if why:
        if os.environ.get("BENCH_SLURM") == "1":  # CI (.ci/run): the SLURM tests are required
            pytest.fail(f"BENCH_SLURM=1 but no SLURM cluster can be brought up: {why}", pytrace=False)
        pytest.skip(f"no SLURM cluster: {why}")
    try:
        up = _script("up.sh", timeout=600)
        assert up.returncode == 0 and "SLURM_READY" in up.stdout, up.stdout[-3000:] + up.stderr[-3000:]
        yield
    finally:
        down = _script("down.sh", timeout=300)
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


def _run_dir(area: Path, method: str, seed: int, skip=()) -> Path | None:
    """The run directory of `method` at blocks 0.5 and `seed`, other than those in `skip` (runs of
    an earlier sweep with the same method and seed but another config, e.g. fewer fine-tune steps)."""
    hits = [d for d in (area / "runs").glob(f"*/{method}/blocks0.5-s{seed}-*") if d not in set(skip)]
    assert len(hits) <= 1, hits
    return hits[0] if hits else None


def _queue_empty(timeout: float = 60):
    end = time.time() + timeout
    while time.time() < end:
        if not subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip():
            return
        time.sleep(0.5)
    raise AssertionError("jobs still queued: " + subprocess.run(["squeue"], capture_output=True, text=True).stdout)


_WRITER = """
import json, os, sys, time
from pathlib import Path
from bench.results import Row, append_log, write_row

root, n = Path(sys.argv[1]), int(sys.argv[2])
rank, job = int(os.environ["SLURM_PROCID"]), os.environ["SLURM_JOB_ID"]
rows = json.loads((root / "rows.json").read_text())
(root / "ready" / str(rank)).touch()
end = time.time() + 60
while len(os.listdir(root / "ready")) < n:  # a barrier: every task is running before any writes
    assert time.time() < end, "not all tasks started"
    time.sleep(0.01)
for d in (rows[rank], dict(rows[n], job_id=f"{job}.{rank}")):  # its own run, then the shared one
    run_dir = root / "runs" / d["run"]
    run_dir.mkdir(parents=True, exist_ok=True)
    append_log(run_dir, "row", job=d["job_id"])
    write_row(Row(**d), run_dir)
print("task", rank, "wrote", rows[rank]["run"], flush=True)
"""


def _wait_job(job: str, timeout: float = 120) -> str:
    """The job's final state from sacct (accounting lags the queue by a second or two)."""
    end = time.time() + timeout
    while time.time() < end:
        out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "State", "-j", job], capture_output=True,
                             text=True).stdout.split()
        if out and out[0] not in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING"):
            return out[0]
        time.sleep(0.5)
    raise AssertionError(f"job {job} not done after {timeout}s: {out}")


def test_sixteen_slurm_tasks_write_rows_at_once(slurm, tmp_path):
    """16 writers under SLURM at the same moment: the 16 tasks of one job step (srun, all started
    together; a 16-task job array would run 2 at a time on this 2-CPU node, as arrays of a sweep do,
    see the sweep tests) each write their own run's row and then all race on one shared run's
    directory. 17 complete rows, the shared one whole, and the report counts exactly 17."""
    from bench.report import build_report

    n = 16
    rows = [asdict(_row(s)) for s in range(n + 1)]  # the last one is the run all tasks share
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    (tmp_path / "ready").mkdir()
    (tmp_path / "writer.py").write_text(_WRITER)
    (tmp_path / "job.sh").write_text("\n".join([
        "#!/bin/bash", f"#SBATCH --ntasks={n}", "#SBATCH --overcommit", "#SBATCH --time=5", "#SBATCH --mem=2G",
        f"#SBATCH --output={tmp_path}/job.out", f"#SBATCH --chdir={ROOT}",
        f"srun --overcommit --ntasks={n} {sys.executable} {tmp_path}/writer.py {tmp_path} {n}", ""]))
    job = subprocess.run(["sbatch", "--parsable", str(tmp_path / "job.sh")], capture_output=True, text=True,
                         check=True, timeout=30).stdout.strip().split(";")[0]
    state = _wait_job(job)
    out = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert state == "COMPLETED", f"job {job}: {state}\n{out[-3000:]}"
    assert sorted(int(l.split()[1]) for l in out.splitlines() if " wrote " in l) == list(range(n)), out
    runs = tmp_path / "runs"
    assert len(list(runs.rglob("row.json"))) == n + 1
    assert not [p for p in runs.rglob("*") if p.name.endswith(".tmp")]
    shared = runs / rows[n]["run"]
    got = Row(**json.loads((shared / "row.json").read_text()))
    assert got.job_id in {f"{job}.{r}" for r in range(n)} and got.seed == n  # one task's whole row
    assert len((shared / "log.jsonl").read_text().splitlines()) == n  # every task's append, none lost
    df = load_rows(runs)
    assert len(df) == n + 1 and df["run"].is_unique and set(df["status"]) == {"ok"}
    build_report(df, tmp_path / "rep", "c")
    assert f"from {n + 1} finished runs @" in (tmp_path / "rep/tables/c.md").read_text()


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
    array = arrays.pop()
    end = time.time() + 90  # accounting is asynchronous: a task that wrote its row may still be ending in slurmdbd
    while True:
        acct = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", array],
                              capture_output=True, text=True).stdout.split()
        if (len(acct) == 6 and all(a.endswith("|COMPLETED") for a in acct)) or time.time() > end:
            break
        time.sleep(1)
    assert len(acct) == 6 and all(a.endswith("|COMPLETED") for a in acct), acct
    from bench.report import build_report
    build_report(df, area / "report", "slurm")
    assert "from 6 finished runs @" in (area / "report/tables/slurm.md").read_text()  # it counts the finished runs


@pytest.mark.slow
def test_preempted_and_cancelled_jobs_resume_to_unique_rows(area):
    """Run 0 gets SIGUSR2 mid fine-tune (what SLURM sends before a time limit or preemption): submitit
    checkpoints the launcher's call and requeues it, and it resumes from its stored stages by itself.
    Run 1 is cancelled mid fine-tune (scancel): its SIGTERM stops the run at once (bench.launch; not
    after KillWait, and never after finishing its fine-tune in that grace time), it leaves no row;
    the same sweep command submitted again skips every finished run and resumes run 1. The dense runs
    fail (a pruning budget): each records its error, and never hides the other runs.
    The fine-tune (FT steps, ~6 s here) leaves seconds of work after the step-50 signal, far more than
    the signal takes to arrive, so the stop is what ends run 1."""
    FT = 1000
    before = {p.parent: p.read_text() for p in (area / "runs").rglob("row.json")}
    sweep = _sweep_args(area, "sweep_rq", "method=shortgpt,dense", "seed=0,1", "budget.keep=0.5",
                        f"finetune.steps={FT}", "finetune.ckpt_every=25", "finetune.log_every=10")
    out = open(area / "sweep_rq.out", "w")
    launcher = subprocess.Popen([sys.executable, "-m", "bench.run", *sweep], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    signalled = {}
    try:
        end = time.time() + 180
        while len(signalled) < 2 and time.time() < end and launcher.poll() is None:
            for seed in (1, 0):  # the cancel first: it is quick, and run 1 must still be mid fine-tune
                d = _run_dir(area, "shortgpt", seed, skip=before)
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
                    # a second, late USR2 (slurmstepd can deliver one twice): it reaches the job's
                    # `scontrol requeue` too, which must survive it (bench.launch). Bounded to 2 s: once
                    # the job is requeued, scancel waits for its next attempt and would signal that one
                    # (it starts >= 10 s later, SLURM_CRED_EXPIRE), and run 1 must be seen mid fine-tune
                    try:
                        subprocess.run(["scancel", "--signal=USR2", f"{raw}.0"], capture_output=True, timeout=2)
                    except subprocess.TimeoutExpired:
                        pass
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
    d0, d1 = _run_dir(area, "shortgpt", 0, skip=before), _run_dir(area, "shortgpt", 1, skip=before)
    ev0 = _events(d0)
    err0 = (d0 / "error.json").read_text() if (d0 / "error.json").exists() else ""
    assert (d0 / "row.json").exists(), log[-2000:] + _job_logs(area / "sweep_rq") + err0
    starts = [e["job"] for e in ev0 if e["event"] == "start"]
    assert starts == [signalled[0][0]] * 2, starts  # same job, same run dir, second attempt
    resumed = [e["step"] for e in ev0 if e["event"] == "finetune_resume"]
    assert len(resumed) == 1 and signalled[0][1] // 25 * 25 <= resumed[0] < FT, resumed  # from a checkpoint
    row0 = Row(**json.loads((d0 / "row.json").read_text()))
    assert row0.wall_s.get("earlier_attempts", 0) > 0  # the preempted attempt is charged too
    # run 1 was cancelled: its SIGTERM stopped it mid fine-tune, and nothing looks finished
    job1 = signalled[1][0]
    err1 = "".join(p.read_text() for p in (area / "sweep_rq").rglob(f"{job1}_*_log.err"))
    assert "SIGTERM (job cancelled or killed by the scheduler): stopping the run now" in err1, err1[-3000:]
    assert max(e["step"] for e in _events(d1) if e["event"] == "finetune") < FT
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
    from bench.report import build_report
    rq = df[~df["path"].isin({str(p) for p in before})]  # this sweep's runs (the first sweep's differ in steps)
    build_report(rq, area / "report_rq", "rq")  # the cancelled-then-resumed run counts once, as finished
    assert "from 2 finished runs and 2 failed runs @" in (area / "report_rq/tables/rq.md").read_text()


def _same_row(a: dict, b: dict) -> None:
    """Rows equal field by field; the metrics to 1e-6: numpy's BLAS, which the Frechet distance uses,
    runs with the job's OMP_NUM_THREADS there and with this process's threads here."""
    ma, mb = a.pop("metrics"), b.pop("metrics")
    assert a == b
    assert ma.keys() == mb.keys() and all(ma[k] == pytest.approx(mb[k], rel=1e-6) for k in ma), (ma, mb)


def _one_thread(fn):
    """fn() with one torch thread, as a task of cluster.cpus_per_task=1 runs (its OMP_NUM_THREADS): the
    same float reductions, so the local reference row can equal the job's bit for bit."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(n)


@pytest.mark.slow
def test_a_two_task_slurm_job_is_one_data_parallel_run(area):
    """cluster.tasks_per_node=2: one SLURM job of two tasks, wired into one torch.distributed group
    (gloo) from submitit's environment; rank 0 writes the run's one row, which is the row of a local
    one-process run of the same config (no fine-tune here, so the model is the same bit for bit and
    so are the samples; the data-parallel fine-tune is tests/test_dist.py's)."""
    from bench.run import execute

    over = ["method=first_k", "budget.keep=0.5", "seed=7", "finetune.steps=0"]
    local = _one_thread(lambda: execute(compose(TINY + over + [f"paths.results={area / 'local7'}",
                                                                f"paths.artifacts={area / 'art'}"], method="first_k")))
    r = run_cli(_sweep_args(area, "ddp2", *over, "cluster.tasks_per_node=2"), {"BENCH_SHARD_SIZE": "5"},  # 4 shards:
                timeout=400)                                                                  # both ranks draw
    assert r.returncode == 0, r.stderr[-3000:] + _job_logs(area / "ddp2")
    run_dir = _run_dir(area, "first_k", 7)
    assert run_dir is not None, _job_logs(area / "ddp2")
    row = json.loads((run_dir / "row.json").read_text())
    starts = [e for e in _events(run_dir) if e["event"] == "start"]
    assert len(starts) == 1 and starts[0]["world"] == 2 and starts[0]["job"]  # one writer, two ranks, in a job
    drop = lambda d: {k: v for k, v in comparable(d).items() if k != "job_id"}  # noqa: E731
    _same_row(drop(row), drop(local))
    logs = _job_logs(area / "ddp2")
    assert "rank 0/2" in logs and "rank 1/2" in logs  # both tasks sampled their shards


@pytest.mark.slow
def test_a_slurm_array_of_sample_parts_writes_one_row(area):
    """The alternative to one data-parallel job: a job array of sampling tasks over one run
    (sample_part=0/2,1/2); the parts share the run directory, the part that completes the shards
    writes the one row, which is the row of a local single run."""
    from bench.run import execute

    over = ["method=first_k", "budget.keep=0.5", "seed=8"]
    local = _one_thread(lambda: execute(compose(TINY + over + [f"paths.results={area / 'local8'}",
                                                                f"paths.artifacts={area / 'art'}"], method="first_k")))
    r = run_cli(_sweep_args(area, "parts2", *over, "sample_part=0/2,1/2"), {"BENCH_SHARD_SIZE": "5"},  # 2 shards
                timeout=400)                                                                         # a part
    assert r.returncode == 0, r.stderr[-3000:] + _job_logs(area / "parts2")
    run_dir = _run_dir(area, "first_k", 8)
    assert run_dir is not None, _job_logs(area / "parts2")
    row = json.loads((run_dir / "row.json").read_text())
    drop = lambda d: {k: v for k, v in comparable(d).items() if k != "job_id"}  # noqa: E731
    _same_row(drop(row), drop(local))
    assert len([e for e in _events(run_dir) if e["event"] == "sample_part"]) == 1  # one part stopped after sampling
