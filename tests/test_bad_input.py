"""A user's mistake stops before anything is written: one line naming the key, the value and a fix
that works; exit status 2; no traceback; no run directory (bench.checks, bench.run.cli).

The matrix runs in-process through `bench.run.cli`, the function the command line calls with the
resolved config (so a traceback would surface here as an uncaught exception); a few cases go
through the real command line as well."""
from __future__ import annotations

import re

import pytest
import torch

from tests.conftest import TINY, compose, run_cli


def _file(tmp_path, name: str, content: bytes = b"x") -> str:
    p = tmp_path / name
    p.write_bytes(content)
    return str(p)


def _wrong_shape_ckpt(tmp_path) -> str:
    """A DiT-S/2 state dict (official layout) for the 4-block test DiT: keys and shapes mismatch."""
    from bench.models import build

    with torch.device("meta"):
        sd = build("DiT-S/2", input_size=8, in_channels=1, num_classes=10).net.state_dict()
    p = tmp_path / "dit_s2.pt"
    torch.save({k: torch.zeros(v.shape) for k, v in sd.items()}, p)
    return str(p)


SIT = ["model=sit_digits", "model.name=SiT-T/2"]  # the tiny flow model (SiT)

# (id, overrides, method, the key the message must name). `{tmp}` is the test's folder; callables
# of tmp_path give an override value that needs a file.
CASES = [
    # budget
    ("keep-zero", ["budget.keep=0"], "dense", "budget.keep"),
    ("keep-above-one", ["budget.keep=1.5"], "dense", "budget.keep"),
    ("measure-unknown", ["budget.measure=flops"], "dense", "budget.measure"),
    ("keep-infeasible", ["budget.keep=0.01"], "shortgpt", "budget.keep"),
    ("round-to-zero", ["+budget.round_to=0", "budget.measure=macs"], "magnitude_width", "budget.round_to"),
    ("budget-key-unknown", ["+budget.kep=0.5"], "dense", "budget.kep"),
    # top level
    ("seed-negative", ["seed=-1"], "dense", "seed"),
    ("device-unknown", ["device=gpu"], "dense", "device"),
    ("stop-after-unknown", ["stop_after=score"], "dense", "stop_after"),
    ("progress-not-bool", ["progress=maybe"], "dense", "progress"),
    # calib
    ("calib-n-zero", ["calib.n=0"], "dense", "calib.n"),
    ("calib-bins-zero", ["calib.bins=0"], "dense", "calib.bins"),
    ("calib-bins-above-n", ["calib.bins=64"], "dense", "calib.bins"),
    # finetune
    ("ft-batch-zero", ["finetune.batch=0"], "dense", "finetune.batch"),
    ("ft-lr-zero", ["finetune.lr=0"], "dense", "finetune.lr"),
    ("ft-lr-text", ["finetune.lr=fast"], "dense", "finetune.lr"),
    ("ft-steps-negative", ["finetune.steps=-5"], "dense", "finetune.steps"),
    ("ft-ema-above-one", ["finetune.ema_decay=1.5"], "dense", "finetune.ema_decay"),
    ("ft-ckpt-every-zero", ["finetune.ckpt_every=0"], "dense", "finetune.ckpt_every"),
    ("ft-distill-above-one", ["finetune.distill=2"], "dense", "finetune.distill"),
    ("ft-unknown-key", ["+finetune.warmup=10"], "dense", "finetune.warmup"),
    # teacher
    ("teacher-steps-zero", ["teacher.steps=0"], "dense", "teacher.steps"),
    ("teacher-batch-zero", ["teacher.batch=0"], "dense", "teacher.batch"),
    # eval: sampler, guidance, scorer
    ("eval-steps-zero", ["eval.steps=0"], "dense", "eval.steps"),
    ("eval-steps-above-T", ["eval.steps=5000"], "dense", "eval.steps"),
    ("eval-n-zero", ["eval.n=0"], "dense", "eval.n"),
    ("eval-batch-zero", ["eval.batch=0"], "dense", "eval.batch"),
    ("eval-cfg-negative", ["eval.cfg_scale=-1"], "dense", "eval.cfg_scale"),
    ("eval-sampler-of-flow", ["eval.sampler=euler"], "dense", "eval.sampler"),
    ("eval-sampler-of-ddpm-on-sit", ["model=sit_digits", "model.name=SiT-T/2", "eval.sampler=ddim"], "dense",
     "eval.sampler"),
    ("eval-sampler-unknown", ["eval.sampler=dpmpp"], "dense", "eval.sampler"),
    ("eval-skip-unknown", ["eval.skip=cubic"], "dense", "eval.skip"),
    ("eval-labels-unknown", ["eval.labels=uniform"], "dense", "eval.labels"),
    ("eval-cfg-convention-unknown", ["eval.cfg_convention=dit4"], "dense", "eval.cfg_convention"),
    ("eval-scorer-none-alone", ["eval.scorer=none"], "dense", "eval.scorer"),
    # eval.latency
    ("latency-tf32-on-cpu", ["eval.latency.dtype=tf32"], "dense", "eval.latency.dtype"),
    ("latency-mode-unknown", ["eval.latency.mode=jit"], "dense", "eval.latency.mode"),
    ("latency-batch-zero", ["eval.latency.batch=0"], "dense", "eval.latency.batch"),
    ("latency-few-reps", ["eval.latency.allow_few=false", "eval.latency.reps=5"], "dense", "eval.latency.reps"),
    # eval.inception
    ("inception-n-above-eval-n", ["eval=inception", "eval.inception.n=100000"], "dense", "eval.inception.n"),
    ("inception-backend-unknown", ["eval=inception", "eval.inception.backend=tf"], "dense", "eval.inception.backend"),
    ("inception-weights-missing", ["eval=inception", "eval.inception.weights={tmp}/none.pt"], "dense",
     "eval.inception.weights"),
    ("inception-ref-missing", ["eval=inception", "eval.inception.ref_npz={tmp}/ref.npz"], "dense",
     "eval.inception.ref_npz"),
    # model
    ("model-input-size-zero", ["model.input_size=0"], "dense", "model.input_size"),
    ("model-unknown-key", ["+model.hiden_size=64"], "dense", "model.hiden_size"),
    ("model-name-unknown", ["model.name=DiT-Q/2"], "dense", "model.name"),
    ("model-process-unknown", ["model.process.kind=score"], "dense", "model.process.kind"),
    ("model-process-key-unknown", ["+model.process.num_timestep=10"], "dense", "model.process.num_timestep"),
    ("model-heads-do-not-divide", ["+model.num_heads=5"], "dense", "model."),
    ("ckpt-missing", ["model.ckpt={tmp}/none.pt"], "dense", "model.ckpt"),
    ("ckpt-corrupt", ["model.ckpt=" + "{file:corrupt.pt}"], "dense", "model.ckpt"),
    ("ckpt-wrong-shape", ["model.ckpt={wrong_shape}"], "dense", "model.ckpt"),
    ("vae-unknown", ["+model.vae=no-such-vae"], "dense", "model.vae"),
    # data
    ("data-unknown-key", ["+data.foo=1"], "dense", "data.foo"),
    ("data-kind-unknown", ["data.kind=hdf5"], "dense", "data.kind"),
    ("data-folder-missing", ["data=image_folder", "data.root={tmp}/no_images", "model.in_channels=3"], "dense",
     "data.root"),
    # method keyword arguments
    ("method-option-unknown", ["method.inputs=sideways"], "shortgpt", "method.inputs"),
    ("method-type", ["method.batch_size=many"], "shortgpt", "method.batch_size"),
    ("method-unknown-kwarg", ["+method.depth=3"], "shortgpt", "method.depth"),
    ("method-own-range", ["method.thr=1.5"], "diff_pruning", "method.thr"),
    ("method-mask-with-finetune", ["budget.keep=1.0"], "obs_diff_nm", "finetune=none"),
    ("sit-steps-zero", ["model=sit_digits", "model.name=SiT-T/2", "eval.steps=0"], "dense", "eval.steps"),
    # samplers: DDIM's integer stride, SiT's SDE and ODE settings (model.process)
    ("ddim-count-no-integer-stride", ["eval.sampler=ddim", "eval.steps=37"], "dense", "eval.steps"),
    ("sit-sde-form-sbdm", [*SIT, "eval.sampler=sde", "model.process.diffusion_form=SBDM"], "dense",
     "model.process.diffusion_form"),
    ("sit-sde-form-unknown", [*SIT, "model.process.diffusion_form=cosine"], "dense", "model.process.diffusion_form"),
    ("sit-last-step-unknown", [*SIT, "model.process.last_step=mean"], "dense", "model.process.last_step"),
    ("sit-last-step-size-zero", [*SIT, "model.process.last_step_size=0"], "dense", "model.process.last_step_size"),
    ("sit-diffusion-norm-negative", [*SIT, "model.process.diffusion_norm=-1"], "dense", "model.process.diffusion_norm"),
    ("sit-atol-zero", [*SIT, "eval.sampler=dopri5", "model.process.atol=0"], "dense", "model.process.atol"),
    ("sit-rtol-text", [*SIT, "eval.sampler=dopri5", "model.process.rtol=loose"], "dense", "model.process.rtol"),
    ("sit-sde-heun-without-last-step", [*SIT, "eval.sampler=sde_heun", "model.process.last_step=null"], "dense",
     "model.process.last_step"),
    ("sit-sde-one-step", [*SIT, "eval.sampler=sde", "eval.steps=1"], "dense", "eval.steps"),
    # cluster (checked in the job as well: the launcher has used it by then)
    ("cluster-timeout-zero", ["cluster=slurm", "cluster.timeout_min=0"], "dense", "cluster.timeout_min"),
    ("cluster-sigterm-unknown", ["cluster=slurm", "cluster.on_sigterm=never"], "dense", "cluster.on_sigterm"),
    # output folders
    ("results-under-a-file", ["paths.results={file:plain}/runs"], "dense", "paths.results"),
    ("artifacts-under-a-file", ["paths.artifacts={file:plain}/art"], "dense", "paths.artifacts"),
]


def _expand(overrides: list[str], tmp_path) -> list[str]:
    out = []
    for o in overrides:
        o = o.replace("{tmp}", str(tmp_path))
        if "{wrong_shape}" in o:
            o = o.replace("{wrong_shape}", _wrong_shape_ckpt(tmp_path))
        if m := re.search(r"\{file:([^}]+)\}", o):
            o = o.replace(m.group(0), _file(tmp_path, m.group(1), b"not a checkpoint at all"))
        out.append(o)
    return out


@pytest.mark.parametrize("overrides,method,key", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_stops_with_one_line_naming_the_key(overrides, method, key, tmp_path, capsys):
    from bench.run import cli

    runs, art = tmp_path / "runs", tmp_path / "art"
    over = _expand(overrides, tmp_path)
    paths = [o for o in (f"paths.results={runs}", f"paths.artifacts={art}") if o.split("=")[0] not in
             {x.split("=")[0] for x in over}]
    cfg = compose(TINY + paths + over, method)
    with pytest.raises(SystemExit) as exc:
        cli(cfg)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "\n" not in lines[0][len("error:"):].strip(), err
    assert key in lines[0], err
    assert not runs.exists(), "a run directory was written before the input was checked"
    assert not (art / "runs").exists()


def _suggested_fix(message: str) -> str | None:
    m = re.search(r"e\.g\. ([\w.]+=\S+)$", message)
    return m.group(1) if m else None


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in {
    "seed-negative", "calib-n-zero", "ft-batch-zero", "ft-lr-zero", "ft-ema-above-one", "teacher-steps-zero",
    "eval-steps-zero", "eval-cfg-negative", "latency-batch-zero", "model-input-size-zero", "eval-n-zero"}],
    ids=lambda c: c[0])
def test_the_suggested_fix_works(case, tmp_path):
    """The message's `e.g. key=value`, applied as an override, passes the same check."""
    from bench.api import BenchError
    from bench.checks import check

    _, overrides, method, key = case
    base = TINY + [f"paths.results={tmp_path / 'runs'}", f"paths.artifacts={tmp_path / 'art'}"]
    with pytest.raises(BenchError) as exc:
        check(compose(base + overrides, method))
    fix = _suggested_fix(str(exc.value))
    assert fix and fix.startswith(key + "="), str(exc.value)
    check(compose(base + overrides + [fix], method))


def test_wrong_shape_checkpoint_suggests_overrides_hydra_accepts(tmp_path):
    """The mismatch message's overrides build the model the checkpoint was made for: applied on the
    command line (hydra accepts every key), the checkpoint loads."""
    from bench.api import BenchError, Budget
    from bench.checks import _arch
    from bench.run import make_method

    ckpt = _wrong_shape_ckpt(tmp_path)
    base = TINY + [f"paths.results={tmp_path / 'runs'}", f"paths.artifacts={tmp_path / 'art'}", f"model.ckpt={ckpt}"]
    cfg = compose(base, "dense")
    with pytest.raises(BenchError) as exc:
        _arch(cfg, Budget("blocks", 1.0), make_method(cfg))
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("model.ckpt=")
    fix = re.search(r"with (model\.name=.*?), or pass", msg).group(1).split()
    fixed = compose(base + fix, "dense")
    _arch(fixed, Budget("blocks", 1.0), make_method(fixed))  # the checkpoint loads: no error


@pytest.mark.slow
def test_command_line_bad_input_has_no_traceback(tmp_path):
    """The real entry point: hydra parses the overrides, bench.run prints one line and exits 2."""
    for over, key in [(["eval.steps=0"], "eval.steps"), (["model.ckpt=/nonexistent/DiT.pt"], "model.ckpt"),
                      (["method=shortgpt", "method.inputs=sideways"], "method.inputs")]:
        r = run_cli(TINY + [f"paths.results={tmp_path / 'runs'}", f"paths.artifacts={tmp_path / 'art'}", *over])
        assert r.returncode == 2, r.stderr[-2000:]
        assert "Traceback" not in r.stderr and key in r.stderr
        assert not (tmp_path / "runs").exists()


def test_samples_that_cannot_be_meaningful_are_refused():
    """NaN/Inf samples (a diverged model) and all-identical samples (a collapsed one) stop the run
    before scoring: no row is written from them."""
    from bench.api import BenchError
    from bench.run import check_samples

    cfg = compose(TINY)
    ok = torch.randn(6, 1, 8, 8)
    check_samples(ok, cfg)
    bad = ok.clone()
    bad[2, 0, 3, 3] = float("nan")
    with pytest.raises(BenchError, match="1 of 6 samples contain NaN"):
        check_samples(bad, cfg)
    with pytest.raises(BenchError, match="all 6 samples are the same image"):
        check_samples(ok[:1].repeat(6, 1, 1, 1), cfg)


def test_install_stops_before_filling_the_disk(tmp_path):
    """./run_all.sh refuses to start an install that cannot fit (a `df` on PATH reports 1 MiB free):
    one line that names the fix, exit 1, and no half-made venv left behind."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    df = bin_ / "df"
    df.write_text("#!/bin/sh\necho 'Filesystem 1024-blocks Used Available Capacity Mounted on'\n"
                  "echo '/dev/x 100000000 99998976 1024 100% /'\n")
    df.chmod(0o755)
    venv = tmp_path / "venv"
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "BENCH_VENV": str(venv)}
    env.pop("BENCH_PYTHON", None)
    r = subprocess.run(["bash", str(root / "run_all.sh"), "test"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1, r.stderr
    assert "only 1 MiB free" in r.stderr and "BENCH_VENV" in r.stderr, r.stderr
    assert not venv.exists()
