"""bench.ranking: Student-t numbers against known values, the paired test over seeds on synthetic rows
with known answers (a shared seed effect cancels; a noisy difference does not pass), Holm, the best
baseline's choice, the markdown and bench.report's hook."""
from __future__ import annotations

import math
import re

import pandas as pd
import pytest

from bench.ranking import has_seeds_to_compare, holm, mean_ci, paired_test, rank, ranking_markdown, report_ranking, \
    t_quantile, t_two_sided_p


def test_student_t_against_known_values():
    assert t_quantile(0.95, 1) == pytest.approx(12.706204736, rel=1e-8)
    assert t_quantile(0.95, 2) == pytest.approx(4.302652730, rel=1e-8)
    assert t_quantile(0.95, 4) == pytest.approx(2.776445105, rel=1e-8)
    assert t_quantile(0.99, 10) == pytest.approx(3.169272673, rel=1e-8)
    # df = 2 has a closed form: P(|T| >= t) = 1 - t / sqrt(2 + t^2)
    for t in (0.0, 0.5, 2.0, 17.3):
        assert t_two_sided_p(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-12)
    assert t_two_sided_p(1.959963985, 10 ** 6) == pytest.approx(0.05, rel=1e-4)  # -> normal


def test_mean_ci_and_paired_test_known_answers():
    m, half, n = mean_ci([1.0, 2.0, 3.0])
    assert (m, n) == (2.0, 3) and half == pytest.approx(4.302652730 / math.sqrt(3))
    assert math.isnan(mean_ci([5.0])[1]) and mean_ci([])[2] == 0
    # differences -1.0, -1.1, -0.9: mean -1, sd 0.1, t = -10 sqrt(3), df 2
    r = paired_test({0: 9.0, 1: 18.9, 2: 29.1}, {0: 10.0, 1: 20.0, 2: 30.0})
    t = -10 * math.sqrt(3)
    assert r["n"] == 3 and r["diff"] == pytest.approx(-1.0) and r["t"] == pytest.approx(t)
    assert r["p"] == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t)) and r["p"] < 0.01
    assert r["hi"] == pytest.approx(-1.0 + 4.302652730 * 0.1 / math.sqrt(3))
    # only the seeds both have are paired; one common seed is no test
    assert paired_test({0: 1.0, 1: 2.0, 5: 9.0}, {1: 1.0, 0: 0.0, 7: 3.0})["seeds"] == [0, 1]
    assert math.isnan(paired_test({0: 1.0}, {0: 2.0})["p"])
    # every seed moved by exactly the same amount: p = 0; identical: p = 1
    assert paired_test({0: 1.0, 1: 5.0}, {0: 2.0, 1: 6.0})["p"] == 0.0
    assert paired_test({0: 1.0, 1: 5.0}, {0: 1.0, 1: 5.0})["p"] == 1.0


def test_holm_step_down():
    assert holm([0.01, 0.04, 0.03]) == [True, False, False]      # 0.01*3 < .05; 0.03*2 >= .05 stops
    assert holm([0.01, 0.02, 0.04]) == [True, True, True]        # 0.03, 0.04, 0.04
    assert holm([float("nan"), 0.001]) == [False, True]


BASE = dict(model="DiT-D28/2", dataset="fashion-mnist", process="ddpm", device="H100", latency_mode="eager",
            latency_dtype="bf16", latency_batch=512, sampler="ddim", nfe=25, cfg_scale=1.0, eval_precision="bf16",
            metric_impl="none", metric_n=10000, metric_ref="none", fid_impl="adm-pt/fid-helper-7ff4a85c",
            fid_n=10000, fid_ref="fashion-mnist-test", finetune_steps=400, method_version=1, status="ok")
SEED_EFFECT = {0: 0.0, 1: 4.0, 2: -3.0}  # what a fine-tune seed does to every row of that seed


def rows_of(spec: dict, budget: float = 0.5, measure: str = "blocks") -> list[dict]:
    """spec: method -> FID per seed before the shared seed effect."""
    return [dict(BASE, method=m, budget_measure=measure, budget_keep=budget, seed=s, m_fid=v + SEED_EFFECT[s],
                 m_kid=v / 1000, latency_ms=5.0) for m, vals in spec.items() for s, v in enumerate(vals)]


def synthetic() -> pd.DataFrame:
    rows = rows_of({
        "shortgpt": [20.0, 20.2, 19.8],      # the best baseline (mean 20)
        "magnitude_l1": [25.0, 25.0, 25.0],  # a worse baseline
        "good": [18.0, 18.1, 17.9],          # 2 better at every seed: differs (the seed effect cancels)
        "noisy": [17.0, 24.0, 16.0],         # 1 better on average, not consistently: does not differ
        "same": [20.1, 20.1, 19.8],          # no real difference
    }) + rows_of({"magnitude_width": [30.0, 30.0, 30.0], "x_width": [29.0, 29.1, 28.9]}, 0.75, "macs")
    rows += [dict(BASE, method="dense", budget_measure="blocks", budget_keep=1.0, seed=s, m_fid=10.0 + SEED_EFFECT[s],
                  m_kid=0.01, latency_ms=10.0) for s in range(3)]
    return pd.DataFrame(rows)


BASELINES = ["shortgpt", "magnitude_l1", "magnitude_width"]


def test_ranking_finds_the_methods_that_differ_from_the_best_baseline():
    lines = rank(synthetic(), "fid", BASELINES).set_index(["method"])
    assert lines.loc["dense", "best_baseline"] is None and math.isnan(lines.loc["dense", "p"])
    half = lines.loc[["good", "noisy", "same", "shortgpt", "magnitude_l1"]]
    assert set(half["best_baseline"]) == {"shortgpt"} and math.isnan(lines.loc["shortgpt", "p"])
    assert lines.loc["good", "diff"] == pytest.approx(-2.0) and lines.loc["good", "differs"]
    assert lines.loc["good", "p"] < 0.01 and lines.loc["good", "holm"]
    assert lines.loc["noisy", "diff"] == pytest.approx(-1.0) and not lines.loc["noisy", "differs"]
    assert not lines.loc["same", "differs"] and lines.loc["magnitude_l1", "differs"]  # 5 worse at every seed
    # the interval over seeds carries the seed effect, the paired difference does not
    assert lines.loc["good", "fid_ci"] > 5 and lines.loc["good", "diff_hi"] - lines.loc["good", "diff_lo"] < 1
    assert lines.loc["good", "speedup"] == pytest.approx(2.0)
    # width budget 0.75: its own best baseline
    assert lines.loc["x_width", "best_baseline"] == "magnitude_width" and lines.loc["x_width", "differs"]
    order = rank(synthetic(), "fid", BASELINES)["method"].tolist()
    assert order[0] == "dense" and order[1:3] == ["x_width", "magnitude_width"] and order[3] == "good"


def test_markdown_and_the_report_hook():
    md = ranking_markdown(synthetic(), "fid", BASELINES)
    line = next(ln for ln in md.splitlines() if "| good |" in ln)
    assert line.startswith("| blocks 0.5 | good | method | 0,1,2 | 18.3 ± 9.0 | 0.01800 ± 0.00025 | 2.00 ± 0.00 |")
    assert "| shortgpt | -2.00 [-2.25, -1.75] | <0.001 |" in line
    assert line.endswith("| yes | yes |")
    assert "| blocks 0.5 | shortgpt | baseline | 0,1,2 |" in md and "(best)" in md
    assert "paired t-test" in md and "DiT-D28/2 · fashion-mnist" in md
    assert has_seeds_to_compare(synthetic())
    one_seed = synthetic()[lambda d: d["seed"] == 0]
    assert not has_seeds_to_compare(one_seed) and report_ranking(one_seed) is None
    rk = report_ranking(synthetic())
    assert rk["metric"] == "fid" and rk["markdown"].startswith("# Ranking with confidence (fid")
    assert [len(c) for s in rk["sections"] for c in s["cells"]] == [len(s["head"]) for s in rk["sections"]
                                                                    for _ in s["cells"]]


def test_bench_report_writes_the_ranking_beside_the_tables(tmp_path):
    from bench.report import build_report
    from bench.results import Row, load_rows, write_row

    keep = {f.name for f in __import__("dataclasses").fields(Row)}
    for r in synthetic().to_dict("records"):
        d = {k: v for k, v in r.items() if k in keep}
        d.update(run=f"{r['method']}-{r['budget_keep']}-s{r['seed']}", granularity="block", keep_blocks=1.0,
                 keep_params=1.0, keep_macs=r["budget_keep"], depth=28, params_M=1.0, macs_G=1.0,
                 latency_iqr_ms=0.01, throughput_img_s=1.0, peak_mem_MB=None, cfg_convention="all",
                 git_sha="abc", config_sha="0" * 16, metrics={"fid": r["m_fid"], "kid": r["m_kid"]})
        write_row(Row(**d), tmp_path / "runs" / d["run"])
    paths = build_report(load_rows(tmp_path / "runs"), tmp_path / "out", "tier")
    rank_md = tmp_path / "out" / "tables" / "tier_ranking.md"
    assert rank_md in paths and "| blocks 0.5 | good | method |" in rank_md.read_text()
    # the page shows the same tables, sortable by the numbers behind the cells, and the verdicts
    page = (tmp_path / "out" / "tier.html").read_text()
    sec = page[page.index('<section id="ranking">'):]
    sec = sec[:sec.index("</section>")]
    assert '<a href="#ranking">' in page and sec.count('<table class="sortable">') == 1
    good = next(r for r in re.findall(r"<tr>.*?</tr>", sec, flags=re.S) if '<td data-sort="good">good</td>' in r)
    assert '<td class=num data-sort="0.5">blocks 0.5</td>' in good and ">18.3 ± 9.0</td>" in good
    assert "<li><strong>budget 0.5</strong>: 2 of 4 methods differ from the best baseline shortgpt" in sec


def test_each_budget_says_which_methods_are_separated_or_that_none_is_and_why():
    """Under each table, one line per budget: the methods the paired test separates from the best baseline
    (better or worse), or, when none is, that every Δ interval contains 0, the nearest miss and the t it needs."""
    from bench.ranking import verdicts

    got = verdicts(rank(synthetic(), "fid", BASELINES), "fid")
    half = next(v for v in got if v.startswith("- **budget 0.5**"))
    assert "2 of 4 methods differ from the best baseline shortgpt at 95%" in half
    assert "good better (Δ -2.00" in half and "magnitude_l1 worse (Δ 5.00" in half and "noisy" not in half
    assert any(v.startswith("- **budget 0.75**: 1 of 1 methods differ") for v in got)
    close = rows_of({"shortgpt": [20.0, 20.2, 19.8], "noisy": [17.0, 24.0, 16.0]})
    [none] = verdicts(rank(pd.DataFrame(close), "fid", BASELINES), "fid")
    assert none.startswith("- **budget 0.5**: none of 1 methods differs from the best baseline shortgpt at 95%")
    assert "The nearest is noisy (Δ -1.00" in none and "exceed 4.30 standard errors" in none
    assert "none of" in ranking_markdown(pd.DataFrame(close), "fid", BASELINES)


def test_the_speedup_column_comes_from_the_latency_pass_where_it_timed_the_rows():
    """Rows timed while workers shared the GPU are flagged (no speedup from them); the one-process latency
    pass's paired ratios give the line's speedup instead, where it timed every row of the line."""
    rows = synthetic().assign(latency_flags=[["shared"]] * len(synthetic()))
    rows["run"] = [f"{m}-{k}-s{s}" for m, k, s in zip(rows["method"], rows["budget_keep"], rows["seed"])]
    assert rank(rows, "fid", BASELINES)["speedup"].isna().all()  # flagged: none from the rows' own timings
    timed = {r: {"speedup": 1.9 + 0.1 * s} for r, s in zip(rows["run"], rows["seed"]) if r.startswith("good-")}
    lines = rank(rows, "fid", BASELINES, latency_pass={"runs": timed}).set_index("method")
    assert lines.loc["good", "speedup"] == pytest.approx(2.0) and lines.loc["good", "speedup_ci"] > 0
    assert math.isnan(lines.loc["noisy", "speedup"])  # not in the pass


def test_a_line_of_other_fine_tune_steps_is_named_as_the_report_names_it():
    """The teacher's rows (dense at 0 fine-tune steps) and the fine-tuned dense rows are two lines; the ranking names
    them as bench.report's table does, "dense (finetune_steps 0)" and "dense", not "dense" twice."""
    teacher = [dict(BASE, method="dense", budget_measure="blocks", budget_keep=1.0, seed=0, m_fid=9.0, m_kid=0.009,
                    latency_ms=10.0, finetune_steps=0)]
    md = ranking_markdown(pd.concat([synthetic(), pd.DataFrame(teacher)], ignore_index=True), "fid", BASELINES)
    dense = [ln.split(" | ")[1] for ln in md.splitlines() if ln.startswith("| 1 | dense")]
    assert sorted(dense) == ["dense", "dense (finetune_steps 0)"]
    assert "| blocks 0.5 | good | method |" in md  # lines at the usual steps carry no suffix
