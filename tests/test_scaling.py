"""bench.gpu.scaling: the data-parallel scaling measurement (torchrun ranks, gloo on the CPU, a tiny DiT),
its report (efficiencies against one GPU, refusals) and bench.cost's projection with the measured
efficiencies (--scaling)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
H100 = "NVIDIA H100 80GB HBM3"


def _measure(out, n: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                           "-m", "bench.gpu.scaling", "measure", "--out", str(out), "--smoke"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def test_measure_on_one_and_two_ranks_writes_the_records(tmp_path):
    from bench.gpu.scaling import SMOKE

    for n in (1, 2):
        r = _measure(tmp_path, n)
        assert r.returncode == 0, r.stderr[-3000:]
    d = {n: json.loads((tmp_path / f"scaling_N{n}.json").read_text()) for n in (1, 2)}
    for n, f in d.items():
        assert f["N"] == n and len(f["meta"]["devices"]) == n and f["meta"]["device"].startswith("cpu")
        assert f["meta"]["commit"] and f["meta"]["torch"]
        assert f["meta"]["command"] == (f"torchrun --standalone --nproc-per-node={n} -m bench.gpu.scaling measure "
                                        f"--out {tmp_path} --smoke")
        assert f["settings"] == {k: list(v) if isinstance(v, tuple) else v for k, v in SMOKE.items()}
        ft, sm = f["records"]
        assert ft["path"] == "finetune" and sm["path"] == "sample"
        for rec, steps in ((ft, SMOKE["ft_steps"]), (sm, SMOKE["sample_steps"])):
            assert rec["per_step_s"] > 0 and len(rec["per_step_all_s"]) == SMOKE["repeats"] == len(rec["t_s"])
            assert rec["steps"] == [steps[0], steps[0] + (steps[1] - steps[0]) * n]  # the window grows with N
        assert ft["batch"] == 8 and ft["per_rank_batch"] == 8 // n and ft["world"] == n
        assert ft["peak_mem_gib"] == [None] * n  # GPU memory: none on the CPU
        # shard k on rank k mod N: 4 shards of 2 samples
        assert sm["samples_per_rank"] == ([8] if n == 1 else [4, 4]) and sm["total"] == 8 and sm["world"] == n
        assert sm["samples_per_s"] == pytest.approx(8 / (sm["per_step_s"] * 250))
        assert sm["work_macs"] == 8 * 2 * sm["nfe_per_step"] * sm["macs_per_image"]  # cfg 1.5: two rows a sample
    from bench.gpu.scaling import main
    assert main(["report", str(tmp_path)]) == 0
    rep = json.loads((tmp_path / "scaling.json").read_text())
    assert [r["N"] for r in rep["rows"]] == [1, 2] and rep["rows"][0]["finetune_eff"] == 1.0
    assert rep["verdict"] == {"finetune": None, "sample": None}  # no N = 8
    assert "not measured (no N = 8)" in (tmp_path / "scaling.md").read_text()


def test_script_measures_the_gpus_present_then_resumes(tmp_path):
    """bench/gpu/scaling.sh with a stand-in nvidia-smi listing 2 GPUs and --smoke passed on to measure:
    N = 1 and 2 are measured (4 is skipped), reported, copied to $OUT; a second call measures nothing."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "nvidia-smi").write_text('#!/bin/sh\n[ "$1" = -L ] && printf "GPU 0: X\\nGPU 1: X\\n"\nexit 0\n')
    (bin_ / "nvidia-smi").chmod(0o755)
    out, res = tmp_path / "out", tmp_path / "res"
    out.mkdir()
    env = {**ENV, "PATH": f"{bin_}:{os.environ['PATH']}", "BENCH_PYTHON": sys.executable, "SCALING_OUT": str(res),
           "SCALING_NS": "1 2 4", "OUT": str(out)}
    r = subprocess.run(["bash", "bench/gpu/scaling.sh", "--smoke"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "N=4: only 2 GPU(s) here" in r.stdout and "still to measure" not in r.stdout
    assert sorted(p.name for p in out.iterdir()) == ["scaling.json", "scaling.md", "scaling_N1.json", "scaling_N2.json"]
    assert [row["N"] for row in json.loads((res / "scaling.json").read_text())["rows"]] == [1, 2]
    again = subprocess.run(["bash", "bench/gpu/scaling.sh", "--smoke"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0 and "N=1: " + str(res / "scaling_N1.json") + " exists" in again.stdout
    assert "measuring" not in again.stdout


def test_difference_repeats_give_the_median_and_keep_the_one_pair_record():
    from bench.steptime import difference

    times = iter([9.0, 1.0, 3.0, 1.0, 5.0, 1.0, 2.0])  # warm-up, then (S1, S2) pairs
    rec = difference(lambda s: next(times), (1, 3), repeats=3)
    assert rec["per_step_all_s"] == [1.0, 2.0, 0.5] and rec["per_step_s"] == 1.0 and rec["warmup_s"] == 9.0
    assert rec["t_s"] == [[1.0, 3.0], [1.0, 5.0], [1.0, 2.0]] and "noisy" not in rec
    times = iter([9.0, 2.0, 1.0])  # one pair, not positive: t2 / S2, flagged (the record of repeats=1 as before)
    assert difference(lambda s: next(times), (1, 3)) == {"per_step_s": 1 / 3, "warmup_s": 9.0, "steps": [1, 3],
                                                          "t_s": [2.0, 1.0], "noisy": True}


def test_measure_outside_torchrun_names_the_launcher(tmp_path, monkeypatch, capsys):
    from bench.gpu.scaling import main

    for k in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(k, raising=False)
    assert main(["measure", "--out", str(tmp_path), "--smoke"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "torchrun --standalone --nproc-per-node=N" in err
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------
# report: synthetic measurements
# --------------------------------------------------------------------------------------------

def _write(folder, n: int, ft_s: float, samples_s: float, device: str = H100, commit: str = "abc123",
           **settings) -> None:
    from bench.gpu.scaling import settings as preset

    p = {**preset(False, None), **settings}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"scaling_N{n}.json").write_text(json.dumps({
        "N": n, "settings": p,
        "meta": {"device": device, "devices": [device] * n, "device_type": "cuda", "commit": commit,
                 "torch": "2.11.0+cu130", "command": f"torchrun --standalone --nproc-per-node={n} -m bench.gpu.scaling "
                                                     "measure --out DIR"},
        "records": [{"path": "finetune", "per_step_s": ft_s, "per_step_all_s": [ft_s, ft_s * 1.01, ft_s * 0.99],
                     "peak_mem_gib": [40.0] * n},
                    {"path": "sample", "per_step_s": p["sample_total"] / (samples_s * 250), "samples_per_s": samples_s}]}))


MEASURED = {1: (0.8, 10.0), 2: (0.42, 19.0), 4: (0.25, 36.0), 8: (0.125, 72.0)}  # N: (fine-tune s/step, samples/s)


def test_report_gives_the_efficiencies_against_one_gpu(tmp_path):
    from bench.gpu.scaling import main

    for n, (t, thr) in MEASURED.items():
        _write(tmp_path, n, t, thr)
    assert main(["report", str(tmp_path)]) == 0
    d = json.loads((tmp_path / "scaling.json").read_text())
    rows = {r["N"]: r for r in d["rows"]}
    assert sorted(rows) == [1, 2, 4, 8]
    # fine-tune: t1 / (N tN); sampling: thrN / (N thr1)
    assert [rows[n]["finetune_eff"] for n in (1, 2, 4, 8)] == pytest.approx([1.0, 0.8 / 0.84, 0.8, 0.8])
    assert [rows[n]["sample_eff"] for n in (1, 2, 4, 8)] == pytest.approx([1.0, 0.95, 0.9, 0.9])
    assert rows[8]["finetune_meets_target"] and rows[8]["sample_meets_target"]  # 80 % and 90 % exactly
    assert d["verdict"] == {"finetune": True, "sample": True} and d["meta"]["device"] == H100
    assert rows[2]["finetune_step_all_s"] == pytest.approx([0.42, 0.4242, 0.4158]) and rows[8]["peak_mem_gib"] == 40.0
    md = (tmp_path / "scaling.md").read_text()
    assert "| 8   | 125.0 (125.0, 126.2, 123.8) | 80.0 %" in md and "| 72.00 " in md
    assert "fine-tune >= 80.0 %: met; sampling >= 90.0 %: met" in md

    _write(tmp_path, 8, 0.126, 71.9)  # just under both targets
    assert main(["report", str(tmp_path)]) == 0
    d = json.loads((tmp_path / "scaling.json").read_text())
    assert d["verdict"] == {"finetune": False, "sample": False}
    assert d["rows"][-1]["finetune_eff"] == pytest.approx(0.8 / (8 * 0.126))
    assert d["rows"][-1]["sample_eff"] == pytest.approx(71.9 / 80)


@pytest.mark.parametrize("change, words", [
    ({"device": "NVIDIA H200"}, "differ in device"),
    ({"commit": "def456"}, "differ in commit"),
    ({"ft_batch": 128}, "differ in settings ({'ft_batch': 128} vs {'ft_batch': 256})"),
    ({"sample_compile": False}, "differ in settings"),
])
def test_report_refuses_to_mix(tmp_path, capsys, change, words):
    from bench.gpu.scaling import main

    _write(tmp_path, 1, 0.8, 10.0)
    _write(tmp_path, 8, 0.125, 72.0, **change)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: scaling_N8.json and scaling_N1.json") and words in err and "\n" not in err
    assert not (tmp_path / "scaling.md").exists() and not (tmp_path / "scaling.json").exists()


def test_report_refuses_without_one_gpu_or_any_file(tmp_path, capsys):
    from bench.gpu.scaling import main

    assert main(["report", str(tmp_path)]) == 2
    assert "no scaling_N*.json" in capsys.readouterr().err
    _write(tmp_path, 2, 0.42, 19.0)
    _write(tmp_path, 8, 0.125, 72.0)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no scaling_N1.json" in err and "have N = 2, 8" in err and "--nproc-per-node=1" in err
    assert not (tmp_path / "scaling.md").exists()
    # a rank list that does not match the file's N
    _write(tmp_path, 1, 0.8, 10.0)
    f = tmp_path / "scaling_N2.json"
    f.write_text(f.read_text().replace('"N": 2', '"N": 4'))
    assert main(["report", str(tmp_path)]) == 2
    assert "its name says N=2" in capsys.readouterr().err
    r = subprocess.run([sys.executable, "-m", "bench.gpu.scaling", "report", str(tmp_path)], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: ")  # a non-zero exit from the command line


# --------------------------------------------------------------------------------------------
# bench.cost with the measured efficiencies
# --------------------------------------------------------------------------------------------

def test_cost_projection_with_measured_scaling(tmp_path, capsys):
    """One 14-block Table 1 cell at hand-given rates (as tests/test_cost_projection.py): on 8 GPUs with
    fine-tune efficiency 0.8 and sampling 0.9 the wall time is s / (8 e) per data-parallel stage and the
    GPU-h s / e; scoring stays on one rank; one GPU is unchanged."""
    from bench.cost import main as cost
    from bench.gpu.scaling import main

    for n, (t, thr) in MEASURED.items():
        _write(tmp_path / "scaling", n, t, thr)
    assert main(["report", str(tmp_path / "scaling")]) == 0
    capsys.readouterr()
    f = tmp_path / "timings.json"
    f.write_text(json.dumps({"meta": {"device": H100, "device_type": "cuda"}, "records": [
        {"key": "finetune | DiT-XL/2 32px d14 | batch 64 | fp32", "path": "finetune", "precision": "fp32",
         "compile": False, "per_step_s": 0.554},
        {"key": "sample | DiT-XL/2 32px d14 | batch 250 | ddpm cfg | fp32", "path": "sample", "precision": "fp32",
         "compile": False, "per_step_s": 1.328}]}))
    cell = ["experiment=tinyfusion_table1", "+experiment/tinyfusion_table1_cells=shortgpt_d14", "model.vae=null",
            "--timings", str(f), "--precision", "fp32", "--inception-img-s", "2500"]
    scaling = str(tmp_path / "scaling" / "scaling.json")
    assert cost([*cell, "--gpus", "1", "8", "--scaling", scaling, "--out", str(tmp_path / "out")]) == 0
    d = json.loads((tmp_path / "out" / "cost_tinyfusion_table1.json").read_text())
    rows = {n: {r["cell"]: r for r in d["scenarios"][0]["per_gpus"][str(n)]}["shortgpt_d14"] for n in (1, 8)}
    ft, sm, sc = 100_000 * 4 * 0.554 / 3600, 50_000 / 250 * 250 * 1.328 / 3600, 50_000 / 2500 / 3600
    assert (rows[1]["finetune_gpu_h"], rows[1]["sample_gpu_h"], rows[1]["wall_h"]) == \
        pytest.approx((ft, sm, ft + sm + sc))
    assert rows[8]["finetune_gpu_h"] == pytest.approx(ft / 0.8) and rows[8]["sample_gpu_h"] == pytest.approx(sm / 0.9)
    assert rows[8]["score_gpu_h"] == pytest.approx(8 * sc)
    assert rows[8]["wall_h"] == pytest.approx(ft / (8 * 0.8) + sm / (8 * 0.9) + sc)
    assert rows[8]["total_gpu_h"] == pytest.approx(ft / 0.8 + sm / 0.9 + 8 * sc) == \
        pytest.approx(8 * rows[8]["wall_h"])
    assert d["meta"]["scaling"] == scaling
    md = (tmp_path / "out" / "cost_tinyfusion_table1.md").read_text()
    assert "measured data-parallel efficiency" in md and "N=8: fine-tune 80.0 %, sampling 90.0 %" in md

    # a GPU count the measurement lacks is refused, naming the ones it has
    capsys.readouterr()
    assert cost([*cell, "--gpus", "1", "3", "--scaling", scaling, "--out", str(tmp_path / "out3")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no measurement at N = 3" in err and "1, 2, 4, 8" in err
    # without --scaling: the ideal scaling, as before
    assert cost([*cell, "--gpus", "8", "--out", str(tmp_path / "ideal")]) == 0
    d = json.loads((tmp_path / "ideal" / "cost_tinyfusion_table1.json").read_text())
    r8 = {r["cell"]: r for r in d["scenarios"][0]["per_gpus"]["8"]}["shortgpt_d14"]
    assert r8["wall_h"] == pytest.approx((ft + sm) / 8 + sc) and "scaling" not in d["meta"]
