# shellcheck shell=bash
# Shared by scripts/slurm/up.sh and down.sh: where the test cluster keeps its files, and the
# process helpers. Every daemon we start is recorded as  $OWNED/<name>.pid  and is only ever
# signalled after /proc/<pid>/comm confirms it is still that daemon (no pkill, no killall).

CONF_DIR=/etc/slurm                      # default location: sbatch/sacct/scancel need no SLURM_CONF
STATE_DIR=/var/lib/diffprune-slurm       # private MariaDB datadir + its password (kept across runs)
RUN_DIR=/run/diffprune-slurm             # pid records and the MariaDB socket
OWNED="$RUN_DIR/owned"
LOG_DIR=/var/log/slurm
DB_DATADIR="$STATE_DIR/mysql"
DB_SOCK="$RUN_DIR/mysql/mysqld.sock"
DB_PIDFILE="$RUN_DIR/mysql/mysqld.pid"
MUNGE_PIDFILE=/run/munge/munged.pid
# the slurm daemons write these themselves (named in slurm.conf / slurmdbd.conf)
CTLD_PIDFILE=/run/slurmctld.pid
SLURMD_PIDFILE=/run/slurmd.pid
DBD_PIDFILE=/run/slurmdbd.pid
HOSTS_MARK="# diffprune-bench scripts/slurm/up.sh"

say() { printf '[slurm %s %s] %s\n' "${0##*/}" "$(date +%H:%M:%S)" "$*"; }

# A process that exited stays a zombie until PID 1 reaps it (seconds, on these VMs): count
# state Z as gone.
alive() {
  local st
  st=$(sed -n 's/.*) \(.\).*/\1/p' "/proc/$1/stat" 2>/dev/null) && [ -n "$st" ] && [ "$st" != Z ]
}

# pidfile_pid FILE COMM: print the pid in FILE if that process is alive and is COMM.
pidfile_pid() {
  local p
  [ -s "$1" ] || return 1
  p=$(tr -dc '0-9' <"$1")
  [ -n "$p" ] && [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "$2" ] && alive "$p" && echo "$p"
}

# until_ok SECONDS CMD...: retry CMD every 0.1 s; fail after SECONDS.
until_ok() {
  local end=$(( $(date +%s) + $1 )); shift
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$end" ] || return 1
    sleep 0.1
  done
}

# stop_pid NAME PID [GRACE]: SIGTERM, wait GRACE seconds, then SIGKILL.
stop_pid() {
  local name=$1 p=$2 grace=${3:-20} n
  alive "$p" || return 0
  kill -TERM "$p" 2>/dev/null
  n=$(( grace * 10 ))
  while alive "$p" && [ "$n" -gt 0 ]; do sleep 0.1; n=$(( n - 1 )); done
  if alive "$p"; then
    say "$name ($p) ignored SIGTERM for ${grace}s: SIGKILL"
    kill -KILL "$p" 2>/dev/null
    until_ok 5 bash -c "! [ -d /proc/$p ] || grep -q '^State:.*Z' /proc/$p/status"
  fi
  say "$name ($p) stopped"
}
