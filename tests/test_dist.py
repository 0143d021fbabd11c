"""Several ranks through torch.distributed (gloo, CPU processes): `torchrun -m bench.run` gives the
row of one process; each rank draws its own sample shards (sample i is the same whatever the world
size), rank 0 alone writes the run directory."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT, TINY, comparable, ensure_teacher, run_cli


@pytest.mark.slow
def test_two_ranks_give_the_row_of_one(tmp_path, artifacts):
    """Sampling and scoring over ranks, on one model (no fine-tune: a data-parallel fine-tune equals
    the one-process one up to float summation order, tested below): bit-identical samples."""
    ensure_teacher(artifacts)
    one_art, two_art = tmp_path / "art1", tmp_path / "art2"
    for art in (one_art, two_art):  # the same trained teacher for both (the scorer trains the same way)
        shutil.copytree(artifacts / "teachers", art / "teachers")
    common = TINY + ["method=first_k", "eval.n=20", "finetune.steps=0"]
    env = {**os.environ, "BENCH_SHARD_SIZE": "5", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    one = run_cli(common + [f"paths.artifacts={one_art}", f"paths.results={tmp_path / 'one'}"],
                  {"BENCH_SHARD_SIZE": "5", "OMP_NUM_THREADS": "1"})  # the ranks' thread count too
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          "-m", "bench.run", *common, f"paths.artifacts={two_art}", f"paths.results={tmp_path / 'two'}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert two.returncode == 0, two.stderr[-3000:]
    rows = [json.loads(next((tmp_path / d).rglob("row.json")).read_text()) for d in ("one", "two")]
    assert comparable(rows[0]) == comparable(rows[1])  # identical samples: identical quality numbers
    log = [json.loads(x) for x in next((tmp_path / "two").rglob("log.jsonl")).read_text().splitlines()]
    starts = [e for e in log if e["event"] == "start"]
    assert len(starts) == 1 and starts[0]["world"] == 2  # rank 0 alone writes the run directory
    import torch

    from bench.shards import SampleShards
    a, b = (SampleShards.open(next(art.rglob("samples"))).load_all() for art in (one_art, two_art))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # every sample bit for bit
    shards = sorted(p.name for p in two_art.rglob("shard-*.pt"))
    assert shards == ["shard-0000000-0000005.pt", "shard-0000005-0000010.pt", "shard-0000010-0000015.pt",
                      "shard-0000015-0000020.pt"]


@pytest.mark.slow
def test_a_two_rank_job_killed_mid_sampling_resumes_without_redoing_shards(tmp_path, artifacts):
    """Each rank dies after writing its first shard (torchrun then stops the job); the rerun finds
    those shards, draws only the missing ones, and the row is written once."""
    ensure_teacher(artifacts)
    art = tmp_path / "art"
    shutil.copytree(artifacts / "teachers", art / "teachers")
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "bench.run", *TINY,
            "method=first_k", "eval.n=20", f"paths.artifacts={art}", f"paths.results={tmp_path / 'res'}"]
    env = {**os.environ, "BENCH_SHARD_SIZE": "5", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cut = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={**env, "BENCH_TEST_ABORT_AFTER_SHARDS": "1"})
    assert cut.returncode != 0 and not list((tmp_path / "res").rglob("row.json"))
    done = {p.name: p.stat().st_mtime_ns for p in art.rglob("shard-*.pt")}
    assert 1 <= len(done) <= 2  # rank 0's first shard, and rank 1's unless torchrun stopped it first
    again = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in art.rglob("shard-*.pt") if p.name in done} == done  # not redone
    assert len(list(art.rglob("shard-*.pt"))) == 4 and len(list((tmp_path / "res").rglob("row.json"))) == 1
    import re
    drawn = [int(n) for n in re.findall(r"rank \d/2\] sampling (\d+) of 20", again.stdout)]
    assert sum(drawn) == 20 - 5 * len(done)


# ------------------------------------------------------------------------------------------------
# Data-parallel fine-tune (bench.finetune under DDP): tests/ddp_worker.py as 1 plain process, or as
# the ranks of torchrun
# ------------------------------------------------------------------------------------------------

WORKER = ROOT / "tests" / "ddp_worker.py"
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _worker(out, ranks: int | None, *args, env: dict | None = None, ok: bool = True):
    """tests/ddp_worker.py as one plain process (ranks None) or as `ranks` torchrun ranks."""
    launch = [] if ranks is None else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    r = subprocess.run([sys.executable, *launch, str(WORKER), str(out), *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, env={**os.environ, **ENV, **(env or {})})
    assert (r.returncode == 0) == ok, r.stderr[-3000:]
    return r


def _trajectory(out) -> tuple[list[int], list[float], list[list[int]]]:
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    steps = [e["step"] for e in log if e["event"] == "finetune"]
    return steps, [e["loss"] for e in log if e["event"] == "finetune"], \
        [e["kept_blocks"] for e in log if e["event"] == "surgery"]


def _final(out) -> dict:
    import torch
    return torch.load(out / "ft" / "final.pt", weights_only=False)


def _assert_same_weights(a: dict, b: dict, atol: float):
    import torch
    assert a["kept_blocks"] == b["kept_blocks"] and a["ema"].keys() == b["ema"].keys()
    for k in a["ema"]:
        assert torch.allclose(a["ema"][k], b["ema"][k], atol=atol, rtol=0), k


@pytest.mark.slow
def test_two_rank_finetune_follows_the_one_process_trajectory(tmp_path):
    """The global batch (16) splits 8 + 8 over two ranks; its indices and draws are a function of
    (seed, step), DDP averages the gradients: the same loss every step and the same weights, up to
    float summation order (in float64: 1e-9; in float32 the losses to 1e-5). The DDP path with one
    rank is the plain loop, bit for bit."""
    for name, ranks, mode in (("plain", None, ""), ("one", 1, ""), ("two", 2, ""), ("plain64", None, "f64"),
                              ("two64", 2, "f64")):
        _worker(tmp_path / name, ranks, mode)
    plain, one, two = (_trajectory(tmp_path / n) for n in ("plain", "one", "two"))
    assert plain[0] == list(range(8)) and plain == one
    assert two[0] == plain[0] and two[1] == pytest.approx(plain[1], rel=1e-5, abs=1e-6)
    _assert_same_weights(_final(tmp_path / "plain"), _final(tmp_path / "one"), atol=0)
    _assert_same_weights(_final(tmp_path / "plain64"), _final(tmp_path / "two64"), atol=1e-9)
    assert _trajectory(tmp_path / "two64")[1] == pytest.approx(_trajectory(tmp_path / "plain64")[1], abs=2e-6)


@pytest.mark.slow
def test_a_killed_two_rank_finetune_resumes_on_one(tmp_path):
    """Killed after step 4 on 2 ranks (checkpoint at 3): resumed by one process, it ends where an
    uninterrupted run ends; the checkpoint holds no per-rank state."""
    _worker(tmp_path / "ref", None, "f64")
    _worker(tmp_path / "cut", 2, "f64", env={"BENCH_TEST_ABORT_AT_STEP": "4"}, ok=False)
    assert (tmp_path / "cut" / "ft" / "last.pt").exists() and not (tmp_path / "cut" / "ft" / "final.pt").exists()
    _worker(tmp_path / "cut", None, "f64")
    log = [json.loads(x) for x in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if e["event"] == "finetune_resume"] == [3]
    _assert_same_weights(_final(tmp_path / "ref"), _final(tmp_path / "cut"), atol=1e-9)


@pytest.mark.slow
def test_a_progressive_method_gives_the_same_plan_on_one_and_two_ranks(tmp_path):
    """EntPruner's adaptive schedule (CED + NTK/ZiCo votes every 2 steps) under DDP: every rank
    decides on the same weights with the global loss, rank 0's plan is applied; the surgeries, the
    decision log and the final blocks equal those of one process."""
    _worker(tmp_path / "one", None, "progressive")
    _worker(tmp_path / "two", 2, "progressive")
    one, two = _trajectory(tmp_path / "one"), _trajectory(tmp_path / "two")
    assert one[2] and one[2] == two[2] and one[1] == pytest.approx(two[1], rel=1e-5, abs=1e-6)
    assert len(one[2][-1]) == 2  # 4 blocks -> budget 0.5
    keys = ("event", "step", "kept_before", "order", "voted_k", "chosen_k", "forced", "removed", "kept_after")
    decisions = [[{k: v for k, v in json.loads(x).items() if k in keys}
                  for x in (tmp_path / d / "entpruner_decisions.jsonl").read_text().splitlines()] for d in ("one", "two")]
    assert decisions[0] == decisions[1] and [d["event"] for d in decisions[0]].count("decision") == 2
    assert _final(tmp_path / "one")["kept_blocks"] == _final(tmp_path / "two")["kept_blocks"] == one[2][-1]


@pytest.mark.slow
def test_sample_parts_run_at_once_and_give_the_row_of_one_run(tmp_path, artifacts):
    """sample_part=k/n (a SLURM array of sampling tasks, without a process group): two parts started
    together; one runs the stages before sampling while the other waits for the run's lock, both
    draw their own shards at once (the lock is let go while sampling), and the part that finds every
    shard drawn scores and writes the one row, equal to a single run's."""
    ensure_teacher(artifacts)
    art = tmp_path / "art"
    for a in (art, tmp_path / "art1"):  # the same trained teacher for both
        shutil.copytree(artifacts / "teachers", a / "teachers")
    common = TINY + ["method=first_k", "eval.n=20", f"paths.artifacts={art}"]
    env = {**os.environ, "BENCH_SHARD_SIZE": "5", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    one = run_cli(common + [f"paths.results={tmp_path / 'one'}", f"paths.artifacts={tmp_path / 'art1'}"],
                  {"BENCH_SHARD_SIZE": "5", "OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr[-3000:]
    parts = [subprocess.Popen([sys.executable, "-m", "bench.run", *common, f"sample_part={k}/2",
                               f"paths.results={tmp_path / 'parts'}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for k in (0, 1)]
    outs = [p.communicate(timeout=900) for p in parts]
    assert all(p.returncode == 0 for p in parts), "\n".join(o[1][-2000:] for o in outs)
    rows = [json.loads(x.read_text()) for x in (tmp_path / "parts").rglob("row.json")]
    assert len(rows) == 1
    assert comparable(rows[0]) == comparable(json.loads(next((tmp_path / "one").rglob("row.json")).read_text()))
    log = [json.loads(x) for x in next((tmp_path / "parts").rglob("log.jsonl")).read_text().splitlines()]
    assert [e["part"] for e in log if e["event"] == "sample_part"] in (["0/2"], ["1/2"])  # the first to finish
    assert sum("sampling 10 of 20" in o[0] for o in outs) == 2  # each part drew its half
    assert sorted(p.name for p in art.rglob("shard-*.pt")) == [f"shard-{a:07d}-{a + 5:07d}.pt" for a in (0, 5, 10, 15)]


def test_ddp_speed_smoke_times_the_plain_and_the_one_rank_ddp_loop(tmp_path, monkeypatch):
    """bench.gpu.ddp_speed on the CPU: one round of the plain loop and one of the DDP path with a one-rank
    gloo group, in this process; the group is left afterwards."""
    from bench import dist
    from bench.gpu import ddp_speed

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert ddp_speed.main(["--out", str(tmp_path), "--smoke"]) == 0
    recs = json.loads((tmp_path / "ddp_speed.json").read_text())["records"]
    assert [r["ddp"] for r in recs] == [False, True] and all(r["per_step_s"] > 0 and r["path"] == "finetune" for r in recs)
    assert not dist.active() and "DDP / plain" in (tmp_path / "ddp_speed.md").read_text()
