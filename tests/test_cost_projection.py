"""bench.cost: the projection of an experiment's GPU-hours before it runs (issue 13 item 5).

The sweep gives the experiment's cells; a --measure projection on the CPU runs end to end and its
hours are its per-step times times its step counts; --timings from a file gives hand-computed
totals (the issue's H200 figures give its 62 + 18 GPU-h for a 14-block Table 1 cell); a bad
override is one line and exit status 2."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")

TABLE1 = ["dense_d28", "shortgpt_d19", "shortgpt_d14", "flux_lite_d14", "sensitivity_d14", "tinyfusion_d14",
          "tinyfusion_kd_d14", "diff_pruning_p50"]
# a tiny default suite: two methods at one budget, short everything
TINY_SUITE = ["experiment=default_suite", "model=dit_tiny", "method=shortgpt,tinyfusion", "budget.keep=0.5",
              "finetune.batch=8", "eval.n=16", "eval.batch=8", "eval.steps=5", "teacher.steps=50"]
SG, TF = "shortgpt budget.keep=0.5", "tinyfusion budget.keep=0.5"  # the cells' names


def _cost(args: list[str]) -> int:
    from bench.cost import main
    return main(args)


def _load(out, experiment: str) -> dict:
    return json.loads((out / f"cost_{experiment}.json").read_text())


def _rows(d: dict, n: int, scenario: int = 0) -> dict:
    return {r["cell"]: r for r in d["scenarios"][scenario]["per_gpus"][str(n)]}


def _stages(d: dict, scenario: int = 0) -> dict:
    sc = d["scenarios"][scenario]
    return {r["cell"]: r["stages"] for r in sc["rows"] + sc["shared"]}


# --------------------------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------------------------

def test_sweep_gives_tinyfusion_table1_cells(monkeypatch):
    from bench.cost import expand

    monkeypatch.delenv("DIT_XL2_CKPT", raising=False)  # the checkpoint need not exist
    name, cells = expand(["experiment=tinyfusion_table1"])
    assert name == "tinyfusion_table1"
    assert [c.label for c in cells] == TABLE1
    assert [c.cfg["method_name"] for c in cells] == ["dense", "shortgpt_tinyfusion", "shortgpt_tinyfusion", "flux_lite",
                                                     "sensitivity", "tinyfusion", "tinyfusion_kd", "diff_pruning"]
    assert [c.cfg["budget"]["keep"] for c in cells][:3] == [1.0, pytest.approx(19 / 28), 0.5]
    assert cells[-1].cfg["budget"]["measure"] == "params"
    assert [c.cfg["finetune"]["steps"] for c in cells] == [0] + [100000] * 7
    assert all(c.cfg["model"]["name"] == "DiT-XL/2" for c in cells)
    # the command line wins over the experiment's list for the same key (hydra's BasicSweeper)
    _, one = expand(["experiment=tinyfusion_table1", "+experiment/tinyfusion_table1_cells=tinyfusion_kd_d14"])
    assert [c.cfg["method_name"] for c in one] == ["tinyfusion_kd"] and one[0].cfg["method"]["steps"] == 10000


def test_sweep_gives_default_suite_method_x_budget_cells():
    from bench.cost import expand

    _, cells = expand(["experiment=default_suite"])
    assert len(cells) == 12 * 2
    assert {(c.cfg["method_name"], c.cfg["budget"]["keep"]) for c in cells} == {
        (m, k) for m in ("magnitude_l1", "magnitude_l2", "shortgpt", "flux_lite", "sensitivity", "first_k", "last_k",
                         "stride", "entpruner", "entpruner_oneshot", "diffes", "tinyfusion") for k in (0.75, 0.5)}
    assert len({c.label for c in cells}) == 24 and SG in {c.label for c in cells}
    _, fewer = expand(["experiment=default_suite", "method=shortgpt,tinyfusion", "budget.keep=0.5"])
    assert [c.label for c in fewer] == [SG, TF]  # named by the experiment's swept keys, also when fixed


# --------------------------------------------------------------------------------------------
# --measure on the CPU, then --timings from its own output
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    out = tmp_path_factory.mktemp("cost")
    steps = 40
    assert _cost([*TINY_SUITE, f"finetune.steps={steps}", "--measure", "--gpus", "1", "4", "--out", str(out)]) == 0
    return out, steps


def test_measure_projection_runs_end_to_end_and_adds_up(measured):
    out, steps = measured
    d = _load(out, "default_suite")
    assert d["complete"] and (out / "cost_default_suite.md").is_file()
    md = (out / "cost_default_suite.md").read_text()
    assert "| shortgpt " in md and "| tinyfusion " in md and "## Assumptions" in md
    per = {r["key"]: r["per_step_s"] for r in d["records"]}
    assert all(r["source"].startswith("measured on cpu") and r["per_step_s"] > 0 for r in d["records"])
    st = _stages(d)
    # fine-tune: steps x per-step (batch 8 is below the micro-batch: timed as is)
    ft = st[SG]["finetune"]
    assert ft["key"] == "finetune | DiT-T/2 8px d2 | batch 8 | fp32" and ft["count"] == steps
    assert ft["s"] == pytest.approx(steps * per[ft["key"]])
    # sampling: 16 samples in batches of 8, 5 sampler steps each
    sm = st[SG]["sample"]
    assert sm["key"] == "sample | DiT-T/2 8px d2 | batch 8 | ddpm cfg | fp32"
    assert sm["s"] == pytest.approx(16 / 8 * 5 * per[sm["key"]])
    # TinyFusion's own phase: method.steps (100) at method.batch (32) on the dense 4-block model
    me = st[TF]["method"]
    assert "| DiT-T/2 8px d4 (dense) | batch 32 |" in me["key"] and me["s"] == pytest.approx(100 * per[me["key"]])
    assert st[SG]["method"] is None
    # the teacher is trained here (model.ckpt null) and its reference samples are drawn once: shared rows
    assert st["shared: teacher"]["finetune"]["s"] == pytest.approx(50 * per[st["shared: teacher"]["finetune"]["key"]])
    assert st["shared: teacher samples"]["sample"]["key"].startswith("sample | DiT-T/2 8px d4 (dense)")
    # GPU-h and wall hours at N = 1 and 4: fine-tune and sampling data-parallel, the method phase on one rank
    one, four = _rows(d, 1), _rows(d, 4)
    r1, r4 = one[TF], four[TF]
    ft_s, sm_s, me_s = st[TF]["finetune"]["s"], st[TF]["sample"]["s"], me["s"]
    assert r1["finetune_gpu_h"] == pytest.approx(ft_s / 3600) == pytest.approx(r4["finetune_gpu_h"])
    assert r1["sample_gpu_h"] == pytest.approx(sm_s / 3600) == pytest.approx(r4["sample_gpu_h"])
    assert r1["method_gpu_h"] == pytest.approx(me_s / 3600) and r4["method_gpu_h"] == pytest.approx(4 * me_s / 3600)
    assert r1["wall_h"] == pytest.approx(r1["total_gpu_h"]) == pytest.approx((ft_s + sm_s + me_s) / 3600)
    assert r4["wall_h"] == pytest.approx(((ft_s + sm_s) / 4 + me_s) / 3600)
    assert r4["total_gpu_h"] == pytest.approx(4 * r4["wall_h"])


def test_timings_from_own_output_double_steps_double_hours(measured, tmp_path):
    out, steps = measured
    src = out / "cost_default_suite.json"
    assert _cost([*TINY_SUITE, f"finetune.steps={2 * steps}", "--timings", str(src), "--gpus", "1", "4",
                  "--out", str(tmp_path)]) == 0
    a, b = _load(out, "default_suite"), _load(tmp_path, "default_suite")
    for n in (1, 4):
        ra, rb = _rows(a, n), _rows(b, n)
        for cell in (SG, TF):
            assert rb[cell]["finetune_gpu_h"] == pytest.approx(2 * ra[cell]["finetune_gpu_h"])
            assert rb[cell]["sample_gpu_h"] == pytest.approx(ra[cell]["sample_gpu_h"])
            assert rb[cell]["method_gpu_h"] == pytest.approx(ra[cell]["method_gpu_h"])
    # a micro-batch below the fine-tune batch: timed at 4 (a key the file lacks: scaled from batch 8 by
    # MACs, x0.5) and counted twice per step, so the hours stay the same
    small = tmp_path / "micro"
    assert _cost([*TINY_SUITE, f"finetune.steps={steps}", "--timings", str(src), "--micro-batch", "4",
                  "--out", str(small)]) == 0
    c = _load(small, "default_suite")
    ft = _stages(c)[SG]["finetune"]
    assert ft["key"] == "finetune | DiT-T/2 8px d2 | batch 4 | fp32" and ft["count"] == 2 * steps
    assert _rows(c, 1)[SG]["finetune_gpu_h"] == pytest.approx(_rows(a, 1)[SG]["finetune_gpu_h"])
    assert "scaled from 'finetune | DiT-T/2 8px d2 | batch 8 | fp32' by forward-equivalent MACs x0.5" in \
        {s["key"]: s for s in c["scenarios"][0]["steps"]}[ft["key"]]["source"]


# --------------------------------------------------------------------------------------------
# --timings from a hand-written file: the H200 figures
# --------------------------------------------------------------------------------------------

def _xl2_macs(depth: int) -> int:
    import torch

    from bench import surgery
    from bench.models import build

    with torch.device("meta"):
        return int(surgery.measure(build("DiT-XL/2", input_size=32, in_channels=4, num_classes=1000,
                                         depth=depth))["macs"])


def test_timings_file_gives_hand_computed_hours(tmp_path):
    """One 14-block cell of TinyFusion Table 1 at the issue's fp32 rates (fine-tune 0.554 s a batch-64
    step, sampler 1.328 s a 250-sample step): 100,000 x 256/64 x 0.554 s = 61.6 GPU-h of fine-tune and
    50,000/250 x 250 x 1.328 s = 18.4 of sampling ("about 62 ... and 18")."""
    f = tmp_path / "h200.json"
    f.write_text(json.dumps({"meta": {"device": "NVIDIA H200", "device_type": "cuda"}, "records": [
        {"key": "finetune | DiT-XL/2 32px d14 | batch 64 | fp32", "path": "finetune", "precision": "fp32",
         "compile": False, "per_step_s": 0.554},
        {"key": "sample | DiT-XL/2 32px d14 | batch 250 | ddpm cfg | fp32", "path": "sample", "precision": "fp32",
         "compile": False, "per_step_s": 1.328}]}))
    cell = ["experiment=tinyfusion_table1", "+experiment/tinyfusion_table1_cells=shortgpt_d14", "model.vae=null"]
    assert _cost([*cell, "--timings", str(f), "--precision", "fp32", "--gpus", "1", "8", "--inception-img-s", "2500",
                  "--out", str(tmp_path)]) == 0
    d = _load(tmp_path, "tinyfusion_table1")
    ft, sm, sc = 100_000 * 4 * 0.554 / 3600, 50_000 / 250 * 250 * 1.328 / 3600, 50_000 / 2500 / 3600
    r1, r8 = _rows(d, 1)["shortgpt_d14"], _rows(d, 8)["shortgpt_d14"]
    assert (r1["finetune_gpu_h"], r1["sample_gpu_h"], r1["score_gpu_h"]) == pytest.approx((ft, sm, sc))
    assert round(ft) == 62 and round(sm) == 18
    assert r1["total_gpu_h"] == pytest.approx(ft + sm + sc) == pytest.approx(r1["wall_h"])
    assert r8["wall_h"] == pytest.approx((ft + sm) / 8 + sc)
    assert r8["total_gpu_h"] == pytest.approx(ft + sm + 8 * sc) == pytest.approx(8 * r8["wall_h"])

    # a shape the file lacks is scaled by forward-equivalent MACs: the dense sampler at batch 256
    # (a 512-image forward) for the 14-block model at batch 250 (a 500-image forward)
    g = tmp_path / "dense.json"
    recs = json.loads(f.read_text())["records"][:1] + [
        {"path": "sample", "precision": "fp32", "compile": False, "per_step_s": 2.719, "model": "DiT-XL/2",
         "depth": 28, "batch": 256, "work_macs": 512 * _xl2_macs(28)}]
    g.write_text(json.dumps({"meta": {"device": "NVIDIA H200"}, "records": recs}))
    out = tmp_path / "scaled"
    assert _cost([*cell, "--timings", str(g), "--precision", "fp32", "--gpus", "1", "--inception-img-s", "2500",
                  "--out", str(out)]) == 0
    per = 2.719 * (500 * _xl2_macs(14)) / (512 * _xl2_macs(28))
    assert _rows(_load(out, "tinyfusion_table1"), 1)["shortgpt_d14"]["sample_gpu_h"] == \
        pytest.approx(200 * 250 * per / 3600)


def test_paths_speed_file_before_macs_is_read(tmp_path):
    """results/gpu/paths_speed/paths_speed.json (H100) predates the MACs fields: its records are
    paths_speed's DiT-XL/2 shape (dense sampler, `depth`-block fine-tune), measured on the meta device."""
    f = tmp_path / "old.json"
    f.write_text(json.dumps({"meta": {"model": "DiT-XL/2", "device": "NVIDIA H100 80GB HBM3"}, "records": [
        {"path": "sample", "precision": "fp32", "compile": False, "per_step_s": 2.775, "steps": [3, 9], "n": 256,
         "forward_batch": 512},
        {"path": "finetune", "precision": "fp32", "compile": False, "per_step_s": 0.5611, "steps": [4, 14],
         "batch": 64, "depth": 14}]}))
    assert _cost(["experiment=tinyfusion_table1", "+experiment/tinyfusion_table1_cells=shortgpt_d14", "model.vae=null",
                  "--timings", str(f), "--precision", "fp32", "--gpus", "1", "--inception-img-s", "2500",
                  "--out", str(tmp_path)]) == 0
    r = _rows(_load(tmp_path, "tinyfusion_table1"), 1)["shortgpt_d14"]
    assert r["finetune_gpu_h"] == pytest.approx(100_000 * 4 * 0.5611 / 3600)  # the same shape and batch: x1
    per = 2.775 * (500 * _xl2_macs(14)) / (512 * _xl2_macs(28))
    assert r["sample_gpu_h"] == pytest.approx(200 * 250 * per / 3600)


def test_timings_file_without_a_precision_names_the_fix(tmp_path, capsys):
    f = tmp_path / "t.json"
    f.write_text(json.dumps({"meta": {"device": "NVIDIA H200"}, "records": [
        {"path": "finetune", "precision": "fp32", "compile": False, "per_step_s": 0.5, "work_macs": 1e12}]}))
    assert _cost(["experiment=tinyfusion_table1", "+experiment/tinyfusion_table1_cells=shortgpt_d14",
                  "--timings", str(f), "--precision", "bf16", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "at bf16" in err and "--measure" in err and "\n" not in err


def test_paths_speed_records_are_a_timings_file(tmp_path):
    """bench.gpu.paths_speed times through the same helpers (bench.steptime); its JSON projects an
    experiment (every key scaled from its records by MACs)."""
    from bench.gpu import paths_speed as ps
    from bench.metrics.cost import device_name

    net = ps._net(ps.SMOKE, None, "cpu")
    recs = [ps.sample_step_s(net, ps.SMOKE, "cpu", "fp32", False), ps.finetune_step_s(ps.SMOKE, "cpu", "fp32", False)]
    assert {r["path"] for r in recs} == {"sample", "finetune"} and all(r["work_macs"] > 0 for r in recs)
    f = tmp_path / "paths_speed.json"
    f.write_text(json.dumps({"meta": {"device": device_name("cpu"), "device_type": "cpu"}, "records": recs}))
    assert _cost([*TINY_SUITE, "finetune.steps=10", "--timings", str(f), "--out", str(tmp_path)]) == 0
    d = _load(tmp_path, "default_suite")
    steps = {s["key"]: s for s in d["scenarios"][0]["steps"]}
    assert all("scaled from" in s["source"] for s in steps.values())
    ft = _stages(d)[SG]["finetune"]
    ref = recs[1]
    want = ref["per_step_s"] * 8 * 3 * d["scenarios"][0]["rows"][0]["macs_G"] * 1e9 / ref["work_macs"]
    assert ft["per_step_s"] == pytest.approx(want) and ft["s"] == pytest.approx(10 * want)


def test_measure_budget_spent_before_any_timing_names_the_fix(tmp_path, capsys):
    assert _cost([*TINY_SUITE, "--measure", "--budget-s", "0", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert any("not timed" in ln for ln in err)
    assert err[-1].startswith("error: measured on cpu") and "raise --budget-s" in err[-1]


def test_out_of_memory_times_a_smaller_batch_and_scales_it(monkeypatch):
    import types

    import torch

    from bench import cost

    def fake(need, net, dense, device, batch):
        if batch > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return {"per_step_s": 0.5 * batch, "warmup_s": 0.0, "work_macs": 10.0 * batch}

    monkeypatch.setattr(cost, "_time", fake)
    rec = cost._time_fitting(types.SimpleNamespace(batch=8, key="k"), None, None, "cpu", log=lambda m: None)
    assert rec["timed_batch"] == 2 and rec["batch"] == 8 and rec["measured_per_step_s"] == 1.0
    assert rec["per_step_s"] == 4.0 and rec["work_macs"] == 80.0


def test_width_cell_without_torch_pruning_is_projected_block_equivalent(monkeypatch):
    import sys as _sys

    from bench import surgery
    from bench.api import Budget
    from bench.cost import Shapes
    from tests.conftest import compose

    cfg = compose(["model=dit_digits"], "diff_pruning")
    with_tp, _ = Shapes().for_cell(cfg, "width", Budget("macs", 0.5))
    assert with_tp.label == "width macs 0.5" and with_tp.plan.granularity == "width"
    monkeypatch.setitem(_sys.modules, "torch_pruning", None)  # import torch_pruning raises ImportError
    shapes = Shapes()
    shape, note = shapes.for_cell(cfg, "width", Budget("macs", 0.5))
    n = surgery.blocks_to_keep(shapes.dense(cfg["model"])[0], Budget("macs", 0.5))
    assert shape.label == f"d{n}" and n < 8 and "torch-pruning" in note and "block-pruned" in note


# --------------------------------------------------------------------------------------------
# Bad input: one line, exit 2
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,names", [
    (["experiment=no_such_experiment"], "no_such_experiment"),
    (["experiment=default_suite", "finetune.stepz=3"], "finetune.stepz"),
    (["experiment=default_suite", "budget.keep=2"], "budget.keep"),
    (["experiment=default_suite", "method=no_such_method"], "no_such_method"),
])
def test_bad_override_is_one_line(args, names, tmp_path, capsys):
    assert _cost([*args, "--timings", str(tmp_path / "none.json"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and names in err and "\n" not in err and "Traceback" not in err


def test_bad_override_on_the_command_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "bench.cost", "experiment=tinyfusion_table1", "eval.stepz=3",
                        "--timings", str(tmp_path / "none.json"), "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip() and "cpp_extension" not in ln]
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "eval.stepz" in lines[0]
    assert "Traceback" not in p.stderr
