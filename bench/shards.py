"""Samples on disk in shards, written as they are produced, with a manifest.

    <artifacts>/runs/<run>/samples/manifest.json
    <artifacts>/runs/<run>/samples/shard-0000000-0001000.pt    {"samples": [k, C, H, W] float32, "labels": [k],
                                                                "nfe": measured evaluations per sample (mean)}

A shard holds the samples of a contiguous range of sample seeds [lo, hi) (SHARD_SIZE per file, the
last one shorter). Sample i is the same whatever the batch or the shard it is drawn in
(bench.sample: per-sample generators; the adaptive flow solver 'dopri5' is the exception: one step
size sequence per batch, so its samples depend on eval.batch and on where shards cut the batches,
as official SiT's on its per-GPU batch), so shards can be drawn in any order, by any process, and
a killed run resumes at the first missing shard without redoing the finished ones. A shard file is
written atomically; the stage is done when every shard reads (an unreadable one is moved aside and
drawn again). The manifest lists each written shard with its sha256 and its measured network
evaluations per sample (updated under a lock, so several writers can share a folder); readers of
samples rely on the shard files, not on the manifest; the row's `nfe` comes from the manifest
(`nfe()`), so every rank's shards count and a resumed run that draws nothing still reports what
was measured.
Scoring reads the shards in order (`iter_shards`), so a consumer that streams (features per shard)
never holds all samples in memory; `load_all` concatenates for the ones that need everything.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import torch

from bench.io import atomic_torch_save, atomic_write_text, file_lock, read_state, sha256_file

# samples per file (DiT-XL/2 latents: 16 MB; decoded 256x256 images are never stored); the shard
# size never changes the samples, so it is not part of the run's config ($BENCH_SHARD_SIZE: tests)
SHARD_SIZE = int(os.environ.get("BENCH_SHARD_SIZE", "1000"))


class SampleShards:
    """The shards of `n` samples with seeds seed0 .. seed0 + n - 1 in `folder`."""

    def __init__(self, folder, n: int, seed0: int = 0, shard_size: int | None = None):
        self.folder, self.n, self.seed0 = Path(folder), int(n), int(seed0)
        self.size = int(shard_size or SHARD_SIZE)

    @classmethod
    def open(cls, folder) -> "SampleShards":
        """The shards a run wrote in `folder`, as its manifest describes them."""
        m = read_state(Path(folder) / "manifest.json", lambda p: json.loads(p.read_text()), "shard manifest")
        if m is None:
            raise FileNotFoundError(f"no sample shards in {folder} (no readable manifest.json); run the sample stage")
        return cls(folder, m["n"], m["seed0"], m["shard_size"])

    def ranges(self) -> list[tuple[int, int]]:
        """Sample-index ranges [lo, hi) of every shard (indices into the run's n samples)."""
        return [(lo, min(lo + self.size, self.n)) for lo in range(0, self.n, self.size)]

    def path(self, lo: int, hi: int) -> Path:
        return self.folder / f"shard-{lo:07d}-{hi:07d}.pt"

    def _read(self, lo: int, hi: int, on_moved=None):
        def load(p):
            s = torch.load(p, weights_only=True)
            samples, labels = s["samples"], s["labels"]
            if len(samples) != hi - lo or len(labels) != hi - lo or s.get("seed0") != self.seed0 + lo:
                raise ValueError(f"holds {len(samples)} samples from seed {s.get('seed0')}, expected {hi - lo} "
                                 f"from seed {self.seed0 + lo}")
            return samples, labels
        return read_state(self.path(lo, hi), load, "sample shard", on_moved)

    def missing(self, rank: int = 0, world: int = 1, on_moved=None) -> list[tuple[int, int]]:
        """The ranges this writer (rank of world; shard k goes to rank k mod world) still has to draw.
        Unreadable shard files are moved aside (and so count as missing)."""
        return [(lo, hi) for k, (lo, hi) in enumerate(self.ranges())
                if k % world == rank and self._read(lo, hi, on_moved) is None]

    def write(self, lo: int, hi: int, samples: torch.Tensor, labels: torch.Tensor, nfe=None) -> Path:
        """Store one shard atomically and record it in the manifest. `nfe`: the samples' measured
        network evaluations ([k]; default: `samples.nfe`, set by bench.sample.generate), kept as the
        shard's mean in the file and the manifest (`SampleShards.nfe`)."""
        if len(samples) != hi - lo:
            raise ValueError(f"shard [{lo}, {hi}) got {len(samples)} samples")
        nfe = getattr(samples, "nfe", None) if nfe is None else nfe
        nfe = None if nfe is None else float(torch.as_tensor(nfe, dtype=torch.float64).mean())
        path = atomic_torch_save({"samples": samples.detach().float().cpu().contiguous(), "labels": labels.cpu(),
                                  "seed0": self.seed0 + lo, **({"nfe": nfe} if nfe is not None else {})},
                                 self.path(lo, hi))
        with file_lock(self.folder / "manifest.lock"):
            m = read_state(self.folder / "manifest.json", lambda p: json.loads(p.read_text()), "shard manifest") or {}
            m.update({"n": self.n, "seed0": self.seed0, "shard_size": self.size})
            entry = {"lo": lo, "hi": hi, "sha256": sha256_file(path), **({"nfe": nfe} if nfe is not None else {})}
            m.setdefault("shards", {})[path.name] = entry
            atomic_write_text(self.folder / "manifest.json", json.dumps(m, indent=1, sort_keys=True))
        return path

    def nfe(self, default=None):
        """Measured network evaluations per sample over all shards (their mean, weighted by size; an
        int when whole), as the manifest records them; `default` when a shard has no count (drawn
        before counts were kept) or the manifest does not read."""
        from bench.sample import mean_nfe

        m = read_state(self.folder / "manifest.json", lambda p: json.loads(p.read_text()), "shard manifest")
        entries = (m or {}).get("shards", {})
        total = 0.0
        for lo, hi in self.ranges():
            e = entries.get(self.path(lo, hi).name)
            if not e or e.get("nfe") is None or (e["lo"], e["hi"]) != (lo, hi):
                return default
            total += e["nfe"] * (hi - lo)
        return mean_nfe([total / self.n]) if self.n else default

    def complete(self) -> bool:
        return all(self.path(lo, hi).exists() for lo, hi in self.ranges())

    def iter_shards(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(samples, labels) of each shard in seed order; every shard must exist and read."""
        for lo, hi in self.ranges():
            got = self._read(lo, hi)
            if got is None:
                raise FileNotFoundError(f"sample shard {self.path(lo, hi)} is missing; run the sample stage")
            yield got

    def load_all(self) -> tuple[torch.Tensor, torch.Tensor]:
        parts = list(self.iter_shards())
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
