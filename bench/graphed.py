"""The fine-tune's loss, forward and backward, recorded once as CUDA graphs and replayed at every step
(`finetune.graph: true`).

Why: the GPU tier's model (28 blocks at hidden 96, batch 128) needs a few ms of GPU work per training
step, but an eager step took 70-110 ms on the H100s (results/gpu/tier/README.md). PyTorch launches about
2,000 kernels a step, and the host's launch rate sets the pace. torch.cuda.make_graphed_callables runs the
loss a few times on a side stream, records its forward and its backward as two CUDA graphs, and returns a
callable that copies its inputs into the recorded ones and replays both graphs with one launch each. The
recorded kernels are the ones the eager step launches, in the same order, on the same weights (the
optimizer updates them in place), so the loss and the gradients are the eager step's;
`python -m bench.gpu.tier measure --graph` compares the two on the GPU, weight for weight, and times them.
Clipping, AdamW and the EMA stay eager: multi-tensor kernels, a few dozen launches.

Where it applies (`why_not`): CUDA, one process, no method callback (a progressive method changes the
model between steps, and TinyFusion's recovery loss is its own), no distillation (the teacher's forward is
not recorded), no torch.compile. Elsewhere the loop runs eagerly, and the run's log says why
(`finetune_graph` event). Inside, autocast's weight cache is off, as make_graphed_callables requires; that
cache only saves casting a weight twice, and the cast values are the same.
"""
from __future__ import annotations

import torch
from torch import nn

from bench import dist
from bench.api import BenchError, Draws


def why_not(device, callback, distill: float, compile) -> str | None:
    """Why the fine-tune cannot replay its step as a CUDA graph here, or None when it can."""
    if torch.device(device).type != "cuda":
        return f"device {device} is not CUDA"
    if dist.active():
        return "several processes (DistributedDataParallel's gradient hooks are not recorded)"
    if callback is not None:
        return f"the method's training callback ({type(callback).__name__}) changes the model or the loss between steps"
    if distill > 0:
        return "distillation (the teacher's forward is not recorded)"
    if compile:
        return "finetune.compile is set (torch.compile runs its own graphs)"
    return None


class _Loss(nn.Module):
    """The Denoiser's training loss as a module of the batch's tensors (the backbone's parameters are its
    own, so make_graphed_callables computes their gradients)."""

    def __init__(self, net, names: tuple[str, ...]):
        super().__init__()
        self.backbone = net.net  # registered: its parameters are the graph's
        object.__setattr__(self, "den", net)  # not a submodule (it holds the same backbone)
        self.names = names

    def forward(self, *tensors):
        a = dict(zip(self.names, tensors))
        draws = Draws(a["t"], a["noise"], a.get("drop"))
        return self.den.loss(a["x0"], a.get("y"), draws=draws)


class GraphedLoss:
    """loss(x0, y, draws) of `net` (a Denoiser) through the recorded graphs, built at the first call from its
    inputs' shapes; every later call must bring the same shapes (the fine-tune's batch is fixed)."""

    def __init__(self, net, precision: str):
        self.net, self.bf16 = net, precision == "bf16"
        self.fn, self.names, self.shapes = None, None, None

    def __call__(self, x0: torch.Tensor, y: torch.Tensor | None, draws: Draws) -> torch.Tensor:
        given = {"x0": x0, "y": y, "t": draws.t, "noise": draws.noise, "drop": draws.drop}
        names = tuple(k for k, v in given.items() if v is not None)
        args = tuple(given[k] for k in names)
        shapes = [(tuple(a.shape), a.dtype) for a in args]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=False):
            if self.fn is None:
                self.names, self.shapes = names, shapes
                try:
                    self.fn = torch.cuda.make_graphed_callables(_Loss(self.net, names), tuple(a.clone() for a in args),
                                                                allow_unused_input=True)
                except RuntimeError as e:
                    raise BenchError(f"finetune.graph: recording the training step as a CUDA graph failed ({e}); "
                                     "run with finetune.graph=false") from None
            elif (names, shapes) != (self.names, self.shapes):
                raise BenchError(f"finetune.graph: the step's inputs changed ({list(zip(names, shapes))} after "
                                 f"{list(zip(self.names, self.shapes))}); a recorded step takes one shape: run with "
                                 "finetune.graph=false")
            return self.fn(*args)
