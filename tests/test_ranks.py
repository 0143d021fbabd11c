"""bench.gpu.ranks: the same cell made by one process and by N ranks: FID inside each other's interval, the
fine-tune's logged losses within a relative tolerance; bad input names the fix."""
from __future__ import annotations

import json
from pathlib import Path

from bench.gpu import ranks
from tests.conftest import ROOT

REL = "DiT-D2-2-digits-ddpm/last_k/blocks0.5-s0-cuda-abc"


def _run(root: Path, world: int, fid: float, ci: tuple[float, float], losses: dict[int, float]) -> Path:
    d = root / REL
    d.mkdir(parents=True)
    (d / "row.json").write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3", "git_sha": "abc",
                                            "metrics": {"fid": fid, "fid_ci_lo": ci[0], "fid_ci_hi": ci[1]}}))
    log = [{"event": "start", "world": world}] + [{"event": "finetune", "step": s, "loss": v} for s, v in losses.items()]
    (d / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log))
    return d


LOSS = {0: 0.1465, 50: 0.0384, 100: 0.0343, 299: 0.0442}


def test_the_same_cell_on_two_ranks_passes_and_the_record_says_so(tmp_path, capsys):
    _run(tmp_path / "one", 1, 19.50, (19.10, 19.85), LOSS)
    _run(tmp_path / "many", 8, 19.62, (19.20, 19.97), {s: v * 1.01 for s, v in LOSS.items()})
    assert ranks.main(["--one", str(tmp_path / "one"), "--many", str(tmp_path / "many"), "--out", str(tmp_path / "o")]) == 0
    rec = json.loads((tmp_path / "o" / "ranks_n8.json").read_text())
    r = rec["runs"][REL]
    assert rec["passed"] and r["fid_equal"] and r["loss_equal"] and r["world"] == 8 and r["loss_steps"] == [0, 50, 100, 299]
    assert abs(r["loss_max_rel_diff"] - 0.01) < 1e-9
    md = (tmp_path / "o" / "ranks_n8.md").read_text()
    assert "every check passed" in md and "| 19.50 [19.10, 19.85] | 19.62 [19.20, 19.97] | yes | 4 |" in md
    assert md in capsys.readouterr().out


def test_a_fid_outside_the_interval_or_a_loss_past_the_tolerance_fails(tmp_path):
    _run(tmp_path / "one", 1, 19.50, (19.10, 19.85), LOSS)
    _run(tmp_path / "fid", 2, 20.40, (20.00, 20.80), LOSS)  # outside the one-process interval
    _run(tmp_path / "loss", 2, 19.50, (19.10, 19.85), {**LOSS, 100: LOSS[100] * 1.06})
    assert ranks.main(["--one", str(tmp_path / "one"), "--many", str(tmp_path / "fid"), "--out", str(tmp_path / "o")]) == 1
    r = json.loads((tmp_path / "o" / "ranks_n2.json").read_text())["runs"][REL]
    assert (r["fid_equal"], r["loss_equal"]) == (False, True)
    assert "a check FAILED" in (tmp_path / "o" / "ranks_n2.md").read_text()
    r = ranks.compare(tmp_path / "one", tmp_path / "loss")["runs"][REL]
    assert (r["fid_equal"], r["loss_equal"]) == (True, False) and abs(r["loss_max_rel_diff"] - 0.06) < 1e-9
    assert ranks.compare(tmp_path / "one", tmp_path / "loss", loss_rtol=0.07)["passed"]


def test_two_seeds_of_a_committed_tier_row_are_told_apart_by_the_loss_check():
    """The tolerance against real trajectories: the GPU tier's last_k at keep 0.5, seeds 0, 1 and 2 (one H100,
    300 steps, the same config but the seed) differ by far more than 0.05 at their worst logged step; a run
    against itself differs by nothing."""
    runs = sorted((ROOT / "results/gpu/tier/DiT-D28-2-fashion-mnist-ddpm/last_k").glob("blocks0.5-s[012]-*"))
    assert len(runs) == 3
    worst = [ranks.compare_run(a, b)["loss_max_rel_diff"] for i, a in enumerate(runs) for b in runs[i + 1:]]
    assert min(worst) > 4 * ranks.LOSS_RTOL
    same = ranks.compare_run(runs[0], runs[0])
    assert same["loss_equal"] and same["fid_equal"] and same["loss_max_rel_diff"] == 0 and len(same["loss_steps"]) == 7


def test_bad_input_names_the_fix(tmp_path, capsys):
    one = _run(tmp_path / "one", 1, 19.5, (19.1, 19.85), LOSS)
    args = ["--one", str(tmp_path / "one"), "--out", str(tmp_path / "o")]
    assert ranks.main([*args, "--many", str(tmp_path / "empty")]) == 2
    assert "no finished run (row.json)" in capsys.readouterr().err
    _run(tmp_path / "other" / "x", 2, 19.5, (19.1, 19.85), LOSS)  # a run --one does not have
    assert ranks.main([*args, "--many", str(tmp_path / "other")]) == 2
    assert "must hold the same run made by one process" in capsys.readouterr().err
    _run(tmp_path / "many", 2, 19.5, (19.1, 19.85), LOSS)
    (one / "log.jsonl").write_text(json.dumps({"event": "start", "world": 4}) + "\n")
    assert ranks.main([*args, "--many", str(tmp_path / "many")]) == 2
    assert "made by 4 ranks: --one takes the runs of one process" in capsys.readouterr().err
    assert ranks.main([*args, "--many", str(tmp_path / "many"), "--loss-rtol", "2"]) == 2
    assert not (tmp_path / "o").exists()
