"""ShortGPT block influence and Flux-Lite input/output MSE: remove the blocks that change the
residual stream least.

ShortGPT (Men et al. 2024, "ShortGPT: Layers in Large Language Models are More Redundant Than
You Expect", arXiv 2403.03853, its Block Influence (BI) equation):
    BI_i = 1 - E_{x, t, tokens} [ h_i . h_{i+1} / (||h_i|| ||h_{i+1}||) ]
with h_i the residual stream into block i (``Denoiser.hidden_states``); blocks with the lowest BI
are removed. It is TinyFusion's "ShortGPT" baseline (arXiv 2412.01199, Tables 1 and 3).
Flux-Lite (TinyFusion's reference [6]; the definition is TinyFusion's text, methods.md 7g):
    MSE_i = E_{x, t} [ mean over tokens and channels of (h_{i+1} - h_i)^2 ];  smallest removed.

Our choices: the expectation runs over the shared calibration probes at stratified noise levels,
on properly noised inputs x_t = net.noisy(x0, u, noise) (``inputs="noised"``). TinyFusion's
``prune_by_score.py`` instead feeds *clean* latents with timestep labels from the lowest quarter
(t in [0, 250) of 1000; methods.md 7g); ``inputs="clean_low_t"`` reproduces that with
u' = u / 4 (the stratified u squeezed into [0, 0.25); flow: t in (0.75, 1]), so its per-bin scores are
quarters of that range. ``protect_last=True`` gives the last block the top score (TinyFusion never
removes it). Cosines are per token over channels (ShortGPT), in float64; Diff-ES instead uses a
per-sample cosine of flattened tensors (``flat_cosine``, its scorer in methods.blockscores).
``meta["scores_per_bin"]`` holds the same statistic per calibration noise-level bin (rankings
depend on the noise level; Diff-ES).

Under several ranks (torchrun, a SLURM job of several tasks): plan() runs on rank 0 alone and
the run broadcasts the Plan to the others (bench.run); its forwards over the calibration probes
are not split over ranks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.api import BenchError, Budget, Method, Plan
from bench.surgery import blocks_to_keep, keep_top


def token_cosine(a, b):
    """ShortGPT's BI per sample: 1 - cos(h_in, h_out) per token over channels, mean over tokens."""
    return 1.0 - F.cosine_similarity(a, b, dim=-1).mean(dim=1)


def flat_cosine(a, b):
    """Diff-ES's layer-drop calibration (`calibrate_layerdrop_orders`, methods.md 6b): one cosine
    of the flattened tensors per sample."""
    return 1.0 - F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)


def mse(a, b):
    """Flux-Lite per sample: mean over tokens and channels of (h_out - h_in)^2."""
    return (b - a).pow(2).mean(dim=(1, 2))


def by_bin(values: torch.Tensor, calib) -> tuple[list[float], list[list[float]]]:
    """(n, depth) per-sample values -> mean over all samples, and one mean per noise-level bin."""
    if not torch.isfinite(values).all():
        raise BenchError("block scores are not finite (inf/NaN on the calibration set); check the checkpoint")
    b = calib.bin_of().cpu()
    return values.mean(0).tolist(), [values[b == k].mean(0).tolist() for k in range(calib.bins)]


@torch.no_grad()
def residual_stat(net, calib, stat, inputs: str, batch_size: int) -> torch.Tensor:
    """stat(h_in, h_out) -> (N,) per block, for every calibration sample: an (n, depth) tensor."""
    rows, dev = [], net.device
    with net.eval_mode():
        for x0, y, noise, u in calib.batches(batch_size):
            x0, y, noise, u = x0.to(dev), y.to(dev), noise.to(dev), u.to(dev)
            if inputs == "noised":
                x_t, t = net.noisy(x0, u, noise)
            else:  # clean_low_t: clean input, timestep label from the lowest quarter of noise levels
                x_t, t = x0, net.noisy(x0, u / 4, noise)[1]
            h = [a.double() for a in net.hidden_states(x_t, t, y)]
            rows.append(torch.stack([stat(a, b) for a, b in zip(h[:-1], h[1:])], dim=1).cpu())
    return torch.cat(rows)


class _ResidualScore(Method):
    granularity = "block"
    name = ""

    def __init__(self, inputs: str = "noised", protect_last: bool = False, batch_size: int = 16):
        if inputs not in ("noised", "clean_low_t"):
            raise BenchError(f"inputs={inputs!r} is unknown; use 'noised' or 'clean_low_t'")
        self.inputs, self.protect_last, self.batch_size = inputs, bool(protect_last), int(batch_size)

    def plan(self, net, budget: Budget, calib) -> Plan:
        scores, per_bin = by_bin(residual_stat(net, calib, self.stat, self.inputs, self.batch_size), calib)
        if self.protect_last:
            scores[-1] = max(scores) + 1.0  # above every other block; finite so plan.json stays standard JSON
        kept = keep_top(scores, blocks_to_keep(net, budget))
        return Plan(granularity="block", keep={"blocks": kept}, scores={"blocks": scores},
                    meta={"method": self.name, "inputs": self.inputs, "protect_last": self.protect_last,
                          "calib_n": len(calib), "scores_per_bin": per_bin})


class BlockInfluence(_ResidualScore):
    """ShortGPT: BI = 1 - mean cosine(h_in, h_out) over tokens, samples and noise levels."""

    name = "shortgpt"

    def __init__(self, inputs: str = "noised",  # "noised" (ours) | "clean_low_t" (TinyFusion prune_by_score.py)
                 protect_last: bool = False,    # TinyFusion never removes the last block; ShortGPT does not protect it
                 batch_size: int = 16):         # TinyFusion's scoring batch; memory only, scores do not depend on it
        super().__init__(inputs, protect_last, batch_size)

    stat = staticmethod(token_cosine)


class FluxLite(_ResidualScore):
    """Flux-Lite: mean squared change of the residual stream across the block."""

    name = "flux_lite"

    def __init__(self, inputs: str = "noised",  # properly noised probes at stratified noise levels
                 protect_last: bool = False,    # Flux-Lite as described by TinyFusion protects nothing
                 batch_size: int = 16):         # memory only
        super().__init__(inputs, protect_last, batch_size)

    stat = staticmethod(mse)
