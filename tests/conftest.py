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
    "eval.n=20", "eval.batch=20", "eval.steps=3", "eval.latency.reps=2", "eval.latency.warmup=1",
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


def run_cli(args: list[str], env_extra: dict | None = None, timeout: int = 600):
    import subprocess

    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "bench.run", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
