#!/usr/bin/env bash
# Install Debian's headless browser for the HTML report's browser test (tests/test_report_browser.py):
# chromium and its chromium-driver (WebDriver), from Debian's own packages. Root only; idempotent
# (nothing is done when both are installed). Prints BROWSER_READY and the versions; exit 1 with the
# end of apt's log if the install fails.
#
#   sudo scripts/browser/install.sh
set -euo pipefail
say() { printf '[browser %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
. "$(dirname "$0")/../apt.sh"
read -r -a missing <<< "$(apt_missing chromium chromium-driver)"
if [ "${#missing[@]}" -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { say "ERROR: needs root to apt-get install ${missing[*]}"; exit 1; }
  command -v apt-get >/dev/null || { say "ERROR: no apt-get: install ${missing[*]} by hand"; exit 1; }
  say "apt-get install ${missing[*]}"
  apt_install browser "${missing[@]}" || { say "ERROR: apt-get install failed"; exit 1; }
fi
for b in /usr/bin/chromium /usr/bin/chromedriver; do
  [ -x "$b" ] || { say "ERROR: $b is missing after the install"; exit 1; }
done
say "$(/usr/bin/chromium --version 2>/dev/null | head -n1); $(/usr/bin/chromedriver --version 2>/dev/null | head -n1)"
echo BROWSER_READY
