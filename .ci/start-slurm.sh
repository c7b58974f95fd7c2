#!/usr/bin/env bash
# A single-node Slurm cluster with MariaDB accounting, for the `slurm` engine's
# tests (docs/slurm.md explains every setting). Idempotent: a cluster that is
# already up and idle with this configuration is left alone. No systemd needed:
# every daemon is started by hand and logs under /var/log/slurm.
#   1. install slurm-wlm slurmctld slurmd slurmdbd slurmrestd munge mariadb-server
#      if missing, with a policy-rc.d that stops package scripts starting services;
#   2. write /etc/slurm/{slurm,cgroup,slurmdbd,gres}.conf for this node, with two
#      fake GPUs (/dev/fakegpu0,1: character devices made with mknod, never opened);
#   3. start munged, MariaDB (database slurm_acct_db), slurmdbd, register the
#      cluster, start slurmctld and slurmd;
#   4. wait until slurmctld reports the node idle *after* this start
#      (SlurmdStartTime), so a stale state from an earlier run is not mistaken.
# Exits non-zero, loudly, when any step fails: with CI=true the Slurm tests then
# fail instead of skipping. Stop with .ci/stop-slurm.sh.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
CLUSTER=${PIPCOOK_SLURM_CLUSTER:-pipcook}
PARTITION=${PIPCOOK_SLURM_PARTITION:-debug}
NODE=$(hostname -s)
LOG=/var/log/slurm
DB_PASS=${PIPCOOK_SLURM_DB_PASSWORD:-slurmdbd-ci}

fail() {
  echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!" >&2
  echo "!!! start-slurm: $*" >&2
  for f in "$LOG"/slurmctld.log "$LOG"/slurmd.log "$LOG"/slurmdbd.log /tmp/mariadb-start.log; do
    [ -f "$f" ] && { echo "--- tail $f" >&2; tail -n 15 "$f" >&2; }
  done
  echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!" >&2
  exit 1
}
trap 'fail "line $LINENO: \`$BASH_COMMAND\` failed"' ERR  # set -e alone would stop without a word
[ "$(id -u)" = 0 ] || fail "must run as root (it installs packages and starts daemons)"

# --- 1. packages -------------------------------------------------------------
need=()
for pair in slurmctld:slurmctld slurmd:slurmd slurmdbd:slurmdbd slurmrestd:slurmrestd sbatch:slurm-client \
            munged:munge mariadbd:mariadb-server; do
  command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "== start-slurm: installing ${need[*]}"
  made_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
  fi
  apt-get update -qq || fail "apt-get update failed"
  apt-get install -y -qq --no-install-recommends slurm-wlm slurmctld slurmd slurmdbd slurmrestd munge \
    mariadb-server >/tmp/slurm-apt.log 2>&1 || { tail -n 20 /tmp/slurm-apt.log >&2; fail "could not install Slurm"; }
  [ -n "$made_policy" ] && rm -f /usr/sbin/policy-rc.d
fi

# --- 2. configuration ----------------------------------------------------------
# What slurmd detects, so the node is never drained for claiming too much.
read -r CPUS MEM < <(slurmd -C | awk '{for(i=1;i<=NF;i++){split($i,a,"="); v[a[1]]=a[2]}} END{print v["CPUs"], v["RealMemory"]}')
[ -n "$CPUS" ] && [ -n "$MEM" ] || fail "slurmd -C did not report CPUs and RealMemory"
MEM=$((MEM * 9 / 10))  # leave the OS some room; slurmd drains a node that reports less than configured

for n in 0 1; do
  [ -c /dev/fakegpu$n ] || mknod -m 666 /dev/fakegpu$n c 195 $n || fail "mknod /dev/fakegpu$n failed"
done

install -d -m 755 /etc/slurm
conf=$(mktemp)
cat > "$conf" <<CONF
# Written by .ci/start-slurm.sh: one node, accounting in slurmdbd.
ClusterName=$CLUSTER
SlurmctldHost=$NODE
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
# Every job in its own cgroup: its processes tracked, its cores, memory and devices constrained.
ProctrackType=proctrack/cgroup
TaskPlugin=task/cgroup
JobAcctGatherType=jobacct_gather/cgroup
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without it a job that names no --mem is given the whole node.
DefMemPerCPU=256
PriorityType=priority/multifactor
PriorityWeightFairshare=10000
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageTRES=gres/gpu
# A job runs only under an account that exists, within its limits and QOS.
AccountingStorageEnforce=associations,limits,qos
JobCompType=jobcomp/none
GresTypes=gpu
# Short timers: a test sees a cancel or a finished job within seconds.
SchedulerParameters=sched_interval=2
KillWait=5
MinJobAge=300
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
NodeName=$NODE CPUs=$CPUS RealMemory=$MEM Gres=gpu:2 State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF
cgroup=$(mktemp)
cat > "$cgroup" <<CONF
CgroupPlugin=autodetect
ConstrainCores=yes
ConstrainRAMSpace=yes
ConstrainSwapSpace=yes
ConstrainDevices=yes
CONF
changed=""
install_conf() {  # install_conf SRC DEST MODE OWNER
  if ! cmp -s "$1" "$2"; then install -m "$3" -o "$4" -g "$4" "$1" "$2"; changed=1; fi
  rm -f "$1"
}
install_conf "$conf" /etc/slurm/slurm.conf 644 root
install_conf "$cgroup" /etc/slurm/cgroup.conf 644 root
gres=$(mktemp); echo "Name=gpu File=/dev/fakegpu[0-1]" > "$gres"
install_conf "$gres" /etc/slurm/gres.conf 644 root
dbd=$(mktemp)
cat > "$dbd" <<CONF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=slurm
PidFile=/run/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
CONF
install_conf "$dbd" /etc/slurm/slurmdbd.conf 600 slurm

install -d -o slurm -g slurm /var/spool/slurmctld "$LOG"
install -d /var/spool/slurmd
install -d -o munge -g munge -m 755 /run/munge

# --- 3. daemons ------------------------------------------------------------------
running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  echo "== start-slurm: starting munged"
  runuser -u munge -- munged || fail "munged did not start"
fi

if ! mysqladmin ping >/dev/null 2>&1; then
  echo "== start-slurm: starting MariaDB (log: /tmp/mariadb-start.log)"
  # The init script leaves a `logger` holding its stdout: never let it hold ours.
  /etc/init.d/mariadb start >/tmp/mariadb-start.log 2>&1 </dev/null || fail "MariaDB did not start"
fi
mysql -u root <<SQL || fail "could not create the accounting database"
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
SQL

if [ -n "$changed" ] && running /run/slurmctld.pid; then
  echo "== start-slurm: configuration changed, restarting the Slurm daemons"
  bash "$(dirname "$0")/stop-slurm.sh" --keep-db
fi

if ! running /run/slurmdbd.pid; then
  echo "== start-slurm: starting slurmdbd"
  slurmdbd || fail "slurmdbd did not start"
fi
for _ in $(seq 30); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 1; done
sacctmgr -n list cluster >/dev/null 2>&1 || fail "slurmdbd does not answer sacctmgr within 30 s"
if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
  sacctmgr -i add cluster "$CLUSTER" >/dev/null || fail "sacctmgr could not add cluster $CLUSTER"
fi

if ! running /run/slurmctld.pid; then
  echo "== start-slurm: starting slurmctld"
  slurmctld || fail "slurmctld did not start"
fi
if ! running /run/slurmd.pid; then
  echo "== start-slurm: starting slurmd"
  slurmd || fail "slurmd did not start"
fi

# --- 4. wait for an idle node registered by this slurmd ----------------------------
# The daemons write their pid files a moment after they fork into the background.
for _ in $(seq 100); do running /run/slurmd.pid && running /run/slurmctld.pid && break; sleep 0.1; done
running /run/slurmctld.pid || fail "slurmctld is not running 10 s after its start"
running /run/slurmd.pid || fail "slurmd is not running 10 s after its start"
slurmd_pid=$(cat /run/slurmd.pid)
slurmd_start=$(stat -c %Y /proc/"$slurmd_pid")
for _ in $(seq 60); do
  info=$(scontrol show node "$NODE" 2>/dev/null || true)
  state=$(sed -n 's/.*State=\([^ ]*\).*/\1/p' <<<"$info" | head -n1)
  since=$(sed -n 's/.*SlurmdStartTime=\([^ ]*\).*/\1/p' <<<"$info" | head -n1)
  since_s=$(date -d "$since" +%s 2>/dev/null || echo 0)
  if [[ "$state" == IDLE* || "$state" == MIXED* || "$state" == ALLOCATED* ]] && [ "$since_s" -ge $((slurmd_start - 2)) ]; then
    echo "== start-slurm: node $NODE is $state (slurmd since $since, $((CPUS)) CPUs, ${MEM} MB, 2 fake GPUs)"
    exit 0
  fi
  if [[ "$state" == DOWN* || "$state" == DRAIN* ]]; then
    scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
  fi
  sleep 1
done
scontrol show node "$NODE" >&2 || true
fail "node $NODE did not become idle within 60 s of slurmd's start (state: ${state:-unknown})"
