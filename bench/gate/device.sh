#!/usr/bin/env bash
# The speedup gate on a GPU machine that has torch but none of our other deps (as
# bench/gpu/device_suite.sh does for the suite). Wheels come in ./.whl, built elsewhere with
#   ../shared/tools/wheelhouse.sh .whl omegaconf==2.3.0 tabulate==0.10.0 torch-pruning==1.6.1
# (it adds antlr4-python3-runtime; add PyYAML if the image lacks it). No .git travels to such a
# machine: name the commit with BENCH_GIT_SHA (bench.results.git_info), or the record says "unknown".
#   BENCH_GIT_SHA=<sha> bash bench/gate/device.sh [gate args...]       e.g. --write-expectations
# Writes $OUT/gate-<stem>.json and, with --write-expectations, $OUT/<stem>.yaml (the committed file
# is left as it is; copy the new one over it). BENCH_GATE_FILE picks the file (default dit_xl2.yaml).
set -euo pipefail
cd "$(dirname "$0")/../.."
. bench/gpu/wheels.sh  # the carried wheels into /tmp/site, on PYTHONPATH
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
file=${BENCH_GATE_FILE:-bench/gate/expectations/dit_xl2.yaml}
out=${OUT:-.}
stem=$(basename "$file" .yaml)
python3 -m bench.gate "$file" --out "$out/gate-$stem.json" --write-to "$out/$stem.yaml" "$@"
