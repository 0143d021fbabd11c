"""methods.entpruner.inspect on a tiny teacher trained once (CPU, digits, 32 probes): the variants' CED
equal ced_scores, the entropies it compares H with are their closed forms, the removal sets are the
one-shot plans', the md carries the json's numbers, and a missing teacher stops with the fix."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from bench.api import Budget
from methods.entpruner import EntPruner
from methods.entpruner import inspect as I
from methods.entpruner.ced import ced_scores
from tests.conftest import ROOT, TINY, compose

pytestmark = pytest.mark.usefixtures("one_thread")
LOG_2PI_E = math.log(2 * math.pi) + 1


@pytest.fixture(scope="module")
def inspected(tmp_path_factory):
    """(report, md text, overrides, loaded (method, net, calib)) of one inspect run on every outputs kind."""
    from bench import checks
    from bench.run import make_method, teacher

    tmp = tmp_path_factory.mktemp("ced_inspect")
    over = [*TINY, f"paths.artifacts={tmp / 'art'}", f"paths.results={tmp / 'runs'}"]
    cfg = compose(over, "entpruner")
    method = make_method(cfg)
    teacher(cfg, checks.check_inputs(cfg, checks.check(cfg), method), "cpu")  # the tiny teacher, trained here once
    assert I.main(["--out", str(tmp / "out"), "--outputs", "prediction,x0,samples", *over]) == 0
    report = json.loads((tmp / "out" / "ced_inspect.json").read_text())
    md = (tmp / "out" / "ced_inspect.md").read_text()
    return report, md, over, I.load(I.compose_run(over))[:3]


def test_variants_equal_ced_scores_exactly(inspected):
    report, _, _, (method, net, calib) = inspected
    d = report["method"]["default_variant"]
    assert (d["outputs"], d["name"]) == ("prediction", "class/gaussian_lw")  # EntPruner's defaults
    ref = method.ced(net, calib, per_bin=False)
    v = report["kinds"]["prediction"]["variants"]["class/gaussian_lw"]
    assert v["ced"] == ref["ced"] and v["H"] == ref["H"] and v["H_ablated"] == ref["H_ablated"]
    assert v["spearman"]["default"] == pytest.approx(1.0)
    for kind, name, kw in (("x0", "bin/knn", dict(condition="bin", estimator="knn")),
                           ("samples", "pooled/diagonal", dict(condition="pooled", estimator="diagonal")),
                           ("prediction", "class/gaussian_none", dict(shrinkage="none"))):
        r = ced_scores(net, calib, outputs=kind, per_bin=False, **kw)
        assert report["kinds"][kind]["variants"][name]["ced"] == r["ced"], (kind, name)
    assert len(report["kinds"]) == 3 and all(len(k["variants"]) == 12 for k in report["kinds"].values())


def test_reference_entropies_are_their_closed_forms(inspected):
    report = inspected[0]
    pooled = report["kinds"]["prediction"]["variants"]["pooled/gaussian_lw"]
    assert pooled["dim"] == {"mean": 31.0, "min": 31, "max": 31}  # 32 probes of 64 values: PCA to n - 1
    assert pooled["H_noise"] == pytest.approx(31 / 2 * LOG_2PI_E, abs=1e-12)
    assert report["kinds"]["x0"]["variants"]["class/diagonal"]["dim"]["min"] == 64  # no PCA for the diagonal
    seen_lw1 = seen_both = 0
    for k in report["kinds"].values():
        for v in k["variants"].values():
            assert v["H_noise"] == pytest.approx(v["dim"]["mean"] / 2 * LOG_2PI_E, abs=1e-9)
            if v["estimator"] == "gaussian":  # for a given trace the isotropic Gaussian has the most entropy
                assert v["H"] <= v["H_iso"] + 1e-9
            lw = v["lw_intensity"]
            assert (lw is not None) == ((v["estimator"], v["shrinkage"]) == ("gaussian", "ledoit_wolf"))
            if lw and lw["min"] == 1.0:  # full shrinkage: H is that of the same-trace isotropic Gaussian,
                seen_lw1 += 1             # and CED too where the ablated outputs are fully shrunk as well
                assert v["H"] == pytest.approx(v["H_iso"], abs=1e-9)
                if v["lw_intensity_ablated"]["min"] == 1.0:
                    seen_both += 1
                    assert v["ced"] == pytest.approx(v["iso_ced"], rel=1e-9, abs=1e-9)
            assert all(s >= 0 for s in v["variance_share"]) and len(v["ced"]) == len(report["units"])
    assert seen_lw1 >= seen_both >= 1


def test_removal_sets_are_the_oneshot_plans(inspected):
    report, _, _, (method, net, calib) = inspected
    depth = len(report["units"])
    assert report["keeps"] == {"0.75": 3, "0.5": 2}
    for kind, name, kw in (("prediction", "class/gaussian_lw", {}),
                           ("x0", "pooled/knn", dict(outputs="x0", condition="pooled", estimator="knn"))):
        v = report["kinds"][kind]["variants"][name]
        for keep, n_keep in report["keeps"].items():
            plan = EntPruner(schedule="oneshot", **kw).plan(net, Budget("blocks", float(keep)), calib)
            assert len(v["removed"][keep]) == depth - n_keep
            assert sorted(v["removed"][keep] + plan.keep["blocks"]) == report["units"]


def test_markdown_carries_the_json_numbers(inspected):
    report, md, _, _ = inspected
    for kind, k in report["kinds"].items():
        section = md.split(f"## outputs={kind}\n")[1].split("\n## ")[0]
        for name, v in k["variants"].items():
            (row,) = [ln for ln in section.splitlines() if ln.startswith(f"| {name} |")]
            cells = [c.strip() for c in row.strip("|").split("|")]
            sp = v["spearman"]
            assert cells[2:6] == [f"{v[x]:.2f}" for x in ("H", "H_iso", "H_noise", "H_noise_draw")]
            assert cells[8:10] == [",".join(map(str, v["removed"][x])) for x in ("0.75", "0.5")]
            assert cells[10:] == [I.fmt(sp[x]) for x in ("default", "block_index", "variance_share", "iso_ced")]
            for cell, lw in zip(cells[6:8], (v["lw_intensity"], v["lw_intensity_ablated"])):
                assert cell == (f"{lw['mean']:.3f} [{lw['min']:.3f}, {lw['max']:.3f}]" if lw else "-")
    d = report["kinds"]["prediction"]["variants"]["class/gaussian_lw"]
    assert f"H = {d['H']:.2f} nats" in md and report["teacher"]["sha256"][:16] in md
    assert md.count("## Removal sets at keep") == 2


def test_missing_teacher_stops_with_the_fix(tmp_path):
    over = [*TINY, f"paths.artifacts={tmp_path / 'art'}"]
    p = subprocess.run([sys.executable, "-m", "methods.entpruner.inspect", "--out", str(tmp_path / "out"), *over],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.startswith("error: no teacher at ") and "import-teacher" in p.stderr
    assert not (tmp_path / "out").exists() and not list((tmp_path / "art").glob("teachers/*/final.pt"))
    assert I.main(["--variants", "class/gauss", *over]) == 2  # a misspelt variant: before anything is loaded
