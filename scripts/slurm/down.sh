#!/usr/bin/env bash
# Stop the test cluster that scripts/slurm/up.sh started. Safe to run twice, and when up.sh
# never ran. Order: cancel every job and wait for the queue to empty, `scontrol shutdown`
# (slurmctld stops itself and slurmd), then slurmdbd, MariaDB and munged by the PIDs up.sh
# recorded in /run/diffprune-slurm/owned (each checked against /proc/PID/comm first).
# No pkill, no killall. Prints SLURM_DOWN.
#   SLURM_PURGE=1   also delete the controller state, the logs and the accounting database
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$HERE/lib.sh"
[ "$(id -u)" = 0 ] || { say "needs root"; exit 1; }
T0=$(date +%s.%N)
stopped=()

ctld=$(pidfile_pid "$CTLD_PIDFILE" slurmctld || true)
slurmd=$(pidfile_pid "$SLURMD_PIDFILE" slurmd || true)

# 1. jobs: cancel all, wait until squeue is empty (KillWait=5 bounds each)
if [ -n "$ctld" ] && scontrol ping >/dev/null 2>&1; then
  jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    say "cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    until_ok 30 bash -c '[ -z "$(squeue -h -o %A)" ]' || say "warning: jobs still listed: $(squeue -h -o '%A %T' | tr '\n' ' ')"
  fi
  # 2. the controller saves its state and stops itself and slurmd
  scontrol shutdown >/dev/null 2>&1 || true
fi
for d in "slurmctld:$ctld" "slurmd:$slurmd"; do
  name=${d%%:*} p=${d#*:}
  [ -n "$p" ] || continue
  stopped+=("$p")
  if until_ok 20 bash -c "! [ -d /proc/$p ] || grep -q '^State:.*Z' /proc/$p/status"; then say "$name ($p) exited"
  else stop_pid "$name" "$p"; fi
done

# 3. the daemons up.sh started and recorded; a daemon we did not start is left alone
for d in slurmdbd:20 mariadbd:60 munged:20; do
  name=${d%%:*}
  if p=$(pidfile_pid "$OWNED/$name.pid" "$name"); then stopped+=("$p"); stop_pid "$name" "$p" "${d#*:}"; fi
  rm -f "$OWNED/$name.pid"
done
rm -f "$OWNED/slurmctld.pid" "$OWNED/slurmd.pid"

# 4. slurmctld and slurmdbd run as user slurm and cannot remove their pidfiles from /run; a stale
#    /run/slurmctld.pid later breaks the package's prerm (it calls scancel)
for f in "$CTLD_PIDFILE:slurmctld" "$SLURMD_PIDFILE:slurmd" "$DBD_PIDFILE:slurmdbd"; do
  pidfile_pid "${f%%:*}" "${f#*:}" >/dev/null || rm -f "${f%%:*}"
done

# 5. let PID 1 reap what exited, so that `ps` is clean when we return
for _ in $(seq 50); do
  left=0; for p in "${stopped[@]}"; do [ -d "/proc/$p" ] && left=1; done
  [ "$left" = 0 ] && break; sleep 0.1
done
for d in /proc/[0-9]*; do
  c=$(cat "$d/comm" 2>/dev/null) || continue
  case "$c" in slurmctld|slurmd|slurmstepd|slurmdbd) alive "${d#/proc/}" && say "warning: still running: ${d#/proc/} $c";; esac
done

# 6. undo up.sh's /etc/hosts line, if it added one
grep -q "$HOSTS_MARK" /etc/hosts 2>/dev/null && sed -i "\|$HOSTS_MARK|d" /etc/hosts

if [ "${SLURM_PURGE:-0}" = 1 ]; then
  # job ids restart at 1 without the controller state, so the accounting DB must go with it
  rm -rf /var/lib/slurm/slurmctld/* /var/lib/slurm/slurmd/* "$STATE_DIR" "$LOG_DIR"/*
  say "purged controller state, logs and accounting database"
fi
say "down in $(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')s"
echo SLURM_DOWN
