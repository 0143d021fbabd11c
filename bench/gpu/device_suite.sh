#!/usr/bin/env bash
# Run the embedded default suite on a GPU machine that has torch but none of our other deps.
# Wheels come in ./.whl (README: the wheel recipe); the offline Inception file (87 MB, over one
# transfer with the tree) comes in the GPU tier's payload parts (bench/gpu/payload.sh), carried by earlier
# calls (`bash bench/gpu/tier.sh prep` writes them and prints their carries, each with the command
# `bash bench/gpu/tier.sh stage`; then this script with carry [".whl"]), joined and checked in /tmp/tier and
# put in /tmp/assets; bench.assets checks the file's sha256 again. Rows and reports are packed into $OUT.
#   bash bench/gpu/device_suite.sh [hydra overrides...]      e.g. eval=inception
# run_all.sh sees device=cuda and runs one phase with the same eval for every row.
# Prefix the command with BENCH_GIT_SHA=<git rev-parse --short=12 HEAD, here>: the machine's copy of the tree has
# a .git of the session's first commit, and rows name the commit their code came from (bench.results.git_info).
set -euo pipefail
cd "$(dirname "$0")/../.."
. bench/gpu/wheels.sh  # the carried wheels into /tmp/site, on PYTHONPATH
log() { echo "[device_suite] $*"; }
. bench/gpu/payload.sh
STAGE=${TIER_STAGE:-/tmp/tier} payload_stage || true  # parts carried by this call; tier.sh stage took the earlier ones
[ -f "$INCEPTION_DIR/default_1.pt" ] ||
  log "no Inception weights in $INCEPTION_DIR (the stage calls that \`bash bench/gpu/tier.sh prep\` prints, first): eval=inception will stop" >&2
export BENCH_ASSETS=$INCEPTION_DIR
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
[ -n "${BENCH_GIT_SHA:-}" ] || log "warning: no BENCH_GIT_SHA: rows record this copy's git, which may be an older commit"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
export BENCH_PYTHON=python3 BENCH_RESULTS=${BENCH_RESULTS:-results/gpu/runs} BENCH_REPORT=${BENCH_REPORT:-gpu}
export BENCH_ARTIFACTS=${BENCH_ARTIFACTS:-/tmp/bench-artifacts}
pack() {  # whatever finished comes back, also after a failure or a time-out
  [ -n "${OUT:-}" ] || return 0
  tar czf "$OUT/gpu_suite.tgz" "$BENCH_RESULTS" reports/tables/"$BENCH_REPORT".* reports/figures/"${BENCH_REPORT}"_* reports/"$BENCH_REPORT".html 2>/dev/null || true
}
trap pack EXIT
./run_all.sh device=cuda "$@"
