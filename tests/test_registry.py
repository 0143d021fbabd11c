"""The method registry (bench.registry): method configs write no default value (``${default:}`` reads
it from the class) and variants hold only what differs from their base, yet every run config, hash
and run directory is what it was when every value was written out; experiments sweep the methods
whose config carries their tag.

``method_configs.json`` is every method's resolved ``method`` group as composed on main before
default values moved to the classes (issue 18). It changes only with a run's identity: when a class default
changes on purpose, rewrite it with ``python -m tests.test_registry`` and say so in the commit.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bench import registry
from bench.results import run_relpath
from tests.test_configs import hydra_compose, sweep_points

ROOT = Path(__file__).resolve().parent.parent
SNAPSHOT = Path(__file__).resolve().parent / "method_configs.json"


def _canon(d: dict) -> str:
    return json.dumps(d, sort_keys=True)  # what config_hash hashes: 1 and 1.0, [] and {} differ


@pytest.mark.parametrize("name", sorted(json.loads(SNAPSHOT.read_text())))
def test_every_method_resolves_as_before(name):
    """The resolved method group (what bench.run hashes) is the one main resolved, key for key and
    type for type."""
    want = json.loads(SNAPSHOT.read_text())[name]
    d, _ = hydra_compose([f"method={name}"])
    assert _canon(d["method"]) == _canon(want), \
        {k: (d["method"].get(k), want.get(k)) for k in {*d["method"], *want} if d["method"].get(k) != want.get(k)}
    # loaded alone (tests, scripts), eval.* interpolations take their fallbacks: the default eval's values
    assert _canon(registry.load(name)) == _canon(d["method"])


def _run_all() -> tuple[list[str], list[str]]:
    """run_all.sh's suite experiments and the dense line's eval overrides, read from the script."""
    text = (ROOT / "run_all.sh").read_text()
    suites = re.search(r"sweep\(\) \{.*?for e in ([^;]+);", text, re.S).group(1).split()
    dense_eval = max(re.findall(r"DENSE_EVAL=\$\{BENCH_DENSE_EVAL-([^}]*)\}", text), key=len).split()  # the CPU one
    return suites, dense_eval


@pytest.mark.parametrize("results, extra", [("results/runs", "cpu"), ("results/gpu/runs", "cuda")])
def test_committed_rows_are_still_run_all_points(results, extra):
    """Every committed row's run directory is one that ./run_all.sh composes today (CPU rows: the
    default; GPU rows: ``./run_all.sh device=cuda eval=inception``, bench/gpu/device_suite.sh), so no
    committed result is orphaned by a config change."""
    suites, dense_eval = _run_all()
    over = ["device=cuda", "eval=inception"] if extra == "cuda" else []
    dirs = {run_relpath(hydra_compose(["method=dense", "budget.keep=1.0", *(over or dense_eval)])[0])}
    for e in suites:
        for point in sweep_points(hydra_compose([f"experiment={e}"])[1]):
            dirs.add(run_relpath(hydra_compose([f"experiment={e}", *point, *over])[0]))
    committed = {p.parent.relative_to(ROOT / results).as_posix() for p in (ROOT / results).rglob("row.json")}
    assert committed, results
    assert committed <= dirs, sorted(committed - dirs)[:5]


def test_conventions_hold():
    """No value written twice (a literal equal to the class default, or a variant's value equal to its
    base's), ${default:} only on keys with a default, every tag swept by an experiment, every
    _target_ a Method."""
    assert registry.lint() == []


def test_default_resolves_against_the_configs_own_target():
    from omegaconf import OmegaConf

    c = OmegaConf.create({"method": {"_target_": "baselines.width.WidthTaylor", "batch": "${default:}",
                                     "t_stride": 3, "bacth": "${default:}"}})
    assert OmegaConf.to_container(c, resolve=True)["method"] == {"_target_": "baselines.width.WidthTaylor",
                                                                 "batch": 64, "t_stride": 3, "bacth": None}
    c.method._target_ = "baselines.width.WidthRandom"   # no such argument there: None (the run refuses it)
    assert OmegaConf.to_container(c, resolve=True)["method"]["batch"] is None
    c.method._target_ = "baselines.width.NoSuchClass"   # not importable: None (make_method names the _target_)
    assert OmegaConf.to_container(c, resolve=True)["method"]["batch"] is None
    # tuples are written as lists (what OmegaConf and the JSON config make of them)
    assert registry.load("tinyfusion")["u_range"] == [0.0, 1.0]
    # a variant with its own _target_ gets that class's defaults
    assert registry.load("grad_flow_blocks")["_target_"] == "methods.grad_flow.GradFlowBlocks"


def test_a_default_is_overridden_from_the_command_line_as_before():
    d, _ = hydra_compose(["method=obs_diff_nocomp", "method.steps=25"])
    assert (d["method"]["steps"], d["method"]["compensate"], d["method"]["percdamp"]) == (25, False, 0.01)


def test_tags_are_the_files_own():
    """A variant is in no suite its base is in unless its own file says so."""
    assert "obs_diff" in registry.tagged("default_suite_width")
    assert "obs_diff_nocomp" not in registry.tagged("default_suite_width")
    assert registry.tags("magnitude_l2") == ["default_suite", "gpu_tier"] and "magnitude_l1" in registry.tagged("default_suite")
    assert registry.tags("magnitude_width") == ["default_suite_width", "default_suite_unet", "gpu_tier_width"]
    assert "obs_diff_nocomp" not in registry.tagged("gpu_tier_width")


def test_unknown_method_lists_the_known_ones():
    from bench.api import BenchError

    with pytest.raises(BenchError, match=r"method='nope' has no config; available: dense, "):
        registry.load("nope")


if __name__ == "__main__":  # rewrite the snapshot from this checkout's configs (a deliberate identity change)
    snap = {n: hydra_compose([f"method={n}"])[0]["method"] for n in registry.names()}
    SNAPSHOT.write_text("{\n" + ",\n".join(f" {json.dumps(k)}: {_canon(v)}" for k, v in sorted(snap.items())) + "\n}\n")
    print(f"wrote {SNAPSHOT} ({len(snap)} methods)")
