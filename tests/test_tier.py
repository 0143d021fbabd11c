"""The GPU tier (experiment=gpu_tier / gpu_tier_width): what it sweeps, its protocol, and one row run
end to end on the CPU on a shrunk model and a small Fashion-MNIST-shaped folder, through the tier's
own data path (IDX files, padding) and scoring (Inception FID/KID/P/R)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_configs import check_run_config, hydra_compose, sweep_points
from tests.test_data import write_fmnist

pytestmark = pytest.mark.usefixtures("one_thread")

DEPTH = {"diffes", "entpruner", "entpruner_oneshot", "first_k", "flux_lite", "last_k", "magnitude_l1", "magnitude_l2",
         "random", "sensitivity", "shortgpt", "stride", "tinyfusion"}
WIDTH = {"diff_pruning", "grad_flow", "ld_pruner", "magnitude_width", "magnitude_width_l2", "obs_diff", "random_width",
         "taylor_width"}


def test_the_tier_sweeps_every_method_at_two_budgets_and_three_seeds():
    from bench.registry import names, tagged

    for exp, methods, measure in (("gpu_tier", DEPTH, "blocks"), ("gpu_tier_width", WIDTH, "macs")):
        d, sweep = hydra_compose([f"experiment={exp}"])
        assert set(sweep["method"].split(",")) == methods
        assert sweep["budget.keep"] == "0.75,0.5" and sweep["seed"] == "0,1,2" and d["budget"]["measure"] == measure
        assert d["budget"].get("round_to") == (8 if measure == "macs" else None)  # width: channels in multiples of 8
        assert len(sweep_points(sweep)) == len(methods) * 6
        assert d["model"]["name"] == "DiT-D28/2" and d["data"]["kind"] == "fashion_mnist" and d["device"] == "cuda"
        assert (d["eval"]["n"], d["eval"]["sampler"], d["eval"]["steps"], d["eval"]["cfg_scale"]) == (10000, "ddim", 20, 1.0)
        assert d["eval"]["inception"]["ref_split"] == "test" and d["eval"]["latency"]["dtype"] == "bf16"
        assert (d["finetune"]["steps"], d["finetune"]["batch"], d["finetune"]["precision"]) == (300, 128, "bf16")
        assert (d["teacher"]["steps"], d["teacher"]["batch"], d["teacher"]["compile"]) == (9500, 256, True)
    # every method of the default suites is in the tier, nothing else but dense (its own line, 3 seeds)
    default = set(tagged("default_suite") + tagged("default_suite_random") + tagged("default_suite_width")
                  + tagged("default_suite_width_random"))
    assert DEPTH | WIDTH == default and "dense" in names()
    d, sweep = hydra_compose(["experiment=gpu_tier", "method=dense", "budget.keep=1.0"])
    assert d["method_name"] == "dense" and d["budget"]["keep"] == 1.0 and sweep["seed"] == "0,1,2"
    # a width method's point passes the run's own checks on the tier model (MAC budget)
    d, _ = hydra_compose(["experiment=gpu_tier_width", "method=magnitude_width", "budget.keep=0.5", "seed=2"])
    check_run_config(d)
    assert d["method"]["round_to"] == 8  # the budget's channel multiple reaches the method
    assert hydra_compose(["experiment=default_suite_width", "method=magnitude_width"])[0]["method"]["round_to"] == 1


@pytest.mark.filterwarnings("ignore:Inception metrics from n=4", "ignore:invalid value encountered")  # 4 samples: FID biased, KID bootstrap NaN
def test_one_tier_row_runs_end_to_end_on_a_shrunk_model(tmp_path):
    from bench.results import load_rows
    from bench.run import execute

    root = write_fmnist(tmp_path / "fm", n_train=64, n_test=6)
    over = ["experiment=gpu_tier", "method=shortgpt", "seed=1", "device=cpu", f"data.root={root}", "data.verify=false",
            "+model.depth=2", "+model.hidden_size=32", "+model.num_heads=2",  # the shrink
            "teacher.steps=4", "teacher.batch=8", "teacher.compile=false", "teacher.precision=fp32",
            "finetune.steps=2", "finetune.batch=8", "finetune.precision=fp32", "eval.precision=fp32",
            "eval.n=4", "eval.batch=4", "eval.steps=2", "eval.inception.bootstrap=4", "eval.inception.kid_subsets=4",
            "eval.latency.batch=2", "eval.latency.reps=2", "eval.latency.warmup=1", "eval.latency.allow_few=true",
            "calib.n=16", "calib.bins=4", f"paths.results={tmp_path / 'runs'}", f"paths.artifacts={tmp_path / 'art'}"]
    d, _ = hydra_compose(over)
    row = execute(d)
    assert row.dataset == "fashion-mnist" and row.model == "DiT-D28/2" and row.depth == 1 and row.keep_blocks == 0.5
    assert (row.sampler, row.nfe, row.finetune_steps, row.latency_dtype) == ("ddim", 2, 2, "bf16")
    assert row.fid_n == 4 and row.fid_ref == "fashion-mnist-test-32px-n6" and row.fid_impl.startswith("adm-pt/")
    assert {"fid", "kid", "precision", "recall", "fid_ci_lo", "fid_ci_hi"} <= set(row.metrics)
    assert row.metrics["fid"] > 0 and row.metrics["fid_ci_lo"] <= row.metrics["fid"] <= row.metrics["fid_ci_hi"]
    df = load_rows(tmp_path / "runs")
    assert len(df) == 1 and Path(df["path"][0]).name.startswith("blocks0.5-s1-cpu-")
    from bench.io import sha256_file
    from bench.run import teacher_weights
    assert teacher_weights(d).parent.parent == tmp_path / "art" / "teachers"  # the teacher trained here
    assert row.teacher_sha256 == sha256_file(teacher_weights(d))  # names the weights, not only their config


def test_the_teacher_travels_in_checked_parts(tmp_path, monkeypatch):
    """export-teacher splits final.pt into parts (each below the 16 MiB a GPU call returns per file) and
    records its sha256 in teacher.json; import-teacher joins them into the tier's teacher folder only
    when the sha256 matches, and refuses a teacher.json made for another config."""
    import json

    from bench.api import BenchError
    from bench.gpu import tier

    monkeypatch.setenv("BENCH_ARTIFACTS", str(tmp_path / "art"))
    monkeypatch.setattr(tier, "TEACHER_JSON", tmp_path / "results" / "teacher.json")
    monkeypatch.setattr(tier, "PART_BYTES", 1000)
    tdir = tier.teacher_dir()
    assert tdir.parent == tmp_path / "art" / "teachers" and len(tdir.name) == 16
    weights = bytes(range(256)) * 10  # 2,560 bytes -> 3 parts
    tdir.mkdir(parents=True)
    (tdir / "final.pt").write_bytes(weights)
    rec = tier.export_teacher(tmp_path / "out")
    assert [p["bytes"] for p in rec["parts"]] == [1000, 1000, 560] and rec["folder"] == f"teachers/{tdir.name}"
    assert json.loads((tmp_path / "results" / "teacher.json").read_text())["sha256"] == rec["sha256"]
    assert rec["config"]["model"]["name"] == "DiT-D28/2" and rec["config"]["teacher"]["steps"] == 9500
    assert tier.export_teacher(tmp_path / "out", if_new=True) is None  # recorded already: nothing to send
    (tdir / "final.pt").unlink()
    assert tier.import_teacher(tmp_path / "none") is None
    (tmp_path / "out" / "teacher.part-01").write_bytes(b"x" * 1000)  # a damaged part
    with pytest.raises(BenchError, match="do not give the sha256"):
        tier.import_teacher(tmp_path / "out")
    assert not (tdir / "final.pt").exists()
    (tmp_path / "out" / "teacher.part-01").write_bytes(weights[1000:2000])
    assert tier.import_teacher(tmp_path / "out") == tdir / "final.pt" and (tdir / "final.pt").read_bytes() == weights
    (tdir / "final.pt").unlink()
    tier.TEACHER_JSON.write_text(json.dumps({**rec, "folder": "teachers/0123456789abcdef"}))
    with pytest.raises(BenchError, match="config changed since it was trained"):
        tier.import_teacher(tmp_path / "out")


def _resume_point(step: int):
    import torch

    net = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    for _ in range(3):
        net(torch.randn(8, 64)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return {"step": step, "model": net.state_dict(), "ema": net.state_dict(), "opt": opt.state_dict(),
            "kept_blocks": list(range(4)), "callback": None, "plans": []}


def test_a_teacher_cut_short_comes_back_as_its_resume_point(tmp_path, monkeypatch):
    """A session whose GPU time ends between the teacher's two calls keeps its steps: export-resume packs a
    compact last.pt (when there is no final.pt) small enough to come back and to travel, import-resume
    restores it on the next machine, checked, and never over a teacher or a resume point further along."""
    import torch

    from bench.api import BenchError
    from bench.gpu import tier

    monkeypatch.setenv("BENCH_ARTIFACTS", str(tmp_path / "art"))
    monkeypatch.setattr(tier, "PART_BYTES", 10_000)
    tdir = tier.teacher_dir()
    assert tier.export_resume(tmp_path / "out") is None  # not started
    tdir.mkdir(parents=True)
    state = _resume_point(4000)
    torch.save(state, tdir / "last.pt")
    full = (tdir / "last.pt").stat().st_size
    rec = tier.export_resume(tmp_path / "out")
    assert rec["step"] == 4000 and len(rec["parts"]) > 1 and rec["folder"] == f"teachers/{tdir.name}"
    assert rec["bytes"] < 0.7 * full  # weights + EMA + bf16 second moment of 4 fp32 tensors' worth
    (tdir / "last.pt").unlink()  # a fresh machine
    good = (tmp_path / "out" / "teacher-resume.part-01").read_bytes()
    (tmp_path / "out" / "teacher-resume.part-01").write_bytes(b"x")  # damaged in transit
    with pytest.raises(BenchError, match="do not give the sha256"):
        tier.import_resume(tmp_path / "out")
    (tmp_path / "out" / "teacher-resume.part-01").write_bytes(good)
    assert tier.import_resume(tmp_path / "out") == tdir / "last.pt"
    got = torch.load(tdir / "last.pt", weights_only=False)
    assert got["step"] == 4000 and "compact" not in got and got["kept_blocks"] == [0, 1, 2, 3]
    assert all(torch.equal(got["model"][k], v) and torch.equal(got["ema"][k], v) for k, v in state["model"].items())
    for k, st in state["opt"]["state"].items():  # the second moment to bf16 precision, the first restarts at 0
        g = got["opt"]["state"][k]
        assert g["exp_avg_sq"].dtype == torch.float32 and torch.allclose(g["exp_avg_sq"], st["exp_avg_sq"], rtol=1e-2)
        assert not g["exp_avg"].any() and torch.equal(g["step"], st["step"])
    opt = torch.optim.AdamW(torch.nn.Linear(64, 64).parameters(), lr=1e-3)
    opt.load_state_dict(got["opt"])  # bench.finetune's resume loads it as it is
    torch.save({"step": 4500}, tdir / "last.pt")  # this machine trained further: kept
    assert tier.import_resume(tmp_path / "out") is None and torch.load(tdir / "last.pt")["step"] == 4500
    (tdir / "final.pt").write_bytes(b"done")
    assert tier.export_resume(tmp_path / "out2") is None and tier.import_resume(tmp_path / "out") is None
    assert tier.import_resume(tmp_path / "nothing") is None


def test_measure_regional_gives_the_gains_the_projection_uses(tmp_path, monkeypatch):
    """measure --regional times eager and compile=blocks on a row's fine-tune and sampling (faked here: the GPU
    measures); the projection divides a row's fine-tune / sampling by the measured gain only where the config
    compiles its blocks, and adds the per-row compile warm-up."""
    import json

    from bench import steptime
    from bench.gpu import tier

    def fake(path, per_step, warm):
        def step(net, batch, device, precision, mode, **kw):
            return {"path": path, "compile": mode, "per_step_s": per_step[mode] * len(net.net.blocks) / 28,
                    "warmup_s": warm[mode], "batch": batch}
        return step

    monkeypatch.setattr(steptime, "finetune_step_s", fake("finetune", {False: 0.071, "blocks": 0.040}, {False: 2, "blocks": 9}))
    monkeypatch.setattr(steptime, "sample_step_s", fake("sample", {False: 0.080, "blocks": 0.064}, {False: 1, "blocks": 4}))
    res = tier.measure_regional(tmp_path, device="cpu")
    t = json.loads((tmp_path / "tier_measure_regional.json").read_text())["timings"]
    assert t == res["timings"] and t["ft_regional_gain"] == pytest.approx(0.071 / 0.040)
    assert t["sample_regional_gain"] == pytest.approx(1.25) and t["regional_row_s"] == pytest.approx(7 + 3)
    # two commands' rows (composing all 137 takes ~20 s): a depth and a width sweep at seed 0
    monkeypatch.setattr(tier, "sweeps", lambda best=None: [["experiment=gpu_tier", "seed=0", "method=last_k"],
                                                            ["experiment=gpu_tier_width", "seed=0", "method=magnitude_width"]])
    base = tier.BASE
    monkeypatch.setattr(tier, "BASE", [*base, "finetune.compile=false", "eval.compile=false"])
    eager = tier.project(t)  # eager configs: the gains do not apply
    monkeypatch.setattr(tier, "BASE", [*base, "finetune.compile=blocks", "eval.compile=blocks"])
    comp = tier.project(t)
    assert comp["tier"]["finetune_s"] == pytest.approx(eager["tier"]["finetune_s"] / t["ft_regional_gain"])
    assert comp["tier"]["sample_s"] == pytest.approx(eager["tier"]["sample_s"] / 1.25)
    assert comp["tier"]["overhead_s"] == pytest.approx(eager["tier"]["overhead_s"] + 10 * comp["tier"]["rows"])


def test_the_tier_gpu_time_is_the_sum_of_the_calls_in_the_ledger(tmp_path):
    import json

    from bench.gpu.tier import gpu_time

    assert gpu_time(tmp_path / "calls.jsonl") == {"calls": 0, "minutes": 0.0, "by_command": {}, "unrecorded_calls": 0}
    lines = [{"command": "teacher", "wall_s": 501}, {"command": "tier", "wall_s": 459}, {"command": "measure", "wall_s": None},
             {"command": "tier", "wall_s": 42}]
    (tmp_path / "calls.jsonl").write_text("".join(json.dumps(c) + "\n" for c in lines))
    assert gpu_time(tmp_path / "calls.jsonl") == {"calls": 4, "minutes": 16.7, "by_command": {"teacher": 8.3, "tier": 8.3},
                                                  "unrecorded_calls": 1}


def test_the_ced_screen_names_its_best_variant_and_the_tier_runs_it_at_seeds_1_and_2(tmp_path, monkeypatch):
    """experiment=gpu_tier_ced: adaptive EntPruner at seed 0 on x0 outputs, per class or per noise bin, beside
    gpu_tier's default entpruner rows. Once all those rows exist, the variant with the lowest geometric mean
    FID over the budgets is named and its seeds 1 and 2 join the tier's commands (none if the default won)."""
    import json

    from bench.gpu import tier
    from bench.results import run_relpath

    monkeypatch.setattr(tier, "RESULTS", str(tmp_path))
    screen = tier.cells([tier.CED_SCREEN])
    base = tier.cells([["experiment=gpu_tier", "method=entpruner", "seed=0"]])
    assert len(screen) == 4 and {c.cfg["method_name"] for c in screen} == {"entpruner"}
    assert {(c.cfg["method"]["outputs"], c.cfg["method"]["condition"]) for c in screen} == {("x0", "class"), ("x0", "bin")}
    assert {(c.cfg["method"]["outputs"], c.cfg["method"]["condition"]) for c in base} == {("prediction", "class")}
    assert tier.ced_best() is None and tier.commands() == tier.sweeps(None)

    def write(fid):
        for c in base + screen:
            m = c.cfg["method"]
            row = tmp_path / run_relpath(c.cfg) / "row.json"
            row.parent.mkdir(parents=True, exist_ok=True)
            row.write_text(json.dumps({"metrics": {"fid": fid[m["outputs"], m["condition"]][c.cfg["budget"]["keep"] == 0.5]}}))

    write({("prediction", "class"): (30.0, 66.0), ("x0", "class"): (25.0, 60.0), ("x0", "bin"): (18.0, 90.0)})
    best = tier.ced_best()  # geometric means 44.5, 38.7, 40.2
    assert best["overrides"] == ["method.condition=class", "method.outputs=x0"]
    assert list(best["geomean_fid"]) == ["method.condition=class method.outputs=x0", "method.condition=bin method.outputs=x0",
                                         "method.condition=class method.outputs=prediction"]
    extra = [c for c in tier.commands() if c not in tier.sweeps(None)]
    assert extra == [["experiment=gpu_tier", "method=entpruner", "method.condition=class", "method.outputs=x0", f"seed={s}"]
                     for s in (1, 2)]
    assert len(tier.cells(extra)) == 4 and {c.cfg["method"]["outputs"] for c in tier.cells(extra)} == {"x0"}
    write({("prediction", "class"): (10.0, 20.0), ("x0", "class"): (25.0, 60.0), ("x0", "bin"): (18.0, 90.0)})
    assert tier.ced_best()["overrides"] == [] and tier.commands() == tier.sweeps(None)  # the default won


def test_rows_of_another_teacher_are_stale_not_done(tmp_path, monkeypatch):
    """A row whose teacher_sha256 is not the sha256 in teacher.json (the teacher was lost and trained again)
    counts as stale, not done; the CED screen ignores it; rows of the recorded teacher count as done."""
    import json

    from bench.gpu import tier
    from bench.results import run_relpath

    monkeypatch.setattr(tier, "RESULTS", str(tmp_path))
    monkeypatch.setattr(tier, "TEACHER_JSON", tmp_path / "teacher.json")
    monkeypatch.setattr(tier, "TEACHER_PARTS", tmp_path / "parts")
    monkeypatch.setattr(tier, "commands", lambda: [])  # the teacher rows alone are planned: a quick expansion
    rel = run_relpath(tier.cells([tier.TEACHER_ROWS[0]])[0].cfg)
    (tmp_path / rel).mkdir(parents=True)
    (tmp_path / rel / "row.json").write_text(json.dumps({"teacher_sha256": "a" * 64, "metrics": {"fid": 14.5}}))
    assert tier.tier_row(rel)[0] == "done"  # no teacher recorded yet: nothing to compare with
    (tmp_path / "teacher.json").write_text(json.dumps({"sha256": "b" * 64}))
    s = tier.status()
    assert (s["done"], s["stale"], s["teacher"]["recorded"], s["total"]) == (0, 1, "b" * 64, len(tier.TEACHER_ROWS))
    assert s["rows_minutes"] == {}  # a stale row's time is not the tier's
    wall = {"sample": 30.0, "score": 90.0}
    (tmp_path / rel / "row.json").write_text(json.dumps({"teacher_sha256": "b" * 64, "metrics": {"fid": 14.5}, "wall_s": wall}))
    assert tier.tier_row(rel)[0] == "done"
    assert tier.status()["rows_minutes"] == {"score": 1.5, "sample": 0.5}  # the done rows' own work, largest first


def test_status_estimates_the_rows_left_from_their_method_and_budgets_done_seeds(tmp_path, monkeypatch):
    """`status` says how much row work is left: each row to do at the mean own time (row.json's wall_s) of
    the done rows of its method and budget at other seeds; a row with no such seed is counted, not estimated."""
    import json

    from bench.gpu import tier
    from bench.results import run_relpath

    monkeypatch.setattr(tier, "RESULTS", str(tmp_path))
    monkeypatch.setattr(tier, "TEACHER_JSON", tmp_path / "teacher.json")
    monkeypatch.setattr(tier, "TEACHER_PARTS", tmp_path / "parts")
    def cmd(method: str, seed: int) -> list[str]:
        return ["experiment=gpu_tier", f"method={method}", "budget.keep=0.5", f"seed={seed}"]

    monkeypatch.setattr(tier, "commands", lambda: [cmd("last_k", 0), cmd("last_k", 1), cmd("first_k", 1)])
    done = run_relpath(tier.cells([cmd("last_k", 0)])[0].cfg)
    assert tier._seedless(done) == tier._seedless(run_relpath(tier.cells([cmd("last_k", 1)])[0].cfg))
    (tmp_path / done).mkdir(parents=True)
    (tmp_path / done / "row.json").write_text(json.dumps({"wall_s": {"finetune": 60.0, "score": 30.0}}))
    left = tier.status()["left"]
    # the two teacher rows, last_k seed 1 (estimated: 90 s) and first_k seed 1 (no done seed to go by)
    assert left == {"rows": 2 + len(tier.TEACHER_ROWS), "estimated": 1, "minutes": 1.5}


def test_status_says_whether_the_latency_pass_has_timed_every_done_row(tmp_path, monkeypatch, capsys):
    """`status` reads the latency pass's record beside the rows: not run; run, with a row made after it (the
    pass runs again); run over every done row."""
    import json

    from bench import latency_pass
    from bench.gpu import tier
    from bench.results import run_relpath

    monkeypatch.setattr(tier, "RESULTS", str(tmp_path))
    monkeypatch.setattr(tier, "TEACHER_JSON", tmp_path / "teacher.json")
    monkeypatch.setattr(tier, "TEACHER_PARTS", tmp_path / "parts")
    cmds = [["experiment=gpu_tier", "method=last_k", "budget.keep=0.5", f"seed={s}"] for s in (0, 1)]
    monkeypatch.setattr(tier, "commands", lambda: cmds)
    runs = [run_relpath(tier.cells([c])[0].cfg) for c in cmds]
    for r in runs:
        (tmp_path / r).mkdir(parents=True)
        (tmp_path / r / "row.json").write_text(json.dumps({"wall_s": {"finetune": 60.0}}))

    def said() -> str:
        assert tier.main(["status"]) == 0
        return next(line for line in capsys.readouterr().out.splitlines() if line.startswith("latency pass"))

    assert tier.status()["latency_pass"] is None and "not run yet" in said()
    rec = {"schema": latency_pass.SCHEMA, "device": "NVIDIA H100 80GB HBM3", "date": "2026-12-08T10:00:00Z",
           "runs": {"a": {"dir": runs[0], "speedup": 1.9}}, "skipped": {}}
    (tmp_path / latency_pass.FILE).write_text(json.dumps(rec))
    assert tier.status()["latency_pass"] == {"device": "NVIDIA H100 80GB HBM3", "date": "2026-12-08T10:00:00Z",
                                             "timed": 1, "untimed": [runs[1]], "skipped": 0}
    assert "1 of 2 done rows; 1 made after it" in said()
    rec["runs"]["b"] = {"dir": runs[1], "speedup": 1.9}
    (tmp_path / latency_pass.FILE).write_text(json.dumps(rec))
    assert "every done row timed (0 skipped)" in said()


def test_commands_todo_leaves_out_the_commands_whose_rows_are_all_done(tmp_path, monkeypatch, capsys):
    """`commands --todo` (what tier.sh starts): a command is left out once every one of its runs has a row of
    the recorded teacher; a stale row (another teacher) or a missing one keeps it in."""
    import json

    from bench.gpu import tier
    from bench.results import run_relpath

    monkeypatch.setattr(tier, "RESULTS", str(tmp_path))
    monkeypatch.setattr(tier, "TEACHER_JSON", tmp_path / "teacher.json")
    (tmp_path / "teacher.json").write_text(json.dumps({"sha256": "b" * 64}))

    def todo_lines():
        assert tier.main(["commands", "--teacher", "--todo"]) == 0
        return [line for line in capsys.readouterr().out.splitlines() if line]

    assert todo_lines() == [" ".join(c) for c in tier.TEACHER_ROWS]  # no rows yet: both
    rel = run_relpath(tier.cells([tier.TEACHER_ROWS[0]])[0].cfg)
    (tmp_path / rel).mkdir(parents=True)
    (tmp_path / rel / "row.json").write_text(json.dumps({"teacher_sha256": "a" * 64}))
    assert todo_lines() == [" ".join(c) for c in tier.TEACHER_ROWS]  # stale: redone
    (tmp_path / rel / "row.json").write_text(json.dumps({"teacher_sha256": "b" * 64}))
    assert todo_lines() == [" ".join(tier.TEACHER_ROWS[1])]
    assert tier.todo([tier.TEACHER_ROWS[0]]) == []


def test_tier_sh_sends_a_new_teacher_back_and_a_fresh_machine_takes_it_in(tmp_path):
    """tier.sh on the CPU: a call that ends with a trained teacher that teacher.json does not record packs
    its parts + teacher.json into $OUT (whatever the call's rows did); on a fresh machine (empty stage and
    artifacts) the committed parts are staged, checked and joined into the tier's teacher folder."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    from tests.conftest import ROOT

    def call(name, art, out=None):
        env = {**os.environ, "BENCH_PYTHON": sys.executable, "BENCH_ARTIFACTS": str(art), "TIER_DEVICE": "cpu",
               "TIER_STAGE": str(tmp_path / name), "TIER_RESULTS": str(tmp_path / "results"),
               "TIER_PARTS": str(tmp_path / "parts"), "INCEPTION_DIR": str(tmp_path / "assets"), "TIER_CHUNK_S": "300", "OUT": str(out or tmp_path / f"{name}_out"),
               "PAYLOAD_DIR": str(tmp_path / "payload")}  # not this checkout's prepared parts
        r = subprocess.run(["bash", "bench/gpu/tier.sh", "stage"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    env = {**os.environ, "BENCH_ARTIFACTS": str(tmp_path / "art1")}
    tdir = Path(subprocess.run([sys.executable, "-m", "bench.gpu.tier", "teacher-dir"], cwd=ROOT, env=env,
                               capture_output=True, text=True, check=True).stdout.strip())
    tdir.mkdir(parents=True)
    weights = os.urandom(3000)
    (tdir / "final.pt").write_bytes(weights)  # trained in this call (the bytes are all the transport looks at)
    out = call("machine1", tmp_path / "art1")
    assert "teacher=yes" in out
    rec = json.loads((tmp_path / "machine1_out" / "teacher.json").read_text())
    assert json.loads((tmp_path / "results" / "teacher.json").read_text())["sha256"] == rec["sha256"]
    parts = sorted((tmp_path / "machine1_out").glob("teacher.part-*"))
    assert [p.name for p in parts] == ["teacher.part-00"] and parts[0].read_bytes() == weights
    (tmp_path / "parts").mkdir()
    shutil.copy(parts[0], tmp_path / "parts")  # committed with results/gpu/tier/teacher.json
    out = call("machine2", tmp_path / "art2")  # a fresh machine: nothing under its stage or artifacts
    assert "teacher=yes" in out and "sha256 checked" in out
    assert (tmp_path / "art2" / tdir.relative_to(tmp_path / "art1") / "final.pt").read_bytes() == weights
    assert not list((tmp_path / "machine2_out").glob("teacher.part-*"))  # recorded already: not sent again


def test_workers_share_every_run_once_and_keep_their_split_when_the_list_grows():
    """tier.sh TIER_WORKERS=2: the workers' shares of the tier's commands cover every run exactly once (routed
    Diff-ES too: the latency pass retimes it), each worker gets about half, and a command's split does not
    change when the CED screen's winner joins the list."""
    from collections import Counter

    from bench.gpu import tier

    def runs(commands):  # each run as its overrides (the last value of a key wins, as in hydra)
        return Counter(frozenset(dict(o.split("=", 1) for o in job).items()) for cmd in commands for job in tier.jobs(cmd))

    base = tier.sweeps(None)
    shares = [tier.share(base, 2, w) for w in (0, 1)]
    everything, got = runs(base), [runs(s) for s in shares]
    assert sum(everything.values()) == 133 and got[0] + got[1] == everything
    assert not set(got[0]) & set(got[1]) and any(dict(r)["method"] == "diffes" for g in got for r in g)
    assert abs(sum(got[0].values()) - sum(got[1].values())) <= 12
    assert tier.share(base, 1, 0) == base
    grown = tier.sweeps(["method.outputs=x0"])
    for w in (0, 1):
        assert all(c in tier.share(grown, 2, w) for c in shares[w])  # what a worker had, it keeps


def test_rows_of_an_older_tier_config_are_obsolete_and_archive_moves_them_out(tmp_path, monkeypatch):
    """A row whose run folder no planned run names (the tier's config changed: another hash) is obsolete:
    status lists it, `archive` moves it with its path kept to results/gpu/tier_archive/NAME/, a planned
    row stays, and an archive name already used is refused."""
    import json

    import pytest

    from bench.api import BenchError
    from bench.gpu import tier
    from bench.results import run_relpath

    monkeypatch.setattr(tier, "RESULTS", str(tmp_path / "tier"))
    monkeypatch.setattr(tier, "ROOT", tmp_path)
    monkeypatch.setattr(tier, "TEACHER_JSON", tmp_path / "tier" / "teacher.json")
    monkeypatch.setattr(tier, "TEACHER_PARTS", tmp_path / "parts")
    monkeypatch.setattr(tier, "commands", lambda: [])  # the teacher rows alone are planned: a quick expansion
    planned = run_relpath(tier.cells([tier.TEACHER_ROWS[0]])[0].cfg)
    old = planned.rsplit("-", 1)[0] + "-0123abcd"
    for rel in (planned, old):
        (tmp_path / "tier" / rel).mkdir(parents=True)
        (tmp_path / "tier" / rel / "row.json").write_text(json.dumps({"metrics": {"fid": 14.5}}))
    cut = planned.rsplit("-", 1)[0] + "-4567cdef"  # an older config's run cut short: no row, never finished
    (tmp_path / "tier" / cut).mkdir(parents=True)
    (tmp_path / "tier" / cut / "log.jsonl").write_text("{}\n")
    (tmp_path / "tier" / cut / "plan.json").write_text(json.dumps({"scores": [0.25] * 100_000}))  # > 256 kB
    assert tier.status()["obsolete"] == [old, cut]
    moved = tier.archive("eager-eval")
    assert moved == [tmp_path / "results" / "gpu" / "tier_archive" / "eager-eval" / r for r in (old, cut)]
    assert (moved[0] / "row.json").is_file() and not (tmp_path / "tier" / old).exists()
    assert (moved[1] / "plan.json.gz").is_file() and not (moved[1] / "plan.json").exists()  # archived: compacted
    assert (tmp_path / "tier" / planned / "row.json").is_file() and tier.obsolete() == []
    (tmp_path / "tier" / old).mkdir(parents=True)
    (tmp_path / "tier" / old / "row.json").write_text("{}")
    with pytest.raises(BenchError, match="exists"):
        tier.archive("eager-eval")
    with pytest.raises(BenchError, match="plain folder name"):
        tier.archive("../x")


def test_tier_sh_takes_either_gpu_model_and_its_latency_pass_pools_the_other(tmp_path):
    """tier.sh makes rows on an H100 or an H200 (results/gpu/tier_h200: their rows agree) and refuses any other
    GPU; its latency pass runs on the call's GPU and pools the other model's rows into its tables (--also)."""
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    fake = tmp_path / "bin"
    fake.mkdir()
    py = fake / "py"  # records the latency pass's arguments; anything else goes to the real python
    py.write_text(f'#!/bin/bash\nif [ "$2" = bench.latency_pass ]; then printf "%s\\n" "$@" > {tmp_path}/pass.txt; '
                  f'exit 0; fi\nexec {sys.executable} "$@"\n')
    py.chmod(0o755)

    def call(gpu: str):
        smi = fake / "nvidia-smi"
        smi.write_text(f'#!/bin/bash\necho "{gpu}"\n')
        smi.chmod(0o755)
        env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "BENCH_PYTHON": str(py), "TIER_DEVICE": "cuda",
               "TIER_STAGE": str(tmp_path / "stage"), "TIER_RESULTS": str(tmp_path / "results"),
               "TIER_PARTS": str(tmp_path / "parts"), "INCEPTION_DIR": str(tmp_path / "assets"), "TIER_CHUNK_S": "300",
               "PAYLOAD_DIR": str(tmp_path / "payload")}
        env.pop("OUT", None)
        env.pop("TIER_GPU", None)
        return subprocess.run(["bash", "bench/gpu/tier.sh", "latency"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=120)

    r = call("NVIDIA A100-SXM4-80GB")
    assert r.returncode == 3 and '"NVIDIA H100 80GB HBM3" or "NVIDIA H200"' in r.stdout, r.stdout + r.stderr
    assert not (tmp_path / "pass.txt").exists()
    r = call("NVIDIA H200")
    assert r.returncode == 0, r.stdout + r.stderr
    args = (tmp_path / "pass.txt").read_text().splitlines()
    assert args[args.index("--device") + 1] == "cuda" and args[args.index("--also") + 1] == "NVIDIA H100 80GB HBM3"
    assert args.count("--also") == 1
    # the ledger: one line per GPU call (the refused call made none), on the machine and in the checkout's rows
    calls = [json.loads(t) for t in (tmp_path / "results" / "calls.jsonl").read_text().splitlines()]
    assert [(c["command"], c["device"]) for c in calls] == [("latency", "NVIDIA H200")] and calls[0]["wall_s"] >= 0
    assert (tmp_path / "stage" / "rows" / "calls.jsonl").read_text() == (tmp_path / "results" / "calls.jsonl").read_text()


def test_graph_decision_turns_cuda_graphs_on_only_when_they_match_eager_and_pay(capsys):
    """TIER_GRAPH=check (tier.sh): finetune.graph goes on when the graphed fine-tune ends at eager's weights (no
    farther than eager from itself) and every shape's step is faster; otherwise the rows run eagerly."""
    from bench.gpu import tier

    def rec(diff=0.0, eager_diff=0.0, gain=4.0):
        agree = {"steps": 20, "eager_vs_eager": {"equal": 9, "of": 9, "max_abs_diff": eager_diff},
                 "graph_vs_eager": {"equal": 9 if diff == 0 else 5, "of": 9, "max_abs_diff": diff}}
        return {"device": "NVIDIA H100 80GB HBM3", "graph_gain": {"blocks 1.0": gain, "width 0.5": 3.0},
                "records": [{"shape": s, "graph": g, **({"agreement": agree} if g else {})}
                            for s in ("blocks 1.0", "width 0.5") for g in (False, True)]}

    on, why = tier.graph_decision(rec())
    assert on and "blocks 1.0 4.00x" in why and "H100" in why
    assert tier.graph_decision(rec(diff=3e-3, eager_diff=1e-3))[0]  # eager is not bitwise repeatable: as close
    assert not tier.graph_decision(rec(diff=5e-3, eager_diff=1e-3))[0]  # ... within 4x of its own spread
    on, why = tier.graph_decision(rec(diff=1e-6))
    assert not on and "differ from eager by up to 1e-06" in why
    on, why = tier.graph_decision(rec(gain=1.1))
    assert not on and "only 1.10x" in why


def test_graph_decision_command_prints_on_or_off(tmp_path, capsys):
    """`python -m bench.gpu.tier graph-decision RECORD`: tier.sh reads 'on' or 'off'; the reason goes to stderr."""
    import json

    from bench.gpu import tier

    agree = {"eager_vs_eager": {"max_abs_diff": 0.0}, "graph_vs_eager": {"max_abs_diff": 0.0}}
    path = tmp_path / "tier_measure_graph.json"
    path.write_text(json.dumps({"device": "NVIDIA H200", "graph_gain": {"blocks 1.0": 3.0},
                                "records": [{"shape": "blocks 1.0", "graph": True, "agreement": agree}]}))
    assert tier.main(["graph-decision", str(path)]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == "on" and "finetune.graph on" in out.err


def test_the_payload_travels_in_parts_that_fit_beside_the_tree_and_joins_only_when_whole(tmp_path):
    """bench/gpu/payload.sh: prep cuts the payload (Inception weights, Fashion-MNIST, wheels) into parts of at most
    the room a call has beside the tracked tree; the GPU side keeps the parts of earlier calls, joins them once
    the last has come, checks the sha256 and puts each file in place; parts of two preps never join."""
    import os
    import subprocess

    from tests.conftest import ROOT

    src = tmp_path / "src"
    src.mkdir()
    files = {"inception/default_1.pt": os.urandom(2_500_000), "fashion-mnist/train-images-idx3-ubyte.gz": os.urandom(1_700_000),
             "fashion-mnist/t10k-labels-idx1-ubyte.gz": os.urandom(5125), "wheels/tabulate-0.10.0-py3-none-any.whl": os.urandom(39814)}
    for i, data in enumerate(files.values()):
        (src / f"f{i}").write_bytes(data)
    entries = " ".join(f"{name}={src / f'f{i}'}" for i, name in enumerate(files))
    env = {**os.environ, "PAYLOAD_DIR": str(tmp_path / "parts"), "STAGE": str(tmp_path / "stage"),
           "INCEPTION_DIR": str(tmp_path / "assets")}

    def sh(cmd):
        r = subprocess.run(["bash", "-c", f"set -uo pipefail; log() {{ echo \"$*\"; }}; . {ROOT}/bench/gpu/payload.sh; {cmd}"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        return r.returncode, r.stdout + r.stderr

    rc, out = sh(f"payload_split 1200000 {entries}")
    assert rc == 0, out
    parts = sorted((tmp_path / "parts").glob("p*/payload.part-*"))
    assert [p.parent.name for p in parts] == ["p1", "p2", "p3", "p4"] and max(p.stat().st_size for p in parts) <= 1_200_000
    assert sh("payload_carries")[1].splitlines() == [f'carry ["{tmp_path}/parts/p{k}"]' for k in (1, 2, 3, 4)]
    held = tmp_path / "held"
    held.mkdir()
    for p in (tmp_path / "parts").iterdir():  # each call carries one part folder: the others wait here
        p.rename(held / p.name)
    for k in (1, 2, 3):
        (held / f"p{k}").rename(tmp_path / "parts" / f"p{k}")
        rc, out = sh("payload_stage")
        assert rc == 0 and f"{k} of 4 parts here" in out, out
        (tmp_path / "parts" / f"p{k}").rename(held / f"p{k}")
    assert not (tmp_path / "assets").exists()  # nothing in place before the last part
    (held / "p4").rename(tmp_path / "parts" / "p4")
    rc, out = sh("payload_stage")
    assert rc == 0 and "joined 4 parts (sha256 checked)" in out, out
    placed = {"inception/default_1.pt": tmp_path / "assets" / "default_1.pt",
              "fashion-mnist/train-images-idx3-ubyte.gz": tmp_path / "stage" / "fashion-mnist" / "train-images-idx3-ubyte.gz",
              "fashion-mnist/t10k-labels-idx1-ubyte.gz": tmp_path / "stage" / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz",
              "wheels/tabulate-0.10.0-py3-none-any.whl": tmp_path / "stage" / "wheels" / "tabulate-0.10.0-py3-none-any.whl"}
    assert all(placed[name].read_bytes() == data for name, data in files.items())
    # a damaged part (or one of another prep) never joins: the sha256 says so, and nothing is put in place
    (tmp_path / "assets" / "default_1.pt").unlink()
    rc, out = sh(f"payload_split 1200000 {entries} && truncate -s -1 {tmp_path}/parts/p4/payload.part-4-of-4 && payload_stage")
    assert rc != 0 and "do not match payload.sha256" in out, out
    assert not (tmp_path / "assets" / "default_1.pt").exists()


def test_the_tracked_tree_is_summed_over_every_file_however_long_the_list(tmp_path):
    """payload.sh tree_bytes: what every call carries (git's tracked files) is summed in one du, whatever the
    number of files. Summing through xargs cut a long list into batches, and the last batch's total (1.2 MB of
    the tier's 47.7 MB tree) would have sized the payload's parts over the carry limit."""
    import subprocess

    from tests.conftest import ROOT

    repo = tmp_path / "repo"
    (repo / "rows").mkdir(parents=True)
    n, size = 3000, 100
    for i in range(n):  # ~250 kB of names: more than one xargs batch (128 kB)
        (repo / "rows" / f"{'run-' * 18}{i:05d}.json").write_bytes(b"x" * size)
    (repo / "ignored.bin").write_bytes(b"y" * 5000)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "add", "rows"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "rows"], cwd=repo, check=True)
    r = subprocess.run(["bash", "-c", f"log() {{ echo \"$*\"; }}; . {ROOT}/bench/gpu/payload.sh; tree_bytes"],
                       cwd=repo, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.strip()) == n * size  # every tracked file, the untracked one not


def _mini_repo(tmp_path, gpus: int) -> tuple:
    """tier.sh run from a copy of itself in a folder with the data files it looks for, on a stand-in host of
    `gpus` H100s (nvidia-smi); a stand-in python records each bench.run (and torchrun) with the GPUs it sees
    and hands the rest to this python. torchrun's bench.run copies $FAKE_RUN's runs into its paths.results.
    Returns (repo, env, the record's path)."""
    import os
    import shutil
    import sys

    from tests.conftest import ROOT

    repo = tmp_path / "repo"
    (repo / "bench" / "gpu").mkdir(parents=True)
    for f in ("tier.sh", "payload.sh"):
        shutil.copy(ROOT / "bench" / "gpu" / f, repo / "bench" / "gpu" / f)
    (repo / "data" / "fashion-mnist").mkdir(parents=True)
    for f in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz"):
        (repo / "data" / "fashion-mnist" / f).write_bytes(b"")
    (tmp_path / "assets").mkdir()
    (tmp_path / "assets" / "default_1.pt").write_bytes(b"")
    fake = tmp_path / "bin"
    fake.mkdir()
    runs = tmp_path / "runs.txt"
    py = fake / "py"
    py.write_text(f'#!/bin/bash\n[ "$2 $3" != "bench.gpu.tier commands" ] || echo "$*" >> {runs}.lists\n'
                  f'if [ "$2" = bench.run ] || [ "$2" = torch.distributed.run ]; then\n'
                  f'  echo "$CUDA_VISIBLE_DEVICES|${{BENCH_SHARED_DEVICE:-}}|$*" >> {runs}\n'
                  f'  for a in "$@"; do case "$a" in paths.results=*) mkdir -p "${{a#*=}}"; '
                  f'[ -n "${{FAKE_RUN:-}}" ] && cp -r "$FAKE_RUN"/. "${{a#*=}}"/;; esac; done; exit 0\nfi\n'
                  f'export PYTHONPATH={ROOT}:$PYTHONPATH\nexec {sys.executable} "$@"\n')
    py.chmod(0o755)
    smi = fake / "nvidia-smi"
    smi.write_text('#!/bin/bash\nif [ "$1" = -L ]; then for i in $(seq 0 ' + str(gpus - 1) + '); do '
                   'echo "GPU $i: NVIDIA H100 80GB HBM3 (UUID: $i)"; done; else echo "NVIDIA H100 80GB HBM3"; fi\n')
    smi.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "BENCH_PYTHON": str(py), "TIER_DEVICE": "cuda",
           "TIER_STAGE": str(tmp_path / "stage"), "TIER_RESULTS": str(tmp_path / "results"),
           "TIER_PARTS": str(tmp_path / "parts"), "INCEPTION_DIR": str(tmp_path / "assets"), "TIER_CHUNK_S": "300",
           "PAYLOAD_DIR": str(tmp_path / "payload"), "BENCH_GIT_SHA": "abc123",
           "TIER_RANKS_OUT": str(tmp_path / "ranks_out")}
    for k in ("OUT", "TIER_GPU", "CUDA_VISIBLE_DEVICES", "TIER_GRAPH", "TIER_WORKERS", "TIER_RANKS", "FAKE_RUN"):
        env.pop(k, None)
    return repo, env, runs


def test_tier_sh_gives_each_worker_a_gpu_of_its_own_on_a_host_with_enough_gpus(tmp_path):
    """TIER_WORKERS=2 on a host with 2 GPUs: worker w runs with CUDA_VISIBLE_DEVICES the w-th visible GPU, every
    method is dealt out (Diff-ES too) and no row is flagged shared; the ledger line counts the machine's GPUs."""
    import json
    import subprocess

    repo, env, runs_txt = _mini_repo(tmp_path, 2)
    r = subprocess.run(["bash", "bench/gpu/tier.sh", "tier"], cwd=repo, env={**env, "TIER_WORKERS": "2"},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "2 workers, one GPU each (0 1)" in r.stdout, r.stdout + r.stderr
    runs = [line.split("|", 2) for line in runs_txt.read_text().splitlines()]
    tier_runs = [(gpu, shared, args) for gpu, shared, args in runs if "experiment=gpu_tier seed=0" in args]
    assert {gpu for gpu, _, _ in tier_runs} == {"0", "1"} and {s for _, s, _ in runs} == {""}
    dealt = [a.split("method=")[-1].split()[0].split(",") for _, _, a in tier_runs]
    assert sorted(m for d in dealt for m in d) == sorted(set(m for d in dealt for m in d)) and "diffes" in sum(dealt, [])
    [line] = [json.loads(t) for t in (tmp_path / "results" / "calls.jsonl").read_text().splitlines()]
    assert (line["command"], line["gpus"], line["git"]) == ("tier", 2, "abc123")
    # each worker composes its runs once (--todo): the list did not grow (no CED winner), so no second pass
    lists = (tmp_path / "runs.txt.lists").read_text().splitlines()
    assert sorted(t.split("--worker ")[1] for t in lists if "--todo --workers" in t) == ["0", "1"]


def test_tier_sh_runs_the_latency_pass_after_the_last_row_only_while_the_pass_misses_a_row(tmp_path):
    """A `tier` call that finds every row done runs the latency pass when `status` says the pass has not run
    or misses a done row, and not when it has timed every done row or rows are still to come."""
    import subprocess

    repo, env, _ = _mini_repo(tmp_path, gpus=1)
    status = tmp_path / "status.txt"
    passes = tmp_path / "pass.txt"
    py = tmp_path / "bin" / "py"  # a stand-in python: status from the file; the pass is recorded; no commands left
    py.write_text(f'#!/bin/bash\ncase "$2 $3" in\n  "bench.gpu.tier status") cat {status} ;;\n'
                  f'  "bench.latency_pass "*) echo pass >> {passes} ;;\nesac\nexit 0\n')

    def call(lines: list[str]) -> int:
        status.write_text("\n".join(lines) + "\n")
        r = subprocess.run(["bash", "bench/gpu/tier.sh", "tier"], cwd=repo, env=env, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        return len(passes.read_text().splitlines()) if passes.exists() else 0

    assert call(["rows done: 137 of 139; teacher: {}", "latency pass: not run yet"]) == 0  # rows to come
    assert call(["rows done: 139 of 139; teacher: {}", "latency pass: not run yet"]) == 1
    assert call(["rows done: 139 of 139; teacher: {}",
                 "latency pass (NVIDIA H100 80GB HBM3, 2026-12-08T10:00:00Z): 137 of 139 done rows; 2 made after it "
                 "(e.g. a/b/c): run it again"]) == 2
    assert call(["rows done: 139 of 139; teacher: {}",
                 "latency pass (NVIDIA H100 80GB HBM3, 2026-12-08T10:00:00Z): every done row timed (0 skipped)"]) == 2


def test_tier_sh_ranks_runs_one_cell_on_every_gpu_and_compares_it_with_its_one_gpu_row(tmp_path):
    """`tier.sh ranks` on a host of 4 GPUs: torchrun with 4 ranks makes the cell, bench.gpu.ranks compares it with
    the committed one-process row of the same path and writes ranks_n4.*; on one GPU it refuses, naming why."""
    import json
    import subprocess

    rel = "DiT-D28-2-fashion-mnist-ddpm/last_k/blocks0.5-s0-cuda-38c3ad91"
    row = {"device": "NVIDIA H100 80GB HBM3", "metrics": {"fid": 19.7, "fid_ci_lo": 19.3, "fid_ci_hi": 20.1}}
    for root, world, scale in ((tmp_path / "results", 1, 1.0), (tmp_path / "made", 4, 1.002)):
        (root / rel).mkdir(parents=True)
        (root / rel / "row.json").write_text(json.dumps(row))
        log = [{"event": "start", "world": world}, *({"event": "finetune", "step": s, "loss": 0.05 * scale} for s in (0, 299))]
        (root / rel / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log))
    repo, env, runs_txt = _mini_repo(tmp_path, 4)
    r = subprocess.run(["bash", "bench/gpu/tier.sh", "ranks"], cwd=repo, env={**env, "FAKE_RUN": str(tmp_path / "made")},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "every check passed" in r.stdout, r.stdout + r.stderr
    [(_, _, args)] = [line.split("|", 2) for line in runs_txt.read_text().splitlines()]
    assert "--nproc-per-node=4 -m bench.run experiment=gpu_tier method=last_k budget.keep=0.5 seed=0 device=cuda" in args
    rec = json.loads((tmp_path / "ranks_out" / "ranks_n4.json").read_text())
    assert rec["passed"] and list(rec["runs"]) == [rel] and rec["runs"][rel]["world"] == 4
    repo1, env1, _ = _mini_repo(tmp_path / "one", 1)
    r = subprocess.run(["bash", "bench/gpu/tier.sh", "ranks"], cwd=repo1, env=env1, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "ranks needs 2 or more GPUs; this call sees 1" in r.stdout, r.stdout + r.stderr
