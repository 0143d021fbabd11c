"""Adding a method touches two files and nothing else (README_add_method.md): a class under the
``bench.api.Method`` contract and ``method/<name>.yaml`` (``_target_``, each keyword argument with its
value or ``${default:}``, and a ``# tags:`` line naming the experiments that sweep it).

Here both live in temporary folders (the module on ``sys.path``, the config on hydra's search path):
the method composes and builds as bench.run builds it, a tiny run of it gives a row, the default
suite's sweep picks it up from its tag, and a config missing something fails with one line naming it.
"""
from __future__ import annotations

import sys

import pytest

from bench import registry
from bench.api import BenchError, Method
from bench.run import execute, make_method
from tests.conftest import compose
from tests.test_configs import hydra_compose, sweep_points

NAME = "added_method"

CLASS = '''
"""A method written by tests/test_add_method.py: removes blocks from the start, after `skip`."""
from bench.api import Budget, Method, Plan
from bench.surgery import blocks_to_keep


class KeepLast(Method):
    granularity = "block"

    def __init__(self, skip: int = 0, note: str = "default"):  # skip: leading blocks kept anyway
        self.skip, self.note = int(skip), note

    def plan(self, net, budget: Budget, calib) -> Plan:
        depth, n = net.units("block")["blocks"], blocks_to_keep(net, budget)
        head = min(self.skip, n)
        kept = sorted(set(range(head)) | set(range(depth - (n - head), depth)))
        return Plan(granularity="block", keep={"blocks": kept}, meta={"method": "added_method"})
'''

CONFIG = '''# A method added from a temporary folder: its class and this file, no other edit
# tags: default_suite
_target_: added_method.KeepLast
skip: ${default:}    # leading blocks kept anyway
note: from-yaml
'''


@pytest.fixture
def added(tmp_path, monkeypatch):
    """The class as a module on sys.path and its config in a folder on hydra's search path; `over`
    puts that folder on the search path, `write(name, text)` adds another method config there."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / f"{NAME}.py").write_text(CLASS)
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    monkeypatch.delitem(sys.modules, NAME, raising=False)
    conf = tmp_path / "conf" / "method"
    conf.mkdir(parents=True)

    def write(name: str, text: str):
        (conf / f"{name}.yaml").write_text(text)

    write(NAME, CONFIG)
    sp = f"file://{tmp_path / 'conf'}"
    return type("Added", (), {"over": [f"hydra.searchpath=[{sp}]"], "searchpath": [sp], "write": staticmethod(write)})


def test_it_composes_and_builds_as_a_run_builds_it(added):
    d = compose(added.over, NAME)
    assert d["method"] == {"_target_": "added_method.KeepLast", "skip": 0, "note": "from-yaml"}
    m = make_method(d)
    assert isinstance(m, Method) and type(m).__name__ == "KeepLast" and (m.skip, m.note) == (0, "from-yaml")
    assert make_method(compose([*added.over, "method.skip=1"], NAME)).skip == 1  # a default, overridden as usual
    assert NAME in registry.names(added.searchpath)
    assert registry.build(NAME, {"skip": 2}, searchpath=added.searchpath).skip == 2


def test_a_tiny_run_of_it_gives_a_row(added, tiny_cfg):
    row = execute(tiny_cfg(NAME, [*added.over, "budget.keep=0.5"]))
    assert row.status == "ok" and row.method == NAME and row.depth == 2 and row.keep_blocks == 0.5
    assert set(row.metrics) == {"cond_acc", "fd_clf", "ssim_teacher"}


def test_the_default_suite_sweeps_it(added):
    """Its tag puts it in experiment=default_suite's sweep, beside the methods already there, at
    both budgets; every point composes and builds."""
    _, before = hydra_compose(["experiment=default_suite"])
    _, sweep = hydra_compose(["experiment=default_suite", *added.over])
    assert sweep["method"].split(",") == sorted([*before["method"].split(","), NAME])
    assert registry.tagged("default_suite", added.searchpath) == sweep["method"].split(",")
    points = [p for p in sweep_points(sweep) if f"method={NAME}" in p]
    assert sorted(p[0] for p in points) == ["budget.keep=0.5", "budget.keep=0.75"]
    for point in points:
        d, _ = hydra_compose(["experiment=default_suite", *added.over, *point])
        assert d["method_name"] == NAME and d["budget"]["measure"] == "blocks" and isinstance(make_method(d), Method)


@pytest.mark.parametrize("text, says", [
    ("note: x\n", r"^method=broken: its config has no _target_ \(the Method class to build\)"),     # no _target_
    ("_target_: collections.OrderedDict\n", r"^method 'broken' does not build a bench\.api\.Method$"),  # no Method
    ("_target_: added_method.KeepLas\n", r"^method\._target_='added_method\.KeepLas' \(broken\) cannot be imported"),
    ("_target_: added_method.KeepLast\nskp: 1\n", r"^method\.skp=1: broken has no such argument \(it takes skip, note\)"),
    ("_target_: added_method.KeepLast\nskp: ${default:}\n", r"^method\.skp=null: broken has no such argument"),
    ("_target_: added_method.KeepLast\nskip: one\n", r"^method\.skip='one': must be an integer"),
])
def test_a_config_missing_something_fails_in_one_line_naming_it(added, text, says):
    added.write("broken", text)
    with pytest.raises(BenchError, match=says) as e:
        make_method(compose(added.over, "broken"))
    assert "\n" not in str(e.value)


def test_lint_names_a_tag_no_experiment_sweeps_and_a_value_written_twice(added):
    added.write("broken", "# tags: default_suit\n_target_: added_method.KeepLast\nskip: 0\nnote: ${default:}\n"
                          "sikp: ${default:}\n")
    assert [p for p in registry.lint(added.searchpath) if "broken" in p] == [
        "method/broken.yaml: tagged 'default_suit', which no experiment sweeps (known: default_suite, "
        "default_suite_random, default_suite_unet, default_suite_width, default_suite_width_random, gpu_tier, "
        "gpu_tier_width)",
        "method/broken.yaml: skip=0 is KeepLast's default; write skip: ${default:}",
        "method/broken.yaml: sikp: ${default:}, but KeepLast has no plain default for 'sikp'"]
