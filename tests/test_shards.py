"""Samples in shards on disk: a run killed mid-sampling resumes at the first missing shard and gives
the samples of an uninterrupted run; shards drawn in any order equal one draw."""
from __future__ import annotations

import pytest
import torch

import bench.shards as shards_mod
from bench.shards import SampleShards
from tests.conftest import comparable


class Killed(BaseException):
    """Like SIGKILL for the run: not an Exception, so no error.json is written."""


def test_killed_sampling_resumes_at_the_first_missing_shard(tiny_cfg, tmp_path, monkeypatch):
    """Killed after 2 of 4 shards: the rerun draws only shards 3 and 4 and gives the row of an
    uninterrupted run (same artifacts folder layout, same teacher)."""
    import shutil
    from pathlib import Path

    from bench.run import execute

    monkeypatch.setattr(shards_mod, "SHARD_SIZE", 6)  # eval.n = 20: shards of 6, 6, 6, 2
    ref_cfg = tiny_cfg("first_k")
    ref = execute(ref_cfg)
    art = tmp_path / "art_killed"
    for sub in ("teachers", "classifiers", "teacher_samples"):  # the same trained teacher and scorer
        shutil.copytree(Path(ref_cfg["paths"]["artifacts"]) / sub, art / sub)
    cfg = tiny_cfg("first_k", [f"paths.artifacts={art}", f"paths.results={tmp_path / 'killed'}"])

    drawn: list[tuple[int, int]] = []
    real_write = SampleShards.write

    def write(self, lo, hi, samples, labels, die_after=None):
        real_write(self, lo, hi, samples, labels)
        drawn.append((lo, hi))
        if len(drawn) == die_after:
            raise Killed()

    monkeypatch.setattr(SampleShards, "write", lambda *a: write(*a, die_after=2))
    with pytest.raises(Killed):
        execute(cfg)
    assert drawn == [(0, 6), (6, 12)]
    monkeypatch.setattr(SampleShards, "write", lambda *a: write(*a))
    row = execute(cfg)
    assert drawn[2:] == [(12, 18), (18, 20)]  # the finished shards were not drawn again
    assert comparable(row) == comparable(ref)


def test_shards_in_any_order_equal_one_draw(tmp_path):
    from bench.models import build
    from bench.sample import generate

    torch.manual_seed(0)
    net = build("DiT-T/2", input_size=8, in_channels=1, num_classes=10)
    whole, labels = generate(net, 7, 3, 7, "ddpm", 3, 1.5)
    sh = SampleShards(tmp_path, 7, 3, shard_size=3)
    for lo, hi in reversed(sh.ranges()):
        s, y = generate(net, hi - lo, 3 + lo, 2, "ddpm", 3, 1.5)
        sh.write(lo, hi, s, y)
    got, got_labels = SampleShards.open(tmp_path).load_all()
    assert torch.equal(got_labels, labels)
    torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-6)  # batch 7 vs 2: summation order only


def test_a_shard_of_other_seeds_or_size_is_redrawn(tmp_path):
    sh = SampleShards(tmp_path, 4, 0, shard_size=2)
    sh.write(0, 2, torch.zeros(2, 1, 2, 2), torch.arange(2))
    sh.write(2, 4, torch.zeros(2, 1, 2, 2), torch.arange(2))
    assert sh.missing() == []
    other = SampleShards(tmp_path, 4, 10, shard_size=2)  # same files, other seeds: not this run's samples
    assert other.missing() == [(0, 2), (2, 4)]
    assert len(list(tmp_path.glob("shard-*.corrupt-*"))) == 2  # moved aside, kept
