"""The contract between the framework and every pruning method. Read this first.

A method is a class built by hydra from ``bench/conf/method/<name>.yaml``; ``<name>`` is its label
in results, tables and the CLI (the config group is the registry: no decorators, no second list).
Its module docstring is its method card (paper, equations, defaults, reconstruction choices).

    Method.plan(net, budget, calib) -> Plan   decide what to keep; may rewrite surviving weights in
                                              place (OBS-style) but never changes shapes
    Method.callback(budget, calib)            optional: a TrainCallback that hooks the shared
                                              fine-tune loop and hands it Plans mid-training
    Method's optional hooks                   class attributes with defaults: rewrites_weights,
                                              mask_only, bank_dir
    Denoiser                                  everything ``net`` offers a method (a Protocol)
    Plan                                      the decision as JSON data; what ``scores`` and
                                              ``meta["unit_share"]`` must hold

Only ``bench.surgery`` changes shapes, and it measures the result against the Budget (never trust
the knob). A Plan is JSON data, so a decision can be stored, diffed, and replayed on a fresh dense
model to rebuild the same pruned model. Helpers a method may call: ``bench.surgery.keep_top``,
``blocks_to_keep``, ``width_plan``, ``measure`` and ``apply`` (on a ``copy.deepcopy(net)``).

A complete block method (tests/test_api.py runs this very text on a tiny DiT and SiT):

    import torch
    from bench.api import Method, Plan
    from bench.surgery import blocks_to_keep, keep_top

    class OutputChange(Method):  # keep the blocks that change the residual stream most
        granularity = "block"

        @torch.no_grad()
        def plan(self, net, budget, calib):
            total, dev = torch.zeros(net.depth, dtype=torch.float64), net.device
            with net.eval_mode():
                for x0, y, noise, u in calib.batches(64):
                    x_t, t = net.noisy(x0.to(dev), u.to(dev), noise.to(dev))
                    h = net.hidden_states(x_t, t, y.to(dev))  # depth + 1 tensors (N, T, D)
                    total += torch.stack([(b - a).double().flatten(1).norm(dim=1).sum().cpu()
                                          for a, b in zip(h, h[1:])])
            scores = (total / len(calib)).tolist()  # plan() gets the dense model: one per dense block
            kept = keep_top(scores, blocks_to_keep(net, budget))
            return Plan("block", {"blocks": kept}, scores={"blocks": scores})
"""
from __future__ import annotations

import abc
import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, ContextManager, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:  # only for annotations; keeps this module import-light
    import torch
    from bench.data import Calib
    from bench.width import WidthGroup

Granularity = Literal["block", "width", "operator", "stage"]  # blocks | heads, channels | operators | stage-wise
MEASURES = ("blocks", "params", "macs")


class BenchError(Exception):
    """Bad input or an impossible request. The message names the fix; the CLI exits non-zero."""


@runtime_checkable
class Denoiser(Protocol):
    """What a method may use of ``net``: a DiT, SiT or U-Net backbone with its noise process
    (``bench.models.denoiser.Denoiser`` implements it). Noise levels are the shared u in [0, 1]
    (0 clean, 1 pure noise), so a method works on DDPM and flow models alike; block arguments are
    positions in the current model, Plans speak dense indices (``kept_blocks`` maps one to the other).
    ``backbone`` (the nn.Module itself) is for methods that are backbone-specific by nature
    (per-layer Hessians, hooks on modules, masks over named parameters); such a method says so in
    its card. Everything else goes through the members below."""

    name: str                   # model name, e.g. "DiT-S/2" (for messages)
    process: Any                # noise process: kind ("ddpm" | "flow"), t_from_u, sample_t, training_loss, sample, nfe
    num_classes: int            # labels 0 .. num_classes - 1 (0: unconditional)
    null_label: int             # the label that means "no class" (classifier-free guidance)
    in_channels: int            # channels of x (a learned-sigma prediction has twice as many)
    input_size: int             # height = width of x
    device: "torch.device"      # where the parameters live
    label_dropout: float        # probability that training replaces a label by null_label (0: never)
    depth: int                  # transformer blocks present now (0 for the U-Net)
    kept_blocks: list[int]      # dense index of each present block, in model order
    backbone: "torch.nn.Module"  # the wrapped module: only for backbone-specific methods (see above)

    def __call__(self, x_t, t, y=None, **kw) -> "torch.Tensor":
        """Raw prediction (eps [+ variance] for DDPM, velocity for flow) at the native timestep t."""

    def noisy(self, x0, u, noise) -> tuple:
        """(x_t, native t) of clean x0 at noise level u with the given noise."""

    def loss(self, x0, y, u=None, noise=None, generator=None, reduction: str = "mean", draws: "Draws | None" = None,
             **kw) -> "torch.Tensor":
        """The model's own training loss; u and noise pin the noise levels and the noise, or `draws`
        pins all of one batch's random draws (timesteps, noise, dropped labels)."""

    def draws(self, shape: tuple, generator: "torch.Generator", device=None) -> "Draws":
        """The random draws of a training batch of x0 shape `shape`, from `generator` (a CPU one), in
        the order loss() takes them: timesteps, noise, then dropped labels when training drops them."""

    def hidden_states(self, x_t, t, y) -> list:
        """Residual stream before block 0 and after every block: depth + 1 tensors (DiT/SiT only)."""

    def eval_mode(self) -> ContextManager[None]:
        """Context: eval mode (no label dropout), the caller's mode restored after. Score inside it."""

    def example_inputs(self, batch: int = 1, device=None) -> tuple:
        """(x, t, y) of the model's shapes, for a forward that only needs shapes."""

    def units(self, granularity: str = "block") -> dict[str, int]:
        """Unit group -> number of present units, for granularity "block", "operator" or "width"."""

    def block_params(self) -> list[list["torch.nn.Parameter"]]:
        """The parameters of every present block, in model order."""

    def width_groups(self) -> dict[str, "WidthGroup"]:
        """Width group name -> bench.width.WidthGroup (heads / channels as parameter slices)."""

    def operator_ids(self) -> dict[str, list[int]]:
        """Operator group -> dense ids of present operators that are units of their own (U-Net); DiT/SiT: {}."""

    def ablate(self, group: str, idx) -> ContextManager[None]:
        """Context: bypass units for a while: "blocks" / "attn" / "mlp" by position, U-Net groups by id."""

    def named_parameters(self):
        """(name, parameter) pairs of the backbone, names as in its state_dict."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the backbone's gradients (methods that accumulate .grad start and end with it)."""


@dataclass
class Draws:
    """One training batch's random draws: the fine-tune loop draws them for the *global* batch from a
    generator seeded by (seed, step) and hands each rank its rows (``part``), so a step's loss is
    the same function of (seed, step) whatever the number of ranks (bench.finetune). A method's own
    recovery loss (TrainCallback.loss) takes them instead of drawing its own."""

    t: "torch.Tensor"              # (B,) native timesteps
    noise: "torch.Tensor"          # (B, *x0.shape[1:])
    drop: "torch.Tensor | None"    # (B,) int64, 1: the label is replaced by the null label; None: no label dropout

    def part(self, lo: int, hi: int) -> "Draws":
        return Draws(self.t[lo:hi], self.noise[lo:hi], None if self.drop is None else self.drop[lo:hi])


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
            width groups are named per layer, e.g. {"blocks.3.attn.heads": [0, 2], ...};
            operator groups as "ops.<group>", e.g. {"ops.attn": [0, 1, 3]}.
    stages: optional per-timestep-stage keep sets for stage-wise methods (Diff-ES):
            [{"u_range": [lo, hi], "keep": {...}}, ...] with u the shared noise level in [0, 1];
            optional "weight" per stage (its share of the sampler's network evaluations, for the
            trajectory-average cost). keep["blocks"] is then the union the routed model stores
            (bench.routing).
    scores: per-unit scores, higher = more important, for plots and analysis (the run never reads
            them). Required of a block method's plan(): scores["blocks"], one float per dense block
            (tests/test_methods.py checks every block config; methods.plots reads it). Optional for
            other granularities and for the plans a TrainCallback returns.
    meta:   free-form provenance (e.g. the method's ranking, per-timestep-bin scores). One key the run
            reads: meta["unit_share"], how far below budget.keep (a fraction of the dense cost) the
            measured result of a width, operator or stage plan may land, e.g. one operator's share;
            absent: 0.10. Block plans need none: the run allows one block's share.
    """

    granularity: Granularity
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

    Several ranks (torchrun, DDP: bench.finetune): every rank holds the same weights and runs the
    callback; ``loss`` passed to on_step is the global batch's mean loss, the Plan applied is rank 0's
    (broadcast), and only rank 0 gets a ``run_dir`` (logs are written once).

    Optional members, which the loop and the run look up on the callback (absent: the default);
    a callback is any object with the four methods below, e.g. a test's wrapper around another:
      on_ema(ema_backbone) -> None                  called once after on_start with the loop's EMA copy
                                                    of the backbone (gradient flow gives it the same
                                                    forward hooks: its soft masks)
      loss(net, x0, y, draws, teacher) -> loss      replaces the loop's loss (a method's own recovery
                                                    objective, e.g. TinyFusion's masked KD); `draws`
                                                    (bench.api.Draws) are this rank's rows of the batch's
                                                    timesteps, noise and dropped labels: use them, draw
                                                    nothing yourself (N ranks = 1 rank)
      needs_teacher: bool = False                   True: the run hands the loop a frozen copy of the
                                                    dense model, passed to ``loss`` as ``teacher``
      LOG_NAME: str = ""                            the file the callback writes in run_dir (a decision
                                                    log): the loop keeps its text with the final weights
                                                    and writes it back when a rerun finds the weights but
                                                    not the log (a results folder deleted or not carried)"""

    def on_start(self, net: Denoiser, total_steps: int, run_dir: "str | None") -> None: ...

    def on_step(self, step: int, net: Denoiser, loss: float) -> Plan | None: ...

    def state_dict(self) -> dict: ...           # saved with the fine-tune checkpoint, for resume

    def load_state_dict(self, state: dict) -> None: ...


class Method(abc.ABC):
    """A pruning method. Hyper-parameters are keyword arguments of ``__init__`` with paper defaults.
    The class attributes below are its hooks into the run; the defaults fit a score-only method."""

    granularity: ClassVar[Granularity] = "block"  # the Plan.granularity plan() returns
    version: ClassVar[int] = 1                  # bump when outputs change; stored in every row
    needs_grad: ClassVar[bool] = False          # informational: does plan() backpropagate?
    # plan() rewrites surviving weights (OBS compensation): the run stores the model after plan +
    # surgery (pruned.safetensors, sha256 in plan.meta["weights_sha256"]) and reloads it on resume
    # instead of planning again (a Plan alone cannot rebuild it)
    rewrites_weights: ClassVar[bool] = False
    # plan() leaves zeros (masks) and no shape change, so no speedup: the run refuses a fine-tune
    # (it would refill them) and budget.keep < 1 (the sparsity is a method setting)
    mask_only: bool = False
    # folder for tensors the Plan references by path (Diff-ES's stage bank): the run sets it to the
    # run's artifacts folder before plan(); None (outside a run): the method picks one
    bank_dir: str | None = None

    @abc.abstractmethod
    def plan(self, net: Denoiser, budget: Budget, calib: "Calib") -> Plan:
        """Decide what to keep. ``net`` is the dense model in eval mode; ``calib`` holds fixed
        (x0, y, noise, u) probes shared by every method. Must not change shapes. Under torchrun
        plan() runs on rank 0 alone and the run broadcasts the Plan (and rewritten weights)."""

    def callback(self, budget: Budget, calib: "Calib") -> TrainCallback | None:
        """Progressive methods return a callback for the shared fine-tune loop; one-shot: None.
        When a callback is returned, plan() may keep more than the budget (pruning happens during
        fine-tuning) and the budget is checked on the final model instead."""
        return None
