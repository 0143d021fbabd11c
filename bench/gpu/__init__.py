"""Scripts that measure on a GPU (run by hand or in CI on a GPU machine; tested on the CPU with --smoke)."""
from __future__ import annotations

import argparse
import sys


def script(doc: str, module: str, argv=None, extra=None):
    """The common start of a measuring script: --out and --smoke parsed (plus `extra(parser)`'s
    options), the device ("cpu" with --smoke, else "cuda", refused when none is visible: None) and
    the record's provenance (device, torch, commit, the command). Returns (args, device, meta)."""
    import torch

    from bench.metrics.cost import device_name
    from bench.results import git_info

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny DiT on the CPU (tests)")
    if extra is not None:
        extra(ap)
    args = ap.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; use --smoke on the CPU", file=sys.stderr)
        return args, None, {}
    sha, dirty = git_info()
    meta = {"device": device_name(device), "device_type": device, "torch": torch.__version__,
            "commit": sha + ("-dirty" if dirty else ""),
            "command": f"python -m {module} " + " ".join(argv if argv is not None else sys.argv[1:])}
    return args, device, meta
