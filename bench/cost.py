"""Cost before a run: the projected GPU-hours of every cell of an experiment, before paying them.

    python -m bench.cost experiment=tinyfusion_table1 --measure --precision fp32 config --gpus 1 8 --out DIR
    python -m bench.cost experiment=tinyfusion_table1 --timings DIR/cost_tinyfusion_table1.json --gpus 1 8
    python -m bench.cost experiment=tinyfusion_table1 --timings FILE --gpus 1 8 --scaling DIR/scaling.json
    python -m bench.cost experiment=default_suite model=dit_tiny --measure --out /tmp/cost     # CPU, seconds

Not bench.metrics.cost: that module measures a finished model for its row (params, MACs, forward
latency); this one projects what the runs of an experiment will cost, from per-step times.

1. Cells. The experiment's sweep (`hydra.sweeper.params` of the composed config, e.g.
   `+experiment/tinyfusion_table1_cells: a,b,c` or `method: a,b` x `budget.keep: 0.75,0.5`) with the
   command line's overrides, expanded by hydra's own BasicSweeper (the command line wins over the
   experiment's list for the same key), each cell composed as one job of `python -m bench.run -m`.
   No checkpoint or data is read: the architecture is built on the meta device.
2. Work per cell. Fine-tune: finetune.steps x finetune.batch on the pruned shape (blocks: the deepest
   block-pruned model within the budget, bench.surgery.blocks_to_keep; width methods: bench.surgery's
   width plan at the budget); with the frozen dense teacher when the run uses one (finetune.distill,
   a method's recovery callback such as TinyFusion's masked KD). A method's own training phase
   (METHOD_PHASES: TinyFusion's learnable depth, method.steps x method.batch on the dense model).
   Sampling: eval.n samples x eval.steps sampler steps in batches of eval.batch (cfg != 1 doubles the
   forward), at eval.precision / eval.compile. Scoring: Inception features of the scored images at a
   stated throughput, plus the SD-VAE decode of latent samples (model.vae) by MACs. A teacher trained
   here (model.ckpt null) and the teacher's reference samples (eval.ssim_teacher) are shared rows.
3. Per-step times. --measure: measured on this device with the suite's own code (bench.steptime:
   bench.sample.generate, bench.finetune.finetune, the method's plan(); S1/S2 difference) for each
   distinct (shape, batch, precision, compile, teacher) the cells need. --timings FILE: read from an
   earlier output of this command or bench.gpu.paths_speed; a key the file lacks is scaled from the
   nearest record of the same path, precision and compile by forward-equivalent MACs per step.
   Batches above --micro-batch (64: a batch of 256 on DiT-XL/2 does not fit one GPU), or that run out
   of GPU memory, are timed smaller and scaled linearly. --budget-s: no timing starts after that many
   seconds; the keys left are scaled from the timed ones as from a file.
4. N GPUs (--gpus): ideal data-parallel scaling of fine-tune and sampling with the global batch fixed
   (issue 19 measures the real efficiency); the method phase (plan()) and scoring run on one rank,
   while the job's other GPUs wait. GPU-h = N x wall hours. --scaling FILE (bench.gpu.scaling's
   scaling.json) replaces the ideal scaling by the measured efficiency e_N of each stage kind: wall
   s / (N e_N), GPU-h s / e_N; every N of --gpus but 1 must be measured there.
Output: <out>/cost_<experiment>.md and .json (every per-step time, its source, the assumptions),
written atomically; --measure rewrites the .json after every timing, so a killed run keeps what it
measured and its .json is a --timings file.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench.api import BenchError, Budget, Plan

ROOT = Path(__file__).resolve().parent.parent
PRECISIONS = ("fp32", "tf32", "bf16", "config")  # config: what the cells' finetune/eval/teacher.precision say
MICRO_BATCH = 64             # the largest batch timed at once (fine-tune of a 14-block DiT-XL/2 fits one GPU)
SAMPLE_STEPS = (1, 3)        # S1, S2 sampler steps (2.7 s a step for a 500-image DiT-XL/2 forward in fp32)
TRAIN_STEPS = (2, 5)         # S1, S2 optimizer steps of the fine-tune loop and of a method's phase
INCEPTION_FILE = ROOT / "results" / "gpu" / "fid_throughput.json"
# SD-VAE decoder (sd-vae-ft-ema / -mse, diffusers AutoencoderKL 128-256-512-512): MACs of decoding one
# 32x32x4 latent to a 256x256 image, counted with bench.metrics.cost.count_macs on the meta device
# (diffusers 0.42.1); scaled by latent area for other sizes.
VAE_DECODE_MACS = 311_093_641_216


@dataclass(frozen=True)
class Phase:
    """A method's own training phase: which method keys give its steps and batch, and which keys do
    not change the cost of a step (left out of its timing key)."""
    steps: str
    batch: str
    ignore: tuple[str, ...]
    what: str


METHOD_PHASES = {
    "methods.tinyfusion.TinyFusion": Phase(
        "steps", "batch", ("steps", "batch", "seed", "recovery", "kd_alpha", "rep_beta", "rep_sigma", "rep_map"),
        "learnable depth pruning in plan(): the dense model with per-sample block gates and LoRA"),
}


# --------------------------------------------------------------------------------------------
# 1. Cells
# --------------------------------------------------------------------------------------------

@dataclass
class Cell:
    label: str
    overrides: list[str]
    cfg: dict              # resolved, with method_name


def _hydra_error(e: Exception) -> BenchError:
    text = " ".join(str(e).split())
    return BenchError(f"{text or type(e).__name__} (check the overrides: key=value, +key=value to add a key)")


def sweep_jobs(overrides: list[str]) -> tuple[str, dict, list, list[list[str]]]:
    """(experiment name, its sweeper params, the parsed command-line overrides, every job's overrides) of
    `python -m bench.run -m <overrides>`, from one compose: what the sweep runs, without the cells' configs."""
    from hydra import compose, initialize_config_module
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    parser = OverridesParser.create()
    GlobalHydra.instance().clear()
    try:
        user = parser.parse_overrides(list(overrides))
        if any(o.get_key_element() == "experiment" and o.is_sweep_override() for o in user):
            raise BenchError("experiment=a,b: project one experiment at a time (one command per experiment)")
        first = BasicSweeper.split_arguments(user, None)[0][0]
        with initialize_config_module(config_module="bench.conf", version_base="1.3"):
            head = compose("run", overrides=first, return_hydra_config=True)
            experiment = head.hydra.runtime.choices.get("experiment") or "run"
            params = OmegaConf.to_container(head.hydra.sweeper.params, resolve=True) or {}
        args = [f"{k}={v}" for k, v in params.items()] + list(overrides)
        jobs = [list(j) for j in BasicSweeper.split_arguments(parser.parse_overrides(args), None)[0]]
    except (HydraException, OmegaConfBaseException) as e:
        raise _hydra_error(e) from None
    finally:
        GlobalHydra.instance().clear()
    return experiment, params, user, jobs


def expand(overrides: list[str]) -> tuple[str, list[Cell]]:
    """(experiment name, cells) of `python -m bench.run -m <overrides>`."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    experiment, params, user, jobs = sweep_jobs(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="bench.conf", version_base="1.3"):
            cells = []
            for job in jobs:
                c = compose("run", overrides=job, return_hydra_config=True)
                method = c.hydra.runtime.choices["method"]
                with open_dict(c):
                    del c["hydra"]
                d = OmegaConf.to_container(c, resolve=True)
                d["method_name"] = method
                cells.append(Cell("", list(job), d))
    except (HydraException, OmegaConfBaseException) as e:
        raise _hydra_error(e) from None
    finally:
        GlobalHydra.instance().clear()
    # a cell is named by the keys its experiment sweeps (and any the command line sweeps), also when the
    # command line picks one value: a cell has the same name alone as in its whole table
    named = set(params) | {o.get_key_element() for o in user if o.is_sweep_override()}
    for cell in cells:
        parts = []
        for ov in cell.overrides:
            key, _, value = ov.partition("=")
            if key in named:
                parts.append(value if key.lstrip("+~").startswith("experiment/") or key == "method" else ov)
        cell.label = " ".join(parts) or experiment
    return experiment, cells


# --------------------------------------------------------------------------------------------
# 2. Shapes and work per cell
# --------------------------------------------------------------------------------------------

@dataclass
class Shape:
    """A model structure the projection times: the architecture with a plan applied (None: dense)."""
    arch: str                  # "DiT-XL/2 32px"
    label: str                 # "d14", "d28 (dense)", "width params 0.5"
    model_cfg: dict            # what bench.steptime.random_model builds
    plan: Plan | None
    macs: int                  # per image, measured on the meta device
    params: int
    dense_macs: int

    @property
    def id(self) -> str:
        return f"{self.arch} {self.label}"


def _arch_cfg(model_cfg: dict) -> dict:
    return {k: v for k, v in model_cfg.items() if k not in ("ckpt", "vae", "latent_scale")}


class Shapes:
    """Dense architectures built once on the meta device (no weights), pruned shapes cached."""

    def __init__(self):
        self._dense: dict[str, tuple] = {}
        self._shapes: dict[tuple, Shape] = {}

    def dense(self, model_cfg: dict):
        import torch

        from bench import surgery
        from bench.models import build

        kw = _arch_cfg(model_cfg)
        key = json.dumps(kw, sort_keys=True)
        if key not in self._dense:
            with torch.random.fork_rng(devices=[]):
                try:
                    with torch.device("meta"):
                        net = build(**kw)
                        m = surgery.measure(net)
                except BenchError:
                    raise
                except Exception:  # an op without a meta kernel: a real, randomly initialised copy
                    net = build(**kw)
                    m = surgery.measure(net)
            depth = len(getattr(net.net, "blocks", ()))
            arch = f"{kw['name']} {kw.get('input_size', '')}px"
            shape = Shape(arch, f"d{depth} (dense)" if depth else "dense", kw, None, int(m["macs"]), int(m["params"]),
                          int(m["macs"]))
            self._dense[key] = (net, shape)
        return self._dense[key]

    def for_cell(self, cfg: dict, granularity: str, budget: Budget) -> tuple[Shape, str | None]:
        """(the pruned shape a cell is timed at, a note when it is an approximation)."""
        from bench import surgery

        net, dense = self.dense(cfg["model"])
        depth = len(getattr(net.net, "blocks", ()))
        note = None
        if granularity == "width" and hasattr(net, "width_groups"):
            unit = (cfg.get("method") or {}).get("attn_unit") or "heads"   # Diff-Pruning's head dims (bench.width)
            key = (json.dumps(dense.model_cfg, sort_keys=True), "width", budget.measure, float(budget.keep), unit)
            try:
                if key not in self._shapes:
                    self._shapes[key] = self._width(net, dense, budget, unit)
                return self._shapes[key], None
            except ImportError as e:  # torch-pruning (width surgery) is not installed
                note = (f"width surgery needs torch-pruning ({e}): projected as the deepest block-pruned model "
                        f"within {budget.measure} {budget.keep:g}, an approximation (install torch-pruning to time "
                        "the width-pruned model)")
        elif granularity != "block":
            note = (f"{granularity} plans are projected as the deepest block-pruned model within "
                    f"{budget.measure} {budget.keep:g}")
        if not depth:
            return dense, "no blocks to remove: projected at the dense shape"
        n = surgery.blocks_to_keep(net, budget)
        if n == depth:
            return dense, note
        key = (json.dumps(dense.model_cfg, sort_keys=True), "blocks", n)
        if key not in self._shapes:
            plan = Plan(granularity="block", keep={"blocks": [int(i * depth / n) for i in range(n)]})
            m = self._measure(net, plan)
            self._shapes[key] = Shape(dense.arch, f"d{n}", dense.model_cfg, plan, m["macs"], m["params"], dense.macs)
        return self._shapes[key], note

    def _width(self, net, dense: Shape, budget: Budget, unit: str = "heads") -> Shape:
        from bench import surgery
        from bench.width import attention_units

        with attention_units(net, unit):
            groups = net.width_groups()
            plan = surgery.width_plan(net, {k: [0.0] * g.size for k, g in groups.items()}, budget)
        plan.scores = {}
        m = self._measure(net, plan)
        return Shape(dense.arch, f"width {budget.measure} {budget.keep:g}", dense.model_cfg, plan, m["macs"],
                     m["params"], dense.macs)

    @staticmethod
    def _measure(net, plan: Plan) -> dict:
        from bench import surgery

        trial = copy.deepcopy(net)
        surgery.apply(trial, plan)
        m = surgery.measure(trial)
        return {"macs": int(m["macs"]), "params": int(m["params"])}


@dataclass
class Need:
    """One timed stage of a cell: `count` steps of the timing `key`."""
    stage: str                 # finetune | method | sample | teacher | teacher samples
    path: str                  # the timing path: finetune | method | sample
    shape: Shape
    batch: int                 # timed batch (the micro-batch when the configured one is larger)
    precision: str
    compile: bool
    count: float               # timed steps the stage runs
    formula: str               # the count in words
    cfg: dict = field(repr=False, default_factory=dict)
    sampler: str = ""
    cfg_scale: float = 1.0
    nfe_per_step: float = 1.0
    teacher: bool = False      # a frozen dense teacher's forward in every fine-tune step
    callback: str | None = None  # a method's recovery objective (its callback's loss), timed with it
    distill: float = 0.0
    phase: Phase | None = None
    lr: float = 1e-4
    data_parallel: bool = True  # divided over N GPUs (fine-tune, sampling), else one rank

    @property
    def key(self) -> str:
        run = self.precision + (" compile" if self.compile else "")
        head = f"{self.path} | {self.shape.id} | batch {self.batch}"
        if self.path == "sample":
            return f"{head} | {self.sampler}{' cfg' if self.cfg_scale != 1.0 else ''} | {run}"
        if self.path == "method":
            m = {k: v for k, v in self.cfg["method"].items() if k not in self.phase.ignore}
            h = hashlib.sha256(json.dumps(m, sort_keys=True, default=str).encode()).hexdigest()[:8]
            cls = str(self.cfg["method"].get("_target_", "")).rsplit(".", 1)[-1]
            return f"method {cls} {h} | {self.shape.id} | batch {self.batch} | {run}"
        extra = (" | teacher" if self.teacher else "") + (f" | {self.callback}" if self.callback else "")
        return f"{head} | {run}{extra}"

    @property
    def work(self) -> float:
        """Forward-equivalent MACs of one step (bench.steptime.TRAIN_FACTOR)."""
        from bench.steptime import TRAIN_FACTOR

        if self.path == "sample":
            return self.batch * (2 if self.cfg_scale != 1.0 else 1) * self.nfe_per_step * self.shape.macs
        return self.batch * (TRAIN_FACTOR * self.shape.macs + (self.shape.dense_macs if self.teacher else 0))


@dataclass
class CellWork:
    label: str
    overrides: list[str]
    method: str
    shape: Shape
    needs: list[Need]
    score: dict                # inception_n, vae_n, vae_macs, sample need (for the VAE's rate)
    notes: list[str]


def _steps(n: int, batch: int, micro: int) -> tuple[int, float, str]:
    """(timed batch, scale, words) for `n` steps at `batch` timed at most at `micro`."""
    b = min(batch, micro)
    scale = batch / b
    words = f"{n:,} steps x batch {batch}" + (f" (timed at {b}, x{scale:g})" if b != batch else "")
    return b, n * scale, words


def _sample_need(stage: str, cfg: dict, shape: Shape, precision: str, process_kind: str, nfe) -> Need:
    ev = cfg["eval"]
    sampler = ev["sampler"] or ("ddpm" if process_kind == "ddpm" else "heun")
    n, b = int(ev["n"]), min(int(ev["batch"]), int(ev["n"]))
    if nfe(sampler, ev["steps"], ev.get("skip", "uniform")) is None:  # an adaptive solver picks its own steps
        raise BenchError(f"eval.sampler={sampler}: its network evaluations are measured while sampling, not known in "
                         "advance; project the cost with a fixed-step sampler of about the same count "
                         "(e.g. eval.sampler=heun eval.steps=<NFE/2>)")
    return Need(stage, "sample", shape, b, precision, bool(ev.get("compile", False)), n / b * ev["steps"],
                f"{n:,} samples / batch {b} x {ev['steps']} {sampler} steps", cfg, sampler=sampler,
                cfg_scale=float(ev["cfg_scale"]), nfe_per_step=nfe(sampler, ev["steps"], ev.get("skip", "uniform"))
                / ev["steps"])


def cell_work(cell: Cell, precision: str, shapes: Shapes, device_type: str, micro: int) -> tuple[CellWork, list[Need]]:
    """The stages of one cell under a precision scenario, and its shared stages (teacher)."""
    from hydra.utils import get_class

    from bench import checks
    from bench.metrics.cost import resolve_precision
    from bench.run import make_method
    from bench.steptime import random_calib

    cfg = copy.deepcopy(cell.cfg)
    if precision != "config":
        for group in ("finetune", "eval", "teacher"):
            if isinstance(cfg.get(group), dict):
                cfg[group]["precision"] = precision
    budget = checks.check_config(cfg)
    for key in ("finetune.precision", "eval.precision", "teacher.precision"):
        g, k = key.split(".")
        if device_type != "cuda" and (cfg.get(g) or {}).get(k) == "tf32":
            raise BenchError(f"{key}=tf32 is a CUDA mode and the timings are for {device_type}: measure on a GPU, "
                             "or pass --precision fp32 (or bf16)")
    res = lambda p: resolve_precision(p, device_type)  # noqa: E731
    target = cfg["method"].get("_target_", "")
    try:
        cls = get_class(target)
    except Exception:
        raise BenchError(f"method._target_={target!r} ({cfg['method_name']}) cannot be imported; fix "
                         f"bench/conf/method/{cfg['method_name']}.yaml") from None
    shape, note = shapes.for_cell(cfg, getattr(cls, "granularity", "block"), budget)
    dense_net, dense = shapes.dense(cfg["model"])
    notes = [note] if note else []
    needs: list[Need] = []
    ft = cfg["finetune"]
    if ft["steps"] > 0:
        cb = make_method(cfg).callback(budget, random_calib(dense_net, 8, 2))
        recovery = cb is not None and hasattr(cb, "loss")
        if cb is not None and not recovery:
            notes.append(f"{cfg['method_name']} prunes progressively during the fine-tune: timed at its final shape "
                         "(a lower bound: it starts wider)")
        teacher = ft.get("distill", 0) > 0 or bool(getattr(cb, "needs_teacher", False))
        b, count, words = _steps(ft["steps"], ft["batch"], micro)
        needs.append(Need("finetune", "finetune", shape, b, res(ft.get("precision")), bool(ft.get("compile", False)),
                          count, words, cfg, teacher=teacher, callback=type(cb).__name__ if recovery else None,
                          distill=float(ft.get("distill", 0.0)), lr=float(ft["lr"])))
    phase = METHOD_PHASES.get(target)
    if phase is not None and cfg["method"].get(phase.steps, 0) > 0:
        b, count, words = _steps(int(cfg["method"][phase.steps]), int(cfg["method"][phase.batch]), micro)
        needs.append(Need("method", "method", dense, b, "fp32", False, count,
                          f"method.{phase.steps}={words}", cfg, phase=phase, data_parallel=False))
    elif any(k in cfg["method"] for k in ("steps", "batch", "batch_size")) or getattr(cls, "needs_grad", False):
        notes.append(f"{cfg['method_name']}.plan() (one-shot, on calib.n={cfg['calib']['n']} probes) is not projected")
    sample = _sample_need("sample", cfg, shape, res(cfg["eval"].get("precision")), dense_net.process.kind,
                          dense_net.process.nfe)
    needs.append(sample)
    ev, inc = cfg["eval"], cfg["eval"].get("inception")
    side = int(dense.model_cfg.get("input_size", 32))
    score = {"inception_n": int(inc.get("n") or ev["n"]) if inc else 0,
             "vae_n": int(ev["n"]) if cfg["model"].get("vae") else 0,
             "vae_macs": VAE_DECODE_MACS * (side / 32) ** 2, "image_px": side * 8 if cfg["model"].get("vae") else side,
             "sample": sample}
    if ev.get("scorer") == "classifier":
        notes.append("classifier scorer (a small CNN trained once on the data): not projected")
    shared = []
    if not cfg["model"].get("ckpt"):
        t = cfg["teacher"]
        b, count, words = _steps(t["steps"], t["batch"], micro)
        shared.append(Need("teacher", "finetune", dense, b, res(t.get("precision")), bool(t.get("compile", False)),
                           count, words, cfg, lr=float(t["lr"])))
    if ev.get("ssim_teacher"):
        shared.append(_sample_need("teacher samples", cfg, dense, res(ev.get("precision")), dense_net.process.kind,
                                   dense_net.process.nfe))
    return CellWork(cell.label, cell.overrides, cfg["method_name"], shape, needs, score, notes), shared


# --------------------------------------------------------------------------------------------
# 3. Per-step times
# --------------------------------------------------------------------------------------------

def measure(needs: list[Need], device: str, on_record=None, log=print, budget_s: float | None = None) -> list[dict]:
    """Time every distinct key of `needs` on `device` with the suite's own code (bench.steptime),
    dense architectures built once, each pruned shape made from it by bench.surgery. No timing starts
    after `budget_s` seconds (the projection scales the keys left out from the measured ones)."""
    import gc
    import time

    import torch

    from bench import steptime, surgery
    from bench.metrics.cost import device_name

    unique = list({n.key: n for n in needs}.values())
    order = {"sample": 0, "finetune": 1, "method": 2}
    dev_name = device_name(device)
    log(f"[cost] timing {len(unique)} step kinds on {dev_name}")
    records = []
    t0 = time.monotonic()
    over = lambda: budget_s is not None and time.monotonic() - t0 > budget_s  # noqa: E731
    by_arch: dict[str, list[Need]] = {}
    for n in unique:
        by_arch.setdefault(json.dumps(n.shape.model_cfg, sort_keys=True), []).append(n)
    for group in by_arch.values():
        if over():
            break
        dense = steptime.random_model(group[0].shape.model_cfg, device)
        shape_ids = list(dict.fromkeys(n.shape.id for n in group))
        for sid in shape_ids:
            todo = sorted((n for n in group if n.shape.id == sid), key=lambda n: order[n.path])
            shape = todo[0].shape
            if over():
                break
            net = dense if shape.plan is None else surgery.apply(copy.deepcopy(dense), shape.plan)
            for need in todo:
                if over():
                    break
                rec = _time_fitting(need, net, dense, device, log)
                rec.update(key=need.key, arch=shape.arch, shape=shape.id, device=dev_name)
                rec["source"] = f"measured on {dev_name}" + (f" at batch {rec['timed_batch']} (out of memory at "
                                                             f"{need.batch}), x{need.batch / rec['timed_batch']:g}"
                                                             if rec["timed_batch"] != need.batch else "")
                records.append(rec)
                log(f"[cost] {need.key}: {rec['per_step_s']:.4g} s/step (warm-up {rec['warmup_s']:.1f} s)")
                if on_record:
                    on_record(records)
            del net
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        del dense
    for n in unique:
        if n.key not in {r["key"] for r in records}:
            log(f"[cost] --budget-s {budget_s} spent: not timed (scaled from the timed ones by MACs): {n.key}")
    return records


def _time_fitting(need: Need, net, dense, device: str, log=print) -> dict:
    """_time at the need's batch; when that runs out of GPU memory, at half of it (down to 1), the
    per-step time scaled linearly back to the need's batch (the record says so)."""
    import gc

    import torch

    b = need.batch
    while True:
        oom = False
        try:
            rec = _time(need, net, dense, device, b)
        except torch.cuda.OutOfMemoryError:
            oom = True
        if not oom:
            break
        gc.collect()
        torch.cuda.empty_cache()
        if b == 1:
            raise BenchError(f"{need.key}: out of GPU memory even at batch 1")
        log(f"[cost] {need.key}: out of memory at batch {b}; timing at {b // 2}")
        b //= 2
    ratio = need.batch / b
    rec.update(timed_batch=b, measured_per_step_s=rec["per_step_s"], per_step_s=rec["per_step_s"] * ratio,
               work_macs=rec["work_macs"] * ratio, batch=need.batch)
    return rec


def _time(need: Need, net, dense, device: str, batch: int) -> dict:
    from bench import steptime
    from bench.run import make_method

    cfg = need.cfg
    if need.path == "sample":
        ev = cfg["eval"]
        return steptime.sample_step_s(net, batch, device, need.precision, need.compile, SAMPLE_STEPS, need.sampler,
                                      need.cfg_scale, ev["cfg_convention"], ev.get("skip", "uniform"),
                                      ev.get("eta", 0.0))
    budget = Budget(cfg["budget"]["measure"], cfg["budget"]["keep"])
    calib = steptime.random_calib(dense, cfg["calib"]["n"], cfg["calib"]["bins"]).to(device)
    if need.path == "method":
        def make(s):
            c = copy.deepcopy(cfg)
            c["method"][need.phase.steps], c["method"][need.phase.batch] = s, batch
            return make_method(c)
        return steptime.plan_step_s(make, net, budget, calib, batch, TRAIN_STEPS)
    callback = make_method(cfg).callback(budget, calib) if need.callback else None
    teacher = None
    if need.teacher:
        teacher = copy.deepcopy(dense)
        teacher.net.eval().requires_grad_(False)
    return steptime.finetune_step_s(net, batch, device, need.precision, need.compile, TRAIN_STEPS,
                                    callback=callback, teacher=teacher, distill=need.distill, lr=need.lr)


def device_type_of(name: str) -> str:
    return "cpu" if str(name).startswith("cpu") else "cuda"


class Timings:
    """Per-step time of a Need: the record with its key, else (from a file) the nearest record of the
    same path kind, precision and compile, scaled by forward-equivalent MACs per step."""

    def __init__(self, records: list[dict], source: str,
                 fix: str = "measure it: python -m bench.cost <overrides> --measure (on the GPU)"):
        self.records, self.source, self.fix = records, source, fix
        self.by_key = {r["key"]: r for r in records if "key" in r}

    def __call__(self, need: Need) -> dict:
        if need.key in self.by_key:
            r = self.by_key[need.key]
            return {"per_step_s": r["per_step_s"], "source": r.get("source") or self.source}
        kind = lambda p: "sample" if p == "sample" else "train"  # noqa: E731
        cands = [r for r in self.records if kind(r.get("path")) == kind(need.path) and r.get("precision") ==
                 need.precision and bool(r.get("compile")) == need.compile and r.get("work_macs")]
        if not cands:
            run = need.precision + (" + compile" if need.compile else "")
            raise BenchError(f"{self.source} has no {kind(need.path)} timing at {run} to project '{need.key}'; "
                             f"{self.fix}")
        r = min(cands, key=lambda r: (r["path"] != need.path, r.get("model") != need.shape.model_cfg.get("name"),
                                      bool(r.get("teacher")) != need.teacher,
                                      abs(math.log(need.work / r["work_macs"]))))
        ratio = need.work / r["work_macs"]
        ref = r.get("key") or f"{r['path']} {r.get('model')} d{r.get('depth')} batch {r.get('batch')} {r['precision']}"
        return {"per_step_s": r["per_step_s"] * ratio, "source": f"{self.source}: scaled from '{ref}' by "
                f"forward-equivalent MACs x{ratio:.3g}", "scaled_from": ref, "ratio": ratio}


def load_timings(path: str) -> tuple[list[dict], dict]:
    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except OSError as e:
        raise BenchError(f"--timings {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise BenchError(f"--timings {path} is not JSON ({e})") from None
    recs = d.get("records") if isinstance(d, dict) else None
    if not isinstance(recs, list) or not all(isinstance(r, dict) and "per_step_s" in r and "path" in r for r in recs):
        raise BenchError(f"--timings {path} has no 'records' list of {{path, precision, per_step_s, ...}} (an output "
                         "of python -m bench.cost or bench.gpu.paths_speed)")
    meta = d.get("meta") or {}
    return [r if r.get("work_macs") or r.get("key") else _legacy(r, meta, path) for r in recs], meta


def _legacy(rec: dict, meta: dict, path: str) -> dict:
    """A record of bench.gpu.paths_speed before it wrote MACs (results/gpu/paths_speed/paths_speed.json,
    H100): its model is paths_speed's DiT-XL/2 shape, dense for sampling, `depth` blocks for the
    fine-tune; its forward-equivalent MACs per step are measured here on the meta device."""
    import torch

    from bench import surgery
    from bench.gpu.paths_speed import GPU
    from bench.models import build
    from bench.steptime import TRAIN_FACTOR

    if meta.get("model") != GPU["model"]:
        raise BenchError(f"--timings {path}: record {rec.get('path')} {rec.get('precision')} has no work_macs and "
                         f"its model {meta.get('model')!r} is not bench.gpu.paths_speed's {GPU['model']}; rerun that "
                         "measurement (python -m bench.cost --measure writes every field)")
    kw = {k: GPU[k] for k in ("input_size", "in_channels", "num_classes")}
    with torch.device("meta"):
        net = build(GPU["model"], **kw, **({"depth": rec["depth"]} if rec.get("depth") else {}))
    macs = int(surgery.measure(net)["macs"])
    work = rec["forward_batch"] * macs if rec["path"] == "sample" else TRAIN_FACTOR * rec["batch"] * macs
    return {**rec, "model": GPU["model"], "depth": len(net.net.blocks), "macs_per_image": macs, "work_macs": work,
            "batch": rec.get("batch", rec.get("n"))}


# --------------------------------------------------------------------------------------------
# 4. Projection
# --------------------------------------------------------------------------------------------

def inception_throughput(override: float | None, image_px: int) -> dict:
    """Inception feature throughput: the command line's, else the committed measurement nearest in
    resolution (largest batch)."""
    if override:
        return {"img_s": float(override), "source": "--inception-img-s"}
    try:
        d = json.loads(INCEPTION_FILE.read_text())
        recs = d["throughput"]
    except (OSError, ValueError, KeyError):
        raise BenchError(f"{INCEPTION_FILE.relative_to(ROOT)} is missing or unreadable; pass --inception-img-s "
                         "(images/s of the Inception feature extractor)") from None
    r = min(recs, key=lambda r: (abs(r["resolution"] - image_px), -r["batch"]))
    return {"img_s": float(r["images_per_s"]), "source": f"{d.get('extractor', 'Inception')} fp32 at batch "
            f"{r['batch']}, {r['resolution']}x{r['resolution']} input, measured on {d.get('device', '?')} "
            f"({INCEPTION_FILE.relative_to(ROOT)}), not on this device"}


def project(work: list[CellWork], shared: list[Need], timings: Timings, gpus: list[int],
            inception_img_s: float | None, scaling: dict | None = None) -> dict:
    """Seconds of every stage on one GPU, and GPU-h / wall hours at each N. `scaling` (load_scaling):
    {N: {stage: efficiency}} of the data-parallel stages; ideal (1) where it has none."""
    steps: dict[str, dict] = {}

    def t(need: Need) -> dict:
        if need.key not in steps:
            steps[need.key] = {"key": need.key, **timings(need)}
        s = steps[need.key]["per_step_s"] * need.count
        return {"s": s, "key": need.key, "per_step_s": steps[need.key]["per_step_s"], "count": need.count,
                "formula": need.formula, "data_parallel": need.data_parallel}

    rows, assumptions = [], set()
    for w in work:
        st = {"finetune": None, "method": None, "sample": None, "score": None}
        for n in w.needs:
            st[n.stage] = t(n)
        sc = w.score
        parts, s = [], 0.0
        if sc["inception_n"]:
            inc = inception_throughput(inception_img_s, sc["image_px"])
            s += sc["inception_n"] / inc["img_s"]
            parts.append(f"Inception {sc['inception_n']:,} images at {inc['img_s']:,.0f} img/s")
            assumptions.add(f"Inception features: {inc['img_s']:,.0f} img/s ({inc['source']}).")
        if sc["vae_n"]:
            smp = st["sample"]
            rate = sc["sample"].work / smp["per_step_s"]  # MACs/s of this cell's sampler forward
            s += sc["vae_n"] * sc["vae_macs"] / rate
            parts.append(f"VAE decode {sc['vae_n']:,} x {sc['vae_macs'] / 1e9:.0f} GMACs at {rate / 1e12:.1f} TMAC/s")
            assumptions.add(f"VAE decode: {VAE_DECODE_MACS / 1e9:.1f} GMACs per 32x32 latent (SD-VAE decoder, counted "
                            "with bench.metrics.cost.count_macs), at the MAC rate of the cell's own sampler forward "
                            "(an estimate, not a measurement: the decoder is conv-bound and runs at torch's defaults).")
        st["score"] = {"s": s, "formula": " + ".join(parts), "data_parallel": False} if parts else None
        rows.append({"cell": w.label, "method": w.method, "overrides": w.overrides, "shape": w.shape.id,
                     "macs_G": w.shape.macs / 1e9, "params_M": w.shape.params / 1e6, "stages": st, "notes": w.notes})
    shared_rows, seen = [], set()
    for n in shared:
        sig = (n.stage, n.key, n.count)
        if sig in seen:
            continue
        seen.add(sig)
        stage = "finetune" if n.stage == "teacher" else "sample"
        st = {"finetune": None, "method": None, "sample": None, "score": None}
        st[stage] = t(n)
        shared_rows.append({"cell": f"shared: {n.stage}", "method": None, "overrides": [], "shape": n.shape.id,
                            "macs_G": n.shape.macs / 1e9, "params_M": n.shape.params / 1e6, "stages": st, "notes": []})
    per_n = {}
    for N in gpus:
        out = []
        eff = (scaling or {}).get(N, {})
        for r in rows + shared_rows:
            gh = {k: (v["s"] / eff.get(k, 1.0) if v["data_parallel"] else N * v["s"]) / 3600 if v else 0.0
                  for k, v in r["stages"].items()}
            wall = sum((v["s"] / (N * eff.get(k, 1.0)) if v["data_parallel"] else v["s"])
                       for k, v in r["stages"].items() if v) / 3600
            out.append({"cell": r["cell"], **{f"{k}_gpu_h": v for k, v in gh.items()}, "total_gpu_h": sum(gh.values()),
                        "wall_h": wall})
        per_n[str(N)] = out
    if scaling:
        assumptions.add(scaling["words"])
    return {"rows": rows, "shared": shared_rows, "per_gpus": per_n, "steps": list(steps.values()),
            "assumptions": sorted(assumptions)}


def load_scaling(path: str, gpus: list[int]) -> dict:
    """{N: {"finetune": e, "sample": e}, "words": the assumption} from bench.gpu.scaling's scaling.json
    (its rows: N, finetune_eff, sample_eff); every N of `gpus` other than 1 must be among its rows."""
    try:
        d = json.loads(Path(path).read_text())
        meta = d["meta"]
        eff = {int(r["N"]): {"finetune": float(r["finetune_eff"]), "sample": float(r["sample_eff"])} for r in d["rows"]}
    except OSError as e:
        raise BenchError(f"--scaling {path}: {e.strerror or e}") from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise BenchError(f"--scaling {path} is not a scaling report (python -m bench.gpu.scaling report DIR writes "
                         "DIR/scaling.json)") from None
    eff.setdefault(1, {"finetune": 1.0, "sample": 1.0})
    if missing := [n for n in gpus if n not in eff]:
        raise BenchError(f"--scaling {path} has no measurement at N = {', '.join(map(str, missing))} (it has "
                         f"{', '.join(map(str, sorted(eff)))}); pass --gpus among those, or measure them "
                         "(bench/gpu/scaling.sh)")
    each = "; ".join(f"N={n}: fine-tune {100 * e['finetune']:.1f} %, sampling {100 * e['sample']:.1f} %"
                     for n, e in sorted(eff.items()) if n in gpus and n != 1)
    return {**{n: eff[n] for n in gpus}, "words": (
        f"N GPUs: measured data-parallel efficiency (--scaling {path}: {meta.get('device')}, commit "
        f"{meta.get('commit')}) in place of the ideal scaling above: wall = one-GPU seconds / (N x efficiency), "
        f"GPU-h = one-GPU seconds / efficiency, the teacher's training at the fine-tune's efficiency; {each}.")}


ASSUMPTIONS = [
    "N GPUs: ideal data-parallel scaling of fine-tune and sampling with the global batch fixed (batch / N per GPU); "
    "issue 19 measures the real efficiency. The method phase (plan()) and scoring run on one rank: their wall time "
    "does not shrink and the job's other GPUs wait (counted in GPU-h). GPU-h = N x wall hours.",
    "Batches above the micro-batch are timed at the micro-batch and scaled linearly (a fine-tune batch of 256 on "
    "DiT-XL/2 does not fit one GPU; with N GPUs each holds batch / N).",
    "A method's training phase runs in plan(), at torch's default precision (fp32 matmuls) whatever finetune / eval "
    ".precision say: bench.run applies neither to plan().",
    "Per-step times are the suite's own code (bench.steptime: sample = bench.sample.generate, fine-tune = "
    "bench.finetune.finetune with the run's callback and teacher, method = its plan()) on random weights and data, "
    "by the S1/S2 difference; fine-tune checkpoints (every finetune.ckpt_every steps) are not in them.",
    "Not projected: one-shot plans on the calibration probes, the latency timing of the row, Inception reference "
    "statistics, bootstrap intervals and precision/recall neighbourhoods, data loading beyond an in-memory set.",
    "Shapes: block budgets give the deepest block-pruned model within the budget (bench.surgery.blocks_to_keep; which "
    "blocks does not change the cost); width methods get bench.surgery.width_plan's model at the budget.",
]


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

def _h(x: float) -> str:
    if x == 0:
        return "0"
    return f"{x:,.2f}" if x >= 0.01 else f"{x:.2g}"


def render(meta: dict, scenarios: list[dict]) -> str:
    from bench.tables import markdown_table

    out = [f"# Cost before a run: experiment={meta['experiment']}", "",
           f"`{meta['command']}` at commit {meta['commit']}, torch {meta['torch']}. Per-step times: {meta['timings']}. "
           f"GPU-h on N GPUs (N x wall hours); wall h: hours until the cell's row on N GPUs. Micro-batch "
           f"{meta['micro_batch']}.", ""]
    for sc in scenarios:
        p = sc["projection"]
        out += [f"## {sc['label']}", ""]
        for N, rows in p["per_gpus"].items():
            body = [[r["cell"], _h(r["finetune_gpu_h"]), _h(r["method_gpu_h"]), _h(r["sample_gpu_h"]),
                     _h(r["score_gpu_h"]), _h(r["total_gpu_h"]), _h(r["wall_h"])] for r in rows]
            tot = {k: sum(r[k] for r in rows) for k in rows[0] if k != "cell"} if rows else {}
            if len(rows) > 1:
                body.append(["**all**", *(f"**{_h(tot[k])}**" for k in ("finetune_gpu_h", "method_gpu_h", "sample_gpu_h",
                                                                         "score_gpu_h", "total_gpu_h", "wall_h"))])
            out += [f"### {N} GPU{'s' if N != '1' else ''}", "",
                    markdown_table(["cell", "fine-tune GPU-h", "method phase GPU-h", "sampling GPU-h", "scoring GPU-h",
                                    "total GPU-h", "wall h"], body), ""]
        body = []
        for r in p["rows"] + p["shared"]:
            def cell_text(v):
                if not v:
                    return "-"
                per = f" x {v['per_step_s']:.4g} s" if "per_step_s" in v else ""
                return f"{v['formula']}{per} = {_h(v['s'] / 3600)} h"
            body.append([r["cell"], f"{r['shape']} ({r['macs_G']:.3g} GMACs, {r['params_M']:.4g}M)",
                         *(cell_text(r["stages"][k]) for k in ("finetune", "method", "sample", "score")),
                         "; ".join(r["notes"])])
        out += ["### Work per cell (one GPU)", "",
                markdown_table(["cell", "shape", "fine-tune", "method phase", "sampling", "scoring", "notes"], body), ""]
    steps = {s["key"]: s for sc in scenarios for s in sc["projection"]["steps"]}
    out += ["## Per-step times", "",
            markdown_table(["key", "s / step", "source"], [[k, f"{s['per_step_s']:.4g}", s["source"]]
                                                            for k, s in steps.items()]), ""]
    extra = sorted({a for sc in scenarios for a in sc["projection"]["assumptions"]})
    out += ["## Assumptions", "", *(f"- {a}" for a in ASSUMPTIONS + extra), ""]
    return "\n".join(out)


def run(args, argv: list[str]) -> int:
    import torch

    from bench.io import atomic_write_text
    from bench.metrics.cost import device_name
    from bench.results import git_info

    if any(n < 1 for n in args.gpus):
        raise BenchError(f"--gpus {args.gpus}: every N must be >= 1")
    if args.micro_batch < 1:
        raise BenchError(f"--micro-batch {args.micro_batch} must be >= 1")
    scaling = load_scaling(args.scaling, args.gpus) if args.scaling else None
    experiment, cells = expand(args.overrides)
    from bench import checks
    for cell in cells:  # every value and combination of every cell, before anything is read or timed
        try:
            checks.check_config(cell.cfg)
        except BenchError as e:
            raise BenchError(f"cell {cell.label}: {e}") from None
    if args.measure:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BenchError(f"--device {device}: no CUDA device is visible; use --device cpu")
        device_type, file_recs, file_meta = device_type_of(device), [], {}
        timings_words = f"measured on {device_name(device)} (bench.steptime, S1/S2 difference)"
    else:
        file_recs, file_meta = load_timings(args.timings)
        dev = file_meta.get("device") or next((r.get("device") for r in file_recs if r.get("device")), "cuda")
        device_type = file_meta.get("device_type") or device_type_of(dev)
        timings_words = f"from {args.timings} ({dev})"
    shapes = Shapes()
    scenarios = []
    for prec in dict.fromkeys(args.precision):
        work, shared = [], []
        for cell in cells:
            try:
                w, s = cell_work(cell, prec, shapes, device_type, args.micro_batch)
            except BenchError as e:
                raise BenchError(f"cell {cell.label} ({' '.join(cell.overrides)}): {e}") from None
            work.append(w)
            shared += s
        words = {"finetune": "fine-tune", "sample": "sampling"}
        used = sorted({f"{words[n.stage]} {n.precision}{' compile' if n.compile else ''}" for w in work
                       for n in w.needs if n.stage in words})
        label = (f"{prec} (--precision {prec})" if prec != "config" else "as configured") + \
            (f": {', '.join(used)}" if used else "")
        scenarios.append({"precision": prec, "label": label, "work": work, "shared": shared})
    sha, dirty = git_info()
    out = Path(args.out)
    meta = {"experiment": experiment, "command": "python -m bench.cost " + " ".join(argv), "commit": sha +
            ("-dirty" if dirty else ""), "torch": torch.__version__, "timings": timings_words, "gpus": args.gpus,
            "micro_batch": args.micro_batch, "device_type": device_type,
            "device": device_name(device) if args.measure else file_meta.get("device"),
            **({"scaling": args.scaling} if args.scaling else {})}
    json_path, md_path = out / f"cost_{experiment}.json", out / f"cost_{experiment}.md"

    def save(records, done_scenarios=None):
        atomic_write_text(json_path, json.dumps({"meta": meta, "complete": done_scenarios is not None,
                                                 "records": records, "assumptions": ASSUMPTIONS,
                                                 "scenarios": done_scenarios or []}, indent=1, default=str))

    if args.measure:
        needs = [n for sc in scenarios for w in sc["work"] for n in w.needs] + \
            [n for sc in scenarios for n in sc["shared"]]
        records = measure(needs, device, on_record=save, log=lambda m: print(m, file=sys.stderr, flush=True),
                          budget_s=args.budget_s)
        # keys left out by --budget-s are scaled from the timed ones
        timings = Timings(records, timings_words, f"raise --budget-s (was {args.budget_s})")
    else:
        records, timings = file_recs, Timings(file_recs, f"from {args.timings}")
    for sc in scenarios:
        sc["projection"] = project(sc["work"], sc["shared"], timings, args.gpus, args.inception_img_s, scaling)
    done = [{"precision": sc["precision"], "label": sc["label"], **sc["projection"]} for sc in scenarios]
    md = render(meta, [{"label": sc["label"], "projection": sc["projection"]} for sc in scenarios])
    save(records, done)
    atomic_write_text(md_path, md)
    print(md)
    print(f"[cost] wrote {md_path} and {json_path}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m bench.cost", description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="hydra overrides, as for python -m bench.run -m")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--measure", action="store_true", help="time every step kind on this device")
    src.add_argument("--timings", metavar="FILE", help="per-step times from an earlier output (or paths_speed.json)")
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 8], metavar="N", help="GPU counts (default 1 8)")
    ap.add_argument("--precision", nargs="+", choices=PRECISIONS, default=["config"],
                    help="scenarios: force finetune/eval/teacher.precision, or 'config' (default)")
    ap.add_argument("--out", default="results/cost", help="folder for cost_<experiment>.md/.json")
    ap.add_argument("--device", default=None, help="--measure on this device (default: cuda if visible, else cpu)")
    ap.add_argument("--micro-batch", type=int, default=MICRO_BATCH, help="largest batch timed at once")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="--measure starts no timing after this many seconds (the rest is scaled by MACs)")
    ap.add_argument("--scaling", metavar="FILE", default=None,
                    help="measured data-parallel efficiency per N (bench.gpu.scaling's scaling.json) instead of ideal")
    ap.add_argument("--inception-img-s", type=float, default=None,
                    help=f"Inception images/s (default: {INCEPTION_FILE.relative_to(ROOT)})")
    args = ap.parse_intermixed_args(argv)
    from bench.io import os_error_message
    try:
        return run(args, argv)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {os_error_message(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
