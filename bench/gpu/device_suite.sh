#!/usr/bin/env bash
# Run the embedded default suite on a GPU machine that has torch but none of our other deps.
# Wheels come in ./.whl (see README "GPU"); results and reports are packed into $OUT.
#   bash bench/gpu/device_suite.sh [hydra overrides...]
set -euo pipefail
cd "$(dirname "$0")/../.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
export BENCH_PYTHON=python3 BENCH_JOBS=1 BENCH_RESULTS=${BENCH_RESULTS:-results/gpu} BENCH_REPORT=${BENCH_REPORT:-gpu}
export BENCH_ARTIFACTS=${BENCH_ARTIFACTS:-/tmp/bench-artifacts}
./run_all.sh device=cuda "$@"
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/gpu_suite.tgz" "$BENCH_RESULTS" "reports/tables/$BENCH_REPORT".* "reports/figures/${BENCH_REPORT}"_*
  cp "reports/tables/$BENCH_REPORT.md" "$OUT/"
fi
