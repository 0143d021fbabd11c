# Debian packages for the test fixtures (sourced by scripts/slurm/up.sh and scripts/browser/install.sh;
# the caller defines `say`).
#   apt_missing PKG...        the PKGs that are not installed, one line
#   apt_install TAG PKG...    apt-get update + install, 3 attempts; 0 when installed, else 1 after
#                             printing the end of apt's log (/tmp/TAG-apt.*.log)
# `apt-get update` fails as a whole when any one source does (a third-party repository that is down,
# a proxy refusing one host); the Debian lists it did fetch are still good. So its failure is only
# reported, and the install decides: it succeeds when the packages are installable. Configuration
# files the packages ship keep what is there (--force-confdef/--force-confold), without a question.

apt_missing() {
  local p out=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || out+=("$p")
  done
  echo "${out[*]}"
}

apt_install() {
  local tag=$1 attempt aptlog
  shift
  aptlog=$(mktemp "/tmp/$tag-apt.XXXXXX.log")
  for attempt in 1 2 3; do
    DEBIAN_FRONTEND=noninteractive apt-get -q -o Acquire::Retries=2 -o DPkg::Lock::Timeout=120 update \
      >>"$aptlog" 2>&1 || say "apt-get update reported errors (one source unreachable?); installing anyway"
    if DEBIAN_FRONTEND=noninteractive apt-get -q -y --no-install-recommends -o DPkg::Lock::Timeout=120 \
         -o Acquire::Retries=2 -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
         install "$@" >>"$aptlog" 2>&1; then
      rm -f "$aptlog"
      return 0
    fi
    say "apt-get install failed (attempt $attempt): $(grep -E '^(E|Err):' "$aptlog" | tail -n 3 | tr '\n' ' ')"
    [ "$attempt" = 3 ] || sleep 5
  done
  tail -n 30 "$aptlog"
  return 1
}
