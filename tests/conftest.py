"""Shared fixtures: tiny configs composed through hydra, in-process, on the CPU."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Small everything: a 4-block DiT, a few teacher/fine-tune steps, a handful of samples.
TINY = [
    "model=dit_tiny", "teacher.steps=30", "teacher.ckpt_every=1000", "teacher.batch=32",
    "finetune.steps=4", "finetune.batch=16", "finetune.ckpt_every=2",
    "eval.n=20", "eval.batch=20", "eval.steps=3", "eval.latency.reps=2", "eval.latency.allow_few=true",
    "eval.latency.warmup=1",
    "eval.latency.batch=4", "calib.n=32", "calib.bins=4",
]


def compose(overrides: list[str], method: str = "dense") -> dict:
    """The resolved run config, as bench.run's hydra entry point would build it."""
    from hydra import compose as hcompose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="bench.conf", version_base="1.3"):
        cfg = hcompose("run", overrides=[f"method={method}", *overrides])
    d = OmegaConf.to_container(cfg, resolve=True)
    d["method_name"] = method
    return d


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Path:
    """One artifacts folder per test session, so the tiny teacher is trained once and reused."""
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture
def tiny_cfg(tmp_path, artifacts):
    def make(method="dense", extra=()):
        return compose(TINY + [f"paths.results={tmp_path / 'runs'}", f"paths.artifacts={artifacts}", *extra], method)
    return make


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread; with more, intra-op thread sync dominates (on a shared
    2-core machine a batch-1 forward took 90 ms instead of 2 ms). A module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``, set up before its other module fixtures."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def calib(request):
    """The digits calibration probes of the method tests (fixed ids and seeds, 4 noise-level
    bins): 32 of them, or the module's CALIB_N."""
    from bench.data import calibration, digits

    return calibration(digits("train"), n=getattr(request.module, "CALIB_N", 32), seed=0, bins=4)


def make_net(family: str = "dit", size: str = "T", seed: int = 0, seed_at=("build", "weights")):
    """Tiny DiT (DDPM) / SiT (flow) for 8x8 one-channel digits with O(1) random weights: adaLN-Zero
    would make every block the identity (all scores tied), so every 2-D weight is redrawn with std
    1/sqrt(fan_in). seed_at: where the global RNG gets `seed`: before "build" (the patch embedding
    keeps build()'s init) and/or before the "weights" are redrawn. A module that always seeded at
    one place only binds that (functools.partial), so its tests see the nets they always saw."""
    import torch
    from bench.models import build

    kw = dict(input_size=8, in_channels=1, num_classes=10, learn_sigma=True)
    if "build" in seed_at:
        torch.manual_seed(seed)
    net = build(f"DiT-{size}/2", **kw) if family == "dit" else build(f"SiT-{size}/2", **kw, process={"kind": "flow"})
    if "weights" in seed_at:
        torch.manual_seed(seed)
    with torch.no_grad():
        for p in net.net.parameters():
            if p.ndim == 2:
                p.normal_(0.0, p.shape[1] ** -0.5)
    net.net.eval()
    return net


def fit_to_calib(net, calib, steps: int = 30, lr: float = 3e-3):
    """A few full-batch Adam steps on the calibration loss itself, so the dense model sits near a
    minimum of L_calib and removing any real block raises it (known answers of the block scorers;
    a random model can lose loss when a block goes)."""
    import torch

    opt = torch.optim.Adam(net.net.parameters(), lr=lr)
    for _ in range(steps):
        loss = net.loss(calib.x0, calib.y, u=calib.u, noise=calib.noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


def run_cli(args: list[str], env_extra: dict | None = None, timeout: int = 600):
    import subprocess

    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "bench.run", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def np_frechet(mu1, s1, mu2, s2) -> float:
    """An independent float64 Frechet distance in numpy, to test bench.metrics.stats against:
    Tr (S1 S2)^{1/2} from eigh of S1^{1/2} S2 S1^{1/2}."""
    import numpy as np

    w, v = np.linalg.eigh(s1)
    r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    ev = np.clip(np.linalg.eigvalsh(r @ s2 @ r), 0, None)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(ev).sum())


def random_tfid_state(seed: int = 0) -> dict:
    """A torch-fidelity InceptionV3 with random, well-scaled weights (He-normal convs, so
    activations neither vanish nor explode), built without touching the network."""
    import torch
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, torch.nn.Conv2d):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * (2.0 / mod.weight[0].numel()) ** 0.5)
            elif isinstance(mod, torch.nn.BatchNorm2d):
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
        net.fc.weight.copy_(torch.randn(net.fc.weight.shape, generator=g) * 0.05)
    return net.state_dict()


RANDOM_INCEPTION_ASSET = "test-inception-random"


@pytest.fixture(scope="session")
def random_inception(tmp_path_factory):
    """Random torch-fidelity Inception weights written once as a file. `register(monkeypatch)`
    adds it to bench.assets under RANDOM_INCEPTION_ASSET with its pinned sha256 (found through
    $BENCH_TEST_INCEPTION or an explicit path), so the resolvers verify it like any weights file."""
    import hashlib
    import types

    import torch

    path = tmp_path_factory.mktemp("inception") / "inception-random.pth"
    torch.save(random_tfid_state(), path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()

    def register(mp):
        from bench import assets
        mp.setitem(assets.ASSETS, RANDOM_INCEPTION_ASSET,
                   assets.Asset(filename=path.name, sha256=sha, size=path.stat().st_size, env="BENCH_TEST_INCEPTION"))

    return types.SimpleNamespace(path=path, sha=sha, register=register)


def as_float64(*nets, inputs: tuple = ()) -> tuple:
    """Compare two models' outputs in float64: models of different shapes (pruned vs masked) or
    batches of different sizes run the same math in another summation order, which float32 GEMM
    kernels round differently on each machine (~1e-6); in float64 that reordering error is ~1e-15,
    so a tolerance of 1e-12 holds on any CPU while a wrong index set or weight differs by >1e-3.
    Converts each Denoiser's backbone in place; returns the inputs in float64 (integer t kept)."""
    import torch

    for n in nets:
        n.net.double()
    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in inputs)


F64_TOL = {"rtol": 1e-12, "atol": 1e-12}


def ensure_teacher(artifacts: Path, extra: tuple = ()) -> None:
    """Train (or find) the tiny teacher in `artifacts` in this process, so that a test which kills a
    run's subprocess mid-fine-tune (BENCH_TEST_ABORT_AT_STEP) kills the run's fine-tune, not the
    teacher's training, whatever tests ran before it."""
    from bench.data import from_config
    from bench.run import teacher

    cfg = compose(TINY + [f"paths.artifacts={artifacts}", *extra])
    teacher(cfg, from_config(cfg), "cpu")


# row fields that differ between two runs of one config on one machine: timings, their flags and
# words (a timing taken while another process ran is flagged "busy"), dates, provenance
TIMING_FIELDS = {"latency_ms", "latency_iqr_ms", "peak_mem_MB", "throughput_img_s", "date", "wall_s", "device_hours",
                 "git_sha", "git_dirty", "latency_flags", "latency_others_cores"}


def comparable(row) -> dict:
    """A row (Row or dict) without TIMING_FIELDS, run name and config hash, and without the latency
    warnings: what two runs of one config must agree on bit for bit."""
    from dataclasses import asdict

    d = dict(row) if isinstance(row, dict) else asdict(row)
    for k in TIMING_FIELDS | {"run", "config_sha"}:
        d.pop(k, None)
    d["warnings"] = [w for w in d.get("warnings", []) if not w.startswith("latency ")]
    return d
