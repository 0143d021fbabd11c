#!/usr/bin/env bash
# Run the embedded default suite on a GPU machine that has torch but none of our other deps.
# Wheels come in ./.whl (README: the wheel recipe); the offline Inception file (87 MB, over one
# transfer) is joined from two parts: $BENCH_INCEPTION_PART1 (default /tmp/assets/part1, left by an
# earlier call) and $BENCH_INCEPTION_PART2 (default .gpuassets/b/part2, carried with the tree);
# bench.assets checks the joined file's sha256. Rows and reports are packed into $OUT.
#   bash bench/gpu/device_suite.sh [hydra overrides...]      e.g. eval=inception
# run_all.sh sees device=cuda and runs one phase with the same eval for every row.
set -euo pipefail
cd "$(dirname "$0")/../.."
. bench/gpu/wheels.sh  # the carried wheels into /tmp/site, on PYTHONPATH
mkdir -p /tmp/assets
PART1=${BENCH_INCEPTION_PART1:-/tmp/assets/part1}
PART2=${BENCH_INCEPTION_PART2:-.gpuassets/b/part2}
if [ -f "$PART1" ] && [ -f "$PART2" ]; then
  cat "$PART1" "$PART2" > /tmp/assets/default_1.pt
elif [ ! -f /tmp/assets/default_1.pt ]; then
  echo "[device_suite] no Inception parts ($PART1, $PART2) and no /tmp/assets/default_1.pt: eval=inception will stop" >&2
fi
export BENCH_ASSETS=/tmp/assets
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
export BENCH_PYTHON=python3 BENCH_RESULTS=${BENCH_RESULTS:-results/gpu/runs} BENCH_REPORT=${BENCH_REPORT:-gpu}
export BENCH_ARTIFACTS=${BENCH_ARTIFACTS:-/tmp/bench-artifacts}
pack() {  # whatever finished comes back, also after a failure or a time-out
  [ -n "${OUT:-}" ] || return 0
  tar czf "$OUT/gpu_suite.tgz" "$BENCH_RESULTS" reports/tables/"$BENCH_REPORT".* reports/figures/"${BENCH_REPORT}"_* reports/"$BENCH_REPORT".html 2>/dev/null || true
}
trap pack EXIT
./run_all.sh device=cuda "$@"
