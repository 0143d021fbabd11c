#!/usr/bin/env bash
# Bring up a single-node, loopback-only SLURM cluster for the SLURM tests (tests/test_slurm.py)
# from Debian 12's own packages: munge, slurmctld + slurmd (22.05), and slurmdbd with a private
# MariaDB so that `sacct` works (submitit learns that a job was cancelled or requeued only from
# sacct; without accounting a killed job makes the launcher wait forever).
#
#   sudo scripts/slurm/up.sh      # prints SLURM_READY when the node is idle; exit 1 + log tails if not
#   sudo scripts/slurm/down.sh    # stops exactly the daemons this script started
#
# Idempotent: daemons already up are reused (a config change restarts the slurm daemons).
# Root only; no systemd needed (daemons are started by hand). Nothing listens beyond 127.0.0.1:
# slurmctld 6817, slurmd 6818, slurmdbd 6819; MariaDB has no TCP port, only a unix socket.
#
# Environment:
#   SLURM_CPUS=N            declare N CPUs on the node (default: what `slurmd -C` detects);
#                           N above the core count oversubscribes
#   SLURM_PARTITION=debug   the (default) partition's name
#   SLURM_CRED_EXPIRE=10    seconds a requeued job waits before it may start again
#                           (SLURM's default is 120; the requeue test would wait that long)
#   SLURM_READY_TIMEOUT=60  seconds to wait for the node to become idle
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$HERE/lib.sh"

PARTITION=${SLURM_PARTITION:-debug}
NODE=localnode
CRED_EXPIRE=${SLURM_CRED_EXPIRE:-10}
READY_TIMEOUT=${SLURM_READY_TIMEOUT:-60}
T0=$(date +%s.%N)
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }

fail() {
  say "ERROR: $*"
  for f in "$LOG_DIR"/slurmctld.log "$LOG_DIR"/slurmd.log "$LOG_DIR"/slurmdbd.log "$LOG_DIR"/mariadb.log; do
    [ -f "$f" ] && { echo "----- last lines of $f"; tail -n 20 "$f"; }
  done
  exit 1
}
[ "$(id -u)" = 0 ] || fail "needs root (it installs packages and starts system daemons)"

# ---- 1. packages (skipped when present) ------------------------------------------------------
. "$(dirname "$0")/../apt.sh"
read -r -a missing <<< "$(apt_missing munge slurmctld slurmd slurm-client slurmdbd mariadb-server)"
if [ "${#missing[@]}" -gt 0 ]; then
  say "apt-get install ${missing[*]}"
  # The packages' maintainer scripts would start daemons of their own (holding our ports):
  # a policy-rc.d that answers 101 forbids that. Add one only for the install, only if absent.
  added_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
    added_policy=1
    # also when this script is stopped mid-install (the tests' timeout stops its process group)
    trap '[ -z "$added_policy" ] || rm -f /usr/sbin/policy-rc.d' EXIT
    trap 'exit 143' TERM INT
  fi
  ok=""
  apt_install slurm "${missing[@]}" && ok=1
  [ -z "$added_policy" ] || { rm -f /usr/sbin/policy-rc.d; added_policy=""; }
  [ -n "$ok" ] || fail "apt-get install failed"
fi
say "packages: $(dpkg-query -W -f='${Package} ${Version}  ' slurmctld munge slurmdbd 2>/dev/null) ($(elapsed)s)"

install -d -m 0755 "$RUN_DIR" "$OWNED" "$STATE_DIR" /var/lib/slurm/slurmd
install -d -o slurm -g slurm -m 0755 "$LOG_DIR" /var/lib/slurm/slurmctld

# ---- 2. loopback only --------------------------------------------------------------------------
# With CommunicationParameters=NoInAddrAny the daemons bind to the address the hostname
# resolves to instead of 0.0.0.0; make sure that address is a loopback one.
host=$(hostname)
case "$(getent ahostsv4 "$host" 2>/dev/null | awk 'NR==1{print $1}')" in
  127.*) ;;
  *) say "mapping hostname $host to 127.0.0.1 in /etc/hosts (down.sh removes the line)"
     echo "127.0.0.1 $host $HOSTS_MARK" >>/etc/hosts ;;
esac

# ---- 3. configuration --------------------------------------------------------------------------
# The node must be declared as slurmd detects it (else it is drained); RealMemory 1 GiB below
# the detected size; a job without --mem gets an equal share per CPU instead of the whole node.
topo=$(slurmd -C | head -n1)
field() { sed -n "s/.*[[:space:]]$1=\([0-9]*\).*/\1/p" <<<"$topo"; }
cpus=$(field CPUs); mem=$(field RealMemory)
[ -n "$cpus" ] && [ -n "$mem" ] || fail "cannot read the node from 'slurmd -C': $topo"
node_line="CPUs=$cpus Boards=$(field Boards) SocketsPerBoard=$(field SocketsPerBoard) CoresPerSocket=$(field CoresPerSocket) ThreadsPerCore=$(field ThreadsPerCore)"
overrides=""
if [ -n "${SLURM_CPUS:-}" ] && [ "$SLURM_CPUS" != "$cpus" ]; then
  cpus=$SLURM_CPUS
  node_line="CPUs=$cpus Boards=1 SocketsPerBoard=1 CoresPerSocket=$cpus ThreadsPerCore=1"
  overrides="SlurmdParameters=config_overrides   # trust the declared CPUs over the detected ones"
fi
realmem=$(( mem > 2048 ? mem - 1024 : mem ))

slurm_conf=$(cat <<EOF
# Written by diffprune-bench scripts/slurm/up.sh: one node, loopback only, for the tests.
ClusterName=diffprune
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job may start again after this many seconds (SLURM's default: 120)
AuthInfo=cred_expire=$CRED_EXPIRE
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=$CTLD_PIDFILE
SlurmdPidFile=$SLURMD_PIDFILE
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
# no cgroups: --mem is used for scheduling only, not enforced
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
SchedulerType=sched/backfill
# start a newly submitted job at once (the default defers it up to 3 s), and look at pending
# jobs every 2 s (default 60: a requeued job would wait up to a minute after cred_expire)
SchedulerParameters=batch_sched_delay=0,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$(( realmem / cpus ))
ReturnToService=2
# SIGTERM -> SIGKILL grace on cancel (submitit's job handler ignores SIGTERM; default 30 s)
KillWait=5
InactiveLimit=0
MinJobAge=300
$overrides
NodeName=$NODE NodeHostname=localhost NodeAddr=127.0.0.1 $node_line RealMemory=$realmem State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
)

[ -s "$STATE_DIR/dbpass" ] || (umask 077; head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$STATE_DIR/dbpass")
dbpass=$(cat "$STATE_DIR/dbpass")
dbd_conf=$(cat <<EOF
# Written by diffprune-bench scripts/slurm/up.sh
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
# not in the 22.05 slurmdbd.conf manual, but honoured: bind 127.0.0.1 instead of 0.0.0.0
CommunicationParameters=NoInAddrAny
SlurmUser=slurm
PidFile=$DBD_PIDFILE
LogFile=$LOG_DIR/slurmdbd.log
StorageType=accounting_storage/mysql
# "localhost" = the unix socket named by MYSQL_UNIX_PORT when slurmdbd starts
StorageHost=localhost
StorageUser=slurm
StoragePass=$dbpass
StorageLoc=slurm_acct_db
EOF
)

# write_if_changed FILE MODE OWNER TEXT: returns 0 when the file changed
write_if_changed() {
  [ -f "$1" ] && [ "$(cat "$1")" = "$4" ] && return 1
  (umask 077; printf '%s\n' "$4" >"$1.new")
  chmod "$2" "$1.new"; chown "$3" "$1.new"; mv "$1.new" "$1"
}
changed=""
write_if_changed "$CONF_DIR/slurm.conf" 644 root:root "$slurm_conf" && changed=1
write_if_changed "$CONF_DIR/slurmdbd.conf" 600 slurm:slurm "$dbd_conf" && changed=1  # slurmdbd insists on 0600
if [ -n "$changed" ]; then
  for d in slurmctld:$CTLD_PIDFILE slurmd:$SLURMD_PIDFILE slurmdbd:$DBD_PIDFILE; do
    if p=$(pidfile_pid "${d#*:}" "${d%%:*}"); then
      say "configuration changed: restarting ${d%%:*}"; stop_pid "${d%%:*}" "$p" 30
    fi
  done
fi

# ---- 4. munge (authentication between the daemons and the clients) ------------------------------
[ -s /etc/munge/munge.key ] || { mungekey --create --keyfile=/etc/munge/munge.key
                                 chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
if pidfile_pid "$MUNGE_PIDFILE" munged >/dev/null && munge -n </dev/null | unmunge >/dev/null 2>&1; then
  say "munged: already running"
else
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
  rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock "$MUNGE_PIDFILE"
  runuser -u munge -- /usr/sbin/munged --origin=127.0.0.1 </dev/null >/dev/null 2>&1 || fail "munged did not start"
  until_ok 10 bash -c 'munge -n </dev/null | unmunge' || fail "munge does not answer"
  pidfile_pid "$MUNGE_PIDFILE" munged >"$OWNED/munged.pid"
  say "munged: started, pid $(cat "$OWNED/munged.pid")"
fi

# ---- 5. accounting: a private MariaDB (socket only) and slurmdbd --------------------------------
db=(mariadb --no-defaults --socket="$DB_SOCK" -u root)
if pidfile_pid "$DB_PIDFILE" mariadbd >/dev/null && "${db[@]}" -e 'SELECT 1' >/dev/null 2>&1; then
  say "mariadbd: already running"
else
  install -d -o mysql -g mysql -m 0755 "$RUN_DIR/mysql"
  if [ ! -d "$DB_DATADIR/mysql" ]; then
    install -d -o mysql -g mysql -m 0750 "$DB_DATADIR"
    mariadb-install-db --no-defaults --user=mysql --datadir="$DB_DATADIR" --skip-test-db \
      --auth-root-authentication-method=socket >"$LOG_DIR/mariadb-install.log" 2>&1 \
      || { tail -n 20 "$LOG_DIR/mariadb-install.log"; fail "mariadb-install-db failed"; }
  fi
  rm -f "$DB_SOCK" "$DB_PIDFILE"
  # setsid + redirected stdio: the server must not hold the caller's terminal or pipes
  setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$DB_DATADIR" --socket="$DB_SOCK" \
    --pid-file="$DB_PIDFILE" --skip-networking --log-error="$LOG_DIR/mariadb.log" \
    --innodb-buffer-pool-size=128M </dev/null >/dev/null 2>&1 &
  until_ok 60 "${db[@]}" -e 'SELECT 1' || fail "mariadbd did not come up"
  pidfile_pid "$DB_PIDFILE" mariadbd >"$OWNED/mariadbd.pid"
  say "mariadbd: started, pid $(cat "$OWNED/mariadbd.pid"), socket $DB_SOCK"
fi
"${db[@]}" -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$dbpass';
  ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$dbpass';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;" || fail "cannot create the DB user"

if pidfile_pid "$DBD_PIDFILE" slurmdbd >/dev/null; then
  say "slurmdbd: already running"
else
  rm -f "$DBD_PIDFILE"
  MYSQL_UNIX_PORT="$DB_SOCK" /usr/sbin/slurmdbd </dev/null >/dev/null 2>&1 || fail "slurmdbd did not start"
  until_ok 30 pidfile_pid "$DBD_PIDFILE" slurmdbd || fail "slurmdbd wrote no pidfile"
  pidfile_pid "$DBD_PIDFILE" slurmdbd >"$OWNED/slurmdbd.pid"
  until_ok 60 bash -c 'exec 3<>/dev/tcp/127.0.0.1/6819' || fail "slurmdbd does not listen"  # schema created on first start
  say "slurmdbd: started, pid $(cat "$OWNED/slurmdbd.pid")"
fi

# ---- 6. the controller and the node daemon -----------------------------------------------------
if pidfile_pid "$CTLD_PIDFILE" slurmctld >/dev/null; then
  say "slurmctld: already running"
else
  rm -f "$CTLD_PIDFILE"
  /usr/sbin/slurmctld </dev/null >/dev/null 2>&1 || fail "slurmctld did not start"
  until_ok 30 pidfile_pid "$CTLD_PIDFILE" slurmctld || fail "slurmctld wrote no pidfile"
  pidfile_pid "$CTLD_PIDFILE" slurmctld >"$OWNED/slurmctld.pid"
  until_ok 30 scontrol ping || fail "slurmctld does not answer"
  say "slurmctld: started, pid $(cat "$OWNED/slurmctld.pid")"
fi
if pidfile_pid "$SLURMD_PIDFILE" slurmd >/dev/null; then
  say "slurmd: already running"
else
  rm -f "$SLURMD_PIDFILE"
  /usr/sbin/slurmd -N "$NODE" </dev/null >/dev/null 2>&1 || fail "slurmd did not start"  # -N: node name != hostname
  until_ok 30 pidfile_pid "$SLURMD_PIDFILE" slurmd || fail "slurmd wrote no pidfile"
  pidfile_pid "$SLURMD_PIDFILE" slurmd >"$OWNED/slurmd.pid"
  say "slurmd: started, pid $(cat "$OWNED/slurmd.pid")"
fi

# ---- 7. ready when the node is idle ------------------------------------------------------------
end=$(( $(date +%s) + READY_TIMEOUT )); resumed=""
while :; do
  state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n1)
  [ "$state" = idle ] && break
  case "$state" in
    *drain*|down*|*fail*)  # e.g. drained by an earlier run of ours: we own this node
      [ -n "$resumed" ] || { say "node is '$state': resuming it"; scontrol update NodeName="$NODE" State=RESUME || true; resumed=1; } ;;
  esac
  [ "$(date +%s)" -lt "$end" ] || fail "node not idle after ${READY_TIMEOUT}s (state '${state:-none}')"
  sleep 0.2
done
sinfo
say "ready in $(elapsed)s"
echo SLURM_READY
