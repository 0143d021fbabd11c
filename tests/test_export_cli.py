"""python -m bench.metrics.export: a run's samples as an ADM npz and a PNG folder."""
import numpy as np
import torch

from bench.metrics.export import main
from bench.shards import SampleShards


def test_export_cli_from_a_run_directory(tmp_path):
    rel = "M-digits-ddpm/shortgpt/blocks0.5-s0-cpu-abcd1234"
    run_dir = tmp_path / "results" / rel
    run_dir.mkdir(parents=True)
    art = tmp_path / "artifacts" / "runs" / rel
    art.mkdir(parents=True)
    samples = torch.rand(5, 1, 8, 8) * 2 - 1
    shards = SampleShards(art / "samples", 5, 0, shard_size=2)  # three shards: 2 + 2 + 1
    for lo, hi in shards.ranges():
        shards.write(lo, hi, samples[lo:hi], torch.arange(lo, hi))
    rc = main([str(run_dir), "--results", str(tmp_path / "results"), "--artifacts", str(tmp_path / "artifacts"),
               "--npz", str(tmp_path / "s.npz"), "--png", str(tmp_path / "png")])
    assert rc == 0
    arr = np.load(tmp_path / "s.npz")["arr_0"]
    assert arr.shape == (5, 8, 8, 3) and arr.dtype == np.uint8
    assert len(list((tmp_path / "png").glob("*.png"))) == 5


def test_export_cli_names_the_fix_when_samples_are_missing(tmp_path, capsys):
    assert main([str(tmp_path / "nothing")]) == 2
    assert "pass --results or the shard folder" in capsys.readouterr().err
    (tmp_path / "results" / "r").mkdir(parents=True)
    assert main([str(tmp_path / "results" / "r"), "--results", str(tmp_path / "results"),
                 "--artifacts", str(tmp_path / "art")]) == 2
    assert "run the sample stage" in capsys.readouterr().err


def test_exported_npz_equals_the_samples_across_shards(tmp_path):
    from bench.metrics.export import to_nhwc_uint8

    samples = torch.rand(5, 1, 8, 8) * 2 - 1
    shards = SampleShards(tmp_path / "samples", 5, 0, shard_size=2)
    for lo, hi in reversed(shards.ranges()):  # any order, as several writers would
        shards.write(lo, hi, samples[lo:hi], torch.arange(lo, hi))
    assert main([str(tmp_path / "samples"), "--npz", str(tmp_path / "s.npz")]) == 0
    assert np.array_equal(np.load(tmp_path / "s.npz")["arr_0"], to_nhwc_uint8(samples))
