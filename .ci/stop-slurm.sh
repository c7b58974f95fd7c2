#!/usr/bin/env bash
# Stop what .ci/start-slurm.sh started: slurmctld and slurmd (after cancelling
# every job), then slurmdbd, MariaDB and munged. Idempotent: a daemon that is
# not running is skipped. `--keep-db` stops only slurmctld and slurmd (a
# configuration change). Fails loudly when a daemon outlives 30 s.
set -euo pipefail
keep_db=""; [ "${1:-}" = "--keep-db" ] && keep_db=1

fail() { echo "!!! stop-slurm: $*" >&2; exit 1; }
running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
wait_gone() {  # wait_gone PIDFILE NAME
  # A daemon removes its own pid file as it exits (munged does): a file gone between the test and the
  # read means the daemon is gone too.
  local pid; pid=$(cat "$1" 2>/dev/null) || return 0
  for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || { rm -f "$1"; return 0; }; sleep 0.1; done
  fail "$2 (pid $pid) still running 30 s after being asked to stop"
}

if running /run/slurmctld.pid || running /run/slurmd.pid; then
  echo "== stop-slurm: cancelling jobs, stopping slurmctld and slurmd"
  scancel --full --quiet --user=root 2>/dev/null || true
  scancel --full --quiet --state=PENDING 2>/dev/null || true
  scontrol shutdown >/dev/null 2>&1 || true
  # scontrol shutdown reaches slurmd through slurmctld; a lone slurmd gets SIGTERM.
  for _ in $(seq 100); do running /run/slurmctld.pid || break; sleep 0.1; done
  running /run/slurmd.pid && kill -TERM "$(cat /run/slurmd.pid)" 2>/dev/null || true
  running /run/slurmctld.pid && kill -TERM "$(cat /run/slurmctld.pid)" 2>/dev/null || true
  wait_gone /run/slurmd.pid slurmd
  wait_gone /run/slurmctld.pid slurmctld
fi
[ -n "$keep_db" ] && exit 0

if running /run/slurmdbd.pid; then
  echo "== stop-slurm: stopping slurmdbd"
  kill -TERM "$(cat /run/slurmdbd.pid)"
  wait_gone /run/slurmdbd.pid slurmdbd
fi
if command -v mysqladmin >/dev/null && mysqladmin ping >/dev/null 2>&1; then
  echo "== stop-slurm: stopping MariaDB"
  /etc/init.d/mariadb stop >/tmp/mariadb-stop.log 2>&1 </dev/null || fail "MariaDB did not stop (see /tmp/mariadb-stop.log)"
fi
if running /run/munge/munged.pid; then
  echo "== stop-slurm: stopping munged"
  kill -TERM "$(cat /run/munge/munged.pid)"
  wait_gone /run/munge/munged.pid munged
fi
echo "== stop-slurm: stopped"
