"""A data-parallel fine-tune of a tiny DiT, as one rank of `torchrun` runs it (or as one plain
process without torchrun): tests/test_dist.py launches it with N = 1 and N = 2 ranks and compares.

    python -m torch.distributed.run --standalone --nproc-per-node=2 tests/ddp_worker.py OUT [progressive|f64]

Writes (rank 0) OUT/log.jsonl (the loop's per-step global loss, surgery events) and OUT/ft/final.pt.
f64: model and data in float64, where N ranks and one process differ only by summation order
(~1e-15), while float32 Adam turns that order into ~1e-4 on parameters whose gradients are ~0."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from any directory

import torch  # noqa: E402

from bench import dist  # noqa: E402
from bench.api import Budget  # noqa: E402
from bench.data import calibration, digits  # noqa: E402
from bench.finetune import FinetuneConfig, finetune  # noqa: E402
from tests.conftest import make_net  # noqa: E402


class Float64:
    """A data set whose samples come in float64."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def get(self, idx):
        x, y = self.data.get(idx)
        return x.double(), y


def main(out: Path, mode: str) -> None:
    torch.set_num_threads(1)
    dist.init("cpu")
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
    net, data = make_net("dit"), digits("train")
    if mode == "f64":
        net.net.double()
        data = Float64(data)
    cb = None
    if mode == "progressive":  # EntPruner's adaptive schedule: proxies vote on every rank, rank 0's plan applies
        from bench import registry
        calib = calibration(data, n=32, seed=0, bins=4)
        method = registry.build("entpruner", {"period": 2, "finish_frac": 0.75, "proxy_batch": 8, "batch_size": 32})
        cb = method.callback(Budget("blocks", 0.5), calib)
    cfg = FinetuneConfig(steps=8, batch=16, lr=1e-3, ckpt_every=3, log_every=1)
    finetune(net, data, cfg, out / "ft", seed=5, callback=cb, run_dir=out, device="cpu")
    dist.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "")
