# What the GPU tier needs beyond the tracked tree (the Inception weights, Fashion-MNIST's four files, the
# wheels: ~119 MB) travels as one tar in parts, each small enough to ride in one device call beside the
# tracked tree (64 MiB a call, the tree included: the tree grows with the committed rows, so the parts
# shrink and their number grows). Sourced by bench/gpu/tier.sh and bench/gpu/device_suite.sh (the caller
# defines `log`). It replaced the three fixed 30 MB Inception parts, which stopped fitting once the tree passed 37 MB.
#   payload_split ROOM NAME=PATH...  HERE: a tar of the PATHs under their NAMEs, cut into parts of at most ROOM
#                                    bytes, $PAYLOAD_DIR/p<k>/payload.part-<k>-of-<n>, with the tar's sha256
#                                    beside part 1; older parts are removed (.gpuassets/ is ignored by git)
#   payload_stage                    GPU: the carried parts into $STAGE/payload (a warm machine keeps the
#                                    earlier calls' parts); once all n have come, joined, checked against
#                                    the sha256 and unpacked: inception/default_1.pt -> $INCEPTION_DIR,
#                                    fashion-mnist/* -> $STAGE/fashion-mnist, wheels/* -> $STAGE/wheels
#   payload_carries                  the calls' carry lists, one line each
#   tree_bytes                       HERE: the bytes of git's tracked files, which travel in every call (one du
#                                    over the whole list: xargs would cut it into batches, each with its own total)
PAYLOAD_DIR=${PAYLOAD_DIR:-.gpuassets}
INCEPTION_DIR=${INCEPTION_DIR:-/tmp/assets}  # where the joined Inception weights go (BENCH_ASSETS points here)

payload_split() {
  local room=$1 e tmp size n k
  shift
  [ "$room" -gt 1000000 ] || { log "the tracked tree leaves no room for the payload in a call ($room bytes): compact" \
    "the rows (python -m bench.gpu.tier compact) or archive old ones"; return 1; }
  tmp=$(mktemp -d) || return 1
  for e in "$@"; do
    [ -f "${e#*=}" ] || { log "payload: missing ${e#*=}"; rm -rf "$tmp"; return 1; }
    mkdir -p "$tmp/files/$(dirname "${e%%=*}")" && ln -s "$(realpath "${e#*=}")" "$tmp/files/${e%%=*}"
  done
  tar chf "$tmp/payload.tar" -C "$tmp/files" . || { rm -rf "$tmp"; return 1; }
  size=$(stat -c %s "$tmp/payload.tar")
  n=$(( (size + room - 1) / room ))
  rm -rf "$PAYLOAD_DIR"/p[0-9]*
  for k in $(seq 1 "$n"); do
    mkdir -p "$PAYLOAD_DIR/p$k"
    dd if="$tmp/payload.tar" of="$PAYLOAD_DIR/p$k/payload.part-$k-of-$n" bs=1M iflag=skip_bytes,count_bytes \
      skip=$(( (k - 1) * room )) count="$room" status=none || { rm -rf "$tmp"; return 1; }
  done
  sha256sum "$tmp/payload.tar" | cut -d' ' -f1 > "$PAYLOAD_DIR/p1/payload.sha256"
  rm -rf "$tmp"
  log "payload: $(( size / 1000000 )) MB in $n parts of at most $(( room / 1000000 )) MB ($PAYLOAD_DIR/p1 .. p$n)"
}

payload_stage() {
  local dir=$STAGE/payload p n k
  mkdir -p "$dir"
  for p in "$PAYLOAD_DIR"/p[0-9]*/payload.*; do
    [ -f "$p" ] && cp "$p" "$dir/" && log "staged $(basename "$p")"
  done
  p=$(ls "$dir"/payload.part-1-of-* 2>/dev/null | head -1)
  [ -n "$p" ] || return 0
  n=${p##*-of-}
  for k in $(seq 1 "$n"); do
    [ -f "$dir/payload.part-$k-of-$n" ] || { log "payload: $(ls "$dir"/payload.part-*-of-"$n" | wc -l) of $n parts here"; return 0; }
  done
  for k in $(seq 1 "$n"); do cat "$dir/payload.part-$k-of-$n"; done > "$dir/payload.tar"
  if [ "$(sha256sum "$dir/payload.tar" | cut -d' ' -f1)" != "$(cat "$dir/payload.sha256" 2>/dev/null)" ]; then
    log "payload: the joined parts do not match payload.sha256 (parts of two preps?): prep again and carry every part"
    rm -f "$dir"/payload.*
    return 1
  fi
  rm -rf "$dir/x" && mkdir -p "$dir/x" && tar xf "$dir/payload.tar" -C "$dir/x" || return 1
  if [ -f "$dir/x/inception/default_1.pt" ]; then mkdir -p "$INCEPTION_DIR" && mv "$dir/x/inception/default_1.pt" "$INCEPTION_DIR/"; fi
  if [ -d "$dir/x/fashion-mnist" ]; then mkdir -p "$STAGE/fashion-mnist" && mv "$dir/x/fashion-mnist/"* "$STAGE/fashion-mnist/"; fi
  if [ -d "$dir/x/wheels" ]; then mkdir -p "$STAGE/wheels" && mv "$dir/x/wheels/"* "$STAGE/wheels/"; fi
  rm -rf "$dir"
  log "payload: joined $n parts (sha256 checked): the Inception weights, fashion-mnist and the wheels are in place"
}

payload_carries() {
  local p
  for p in "$PAYLOAD_DIR"/p[0-9]*; do [ -d "$p" ] && echo "carry [\"$p\"]"; done | sort -V
}

tree_bytes() {
  git ls-files -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1
}
