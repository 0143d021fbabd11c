"""The fine-tune's loss, forward and backward, recorded once as a CUDA graph and replayed at every step
(`finetune.graph: true`).

Why: the GPU tier's model (28 blocks at hidden 96, batch 128) needs a few ms of GPU work per training
step, but an eager step took 70-110 ms on the H100s (results/gpu/tier/README.md). PyTorch launches about
2,000 kernels a step, and the host's launch rate sets the pace. `GraphedStep` runs the loss and its backward
a few times on a side stream (lazy initialisation: cuBLAS workspaces, the schedule's device arrays), then
records one forward and backward with torch.cuda.graph (PyTorch's "whole-network capture", without the
optimizer) and replays it at every step: the batch is copied into the recorded input tensors, one launch
runs everything. The recorded kernels are the ones the eager step launches, in the same order, on the same
weights (AdamW updates them in place), so the loss and the gradients are the eager step's;
`python -m bench.gpu.tier measure --graph` compares the two on the GPU, weight for weight, and times them.
The gradients live in buffers the recording allocated: they are the parameters' .grad after every replay,
and the loop does not set them to None. Clipping, AdamW and the EMA stay eager: multi-tensor kernels, a few
dozen launches.

Where it applies (`why_not`): CUDA, one process, no method callback (a progressive method changes the
model between steps, and TinyFusion's recovery loss is its own), no stage-routed model (Diff-ES: the route
is read on the host), no distillation (the teacher's forward is not recorded), no torch.compile. Elsewhere
the loop runs eagerly, and the run's log says why (`finetune_graph` event). Inside, autocast's weight cache
is off, as recording requires; that cache only saves casting a weight twice, and the cast values are the
same.
"""
from __future__ import annotations

import torch

from bench import dist
from bench.api import BenchError, Draws


def why_not(device, callback, distill: float, compile, net=None) -> str | None:
    """Why the fine-tune cannot replay its step as a CUDA graph here, or None when it can."""
    from bench.routing import is_routed

    if torch.device(device).type != "cuda":
        return f"device {device} is not CUDA"
    if net is not None and is_routed(net):
        return "a stage-routed model (Diff-ES) picks its blocks per sample's timestep on the host"
    if dist.active():
        return "several processes (DistributedDataParallel's gradient hooks are not recorded)"
    if callback is not None:
        return f"the method's training callback ({type(callback).__name__}) changes the model or the loss between steps"
    if distill > 0:
        return "distillation (the teacher's forward is not recorded)"
    if compile:
        return "finetune.compile is set (torch.compile runs its own graphs)"
    return None


WARMUP = 3  # eager forward + backward passes on a side stream before the recording (PyTorch's recipe)


class GraphedStep:
    """Forward and backward of `net`'s loss (a Denoiser) through one recorded CUDA graph, recorded at the first
    call from its inputs; every later call must bring the same shapes (the fine-tune's batch is fixed). Returns
    the loss; the parameters' .grad then hold the step's gradients."""

    def __init__(self, net, precision: str):
        self.net, self.bf16 = net, precision == "bf16"
        self.graph, self.names, self.shapes = None, None, None

    def _loss(self, args) -> torch.Tensor:
        a = dict(zip(self.names, args))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=False):
            return self.net.loss(a["x0"], a.get("y"), draws=Draws(a["t"], a["noise"], a.get("drop")))

    def _record(self, args) -> None:
        params = [p for p in self.net.net.parameters() if p.requires_grad]
        self.static = tuple(a.clone() for a in args)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP):
                for p in params:
                    p.grad = None
                self._loss(self.static).backward()
        torch.cuda.current_stream().wait_stream(side)
        for p in params:
            p.grad = None  # the recorded backward allocates them and, replayed, writes (not adds) into them
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = self._loss(self.static)
            self.loss.backward()
        self.grads = [(p, p.grad) for p in params]  # None for a parameter the loss does not use, as in eager

    def __call__(self, x0: torch.Tensor, y: torch.Tensor | None, draws: Draws) -> torch.Tensor:
        given = {"x0": x0, "y": y, "t": draws.t, "noise": draws.noise, "drop": draws.drop}
        names = tuple(k for k, v in given.items() if v is not None)
        args = tuple(given[k] for k in names)
        shapes = [(tuple(a.shape), a.dtype) for a in args]
        if self.graph is None:
            self.names, self.shapes = names, shapes
            try:
                self._record(args)
            except RuntimeError as e:
                raise BenchError(f"finetune.graph: recording the training step as a CUDA graph failed ({e}); "
                                 "run with finetune.graph=false") from None
        elif (names, shapes) != (self.names, self.shapes):
            raise BenchError(f"finetune.graph: the step's inputs changed ({list(zip(names, shapes))} after "
                             f"{list(zip(self.names, self.shapes))}); a recorded step takes one shape: run with "
                             "finetune.graph=false")
        for dst, src in zip(self.static, args):
            dst.copy_(src)
        self.graph.replay()
        for p, g in self.grads:
            p.grad = g
        return self.loss
