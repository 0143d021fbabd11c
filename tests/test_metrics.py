"""Metrics: the Frechet distance against an independent float64 reference, the digits
classifier proxy (accuracy, cache, scorer) and the cost counters."""
import time
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from bench.data import digits
from bench.metrics import classifier as C
from bench.metrics.cost import count_macs, count_params, measure_latency
from bench.metrics.stats import FrechetRef, feature_stats, frechet_distance
from tests.conftest import np_frechet


# ------------------------------------------------------------------ Frechet distance

def _sqrtm_frechet(mu1, s1, mu2, s2):
    """The form this suite computed fd_clf with before FrechetRef became its one implementation
    (pytorch-fid's and ADM's): scipy.linalg.sqrtm of the non-symmetric product S1 S2, retried with
    eps*I on both covariances when that is not finite."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)  # (near-)singular products
        covmean = scipy.linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            off = 1e-6 * np.eye(len(mu1))
            covmean = scipy.linalg.sqrtm((s1 + off) @ (s2 + off))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def _feats(seed, n=500, d=16, shift=0.0):
    g = np.random.default_rng(seed)
    a = g.normal(size=(d, d)) / np.sqrt(d)
    return g.normal(size=(n, d)) @ a + g.normal(size=d) * 0.3 + shift


def test_feature_stats_float64():
    f = _feats(0).astype(np.float32)
    mu, sigma = feature_stats(f)
    assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (16, 16)
    np.testing.assert_allclose(sigma, np.cov(f.astype(np.float64), rowvar=False))


def test_frechet_matches_reference():
    for seed in range(3):
        s1, s2 = feature_stats(_feats(seed)), feature_stats(_feats(seed + 10))
        got, ref = frechet_distance(*s1, *s2), np_frechet(*s1, *s2)
        assert got == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("n,d,rel", [(500, 16, 1e-12), (256, 64, 1e-11), (64, 64, 1e-7), (20, 40, 1e-7)])
def test_frechet_before_after_on_random_data(n, d, rel):
    """The eigh form (from statistics and from feature rows) gives the sqrtm form's number: to
    round-off where the covariance is regular (fd_clf's case: 256 samples of 64-d features), to
    ~1e-8 where it is singular (n <= d: sqrt magnifies the round-off of the zero eigenvalues; a
    40-digit evaluation puts both forms that far off)."""
    for seed in range(5):
        x, r = _feats(seed, n, d), _feats(seed + 100, 2 * d, d, shift=0.2)
        a, b = feature_stats(x), feature_stats(r)
        want = _sqrtm_frechet(*a, *b)
        assert frechet_distance(*a, *b) == pytest.approx(want, rel=rel)
        assert FrechetRef(*b).fid(x) == pytest.approx(want, rel=rel)


def test_frechet_self_zero_symmetric_monotone():
    mu, sigma = feature_stats(_feats(0))
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)
    s2 = feature_stats(_feats(1))
    assert frechet_distance(mu, sigma, *s2) == pytest.approx(frechet_distance(*s2, mu, sigma), rel=1e-9)
    ds = [frechet_distance(mu, sigma, *feature_stats(_feats(0, shift=t))) for t in (0.0, 0.1, 0.5, 1.0, 3.0)]
    assert all(a < b for a, b in zip(ds, ds[1:]))
    assert ds[-1] == pytest.approx(16 * 3.0 ** 2, rel=1e-6)  # pure mean shift: ||delta||^2


def test_frechet_singular_and_shape_errors():
    # fewer samples than dims: singular covariances still give a finite, ~non-negative value
    a, b = feature_stats(_feats(0, n=8)), feature_stats(_feats(1, n=8))
    d = frechet_distance(*a, *b)
    assert np.isfinite(d) and d > -1e-6
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ------------------------------------------------------------------ classifier proxy

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cache = tmp_path_factory.mktemp("clf")
    t0 = time.perf_counter()
    clf = C.load_or_train(cache, {"kind": "digits"}, seed=0)
    return cache, clf, time.perf_counter() - t0


def test_classifier_accuracy(trained):
    _, clf, _ = trained
    x, y = digits("test").all()
    acc = C.accuracy(clf, x, y)
    assert acc >= 97.0
    assert clf.test_acc == pytest.approx(acc)


def test_classifier_cache_roundtrip(trained, monkeypatch):
    cache, clf, _ = trained
    assert len(list(cache.glob("classifier-*.pt"))) == 1

    def no_training(*a, **k):
        raise AssertionError("load_or_train retrained instead of loading the cache")

    monkeypatch.setattr(C, "train_classifier", no_training)
    again = C.load_or_train(cache, {"kind": "digits"}, seed=0)
    sd1, sd2 = clf.state_dict(), again.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert again.test_acc == clf.test_acc and not again.training
    assert C.ClassifierScorer(again, digits("test").all()[0]).impl == C.ClassifierScorer(clf, digits("test").all()[0]).impl


def test_classifier_any_size():
    clf = C.SmallClassifier(in_ch=1, num_classes=10)
    for hw in (8, 28):
        x = torch.rand(3, 1, hw, hw) * 2 - 1
        assert clf(x).shape == (3, 10) and clf.features(x).shape == (3, 64)


def test_scorer_real_vs_noise(trained):
    _, clf, _ = trained
    scorer = C.ClassifierScorer(clf, digits("train").all()[0])
    assert scorer.impl.startswith("smallcnn-") and len(scorer.impl) == len("smallcnn-") + 8
    x, y = digits("test").all()
    real = scorer.score(x, y)
    noise = scorer.score(torch.randn(x.shape, generator=torch.Generator().manual_seed(0)), y)
    assert real["n"] == noise["n"] == len(y)
    assert real["cond_acc"] >= 95.0
    assert noise["cond_acc"] < 30.0  # ~chance (10%)
    assert real["fd_clf"] * 10 < noise["fd_clf"]


def test_quantize_uint8():
    x = torch.tensor([-3.0, -1.0, 0.0, 0.3, 1.0, 2.0])
    q = C.quantize_uint8(x)
    assert q.min() == -1.0 and q.max() == 1.0
    assert torch.allclose((q + 1) * 127.5, torch.round((q + 1) * 127.5), atol=1e-4)


# ------------------------------------------------------------------ cost

def test_count_macs_linear():
    assert count_macs(torch.nn.Linear(16, 8), torch.randn(4, 16)) == 4 * 16 * 8


def test_count_params_includes_frozen():
    m = torch.nn.Linear(16, 8)  # 16*8 + 8 = 136
    m.bias.requires_grad_(False)
    assert count_params(m) == 136
    assert count_params(m, trainable_only=True) == 128


def test_measure_latency_keys():
    r = measure_latency(lambda: sum(range(100)), warmup=1, reps=5)
    assert {"median_ms", "iqr_ms", "reps"} <= r.keys() and r["reps"] == 5
