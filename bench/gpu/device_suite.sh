#!/usr/bin/env bash
# Run the embedded default suite on a GPU machine that has torch but none of our other deps.
# Wheels come in ./.whl; the offline Inception file (87 MB, over one transfer) is joined from
# /tmp/assets/part1 (an earlier call) and artifacts/gpu_fid2/part2. Rows and reports are packed into $OUT.
#   bash bench/gpu/device_suite.sh [hydra overrides...]
set -euo pipefail
cd "$(dirname "$0")/../.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
mkdir -p /tmp/assets
if [ -f /tmp/assets/part1 ] && [ -f artifacts/gpu_fid2/part2 ]; then
  cat /tmp/assets/part1 artifacts/gpu_fid2/part2 > /tmp/assets/default_1.pt
fi
export BENCH_ASSETS=/tmp/assets
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
export BENCH_PYTHON=python3 BENCH_JOBS=1 BENCH_RESULTS=${BENCH_RESULTS:-results/gpu/runs} BENCH_REPORT=${BENCH_REPORT:-gpu}
export BENCH_ARTIFACTS=${BENCH_ARTIFACTS:-/tmp/bench-artifacts}
export BENCH_DENSE_EVAL=""   # every run gets the caller's eval (eval=inception: all rows)
pack() {  # whatever finished comes back, also after a failure or a time-out
  [ -n "${OUT:-}" ] || return 0
  tar czf "$OUT/gpu_suite.tgz" "$BENCH_RESULTS" reports/tables/"$BENCH_REPORT".* reports/figures/"${BENCH_REPORT}"_* 2>/dev/null || true
}
trap pack EXIT
./run_all.sh device=cuda "$@"
