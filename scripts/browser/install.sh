#!/usr/bin/env bash
# Install Debian's headless browser for the HTML report's browser test (tests/test_report_browser.py):
# chromium and its chromium-driver (WebDriver), from Debian's own packages. Root only; idempotent
# (nothing is done when both are installed). Prints BROWSER_READY and the versions; exit 1 with the
# end of apt's log if the install fails.
#
#   sudo scripts/browser/install.sh
set -euo pipefail
say() { printf '[browser %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
PKGS=(chromium chromium-driver)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { say "ERROR: needs root to apt-get install ${missing[*]}"; exit 1; }
  command -v apt-get >/dev/null || { say "ERROR: no apt-get: install ${missing[*]} by hand"; exit 1; }
  say "apt-get install ${missing[*]}"
  aptlog=$(mktemp /tmp/browser-apt.XXXXXX.log)
  ok=""
  for attempt in 1 2 3; do
    # `apt-get update` fails as a whole when any one source does; the Debian lists it fetched are
    # still good, so only the install decides (as scripts/slurm/up.sh does)
    DEBIAN_FRONTEND=noninteractive apt-get -q -o Acquire::Retries=2 -o DPkg::Lock::Timeout=120 update \
      >>"$aptlog" 2>&1 || say "apt-get update reported errors (one source unreachable?); installing anyway"
    if DEBIAN_FRONTEND=noninteractive apt-get -q -y --no-install-recommends -o DPkg::Lock::Timeout=120 \
         -o Acquire::Retries=2 install "${missing[@]}" >>"$aptlog" 2>&1; then ok=1; break; fi
    say "apt-get install failed (attempt $attempt): $(grep -E '^(E|Err):' "$aptlog" | tail -n 3 | tr '\n' ' ')"
    [ "$attempt" = 3 ] || sleep 5
  done
  [ -n "$ok" ] || { tail -n 30 "$aptlog"; say "ERROR: apt-get install failed"; exit 1; }
  rm -f "$aptlog"
fi
for b in /usr/bin/chromium /usr/bin/chromedriver; do
  [ -x "$b" ] || { say "ERROR: $b is missing after the install"; exit 1; }
done
say "$(/usr/bin/chromium --version 2>/dev/null | head -n1); $(/usr/bin/chromedriver --version 2>/dev/null | head -n1)"
echo BROWSER_READY
