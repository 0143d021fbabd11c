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
    ensure_teacher(artifacts)
    one_art, two_art = tmp_path / "art1", tmp_path / "art2"
    for art in (one_art, two_art):  # the same trained teacher for both (the scorer trains the same way)
        shutil.copytree(artifacts / "teachers", art / "teachers")
    common = TINY + ["method=first_k", "eval.n=20"]
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
