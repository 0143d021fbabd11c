"""The contract between the framework and every pruning method. Read this first.

A method is a class built by hydra from ``bench/conf/method/<name>.yaml``; ``<name>`` is its label
in results, tables and the CLI (the config group is the registry: no decorators, no second list).

    plan(net, budget, calib) -> Plan      decide what to keep; may rewrite surviving weights in
                                          place (OBS-style compensation) but never changes shapes
    callback(budget) -> TrainCallback     optional: progressive methods hook the shared fine-tune
                                          loop and hand it Plans to apply mid-training
    rewrites_weights = True               the method's plan() changes surviving weights (OBS-style
                                          compensation): bench.run then stores the model after
                                          plan + surgery (artifacts: pruned.safetensors, sha256 in
                                          plan.meta["weights_sha256"]) and reloads it on resume
                                          instead of planning again (a Plan alone cannot rebuild it)

Only ``bench.surgery`` changes shapes, and it measures the result against the Budget (never trust
the knob). A Plan is JSON data, so a decision can be stored, diffed, and replayed on a fresh dense
model to rebuild the same pruned model.
"""
from __future__ import annotations

import abc
import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

if TYPE_CHECKING:  # only for annotations; keeps this module import-light
    import torch
    from bench.data import Calib
    from bench.models.denoiser import Denoiser

Granularity = Literal["block", "head", "channel", "operator", "stage"]
MEASURES = ("blocks", "params", "macs")


class BenchError(Exception):
    """Bad input or an impossible request. The message names the fix; the CLI exits non-zero."""


@dataclass(frozen=True)
class Budget:
    """What the pruned model may keep, as a fraction of the dense model's measured cost."""

    measure: str = "blocks"  # "blocks" | "params" | "macs": what `keep` is a fraction of
    keep: float = 0.5        # 0 < keep <= 1; surgery checks the *measured* result against it

    def __post_init__(self):
        if self.measure not in MEASURES:
            raise BenchError(f"budget.measure={self.measure!r} is unknown; use one of {', '.join(MEASURES)}")
        if not isinstance(self.keep, (int, float)) or not (0.0 < float(self.keep) <= 1.0):
            raise BenchError(f"budget.keep={self.keep!r} is outside (0, 1]; pass e.g. budget.keep=0.5")


@dataclass
class Plan:
    """A pruning decision as data (cf. Torch-Pruning's pruning history, TinyFusion's --kept-indices).

    keep:   unit group -> kept indices of the *dense* model, e.g. {"blocks": [0, 2, 3, 5]};
            width groups are named per layer, e.g. {"blocks.3.attn.heads": [0, 2], ...}.
    stages: optional per-timestep-stage keep sets for stage-wise methods (Diff-ES):
            [{"u_range": [lo, hi], "keep": {...}}, ...] with u the shared noise level in [0, 1];
            optional "weight" per stage (its share of the sampler's network evaluations, for the
            trajectory-average cost). keep["blocks"] is then the union the routed model stores
            (bench.routing).
    scores: optional per-unit scores (higher = more important), kept for plots and analysis.
    meta:   free-form provenance (e.g. the method's ranking, per-timestep-bin scores).
    """

    granularity: str
    keep: dict[str, list[int]]
    scores: dict[str, list[float]] = field(default_factory=dict)
    stages: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        d = json.loads(text)
        return cls(**d)

    @classmethod
    def dense(cls, n_blocks: int) -> "Plan":
        return cls(granularity="block", keep={"blocks": list(range(n_blocks))})


class TrainCallback(Protocol):
    """Hook into ``bench.finetune``. Return a Plan to have the loop apply it now (then the loop
    rebuilds the optimizer and EMA, since the old ones point at dead parameters). Plans always
    speak dense block indices (``net.kept_blocks`` maps the current model's positions to them).
    The final model must meet the budget by the last step; the run checks it after fine-tuning.
    Optional ``on_ema(ema_module)``: called once after on_start with the loop's EMA copy of
    ``net.net`` (e.g. to give it the same forward hooks: gradient flow's soft masks).
    Optional ``loss(net, x0, y, generator, teacher)`` replaces the loop's loss (a method's own
    recovery objective, e.g. TinyFusion's masked KD); ``needs_teacher = True`` has the run hand the
    loop a frozen copy of the dense model as ``teacher``."""

    def on_start(self, net: "Denoiser", total_steps: int, run_dir: "str | None") -> None: ...

    def on_step(self, step: int, net: "Denoiser", loss: float) -> Plan | None: ...

    def state_dict(self) -> dict: ...           # saved with the fine-tune checkpoint, for resume

    def load_state_dict(self, state: dict) -> None: ...


class Method(abc.ABC):
    """A pruning method. Hyper-parameters are keyword arguments of ``__init__`` with paper defaults."""

    granularity: ClassVar[str] = "block"
    version: ClassVar[int] = 1                  # bump when outputs change; stored in every row
    needs_grad: ClassVar[bool] = False          # informational: does plan() backpropagate?
    rewrites_weights: ClassVar[bool] = False    # plan() rewrites surviving weights (OBS); see the module doc

    @abc.abstractmethod
    def plan(self, net: "Denoiser", budget: Budget, calib: "Calib") -> Plan:
        """Decide what to keep. ``net`` is the dense model in eval mode; ``calib`` holds fixed
        (x0, y, noise, u) probes shared by every method. Must not change shapes."""

    def callback(self, budget: Budget, calib: "Calib") -> TrainCallback | None:
        """Progressive methods return a callback for the shared fine-tune loop; one-shot: None.
        When a callback is returned, plan() may keep more than the budget (pruning happens during
        fine-tuning) and the budget is checked on the final model instead."""
        return None
