"""The default's quality proxy: a small CNN classifier trained on the embedded data.

This is NOT FID: there is no Inception network. A small classifier, trained once per dataset
and cached, scores generated samples by
  cond_acc  % of samples generated for label y that the classifier assigns to y
  fd_clf    Frechet distance (Heusel et al. 2017, Eq. 6) between the classifier's penultimate
            features of the samples and of real images.
Numbers are comparable only between rows with the same `ClassifierScorer.impl`
("smallcnn-<sha8 of the weights>"), which rows record as metric_impl.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.api import BenchError
from bench.io import atomic_torch_save, read_state
from bench.metrics.stats import FrechetRef, feature_stats

VERSION = 1  # bump when the architecture or training recipe changes: it enters the cache key
HPARAMS = {"steps": 500, "batch": 64, "lr": 2e-3, "width": 16, "emb_dim": 64}


class SmallClassifier(nn.Module):
    """Conv net for (C, H, W) images in [-1, 1] of any small size (8x8 digits, 28x28 MNIST-likes):
    adaptive pooling to 4x4 makes the head size-independent."""

    def __init__(self, in_ch: int = 1, num_classes: int = 10, width: int = 16, emb_dim: int = 64):
        super().__init__()
        self.arch = {"in_ch": in_ch, "num_classes": num_classes, "width": width, "emb_dim": emb_dim}
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.SiLU(),
            nn.Flatten(),
            nn.Linear(2 * width * 16, emb_dim), nn.SiLU(),  # smooth: no dead feature dims for the covariance
        )
        self.head = nn.Linear(emb_dim, num_classes)
        self.test_acc = float("nan")  # set by load_or_train (held-out split, %)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate embedding (N, emb_dim): the feature space of fd_clf."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@contextlib.contextmanager
def _one_thread():
    """Tiny batches gain nothing from intra-op threads (and slow down ~10x on a busy machine);
    one thread also makes the weights, hence `impl`, independent of the machine's core count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def train_classifier(dataset, num_classes: int, seed: int = 0, steps: int = HPARAMS["steps"],
                     batch: int = HPARAMS["batch"], lr: float = HPARAMS["lr"], width: int = HPARAMS["width"],
                     emb_dim: int = HPARAMS["emb_dim"]) -> SmallClassifier:
    """AdamW with cosine decay, batches drawn with a seeded generator; deterministic given seed.
    No augmentation: on the small, centred 8x8 digits even 1-pixel shifts cost accuracy."""
    x, y = dataset.all()
    x, y = x.float(), y.long()
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
        torch.manual_seed(seed)
        clf = SmallClassifier(x.shape[1], num_classes, width, emb_dim)
    g = torch.Generator().manual_seed(seed)  # batch order
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    clf.train()
    with _one_thread():
        for _ in range(steps):
            idx = torch.randint(0, len(y), (batch,), generator=g)
            loss = F.cross_entropy(clf(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return clf.eval()


@torch.no_grad()
def _batched(fn, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch]) for i in range(0, x.shape[0], batch)])


@torch.no_grad()
def accuracy(clf: SmallClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    clf.eval()
    return 100.0 * (_batched(clf, x.float()).argmax(1) == y).float().mean().item()


def load_or_train(cache_dir, data_cfg: dict, seed: int = 0) -> SmallClassifier:
    """The classifier for data_cfg (kwargs of bench.data.build_dataset, which must accept split=),
    trained on split="train" once and cached at cache_dir/classifier-<hash12>.pt (atomic save).
    `clf.test_acc` is its accuracy on split="test", stored in the cache file."""
    from bench.data import build_dataset

    key = json.dumps({"data": data_cfg, "hparams": HPARAMS, "seed": seed, "version": VERSION},
                     sort_keys=True, default=str)
    path = Path(cache_dir) / f"classifier-{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt"
    def load(p):
        ck = torch.load(p, map_location="cpu", weights_only=True)
        clf = SmallClassifier(**ck["arch"])
        clf.load_state_dict(ck["state_dict"])
        clf.test_acc = ck["test_acc"]
        return clf.eval()

    if (clf := read_state(path, load, "scoring classifier")) is not None:  # unreadable: moved aside, retrained
        return clf

    def split(name):
        try:
            return build_dataset(**data_cfg, split=name)
        except TypeError as e:
            raise BenchError(f"data {data_cfg} has no split={name!r} ({e}); the classifier proxy needs "
                             "a dataset with train/test splits (e.g. kind=digits)") from None

    train = split("train")
    t0 = time.perf_counter()
    clf = train_classifier(train, train.num_classes, seed=seed)
    train_s = time.perf_counter() - t0
    clf.test_acc = accuracy(clf, *split("test").all())
    atomic_torch_save({"arch": clf.arch, "state_dict": clf.state_dict(), "test_acc": clf.test_acc,
                       "data_cfg": json.loads(json.dumps(data_cfg, default=str)), "hparams": HPARAMS,
                       "seed": seed, "version": VERSION, "train_s": train_s}, path)
    return clf


def quantize_uint8(x: torch.Tensor) -> torch.Tensor:
    """Clamp to [-1, 1] and round to 256 levels, as saving samples as 8-bit images would
    (round((x + 1) * 127.5), then back to [-1, 1])."""
    return torch.round((x.float().clamp(-1.0, 1.0) + 1.0) * 127.5) / 127.5 - 1.0


class ClassifierScorer:
    """Scores generated samples against real images with a trained SmallClassifier (not FID).

    Both samples and reference images go through quantize_uint8 first, so neither side is
    favoured by precision the other lacks (the same as pipelines that save PNGs before scoring).
    """

    def __init__(self, clf: SmallClassifier, ref_x: torch.Tensor, batch: int = 512):
        self.clf, self.batch = clf.eval(), batch
        self.ref = FrechetRef(*feature_stats(self._features(ref_x).cpu().numpy()))  # its sqrt serves every score
        h = hashlib.sha256()
        for k, v in sorted(clf.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        self._impl = f"smallcnn-{h.hexdigest()[:8]}"

    @property
    def impl(self) -> str:
        """Identifies the classifier behind the numbers (record as a row's metric_impl)."""
        return self._impl

    @torch.no_grad()
    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """float32 features on the classifier's device (samples may come from another device)."""
        dev = next(self.clf.parameters()).device
        return _batched(self.clf.features, quantize_uint8(x.to(dev)), self.batch)

    @torch.no_grad()
    def score(self, samples: torch.Tensor, labels: torch.Tensor) -> dict:
        """{"cond_acc": % classified as their intended label, "fd_clf": Frechet distance to the
        reference features, "n": number of samples}."""
        if samples.shape[0] != labels.shape[0]:
            raise BenchError(f"{samples.shape[0]} samples but {labels.shape[0]} labels")
        feats = self._features(samples)
        pred = self.clf.head(feats).argmax(1).cpu()
        return {"cond_acc": 100.0 * (pred == labels.cpu().long()).float().mean().item(),
                "fd_clf": self.ref.fid(feats.cpu()),  # float64 inside
                "n": int(samples.shape[0])}
