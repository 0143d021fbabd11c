#!/usr/bin/env bash
# The suite in one command.
#   ./run_all.sh        install what is missing, run the embedded default suite, write tables + plots
#   ./run_all.sh test   install what is missing, run the test suite
set -euo pipefail
cd "$(dirname "$0")"
VENV=${BENCH_VENV:-.venv}
PY="$VENV/bin/python"

# ---- Install (idempotent: skipped when pyproject.toml has not changed) ---------------------
install() {
  local stamp="$VENV/.bench-installed" want
  want=$(sha256sum pyproject.toml | cut -c1-16)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$PY" -c "import bench, torch, hydra" 2>/dev/null; then
    return 0
  fi
  echo "[run_all] installing into $VENV (first time only)"
  [ -x "$PY" ] || python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  # torch first, from the builds this project's machines serve locally (pinned in pyproject.toml)
  if [ "$(uname -m)" = "x86_64" ]; then
    "$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1
  fi
  "$PY" -m pip install -q -e '.[test]'
  echo "$want" > "$stamp"
}
install

# ---- Tests -----------------------------------------------------------------------------------
if [ "${1:-}" = "test" ]; then
  shift
  exec "$PY" -m pytest -q "$@"
fi

# ---- The embedded default suite (digits, DiT-D8/2 teacher trained here, two budgets) ---------
# Every run is skipped when its row exists, so a second ./run_all.sh only rebuilds the report.
export PYTHONUNBUFFERED=1
RUN=("$PY" -m bench.run)
"${RUN[@]}" method=dense budget.keep=1.0 "$@"
"${RUN[@]}" -m experiment=default_suite "$@"
"${RUN[@]}" -m experiment=default_suite_random "$@"
"$PY" -m bench.report --runs results/runs --out reports --name default
echo "[run_all] tables: reports/tables/default.md  figures: reports/figures/"
