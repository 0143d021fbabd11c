"""Batches for the shared fine-tune loop (and TinyFusion's pruning phase): a torch DataLoader over a
bench.data.Dataset that yields one whole batch per step, read with one ``data.get(idx)`` call.

    batches(data, batch, gen, seed, start=0, steps=...) -> iterator of (x0, y), one per step

Which indices, and resume. Two index streams exist:

  "step"  the shared fine-tune loop (it passes no generator), or workers > 0, or world > 1: step k's
          indices come from their own generator, seeded by (seed, k): any number of workers or
          ranks gives the same global batches, a resume needs only the step, and prefetching
          workers can draw step k+1's indices early without touching anyone's stream. The loop's
          noise is a function of (seed, k) too (bench.finetune: derived generator, purpose NOISE).
  "loop"  a caller that passes its generator `gen` (TinyFusion's pruning phase), with workers = 0 and
          one process: step k's indices are ``torch.randint(len(data), (batch,), generator=gen)``,
          drawn from `gen` when the caller asks for the batch, between its other draws.

Flips (``data.hflip``): sample j of step k is mirrored when position j of ``torch.rand(batch)`` from a
generator seeded by (seed, k, flip) is < 0.5: a function of the seed, step and position only, in
both streams, so a resumed run mirrors the same samples and `gen` is not touched. How a sample is
mirrored is the data set's business (Dataset.get_flipped: pixels left-right; latents from their
stored mirrored encodings, else the latent's width axis).

Distribution: `batch` is the global batch; with world > 1 (stream "step") rank r reads positions
[r B/world, (r+1) B/world) of every global batch, so the union over ranks is the batch of stream
"step" at world = 1, whatever the world size.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from bench.api import BenchError

INDICES, FLIPS, CHUNKS, NOISE = 0, 1, 2, 3  # purposes of derived generators: stream "step", flips,
#                                            bench.latents chunks, the fine-tune's draws (bench.finetune)


def derived_generator(seed: int, index: int, purpose: int) -> torch.Generator:
    """A CPU generator for one (seed, index, purpose), e.g. (seed, step, FLIPS), mixed by numpy's
    SeedSequence: distinct triples give independent streams."""
    s = np.random.SeedSequence([int(seed) & (2**64 - 1), int(index), int(purpose)]).generate_state(1, np.uint64)
    return torch.Generator().manual_seed(int(s[0]))


class StepSampler(Sampler):
    """Yields (idx, flip) per step from `start` to `steps`: idx (batch,) int64 dataset indices, flip
    (batch,) bool or None. `gen` given: stream "loop" (drawn lazily from it), else stream "step"."""

    def __init__(self, n: int, batch: int, seed: int, start: int, steps: int, gen: torch.Generator | None = None,
                 hflip: bool = False, rank: int = 0, world: int = 1):
        if n < 1:
            raise BenchError("the training data set is empty; point data.* at a folder or cache with samples")
        if world < 1 or not 0 <= rank < world or batch % world:
            raise BenchError(f"rank {rank} of world {world}: the global batch {batch} must split evenly over the ranks")
        if gen is not None and world > 1:
            raise BenchError("ranks share one global batch: world > 1 needs stream 'step' (no loop generator)")
        self.n, self.batch, self.seed, self.start, self.steps = n, batch, seed, start, steps
        self.gen, self.hflip, self.rank, self.world = gen, hflip, rank, world

    def __len__(self) -> int:
        return max(0, self.steps - self.start)

    def __iter__(self):
        for step in range(self.start, self.steps):
            yield self.draw(step)

    def draw(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        g = self.gen if self.gen is not None else derived_generator(self.seed, step, INDICES)
        idx = torch.randint(self.n, (self.batch,), generator=g)
        flip = torch.rand(self.batch, generator=derived_generator(self.seed, step, FLIPS)) < 0.5 if self.hflip else None
        if self.world > 1:
            part = slice(self.rank * self.batch // self.world, (self.rank + 1) * self.batch // self.world)
            idx, flip = idx[part], None if flip is None else flip[part]
        return idx, flip


class WholeBatches(torch.utils.data.Dataset):
    """Items (idx, flip) -> one whole batch, as the loop always read it (one `data.get(idx)` call);
    flip None: no flips. For a DataLoader with batch_size=None and a sampler of such items."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, item):
        idx, flip = item
        return self.data.get(idx) if flip is None or not flip.any() else self.data.get_flipped(idx, flip)


def batches(data, batch: int, gen: torch.Generator | None, seed: int, start: int = 0, steps: int = 1,
            device="cpu", workers: int | None = None, hflip: bool | None = None, rank: int = 0,
            world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x0, y) for steps start..steps-1 of a loop seeded with `seed`: stream "loop" from `gen` when
    one is given (and workers = 0, world = 1), else stream "step" (the shared fine-tune loop's).
    workers / hflip default to the data set's (data.workers, data.hflip); pinned memory on CUDA."""
    workers = int(getattr(data, "workers", 0) if workers is None else workers)
    hflip = bool(getattr(data, "hflip", False) if hflip is None else hflip)
    loop = gen is not None and workers == 0 and world == 1
    sampler = StepSampler(len(data), batch, seed, start, steps, gen if loop else None, hflip, rank, world)
    loader = DataLoader(WholeBatches(data), sampler=sampler, batch_size=None, num_workers=workers,
                        pin_memory=torch.device(device).type == "cuda",
                        generator=torch.Generator().manual_seed(int(seed) & (2**63 - 1)))  # not the global RNG
    return (tuple(b) for b in loader)
