"""Bad input stops here, before anything is written.

`check(cfg)` runs in one early step of `bench.run`, before the run directory exists:

  1. values: every key of the spine's groups (seed, device, budget, calib, finetune, teacher, eval,
     eval.latency, eval.inception, model, model.process, stop_after) has a type, a range or a set of options;
     unknown keys are refused (a typo would silently change nothing); the cluster group too (a
     job also checks what its launcher was given);
  2. combinations a later stage needs: a sampler of the model's process, no more sampler steps
     than the process has (and a count DDIM's integer stride can give), SDE settings that give no
     NaN, guidance only for a class-conditional model, TF32 only on CUDA,
     a scorer or Inception metrics to give the row a quality number;
  3. files: the folders results and artifacts go to are writable; the checkpoint (model.ckpt)
     loads into the architecture with matching keys and shapes; the VAE, the Inception weights and
     the reference batch are found (and hashed) now, not after hours of fine-tuning; the data set
     is built (bench.data checks every file) and fits the model; a block budget is feasible.

Every refusal is a BenchError whose one-line message names the key, the value and a fix that works
as a command-line override; `bench.run` prints it and exits 2. A method's own keyword arguments are
type-checked against its constructor's annotations (`check_method_kwargs`) and range-checked by the
method itself.
"""
from __future__ import annotations

import math
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.api import BenchError, Budget
from bench.models.denoiser import REGIONAL

_MISSING = object()


@dataclass(frozen=True)
class Rule:
    """One config value: its type ('int' | 'num' | 'bool' | 'str'), range or options, and an example."""

    kind: str
    eg: Any                          # a value that works, shown in the fix
    lo: float | None = None          # inclusive lower bound (lo_open: exclusive)
    hi: float | None = None          # inclusive upper bound (hi_open: exclusive)
    lo_open: bool = False
    hi_open: bool = False
    options: tuple | None = None     # allowed values (None among them: null allowed)
    nullable: bool = False

    def problem(self, v) -> str | None:
        """Why `v` breaks the rule, or None."""
        if v is None:
            return None if self.nullable or (self.options and None in self.options) else "must be set (not null)"
        if self.options is not None:  # exact: 1 is no option where true is (1 == True in Python)
            return None if any(v == o and type(v) is type(o) for o in self.options) else "must be one of " + ", ".join(_fmt(o) for o in self.options)
        if self.kind == "bool":
            return None if isinstance(v, bool) else "must be true or false"
        if self.kind == "str":
            return None if isinstance(v, str) and v else "must be a non-empty string"
        if self.kind == "int" and (isinstance(v, bool) or not isinstance(v, int)):
            return "must be an integer"
        if self.kind == "num" and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            return "must be a finite number"
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return f"must be {'>' if self.lo_open else '>='} {_fmt(self.lo)}" + self._hi_text()
        if self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi):
            return f"must be {'<' if self.hi_open else '<='} {_fmt(self.hi)}" + self._lo_text()
        return None

    def _hi_text(self):
        return "" if self.hi is None else f" and {'<' if self.hi_open else '<='} {_fmt(self.hi)}"

    def _lo_text(self):
        return "" if self.lo is None else f" and {'>' if self.lo_open else '>='} {_fmt(self.lo)}"


def _fmt(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)


def Int(lo=None, eg=1, hi=None, nullable=False):
    return Rule("int", eg, lo=lo, hi=hi, nullable=nullable)


def Num(eg, lo=None, hi=None, lo_open=False, hi_open=False):
    return Rule("num", eg, lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open)


def Bool(eg=False):
    return Rule("bool", eg)


COMPILE = Rule("compile", False, options=(False, True, REGIONAL))  # bench.models.denoiser.compile_mode


def OneOf(*options, eg=None):
    return Rule("str", options[0] if eg is None else eg, options=tuple(options))


def Str(eg, nullable=False):
    return Rule("str", eg, nullable=nullable)


# The training loop's settings, shared by the fine-tune and the teacher (bench.finetune.FinetuneConfig).
_TRAIN = {
    "steps": Int(0, eg=80), "batch": Int(1, eg=32), "lr": Num(5e-4, lo=0, lo_open=True),
    "weight_decay": Num(0.0, lo=0), "grad_clip": Num(1.0, lo=0), "ema_decay": Num(0.99, lo=0, hi=1),
    "ema_warmup": Bool(True), "ckpt_every": Int(1, eg=50), "log_every": Int(1, eg=50),
    "distill": Num(0.7, lo=0, hi=1), "precision": OneOf(None, "fp32", "tf32", "bf16", eg="bf16"), "compile": COMPILE,
}

# group -> key -> rule. A group listed here has exactly these keys.
RULES: dict[str, dict[str, Rule]] = {
    "": {"seed": Int(0, eg=0), "progress": Bool(), "stop_after": OneOf(None, "finetune", "sample", eg="sample"),
           "sample_part": Str("0/4", nullable=True)},
    "calib": {"n": Int(1, eg=256), "seed": Int(0, eg=0), "bins": Int(1, eg=8)},
    # measure and keep: bench.api.Budget; round_to (optional): the channel multiple of every width method
    "budget": {"measure": None, "keep": None, "round_to": Int(1, eg=8)},
    "finetune": {**_TRAIN, "graph": Bool()},  # graph: CUDA graphs of the step (bench.graphed)
    "teacher": {**_TRAIN, "steps": Int(1, eg=1500), "seed": Int(0, eg=0)},
    "eval": {
        "n": Int(1, eg=256), "batch": Int(1, eg=256),
        "sampler": OneOf(None, "ddpm", "ddim", "euler", "heun", "dopri5", "sde", "sde_heun", eg="ddpm"),
        "steps": Int(1, eg=25), "skip": OneOf("uniform", "uniform_real", "quad", "respace"), "eta": Num(0.0, lo=0),
        "cfg_scale": Num(1.5, lo=0), "cfg_convention": OneOf("all", "dit3"), "labels": OneOf("balanced", "random"),
        "seed": Int(0, eg=0), "scorer": OneOf("classifier", "none", None, eg="classifier"), "ssim_teacher": Bool(True),
        "precision": OneOf(None, "fp32", "tf32", "bf16", eg="bf16"), "compile": COMPILE,
        "latency": None, "inception": None,  # sub-groups, below
    },
    "eval.latency": {
        "batch": Int(1, eg=64), "warmup": Int(1, eg=5), "reps": Int(1, eg=20), "allow_few": Bool(),
        "dtype": OneOf("fp32", "tf32", "bf16"), "mode": OneOf("eager", "compile"),
    },
    "eval.inception": {
        "backend": OneOf("adm", "torch-fidelity", "clean-fid"), "extractor": OneOf("fid-helper", "torch-fidelity",
                                                                                   "clean-fid-ts"),
        "weights": Str("/path/to/weights", nullable=True), "weights_asset": Str("fid-helper-inception", nullable=True),
        "clean_fid_mode": OneOf("clean", "legacy_tensorflow"), "ref_npz": Str("adm-imagenet256-ref", nullable=True),
        "ref_split": Str("all"), "n": Int(1, eg=100, nullable=True), "batch": Int(1, eg=100),
        "device": Str("cuda", nullable=True), "bootstrap": Int(0, eg=100),
        "ci": Num(0.95, lo=0, hi=1, lo_open=True, hi_open=True), "ci_method": OneOf("centered", "percentile"),
        "ci_metrics": None, "seed": Int(0, eg=0), "kid_subsets": Int(1, eg=100), "kid_subset_size": Int(2, eg=1000),
        "kid_seed": Int(0, eg=2020), "is_split_size": Int(1, eg=5000), "pr_k": Int(1, eg=3), "download": Bool(),
    },
    "model": {
        "name": Str("DiT-D8/2"), "input_size": Int(1, eg=32), "in_channels": Int(1, eg=4),
        "num_classes": Int(0, eg=1000), "learn_sigma": Bool(True), "class_dropout_prob": Num(0.1, lo=0, hi=1,
                                                                                              hi_open=True),
        "hidden_size": Int(1, eg=384, nullable=True), "num_heads": Int(1, eg=6, nullable=True),
        "depth": Int(1, eg=12, nullable=True), "ckpt": Str("/path/to/DiT-XL-2-256x256.pt", nullable=True),
        "vae": Str("sd-vae-ft-ema", nullable=True), "latent_scale": Num(0.18215, lo=0, lo_open=True),
        "process": None,
    },
    # the flow process's sampler settings (bench.processes.flow.LinearFlow; SiT sample.py's defaults);
    # the DDPM process's keys and unknown keys are checked against the process's constructor
    "model.process": {
        "t_eps": Num(0.0, lo=0, hi=0.5, hi_open=True),
        "diffusion_form": OneOf("sigma", "linear", "constant", "decreasing", "increasing-decreasing", "SBDM",
                                eg="sigma"),
        "diffusion_norm": Num(1.0, lo=0), "last_step": OneOf("Mean", "Tweedie", "Euler", None, eg="Mean"),
        "last_step_size": Num(0.04, lo=0, hi=1, lo_open=True, hi_open=True),
        "atol": Num(1e-6, lo=0, lo_open=True), "rtol": Num(1e-3, lo=0, lo_open=True),
    },
    "cluster": {
        "name": OneOf("local", "slurm", "submitit_local"), "partition": Str("gpu", nullable=True),
        "account": Str("my-account", nullable=True), "qos": Str("normal", nullable=True),
        "constraint": Str("h100", nullable=True), "timeout_min": Int(1, eg=60), "gpus_per_node": Int(0, eg=1, nullable=True),
        "nodes": Int(1, eg=1), "tasks_per_node": Int(1, eg=8, nullable=True),
        "cpus_per_task": Int(1, eg=8), "mem_gb": Rule("num", 64, lo=0, lo_open=True, nullable=True), "array_parallelism": Int(1, eg=64),
        "max_requeues": Int(0, eg=3), "signal_delay_s": Int(0, eg=120), "on_sigterm": OneOf("stop", "ignore"),
        "additional_parameters": None, "setup": Str(":"),
    },
}
# keys a group may carry beyond its rules (the U-Net's own architecture arguments are checked by its factory)
_OPEN = {"model", "model.process"}
_CI_METRICS = ("fid", "kid", "sfid", "is")


def refuse(key: str, value, why: str, fix: str) -> BenchError:
    shown = repr(value) if isinstance(value, str) else _fmt(value)
    return BenchError(f"{key}={shown}: {why}; {fix}")


def _get(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split(".") if dotted else ():
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def check_values(cfg: dict) -> None:
    """Types, ranges, options and unknown keys of every group in RULES (the whole table, in order)."""
    for group, rules in RULES.items():
        node = _get(cfg, group)
        if node is _MISSING or node is None:
            continue  # an optional block (eval.inception) that this run does not use
        if not isinstance(node, dict):
            raise refuse(group, node, "must be a config group", f"drop the override of {group}")
        if group and group not in _OPEN:
            unknown = sorted(set(node) - set(rules))
            if unknown:
                k = f"{group}.{unknown[0]}"
                raise refuse(k, node[unknown[0]], f"{group} has no key {unknown[0]!r} (known: {', '.join(rules)})",
                             f"remove +{k} or fix its spelling")
        for key, rule in rules.items():
            if rule is None:
                continue
            v = node.get(key, _MISSING) if group else cfg.get(key, _MISSING)
            if v is _MISSING:
                continue  # a key this config does not set: the code's default applies
            why = rule.problem(v)
            if why:
                k = f"{group}.{key}" if group else key
                raise refuse(k, v, why, f"e.g. {k}={_fmt(rule.eg)}")
    device = cfg.get("device", "cpu")
    if not isinstance(device, str) or not (device == "cpu" or device == "cuda" or
                                           (device.startswith("cuda:") and device[5:].isdigit())):
        raise refuse("device", device, "is not a device", "use device=cpu or device=cuda (or cuda:<index>)")
    inc = _get(cfg, "eval.inception")
    if isinstance(inc, dict):
        bad = [m for m in inc.get("ci_metrics") or [] if m not in _CI_METRICS]
        if bad or not isinstance(inc.get("ci_metrics", []), list):
            raise refuse("eval.inception.ci_metrics", inc.get("ci_metrics"), f"names metrics outside {_CI_METRICS}",
                         "e.g. eval.inception.ci_metrics=[fid,kid]")


def check_combinations(cfg: dict) -> None:
    """Settings that are valid alone but not together, or that a later stage would refuse."""
    ev, model = cfg["eval"], cfg["model"]
    kind = (model.get("process") or {}).get("kind") or ("flow" if str(model.get("name", "")).startswith("SiT")
                                                        else "ddpm")
    samplers = {"ddpm": ("ddpm", "ddim"), "flow": ("euler", "heun", "dopri5", "sde", "sde_heun")}
    if kind not in samplers:
        raise refuse("model.process.kind", kind, "is not a process", "use ddpm or flow")
    if ev.get("sampler") is not None and ev["sampler"] not in samplers[kind]:
        raise refuse("eval.sampler", ev["sampler"], f"is not a sampler of the {kind} process of {model['name']}",
                     f"use one of {', '.join(samplers[kind])} (or null for the default)")
    if kind == "ddpm":
        T = (model.get("process") or {}).get("num_timesteps", 1000)
        if not isinstance(T, int) or isinstance(T, bool) or T < 1:
            raise refuse("model.process.num_timesteps", T, "must be an integer >= 1", "e.g. 1000")
        if ev["steps"] > T:
            raise refuse("eval.steps", ev["steps"], f"is more than the process's {T} timesteps",
                         f"use eval.steps<={T} (DiT samples with 250)")
        if ev.get("sampler") == "ddim" and ev.get("skip", "uniform") == "uniform":
            from bench.processes.ddpm import ddim_uniform_counts
            valid = ddim_uniform_counts(T)
            if ev["steps"] not in valid:
                near = sorted(sorted(valid, key=lambda c: (abs(c - ev["steps"]), c))[:2])
                raise refuse("eval.steps", ev["steps"], f"DDIM's integer stride (eval.skip=uniform, improved-diffusion "
                             f"'ddim{ev['steps']}') gives no sequence of {ev['steps']} of {T} steps",
                             f"use eval.steps={near[0]} or {near[-1]}, or eval.skip=uniform_real (any count)")
    if kind == "flow":
        _check_flow_sampler(ev, model.get("process") or {})
    if ev["cfg_scale"] != 1.0 and not model.get("num_classes"):
        raise refuse("eval.cfg_scale", ev["cfg_scale"], f"guides an unconditional model ({model['name']}, "
                     "num_classes=0)", "set eval.cfg_scale=1.0")
    if ev["cfg_scale"] != 1.0 and not model.get("class_dropout_prob", 0.1):
        raise refuse("eval.cfg_scale", ev["cfg_scale"], "needs a model trained with label dropout "
                     "(model.class_dropout_prob=0 learns no null label)", "set eval.cfg_scale=1.0")
    lat = ev["latency"]
    from bench.metrics.cost import MIN_REPS
    if lat["reps"] < MIN_REPS and not lat.get("allow_few"):
        raise refuse("eval.latency.reps", lat["reps"], f"the latency protocol times at least {MIN_REPS} calls",
                     f"set eval.latency.reps={MIN_REPS}, or eval.latency.allow_few=true for a smoke run "
                     "(the row records latency_reps)")
    inc = ev.get("inception")
    if ev.get("scorer") in (None, "none") and not inc:
        raise refuse("eval.scorer", ev.get("scorer"), "leaves the row without a quality metric",
                     "add eval=inception or set eval.scorer=classifier")
    if inc and inc.get("n") is not None and inc["n"] > ev["n"]:
        raise refuse("eval.inception.n", inc["n"], f"is more than the {ev['n']} samples drawn (eval.n)",
                     f"set eval.inception.n<={ev['n']} or raise eval.n")
    if cfg["calib"]["bins"] > cfg["calib"]["n"]:
        raise refuse("calib.bins", cfg["calib"]["bins"], f"leaves noise bins without a probe (calib.n="
                     f"{cfg['calib']['n']})", f"set calib.bins<={cfg['calib']['n']}")


def _check_flow_sampler(ev: dict, proc: dict) -> None:
    """SiT's SDE settings that would give NaN or no step (bench.processes.flow)."""
    import inspect

    from bench.processes.flow import LinearFlow

    d = {k: p.default for k, p in inspect.signature(LinearFlow).parameters.items()}
    form, last = proc.get("diffusion_form", d["diffusion_form"]), proc.get("last_step", d["last_step"])
    if form == "SBDM":
        raise refuse("model.process.diffusion_form", form, "is infinite at t = 0, where the linear path's SDE starts "
                     "(sample_eps = 0): NaN samples (SiT's library default; its sample.py passes sigma)",
                     "set model.process.diffusion_form=sigma")
    if ev.get("sampler") == "sde_heun" and last is None:
        raise refuse("model.process.last_step", last, "with eval.sampler=sde_heun evaluates the score at t = 1 (NaN, "
                     "as in SiT's code)", "set model.process.last_step=Mean")
    if ev.get("sampler") in ("sde", "sde_heun") and last is not None and ev["steps"] < 2:
        raise refuse("eval.steps", ev["steps"], f"the SDE sampler with last step {last} needs one Euler-Maruyama step "
                     "and the last step", "e.g. eval.steps=250 (SiT's SDE: --num-sampling-steps 250)")


def check_device(cfg: dict) -> None:
    """The device is visible, and what is asked of it is something it does."""
    device = cfg.get("device", "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise refuse("device", device, "no CUDA device is visible", "use device=cpu")
        idx = int(device[5:] or 0) if ":" in device else 0
        if idx >= torch.cuda.device_count():
            raise refuse("device", device, f"only {torch.cuda.device_count()} CUDA device(s) are visible",
                         "use device=cuda")
    else:
        for key in ("eval.latency.dtype", "eval.precision", "finetune.precision", "teacher.precision"):
            if _get(cfg, key) == "tf32":
                raise refuse(key, "tf32", "is a CUDA mode", f"use {key}=fp32 (or bf16) on the CPU")


def sample_part(cfg: dict) -> tuple[int, int]:
    """`sample_part: "k/n"` as (k, n); (0, 1) when unset. Part k draws the shards j with j mod n = k."""
    v = cfg.get("sample_part")
    if v in (None, ""):
        return 0, 1
    try:
        k, n = (int(x) for x in str(v).split("/"))
    except ValueError:
        k, n = -1, 0
    if not (n >= 1 and 0 <= k < n):
        raise refuse("sample_part", v, "is not a part k/n with 0 <= k < n", 'use e.g. sample_part=0/4 (or null: all shards)')
    return k, n


def check_ranks(cfg: dict) -> None:
    """Data parallel (bench.dist): the global batches split evenly over the ranks, each rank takes its
    own GPU, and a SLURM job asks for no more ranks per node than GPUs."""
    from bench import dist

    world, device = dist.world(), cfg.get("device", "cpu")
    if world > 1 and device.startswith("cuda:"):
        raise refuse("device", device, f"names one GPU, but {world} ranks each take cuda:<LOCAL_RANK>", "use device=cuda")
    for key in ("finetune.batch", "teacher.batch"):
        b = _get(cfg, key)
        if isinstance(b, int) and b % world:
            raise refuse(key, b, f"(the global batch) does not split evenly over {world} ranks",
                         f"use a multiple of {world}")
    cl = cfg.get("cluster") or {}
    tasks, gpus = cl.get("tasks_per_node"), cl.get("gpus_per_node")
    if device.startswith("cuda") and tasks and gpus and tasks > gpus:
        raise refuse("cluster.tasks_per_node", tasks, f"is more ranks than the node's {gpus} GPUs",
                     f"set cluster.tasks_per_node<={gpus} or null (one per GPU)")


def factory(group: str, kind: str, factories: dict, kw: dict, also: tuple[str, ...] = ()):
    """`factories[kind]`, once `kw` is checked against its signature: an unknown kind or key stops
    with one line naming `<group>.<key>` (a misspelt key would otherwise be dropped, or end in a
    TypeError). `also`: keys the caller takes itself."""
    import inspect

    if kind not in factories:
        raise refuse(f"{group}.kind", kind, "is unknown", f"use one of {', '.join(factories)}")
    known = [n for n in inspect.signature(factories[kind]).parameters if n != "self"] + list(also)
    unknown = sorted(set(kw) - set(known))
    if unknown:
        raise refuse(f"{group}.{unknown[0]}", kw[unknown[0]], f"{group}.kind={kind} has no such key (it takes "
                     f"{', '.join(known)})", f"remove +{group}.{unknown[0]} or fix its spelling")
    return factories[kind]


def check_method_kwargs(cls, kwargs: dict, method_name: str) -> None:
    """A method's keyword arguments against its constructor: unknown names and values of the wrong
    type (int, float, bool, str annotations; Literal options) are refused before it is built."""
    import inspect

    try:
        sig = inspect.signature(cls.__init__)
        hints = typing.get_type_hints(cls.__init__)
    except (TypeError, ValueError, NameError):
        return
    params = {n: p for n, p in sig.parameters.items() if n != "self"}
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise refuse(f"method.{unknown[0]}", kwargs[unknown[0]], f"{method_name} has no such argument "
                         f"(it takes {', '.join(n for n in params if params[n].kind is not params[n].VAR_POSITIONAL)})",
                         f"remove it or fix its spelling (bench/conf/method/{method_name}.yaml)")
    for name, v in kwargs.items():
        why = _type_problem(hints.get(name), v)
        if why:
            default = params[name].default if name in params else None
            eg = f"e.g. method.{name}={_fmt(default)}" if default is not inspect.Parameter.empty else "fix its value"
            raise refuse(f"method.{name}", v, why, eg)


def _type_problem(hint, v) -> str | None:
    """Why `v` does not fit the annotation (only simple types and Literal are checked)."""
    if hint is None:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return None if v in args else "must be one of " + ", ".join(_fmt(a) for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)):
        if v is None and type(None) in args:
            return None
        simple = [a for a in args if a is not type(None)]
        problems = [_type_problem(a, v) for a in simple]
        return None if any(p is None for p in problems) else problems[0]
    if hint is bool:
        return None if isinstance(v, bool) else "must be true or false"
    if hint is int:
        return None if isinstance(v, int) and not isinstance(v, bool) else "must be an integer"
    if hint is float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        return None if ok else "must be a finite number"
    if hint is str:
        return None if isinstance(v, str) else "must be a string"
    return None


def _writable(key: str, folder) -> None:
    """The nearest existing ancestor of `folder` must be a writable directory (nothing is created)."""
    p = Path(str(folder)).expanduser().absolute()
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise refuse(key, str(folder), f"{probe} is a file, not a folder", f"point {key} at a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise refuse(key, str(folder), f"{probe} is not writable", f"point {key} at a writable folder")


def check_paths(cfg: dict) -> None:
    _writable("paths.results", cfg["paths"]["results"])
    _writable("paths.artifacts", cfg["paths"]["artifacts"])


def check_assets(cfg: dict) -> None:
    """Files a late stage reads, found and verified now: the VAE that decodes latent samples, the
    Inception weights and the reference batch (bench.assets raises with where to put them)."""
    if cfg["model"].get("vae"):
        from bench.vae import vae_folder
        vae_folder(cfg["model"]["vae"])
    inc = cfg["eval"].get("inception")
    if inc:
        from bench.metrics.fid import preflight
        preflight(cfg["eval"])


def check_config(cfg: dict) -> Budget:
    """What the config says, wherever it runs: every value and combination. Returns the Budget."""
    check_values(cfg)
    b = cfg["budget"]
    budget = Budget(b["measure"], b["keep"])
    check_combinations(cfg)
    return budget


def check(cfg: dict) -> Budget:
    """The config, the device and the output folders, before anything is written (the data, the
    checkpoint and the assets follow in `check_inputs`, once the method is built). Returns the Budget."""
    budget = check_config(cfg)
    check_device(cfg)
    check_ranks(cfg)
    sample_part(cfg)
    check_paths(cfg)
    return budget


def _arch(cfg: dict, budget: Budget, method):
    """The model as configured, checkpoint included, on the meta device (shapes only: DiT-XL/2 in
    < 1 s, no memory; loading a checkpoint there checks every key and shape but copies nothing).
    A block method's budget must leave at least one block."""
    from bench import surgery
    from bench.models import build

    def arch_and_budget():
        arch = build(**cfg["model"])
        if type(method).granularity == "block" and len(getattr(arch.net, "blocks", ())):
            surgery.blocks_to_keep(arch, budget)  # raises when even one block exceeds the budget
        return arch

    import warnings

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():  # must not move the run's RNG
        # loading a checkpoint into meta parameters checks keys and shapes and copies nothing, on purpose
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter", category=UserWarning)
        try:
            try:
                with torch.device("meta"):
                    return arch_and_budget()
            except (BenchError, OSError):
                raise
            except Exception:  # an op without a meta kernel: a real, randomly initialised copy
                return arch_and_budget()
        except BenchError as e:
            if cfg["model"].get("ckpt") and "checkpoint" in str(e) and not str(e).startswith("model.ckpt"):
                raise BenchError(f"model.ckpt={cfg['model']['ckpt']}: {e}") from None
            raise
        except (AssertionError, ValueError, TypeError, RuntimeError) as e:  # the factory's own argument checks
            keys = ", ".join(f"model.{k}={_fmt(v)}" for k, v in cfg["model"].items() if k not in ("process", "ckpt"))
            raise BenchError(f"model.name={cfg['model']['name']}: the model cannot be built from {keys} "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'invalid arguments'}); "
                             "use the sizes of bench/conf/model/*.yaml") from None


def check_inputs(cfg: dict, budget: Budget, method):
    """Files and data, before the run directory exists: the assets scoring needs, the data set
    (bench.data checks every file it reads), the checkpoint against the architecture, and whether
    the data fit the model. Returns the data set."""
    from bench.data import from_config

    if method.mask_only and (cfg["finetune"]["steps"] > 0 or budget.keep < 1.0):
        raise BenchError(f"{cfg['method_name']} prunes to masks (zeros, no shape change, no speedup without sparse "
                         "kernels): the shared fine-tune would refill the zeros and the measured cost stays dense; "
                         "run it with finetune=none budget.keep=1.0 (its sparsity is a method setting)")
    check_assets(cfg)
    data = from_config(cfg)
    arch = _arch(cfg, budget, method)
    want = tuple(arch.example_inputs(1, "cpu")[0].shape[1:])
    if tuple(data.shape) != want:
        raise BenchError(f"data {data.name!r} gives {tuple(data.shape)} inputs but model {cfg['model']['name']} takes "
                         f"{want} (in_channels, input_size, input_size); set model.in_channels / model.input_size "
                         "or data.image_size to match (latents: the VAE's channels and resolution / 8)")
    if arch.num_classes and data.num_classes > arch.num_classes:  # 0: an unconditional model ignores labels
        raise BenchError(f"data {data.name!r} has {data.num_classes} classes but model.num_classes="
                         f"{arch.num_classes}; set model.num_classes={data.num_classes}")
    return data
