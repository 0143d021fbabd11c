"""bench.gate, the speedup regression gate: the interval of a ratio on synthetic timings, the
expectation files, and the gate on a tiny CPU model (passes with its honest expectation, fails with
a 10x one). The only timing assertions are these verdicts: the expectations sit far from what the
model measures (tiny_cpu.yaml: ~0.8x of it; 10x for a ~2x model)."""
from __future__ import annotations

import json
import math
import random
import shutil
import subprocess
import sys

import pytest
import yaml
from scipy.stats import t as student_t

from bench.api import BenchError
from bench.gate import EXPECTATIONS, load, main
from bench.speedup import paired_ratio, weighted_ratio
from tests.conftest import ROOT

TINY = EXPECTATIONS / "tiny_cpu.yaml"
FAST = ["--budget-s", "6", "--min-rounds", "5"]  # seconds of CPU, not a measurement to keep


# ------------------------------------------------------------------------------------------------
# The interval of a speedup from interleaved rounds
# ------------------------------------------------------------------------------------------------

def test_paired_ratio_cancels_drift_between_rounds():
    """Dense 10 ms and pruned 5 ms with 2 % noise per call, and a drift (clock, heat, another job)
    that slows both by up to 40 % from round to round: per-round ratios cancel it."""
    rng = random.Random(0)
    base, other = [], []
    for i in range(30):
        drift = 1 + 0.4 * (i % 5) / 4
        base.append([10 * drift * (1 + rng.gauss(0, 0.02)) for _ in range(5)])
        other.append([5 * drift * (1 + rng.gauss(0, 0.02)) for _ in range(5)])
    r = paired_ratio(base, other)
    assert r["rounds"] == 30 and len(r["round_ratios"]) == 30
    assert r["lo"] < 2.0 < r["hi"] and r["hi"] / r["lo"] < 1.02
    # the first round's dense against the last round's pruned, as two separate runs would give
    assert 10 / (5 * 1.4) == pytest.approx(1.43, abs=0.01)


def test_paired_ratio_is_a_t_interval_of_the_log_ratios():
    ratios = [2.0, 2.2, 1.8, 2.0]
    base = [[r * 3.0] * 3 for r in ratios]
    other = [[3.0] * 3 for _ in ratios]
    got = paired_ratio(base, other)
    logs = [math.log(r) for r in ratios]
    m = sum(logs) / 4
    sd = math.sqrt(sum((v - m) ** 2 for v in logs) / 3)
    h = student_t.ppf(0.975, 3) * sd / 2
    assert got["ratio"] == pytest.approx(math.exp(m))
    assert (got["lo"], got["hi"]) == (pytest.approx(math.exp(m - h)), pytest.approx(math.exp(m + h)))
    # per round the median is used: one outlier call of three does not move it
    spiky = [[6.0, 6.0, 600.0]] * 3
    assert paired_ratio(spiky, [[3.0] * 3] * 3)["ratio"] == pytest.approx(2.0)
    # identical rounds: no width; one round: no interval; rounds must pair up
    same = paired_ratio([[10.0] * 3] * 4, [[4.0] * 3] * 4)
    assert same["lo"] == same["ratio"] == same["hi"] == pytest.approx(2.5)
    one = paired_ratio([[10.0]], [[5.0]])
    assert (one["lo"], one["hi"]) == (0.0, float("inf"))
    with pytest.raises(ValueError):
        paired_ratio([[1.0]], [[1.0], [1.0]])


def test_a_routed_models_speedup_is_base_over_the_weighted_mean_of_its_stages():
    """weighted_ratio: per round, base / sum_s w_s * stage_s (the NFE-weighted mean latency a routed row
    reports), from each stage's paired round ratios; a drift that moves every model alike cancels."""
    drift = [1.0, 1.3, 0.8, 1.1]
    base = [[10.0 * d] * 3 for d in drift]
    stages = [[[2.0 * d] * 3 for d in drift], [[8.0 * d] * 3 for d in drift]]
    per_stage = [paired_ratio(base, st)["round_ratios"] for st in stages]
    got = weighted_ratio(per_stage, [0.25, 0.75])
    assert got["lo"] == pytest.approx(got["ratio"]) and got["hi"] == pytest.approx(got["ratio"])
    assert got["ratio"] == pytest.approx(10.0 / (0.25 * 2.0 + 0.75 * 8.0)) and got["rounds"] == 4
    assert weighted_ratio(per_stage, [1.0, 3.0])["ratio"] == pytest.approx(got["ratio"])  # weights are shares
    noisy = weighted_ratio([[5.0, 4.0, 6.0], [1.2, 1.3, 1.1]], [0.5, 0.5])
    assert noisy["lo"] < noisy["ratio"] < noisy["hi"]
    with pytest.raises(ValueError):
        weighted_ratio([[2.0, 2.0], [2.0]], [0.5, 0.5])


def test_wider_noise_gives_a_wider_interval():
    def interval(noise):
        rng = random.Random(1)
        base = [[10 * (1 + rng.gauss(0, noise)) for _ in range(5)] for _ in range(20)]
        other = [[5 * (1 + rng.gauss(0, noise)) for _ in range(5)] for _ in range(20)]
        r = paired_ratio(base, other)
        return r["hi"] / r["lo"]
    assert interval(0.01) < interval(0.05) < interval(0.2)


# ------------------------------------------------------------------------------------------------
# Expectation files
# ------------------------------------------------------------------------------------------------

def test_committed_expectation_files():
    spec, pairs = load(EXPECTATIONS / "dit_xl2.yaml")
    assert spec["model"] == "DiT-XL/2" and spec["device"] == "cuda"
    assert spec["model_kw"] == {"input_size": 32, "in_channels": 4, "num_classes": 1000}  # 256 px latents
    got = {(p.keep_blocks, p.width, p.mode, p.dtype, p.batch) for p in pairs}
    assert got == {(14, None, "eager", "bf16", 64), (None, 0.5, "eager", "bf16", 64),
                   (14, None, "compile", "bf16", 64), (None, 0.5, "compile", "bf16", 64)}
    assert all(p.expect and p.expect > 1 for p in pairs)
    spec, pairs = load(TINY)
    assert spec["device"] == "cpu" and {p.mode for p in pairs} == {"eager"} and len(pairs) == 2


@pytest.mark.parametrize("edit, match", [
    ({"colour": 1}, "unknown key 'colour'"),
    ({"model": "DiT-Q/9"}, "no bench.models name"),
    ({"pairs": [{"name": "a", "prune": {"keep_blocks": 4, "width": 0.5}}]}, "keep_blocks: N"),
    ({"pairs": [{"name": "a", "prune": {"width": 1.5}}]}, "between 0 and 1"),
    ({"pairs": [{"name": "a", "prune": {"keep_blocks": 4}, "mode": "jit"}]}, "mode='jit'"),
    ({"pairs": [{"name": "a", "prune": {"keep_blocks": 4}, "dtype": "tf32"}]}, "tf32 on cuda only"),
    ({"pairs": [{"name": "a", "prune": {"keep_blocks": 4}, "expect": -1}]}, "expect=-1"),
    ({"pairs": [{"name": "a", "prune": {"keep_blocks": 4}}, {"name": "a", "prune": {"width": 0.5}}]}, "name of its own"),
])
def test_bad_expectation_files_stop_with_the_fix(tmp_path, capsys, edit, match):
    spec = yaml.safe_load(TINY.read_text())
    spec.update(edit)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(spec))
    with pytest.raises(BenchError, match=match):
        load(bad)
    assert main([str(bad), "--out", str(tmp_path / "g.json")]) == 2
    assert match.split("'")[0] in capsys.readouterr().err
    assert not (tmp_path / "g.json").exists()


def test_a_gpu_file_on_a_machine_without_one_says_so(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert main([str(EXPECTATIONS / "dit_xl2.yaml"), "--out", str(tmp_path / "g.json")]) == 2
    assert "tiny_cpu.yaml" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# The gate on a tiny CPU model
# ------------------------------------------------------------------------------------------------

def test_gate_passes_with_honest_expectations(tmp_path, capsys):
    out = tmp_path / "gate.json"
    assert main([str(TINY), "--out", str(out), *FAST]) == 0
    rec = json.loads(out.read_text())
    # the record describes itself: where, with what, from which commit, under which rule
    assert rec["device"].startswith("cpu-") and rec["torch"] and rec["commit"] and rec["date"]
    assert rec["expectations"] == str(TINY) and len(rec["expectations_sha256"]) == 64
    assert rec["settings"]["min_rounds"] == 5 and rec["rule"].startswith("fail when")
    assert rec["passed"] and rec["failed"] == []
    pairs = {q["name"]: q for q in rec["pairs"]}
    assert set(pairs) == {"depth50-eager-fp32", "width50-eager-fp32"}
    for q in pairs.values():
        assert q["verdict"] == "pass" and q["rounds"] >= 5 and q["lo"] <= q["ratio"] <= q["hi"]
        assert q["hi"] >= q["expect"] and q["out_finite"]
        assert len(q["round_ratios"]) == q["rounds"] and q["reps_per_round"] == 5
    assert pairs["depth50-eager-fp32"]["blocks"] == 4 and rec["dense"]["blocks"] == 8
    assert pairs["depth50-eager-fp32"]["mac_speedup"] == pytest.approx(8 / 4, rel=0.05)
    printed = capsys.readouterr().out
    assert "| depth50-eager-fp32" in printed and "PASS" in printed and "all gated speedups hold" in printed


def test_gate_fails_and_names_the_pair_when_the_expectation_is_too_high(tmp_path):
    spec = yaml.safe_load(TINY.read_text())
    spec["pairs"][0]["expect"] = 10.0  # a ~2x model
    f = tmp_path / "too_high.yaml"
    f.write_text(yaml.safe_dump(spec))
    out = tmp_path / "gate.json"
    p = subprocess.run([sys.executable, "-m", "bench.gate", str(f), "--out", str(out), *FAST], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stdout + p.stderr
    fails = [line for line in p.stderr.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 1 and fails[0].startswith("FAIL depth50-eager-fp32:") and "expected 10.00" in fails[0]
    rec = json.loads(out.read_text())
    assert rec["failed"] == ["depth50-eager-fp32"] and not rec["passed"]
    assert {q["name"]: q["verdict"] for q in rec["pairs"]} == {"depth50-eager-fp32": "fail",
                                                               "width50-eager-fp32": "pass"}
    row = next(line for line in p.stdout.splitlines() if line.startswith("| depth50"))
    assert "FAIL" in row and "10.00" in row


def test_write_expectations_records_measured_ratios_minus_the_margin(tmp_path):
    f = tmp_path / "tiny.yaml"
    shutil.copy(TINY, f)
    out = tmp_path / "gate.json"
    assert main([str(f), "--out", str(out), "--write-expectations", "--margin", "0.25", *FAST]) == 0
    rec = json.loads(out.read_text())
    spec, pairs = load(f)  # still a valid expectations file
    assert spec["margin"] == 0.25
    written = {p["name"]: p for p in yaml.safe_load(f.read_text())["pairs"]}
    for q in rec["pairs"]:
        w = written[q["name"]]
        assert w["expect"] == math.floor(q["ratio"] * 0.75 * 100 + 1e-9) / 100
        assert w["measured"]["device"] == rec["device"] and w["measured"]["torch"] == rec["torch"]
        assert w["measured"]["lo"] <= w["measured"]["ratio"] <= w["measured"]["hi"]
        assert w["measured"]["commit"].startswith(rec["commit"])
    assert f.read_text().startswith("# Speedup expectations for the gate")


def test_interleave_times_each_model_in_a_rotating_order():
    """bench.metrics.cost.interleave: `reps` timed calls of each fn per round through the suite's one
    timer, the order rotated by the round number (no model always follows the same other one)."""
    from bench.metrics.cost import interleave

    calls = []
    fns = {n: (lambda n=n: calls.append(n)) for n in ("dense", "a", "b")}
    orders = []
    for i in range(3):
        calls.clear()
        got = interleave(fns, "cpu", reps=2, shift=i)
        assert set(got) == {"dense", "a", "b"} and all(len(v) == 2 and min(v) >= 0 for v in got.values())
        orders.append(calls[::2])
    assert orders == [["dense", "a", "b"], ["a", "b", "dense"], ["b", "dense", "a"]]


def test_gate_fails_on_a_model_made_slower_on_purpose_and_passes_on_the_real_one(tmp_path):
    """The committed CPU expectations, plus a copy of the depth pair whose pruned model does its
    forward three times per call (slowdown: 3, a regression on purpose): the real pair passes, the
    slowed one (measured ~2/3x against an expectation made for ~2x) fails, exit 1, named."""
    spec = yaml.safe_load(TINY.read_text())
    slowed = dict(spec["pairs"][0], name="depth50-slowed", slowdown=3)
    slowed.pop("measured", None)
    spec["pairs"] = [spec["pairs"][0], slowed]
    f = tmp_path / "slowed.yaml"
    f.write_text(yaml.safe_dump(spec))
    out = tmp_path / "gate.json"
    p = subprocess.run([sys.executable, "-m", "bench.gate", str(f), "--out", str(out), *FAST], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stdout + p.stderr
    rec = json.loads(out.read_text())
    pairs = {q["name"]: q for q in rec["pairs"]}
    assert rec["failed"] == ["depth50-slowed"] and pairs[spec["pairs"][0]["name"]]["verdict"] == "pass"
    real, slow = pairs[spec["pairs"][0]["name"]]["ratio"], pairs["depth50-slowed"]["ratio"]
    assert slow == pytest.approx(real / 3, rel=0.35) and pairs["depth50-slowed"]["hi"] < slowed["expect"]
    assert [line.split(":")[0] for line in p.stderr.splitlines() if line.startswith("FAIL")] == ["FAIL depth50-slowed"]


def test_slowdown_must_be_a_whole_number_of_forwards(tmp_path, capsys):
    spec = yaml.safe_load(TINY.read_text())
    spec["pairs"][0]["slowdown"] = 0
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(spec))
    assert main([str(f), "--out", str(tmp_path / "g.json")]) == 2
    assert "slowdown=0" in capsys.readouterr().err
