"""The run lifecycle end to end on a tiny model: rows, skipping, resume, bad input."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from bench.api import BenchError
from bench.results import load_rows, run_relpath
from bench.run import execute
from tests.conftest import TINY, comparable, ensure_teacher, run_cli

# Tiny models on one thread: with two per test worker on a 2-core machine, intra-op thread sync made
# diffes_obs' row 5x slower (71 s in the suite, 14 s alone); conftest.one_thread says more.
pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "bench/conf/method").glob("*.yaml")
                 if not p.stem.endswith("_paper"))  # paper-scale twins of tested configs


@pytest.mark.parametrize("method", METHODS)
def test_every_method_config_gives_a_row(method, tiny_cfg):
    """The conformance sweep's last leg: plan -> surgery -> fine-tune -> sample -> score -> row."""
    from tests.test_methods import granularity, load_method
    masks = getattr(load_method(method), "mask_only", False)  # OBS-Diff unstructured / N:M: zeros, dense cost
    keep = 1.0 if method == "dense" or masks else 0.5
    block = granularity(method) == "block"
    cfg = tiny_cfg(method, [f"budget.keep={keep}"] + ([] if block else ["budget.measure=macs"])
                   + (["finetune.steps=0"] if masks else []))
    row = execute(cfg)
    run_dir = Path(cfg["paths"]["results"]) / run_relpath(cfg)
    assert (run_dir / "row.json").exists() and (run_dir / "plan.json").exists()
    assert row.status == "ok" and row.method == method
    if block:
        assert row.keep_blocks <= keep + 1e-9 and row.depth == (4 if keep == 1.0 else 2)
    else:
        assert row.keep_macs <= keep + 1e-9
    assert 0 <= row.metrics["cond_acc"] <= 100 and row.metrics["fd_clf"] >= 0
    assert row.params_M > 0 and row.macs_G > 0 and row.latency_ms > 0 and row.metric_n == 20
    assert row.latency_reps == 2  # TINY: eval.latency.allow_few=true
    assert [w for w in row.warnings if not w.startswith("latency ")] == []  # a busy test machine may flag timings
    df = load_rows(cfg["paths"]["results"])
    assert len(df) == 1 and df.loc[0, "method"] == method


def test_second_run_skips_every_stage(tiny_cfg, capsys):
    cfg = tiny_cfg("magnitude_l1")
    first = execute(cfg)
    capsys.readouterr()
    second = execute(cfg)
    assert "done already" in capsys.readouterr().out
    assert asdict(first) == asdict(second)


def test_run_dir_is_a_pure_function_of_the_config(tiny_cfg):
    a, b = tiny_cfg("shortgpt"), tiny_cfg("shortgpt")
    assert run_relpath(a) == run_relpath(b)
    c = tiny_cfg("shortgpt", ["finetune.lr=1e-3"])
    assert run_relpath(a) != run_relpath(c)
    d = tiny_cfg("shortgpt", ["paths.results=/elsewhere", "progress=true"])  # where/how, not what
    assert run_relpath(a) == run_relpath(d)


@pytest.mark.parametrize("loader", [[], ["+data.workers=1", "+data.hflip=true"]], ids=["main_process", "workers_flips"])
def test_killed_finetune_resumes_to_the_same_row(tmp_path, artifacts, loader):
    """Kill during fine-tuning (after the step-4 checkpoint, before step 6), restart, compare with
    an uninterrupted run: identical quality numbers and measured costs. Also with a DataLoader
    worker and flips (bench.loader's per-step stream)."""
    common = TINY + ["method=sensitivity", "budget.keep=0.5", "finetune.steps=8", "finetune.ckpt_every=2",
                     f"paths.artifacts={artifacts}", *loader]
    ensure_teacher(artifacts, tuple(loader))
    killed = run_cli(common + [f"paths.results={tmp_path / 'a'}"], {"BENCH_TEST_ABORT_AT_STEP": "5"})
    assert killed.returncode == 137, killed.stderr
    assert not list((tmp_path / "a").rglob("row.json"))  # nothing looks finished
    resumed = run_cli(common + [f"paths.results={tmp_path / 'a'}"])
    assert resumed.returncode == 0, resumed.stderr
    log = [json.loads(l) for p in (tmp_path / "a").rglob("log.jsonl") for l in p.read_text().splitlines()]
    assert any(e["event"] == "finetune_resume" and e["step"] == 4 for e in log)
    # uninterrupted reference, same config (so the same artifacts dir: remove its fine-tune output first)
    ref_art = tmp_path / "art_ref"
    import shutil
    shutil.copytree(artifacts / "teachers", ref_art / "teachers")
    shutil.copytree(artifacts / "classifiers", ref_art / "classifiers")
    ref = run_cli(TINY + ["method=sensitivity", "budget.keep=0.5", "finetune.steps=8", "finetune.ckpt_every=2",
                          f"paths.artifacts={ref_art}", f"paths.results={tmp_path / 'b'}", *loader])
    assert ref.returncode == 0, ref.stderr
    ra = json.loads(next((tmp_path / "a").rglob("row.json")).read_text())
    rb = json.loads(next((tmp_path / "b").rglob("row.json")).read_text())
    assert comparable(ra) == comparable(rb)


def test_unknown_method_lists_the_available_ones(tmp_path):
    r = run_cli(["method=no_such_method", f"paths.results={tmp_path}", f"paths.artifacts={tmp_path}"])
    assert r.returncode != 0
    assert "no_such_method" in r.stderr and "shortgpt" in r.stderr and "dense" in r.stderr
    assert not list(tmp_path.rglob("row.json"))


@pytest.mark.parametrize("keep", ["1.5", "0", "-0.2"])
def test_budget_outside_unit_interval_stops_early(tmp_path, keep):
    r = run_cli(TINY + ["method=shortgpt", f"budget.keep={keep}", f"paths.results={tmp_path / 'r'}",
                        f"paths.artifacts={tmp_path / 'a'}"])
    assert r.returncode == 2
    assert "outside (0, 1]" in r.stderr and len(r.stderr.strip().splitlines()) <= 3
    assert not (tmp_path / "r").exists()


def test_unmeetable_budget_stops_with_a_clear_message(tiny_cfg):
    cfg = tiny_cfg("shortgpt", ["budget.measure=macs", "budget.keep=0.01"])
    with pytest.raises(BenchError, match="cannot be met"):
        execute(cfg)
    assert not Path(cfg["paths"]["results"]).exists()  # refused before anything is written


def test_fewer_than_20_latency_reps_need_allow_few(tiny_cfg):
    cfg = tiny_cfg("dense", ["budget.keep=1.0", "eval.latency.allow_few=false"])  # TINY times 2 calls
    with pytest.raises(BenchError, match=r"eval.latency.reps=2: the latency protocol times at least 20 calls.*eval.latency.allow_few=true"):
        execute(cfg)
    assert not Path(cfg["paths"]["results"]).exists()
    from tests.conftest import compose
    lat = compose([])["eval"]["latency"]
    assert lat["reps"] >= 20 and lat["allow_few"] is False  # the default suite times >= 20 calls


def test_a_failed_run_records_its_cost(tiny_cfg):
    cfg = tiny_cfg("dense", ["budget.keep=0.5"])  # passes the early checks, dense.plan() refuses it
    with pytest.raises(BenchError, match="1.0"):
        execute(cfg)
    err = json.loads((Path(cfg["paths"]["results"]) / run_relpath(cfg) / "error.json").read_text())
    assert err["status"] == "failed" and {"teacher", "unfinished"} <= set(err["wall_s"])
    assert err["n_devices"] == 1
    assert err["device_hours"] == pytest.approx(sum(err["wall_s"].values()) / 3600, rel=1e-2, abs=1e-6)
    df = load_rows(cfg["paths"]["results"])
    assert df.loc[0, "status"] == "failed" and df.loc[0, "device_hours"] >= 0


def test_devices_held(monkeypatch):
    from bench.results import devices_held
    for k in ("SLURM_JOB_ID", "SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS"):
        monkeypatch.delenv(k, raising=False)
    assert devices_held("cpu") == devices_held("cuda") == devices_held("cuda:1") == 1  # one device per run
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    assert devices_held("cuda") == 1  # SLURM without a GPU allocation in the environment
    monkeypatch.setenv("SLURM_JOB_GPUS", "0,3")
    assert devices_held("cuda") == 2 and devices_held("cpu") == 1
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "4")
    assert devices_held("cuda:0") == 4  # the job holds (and pays for) all it was given


def test_old_rows_load_without_latency_reps_and_warnings(tiny_cfg):
    from bench.results import Row
    row = execute(tiny_cfg("first_k"))
    old = asdict(row)
    old.pop("latency_reps"), old.pop("warnings")
    back = Row(**old)
    assert back.latency_reps == 0 and back.warnings == []


def test_dense_rejects_a_pruning_budget(tiny_cfg):
    with pytest.raises(BenchError, match="1.0"):
        execute(tiny_cfg("dense", ["budget.keep=0.5"]))


def test_nan_loss_stops_the_fine_tune(tmp_path):
    from bench.data import TensorDataset
    from bench.finetune import FinetuneConfig, finetune
    from bench.models import build

    net = build("DiT-T/2", input_size=8, in_channels=1, num_classes=10)
    bad = TensorDataset(torch.full((8, 1, 8, 8), float("nan")), torch.zeros(8, dtype=torch.long), 10, "nan")
    with pytest.raises(BenchError, match="lower finetune.lr"):
        finetune(net, bad, FinetuneConfig(steps=3, batch=4), tmp_path / "ft")


@pytest.mark.parametrize("method", ["diff_pruning", "ld_pruner"])
def test_unet_width_and_operator_runs_give_rows(method, tmp_path, artifacts):
    """The whole spine on the U-Net backbone (diffusers UNet2DModel): its own teacher, Torch-Pruning
    surgery through the DependencyGraph (or operator removal), fine-tune, sample, score, row."""
    from tests.conftest import compose
    keep = 0.85 if method == "ld_pruner" else 0.6  # LD-Pruner bypasses only shape-preserving operators
    over = [o for o in TINY if not o.startswith("model=")] + [
        "model=unet_tiny", "budget.measure=macs", f"budget.keep={keep}",
        f"paths.results={tmp_path / 'runs'}", f"paths.artifacts={artifacts}"]
    row = execute(compose(over, method))
    assert row.status == "ok" and row.model.startswith("UNet") and row.depth == 0
    assert row.keep_macs <= keep + 1e-9 and row.keep_params < 1.0
    assert 0 <= row.metrics["cond_acc"] <= 100 and row.latency_ms > 0


def test_mask_only_methods_refuse_a_fine_tune_or_a_budget(tiny_cfg):
    """OBS-Diff unstructured / N:M give zeros (no shape change): a fine-tune would refill them and a
    budget below 1 cannot be met by the dense-cost model, so both stop before the run dir exists."""
    for over in (["budget.keep=1.0", "budget.measure=macs"], ["budget.keep=0.5", "budget.measure=macs", "finetune.steps=0"]):
        cfg = tiny_cfg("obs_diff_nm", over)
        with pytest.raises(BenchError, match="finetune=none budget.keep=1.0"):
            execute(cfg)
        assert not (Path(cfg["paths"]["results"]) / run_relpath(cfg)).exists()


def test_adaptive_sampler_row_records_the_measured_nfe(tiny_cfg, capsys):
    """SiT's default ODE (dopri5) picks its own steps: the row's nfe is the count measured while
    sampling, kept with the shards (so a run resumed after sampling, which draws nothing, reports it)."""
    from bench.sample import mean_nfe
    from bench.shards import SampleShards

    cfg = tiny_cfg("dense", ["model=sit_digits", "model.name=SiT-T/2", "eval.sampler=dopri5", "budget.keep=1.0",
                             "finetune.steps=0", "eval.ssim_teacher=false"])
    row = execute(cfg)
    shards = SampleShards.open(Path(cfg["paths"]["artifacts"]) / "runs" / run_relpath(cfg) / "samples")
    per_shard = [(torch.load(shards.path(lo, hi), weights_only=True)["nfe"], hi - lo) for lo, hi in shards.ranges()]
    assert row.sampler == "dopri5" and row.nfe > 12  # > 6 evaluations, x2 for CFG's null rows
    assert row.nfe == shards.nfe() == mean_nfe([sum(m * k for m, k in per_shard) / shards.n])
    assert "sampling 20 of 20" in capsys.readouterr().out
    (Path(cfg["paths"]["results"]) / run_relpath(cfg) / "row.json").unlink()  # score and time again, samples kept
    again = execute(cfg)
    assert "sampling" not in capsys.readouterr().out and again.nfe == row.nfe


def test_the_ema_update_is_the_per_weight_average_value_for_value():
    """bench.finetune._ema_update (multi-tensor) gives exactly decay * ema + (1 - decay) * model for
    every weight, as the per-weight loop it replaced did."""
    import copy

    import torch

    from bench.finetune import _ema_update

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.LayerNorm(13), torch.nn.Linear(13, 3))
    ema = copy.deepcopy(model)
    for p in model.parameters():
        p.data.add_(torch.randn_like(p))
    want = [pe.detach().clone().mul_(0.9993).add_(pm.detach(), alpha=1 - 0.9993)
            for pe, pm in zip(ema.parameters(), model.parameters())]
    _ema_update(ema, model, 0.9993)
    assert all(torch.equal(pe, w) for pe, w in zip(ema.parameters(), want))
    assert not any(p.grad is not None for p in ema.parameters())
