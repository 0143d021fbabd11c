"""Inception metrics (bench.metrics.fid / stats / inception / refstats / export): the statistics
against float64 and library references, the extractors' feature layout, the three backends, the
reference cache, sample export and the GPU script's smoke mode. CPU, one thread, a few images
(every 299x299 Inception forward costs ~0.25 s here)."""
import hashlib
import shutil
import warnings

import numpy as np
import pytest
import torch

from bench import assets
from bench.api import BenchError
from bench.data import digits
from bench.metrics import stats
from bench.metrics.export import export_npz, export_png_folder, read_adm_npz, to_uint8
from bench.metrics.fid import AdmBackend, CleanFidBackend, config, evaluate, make_backend
from bench.metrics.stats import feature_stats, frechet_distance
from bench.metrics.refstats import Reference
from tests.conftest import RANDOM_INCEPTION_ASSET, np_frechet

FID_HELPER_SHA = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BENCH_HASH_CACHE", str(tmp_path_factory.mktemp("hash") / "sha256.json"))
        mp.delenv("BENCH_ASSETS", raising=False)
        yield


@pytest.fixture(scope="module")
def x_digits():
    return digits("all").all()[0]


def _feats(seed, n, d, shift=0.0):
    g = np.random.default_rng(seed)
    return np.abs(g.normal(size=(n, d)) @ g.normal(size=(d, d)) / np.sqrt(d)) + shift


# ------------------------------------------------------------------ statistics

@pytest.mark.parametrize("n,d", [(300, 24), (20, 40)])  # n > d, and n < d (singular sample covariance)
def test_fid_equals_float64_references(n, d):
    x, r = _feats(0, n, d), _feats(1, 200, d, shift=0.3)
    mu_r, s_r = feature_stats(r)
    got = stats.FrechetRef(mu_r, s_r).fid(x)
    assert got == pytest.approx(frechet_distance(*feature_stats(x), mu_r, s_r), rel=1e-6)
    assert got == pytest.approx(np_frechet(*feature_stats(x), mu_r, s_r), rel=1e-6)


def test_fid_self_zero_and_grows_with_shift():
    x = _feats(0, 400, 16)
    ref = stats.FrechetRef(*feature_stats(x))
    assert abs(ref.fid(x)) < 1e-9 * np.trace(feature_stats(x)[1])
    ds = [ref.fid(x + t) for t in (0.0, 0.1, 0.5, 1.0, 3.0)]
    assert all(a < b for a, b in zip(ds, ds[1:]))
    assert ds[-1] == pytest.approx(16 * 9.0, rel=1e-6)  # a pure mean shift adds ||delta||^2


def test_bootstrap_fid_replicates_are_resampled_fids():
    x, r = _feats(0, 60, 12), _feats(1, 80, 12)
    ref = stats.FrechetRef(*feature_stats(r))
    reps = ref.bootstrap(x, B=4, seed=3)
    assert np.array_equal(reps, ref.bootstrap(x, B=4, seed=3)) and len(set(reps)) == 4
    g = torch.Generator().manual_seed(3)
    for b in range(2):  # replicate b is the FID of the b-th resample drawn from the seeded generator
        idx = torch.randint(60, (60,), generator=g).numpy()
        assert reps[b] == pytest.approx(frechet_distance(*feature_stats(x[idx]), *feature_stats(r)), rel=1e-6)
    lo, hi = stats.percentile_ci(reps, 0.95)
    assert reps.min() <= lo <= hi <= reps.max()
    point = ref.fid(x)  # replicates sit above the estimate (FID's small-n bias); centred: bias removed
    clo, chi = stats.percentile_ci(reps, 0.95, center=point)
    assert clo == pytest.approx(lo - reps.mean() + point) and chi - clo == pytest.approx(hi - lo)
    assert clo <= point <= chi


def test_kid_matches_torch_fidelity():
    from torch_fidelity.metric_kid import kid_features_to_metric

    a, b = _feats(0, 40, 32).astype(np.float32), _feats(1, 50, 32, shift=0.05).astype(np.float32)
    mean, std = stats.kid(a, b, subsets=10, subset_size=30, seed=2020)
    tf = kid_features_to_metric(torch.from_numpy(a), torch.from_numpy(b), kid_subsets=10, kid_subset_size=30,
                                rng_seed=2020, verbose=False)
    assert mean == pytest.approx(tf["kernel_inception_distance_mean"], rel=1e-4, abs=1e-7)
    assert std == pytest.approx(tf["kernel_inception_distance_std"], rel=1e-4, abs=1e-7)
    assert stats.kid(a, b, 10, 30, 2020, gram_max=0) == pytest.approx((mean, std), rel=1e-10)  # per-subset path


def test_bootstrap_kid_equals_brute_force():
    g0 = np.random.default_rng(0)
    a, b = g0.normal(size=(12, 8)), g0.normal(size=(15, 8)) + 0.2
    reps = stats.bootstrap_kid(a, b, B=3, seed=5, block=5)  # blocks smaller than n: exercises the streaming
    k = lambda u, v: (u @ v.T / 8 + 1) ** 3  # noqa: E731
    g = torch.Generator().manual_seed(5)
    for rep in reps:
        idx = torch.randint(12, (12,), generator=g).numpy()
        distinct = idx[:, None] != idx[None, :]  # pairs of different original points
        xx = k(a[idx], a[idx])[distinct].mean()
        yy = k(b, b)[~np.eye(15, dtype=bool)].mean()
        assert rep == pytest.approx(xx + yy - 2 * k(a[idx], b).mean(), rel=1e-10)


def test_precision_recall_self_disjoint_and_torch_fidelity():
    from torch_fidelity.metric_prc import prc_features_to_metric

    a, b = _feats(0, 60, 16), _feats(1, 70, 16)
    assert stats.precision_recall(a, a) == (1.0, 1.0)
    assert stats.precision_recall(a, a + 100.0) == (0.0, 0.0)
    p, r = stats.precision_recall(a, b, k=3)
    tf = prc_features_to_metric(torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32),
                                prc_neighborhood=3, verbose=False)
    assert (p, r) == pytest.approx((tf["precision"], tf["recall"]), abs=1e-6) and 0 < p < 1  # its mean is fp32


def test_inception_score_adm_splits():
    from torch_fidelity.metric_isc import isc_features_to_metric

    assert stats.inception_score(torch.zeros(6, 1008)) == pytest.approx(1.0)
    confident = 60.0 * torch.eye(4).repeat(2, 1)  # 8 samples, 4 classes, balanced, certain
    assert stats.inception_score(confident) == pytest.approx(4.0, rel=1e-6)
    z = torch.randn(10, 50, generator=torch.Generator().manual_seed(0)) * 3
    one = isc_features_to_metric(z, splits=1, shuffle=False)["inception_score_mean"]
    assert stats.inception_score(z) == pytest.approx(one, rel=1e-9)
    two = np.mean([stats.inception_score(z[:5]), stats.inception_score(z[5:])])
    assert stats.inception_score(z, split_size=5) == pytest.approx(two, rel=1e-12)  # consecutive splits, as ADM


def test_sfid_is_computed_from_the_spatial_features():
    be = AdmBackend.__new__(AdmBackend)
    be.cfg, be.device = config({}), "cpu"
    pool, spatial = _feats(0, 30, 6), _feats(1, 30, 7)
    ref = Reference(*feature_stats(_feats(2, 50, 6)), n=50, label="r", path=None,
                    mu_s=feature_stats(_feats(3, 50, 7))[0], sigma_s=feature_stats(_feats(3, 50, 7))[1])
    base = be.point_metrics({"pool": torch.tensor(pool), "spatial": torch.tensor(spatial)}, ref)
    moved_s = be.point_metrics({"pool": torch.tensor(pool), "spatial": torch.tensor(spatial + 1.0)}, ref)
    moved_p = be.point_metrics({"pool": torch.tensor(pool + 1.0), "spatial": torch.tensor(spatial)}, ref)
    assert moved_s["fid"] == base["fid"] and moved_s["sfid"] > base["sfid"]
    assert moved_p["sfid"] == base["sfid"] and moved_p["fid"] > base["fid"]


# ------------------------------------------------------------------ export

def test_export_npz_and_png_roundtrip(tmp_path):
    from PIL import Image

    x = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0, 2.0]).repeat(2, 1, 6, 1)  # N=2, C=1, 6x6
    npz = export_npz(x, tmp_path / "s.npz")
    z = read_adm_npz(npz)
    assert list(np.load(npz).files) == ["arr_0"]
    a = z["arr_0"]
    assert a.dtype == np.uint8 and a.shape == (2, 6, 6, 3)
    # DiT sample_ddp.py: clamp(127.5 x + 128, 0, 255) truncated to uint8
    assert a[0, 0, :, 0].tolist() == [0, 64, 128, 191, 255, 255]
    d = export_png_folder(x, tmp_path / "png")
    files = sorted(p.name for p in d.iterdir())
    assert files == ["000000.png", "000001.png"]
    assert np.array_equal(np.stack([np.asarray(Image.open(d / f)) for f in files]), a)
    assert torch.equal(to_uint8(torch.from_numpy(a).permute(0, 3, 1, 2)), torch.from_numpy(a).permute(0, 3, 1, 2))
    with pytest.raises(BenchError, match="NaN"):
        to_uint8(torch.full((1, 1, 2, 2), float("nan")))


def test_inception_config_composes_and_refuses_typos():
    from tests.conftest import compose

    d, e = compose(["eval=inception"]), compose([])
    assert {k: v for k, v in d["eval"].items() if k != "inception"} == e["eval"]  # the default's keys, unchanged
    cfg = config(d["eval"])
    assert cfg["backend"] == "adm" and cfg["extractor"] == "fid-helper" and cfg["bootstrap"] > 0
    with pytest.raises(BenchError, match="unknown eval.inception keys"):
        config({"inception": {"bootsrap": 10}})
    with pytest.raises(BenchError, match="backend"):
        config({"backend": "tensorflow"})
    with pytest.raises(BenchError, match="eval=inception"):
        config(e["eval"])  # the default eval group has no inception block


# ------------------------------------------------------------------ extractors and backends (real fid-helper file)

def test_fid_helper_features_pool_and_nhwc_spatial(x_digits):
    from bench.metrics.inception import make_extractor, tf1_resize

    ex = make_extractor("fid-helper")
    assert ex.id == "fid-helper-7ff4a85c" and ex.sha256 == FID_HELPER_SHA and "logits" not in ex.provides
    x = to_uint8(x_digits[:2])
    f = ex.extract(x)
    assert f["pool"].shape == (2, 2048) and f["spatial"].shape == (2, 17 * 17 * 7)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        whole = torch.jit.load(str(ex.path)).eval()(tf1_resize(x))  # the module's own forward
        h = tf1_resize(x)
        for name, mod in ex.layers.named_children():
            if name == "mixed_6":
                break
            h = mod(h)
        m6 = ex.layers.mixed_6.conv(h)  # TF mixed_6/conv: N x 192 x 17 x 17
    assert torch.equal(f["pool"], whole)
    assert m6.shape == (2, 192, 17, 17)
    for i, hh, ww, c in [(0, 0, 0, 0), (1, 3, 16, 6), (0, 16, 2, 5)]:  # NHWC flatten of the first 7 channels
        assert f["spatial"][i, (hh * 17 + ww) * 7 + c] == m6[i, c, hh, ww]


def test_clean_fid_backend_features_and_metrics(x_digits, tmp_path, monkeypatch):
    from cleanfid import fid as cfid

    x = to_uint8(x_digits[:2])
    legacy = CleanFidBackend(config({"backend": "clean-fid", "clean_fid_mode": "legacy_tensorflow"}), "cpu")
    assert legacy.impl.startswith("clean-fid-0.1.35-legacy_tensorflow/fid-helper-7ff4a85c")
    f_legacy = legacy.features(x)["pool"]  # through clean-fid's PNG folder pipeline
    f_adm = legacy.ex.extract(x)["pool"]    # the same TF1 resize + network, directly
    torch.testing.assert_close(f_legacy, f_adm, rtol=1e-5, atol=1e-6)
    clean = CleanFidBackend(config({"backend": "clean-fid", "clean_fid_mode": "clean"}), "cpu")
    f_clean = clean.features(x)["pool"]  # PIL bicubic resize instead: a different protocol
    assert f_clean.shape == (2, 2048) and not torch.allclose(f_clean, f_adm, atol=1e-3)
    # point metrics: clean-fid's own frechet_distance and (seeded) kernel_distance
    g, r = _feats(0, 30, 8).astype(np.float32), _feats(1, 40, 8).astype(np.float32)
    ref = Reference(*feature_stats(r), n=40, label="r", path=None, feats={"pool": torch.from_numpy(r)})
    m = clean.point_metrics({"pool": torch.from_numpy(g)}, ref)
    assert m["fid"] == pytest.approx(frechet_distance(*feature_stats(g), *feature_stats(r)), rel=1e-5)
    np.random.seed(2020)
    assert m["kid"] == cfid.kernel_distance(g, r) == clean.point_metrics({"pool": torch.from_numpy(g)}, ref)["kid"]
    # clean-fid's own weights file is not on this machine: a clear error, no download
    monkeypatch.setitem(assets.ASSETS, "clean-fid-inception",
                        __import__("dataclasses").replace(assets.ASSETS["clean-fid-inception"],
                                                          folders=(str(tmp_path / "empty"),)))
    with pytest.raises(BenchError) as e:
        make_backend(config({"backend": "clean-fid", "extractor": "clean-fid-ts"}), "cpu")
    assert "inception-2015-12-05.pt" in str(e.value) and "f58cb9b6ec323ed6" in str(e.value)


def test_evaluate_end_to_end_fid_helper(x_digits, tmp_path):
    ref_x, cfg = x_digits[:8], {"inception": {"bootstrap": 10, "batch": 8}}
    # (a) a set against itself: FID ~ 0, precision = recall = 1; the reference is computed and cached
    with pytest.warns(UserWarning, match="n=8 < 10,000"):
        m, impl, ref, extra = evaluate(ref_x, lambda: ref_x, cfg, tmp_path, "digits", "cpu")
    assert impl == "adm-pt/fid-helper-7ff4a85c" and ref == "digits-all-8px-n8"
    assert extra["weights_sha256"] == FID_HELPER_SHA and extra["weights_path"].endswith("default_1.pt")
    assert extra["n"] == 8 and any("no Inception Score" in w for w in extra["warnings"]) and "is" not in m
    assert abs(m["fid"]) < 1e-3 and abs(m["sfid"]) < 1e-3
    assert m["precision"] == m["recall"] == 1.0
    cache = tmp_path / "refstats" / "digits-all-8px-adm-fid-helper-7ff4a85c.npz"
    z = read_adm_npz(cache)
    assert z["arr_0"].shape == (8, 8, 8, 3) and z["arr_0"].dtype == np.uint8
    assert z["mu"].shape == (2048,) and z["sigma"].shape == (2048, 2048)
    assert z["mu_s"].shape == (2023,) and z["sigma_s"].shape == (2023, 2023)

    # (b) other samples: the cached reference is used (the images function is not called)
    def no_images():
        raise AssertionError("reference recomputed")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        mb, _, refb, _ = evaluate(x_digits[100:108], no_images, cfg, tmp_path, "digits", "cpu")
    assert refb == ref and mb["fid"] > 1.0 and mb["sfid"] > 1.0
    assert mb["fid_ci_lo"] <= mb["fid"] <= mb["fid_ci_hi"] and mb["kid_ci_lo"] <= mb["kid_ci_hi"]

    # (b') the same samples streamed in chunks (a run's shards, decoded one at a time): the same
    # metrics, and eval.inception.n takes the first n across chunk boundaries
    by4 = {"inception": {**cfg["inception"], "batch": 4}}  # the same Inception batches either way
    n6 = {"inception": {**by4["inception"], "n": 6}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        mt, _, _, _ = evaluate(x_digits[100:108], no_images, by4, tmp_path, "digits", "cpu")
        ms, _, _, xs = evaluate(iter(x_digits[100:108].split(4)), no_images, by4, tmp_path, "digits", "cpu")
        m6t, _, _, _ = evaluate(x_digits[100:108], no_images, n6, tmp_path, "digits", "cpu")
        m6, _, _, x6 = evaluate(iter(x_digits[100:108].split(4)), no_images, n6, tmp_path, "digits", "cpu")
    assert ms == mt and xs["n"] == 8 and x6["n"] == 6 and m6 == m6t
    with pytest.raises(BenchError, match="only 8 samples exist"):
        evaluate(iter(x_digits[100:108].split(4)), no_images, {"inception": {**cfg["inception"], "n": 9}}, tmp_path,
                 "digits", "cpu")
    assert {"kid", "kid_std", "precision", "recall"} <= set(mb)

    # (c) a user's ADM reference batch is used as is (its mu/sigma; features only of its arr_0)
    user = tmp_path / "user_ref.npz"
    np.savez(user, arr_0=z["arr_0"], mu=z["mu"] + 0.5, sigma=z["sigma"], mu_s=z["mu_s"], sigma_s=z["sigma_s"])
    before = hashlib.sha256(user.read_bytes()).hexdigest()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        mc, _, refc, extrac = evaluate(x_digits[100:108], no_images, {"inception": {**cfg["inception"], "ref_npz": str(user)}},
                                       tmp_path, "digits", "cpu")
    assert refc.startswith("npz:user_ref@" + before[:8]) and extrac["ref_path"] == str(user)
    assert hashlib.sha256(user.read_bytes()).hexdigest() == before  # never rewritten
    assert mc["sfid"] == pytest.approx(mb["sfid"], rel=1e-9) and mc["kid"] == pytest.approx(mb["kid"], rel=1e-9)
    assert mc["fid"] != pytest.approx(mb["fid"], rel=1e-3)  # the shifted mu was used


# ------------------------------------------------------------------ torch-fidelity vs the ADM path (random weights)

@pytest.fixture(scope="module")
def tfid_random(tmp_path_factory, x_digits, random_inception):
    """The random weights (tests/conftest.py: written as a file, registered through bench.assets
    with its sha256), then both backends evaluated on the same images."""
    d = tmp_path_factory.mktemp("tfid")
    path, sha = random_inception.path, random_inception.sha
    with pytest.MonkeyPatch.context() as mp:
        random_inception.register(mp)
        gen, ref = x_digits[200:210], x_digits[:8]
        base = {"extractor": "torch-fidelity", "weights_asset": RANDOM_INCEPTION_ASSET, "weights": str(path),
                "bootstrap": 5, "kid_subset_size": 8, "batch": 10}
        out = {"path": path, "sha": sha, "gen": gen, "ref": ref}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            out["adm"] = evaluate(gen, lambda: ref, {"inception": {**base, "backend": "adm"}}, d, "digits", "cpu")
            out["tfid"] = evaluate(gen, lambda: ref, {"inception": {**base, "backend": "torch-fidelity"}}, d, "digits",
                                   "cpu")
        yield out


def test_torch_fidelity_and_adm_path_agree(tfid_random):
    (ma, impl_a, ref_a, ex_a), (mt, impl_t, ref_t, ex_t) = tfid_random["adm"], tfid_random["tfid"]
    sha8 = tfid_random["sha"][:8]
    assert impl_a == f"adm-pt/torch-fidelity-{sha8}" and impl_t == f"torch-fidelity-0.4.0/torch-fidelity-{sha8}"
    assert ex_a["weights_sha256"] == ex_t["weights_sha256"] == tfid_random["sha"]
    assert ref_a == ref_t == "digits-all-8px-n8"
    assert ma["fid"] > 0.01 and ma["fid"] == pytest.approx(mt["fid"], rel=1e-3)
    assert ma["kid"] == pytest.approx(mt["kid"], rel=1e-3, abs=1e-6)
    assert (ma["precision"], ma["recall"]) == pytest.approx((mt["precision"], mt["recall"]), abs=1e-6)
    assert {"sfid", "is"} <= set(ma) and "sfid" not in mt  # torch-fidelity has no sFID
    assert mt["fid_ci_lo"] <= mt["fid_ci_hi"]


def test_torch_fidelity_backend_equals_calculate_metrics(tfid_random):
    """Our torch-fidelity backend (features once, the library's metric functions) gives the numbers
    of torch_fidelity.calculate_metrics on the same uint8 images with the same weights file."""
    import torch_fidelity

    class U8(torch.utils.data.Dataset):
        def __init__(self, x):
            self.x = to_uint8(x)

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i]

    tf = torch_fidelity.calculate_metrics(
        input1=U8(tfid_random["gen"]), input2=U8(tfid_random["ref"]), isc=True, kid=True, prc=True,
        feature_extractor="inception-v3-compat", feature_extractor_weights_path=str(tfid_random["path"]),
        kid_subset_size=8, cuda=False, save_cpu_ram=True, cache=False, verbose=False, batch_size=10)
    m = tfid_random["tfid"][0]
    assert m["is"] == pytest.approx(tf["inception_score_mean"], rel=1e-6)
    assert m["kid"] == pytest.approx(tf["kernel_inception_distance_mean"], rel=1e-6)
    assert m["kid_std"] == pytest.approx(tf["kernel_inception_distance_std"], rel=1e-6)
    assert (m["precision"], m["recall"]) == pytest.approx((tf["precision"], tf["recall"]), abs=1e-9)


# ------------------------------------------------------------------ eval=inception through the run spine

def test_dense_eval_inception_row(tiny_cfg, random_inception, x_digits, tmp_path, monkeypatch):
    """`bench.run method=dense eval=inception` on the tiny config: the row carries Inception FID and
    KID with intervals, metric_n / fid_n, the weights file (found through bench.assets by its env
    variable, sha256 checked) and the n < 10k warning, which log.jsonl records too. Few samples:
    8 generated against an 8-image ADM reference batch (arr_0 only: mu/sigma from its features)."""
    import json
    from pathlib import Path

    from bench.results import load_rows, run_relpath
    from bench.run import execute

    random_inception.register(monkeypatch)
    monkeypatch.setenv("BENCH_TEST_INCEPTION", str(random_inception.path))
    ref = export_npz(x_digits[:8], tmp_path / "ref8.npz")
    cfg = tiny_cfg("dense", ["budget.keep=1.0", "eval=inception", "eval.n=8", "eval.batch=8",
                             "eval.inception.extractor=torch-fidelity",
                             f"eval.inception.weights_asset={RANDOM_INCEPTION_ASSET}", f"eval.inception.ref_npz={ref}",
                             "eval.inception.bootstrap=5", "eval.inception.kid_subset_size=8",
                             "eval.inception.batch=8"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        row = execute(cfg)
    m = row.metrics
    assert {"fid", "fid_ci_lo", "fid_ci_hi", "kid", "kid_std", "kid_ci_lo", "kid_ci_hi", "sfid", "is"} <= set(m)
    assert m["fid"] > 0 and m["fid_ci_lo"] <= m["fid"] <= m["fid_ci_hi"] and m["kid_ci_lo"] <= m["kid_ci_hi"]
    assert {"cond_acc", "fd_clf"} <= set(m)  # the default protocol's proxies stay beside them
    assert row.metric_n == 8 and row.fid_n == 8
    assert row.fid_impl == f"adm-pt/torch-fidelity-{random_inception.sha[:8]}"
    assert row.fid_weights == str(random_inception.path) and row.fid_weights_sha256 == random_inception.sha
    assert row.fid_ref.startswith("npz:ref8@") and row.latency_reps == 2
    assert any("n=8 < 10,000" in w for w in row.warnings)
    run_dir = Path(cfg["paths"]["results"]) / run_relpath(cfg)
    saved = json.loads((run_dir / "row.json").read_text())
    assert saved["warnings"] == row.warnings and saved["fid_weights"] == str(random_inception.path)
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert sum((e["messages"] for e in log if e["event"] == "warnings"), []) == row.warnings  # scoring's, then timing's
    df = load_rows(cfg["paths"]["results"])
    assert df.loc[0, "fid_n"] == 8 and df.loc[0, "m_kid_ci_hi"] == m["kid_ci_hi"]
    from bench.report import build_report
    md = next(p for p in build_report(df, tmp_path / "report", "t") if p.suffix == ".md").read_text()
    assert "n=8" in md and "Below 10,000 samples FID is biased upward" in md  # the warning as a footnote


# ------------------------------------------------------------------ GPU script, smoke mode on the CPU

def test_gpu_fid_script_smoke(tmp_path):
    import json

    from bench.gpu.fid_throughput import main

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        rep = main(["--out", str(tmp_path), "--smoke"])
    saved = json.loads((tmp_path / "fid_throughput.json").read_text())
    assert saved["device"].startswith("cpu") and saved["throughput"][0]["images_per_s"] > 0
    assert saved["fid"]["metric_impl"] == "adm-pt/fid-helper-7ff4a85c" and saved["fid"]["metric_n"] == 8
    assert np.isfinite(saved["fid"]["metrics"]["fid"]) and "fid_ci_hi" in saved["fid"]["metrics"]
    assert "images/s" in (tmp_path / "fid_throughput.md").read_text() and rep["smoke"]
    shutil.rmtree(tmp_path / "work")
