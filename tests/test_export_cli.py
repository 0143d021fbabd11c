"""python -m bench.metrics.export: a run's samples as an ADM npz and a PNG folder."""
import numpy as np
import torch

from bench.metrics.export import main


def test_export_cli_from_a_run_directory(tmp_path):
    rel = "M-digits-ddpm/shortgpt/blocks0.5-s0-cpu-abcd1234"
    run_dir = tmp_path / "results" / rel
    run_dir.mkdir(parents=True)
    art = tmp_path / "artifacts" / "runs" / rel
    art.mkdir(parents=True)
    samples = torch.rand(5, 1, 8, 8) * 2 - 1
    torch.save({"samples": samples, "labels": torch.arange(5)}, art / "samples.pt")
    rc = main([str(run_dir), "--results", str(tmp_path / "results"), "--artifacts", str(tmp_path / "artifacts"),
               "--npz", str(tmp_path / "s.npz"), "--png", str(tmp_path / "png")])
    assert rc == 0
    arr = np.load(tmp_path / "s.npz")["arr_0"]
    assert arr.shape == (5, 8, 8, 3) and arr.dtype == np.uint8
    assert len(list((tmp_path / "png").glob("*.png"))) == 5


def test_export_cli_names_the_fix_when_samples_are_missing(tmp_path, capsys):
    assert main([str(tmp_path / "nothing.pt")]) == 2
    assert "run the sample stage first" in capsys.readouterr().err
