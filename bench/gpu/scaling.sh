#!/usr/bin/env bash
# Data-parallel scaling (bench/gpu/scaling.py: its docstring says what is timed) on the GPUs of this host:
# `torchrun --nproc-per-node=N -m bench.gpu.scaling measure` for N = 1, 2, 4, 8 (those that fit the GPUs
# present), each under the call's time left, then `report`; an N whose scaling_N<N>.json exists is skipped,
# so calls of at most 10 minutes resume where the last one stopped. On a machine with torch only:
#   BENCH_GIT_SHA=<sha> bash bench/gpu/scaling.sh [measure options, e.g. --ft-batch 128]     carry [".whl"]
# The jsons and the report are copied to $OUT; put the jsons back into $SCALING_OUT (results/gpu/scaling) of
# the checkout before the next call. Environment: SCALING_OUT, SCALING_CHUNK_S (540: this call's work),
# SCALING_MIN_S (240: an N starts only with this much left), SCALING_NS ("1 2 4 8"), BENCH_PYTHON (python3).
set -uo pipefail
cd "$(dirname "$0")/../.."
START=$(date +%s)
DIR=${SCALING_OUT:-results/gpu/scaling}
PY=${BENCH_PYTHON:-python3}
CHUNK_S=${SCALING_CHUNK_S:-540}
MIN_S=${SCALING_MIN_S:-240}
# NVLink multicast stays off (it can take the host's shared GPUs out of service); collectives that hang
# give up after 10 minutes instead of bench.dist's 3 hours
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export BENCH_DIST_TIMEOUT_MIN=${BENCH_DIST_TIMEOUT_MIN:-10}
. bench/gpu/wheels.sh  # the carried wheels into /tmp/site, on PYTHONPATH
log() { echo "[scaling.sh] $*"; }
GPUS=$(nvidia-smi -L 2>/dev/null | wc -l)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
[ "$GPUS" -ge 1 ] || { log "no GPU (nvidia-smi -L lists none)"; exit 2; }
mkdir -p "$DIR"
for N in ${SCALING_NS:-1 2 4 8}; do
  if [ "$N" -gt "$GPUS" ]; then log "N=$N: only $GPUS GPU(s) here"; continue; fi
  if [ -f "$DIR/scaling_N$N.json" ]; then log "N=$N: $DIR/scaling_N$N.json exists"; continue; fi
  left=$((START + CHUNK_S - $(date +%s)))
  if [ "$left" -lt "$MIN_S" ]; then log "N=$N: ${left}s left in this call (< $MIN_S): next call"; break; fi
  log "N=$N: measuring (at most ${left}s)"
  timeout -k 20 "$left" "$PY" -m torch.distributed.run --standalone --nproc-per-node="$N" \
    -m bench.gpu.scaling measure --out "$DIR" "$@" || log "N=$N: failed or timed out (exit $?)"
done
"$PY" -m bench.gpu.scaling report "$DIR" || log "report: not yet (see above)"
if [ -n "${OUT:-}" ]; then cp "$DIR"/scaling* "$OUT"/ 2>/dev/null; fi
for N in ${SCALING_NS:-1 2 4 8}; do
  if [ "$N" -le "$GPUS" ] && [ ! -f "$DIR/scaling_N$N.json" ]; then log "still to measure: N=$N"; fi
done
exit 0
